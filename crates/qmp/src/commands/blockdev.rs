//! `blockdev-add` and `blockdev-del`, and the same conversion for `--blockdev` on the command
//! line: protocol nodes (`file`) and format nodes (`qcow2`, `qed`, `raw`) over them, with
//! `backing` naming another node, `null` for none, or absent to open the recorded chain.

use crate::error::QmpError;
use crate::qsd_args::Opts;
use crate::state::{id_wellformed, Daemon, Node, ProtocolNode};
use imgstream_block::chain::open_layer;
use imgstream_block::{ChainOptions, Disk, FormatKind, Layer};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The drivers QEMU's `BlockdevDriver` knows; we open the first four.
const QEMU_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "snapshot-access",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "io_uring",
    "iscsi",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "nvme-io_uring",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "virtio-blk-vfio-pci",
    "virtio-blk-vhost-user",
    "virtio-blk-vhost-vdpa",
    "vmdk",
    "vpc",
    "vvfat",
];
const AIO: &[&str] = &["threads", "native", "io_uring"];
const LOCKING: &[&str] = &["auto", "on", "off"];
const DISCARD: &[&str] = &["ignore", "unmap"];
const DETECT_ZEROES: &[&str] = &["off", "on", "unmap"];

/// Options every driver takes (`BlockdevOptions`' base).
struct Common {
    node_name: Option<String>,
    read_only: bool,
}

fn common(opts: &mut Opts) -> Result<Common, QmpError> {
    let node_name = opts.str("node-name")?;
    opts.enum_value("discard", DISCARD)?;
    if let Some(mut cache) = opts.object("cache")? {
        cache.bool("direct")?;
        cache.bool("no-flush")?;
        cache.finish()?;
    }
    let read_only = opts.bool("read-only")?.unwrap_or(false);
    opts.bool("auto-read-only")?;
    opts.bool("force-share")?;
    opts.enum_value("detect-zeroes", DETECT_ZEROES)?;
    Ok(Common {
        node_name,
        read_only,
    })
}

/// Adds the node `arguments` describe (QMP `blockdev-add` or `--blockdev`).
pub fn blockdev_add(daemon: &Arc<Daemon>, mut opts: Opts) -> Result<(), QmpError> {
    let name = add_node(daemon, &mut opts, true)?;
    debug_assert!(name.is_some());
    Ok(())
}

/// Adds a node; returns its name (`None` for an inline child given no name, which we keep
/// inside its parent only).
fn add_node(daemon: &Arc<Daemon>, opts: &mut Opts, root: bool) -> Result<Option<String>, QmpError> {
    let driver = opts.req_str("driver")?;
    if !QEMU_DRIVERS.contains(&driver.as_str()) {
        return Err(QmpError::generic(format!(
            "Parameter '{}' does not accept value '{driver}'",
            opts.full("driver")
        )));
    }
    match driver.as_str() {
        "file" => add_file(daemon, opts, root),
        "qcow2" => add_format(daemon, opts, root, FormatKind::Qcow2),
        "qed" => add_format(daemon, opts, root, FormatKind::Qed),
        "raw" => add_format(daemon, opts, root, FormatKind::Raw),
        other => Err(QmpError::generic(format!(
            "Driver '{other}' is not supported by imgstream"
        ))),
    }
}

fn check_name(
    daemon: &Daemon,
    name: Option<String>,
    root: bool,
) -> Result<Option<String>, QmpError> {
    match name {
        None if root => Err(QmpError::generic(
            "'node-name' must be specified for the root node",
        )),
        None => Ok(None),
        Some(name) if !id_wellformed(&name) => {
            Err(QmpError::generic(format!("Invalid node-name: '{name}'")))
        }
        Some(name) if daemon.has_node(&name) => Err(QmpError::generic(format!(
            "Duplicate nodes with node-name='{name}'"
        ))),
        Some(name) => Ok(Some(name)),
    }
}

fn add_file(daemon: &Arc<Daemon>, opts: &mut Opts, root: bool) -> Result<Option<String>, QmpError> {
    let filename = opts.req_str("filename")?;
    opts.str("pr-manager")?;
    opts.enum_value("locking", LOCKING)?;
    opts.enum_value("aio", AIO)?;
    opts.int("aio-max-batch")?;
    opts.bool("drop-cache")?;
    opts.bool("x-check-cache-dropped")?;
    let direct = opts
        .map
        .get("cache")
        .and_then(|c| c.get("direct"))
        .map(|d| d.as_bool() == Some(true) || d.as_str() == Some("on"))
        .unwrap_or(false);
    let common = common(opts)?;
    opts.finish()?;
    let name = check_name(daemon, common.node_name, root)?;
    let path = PathBuf::from(&filename);
    probe_open(&path, common.read_only)?;
    let node = ProtocolNode {
        name: name.clone().unwrap_or_default(),
        path,
        read_only: common.read_only,
        direct,
        seq: daemon.next_seq(),
    };
    if name.is_some() {
        daemon.insert_protocol_node(node);
    }
    Ok(name)
}

/// QEMU opens the file when the node is added; so do we, to fail the same way.
fn probe_open(path: &Path, read_only: bool) -> Result<(), QmpError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map(drop)
        .map_err(|e| {
            let text = e.to_string();
            let text = text.split(" (os error").next().unwrap_or(&text);
            QmpError::generic(format!("Could not open '{}': {text}", path.display()))
        })
}

/// What `file` designates: a protocol node's path and options.
fn file_child(
    daemon: &Arc<Daemon>,
    opts: &mut Opts,
) -> Result<(PathBuf, Option<String>), QmpError> {
    match opts.take("file") {
        None => Err(QmpError::generic(format!(
            "Parameter '{}' is missing",
            opts.full("file")
        ))),
        Some(Value::String(reference)) => {
            let node = daemon.protocol_node(&reference).ok_or_else(|| {
                if daemon.node(&reference).is_some() {
                    QmpError::generic(format!(
                        "imgstream: 'file' must name a protocol node, '{reference}' is a format node"
                    ))
                } else {
                    QmpError::generic(format!(
                        "Cannot find device='{reference}' nor node-name='{reference}'"
                    ))
                }
            })?;
            Ok((node.path, Some(reference)))
        }
        Some(Value::Object(map)) => {
            let mut child = opts.child("file", map);
            let driver = child
                .map
                .get("driver")
                .and_then(Value::as_str)
                .map(String::from);
            if driver.as_deref() != Some("file") && driver.is_some() {
                return Err(QmpError::generic(format!(
                    "imgstream: only driver 'file' is supported under 'file', not '{}'",
                    driver.unwrap_or_default()
                )));
            }
            let path = child
                .map
                .get("filename")
                .and_then(Value::as_str)
                .map(PathBuf::from);
            let name = add_node(daemon, &mut child, false)?;
            let path =
                path.ok_or_else(|| QmpError::generic("Parameter 'file.filename' is missing"))?;
            Ok((path, name))
        }
        Some(_) => Err(QmpError::generic(format!(
            "Invalid parameter type for '{}', expected: BlockdevRef",
            opts.full("file")
        ))),
    }
}

enum Backing {
    Recorded,
    None,
    Node(String),
}

fn add_format(
    daemon: &Arc<Daemon>,
    opts: &mut Opts,
    root: bool,
    format: FormatKind,
) -> Result<Option<String>, QmpError> {
    let (path, file_node) = file_child(daemon, opts)?;
    let backing = if format == FormatKind::Raw {
        Backing::None
    } else {
        match opts.take("backing") {
            None => Backing::Recorded,
            Some(Value::Null) => Backing::None,
            Some(Value::String(s)) if s.is_empty() && opts.keyval => Backing::None,
            Some(Value::String(s)) => Backing::Node(s),
            Some(_) => {
                return Err(QmpError::generic(
                    "imgstream: 'backing' must name a node or be null",
                ))
            }
        }
    };
    match format {
        FormatKind::Qcow2 => {
            opts.bool("lazy-refcounts")?;
            opts.bool("pass-discard-request")?;
            opts.bool("pass-discard-snapshot")?;
            opts.bool("pass-discard-other")?;
            opts.str("data-file")?;
        }
        FormatKind::Raw => {
            opts.int("offset")?;
            opts.int("size")?;
        }
        FormatKind::Qed => {}
    }
    let common = common(opts)?;
    opts.finish()?;
    let name = check_name(daemon, common.node_name, root)?;
    let writable = !common.read_only;
    let open_error = |e: imgstream_block::Error| QmpError::generic(e.to_string());
    let explicit_backing = !matches!(backing, Backing::Recorded);
    let (disk, layer) = match backing {
        Backing::Recorded => {
            let options = ChainOptions {
                writable,
                format: Some(format),
                ..ChainOptions::read_only()
            };
            let disk = Disk::open(&path, &options).map_err(open_error)?;
            let top = disk.layers()[0].clone();
            (disk, top)
        }
        Backing::None | Backing::Node(_) => {
            let below: Vec<Arc<Layer>> = match &backing {
                Backing::Node(reference) => {
                    let node = daemon.node(reference).ok_or_else(|| {
                        QmpError::generic(format!(
                            "Cannot find device='{reference}' nor node-name='{reference}'"
                        ))
                    })?;
                    node.chain()
                }
                _ => Vec::new(),
            };
            let top = Arc::new(
                open_layer(
                    &path,
                    &path.to_string_lossy(),
                    Some(format),
                    writable,
                    false,
                )
                .map_err(open_error)?,
            );
            let mut layers = vec![top.clone()];
            layers.extend(below);
            (Disk::from_shared_layers(layers, writable), top)
        }
    };
    if let Some(name) = &name {
        let below_when_made = disk.layers()[1..].iter().map(Arc::downgrade).collect();
        daemon.insert_node(Node {
            name: name.clone(),
            disk: Arc::new(disk),
            layer,
            file: file_node,
            seq: daemon.next_seq(),
            explicit_backing,
            below_when_made,
        });
    }
    Ok(name)
}

/// `blockdev-del`: refuses a node something still uses, with QEMU's messages.
pub fn blockdev_del(daemon: &Daemon, name: &str) -> Result<(), QmpError> {
    if let Some(_file) = daemon.protocol_node(name) {
        if daemon
            .nodes()
            .iter()
            .any(|n| n.file.as_deref() == Some(name))
            || daemon.exports().iter().any(|e| e.node == name)
        {
            return Err(QmpError::generic(format!("Block device {name} is in use")));
        }
        daemon.remove_node(name);
        return Ok(());
    }
    let Some(node) = daemon.node(name) else {
        return Err(QmpError::generic(format!(
            "Failed to find node with node-name='{name}'"
        )));
    };
    if daemon
        .jobs()
        .iter()
        .any(|j| j.layers.iter().any(|l| Arc::ptr_eq(l, &node.layer)))
    {
        return Err(QmpError::generic(format!(
            "Node '{name}' is busy: block device is in use by block job: stream"
        )));
    }
    if daemon.exports().iter().any(|e| e.node == name) {
        return Err(QmpError::generic(format!("Node {name} is in use")));
    }
    for other in daemon.nodes() {
        if other.name == name {
            continue;
        }
        let Some(depth) = other.depth() else { continue };
        let layers = other.disk.layers();
        if layers
            .get(depth + 1)
            .is_some_and(|l| Arc::ptr_eq(l, &node.layer))
        {
            return Err(QmpError::generic(format!(
                "Node '{name}' is busy: node is used as backing hd of '{}'",
                other.name
            )));
        }
    }
    daemon.remove_node(name);
    Ok(())
}

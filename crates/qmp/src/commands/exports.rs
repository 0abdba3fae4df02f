//! The NBD server and its exports at run time: `nbd-server-start`, `nbd-server-stop`,
//! `block-export-add`, `block-export-del` (and `BLOCK_EXPORT_DELETED`), shared with the
//! `--nbd-server` and `--export` command-line options.

use crate::error::QmpError;
use crate::json::Json;
use crate::qsd_args::Opts;
use crate::state::{id_wellformed, Daemon, ExportInfo, NbdAddr};
use imgstream_block::chain::open_layer;
use imgstream_block::{Disk, FormatKind};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;

const EXPORT_TYPES: &[&str] = &["nbd", "vhost-user-blk", "fuse", "vduse-blk"];
const DELETE_MODES: &[&str] = &["safe", "hard"];
const ADDRESS_TYPES: &[&str] = &["inet", "unix", "vsock", "fd"];

/// QEMU's default limit is none (0); we keep the same meaning.
const UNLIMITED_CONNECTIONS: u32 = 0;

fn not_running() -> QmpError {
    QmpError::generic("NBD server not running")
}

/// Reads a flat `SocketAddress` (`type`, then `path` or `host`/`port`).
fn flat_address(addr: &mut Opts) -> Result<NbdAddr, QmpError> {
    let kind = addr.req_str("type")?;
    if !ADDRESS_TYPES.contains(&kind.as_str()) {
        return Err(QmpError::generic(format!(
            "Parameter '{}' does not accept value '{kind}'",
            addr.full("type")
        )));
    }
    let result = match kind.as_str() {
        "unix" => {
            let path = addr.req_str("path")?;
            addr.bool("abstract")?;
            addr.bool("tight")?;
            NbdAddr::Unix(PathBuf::from(path))
        }
        "inet" => {
            let host = addr.req_str("host")?;
            let port = addr.req_str("port")?;
            for key in ["numeric", "to", "ipv4", "ipv6", "keep-alive", "mptcp"] {
                addr.take(key);
            }
            NbdAddr::Inet { host, port }
        }
        other => {
            return Err(QmpError::generic(format!(
                "imgstream: NBD address type '{other}' is not supported"
            )))
        }
    };
    addr.finish()?;
    Ok(result)
}

/// `nbd-server-start` (QMP: legacy address `{type, data: {...}}`) and `--nbd-server` (flat
/// address): one entry point, `legacy` says which address form.
pub fn nbd_server_start(
    daemon: &Arc<Daemon>,
    mut opts: Opts,
    legacy: bool,
) -> Result<Json, QmpError> {
    let mut addr = opts
        .object("addr")?
        .ok_or_else(|| QmpError::generic("Parameter 'addr' is missing"))?;
    let address = if legacy {
        let kind = addr.req_str("type")?;
        let mut data = addr
            .object("data")?
            .ok_or_else(|| QmpError::generic("Parameter 'addr.data' is missing"))?;
        addr.finish()?;
        data.map.insert("type".into(), kind.into());
        flat_address(&mut data)?
    } else {
        flat_address(&mut addr)?
    };
    if opts.str("tls-creds")?.is_some() || opts.str("tls-authz")?.is_some() {
        return Err(QmpError::generic("imgstream: TLS is not supported"));
    }
    // QEMU: a uint32 of seconds, 0 for no limit, 10 by default.
    let handshake_timeout = match opts.int("handshake-max-seconds")? {
        None => Some(std::time::Duration::from_secs(10)),
        Some(0) => None,
        Some(seconds) => Some(std::time::Duration::from_secs(
            u32::try_from(seconds)
                .map_err(|_| {
                    QmpError::generic("Parameter 'handshake-max-seconds' expects uint32_t")
                })?
                .into(),
        )),
    };
    let max_connections = opts.int("max-connections")?.unwrap_or(0);
    let max_connections = u32::try_from(max_connections)
        .map_err(|_| QmpError::generic("Parameter 'max-connections' expects uint32_t"))?;
    opts.finish()?;
    let host = daemon
        .nbd_host()
        .ok_or_else(|| QmpError::generic("NBD is not available"))?;
    let mut running = daemon.nbd_addr();
    if running.is_some() {
        return Err(QmpError::generic("NBD server already running"));
    }
    let limit = if max_connections == UNLIMITED_CONNECTIONS {
        u32::MAX
    } else {
        max_connections
    };
    host.start(&address, limit, handshake_timeout)
        .map_err(QmpError::generic)?;
    *running = Some(address);
    Ok(Json::empty_object())
}

/// `nbd-server-stop`: stops listening and deletes every NBD export.
pub fn nbd_server_stop(daemon: &Arc<Daemon>) -> Result<Json, QmpError> {
    let host = daemon.nbd_host().ok_or_else(not_running)?;
    let mut running = daemon.nbd_addr();
    if running.take().is_none() {
        return Err(not_running());
    }
    drop(running);
    for export in daemon.exports() {
        host.remove_export(&export.name, true);
        daemon.remove_export(&export.id);
        daemon.emit("BLOCK_EXPORT_DELETED", Json::of(&json!({"id": export.id})));
    }
    host.stop();
    Ok(Json::empty_object())
}

/// `block-export-add` and `--export`.
pub fn block_export_add(daemon: &Arc<Daemon>, mut opts: Opts) -> Result<Json, QmpError> {
    let kind = opts.req_str("type")?;
    if !EXPORT_TYPES.contains(&kind.as_str()) {
        return Err(QmpError::generic(format!(
            "Parameter 'type' does not accept value '{kind}'"
        )));
    }
    let id = opts.req_str("id")?;
    opts.bool("fixed-iothread")?;
    opts.str("iothread")?;
    let node_name = opts.req_str("node-name")?;
    let writable = opts.bool("writable")?.unwrap_or(false);
    opts.bool("writethrough")?;
    if kind != "nbd" {
        return Err(QmpError::generic(format!(
            "imgstream: export type '{kind}' is not supported"
        )));
    }
    let name = opts.str("name")?.unwrap_or_else(|| node_name.clone());
    opts.str("description")?;
    opts.take("bitmaps");
    opts.bool("allocation-depth")?;
    opts.finish()?;
    // QEMU's order: the id, the node, then what the NBD export type needs.
    if !id_wellformed(&id) {
        return Err(QmpError::generic("Invalid block export id"));
    }
    if daemon.exports().iter().any(|e| e.id == id) {
        return Err(QmpError::generic(format!(
            "Block export id '{id}' is already in use"
        )));
    }
    if !daemon.has_node(&node_name) {
        return Err(QmpError::generic(format!(
            "Cannot find device='' nor node-name='{node_name}'"
        )));
    }
    let host = daemon.nbd_host().ok_or_else(not_running)?;
    if daemon.nbd_addr().is_none() {
        return Err(not_running());
    }
    let disk = node_disk(daemon, &node_name)?;
    if writable && !disk.is_writable() {
        return Err(QmpError::generic(
            "Cannot export read-only node as writable",
        ));
    }
    if daemon.exports().iter().any(|e| e.name == name) {
        return Err(QmpError::generic(format!(
            "NBD server already has export named '{name}'"
        )));
    }
    host.add_export(&name, disk, writable)
        .map_err(QmpError::generic)?;
    daemon.insert_export(ExportInfo {
        id,
        node: node_name,
        writable,
        name,
    });
    Ok(Json::empty_object())
}

/// `block-export-del`: in `safe` mode refuses while clients are connected.
pub fn block_export_del(daemon: &Arc<Daemon>, mut opts: Opts) -> Result<Json, QmpError> {
    let id = opts.req_str("id")?;
    let mode = opts
        .enum_value("mode", DELETE_MODES)?
        .unwrap_or_else(|| "safe".into());
    opts.finish()?;
    let export = daemon
        .exports()
        .into_iter()
        .find(|e| e.id == id)
        .ok_or_else(|| QmpError::generic(format!("Export '{id}' is not found")))?;
    let host = daemon.nbd_host().ok_or_else(not_running)?;
    if mode == "safe" && host.export_connections(&export.name) > 0 {
        return Err(QmpError::generic(format!("export '{id}' still in use")));
    }
    host.remove_export(&export.name, mode == "hard");
    daemon.remove_export(&id);
    daemon.emit("BLOCK_EXPORT_DELETED", Json::of(&json!({"id": id})));
    Ok(Json::empty_object())
}

/// The disk an export of `name` serves: a format node's disk, or a protocol node's file as
/// raw data (QSD's documentation exports a `file` node directly).
fn node_disk(daemon: &Daemon, name: &str) -> Result<Arc<Disk>, QmpError> {
    if let Some(node) = daemon.node(name) {
        return Ok(node.disk.clone());
    }
    let file = daemon.protocol_node(name).ok_or_else(|| {
        QmpError::generic(format!("Cannot find device='' nor node-name='{name}'"))
    })?;
    let writable = !file.read_only;
    let layer = open_layer(
        &file.path,
        &file.path.to_string_lossy(),
        Some(FormatKind::Raw),
        writable,
        false,
    )
    .map_err(|e| QmpError::generic(e.to_string()))?;
    Ok(Arc::new(Disk::from_shared_layers(
        vec![Arc::new(layer)],
        writable,
    )))
}

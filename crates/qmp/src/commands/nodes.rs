//! `query-named-block-nodes` (one entry per layer node, with the fields QSD shows for a
//! format node) and `query-block-exports`.

use crate::args::Args;
use crate::json::Json;
use crate::state::{Daemon, Node, ProtocolNode};
use imgstream_block::chain::resolve_backing;
use imgstream_block::{BackingRef, FormatKind, FormatSpecific, Layer};
use serde::Serialize;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

#[derive(Serialize)]
struct Cache {
    #[serde(rename = "no-flush")]
    no_flush: bool,
    direct: bool,
    writeback: bool,
}

#[derive(Serialize)]
struct Qcow2Data {
    compat: &'static str,
    #[serde(rename = "compression-type")]
    compression_type: &'static str,
    #[serde(rename = "lazy-refcounts")]
    lazy_refcounts: bool,
    #[serde(rename = "refcount-bits")]
    refcount_bits: u32,
    corrupt: bool,
    #[serde(rename = "extended-l2")]
    extended_l2: bool,
}

#[derive(Serialize)]
struct FormatSpecificInfo {
    #[serde(rename = "type")]
    kind: &'static str,
    data: Qcow2Data,
}

#[derive(Serialize)]
struct ImageInfo {
    #[serde(rename = "backing-image", skip_serializing_if = "Option::is_none")]
    backing_image: Option<Box<ImageInfo>>,
    #[serde(
        rename = "backing-filename-format",
        skip_serializing_if = "Option::is_none"
    )]
    backing_filename_format: Option<String>,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    filename: String,
    #[serde(rename = "cluster-size", skip_serializing_if = "Option::is_none")]
    cluster_size: Option<u64>,
    format: &'static str,
    #[serde(rename = "actual-size", skip_serializing_if = "Option::is_none")]
    actual_size: Option<u64>,
    #[serde(rename = "format-specific", skip_serializing_if = "Option::is_none")]
    format_specific: Option<FormatSpecificInfo>,
    #[serde(
        rename = "full-backing-filename",
        skip_serializing_if = "Option::is_none"
    )]
    full_backing_filename: Option<String>,
    #[serde(rename = "backing-filename", skip_serializing_if = "Option::is_none")]
    backing_filename: Option<String>,
    #[serde(rename = "dirty-flag")]
    dirty_flag: bool,
}

#[derive(Serialize)]
struct NodeInfo {
    iops_rd: u64,
    detect_zeroes: &'static str,
    active: bool,
    image: ImageInfo,
    iops_wr: u64,
    ro: bool,
    #[serde(rename = "node-name")]
    node_name: String,
    backing_file_depth: usize,
    drv: &'static str,
    iops: u64,
    bps_wr: u64,
    write_threshold: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_file: Option<String>,
    encrypted: bool,
    bps: u64,
    bps_rd: u64,
    cache: Cache,
    file: String,
}

/// The backing file `layer`'s header names, as QEMU reports it. After a completed stream that
/// is the one the header is about to name: our header changes in the flush the event starts,
/// QEMU's in its cache before the event.
fn header_backing(nodes: &[Node], layer: &Arc<Layer>) -> Option<BackingRef> {
    nodes
        .iter()
        .find(|n| n.depth() == Some(0) && Arc::ptr_eq(&n.layer, layer))
        .and_then(|n| n.disk.scheduled_backing())
        .unwrap_or_else(|| layer.image.backing())
}

fn image_info(nodes: &[Node], layer: &Arc<Layer>, below: &[Arc<Layer>]) -> ImageInfo {
    let image = &layer.image;
    let backing = header_backing(nodes, layer);
    let filename = layer.path.display().to_string();
    let format_specific = match image.format_specific() {
        FormatSpecific::Qcow2 {
            compat,
            compression_type,
            lazy_refcounts,
            refcount_bits,
            corrupt,
            extended_l2,
        } => Some(FormatSpecificInfo {
            kind: "qcow2",
            data: Qcow2Data {
                compat,
                compression_type,
                lazy_refcounts,
                refcount_bits,
                corrupt,
                extended_l2,
            },
        }),
        FormatSpecific::Qed | FormatSpecific::Raw => None,
    };
    ImageInfo {
        backing_image: below
            .split_first()
            .map(|(next, rest)| Box::new(image_info(nodes, next, rest))),
        backing_filename_format: backing.as_ref().and_then(|b| b.format.clone()),
        virtual_size: image.virtual_size(),
        filename,
        cluster_size: (layer.format != FormatKind::Raw).then(|| image.cluster_size()),
        format: layer.format.name(),
        actual_size: std::fs::metadata(&layer.path)
            .ok()
            .map(|m| m.blocks() * 512),
        format_specific,
        full_backing_filename: backing.as_ref().map(|b| {
            resolve_backing(&layer.path, &b.name)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| b.name.clone())
        }),
        backing_filename: backing.as_ref().map(|b| b.name.clone()),
        dirty_flag: false,
    }
}

/// Whether the node holding `layer` was given its backing explicitly.
fn explicit_backing(nodes: &[Node], layer: &Arc<Layer>) -> bool {
    nodes
        .iter()
        .any(|n| n.explicit_backing && Arc::ptr_eq(&n.layer, layer))
}

/// QEMU's rule (`bdrv_refresh_filename`): a node opened with the backing its header names
/// keeps its file's name; otherwise its name is `json:` and its open options.
fn is_default(nodes: &[Node], chain: &[Arc<Layer>]) -> bool {
    if !explicit_backing(nodes, &chain[0]) {
        return true;
    }
    match (header_backing(nodes, &chain[0]), chain.get(1)) {
        (None, None) => true,
        (Some(header), Some(_)) => header.name == filename(nodes, &chain[1..]),
        _ => false,
    }
}

/// The open options QEMU would show for the node on top of `chain`.
fn open_options(nodes: &[Node], chain: &[Arc<Layer>]) -> serde_json::Value {
    let top = &chain[0];
    let mut options = serde_json::json!({
        "driver": top.format.name(),
        "file": {"driver": "file", "filename": top.path.display().to_string()},
    });
    if !is_default(nodes, chain) {
        options["backing"] = match chain.get(1) {
            Some(_) => open_options(nodes, &chain[1..]),
            None => serde_json::Value::Null,
        };
    }
    options
}

/// QEMU's compact JSON: keys sorted, `", "` and `": "` as separators.
fn qemu_json(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let members: Vec<String> = keys
                .iter()
                .map(|k| {
                    format!(
                        "{}: {}",
                        serde_json::Value::from(k.as_str()),
                        qemu_json(&map[*k])
                    )
                })
                .collect();
            format!("{{{}}}", members.join(", "))
        }
        other => other.to_string(),
    }
}

/// The node's filename as QEMU shows it (`file`, `image.filename`, a parent's `backing_file`).
fn filename(nodes: &[Node], chain: &[Arc<Layer>]) -> String {
    if is_default(nodes, chain) {
        chain[0].path.display().to_string()
    } else {
        format!("json:{}", qemu_json(&open_options(nodes, chain)))
    }
}

fn node_info(node: &Node, nodes: &[Node], flat: bool) -> NodeInfo {
    let chain = node.chain();
    let below = &chain[1..];
    let mut image = image_info(nodes, &node.layer, if flat { &[] } else { below });
    image.filename = filename(nodes, &chain);
    if flat {
        image.backing_image = None;
    }
    NodeInfo {
        iops_rd: 0,
        detect_zeroes: "off",
        active: true,
        iops_wr: 0,
        ro: !node.layer.image.is_writable(),
        node_name: node.name.clone(),
        // QEMU counts the depth while it walks the chain, which `flat` skips.
        backing_file_depth: if flat { 0 } else { below.len() },
        drv: node.layer.format.name(),
        iops: 0,
        bps_wr: 0,
        write_threshold: 0,
        backing_file: (!below.is_empty()).then(|| filename(nodes, below)),
        encrypted: false,
        bps: 0,
        bps_rd: 0,
        cache: Cache {
            no_flush: false,
            direct: false,
            writeback: true,
        },
        file: image.filename.clone(),
        image,
    }
}

/// A protocol node as QEMU shows it: the file itself, format `file`.
fn protocol_info(node: &ProtocolNode) -> serde_json::Value {
    let meta = std::fs::metadata(&node.path).ok();
    let filename = node.path.display().to_string();
    serde_json::json!({
        "iops_rd": 0, "detect_zeroes": "off", "active": true,
        "image": {
            "virtual-size": meta.as_ref().map_or(0, |m| m.len()),
            "filename": filename,
            "format": "file",
            "actual-size": meta.as_ref().map_or(0, |m| m.blocks() * 512),
            "format-specific": {"type": "file", "data": {}},
            "dirty-flag": false,
        },
        "iops_wr": 0, "ro": node.read_only, "node-name": node.name, "backing_file_depth": 0,
        "drv": "file", "iops": 0, "bps_wr": 0, "write_threshold": 0, "encrypted": false,
        "bps": 0, "bps_rd": 0,
        "cache": {"no-flush": false, "direct": node.direct, "writeback": true},
        "file": filename,
    })
}

pub fn query_named_block_nodes(daemon: &Daemon, args: &Args) -> Json {
    let flat = args.bool("flat").unwrap_or(false);
    let nodes = daemon.nodes();
    let mut list: Vec<(u64, serde_json::Value)> = nodes
        .iter()
        .map(|n| {
            (
                n.seq,
                serde_json::to_value(node_info(n, &nodes, flat)).unwrap_or_default(),
            )
        })
        .collect();
    list.extend(
        daemon
            .protocol_nodes()
            .iter()
            .map(|n| (n.seq, protocol_info(n))),
    );
    // QEMU lists the newest node first.
    list.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
    let list: Vec<serde_json::Value> = list.into_iter().map(|(_, v)| v).collect();
    Json::of(&list)
}

#[derive(Serialize)]
struct ExportReply<'a> {
    #[serde(rename = "node-name")]
    node_name: &'a str,
    #[serde(rename = "shutting-down")]
    shutting_down: bool,
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
}

pub fn query_block_exports(daemon: &Daemon) -> Json {
    let exports = daemon.exports();
    let list: Vec<ExportReply> = exports
        .iter()
        .map(|e| ExportReply {
            node_name: &e.node,
            shutting_down: false,
            kind: "nbd",
            id: &e.id,
        })
        .collect();
    Json::of(&list)
}

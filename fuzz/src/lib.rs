//! What the fuzz targets share: an in-memory [`Storage`] holding the fuzzer's input as an image
//! file, and a walk that asks an opened image every read-only question a reader would.

use imgstream_format::recording::MemoryStorage;
use imgstream_format::{ImageFormat, Mapping, Storage};
use std::sync::Arc;

/// Largest input the whole-image targets accept. Every table the drivers load must lie inside
/// the file, so this also bounds what a hostile header can make them allocate.
pub const MAX_IMAGE_BYTES: usize = 1 << 20;

/// How many `map` calls one walk makes at most: a 2^60-byte virtual disk of unallocated
/// clusters must not turn one input into an hour.
const MAX_MAP_CALLS: usize = 4096;

/// Offsets probed evenly over the virtual size, besides the walk from 0.
const STRIDED_PROBES: u64 = 64;

/// The fuzzer's input as an image file in memory, ready for `open_format` (opened read-only,
/// so nothing is ever written to it).
pub fn image_storage(bytes: &[u8]) -> Arc<dyn Storage> {
    Arc::new(MemoryStorage::new(bytes.to_vec(), "/fuzz/image"))
}

/// Asks `image` what a reader asks: metadata, then `map` from offset 0 extent by extent and at
/// evenly spread offsets, decompressing every compressed cluster met. Errors are fine (the
/// input is hostile); broken promises of the [`ImageFormat`] contract panic.
pub fn walk(image: &dyn ImageFormat) {
    let _ = image.backing();
    let _ = image.format_specific();
    let size = image.virtual_size();
    let cluster_size = image.cluster_size();
    assert!(cluster_size > 0, "cluster size 0");
    let mut cluster = Vec::new();
    let mut calls = 0;

    let mut offset = 0;
    while offset < size && calls < MAX_MAP_CALLS {
        calls += 1;
        match ask(image, offset, size - offset, &mut cluster) {
            Some(length) => offset += length,
            // Skip the cluster that failed and carry on past it, as a reader of the rest would.
            None => offset = (offset / cluster_size + 1).saturating_mul(cluster_size),
        }
    }
    for i in 0..STRIDED_PROBES {
        let offset = (size / STRIDED_PROBES).saturating_mul(i);
        if offset < size {
            ask(image, offset, cluster_size.min(size - offset), &mut cluster);
        }
    }
}

/// One `map` call, checked against the contract; returns the extent length.
fn ask(image: &dyn ImageFormat, offset: u64, max: u64, cluster: &mut Vec<u8>) -> Option<u64> {
    let extent = image.map(offset, max).ok()?;
    assert!(
        extent.length > 0 && extent.length <= max,
        "map({offset}, {max}) returned an extent of {} bytes",
        extent.length
    );
    if let Mapping::Compressed { descriptor } = extent.mapping {
        assert!(
            extent.length <= image.cluster_size(),
            "compressed extent longer than a cluster"
        );
        cluster.resize(image.cluster_size() as usize, 0);
        let _ = image.read_compressed(descriptor, cluster);
    }
    Some(extent.length)
}

/// A file size for the header-only targets: the input's length, or (to reach offsets no small
/// input can) the input's last 8 bytes read as a big-endian number when they are not zero.
pub fn file_size_from(data: &[u8]) -> u64 {
    if data.len() < 8 {
        return data.len() as u64;
    }
    let mut tail = [0; 8];
    tail.copy_from_slice(&data[data.len() - 8..]);
    match u64::from_be_bytes(tail) {
        0 => data.len() as u64,
        size => size,
    }
}

//! Block status: which layer defines a guest range and how (data, zero, compressed, where), in
//! the terms of `qemu-img map`; and "is this range defined above the base", for copy-up.

use crate::chain::Layer;
use crate::{Disk, Result};
use imgstream_format::Mapping;
use std::sync::Arc;

/// How a run of guest bytes is defined, as `qemu-img map --output=json` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub start: u64,
    pub length: u64,
    /// Index of the layer that answered (0 = top).
    pub depth: usize,
    /// Defined by that layer (data or zero); false where no layer defines it.
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    /// Byte offset inside the answering layer's file, where meaningful.
    pub offset: Option<u64>,
}

impl Status {
    /// Whether `next` continues this run (qemu-img map's merge rule).
    fn continued_by(&self, next: &Status) -> bool {
        self.start + self.length == next.start
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && match (self.offset, next.offset) {
                (Some(a), Some(b)) => a + self.length == b,
                (None, None) => true,
                _ => false,
            }
    }
}

/// Status of guest bytes from `offset`, at most `max` of them.
pub(crate) fn status_at(layers: &[Arc<Layer>], offset: u64, max: u64) -> Result<Status> {
    let mut length = max;
    for (depth, layer) in layers.iter().enumerate() {
        let size = layer.image.virtual_size();
        if offset >= size {
            // Past the end of a shorter backing image: the overlay reports zeroes it does not
            // define itself, as QEMU's block status does.
            return Ok(Status {
                start: offset,
                length,
                depth: depth.saturating_sub(1),
                present: false,
                zero: true,
                data: false,
                compressed: false,
                offset: None,
            });
        }
        let extent = layer.image.map(offset, length.min(size - offset))?;
        length = extent.length;
        let defined = |zero: bool, data: bool, compressed: bool, host: Option<u64>| Status {
            start: offset,
            length,
            depth,
            present: true,
            zero,
            data,
            compressed,
            offset: host,
        };
        match extent.mapping {
            Mapping::Data { host_offset, .. } => {
                return Ok(defined(false, true, false, Some(host_offset)))
            }
            Mapping::Zero { host_offset } => return Ok(defined(true, false, false, host_offset)),
            Mapping::Compressed { .. } => return Ok(defined(false, true, true, None)),
            Mapping::Unallocated => {}
        }
    }
    Ok(Status {
        start: offset,
        length,
        depth: layers.len().saturating_sub(1),
        present: false,
        zero: true,
        data: false,
        compressed: false,
        offset: None,
    })
}

/// Whether layers `from..limit` define the start of `[offset, offset + length)`, and for how
/// many bytes that answer holds. Zeroes past the end of a short layer count as defined by it
/// (QEMU's rule in bdrv_co_common_block_status_above), so they are copied up as zeroes.
pub(crate) fn allocated_above(
    layers: &[Arc<Layer>],
    from: usize,
    limit: usize,
    offset: u64,
    length: u64,
) -> Result<(bool, u64)> {
    let mut length = length;
    for layer in layers.iter().take(limit).skip(from) {
        let size = layer.image.virtual_size();
        if offset >= size {
            return Ok((true, length));
        }
        let extent = layer.image.map(offset, length.min(size - offset))?;
        if extent.mapping.is_allocated() {
            return Ok((true, extent.length));
        }
        length = extent.length;
    }
    Ok((false, length))
}

impl Disk {
    /// The status of guest bytes from `offset`, for at most `max` bytes (never empty).
    pub fn block_status(&self, offset: u64, max: u64) -> Result<Status> {
        self.check_range(offset, max.max(1))?;
        let layers = self.read_layers();
        status_at(&layers, offset, max)
    }

    /// The whole disk's status, merged like `qemu-img map --output=json`.
    pub fn map_all(&self) -> Result<Vec<Status>> {
        let mut runs: Vec<Status> = Vec::new();
        let mut offset = 0;
        while offset < self.size {
            let next = self.block_status(offset, self.size - offset)?;
            offset += next.length;
            match runs.last_mut() {
                Some(last) if last.continued_by(&next) => last.length += next.length,
                _ => runs.push(next),
            }
        }
        Ok(runs)
    }
}

//! The qcow2 consistency check: recount every reference to every host cluster and compare with
//! the refcounts, as `qemu-img check` does; optionally repair.

use super::header::{EXT_BITMAPS, MAX_L1_BYTES};
use super::metadata::{Metadata, DESCRIPTOR_MASK, ENTRY_COMPRESSED, ENTRY_COPIED, OFFSET_MASK};
use crate::error::{Error, Result};
use crate::{CheckReport, RepairMode};

/// Counts references per host cluster, noting problems in `report`.
struct ReferenceCounter<'a> {
    counts: Vec<u32>,
    cluster_size: u64,
    file_size: u64,
    report: &'a mut CheckReport,
}

impl ReferenceCounter<'_> {
    /// Adds a reference to every cluster of `[offset, offset + length)`; false if out of range.
    fn add(&mut self, offset: u64, length: u64, what: &str) -> bool {
        if offset.saturating_add(length) > self.file_size {
            self.report.corruptions += 1;
            self.report.messages.push(format!(
                "ERROR {what} at {offset:#x} lies beyond the end of the file"
            ));
            return false;
        }
        let first = offset / self.cluster_size;
        let last = (offset + length).div_ceil(self.cluster_size);
        for cluster in first..last {
            self.counts[cluster as usize] = self.counts[cluster as usize].saturating_add(1);
        }
        true
    }

    fn aligned(&mut self, offset: u64, what: &str) -> bool {
        if !offset.is_multiple_of(self.cluster_size) {
            self.report.corruptions += 1;
            self.report.messages.push(format!(
                "ERROR {what} offset {offset:#x} is not cluster aligned"
            ));
            return false;
        }
        true
    }
}

/// Checks `meta` (including changes not yet written back) and repairs as asked.
pub fn check(meta: &mut Metadata, repair: RepairMode) -> Result<CheckReport> {
    if meta.header.nb_snapshots > 0 || meta.header.extensions.iter().any(|e| e.kind == EXT_BITMAPS)
    {
        return Err(Error::unsupported(
            "Checking qcow2 images with internal snapshots or bitmaps is not supported",
        ));
    }
    let cs = meta.cluster_size;
    let file_size = meta.storage().len()?;
    let file_clusters = file_size.div_ceil(cs);
    if file_clusters.saturating_mul(4) > 4 * MAX_L1_BYTES * 64 {
        return Err(Error::unsupported("Image file too large to check"));
    }
    let mut report = CheckReport {
        total_clusters: meta.header.size.div_ceil(cs),
        ..CheckReport::default()
    };
    let mut counter = ReferenceCounter {
        counts: vec![0; file_clusters as usize],
        cluster_size: cs,
        file_size,
        report: &mut report,
    };
    counter.add(0, cs, "header");
    let reftable_offset = meta.header.refcount_table_offset;
    let reftable_len = meta.header.refcount_table_clusters as u64 * cs;
    counter.add(reftable_offset, reftable_len, "refcount table");
    for entry in meta.reftable_entries().to_vec() {
        let block = entry & OFFSET_MASK;
        if block != 0 && counter.aligned(block, "refcount block") {
            counter.add(block, cs, "refcount block");
        }
    }
    let l1_offset = meta.header.l1_table_offset;
    counter.add(l1_offset, meta.header.l1_size as u64 * 8, "L1 table");
    let mut previous_data = None;
    for (l1_index, l1_entry) in meta.l1_entries().to_vec().into_iter().enumerate() {
        let l2_offset = l1_entry & OFFSET_MASK;
        if l2_offset == 0 {
            continue;
        }
        if !counter.aligned(l2_offset, "L2 table") || !counter.add(l2_offset, cs, "L2 table") {
            continue;
        }
        let table = meta.l2_table(l2_offset)?;
        for (l2_index, entry) in table.into_iter().enumerate() {
            let guest_cluster = l1_index as u64 * meta.l2_entries_per_table() + l2_index as u64;
            if guest_cluster >= counter.report.total_clusters {
                break;
            }
            if entry & ENTRY_COMPRESSED != 0 {
                let (offset, length) = meta.compressed_range(entry & DESCRIPTOR_MASK);
                counter.report.allocated_clusters += 1;
                counter.report.compressed_clusters += 1;
                counter.add(offset & !511, length + (offset & 511), "compressed cluster");
                continue;
            }
            let offset = entry & OFFSET_MASK;
            if offset == 0 {
                continue;
            }
            counter.report.allocated_clusters += 1;
            if !counter.aligned(offset, "data cluster") {
                continue;
            }
            if previous_data.is_some_and(|p: u64| p + cs != offset) {
                counter.report.fragmented_clusters += 1;
            }
            previous_data = Some(offset);
            counter.add(offset, cs, "data cluster");
        }
    }
    let counts = std::mem::take(&mut counter.counts);
    // Compare with the stored refcounts: fewer than references is corruption (a write could
    // reuse a cluster still in use); more is a leak (wasted space), as qemu-img check says.
    // Clusters past the end of the file can still carry refcounts (allocated, never written):
    // scan to the end of the refcount block covering the file's last cluster.
    let last = file_clusters.div_ceil(meta.refblock_entries()) * meta.refblock_entries();
    let mut highest_used = 0;
    for cluster in 0..last {
        let stored = meta.refcount(cluster)?;
        let referenced = counts.get(cluster as usize).copied().unwrap_or(0) as u64;
        if stored > 0 || referenced > 0 {
            highest_used = cluster + 1;
        }
        if stored == referenced {
            continue;
        }
        let fix = if stored > referenced {
            repair != RepairMode::None
        } else {
            repair == RepairMode::All
        };
        let verdict = if fix {
            "Repairing"
        } else if stored < referenced {
            "ERROR"
        } else {
            "Leaked"
        };
        report.messages.push(format!(
            "{verdict} cluster {cluster} refcount={stored} reference={referenced}"
        ));
        if fix {
            meta.set_refcount(cluster, referenced)?;
            if stored > referenced {
                report.leaks_fixed += 1;
            } else {
                report.corruptions_fixed += 1;
            }
        } else if stored < referenced {
            report.corruptions += 1;
        } else {
            report.leaks += 1;
        }
    }
    report.image_end_offset = Some(highest_used * cs);
    check_copied_flags(meta, repair, &mut report)?;
    Ok(report)
}

/// The COPIED flag of an L1 or L2 entry must be set exactly when the cluster's refcount is 1
/// (qcow2.txt: "bit 63: 0 for ... refcount == 0 or > 1"), as qemu-img check verifies.
fn check_copied_flags(
    meta: &mut Metadata,
    repair: RepairMode,
    report: &mut CheckReport,
) -> Result<()> {
    let total = report.total_clusters;
    for (l1_index, l1_entry) in meta.l1_entries().to_vec().into_iter().enumerate() {
        let l2_offset = l1_entry & OFFSET_MASK;
        if l2_offset == 0 || !l2_offset.is_multiple_of(meta.cluster_size) {
            continue;
        }
        let refcount = meta.refcount(l2_offset / meta.cluster_size)?;
        if (refcount == 1) != (l1_entry & ENTRY_COPIED != 0) {
            report.messages.push(format!(
                "ERROR OFLAG_COPIED L2 cluster: l1_index={l1_index} l1_entry={l1_entry:x} refcount={refcount}"
            ));
            if repair == RepairMode::All {
                meta.rewrite_l1_entry(l1_index, l1_entry ^ ENTRY_COPIED);
                report.corruptions_fixed += 1;
            } else {
                report.corruptions += 1;
            }
        }
        let table = match meta.l2_table(l2_offset) {
            Ok(table) => table,
            Err(_) => continue,
        };
        for (l2_index, entry) in table.into_iter().enumerate() {
            let guest_cluster = l1_index as u64 * meta.l2_entries_per_table() + l2_index as u64;
            let offset = entry & OFFSET_MASK;
            if guest_cluster >= total
                || entry & ENTRY_COMPRESSED != 0
                || offset == 0
                || !offset.is_multiple_of(meta.cluster_size)
            {
                continue;
            }
            let refcount = meta.refcount(offset / meta.cluster_size)?;
            if (refcount == 1) != (entry & ENTRY_COPIED != 0) {
                report.messages.push(format!(
                    "ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={refcount}"
                ));
                if repair == RepairMode::All {
                    meta.rewrite_l2_entry(l2_offset, l2_index, entry ^ ENTRY_COPIED)?;
                    report.corruptions_fixed += 1;
                } else {
                    report.corruptions += 1;
                }
            }
        }
    }
    Ok(())
}

//! The consistency check: every table and data offset valid and referenced once, leaks counted,
//! invalid entries dropped when repairing (as `qemu-img check -r` does for QED).

use super::table::{check_entry, TableKind, UNALLOCATED, ZERO_CLUSTER};
use super::{Metadata, Qed};
use crate::error::Result;
use crate::CheckReport;

/// Which clusters of the file are referenced, one bit each.
struct ClusterBitmap {
    words: Vec<u64>,
    cluster_size: u64,
}

impl ClusterBitmap {
    fn new(clusters: u64, cluster_size: u64) -> Self {
        ClusterBitmap {
            words: vec![0; clusters.div_ceil(64) as usize],
            cluster_size,
        }
    }

    fn is_set(&self, cluster: u64) -> bool {
        self.words
            .get((cluster / 64) as usize)
            .is_some_and(|word| word & (1 << (cluster % 64)) != 0)
    }

    /// Marks `count` clusters from byte `offset` as referenced; returns how many already were.
    fn mark(&mut self, offset: u64, count: u64) -> u64 {
        let first = offset / self.cluster_size;
        let mut already = 0;
        for cluster in first..first + count {
            if let Some(word) = self.words.get_mut((cluster / 64) as usize) {
                let bit = 1 << (cluster % 64);
                if *word & bit != 0 {
                    already += 1;
                }
                *word |= bit;
            }
        }
        already
    }
}

impl Qed {
    /// Checks the metadata as this process sees it (cached tables included). With `fix`,
    /// clears invalid entries and, if nothing unrepairable remains, writes everything back and
    /// clears NEED_CHECK. Leaks are only counted: QED cannot reuse space, so like QEMU we
    /// leave them (`qemu-img check -r leaks` still reports them and exits 3).
    pub(super) fn check_locked(&self, meta: &mut Metadata, fix: bool) -> Result<CheckReport> {
        let header = meta.header.clone();
        let cluster_size = header.cluster_size();
        let file_end = self.file_end();
        let mut report = CheckReport {
            total_clusters: header.image_size.div_ceil(cluster_size),
            image_end_offset: None,
            ..CheckReport::default()
        };
        let mut used = ClusterBitmap::new(file_end / cluster_size, cluster_size);
        used.mark(header.l1_table_offset, header.table_size());

        for l1_index in 0..meta.l1.len() {
            let l2_offset = meta.l1[l1_index];
            if l2_offset == UNALLOCATED {
                continue;
            }
            if let Err(problem) = check_entry(TableKind::L1, l2_offset, &header, file_end) {
                report
                    .messages
                    .push(format!("ERROR L1 entry {l1_index}: {problem}"));
                if fix {
                    meta.l1[l1_index] = UNALLOCATED;
                    meta.l1_dirty[l1_index] = true;
                    report.corruptions_fixed += 1;
                } else {
                    report.corruptions += 1;
                }
                continue;
            }
            let shared = used.mark(l2_offset, header.table_size());
            if shared > 0 {
                report.messages.push(format!(
                    "ERROR L2 table at 0x{l2_offset:x} (L1 entry {l1_index}) overlaps \
                     clusters referenced elsewhere"
                ));
                report.corruptions += shared;
                continue;
            }
            let entries = self.l2_table(meta, l2_offset)?;
            let mut changed = false;
            let mut previous: Option<u64> = None;
            for (l2_index, entry) in entries.iter_mut().enumerate() {
                if *entry == UNALLOCATED || *entry == ZERO_CLUSTER {
                    continue;
                }
                if let Err(problem) = check_entry(TableKind::L2, *entry, &header, file_end) {
                    report.messages.push(format!(
                        "ERROR L2 table at 0x{l2_offset:x}, entry {l2_index}: {problem}"
                    ));
                    if fix {
                        *entry = UNALLOCATED;
                        changed = true;
                        report.corruptions_fixed += 1;
                    } else {
                        report.corruptions += 1;
                        report.allocated_clusters += 1;
                    }
                    continue;
                }
                report.allocated_clusters += 1;
                if previous.is_some_and(|previous| previous + cluster_size != *entry) {
                    report.fragmented_clusters += 1;
                }
                previous = Some(*entry);
                if used.mark(*entry, 1) > 0 {
                    report.messages.push(format!(
                        "ERROR data cluster at 0x{entry:x} (L2 table at 0x{l2_offset:x}, entry \
                         {l2_index}) is referenced more than once"
                    ));
                    report.corruptions += 1;
                }
            }
            if changed {
                meta.l2.mark_dirty(l2_offset);
            }
        }

        let first_regular = u64::from(header.header_size);
        report.leaks = (first_regular..file_end / cluster_size)
            .filter(|&cluster| !used.is_set(cluster))
            .count() as u64;
        if report.leaks > 0 {
            report.messages.push(format!(
                "Leaked clusters: {} (wasted space, harmless)",
                report.leaks
            ));
        }
        if fix && report.corruptions == 0 {
            // Writes the repaired tables in the crash-safe order and clears NEED_CHECK.
            self.write_back_locked(meta, true)?;
        } else if fix {
            // Keep NEED_CHECK: what is left cannot be repaired, but the fixes are still worth
            // keeping.
            self.write_back_locked(meta, false)?;
        }
        Ok(report)
    }
}

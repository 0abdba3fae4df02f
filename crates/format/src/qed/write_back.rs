//! A QED write-back plan: copies of the dirty tables taken under the metadata lock, and the
//! ordered writes and flushes (steps 1 to 5 of the flush) that make them durable without it.
//!
//! The copy is one consistent moment: every entry in it points at data whose write completed
//! before the copy (a mapping is made only after its data is written). Changes made while the
//! plan is written leave their tables dirty (their edit number moved) for the next write-back.

use super::header::Header;
use crate::error::Result;
use crate::table_write::TableWrite;
use crate::Storage;

/// Everything one write-back writes, in the order [`WriteBackPlan::write`] writes it.
#[derive(Debug)]
pub(crate) struct WriteBackPlan {
    /// The header with NEED_CHECK set, when tables are to be written and it is not set yet.
    pub mark: Option<Header>,
    pub l2_tables: Vec<TableWrite>,
    /// Runs of changed L1 entries: (file offset, bytes).
    pub l1_runs: Vec<(u64, Vec<u8>)>,
    /// The L1 indices the runs carry (dirty again if the plan fails).
    pub l1_indices: Vec<usize>,
    /// The header with NEED_CHECK clear, written last: the image is consistent again.
    pub clear: Option<Header>,
}

impl WriteBackPlan {
    /// Writes the plan in the crash-safe order. Returns once it is durable, with every guest
    /// write that completed before the plan was taken.
    pub fn write(&self, storage: &dyn Storage) -> Result<()> {
        // (1) Data clusters must be durable before any table entry points at them.
        storage.flush()?;
        if let Some(header) = &self.mark {
            storage.write_at(0, &header.to_bytes())?;
            // (2) The image is inconsistent while tables are rewritten: the mark must be
            // durable before any table write it covers.
            storage.flush()?;
        }
        if !self.l2_tables.is_empty() || !self.l1_runs.is_empty() {
            for table in &self.l2_tables {
                storage.write_at(table.offset, &table.bytes)?;
            }
            if !self.l1_runs.is_empty() {
                // (3) A new L2 table's contents must be durable before the L1 entry naming it.
                storage.flush()?;
                for (offset, bytes) in &self.l1_runs {
                    storage.write_at(*offset, bytes)?;
                }
            }
            // (4) The tables must be durable before the image is marked consistent again.
            storage.flush()?;
        }
        if let Some(header) = &self.clear {
            storage.write_at(0, &header.to_bytes())?;
            // (5) The image is consistent again; durable, so the next open skips the check.
            storage.flush()?;
        }
        Ok(())
    }

    /// The header as the plan leaves it on disk, if it writes one.
    pub fn header_written(&self) -> Option<&Header> {
        self.clear.as_ref().or(self.mark.as_ref())
    }
}

//! L1 and L2 tables: decoding, the validity rule for their entries, and the bounded L2 cache.

use super::header::{is_aligned, Header};
use crate::error::{Error, Result};
use crate::table_write::TableWrite;
use std::collections::hash_map::{Entry, HashMap};

/// A data offset of 0: the cluster is not allocated here, the backing file shows through.
pub const UNALLOCATED: u64 = 0;
/// A data offset of 1: the cluster reads as zeroes and hides the backing file.
pub const ZERO_CLUSTER: u64 = 1;

/// How many L2 tables the cache keeps in memory (256 KiB each with the default geometry).
pub const L2_CACHE_TABLES: usize = 64;

/// Which level a table is: decides what its entries point at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// Entries are L2 table offsets (0 = no table).
    L1,
    /// Entries are data cluster offsets (0 = unallocated, 1 = zero cluster).
    L2,
}

/// Decodes a table read from disk.
pub fn decode_table(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|entry| {
            let mut le = [0; 8];
            le.copy_from_slice(entry);
            u64::from_le_bytes(le)
        })
        .collect()
}

/// Encodes `entries` for writing.
pub fn encode_table(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// Checks one table entry: special values are fine, anything else must be a cluster-aligned
/// offset past the header whose target (a table, or one data cluster) ends by `file_end`.
/// Returns why the entry is invalid.
pub fn check_entry(
    kind: TableKind,
    entry: u64,
    header: &Header,
    file_end: u64,
) -> std::result::Result<(), String> {
    let (what, target_len) = match kind {
        TableKind::L1 if entry == UNALLOCATED => return Ok(()),
        TableKind::L2 if entry == UNALLOCATED || entry == ZERO_CLUSTER => return Ok(()),
        TableKind::L1 => ("L2 table", header.table_bytes()),
        TableKind::L2 => ("data cluster", header.cluster_size()),
    };
    if !is_aligned(entry, header.cluster_size()) {
        return Err(format!(
            "{what} offset 0x{entry:x} is not aligned to the cluster size {}",
            header.cluster_size
        ));
    }
    if entry < header.header_bytes() {
        return Err(format!(
            "{what} offset 0x{entry:x} lies inside the header ({} bytes)",
            header.header_bytes()
        ));
    }
    if entry.saturating_add(target_len) > file_end {
        return Err(format!(
            "{what} offset 0x{entry:x} ({target_len} bytes) extends past the end of the \
             image ({file_end} bytes)"
        ));
    }
    Ok(())
}

/// Checks every entry of a table against a file of `file_end` bytes (pure, for fuzzing and for
/// callers that want all-or-nothing); the error names the first bad entry.
pub fn validate_table(
    kind: TableKind,
    entries: &[u64],
    header: &Header,
    file_end: u64,
) -> Result<()> {
    for (index, &entry) in entries.iter().enumerate() {
        check_entry(kind, entry, header, file_end).map_err(|problem| {
            Error::corrupt(format!("QED {kind:?} table entry {index}: {problem}"))
        })?;
    }
    Ok(())
}

/// An L2 table held in memory.
#[derive(Debug)]
pub(crate) struct CachedTable {
    /// The entries, newer than the disk when `dirty`.
    pub entries: Vec<u64>,
    /// Changed since it was last written.
    pub dirty: bool,
    /// Which change of the cache last touched this table: a write-back marks the table clean
    /// only if no change came after the copy it wrote.
    pub edit: u64,
    /// Cache clock value of the last use, for least-recently-used eviction.
    last_use: u64,
}

/// L2 tables by file offset, at most `capacity` of them, least recently used evicted first.
///
/// Purely in memory: eviction hands a dirty table back to the caller, who must write it back
/// in the crash-safe order before dropping it.
#[derive(Debug)]
pub(crate) struct L2Cache {
    tables: HashMap<u64, CachedTable>,
    capacity: usize,
    clock: u64,
    edits: u64,
}

impl L2Cache {
    /// An empty cache holding up to `capacity` tables (at least one).
    pub fn new(capacity: usize) -> Self {
        L2Cache {
            tables: HashMap::new(),
            capacity: capacity.max(1),
            clock: 0,
            edits: 0,
        }
    }

    /// Whether the table at `offset` is cached.
    pub fn contains(&self, offset: u64) -> bool {
        self.tables.contains_key(&offset)
    }

    /// Whether inserting another table needs an eviction first.
    pub fn is_full(&self) -> bool {
        self.tables.len() >= self.capacity
    }

    /// The least recently used table's offset and whether it is dirty.
    pub fn least_recently_used(&self) -> Option<(u64, bool)> {
        self.tables
            .iter()
            .min_by_key(|(_, table)| table.last_use)
            .map(|(&offset, table)| (offset, table.dirty))
    }

    /// The least recently used clean table's offset.
    pub fn least_recently_used_clean(&self) -> Option<u64> {
        self.tables
            .iter()
            .filter(|(_, table)| !table.dirty)
            .min_by_key(|(_, table)| table.last_use)
            .map(|(&offset, _)| offset)
    }

    /// Drops a table from the cache; the caller wrote it back first if it was dirty.
    pub fn remove(&mut self, offset: u64) {
        self.tables.remove(&offset);
    }

    /// The table at `offset`, loading it with `load` when it is not cached (the caller made
    /// room first). Counts as a use.
    pub fn get_or_load(
        &mut self,
        offset: u64,
        load: impl FnOnce() -> Result<Vec<u64>>,
    ) -> Result<&mut CachedTable> {
        self.clock += 1;
        let clock = self.clock;
        let table = match self.tables.entry(offset) {
            Entry::Occupied(cached) => cached.into_mut(),
            Entry::Vacant(slot) => slot.insert(CachedTable {
                entries: load()?,
                dirty: false,
                edit: 0,
                last_use: clock,
            }),
        };
        table.last_use = clock;
        Ok(table)
    }

    /// The table at `offset`, if cached, without counting a use (for write-back).
    pub fn peek_mut(&mut self, offset: u64) -> Option<&mut CachedTable> {
        self.tables.get_mut(&offset)
    }

    /// Adds a table made in memory (a newly allocated L2 table); the caller made room first.
    pub fn insert_new(&mut self, offset: u64, entries: Vec<u64>) {
        self.clock += 1;
        self.edits += 1;
        let table = CachedTable {
            entries,
            dirty: true,
            edit: self.edits,
            last_use: self.clock,
        };
        self.tables.insert(offset, table);
    }

    /// Records a change to the cached table at `offset`: dirty, with a new edit number.
    pub fn mark_dirty(&mut self, offset: u64) {
        self.edits += 1;
        if let Some(table) = self.tables.get_mut(&offset) {
            table.dirty = true;
            table.edit = self.edits;
        }
    }

    /// Copies of the tables changed since they were last written, in file order.
    pub fn dirty_copies(&self) -> Vec<TableWrite> {
        let mut dirty: Vec<TableWrite> = self
            .tables
            .iter()
            .filter(|(_, table)| table.dirty)
            .map(|(&offset, table)| TableWrite {
                offset,
                bytes: encode_table(&table.entries),
                edit: table.edit,
            })
            .collect();
        dirty.sort_unstable_by_key(|table| table.offset);
        dirty
    }

    /// Marks clean the tables whose copies were made durable, unless changed since.
    pub fn mark_clean(&mut self, written: &[TableWrite]) {
        for copy in written {
            if let Some(table) = self.tables.get_mut(&copy.offset) {
                if table.edit == copy.edit {
                    table.dirty = false;
                }
            }
        }
    }
}

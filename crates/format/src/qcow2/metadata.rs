//! qcow2 metadata in memory: the L1 table, cached L2 tables and refcount blocks, the refcount
//! table, the cluster allocator, and the ordered write-back that keeps the image consistent
//! across a crash at any point.
//!
//! Crash-safety argument (see docs/crash-safety.md): metadata changes are made in memory and
//! written back by a [`WriteBackPlan`] in the order
//! data → refcount blocks → refcount table → header → L2 tables → L1 table,
//! with a flush between stages that depend on each other. Hence on disk, at every moment:
//! every L2/L1 entry points at durable data or a durable table, and every cluster that an entry
//! points at has a durable refcount ≥ 1. Clusters released in memory are only handed back to
//! the allocator after the entries that referenced them are durably gone, so a crash can leak
//! clusters but never leave two owners of one cluster.

use super::header::{Header, INCOMPAT_DIRTY, MAX_REFTABLE_BYTES};
use super::refcount;
use super::write_back::WriteBackPlan;
use crate::error::{Error, Result};
use crate::table_write::TableWrite;
use crate::{Mapping, Storage};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

/// L1 and L2 entry bits (qcow2.txt "Cluster mapping").
pub const ENTRY_COPIED: u64 = 1 << 63;
pub const ENTRY_COMPRESSED: u64 = 1 << 62;
pub const ENTRY_ZERO: u64 = 1;
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 descriptor bits 0..61 (everything but COPIED and COMPRESSED).
pub const DESCRIPTOR_MASK: u64 = (1 << 62) - 1;
/// L1 entries are rewritten in units of this many bytes.
const SECTOR: u64 = 512;

/// How much table memory the caches may hold before clean tables are dropped (or, if all are
/// dirty, a write-back makes them clean). This bounds memory whatever the image size.
const L2_CACHE_BYTES: u64 = 16 << 20;
const REFBLOCK_CACHE_BYTES: u64 = 4 << 20;

/// Whether guest cluster mapping `next`, `distance` bytes past the first cluster of a run
/// mapping `first`, continues that run (same kind, and host clusters in the same order).
fn continues_run(first: Mapping, next: Mapping, distance: u64) -> bool {
    match (first, next) {
        (Mapping::Unallocated, Mapping::Unallocated) => true,
        (Mapping::Zero { host_offset: None }, Mapping::Zero { host_offset: None }) => true,
        (
            Mapping::Zero {
                host_offset: Some(a),
            },
            Mapping::Zero {
                host_offset: Some(b),
            },
        ) => b == a + distance,
        (
            Mapping::Data {
                host_offset: a,
                in_place: pa,
            },
            Mapping::Data {
                host_offset: b,
                in_place: pb,
            },
        ) => b == a + distance && pa == pb,
        _ => false,
    }
}

/// A table held in memory, keyed by its host offset.
struct Slot<T> {
    table: T,
    dirty: bool,
    /// Which change of the cache last touched this table: a write-back marks the table clean
    /// only if no change came after the copy it wrote.
    edit: u64,
    last_used: u64,
}

/// A bounded map from host offset to table with least-recently-used eviction of clean tables.
struct TableCache<T> {
    slots: HashMap<u64, Slot<T>>,
    capacity: usize,
    edits: u64,
}

impl<T> TableCache<T> {
    fn new(capacity: usize) -> Self {
        TableCache {
            slots: HashMap::new(),
            capacity: capacity.max(4),
            edits: 0,
        }
    }

    fn insert_clean(&mut self, offset: u64, table: T, now: u64) {
        let slot = Slot {
            table,
            dirty: false,
            edit: 0,
            last_used: now,
        };
        self.slots.insert(offset, slot);
    }

    fn insert_dirty(&mut self, offset: u64, table: T, now: u64) {
        self.edits += 1;
        let slot = Slot {
            table,
            dirty: true,
            edit: self.edits,
            last_used: now,
        };
        self.slots.insert(offset, slot);
    }

    /// The cached table at `offset`, marked dirty by a new change, for the caller to change.
    fn edit(&mut self, offset: u64) -> Result<&mut T> {
        self.edits += 1;
        let edit = self.edits;
        let slot = self.slots.get_mut(&offset).ok_or_else(|| {
            Error::corrupt(format!("Table at {offset:#x} vanished from the cache"))
        })?;
        slot.dirty = true;
        slot.edit = edit;
        Ok(&mut slot.table)
    }

    /// Copies of the dirty tables, encoded for the disk.
    fn dirty_copies(&self, encode: impl Fn(&T) -> Vec<u8>) -> Vec<TableWrite> {
        self.slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(offset, s)| TableWrite {
                offset: *offset,
                bytes: encode(&s.table),
                edit: s.edit,
            })
            .collect()
    }

    /// Marks clean the tables whose copies were made durable, unless changed since.
    fn mark_clean(&mut self, written: &[TableWrite]) {
        for copy in written {
            if let Some(slot) = self.slots.get_mut(&copy.offset) {
                if slot.edit == copy.edit {
                    slot.dirty = false;
                }
            }
        }
    }

    fn over_capacity(&self) -> bool {
        self.slots.len() > self.capacity
    }

    /// Drops least recently used clean tables until within capacity (dirty ones stay).
    fn evict_clean(&mut self) {
        if !self.over_capacity() {
            return;
        }
        let mut clean: Vec<(u64, u64)> = self
            .slots
            .iter()
            .filter(|(_, s)| !s.dirty)
            .map(|(k, s)| (s.last_used, *k))
            .collect();
        clean.sort_unstable();
        let excess = self.slots.len() - self.capacity;
        for (_, key) in clean.into_iter().take(excess) {
            self.slots.remove(&key);
        }
    }
}

/// One host range whose references were removed in memory; its refcounts drop once the
/// removal is durable.
#[derive(Debug, Clone, Copy)]
pub struct PendingFree {
    offset: u64,
    length: u64,
}

/// Everything the driver knows about the image's metadata. Guarded by one mutex in `Qcow2`.
pub struct Metadata {
    storage: Arc<dyn Storage>,
    pub header: Header,
    pub cluster_size: u64,
    cluster_bits: u32,
    l2_entries: u64,
    refcount_bits: u32,
    refblock_entries: u64,
    l1: Vec<u64>,
    l1_dirty: BTreeSet<u64>,
    l2_cache: TableCache<Vec<u64>>,
    reftable: Vec<u64>,
    reftable_dirty: bool,
    /// Counts changes to the refcount table, as `Slot::edit` does for cached tables.
    reftable_edit: u64,
    /// The refcount table moved: the header must be rewritten to point at it.
    reftable_moved: bool,
    refblocks: TableCache<Vec<u8>>,
    pending_free: Vec<PendingFree>,
    /// No cluster below this index is free.
    free_hint: u64,
    /// Cluster ranges being claimed for refcount structures, which the allocator must not
    /// hand out before their refcounts exist.
    reserved: Vec<(u64, u64)>,
    clock: u64,
}

fn be64_at(bytes: &[u8], index: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[index * 8..index * 8 + 8]);
    u64::from_be_bytes(raw)
}

fn decode_table(bytes: &[u8]) -> Vec<u64> {
    (0..bytes.len() / 8).map(|i| be64_at(bytes, i)).collect()
}

fn encode_table(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

impl Metadata {
    /// Loads the L1 and refcount tables named by `header`.
    pub fn load(storage: Arc<dyn Storage>, header: Header) -> Result<Self> {
        let cluster_size = header.cluster_size();
        let mut l1_bytes = vec![0u8; header.l1_size as usize * 8];
        storage.read_at(header.l1_table_offset, &mut l1_bytes)?;
        let reftable_len = header.refcount_table_clusters as u64 * cluster_size;
        let mut reftable_bytes = vec![0u8; reftable_len as usize];
        storage.read_at(header.refcount_table_offset, &mut reftable_bytes)?;
        let refcount_bits = header.refcount_bits();
        let cluster_bits = header.cluster_bits;
        Ok(Metadata {
            storage,
            cluster_size,
            cluster_bits,
            l2_entries: cluster_size / 8,
            refcount_bits,
            refblock_entries: cluster_size * 8 / refcount_bits as u64,
            l1: decode_table(&l1_bytes),
            l1_dirty: BTreeSet::new(),
            l2_cache: TableCache::new((L2_CACHE_BYTES / cluster_size) as usize),
            reftable: decode_table(&reftable_bytes),
            reftable_dirty: false,
            reftable_edit: 0,
            reftable_moved: false,
            refblocks: TableCache::new((REFBLOCK_CACHE_BYTES / cluster_size) as usize),
            pending_free: Vec::new(),
            free_hint: 0,
            reserved: Vec::new(),
            clock: 0,
            header,
        })
    }

    fn file_size(&self) -> Result<u64> {
        self.storage.len()
    }

    /// Drops least recently used clean tables while the caches are over their bounds, and
    /// says whether they still are (every table left is dirty) and need a write-back.
    pub fn evict_clean(&mut self) -> bool {
        self.l2_cache.evict_clean();
        self.refblocks.evict_clean();
        self.l2_cache.over_capacity() || self.refblocks.over_capacity()
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    // ---- L1 / L2 -------------------------------------------------------------------------

    fn l2_offset_for(&self, l1_index: u64) -> Result<u64> {
        let entry = *self.l1.get(l1_index as usize).ok_or_else(|| {
            Error::corrupt(format!(
                "Guest cluster beyond the L1 table (index {l1_index})"
            ))
        })?;
        let offset = entry & OFFSET_MASK;
        if !offset.is_multiple_of(self.cluster_size) {
            return Err(Error::corrupt(format!(
                "L2 table offset {offset:#x} (L1 index {l1_index}) is not cluster aligned"
            )));
        }
        Ok(offset)
    }

    /// Makes sure the L2 table at `offset` is cached.
    fn load_l2(&mut self, offset: u64) -> Result<()> {
        let now = self.tick();
        if let Some(slot) = self.l2_cache.slots.get_mut(&offset) {
            slot.last_used = now;
            return Ok(());
        }
        if offset + self.cluster_size > self.file_size()? {
            return Err(Error::corrupt(format!(
                "L2 table at {offset:#x} lies beyond the end of the file"
            )));
        }
        let mut bytes = vec![0u8; self.cluster_size as usize];
        self.storage.read_at(offset, &mut bytes)?;
        self.l2_cache
            .insert_clean(offset, decode_table(&bytes), now);
        Ok(())
    }

    /// The raw L2 entry of guest cluster `cluster` (0 where no L2 table exists).
    pub fn l2_entry(&mut self, cluster: u64) -> Result<u64> {
        let l2_offset = self.l2_offset_for(cluster / self.l2_entries)?;
        if l2_offset == 0 {
            return Ok(0);
        }
        self.load_l2(l2_offset)?;
        let slot = &self.l2_cache.slots[&l2_offset];
        Ok(slot.table[(cluster % self.l2_entries) as usize])
    }

    /// Replaces the L2 entry of guest cluster `cluster`, allocating the L2 table if needed, and
    /// releases what the old entry pointed at.
    fn set_l2_entry(&mut self, cluster: u64, entry: u64) -> Result<()> {
        let l1_index = cluster / self.l2_entries;
        let mut l2_offset = self.l2_offset_for(l1_index)?;
        if l2_offset == 0 {
            l2_offset = self.allocate(1)?;
            let now = self.tick();
            self.l2_cache
                .insert_dirty(l2_offset, vec![0; self.l2_entries as usize], now);
            self.l1[l1_index as usize] = l2_offset | ENTRY_COPIED;
            self.l1_dirty.insert(l1_index);
        } else {
            self.load_l2(l2_offset)?;
        }
        let table = self.l2_cache.edit(l2_offset)?;
        let index = (cluster % self.l2_entries) as usize;
        let old = std::mem::replace(&mut table[index], entry);
        self.release_entry(old);
        Ok(())
    }

    /// Queues the host clusters an L2 entry referenced for release.
    fn release_entry(&mut self, entry: u64) {
        if entry & ENTRY_COMPRESSED != 0 {
            let (offset, length) = self.compressed_range(entry & DESCRIPTOR_MASK);
            self.pending_free.push(PendingFree {
                offset: offset & !(SECTOR - 1),
                length: length + (offset & (SECTOR - 1)),
            });
        } else if entry & OFFSET_MASK != 0 {
            self.pending_free.push(PendingFree {
                offset: entry & OFFSET_MASK,
                length: self.cluster_size,
            });
        }
    }

    /// Host byte offset and length of a compressed cluster's data (qcow2.txt "Compressed
    /// Clusters Descriptor").
    pub fn compressed_range(&self, descriptor: u64) -> (u64, u64) {
        let shift = 62 - (self.cluster_bits - 8);
        let offset = descriptor & ((1u64 << shift) - 1);
        let sectors = ((descriptor >> shift) & ((1u64 << (self.cluster_bits - 8)) - 1)) + 1;
        (offset, sectors * SECTOR - (offset & (SECTOR - 1)))
    }

    /// What guest cluster `cluster` maps to, as the host offset of its first byte for data.
    fn classify(&mut self, cluster: u64) -> Result<Mapping> {
        let entry = self.l2_entry(cluster)?;
        self.classify_entry(cluster, entry)
    }

    /// What L2 entry `entry` of guest cluster `cluster` maps it to.
    fn classify_entry(&self, cluster: u64, entry: u64) -> Result<Mapping> {
        if entry & ENTRY_COMPRESSED != 0 {
            return Ok(Mapping::Compressed {
                descriptor: entry & DESCRIPTOR_MASK,
            });
        }
        let offset = entry & OFFSET_MASK;
        if !offset.is_multiple_of(self.cluster_size) {
            return Err(Error::corrupt(format!(
                "Data cluster offset {offset:#x} of guest cluster {cluster} is not cluster aligned"
            )));
        }
        if entry & ENTRY_ZERO != 0 {
            return Ok(Mapping::Zero {
                host_offset: (offset != 0).then_some(offset),
            });
        }
        if offset == 0 {
            return Ok(Mapping::Unallocated);
        }
        Ok(Mapping::Data {
            host_offset: offset,
            in_place: entry & ENTRY_COPIED != 0,
        })
    }

    /// Where the L2 table that maps guest byte `offset` ends (in guest bytes), and whether
    /// mapping up to there needs no table read: the table is cached, or there is none.
    pub fn l2_table_cached(&self, offset: u64) -> Result<(u64, bool)> {
        let span = self.l2_entries * self.cluster_size;
        let l2_offset = self.l2_offset_for(offset / span)?;
        let cached = l2_offset == 0 || self.l2_cache.slots.contains_key(&l2_offset);
        Ok(((offset / span + 1) * span, cached))
    }

    /// Describes guest bytes from `offset` up to `end`, merging clusters that map alike.
    pub fn map(&mut self, offset: u64, end: u64) -> Result<crate::Extent> {
        let cs = self.cluster_size;
        let first_cluster = offset / cs;
        let within = offset % cs;
        let first = self.classify(first_cluster)?;
        let mapping = match first {
            Mapping::Data {
                host_offset,
                in_place,
            } => Mapping::Data {
                host_offset: host_offset + within,
                in_place,
            },
            Mapping::Zero {
                host_offset: Some(h),
            } => Mapping::Zero {
                host_offset: Some(h + within),
            },
            other => other,
        };
        let mut length = (cs - within).min(end - offset);
        let mut cluster = first_cluster + 1;
        let compressed = matches!(first, Mapping::Compressed { .. });
        // The rest of the run, an L2 table at a time: one cache lookup per table, not per
        // cluster (a stream's walk over the allocation of a whole disk was mostly lookups).
        'tables: while offset + length < end && !compressed {
            let l1_index = cluster / self.l2_entries;
            let table_start = l1_index * self.l2_entries;
            let clusters_needed = (end - (offset + length)).div_ceil(cs);
            let last = (table_start + self.l2_entries).min(cluster + clusters_needed);
            let l2_offset = self.l2_offset_for(l1_index)?;
            let entries = if l2_offset == 0 {
                None
            } else {
                self.load_l2(l2_offset)?;
                let table = &self.l2_cache.slots[&l2_offset].table;
                Some(&table[(cluster - table_start) as usize..(last - table_start) as usize])
            };
            for next_cluster in cluster..last {
                let entry = entries.map_or(0, |e| e[(next_cluster - cluster) as usize]);
                let next = self.classify_entry(next_cluster, entry)?;
                if !continues_run(first, next, (next_cluster - first_cluster) * cs) {
                    break 'tables;
                }
                length = (length + cs).min(end - offset);
            }
            cluster = last;
        }
        Ok(crate::Extent { mapping, length })
    }

    /// Queues never-mapped clusters for release, like the clusters an entry stops naming.
    pub fn release(&mut self, host: u64, count: u64) {
        self.pending_free.push(PendingFree {
            offset: host,
            length: count * self.cluster_size,
        });
    }

    /// Points guest clusters at freshly written host clusters.
    pub fn map_clusters(&mut self, guest: u64, host: u64, count: u64) -> Result<()> {
        for i in 0..count {
            let target = host + i * self.cluster_size;
            self.set_l2_entry(guest / self.cluster_size + i, target | ENTRY_COPIED)?;
        }
        Ok(())
    }

    /// Sets guest clusters to `entry` (zero or unallocated), releasing their host clusters.
    pub fn set_entries(&mut self, guest: u64, count: u64, entry: u64) -> Result<()> {
        for i in 0..count {
            let cluster = guest / self.cluster_size + i;
            if self.l2_offset_for(cluster / self.l2_entries)? == 0 && entry == 0 {
                continue;
            }
            self.set_l2_entry(cluster, entry)?;
        }
        Ok(())
    }

    // ---- refcounts and allocation ----------------------------------------------------------

    fn load_refblock(&mut self, offset: u64) -> Result<()> {
        let now = self.tick();
        if let Some(slot) = self.refblocks.slots.get_mut(&offset) {
            slot.last_used = now;
            return Ok(());
        }
        if !offset.is_multiple_of(self.cluster_size) {
            return Err(Error::corrupt(format!(
                "Refcount block offset {offset:#x} is not cluster aligned"
            )));
        }
        if offset + self.cluster_size > self.file_size()? {
            return Err(Error::corrupt(format!(
                "Refcount block at {offset:#x} lies beyond the end of the file"
            )));
        }
        let mut bytes = vec![0u8; self.cluster_size as usize];
        self.storage.read_at(offset, &mut bytes)?;
        self.refblocks.insert_clean(offset, bytes, now);
        Ok(())
    }

    fn refblock_offset(&self, table_index: u64) -> u64 {
        self.reftable
            .get(table_index as usize)
            .map_or(0, |e| e & OFFSET_MASK)
    }

    /// The refcount of host cluster `cluster` (0 where no refcount block covers it).
    pub fn refcount(&mut self, cluster: u64) -> Result<u64> {
        let block = self.refblock_offset(cluster / self.refblock_entries);
        if block == 0 {
            return Ok(0);
        }
        self.load_refblock(block)?;
        let slot = &self.refblocks.slots[&block];
        Ok(refcount::get(
            &slot.table,
            cluster % self.refblock_entries,
            self.refcount_bits,
        ))
    }

    /// Sets the refcount of `cluster`, creating its refcount block if needed.
    pub fn set_refcount(&mut self, cluster: u64, value: u64) -> Result<()> {
        if value > refcount::max_value(self.refcount_bits) {
            return Err(Error::corrupt(format!(
                "Refcount of cluster {cluster} would overflow {} bits",
                self.refcount_bits
            )));
        }
        self.ensure_refblock(cluster, 0)?;
        let block = self.refblock_offset(cluster / self.refblock_entries);
        self.load_refblock(block)?;
        let bits = self.refcount_bits;
        let index = cluster % self.refblock_entries;
        refcount::set(self.refblocks.edit(block)?, index, bits, value);
        if value == 0 {
            self.free_hint = self.free_hint.min(cluster);
        }
        Ok(())
    }

    fn is_reserved(&self, cluster: u64) -> bool {
        self.reserved
            .iter()
            .any(|&(start, end)| cluster >= start && cluster < end)
    }

    /// Finds `count` contiguous free clusters without claiming them.
    fn find_free_run(&mut self, count: u64) -> Result<u64> {
        let mut cluster = self.free_hint.max(1);
        let mut start = cluster;
        let mut first_free = None;
        loop {
            if cluster - start >= count {
                if let Some(first) = first_free {
                    // Everything below the first free cluster seen is in use.
                    self.free_hint = first;
                }
                return Ok(start);
            }
            let free = !self.is_reserved(cluster)
                && (self.refblock_offset(cluster / self.refblock_entries) == 0
                    || self.refcount(cluster)? == 0);
            cluster += 1;
            if free {
                first_free.get_or_insert(cluster - 1);
            } else {
                start = cluster;
            }
        }
    }

    /// Makes sure a refcount block covers `cluster`, growing the refcount table if needed.
    fn ensure_refblock(&mut self, cluster: u64, depth: u32) -> Result<()> {
        if depth > 8 {
            return Err(Error::corrupt(
                "Refcount structures would not settle while allocating a refcount block",
            ));
        }
        let index = cluster / self.refblock_entries;
        if index >= self.reftable.len() as u64 {
            self.grow_reftable(index, depth)?;
        }
        if self.refblock_offset(index) != 0 {
            return Ok(());
        }
        let block_cluster = self.find_free_run(1)?;
        let block = block_cluster * self.cluster_size;
        let now = self.tick();
        self.refblocks
            .insert_dirty(block, vec![0; self.cluster_size as usize], now);
        self.reftable[index as usize] = block;
        self.reftable_changed();
        // The new block may describe itself; if not, its own refcount needs another block,
        // which must not be placed on top of this one.
        self.reserved.push((block_cluster, block_cluster + 1));
        let settled = self.ensure_refblock(block_cluster, depth + 1);
        self.reserved.pop();
        settled?;
        let own = self.refblock_offset(block_cluster / self.refblock_entries);
        self.load_refblock(own)?;
        let bits = self.refcount_bits;
        let index = block_cluster % self.refblock_entries;
        refcount::set(self.refblocks.edit(own)?, index, bits, 1);
        Ok(())
    }

    fn reftable_changed(&mut self) {
        self.reftable_dirty = true;
        self.reftable_edit += 1;
    }

    /// Moves the refcount table to a larger place that covers `needed_index`.
    fn grow_reftable(&mut self, needed_index: u64, depth: u32) -> Result<()> {
        let cs = self.cluster_size;
        let file_clusters = self.file_size()?.div_ceil(cs);
        let wanted = (needed_index + 2)
            .max(self.reftable.len() as u64 * 2)
            .max(file_clusters / self.refblock_entries + 2);
        let clusters = (wanted * 8).div_ceil(cs);
        if clusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::new(
                crate::ErrorKind::NoSpace,
                "Image too large: the refcount table would exceed its maximum size",
            ));
        }
        let old_offset = self.header.refcount_table_offset;
        let old_clusters = self.header.refcount_table_clusters as u64;
        self.reftable.resize((clusters * cs / 8) as usize, 0);
        let start = self.find_free_run(clusters)?;
        self.reserved.push((start, start + clusters));
        let claimed = (start..start + clusters).try_for_each(|cluster| {
            self.ensure_refblock(cluster, depth + 1)?;
            self.set_refcount(cluster, 1)
        });
        self.reserved.pop();
        claimed?;
        self.header.refcount_table_offset = start * cs;
        self.header.refcount_table_clusters = clusters as u32;
        self.reftable_changed();
        self.reftable_moved = true;
        self.pending_free.push(PendingFree {
            offset: old_offset,
            length: old_clusters * cs,
        });
        Ok(())
    }

    /// Claims `count` contiguous free clusters (refcount 1) and returns the first's offset.
    pub fn allocate(&mut self, count: u64) -> Result<u64> {
        loop {
            let start = self.find_free_run(count)?;
            for cluster in start..start + count {
                self.ensure_refblock(cluster, 0)?;
            }
            // Creating refcount blocks may have used clusters of the run: look again.
            let mut still_free = true;
            for cluster in start..start + count {
                if self.is_reserved(cluster) || self.refcount(cluster)? != 0 {
                    still_free = false;
                    break;
                }
            }
            if !still_free {
                continue;
            }
            for cluster in start..start + count {
                self.set_refcount(cluster, 1)?;
            }
            return Ok(start * self.cluster_size);
        }
    }

    fn apply_frees(&mut self, frees: Vec<PendingFree>) -> Result<()> {
        for free in frees {
            let first = free.offset / self.cluster_size;
            let last = (free.offset + free.length).div_ceil(self.cluster_size);
            for cluster in first..last {
                let current = self.refcount(cluster)?;
                if current == 0 {
                    return Err(Error::corrupt(format!(
                        "Freeing cluster {cluster} whose refcount is already 0"
                    )));
                }
                self.set_refcount(cluster, current - 1)?;
            }
        }
        Ok(())
    }

    // ---- write-back ----------------------------------------------------------------------

    /// Writes every dirty table back in dependency order and waits until it is durable, all
    /// under the caller's lock. [`Metadata::begin_write_back`] is the way to do it without.
    pub fn write_back(&mut self) -> Result<()> {
        let storage = self.storage.clone();
        let mut plan = self.begin_write_back();
        loop {
            let written = plan.write(storage.as_ref());
            match self.end_write_back(plan, written)? {
                Some(next) => plan = next,
                None => return Ok(()),
            }
        }
    }

    /// Copies everything dirty into a plan to write without the lock (see `write_back.rs`).
    /// The caller writes the plan and hands it to [`Metadata::end_write_back`]; only one plan
    /// may be out at a time, so that an older copy of a table never lands on a newer one.
    pub fn begin_write_back(&mut self) -> WriteBackPlan {
        let l1_indices: Vec<u64> = std::mem::take(&mut self.l1_dirty).into_iter().collect();
        let per_sector = SECTOR / 8;
        let mut l1_sectors: Vec<(u64, Vec<u8>)> = Vec::new();
        for sector in l1_indices.iter().map(|i| i / per_sector) {
            let offset = self.header.l1_table_offset + sector * SECTOR;
            if l1_sectors.last().is_some_and(|(last, _)| *last == offset) {
                continue;
            }
            let first = (sector * per_sector) as usize;
            let last = (first + per_sector as usize).min(self.l1.len());
            l1_sectors.push((offset, encode_table(&self.l1[first..last])));
        }
        let reftable = self.reftable_dirty.then(|| TableWrite {
            offset: self.header.refcount_table_offset,
            bytes: encode_table(&self.reftable),
            edit: self.reftable_edit,
        });
        let reftable_fields = std::mem::take(&mut self.reftable_moved)
            .then(|| self.header.fields_to_bytes()[48..60].to_vec());
        WriteBackPlan {
            refblocks: self.refblocks.dirty_copies(Vec::clone),
            reftable,
            reftable_fields,
            l2_tables: self.l2_cache.dirty_copies(|table| encode_table(table)),
            l1_sectors,
            l1_indices,
            frees: std::mem::take(&mut self.pending_free),
        }
    }

    /// Takes back a plan after its write. If the write failed, what it carried is dirty again
    /// and the error is returned. If it succeeded, the tables it copied are clean unless they
    /// changed since; and the clusters its L2/L1 writes stopped referencing get their refcounts
    /// lowered, which returns a second plan (refcount blocks only) for the caller to write.
    pub fn end_write_back(
        &mut self,
        plan: WriteBackPlan,
        written: Result<()>,
    ) -> Result<Option<WriteBackPlan>> {
        if let Err(error) = written {
            self.l1_dirty.extend(plan.l1_indices);
            self.reftable_moved |= plan.reftable_fields.is_some();
            let later = std::mem::replace(&mut self.pending_free, plan.frees);
            self.pending_free.extend(later);
            return Err(error);
        }
        self.refblocks.mark_clean(&plan.refblocks);
        self.l2_cache.mark_clean(&plan.l2_tables);
        if plan
            .reftable
            .is_some_and(|table| table.edit == self.reftable_edit)
        {
            self.reftable_dirty = false;
        }
        if plan.frees.is_empty() {
            return Ok(None);
        }
        // Only now are these clusters unreferenced on disk, so only now may they be reused.
        // Their lowered refcounts are written at once: left for the next write-back, a clean
        // close (one write-back) would leave them leaked. A crash before that write leaks them.
        self.apply_frees(plan.frees)?;
        Ok(Some(WriteBackPlan {
            refblocks: self.refblocks.dirty_copies(Vec::clone),
            ..WriteBackPlan::default()
        }))
    }

    /// Writes the header fields (first `header_length` bytes) in one write.
    pub fn write_header_fields(&mut self) -> Result<()> {
        let fields = self.header.fields_to_bytes();
        self.storage.write_at(0, &fields)?;
        self.storage.flush()
    }

    /// Clears the dirty bit after refcounts were repaired.
    pub fn clear_dirty_bit(&mut self) -> Result<()> {
        self.header.incompatible_features &= !INCOMPAT_DIRTY;
        self.write_header_fields()
    }

    // ---- inspection for check --------------------------------------------------------------

    pub fn l1_entries(&self) -> &[u64] {
        &self.l1
    }

    pub fn reftable_entries(&self) -> &[u64] {
        &self.reftable
    }

    pub fn l2_entries_per_table(&self) -> u64 {
        self.l2_entries
    }

    pub fn refblock_entries(&self) -> u64 {
        self.refblock_entries
    }

    /// Reads one L2 table for checking, through the cache so unwritten changes are seen.
    pub fn l2_table(&mut self, offset: u64) -> Result<Vec<u64>> {
        self.load_l2(offset)?;
        Ok(self.l2_cache.slots[&offset].table.clone())
    }

    /// Overwrites entry `index` of the L2 table at `l2_offset` without releasing anything
    /// (for check repairs of flags).
    pub fn rewrite_l2_entry(&mut self, l2_offset: u64, index: usize, entry: u64) -> Result<()> {
        self.load_l2(l2_offset)?;
        self.l2_cache.edit(l2_offset)?[index] = entry;
        Ok(())
    }

    /// Overwrites L1 entry `index` (for check repairs of flags).
    pub fn rewrite_l1_entry(&mut self, index: usize, entry: u64) {
        self.l1[index] = entry;
        self.l1_dirty.insert(index as u64);
    }

    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
}

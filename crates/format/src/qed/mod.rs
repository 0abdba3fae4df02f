//! The QED format driver: the `Qed` type, its metadata cache and the crash-safe flush order.
//!
//! QED has no reference counts: clusters are only ever allocated at the end of the file, and
//! what a remapped cluster used to hold is simply leaked. Crash safety therefore rests on one
//! rule, enforced by [`Qed::flush`]: nothing on disk points at anything that is not durable yet.

mod check;
mod create;
pub mod header;
pub mod table;

pub use create::create;
pub use header::{parse_header, Header};
pub use table::{check_entry, validate_table, TableKind};

use crate::error::{Error, ErrorKind, Result};
use crate::{
    BackingRef, CheckReport, Extent, FormatKind, FormatSpecific, ImageFormat, Mapping, OpenOptions,
    RepairMode, Storage, MAX_BACKING_NAME,
};
use header::{
    FEATURE_BACKING_FILE, FEATURE_BACKING_FORMAT_NO_PROBE, FEATURE_NEED_CHECK, HEADER_LEN,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use table::{decode_table, encode_table, L2Cache, L2_CACHE_TABLES, UNALLOCATED, ZERO_CLUSTER};

/// Memory the L2 cache may use; large geometries get fewer than `L2_CACHE_TABLES` tables.
const L2_CACHE_BYTES: u64 = 32 << 20;

/// Largest single header write: one page, which storage writes atomically in practice.
const MAX_HEADER_WRITE: usize = 4096;

/// An open QED image.
#[derive(Debug)]
pub struct Qed {
    storage: Arc<dyn Storage>,
    writable: bool,
    /// Copied from the header, which never changes them: read without taking the lock.
    cluster_size: u64,
    virtual_size: u64,
    /// End of the last allocated cluster: the next allocation starts here. Starts at the file
    /// size rounded down to a cluster, as in QEMU (a partial last cluster is not preserved).
    next_free: AtomicU64,
    meta: Mutex<Metadata>,
}

/// Everything the lock protects: the header as it is on disk, the L1 table and the L2 cache.
#[derive(Debug)]
struct Metadata {
    header: Header,
    backing_name: Option<String>,
    l1: Vec<u64>,
    /// Which L1 entries changed since they were last written.
    l1_dirty: Vec<bool>,
    l2: L2Cache,
}

impl Metadata {
    fn l1_has_dirty(&self) -> bool {
        self.l1_dirty.iter().any(|&dirty| dirty)
    }
}

impl Qed {
    /// Opens a QED image. Opening for writing clears unknown autoclear bits and, if the image
    /// is marked NEED_CHECK, checks and repairs it first (as QEMU does). A read-only open of
    /// an image marked NEED_CHECK succeeds without writing anything.
    pub fn open(storage: Arc<dyn Storage>, options: OpenOptions) -> Result<Qed> {
        Self::open_with_cache(storage, options, L2_CACHE_TABLES)
    }

    /// [`Qed::open`] with an L2 cache of at most `cache_tables` tables (tests use tiny caches
    /// to exercise eviction).
    pub fn open_with_cache(
        storage: Arc<dyn Storage>,
        options: OpenOptions,
        cache_tables: usize,
    ) -> Result<Qed> {
        let file_len = storage.len()?;
        let mut head = [0; HEADER_LEN];
        let head_len = usize::try_from(file_len).map_or(HEADER_LEN, |len| len.min(HEADER_LEN));
        storage.read_at(0, &mut head[..head_len])?;
        let header = parse_header(&head[..head_len])?;
        header.validate_layout(file_len)?;

        let backing_name = match header.backing_name_range() {
            Some(range) => {
                let mut name = vec![0; (range.end - range.start) as usize];
                storage.read_at(range.start, &mut name)?;
                Some(
                    String::from_utf8(name)
                        .map_err(|_| Error::corrupt("QED backing file name is not valid UTF-8"))?,
                )
            }
            None => None,
        };
        let mut l1_bytes = vec![0; header.table_bytes() as usize];
        storage.read_at(header.l1_table_offset, &mut l1_bytes)?;
        let l1 = decode_table(&l1_bytes);

        let cache_tables = cache_tables
            .min((L2_CACHE_BYTES / header.table_bytes()).max(2) as usize)
            .max(1);
        let qed = Qed {
            writable: options.writable,
            cluster_size: header.cluster_size(),
            virtual_size: header.image_size,
            next_free: AtomicU64::new(file_len - file_len % header.cluster_size()),
            meta: Mutex::new(Metadata {
                l1_dirty: vec![false; l1.len()],
                l1,
                header,
                backing_name,
                l2: L2Cache::new(cache_tables),
            }),
            storage,
        };
        if options.writable {
            qed.prepare_for_writing()?;
        }
        Ok(qed)
    }

    /// Clears autoclear bits we do not know (all of them: none are defined) and repairs an
    /// image left NEED_CHECK by a crash.
    fn prepare_for_writing(&self) -> Result<()> {
        let mut meta = self.lock();
        if meta.header.autoclear_features != 0 {
            let mut header = meta.header.clone();
            header.autoclear_features = 0;
            self.write_header(&mut meta, header)?;
            // Make the cleared bits durable before we write anything they might describe.
            self.storage.flush()?;
        }
        if meta.header.needs_check() {
            let report = self.check_locked(&mut meta, true)?;
            if report.corruptions > 0 {
                return Err(Error::corrupt(format!(
                    "QED image has {} corruption(s) that the check could not repair; \
                     run 'qemu-img check'",
                    report.corruptions
                )));
            }
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Metadata> {
        // A panic while holding the lock leaves the in-memory tables at worst missing a change;
        // the disk is consistent by construction, so carrying on is no worse than failing.
        self.meta.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ensure_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::ReadOnly,
                "QED image is opened read-only",
            ))
        }
    }

    /// Where the image's valid clusters end, for validating table entries.
    fn file_end(&self) -> u64 {
        self.next_free.load(Ordering::SeqCst)
    }

    /// Reserves `count` clusters at the end of the file.
    fn reserve(&self, count: u64) -> Result<u64> {
        let bytes = count
            .checked_mul(self.cluster_size)
            .filter(|&bytes| bytes > 0)
            .ok_or_else(|| Error::invalid(format!("Cannot allocate {count} clusters")))?;
        self.next_free
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |end| {
                end.checked_add(bytes)
            })
            .map_err(|_| Error::new(ErrorKind::NoSpace, "QED image would exceed 2^64 bytes"))
    }

    /// Writes the header's fixed fields (one 64-byte write at offset 0: atomic) and records
    /// them as the on-disk state only once the write succeeded.
    fn write_header(&self, meta: &mut Metadata, header: Header) -> Result<()> {
        self.storage.write_at(0, &header.to_bytes())?;
        meta.header = header;
        Ok(())
    }

    /// Sets NEED_CHECK on disk before tables are rewritten, unless it is already set.
    fn mark_need_check(&self, meta: &mut Metadata) -> Result<()> {
        if meta.header.needs_check() {
            return Ok(());
        }
        let mut header = meta.header.clone();
        header.features |= FEATURE_NEED_CHECK;
        self.write_header(meta, header)?;
        // The mark must be durable before any table write it covers.
        self.storage.flush()
    }

    fn read_table(&self, offset: u64, table_bytes: u64) -> Result<Vec<u64>> {
        let mut bytes = vec![0; table_bytes as usize];
        self.storage.read_at(offset, &mut bytes)?;
        Ok(decode_table(&bytes))
    }

    /// Writes one cached L2 table and marks it clean. The caller orders flushes around it.
    fn write_l2(&self, meta: &mut Metadata, offset: u64) -> Result<()> {
        if let Some(table) = meta.l2.peek_mut(offset) {
            self.storage
                .write_at(offset, &encode_table(&table.entries))?;
            table.dirty = false;
        }
        Ok(())
    }

    /// Evicts tables until the cache has room, writing dirty ones back crash-safely.
    fn make_room(&self, meta: &mut Metadata) -> Result<()> {
        while meta.l2.is_full() {
            let Some((offset, dirty)) = meta.l2.least_recently_used() else {
                break;
            };
            if dirty {
                // The data this table points at must be durable before the table is.
                self.storage.flush()?;
                self.mark_need_check(meta)?;
                self.write_l2(meta, offset)?;
                // The L1 entry for a new table is written only by the next flush, whose
                // step 3 flush orders it after this write.
            }
            meta.l2.remove(offset);
        }
        Ok(())
    }

    /// The L2 table at `offset` (already validated), from the cache or the disk.
    fn l2_table<'m>(&self, meta: &'m mut Metadata, offset: u64) -> Result<&'m mut Vec<u64>> {
        if !meta.l2.contains(offset) {
            self.make_room(meta)?;
        }
        let table_bytes = meta.header.table_bytes();
        let table = meta
            .l2
            .get_or_load(offset, || self.read_table(offset, table_bytes))?;
        Ok(&mut table.entries)
    }

    /// Splits a guest offset into its L1 index, L2 index and offset within the cluster.
    fn split(&self, header: &Header, guest: u64) -> (usize, usize, u64) {
        let l1_index = guest / header.l2_span();
        let l2_index = (guest % header.l2_span()) / self.cluster_size;
        (
            l1_index as usize,
            l2_index as usize,
            guest % self.cluster_size,
        )
    }

    /// The validated L2 table offset for L1 entry `l1_index` (0 when there is none).
    fn l2_offset(&self, meta: &Metadata, l1_index: usize) -> Result<u64> {
        let entry = meta.l1.get(l1_index).copied().ok_or_else(|| {
            Error::corrupt(format!("QED L1 index {l1_index} is outside the L1 table"))
        })?;
        check_entry(TableKind::L1, entry, &meta.header, self.file_end())
            .map_err(|problem| Error::corrupt(format!("QED L1 entry {l1_index}: {problem}")))?;
        Ok(entry)
    }

    /// How the guest byte at `guest` maps, and how many bytes from there certainly map the
    /// same way (to the end of the cluster, or of the L2 span when there is no L2 table).
    fn lookup(&self, meta: &mut Metadata, guest: u64) -> Result<(Mapping, u64)> {
        let (l1_index, l2_index, in_cluster) = self.split(&meta.header, guest);
        let l2_offset = self.l2_offset(meta, l1_index)?;
        if l2_offset == UNALLOCATED {
            let span = meta.header.l2_span();
            return Ok((Mapping::Unallocated, span - guest % span));
        }
        let header = meta.header.clone();
        let file_end = self.file_end();
        let entries = self.l2_table(meta, l2_offset)?;
        let entry = entries.get(l2_index).copied().unwrap_or(UNALLOCATED);
        check_entry(TableKind::L2, entry, &header, file_end).map_err(|problem| {
            Error::corrupt(format!(
                "QED L2 table at 0x{l2_offset:x}, entry {l2_index}: {problem}"
            ))
        })?;
        let mapping = match entry {
            UNALLOCATED => Mapping::Unallocated,
            ZERO_CLUSTER => Mapping::Zero { host_offset: None },
            host => Mapping::Data {
                host_offset: host + in_cluster,
                in_place: true,
            },
        };
        Ok((mapping, self.cluster_size - in_cluster))
    }

    /// Checks that guest clusters `[guest_offset, +count)` are aligned and inside the disk.
    fn check_guest_range(&self, guest_offset: u64, count: u64) -> Result<()> {
        let end = count
            .checked_mul(self.cluster_size)
            .and_then(|len| guest_offset.checked_add(len));
        let last_cluster_start = end.map(|end| end - self.cluster_size.min(end));
        match last_cluster_start {
            Some(last)
                if count > 0
                    && guest_offset % self.cluster_size == 0
                    && last < self.virtual_size =>
            {
                Ok(())
            }
            _ => Err(Error::invalid(format!(
                "Guest range of {count} clusters at {guest_offset} is not cluster aligned or \
                 not inside the {}-byte disk",
                self.virtual_size
            ))),
        }
    }

    /// Sets the L2 entry of the guest cluster at `guest` to `value`. With `allocate`, creates
    /// the L2 table when there is none; without, a missing table means the entry is already 0.
    fn set_entry(&self, meta: &mut Metadata, guest: u64, value: u64, allocate: bool) -> Result<()> {
        let (l1_index, l2_index, _) = self.split(&meta.header, guest);
        let mut l2_offset = self.l2_offset(meta, l1_index)?;
        if l2_offset == UNALLOCATED {
            if !allocate {
                return Ok(());
            }
            l2_offset = self.reserve(meta.header.table_size())?;
            self.make_room(meta)?;
            let entries = meta.header.entries_per_table() as usize;
            meta.l2.insert_new(l2_offset, vec![UNALLOCATED; entries]);
            if let (Some(entry), Some(dirty)) =
                (meta.l1.get_mut(l1_index), meta.l1_dirty.get_mut(l1_index))
            {
                *entry = l2_offset;
                *dirty = true;
            }
        }
        let entries = self.l2_table(meta, l2_offset)?;
        let entry = entries.get_mut(l2_index).ok_or_else(|| {
            Error::corrupt(format!("QED L2 index {l2_index} is outside the table"))
        })?;
        if *entry != value {
            *entry = value;
            if let Some(table) = meta.l2.peek_mut(l2_offset) {
                table.dirty = true;
            }
        }
        Ok(())
    }

    /// Steps 1 to 4 of the flush: everything in memory reaches the disk, in an order in which
    /// every table entry on disk points at durable data at every moment. Leaves NEED_CHECK set
    /// if anything was written.
    fn write_back(&self, meta: &mut Metadata) -> Result<()> {
        // (1) Data clusters must be durable before any table entry points at them.
        self.storage.flush()?;
        if !meta.l2.has_dirty() && !meta.l1_has_dirty() {
            return Ok(());
        }
        // (2) The image is inconsistent while tables are rewritten: mark it so first.
        self.mark_need_check(meta)?;
        for offset in meta.l2.dirty_offsets() {
            self.write_l2(meta, offset)?;
        }
        // (3) A new L2 table's contents must be durable before the L1 entry pointing at it.
        self.storage.flush()?;
        self.write_l1(meta)?;
        // (4) The L1 entries must be durable before the image is marked consistent again.
        self.storage.flush()
    }

    /// Writes every run of dirty L1 entries, one write per run.
    fn write_l1(&self, meta: &mut Metadata) -> Result<()> {
        let mut index = 0;
        while index < meta.l1.len() {
            if !meta.l1_dirty[index] {
                index += 1;
                continue;
            }
            let run_end = (index..meta.l1.len())
                .find(|&i| !meta.l1_dirty[i])
                .unwrap_or(meta.l1.len());
            let offset = meta.header.l1_table_offset + 8 * index as u64;
            self.storage
                .write_at(offset, &encode_table(&meta.l1[index..run_end]))?;
            meta.l1_dirty[index..run_end].fill(false);
            index = run_end;
        }
        Ok(())
    }

    /// The whole flush: write back, then (5) clear NEED_CHECK.
    fn flush_locked(&self, meta: &mut Metadata) -> Result<()> {
        self.write_back(meta)?;
        if meta.header.needs_check() {
            let mut header = meta.header.clone();
            header.features &= !FEATURE_NEED_CHECK;
            self.write_header(meta, header)?;
            // (5) The image is consistent again; make that durable so the next open skips
            // the check.
            self.storage.flush()?;
        }
        Ok(())
    }
}

/// Whether a backing format name means raw bytes (QED then records NO_PROBE).
fn is_raw_format(format: Option<&str>) -> bool {
    format.and_then(|name| FormatKind::from_name(name).ok()) == Some(FormatKind::Raw)
}

impl ImageFormat for Qed {
    fn kind(&self) -> FormatKind {
        FormatKind::Qed
    }

    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    fn backing(&self) -> Option<BackingRef> {
        let meta = self.lock();
        let name = meta.backing_name.clone()?;
        let no_probe = meta.header.features & FEATURE_BACKING_FORMAT_NO_PROBE != 0;
        Some(BackingRef {
            name,
            format: no_probe.then(|| FormatKind::Raw.name().to_string()),
        })
    }

    fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn format_specific(&self) -> FormatSpecific {
        FormatSpecific::Qed
    }

    fn map(&self, offset: u64, max_length: u64) -> Result<Extent> {
        let wanted = max_length.min(self.virtual_size.saturating_sub(offset));
        if wanted == 0 {
            return Err(Error::invalid(format!(
                "Cannot map {max_length} bytes at {offset}: the image has {} bytes",
                self.virtual_size
            )));
        }
        let mut meta = self.lock();
        let (mapping, mut length) = self.lookup(&mut meta, offset)?;
        while length < wanted {
            let (next, run) = self.lookup(&mut meta, offset + length)?;
            let continues = match (mapping, next) {
                (
                    Mapping::Data { host_offset, .. },
                    Mapping::Data {
                        host_offset: next, ..
                    },
                ) => next == host_offset + length,
                (first, next) => first == next,
            };
            if !continues {
                break;
            }
            length += run;
        }
        Ok(Extent {
            mapping,
            length: length.min(wanted),
        })
    }

    fn allocate_clusters(&self, count: u64) -> Result<u64> {
        self.ensure_writable()?;
        self.reserve(count)
    }

    fn map_clusters(&self, guest_offset: u64, host_offset: u64, count: u64) -> Result<()> {
        self.ensure_writable()?;
        self.check_guest_range(guest_offset, count)?;
        let mut meta = self.lock();
        let host_end = host_offset.saturating_add(count.saturating_mul(self.cluster_size));
        if host_offset % self.cluster_size != 0
            || host_offset < meta.header.header_bytes()
            || host_end > self.file_end()
        {
            return Err(Error::invalid(format!(
                "Host range of {count} clusters at 0x{host_offset:x} was not allocated by \
                 allocate_clusters"
            )));
        }
        for i in 0..count {
            let step = i * self.cluster_size;
            self.set_entry(&mut meta, guest_offset + step, host_offset + step, true)?;
        }
        Ok(())
    }

    fn zero_clusters(&self, guest_offset: u64, count: u64) -> Result<bool> {
        self.ensure_writable()?;
        self.check_guest_range(guest_offset, count)?;
        let mut meta = self.lock();
        for i in 0..count {
            let guest = guest_offset + i * self.cluster_size;
            self.set_entry(&mut meta, guest, ZERO_CLUSTER, true)?;
        }
        Ok(true)
    }

    fn unmap_clusters(&self, guest_offset: u64, count: u64) -> Result<bool> {
        self.ensure_writable()?;
        self.check_guest_range(guest_offset, count)?;
        let mut meta = self.lock();
        for i in 0..count {
            let guest = guest_offset + i * self.cluster_size;
            self.set_entry(&mut meta, guest, UNALLOCATED, false)?;
        }
        Ok(true)
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut meta = self.lock();
        self.flush_locked(&mut meta)
    }

    fn set_backing(&self, backing: Option<&BackingRef>) -> Result<()> {
        self.ensure_writable()?;
        let name = backing.map_or("", |b| b.name.as_str());
        if name.len() > MAX_BACKING_NAME {
            return Err(Error::invalid(format!(
                "Backing file name too long ({} bytes, at most {MAX_BACKING_NAME})",
                name.len()
            )));
        }
        let write_len = HEADER_LEN + name.len();
        let mut meta = self.lock();
        if write_len as u64 > meta.header.header_bytes() || write_len > MAX_HEADER_WRITE {
            return Err(Error::invalid(format!(
                "Backing file name of {} bytes does not fit in the QED header",
                name.len()
            )));
        }
        // Pending metadata goes first, so that the header we then write is final and clean.
        self.flush_locked(&mut meta)?;
        let mut header = meta.header.clone();
        header.features &= !(FEATURE_BACKING_FILE | FEATURE_BACKING_FORMAT_NO_PROBE);
        header.backing_filename_offset = 0;
        header.backing_filename_size = 0;
        if let Some(backing) = backing {
            header.features |= FEATURE_BACKING_FILE;
            if is_raw_format(backing.format.as_deref()) {
                header.features |= FEATURE_BACKING_FORMAT_NO_PROBE;
            }
            header.backing_filename_offset = HEADER_LEN as u32;
            header.backing_filename_size = name.len() as u32;
        }
        // Fields and name in one write of at most a page: a crash leaves the old header or
        // the new one.
        let mut buf = header.to_bytes().to_vec();
        buf.extend_from_slice(name.as_bytes());
        self.storage.write_at(0, &buf)?;
        // The new name is in effect once durable; callers may rely on it right after.
        self.storage.flush()?;
        meta.header = header;
        meta.backing_name = backing.map(|b| b.name.clone());
        Ok(())
    }

    fn check(&self, repair: RepairMode) -> Result<CheckReport> {
        let fix = repair != RepairMode::None;
        if fix {
            self.ensure_writable()?;
        }
        let mut meta = self.lock();
        self.check_locked(&mut meta, fix)
    }
}

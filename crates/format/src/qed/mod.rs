//! The QED format driver: the `Qed` type, its metadata cache and the crash-safe flush order.
//!
//! QED has no reference counts: clusters are only ever allocated at the end of the file, and
//! what a remapped cluster used to hold is simply leaked. Crash safety therefore rests on one
//! rule, enforced by [`Qed::flush`]: nothing on disk points at anything that is not durable yet.

mod check;
mod create;
pub mod header;
pub mod table;
mod write_back;

pub use create::create;
pub use header::{parse_header, Header};
pub use table::{check_entry, validate_table, TableKind};

use crate::error::{Error, ErrorKind, Result};
use crate::{
    BackingRef, CheckReport, Extent, FormatKind, FormatSpecific, ImageFormat, Mapping, OpenOptions,
    RepairMode, Storage, MAX_BACKING_NAME,
};
use header::{
    is_aligned, FEATURE_BACKING_FILE, FEATURE_BACKING_FORMAT_NO_PROBE, FEATURE_NEED_CHECK,
    HEADER_LEN,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use table::{decode_table, encode_table, L2Cache, L2_CACHE_TABLES, UNALLOCATED, ZERO_CLUSTER};
use write_back::WriteBackPlan;

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
    /// Held for a whole write-back, which takes the metadata lock only to copy the dirty tables
    /// and to mark them clean: one write-back at a time, so an older copy of a table never
    /// lands on a newer one, and only its holder changes the header. Taken before the
    /// metadata lock, never after it.
    write_back: Mutex<()>,
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
    /// Copies everything dirty into a plan to write without the lock (see `write_back.rs`),
    /// ending with NEED_CHECK cleared if `clear_need_check`. The caller holds the write-back
    /// lock, writes the plan and hands it to [`Metadata::end_write_back`].
    fn begin_write_back(&mut self, clear_need_check: bool) -> WriteBackPlan {
        let mut l1_runs = Vec::new();
        let mut l1_indices = Vec::new();
        let mut index = 0;
        while index < self.l1.len() {
            if !self.l1_dirty[index] {
                index += 1;
                continue;
            }
            let run_end = (index..self.l1.len())
                .find(|&i| !self.l1_dirty[i])
                .unwrap_or(self.l1.len());
            let offset = self.header.l1_table_offset + 8 * index as u64;
            l1_runs.push((offset, encode_table(&self.l1[index..run_end])));
            self.l1_dirty[index..run_end].fill(false);
            l1_indices.extend(index..run_end);
            index = run_end;
        }
        let l2_tables = self.l2.dirty_copies();
        let writes_tables = !l2_tables.is_empty() || !l1_runs.is_empty();
        let mut header = self.header.clone();
        header.features |= FEATURE_NEED_CHECK;
        let mark = (writes_tables && !self.header.needs_check()).then(|| header.clone());
        header.features &= !FEATURE_NEED_CHECK;
        let clear =
            (clear_need_check && (writes_tables || self.header.needs_check())).then_some(header);
        WriteBackPlan {
            mark,
            l2_tables,
            l1_runs,
            l1_indices,
            clear,
        }
    }

    /// Takes back a plan after its write: if it failed, its L1 entries are dirty again (its
    /// tables never stopped being) and the error is returned; if it succeeded, the tables it
    /// copied are clean unless they changed since, and the header is what it wrote.
    fn end_write_back(&mut self, plan: WriteBackPlan, written: Result<()>) -> Result<()> {
        if let Err(error) = written {
            for index in plan.l1_indices {
                self.l1_dirty[index] = true;
            }
            return Err(error);
        }
        self.l2.mark_clean(&plan.l2_tables);
        if let Some(header) = plan.header_written() {
            self.header = header.clone();
        }
        Ok(())
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
        let mut qed = Qed {
            // Until the image is prepared for writing: dropping it on an error must not flush.
            writable: false,
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
            write_back: Mutex::new(()),
            storage,
        };
        if options.writable {
            qed.prepare_for_writing()?;
            qed.writable = true;
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
            // An autoclear bit vouches for data we do not maintain: the clear must be durable
            // before our first change could break what it vouched for.
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

    fn write_back_lock(&self) -> MutexGuard<'_, ()> {
        // It guards no data: a panic while holding it leaves nothing half-done to protect.
        self.write_back
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
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

    /// Evicts tables until the cache has room, writing dirty ones back crash-safely. While a
    /// flush's write-back is under way it evicts only clean tables, and the cache runs over its
    /// bound if there are none: that write-back makes its tables clean.
    fn make_room(&self, meta: &mut Metadata) -> Result<()> {
        while meta.l2.is_full() {
            let Some((offset, dirty)) = meta.l2.least_recently_used() else {
                break;
            };
            if !dirty {
                meta.l2.remove(offset);
                continue;
            }
            let _writing = match self.write_back.try_lock() {
                Ok(guard) => guard,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => match meta.l2.least_recently_used_clean() {
                    Some(clean) => {
                        meta.l2.remove(clean);
                        continue;
                    }
                    None => break,
                },
            };
            // The data this table points at must be durable before the table is.
            self.storage.flush()?;
            self.mark_need_check(meta)?;
            self.write_l2(meta, offset)?;
            // The L1 entry for a new table is written only by the next flush, whose step 3
            // flush orders it after this write.
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
        let entry = entries.get(l2_index).copied().ok_or_else(|| {
            Error::corrupt(format!("QED L2 index {l2_index} is outside the table"))
        })?;
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
        let last_cluster = count
            .checked_sub(1)
            .and_then(|n| n.checked_mul(self.cluster_size))
            .and_then(|n| guest_offset.checked_add(n));
        match last_cluster {
            Some(last)
                if is_aligned(guest_offset, self.cluster_size) && last < self.virtual_size =>
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
            meta.l2.mark_dirty(l2_offset);
        }
        Ok(())
    }

    /// [`ImageFormat::map`] of `wanted` (> 0, within the disk) bytes from `offset`.
    fn map_locked(&self, meta: &mut Metadata, offset: u64, wanted: u64) -> Result<Extent> {
        let (mapping, mut length) = self.lookup(meta, offset)?;
        // The rest of the run, an L2 table at a time (`offset + length` is cluster aligned
        // from here on): one cache lookup per table, not per cluster.
        'tables: while length < wanted {
            let guest = offset + length;
            let (l1_index, first_index, _) = self.split(&meta.header, guest);
            let l2_offset = self.l2_offset(meta, l1_index)?;
            let span = meta.header.l2_span();
            if l2_offset == UNALLOCATED {
                if mapping != Mapping::Unallocated {
                    break;
                }
                length += span - guest % span;
                continue;
            }
            let header = meta.header.clone();
            let file_end = self.file_end();
            let clusters = (wanted - length).div_ceil(self.cluster_size);
            let entries = self.l2_table(meta, l2_offset)?;
            let last_index = entries.len().min(first_index + clusters as usize);
            if first_index >= last_index {
                return Err(Error::corrupt(format!(
                    "QED L2 index {first_index} is outside the table"
                )));
            }
            for (l2_index, &entry) in entries[first_index..last_index].iter().enumerate() {
                check_entry(TableKind::L2, entry, &header, file_end).map_err(|problem| {
                    Error::corrupt(format!(
                        "QED L2 table at 0x{l2_offset:x}, entry {}: {problem}",
                        first_index + l2_index
                    ))
                })?;
                let continues = match (mapping, entry) {
                    (Mapping::Unallocated, UNALLOCATED) => true,
                    (Mapping::Zero { host_offset: None }, ZERO_CLUSTER) => true,
                    (Mapping::Data { host_offset, .. }, host)
                        if host != UNALLOCATED && host != ZERO_CLUSTER =>
                    {
                        host == host_offset + length
                    }
                    _ => false,
                };
                if !continues {
                    break 'tables;
                }
                length += self.cluster_size;
            }
        }
        Ok(Extent {
            mapping,
            length: length.min(wanted),
        })
    }

    /// The whole write-back (`write_back.rs`) under the caller's metadata lock, for callers
    /// that hold it anyway (the header rewrite, the check). The flush does it without.
    fn write_back_locked(&self, meta: &mut Metadata, clear_need_check: bool) -> Result<()> {
        let plan = meta.begin_write_back(clear_need_check);
        let written = plan.write(self.storage.as_ref());
        meta.end_write_back(plan, written)
    }
}

impl Drop for Qed {
    /// Writes back cached metadata, as closing an image in QEMU does. Errors cannot be
    /// reported here; callers that care call [`ImageFormat::flush`] first. Losing this flush
    /// loses no consistency, only the mappings made since the last one (their clusters leak).
    fn drop(&mut self) {
        if self.writable {
            let _ = self.flush();
        }
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
        self.map_locked(&mut meta, offset, wanted)
    }

    fn map_if_free(&self, offset: u64, max_length: u64) -> Result<Option<Extent>> {
        let wanted = max_length.min(self.virtual_size.saturating_sub(offset));
        if wanted == 0 {
            return self.map(offset, max_length).map(Some);
        }
        let mut meta = match self.meta.try_lock() {
            Ok(meta) => meta,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(None),
        };
        // Within one L2 table, and only if it is cached: loading one may evict, which writes.
        let (l1_index, _, _) = self.split(&meta.header, offset);
        let l2_offset = self.l2_offset(&meta, l1_index)?;
        if l2_offset != UNALLOCATED && !meta.l2.contains(l2_offset) {
            return Ok(None);
        }
        let span = meta.header.l2_span();
        let in_table = span - offset % span;
        self.map_locked(&mut meta, offset, wanted.min(in_table))
            .map(Some)
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
        if !is_aligned(host_offset, self.cluster_size)
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

    fn releases_clusters(&self) -> bool {
        false
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
        // The metadata lock is held only to copy the dirty tables and to take the copy back.
        // The writes and syncs in between run without it: every guest request needs it to
        // find its clusters.
        let _writing = self.write_back_lock();
        let plan = self.lock().begin_write_back(true);
        let written = plan.write(self.storage.as_ref());
        self.lock().end_write_back(plan, written)
    }

    fn check_backing(&self, backing: Option<&BackingRef>) -> Result<()> {
        let name = backing.map_or("", |b| b.name.as_str());
        if name.len() > MAX_BACKING_NAME {
            return Err(Error::invalid(format!(
                "Backing file name too long ({} bytes, at most {MAX_BACKING_NAME})",
                name.len()
            )));
        }
        // The header's size never changes, so this holds until the header is written.
        let write_len = HEADER_LEN + name.len();
        if write_len as u64 > self.lock().header.header_bytes() || write_len > MAX_HEADER_WRITE {
            return Err(Error::invalid(format!(
                "Backing file name of {} bytes does not fit in the QED header",
                name.len()
            )));
        }
        Ok(())
    }

    fn set_backing(&self, backing: Option<&BackingRef>) -> Result<()> {
        self.ensure_writable()?;
        self.check_backing(backing)?;
        let name = backing.map_or("", |b| b.name.as_str());
        let _writing = self.write_back_lock();
        let mut meta = self.lock();
        // Pending metadata goes first, so that the header we then write is final and clean.
        self.write_back_locked(&mut meta, true)?;
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
        let _writing = self.write_back_lock();
        let mut meta = self.lock();
        self.check_locked(&mut meta, fix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CreateOptions, FileStorage};
    use std::path::{Path, PathBuf};

    const RW: OpenOptions = OpenOptions { writable: true };
    const RO: OpenOptions = OpenOptions { writable: false };

    fn new_image(dir: &Path, options: &CreateOptions) -> PathBuf {
        let path = dir.join("test.qed");
        create(&FileStorage::create(&path).unwrap(), options).unwrap();
        path
    }

    fn open_path(path: &Path, options: OpenOptions) -> Result<Qed> {
        Qed::open(
            Arc::new(FileStorage::open(path, options.writable)?),
            options,
        )
    }

    fn small_options() -> CreateOptions {
        CreateOptions {
            cluster_size: Some(4096),
            ..CreateOptions::new(64 << 20)
        }
    }

    /// Rewrites the header fields of the image at `path`.
    fn patch_header(path: &Path, patch: impl FnOnce(&mut Header)) {
        let mut bytes = std::fs::read(path).unwrap();
        let mut header = parse_header(&bytes).unwrap();
        patch(&mut header);
        bytes[..HEADER_LEN].copy_from_slice(&header.to_bytes());
        std::fs::write(path, bytes).unwrap();
    }

    /// Writes `pattern` into fresh clusters and maps them at `guest`.
    fn write_clusters(qed: &Qed, guest: u64, count: u64, pattern: u8) -> u64 {
        let host = qed.allocate_clusters(count).unwrap();
        let data = vec![pattern; (count * qed.cluster_size()) as usize];
        qed.storage().write_at(host, &data).unwrap();
        qed.map_clusters(guest, host, count).unwrap();
        host
    }

    #[test]
    fn bad_headers_fail_to_open_and_leave_the_file_untouched() {
        type Patch = fn(&mut Header);
        let cases: &[(&str, Patch, ErrorKind, &str)] = &[
            (
                "bad table_size",
                |h| h.table_size = 3,
                ErrorKind::Corrupt,
                "table_size 3",
            ),
            (
                "bad cluster_size",
                |h| h.cluster_size = 1000,
                ErrorKind::Corrupt,
                "cluster_size 1000",
            ),
            (
                "unknown features",
                |h| h.features = 0x100,
                ErrorKind::Unsupported,
                "0x100",
            ),
            (
                "l1 unaligned",
                |h| h.l1_table_offset = 4097,
                ErrorKind::Corrupt,
                "not aligned",
            ),
            (
                "l1 past EOF",
                |h| h.l1_table_offset = 1 << 30,
                ErrorKind::Corrupt,
                "past the end of the file",
            ),
            (
                "image too large",
                |h| h.image_size = 1 << 50,
                ErrorKind::Corrupt,
                "too large for the tables",
            ),
            (
                "header past EOF",
                |h| {
                    h.header_size = 100;
                    h.l1_table_offset = 100 * 4096;
                },
                ErrorKind::Corrupt,
                "truncated",
            ),
            (
                "backing name past header",
                |h| {
                    h.features = FEATURE_BACKING_FILE;
                    h.backing_filename_offset = 4090;
                    h.backing_filename_size = 10;
                },
                ErrorKind::Corrupt,
                "extends past the header",
            ),
        ];
        for (what, patch, kind, needle) in cases {
            let dir = tempfile::tempdir().unwrap();
            let path = new_image(dir.path(), &small_options());
            patch_header(&path, patch);
            let before = std::fs::read(&path).unwrap();
            for options in [RW, RO] {
                let err = open_path(&path, options).expect_err(what);
                assert_eq!(err.kind(), *kind, "{what}: {err}");
                assert!(
                    err.to_string().contains(needle),
                    "{what}: '{err}' lacks '{needle}'"
                );
            }
            assert_eq!(
                std::fs::read(&path).unwrap(),
                before,
                "{what}: file changed"
            );
        }
    }

    #[test]
    fn truncated_file_fails_to_open_and_is_not_extended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("short.qed");
        std::fs::write(&path, b"QED\0\0\0\x01\0").unwrap();
        let err = open_path(&path, RW).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(err.to_string().contains("truncated: 8 bytes"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"QED\0\0\0\x01\0");
    }

    #[test]
    fn fresh_image_maps_as_one_unallocated_extent() {
        let dir = tempfile::tempdir().unwrap();
        let qed = open_path(&new_image(dir.path(), &small_options()), RO).unwrap();
        let extent = qed.map(0, u64::MAX).unwrap();
        assert_eq!(extent.mapping, Mapping::Unallocated);
        assert_eq!(extent.length, 64 << 20);
        let extent = qed.map(1000, 10).unwrap();
        assert_eq!((extent.mapping, extent.length), (Mapping::Unallocated, 10));
        assert_eq!(
            qed.map(64 << 20, 1).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn mapped_zeroed_and_unmapped_clusters_read_back_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = new_image(dir.path(), &small_options());
        let qed = open_path(&path, RW).unwrap();
        let host = write_clusters(&qed, 8192, 3, 0xab);
        assert!(qed.zero_clusters(5 * 4096, 2).unwrap());
        write_clusters(&qed, 10 * 4096, 1, 0xcd);
        assert!(qed.unmap_clusters(10 * 4096, 1).unwrap());
        qed.flush().unwrap();
        drop(qed);

        let qed = open_path(&path, RO).unwrap();
        let expect = [
            (0, Mapping::Unallocated, 8192),
            (
                8192,
                Mapping::Data {
                    host_offset: host,
                    in_place: true,
                },
                3 * 4096,
            ),
            (5 * 4096, Mapping::Zero { host_offset: None }, 2 * 4096),
            (7 * 4096, Mapping::Unallocated, (64 << 20) - 7 * 4096),
        ];
        for (offset, mapping, length) in expect {
            assert_eq!(
                qed.map(offset, u64::MAX).unwrap(),
                Extent { mapping, length }
            );
        }
        // A query inside a data cluster starts at the matching host byte.
        let extent = qed.map(8192 + 100, 50).unwrap();
        assert_eq!(
            extent.mapping,
            Mapping::Data {
                host_offset: host + 100,
                in_place: true
            }
        );
        assert_eq!(extent.length, 50);
        let report = qed.check(RepairMode::None).unwrap();
        assert_eq!((report.corruptions, report.allocated_clusters), (0, 3));
        // The unmapped cluster's host space is leaked, as in QEMU.
        assert_eq!(report.leaks, 1);
    }

    #[test]
    fn evicted_dirty_tables_are_written_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = new_image(dir.path(), &small_options());
        let storage = Arc::new(FileStorage::open(&path, true).unwrap());
        let qed = Qed::open_with_cache(storage, RW, 2).unwrap();
        // One L2 table covers 2048 clusters (8 MiB): touch 6 of them through a 2-table cache.
        let span = 2048 * 4096;
        for i in 0..6 {
            write_clusters(&qed, i * span, 1, i as u8 + 1);
        }
        qed.flush().unwrap();
        drop(qed);

        let qed = open_path(&path, RO).unwrap();
        for i in 0..6 {
            let Mapping::Data { host_offset, .. } = qed.map(i * span, 4096).unwrap().mapping else {
                panic!("cluster {i} lost");
            };
            let mut byte = [0];
            qed.storage().read_at(host_offset, &mut byte).unwrap();
            assert_eq!(byte[0], i as u8 + 1);
        }
        let report = qed.check(RepairMode::None).unwrap();
        assert_eq!(
            (report.corruptions, report.leaks),
            (0, 0),
            "{:?}",
            report.messages
        );
    }

    #[test]
    fn flush_leaves_need_check_clear() {
        let dir = tempfile::tempdir().unwrap();
        let path = new_image(dir.path(), &small_options());
        let qed = open_path(&path, RW).unwrap();
        write_clusters(&qed, 0, 1, 1);
        qed.flush().unwrap();
        let header = parse_header(&std::fs::read(&path).unwrap()).unwrap();
        assert!(!header.needs_check());
    }

    #[test]
    fn writable_open_repairs_a_need_check_image_and_clears_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = new_image(dir.path(), &small_options());
        let qed = open_path(&path, RW).unwrap();
        write_clusters(&qed, 0, 2, 7);
        qed.flush().unwrap();
        let l2 = qed.lock().l1[0];
        drop(qed);
        // Point entry 1 past the end of the file, as a torn write could, and mark NEED_CHECK.
        let mut bytes = std::fs::read(&path).unwrap();
        let entry = l2 as usize + 8;
        bytes[entry..entry + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        patch_header(&path, |h| h.features |= FEATURE_NEED_CHECK);
        let before = std::fs::read(&path).unwrap();

        let qed = open_path(&path, RO).unwrap();
        assert_eq!(qed.map(4096, 4096).unwrap_err().kind(), ErrorKind::Corrupt);
        let report = qed.check(RepairMode::None).unwrap();
        assert_eq!(report.corruptions, 1);
        assert!(
            report.messages[0].contains("past the end"),
            "{:?}",
            report.messages
        );
        assert_eq!(
            qed.check(RepairMode::All).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
        drop(qed);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "read-only open wrote"
        );

        let qed = open_path(&path, RW).unwrap();
        assert_eq!(qed.map(4096, 4096).unwrap().mapping, Mapping::Unallocated);
        drop(qed);
        let header = parse_header(&std::fs::read(&path).unwrap()).unwrap();
        assert!(!header.needs_check());
        let report = open_path(&path, RO)
            .unwrap()
            .check(RepairMode::None)
            .unwrap();
        assert_eq!((report.corruptions, report.allocated_clusters), (0, 1));
    }

    #[test]
    fn check_counts_a_cluster_referenced_twice_as_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = new_image(dir.path(), &small_options());
        let qed = open_path(&path, RW).unwrap();
        let host = write_clusters(&qed, 0, 1, 7);
        qed.map_clusters(4096, host, 1).unwrap();
        let report = qed.check(RepairMode::None).unwrap();
        assert_eq!(report.corruptions, 1, "{:?}", report.messages);
        assert!(report.messages[0].contains("more than once"));
    }

    #[test]
    fn writable_open_refuses_an_image_with_unrepairable_corruption_and_keeps_need_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = new_image(dir.path(), &small_options());
        let qed = open_path(&path, RW).unwrap();
        let host = write_clusters(&qed, 0, 1, 7);
        qed.map_clusters(4096, host, 1).unwrap();
        drop(qed);
        patch_header(&path, |h| h.features |= FEATURE_NEED_CHECK);

        let err = open_path(&path, RW).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(err.to_string().contains("1 corruption(s)"), "{err}");
        assert!(parse_header(&std::fs::read(&path).unwrap())
            .unwrap()
            .needs_check());
    }

    #[test]
    fn writable_open_clears_unknown_autoclear_bits_read_only_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = new_image(dir.path(), &small_options());
        patch_header(&path, |h| h.autoclear_features = 0x8);
        drop(open_path(&path, RO).unwrap());
        assert_eq!(
            parse_header(&std::fs::read(&path).unwrap())
                .unwrap()
                .autoclear_features,
            8
        );
        drop(open_path(&path, RW).unwrap());
        assert_eq!(
            parse_header(&std::fs::read(&path).unwrap())
                .unwrap()
                .autoclear_features,
            0
        );
    }

    #[test]
    fn set_backing_records_name_and_raw_format_and_can_drop_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = new_image(dir.path(), &small_options());
        let qed = open_path(&path, RW).unwrap();
        let raw = BackingRef {
            name: "base.raw".into(),
            format: Some("raw".into()),
        };
        qed.set_backing(Some(&raw)).unwrap();
        assert_eq!(qed.backing(), Some(raw.clone()));
        assert_eq!(open_path(&path, RO).unwrap().backing(), Some(raw));

        let probed = BackingRef {
            name: "base.qcow2".into(),
            format: Some("qcow2".into()),
        };
        qed.set_backing(Some(&probed)).unwrap();
        let header = parse_header(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(header.features, FEATURE_BACKING_FILE);
        assert_eq!(
            open_path(&path, RO).unwrap().backing(),
            Some(BackingRef {
                name: "base.qcow2".into(),
                format: None
            })
        );

        qed.set_backing(None).unwrap();
        let header = parse_header(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!((header.features, header.backing_filename_size), (0, 0));
        assert_eq!(open_path(&path, RO).unwrap().backing(), None);
    }

    #[test]
    fn set_backing_refuses_a_name_too_long_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = new_image(dir.path(), &small_options());
        let before = std::fs::read(&path).unwrap();
        let qed = open_path(&path, RW).unwrap();
        let long = BackingRef {
            name: "x".repeat(1024),
            format: None,
        };
        let err = qed.set_backing(Some(&long)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("too long (1024 bytes"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn read_only_image_refuses_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let qed = open_path(&new_image(dir.path(), &small_options()), RO).unwrap();
        assert!(!qed.is_writable());
        assert_eq!(
            qed.allocate_clusters(1).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
        assert_eq!(
            qed.zero_clusters(0, 1).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
    }

    #[test]
    fn map_clusters_rejects_ranges_it_did_not_allocate() {
        let dir = tempfile::tempdir().unwrap();
        let qed = open_path(&new_image(dir.path(), &small_options()), RW).unwrap();
        let err = qed.map_clusters(0, 1 << 30, 1).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        let err = qed
            .map_clusters(64 << 20, qed.allocate_clusters(1).unwrap(), 1)
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn validate_table_names_the_first_bad_entry() {
        let header = parse_header(&{
            let h = Header {
                cluster_size: 4096,
                table_size: 1,
                header_size: 1,
                features: 0,
                compat_features: 0,
                autoclear_features: 0,
                l1_table_offset: 4096,
                image_size: 1 << 20,
                backing_filename_offset: 0,
                backing_filename_size: 0,
            };
            h.to_bytes()
        })
        .unwrap();
        validate_table(TableKind::L2, &[0, 1, 8192, 12288], &header, 16384).unwrap();
        let err = validate_table(TableKind::L2, &[0, 8193], &header, 16384).unwrap_err();
        assert!(
            err.to_string()
                .contains("entry 1: data cluster offset 0x2001"),
            "{err}"
        );
        let err = validate_table(TableKind::L2, &[16384], &header, 16384).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
        let err = validate_table(TableKind::L1, &[1], &header, 16384).unwrap_err();
        assert!(
            err.to_string()
                .contains("L2 table offset 0x1 is not aligned"),
            "{err}"
        );
        validate_table(TableKind::L1, &[4096 * 3], &header, 16384).unwrap();
        let err = validate_table(TableKind::L1, &[4096 * 4], &header, 16384).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
    }
}

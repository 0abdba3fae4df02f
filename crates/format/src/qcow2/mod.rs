//! The qcow2 driver (versions 2 and 3): opening with validation, mapping questions,
//! allocations, compressed-cluster reads, the backing-file header rewrite.

mod check;
mod compressed;
mod create;
pub mod header;
mod metadata;
pub mod refcount;
mod write_back;

pub use create::create;

use crate::error::{Error, ErrorKind, Result};
use crate::{
    BackingRef, CheckReport, Extent, FormatKind, FormatSpecific, ImageFormat, OpenOptions,
    RepairMode, Storage,
};
use header::{
    CompressionType, Extension, Header, COMPAT_LAZY_REFCOUNTS, EXT_BACKING_FORMAT, EXT_BITMAPS,
    INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2, MAX_CLUSTER_BITS,
};
use metadata::{Metadata, ENTRY_ZERO};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2 {
    storage: Arc<dyn Storage>,
    meta: Mutex<Metadata>,
    /// Held for a whole write-back, which takes the metadata lock only to copy the dirty tables
    /// and to mark them clean: one write-back at a time, so an older copy of a table never
    /// lands on a newer one. Taken before the metadata lock, never after it.
    write_back: Mutex<()>,
    writable: bool,
    cluster_size: u64,
    size: u64,
}

impl std::fmt::Debug for Metadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metadata")
            .field("header", &self.header)
            .finish()
    }
}

/// Reads the whole first cluster (or the file, if shorter), which holds the header, its
/// extensions and the backing name.
fn read_first_cluster(storage: &dyn Storage, file_size: u64) -> Result<Vec<u8>> {
    let mut probe = vec![0u8; 24.min(file_size as usize)];
    storage.read_at(0, &mut probe)?;
    let cluster_bits = if probe.len() >= 24 {
        u32::from_be_bytes([probe[20], probe[21], probe[22], probe[23]]).min(MAX_CLUSTER_BITS)
    } else {
        0
    };
    let wanted = (1u64 << cluster_bits)
        .min(file_size)
        .max(probe.len() as u64);
    let mut bytes = vec![0u8; wanted as usize];
    storage.read_at(0, &mut bytes)?;
    Ok(bytes)
}

impl Qcow2 {
    /// Opens a qcow2 image. A writable open refuses images marked corrupt, repairs refcounts
    /// of images left dirty by lazy refcounts (as QEMU does), and clears autoclear bits.
    pub fn open(storage: Arc<dyn Storage>, options: OpenOptions) -> Result<Self> {
        let file_size = storage.len()?;
        let first = read_first_cluster(storage.as_ref(), file_size)?;
        let header = Header::parse(&first, file_size)?;
        if options.writable {
            if header.incompatible_features & INCOMPAT_CORRUPT != 0 {
                return Err(Error::new(
                    ErrorKind::ReadOnly,
                    "qcow2: Image is corrupt; cannot be opened read/write",
                ));
            }
            if header.nb_snapshots > 0 {
                return Err(Error::unsupported(
                    "Writing qcow2 images with internal snapshots is not supported",
                ));
            }
            if header.extensions.iter().any(|e| e.kind == EXT_BITMAPS) {
                return Err(Error::unsupported(
                    "Writing qcow2 images with persistent dirty bitmaps is not supported",
                ));
            }
        }
        let cluster_size = header.cluster_size();
        let size = header.size;
        let dirty = header.incompatible_features & INCOMPAT_DIRTY != 0;
        let autoclear = header.autoclear_features;
        let mut meta = Metadata::load(storage.clone(), header)?;
        if options.writable {
            if autoclear != 0 {
                // Autoclear bits describe features we do not maintain: clearing them tells
                // other readers those features' data is stale (qcow2.txt autoclear_features).
                meta.header.autoclear_features = 0;
                meta.write_header_fields()?;
            }
            if dirty {
                check::check(&mut meta, RepairMode::All)?;
                meta.write_back()?;
                meta.clear_dirty_bit()?;
            }
        }
        Ok(Qcow2 {
            storage,
            meta: Mutex::new(meta),
            write_back: Mutex::new(()),
            writable: options.writable,
            cluster_size,
            size,
        })
    }

    fn meta(&self) -> Result<MutexGuard<'_, Metadata>> {
        self.meta
            .lock()
            .map_err(|_| Error::corrupt("qcow2 metadata lock poisoned by an earlier panic"))
    }

    fn write_back_lock(&self) -> Result<MutexGuard<'_, ()>> {
        self.write_back
            .lock()
            .map_err(|_| Error::corrupt("qcow2 write-back lock poisoned by an earlier panic"))
    }

    /// Keeps the caches within their bounds, before any change, so that a write-back never
    /// sees a half-made change. When every cached table is dirty, it writes them back under
    /// the metadata lock; unless a write-back is under way, which will make its tables clean:
    /// the caches then run over their bounds until the next request.
    fn make_room(&self, meta: &mut Metadata) -> Result<()> {
        if !meta.evict_clean() {
            return Ok(());
        }
        let _writing = match self.write_back.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::WouldBlock) => return Ok(()),
            Err(TryLockError::Poisoned(_)) => {
                return Err(Error::corrupt(
                    "qcow2 write-back lock poisoned by an earlier panic",
                ))
            }
        };
        meta.write_back()?;
        meta.evict_clean();
        Ok(())
    }

    fn writable_meta(&self) -> Result<MutexGuard<'_, Metadata>> {
        if !self.writable {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!("'{}' is open read-only", self.storage.path().display()),
            ));
        }
        let mut meta = self.meta()?;
        self.make_room(&mut meta)?;
        Ok(meta)
    }

    fn check_guest_range(&self, guest: u64, count: u64) -> Result<()> {
        if !guest.is_multiple_of(self.cluster_size)
            || guest.saturating_add(count.saturating_mul(self.cluster_size))
                > self.size.div_ceil(self.cluster_size) * self.cluster_size
        {
            return Err(Error::invalid(format!(
                "Cluster range {guest}+{count} is unaligned or past the end of the image"
            )));
        }
        Ok(())
    }

    /// The version (2 or 3) of the image.
    pub fn version(&self) -> Result<u32> {
        Ok(self.meta()?.header.version)
    }
}

impl ImageFormat for Qcow2 {
    fn kind(&self) -> FormatKind {
        FormatKind::Qcow2
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    fn backing(&self) -> Option<BackingRef> {
        let meta = self.meta().ok()?;
        meta.header.backing_name.as_ref().map(|name| BackingRef {
            name: name.clone(),
            format: meta.header.backing_format(),
        })
    }

    fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn format_specific(&self) -> FormatSpecific {
        let (version, compat, incompat, refcount_bits, compression) = match self.meta() {
            Ok(m) => (
                m.header.version,
                m.header.compatible_features,
                m.header.incompatible_features,
                m.header.refcount_bits(),
                m.header.compression_type,
            ),
            Err(_) => (3, 0, 0, 16, CompressionType::Zlib),
        };
        FormatSpecific::Qcow2 {
            compat: if version == 2 { "0.10" } else { "1.1" },
            compression_type: match compression {
                CompressionType::Zlib => "zlib",
                CompressionType::Zstd => "zstd",
            },
            lazy_refcounts: compat & COMPAT_LAZY_REFCOUNTS != 0,
            refcount_bits,
            corrupt: incompat & INCOMPAT_CORRUPT != 0,
            extended_l2: incompat & INCOMPAT_EXTL2 != 0,
        }
    }

    fn map(&self, offset: u64, max_length: u64) -> Result<Extent> {
        let end = offset.saturating_add(max_length).min(self.size);
        if offset >= end {
            return Err(Error::invalid(format!(
                "Offset {offset} is past the end of the image ({} bytes)",
                self.size
            )));
        }
        let mut meta = self.meta()?;
        self.make_room(&mut meta)?;
        meta.map(offset, end)
    }

    fn map_if_free(&self, offset: u64, max_length: u64) -> Result<Option<Extent>> {
        let end = offset.saturating_add(max_length).min(self.size);
        if offset >= end {
            return self.map(offset, max_length).map(Some);
        }
        let mut meta = match self.meta.try_lock() {
            Ok(meta) => meta,
            Err(TryLockError::WouldBlock) => return Ok(None),
            Err(TryLockError::Poisoned(_)) => return self.meta().map(|_| None),
        };
        // No make_room: it may write back. The caches stay over their bound until the next
        // request that may wait.
        let (table_end, cached) = meta.l2_table_cached(offset)?;
        if !cached {
            return Ok(None);
        }
        meta.map(offset, end.min(table_end)).map(Some)
    }

    fn read_compressed(&self, descriptor: u64, cluster: &mut [u8]) -> Result<()> {
        let (offset, length, compression) = {
            let meta = self.meta()?;
            let (offset, length) = meta.compressed_range(descriptor);
            (offset, length, meta.header.compression_type)
        };
        if length > 2 * self.cluster_size + 512 {
            return Err(Error::corrupt(format!(
                "Compressed cluster at {offset:#x} claims {length} bytes"
            )));
        }
        let mut input = vec![0u8; length as usize];
        self.storage.read_at(offset, &mut input)?;
        compressed::decompress(compression, &input, cluster)
            .map_err(|e| e.context(format!("Compressed cluster at {offset:#x}")))
    }

    fn allocate_clusters(&self, count: u64) -> Result<u64> {
        self.writable_meta()?.allocate(count)
    }

    fn release_clusters(&self, host_offset: u64, count: u64) -> Result<()> {
        self.writable_meta()?.release(host_offset, count);
        Ok(())
    }

    fn map_clusters(&self, guest_offset: u64, host_offset: u64, count: u64) -> Result<()> {
        self.check_guest_range(guest_offset, count)?;
        self.writable_meta()?
            .map_clusters(guest_offset, host_offset, count)
    }

    fn zero_clusters(&self, guest_offset: u64, count: u64) -> Result<bool> {
        self.check_guest_range(guest_offset, count)?;
        let mut meta = self.writable_meta()?;
        if meta.header.version < 3 {
            return Ok(false);
        }
        meta.set_entries(guest_offset, count, ENTRY_ZERO)?;
        Ok(true)
    }

    fn unmap_clusters(&self, guest_offset: u64, count: u64) -> Result<bool> {
        self.check_guest_range(guest_offset, count)?;
        self.writable_meta()?.set_entries(guest_offset, count, 0)?;
        Ok(true)
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        // The metadata lock is held only to copy the dirty tables and to mark them clean. The
        // writes and syncs in between (two to four fdatasyncs, ~100 ms after a stream has
        // copied hundreds of MiB) run without it: every guest request needs it to map clusters.
        let _writing = self.write_back_lock()?;
        let mut plan = self.meta()?.begin_write_back();
        loop {
            let written = plan.write(self.storage.as_ref());
            match self.meta()?.end_write_back(plan, written)? {
                Some(next) => plan = next,
                None => return Ok(()),
            }
        }
    }

    fn check_backing(&self, backing: Option<&BackingRef>) -> Result<()> {
        match backing {
            Some(backing) if backing.name.len() > crate::MAX_BACKING_NAME => {
                Err(Error::invalid(format!(
                    "Backing file name too long ({} bytes, at most {})",
                    backing.name.len(),
                    crate::MAX_BACKING_NAME
                )))
            }
            _ => Ok(()),
        }
    }

    fn set_backing(&self, backing: Option<&BackingRef>) -> Result<()> {
        self.check_backing(backing)?;
        let _writing = self.write_back_lock()?;
        let mut meta = self.writable_meta()?;
        // Pending table changes go first, so the header we write describes durable tables.
        meta.write_back()?;
        let mut header = meta.header.clone();
        header.extensions.retain(|e| e.kind != EXT_BACKING_FORMAT);
        header.backing_name = None;
        if let Some(backing) = backing {
            header.backing_name = Some(backing.name.clone());
            if let Some(format) = &backing.format {
                header.extensions.insert(
                    0,
                    Extension {
                        kind: EXT_BACKING_FORMAT,
                        data: format.as_bytes().to_vec(),
                    },
                );
            }
        }
        let bytes = header.to_bytes()?;
        // One write of at most a cluster, starting at 0: the old header or the new one, never a
        // mix, as long as the storage writes the first sectors atomically (docs/crash-safety.md).
        meta.storage().write_at(0, &bytes)?;
        meta.storage().flush()?;
        meta.header = header;
        Ok(())
    }

    fn check(&self, repair: RepairMode) -> Result<CheckReport> {
        let _writing = self.write_back_lock()?;
        let mut meta = if repair == RepairMode::None {
            self.meta()?
        } else {
            self.writable_meta()?
        };
        let report = check::check(&mut meta, repair)?;
        if repair != RepairMode::None {
            meta.write_back()?;
        }
        Ok(report)
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if self.writable {
            if let Ok(mut meta) = self.meta.lock() {
                if let Err(e) = meta.write_back() {
                    tracing_free_warning(&e);
                }
            }
        }
    }
}

/// The format crate has no logger; a failed write-back on close is reported on stderr.
fn tracing_free_warning(error: &Error) {
    eprintln!("imgstream: warning: flushing qcow2 metadata on close failed: {error}");
}

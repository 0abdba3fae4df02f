//! On-disk image formats: each driver answers "where does this guest range live" and performs
//! allocations; the generic read/write loop lives once, in the block layer above.
//!
//! A driver never reads through to a backing image itself. It reports [`Mapping::Unallocated`]
//! and the block layer decides what lies below. This keeps qcow2, QED and raw small and lets the
//! stream job ask the one question it needs: "which ranges does this layer not define yet?".

pub mod background_writer;
pub mod error;
pub mod probe;
pub mod qcow2;
pub mod qed;
pub mod raw;
pub mod recording;
pub mod storage;
mod table_write;
pub mod write_gate;

pub use error::{Error, ErrorKind, Result};
pub use storage::{FileStorage, LockMode, Storage, Writeback};

use std::sync::Arc;

/// The image formats imgstream reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FormatKind {
    Qcow2,
    Qed,
    Raw,
}

impl FormatKind {
    /// The name QEMU uses (`-f`, `-F`, the backing-format header extension).
    pub fn name(self) -> &'static str {
        match self {
            FormatKind::Qcow2 => "qcow2",
            FormatKind::Qed => "qed",
            FormatKind::Raw => "raw",
        }
    }

    /// Parses a QEMU format name; `file` (a protocol node recorded as format) means raw bytes.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "qcow2" => Ok(FormatKind::Qcow2),
            "qed" => Ok(FormatKind::Qed),
            "raw" | "file" => Ok(FormatKind::Raw),
            other => Err(Error::unsupported(format!(
                "Unknown or unsupported image format '{other}'"
            ))),
        }
    }
}

impl std::fmt::Display for FormatKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The backing file an image header names: the string as stored, and the format if recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingRef {
    /// The name exactly as stored in the header (may be relative to the image's folder).
    pub name: String,
    /// The recorded backing format (`qcow2`, `raw`, ...), or `None` when the header records none
    /// and the format has to be probed.
    pub format: Option<String>,
}

/// Longest backing file name QEMU accepts in a header (qcow2.txt: "must be < 1024 bytes").
pub const MAX_BACKING_NAME: usize = 1023;

/// What one layer says about a guest range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Guest data stored in this image's own storage, contiguously from `host_offset`.
    /// `in_place` is false when the host clusters are shared (refcount > 1): a write must
    /// copy them first.
    Data { host_offset: u64, in_place: bool },
    /// A qcow2 compressed cluster: its contents come from [`ImageFormat::read_compressed`].
    /// Extents of this kind never span more than one cluster.
    Compressed { descriptor: u64 },
    /// Reads as zeroes and hides the backing image. `host_offset` is set when host space is
    /// still reserved for it (qcow2 "zero, allocated"; a hole in a raw file).
    Zero { host_offset: Option<u64> },
    /// Not defined by this layer: the backing image (or zeroes, without one) shows through.
    Unallocated,
}

impl Mapping {
    /// Whether this layer defines the content (data or zero), stopping fall-through.
    pub fn is_allocated(&self) -> bool {
        !matches!(self, Mapping::Unallocated)
    }
}

/// A run of guest bytes, starting at the queried offset, that map the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub mapping: Mapping,
    pub length: u64,
}

/// How much `check` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Report only.
    None,
    /// Free leaked clusters.
    Leaks,
    /// Free leaks and fix refcounts that are wrong.
    All,
}

/// The result of a consistency check, in the terms of `qemu-img check`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Errors that make the image unsafe to write (wrong refcounts, bad offsets...).
    pub corruptions: u64,
    /// Clusters allocated (refcount > 0) but not referenced: wasted space, harmless.
    pub leaks: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    /// One line per problem found, for humans.
    pub messages: Vec<String>,
    /// Guest clusters that map somewhere in this image (data, compressed or zero-allocated).
    pub allocated_clusters: u64,
    /// Guest clusters in the virtual disk.
    pub total_clusters: u64,
    pub compressed_clusters: u64,
    pub fragmented_clusters: u64,
    /// Highest host byte in use, for formats that report it (qcow2; `qemu-img check` prints
    /// none for QED).
    pub image_end_offset: Option<u64>,
}

/// Format-specific facts that `info` reports (`format-specific` in `qemu-img info`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatSpecific {
    Qcow2 {
        /// "0.10" for version 2, "1.1" for version 3.
        compat: &'static str,
        compression_type: &'static str,
        lazy_refcounts: bool,
        refcount_bits: u32,
        corrupt: bool,
        extended_l2: bool,
    },
    Qed,
    Raw,
}

/// One image format opened on one storage. Every method may be called from many threads at
/// once; drivers serialise their own metadata. Guest ranges passed to the allocation methods are
/// cluster aligned, and the block layer guarantees that no two calls concern the same guest
/// cluster at the same time (it holds a range lock).
pub trait ImageFormat: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> FormatKind;
    /// Guest-visible size in bytes.
    fn virtual_size(&self) -> u64;
    /// Allocation unit in bytes (512 for raw).
    fn cluster_size(&self) -> u64;
    /// The backing file named by the header, as it is now.
    fn backing(&self) -> Option<BackingRef>;
    /// The storage holding this image.
    fn storage(&self) -> &Arc<dyn Storage>;
    /// Whether writes are allowed (opened read-write and not marked corrupt).
    fn is_writable(&self) -> bool;
    fn format_specific(&self) -> FormatSpecific;

    /// True when every guest offset lives at the same host offset and writes never allocate
    /// (raw): the block layer then writes in place whatever `map` says.
    fn in_place(&self) -> bool {
        false
    }

    /// False when host clusters, once allocated, can never be handed back (QED allocates only
    /// at the end of the file): the block layer then zeroes allocated clusters in place and
    /// treats discard as advisory, instead of leaking them.
    fn releases_clusters(&self) -> bool {
        true
    }

    /// Describes the guest range starting at `offset` (< virtual size), up to `max_length` bytes.
    /// The returned extent is never empty.
    fn map(&self, offset: u64, max_length: u64) -> Result<Extent>;

    /// [`map`](Self::map) if that needs no waiting: the metadata lock is free and the table
    /// needed is in memory (no table read, eviction or write-back). `None` otherwise. May
    /// describe less than `map` would. For callers that must not block, such as an event loop.
    fn map_if_free(&self, offset: u64, max_length: u64) -> Result<Option<Extent>> {
        self.map(offset, max_length).map(Some)
    }

    /// Decompresses the cluster described by a [`Mapping::Compressed`] into `cluster`
    /// (exactly one cluster long).
    fn read_compressed(&self, _descriptor: u64, _cluster: &mut [u8]) -> Result<()> {
        Err(Error::unsupported(format!(
            "{} has no compressed clusters",
            self.kind()
        )))
    }

    /// Reserves `count` contiguous, unused host clusters and returns the first one's offset.
    /// They belong to no guest range until [`ImageFormat::map_clusters`] installs them, so a
    /// crash in between only leaks them.
    fn allocate_clusters(&self, count: u64) -> Result<u64>;

    /// Hands back `count` clusters from `allocate_clusters` that were never mapped (their data
    /// write failed), so they do not leak. Formats that cannot release space do nothing.
    fn release_clusters(&self, _host_offset: u64, _count: u64) -> Result<()> {
        Ok(())
    }

    /// Points `count` guest clusters starting at `guest_offset` at the host clusters starting at
    /// `host_offset` (from `allocate_clusters`, already holding their data). What those guest
    /// clusters mapped to before is released.
    fn map_clusters(&self, guest_offset: u64, host_offset: u64, count: u64) -> Result<()>;

    /// Makes `count` guest clusters read as zeroes, releasing their host clusters. Returns false
    /// (changing nothing) when the format cannot record zero clusters (qcow2 version 2).
    fn zero_clusters(&self, guest_offset: u64, count: u64) -> Result<bool>;

    /// Makes `count` guest clusters unallocated again, so the backing image shows through.
    /// Returns false (changing nothing) when the format cannot.
    fn unmap_clusters(&self, guest_offset: u64, count: u64) -> Result<bool>;

    /// Makes every completed write and metadata change durable, in an order that keeps the
    /// image consistent if power fails during the flush.
    fn flush(&self) -> Result<()>;

    /// Rewrites the header to name another backing file (or none), crash-safely: a crash leaves
    /// either the old header or the new one.
    fn set_backing(&self, backing: Option<&BackingRef>) -> Result<()>;

    /// Fails as [`set_backing`](Self::set_backing) would fail for `backing` (a name too long,
    /// a format that records none), writing nothing: a header change scheduled for later is
    /// checked when it is scheduled.
    fn check_backing(&self, backing: Option<&BackingRef>) -> Result<()>;

    /// Checks metadata consistency and optionally repairs.
    fn check(&self, repair: RepairMode) -> Result<CheckReport>;
}

/// Options for opening an image.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    pub writable: bool,
}

/// Opens `storage` as an image of format `kind`.
pub fn open_format(
    kind: FormatKind,
    storage: Arc<dyn Storage>,
    options: OpenOptions,
) -> Result<Arc<dyn ImageFormat>> {
    Ok(match kind {
        FormatKind::Qcow2 => Arc::new(qcow2::Qcow2::open(storage, options)?),
        FormatKind::Qed => Arc::new(qed::Qed::open(storage, options)?),
        FormatKind::Raw => Arc::new(raw::Raw::open(storage, options)?),
    })
}

/// Options for creating an image, as `qemu-img create -o` spells them.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    pub backing: Option<BackingRef>,
    /// Defaults: 64 KiB for qcow2 and QED.
    pub cluster_size: Option<u64>,
    /// qcow2 only: `Some(2)` for compat=0.10, `Some(3)` (default) for compat=1.1.
    pub qcow2_version: Option<u32>,
    /// qcow2 only: the compat bit for lazy refcounts.
    pub lazy_refcounts: bool,
    /// qcow2 only: refcount width in bits (default 16).
    pub refcount_bits: Option<u32>,
}

impl CreateOptions {
    pub fn new(size: u64) -> Self {
        CreateOptions {
            size,
            backing: None,
            cluster_size: None,
            qcow2_version: None,
            lazy_refcounts: false,
            refcount_bits: None,
        }
    }
}

/// Creates an empty image of format `kind` on `storage` (which must be empty).
pub fn create_format(
    kind: FormatKind,
    storage: &dyn Storage,
    options: &CreateOptions,
) -> Result<()> {
    if let Some(backing) = &options.backing {
        if backing.name.len() > MAX_BACKING_NAME {
            return Err(Error::invalid(format!(
                "Backing file name too long ({} bytes, at most {MAX_BACKING_NAME})",
                backing.name.len()
            )));
        }
    }
    match kind {
        FormatKind::Qcow2 => qcow2::create(storage, options),
        FormatKind::Qed => qed::create(storage, options),
        FormatKind::Raw => raw::create(storage, options),
    }
}

//! The block layer: an image opened with its backing chain ([`Disk`]), guest-level I/O on it
//! (written once, above all formats), block status, and the copy-up primitive that the stream
//! job and copy-on-read share. Range locks keep guest writes and copy-ups of the same clusters
//! apart.

pub mod chain;
mod copy_pool;
mod io;
mod populate;
pub mod range_lock;
mod status;

pub use chain::{ChainOptions, Layer, MAX_CHAIN_DEPTH};
pub use copy_pool::become_background_thread;
pub use imgstream_format::{
    BackingRef, CheckReport, Error, ErrorKind, FormatKind, FormatSpecific, RepairMode, Result,
    Writeback,
};
pub use populate::PopulateOutcome;
pub use status::Status;

use range_lock::RangeLocks;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// An image and its backing chain, as the guest sees it.
#[derive(Debug)]
pub struct Disk {
    /// Top first. Replaced only when a stream job completes (with all I/O held).
    layers: RwLock<Vec<Arc<Layer>>>,
    /// The header change a completed stream job scheduled, until a flush writes it. Its lock
    /// keeps header writes one at a time.
    header_change: Mutex<HeaderChange>,
    /// Whether the header on disk may still name layers the chain no longer has (a change
    /// scheduled or abandoned), for the I/O paths that must not take `header_change`'s lock.
    header_pending: AtomicBool,
    /// Flushes begun and ended, for a job that waits for those under way
    /// ([`wait_for_flushes_under_way`](Self::wait_for_flushes_under_way)).
    flushes: Mutex<FlushCount>,
    flush_ended: Condvar,
    /// Changes to the top's contents that have ended (guest writes, write-zeroes, discards,
    /// copy-ups), whatever their outcome.
    changes_ended: AtomicU64,
    /// The value of `changes_ended` that the last successful flush began with (`None` before
    /// the first). Its lock is held for a whole flush: flushes run one at a time.
    flushed_changes: Mutex<Option<u64>>,
    locks: RangeLocks,
    size: u64,
    cluster_size: u64,
    writable: bool,
    /// While a stream job runs, guest reads copy up what layers `1..limit` define (0 = off).
    copy_on_read_limit: AtomicUsize,
}

impl Disk {
    /// Opens `path` with its backing chain.
    pub fn open(path: &Path, options: &ChainOptions) -> Result<Disk> {
        let layers = chain::open_chain(path, options)?;
        Ok(Self::from_layers(layers, options.writable))
    }

    /// Builds a disk from already opened layers (top first).
    pub fn from_layers(layers: Vec<Layer>, writable: bool) -> Disk {
        Self::from_shared_layers(layers.into_iter().map(Arc::new).collect(), writable)
    }

    /// Builds a disk from layers other disks may share (top first): a node whose backing is
    /// another node's disk reuses that disk's open layers.
    pub fn from_shared_layers(layers: Vec<Arc<Layer>>, writable: bool) -> Disk {
        let size = layers.first().map_or(0, |l| l.image.virtual_size());
        let cluster_size = layers.first().map_or(512, |l| l.image.cluster_size());
        Disk {
            layers: RwLock::new(layers),
            locks: RangeLocks::new(),
            size,
            cluster_size,
            writable,
            copy_on_read_limit: AtomicUsize::new(0),
            header_change: Mutex::new(HeaderChange::None),
            header_pending: AtomicBool::new(false),
            flushes: Mutex::new(FlushCount::default()),
            flush_ended: Condvar::new(),
            changes_ended: AtomicU64::new(0),
            flushed_changes: Mutex::new(None),
        }
    }

    /// Guest-visible size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The top image's cluster size: the unit of allocation and of range locking.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The layers as they are now, top first.
    pub fn layers(&self) -> Vec<Arc<Layer>> {
        self.read_layers().clone()
    }

    fn read_layers(&self) -> RwLockReadGuard<'_, Vec<Arc<Layer>>> {
        self.layers.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_layers(&self) -> RwLockWriteGuard<'_, Vec<Arc<Layer>>> {
        self.layers.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Finds the layer below the top that `name` designates, as QEMU matches `base`: the
    /// backing name as recorded, the path it was opened from, or the same file by real path.
    pub fn find_backing_layer(&self, name: &str) -> Option<usize> {
        let wanted = std::fs::canonicalize(name).ok();
        self.read_layers()
            .iter()
            .enumerate()
            .skip(1)
            .find(|(_, layer)| {
                layer.recorded_name == name
                    || layer.path == Path::new(name)
                    || wanted.is_some() && std::fs::canonicalize(&layer.path).ok() == wanted
            })
            .map(|(depth, _)| depth)
    }

    /// Turns copy-on-read on for layers `1..limit` (guest reads then pull what those layers
    /// define into the top), or off with 0.
    pub fn set_copy_on_read(&self, limit: usize) {
        self.copy_on_read_limit.store(limit, Ordering::SeqCst);
    }

    /// Drops layers `1..base_depth` from the chain, and schedules the top's header to name
    /// `backing` (or nothing). All guest I/O is held (not failed) meanwhile, briefly: nothing
    /// is written here.
    ///
    /// The next [`flush`](Self::flush) rewrites the header, once everything written before it
    /// is durable (as does dropping the disk). Until then the file still names the old chain,
    /// which reads the same wherever the guest can tell: the job copied what the dropped layers
    /// defined, and unallocated clusters are not unmapped while the old header may be the one
    /// on disk. A crash in between leaves the old header, valid, and a new stream finishes the
    /// job (docs/crash-safety.md).
    pub fn replace_backing(&self, base_depth: usize, backing: Option<&BackingRef>) -> Result<()> {
        let mut layers = self.write_layers();
        io::top_of(&layers)?.image.check_backing(backing)?;
        *self.lock_header_change() = HeaderChange::Scheduled(backing.cloned());
        self.header_pending.store(true, Ordering::SeqCst);
        let end = base_depth.min(layers.len());
        if end > 1 {
            layers.drain(1..end);
        }
        Ok(())
    }

    /// The backing file (or none) a scheduled header change will name, if one is scheduled.
    pub fn scheduled_backing(&self) -> Option<Option<BackingRef>> {
        match &*self.lock_header_change() {
            HeaderChange::Scheduled(backing) => Some(backing.clone()),
            HeaderChange::None | HeaderChange::Abandoned => None,
        }
    }

    /// Whether the header on disk may still name layers the chain no longer has: a change is
    /// scheduled and not yet durable, or was abandoned.
    pub fn header_change_pending(&self) -> bool {
        self.header_pending.load(Ordering::SeqCst)
    }

    /// After a flush of the top: writes the scheduled header change, if the flush succeeded;
    /// abandons it if the flush failed. A flush that failed may have lost copied data, which
    /// the old header still reads from the backing chain; the new one would read it as
    /// unallocated. An abandoned change keeps the old header for good (for this process).
    fn settle_header_change(&self, top: &Layer, flushed: &Result<()>) -> Result<()> {
        let mut change = self.lock_header_change();
        let HeaderChange::Scheduled(backing) = &*change else {
            return Ok(());
        };
        if flushed.is_err() {
            tracing::warn!("a flush failed after a stream completed: the image keeps naming its old backing file");
            *change = HeaderChange::Abandoned;
            return Ok(());
        }
        match top.image.set_backing(backing.as_ref()) {
            Ok(()) => {
                *change = HeaderChange::None;
                self.header_pending.store(false, Ordering::SeqCst);
                Ok(())
            }
            Err(error) => {
                // The header write may or may not have reached the disk: stay conservative.
                *change = HeaderChange::Abandoned;
                Err(error)
            }
        }
    }

    fn header_change_scheduled(&self) -> bool {
        matches!(*self.lock_header_change(), HeaderChange::Scheduled(_))
    }

    fn lock_header_change(&self) -> std::sync::MutexGuard<'_, HeaderChange> {
        // Only ever replaced whole: a panic cannot leave it half-written.
        self.header_change
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until as many flushes have ended as had begun when it was called: the flushes
    /// under way then (they end in order, one write-back at a time), not those begun since.
    ///
    /// A stream calls it now and then, so that a guest's flushes find only what it copied
    /// since (imgstream_jobs::stream::FLUSH_YIELD_BYTES has the figures). Waiting only for the
    /// flushes under way, not for those begun meanwhile, keeps a guest that always has a
    /// flush in flight from stopping the stream.
    pub fn wait_for_flushes_under_way(&self) {
        let begun = self.lock_flushes().begun;
        self.wait_until_flushes_ended(begun);
    }

    /// Waits until `target` flushes have ended.
    fn wait_until_flushes_ended(&self, target: u64) {
        let mut count = self.lock_flushes();
        while count.ended < target {
            count = self
                .flush_ended
                .wait(count)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Counts a flush as begun until the returned guard drops.
    fn flush_begins(&self) -> FlushUnderWay<'_> {
        self.lock_flushes().begun += 1;
        FlushUnderWay { disk: self }
    }

    /// Counts a change to the top's contents as ended when the returned guard drops: a flush
    /// that begins after that must not be skipped.
    fn change_begins(&self) -> ChangeUnderWay<'_> {
        ChangeUnderWay { disk: self }
    }

    fn lock_flushed_changes(&self) -> std::sync::MutexGuard<'_, Option<u64>> {
        // Replaced whole, only after a flush succeeded: a panic cannot leave it wrong.
        self.flushed_changes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_flushes(&self) -> std::sync::MutexGuard<'_, FlushCount> {
        // Two counters, each changed in one step: a panic cannot leave them torn.
        self.flushes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether unallocated clusters of the top read as zeroes in every header its file may
    /// have after a crash: no backing layer now, and none named by a header not yet replaced.
    fn unallocated_reads_zero(&self, layers: &[Arc<Layer>]) -> bool {
        layers.len() == 1 && !self.header_change_pending()
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        if offset.checked_add(length).is_none_or(|end| end > self.size) {
            return Err(Error::invalid(format!(
                "Request at {offset} for {length} bytes is past the end of the disk ({} bytes)",
                self.size
            )));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if !self.writable {
            return Err(Error::new(ErrorKind::ReadOnly, "Disk is read-only"));
        }
        Ok(())
    }

    fn align_down(&self, value: u64) -> u64 {
        value / self.cluster_size * self.cluster_size
    }

    fn align_up(&self, value: u64) -> u64 {
        value.div_ceil(self.cluster_size) * self.cluster_size
    }
}

/// Flushes of a disk, begun and ended.
#[derive(Debug, Default)]
struct FlushCount {
    begun: u64,
    ended: u64,
}

/// A flush under way: counted as ended when dropped, whatever its outcome.
struct FlushUnderWay<'a> {
    disk: &'a Disk,
}

impl Drop for FlushUnderWay<'_> {
    fn drop(&mut self) {
        self.disk.lock_flushes().ended += 1;
        self.disk.flush_ended.notify_all();
    }
}

/// A change to the top's contents under way: counted as ended when dropped, whatever its
/// outcome (a failed write may still have changed the file).
struct ChangeUnderWay<'a> {
    disk: &'a Disk,
}

impl Drop for ChangeUnderWay<'_> {
    fn drop(&mut self) {
        self.disk.changes_ended.fetch_add(1, Ordering::SeqCst);
    }
}

/// Where the top's header stands after [`Disk::replace_backing`].
#[derive(Debug)]
enum HeaderChange {
    /// Nothing to write.
    None,
    /// To be written by the next successful flush: the new backing file (or none).
    Scheduled(Option<BackingRef>),
    /// A flush failed while it was scheduled: the old header stays.
    Abandoned,
}

impl Drop for Disk {
    /// Writes a scheduled header change, as the flush that closes an image in QEMU would.
    fn drop(&mut self) {
        if self.writable && self.header_change_scheduled() {
            if let Err(error) = self.flush() {
                tracing::warn!("the header change of a completed stream was not written: {error}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A guard against a hang, not a timing: the waiter is released by the test itself.
    const HANG_GUARD: Duration = Duration::from_secs(60);

    #[test]
    fn a_waiter_returns_once_the_flush_under_way_ends() {
        let disk = Arc::new(Disk::from_layers(Vec::new(), true));
        disk.wait_for_flushes_under_way(); // none under way: returns at once
        let under_way = disk.flush_begins();
        let (done, finished) = mpsc::channel();
        let waiter = {
            let disk = Arc::clone(&disk);
            std::thread::spawn(move || {
                disk.wait_for_flushes_under_way();
                done.send(()).unwrap();
            })
        };
        drop(under_way);
        finished
            .recv_timeout(HANG_GUARD)
            .expect("the waiter returns");
        waiter.join().unwrap();
    }

    #[test]
    fn a_flush_begun_later_does_not_hold_back_a_waiter() {
        let disk = Arc::new(Disk::from_layers(Vec::new(), true));
        let first = disk.flush_begins();
        // What wait_for_flushes_under_way reads, with the first flush under way.
        let begun = disk.lock_flushes().begun;
        let second = disk.flush_begins();
        let (done, finished) = mpsc::channel();
        let waiter = {
            let disk = Arc::clone(&disk);
            std::thread::spawn(move || {
                disk.wait_until_flushes_ended(begun);
                done.send(()).unwrap();
            })
        };
        drop(first);
        finished
            .recv_timeout(HANG_GUARD)
            .expect("the waiter returns while the second flush is under way");
        drop(second);
        waiter.join().unwrap();
    }

    #[test]
    fn a_failed_flush_counts_as_ended() {
        // No layers: the flush fails, and must not leave a waiter waiting for it.
        let disk = Disk::from_layers(Vec::new(), true);
        assert!(disk.flush().is_err());
        let count = disk.lock_flushes();
        assert_eq!((count.begun, count.ended), (1, 1));
    }
}

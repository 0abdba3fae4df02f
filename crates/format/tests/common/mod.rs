//! Shared by the format crate's power-loss tests: a recorded storage that lets a guest change
//! run on another thread during every flush, and a model of what each guest cluster must map
//! to once the image is closed.

use imgstream_format::recording::RecordingStorage;
use imgstream_format::{ImageFormat, Mapping, Storage};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the guest made of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guest {
    Unallocated,
    Data,
    Zero,
}

/// Every guest cluster's expected state, shared by a workload and its racing changes.
pub struct Model(Mutex<Vec<Guest>>);

impl Model {
    pub fn new(clusters: u64) -> Self {
        Model(Mutex::new(vec![Guest::Unallocated; clusters as usize]))
    }

    pub fn set(&self, first: u64, count: u64, state: Guest) {
        self.0.lock().unwrap()[first as usize..(first + count) as usize].fill(state);
    }

    /// The image maps every guest cluster as the model says: a change made in memory but
    /// never written back (a table marked clean too early) shows up here.
    pub fn assert_matches(&self, image: &dyn ImageFormat) {
        let expected = self.0.lock().unwrap().clone();
        let cluster_size = image.cluster_size();
        let mut guest = 0;
        while guest < image.virtual_size() {
            let extent = image.map(guest, u64::MAX).unwrap();
            let state = match extent.mapping {
                Mapping::Data { .. } => Guest::Data,
                Mapping::Zero { .. } => Guest::Zero,
                _ => Guest::Unallocated,
            };
            for cluster in guest / cluster_size..(guest + extent.length) / cluster_size {
                assert_eq!(
                    state, expected[cluster as usize],
                    "guest cluster {cluster} of the closed image"
                );
            }
            guest += extent.length;
        }
    }
}

/// A change the guest makes while a flush is syncing.
pub type RacingChange = Box<dyn FnMut() + Send>;

/// A recorded storage whose every flush, inside [`RacingStorage::during`], first runs `change`
/// (which makes its change on another thread, see [`on_another_thread`]).
pub struct RacingStorage {
    inner: Arc<RecordingStorage>,
    racing: AtomicBool,
    change: Mutex<Option<RacingChange>>,
}

impl RacingStorage {
    pub fn new(inner: Arc<RecordingStorage>) -> Self {
        RacingStorage {
            inner,
            racing: AtomicBool::new(false),
            change: Mutex::new(None),
        }
    }

    pub fn set_change(&self, change: RacingChange) {
        *self.change.lock().unwrap() = Some(change);
    }

    /// Runs `flush` (an image's flush, which must not hold the metadata lock through its
    /// syncs) with a change made during each of its storage flushes. Other storage flushes,
    /// such as an eviction's under the lock, run unraced.
    pub fn during<R>(&self, flush: impl FnOnce() -> R) -> R {
        self.racing.store(true, Ordering::SeqCst);
        let result = flush();
        self.racing.store(false, Ordering::SeqCst);
        result
    }
}

impl std::fmt::Debug for RacingStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RacingStorage").finish_non_exhaustive()
    }
}

impl Storage for RacingStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> imgstream_format::Result<()> {
        self.inner.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> imgstream_format::Result<()> {
        self.inner.write_at(offset, buf)
    }

    fn flush(&self) -> imgstream_format::Result<()> {
        let change = self.change.lock().unwrap().take();
        if let Some(mut change) = change {
            if self.racing.load(Ordering::SeqCst) {
                change();
            }
            *self.change.lock().unwrap() = Some(change);
        }
        self.inner.flush()
    }

    fn len(&self) -> imgstream_format::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> imgstream_format::Result<()> {
        self.inner.set_len(len)
    }

    fn path(&self) -> &Path {
        self.inner.path()
    }
}

/// Runs `change` on a thread of its own and waits for it. The change needs the metadata lock:
/// if the flush calling this held it through its syncs, the change would wait forever, so the
/// wait gives up after a minute.
pub fn on_another_thread(change: impl FnOnce() + Send + 'static) {
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        change();
        let _ = done.send(());
    });
    match finished.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => {}
        Err(RecvTimeoutError::Timeout) => {
            panic!("a change made during a flush's sync waited a minute for the flush")
        }
        Err(RecvTimeoutError::Disconnected) => panic!("the racing change failed"),
    }
}

//! What a flush costs the guest's other requests: a flush after writes that changed no table
//! syncs once, without the metadata lock that every guest request needs to find its clusters.
//! (One after an allocation also writes the tables back, in order, from a copy taken under
//! that lock: the racing power-loss tests show it does not hold the lock through its syncs.)

use imgstream_format::recording::{MemoryStorage, Operation, RecordingStorage};
use imgstream_format::{
    create_format, open_format, CreateOptions, FormatKind, ImageFormat, OpenOptions, Result,
    Storage,
};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const RW: OpenOptions = OpenOptions { writable: true };
const SIZE: u64 = 16 << 20;

fn syncs_since(storage: &RecordingStorage, from: usize) -> usize {
    storage.operations()[from..]
        .iter()
        .filter(|op| **op == Operation::Flush)
        .count()
}

/// Allocates and maps one cluster, flushes, then overwrites that cluster in place and flushes
/// again; returns the syncs of the first flush and of the second.
fn syncs_of_flushes(image: &dyn ImageFormat, storage: &RecordingStorage) -> (usize, usize) {
    let cluster = image.cluster_size();
    let host = image.allocate_clusters(1).expect("allocate");
    image
        .storage()
        .write_at(host, &vec![0xa1; cluster as usize])
        .expect("write");
    image.map_clusters(0, host, 1).expect("map");
    let before_first = storage.operations().len();
    image.flush().expect("first flush");
    let before_second = storage.operations().len();
    image
        .storage()
        .write_at(host, &vec![0xb2; cluster as usize])
        .expect("overwrite");
    image.flush().expect("second flush");
    (
        syncs_since(storage, before_first) - syncs_since(storage, before_second),
        syncs_since(storage, before_second),
    )
}

/// The bytes of a new `kind` image of [`SIZE`].
fn new_image(kind: FormatKind) -> Vec<u8> {
    let created = RecordingStorage::in_memory(Vec::new(), "new");
    create_format(kind, &created, &CreateOptions::new(SIZE)).expect("create");
    created.bytes().expect("bytes")
}

#[test]
fn a_qcow2_flush_with_no_table_to_write_syncs_once() {
    let storage = Arc::new(RecordingStorage::in_memory(
        new_image(FormatKind::Qcow2),
        "flush.qcow2",
    ));
    let image = open_format(FormatKind::Qcow2, storage.clone(), RW).expect("open");
    let (first, second) = syncs_of_flushes(image.as_ref(), &storage);
    assert!(
        first >= 3,
        "an allocation's flush orders data, refcounts and L2: {first} syncs"
    );
    assert_eq!(second, 1, "an overwrite's flush syncs the data once");
}

/// Storage in memory whose syncs, once armed, each announce themselves and wait for the test.
#[derive(Debug)]
struct HeldSyncs {
    inner: MemoryStorage,
    armed: AtomicBool,
    entered: Mutex<Sender<()>>,
    release: Mutex<Receiver<()>>,
}

impl Storage for HeldSyncs {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> Result<()> {
        if self.armed.load(Ordering::SeqCst) {
            let _ = self.entered.lock().expect("lock").send(());
            let _ = self.release.lock().expect("lock").recv();
        }
        self.inner.flush()
    }
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.inner.set_len(len)
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
}

/// While a flush of a `kind` image after an in-place overwrite is inside its sync, another
/// request maps a cluster: it must not wait for the sync.
fn a_request_during_the_flush_sync_does_not_wait_for_it(kind: FormatKind) {
    let (entered, on_entry) = mpsc::channel();
    let (release, released) = mpsc::channel();
    let storage = Arc::new(HeldSyncs {
        inner: MemoryStorage::new(new_image(kind), "held"),
        armed: AtomicBool::new(false),
        entered: Mutex::new(entered),
        release: Mutex::new(released),
    });
    let image = open_format(kind, storage.clone(), RW).expect("open");
    let cluster = image.cluster_size();
    let host = image.allocate_clusters(1).expect("allocate");
    image.map_clusters(0, host, 1).expect("map");
    image.flush().expect("flush the tables");
    image
        .storage()
        .write_at(host, &vec![0xc3; cluster as usize])
        .expect("overwrite");
    storage.armed.store(true, Ordering::SeqCst);
    let flushing = {
        let image = Arc::clone(&image);
        std::thread::spawn(move || image.flush())
    };
    on_entry.recv().expect("the flush syncs");
    let (mapped, on_mapped) = mpsc::channel();
    {
        let image = Arc::clone(&image);
        std::thread::spawn(move || mapped.send(image.map(0, cluster).map(|e| e.length)));
    }
    // A deadlock guard, not a timing: the map needs no sync, so it returns at once unless the
    // flush holds the metadata lock through its sync.
    let outcome = on_mapped.recv_timeout(Duration::from_secs(60));
    storage.armed.store(false, Ordering::SeqCst);
    release.send(()).expect("the flush waits");
    flushing.join().expect("flush thread").expect("flush");
    assert_eq!(
        outcome
            .expect("a map waited for the flush's sync: the metadata lock was held through it")
            .expect("map"),
        cluster
    );
}

#[test]
fn a_qcow2_flush_with_no_table_to_write_syncs_without_the_metadata_lock() {
    a_request_during_the_flush_sync_does_not_wait_for_it(FormatKind::Qcow2);
}

#[test]
fn a_qed_flush_with_no_table_to_write_syncs_without_the_metadata_lock() {
    a_request_during_the_flush_sync_does_not_wait_for_it(FormatKind::Qed);
}

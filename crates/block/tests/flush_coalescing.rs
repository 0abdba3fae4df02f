//! `Disk::flush` syncs the top only when something may need it: a change to the top ended since
//! the last successful flush began, or a header change is scheduled. This is QEMU's
//! `bdrv_co_flush` (it compares `write_gen` with `flushed_gen`); a guest that flushes often
//! (fio --fsync=8 with 16 requests in flight) sends most of its flushes with nothing new.

use imgstream_block::chain::open_layer;
use imgstream_block::{Disk, Layer};
use imgstream_format::recording::{Operation, RecordingStorage};
use imgstream_format::{open_format, Error, FileStorage, FormatKind, OpenOptions, Storage};
use std::path::Path;
use std::sync::{Arc, Mutex};

mod common;
use common::{create_overlay, run_ok, s};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// base.qcow2 (data at 0-4 MiB) <- top.qcow2 (data at 4-5 MiB), 8 MiB, 64 KiB clusters; the
/// top opened with every write and sync of its file recorded.
fn open_chain(dir: &Path) -> (Arc<Disk>, Arc<RecordingStorage>) {
    let (base, top) = (dir.join("base.qcow2"), dir.join("top.qcow2"));
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "8M"]);
    run_ok("qemu-io", &["-c", "write -P 0x11 0 4M", s(&base)]);
    create_overlay(&base, &top);
    run_ok("qemu-io", &["-c", "write -P 0x22 4M 1M", s(&top)]);
    let file: Arc<dyn Storage> = Arc::new(FileStorage::open(&top, true).expect("open top"));
    let recording = Arc::new(RecordingStorage::new(file));
    let image = open_format(
        FormatKind::Qcow2,
        recording.clone(),
        OpenOptions { writable: true },
    )
    .expect("open top");
    let top = Layer {
        image,
        path: top.clone(),
        recorded_name: s(&top).to_string(),
        format: FormatKind::Qcow2,
    };
    let base =
        open_layer(&base, "base.qcow2", Some(FormatKind::Qcow2), false, false).expect("open base");
    (
        Arc::new(Disk::from_layers(vec![top, base], true)),
        recording,
    )
}

/// Flushes the disk; returns how many times that synced the top's file.
fn flush_syncs(disk: &Disk, recording: &RecordingStorage) -> usize {
    let syncs = || {
        recording
            .operations()
            .iter()
            .filter(|op| **op == Operation::Flush)
            .count()
    };
    let before = syncs();
    disk.flush().expect("flush");
    syncs() - before
}

#[test]
fn a_flush_syncs_only_when_something_changed_since_the_last_successful_one() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, recording) = open_chain(dir.path());
    // The first flush syncs even with nothing written: the page cache may hold writes of an
    // earlier process that the guest has read since.
    assert!(flush_syncs(&disk, &recording) >= 1, "first flush");
    assert_eq!(flush_syncs(&disk, &recording), 0, "nothing changed");
    let mut buf = vec![0u8; 4096];
    disk.read(0, &mut buf).unwrap();
    assert_eq!(flush_syncs(&disk, &recording), 0, "a read changes nothing");
    disk.write(4 * MIB, &[0x33; 4096], false).unwrap();
    assert_eq!(flush_syncs(&disk, &recording), 1, "an in-place write");
    assert_eq!(flush_syncs(&disk, &recording), 0, "nothing changed since");
}

/// A change to make to the disk, named for the failure message.
type Change = Box<dyn Fn(&Disk)>;

#[test]
fn every_kind_of_change_to_the_top_makes_the_next_flush_sync() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, recording) = open_chain(dir.path());
    let changes: [(&str, Change); 6] = [
        (
            "an allocating write",
            Box::new(|d| d.write(6 * MIB, &[0x44; 4096], false).unwrap()),
        ),
        (
            "write-zeroes of a whole cluster",
            Box::new(|d| d.write_zeroes(MIB, 64 * KIB, false).unwrap()),
        ),
        (
            "write-zeroes of part of a cluster",
            Box::new(|d| d.write_zeroes(2 * MIB + 512, 512, false).unwrap()),
        ),
        (
            "a discard",
            Box::new(|d| d.discard(4 * MIB, 128 * KIB).unwrap()),
        ),
        (
            "a copy-up",
            Box::new(|d| {
                d.populate(3 * MIB, 64 * KIB, 2).unwrap();
            }),
        ),
        (
            "a guest read copying up",
            Box::new(|d| {
                d.set_copy_on_read(2);
                let mut buf = vec![0u8; 4096];
                d.read(3 * MIB + 128 * KIB, &mut buf).unwrap();
                d.set_copy_on_read(0);
            }),
        ),
    ];
    disk.flush().unwrap();
    for (what, change) in &changes {
        assert_eq!(flush_syncs(&disk, &recording), 0, "before {what}");
        change(&disk);
        assert!(flush_syncs(&disk, &recording) >= 1, "after {what}");
    }
}

#[test]
fn after_a_failed_flush_the_next_one_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, recording) = open_chain(dir.path());
    disk.flush().unwrap();
    disk.write(4 * MIB, &[0x33; 4096], false).unwrap();
    recording.on_next_flush(|| Err(Error::invalid("injected flush failure")));
    assert!(disk.flush().is_err(), "the injected failure is reported");
    assert_eq!(
        flush_syncs(&disk, &recording),
        1,
        "the write is still to be made durable"
    );
}

/// A write that ends while a flush syncs may or may not be in that sync: the flush after it
/// must sync again.
#[test]
fn a_change_ending_during_a_flush_is_left_to_the_next_flush() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, recording) = open_chain(dir.path());
    disk.flush().unwrap();
    disk.write(4 * MIB, &[0x33; 4096], false).unwrap();
    // The hook holds the disk until it runs, on the flushing thread; it is taken by then.
    let racing = Arc::new(Mutex::new(Some(Arc::clone(&disk))));
    let slot = Arc::clone(&racing);
    recording.on_next_flush(move || {
        let disk = slot.lock().unwrap().take().expect("runs once");
        disk.write(4 * MIB + 4096, &[0x55; 4096], false)
    });
    assert_eq!(flush_syncs(&disk, &recording), 1, "the flush with the race");
    assert!(racing.lock().unwrap().is_none(), "the racing write ran");
    assert_eq!(
        flush_syncs(&disk, &recording),
        1,
        "the racing write is made durable by the next flush"
    );
    assert_eq!(
        flush_syncs(&disk, &recording),
        0,
        "and then nothing is left"
    );
}

#[test]
fn a_scheduled_header_change_is_written_with_nothing_else_changed() {
    let dir = tempfile::tempdir().unwrap();
    let (disk, recording) = open_chain(dir.path());
    disk.flush().unwrap();
    disk.populate(0, 8 * MIB, 2).unwrap();
    disk.flush().unwrap();
    disk.replace_backing(2, None).unwrap();
    assert!(disk.header_change_pending());
    assert!(flush_syncs(&disk, &recording) >= 1, "the header is written");
    assert!(!disk.header_change_pending());
    assert_eq!(
        flush_syncs(&disk, &recording),
        0,
        "and then nothing is left"
    );
}

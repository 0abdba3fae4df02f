//! The header change a completed stream schedules: the chain changes in memory at once, the
//! file's header only in the next flush, after the data. Until then the file names the old
//! chain, so what the guest does meanwhile must read the same under either header; and a
//! flush that fails must never be followed by the new header.

mod common;

use common::*;
use imgstream_format::recording::{power_loss_state, Operation};
use imgstream_format::Error;
use std::sync::Arc;

/// A top in qcow2 v2, which has no zero flag: with no backing layer, write-zeroes and discard
/// may leave whole clusters unallocated.
fn v2_fixture() -> Fixture {
    let f = Fixture::new("qcow2", 8);
    let top = f.top.to_str().unwrap();
    run_ok("qemu-img", &["amend", "-q", "-o", "compat=0.10", top]);
    let info = run_ok("qemu-img", &["info", "-U", top]);
    assert!(info.contains("compat: 0.10"), "{info}");
    f
}

/// Streams the whole chain and waits for the job to conclude, with only the tests' listener:
/// nothing flushes the disk afterwards.
fn stream_to_the_end(disk: &Arc<imgstream_block::Disk>) {
    let (job, events) = start(disk, full_stream(), JobSetup::default());
    assert_eq!(job.wait_concluded(), None, "{:?}", events.names());
    assert!(
        events.contains("BLOCK_JOB_COMPLETED"),
        "{:?}",
        events.names()
    );
}

#[test]
fn the_header_names_the_old_chain_until_a_flush_and_guest_zeroes_read_the_same_under_both() {
    let f = v2_fixture();
    let pristine = std::fs::read(&f.top).unwrap();
    let (disk, recorder) = f.open_recorded();
    stream_to_the_end(&disk);

    assert_eq!(disk.layers().len(), 1, "the chain changed in memory");
    assert!(disk.header_change_pending());
    assert_eq!(
        backing_of(&f.top, "qcow2").as_deref(),
        Some("mid.qcow2"),
        "the file keeps its header until a flush"
    );

    // The first MiB is the base's (0xaa) and was copied into the top. Zeroing its first
    // cluster must not unmap it (the old header would read 0xaa there after a crash), and a
    // discard of the next one must leave it as the guest saw it.
    disk.write_zeroes(0, 64 * KIB, false).unwrap();
    disk.discard(64 * KIB, 64 * KIB).unwrap();
    let mut expected = std::fs::read(&f.before).unwrap();
    expected[..64 * KIB as usize].fill(0);
    let mut read = vec![0u8; 128 * KIB as usize];
    disk.read(0, &mut read).unwrap();
    assert_eq!(read[..], expected[..128 * KIB as usize]);
    let expected_raw = f.dir.path().join("expected.raw");
    std::fs::write(&expected_raw, &expected).unwrap();

    disk.flush().unwrap();
    assert!(!disk.header_change_pending());
    close(disk);
    assert_eq!(backing_of(&f.top, "qcow2"), None);
    assert_check_clean(&f.top, "qcow2", "after the flush");
    assert_same_as_raw(&f.top, "qcow2", &expected_raw, "after the flush");

    // Power lost just before the header write, with everything before it on disk: the old
    // header, and the same content.
    let log = recorder.operations();
    let header_write = log
        .iter()
        .rposition(|op| matches!(op, Operation::Write(0, _)))
        .expect("the header was written");
    assert!(
        log[..header_write].contains(&Operation::Flush)
            && log[header_write + 1..].contains(&Operation::Flush),
        "a flush before the header write and one after it"
    );
    let last_flush = log[..header_write]
        .iter()
        .rposition(|op| *op == Operation::Flush)
        .unwrap();
    assert!(
        log[last_flush + 1..header_write]
            .iter()
            .all(|op| !matches!(op, Operation::Write(..))),
        "nothing written between the last flush and the header"
    );
    let image = f.dir.path().join("cut.qcow2");
    std::fs::write(
        &image,
        power_loss_state(&pristine, &log, header_write, |_| true),
    )
    .unwrap();
    assert_eq!(backing_of(&image, "qcow2").as_deref(), Some("mid.qcow2"));
    let (code, text) = qemu_check(&image, "qcow2");
    assert!(
        code == 0 || code == 3,
        "corruption before the header write:\n{text}"
    );
    assert_same_as_raw(
        &image,
        "qcow2",
        &expected_raw,
        "cut before the header write",
    );
}

#[test]
fn dropping_the_disk_writes_the_scheduled_header() {
    let f = Fixture::new("qed", 4);
    let disk = f.open();
    stream_to_the_end(&disk);
    assert_eq!(backing_of(&f.top, "qed").as_deref(), Some("mid.qcow2"));
    close(disk);
    assert_eq!(backing_of(&f.top, "qed"), None);
    assert_check_clean(&f.top, "qed", "after close");
    assert_same_as_raw(&f.top, "qed", &f.before, "after close");
}

#[test]
fn a_failed_flush_abandons_the_header_change_for_good() {
    let f = Fixture::new("qcow2", 4);
    let (disk, recording) = f.open_recorded();
    stream_to_the_end(&disk);
    // Only the first of the flush's syncs fails: the header write after it would succeed.
    recording.on_next_flush(|| {
        Err(Error::io(
            "Injected flush error",
            std::io::Error::from_raw_os_error(libc::EIO),
        ))
    });
    assert!(disk.flush().is_err(), "the injected failure is reported");
    disk.flush().unwrap();
    assert!(
        disk.header_change_pending(),
        "the old header may still be on disk: unmapping stays off"
    );
    close(disk);
    assert_eq!(
        backing_of(&f.top, "qcow2").as_deref(),
        Some("mid.qcow2"),
        "no new header after a failed flush"
    );
    assert_check_clean(&f.top, "qcow2", "after the abandoned change");
    assert_same_as_raw(&f.top, "qcow2", &f.before, "after the abandoned change");

    // Reopened with its old chain, a new stream finishes the job.
    let disk = f.open();
    stream_to_the_end(&disk);
    close(disk);
    assert_eq!(backing_of(&f.top, "qcow2"), None);
    assert_same_as_raw(&f.top, "qcow2", &f.before, "after the second stream");
}

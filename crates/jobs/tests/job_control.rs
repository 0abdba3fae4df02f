//! The stream job's verbs and lifecycle as QEMU's job.c defines them: pause/resume, cancel,
//! set-speed, auto-finalize and auto-dismiss off, refused verbs, and the exact event order.

mod common;

use common::*;
use imgstream_jobs::{JobEvent, JobStatus, StreamOptions};

/// Slow enough that every verb lands while the job is still copying (a 16 MiB chain has about
/// 9 MiB to copy; at 1 MiB/s that is several seconds, and every test speeds it up at the end).
const CRAWL: u64 = MIB;

fn assert_unchanged(f: &Fixture, context: &str) {
    assert_eq!(
        backing_of(&f.top, f.top_fmt).as_deref(),
        Some("mid.qcow2"),
        "{context}"
    );
    assert_check_clean(&f.top, f.top_fmt, context);
    assert_same_as_raw(&f.top, f.top_fmt, &f.before, context);
}

#[test]
fn successful_stream_emits_qemus_event_order_and_drops_the_backing_file() {
    let f = Fixture::new("qcow2", 8);
    let disk = f.open();
    let (job, events) = start(&disk, full_stream(), JobSetup::default());
    assert_eq!(job.wait_concluded(), None);
    wait_until(&job, &events, "null", || job.is_finished());
    assert_eq!(
        events.names(),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
    let info = job.info();
    assert_eq!((info.offset, info.len), (f.size, f.size));
    close(disk);
    assert_eq!(backing_of(&f.top, "qcow2"), None);
    assert_check_clean(&f.top, "qcow2", "after stream");
    assert_same_as_raw(&f.top, "qcow2", &f.before, "after stream");
}

#[test]
fn pause_holds_the_offset_and_resume_continues() {
    let f = Fixture::new("qcow2", 16);
    let disk = f.open();
    let setup = JobSetup {
        speed: CRAWL,
        ..Default::default()
    };
    let (job, events) = start(&disk, full_stream(), setup);
    wait_until(&job, &events, "progress", || job.info().copied > 0);
    job.pause().unwrap();
    assert_eq!(job.pause().unwrap_err().0, "Job is already paused");
    wait_status(&job, &events, JobStatus::Paused);
    let info = job.info();
    assert!(info.paused && !info.busy, "{info:?}");
    // However long the job stays paused, it does not move (bounded waits on its condvar).
    for _ in 0..5 {
        job.wait_change(std::time::Duration::from_millis(40));
        let now = job.info();
        assert_eq!((now.offset, now.copied), (info.offset, info.copied));
        assert_eq!(now.status, JobStatus::Paused);
    }
    assert!(info.offset < info.len, "paused after the end: {info:?}");
    job.resume().unwrap();
    assert_eq!(
        job.resume().unwrap_err().0,
        "Can't resume a job that was not paused"
    );
    job.set_speed(0).unwrap();
    assert_eq!(job.wait_concluded(), None);
    let names = events.names();
    let paused = names.iter().position(|n| n == "paused").unwrap();
    assert_eq!(names[paused + 1], "running", "{names:?}");
    assert_eq!(job.info().offset, f.size);
    close(disk);
    assert_eq!(backing_of(&f.top, "qcow2"), None);
    assert_same_as_raw(&f.top, "qcow2", &f.before, "after resume");
}

#[test]
fn cancel_leaves_the_header_and_content_as_they_were() {
    for fmt in ["qcow2", "qed"] {
        let f = Fixture::new(fmt, 16);
        let disk = f.open();
        let setup = JobSetup {
            speed: CRAWL,
            ..Default::default()
        };
        let (job, events) = start(&disk, full_stream(), setup);
        wait_until(&job, &events, "progress", || job.info().copied > 0);
        job.cancel().unwrap();
        assert_eq!(job.wait_concluded().as_deref(), Some("Operation canceled"));
        wait_until(&job, &events, "null", || job.is_finished());
        let names = events.names();
        assert_eq!(
            names[names.len() - 4..],
            ["aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"],
            "{fmt}"
        );
        assert!(!names.iter().any(|n| n.starts_with("BLOCK_JOB_COMPLETED")));
        let info = job.info();
        assert!(info.offset < info.len, "{fmt}: {info:?}");
        close(disk);
        assert_unchanged(&f, &format!("{fmt} after cancel"));
    }
}

#[test]
fn set_speed_while_running_changes_the_reported_speed_and_finishes_sooner() {
    let f = Fixture::new("qcow2", 16);
    let disk = f.open();
    let setup = JobSetup {
        speed: 1,
        ..Default::default()
    };
    let (job, events) = start(&disk, full_stream(), setup);
    // At 1 byte/s the job copies one chunk and then sleeps: only a speed change frees it.
    wait_until(&job, &events, "first chunk", || job.info().copied > 0);
    assert_eq!(job.info().speed, 1);
    job.set_speed(64 * MIB).unwrap();
    assert_eq!(job.info().speed, 64 * MIB);
    assert_eq!(job.wait_concluded(), None);
    match events
        .all()
        .iter()
        .find(|e| matches!(e, JobEvent::Completed { .. }))
    {
        Some(JobEvent::Completed { speed, offset, .. }) => {
            assert_eq!((*speed, *offset), (64 * MIB, f.size))
        }
        other => panic!("no completion: {other:?}"),
    }
}

#[test]
fn manual_finalize_waits_in_pending_then_applies_and_waits_for_dismiss() {
    let f = Fixture::new("qcow2", 8);
    let disk = f.open();
    let setup = JobSetup {
        auto_finalize: false,
        auto_dismiss: false,
        ..Default::default()
    };
    let (job, events) = stream_until_pending(&disk, setup);
    assert_eq!(job.info().status, JobStatus::Pending);
    assert_eq!(
        job.dismiss().unwrap_err().0,
        "Job 'job0' in state 'pending' cannot accept command verb 'dismiss'"
    );
    // Nothing is applied before finalize.
    assert_eq!(backing_of(&f.top, "qcow2").as_deref(), Some("mid.qcow2"));
    job.finalize().unwrap();
    assert_eq!(job.wait_concluded(), None);
    assert_eq!(job.info().status, JobStatus::Concluded);
    assert!(job.is_finished());
    assert_eq!(
        job.finalize().unwrap_err().0,
        "Job 'job0' in state 'concluded' cannot accept command verb 'finalize'"
    );
    // Applied to the chain at once; the file's header follows in the next flush.
    assert_eq!(disk.layers().len(), 1);
    assert!(disk.header_change_pending());
    disk.flush().unwrap();
    assert_eq!(backing_of(&f.top, "qcow2"), None);
    job.dismiss().unwrap();
    wait_status(&job, &events, JobStatus::Null);
    assert_eq!(
        events.names(),
        [
            "created",
            "running",
            "waiting",
            "pending",
            "BLOCK_JOB_PENDING",
            "BLOCK_JOB_COMPLETED",
            "concluded",
            "null"
        ]
    );
}

#[test]
fn cancel_in_pending_keeps_the_backing_file_although_everything_was_copied() {
    let f = Fixture::new("qcow2", 8);
    let disk = f.open();
    let setup = JobSetup {
        auto_finalize: false,
        ..Default::default()
    };
    let (job, events) = stream_until_pending(&disk, setup);
    job.cancel().unwrap();
    assert_eq!(job.wait_concluded().as_deref(), Some("Operation canceled"));
    wait_until(&job, &events, "null", || job.is_finished());
    let cancelled = events
        .all()
        .into_iter()
        .find(|e| matches!(e, JobEvent::Cancelled { .. }));
    match cancelled {
        Some(JobEvent::Cancelled { offset, len, .. }) => assert_eq!(offset, len),
        other => panic!("no BLOCK_JOB_CANCELLED: {other:?}"),
    }
    close(disk);
    assert_unchanged(&f, "cancel in pending");
    // ... and the top really holds everything: it reads the same without its backing file.
    let alone = f.dir.path().join("alone.qcow2");
    std::fs::copy(&f.top, &alone).unwrap();
    run_ok(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "",
            alone.to_str().unwrap(),
        ],
    );
    assert_same_as_raw(&alone, "qcow2", &f.before, "populated top alone");
}

#[test]
fn complete_is_refused_with_qemus_message() {
    let f = Fixture::new("qcow2", 16);
    let disk = f.open();
    let setup = JobSetup {
        speed: CRAWL,
        ..Default::default()
    };
    let (job, events) = start(&disk, full_stream(), setup);
    wait_status(&job, &events, JobStatus::Running);
    assert_eq!(
        job.complete().unwrap_err().0,
        "Job 'job0' in state 'running' cannot accept command verb 'complete'"
    );
    assert_eq!(
        job.finalize().unwrap_err().0,
        "Job 'job0' in state 'running' cannot accept command verb 'finalize'"
    );
    job.set_speed(0).unwrap();
    assert_eq!(job.wait_concluded(), None);
}

#[test]
fn stream_with_nothing_to_copy_has_len_zero() {
    let f = Fixture::new("qcow2", 4);
    let disk = f.open();
    // base = the immediate backing file: nothing lies between.
    let options = StreamOptions {
        base_depth: 1,
        new_backing: None,
        ..full_stream()
    };
    let (job, events) = start(&disk, options, JobSetup::default());
    assert_eq!(job.wait_concluded(), None);
    match events
        .all()
        .iter()
        .find(|e| matches!(e, JobEvent::Completed { .. }))
    {
        Some(JobEvent::Completed { len, offset, .. }) => assert_eq!((*len, *offset), (0, 0)),
        other => panic!("no completion: {other:?}"),
    }
    close(disk);
    assert_unchanged(&f, "no-op stream");
}

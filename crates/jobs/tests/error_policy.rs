//! The stream job's on-error policies (report, ignore, stop, enospc, auto) against injected
//! faults: EIO on reads of a backing image's data, ENOSPC on writes of the top. Each checks
//! QEMU's events, the job's result and io-status, and that a failed job leaves the header and
//! content as they were.

mod common;

use common::*;
use imgstream_format::{Error, Result, Storage};
use imgstream_jobs::{IoStatus, JobEvent, JobStatus, OnError, StreamOptions};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// A storage that fails reads of a host range with EIO, or every write with ENOSPC, while it
/// has failures left (a negative count fails until disarmed).
#[derive(Debug)]
struct FaultyStorage {
    inner: Arc<dyn Storage>,
    read_range: Option<(u64, u64)>,
    fail_writes: bool,
    left: Arc<AtomicI64>,
}

impl FaultyStorage {
    fn take_failure(&self) -> bool {
        let mut left = self.left.load(Ordering::SeqCst);
        loop {
            if left == 0 {
                return false;
            }
            let next = if left < 0 { left } else { left - 1 };
            match self
                .left
                .compare_exchange(left, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return true,
                Err(now) => left = now,
            }
        }
    }
}

fn os_error(errno: i32, what: &str) -> Error {
    Error::io(what, std::io::Error::from_raw_os_error(errno))
}

impl Storage for FaultyStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if let Some((start, end)) = self.read_range {
            if offset < end && offset + buf.len() as u64 > start && self.take_failure() {
                return Err(os_error(libc::EIO, "Injected read error"));
            }
        }
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if self.fail_writes && self.take_failure() {
            return Err(os_error(libc::ENOSPC, "Injected write error"));
        }
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> Result<()> {
        self.inner.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> Result<bool> {
        self.inner.punch_hole(offset, len)
    }
    fn data_or_hole(&self, offset: u64) -> Result<Option<(bool, u64)>> {
        self.inner.data_or_hole(offset)
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
}

/// The host range of the first data extent of `mid.qcow2` itself (not its backing file).
fn mid_data_host_range(f: &Fixture) -> (u64, u64) {
    let text = run_ok(
        "qemu-img",
        &[
            "map",
            "--output=json",
            "-f",
            "qcow2",
            "-U",
            "--max-length",
            "1G",
            f.mid.to_str().unwrap(),
        ],
    );
    for line in text.lines() {
        if line.contains("\"depth\": 0") && line.contains("\"data\": true") {
            let field = |name: &str| -> u64 {
                line.split(&format!("\"{name}\": "))
                    .nth(1)
                    .and_then(|r| r.split([',', '}']).next())
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or_else(|| panic!("no {name} in {line}"))
            };
            let host = field("offset");
            return (host, host + field("length"));
        }
    }
    panic!("mid has no data:\n{text}");
}

enum Fault {
    /// EIO on reads of mid's data.
    ReadEio,
    /// ENOSPC on writes of the top.
    WriteEnospc,
}

/// A chain whose mid (EIO) or top (ENOSPC) fails `count` times (negative: until disarmed).
fn faulty(fault: Fault, count: i64) -> (Fixture, Arc<imgstream_block::Disk>, Arc<AtomicI64>) {
    let f = Fixture::new("qcow2", 16);
    let left = Arc::new(AtomicI64::new(0));
    let arm = left.clone();
    let disk = match fault {
        Fault::ReadEio => {
            let range = mid_data_host_range(&f);
            f.open_with_lower_storage(1, move |inner| {
                Arc::new(FaultyStorage {
                    inner,
                    read_range: Some(range),
                    fail_writes: false,
                    left: arm,
                })
            })
        }
        Fault::WriteEnospc => f.open_with_top_storage(move |inner| {
            Arc::new(FaultyStorage {
                inner,
                read_range: None,
                fail_writes: true,
                left: arm,
            })
        }),
    };
    // Armed only now: opening the chain must not trip over the fault.
    left.store(count, Ordering::SeqCst);
    (f, disk, left)
}

fn with_policy(on_error: OnError) -> StreamOptions {
    StreamOptions {
        on_error,
        ..full_stream()
    }
}

fn completed_error(events: &Events) -> Option<String> {
    events.all().iter().find_map(|e| match e {
        JobEvent::Completed { error, .. } => Some(error.clone().unwrap_or_default()),
        _ => None,
    })
}

/// After a failed job: the header still names mid, metadata is clean, content as before.
fn assert_left_as_before(f: &Fixture, disk: Arc<imgstream_block::Disk>, context: &str) {
    close(disk);
    assert_eq!(
        backing_of(&f.top, "qcow2").as_deref(),
        Some("mid.qcow2"),
        "{context}"
    );
    assert_check_clean(&f.top, "qcow2", context);
    assert_same_as_raw(&f.top, "qcow2", &f.before, context);
}

fn assert_reports(fault: Fault, policy: OnError, message: &str) {
    let (f, disk, _left) = faulty(fault, -1);
    let (job, events) = start(&disk, with_policy(policy), JobSetup::default());
    assert_eq!(job.wait_concluded().as_deref(), Some(message));
    wait_until(&job, &events, "null", || job.is_finished());
    let names = events.names();
    assert_eq!(
        names[2..],
        [
            "BLOCK_JOB_ERROR(report)".to_string(),
            "aborting".into(),
            format!("BLOCK_JOB_COMPLETED({message})"),
            "concluded".into(),
            "null".into()
        ],
        "{names:?}"
    );
    assert!(events.all().iter().any(|e| matches!(
        e,
        JobEvent::Error {
            operation: "read",
            ..
        }
    )));
    assert_left_as_before(&f, disk, &format!("{policy:?}"));
}

#[test]
fn report_fails_the_job_with_eio_and_leaves_the_header() {
    assert_reports(Fault::ReadEio, OnError::Report, "Input/output error");
}

#[test]
fn report_fails_the_job_with_enospc_too() {
    assert_reports(
        Fault::WriteEnospc,
        OnError::Report,
        "No space left on device",
    );
}

#[test]
fn enospc_and_auto_policies_report_an_eio() {
    assert_reports(Fault::ReadEio, OnError::Enospc, "Input/output error");
    assert_reports(Fault::ReadEio, OnError::Auto, "Input/output error");
}

#[test]
fn ignore_runs_to_the_end_then_fails_without_touching_the_header() {
    let (f, disk, _left) = faulty(Fault::ReadEio, -1);
    let (job, events) = start(&disk, with_policy(OnError::Ignore), JobSetup::default());
    assert_eq!(job.wait_concluded().as_deref(), Some("Input/output error"));
    let info = job.info();
    assert_eq!(info.offset, info.len, "{info:?}");
    let names = events.names();
    assert!(
        names.contains(&"BLOCK_JOB_ERROR(ignore)".to_string()),
        "{names:?}"
    );
    assert!(!names.contains(&"waiting".to_string()), "{names:?}");
    assert_eq!(
        completed_error(&events).as_deref(),
        Some("Input/output error")
    );
    assert_left_as_before(&f, disk, "ignore");
}

fn assert_stops_then_resumes(fault: Fault, policy: OnError, io_status: IoStatus) {
    let (f, disk, left) = faulty(fault, -1);
    let (job, events) = start(&disk, with_policy(policy), JobSetup::default());
    wait_status(&job, &events, JobStatus::Paused);
    let info = job.info();
    assert!(info.paused, "{info:?}");
    assert_eq!(info.io_status, io_status);
    assert!(
        events.contains("BLOCK_JOB_ERROR(stop)"),
        "{:?}",
        events.names()
    );
    left.store(0, Ordering::SeqCst);
    job.resume().unwrap();
    assert_eq!(job.info().io_status, IoStatus::Ok);
    assert_eq!(job.wait_concluded(), None, "{:?}", events.names());
    let names = events.names();
    let stop = names
        .iter()
        .position(|n| n == "BLOCK_JOB_ERROR(stop)")
        .unwrap();
    assert_eq!(
        names[stop + 1..stop + 3],
        ["paused", "running"],
        "{names:?}"
    );
    close(disk);
    assert_eq!(backing_of(&f.top, "qcow2"), None);
    // Clusters allocated for a copy whose data write failed are handed back (as QEMU's
    // qcow2_alloc_cluster_abort does), so even ENOSPC leaves no leak.
    let (code, text) = qemu_check(&f.top, "qcow2");
    assert_eq!(code, 0, "after stop and resume: qemu-img check:\n{text}");
    assert_same_as_raw(&f.top, "qcow2", &f.before, "after stop and resume");
}

#[test]
fn stop_pauses_with_io_status_failed_and_resume_completes() {
    assert_stops_then_resumes(Fault::ReadEio, OnError::Stop, IoStatus::Failed);
}

#[test]
fn stop_on_enospc_reports_nospace_and_resume_completes() {
    assert_stops_then_resumes(Fault::WriteEnospc, OnError::Stop, IoStatus::Nospace);
}

#[test]
fn enospc_and_auto_policies_stop_on_enospc() {
    assert_stops_then_resumes(Fault::WriteEnospc, OnError::Enospc, IoStatus::Nospace);
    assert_stops_then_resumes(Fault::WriteEnospc, OnError::Auto, IoStatus::Nospace);
}

#[test]
fn a_single_transient_error_under_stop_costs_one_pause() {
    let (f, disk, _left) = faulty(Fault::ReadEio, 1);
    let (job, events) = start(&disk, with_policy(OnError::Stop), JobSetup::default());
    wait_status(&job, &events, JobStatus::Paused);
    job.resume().unwrap();
    assert_eq!(job.wait_concluded(), None);
    let errors = events
        .names()
        .iter()
        .filter(|n| n.starts_with("BLOCK_JOB_ERROR"))
        .count();
    assert_eq!(errors, 1);
    close(disk);
    assert_same_as_raw(&f.top, "qcow2", &f.before, "transient error");
}

//! Shared helpers of the stream job's library tests: chains made with QEMU's tools, QEMU's
//! tools as oracles, a disk over a custom top storage, a job whose events are recorded, and
//! seeded randomness that names its seed when a test fails.

#![allow(dead_code)]

use imgstream_block::chain::open_layer;
use imgstream_block::{ChainOptions, Disk, FormatKind, Layer};
use imgstream_format::recording::RecordingStorage;
use imgstream_format::{open_format, FileStorage, OpenOptions, Storage};
use imgstream_jobs::{
    Job, JobEvent, JobOptions, JobStatus, OnError, StreamJob, StreamOptions, FLUSH_INTERVAL,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// Runs a program, returning (exit code, stdout + stderr).
pub fn run(program: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (install qemu-utils)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

pub fn run_ok(program: &str, args: &[&str]) -> String {
    let (code, text) = run(program, args);
    assert_eq!(code, 0, "{program} {args:?} failed:\n{text}");
    text
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// `qemu-io -f FMT -c ... FILE`, all commands in one process.
pub fn qemu_io(file: &Path, fmt: &str, commands: &[String]) {
    let mut args = vec!["-f", fmt];
    for c in commands {
        args.extend(["-c", c.as_str()]);
    }
    args.push(s(file));
    let text = run_ok("qemu-io", &args);
    assert!(
        !text.contains("failed"),
        "qemu-io reported a failure:\n{text}"
    );
}

/// `qemu-img check` exit code (0 clean, 2 corrupt, 3 leaks) and output.
pub fn qemu_check(file: &Path, fmt: &str) -> (i32, String) {
    run("qemu-img", &["check", "-f", fmt, s(file)])
}

pub fn assert_check_clean(file: &Path, fmt: &str, context: &str) {
    let (code, text) = qemu_check(file, fmt);
    assert_eq!(code, 0, "{context}: qemu-img check not clean:\n{text}");
}

/// `qemu-img compare` of an image (with its chain) against a raw file.
pub fn assert_same_as_raw(file: &Path, fmt: &str, raw: &Path, context: &str) {
    let (code, text) = run(
        "qemu-img",
        &["compare", "-f", fmt, "-F", "raw", s(file), s(raw)],
    );
    assert_eq!(code, 0, "{context}: content differs:\n{text}");
}

pub fn convert_to_raw(file: &Path, fmt: &str, out: &Path) {
    run_ok(
        "qemu-img",
        &["convert", "-f", fmt, "-O", "raw", s(file), s(out)],
    );
}

/// The backing file name the header records (from `qemu-img info`), if any.
pub fn backing_of(file: &Path, fmt: &str) -> Option<String> {
    let text = run_ok("qemu-img", &["info", "-f", fmt, "-U", s(file)]);
    text.lines()
        .find_map(|l| l.strip_prefix("backing file: "))
        .map(|l| {
            l.split(" (actual path")
                .next()
                .unwrap_or(l)
                .trim()
                .to_string()
        })
}

pub fn sha(file: &Path) -> String {
    run_ok("sha256sum", &[s(file)])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A three-image chain `base.qcow2 <- mid.qcow2 <- top.FMT` in a temporary folder, with
/// data, zero clusters and unaligned writes in every layer, and its pre-stream content as raw.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub base: PathBuf,
    pub mid: PathBuf,
    pub top: PathBuf,
    pub top_fmt: &'static str,
    pub size: u64,
    /// The guest-visible content before any stream, as a raw file.
    pub before: PathBuf,
}

impl Fixture {
    /// `size_mib` MiB, 64 KiB clusters; `top_fmt` is `qcow2` or `qed`.
    pub fn new(top_fmt: &'static str, size_mib: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let mid = dir.path().join("mid.qcow2");
        let top = dir.path().join(format!("top.{top_fmt}"));
        let size = size_mib * MIB;
        let size_arg = size.to_string();
        run_ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", s(&base), &size_arg],
        );
        run_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                s(&mid),
            ],
        );
        run_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                top_fmt,
                "-b",
                "mid.qcow2",
                "-F",
                "qcow2",
                s(&top),
            ],
        );
        let (mut b, mut m, mut t) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..size_mib {
            let at = i * MIB;
            if i % 2 == 0 {
                b.push(format!("write -P 0xaa {at} 1M"));
            }
            if i % 9 == 4 {
                b.push(format!("write -z {at} 256k"));
            }
            if i % 3 == 1 {
                m.push(format!("write -P 0xcc {} 320k", at + 128 * KIB));
            }
            if i % 5 == 2 {
                m.push(format!("write -z {} 128k", at + 512 * KIB));
            }
            if i % 7 == 3 {
                m.push(format!("write -P 0xc1 {} 3000", at + 1000));
            }
            if i % 6 == 5 {
                t.push(format!("write -P 0xdd {} 64k", at + 64 * KIB));
            }
            if i % 11 == 7 {
                t.push(format!("write -P 0xde {} 5000", at + 777));
            }
        }
        qemu_io(&base, "qcow2", &b);
        qemu_io(&mid, "qcow2", &m);
        qemu_io(&top, top_fmt, &t);
        let before = dir.path().join("before.raw");
        convert_to_raw(&top, top_fmt, &before);
        Fixture {
            dir,
            base,
            mid,
            top,
            top_fmt,
            size,
            before,
        }
    }

    /// Hashes of the images below the top, which a stream must never change.
    pub fn lower_hashes(&self) -> Vec<String> {
        vec![sha(&self.base), sha(&self.mid)]
    }

    pub fn open(&self) -> Arc<Disk> {
        Arc::new(Disk::open(&self.top, &ChainOptions::writable()).unwrap())
    }

    /// Opens the chain with the top on `wrap(FileStorage)` and the lower layers as usual.
    pub fn open_with_top_storage(
        &self,
        wrap: impl FnOnce(Arc<dyn Storage>) -> Arc<dyn Storage>,
    ) -> Arc<Disk> {
        let kind = FormatKind::from_name(self.top_fmt).unwrap();
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(&self.top, true).unwrap());
        let image = open_format(kind, wrap(storage), OpenOptions { writable: true }).unwrap();
        let top = Layer {
            image,
            path: self.top.clone(),
            recorded_name: s(&self.top).to_string(),
            format: kind,
        };
        let mid = open_layer(
            &self.mid,
            "mid.qcow2",
            Some(FormatKind::Qcow2),
            false,
            false,
        )
        .unwrap();
        let base = open_layer(
            &self.base,
            "base.qcow2",
            Some(FormatKind::Qcow2),
            false,
            false,
        )
        .unwrap();
        Arc::new(Disk::from_layers(vec![top, mid, base], true))
    }

    /// Opens the chain with every write and flush to the top recorded, in the order of their
    /// effects.
    pub fn open_recorded(&self) -> (Arc<Disk>, Arc<RecordingStorage>) {
        let mut recording = None;
        let disk = self.open_with_top_storage(|inner| {
            let recorder = Arc::new(RecordingStorage::new(inner));
            recording = Some(recorder.clone());
            recorder
        });
        (disk, recording.expect("the top storage was wrapped"))
    }

    /// Opens the chain with `wrap` around the storage of layer `depth` (1 = mid, 2 = base).
    pub fn open_with_lower_storage(
        &self,
        depth: usize,
        wrap: impl FnOnce(Arc<dyn Storage>) -> Arc<dyn Storage>,
    ) -> Arc<Disk> {
        let kind = FormatKind::from_name(self.top_fmt).unwrap();
        let top = open_layer(&self.top, s(&self.top), Some(kind), true, false).unwrap();
        let mut wrap = Some(wrap);
        let mut lower = |path: &Path, name: &str, d: usize| {
            if d != depth {
                return open_layer(path, name, Some(FormatKind::Qcow2), false, false).unwrap();
            }
            let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(path, false).unwrap());
            let image = open_format(
                FormatKind::Qcow2,
                (wrap.take().unwrap())(storage),
                OpenOptions { writable: false },
            )
            .unwrap();
            Layer {
                image,
                path: path.to_path_buf(),
                recorded_name: name.to_string(),
                format: FormatKind::Qcow2,
            }
        };
        let mid = lower(&self.mid, "mid.qcow2", 1);
        let base = lower(&self.base, "base.qcow2", 2);
        Arc::new(Disk::from_layers(vec![top, mid, base], true))
    }
}

/// Options of a full stream of a three-image chain.
pub fn full_stream() -> StreamOptions {
    StreamOptions {
        base_depth: 3,
        new_backing: None,
        rewrite_header_always: false,
        on_error: OnError::Report,
        flush_interval: FLUSH_INTERVAL,
        write_back_as_copied: false,
    }
}

/// Everything a job announced, in order.
#[derive(Clone, Default)]
pub struct Events(Arc<Mutex<Vec<JobEvent>>>);

impl Events {
    pub fn all(&self) -> Vec<JobEvent> {
        self.0.lock().unwrap().clone()
    }

    /// Short names: the status for status changes, the QMP event name otherwise.
    pub fn names(&self) -> Vec<String> {
        self.all().iter().map(event_name).collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names().iter().any(|n| n == name)
    }
}

pub fn event_name(event: &JobEvent) -> String {
    match event {
        JobEvent::StatusChange { status, .. } => status.name().to_string(),
        JobEvent::Completed { error: None, .. } => "BLOCK_JOB_COMPLETED".into(),
        JobEvent::Completed { error: Some(e), .. } => format!("BLOCK_JOB_COMPLETED({e})"),
        JobEvent::Cancelled { .. } => "BLOCK_JOB_CANCELLED".into(),
        JobEvent::Error { action, .. } => format!("BLOCK_JOB_ERROR({})", action.name()),
        JobEvent::Pending { .. } => "BLOCK_JOB_PENDING".into(),
    }
}

pub struct JobSetup {
    pub speed: u64,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
}

impl Default for JobSetup {
    fn default() -> Self {
        JobSetup {
            speed: 0,
            auto_finalize: true,
            auto_dismiss: true,
        }
    }
}

pub fn start(disk: &Arc<Disk>, options: StreamOptions, setup: JobSetup) -> (Job, Events) {
    let events = Events::default();
    let sink = events.0.clone();
    let job = Job::start(
        JobOptions {
            id: "job0".into(),
            speed: setup.speed,
            auto_finalize: setup.auto_finalize,
            auto_dismiss: setup.auto_dismiss,
        },
        Box::new(StreamJob::new(disk.clone(), options)),
        vec![Arc::new(move |e: &JobEvent| {
            sink.lock().unwrap().push(e.clone())
        })],
    )
    .unwrap();
    (job, events)
}

/// Starts a full stream with `setup` (whose `auto_finalize` must be off) and waits until it
/// announces `BLOCK_JOB_PENDING`: copied and flushed, its header not yet rewritten.
pub fn stream_until_pending(disk: &Arc<Disk>, setup: JobSetup) -> (Job, Events) {
    assert!(
        !setup.auto_finalize,
        "a job that finalizes itself does not stay pending"
    );
    let (job, events) = start(disk, full_stream(), setup);
    wait_until(&job, &events, "BLOCK_JOB_PENDING", || {
        events.contains("BLOCK_JOB_PENDING")
    });
    (job, events)
}

/// Waits (on the job's condition variable, not by sleeping) until `done` holds; panics with
/// the events so far if it does not within a generous bound.
pub fn wait_until(job: &Job, events: &Events, what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..1200 {
        if done() {
            return;
        }
        job.wait_change(Duration::from_millis(50));
    }
    panic!(
        "gave up waiting for {what}; events: {:?}; info: {:?}",
        events.names(),
        job.info()
    );
}

pub fn wait_status(job: &Job, events: &Events, status: JobStatus) {
    wait_until(job, events, status.name(), || job.info().status == status);
}

/// A seeded generator; the seed comes from `STREAM_TEST_SEED` or the clock and is printed, so
/// a failure can be replayed.
pub fn seeded(test: &str) -> (StdRng, u64) {
    let seed = std::env::var("STREAM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: seed {seed} (replay with STREAM_TEST_SEED={seed})");
    (StdRng::seed_from_u64(seed), seed)
}

/// Bytes the top image defines itself (qemu-img map depth 0), as (start, length) runs.
pub fn top_defined_bytes(file: &Path, fmt: &str) -> u64 {
    let text = run_ok(
        "qemu-img",
        &["map", "--output=json", "-f", fmt, "-U", s(file)],
    );
    let mut total = 0;
    for line in text.lines() {
        if line.contains("\"depth\": 0") && line.contains("\"present\": true") {
            let length = line
                .split("\"length\": ")
                .nth(1)
                .and_then(|r| r.split(',').next())
                .and_then(|n| n.trim().parse::<u64>().ok())
                .unwrap();
            total += length;
        }
    }
    total
}

/// Drops the test's handle on the disk, the last one once the job has concluded (a job lets
/// go of its disk before it does), so that QEMU's tools can lock the image.
pub fn close(disk: Arc<Disk>) {
    let disk = Arc::try_unwrap(disk)
        .unwrap_or_else(|_| panic!("the job still holds the disk after it concluded"));
    drop(disk);
}

//! `imgstream stream`: the stream job offline, with a progress display, Ctrl-C to cancel.

use crate::size::{human_size, parse_size};
use anyhow::{bail, Context, Result};
use imgstream_block::{BackingRef, Disk};
use imgstream_jobs::{
    Job, JobEvent, JobOptions, JobStatus, OnError, StreamJob, StreamOptions, FLUSH_INTERVAL,
};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Exit code after Ctrl-C, as shells report SIGINT.
const EXIT_CANCELLED: u8 = 130;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(short = 'f')]
    format: Option<String>,
    /// Keep this backing file (matched against the chain): copy only what lies above it.
    #[arg(long, conflicts_with_all = ["base_node", "bottom"])]
    base: Option<String>,
    /// Keep this node: `top.N` (or `N`) is the N-th image below the top.
    #[arg(long, conflicts_with = "bottom")]
    base_node: Option<String>,
    /// The lowest node to copy (`top.N` or `N`); the one below it is kept.
    #[arg(long)]
    bottom: Option<String>,
    /// Backing name to record instead of the base's file name (needs a base).
    #[arg(long)]
    backing_file: Option<String>,
    /// Limit in bytes per second of copied data (k, M, G suffixes); 0 = none.
    #[arg(long, default_value = "0")]
    speed: String,
    /// report, ignore, stop, enospc or auto.
    #[arg(long, default_value = "report")]
    on_error: String,
    /// Show a progress bar (on a terminal) or a line a second.
    #[arg(short = 'p', long, conflicts_with = "json")]
    progress: bool,
    /// Print progress and the final event as JSON lines.
    #[arg(long)]
    json: bool,
    /// Copied bytes between flushes (for crash tests; not for users).
    #[arg(long, hide = true, default_value_t = FLUSH_INTERVAL)]
    flush_interval: u64,
    image: PathBuf,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_interrupt_handler() {
    let handler = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// `top.N`, `N`, or `top` for 0.
fn parse_node(name: &str) -> Result<usize> {
    let index = name.rsplit('.').next().unwrap_or(name);
    if name == "top" {
        return Ok(0);
    }
    index.parse().with_context(|| {
        format!("Unknown node '{name}' (offline, nodes are top, top.1, top.2, ...)")
    })
}

pub fn run(args: Args) -> Result<u8> {
    let on_error = OnError::parse(&args.on_error).with_context(|| {
        format!(
            "Parameter 'on-error' does not accept value '{}'",
            args.on_error
        )
    })?;
    let speed = parse_size(&args.speed)?;
    let disk = Arc::new(super::open_disk(
        &args.image,
        args.format.as_deref(),
        true,
        false,
        false,
    )?);
    let layers = disk.layers();
    let base_depth = if let Some(base) = &args.base {
        disk.find_backing_layer(base)
            .with_context(|| format!("Can't find '{base}' in the backing chain"))?
    } else if let Some(node) = &args.base_node {
        let depth = parse_node(node)?;
        if depth == 0 || depth >= layers.len() {
            bail!("Node '{node}' is not a backing image of 'top'");
        }
        depth
    } else if let Some(node) = &args.bottom {
        let depth = parse_node(node)?;
        if depth >= layers.len() {
            bail!("Node '{node}' is not in a chain starting from 'top'");
        }
        depth + 1
    } else {
        layers.len()
    };
    if args.backing_file.is_some() && (args.base.is_none() && args.base_node.is_none()) {
        bail!("backing file specified, but streaming the entire chain");
    }
    let new_backing = layers.get(base_depth).map(|base| BackingRef {
        name: args
            .backing_file
            .clone()
            .unwrap_or_else(|| base.path.to_string_lossy().into_owned()),
        format: Some(base.format.name().to_string()),
    });
    let options = StreamOptions {
        base_depth,
        new_backing,
        rewrite_header_always: args.backing_file.is_some(),
        on_error,
        flush_interval: args.flush_interval,
        // The command's end waits for the device: its writeback may as well overlap the copies.
        write_back_as_copied: true,
    };
    let last_event: Arc<Mutex<Option<JobEvent>>> = Arc::new(Mutex::new(None));
    let json = args.json;
    let recorder = {
        let last_event = last_event.clone();
        Arc::new(move |event: &JobEvent| {
            if json {
                if let Some(line) = event_json(event) {
                    println!("{line}");
                }
            }
            if matches!(
                event,
                JobEvent::Completed { .. } | JobEvent::Cancelled { .. }
            ) {
                if let Ok(mut last) = last_event.lock() {
                    *last = Some(event.clone());
                }
            }
        })
    };
    install_interrupt_handler();
    let job = Job::start(
        JobOptions {
            id: "stream".into(),
            speed,
            auto_finalize: true,
            auto_dismiss: true,
        },
        Box::new(StreamJob::new(disk.clone(), options)),
        vec![recorder],
    )?;
    watch(&job, &args, &disk);
    if json {
        // The events carry QEMU's fields only; bytes copied (not just covered) are worth having
        // for scripts and for tests that check a restarted stream skips what was done.
        let info = job.info();
        println!(
            "{}",
            serde_json::json!({"event": "STREAM_SUMMARY", "len": info.len, "offset": info.offset, "copied": info.copied})
        );
    }
    let event = last_event.lock().ok().and_then(|e| e.clone());
    match event {
        Some(JobEvent::Completed { error: None, .. }) => {
            // The job left its header change to this flush, which makes it durable after
            // the copied data.
            disk.flush().context(
                "Could not flush the streamed image; its header still names its backing file",
            )?;
            Ok(0)
        }
        Some(JobEvent::Completed {
            error: Some(error), ..
        }) => {
            eprintln!("imgstream: stream failed: {error}; the image is valid and its backing file unchanged");
            Ok(1)
        }
        Some(JobEvent::Cancelled { .. }) => {
            eprintln!(
                "imgstream: stream cancelled; the image is valid and its backing file unchanged"
            );
            Ok(EXIT_CANCELLED)
        }
        _ => bail!("stream job ended without a result"),
    }
}

/// Shows progress until the job ends, cancelling it on Ctrl-C.
fn watch(job: &Job, args: &Args, disk: &Disk) {
    let bar = (args.progress && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(disk.size());
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} {msg} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut ticks = 0u32;
    let mut cancelling = false;
    while !job.is_finished() {
        let status = job.wait_change(Duration::from_millis(100));
        if INTERRUPTED.load(Ordering::SeqCst) && !cancelling {
            cancelling = job.cancel().is_ok();
        }
        if matches!(status, JobStatus::Null | JobStatus::Concluded) {
            continue;
        }
        let info = job.info();
        if let Some(bar) = &bar {
            bar.set_length(info.len.max(1));
            bar.set_position(info.offset);
            bar.set_message(format!("copied {}", human_size(info.copied)));
        }
        ticks += 1;
        if ticks.is_multiple_of(10) && bar.is_none() {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "event": "PROGRESS", "len": info.len, "offset": info.offset,
                        "copied": info.copied, "speed": info.speed,
                        "remaining-seconds": info.remaining.map(|d| d.as_secs_f64()),
                    })
                );
            } else if args.progress || !std::io::stdout().is_terminal() {
                let percent = info.offset as f64 * 100.0 / info.len.max(1) as f64;
                let rate = info.offset as f64 / info.elapsed.as_secs_f64().max(1e-3);
                let left = info
                    .remaining
                    .map(|d| format!(", {:.0} s left", d.as_secs_f64().ceil()))
                    .unwrap_or_default();
                println!(
                    "stream: {} of {} ({percent:.1}%), copied {}, {}/s{left}",
                    human_size(info.offset),
                    human_size(info.len),
                    human_size(info.copied),
                    human_size(rate as u64)
                );
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

fn event_json(event: &JobEvent) -> Option<String> {
    let value = match event {
        JobEvent::Completed {
            len,
            offset,
            speed,
            error,
            ..
        } => {
            let mut v = serde_json::json!({"event": "BLOCK_JOB_COMPLETED", "len": len, "offset": offset, "speed": speed, "type": "stream"});
            if let Some(error) = error {
                v["error"] = serde_json::json!(error);
            }
            v
        }
        JobEvent::Cancelled {
            len, offset, speed, ..
        } => {
            serde_json::json!({"event": "BLOCK_JOB_CANCELLED", "len": len, "offset": offset, "speed": speed, "type": "stream"})
        }
        JobEvent::Error {
            operation, action, ..
        } => {
            serde_json::json!({"event": "BLOCK_JOB_ERROR", "operation": operation, "action": action.name()})
        }
        JobEvent::StatusChange { status, .. } => {
            serde_json::json!({"event": "JOB_STATUS_CHANGE", "status": status.name()})
        }
        JobEvent::Pending { .. } => return None,
    };
    Some(value.to_string())
}

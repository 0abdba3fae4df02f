//! `imgstream demo`: the whole mission on local files. Builds a chain (a raw base with data
//! under a qcow2 overlay), starts the daemon, streams the overlay over QMP while a built-in
//! NBD client writes and reads through the export, shows progress, then verifies that the
//! image has no backing file, reads exactly what it should, and passes a consistency check.

use super::serve::{serve, NbdAddress, ServeConfig};
use crate::qmp_client::QmpClient;
use crate::size::human_size;
use anyhow::{bail, Context, Result};
use imgstream_block::{ChainOptions, Disk, RepairMode};
use imgstream_format::{create_format, BackingRef, CreateOptions, FileStorage, FormatKind};
use imgstream_nbd::client::Client;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Folder for the demo's files (created; default: ./imgstream-demo).
    #[arg(long, default_value = "imgstream-demo")]
    dir: PathBuf,
    /// Size of the disk in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Stream speed limit in MiB/s, so the guest's I/O visibly overlaps the stream.
    #[arg(long, default_value_t = 64)]
    speed_mib: u64,
}

/// The byte the base holds at `offset`: every other MiB has data, a pattern per MiB.
fn base_byte(offset: u64) -> u8 {
    let mib = offset / MIB;
    if mib.is_multiple_of(2) {
        (mib % 251) as u8 + 1
    } else {
        0
    }
}

/// A deterministic generator for the guest's writes (no external RNG needed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

pub fn run(args: Args) -> Result<u8> {
    let size = args.size_mib * MIB;
    if size == 0 {
        bail!("--size-mib must be at least 1");
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("Could not create '{}'", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir)?;
    println!("imgstream demo in {}", dir.display());
    let base = dir.join("base.raw");
    let overlay = dir.join("disk.qcow2");
    let mut model = build_chain(&base, &overlay, size)?;
    println!(
        "  built base.raw ({}, data in every other MiB) <- disk.qcow2 (qcow2 overlay)",
        human_size(size)
    );

    let qmp_socket = dir.join("qmp.sock");
    let nbd_socket = dir.join("nbd.sock");
    let config = ServeConfig {
        qmp: Some(qmp_socket.clone()),
        nbd: Some(NbdAddress::Unix(nbd_socket.clone())),
        read_only: false,
        pid_file: None,
        nodes: vec![("disk".to_string(), overlay.clone())],
    };
    let (ready_tx, ready_rx) = mpsc::channel();
    let daemon = std::thread::spawn(move || {
        serve(config, move || {
            let _ = ready_tx.send(());
        })
    });
    if ready_rx.recv().is_err() {
        return match daemon.join() {
            Ok(Err(e)) => Err(e.context("The daemon failed to start")),
            _ => bail!("The daemon failed to start"),
        };
    }
    println!("  daemon serving NBD on nbd.sock and QMP on qmp.sock");

    let mut qmp = QmpClient::connect(&qmp_socket)?;
    let mut guest = Client::connect_unix(&nbd_socket, "disk")?;
    qmp.execute(
        "block-stream",
        Some(json!({"device": "disk", "job-id": "stream0", "speed": args.speed_mib * MIB})),
    )?;
    println!(
        "  block-stream started (speed limit {}/s); the guest writes and reads meanwhile",
        human_size(args.speed_mib * MIB)
    );

    let done = Arc::new(AtomicBool::new(false));
    let guest_ops = Arc::new(AtomicU64::new(0));
    let guest_thread = {
        let done = done.clone();
        let guest_ops = guest_ops.clone();
        std::thread::spawn(move || -> Result<(Client, Vec<u8>)> {
            let mut rng = Lcg(0x5eed);
            while !done.load(Ordering::SeqCst) {
                let length = (rng.next() % 16 + 1) * 4096;
                let offset = (rng.next() % ((size - length) / 512)) * 512;
                if rng.next().is_multiple_of(3) {
                    let byte = (rng.next() % 255 + 1) as u8;
                    let data = vec![byte; length as usize];
                    guest.write(offset, &data)?;
                    model[offset as usize..(offset + length) as usize].copy_from_slice(&data);
                } else {
                    let mut buf = vec![0u8; length as usize];
                    guest.read(offset, &mut buf)?;
                    if buf[..] != model[offset as usize..(offset + length) as usize] {
                        bail!("The guest read stale data at {offset} during the stream");
                    }
                }
                guest_ops.fetch_add(1, Ordering::Relaxed);
            }
            guest.flush()?;
            Ok((guest, model))
        })
    };

    let outcome = follow_stream(&mut qmp, &guest_ops);
    done.store(true, Ordering::SeqCst);
    let guest_result = guest_thread
        .join()
        .map_err(|_| anyhow::anyhow!("guest thread panicked"))?;
    let outcome = outcome?;
    let (guest, model) = guest_result?;
    let _ = guest.disconnect();
    qmp.execute("quit", None)?;
    drop(qmp);
    match daemon.join() {
        Ok(result) => result?,
        Err(_) => bail!("The daemon panicked"),
    }
    println!(
        "  stream completed: {} processed, {} guest requests served during it",
        human_size(outcome),
        guest_ops.load(Ordering::Relaxed)
    );
    verify(&overlay, &model)
}

/// Shows the job's progress until it completes; returns the bytes it processed.
fn follow_stream(qmp: &mut QmpClient, guest_ops: &AtomicU64) -> Result<u64> {
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "  [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        while let Some(event) = qmp.next_event(Duration::from_millis(100))? {
            match event["event"].as_str() {
                Some("BLOCK_JOB_COMPLETED") => {
                    bar.finish_and_clear();
                    if let Some(error) = event["data"].get("error") {
                        bail!("The stream failed: {error}");
                    }
                    println!(
                        "  BLOCK_JOB_COMPLETED after {:.1} s",
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(event["data"]["offset"].as_u64().unwrap_or(0));
                }
                Some("BLOCK_JOB_CANCELLED") => bail!("The stream was cancelled"),
                _ => {}
            }
        }
        let jobs = qmp.execute("query-block-jobs", None)?;
        if let Some(job) = jobs.as_array().and_then(|j| j.first()) {
            bar.set_length(job["len"].as_u64().unwrap_or(0).max(1));
            bar.set_position(job["offset"].as_u64().unwrap_or(0));
            bar.set_message(format!(
                "guest requests {}",
                guest_ops.load(Ordering::Relaxed)
            ));
        }
    }
}

/// Creates the chain and returns the guest-visible content (the model).
fn build_chain(base: &Path, overlay: &Path, size: u64) -> Result<Vec<u8>> {
    let _ = std::fs::remove_file(overlay);
    let base_storage = FileStorage::create(base)?;
    create_format(FormatKind::Raw, &base_storage, &CreateOptions::new(size))?;
    let mut model = vec![0u8; size as usize];
    for mib in (0..size.div_ceil(MIB)).step_by(2) {
        let start = mib * MIB;
        let end = (start + MIB).min(size);
        let chunk = vec![base_byte(start); (end - start) as usize];
        imgstream_format::Storage::write_at(&base_storage, start, &chunk)?;
        model[start as usize..end as usize].copy_from_slice(&chunk);
    }
    imgstream_format::Storage::flush(&base_storage)?;
    drop(base_storage);
    let mut options = CreateOptions::new(size);
    options.backing = Some(BackingRef {
        name: "base.raw".into(),
        format: Some("raw".into()),
    });
    create_format(FormatKind::Qcow2, &FileStorage::create(overlay)?, &options)?;
    // The guest already wrote a little into its overlay before the stream.
    let disk = Disk::open(overlay, &ChainOptions::writable())?;
    for (offset, byte) in [
        (3 * MIB + 4096, 0xa1u8),
        (size / 2, 0xb2),
        (size - 8192, 0xc3),
    ] {
        let data = vec![byte; 8192];
        disk.write(offset, &data, false)?;
        model[offset as usize..offset as usize + 8192].copy_from_slice(&data);
    }
    disk.flush()?;
    Ok(model)
}

/// Reopens the image alone and checks header, content and consistency.
fn verify(overlay: &Path, model: &[u8]) -> Result<u8> {
    let disk = Disk::open(overlay, &ChainOptions::read_only())?;
    let layers = disk.layers();
    let top = &layers[0];
    let backing = top.image.backing();
    println!(
        "  disk.qcow2 backing file: {}",
        backing
            .as_ref()
            .map_or("none".to_string(), |b| b.name.clone())
    );
    let mut buf = vec![0u8; MIB as usize];
    let mut offset = 0;
    let mut mismatch = None;
    while offset < disk.size() {
        let n = (disk.size() - offset).min(MIB) as usize;
        disk.read(offset, &mut buf[..n])?;
        if buf[..n] != model[offset as usize..offset as usize + n] {
            mismatch = Some(offset);
            break;
        }
        offset += n as u64;
    }
    let report = top.image.check(RepairMode::None)?;
    println!(
        "  content: {}",
        match mismatch {
            None => "identical to the base plus every guest write".to_string(),
            Some(at) => format!("DIFFERS in the MiB at {at}"),
        }
    );
    println!(
        "  check: {} corruptions, {} leaked clusters",
        report.corruptions, report.leaks
    );
    if backing.is_none() && mismatch.is_none() && report.corruptions == 0 && report.leaks == 0 {
        println!("demo OK: the image is standalone, complete and consistent");
        Ok(0)
    } else {
        println!("demo FAILED");
        Ok(1)
    }
}

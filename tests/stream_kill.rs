//! `imgstream stream` killed with SIGKILL at random moments (seeded): whenever the kill lands,
//! the image has no corruption (leaks allowed, and repairable), reads exactly as before the
//! stream, and still names its backing file unless the stream had completed; a second stream
//! then completes, copying exactly what the first one had not made durable.

use anyhow::{ensure, Context, Result};
use imgstream_tests::fixtures::{Chain, Format};
use imgstream_tests::{imgstream, qemu, KIB, MIB};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const KILL_POINTS: usize = 24;
const CS: u64 = 64 * KIB;

/// Bytes the image defines itself (qemu-img map depth 0, data or zero clusters).
fn own_bytes(file: &Path) -> Result<u64> {
    let map = qemu::map(file, Some("qcow2"))?;
    Ok(map
        .as_array()
        .context("map")?
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .map(|e| e["length"].as_u64().unwrap_or(0))
        .sum())
}

fn copied_by(stdout: &str) -> Result<u64> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "STREAM_SUMMARY")
        .and_then(|v| v["copied"].as_u64())
        .with_context(|| format!("no STREAM_SUMMARY in:\n{stdout}"))
}

fn stream_to_completion(top: &Path) -> Result<u64> {
    let out = imgstream::run_ok(&[
        "stream".to_string(),
        "--json".into(),
        top.to_string_lossy().into_owned(),
    ])?;
    copied_by(&out.stdout)
}

fn one_kill_point(
    chain: &Chain,
    before_raw: &Path,
    needed: u64,
    i: usize,
    rng: &mut impl Rng,
) -> Result<String> {
    let pristine = &chain.top()?.path;
    let top = chain.dir().join(format!("top-{i}.qcow2"));
    std::fs::copy(pristine, &top)?;
    let own_before = own_bytes(&top)?;
    let (speed, bytes_per_second) =
        [("4M", 4 * MIB), ("8M", 8 * MIB), ("16M", 16 * MIB)][rng.gen_range(0..3)];
    let flush = [256 * KIB, MIB, 4 * MIB][rng.gen_range(0..3)];
    // Mostly while copying, sometimes around the end (header rewrite) or after it.
    let window_ms = needed * 1000 / bytes_per_second;
    let delay = Duration::from_millis(rng.gen_range(0..window_ms + window_ms / 8));
    let mut child = Command::new(imgstream::binary()?)
        .args([
            "stream",
            "--speed",
            speed,
            "--flush-interval",
            &flush.to_string(),
        ])
        .arg(&top)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(delay);
    let finished_first = child.try_wait()?.is_some();
    let _ = child.kill();
    let status = child.wait()?;
    let completed = finished_first && status.success();
    let what = format!("kill point {i}: speed {speed}, flush every {flush}, kill after {delay:?}");

    let check = qemu::check(&top, Some("qcow2"), None)?;
    ensure!(
        check.code == 0 || check.code == 3,
        "{what}: qemu-img check found corruption:\n{}",
        check.output.describe()
    );
    if check.code == 3 {
        let repair = imgstream::run(&[
            "check".to_string(),
            "-r".into(),
            "leaks".into(),
            top.to_string_lossy().into_owned(),
        ])?;
        ensure!(
            repair.code == Some(0),
            "{what}: repair:\n{}",
            repair.describe()
        );
        qemu::check_clean(&top, "qcow2").with_context(|| what.clone())?;
    }
    if let Some(diff) = qemu::compare(&top, "qcow2", before_raw, "raw")? {
        anyhow::bail!("{what}: content changed after the kill: {diff}");
    }
    let info = qemu::info(&top, None, false)?;
    let backing = info["backing-filename"].as_str();
    ensure!(
        backing == Some("layer1.qcow2")
            || (backing.is_none() && (completed || own_bytes(&top)? == needed + own_before)),
        "{what}: header names {backing:?} before the stream completed"
    );
    let durable = own_bytes(&top)? - own_before;
    let second = if backing.is_some() {
        stream_to_completion(&top)?
    } else {
        0
    };
    ensure!(
        durable + second == needed,
        "{what}: {durable} bytes were durable after the kill and the second run copied {second}; \
         a full copy is {needed}"
    );
    if durable > 0 {
        ensure!(second < needed, "{what}: the second run skipped nothing");
    }
    let info = qemu::info(&top, None, false)?;
    ensure!(info["backing-filename"].is_null(), "{what}: {info}");
    qemu::check_clean(&top, "qcow2").with_context(|| what.clone())?;
    if let Some(diff) = qemu::compare(&top, "qcow2", before_raw, "raw")? {
        anyhow::bail!("{what}: content changed after the second stream: {diff}");
    }
    std::fs::remove_file(&top)?;
    Ok(format!("{what}: durable {durable}, then copied {second}"))
}

#[test]
fn sigkill_anywhere_leaves_a_valid_image_and_a_restart_completes() -> Result<()> {
    let seed: u64 = std::env::var("STREAM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (replay with STREAM_TEST_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir()?;
    let chain = Chain::new(dir.path())
        .base(Format::qcow2_v3(CS), "16M")?
        .write(0, 6 * MIB, 0xaa)?
        .write_zeroes(6 * MIB, MIB)?
        .overlay(Format::qcow2_v3(CS))?
        .write(8 * MIB, 4 * MIB, 0xcc)?
        .write(13 * MIB + 100, 5000, 0xcd)?
        .overlay(Format::qcow2_v3(CS))?
        .write(2 * MIB, 64 * KIB, 0xdd)?;
    let before_raw = dir.path().join("before.raw");
    qemu::convert_to_raw(&chain.top()?.path, Some("qcow2"), &before_raw)?;
    let lower: Vec<Vec<u8>> = chain.layers()[..2]
        .iter()
        .map(|l| std::fs::read(&l.path))
        .collect::<std::io::Result<_>>()?;
    // What a stream that is never interrupted copies.
    let reference = dir.path().join("reference.qcow2");
    std::fs::copy(&chain.top()?.path, &reference)?;
    let needed = stream_to_completion(&reference)?;
    ensure!(
        needed > 8 * MIB,
        "the reference stream copied only {needed}"
    );
    for i in 0..KILL_POINTS {
        let line = one_kill_point(&chain, &before_raw, needed, i, &mut rng)
            .with_context(|| format!("seed {seed}"))?;
        eprintln!("{line}");
    }
    for (layer, bytes) in chain.layers()[..2].iter().zip(&lower) {
        ensure!(
            &std::fs::read(&layer.path)? == bytes,
            "{} changed",
            layer.path.display()
        );
    }
    Ok(())
}

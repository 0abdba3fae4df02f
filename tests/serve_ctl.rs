//! `imgstream ctl` against `imgstream serve` and against qemu-storage-daemon on the same chain:
//! the HMP-style job list, pause/resume/set-speed/cancel as `query-block-jobs` sees them, and
//! raw QMP. Running the same commands against QSD proves wire compatibility from the client
//! side.

use anyhow::{ensure, Context, Result};
use imgstream_tests::daemon::Daemon;
use imgstream_tests::fixtures::{Chain, Format};
use imgstream_tests::qemu;
use imgstream_tests::{KIB, MIB};
use serde_json::Value;
use std::path::Path;

/// qcow2 base <- qcow2 top, 16 MiB of data in the base so a throttled stream lasts.
fn chain(dir: &Path) -> Result<Chain> {
    Chain::new(dir)
        .base(Format::qcow2_v3(64 * KIB), "32M")?
        .write(0, 16 * MIB, 0x42)?
        .overlay(Format::qcow2_v3(64 * KIB))?
        .write(MIB, 64 * KIB, 0x43)
}

/// The job's `query-block-jobs` entry, required to exist.
fn job(daemon: &Daemon) -> Result<Value> {
    daemon.job()?.context("no job")
}

/// The ctl session shared by both daemons; `device` is the node name of the top.
fn ctl_drives_a_stream_job(daemon: &Daemon, device: &str) -> Result<()> {
    let jobs = daemon.ctl_ok(&["jobs"])?;
    ensure!(jobs.stdout == "No active jobs\n", "{}", jobs.describe());

    let version = daemon.ctl_ok(&["qmp", r#"{"execute":"query-version"}"#])?;
    let reply: Value = serde_json::from_str(&version.stdout)?;
    ensure!(reply["return"]["qemu"]["major"].is_u64(), "{reply}");

    // 1 byte/s: the job copies its first chunk and then waits, so what we query is stable.
    daemon.ctl_ok(&["stream", device, "--job-id", "job0", "--speed", "1"])?;
    let jobs = daemon.ctl_ok(&["jobs"])?;
    let line = jobs.stdout.trim_end();
    ensure!(
        line.starts_with("Streaming device job0: Completed ")
            && line.ends_with(&format!(" of {} bytes, speed limit 1 bytes/s", 32 * MIB)),
        "{}",
        jobs.describe()
    );
    ensure!(job(daemon)?["status"] == "running");

    daemon.ctl_ok(&["pause", "job0"])?;
    let paused = job(daemon)?;
    ensure!(
        paused["paused"] == true && paused["status"] == "paused",
        "{paused}"
    );
    daemon.ctl_ok(&["resume"])?;
    let resumed = job(daemon)?;
    ensure!(resumed["paused"] == false, "{resumed}");

    daemon.ctl_ok(&["set-speed", "job0", "2M"])?;
    ensure!(job(daemon)?["speed"] == 2 * MIB);
    daemon.ctl_ok(&["set-speed", "1"])?;
    ensure!(job(daemon)?["speed"] == 1);

    daemon.ctl_ok(&["cancel"])?;
    // Cancel is asynchronous: watch reports the final event (exit 1: the job did not complete).
    let watched = daemon.ctl(&["watch", "job0"])?;
    ensure!(
        watched.stdout.contains("BLOCK_JOB_CANCELLED")
            || watched.stdout.contains("is no longer active"),
        "{}",
        watched.describe()
    );
    ensure!(daemon.job()?.is_none(), "the job is still listed");
    let jobs = daemon.ctl_ok(&["jobs"])?;
    ensure!(jobs.stdout == "No active jobs\n", "{}", jobs.describe());

    // Errors come back as QMP errors with a non-zero exit.
    let err = daemon.ctl(&[
        "qmp",
        r#"{"execute":"block-job-pause","arguments":{"device":"nosuch"}}"#,
    ])?;
    ensure!(
        err.code == Some(1) && err.stdout.contains("DeviceNotActive"),
        "{}",
        err.describe()
    );
    Ok(())
}

#[test]
fn ctl_drives_imgstream_serve() -> Result<()> {
    let t = tempfile::tempdir()?;
    let chain = chain(t.path())?;
    let top = chain.top()?.path.clone();
    let daemon = Daemon::serve(t.path(), &[("top", &top)], &[])?;
    ctl_drives_a_stream_job(&daemon, "top")?;
    daemon.stop()?;
    qemu::check_clean(&top, "qcow2")?;
    let model = t.path().join("model.raw");
    chain.expected().write_raw(&model)?;
    ensure!(qemu::compare(&model, "raw", &top, "qcow2")?.is_none());
    Ok(())
}

#[test]
fn ctl_drives_qemu_storage_daemon_the_same_way() -> Result<()> {
    let t = tempfile::tempdir()?;
    let chain = chain(t.path())?;
    let layers = chain.layers();
    let daemon = Daemon::qsd(
        t.path(),
        &[
            ("top", &layers[1].path, "qcow2"),
            ("base", &layers[0].path, "qcow2"),
        ],
        "top",
    )?;
    ctl_drives_a_stream_job(&daemon, "top")?;
    daemon.stop()?;
    qemu::check_clean(&layers[1].path, "qcow2")
}

//! The mission's core: `block-stream` inside `imgstream serve` while a guest writes and reads
//! through the NBD export. Every read is checked against a model (content before the stream
//! plus the guest's writes so far); at the end the image must be standalone (or keep exactly
//! the base it was told to keep), pass `qemu-img check`, and equal the model. A daemon killed
//! mid-stream must leave an image that is consistent and holds everything the guest flushed,
//! and a new stream after a restart must finish the job.

use anyhow::{ensure, Context, Result};
use imgstream_nbd::client::Client;
use imgstream_tests::daemon::Daemon;
use imgstream_tests::fixtures::{Chain, Format, Model};
use imgstream_tests::qemu;
use imgstream_tests::{KIB, MIB};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

const DISK_SIZE: u64 = 64 * MIB;
/// The stream's speed while the guest works: slow enough that the guest's ~400 operations
/// land while most of the disk is still to be copied (64 MiB for a full stream, about 8 MiB
/// of the mid layer's data with the base kept), fast enough that several chunks are copied
/// between the guest's requests.
const SLOW_SPEED: &str = "4M";
const SLOW_SPEED_WITH_BASE: &str = "512k";
/// Guest operations of one scenario (each one write and one checked read).
const GUEST_OPS: usize = 400;
const MAX_WRITE: usize = 300 * KIB as usize;

/// raw base <- qcow2 mid <- qcow2 top, data scattered over the whole disk in every layer,
/// zero clusters in mid. Layer files: layer0.raw, layer1.qcow2, layer2.qcow2.
fn three_deep_chain(dir: &Path, seed: u64) -> Result<Chain> {
    fn scatter(mut chain: Chain, count: usize, max: u64, rng: &mut StdRng) -> Result<Chain> {
        for _ in 0..count {
            let len = rng.gen_range(1..=max / 512) * 512;
            let offset = rng.gen_range(0..(DISK_SIZE - len) / 512) * 512;
            chain = chain.write(offset, len, rng.gen_range(1..=255))?;
        }
        Ok(chain)
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let chain = Chain::new(dir).base(Format::Raw, &DISK_SIZE.to_string())?;
    let chain = scatter(chain, 24, 2 * MIB, &mut rng)?.overlay(Format::qcow2_v3(64 * KIB))?;
    let chain = scatter(chain, 16, MIB, &mut rng)?
        .write_zeroes(8 * MIB, 256 * KIB)?
        .write_zeroes(40 * MIB, 64 * KIB)?
        .overlay(Format::qcow2_v3(64 * KIB))?;
    scatter(chain, 8, 512 * KIB, &mut rng)
}

/// A guest on the NBD export that keeps its own model of the disk.
struct Guest {
    client: Client,
    model: Model,
    rng: StdRng,
    writes: usize,
}

impl Guest {
    fn connect(daemon: &Daemon, model: Model, seed: u64) -> Result<Guest> {
        let client = Client::connect_unix(&daemon.nbd, "disk")?;
        ensure!(
            client.size() == model.len(),
            "export size {}",
            client.size()
        );
        Ok(Guest {
            client,
            model,
            rng: StdRng::seed_from_u64(seed),
            writes: 0,
        })
    }

    fn random_range(&mut self) -> (u64, usize) {
        let len = self.rng.gen_range(512..=MAX_WRITE);
        let offset = self.rng.gen_range(0..=self.model.len() - len as u64);
        (offset, len)
    }

    /// One random write of random bytes, then one random read checked against the model.
    fn step(&mut self) -> Result<()> {
        let (offset, len) = self.random_range();
        let mut data = vec![0u8; len];
        self.rng.fill_bytes(&mut data);
        self.client
            .write(offset, &data)
            .with_context(|| format!("write {offset}+{len}"))?;
        self.model.fill_from(offset, &data)?;
        self.writes += 1;
        let (offset, len) = self.random_range();
        self.check(offset, len)
    }

    fn check(&mut self, offset: u64, len: usize) -> Result<()> {
        let mut buf = vec![0u8; len];
        self.client
            .read(offset, &mut buf)
            .with_context(|| format!("read {offset}+{len}"))?;
        let expected = &self.model.bytes()[offset as usize..offset as usize + len];
        if let Some(diff) = imgstream_tests::fixtures::first_difference(expected, &buf) {
            anyhow::bail!(
                "read {offset}+{len} after {} writes: {diff} (relative to {offset})",
                self.writes
            );
        }
        Ok(())
    }

    fn run(&mut self, ops: usize) -> Result<()> {
        for _ in 0..ops {
            self.step()?;
        }
        Ok(())
    }

    /// Reads the whole disk back through the export.
    fn check_all(&mut self) -> Result<()> {
        let mut offset = 0;
        while offset < self.model.len() {
            let len = (4 * MIB).min(self.model.len() - offset) as usize;
            self.check(offset, len)?;
            offset += len as u64;
        }
        Ok(())
    }
}

/// Writes `model` as a raw file beside the images and compares the served top with it.
fn image_equals_model(top: &Path, model: &Model, name: &str) -> Result<()> {
    let raw = top.with_file_name(name);
    model.write_raw(&raw)?;
    let diff = qemu::compare(&raw, "raw", top, "qcow2")?;
    ensure!(diff.is_none(), "{} vs model: {diff:?}", top.display());
    Ok(())
}

fn backing_filename(top: &Path) -> Result<Option<String>> {
    let info = qemu::info(top, Some("qcow2"), false)?;
    Ok(info["backing-filename"].as_str().map(str::to_string))
}

/// The backing file the top's header names on disk, read while the daemon has it open.
fn backing_filename_on_disk(top: &Path) -> Result<Option<String>> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json", "-f", "qcow2"])
        .arg(top)
        .output()?;
    ensure!(
        out.status.success(),
        "qemu-img info -U failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(info["backing-filename"].as_str().map(str::to_string))
}

/// A QMP monitor of the daemon's, connected before the command whose events it must see: an
/// event is only sent to the monitors connected when it happens, and a stream that is not
/// throttled can end before a monitor opened after it (`ctl watch`) has subscribed.
struct EventMonitor {
    reader: BufReader<UnixStream>,
}

impl EventMonitor {
    fn connect(daemon: &Daemon) -> Result<EventMonitor> {
        let stream = UnixStream::connect(&daemon.qmp)?;
        // A guard against a hang, not a timing: a stream here ends in seconds.
        stream.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
        let mut writer = stream.try_clone()?;
        let mut monitor = EventMonitor {
            reader: BufReader::new(stream),
        };
        monitor.next()?; // the greeting
        writer.write_all(b"{\"execute\": \"qmp_capabilities\"}\n")?;
        let reply = monitor.next()?;
        ensure!(reply.get("return").is_some(), "qmp_capabilities: {reply}");
        Ok(monitor)
    }

    fn next(&mut self) -> Result<Value> {
        let mut line = String::new();
        ensure!(self.reader.read_line(&mut line)? > 0, "the monitor closed");
        Ok(serde_json::from_str(&line)?)
    }

    /// Waits for the job's final event, which must be a completion without error.
    fn wait_for_completion(&mut self) -> Result<Value> {
        loop {
            let event = self.next()?;
            match event["event"].as_str() {
                Some("BLOCK_JOB_COMPLETED") => {
                    ensure!(
                        event["data"].get("error").is_none(),
                        "the stream failed: {event}"
                    );
                    return Ok(event);
                }
                Some("BLOCK_JOB_CANCELLED") => anyhow::bail!("the stream was cancelled: {event}"),
                _ => {}
            }
        }
    }
}

/// A throttled stream with the guest working through it, then unthrottled to the end.
/// Returns the guest's final model.
fn stream_under_guest_io(
    daemon: &Daemon,
    model: Model,
    speed: &str,
    stream_args: &[&str],
) -> Result<Model> {
    let mut guest = Guest::connect(daemon, model, 0x5eed_0001)?;
    let mut args = vec!["stream", "disk", "--speed", speed];
    args.extend_from_slice(stream_args);
    daemon.ctl_ok(&args)?;
    guest.run(GUEST_OPS)?;
    let job = daemon
        .job()?
        .context("the stream ended before the guest did: lower its speed")?;
    ensure!(job["status"] == "running", "{job}");
    let mut monitor = EventMonitor::connect(daemon)?;
    daemon.ctl_ok(&["set-speed", "disk", "1G"])?;
    ensure!(daemon.job()?.map(|j| j["speed"] == 1 << 30).unwrap_or(true));
    let event = monitor.wait_for_completion()?;
    ensure!(event["data"]["offset"] == event["data"]["len"], "{event}");
    guest.check_all()?;
    guest.client.flush()?;
    guest.client.disconnect()?;
    Ok(guest.model)
}

fn served_chain(dir: &Path) -> Result<(Chain, PathBuf)> {
    let chain = three_deep_chain(dir, 7)?;
    let top = chain.top()?.path.clone();
    Ok((chain, top))
}

#[test]
fn full_stream_under_guest_writes_leaves_a_standalone_image_equal_to_the_model() -> Result<()> {
    let t = tempfile::tempdir()?;
    let (chain, top) = served_chain(t.path())?;
    let daemon = Daemon::serve(t.path(), &[("disk", &top)], &[])?;
    let model = stream_under_guest_io(&daemon, chain.expected().clone(), SLOW_SPEED, &[])?;
    // The header changes in a flush after the event; the guest's own flush waits for it.
    ensure!(
        backing_filename_on_disk(&top)?.is_none(),
        "a guest flush after BLOCK_JOB_COMPLETED left the old header on disk"
    );
    daemon.stop()?;
    ensure!(backing_filename(&top)?.is_none(), "a backing file is left");
    qemu::check_clean(&top, "qcow2")?;
    image_equals_model(&top, &model, "model.raw")
}

#[test]
fn stream_with_base_node_keeps_the_base_and_names_it_in_the_header() -> Result<()> {
    let t = tempfile::tempdir()?;
    let (chain, top) = served_chain(t.path())?;
    let base = chain.layers()[0].path.clone();
    let base_before = std::fs::read(&base)?;
    let daemon = Daemon::serve(t.path(), &[("disk", &top)], &[])?;
    let model = stream_under_guest_io(
        &daemon,
        chain.expected().clone(),
        SLOW_SPEED_WITH_BASE,
        &["--base-node", "disk.2"],
    )?;
    let on_disk = backing_filename_on_disk(&top)?.context("the guest's flush dropped the base")?;
    ensure!(
        on_disk.ends_with("layer0.raw"),
        "backing file on disk {on_disk}"
    );
    daemon.stop()?;
    let backing = backing_filename(&top)?.context("the base was dropped")?;
    ensure!(backing.ends_with("layer0.raw"), "backing file {backing}");
    let info = qemu::info(&top, Some("qcow2"), false)?;
    ensure!(info["backing-filename-format"] == "raw", "{info}");
    ensure!(
        std::fs::read(&base)? == base_before,
        "the kept base was modified"
    );
    qemu::check_clean(&top, "qcow2")?;
    image_equals_model(&top, &model, "model.raw")
}

#[test]
fn sigkill_mid_stream_keeps_flushed_writes_and_a_restarted_stream_completes() -> Result<()> {
    let t = tempfile::tempdir()?;
    let (chain, top) = served_chain(t.path())?;
    let daemon = Daemon::serve(t.path(), &[("disk", &top)], &[])?;
    let mut guest = Guest::connect(&daemon, chain.expected().clone(), 0x5eed_0002)?;
    daemon.ctl_ok(&["stream", "disk", "--speed", SLOW_SPEED])?;
    daemon.wait_for_progress()?;
    guest.run(GUEST_OPS / 4)?;
    guest.client.flush()?;
    let job = daemon.wait_for_progress()?;
    ensure!(job["offset"].as_u64() < job["len"].as_u64(), "{job}");
    daemon.crash()?;
    let model = guest.model.clone();
    drop(guest);

    let check = qemu::check(&top, Some("qcow2"), None)?;
    ensure!(
        check.code == 0 || check.code == 3,
        "corruption after SIGKILL:\n{}",
        check.output.describe()
    );
    ensure!(
        backing_filename(&top)?.is_some(),
        "the backing file went away without a completed stream"
    );
    image_equals_model(&top, &model, "model-after-kill.raw")?;

    let daemon = Daemon::serve(t.path(), &[("disk", &top)], &[])?;
    let mut monitor = EventMonitor::connect(&daemon)?;
    daemon.ctl_ok(&["stream", "disk"])?;
    monitor.wait_for_completion()?;
    daemon.stop()?;
    ensure!(backing_filename(&top)?.is_none(), "a backing file is left");
    let check = qemu::check(&top, Some("qcow2"), None)?;
    ensure!(
        check.code == 0 || check.code == 3,
        "{}",
        check.output.describe()
    );
    image_equals_model(&top, &model, "model-after-restart.raw")
}

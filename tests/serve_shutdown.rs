//! SIGTERM and SIGINT make `imgstream serve` flush every image and exit 0, even when no client
//! ever flushed: libnbd's `nbdsh` writes over NBD without a flush and stays connected (so that
//! nothing done at a client's disconnect can stand in for the flush), then the daemon gets the
//! signal.
//!
//! What proves the flush rather than the page cache: a written file reads back right whether or
//! not anyone synced it, so reading it is not enough.
//! - Every case checks `cachestat(2)`: the image file has dirty pages after the write (the
//!   control: nothing synced them yet) and none once the daemon has exited, which takes an
//!   `fdatasync`/`fsync` of the file after the write. The kernel writes dirty pages back on its
//!   own only after 30 s (`dirty_expire_centisecs`) or past the background threshold, so a
//!   daemon that exits without syncing fails this check unless the test took that long.
//! - The qcow2 cases also check the metadata a flush writes: imgstream keeps new L2 entries and
//!   refcounts in memory until a flush, so before the signal `qemu-io -U` must NOT see the
//!   pattern in the file (the control), and after the exit it must, with `qemu-img check` clean
//!   and the image equal to the model.
//!
//! What they cannot detect: that the sync reached the device (only a power cut shows that; the
//! format crates' power-loss tests model it). And for qcow2, closing an image writes its tables
//! back and syncs as a flush does, so a daemon that skipped the explicit flush on the signal
//! but still closed its images passes the qcow2 cases; the raw cases catch that (a raw image
//! has nothing to write back on close, only a sync to make). The qcow2 dirty bit cannot tell
//! either: imgstream never sets it (it keeps refcounts exact, lazy refcounts or not), so the
//! check that it is clear only guards against a future change that sets it and leaves it.

use anyhow::{bail, ensure, Context, Result};
use imgstream_tests::daemon::Daemon;
use imgstream_tests::fixtures::{Chain, Format, Model};
use imgstream_tests::ondisk;
use imgstream_tests::pagecache::unsynced_pages;
use imgstream_tests::qemu;
use imgstream_tests::tools;
use imgstream_tests::{KIB, MIB};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

/// The client's write: unaligned, over two 64 KiB clusters that the qcow2 top does not have
/// yet, so that it allocates both and copies the rest of them up from the base.
const WRITE_OFFSET: u64 = MIB + 4 * KIB;
const WRITE_LEN: u64 = 64 * KIB;
const PATTERN: u8 = 0x5a;

/// qcow2 v3's `incompatible_features` bit 0: the image was not closed cleanly.
const QCOW2_DIRTY_BIT: u64 = 1;

/// An `nbdsh` connected to the export that has written the pattern without a flush and holds
/// its connection open until [`UnflushedWriter::finish`].
struct UnflushedWriter {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl UnflushedWriter {
    /// Returns once the server has answered the write to `export`.
    fn write(daemon: &Daemon, export: &str) -> Result<UnflushedWriter> {
        tools::require("nbdsh", "libnbd-bin")?;
        let script = format!(
            "import sys\n\
             h.connect_uri({uri:?})\n\
             h.pwrite(b'\\x{PATTERN:02x}' * {WRITE_LEN}, {WRITE_OFFSET})\n\
             print('written', flush=True)\n\
             sys.stdin.read()\n",
            uri = daemon.uri(export)
        );
        // nbdsh is `python3 -m nbd`; the libnbd module is installed for the system's
        // interpreter, which need not be the first python3 on PATH.
        let mut child = Command::new("/usr/bin/python3")
            .args(["-m", "nbd", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start nbdsh")?;
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().context("nbdsh stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        if line.trim() != "written" {
            let mut stderr = String::new();
            if let Some(mut err) = child.stderr.take() {
                err.read_to_string(&mut stderr)?;
            }
            let _ = child.kill();
            let _ = child.wait();
            bail!("nbdsh did not write: stdout {line:?}, stderr:\n{stderr}");
        }
        Ok(UnflushedWriter { child, stdin })
    }

    /// Lets nbdsh end (its connection is gone with the daemon by now).
    fn finish(mut self) -> Result<()> {
        drop(self.stdin.take());
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for UnflushedWriter {
    fn drop(&mut self) {
        if self.stdin.take().is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether `qemu-io -U -r` reads the pattern where the client wrote it, in the file as it is on
/// disk, while the daemon holds the image.
fn pattern_on_disk_while_served(image: &Path, format: &str) -> Result<bool> {
    let qemu_io = tools::require("qemu-io", qemu::QEMU_PACKAGE)?;
    let read = format!("read -P {PATTERN:#x} {WRITE_OFFSET} {WRITE_LEN}");
    let out = tools::run(
        &qemu_io,
        &[
            "-U",
            "-r",
            "-f",
            format,
            "-c",
            &read,
            &image.display().to_string(),
        ],
    )?;
    // qemu-io exits 1 when the pattern does not match, and says so.
    let mismatch = out.stdout.contains("Pattern verification failed");
    ensure!(
        out.success() || (out.code == Some(1) && mismatch),
        "{} failed:\n{}",
        out.command,
        out.describe()
    );
    Ok(!mismatch)
}

/// The image's guest-visible content must equal `model`.
fn image_equals(image: &Path, format: &str, model: &Model) -> Result<()> {
    let raw = image.with_file_name("model.raw");
    model.write_raw(&raw)?;
    let diff = qemu::compare(&raw, "raw", image, format)?;
    ensure!(diff.is_none(), "{} vs model: {diff:?}", image.display());
    Ok(())
}

/// Serves `chain`'s top, writes without a flush, sends `signal` and checks that the daemon exits
/// 0 with the write durable.
fn unflushed_write_is_durable_after(chain: Chain, signal: &str) -> Result<()> {
    let top = chain.top()?.clone();
    let format = top.format.name();
    let is_qcow2 = matches!(top.format, Format::Qcow2 { .. });
    let daemon = Daemon::serve(chain.dir(), &[("disk", &top.path)], &[])?;
    let writer = UnflushedWriter::write(&daemon, "disk")?;

    ensure!(
        unsynced_pages(&top.path)? > 0,
        "the written image has no dirty pages before the signal: something synced it already \
         (or the kernel wrote it back), so this test cannot tell a flush on {signal} from none"
    );
    if is_qcow2 {
        ensure!(
            !pattern_on_disk_while_served(&top.path, format)?,
            "the write's mapping is on disk before the signal: the content check after it can no \
             longer tell a flush from none"
        );
    }

    let stderr = daemon.stderr_text();
    let status = daemon.signal_and_wait(signal)?;
    ensure!(
        status.success(),
        "imgstream serve exited with {status} on SIG{signal}:\n{stderr}"
    );
    ensure!(
        unsynced_pages(&top.path)? == 0,
        "SIG{signal} left dirty pages of {}: the daemon exited without syncing it",
        top.path.display()
    );
    writer.finish()?;

    let mut model = chain.expected().clone();
    model.fill(WRITE_OFFSET, WRITE_LEN, PATTERN)?;
    if is_qcow2 {
        let features = ondisk::get_be64(&top.path, ondisk::qcow2::INCOMPATIBLE_FEATURES)?;
        ensure!(
            features & QCOW2_DIRTY_BIT == 0,
            "the dirty bit is set after SIG{signal}: {features:#x}"
        );
        qemu::check_clean(&top.path, format)?;
    }
    image_equals(&top.path, format, &model)
}

/// qcow2 v3 (64 KiB clusters) over a raw base with data where the client writes.
fn qcow2_over_raw(dir: &Path) -> Result<Chain> {
    Chain::new(dir)
        .base(Format::Raw, "8M")?
        .write(0, 4 * MIB, 0xaa)?
        .overlay(Format::qcow2_v3(64 * KIB))?
        .write(6 * MIB, 64 * KIB, 0xbb)
}

fn raw_image(dir: &Path) -> Result<Chain> {
    Chain::new(dir)
        .base(Format::Raw, "8M")?
        .write(0, 4 * MIB, 0xaa)
}

#[test]
fn sigterm_makes_unflushed_nbd_writes_to_qcow2_durable() -> Result<()> {
    let t = tempfile::tempdir()?;
    unflushed_write_is_durable_after(qcow2_over_raw(t.path())?, "TERM")
}

#[test]
fn sigint_makes_unflushed_nbd_writes_to_qcow2_durable() -> Result<()> {
    let t = tempfile::tempdir()?;
    unflushed_write_is_durable_after(qcow2_over_raw(t.path())?, "INT")
}

#[test]
fn sigterm_makes_unflushed_nbd_writes_to_raw_durable() -> Result<()> {
    let t = tempfile::tempdir()?;
    unflushed_write_is_durable_after(raw_image(t.path())?, "TERM")
}

#[test]
fn sigint_makes_unflushed_nbd_writes_to_raw_durable() -> Result<()> {
    let t = tempfile::tempdir()?;
    unflushed_write_is_durable_after(raw_image(t.path())?, "INT")
}

/// Every image, not only the first: two images served by one daemon, each written without a
/// flush by its own client, are both synced and complete after SIGTERM.
#[test]
fn sigterm_flushes_every_served_image() -> Result<()> {
    let (t1, t2) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let qcow2 = qcow2_over_raw(t1.path())?;
    let raw = raw_image(t2.path())?;
    let (first, second) = (qcow2.top()?.path.clone(), raw.top()?.path.clone());
    let daemon = Daemon::serve(t1.path(), &[("disk", &first), ("other", &second)], &[])?;
    let writers = [
        UnflushedWriter::write(&daemon, "disk")?,
        UnflushedWriter::write(&daemon, "other")?,
    ];
    for image in [&first, &second] {
        ensure!(
            unsynced_pages(image)? > 0,
            "{} has no dirty pages before the signal",
            image.display()
        );
    }
    let status = daemon.terminate()?;
    ensure!(
        status.success(),
        "imgstream serve exited with {status} on SIGTERM"
    );
    for image in [&first, &second] {
        ensure!(
            unsynced_pages(image)? == 0,
            "SIGTERM left dirty pages of {}",
            image.display()
        );
    }
    for writer in writers {
        writer.finish()?;
    }
    qemu::check_clean(&first, "qcow2")?;
    for (chain, image, format) in [(&qcow2, &first, "qcow2"), (&raw, &second, "raw")] {
        let mut model = chain.expected().clone();
        model.fill(WRITE_OFFSET, WRITE_LEN, PATTERN)?;
        image_equals(image, format, &model)?;
    }
    Ok(())
}

//! imgstream and QEMU exclude each other through QEMU's byte-range locks: a writer holding an
//! image open makes the other side's read-write open fail with a lock error, and once the
//! holder exits the same command succeeds. The holder proves it has the image open by
//! answering a read, so nothing depends on timing.

use anyhow::{ensure, Result};
use imgstream_tests::imgstream::{self, IoSession};
use imgstream_tests::qemu::{self, QemuIoSession};
use imgstream_tests::tools::Output;
use std::path::PathBuf;

fn image(dir: &std::path::Path) -> Result<PathBuf> {
    let path = dir.join("locked.qcow2");
    qemu::create(&path, "qcow2", None, None, Some("1M"))?;
    Ok(path)
}

fn failed_on_lock(out: &Output) -> Result<()> {
    ensure!(
        !out.success() && out.stderr.to_lowercase().contains("lock"),
        "{} should fail with a lock error:\n{}",
        out.command,
        out.describe()
    );
    Ok(())
}

#[test]
fn imgstream_io_fails_on_lock_while_qemu_io_holds_the_image() -> Result<()> {
    let t = tempfile::tempdir()?;
    let path = image(t.path())?;
    let args = [
        "io".to_string(),
        "-f".into(),
        "qcow2".into(),
        path.to_string_lossy().into(),
        "-c".into(),
        "write -P 0x1 0 512".into(),
    ];

    let holder = QemuIoSession::open(&path, "qcow2")?;
    failed_on_lock(&imgstream::run(&args)?)?;
    holder.close()?;

    imgstream::run_ok(&args)?;
    Ok(())
}

#[test]
fn qemu_io_fails_on_lock_while_imgstream_io_holds_the_image() -> Result<()> {
    let t = tempfile::tempdir()?;
    let path = image(t.path())?;

    let holder = IoSession::open(&path, "qcow2")?;
    failed_on_lock(&qemu::io_unchecked(&path, "qcow2", &["read 0 512"])?)?;
    holder.close()?;

    let after = qemu::io_unchecked(&path, "qcow2", &["read 0 512"])?;
    ensure!(after.success(), "{}", after.describe());
    Ok(())
}

/// Control for the test above: two qemu-io processes exclude each other the same way, so the
/// check really detects QEMU's lock.
#[test]
fn qemu_io_fails_on_lock_while_another_qemu_io_holds_the_image() -> Result<()> {
    let t = tempfile::tempdir()?;
    let path = image(t.path())?;
    let holder = QemuIoSession::open(&path, "qcow2")?;
    failed_on_lock(&qemu::io_unchecked(&path, "qcow2", &["read 0 512"])?)?;
    holder.close()
}

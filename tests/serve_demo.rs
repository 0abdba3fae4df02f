//! `imgstream demo`, the README's first command, end to end: it must succeed on its own and
//! leave a standalone, consistent `disk.qcow2` that QEMU agrees with.

use anyhow::{ensure, Result};
use imgstream_tests::{imgstream, qemu};

#[test]
fn demo_streams_a_small_disk_and_leaves_a_clean_standalone_image() -> Result<()> {
    let t = tempfile::tempdir()?;
    let dir = t.path().join("demo");
    let out = imgstream::run_ok(&[
        "demo".to_string(),
        "--dir".into(),
        dir.display().to_string(),
        "--size-mib".into(),
        "32".into(),
    ])?;
    ensure!(
        out.stdout
            .trim_end()
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("demo OK")),
        "{}",
        out.describe()
    );
    let disk = dir.join("disk.qcow2");
    qemu::check_clean(&disk, "qcow2")?;
    let info = qemu::info(&disk, Some("qcow2"), false)?;
    ensure!(info.get("backing-filename").is_none(), "{info}");
    ensure!(info["virtual-size"] == 32u64 << 20, "{info}");
    Ok(())
}

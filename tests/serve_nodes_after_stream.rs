//! After a full stream of `top=IMAGE`, the nodes the stream dropped from the top's chain keep
//! their own backing in `query-named-block-nodes`, as qemu-storage-daemon's do; streaming one
//! of them is refused with a clear error, and its file is left alone.

use anyhow::{bail, ensure, Context, Result};
use imgstream_tests::daemon::Daemon;
use imgstream_tests::qemu;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// base.qcow2 <- mid.qcow2 <- top.qcow2 in `dir`, 4 MiB, with data in each.
fn chain(dir: &Path) -> Result<[PathBuf; 3]> {
    std::fs::create_dir_all(dir)?;
    let [base, mid, top] = ["base", "mid", "top"].map(|n| dir.join(format!("{n}.qcow2")));
    qemu::create(&base, "qcow2", None, None, Some("4M"))?;
    qemu::io(&base, "qcow2", &["write -P 0x11 0 2M".into()])?;
    let base_name = base.display().to_string();
    qemu::create(&mid, "qcow2", None, Some((&base_name, "qcow2")), None)?;
    qemu::io(&mid, "qcow2", &["write -P 0x22 1M 1M".into()])?;
    let mid_name = mid.display().to_string();
    qemu::create(&top, "qcow2", None, Some((&mid_name, "qcow2")), None)?;
    qemu::io(&top, "qcow2", &["write -P 0x33 3M 64k".into()])?;
    Ok([base, mid, top])
}

/// Streams `device` and waits for the job to be gone (it dismisses itself once concluded).
fn stream(daemon: &Daemon, device: &str) -> Result<()> {
    daemon.qmp("block-stream", json!({"job-id": "j", "device": device}))?;
    for _ in 0..3000 {
        if daemon.job()?.is_none() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    bail!("the stream of {device} did not end")
}

/// The fields of node `name` that say what it is backed by.
fn backing_of(daemon: &Daemon, name: &str) -> Result<Value> {
    let nodes = daemon.qmp("query-named-block-nodes", json!({}))?;
    let node = nodes
        .as_array()
        .context("a list of nodes")?
        .iter()
        .find(|n| n["node-name"] == name)
        .with_context(|| format!("no node {name} in {nodes}"))?;
    Ok(json!({
        "backing_file_depth": node["backing_file_depth"],
        "backing_file": node["backing_file"],
        "backing-image": node["image"]["backing-image"]["filename"],
    }))
}

#[test]
fn a_dropped_node_keeps_its_backing_as_in_qsd() -> Result<()> {
    let dir = tempfile::tempdir()?;

    let [base, mid, top] = chain(&dir.path().join("qsd"))?;
    let qsd = Daemon::qsd(
        &dir.path().join("qsd"),
        &[
            ("top", &top, "qcow2"),
            ("mid", &mid, "qcow2"),
            ("base", &base, "qcow2"),
        ],
        "top",
    )?;
    stream(&qsd, "top")?;
    let theirs = backing_of(&qsd, "mid")?;
    qsd.stop()?;

    let [base, mid, top] = chain(&dir.path().join("ours"))?;
    let ours = Daemon::serve(&dir.path().join("ours"), &[("top", &top)], &[])?;
    stream(&ours, "top")?;
    let dropped = backing_of(&ours, "top.1")?;
    let expected = json!({
        "backing_file_depth": 1,
        "backing_file": base.display().to_string(),
        "backing-image": base.display().to_string(),
    });
    ensure!(dropped == expected, "top.1 after the stream: {dropped}");
    // The same, but for where QSD's chain lives.
    let qsd_base = dir.path().join("qsd/base.qcow2").display().to_string();
    ensure!(
        theirs
            == json!({
                "backing_file_depth": 1,
                "backing_file": qsd_base,
                "backing-image": qsd_base,
            }),
        "QSD's mid after the stream: {theirs}"
    );

    // Streaming the dropped node is refused, and its file keeps its backing and content.
    let request =
        json!({"execute": "block-stream", "arguments": {"job-id": "k", "device": "top.1"}});
    let out = ours.ctl(&["qmp", &request.to_string()])?;
    ensure!(
        !out.success()
            && out
                .stdout
                .contains("dropped from its chain by an earlier stream"),
        "{}",
        out.describe()
    );
    ours.stop()?;
    let info = qemu::info(&top, Some("qcow2"), false)?;
    ensure!(
        info.get("backing-filename").is_none(),
        "the stream left top a backing: {info}"
    );
    let info = qemu::info(&mid, Some("qcow2"), false)?;
    ensure!(
        info["backing-filename"] == base.display().to_string(),
        "mid's header changed: {info}"
    );
    qemu::io(
        &mid,
        "qcow2",
        &["read -P 0x11 0 1M".into(), "read -P 0x22 1M 1M".into()],
    )?;
    Ok(())
}

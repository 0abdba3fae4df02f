//! `imgstream serve` with QEMU's and libnbd's own clients: what they write lands in the image,
//! what they read and map agrees with the image file, read-only and lock rules hold, and
//! SIGTERM leaves a clean image and no sockets behind.

use anyhow::{ensure, Context, Result};
use imgstream_tests::daemon::Daemon;
use imgstream_tests::fixtures::{Chain, Format};
use imgstream_tests::qemu;
use imgstream_tests::tools::{self, Output};
use imgstream_tests::{KIB, MIB};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// qcow2 v3 (64 KiB clusters) over a raw base with data, holes and zeroes in several places.
fn qcow2_over_raw(dir: &Path) -> Result<Chain> {
    Chain::new(dir)
        .base(Format::Raw, "8M")?
        .write(0, 3 * MIB, 0xaa)?
        .write(5 * MIB, 512 * KIB, 0xab)?
        .overlay(Format::qcow2_v3(64 * KIB))?
        .write(2 * MIB + 4 * KIB, 100 * KIB, 0xbb)?
        .write_zeroes(5 * MIB, 128 * KIB)?
        .write(7 * MIB, 64 * KIB, 0xbc)
}

fn qed_image(dir: &Path) -> Result<Chain> {
    Chain::new(dir)
        .base(Format::qed(64 * KIB), "8M")?
        .write(0, 3 * MIB, 0x11)?
        .write_zeroes(4 * MIB, MIB)?
        .write(6 * MIB + 512, 3000, 0x12)
}

fn run(program: &str, package: &str, args: &[&str]) -> Result<Output> {
    tools::run(&tools::require(program, package)?, args)
}

/// (start, end, data, zero) runs of a `qemu-img map --output=json`.
fn runs(map: &Value) -> Result<Vec<(u64, u64, bool, bool)>> {
    map.as_array()
        .context("map is not a list")?
        .iter()
        .map(|e| {
            let start = e["start"].as_u64().context("start")?;
            Ok((
                start,
                start + e["length"].as_u64().context("length")?,
                e["data"].as_bool().context("data")?,
                e["zero"].as_bool().context("zero")?,
            ))
        })
        .collect()
}

/// Fails at the first byte where the two maps disagree on data or zero (depth is not compared:
/// over NBD the whole chain is one layer).
fn maps_agree(export: &Value, file: &Value) -> Result<()> {
    let (a, b) = (runs(export)?, runs(file)?);
    let mut points: Vec<u64> = a.iter().chain(&b).flat_map(|r| [r.0, r.1]).collect();
    points.sort_unstable();
    points.dedup();
    let at = |runs: &[(u64, u64, bool, bool)], p: u64| {
        runs.iter()
            .find(|r| r.0 <= p && p < r.1)
            .map(|r| (r.2, r.3))
    };
    for &p in &points[..points.len() - 1] {
        ensure!(
            at(&a, p) == at(&b, p),
            "at offset {p} the export maps as (data, zero) {:?}, the file as {:?}\nexport: {export}\nfile: {file}",
            at(&a, p),
            at(&b, p)
        );
    }
    Ok(())
}

/// The whole client session against one served image: qemu-io writes, zeroes, discards and
/// reads back; nbdinfo lists and maps; qemu-img maps and compares; nbdcopy copies out; then
/// SIGTERM, and the file is checked against what the clients saw.
fn qemu_clients_agree_with_the_served_image(chain: Chain) -> Result<()> {
    let top = chain.top()?.clone();
    let dir = chain.dir().to_path_buf();
    let daemon = Daemon::serve(&dir, &[("disk", &top.path)], &[])?;
    let uri = daemon.uri("disk");

    // qemu::io fails on any "failed" in qemu-io's output, a pattern mismatch included.
    qemu::io(
        Path::new(&uri),
        "raw",
        &[
            "write -P 0x5a 0 1M".into(),
            "read -P 0x5a 0 1M".into(),
            "write -z 1M 1M".into(),
            "discard 2M 64k".into(),
            "flush".into(),
        ],
    )?;

    let list = run(
        "nbdinfo",
        "libnbd-bin",
        &[
            "--list",
            &format!("nbd+unix:///?socket={}", daemon.nbd.display()),
        ],
    )?
    .ensure_success()?;
    ensure!(
        list.stdout.contains("export=\"disk\"")
            && list.stdout.contains(&format!("export-size: {}", top.size)),
        "{}",
        list.describe()
    );
    let nbd_map = run("nbdinfo", "libnbd-bin", &["--map", &uri])?.ensure_success()?;
    ensure!(
        nbd_map.stdout.contains("data"),
        "nbdinfo --map shows no data:\n{}",
        nbd_map.describe()
    );

    let export_map = qemu::map(Path::new(&uri), Some("raw"))?;
    let compare = qemu::qemu_img(&[
        "compare".into(),
        "-U".into(),
        "-f".into(),
        "raw".into(),
        "-F".into(),
        top.format.name().into(),
        uri.clone(),
        top.path.display().to_string(),
    ])?;
    ensure!(
        compare.success(),
        "export vs image:\n{}",
        compare.describe()
    );

    let copied = dir.join("nbdcopy.raw");
    run(
        "nbdcopy",
        "libnbd-bin",
        &[&uri, &copied.display().to_string()],
    )?
    .ensure_success()?;

    let (qmp, nbd, pid_file) = (
        daemon.qmp.clone(),
        daemon.nbd.clone(),
        daemon.pid_file.clone(),
    );
    daemon.stop()?;
    for leftover in [&qmp, &nbd, &pid_file] {
        ensure!(
            !leftover.exists(),
            "{} is still there after SIGTERM",
            leftover.display()
        );
    }
    if top.format != Format::Raw {
        qemu::check_clean(&top.path, top.format.name())?;
    }
    maps_agree(&export_map, &qemu::map(&top.path, Some(top.format.name()))?)?;

    let converted = dir.join("converted.raw");
    qemu::convert_to_raw(&top.path, Some(top.format.name()), &converted)?;
    ensure!(
        std::fs::read(&copied)? == std::fs::read(&converted)?,
        "nbdcopy of the export differs from qemu-img convert of the image"
    );

    let mut expected = chain.expected().clone();
    expected.fill(0, MIB, 0x5a)?;
    expected.fill(MIB, MIB, 0)?;
    // QEMU turns a discarded qcow2 v3 cluster into a zero cluster; QED has no discard at all
    // (imgstream treats it as advisory too), so the data stays.
    if matches!(top.format, Format::Qcow2 { .. }) {
        expected.fill(2 * MIB, 64 * KIB, 0)?;
    }
    let model = dir.join("model.raw");
    expected.write_raw(&model)?;
    let diff = qemu::compare(&model, "raw", &top.path, top.format.name())?;
    ensure!(diff.is_none(), "image vs model: {diff:?}");
    Ok(())
}

#[test]
fn qemu_clients_agree_with_served_qcow2_over_raw_chain() -> Result<()> {
    let t = tempfile::tempdir()?;
    qemu_clients_agree_with_the_served_image(qcow2_over_raw(t.path())?)
}

#[test]
fn qemu_clients_agree_with_served_qed_image() -> Result<()> {
    let t = tempfile::tempdir()?;
    qemu_clients_agree_with_the_served_image(qed_image(t.path())?)
}

#[test]
fn read_only_export_rejects_writes_with_eperm() -> Result<()> {
    let t = tempfile::tempdir()?;
    let chain = qcow2_over_raw(t.path())?;
    let top = chain.top()?.path.clone();
    let daemon = Daemon::serve(t.path(), &[("disk", &top)], &["--read-only"])?;
    // Strict mode off so libnbd sends the write instead of refusing it itself: the EPERM
    // must come from the server.
    let script = format!(
        r#"
import errno, nbd
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri({uri:?})
print("read_only", h.is_read_only())
try:
    h.pwrite(b"x" * 512, 0)
    print("write succeeded")
except nbd.Error as e:
    print("write failed", e.errno)
assert h.pread(512, 0) == b"\xaa" * 512
"#,
        uri = daemon.uri("disk")
    );
    let out = tools::run(Path::new("/usr/bin/python3"), &["-c", &script])?.ensure_success()?;
    ensure!(
        out.stdout.contains("read_only True") && out.stdout.contains("write failed EPERM"),
        "{}",
        out.describe()
    );

    // The same from our own client, which reports the server's error number.
    let mut client = imgstream_nbd::client::Client::connect_unix(&daemon.nbd, "disk")?;
    ensure!(client.is_read_only());
    let err = client.write(0, &[1; 512]).unwrap_err().to_string();
    ensure!(
        err.contains("error 1"),
        "expected NBD_EPERM (1), got: {err}"
    );
    daemon.stop()?;
    let diff = qemu::compare(
        &{
            let m = t.path().join("model.raw");
            chain.expected().write_raw(&m)?;
            m
        },
        "raw",
        &top,
        "qcow2",
    )?;
    ensure!(
        diff.is_none(),
        "a read-only export changed the image: {diff:?}"
    );
    Ok(())
}

#[test]
fn served_image_is_locked_against_a_second_serve_and_qemu_io() -> Result<()> {
    let t = tempfile::tempdir()?;
    let chain = qcow2_over_raw(t.path())?;
    let top = chain.top()?.path.clone();
    let daemon = Daemon::serve(t.path(), &[("disk", &top)], &[])?;

    let second = imgstream_tests::imgstream::run(&[
        "serve".to_string(),
        "--nbd".into(),
        format!("unix:{}", t.path().join("second.sock").display()),
        format!("disk={}", top.display()),
    ])?;
    ensure!(
        !second.success() && second.stderr.contains("lock"),
        "a second serve of the same image should fail on its lock:\n{}",
        second.describe()
    );
    let io = qemu::io_unchecked(&top, "qcow2", &["read 0 512"])?;
    ensure!(
        !io.success() && io.stderr.to_lowercase().contains("lock"),
        "qemu-io should fail on the lock:\n{}",
        io.describe()
    );
    // The first daemon is unaffected.
    let mut client = imgstream_nbd::client::Client::connect_unix(&daemon.nbd, "disk")?;
    let mut buf = [0u8; 512];
    client.read(0, &mut buf)?;
    ensure!(buf == [0xaa; 512]);
    daemon.stop()
}

#[test]
fn qmp_socket_is_private_to_its_owner() -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir()?;
    let chain = qcow2_over_raw(t.path())?;
    let daemon = Daemon::serve(t.path(), &[("disk", &chain.top()?.path)], &[])?;
    let mode = std::fs::metadata(&daemon.qmp)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "QMP socket mode is {mode:o}");
    daemon.stop()
}

fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[test]
fn tcp_export_on_localhost_serves_qemu_io() -> Result<()> {
    let t = tempfile::tempdir()?;
    let chain = qcow2_over_raw(t.path())?;
    let top: PathBuf = chain.top()?.path.clone();
    let port = free_tcp_port()?;
    let address = format!("127.0.0.1:{port}");
    let daemon = Daemon::serve(t.path(), &[("disk", &top)], &["--nbd", &address])?;
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    qemu::qemu_img(&["info".into(), "-f".into(), "raw".into(), uri.clone()])?.ensure_success()?;
    qemu::io(
        Path::new(&uri),
        "raw",
        &[
            "write -P 0x77 4M 64k".into(),
            "read -P 0x77 4M 64k".into(),
            "read -P 0xaa 0 64k".into(),
        ],
    )?;
    daemon.stop()?;
    qemu::check_clean(&top, "qcow2")?;
    qemu::io(&top, "qcow2", &["read -P 0x77 4M 64k".to_string()]).map(|_| ())
}

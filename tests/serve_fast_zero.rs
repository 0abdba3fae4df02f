//! NBD WRITE_ZEROES with `FAST_ZERO` on each format, against qemu-storage-daemon on copies of
//! the same images: the same requests succeed or fail with ENOTSUP on both (differences named
//! below), a refused request changes nothing, and requests longer than the maximum payload are
//! served as QSD serves them.

use anyhow::{ensure, Context, Result};
use imgstream_tests::daemon::Daemon;
use imgstream_tests::fixtures::Format;
use imgstream_tests::qemu;
use imgstream_tests::tools;
use imgstream_tests::{KIB, MIB};
use std::path::{Path, PathBuf};

/// The fast-zero requests of every scenario: (name, offset, length). The base has data in its
/// first MiB, the top in its first cluster (64 KiB).
const REQUESTS: [(&str, u64, u64); 6] = [
    ("whole cluster with the top's data", 0, 64 * KIB),
    (
        "whole cluster the backing's data shows through",
        128 * KIB,
        64 * KIB,
    ),
    ("part of a cluster with data", 256 * KIB + 4 * KIB, 4 * KIB),
    (
        "part of a cluster that reads as zeroes",
        2 * MIB + 4 * KIB,
        4 * KIB,
    ),
    (
        "whole clusters between parts that read as zeroes",
        2 * MIB + 4 * KIB,
        3 * 64 * KIB,
    ),
    ("whole unallocated cluster", 3 * MIB, 64 * KIB),
];

/// A plain WRITE_ZEROES this long: twice the 32 MiB maximum payload.
const LONG_ZERO: u64 = 64 * MIB;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Top {
    Qcow2V3,
    Qcow2V2,
    Qed,
    Raw,
}

impl Top {
    fn format(self) -> Format {
        match self {
            Top::Qcow2V3 => Format::qcow2_v3(64 * KIB),
            Top::Qcow2V2 => Format::qcow2_v2(64 * KIB),
            Top::Qed => Format::qed(64 * KIB),
            Top::Raw => Format::Raw,
        }
    }

    fn driver(self) -> &'static str {
        match self {
            Top::Qcow2V3 | Top::Qcow2V2 => "qcow2",
            Top::Qed => "qed",
            Top::Raw => "raw",
        }
    }
}

/// An 80 MiB raw base with data in its first MiB and, unless the top is raw itself, an overlay
/// in `top` with data in its first cluster. Returns the top's path and the chain, top first,
/// as (node, path, driver).
fn images(dir: &Path, top: Top) -> Result<Vec<(&'static str, PathBuf, &'static str)>> {
    std::fs::create_dir_all(dir)?;
    let base = dir.join("base.raw");
    let base_name = base.display().to_string();
    qemu::create(&base, "raw", None, None, Some("80M"))?;
    qemu::io(&base, "raw", &["write -P 0xaa 0 1M".into()])?;
    if top == Top::Raw {
        return Ok(vec![("top", base, "raw")]);
    }
    let overlay = dir.join("top.img");
    let format = top.format();
    qemu::create(
        &overlay,
        format.name(),
        format.create_options().as_deref(),
        Some((&base_name, "raw")),
        None,
    )?;
    qemu::io(&overlay, top.driver(), &["write -P 0xbb 0 64k".into()])?;
    Ok(vec![("top", overlay, top.driver()), ("base", base, "raw")])
}

/// libnbd's `nbdsh -u URI -c SCRIPT`, run as `python3 -m nbd`: the libnbd module is installed
/// for the system's interpreter, which need not be the first python3 on PATH.
fn nbdsh(uri: &str, script: &str) -> Result<tools::Output> {
    tools::require("nbdsh", "libnbd-bin")?;
    tools::run(
        Path::new("/usr/bin/python3"),
        &["-m", "nbd", "-u", uri, "-c", script],
    )?
    .ensure_success()
}

/// Sends every fast-zero request, then the long plain one, over one connection; returns one
/// outcome per request ("ok" or the errno's name), in order.
fn send_requests(daemon: &Daemon) -> Result<Vec<String>> {
    let mut script = String::from(
        "def outcome(f):\n    try:\n        f()\n        return 'ok'\n    except nbd.Error as e:\n        return e.errno or e.string\n",
    );
    for (_, offset, len) in REQUESTS {
        script +=
            &format!("print(outcome(lambda: h.zero({len}, {offset}, nbd.CMD_FLAG_FAST_ZERO)))\n");
    }
    script += &format!("print(outcome(lambda: h.zero({LONG_ZERO}, 0)))\n");
    let out = nbdsh(&daemon.uri("top"), &script)?;
    let outcomes: Vec<String> = out.stdout.lines().map(str::to_string).collect();
    ensure!(
        outcomes.len() == REQUESTS.len() + 1,
        "nbdsh printed {outcomes:?}"
    );
    Ok(outcomes)
}

/// Runs the requests on a fresh copy of the images under each daemon; returns both outcome
/// lists and our image's path.
fn both_daemons(dir: &Path, top: Top) -> Result<(Vec<String>, Vec<String>, PathBuf)> {
    let theirs_chain = images(&dir.join("qsd"), top)?;
    let chain: Vec<(&str, &Path, &str)> = theirs_chain
        .iter()
        .map(|(node, path, driver)| (*node, path.as_path(), *driver))
        .collect();
    let qsd = Daemon::qsd(&dir.join("qsd"), &chain, "top")?;
    let theirs = send_requests(&qsd)?;
    qsd.stop()?;

    let ours_chain = images(&dir.join("ours"), top)?;
    let top_path = ours_chain[0].1.clone();
    let ours_daemon = Daemon::serve(&dir.join("ours"), &[("top", &top_path)], &[])?;
    let ours = send_requests(&ours_daemon)?;
    ours_daemon.stop()?;
    Ok((ours, theirs, top_path))
}

/// What the image reads after the requests: the long zero request zeroed its first 64 MiB, the
/// rest is the base's (zeroes past its first MiB), so everything reads as zeroes.
fn reads_all_zeroes(image: &Path, driver: &str) -> Result<()> {
    qemu::io(image, driver, &["read -P 0 0 80M".into()])?;
    Ok(())
}

fn scenario(top: Top, expected_differences: &[usize]) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ours, theirs, image) = both_daemons(dir.path(), top)?;
    for (i, (name, _, _)) in REQUESTS.iter().enumerate() {
        if expected_differences.contains(&i) {
            ensure!(
                ours[i] == "ok" && theirs[i] == "ENOTSUP",
                "{top:?}, {name}: expected ok here and ENOTSUP from QSD, got {} and {}",
                ours[i],
                theirs[i]
            );
        } else {
            ensure!(
                ours[i] == theirs[i],
                "{top:?}, {name}: {} here, {} from QSD",
                ours[i],
                theirs[i]
            );
        }
    }
    ensure!(
        ours[REQUESTS.len()] == "ok" && theirs[REQUESTS.len()] == "ok",
        "{top:?}: a {LONG_ZERO}-byte WRITE_ZEROES gave {} here, {} from QSD",
        ours[REQUESTS.len()],
        theirs[REQUESTS.len()]
    );
    if top != Top::Raw {
        qemu::check_clean(&image, top.driver())?;
    }
    reads_all_zeroes(&image, top.driver())
}

#[test]
fn fast_zero_on_qcow2_v3_succeeds_where_qsd_does() -> Result<()> {
    // Zero clusters make any whole cluster zero; a partial cluster only if it reads as zeroes
    // already (QEMU's qcow2_co_pwrite_zeroes checks the head and tail the same way).
    scenario(Top::Qcow2V3, &[])
}

#[test]
fn fast_zero_on_qcow2_v2_over_a_backing_file_is_refused_but_for_bytes_already_zero() -> Result<()> {
    // Without zero clusters, a cluster over a backing file takes data. QEMU extends a partial
    // request whose bytes read as zeroes to its whole cluster and so refuses it too; we answer
    // it at once, changing nothing, since the bytes already read as zeroes (index 3).
    scenario(Top::Qcow2V2, &[3])
}

#[test]
fn fast_zero_on_qed_succeeds_where_no_data_must_be_written() -> Result<()> {
    // QEMU's QED driver takes no FAST_ZERO at all (BDRV_REQ_NO_FALLBACK is not in its
    // supported_zero_flags). QED has zero clusters: we make unallocated clusters and clusters
    // that borrow from the backing file zero clusters (1, 4, 5), and answer a partial request
    // whose bytes read as zeroes (3); a cluster with data would have to be written in place
    // (QED never releases one), so that is refused as QSD refuses it.
    scenario(Top::Qed, &[1, 3, 4, 5])
}

#[test]
fn fast_zero_on_raw_punches_holes_as_qsd_does() -> Result<()> {
    scenario(Top::Raw, &[])
}

#[test]
fn a_refused_fast_zero_changes_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let chain = images(dir.path(), Top::Qcow2V2)?;
    let top_path = chain[0].1.clone();
    let map_before = qemu::map(&top_path, Some("qcow2"))?;
    let daemon = Daemon::serve(dir.path(), &[("top", &top_path)], &[])?;
    let script = "try:\n    h.zero(196608, 0, nbd.CMD_FLAG_FAST_ZERO)\n    print('ok')\nexcept nbd.Error as e:\n    print(e.errno)\n";
    let out = nbdsh(&daemon.uri("top"), script)?;
    daemon.stop()?;
    ensure!(out.stdout.trim() == "ENOTSUP", "{}", out.stdout);
    let map_after = qemu::map(&top_path, Some("qcow2"))?;
    ensure!(
        map_before == map_after,
        "the refused request changed the allocation:\nbefore {map_before}\nafter {map_after}"
    );
    qemu::io(
        &top_path,
        "qcow2",
        &["read -P 0xbb 0 64k".into(), "read -P 0xaa 64k 128k".into()],
    )
    .context("the refused request changed the data")?;
    Ok(())
}

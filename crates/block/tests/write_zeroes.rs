//! `Disk::write_zeroes` and `Disk::write_zeroes_without_fallback` on images made by
//! `qemu-img`: what reads as zeroes afterwards, what `qemu-img map` shows was written, and that
//! the fallback-free form changes nothing when it refuses.

use imgstream_block::{ChainOptions, Disk, ErrorKind};
use serde_json::Value;
use std::path::Path;

mod common;
use common::{create_qcow2_overlay, run_ok, s};

const KIB: u64 = 1 << 10;

/// `qemu-img map --output=json` of `image`: (start, length, data, zero) runs.
fn map(image: &Path) -> Vec<(u64, u64, bool, bool)> {
    let out = run_ok("qemu-img", &["map", "--output=json", s(image)]);
    let runs: Value = serde_json::from_str(&out).expect("qemu-img map prints JSON");
    runs.as_array()
        .expect("a list of runs")
        .iter()
        .map(|r| {
            (
                r["start"].as_u64().expect("start"),
                r["length"].as_u64().expect("length"),
                r["data"].as_bool().expect("data"),
                r["zero"].as_bool().expect("zero"),
            )
        })
        .collect()
}

fn open(image: &Path) -> Disk {
    Disk::open(image, &ChainOptions::writable()).expect("open the image")
}

/// A qcow2 v3 image of 1 MiB + 4 KiB (64 KiB clusters, the last one mostly past the end) with
/// data everywhere.
fn image_with_a_partial_last_cluster(dir: &Path) -> std::path::PathBuf {
    let image = dir.join("odd.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", s(&image), "1052672"],
    );
    run_ok("qemu-io", &["-c", "write -P 0x77 0 1052672", s(&image)]);
    image
}

#[test]
fn zeroes_to_the_end_make_the_partial_last_cluster_a_zero_cluster() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = image_with_a_partial_last_cluster(dir.path());
    let disk = open(&image);
    // The last 8 KiB: 4 KiB of the cluster before and the last cluster's 4 KiB.
    disk.write_zeroes(1052672 - 8 * KIB, 8 * KIB, false)
        .expect("write zeroes");
    disk.flush().expect("flush");
    drop(disk);
    run_ok("qemu-img", &["check", "-q", s(&image)]);
    run_ok(
        "qemu-io",
        &[
            "-c",
            "read -P 0x77 0 1044480",
            "-c",
            "read -P 0 1044480 8k",
            s(&image),
        ],
    );
    // The cluster that ends the disk became a zero cluster: no data written into it.
    let last = map(&image)
        .into_iter()
        .find(|&(start, len, _, _)| start <= 1048576 && 1048576 < start + len)
        .expect("the last cluster is mapped");
    assert!(!last.2 && last.3, "the last cluster maps as {last:?}");
}

#[test]
fn without_fallback_the_partial_last_cluster_is_zeroed_by_metadata_too() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let image = image_with_a_partial_last_cluster(dir.path());
    let disk = open(&image);
    disk.write_zeroes_without_fallback(1048576, 4 * KIB, false)
        .expect("the cluster past the end needs no data written");
    drop(disk);
    run_ok("qemu-img", &["check", "-q", s(&image)]);
    run_ok("qemu-io", &["-c", "read -P 0 1048576 4k", s(&image)]);
}

#[test]
fn without_fallback_a_refusal_changes_nothing() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (base, top) = (dir.path().join("base.raw"), dir.path().join("top.qcow2"));
    run_ok("qemu-img", &["create", "-q", "-f", "raw", s(&base), "1M"]);
    run_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 1M", s(&base)],
    );
    create_qcow2_overlay(&base, "raw", &top, &["-o", "compat=0.10"]);
    run_ok("qemu-io", &["-c", "write -P 0x22 64k 64k", s(&top)]);
    let before = map(&top);
    let disk = open(&top);
    // Data at both ends (a partial cluster with the base's bytes), and qcow2 v2 over a
    // backing file for the whole clusters: each needs zeroes written.
    for (offset, len) in [(4 * KIB, 4 * KIB), (64 * KIB, 64 * KIB), (0, 256 * KIB)] {
        let error = disk
            .write_zeroes_without_fallback(offset, len, false)
            .expect_err("zeroing this takes written zeroes");
        assert_eq!(error.kind(), ErrorKind::Unsupported, "{error}");
        assert_eq!(error.errno(), libc::ENOTSUP);
    }
    disk.flush().expect("flush");
    drop(disk);
    assert_eq!(
        map(&top),
        before,
        "a refused request changed the allocation"
    );
    run_ok(
        "qemu-io",
        &[
            "-c",
            "read -P 0x11 0 64k",
            "-c",
            "read -P 0x22 64k 64k",
            "-c",
            "read -P 0x11 128k 896k",
            s(&top),
        ],
    );
}

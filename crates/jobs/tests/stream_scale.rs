//! Scale: a sparse 1 TiB qcow2 over a sparse 1 TiB qcow2 base with a few MiB of data
//! scattered across it. The stream copies exactly that data (nothing for the empty terabyte),
//! and the process's peak memory grows by less than 64 MiB. The time is reported, not judged.

mod common;

use common::*;
use imgstream_block::{ChainOptions, Disk};
use imgstream_jobs::StreamOptions;
use std::sync::Arc;
use std::time::Instant;

const TIB: u64 = 1 << 40;
const GIB: u64 = 1 << 30;
const MEMORY_GROWTH_LIMIT_KIB: u64 = 64 * 1024;

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

#[test]
fn sparse_terabyte_stream_copies_only_the_data_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1T"],
    );
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ],
    );
    // 48 places spread over the terabyte with 128 KiB of data each (6 MiB in all) in the
    // base, and at every third one the top already holds the first 64 KiB itself.
    let mut base_writes = Vec::new();
    let mut top_writes = Vec::new();
    let mut data = 0;
    for i in 0..48u64 {
        let at = i * (TIB / 48) / (64 * KIB) * (64 * KIB) + (i % 5) * GIB;
        base_writes.push(format!("write -P {} {at} 128k", 0x10 + i));
        data += 128 * KIB;
        if i % 3 == 0 {
            top_writes.push(format!("write -P 0xee {at} 64k"));
            data -= 64 * KIB;
        }
    }
    // The very end of the disk too.
    base_writes.push(format!("write -P 0x77 {} 64k", TIB - 64 * KIB));
    data += 64 * KIB;
    qemu_io(&base, "qcow2", &base_writes);
    qemu_io(&top, "qcow2", &top_writes);

    let before_hwm = vm_hwm_kib();
    let disk = Arc::new(Disk::open(&top, &ChainOptions::writable()).unwrap());
    let options = StreamOptions {
        base_depth: 2,
        ..full_stream()
    };
    let started = Instant::now();
    let (job, events) = start(&disk, options, JobSetup::default());
    assert_eq!(job.wait_concluded(), None, "{:?}", events.names());
    let elapsed = started.elapsed();
    let info = job.info();
    close(disk);
    let growth = vm_hwm_kib().saturating_sub(before_hwm);
    eprintln!(
        "1 TiB sparse stream: {:.2} s, copied {} bytes, VmHWM grew by {growth} KiB",
        elapsed.as_secs_f64(),
        info.copied
    );
    assert_eq!(info.len, TIB);
    assert_eq!(info.offset, TIB);
    assert_eq!(
        info.copied, data,
        "copied bytes differ from the data above the base"
    );
    assert!(
        growth < MEMORY_GROWTH_LIMIT_KIB,
        "peak memory grew by {growth} KiB during the stream"
    );
    assert_eq!(backing_of(&top, "qcow2"), None);
    assert_check_clean(&top, "qcow2", "1 TiB after stream");
    assert_eq!(
        top_defined_bytes(&top, "qcow2"),
        data + 16 * 64 * KIB,
        "the top should define the copied data plus what it held itself"
    );
}

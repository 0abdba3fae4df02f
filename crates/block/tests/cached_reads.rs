//! `Disk::read_if_cached`, the read the NBD server tries on its event loop: it answers what
//! `Disk::read` answers, and gives up (for `read` to do it) whenever the read would have to
//! copy up, on chains made by `qemu-img` and `qemu-io`.

use imgstream_block::{ChainOptions, Disk};
use std::path::Path;

mod common;
use common::{create_overlay, run_ok, s};

const MIB: u64 = 1 << 20;

/// base.qcow2 with data at 0-2 MiB and 6-7 MiB; top.qcow2 over it with data at 1-1.5 MiB and
/// zeroes at 6.25-6.5 MiB.
fn chain(dir: &Path) -> std::path::PathBuf {
    let (base, top) = (dir.join("base.qcow2"), dir.join("top.qcow2"));
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "8M"]);
    run_ok(
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 0 2M",
            "-c",
            "write -P 0x22 6M 1M",
            s(&base),
        ],
    );
    create_overlay(&base, &top);
    run_ok(
        "qemu-io",
        &[
            "-c",
            "write -P 0x33 1M 512k",
            "-c",
            "write -z 6400k 256k",
            s(&top),
        ],
    );
    top
}

#[test]
fn cached_reads_match_reads_across_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Disk::open(&chain(dir.path()), &ChainOptions::read_only()).unwrap();
    // Warm the page cache as a first guest read would.
    let mut whole = vec![0u8; (8 * MIB) as usize];
    disk.read(0, &mut whole).unwrap();
    for (offset, len) in [
        (0, 4096),
        (MIB - 2048, 8192),
        (6 * MIB, 512 << 10),
        (7 * MIB, 65536),
    ] {
        let mut cached = vec![0xeeu8; len];
        assert!(
            disk.read_if_cached(offset, &mut cached).unwrap(),
            "{offset}+{len} is in the page cache"
        );
        assert!(
            cached == whole[offset as usize..offset as usize + len],
            "{offset}+{len} reads as Disk::read reads it"
        );
    }
    assert!(
        disk.read_if_cached(8 * MIB - 1, &mut [0u8; 2]).is_err(),
        "past the end"
    );
}

#[test]
fn with_copy_on_read_on_a_range_the_top_does_not_define_is_left_to_read() {
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path());
    let options = ChainOptions {
        writable: true,
        ..ChainOptions::read_only()
    };
    let disk = Disk::open(&top, &options).unwrap();
    disk.set_copy_on_read(2);
    let mut buf = vec![0u8; 4096];
    // A fresh open has no table cached: the first read loads it.
    assert!(!disk.read_if_cached(MIB, &mut buf).unwrap());
    disk.read(MIB, &mut buf).unwrap();
    // Defined by the top: answered.
    buf.fill(0);
    assert!(disk.read_if_cached(MIB, &mut buf).unwrap());
    assert!(buf.iter().all(|&b| b == 0x33));
    // Only in the base: the read must copy it up first, which read_if_cached never does.
    assert!(!disk.read_if_cached(0, &mut buf).unwrap());
    disk.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11));
    // Copied up by that read: now answered.
    buf.fill(0);
    assert!(disk.read_if_cached(0, &mut buf).unwrap());
    assert!(buf.iter().all(|&b| b == 0x11));
}

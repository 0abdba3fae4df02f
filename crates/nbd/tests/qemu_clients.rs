//! QEMU's own tools (qemu-io, qemu-img) against the server, checked against
//! the backend's bytes and allocation map.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::*;
use imgstream_nbd::ZeroFlags;

const MIB: u64 = 1024 * 1024;

#[test]
fn qemu_io_writes_reads_zeroes_discards_and_flushes() {
    let backend = Arc::new(MemBackend::new(4 * MIB));
    backend.fill(2 * MIB, MIB, 0x11);
    let ts = TestServer::start(vec![("disk", export(&backend))]);

    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &ts.uri("disk"),
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "read -P 0x5a 0 1M",
            "-c",
            "write -z 1M 1M",
            "-c",
            "discard 2M 64k",
            "-c",
            "flush",
        ],
    );
    assert!(
        !out.contains("failed"),
        "qemu-io reported a failure:\n{out}"
    );

    let bytes = backend.bytes();
    let m = MIB as usize;
    assert!(bytes[..m].iter().all(|&b| b == 0x5a), "written pattern");
    assert!(bytes[m..2 * m].iter().all(|&b| b == 0), "zeroed range");
    assert!(
        bytes[2 * m..2 * m + 65536].iter().all(|&b| b == 0),
        "discarded range"
    );
    assert!(
        bytes[2 * m + 65536..3 * m].iter().all(|&b| b == 0x11),
        "untouched data"
    );
    assert_eq!(backend.state_at(0), State::Data);
    // `write -z` without -u asks for NBD_CMD_FLAG_NO_HOLE: zeroes stay allocated.
    assert_eq!(backend.state_at(MIB), State::Zero);
    assert_eq!(backend.state_at(2 * MIB), State::Hole);
    assert_eq!(backend.state_at(2 * MIB + 65536), State::Data);
    assert!(
        backend.flushes.load(Ordering::SeqCst) >= 1,
        "flush reached the backend"
    );
}

fn layered_backend() -> Arc<MemBackend> {
    use imgstream_nbd::ExportBackend;
    let backend = Arc::new(MemBackend::new(4 * MIB));
    backend.fill(0, 64 * 1024, 0xaa);
    backend
        .write_zeroes(MIB, 128 * 1024, ZeroFlags::default())
        .unwrap();
    backend.fill(2 * MIB, MIB, 0x55);
    backend.fill(3 * MIB + 4096, 4096, 0x01);
    backend
}

#[test]
fn qemu_img_map_matches_the_backend_allocation() {
    let backend = layered_backend();
    let ts = TestServer::start(vec![("disk", export(&backend))]);

    let json = run_ok(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", &ts.uri("disk")],
    );
    let map = parse_qemu_img_map(&json);
    assert_eq!(map, expected_map(&backend), "qemu-img map said:\n{json}");
    // The layout really has all three kinds of run.
    assert!(map.iter().any(|&(_, _, data, zero)| data && zero));
    assert!(map.iter().any(|&(_, _, data, zero)| !data && zero));
    assert!(map.iter().any(|&(_, _, data, zero)| data && !zero));
}

#[test]
fn qemu_img_compare_finds_the_export_equal_to_the_expected_raw_file() {
    let backend = layered_backend();
    let ts = TestServer::start(vec![("disk", export(&backend))]);
    let expected = ts.path("expected.raw");
    std::fs::write(&expected, backend.bytes()).unwrap();

    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            expected.to_str().unwrap(),
            &ts.uri("disk"),
        ],
    );

    let mut different = backend.bytes();
    different[3 * MIB as usize + 4100] ^= 0xff;
    std::fs::write(&expected, different).unwrap();
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            expected.to_str().unwrap(),
            &ts.uri("disk"),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "a changed byte must make the images differ"
    );
}

#[test]
fn qemu_img_convert_copies_the_export_to_a_raw_file() {
    let backend = layered_backend();
    let ts = TestServer::start(vec![("disk", export(&backend))]);
    let copy = ts.path("copy.raw");

    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &ts.uri("disk"),
            copy.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&copy).unwrap() == backend.bytes(),
        "copy differs from the export"
    );
}

#[test]
fn qemu_img_convert_copies_a_raw_file_into_the_export() {
    let backend = Arc::new(MemBackend::new(4 * MIB));
    backend.fill(0, 4 * MIB, 0xee);
    let ts = TestServer::start(vec![("disk", export(&backend))]);
    let source = ts.path("source.raw");
    let mut content = vec![0u8; 4 * MIB as usize];
    content[5000..9000].fill(0x42);
    content[3 * MIB as usize..].fill(0x17);
    std::fs::write(&source, &content).unwrap();

    run_ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            source.to_str().unwrap(),
            &ts.uri("disk"),
        ],
    );
    assert!(backend.bytes() == content, "export differs from the source");
}

#[test]
fn two_qemu_io_clients_write_distinct_ranges_at_once() {
    let backend = Arc::new(MemBackend::new(4 * MIB));
    let ts = TestServer::start(vec![("disk", export(&backend))]);
    let uri = ts.uri("disk");

    std::thread::scope(|s| {
        let first = s.spawn(|| {
            run_ok(
                "qemu-io",
                &["-f", "raw", &uri, "-c", "write -P 0xa1 0 2M", "-c", "flush"],
            )
        });
        let second = s.spawn(|| {
            run_ok(
                "qemu-io",
                &[
                    "-f",
                    "raw",
                    &uri,
                    "-c",
                    "write -P 0xb2 2M 2M",
                    "-c",
                    "flush",
                ],
            )
        });
        first.join().unwrap();
        second.join().unwrap();
    });

    let bytes = backend.bytes();
    let half = 2 * MIB as usize;
    assert!(bytes[..half].iter().all(|&b| b == 0xa1));
    assert!(bytes[half..].iter().all(|&b| b == 0xb2));
    assert!(backend.flushes.load(Ordering::SeqCst) >= 2);
    // Each client sees the other's data once both are done.
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "read -P 0xa1 0 2M",
            "-c",
            "read -P 0xb2 2M 2M",
        ],
    );
}

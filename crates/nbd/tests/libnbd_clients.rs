//! libnbd's tools (nbdinfo, nbdsh, nbdcopy) and fio's nbd engine against the
//! server. nbdsh runs with strict mode off, so that what it sends reaches the
//! server and the server, not libnbd, is what refuses it.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use imgstream_nbd::{ExportBackend, ServerConfig, ZeroFlags};

const MIB: u64 = 1024 * 1024;

/// Runs a Python snippet in nbdsh with `h` connected to `uri`.
fn nbdsh(uri: &str, setup: &str, script: &str) -> String {
    let code = format!("h.set_strict_mode(0)\n{setup}\nh.connect_uri({uri:?})\n{script}\n");
    require_tool("nbdsh");
    // The libnbd Python module is installed for the system's interpreter,
    // which need not be the first python3 on PATH.
    run_ok("/usr/bin/python3", &["-m", "nbd", "-c", &code])
}

/// Defines `errno_of(f)`: the errno name libnbd reports for `f()`, or 0.
const TRY_ERRNO: &str = "
def errno_of(f):
    try:
        f()
    except nbd.Error as e:
        return e.errno
    return 0
";

#[test]
fn nbdinfo_list_shows_exports_and_descriptions() {
    let backend = Arc::new(MemBackend::new(MIB));
    let ts = TestServer::start(vec![
        ("disk", export(&backend).description("the root disk")),
        ("base", export(&backend).read_only(true)),
    ]);
    let out = run_ok(
        "nbdinfo",
        &[
            "--list",
            &format!("nbd+unix://?socket={}", ts.socket.display()),
        ],
    );
    assert!(out.contains("export=\"disk\""), "{out}");
    assert!(out.contains("export=\"base\""), "{out}");
    assert!(out.contains("the root disk"), "{out}");
    assert!(out.contains("is_read_only: true"), "{out}");
    assert!(out.contains("can_multi_conn: true"), "{out}");
    assert!(out.contains("block_size_maximum: 33554432"), "{out}");
}

#[test]
fn nbdinfo_map_matches_the_backend_allocation() {
    let backend = Arc::new(MemBackend::new(4 * MIB));
    backend.fill(0, 64 * 1024, 0xaa);
    backend
        .write_zeroes(MIB, 128 * 1024, ZeroFlags::default())
        .unwrap();
    backend.fill(2 * MIB, 4096, 0x55);
    let ts = TestServer::start(vec![("disk", export(&backend))]);

    let out = run_ok("nbdinfo", &["--map", &ts.uri("disk")]);
    // Lines are "offset length type description"; type is the state flags.
    let map: Vec<(u64, u64, u32)> = out
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(u64, u64, u32)> = expected_map(&backend)
        .into_iter()
        .map(|(start, len, data, zero)| (start, len, u32::from(!data) | (u32::from(zero) << 1)))
        .collect();
    assert_eq!(map, expected, "nbdinfo --map said:\n{out}");
}

#[test]
fn nbdsh_out_of_range_read_fails_with_einval_in_both_reply_modes() {
    let backend = Arc::new(MemBackend::new(MIB));
    let ts = TestServer::start(vec![("disk", export(&backend))]);
    for structured in ["True", "False"] {
        let out = nbdsh(
            &ts.uri("disk"),
            &format!("h.set_request_structured_replies({structured})"),
            &format!(
                "{TRY_ERRNO}
print('past-end', errno_of(lambda: h.pread(4096, {MIB} - 512)))
print('beyond', errno_of(lambda: h.pread(512, {MIB} + 4096)))
print('still-works', len(h.pread(512, 0)))"
            ),
        );
        assert!(
            out.contains("past-end EINVAL"),
            "structured={structured}: {out}"
        );
        assert!(
            out.contains("beyond EINVAL"),
            "structured={structured}: {out}"
        );
        assert!(
            out.contains("still-works 512"),
            "structured={structured}: {out}"
        );
    }
}

#[test]
fn nbdsh_writes_to_a_read_only_export_fail_with_eperm() {
    let backend = Arc::new(MemBackend::new(MIB));
    backend.fill(0, 4096, 0x77);
    let ts = TestServer::start(vec![("ro", export(&backend).read_only(true))]);
    let out = nbdsh(
        &ts.uri("ro"),
        "",
        &format!(
            "{TRY_ERRNO}
print('read-only', h.is_read_only())
print('write', errno_of(lambda: h.pwrite(b'x' * 512, 0)))
print('trim', errno_of(lambda: h.trim(4096, 0)))
print('zero', errno_of(lambda: h.zero(4096, 0)))
print('read', h.pread(4, 0))"
        ),
    );
    assert!(out.contains("read-only True"), "{out}");
    assert!(out.contains("write EPERM"), "{out}");
    assert!(out.contains("trim EPERM"), "{out}");
    assert!(out.contains("zero EPERM"), "{out}");
    assert!(out.contains("b'wwww'"), "{out}");
    assert!(
        backend.bytes()[..4096].iter().all(|&b| b == 0x77),
        "read-only export was changed"
    );
}

#[test]
fn nbdsh_structured_replies_are_negotiated_only_when_asked_for() {
    let backend = Arc::new(MemBackend::new(MIB));
    backend.fill(0, 512, 0x33);
    let ts = TestServer::start(vec![("disk", export(&backend))]);
    for (ask, expect) in [("True", "True"), ("False", "False")] {
        let out = nbdsh(
            &ts.uri("disk"),
            &format!(
                "h.set_request_structured_replies({ask})\nh.add_meta_context('base:allocation')"
            ),
            "print('structured', h.get_structured_replies_negotiated())
print('meta', h.can_meta_context('base:allocation'))
print('data', h.pread(2, 510) == b'\\x33\\x33')",
        );
        assert!(out.contains(&format!("structured {expect}")), "{out}");
        // base:allocation needs structured replies.
        assert!(out.contains(&format!("meta {expect}")), "{out}");
        assert!(out.contains("data True"), "{out}");
    }
}

#[test]
fn nbdsh_block_status_honours_req_one_and_reports_holes_and_zeroes() {
    let backend = Arc::new(MemBackend::new(MIB));
    backend.fill(0, 8192, 1);
    backend
        .write_zeroes(8192, 8192, ZeroFlags::default())
        .unwrap();
    let ts = TestServer::start(vec![("disk", export(&backend))]);
    let out = nbdsh(
        &ts.uri("disk"),
        "h.add_meta_context('base:allocation')",
        "seen = []
def cb(meta, offset, entries, err):
    seen.append((meta, offset, list(entries)))
h.block_status(65536, 0, cb)
h.block_status(65536, 0, cb, nbd.CMD_FLAG_REQ_ONE)
for s in seen: print(s)",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(
        lines[0], "('base:allocation', 0, [8192, 0, 8192, 2, 49152, 3])",
        "{out}"
    );
    assert_eq!(lines[1], "('base:allocation', 0, [8192, 0])", "{out}");
}

#[test]
fn nbdsh_fast_zero_is_refused_with_enotsup_when_zeroing_is_slow() {
    let mut slow = MemBackend::new(MIB);
    slow.zeroes_are_fast = false;
    let slow = Arc::new(slow);
    slow.fill(0, 8192, 9);
    let ts = TestServer::start(vec![("disk", export(&slow))]);
    let out = nbdsh(
        &ts.uri("disk"),
        "",
        &format!(
            "{TRY_ERRNO}
print('can', h.can_fast_zero())
print('fast', errno_of(lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)))
print('slow', errno_of(lambda: h.zero(4096, 0)))"
        ),
    );
    assert!(out.contains("can True"), "{out}");
    assert!(out.contains("fast ENOTSUP"), "{out}");
    assert!(out.contains("slow 0"), "{out}");
    let bytes = slow.bytes();
    assert!(
        bytes[..4096].iter().all(|&b| b == 0),
        "the plain zero request ran"
    );
    assert!(bytes[4096..8192].iter().all(|&b| b == 9));
}

#[test]
fn nbdsh_many_requests_in_flight_run_concurrently_and_complete() {
    let mut backend = MemBackend::new(4 * MIB);
    backend.op_delay = Duration::from_millis(20);
    let backend = Arc::new(backend);
    let ts = TestServer::start(vec![("disk", export(&backend))]);
    let out = nbdsh(
        &ts.uri("disk"),
        "",
        "n = 64
bufs = [nbd.Buffer.from_bytearray(bytearray([i + 1]) * 65536) for i in range(n)]
cookies = [h.aio_pwrite(bufs[i], i * 65536) for i in range(n)]
print('max-in-flight', h.aio_in_flight())
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
h.flush()
reads = [(i, nbd.Buffer(65536)) for i in range(n)]
cookies = [h.aio_pread(b, i * 65536) for i, b in reads]
while h.aio_in_flight() > 0:
    h.poll(-1)
ok = all(h.aio_command_completed(c) for c in cookies) and all(b.to_bytearray() == bytearray([i + 1]) * 65536 for i, b in reads)
print('verified', ok)",
    );
    assert!(out.contains("verified True"), "{out}");
    for i in 0..64u64 {
        let at = (i * 65536) as usize;
        assert!(
            backend.bytes()[at..at + 65536]
                .iter()
                .all(|&b| b == i as u8 + 1),
            "block {i}"
        );
    }
    let overlap = backend.max_in_flight.load(Ordering::SeqCst);
    assert!(
        overlap > 1,
        "requests of one connection never ran concurrently"
    );
}

#[test]
fn backend_calls_beyond_the_servers_maximum_wait_their_turn() {
    let mut backend = MemBackend::new(4 * MIB);
    backend.op_delay = Duration::from_millis(20);
    let backend = Arc::new(backend);
    let config = ServerConfig {
        max_backend_calls: 2,
        ..ServerConfig::default()
    };
    let ts = TestServer::start_with(config, vec![("disk", export(&backend))]);
    // Two connections, 16 writes each in flight: the server has taken them all, and runs
    // two at a time.
    let uri = ts.uri("disk");
    let script = format!(
        "h2 = nbd.NBD()
h2.connect_uri({uri:?})
n = 16
def write(c, i):
    return c.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i % n + 1]) * 65536), i * 65536)
cookies = [(c, write(c, i)) for c, first in ((h, 0), (h2, n)) for i in range(first, first + n)]
print('in flight', h.aio_in_flight(), h2.aio_in_flight())
while h.aio_in_flight() + h2.aio_in_flight() > 0:
    for c in (h, h2):
        if c.aio_in_flight() > 0:
            c.poll(0)
print('completed', all(c.aio_command_completed(k) for c, k in cookies))"
    );
    let out = nbdsh(&uri, "", &script);
    assert!(out.contains("completed True"), "{out}");
    for i in 0..32u64 {
        let at = (i * 65536) as usize;
        assert_eq!(backend.bytes()[at], (i % 16) as u8 + 1, "block {i}");
    }
    assert_eq!(backend.max_in_flight.load(Ordering::SeqCst), 2);
}

#[test]
fn nbdcopy_copies_into_and_out_of_the_export() {
    let backend = Arc::new(MemBackend::new(8 * MIB));
    let ts = TestServer::start(vec![("disk", export(&backend))]);
    let source = ts.path("source.raw");
    let mut content = vec![0u8; 8 * MIB as usize];
    for (i, chunk) in content.chunks_mut(MIB as usize).enumerate() {
        if i % 2 == 0 {
            chunk.fill(i as u8 + 1);
        }
    }
    std::fs::write(&source, &content).unwrap();

    // nbdcopy opens several connections when the server allows multi-conn.
    run_ok("nbdcopy", &[source.to_str().unwrap(), &ts.uri("disk")]);
    assert!(
        backend.bytes() == content,
        "export differs from the copied file"
    );

    let copy = ts.path("copy.raw");
    std::fs::write(&copy, []).unwrap();
    run_ok("nbdcopy", &[&ts.uri("disk"), copy.to_str().unwrap()]);
    assert!(
        std::fs::read(&copy).unwrap() == content,
        "copy differs from the export"
    );
}

#[test]
fn fio_nbd_engine_with_iodepth_16_verifies_its_writes() {
    let backend = Arc::new(MemBackend::new(16 * MIB));
    let ts = TestServer::start(vec![("disk", export(&backend))]);
    let uri = format!("--uri={}", ts.uri("disk"));
    run_ok(
        "fio",
        &[
            "--name=nbd-verify",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=16M",
            "--io_size=8M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // fio would leave a verify state file in the crate's folder.
            "--verify_state_save=0",
            "--runtime=60",
        ],
    );
    assert!(backend.max_in_flight.load(Ordering::SeqCst) >= 1);
}

#[test]
fn nbdsh_reads_with_dont_fragment_once_structured_replies_are_negotiated() {
    // What qemu-storage-daemon 10 answers the same script with: can_df True after structured
    // replies, a DF read served, an over-long one EINVAL with DF or without.
    let backend = Arc::new(MemBackend::new(64 * MIB));
    backend.fill(0, 4096, 0x5d);
    let ts = TestServer::start(vec![("disk", export(&backend))]);
    let out = nbdsh(
        &ts.uri("disk"),
        "",
        &format!(
            "{TRY_ERRNO}
print('can_df', h.can_df())
print('df', h.pread(4096, 0, nbd.CMD_FLAG_DF) == b'\\x5d' * 4096)
print('df-long', errno_of(lambda: h.pread(32 * 1024 * 1024 + 1, 0, nbd.CMD_FLAG_DF)))
print('long', errno_of(lambda: h.pread(32 * 1024 * 1024 + 1, 0)))"
        ),
    );
    assert!(out.contains("can_df True"), "{out}");
    assert!(out.contains("df True"), "{out}");
    assert!(out.contains("df-long EINVAL"), "{out}");
    assert!(out.contains("long EINVAL"), "{out}");

    // Without structured replies the flag is not advertised, and a DF read is refused.
    let out = nbdsh(
        &ts.uri("disk"),
        "h.set_request_structured_replies(False)",
        &format!(
            "{TRY_ERRNO}
print('can_df', h.can_df())
print('df', errno_of(lambda: h.pread(4096, 0, nbd.CMD_FLAG_DF)))"
        ),
    );
    assert!(out.contains("can_df False"), "{out}");
    assert!(out.contains("df EINVAL"), "{out}");
}

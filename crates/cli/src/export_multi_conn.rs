//! Multi-conn consistency of the NBD export, made observable. The server advertises
//! `NBD_FLAG_CAN_MULTI_CONN`, which promises a client that a FLUSH on any connection makes
//! durable every write already completed on any connection to the export (NBD's `proto.md`), so
//! that a client may spread its requests over several connections and flush on one.
//!
//! The export here is what `imgstream serve` builds ([`NbdServerHost`] over a [`Disk`]), with
//! the top's file wrapped in a [`RecordingStorage`]: every write and sync of the file is
//! recorded in order, so what a power cut would leave at any moment is known exactly (everything
//! up to the last sync, nothing after). Connection A writes and stays connected (no flush of its
//! own, no disconnect that could flush); connection B flushes; the state a power cut would then
//! leave is written to a file and read with `qemu-io`, and must hold A's write. A control before
//! each flush shows that the write is not durable yet, so the flush is what made it so.

use crate::export::NbdServerHost;
use imgstream_block::{Disk, Layer};
use imgstream_format::recording::{power_loss_state, RecordingStorage};
use imgstream_format::{open_format, FileStorage, FormatKind, OpenOptions, Storage};
use imgstream_nbd::client::Client;
use imgstream_qmp::{NbdAddr, NbdHost};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// A's first write: a whole cluster the image does not have yet (allocates; L2 and refcount
/// changes stay in memory until a flush).
const ALLOCATING: (u64, u64, u8) = (2 * MIB, 64 * KIB, 0x5a);
/// A's second write: inside that cluster, now allocated (data only, no metadata).
const IN_PLACE: (u64, u64, u8) = (2 * MIB + 4 * KIB, 4 * KIB, 0x6b);

/// `qemu-img create -f qcow2 PATH 8M` (64 KiB clusters, no backing file).
fn create_image(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg("8M")
        .output()
        .expect("run qemu-img create");
    assert!(out.status.success(), "qemu-img create: {out:?}");
}

/// The image opened as `serve` opens it, with its file's writes and syncs recorded.
fn open_recorded(path: &Path) -> (Arc<Disk>, Arc<RecordingStorage>) {
    let file: Arc<dyn Storage> = Arc::new(FileStorage::open(path, true).expect("open image"));
    let recording = Arc::new(RecordingStorage::new(file));
    let image = open_format(
        FormatKind::Qcow2,
        recording.clone(),
        OpenOptions { writable: true },
    )
    .expect("open qcow2");
    let layer = Layer {
        image,
        path: path.to_path_buf(),
        recorded_name: path.display().to_string(),
        format: FormatKind::Qcow2,
    };
    (Arc::new(Disk::from_layers(vec![layer], true)), recording)
}

/// Whether, after a power cut now, `qemu-io` would read `pattern` over the range: the durable
/// state is written to `out` and read as the qcow2 image it is.
fn durable_reads(
    initial: &[u8],
    recording: &RecordingStorage,
    out: &Path,
    (offset, len, pattern): (u64, u64, u8),
) -> bool {
    let operations = recording.operations();
    let durable = power_loss_state(initial, &operations, operations.len(), |_| false);
    std::fs::write(out, durable).expect("write the durable state");
    let read = format!("read -P {pattern:#x} {offset} {len}");
    let io = Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "-c", &read])
        .arg(out)
        .output()
        .expect("run qemu-io");
    let stdout = String::from_utf8_lossy(&io.stdout);
    let mismatch = stdout.contains("Pattern verification failed");
    assert!(
        io.status.success() || mismatch,
        "qemu-io could not read the durable state: {io:?}"
    );
    !mismatch
}

fn check_clean(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("run qemu-img check");
    assert!(out.status.success(), "qemu-img check: {out:?}");
}

#[test]
fn a_flush_on_one_connection_makes_another_connections_writes_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.qcow2");
    create_image(&image);
    let initial = std::fs::read(&image).expect("read the new image");
    let (disk, recording) = open_recorded(&image);
    let durable = dir.path().join("durable.qcow2");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let host = NbdServerHost::new(runtime.handle().clone());
    let socket = dir.path().join("nbd.sock");
    host.start(
        &NbdAddr::Unix(socket.clone()),
        u32::MAX,
        Some(imgstream_nbd::DEFAULT_HANDSHAKE_TIMEOUT),
    )
    .expect("start the NBD server");
    host.add_export("disk", disk, true).expect("add the export");
    let mut a = Client::connect_unix(&socket, "disk").expect("connect A");
    let mut b = Client::connect_unix(&socket, "disk").expect("connect B");
    b.flush().expect("B's first flush");

    let write = |client: &mut Client, (offset, len, pattern): (u64, u64, u8)| {
        client
            .write(offset, &vec![pattern; len as usize])
            .expect("A's write")
    };
    write(&mut a, ALLOCATING);
    assert!(
        !durable_reads(&initial, &recording, &durable, ALLOCATING),
        "A's allocating write is durable before any flush: this test cannot see what B's does"
    );
    b.flush().expect("B's flush");
    assert!(
        durable_reads(&initial, &recording, &durable, ALLOCATING),
        "B's flush did not make A's allocating write durable"
    );
    check_clean(&durable);

    write(&mut a, IN_PLACE);
    assert!(
        !durable_reads(&initial, &recording, &durable, IN_PLACE),
        "A's in-place write is durable before any flush: this test cannot see what B's does"
    );
    b.flush().expect("B's second flush");
    assert!(
        durable_reads(&initial, &recording, &durable, IN_PLACE),
        "B's flush did not make A's in-place write durable"
    );
    check_clean(&durable);

    a.disconnect().expect("disconnect A");
    b.disconnect().expect("disconnect B");
    host.shutdown();
}

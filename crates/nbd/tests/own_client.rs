//! Our blocking client against qemu-nbd (an independent server): handshake, read, write, flush.

use imgstream_nbd::client::Client;
use std::process::{Command, Stdio};

#[test]
fn own_client_reads_and_writes_through_qemu_nbd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.raw");
    let socket = dir.path().join("nbd.sock");
    std::fs::write(&image, vec![0x11u8; 1 << 20]).expect("image");
    // --fork returns once the server listens, so the socket is ready when it exits; without
    // --persistent it serves one client and then exits.
    let status = Command::new("qemu-nbd")
        .args(["--fork", "-f", "raw", "-x", "disk", "-k"])
        .arg(&socket)
        .arg(&image)
        .stdin(Stdio::null())
        .status()
        .expect("qemu-nbd must be installed (apt-get install qemu-utils)");
    assert!(status.success(), "qemu-nbd failed to start");
    let client = Client::connect_unix(&socket, "disk");
    let mut client = client.expect("could not connect to qemu-nbd");
    assert_eq!(client.size(), 1 << 20);
    client.write(4096, &[0x22; 8192]).expect("write");
    client.flush().expect("flush");
    let mut buf = vec![0u8; 16384];
    client.read(0, &mut buf).expect("read");
    assert!(buf[..4096].iter().all(|&b| b == 0x11));
    assert!(buf[4096..12288].iter().all(|&b| b == 0x22));
    assert!(buf[12288..].iter().all(|&b| b == 0x11));
    client.disconnect().expect("disconnect");
    let on_disk = std::fs::read(&image).expect("read image");
    assert!(on_disk[4096..12288].iter().all(|&b| b == 0x22));
}

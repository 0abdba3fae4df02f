//! The server's life: connection limits, exports coming and going, clean
//! disconnects and shutdown with requests in flight, TCP listening.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use imgstream_nbd::protocol::*;
use imgstream_nbd::{Server, ServerConfig};

const SIZE: u64 = 1024 * 1024;

fn slow_backend() -> Arc<MemBackend> {
    let mut backend = MemBackend::new(SIZE);
    backend.slow_read_at = Some(SIZE / 2);
    let backend = Arc::new(backend);
    backend.fill(SIZE / 2, 4096, 0x99);
    backend
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn clients_beyond_the_maximum_wait_for_a_free_slot() {
    let backend = slow_backend();
    let config = ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    };
    let ts = TestServer::start_with(config, vec![("disk", export(&backend))]);

    let first = RawClient::transmission(&ts.socket, "disk", false).0;
    let _second = RawClient::greet(&ts.socket);
    wait_for("two connections", || ts.server.connections() == 2);

    // As with QEMU, the third client is left in the listener's backlog (not
    // turned away); it is greeted once the first one leaves.
    let third = std::os::unix::net::UnixStream::connect(&ts.socket).unwrap();
    assert_eq!(ts.server.connections(), 2);
    drop(first);
    let third = RawClient::greet_on(third);
    assert_eq!(ts.server.connections(), 2);
    drop(third);
    wait_for("a free slot", || ts.server.connections() == 1);
    assert_server_still_serves(&ts.socket, "disk");
}

#[test]
fn max_connections_zero_means_no_limit() {
    let backend = slow_backend();
    let config = ServerConfig {
        max_connections: 0,
        ..ServerConfig::default()
    };
    let ts = TestServer::start_with(config, vec![("disk", export(&backend))]);
    let _first = RawClient::greet(&ts.socket);
    let _second = RawClient::greet(&ts.socket);
    assert_eq!(ts.server.connections(), 2);
}

#[test]
fn removed_export_refuses_new_clients_while_open_ones_keep_working() {
    let backend = slow_backend();
    let ts = TestServer::start(vec![
        ("disk", export(&backend)),
        ("other", export(&backend)),
    ]);
    let (mut open, _, _) = RawClient::transmission(&ts.socket, "disk", false);

    assert!(ts.server.remove_export("disk").is_some());
    assert_eq!(ts.server.export_names(), vec!["other".to_string()]);

    let mut late = RawClient::connect(&ts.socket);
    late.option(NBD_OPT_GO, &[0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 0]);
    assert_eq!(late.option_reply().1, NBD_REP_ERR_UNKNOWN);

    open.request(NBD_CMD_WRITE, 0, 1, 0, 4);
    open.send(b"live");
    assert_eq!(open.simple_reply(), (0, 1));
    assert_eq!(&backend.bytes()[..4], b"live");
    assert_server_still_serves(&ts.socket, "other");
}

#[test]
fn closed_export_sends_its_clients_away_after_their_requests_and_spares_others() {
    let backend = slow_backend();
    let ts = TestServer::start(vec![
        ("disk", export(&backend)),
        ("other", export(&backend)),
    ]);
    let (mut busy, _, _) = RawClient::transmission(&ts.socket, "disk", false);
    let (mut idle, _, _) = RawClient::transmission(&ts.socket, "disk", false);
    let (mut bystander, _, _) = RawClient::transmission(&ts.socket, "other", false);
    wait_for("clients counted per export", || {
        ts.server.export_clients("disk") == 2 && ts.server.export_clients("other") == 1
    });
    // The slow read is in flight when the export closes.
    start_slow_read(&mut busy, &backend);

    assert!(ts.server.close_export("disk").is_some());
    assert_eq!(ts.server.export_names(), vec!["other".to_string()]);

    assert_eq!(busy.simple_reply(), (0, 1));
    assert_eq!(busy.read(4096), vec![0x99; 4096]);
    assert!(busy.is_closed_by_server());
    assert!(idle.is_closed_by_server());
    wait_for("the closed export's clients gone", || {
        ts.server.connections() == 1
    });
    assert_eq!(ts.server.export_clients("disk"), 0);

    bystander.request(NBD_CMD_READ, 0, 2, 0, 4);
    assert_eq!(bystander.simple_reply(), (0, 2));
    assert_eq!(bystander.read(4), vec![0; 4]);
    assert_eq!(ts.server.export_clients("other"), 1);
}

#[test]
fn disconnect_waits_for_requests_in_flight() {
    let backend = slow_backend();
    let ts = TestServer::start(vec![("disk", export(&backend))]);
    let (mut client, _, _) = RawClient::transmission(&ts.socket, "disk", false);
    client.request(NBD_CMD_READ, 0, 1, SIZE / 2, 4096);
    client.request(NBD_CMD_DISC, 0, 2, 0, 0);
    assert_eq!(client.simple_reply(), (0, 1));
    assert_eq!(client.read(4096), vec![0x99; 4096]);
    assert!(client.is_closed_by_server());
}

/// Sends a read of the slow offset as request 1, and returns once the backend has begun it.
fn start_slow_read(client: &mut RawClient, backend: &MemBackend) {
    client.request(NBD_CMD_READ, 0, 1, SIZE / 2, 4096);
    wait_for("the slow read to start", || {
        backend.slow_reads_started.load(Ordering::Acquire) == 1
    });
}

/// The structured reply to [`start_slow_read`]'s request, whole.
fn assert_slow_read_answered(client: &mut RawClient) {
    let (flags, kind, handle, payload) = client.chunk();
    assert_eq!(
        (flags, kind, handle),
        (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 1)
    );
    assert_eq!(&payload[8..], &[0x99; 4096]);
}

#[test]
fn shutdown_finishes_requests_in_flight_then_closes_every_connection() {
    let backend = slow_backend();
    let mut ts = TestServer::start(vec![("disk", export(&backend))]);
    let (mut busy, _, _) = RawClient::transmission(&ts.socket, "disk", true);
    let mut idle = RawClient::transmission(&ts.socket, "disk", false).0;
    let mut negotiating = RawClient::connect(&ts.socket);
    start_slow_read(&mut busy, &backend);

    ts.stop();

    assert_slow_read_answered(&mut busy);
    assert!(busy.is_closed_by_server());
    assert!(idle.is_closed_by_server());
    assert!(negotiating.is_closed_by_server());
    assert_eq!(ts.server.connections(), 0);
    assert!(!ts.socket.exists() || std::os::unix::net::UnixStream::connect(&ts.socket).is_err());
}

#[test]
fn wait_closed_returns_once_the_requests_in_flight_are_answered() {
    let backend = slow_backend();
    let ts = TestServer::start(vec![("disk", export(&backend))]);
    let (mut busy, _, _) = RawClient::transmission(&ts.socket, "disk", true);
    start_slow_read(&mut busy, &backend);

    ts.server.shutdown();
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(ts.server.wait_closed());

    // Closed only after the slow read was answered: a daemon flushes after this.
    assert_eq!(ts.server.connections(), 0);
    assert_slow_read_answered(&mut busy);
    assert!(busy.is_closed_by_server());
}

#[test]
fn a_client_that_does_not_finish_negotiating_in_time_is_disconnected() {
    // QEMU's handshake-max-seconds: without a limit, idle clients could hold every slot.
    let backend = slow_backend();
    let config = ServerConfig {
        max_connections: 1,
        handshake_timeout: Some(Duration::from_millis(200)),
        ..ServerConfig::default()
    };
    let ts = TestServer::start_with(config, vec![("disk", export(&backend))]);
    let mut idle = RawClient::connect(&ts.socket);
    // Blocks until the server gives up on it: the read ends at EOF, not at a client timeout.
    assert!(idle.is_closed_by_server());
    // Its slot is free again, and a client that negotiates at once is served past the limit.
    let (mut client, _, _) = RawClient::transmission(&ts.socket, "disk", false);
    std::thread::sleep(Duration::from_millis(400));
    client.request(NBD_CMD_READ, 0, 1, 0, 4096);
    assert_eq!(client.simple_reply(), (0, 1));
}

#[test]
fn serve_tcp_listens_on_loopback_and_stops_on_shutdown() {
    let backend = slow_backend();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = Server::new(ServerConfig::default());
    server.add_export("disk", export(&backend)).unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = runtime.spawn({
        let server = server.clone();
        async move { server.serve_tcp_listener(listener).await }
    });

    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &format!("nbd://{addr}/disk"),
            "-c",
            "write -P 0x61 0 64k",
            "-c",
            "read -P 0x61 0 64k",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
    assert!(backend.bytes()[..65536].iter().all(|&b| b == 0x61));

    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut greeting = [0; 18];
    stream.read_exact(&mut greeting).unwrap();
    stream
        .write_all(&NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes())
        .unwrap();

    server.shutdown();
    runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), serving).await })
        .unwrap()
        .unwrap()
        .unwrap();
    // The server may close with our client flags still unread, which the
    // kernel answers with a reset instead of an orderly end of stream.
    let closed = match stream.read(&mut [0; 1]) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(closed, "negotiating client not closed on shutdown");
    assert_eq!(server.connections(), 0);
}

#[test]
fn duplicate_export_names_are_refused() {
    let backend = slow_backend();
    let server = Server::new(ServerConfig::default());
    server.add_export("disk", export(&backend)).unwrap();
    assert!(server.add_export("disk", export(&backend)).is_err());
    assert!(server
        .add_export("x".repeat(5000), export(&backend))
        .is_err());
}

//! Clients that break the protocol, sent by hand: each is refused or
//! disconnected, and the image and other clients are unharmed.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use imgstream_nbd::protocol::*;

const SIZE: u64 = 1024 * 1024;

fn setup() -> (TestServer, Arc<MemBackend>) {
    let mut backend = MemBackend::new(SIZE);
    backend.slow_read_at = Some(SIZE / 2);
    let backend = Arc::new(backend);
    backend.fill(0, SIZE, 0x3c);
    (TestServer::start(vec![("disk", export(&backend))]), backend)
}

fn assert_image_untouched(backend: &MemBackend) {
    assert!(
        backend.bytes().iter().all(|&b| b == 0x3c),
        "the image was changed"
    );
}

#[test]
fn unknown_client_flags_disconnect_the_client() {
    let (ts, backend) = setup();
    let mut client = RawClient::greet(&ts.socket);
    client.send(&0xffff_fff0u32.to_be_bytes());
    assert!(client.is_closed_by_server());
    assert_server_still_serves(&ts.socket, "disk");
    assert_image_untouched(&backend);
}

#[test]
fn bad_option_magic_disconnects_only_that_client() {
    let (ts, backend) = setup();
    let mut bystander = RawClient::transmission(&ts.socket, "disk", true).0;
    let mut client = RawClient::connect(&ts.socket);
    client.send_after_violation(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(client.is_closed_by_server());
    bystander.request(NBD_CMD_READ, 0, 1, 0, 16);
    let (flags, kind, handle, payload) = bystander.chunk();
    assert_eq!(
        (flags, kind, handle),
        (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 1)
    );
    assert_eq!(&payload[8..], &[0x3c; 16]);
    assert_image_untouched(&backend);
}

#[test]
fn absurd_option_length_disconnects_without_reading_it() {
    let (ts, backend) = setup();
    let mut client = RawClient::connect(&ts.socket);
    let mut msg = NBD_OPTS_MAGIC.to_be_bytes().to_vec();
    msg.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
    msg.extend_from_slice(&u32::MAX.to_be_bytes());
    client.send(&msg);
    assert!(client.is_closed_by_server());
    assert_server_still_serves(&ts.socket, "disk");
    assert_image_untouched(&backend);
}

#[test]
fn garbage_options_are_refused_and_negotiation_goes_on() {
    let (ts, _backend) = setup();
    let mut client = RawClient::connect(&ts.socket);

    client.option(0xdead_beef, b"garbage");
    assert_eq!(client.option_reply().1, NBD_REP_ERR_UNSUP);
    client.option(NBD_OPT_STARTTLS, &[]);
    assert_eq!(client.option_reply().1, NBD_REP_ERR_UNSUP);
    client.option(NBD_OPT_LIST, b"x");
    assert_eq!(client.option_reply().1, NBD_REP_ERR_INVALID);
    client.option(NBD_OPT_GO, &[0, 0, 0, 200, b'd']);
    assert_eq!(client.option_reply().1, NBD_REP_ERR_INVALID);
    client.option(NBD_OPT_INFO, &[0, 0, 0, 4, b'n', b'o', b'n', b'e', 0, 0]);
    assert_eq!(client.option_reply().1, NBD_REP_ERR_UNKNOWN);
    // Meta contexts need structured replies first.
    client.option(NBD_OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(client.option_reply().1, NBD_REP_ERR_INVALID);

    client.option(NBD_OPT_ABORT, &[]);
    assert_eq!(client.option_reply().1, NBD_REP_ACK);
    assert!(client.is_closed_by_server());
    assert_server_still_serves(&ts.socket, "disk");
}

#[test]
fn export_name_for_an_unknown_export_closes_the_connection() {
    let (ts, _backend) = setup();
    let mut client = RawClient::connect(&ts.socket);
    client.option(NBD_OPT_EXPORT_NAME, b"nonexistent");
    assert!(client.is_closed_by_server());
    assert_server_still_serves(&ts.socket, "disk");
}

#[test]
fn export_name_enters_transmission_without_zero_padding() {
    let (ts, _backend) = setup();
    let mut client = RawClient::connect(&ts.socket);
    client.option(NBD_OPT_EXPORT_NAME, b"disk");
    let reply = client.read(10);
    assert_eq!(u64::from_be_bytes(reply[0..8].try_into().unwrap()), SIZE);
    // NBD_FLAG_C_NO_ZEROES was sent: the next bytes are the read's reply.
    client.request(NBD_CMD_READ, 0, 5, 0, 4);
    assert_eq!(client.simple_reply(), (0, 5));
    assert_eq!(client.read(4), vec![0x3c; 4]);
}

#[test]
fn bad_request_magic_disconnects_and_the_image_is_untouched() {
    let (ts, backend) = setup();
    let (mut client, _, _) = RawClient::transmission(&ts.socket, "disk", false);
    let mut msg = 0x2560_9514u32.to_be_bytes().to_vec();
    msg.extend_from_slice(&[0; 24]);
    client.send(&msg);
    client.send_after_violation(&[0xff; 512]);
    assert!(client.is_closed_by_server());
    assert_server_still_serves(&ts.socket, "disk");
    assert_image_untouched(&backend);
}

#[test]
fn write_with_an_absurd_length_disconnects_without_writing() {
    let (ts, backend) = setup();
    let (mut client, _, _) = RawClient::transmission(&ts.socket, "disk", true);
    client.request(NBD_CMD_WRITE, 0, 1, 0, u32::MAX);
    client.send_after_violation(&[0; 4096]);
    assert!(client.is_closed_by_server());
    assert_server_still_serves(&ts.socket, "disk");
    assert_image_untouched(&backend);
}

#[test]
fn client_vanishing_mid_request_harms_nobody() {
    let (ts, backend) = setup();
    {
        let (mut client, _, _) = RawClient::transmission(&ts.socket, "disk", false);
        client.send(&NBD_REQUEST_MAGIC.to_be_bytes()[..3]);
    }
    {
        let (mut client, _, _) = RawClient::transmission(&ts.socket, "disk", false);
        client.request(NBD_CMD_WRITE, 0, 1, 0, 65536);
        client.send(&[0; 1000]);
    }
    {
        // Gone while its read is being served.
        let (mut client, _, _) = RawClient::transmission(&ts.socket, "disk", true);
        client.request(NBD_CMD_READ, 0, 1, SIZE / 2, 65536);
    }
    assert_server_still_serves(&ts.socket, "disk");
    assert_image_untouched(&backend);
}

#[test]
fn read_over_the_maximum_is_refused_with_einval_and_the_connection_lives() {
    let (ts, _backend) = setup();
    let (mut simple, _, _) = RawClient::transmission(&ts.socket, "disk", false);
    simple.request(NBD_CMD_READ, 0, 1, 0, u32::MAX);
    assert_eq!(simple.simple_reply(), (NBD_EINVAL, 1));
    simple.request(NBD_CMD_READ, 0, 2, 0, 8);
    assert_eq!(simple.simple_reply(), (0, 2));
    assert_eq!(simple.read(8), vec![0x3c; 8]);

    let (mut structured, _, _) = RawClient::transmission(&ts.socket, "disk", true);
    structured.request(NBD_CMD_READ, 0, 3, 0, 64 << 20);
    let (flags, kind, handle, payload) = structured.chunk();
    assert_eq!(
        (flags, kind, handle),
        (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, 3)
    );
    assert_eq!(
        u32::from_be_bytes(payload[0..4].try_into().unwrap()),
        NBD_EINVAL
    );
    let message_len = u16::from_be_bytes([payload[4], payload[5]]) as usize;
    assert!(message_len > 0, "structured errors carry a message");
    structured.request(NBD_CMD_READ, 0, 4, 0, 8);
    let (_, kind, handle, payload) = structured.chunk();
    assert_eq!((kind, handle), (NBD_REPLY_TYPE_OFFSET_DATA, 4));
    assert_eq!(&payload[8..], &[0x3c; 8]);
}

#[test]
fn unknown_command_and_flags_are_refused_with_einval() {
    let (ts, _backend) = setup();
    let (mut client, _, _) = RawClient::transmission(&ts.socket, "disk", false);
    client.request(0x42, 0, 1, 0, 512);
    assert_eq!(client.simple_reply(), (NBD_EINVAL, 1));
    // A write with a flag it may not carry is refused, but its payload is
    // still consumed, so the stream stays in step.
    client.request(NBD_CMD_WRITE, NBD_CMD_FLAG_REQ_ONE, 2, 0, 512);
    client.send(&[0; 512]);
    assert_eq!(client.simple_reply(), (NBD_EINVAL, 2));
    client.request(NBD_CMD_BLOCK_STATUS, 0, 3, 0, 512);
    assert_eq!(
        client.simple_reply(),
        (NBD_EINVAL, 3),
        "block status without a context"
    );
    client.request(NBD_CMD_FLUSH, 0, 4, 0, 0);
    assert_eq!(client.simple_reply(), (0, 4));
}

#[test]
fn a_slow_request_is_overtaken_by_a_fast_one() {
    let (ts, _backend) = setup();
    let (mut client, _, _) = RawClient::transmission(&ts.socket, "disk", true);
    let started = Instant::now();
    client.request(NBD_CMD_READ, 0, 1, SIZE / 2, 4096);
    client.request(NBD_CMD_READ, 0, 2, 0, 4096);
    let (_, _, first, _) = client.chunk();
    let (_, _, second, _) = client.chunk();
    assert_eq!((first, second), (2, 1), "replies came in request order");
    assert!(started.elapsed() >= Duration::from_millis(500));
}

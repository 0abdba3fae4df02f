//! The transmission phase: one reader parses requests and starts a task for
//! each, tasks run the backend call on the blocking pool and answer through
//! the shared [`ReplyWriter`], out of order.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::export::{BackendError, ExportBackend, StatusRun, ZeroFlags};
use crate::handshake::{Negotiated, BASE_ALLOCATION_ID};
use crate::latch::Latch;
use crate::protocol::*;
use crate::reply::{Reply, ReplyWriter};
use crate::workers::{run_on_blocking_pool, BackendWorkers};

/// Advertised minimum block size: backends are byte-addressable.
pub(crate) const MIN_BLOCK_SIZE: u32 = 1;
/// Advertised preferred block size.
pub(crate) const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Advertised maximum block size, and the largest READ, WRITE, CACHE or
/// WRITE_ZEROES accepted: the 32 MiB every client is expected to honour.
pub const MAX_PAYLOAD_SIZE: u32 = 32 * 1024 * 1024;
/// Most descriptors sent in one block status reply; the spec lets us send
/// fewer than the range needs, and the client asks again from where we stop.
const MAX_EXTENTS: usize = 64 * 1024;

/// Per-connection bounds on work accepted from the client.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) max_requests: u32,
    /// Bytes of write payloads and read buffers held at once; at least
    /// [`MAX_PAYLOAD_SIZE`], so that any valid request can run.
    pub(crate) max_bytes: u32,
    pub(crate) drain_timeout: Duration,
    /// The server's backend threads, shared by all its connections.
    pub(crate) workers: Arc<BackendWorkers>,
}

/// A request header as it came off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestHeader {
    pub(crate) flags: u16,
    pub(crate) kind: u16,
    pub(crate) handle: u64,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

/// A breach of the protocol after which the stream cannot be trusted: the
/// connection is closed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Violation(String);

pub(crate) fn decode_request(buf: &[u8; NBD_REQUEST_SIZE]) -> Result<RequestHeader, Violation> {
    let be32 = |at: usize| u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
    let be64 = |at: usize| (u64::from(be32(at)) << 32) | u64::from(be32(at + 4));
    let magic = be32(0);
    if magic != NBD_REQUEST_MAGIC {
        return Err(Violation(format!("bad request magic {magic:#x}")));
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes([buf[4], buf[5]]),
        kind: u16::from_be_bytes([buf[6], buf[7]]),
        handle: be64(8),
        offset: be64(16),
        len: be32(24),
    })
}

impl RequestHeader {
    /// Bytes of payload following the header. A write larger than we would
    /// ever accept is refused by hanging up (as the spec allows for payloads
    /// of a denial-of-service size) rather than by reading it.
    pub(crate) fn payload_len(&self) -> Result<u32, Violation> {
        if self.kind != NBD_CMD_WRITE {
            return Ok(0);
        }
        if self.len > MAX_PAYLOAD_SIZE {
            return Err(Violation(format!("write payload of {} bytes", self.len)));
        }
        Ok(self.len)
    }
}

/// A checked request, ready to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        flags: ZeroFlags,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    Disconnect,
}

/// What the checks of a request need to know about its session.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Session {
    pub(crate) size: u64,
    pub(crate) read_only: bool,
    pub(crate) structured: bool,
    pub(crate) base_allocation: bool,
}

/// A request refused without reaching the backend.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub(crate) error: u32,
    pub(crate) message: String,
}

fn reject(error: u32, message: impl Into<String>) -> Rejection {
    Rejection {
        error,
        message: message.into(),
    }
}

fn command_name(kind: u16) -> &'static str {
    match kind {
        NBD_CMD_READ => "NBD_CMD_READ",
        NBD_CMD_WRITE => "NBD_CMD_WRITE",
        NBD_CMD_DISC => "NBD_CMD_DISC",
        NBD_CMD_FLUSH => "NBD_CMD_FLUSH",
        NBD_CMD_TRIM => "NBD_CMD_TRIM",
        NBD_CMD_CACHE => "NBD_CMD_CACHE",
        NBD_CMD_WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
        NBD_CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "unknown command",
    }
}

/// Checks a request against the spec and the session, in the order QEMU
/// does: command and flags, permission, range, size.
pub(crate) fn check_request(h: &RequestHeader, s: &Session) -> Result<Command, Rejection> {
    let name = command_name(h.kind);
    // FUA "is valid for all commands" once NBD_FLAG_SEND_FUA is advertised.
    let valid_flags = NBD_CMD_FLAG_FUA
        | match h.kind {
            // Every read is answered in one chunk: "don't fragment" asks for nothing more.
            NBD_CMD_READ if s.structured => NBD_CMD_FLAG_DF,
            NBD_CMD_READ | NBD_CMD_WRITE | NBD_CMD_FLUSH | NBD_CMD_TRIM | NBD_CMD_CACHE => 0,
            NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
            NBD_CMD_BLOCK_STATUS => NBD_CMD_FLAG_REQ_ONE,
            NBD_CMD_DISC => return Ok(Command::Disconnect),
            kind => return Err(reject(NBD_EINVAL, format!("Unknown command {kind}"))),
        };
    if h.flags & !valid_flags != 0 {
        return Err(reject(
            NBD_EINVAL,
            format!("Flags {:#x} are not valid for {name}", h.flags),
        ));
    }
    let flag = |f: u16| h.flags & f != 0;

    let writes = matches!(h.kind, NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES);
    if writes && s.read_only {
        return Err(reject(NBD_EPERM, format!("{name} on a read-only export")));
    }
    if h.kind == NBD_CMD_BLOCK_STATUS && !s.base_allocation {
        return Err(reject(
            NBD_EINVAL,
            "NBD_CMD_BLOCK_STATUS without a negotiated metadata context",
        ));
    }
    if h.kind != NBD_CMD_FLUSH {
        let past_end = match h.offset.checked_add(u64::from(h.len)) {
            Some(end) => end > s.size,
            None => true,
        };
        if past_end {
            // The spec asks for ENOSPC on writes past the end, EINVAL otherwise.
            let error = if matches!(h.kind, NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES) {
                NBD_ENOSPC
            } else {
                NBD_EINVAL
            };
            return Err(reject(
                error,
                format!(
                    "{name} of {} bytes at {} is past the end ({})",
                    h.len, h.offset, s.size
                ),
            ));
        }
    }
    let bounded = match h.kind {
        // TRIM, WRITE_ZEROES and BLOCK_STATUS carry no payload: any length is served, as
        // QEMU's server does.
        NBD_CMD_READ | NBD_CMD_WRITE | NBD_CMD_CACHE => true,
        _ => false,
    };
    if bounded && h.len > MAX_PAYLOAD_SIZE {
        // EINVAL, as the spec says; with NBD_CMD_FLAG_DF too, as QSD answers (the spec keeps
        // EOVERFLOW for a read that DF keeps from being sent in several chunks: ours never is).
        return Err(reject(
            NBD_EINVAL,
            format!(
                "{name} of {} bytes exceeds the maximum of {MAX_PAYLOAD_SIZE}",
                h.len
            ),
        ));
    }

    let (offset, len) = (h.offset, h.len);
    Ok(match h.kind {
        NBD_CMD_READ => Command::Read { offset, len },
        NBD_CMD_WRITE => Command::Write {
            offset,
            fua: flag(NBD_CMD_FLAG_FUA),
        },
        NBD_CMD_FLUSH => Command::Flush,
        NBD_CMD_TRIM => Command::Trim {
            offset,
            len,
            fua: flag(NBD_CMD_FLAG_FUA),
        },
        NBD_CMD_CACHE => Command::Cache { offset, len },
        NBD_CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len,
            flags: ZeroFlags {
                may_unmap: !flag(NBD_CMD_FLAG_NO_HOLE),
                fast_only: flag(NBD_CMD_FLAG_FAST_ZERO),
                fua: flag(NBD_CMD_FLAG_FUA),
            },
        },
        NBD_CMD_BLOCK_STATUS => {
            if len == 0 {
                return Err(reject(NBD_EINVAL, "NBD_CMD_BLOCK_STATUS of 0 bytes"));
            }
            Command::BlockStatus {
                offset,
                len,
                req_one: flag(NBD_CMD_FLAG_REQ_ONE),
            }
        }
        kind => return Err(reject(NBD_EINVAL, format!("Unknown command {kind}"))),
    })
}

/// Turns a backend's runs into `base:allocation` descriptors for a request
/// of `len` bytes: runs cut to the request, equal neighbours merged, at most
/// one descriptor with `req_one`.
pub(crate) fn extents_from_runs(
    runs: &[StatusRun],
    len: u32,
    req_one: bool,
) -> Result<Vec<(u32, u32)>, BackendError> {
    let limit = if req_one { 1 } else { MAX_EXTENTS };
    let mut extents: Vec<(u32, u32)> = Vec::new();
    let mut left = len;
    for run in runs {
        if left == 0 {
            break;
        }
        if run.len == 0 {
            continue;
        }
        let flags =
            if run.hole { NBD_STATE_HOLE } else { 0 } | if run.zero { NBD_STATE_ZERO } else { 0 };
        let run_len = run.len.min(u64::from(left)) as u32;
        left -= run_len;
        let count = extents.len();
        match extents.last_mut() {
            Some((last_len, last_flags)) if *last_flags == flags => *last_len += run_len,
            _ if count < limit => extents.push((run_len, flags)),
            _ => break,
        }
    }
    if extents.is_empty() {
        return Err(BackendError::new(
            libc::EIO,
            "Backend reported no allocation status",
        ));
    }
    Ok(extents)
}

/// Largest read tried on the event loop itself (see [`execute`]).
const MAX_INLINE_READ: u32 = 128 << 10;

async fn execute(
    command: Command,
    backend: Arc<dyn ExportBackend>,
    payload: Vec<u8>,
    workers: Arc<BackendWorkers>,
) -> Reply {
    let result = match command {
        Command::Read { offset, len } => {
            let mut buf = vec![0; len as usize];
            // Most small reads find their bytes in memory. Answered here, they take no backend
            // thread and none of the two wakeups of a handoff, each of which can take a
            // millisecond on busy cores. Large ones would hold up this event loop's other tasks.
            let cached = if len <= MAX_INLINE_READ {
                backend.read_if_cached(offset, &mut buf)
            } else {
                Ok(false)
            };
            let data = match cached {
                Ok(true) => Ok(buf),
                Ok(false) => {
                    workers
                        .run(move || backend.read(offset, &mut buf).map(|()| buf))
                        .await
                }
                Err(error) => Err(error),
            };
            data.map(|data| Reply::Data { offset, data })
        }
        Command::Write { offset, fua } => workers
            .run(move || backend.write(offset, &payload, fua))
            .await
            .map(|()| Reply::Done),
        // A flush mostly waits for the device: it takes no backend thread, so that it
        // cannot hold up the reads and writes behind it.
        Command::Flush => run_on_blocking_pool(move || backend.flush())
            .await
            .map(|()| Reply::Done),
        Command::Trim { offset, len, fua } => {
            workers
                .run(move || {
                    backend.trim(offset, len.into())?;
                    if fua {
                        backend.flush()?;
                    }
                    Ok(Reply::Done)
                })
                .await
        }
        Command::WriteZeroes { offset, len, flags } => workers
            .run(move || backend.write_zeroes(offset, len.into(), flags))
            .await
            .map(|()| Reply::Done),
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => workers
            .run(move || backend.block_status(offset, len.into()))
            .await
            .and_then(|runs| extents_from_runs(&runs, len, req_one))
            .map(|extents| Reply::BlockStatus {
                context_id: BASE_ALLOCATION_ID,
                extents,
            }),
        Command::Cache { offset, len } => workers
            .run(move || backend.cache(offset, len.into()))
            .await
            .map(|()| Reply::Done),
        Command::Disconnect => Ok(Reply::Done),
    };
    result.unwrap_or_else(|e| {
        debug!(?command, error = %e, "NBD request failed");
        Reply::Error {
            error: e.nbd_error(),
            message: e.message,
        }
    })
}

/// Why the reader stopped.
enum End {
    Disconnect,
    ClientGone,
    Shutdown,
    Violation(Violation),
}

/// What ends a connection from the server's side.
struct Closing<'a> {
    /// The whole server stops.
    shutdown: &'a Latch,
    /// The export is removed in hard mode.
    export_closed: &'a Latch,
    /// A reply could not be sent, or draining gave up.
    hangup: &'a Latch,
}

/// Awaits `fut` unless the connection is closed from the server's side first.
async fn unless_closing<F: std::future::Future>(
    fut: F,
    closing: &Closing<'_>,
) -> Option<F::Output> {
    tokio::select! {
        out = fut => Some(out),
        () = closing.shutdown.tripped() => None,
        () = closing.export_closed.tripped() => None,
        () = closing.hangup.tripped() => None,
    }
}

/// Serves requests on a negotiated connection until the client disconnects,
/// breaks the protocol, or the server shuts down; then waits (at most
/// `limits.drain_timeout`) for requests in flight and closes the stream.
pub(crate) async fn serve<S>(stream: S, negotiated: Negotiated, limits: Limits, shutdown: Latch)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let backend = Arc::clone(&negotiated.export.backend);
    let export_clients = Arc::clone(&negotiated.export.clients);
    let _client_slot = export_clients.join();
    let session = Session {
        size: negotiated.size,
        read_only: negotiated.export.read_only,
        structured: negotiated.structured,
        base_allocation: negotiated.base_allocation,
    };
    let (reader, writer) = tokio::io::split(stream);
    let mut reader = BufReader::new(reader);
    let writer = Arc::new(ReplyWriter::new(writer, session.structured));
    let requests = Arc::new(Semaphore::new(limits.max_requests as usize));
    let bytes = Arc::new(Semaphore::new(
        limits.max_bytes.max(MAX_PAYLOAD_SIZE) as usize
    ));
    // Tripped when a reply cannot be sent, or when draining gives up.
    let hangup = Latch::new();
    let closing = Closing {
        shutdown: &shutdown,
        export_closed: &export_clients.closed,
        hangup: &hangup,
    };

    let end = loop {
        let mut buf = [0; NBD_REQUEST_SIZE];
        match unless_closing(reader.read_exact(&mut buf), &closing).await {
            None => break End::Shutdown,
            Some(Err(_)) => break End::ClientGone,
            Some(Ok(_)) => {}
        }
        let header = match decode_request(&buf) {
            Ok(header) => header,
            Err(v) => break End::Violation(v),
        };
        let payload_len = match header.payload_len() {
            Ok(len) => len,
            Err(v) => break End::Violation(v),
        };
        if header.kind == NBD_CMD_DISC {
            break End::Disconnect;
        }

        // Admission: a request slot, and room for its payload or read buffer,
        // before reading more from the client. A client that sends faster than
        // it reads replies is slowed down by its own socket buffer.
        // Refused requests still hold their payload until it is read.
        let checked = check_request(&header, &session);
        let buffer_len = match checked {
            Ok(Command::Read { len, .. }) => len,
            _ => payload_len,
        };
        let permits = async {
            let request = Arc::clone(&requests).acquire_owned().await;
            let buffer = Arc::clone(&bytes).acquire_many_owned(buffer_len).await;
            (request, buffer)
        };
        // The semaphores are never closed; treat it as shutdown if they were.
        let Some((Ok(request_permit), Ok(buffer_permit))) = unless_closing(permits, &closing).await
        else {
            break End::Shutdown;
        };

        let mut payload = vec![0; payload_len as usize];
        match unless_closing(reader.read_exact(&mut payload), &closing).await {
            None => break End::Shutdown,
            Some(Err(_)) => break End::ClientGone,
            Some(Ok(_)) => {}
        }

        let (backend, writer, hangup) = (Arc::clone(&backend), Arc::clone(&writer), hangup.clone());
        let workers = Arc::clone(&limits.workers);
        tokio::spawn(async move {
            let _permits = (request_permit, buffer_permit);
            let reply = match checked {
                Ok(command) => execute(command, backend, payload, workers).await,
                Err(rejection) => {
                    debug!(?header, message = %rejection.message, "NBD request rejected");
                    Reply::Error {
                        error: rejection.error,
                        message: rejection.message,
                    }
                }
            };
            if hangup.is_tripped() {
                return;
            }
            tokio::select! {
                sent = writer.send(header.handle, &reply) => if let Err(e) = sent {
                    debug!(error = %e, "cannot send NBD reply, hanging up");
                    hangup.trip();
                },
                // Draining gave up: the stream is being closed under us.
                () = hangup.tripped() => {}
            }
        });
    };

    match &end {
        End::Violation(v) => {
            warn!(violation = %v, "NBD client broke the protocol, disconnecting it")
        }
        End::Shutdown => debug!("server or export closing, closing NBD connection"),
        End::Disconnect | End::ClientGone => debug!("NBD client disconnected"),
    }
    let drained = tokio::time::timeout(
        limits.drain_timeout,
        requests.acquire_many(limits.max_requests),
    )
    .await;
    if drained.is_err() {
        warn!(
            "NBD requests still in flight after {:?}, closing anyway",
            limits.drain_timeout
        );
        hangup.trip();
    }
    // The client may be gone already; there is nobody left to tell.
    let _ = writer.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            handle: 42,
            offset,
            len,
        }
    }

    fn session() -> Session {
        Session {
            size: 1 << 20,
            read_only: false,
            structured: true,
            base_allocation: true,
        }
    }

    fn encode(h: &RequestHeader, magic: u32) -> [u8; NBD_REQUEST_SIZE] {
        let mut buf = [0; NBD_REQUEST_SIZE];
        buf[0..4].copy_from_slice(&magic.to_be_bytes());
        buf[4..6].copy_from_slice(&h.flags.to_be_bytes());
        buf[6..8].copy_from_slice(&h.kind.to_be_bytes());
        buf[8..16].copy_from_slice(&h.handle.to_be_bytes());
        buf[16..24].copy_from_slice(&h.offset.to_be_bytes());
        buf[24..28].copy_from_slice(&h.len.to_be_bytes());
        buf
    }

    fn error_of(h: RequestHeader, s: &Session) -> u32 {
        check_request(&h, s).unwrap_err().error
    }

    #[test]
    fn request_decoding_round_trips_every_field() {
        let h = RequestHeader {
            flags: 0xa5a5,
            kind: 0x1234,
            handle: u64::MAX - 1,
            offset: u64::MAX,
            len: u32::MAX,
        };
        assert_eq!(decode_request(&encode(&h, NBD_REQUEST_MAGIC)), Ok(h));
    }

    #[test]
    fn request_with_bad_magic_is_a_violation() {
        let h = header(NBD_CMD_READ, 0, 0, 512);
        for magic in [0, NBD_SIMPLE_REPLY_MAGIC, NBD_REQUEST_MAGIC ^ 1] {
            assert!(decode_request(&encode(&h, magic)).is_err());
        }
    }

    #[test]
    fn write_payload_up_to_the_maximum_is_read_and_beyond_is_a_violation() {
        assert_eq!(
            header(NBD_CMD_WRITE, 0, 0, MAX_PAYLOAD_SIZE).payload_len(),
            Ok(MAX_PAYLOAD_SIZE)
        );
        assert!(header(NBD_CMD_WRITE, 0, 0, MAX_PAYLOAD_SIZE + 1)
            .payload_len()
            .is_err());
        assert!(header(NBD_CMD_WRITE, 0, 0, u32::MAX).payload_len().is_err());
        // Only writes carry payload, whatever their length field says.
        assert_eq!(header(NBD_CMD_READ, 0, 0, u32::MAX).payload_len(), Ok(0));
        assert_eq!(header(NBD_CMD_TRIM, 0, 0, u32::MAX).payload_len(), Ok(0));
    }

    #[test]
    fn requests_ending_exactly_at_the_end_are_accepted() {
        let s = session();
        assert_eq!(
            check_request(&header(NBD_CMD_READ, 0, s.size - 512, 512), &s),
            Ok(Command::Read {
                offset: s.size - 512,
                len: 512
            })
        );
        assert!(check_request(&header(NBD_CMD_WRITE, 0, s.size - 1, 1), &s).is_ok());
        assert!(check_request(&header(NBD_CMD_TRIM, 0, 0, s.size as u32), &s).is_ok());
        assert!(check_request(&header(NBD_CMD_BLOCK_STATUS, 0, s.size - 1, 1), &s).is_ok());
        assert_eq!(
            check_request(&header(NBD_CMD_READ, 0, s.size, 0), &s),
            Ok(Command::Read {
                offset: s.size,
                len: 0
            })
        );
    }

    #[test]
    fn requests_past_the_end_fail_with_einval_or_enospc_for_writes() {
        let s = session();
        for kind in [
            NBD_CMD_READ,
            NBD_CMD_TRIM,
            NBD_CMD_CACHE,
            NBD_CMD_BLOCK_STATUS,
        ] {
            assert_eq!(
                error_of(header(kind, 0, s.size - 511, 512), &s),
                NBD_EINVAL,
                "{}",
                command_name(kind)
            );
            assert_eq!(error_of(header(kind, 0, s.size + 1, 1), &s), NBD_EINVAL);
        }
        for kind in [NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES] {
            assert_eq!(
                error_of(header(kind, 0, s.size - 511, 512), &s),
                NBD_ENOSPC,
                "{}",
                command_name(kind)
            );
        }
    }

    #[test]
    fn offset_plus_length_overflowing_u64_is_past_the_end() {
        let s = Session {
            size: u64::MAX,
            ..session()
        };
        assert_eq!(
            error_of(header(NBD_CMD_READ, 0, u64::MAX, 1), &s),
            NBD_EINVAL
        );
        assert_eq!(
            error_of(header(NBD_CMD_WRITE, 0, u64::MAX - 1, 4096), &s),
            NBD_ENOSPC
        );
    }

    #[test]
    fn lengths_over_the_maximum_fail_with_einval_whatever_the_reply_mode() {
        for structured in [false, true] {
            let s = Session {
                size: u64::MAX / 2,
                structured,
                base_allocation: structured,
                ..session()
            };
            for kind in [NBD_CMD_READ, NBD_CMD_CACHE] {
                assert_eq!(
                    error_of(header(kind, 0, 0, MAX_PAYLOAD_SIZE + 1), &s),
                    NBD_EINVAL
                );
                assert!(check_request(&header(kind, 0, 0, MAX_PAYLOAD_SIZE), &s).is_ok());
            }
            // Trim, write-zeroes and block status have no payload, so no maximum.
            for kind in [NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES] {
                assert!(check_request(&header(kind, 0, 0, u32::MAX), &s).is_ok());
            }
        }
    }

    #[test]
    fn writes_to_a_read_only_export_fail_with_eperm() {
        let s = Session {
            read_only: true,
            ..session()
        };
        for kind in [NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES] {
            assert_eq!(error_of(header(kind, 0, 0, 512), &s), NBD_EPERM);
        }
        assert!(check_request(&header(NBD_CMD_READ, 0, 0, 512), &s).is_ok());
        assert!(check_request(&header(NBD_CMD_FLUSH, 0, 0, 0), &s).is_ok());
    }

    #[test]
    fn unknown_commands_and_flags_fail_with_einval() {
        let s = session();
        for kind in [8, 9, 0x100, u16::MAX] {
            assert_eq!(error_of(header(kind, 0, 0, 0), &s), NBD_EINVAL);
        }
        // DF only with structured replies, where NBD_FLAG_SEND_DF is advertised.
        assert!(check_request(&header(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512), &s).is_ok());
        let simple = Session {
            structured: false,
            base_allocation: false,
            ..s
        };
        assert_eq!(
            error_of(header(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512), &simple),
            NBD_EINVAL
        );
        assert_eq!(
            error_of(header(NBD_CMD_READ, NBD_CMD_FLAG_REQ_ONE, 0, 512), &s),
            NBD_EINVAL
        );
        assert_eq!(
            error_of(header(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 512), &s),
            NBD_EINVAL
        );
        assert_eq!(
            error_of(header(NBD_CMD_BLOCK_STATUS, 1 << 15, 0, 512), &s),
            NBD_EINVAL
        );
        // FUA is accepted on every command.
        assert!(check_request(&header(NBD_CMD_READ, NBD_CMD_FLAG_FUA, 0, 512), &s).is_ok());
    }

    #[test]
    fn write_zeroes_flags_reach_the_backend_and_any_length_is_accepted() {
        let s = session();
        let zero = |flags, len| check_request(&header(NBD_CMD_WRITE_ZEROES, flags, 0, len), &s);
        let command = |may_unmap, fast_only, fua| {
            Ok(Command::WriteZeroes {
                offset: 0,
                len: 512,
                flags: ZeroFlags {
                    may_unmap,
                    fast_only,
                    fua,
                },
            })
        };
        assert_eq!(zero(0, 512), command(true, false, false));
        assert_eq!(
            zero(NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA, 512),
            command(false, false, true)
        );
        assert_eq!(
            zero(NBD_CMD_FLAG_FAST_ZERO, 512),
            command(true, true, false)
        );
        // Past the maximum payload size: no payload to bound, as with TRIM (QEMU's server
        // accepts these too); the disk's end still bounds it.
        let big = Session { size: 1 << 30, ..s };
        assert!(check_request(&header(NBD_CMD_WRITE_ZEROES, 0, 0, 64 << 20), &big).is_ok());
    }

    #[test]
    fn block_status_needs_a_context_and_a_length() {
        let s = session();
        assert_eq!(
            check_request(
                &header(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 0, 512),
                &s
            ),
            Ok(Command::BlockStatus {
                offset: 0,
                len: 512,
                req_one: true
            })
        );
        assert_eq!(
            error_of(header(NBD_CMD_BLOCK_STATUS, 0, 0, 0), &s),
            NBD_EINVAL
        );
        let no_context = Session {
            base_allocation: false,
            ..s
        };
        assert_eq!(
            error_of(header(NBD_CMD_BLOCK_STATUS, 0, 0, 512), &no_context),
            NBD_EINVAL
        );
    }

    #[test]
    fn disconnect_is_accepted_whatever_its_fields() {
        let s = session();
        assert_eq!(
            check_request(&header(NBD_CMD_DISC, 0xffff, u64::MAX, u32::MAX), &s),
            Ok(Command::Disconnect)
        );
    }

    fn run(len: u64, hole: bool, zero: bool) -> StatusRun {
        StatusRun { len, hole, zero }
    }

    #[test]
    fn extents_are_cut_to_the_request_and_merged() {
        let runs = [
            run(1000, false, false),
            run(24, false, false),
            run(4096, true, true),
            run(1 << 40, false, true),
        ];
        assert_eq!(
            extents_from_runs(&runs, 8192, false).unwrap(),
            vec![
                (1024, 0),
                (4096, NBD_STATE_HOLE | NBD_STATE_ZERO),
                (3072, NBD_STATE_ZERO)
            ]
        );
    }

    #[test]
    fn extents_with_req_one_hold_one_descriptor_within_the_request() {
        let runs = [
            run(100, false, false),
            run(100, false, false),
            run(100, true, true),
        ];
        assert_eq!(extents_from_runs(&runs, 150, true).unwrap(), vec![(150, 0)]);
        assert_eq!(
            extents_from_runs(&runs, 1000, true).unwrap(),
            vec![(200, 0)]
        );
    }

    #[test]
    fn extents_skip_empty_runs_and_refuse_an_empty_answer() {
        assert_eq!(
            extents_from_runs(&[run(0, true, true), run(10, true, true)], 100, false).unwrap(),
            vec![(10, 3)]
        );
        assert!(extents_from_runs(&[], 100, false).is_err());
        assert!(extents_from_runs(&[run(0, false, false)], 100, false).is_err());
    }

    #[test]
    fn extents_are_capped_in_number() {
        let runs: Vec<_> = (0..MAX_EXTENTS * 2)
            .map(|i| run(1, i % 2 == 0, false))
            .collect();
        assert_eq!(
            extents_from_runs(&runs, u32::MAX, false).unwrap().len(),
            MAX_EXTENTS
        );
    }
}

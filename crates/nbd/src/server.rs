//! Listeners, connections and shutdown: accepts clients on unix or TCP
//! sockets, runs negotiation then transmission for each, and stops them all
//! on request.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, ToSocketAddrs, UnixListener};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::export::{Export, ExportError, ExportTable};
use crate::handshake::{self, Outcome};
use crate::latch::Latch;
use crate::transmission::{self, Limits};
use crate::workers::BackendWorkers;

/// QEMU's default `handshake-max-seconds`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Tunables of a [`Server`].
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once. At the limit the listeners stop
    /// accepting, as QEMU's do: new clients wait in the socket's backlog
    /// until a connection closes. A stream handed to
    /// [`Server::serve_connection`] at the limit is closed at once. 0 means
    /// no limit, as in QEMU.
    pub max_connections: usize,
    /// Requests of one connection in flight at once; the server stops
    /// reading from a client that reaches it until replies go out.
    pub max_requests_per_connection: u32,
    /// Bytes of write payloads and read buffers one connection may hold at
    /// once; raised to the 32 MiB maximum request if set lower.
    pub max_bytes_per_connection: u32,
    /// How long a client may take to finish negotiating before it is disconnected (QEMU's
    /// `handshake-max-seconds`, 10 s by default); `None`: no limit. Without one, idle clients
    /// could hold every connection slot.
    pub handshake_timeout: Option<Duration>,
    /// How long a closing connection waits for its requests in flight before
    /// it drops their replies and closes anyway (a client that stopped
    /// reading its replies would otherwise hold shutdown up for ever).
    pub drain_timeout: Duration,
    /// Backend calls (reads, writes, ...; not flushes) run at once across all connections,
    /// each on one of the server's own threads; the others wait in arrival order. On two
    /// cores with a dozen guest requests in flight during a stream, letting them all run
    /// made the kernel's scheduler pick their order: bench/serve.py gave the guest a read
    /// p99 of 3.1-3.7 ms unlimited, 2.1-2.6 ms with 4 (QSD: 1.7-3.4 ms). 0 means no limit
    /// (each call then gets a thread of tokio's blocking pool).
    pub max_backend_calls: usize,
}

/// The default [`ServerConfig::max_backend_calls`]: two per core, at least 4.
fn default_backend_calls() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (2 * cores).max(4)
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 128,
            max_requests_per_connection: 64,
            max_bytes_per_connection: 64 * 1024 * 1024,
            handshake_timeout: Some(DEFAULT_HANDSHAKE_TIMEOUT),
            drain_timeout: Duration::from_secs(30),
            max_backend_calls: default_backend_calls(),
        }
    }
}

/// An NBD server: a table of exports and the listeners serving them.
///
/// Cheap to clone; clones are the same server. Exports can be added and
/// removed while it runs. [`shutdown`](Self::shutdown) stops every listener:
/// each connection stops reading requests, finishes those in flight (see
/// [`ServerConfig::drain_timeout`]), and is closed.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

struct Inner {
    config: ServerConfig,
    exports: ExportTable,
    shutdown: Latch,
    /// One permit per connection allowed by `max_connections`.
    slots: Arc<Semaphore>,
    connections: AtomicUsize,
    /// Woken when the last open connection closes.
    all_closed: Notify,
    /// `max_backend_calls` threads.
    backend_workers: Arc<BackendWorkers>,
}

/// A slot counted in [`Server::connections`] while it lives.
struct ConnectionSlot {
    inner: Arc<Inner>,
    _permit: OwnedSemaphorePermit,
}

impl ConnectionSlot {
    fn new(inner: &Arc<Inner>, permit: OwnedSemaphorePermit) -> Self {
        inner.connections.fetch_add(1, Ordering::AcqRel);
        ConnectionSlot {
            inner: Arc::clone(inner),
            _permit: permit,
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if self.inner.connections.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.all_closed.notify_waiters();
        }
    }
}

/// What the accept loop needs from a stream.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    async fn accept(&self) -> io::Result<Box<dyn Stream>> {
        Ok(match self {
            Listener::Unix(l) => Box::new(l.accept().await?.0),
            Listener::Tcp(l) => {
                let (stream, _) = l.accept().await?;
                // Replies are whole messages; the spec asks for no Nagle delay.
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
        })
    }
}

impl Server {
    pub fn new(config: ServerConfig) -> Self {
        let slots = match config.max_connections {
            0 => Semaphore::MAX_PERMITS,
            max => max.min(Semaphore::MAX_PERMITS),
        };
        let backend_workers = BackendWorkers::new(config.max_backend_calls).unwrap_or_else(|e| {
            warn!("no backend threads ({e}); backend calls use tokio's blocking pool");
            BackendWorkers::unlimited()
        });
        Server {
            inner: Arc::new(Inner {
                backend_workers: Arc::new(backend_workers),
                config,
                exports: ExportTable::default(),
                shutdown: Latch::new(),
                slots: Arc::new(Semaphore::new(slots)),
                connections: AtomicUsize::new(0),
                all_closed: Notify::new(),
            }),
        }
    }

    /// Offers `export` under `name` to new connections.
    pub fn add_export(&self, name: impl Into<String>, export: Export) -> Result<(), ExportError> {
        self.inner.exports.add(name.into(), export)
    }

    /// Stops offering the export `name`: it is no longer listed, and new
    /// connections cannot select it. Connections already using it keep
    /// serving it until their client disconnects or the server shuts down;
    /// the backend is dropped when the last of them closes.
    pub fn remove_export(&self, name: &str) -> Option<Arc<Export>> {
        self.inner.exports.remove(name)
    }

    /// Removes the export `name` as [`remove_export`](Self::remove_export)
    /// does, and also closes every connection using it (QEMU's
    /// `block-export-del` in `hard` mode): each stops reading requests,
    /// finishes those in flight, and is closed.
    pub fn close_export(&self, name: &str) -> Option<Arc<Export>> {
        let export = self.inner.exports.remove(name)?;
        export.clients.closed.trip();
        Some(export)
    }

    /// Connections in transmission on the export `name` (0 if there is none).
    pub fn export_clients(&self, name: &str) -> usize {
        self.inner
            .exports
            .get(name)
            .map_or(0, |export| export.clients.count())
    }

    /// Names of the exports offered, sorted.
    pub fn export_names(&self) -> Vec<String> {
        self.inner
            .exports
            .list()
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    }

    /// Connections open now, in negotiation or transmission.
    pub fn connections(&self) -> usize {
        self.inner.connections.load(Ordering::Acquire)
    }

    /// Asks every listener and connection to stop; see [`Server`].
    pub fn shutdown(&self) {
        self.inner.shutdown.trip();
    }

    pub fn is_shut_down(&self) -> bool {
        self.inner.shutdown.is_tripped()
    }

    /// Completes once no connection is open. After [`shutdown`](Self::shutdown) that is once
    /// every connection has answered the requests it had in flight (or given up on a client
    /// that reads no replies, after [`ServerConfig::drain_timeout`]): a daemon waits for this
    /// before its last flush, so that every write it answered is covered by it.
    pub async fn wait_closed(&self) {
        loop {
            let notified = self.inner.all_closed.notified();
            tokio::pin!(notified);
            // Registered before the count is read: a close in between still wakes us.
            notified.as_mut().enable();
            if self.connections() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Binds a unix socket at `path` and serves it until shutdown, then
    /// removes the socket. Fails if `path` exists.
    pub async fn serve_unix(&self, path: impl AsRef<Path>) -> io::Result<()> {
        let path = path.as_ref();
        let listener = UnixListener::bind(path)?;
        let served = self.serve_unix_listener(listener).await;
        let _ = std::fs::remove_file(path);
        served
    }

    /// Serves an already bound unix socket until shutdown.
    pub async fn serve_unix_listener(&self, listener: UnixListener) -> io::Result<()> {
        self.accept_loop(Listener::Unix(listener)).await
    }

    /// Binds `addr` and serves it until shutdown.
    pub async fn serve_tcp(&self, addr: impl ToSocketAddrs) -> io::Result<()> {
        self.serve_tcp_listener(TcpListener::bind(addr).await?)
            .await
    }

    /// Serves an already bound TCP socket until shutdown.
    pub async fn serve_tcp_listener(&self, listener: TcpListener) -> io::Result<()> {
        self.accept_loop(Listener::Tcp(listener)).await
    }

    /// Serves one client on a stream accepted elsewhere, until it leaves or
    /// the server shuts down. Counts against `max_connections`.
    pub async fn serve_connection<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if let Some(slot) = self.admit() {
            self.serve_admitted(stream, slot).await;
        }
    }

    fn admit(&self) -> Option<ConnectionSlot> {
        match Arc::clone(&self.inner.slots).try_acquire_owned() {
            Ok(permit) => Some(ConnectionSlot::new(&self.inner, permit)),
            Err(_) => {
                let max = self.inner.config.max_connections;
                warn!(max, "NBD connection refused: too many connections");
                None
            }
        }
    }

    async fn accept_loop(&self, listener: Listener) -> io::Result<()> {
        let shutdown = &self.inner.shutdown;
        let mut connections = JoinSet::new();
        let mut free_slot = None;
        while !shutdown.is_tripped() {
            // At the limit, stop accepting until a connection closes (as QEMU
            // does): clients wait in the backlog instead of being turned away.
            let permit = match free_slot.take() {
                Some(permit) => permit,
                None => tokio::select! {
                    // The semaphore is never closed.
                    Ok(permit) = Arc::clone(&self.inner.slots).acquire_owned() => permit,
                    () = shutdown.tripped() => break,
                    Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                },
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = shutdown.tripped() => break,
                // Reap finished connections so the set does not grow.
                Some(_) = connections.join_next(), if !connections.is_empty() => {
                    free_slot = Some(permit);
                    continue;
                }
            };
            let stream = match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait, then go on.
                    warn!(error = %e, "cannot accept NBD connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    free_slot = Some(permit);
                    continue;
                }
            };
            let slot = ConnectionSlot::new(&self.inner, permit);
            let server = self.clone();
            connections.spawn(async move { server.serve_admitted(stream, slot).await });
        }
        info!(
            open = connections.len(),
            "NBD listener stopped, waiting for connections to close"
        );
        while connections.join_next().await.is_some() {}
        Ok(())
    }

    async fn serve_admitted<S>(&self, mut stream: S, _slot: ConnectionSlot)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let shutdown = &self.inner.shutdown;
        // Shutdown during negotiation just closes: nothing is in flight yet.
        let deadline = async {
            match self.inner.config.handshake_timeout {
                Some(limit) => tokio::time::sleep(limit).await,
                None => std::future::pending().await,
            }
        };
        let negotiated = tokio::select! {
            outcome = handshake::negotiate(&mut stream, &self.inner.exports) => outcome,
            () = shutdown.tripped() => return,
            () = deadline => {
                debug!("NBD client did not finish negotiating in time: disconnected");
                return;
            }
        };
        let negotiated = match negotiated {
            Ok(Outcome::Transmission(negotiated)) => negotiated,
            Ok(Outcome::Closed) => return,
            Err(e) => {
                debug!(error = %e, "NBD negotiation ended");
                return;
            }
        };
        let config = &self.inner.config;
        let limits = Limits {
            max_requests: config.max_requests_per_connection.max(1),
            max_bytes: config.max_bytes_per_connection,
            drain_timeout: config.drain_timeout,
            workers: Arc::clone(&self.inner.backend_workers),
        };
        transmission::serve(stream, negotiated, limits, shutdown.clone()).await;
    }
}

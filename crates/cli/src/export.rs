//! The guest's disk as an NBD export: the block layer's `Disk` behind the NBD server's backend
//! trait. The NBD server knows nothing of image formats; this is where the two meet.

use imgstream_block::{Disk, Error};
use imgstream_nbd::{
    BackendError, Export, ExportBackend, Server, ServerConfig, StatusRun, ZeroFlags,
};
use imgstream_qmp::{NbdAddr, NbdHost};
use std::sync::Arc;

/// Most status runs returned for one BLOCK_STATUS request.
const MAX_STATUS_RUNS: usize = 64;

/// A disk served over NBD.
pub struct DiskExport {
    disk: Arc<Disk>,
}

impl DiskExport {
    pub fn new(disk: Arc<Disk>) -> Self {
        DiskExport { disk }
    }
}

fn backend_error(error: Error) -> BackendError {
    BackendError::new(error.errno(), error.to_string())
}

impl ExportBackend for DiskExport {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.disk.read(offset, buf).map_err(backend_error)
    }

    fn read_if_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool, BackendError> {
        self.disk.read_if_cached(offset, buf).map_err(backend_error)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.disk.write(offset, data, fua).map_err(backend_error)
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), BackendError> {
        // Zero clusters read as zeroes without allocation; NO_HOLE is only a "should" in the
        // NBD spec, and the guest-visible result is the same.
        if flags.fast_only {
            self.disk
                .write_zeroes_without_fallback(offset, len, flags.fua)
        } else {
            self.disk.write_zeroes(offset, len, flags.fua)
        }
        .map_err(backend_error)
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.disk.discard(offset, len).map_err(backend_error)
    }

    fn flush(&self) -> Result<(), BackendError> {
        self.disk.flush().map_err(backend_error)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<StatusRun>, BackendError> {
        let end = offset.saturating_add(len).min(self.disk.size());
        let mut runs = Vec::new();
        let mut pos = offset;
        while pos < end && runs.len() < MAX_STATUS_RUNS {
            let status = self
                .disk
                .block_status(pos, end - pos)
                .map_err(backend_error)?;
            // QEMU's NBD server sets HOLE wherever the chain has no data (zero clusters and
            // holes of a raw base included), so `qemu-img map` over NBD agrees with a map of
            // the file; "defined by some layer" is not what a client means by allocated.
            runs.push(StatusRun {
                len: status.length,
                hole: !status.data,
                zero: status.zero,
            });
            pos += status.length;
        }
        Ok(runs)
    }
}

/// The NBD server as the QMP commands drive it: started, stopped and given exports at run
/// time (`nbd-server-start`, `block-export-add`, and their command-line forms).
pub struct NbdServerHost {
    runtime: tokio::runtime::Handle,
    running: std::sync::Mutex<Option<Running>>,
    /// Servers stopped whose connections may still be answering requests in flight.
    stopping: std::sync::Mutex<Vec<Server>>,
}

struct Running {
    server: Server,
    unix_path: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for NbdServerHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServerHost")
            .field("running", &self.running().is_some())
            .finish()
    }
}

impl NbdServerHost {
    /// A host whose listeners run on `runtime`.
    pub fn new(runtime: tokio::runtime::Handle) -> Self {
        NbdServerHost {
            runtime,
            running: std::sync::Mutex::new(None),
            stopping: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops the server if it runs (daemon shutdown).
    pub fn shutdown(&self) {
        NbdHost::stop(self);
    }

    /// Completes once every stopped server's connections have closed, having answered the
    /// requests they had in flight: the daemon's last flush comes after this.
    pub async fn wait_closed(&self) {
        let stopping =
            std::mem::take(&mut *self.stopping.lock().unwrap_or_else(|p| p.into_inner()));
        for server in stopping {
            server.wait_closed().await;
        }
    }
}

/// Binds a unix socket, replacing a stale socket file (never another kind of file).
fn bind_unix(path: &std::path::Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    std::os::unix::net::UnixListener::bind(path)
}

impl NbdHost for NbdServerHost {
    fn start(
        &self,
        addr: &NbdAddr,
        max_connections: u32,
        handshake_timeout: Option<std::time::Duration>,
    ) -> Result<(), String> {
        let mut running = self.running();
        let server = Server::new(ServerConfig {
            max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
            handshake_timeout,
            ..ServerConfig::default()
        });
        let _guard = self.runtime.enter();
        let unix_path = match addr {
            NbdAddr::Unix(path) => {
                let listener = bind_unix(path).map_err(|e| {
                    format!(
                        "Failed to bind socket to {}: {}",
                        path.display(),
                        errno_text(&e)
                    )
                })?;
                listener.set_nonblocking(true).map_err(|e| e.to_string())?;
                let listener =
                    tokio::net::UnixListener::from_std(listener).map_err(|e| e.to_string())?;
                let task_server = server.clone();
                self.runtime
                    .spawn(async move { task_server.serve_unix_listener(listener).await });
                Some(path.clone())
            }
            NbdAddr::Inet { host, port } => {
                let listener = std::net::TcpListener::bind(format!("{host}:{port}"))
                    .map_err(|e| format!("Failed to bind socket: {}", errno_text(&e)))?;
                listener.set_nonblocking(true).map_err(|e| e.to_string())?;
                let listener =
                    tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
                let task_server = server.clone();
                self.runtime
                    .spawn(async move { task_server.serve_tcp_listener(listener).await });
                None
            }
        };
        *running = Some(Running { server, unix_path });
        Ok(())
    }

    fn stop(&self) {
        if let Some(running) = self.running().take() {
            running.server.shutdown();
            self.stopping
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(running.server.clone());
            if let Some(path) = running.unix_path {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    fn add_export(&self, name: &str, disk: Arc<Disk>, writable: bool) -> Result<(), String> {
        let running = self.running();
        let running = running.as_ref().ok_or("NBD server not running")?;
        let export = Export::new(Arc::new(DiskExport::new(disk))).read_only(!writable);
        running
            .server
            .add_export(name.to_string(), export)
            .map_err(|e| e.to_string())
    }

    fn remove_export(&self, name: &str, disconnect_clients: bool) {
        if let Some(running) = self.running().as_ref() {
            if disconnect_clients {
                running.server.close_export(name);
            } else {
                running.server.remove_export(name);
            }
        }
    }

    fn export_connections(&self, name: &str) -> usize {
        self.running()
            .as_ref()
            .map_or(0, |running| running.server.export_clients(name))
    }
}

/// An I/O error's text without Rust's "(os error N)" suffix, as QEMU prints strerror.
fn errno_text(error: &std::io::Error) -> String {
    let text = error.to_string();
    text.split(" (os error").next().unwrap_or(&text).to_string()
}

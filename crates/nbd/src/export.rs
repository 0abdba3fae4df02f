//! What the server serves: the backend trait a disk implements, and the
//! table of named exports that the handshake looks names up in.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::latch::Latch;
use crate::protocol::nbd_error_from_errno;

/// A failure of a backend call: an errno for the wire, and a message for the
/// client (sent in structured error replies) and the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (errno {errno})")]
pub struct BackendError {
    /// A host errno such as `libc::EIO`; see [`crate::nbd_error_from_errno`].
    pub errno: i32,
    /// What went wrong, for a human.
    pub message: String,
}

impl BackendError {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        BackendError {
            errno,
            message: message.into(),
        }
    }

    /// The NBD error value this failure is reported as.
    pub fn nbd_error(&self) -> u32 {
        nbd_error_from_errno(self.errno)
    }
}

/// Allocation status of a run of bytes, as reported by
/// [`ExportBackend::block_status`] and sent in the `base:allocation` context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRun {
    /// Length of the run in bytes; runs of length 0 are ignored.
    pub len: u64,
    /// No storage is allocated for the run (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// The run reads as zeroes (`NBD_STATE_ZERO`).
    pub zero: bool,
}

/// What an export needs from the disk behind it.
///
/// Calls are blocking and must be thread-safe: the server runs them on its
/// own backend threads (`ServerConfig::max_backend_calls`; tokio's blocking
/// pool if those cannot be started), several at once for one connection and
/// across connections. The server checks every range against [`size`](Self::size)
/// before calling, so a backend sees only ranges inside the disk, and checks
/// the read-only flag of the [`Export`] before any write.
///
/// The server advertises `NBD_FLAG_CAN_MULTI_CONN`, so [`flush`](Self::flush)
/// must make durable every write completed so far through *any* caller,
/// not only the writes of one connection.
pub trait ExportBackend: Send + Sync + 'static {
    /// Size of the disk in bytes; must not change while the export is served.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError>;
    /// [`read`](Self::read) if it can be done at once, without waiting for a lock or the
    /// device; `Ok(false)` otherwise (then `buf` holds nothing useful). Called on the server's
    /// event loop, which then needs no thread for the read: it must not block.
    fn read_if_cached(&self, _offset: u64, _buf: &mut [u8]) -> Result<bool, BackendError> {
        Ok(false)
    }
    /// Writes `data` at `offset`; with `fua`, durably before returning.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError>;
    /// Makes `len` bytes at `offset` read as zeroes, as `flags` allow.
    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), BackendError>;
    /// Hints that `len` bytes at `offset` are no longer needed; their
    /// content afterwards is unspecified.
    fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), BackendError>;
    /// Allocation status from `offset` for up to `len` bytes: at least one
    /// run, in order, starting at `offset`. Runs may cover less than `len`
    /// (the client asks again from where they end) or more (the excess is cut).
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<StatusRun>, BackendError>;
    /// Hints that `len` bytes at `offset` will be read soon.
    fn cache(&self, _offset: u64, _len: u64) -> Result<(), BackendError> {
        Ok(())
    }
}

/// How a WRITE_ZEROES request may make its range read as zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroFlags {
    /// The range may be deallocated; without it, it should stay allocated (the client sent
    /// `NBD_CMD_FLAG_NO_HOLE`).
    pub may_unmap: bool,
    /// Only if that is faster than writing zeroes (`NBD_CMD_FLAG_FAST_ZERO`); otherwise fail
    /// with `ENOTSUP` at once, having changed nothing, and the client writes them itself.
    pub fast_only: bool,
    /// Durably before returning (`NBD_CMD_FLAG_FUA`).
    pub fua: bool,
}

/// A disk offered to clients under a name.
#[derive(Clone)]
pub struct Export {
    pub backend: Arc<dyn ExportBackend>,
    /// Clients may not change the disk: writes, trims and zeroes fail with
    /// `NBD_EPERM`, and `NBD_FLAG_READ_ONLY` is advertised.
    pub read_only: bool,
    /// Shown to humans by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: Option<String>,
    /// Its clients and whether they are being sent away; shared by clones.
    pub(crate) clients: Arc<ExportClients>,
}

/// The connections in transmission on one export, and the signal that closes them.
#[derive(Debug, Default)]
pub(crate) struct ExportClients {
    count: AtomicUsize,
    /// Tripped when the export is removed in hard mode: every connection on it closes.
    pub(crate) closed: Latch,
}

/// A connection counted in its export's clients while it lives.
pub(crate) struct ClientSlot(Arc<ExportClients>);

impl ExportClients {
    pub(crate) fn join(self: &Arc<Self>) -> ClientSlot {
        self.count.fetch_add(1, Ordering::AcqRel);
        ClientSlot(Arc::clone(self))
    }

    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Export {
    pub fn new(backend: Arc<dyn ExportBackend>) -> Self {
        Export {
            backend,
            read_only: false,
            description: None,
            clients: Arc::default(),
        }
    }

    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }
}

impl fmt::Debug for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export")
            .field("size", &self.backend.size())
            .field("read_only", &self.read_only)
            .field("description", &self.description)
            .finish()
    }
}

/// Why an export could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("An export named {0:?} already exists")]
    AlreadyExists(String),
    #[error("Export name {0:?} is longer than the protocol's 4096 bytes")]
    NameTooLong(String),
}

/// The exports a server offers, by name. Cheap to clone; clones share the table.
#[derive(Clone, Default)]
pub(crate) struct ExportTable {
    exports: Arc<RwLock<BTreeMap<String, Arc<Export>>>>,
}

impl ExportTable {
    pub(crate) fn add(&self, name: String, export: Export) -> Result<(), ExportError> {
        if name.len() > crate::protocol::NBD_MAX_STRING_SIZE {
            return Err(ExportError::NameTooLong(name));
        }
        let mut exports = self.write();
        if exports.contains_key(&name) {
            return Err(ExportError::AlreadyExists(name));
        }
        exports.insert(name, Arc::new(export));
        Ok(())
    }

    pub(crate) fn remove(&self, name: &str) -> Option<Arc<Export>> {
        self.write().remove(name)
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.read().get(name).cloned()
    }

    /// Names and descriptions, sorted by name.
    pub(crate) fn list(&self) -> Vec<(String, Option<String>)> {
        self.read()
            .iter()
            .map(|(name, export)| (name.clone(), export.description.clone()))
            .collect()
    }

    // The table holds no invariant a panicking writer could break halfway,
    // so a poisoned lock is still a good table.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Export>>> {
        self.exports.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Export>>> {
        self.exports.write().unwrap_or_else(|e| e.into_inner())
    }
}

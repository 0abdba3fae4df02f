//! The daemon's shared state: block nodes (each a layer of an open disk), the job registry,
//! the exports, the event bus every monitor listens to, and the quit signal.

use crate::events::job_event;
use crate::json::Json;
use crate::wire::Timestamp;
use imgstream_block::{Disk, Layer};
use imgstream_jobs::{Job, JobEvent, JobStatus};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use tokio::sync::{broadcast, watch};

/// Events kept for a monitor that reads slowly; one that falls further behind loses the
/// oldest ones (and is told so in the log), and never holds up the others.
pub const EVENT_BACKLOG: usize = 4096;

/// An event as it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: String,
    pub data: Json,
    pub timestamp: Timestamp,
}

/// Why the daemon's setup calls failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("Invalid node name '{0}'")]
    InvalidNodeName(String),
    #[error("Duplicate nodes with node-name='{0}'")]
    DuplicateNode(String),
    #[error("Cannot find node-name='{0}'")]
    NoSuchNode(String),
    #[error("Export '{0}' already exists")]
    DuplicateExport(String),
}

/// A named block node: one layer of an open disk.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub disk: Arc<Disk>,
    pub layer: Arc<Layer>,
    /// The protocol node this format node reads through, when it was named by reference.
    pub file: Option<String>,
    /// Creation order among all nodes (protocol and format), as QEMU lists them.
    pub seq: u64,
    /// Whether `backing` was given (a node or null) rather than opened from the header: QEMU
    /// then names the node with a `json:` filename unless the header names that backing.
    pub explicit_backing: bool,
    /// The layers under this one when the node was made. A stream that drops the node from its
    /// disk's chain leaves it this backing, as QEMU leaves a dropped node its backing link.
    /// Weak: the nodes that hold those layers keep them open, and deleting them closes them.
    pub below_when_made: Vec<Weak<Layer>>,
}

/// A protocol node (`driver=file`): a path and its options; the format node above it opens
/// the file.
#[derive(Debug, Clone)]
pub struct ProtocolNode {
    pub name: String,
    pub path: PathBuf,
    pub read_only: bool,
    pub direct: bool,
    pub seq: u64,
}

/// Where the NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    Unix(PathBuf),
    Inet { host: String, port: String },
}

/// The NBD server as the QMP commands drive it; the binary provides it (this crate knows no
/// NBD).
pub trait NbdHost: Send + Sync + std::fmt::Debug {
    /// Starts listening at `addr`.
    /// Starts listening at `addr`, serving at most `max_connections` clients, each given
    /// `handshake_timeout` to negotiate (`None`: no limit).
    fn start(
        &self,
        addr: &NbdAddr,
        max_connections: u32,
        handshake_timeout: Option<std::time::Duration>,
    ) -> Result<(), String>;
    /// Stops listening and drops every export.
    fn stop(&self);
    /// Offers `disk` as export `name`.
    fn add_export(&self, name: &str, disk: Arc<Disk>, writable: bool) -> Result<(), String>;
    /// Stops offering export `name`. With `disconnect_clients` (`block-export-del` in `hard`
    /// mode) its connections are closed too, after the requests they have in flight;
    /// otherwise they keep being served until their clients leave.
    fn remove_export(&self, name: &str, disconnect_clients: bool);
    /// Connections using export `name` now.
    fn export_connections(&self, name: &str) -> usize;
}

impl Node {
    /// Where the layer is in its disk's chain now (0 = top), or `None` once a stream job
    /// removed it from the chain.
    pub fn depth(&self) -> Option<usize> {
        self.disk
            .layers()
            .iter()
            .position(|l| Arc::ptr_eq(l, &self.layer))
    }

    /// The node's layer and those under it: in its disk's chain now, or, once a stream dropped
    /// it from that chain, as they were when the node was made.
    pub fn chain(&self) -> Vec<Arc<Layer>> {
        let layers = self.disk.layers();
        match self.depth() {
            Some(depth) => layers[depth..].to_vec(),
            None => std::iter::once(self.layer.clone())
                .chain(self.below_when_made.iter().map_while(Weak::upgrade))
                .collect(),
        }
    }
}

/// An export as `query-block-exports` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub id: String,
    pub node: String,
    pub writable: bool,
    /// The name NBD clients ask for.
    pub name: String,
}

/// A job in the registry, from creation until it reaches `null`.
#[derive(Debug, Clone)]
pub(crate) struct JobEntry {
    pub id: String,
    pub job: Job,
    /// The layers the job reads or writes (top down to the lowest copied one): the nodes it
    /// makes busy.
    pub layers: Vec<Arc<Layer>>,
    /// The name reserved by `filter-node-name`.
    pub filter: Option<String>,
}

/// Everything the monitors share.
#[derive(Debug)]
pub struct Daemon {
    nodes: Mutex<Vec<Node>>,
    jobs: Mutex<Vec<JobEntry>>,
    exports: Mutex<Vec<ExportInfo>>,
    protocol_nodes: Mutex<Vec<ProtocolNode>>,
    next_seq: AtomicU64,
    nbd_host: OnceLock<Arc<dyn NbdHost>>,
    nbd_addr: Mutex<Option<NbdAddr>>,
    events: broadcast::Sender<Arc<Event>>,
    quit: watch::Sender<bool>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.`, `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

impl Daemon {
    pub fn new() -> Arc<Daemon> {
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        let (quit, _) = watch::channel(false);
        Arc::new(Daemon {
            nodes: Mutex::new(Vec::new()),
            jobs: Mutex::new(Vec::new()),
            exports: Mutex::new(Vec::new()),
            protocol_nodes: Mutex::new(Vec::new()),
            next_seq: AtomicU64::new(0),
            nbd_host: OnceLock::new(),
            nbd_addr: Mutex::new(None),
            events,
            quit,
        })
    }

    /// Registers an open disk: its top as node `node_name`, its backing layers as
    /// `node_name.1`, `node_name.2`, ... (see [`Daemon::rename_node`] to name them otherwise).
    pub fn add_chain(&self, node_name: &str, disk: Arc<Disk>) -> Result<(), StateError> {
        if !id_wellformed(node_name) {
            return Err(StateError::InvalidNodeName(node_name.into()));
        }
        let mut nodes = lock(&self.nodes);
        let layers = disk.layers();
        let names: Vec<String> = (0..layers.len())
            .map(|depth| match depth {
                0 => node_name.to_string(),
                _ => format!("{node_name}.{depth}"),
            })
            .collect();
        if let Some(taken) = names.iter().find(|n| nodes.iter().any(|x| &x.name == *n)) {
            return Err(StateError::DuplicateNode(taken.clone()));
        }
        // Backing images first, as QSD users add them: listed newest first, the top leads.
        let count = layers.len() as u64;
        let first = self.next_seq.fetch_add(count, Ordering::Relaxed);
        for (depth, name) in names.into_iter().enumerate() {
            nodes.push(Node {
                name,
                disk: disk.clone(),
                layer: layers[depth].clone(),
                file: None,
                seq: first + count - 1 - depth as u64,
                explicit_backing: false,
                below_when_made: layers[depth + 1..].iter().map(Arc::downgrade).collect(),
            });
        }
        Ok(())
    }

    /// Gives node `old` the name `new` (e.g. `top.1` → `mid`, as QSD users name every
    /// `--blockdev`).
    pub fn rename_node(&self, old: &str, new: &str) -> Result<(), StateError> {
        if !id_wellformed(new) {
            return Err(StateError::InvalidNodeName(new.into()));
        }
        let mut nodes = lock(&self.nodes);
        if nodes.iter().any(|n| n.name == new) {
            return Err(StateError::DuplicateNode(new.into()));
        }
        let node = nodes
            .iter_mut()
            .find(|n| n.name == old)
            .ok_or_else(|| StateError::NoSuchNode(old.into()))?;
        node.name = new.to_string();
        Ok(())
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<Node> {
        lock(&self.nodes).iter().find(|n| n.name == name).cloned()
    }

    /// All nodes, in the order they were added.
    pub fn nodes(&self) -> Vec<Node> {
        lock(&self.nodes).clone()
    }

    /// The name of the node holding `layer`.
    pub fn node_name_of(&self, layer: &Arc<Layer>) -> Option<String> {
        lock(&self.nodes)
            .iter()
            .find(|n| Arc::ptr_eq(&n.layer, layer))
            .map(|n| n.name.clone())
    }

    /// Records an export of `node` for `query-block-exports`.
    pub fn add_export(&self, id: &str, node: &str, writable: bool) -> Result<(), StateError> {
        if self.node(node).is_none() {
            return Err(StateError::NoSuchNode(node.into()));
        }
        let mut exports = lock(&self.exports);
        if exports.iter().any(|e| e.id == id) {
            return Err(StateError::DuplicateExport(id.into()));
        }
        exports.push(ExportInfo {
            id: id.into(),
            node: node.into(),
            writable,
            name: node.into(),
        });
        Ok(())
    }

    /// Forgets an export; returns whether it existed.
    pub fn remove_export(&self, id: &str) -> bool {
        let mut exports = lock(&self.exports);
        let before = exports.len();
        exports.retain(|e| e.id != id);
        exports.len() != before
    }

    pub fn exports(&self) -> Vec<ExportInfo> {
        lock(&self.exports).clone()
    }

    /// A sequence number for a new node (creation order).
    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether any node, protocol or format, is called `name`.
    pub fn has_node(&self, name: &str) -> bool {
        self.node(name).is_some() || self.protocol_node(name).is_some()
    }

    pub fn protocol_node(&self, name: &str) -> Option<ProtocolNode> {
        lock(&self.protocol_nodes)
            .iter()
            .find(|n| n.name == name)
            .cloned()
    }

    pub fn protocol_nodes(&self) -> Vec<ProtocolNode> {
        lock(&self.protocol_nodes).clone()
    }

    pub(crate) fn insert_protocol_node(&self, node: ProtocolNode) {
        lock(&self.protocol_nodes).push(node);
    }

    pub(crate) fn insert_node(&self, node: Node) {
        lock(&self.nodes).push(node);
    }

    /// Removes node `name` (protocol or format); returns whether it existed.
    pub(crate) fn remove_node(&self, name: &str) -> bool {
        let mut nodes = lock(&self.nodes);
        let before = nodes.len();
        nodes.retain(|n| n.name != name);
        if nodes.len() != before {
            return true;
        }
        drop(nodes);
        let mut files = lock(&self.protocol_nodes);
        let before = files.len();
        files.retain(|n| n.name != name);
        files.len() != before
    }

    pub(crate) fn insert_export(&self, export: ExportInfo) {
        lock(&self.exports).push(export);
    }

    /// Installs the NBD server the export commands drive (once, at startup).
    pub fn set_nbd_host(&self, host: Arc<dyn NbdHost>) {
        let _ = self.nbd_host.set(host);
    }

    pub fn nbd_host(&self) -> Option<Arc<dyn NbdHost>> {
        self.nbd_host.get().cloned()
    }

    /// Records that the NBD server listens at `addr` (started outside `nbd-server-start`).
    pub fn set_nbd_running(&self, addr: NbdAddr) {
        *lock(&self.nbd_addr) = Some(addr);
    }

    pub(crate) fn nbd_addr(&self) -> MutexGuard<'_, Option<NbdAddr>> {
        lock(&self.nbd_addr)
    }

    /// A receiver of every event emitted from now on.
    pub fn events(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    /// Sends an event to every negotiated monitor, stamped now.
    pub fn emit(&self, name: &str, data: Json) {
        let event = Event {
            name: name.to_string(),
            data,
            timestamp: Timestamp::now(),
        };
        // No receiver (no monitor connected) is not an error.
        let _ = self.events.send(Arc::new(event));
    }

    /// Asks the daemon to stop (QMP `quit`).
    pub fn request_quit(&self) {
        self.quit.send_replace(true);
    }

    pub fn is_quit_requested(&self) -> bool {
        *self.quit.borrow()
    }

    /// Resolves once `quit` was requested.
    pub async fn quit_requested(&self) {
        let mut rx = self.quit.subscribe();
        // The sender lives as long as `self`, so this cannot fail while we wait.
        let _ = rx.wait_for(|q| *q).await;
    }

    // The job registry. Listeners run with the job's own lock held and take the registry
    // lock (to drop a job at `null`), so no code may call into a job while holding the
    // registry lock: callers get clones.

    /// Cancels every job and waits until each has concluded (QEMU's quit does this before
    /// exiting): no header changes, images left valid. Blocking.
    pub fn cancel_all_jobs(&self) {
        let jobs = self.jobs();
        for entry in &jobs {
            let _ = entry.job.cancel();
        }
        for entry in &jobs {
            entry.job.wait_concluded();
        }
    }

    pub(crate) fn jobs(&self) -> Vec<JobEntry> {
        lock(&self.jobs).clone()
    }

    pub(crate) fn job(&self, id: &str) -> Option<Job> {
        lock(&self.jobs)
            .iter()
            .find(|j| j.id == id)
            .map(|j| j.job.clone())
    }

    pub(crate) fn jobs_locked(&self) -> MutexGuard<'_, Vec<JobEntry>> {
        lock(&self.jobs)
    }

    /// The listener a job reports through: its events become QMP events, and the job leaves
    /// the registry when it reaches `null`.
    pub(crate) fn job_listener(self: &Arc<Self>) -> Arc<dyn Fn(&JobEvent) + Send + Sync> {
        let daemon: Weak<Daemon> = Arc::downgrade(self);
        Arc::new(move |event: &JobEvent| {
            let Some(daemon) = daemon.upgrade() else {
                return;
            };
            // A job gone to `null` leaves the registry before the event says so: a client
            // that saw the event never finds it in query-block-jobs (as in QEMU).
            if let JobEvent::StatusChange {
                id,
                status: JobStatus::Null,
            } = event
            {
                lock(&daemon.jobs).retain(|j| &j.id != id);
            }
            let (name, data) = job_event(event);
            daemon.emit(name, data);
        })
    }
}

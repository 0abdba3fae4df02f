//! The QMP server: a control socket wire-compatible with QEMU's (qemu-storage-daemon 10.0.2),
//! so that QEMU's management clients drive imgstream unchanged. See `docs/qmp.md`.
//!
//! Layers: [`json`] and [`wire`] (bytes ↔ messages), [`qdict`] (the orders in which QEMU
//! looks at an object's members), [`args`] (QAPI argument checks),
//! [`commands`] (one handler per command), [`state`] (nodes, jobs, exports, events),
//! [`session`] (one monitor connection, and the socket server).

pub mod args;
pub mod commands;
pub mod error;
pub mod events;
pub mod json;
pub mod qdict;
pub mod qsd_args;
pub mod session;
pub mod state;
pub mod wire;

pub use error::{ErrorClass, QmpError};
pub use session::bind_unix_socket;
pub use state::{Daemon, Event, ExportInfo, NbdAddr, NbdHost, Node, ProtocolNode, StateError};

//! The NBD server: exports disks to clients such as QEMU over the Network
//! Block Device protocol (fixed newstyle negotiation, structured replies,
//! `base:allocation` block status, many requests in flight per connection,
//! several connections per export).
//!
//! The server knows nothing of image formats: it serves [`Export`]s, each
//! backed by an [`ExportBackend`] that the block layer implements.
//!
//! ```no_run
//! # async fn run(disk: std::sync::Arc<dyn imgstream_nbd::ExportBackend>) -> std::io::Result<()> {
//! use imgstream_nbd::{Export, Server, ServerConfig};
//!
//! let server = Server::new(ServerConfig::default());
//! server.add_export("disk", Export::new(disk).description("the guest's root disk")).unwrap();
//! // qemu -drive file=nbd:unix:/run/imgstream.sock:exportname=disk
//! server.serve_unix("/run/imgstream.sock").await
//! # }
//! ```

pub mod client;
mod export;
mod handshake;
mod latch;
pub mod protocol;
mod reply;
mod server;
mod transmission;
mod workers;

pub use export::{BackendError, Export, ExportBackend, ExportError, StatusRun, ZeroFlags};
pub use protocol::nbd_error_from_errno;
pub use server::{Server, ServerConfig, DEFAULT_HANDSHAKE_TIMEOUT};
pub use transmission::MAX_PAYLOAD_SIZE;

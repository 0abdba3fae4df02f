//! Shared helpers of the integration tests: fixtures built with qemu-img, oracles, the imgstream binary.

pub mod daemon;
pub mod damaged;
pub mod fixtures;
pub mod imgstream;
pub mod ondisk;
pub mod pagecache;
pub mod qemu;
pub mod tools;

/// Byte-size units for readable offsets.
pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

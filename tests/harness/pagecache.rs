//! What the kernel's page cache holds of a file, from `cachestat(2)` (Linux 6.5): how many of its
//! pages are dirty, i.e. written by someone and not yet written back. A file that an
//! `fdatasync` or `fsync` has covered since its last write has none, while a write that nobody
//! synced stays dirty until the kernel's own writeback takes it (after
//! `/proc/sys/vm/dirty_expire_centisecs`, 30 s by default, or past the background threshold):
//! that is how a test tells a flushed file from one that merely reads back right.

use anyhow::{bail, Context, Result};
use std::os::fd::AsRawFd;
use std::path::Path;

/// `__NR_cachestat`: the same number on every architecture (the unified syscall table).
const SYS_CACHESTAT: libc::c_long = 451;

/// `struct cachestat_range` of `<linux/mman.h>`; a length of 0 means up to the end of the file.
#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// `struct cachestat` of `<linux/mman.h>`, counted in pages; the kernel fills every field, we
/// read two.
#[repr(C)]
#[derive(Default)]
#[allow(dead_code)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Pages of `path` in the page cache that are dirty or still being written back.
pub fn unsynced_pages(path: &Path) -> Result<u64> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let range = CachestatRange { off: 0, len: 0 };
    let mut stat = Cachestat::default();
    // SAFETY: the descriptor is open for the call's duration, and both pointers are to live
    // structs laid out as the kernel's (`repr(C)`, five and two u64 fields); flags must be 0.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const CachestatRange,
            &mut stat as *mut Cachestat,
            0u32,
        )
    };
    if rc != 0 {
        bail!(
            "cachestat({}) failed: {} (it needs Linux 6.5 or later)",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(stat.nr_dirty + stat.nr_writeback)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_write_leaves_dirty_pages_until_fdatasync() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        file.write_all_at(&[7; 65536], 0).unwrap();
        assert!(unsynced_pages(&path).unwrap() > 0);
        file.sync_data().unwrap();
        assert_eq!(unsynced_pages(&path).unwrap(), 0);
    }
}

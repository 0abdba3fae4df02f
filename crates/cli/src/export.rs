//! The guest's disk as an NBD export: the block layer's `Disk` behind the NBD server's backend
//! trait. The NBD server knows nothing of image formats; this is where the two meet.

use imgstream_block::{Disk, Error};
use imgstream_nbd::{BackendError, ExportBackend, StatusRun};
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

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.disk.write(offset, data, fua).map_err(backend_error)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _may_unmap: bool,
        fua: bool,
    ) -> Result<(), BackendError> {
        // Zero clusters read as zeroes without allocation; NO_HOLE is only a "should" in the
        // NBD spec, and the guest-visible result is the same.
        self.disk
            .write_zeroes(offset, len, fua)
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

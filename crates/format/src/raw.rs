//! The raw format: guest offset N is byte N of the file; holes in the file read as zeroes.

use crate::error::{Error, Result};
use crate::{
    BackingRef, CheckReport, CreateOptions, Extent, FormatKind, FormatSpecific, ImageFormat,
    Mapping, OpenOptions, RepairMode, Storage,
};
use std::sync::Arc;

/// Guest requests are aligned to sectors; raw has no larger allocation unit.
const RAW_SECTOR: u64 = 512;

#[derive(Debug)]
pub struct Raw {
    storage: Arc<dyn Storage>,
    size: u64,
    writable: bool,
}

impl Raw {
    pub fn open(storage: Arc<dyn Storage>, options: OpenOptions) -> Result<Self> {
        let size = storage.len()?;
        Ok(Raw {
            storage,
            size,
            writable: options.writable,
        })
    }
}

/// Creates a sparse raw file of the requested size.
pub fn create(storage: &dyn Storage, options: &CreateOptions) -> Result<()> {
    if options.backing.is_some() {
        return Err(Error::unsupported(
            "Backing file specified, but the 'raw' format does not support backing files",
        ));
    }
    storage.set_len(options.size)
}

impl ImageFormat for Raw {
    fn kind(&self) -> FormatKind {
        FormatKind::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> u64 {
        RAW_SECTOR
    }

    fn backing(&self) -> Option<BackingRef> {
        None
    }

    fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn format_specific(&self) -> FormatSpecific {
        FormatSpecific::Raw
    }

    fn map(&self, offset: u64, max_length: u64) -> Result<Extent> {
        let wanted = max_length.min(self.size.saturating_sub(offset));
        if wanted == 0 {
            return Err(Error::invalid(format!(
                "Offset {offset} is past the end of the image ({} bytes)",
                self.size
            )));
        }
        let (is_data, end) = self
            .storage
            .data_or_hole(offset)?
            .unwrap_or((true, u64::MAX));
        let length = end.saturating_sub(offset).clamp(1, wanted);
        let mapping = if is_data {
            Mapping::Data {
                host_offset: offset,
                in_place: true,
            }
        } else {
            Mapping::Zero {
                host_offset: Some(offset),
            }
        };
        Ok(Extent { mapping, length })
    }

    fn allocate_clusters(&self, _count: u64) -> Result<u64> {
        Err(Error::unsupported(
            "The raw format maps every offset in place and never allocates",
        ))
    }

    fn map_clusters(&self, _guest: u64, _host: u64, _count: u64) -> Result<()> {
        Err(Error::unsupported(
            "The raw format maps every offset in place and never allocates",
        ))
    }

    fn zero_clusters(&self, guest_offset: u64, count: u64) -> Result<bool> {
        let len = count * RAW_SECTOR;
        if !self.storage.punch_hole(guest_offset, len)? {
            self.storage
                .write_at(guest_offset, &vec![0; len as usize])?;
        }
        Ok(true)
    }

    fn unmap_clusters(&self, _guest: u64, _count: u64) -> Result<bool> {
        Ok(false)
    }

    fn flush(&self) -> Result<()> {
        self.storage.flush()
    }

    fn set_backing(&self, backing: Option<&BackingRef>) -> Result<()> {
        self.check_backing(backing)
    }

    fn check_backing(&self, _backing: Option<&BackingRef>) -> Result<()> {
        Err(Error::unsupported(
            "The raw format cannot record a backing file",
        ))
    }

    fn check(&self, _repair: RepairMode) -> Result<CheckReport> {
        Err(Error::unsupported(
            "This image format does not support checks",
        ))
    }

    fn in_place(&self) -> bool {
        true
    }
}

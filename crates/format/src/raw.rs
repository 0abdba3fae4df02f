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
        // The last sector of a file whose size it does not fill ends at the file's end: zeroes
        // written past it would grow the file.
        let len = (count * RAW_SECTOR).min(self.size.saturating_sub(guest_offset));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recording::MemoryStorage;

    /// A file on a file system that cannot punch holes: the trait's default refuses.
    #[derive(Debug)]
    struct NoPunch(MemoryStorage);

    impl Storage for NoPunch {
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            self.0.read_at(offset, buf)
        }
        fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
            self.0.write_at(offset, buf)
        }
        fn flush(&self) -> Result<()> {
            self.0.flush()
        }
        fn len(&self) -> Result<u64> {
            self.0.len()
        }
        fn set_len(&self, len: u64) -> Result<()> {
            self.0.set_len(len)
        }
        fn path(&self) -> &std::path::Path {
            self.0.path()
        }
    }

    #[test]
    fn zeroing_the_partial_last_sector_without_holes_does_not_grow_the_file() {
        let storage = Arc::new(NoPunch(MemoryStorage::new(vec![7; 1000], "odd.raw")));
        let raw = Raw::open(storage.clone(), OpenOptions { writable: true }).expect("open");
        // Sectors 0 and 1: the second ends at byte 1000 of the file, not 1024.
        assert!(raw.zero_clusters(0, 2).expect("zero"));
        assert_eq!(storage.len().expect("len"), 1000);
        let mut bytes = vec![1; 1000];
        storage.read_at(0, &mut bytes).expect("read");
        assert!(bytes.iter().all(|&b| b == 0));
    }
}

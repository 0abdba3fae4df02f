//! Creating an empty QED image, laid out as `qemu-img create -f qed` does.

use super::header::{
    validate_cluster_size, validate_image_size, Header, FEATURE_BACKING_FILE,
    FEATURE_BACKING_FORMAT_NO_PROBE, HEADER_LEN, SECTOR_SIZE,
};
use crate::error::{Error, Result};
use crate::{CreateOptions, Storage, MAX_BACKING_NAME};

/// QEMU's default `cluster_size` for QED (`QED_DEFAULT_CLUSTER_SIZE`).
pub const DEFAULT_CLUSTER_SIZE: u64 = 64 * 1024;
/// QEMU's default `table_size` for QED (`QED_DEFAULT_TABLE_SIZE`), in clusters.
pub const DEFAULT_TABLE_SIZE: u32 = 4;

/// Creates an empty QED image on `storage`: one header cluster (the fixed fields, then the
/// backing file name), then an all-zero L1 table. The size is rounded up to 512 bytes, as
/// `qemu-img create` does.
pub fn create(storage: &dyn Storage, options: &CreateOptions) -> Result<()> {
    let cluster_size = options.cluster_size.unwrap_or(DEFAULT_CLUSTER_SIZE);
    validate_cluster_size(cluster_size).map_err(Error::invalid)?;
    let image_size = options
        .size
        .checked_next_multiple_of(SECTOR_SIZE)
        .ok_or_else(|| Error::invalid(format!("Image size {} is too large", options.size)))?;
    validate_image_size(image_size, cluster_size, u64::from(DEFAULT_TABLE_SIZE))
        .map_err(Error::invalid)?;

    let mut header = Header {
        cluster_size: cluster_size as u32,
        table_size: DEFAULT_TABLE_SIZE,
        header_size: 1,
        features: 0,
        compat_features: 0,
        autoclear_features: 0,
        l1_table_offset: cluster_size,
        image_size,
        backing_filename_offset: 0,
        backing_filename_size: 0,
    };
    let name = options.backing.as_ref().map_or("", |b| b.name.as_str());
    if name.len() > MAX_BACKING_NAME {
        return Err(Error::invalid(format!(
            "Backing file name too long ({} bytes, at most {MAX_BACKING_NAME})",
            name.len()
        )));
    }
    if let Some(backing) = &options.backing {
        header.features |= FEATURE_BACKING_FILE;
        if super::is_raw_format(backing.format.as_deref()) {
            header.features |= FEATURE_BACKING_FORMAT_NO_PROBE;
        }
        header.backing_filename_offset = HEADER_LEN as u32;
        header.backing_filename_size = name.len() as u32;
    }
    header.validate()?;

    let mut head = header.to_bytes().to_vec();
    head.extend_from_slice(name.as_bytes());
    storage.set_len(0)?;
    storage.write_at(0, &head)?;
    // The L1 table is all zeroes: extending the file provides it without writing.
    storage.set_len(header.l1_table_offset + header.table_bytes())?;
    storage.flush()
}

//! Header field offsets of qcow2 (big-endian, `docs/interop/qcow2.txt`) and QED (little-endian,
//! `docs/interop/qed_spec.txt`), and helpers to read and patch them in place.

use anyhow::{ensure, Context, Result};
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// qcow2 header field offsets (qcow2.txt "Header", bytes 0-103 for v3).
pub mod qcow2 {
    /// `magic`: u32 `QFI\xfb`.
    pub const MAGIC: u64 = 0;
    /// `version`: u32, 2 or 3.
    pub const VERSION: u64 = 4;
    /// `backing_file_offset`: u64, offset of the backing file name (0 = none).
    pub const BACKING_FILE_OFFSET: u64 = 8;
    /// `backing_file_size`: u32, length of the name, at most 1023.
    pub const BACKING_FILE_SIZE: u64 = 16;
    /// `cluster_bits`: u32, 9..=21 in QEMU.
    pub const CLUSTER_BITS: u64 = 20;
    /// `size`: u64, virtual size in bytes.
    pub const SIZE: u64 = 24;
    /// `l1_size`: u32, number of entries in the active L1 table.
    pub const L1_SIZE: u64 = 36;
    /// `l1_table_offset`: u64, cluster aligned.
    pub const L1_TABLE_OFFSET: u64 = 40;
    /// `refcount_table_offset`: u64, cluster aligned.
    pub const REFCOUNT_TABLE_OFFSET: u64 = 48;
    /// `refcount_table_clusters`: u32.
    pub const REFCOUNT_TABLE_CLUSTERS: u64 = 56;
    /// `incompatible_features`: u64 bitmask (v3 only).
    pub const INCOMPATIBLE_FEATURES: u64 = 72;
    /// `refcount_order`: u32 (v3 only; v2 implies 4).
    pub const REFCOUNT_ORDER: u64 = 96;
}

/// QED header field offsets (qed_spec.txt "Header").
pub mod qed {
    /// `magic`: u32 `QED\0`.
    pub const MAGIC: u64 = 0;
    /// `cluster_size`: u32, power of two, 4 KiB to 64 MiB.
    pub const CLUSTER_SIZE: u64 = 4;
    /// `table_size`: u32, clusters per L1/L2 table, power of two, 1 to 16.
    pub const TABLE_SIZE: u64 = 8;
    /// `header_size`: u32, in clusters.
    pub const HEADER_SIZE: u64 = 12;
    /// `features`: u64 (0x1 backing file, 0x2 need check, 0x4 backing format no probe).
    pub const FEATURES: u64 = 16;
    /// `l1_table_offset`: u64.
    pub const L1_TABLE_OFFSET: u64 = 40;
    /// `image_size`: u64.
    pub const IMAGE_SIZE: u64 = 48;
}

/// Overwrites `bytes` at `offset` of `path`, without changing anything else.
pub fn patch(path: &Path, offset: u64, bytes: &[u8]) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("opening {} for patching", path.display()))?;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(bytes)?;
    Ok(())
}

pub fn read_at(path: &Path, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0; len];
    f.read_exact(&mut buf)
        .with_context(|| format!("reading {len} bytes at {offset} of {}", path.display()))?;
    Ok(buf)
}

pub fn put_be16(path: &Path, offset: u64, v: u16) -> Result<()> {
    patch(path, offset, &v.to_be_bytes())
}
pub fn put_be32(path: &Path, offset: u64, v: u32) -> Result<()> {
    patch(path, offset, &v.to_be_bytes())
}
pub fn put_be64(path: &Path, offset: u64, v: u64) -> Result<()> {
    patch(path, offset, &v.to_be_bytes())
}
pub fn put_le32(path: &Path, offset: u64, v: u32) -> Result<()> {
    patch(path, offset, &v.to_le_bytes())
}
pub fn get_be16(path: &Path, offset: u64) -> Result<u16> {
    Ok(u16::from_be_bytes(
        read_at(path, offset, 2)?.try_into().unwrap(),
    ))
}
pub fn get_be32(path: &Path, offset: u64) -> Result<u32> {
    Ok(u32::from_be_bytes(
        read_at(path, offset, 4)?.try_into().unwrap(),
    ))
}
pub fn get_be64(path: &Path, offset: u64) -> Result<u64> {
    Ok(u64::from_be_bytes(
        read_at(path, offset, 8)?.try_into().unwrap(),
    ))
}
pub fn get_le32(path: &Path, offset: u64) -> Result<u32> {
    Ok(u32::from_le_bytes(
        read_at(path, offset, 4)?.try_into().unwrap(),
    ))
}

/// The qcow2 header fields the refcount helpers need.
#[derive(Debug, Clone)]
pub struct Qcow2Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub refcount_table_offset: u64,
    pub refcount_order: u32,
}

/// Refcount table entries: bits 9-63 hold the refcount block offset (qcow2.txt).
const REFCOUNT_TABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

impl Qcow2Header {
    pub fn read(path: &Path) -> Result<Self> {
        let version = get_be32(path, qcow2::VERSION)?;
        Ok(Qcow2Header {
            version,
            cluster_bits: get_be32(path, qcow2::CLUSTER_BITS)?,
            refcount_table_offset: get_be64(path, qcow2::REFCOUNT_TABLE_OFFSET)?,
            refcount_order: if version >= 3 {
                get_be32(path, qcow2::REFCOUNT_ORDER)?
            } else {
                4
            },
        })
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// File offset of the 16-bit refcount entry of host cluster `cluster_index`, which must be
    /// covered by an already allocated refcount block.
    pub fn refcount_entry_offset(&self, path: &Path, cluster_index: u64) -> Result<u64> {
        ensure!(
            self.refcount_order == 4,
            "only 16-bit refcounts are supported by this helper"
        );
        let entries_per_block = self.cluster_size() * 8 / 16;
        let table_index = cluster_index / entries_per_block;
        let block = get_be64(path, self.refcount_table_offset + 8 * table_index)?
            & REFCOUNT_TABLE_OFFSET_MASK;
        ensure!(
            block != 0,
            "no refcount block covers cluster {cluster_index}"
        );
        Ok(block + 2 * (cluster_index % entries_per_block))
    }

    pub fn refcount(&self, path: &Path, cluster_index: u64) -> Result<u16> {
        get_be16(path, self.refcount_entry_offset(path, cluster_index)?)
    }

    pub fn set_refcount(&self, path: &Path, cluster_index: u64, refcount: u16) -> Result<()> {
        put_be16(
            path,
            self.refcount_entry_offset(path, cluster_index)?,
            refcount,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu;

    #[test]
    fn patch_changes_only_the_given_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, [0u8; 16]).unwrap();
        put_be32(&f, 4, 0x0102_0304).unwrap();
        put_le32(&f, 8, 0x0102_0304).unwrap();
        let bytes = std::fs::read(&f).unwrap();
        assert_eq!(bytes, [0, 0, 0, 0, 1, 2, 3, 4, 4, 3, 2, 1, 0, 0, 0, 0]);
        assert_eq!(get_be32(&f, 4).unwrap(), 0x0102_0304);
        assert_eq!(get_le32(&f, 8).unwrap(), 0x0102_0304);
    }

    #[test]
    fn qcow2_header_fields_match_what_qemu_img_created() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.qcow2");
        qemu::create(&f, "qcow2", Some("cluster_size=4096"), None, Some("3M")).unwrap();
        assert_eq!(read_at(&f, qcow2::MAGIC, 4).unwrap(), b"QFI\xfb");
        let h = Qcow2Header::read(&f).unwrap();
        assert_eq!((h.version, h.cluster_bits, h.refcount_order), (3, 12, 4));
        assert_eq!(get_be64(&f, qcow2::SIZE).unwrap(), 3 << 20);
        // Clusters 0..=3 hold header, L1 table, refcount table and refcount block.
        assert_eq!(h.refcount(&f, 0).unwrap(), 1);
        let used = std::fs::metadata(&f).unwrap().len().div_ceil(4096);
        assert_eq!(h.refcount(&f, used).unwrap(), 0);
    }

    #[test]
    fn qed_header_fields_match_what_qemu_img_created() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.qed");
        qemu::create(&f, "qed", Some("cluster_size=8192"), None, Some("1M")).unwrap();
        assert_eq!(read_at(&f, qed::MAGIC, 4).unwrap(), b"QED\0");
        assert_eq!(get_le32(&f, qed::CLUSTER_SIZE).unwrap(), 8192);
        assert_eq!(get_le32(&f, qed::TABLE_SIZE).unwrap(), 4);
        let size = u64::from_le_bytes(read_at(&f, qed::IMAGE_SIZE, 8).unwrap().try_into().unwrap());
        assert_eq!(size, 1 << 20);
    }
}

//! The qcow2 header (qcow2.txt "Header"), its extensions and the backing file name: parsing
//! with validation, and serialising the first cluster back.

use crate::error::{Error, Result};
use crate::MAX_BACKING_NAME;

/// "QFI\xfb" (qcow2.txt: `magic`).
pub const QCOW2_MAGIC: u32 = 0x5146_49fb;
/// Length of the version 2 header, and the minimum of version 3's `header_length`.
pub const V2_HEADER_LENGTH: usize = 72;
pub const V3_MIN_HEADER_LENGTH: usize = 104;
/// Header length we write for version 3 (with the compression type byte, padded to 8).
pub const V3_HEADER_LENGTH: usize = 112;
/// QEMU's range of `cluster_bits` (qcow2.txt: "cluster_bits ... 9 <= cluster_bits <= 21").
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;

/// Incompatible feature bits (qcow2.txt: `incompatible_features`).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Header extension types (qcow2.txt "Header extensions").
pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_CRYPTO: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Limits beyond which we call an image hostile rather than try to allocate for it.
/// QEMU's QCOW_MAX_L1_SIZE is 32 MiB of L1 table; QCOW_MAX_REFTABLE_SIZE 8 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;

/// Compression types (qcow2.txt: `compression_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    Zlib,
    Zstd,
}

/// One header extension, kept verbatim so that rewriting the header preserves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// The parsed header of a qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    /// Every extension except the end marker, in file order.
    pub extensions: Vec<Extension>,
    /// The backing file name, if any.
    pub backing_name: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(raw)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// The recorded backing format, from the backing-format extension.
    pub fn backing_format(&self) -> Option<String> {
        self.extensions
            .iter()
            .find(|e| e.kind == EXT_BACKING_FORMAT)
            .map(|e| String::from_utf8_lossy(&e.data).into_owned())
    }

    /// The name of incompatible feature `bit` from the feature name table, if the image has one.
    fn feature_name(&self, bit: u32) -> Option<String> {
        let table = self
            .extensions
            .iter()
            .find(|e| e.kind == EXT_FEATURE_TABLE)?;
        table.data.chunks_exact(48).find_map(|entry| {
            (entry[0] == 0 && u32::from(entry[1]) == bit).then(|| {
                let name = &entry[2..];
                let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                String::from_utf8_lossy(&name[..end]).into_owned()
            })
        })
    }

    /// Parses and validates the header from the start of the image; `file_size` bounds every
    /// offset. `bytes` must hold the whole first cluster (or the whole file, if shorter).
    pub fn parse(bytes: &[u8], file_size: u64) -> Result<Header> {
        if bytes.len() < V2_HEADER_LENGTH {
            return Err(Error::corrupt(format!(
                "qcow2 header truncated: the file holds {} bytes, the header needs {V2_HEADER_LENGTH}",
                bytes.len()
            )));
        }
        if be32(bytes, 0) != QCOW2_MAGIC {
            return Err(Error::corrupt("Image is not in qcow2 format (bad magic)"));
        }
        let version = be32(bytes, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!(
                "Unsupported qcow2 version {version}"
            )));
        }
        let cluster_bits = be32(bytes, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::corrupt(format!(
                "Unsupported cluster size: 2^{cluster_bits} (cluster_bits must be {MIN_CLUSTER_BITS} to {MAX_CLUSTER_BITS})"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut header = Header {
            version,
            backing_file_offset: be64(bytes, 8),
            backing_file_size: be32(bytes, 16),
            cluster_bits,
            size: be64(bytes, 24),
            crypt_method: be32(bytes, 32),
            l1_size: be32(bytes, 36),
            l1_table_offset: be64(bytes, 40),
            refcount_table_offset: be64(bytes, 48),
            refcount_table_clusters: be32(bytes, 56),
            nb_snapshots: be32(bytes, 60),
            snapshots_offset: be64(bytes, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH as u32,
            compression_type: CompressionType::Zlib,
            extensions: Vec::new(),
            backing_name: None,
        };
        if version == 3 {
            if bytes.len() < V3_MIN_HEADER_LENGTH {
                return Err(Error::corrupt("qcow2 version 3 header truncated"));
            }
            header.incompatible_features = be64(bytes, 72);
            header.compatible_features = be64(bytes, 80);
            header.autoclear_features = be64(bytes, 88);
            header.refcount_order = be32(bytes, 96);
            header.header_length = be32(bytes, 100);
            let length = header.header_length as u64;
            if length < V3_MIN_HEADER_LENGTH as u64
                || !length.is_multiple_of(8)
                || length > cluster_size
            {
                return Err(Error::corrupt(format!(
                    "qcow2 header_length {length} invalid (at least {V3_MIN_HEADER_LENGTH}, a multiple of 8, within the first cluster)"
                )));
            }
            if header.refcount_order > 6 {
                return Err(Error::corrupt(format!(
                    "Refcount width 2^{} bits out of range (at most 64 bits)",
                    header.refcount_order
                )));
            }
            if length > V3_MIN_HEADER_LENGTH as u64 && bytes.len() > V3_MIN_HEADER_LENGTH {
                header.compression_type = match bytes[V3_MIN_HEADER_LENGTH] {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    other => {
                        return Err(Error::unsupported(format!(
                            "Unknown qcow2 compression type {other}"
                        )))
                    }
                };
            }
            let zstd_bit = header.incompatible_features & INCOMPAT_COMPRESSION != 0;
            if zstd_bit != (header.compression_type != CompressionType::Zlib) {
                return Err(Error::corrupt(
                    "Compression type and its incompatible feature bit disagree",
                ));
            }
        }
        header.parse_extensions(bytes)?;
        header.check_features()?;
        header.validate_layout(file_size)?;
        header.parse_backing_name(bytes, file_size)?;
        Ok(header)
    }

    fn parse_extensions(&mut self, bytes: &[u8]) -> Result<()> {
        let cluster_size = self.cluster_size() as usize;
        let area_end = cluster_size.min(bytes.len());
        let mut at = self.header_length as usize;
        loop {
            if at + 8 > area_end {
                // qemu-img writes an end marker; an image whose extensions run off the first
                // cluster without one is malformed.
                if at >= cluster_size {
                    return Err(Error::corrupt(
                        "qcow2 header extensions run past the first cluster",
                    ));
                }
                return Ok(());
            }
            let kind = be32(bytes, at);
            let length = be32(bytes, at + 4) as usize;
            if kind == EXT_END {
                return Ok(());
            }
            let data_start = at + 8;
            let data_end = data_start
                .checked_add(length)
                .filter(|end| *end <= area_end)
                .ok_or_else(|| {
                    Error::corrupt(format!(
                        "qcow2 header extension {kind:#x} of {length} bytes runs past the first cluster"
                    ))
                })?;
            self.extensions.push(Extension {
                kind,
                data: bytes[data_start..data_end].to_vec(),
            });
            at = data_start + length.div_ceil(8) * 8;
        }
    }

    fn check_features(&self) -> Result<()> {
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        let unknown = self.incompatible_features & !known;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|bit| unknown & (1u64 << bit) != 0)
                .map(|bit| {
                    self.feature_name(bit).unwrap_or_else(|| {
                        format!("Unknown incompatible feature: {:x}", 1u64 << bit)
                    })
                })
                .collect();
            return Err(Error::unsupported(format!(
                "Unsupported qcow2 feature(s): {}",
                names.join(", ")
            )));
        }
        if self.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::unsupported(
                "Unsupported qcow2 feature(s): external data file",
            ));
        }
        if self.incompatible_features & INCOMPAT_EXTL2 != 0 {
            return Err(Error::unsupported(
                "Unsupported qcow2 feature(s): extended L2 entries (subclusters)",
            ));
        }
        if self.crypt_method != 0 {
            return Err(Error::unsupported(format!(
                "Encrypted qcow2 images are not supported (crypt_method {})",
                self.crypt_method
            )));
        }
        Ok(())
    }

    fn validate_layout(&self, file_size: u64) -> Result<()> {
        let cluster_size = self.cluster_size();
        let aligned = |offset: u64| offset.is_multiple_of(cluster_size);
        let l2_entries = cluster_size / 8;
        let max_size_for_l1 = (self.l1_size as u64)
            .saturating_mul(l2_entries)
            .saturating_mul(cluster_size);
        if self.size > max_size_for_l1 {
            return Err(Error::corrupt(format!(
                "L1 table of {} entries too small for a {}-byte disk",
                self.l1_size, self.size
            )));
        }
        let l1_bytes = self.l1_size as u64 * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::corrupt(format!(
                "Active L1 table too large ({} entries, at most {})",
                self.l1_size,
                MAX_L1_BYTES / 8
            )));
        }
        if self.l1_size > 0 {
            if !aligned(self.l1_table_offset) {
                return Err(Error::corrupt(format!(
                    "L1 table offset {:#x} is not cluster aligned",
                    self.l1_table_offset
                )));
            }
            if self.l1_table_offset.saturating_add(l1_bytes) > file_size {
                return Err(Error::corrupt(format!(
                    "L1 table at {:#x} ({} bytes) lies beyond the end of the file ({file_size} bytes)",
                    self.l1_table_offset, l1_bytes
                )));
            }
        }
        let reftable_bytes = self.refcount_table_clusters as u64 * cluster_size;
        if reftable_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::corrupt(format!(
                "Refcount table too large ({} clusters)",
                self.refcount_table_clusters
            )));
        }
        if self.refcount_table_clusters == 0 {
            return Err(Error::corrupt("Image has no refcount table"));
        }
        if !aligned(self.refcount_table_offset) {
            return Err(Error::corrupt(format!(
                "Refcount table offset {:#x} is not cluster aligned",
                self.refcount_table_offset
            )));
        }
        if self.refcount_table_offset.saturating_add(reftable_bytes) > file_size {
            return Err(Error::corrupt(format!(
                "Refcount table at {:#x} ({reftable_bytes} bytes) lies beyond the end of the file ({file_size} bytes)",
                self.refcount_table_offset
            )));
        }
        if self.nb_snapshots > 0 && !aligned(self.snapshots_offset) {
            return Err(Error::corrupt(
                "Snapshot table offset is not cluster aligned",
            ));
        }
        Ok(())
    }

    fn parse_backing_name(&mut self, bytes: &[u8], file_size: u64) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let size = self.backing_file_size as usize;
        if size > MAX_BACKING_NAME {
            return Err(Error::corrupt(format!(
                "Backing file name too long ({size} bytes, at most {MAX_BACKING_NAME})"
            )));
        }
        let start = self.backing_file_offset;
        // saturating: a hostile offset near 2^64 must fail the bounds check, not wrap past it.
        let end = start.saturating_add(size as u64);
        if end > self.cluster_size() || end > file_size || end as usize > bytes.len() {
            return Err(Error::corrupt(format!(
                "Backing file name at {start} ({size} bytes) lies outside the first cluster"
            )));
        }
        let raw = &bytes[start as usize..end as usize];
        let name = std::str::from_utf8(raw)
            .map_err(|_| Error::corrupt("Backing file name is not valid UTF-8"))?;
        if name.is_empty() {
            return Ok(());
        }
        self.backing_name = Some(name.to_string());
        Ok(())
    }

    /// Serialises the header fields alone (`header_length` bytes).
    pub fn fields_to_bytes(&self) -> Vec<u8> {
        let length = if self.version == 2 {
            V2_HEADER_LENGTH
        } else {
            self.header_length as usize
        };
        let mut out = vec![0u8; length];
        out[0..4].copy_from_slice(&QCOW2_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&self.version.to_be_bytes());
        out[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        out[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        out[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        out[24..32].copy_from_slice(&self.size.to_be_bytes());
        out[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        out[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        out[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        out[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        out[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        out[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        out[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version == 3 {
            out[72..80].copy_from_slice(&self.incompatible_features.to_be_bytes());
            out[80..88].copy_from_slice(&self.compatible_features.to_be_bytes());
            out[88..96].copy_from_slice(&self.autoclear_features.to_be_bytes());
            out[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            out[100..104].copy_from_slice(&self.header_length.to_be_bytes());
            if length > V3_MIN_HEADER_LENGTH {
                out[V3_MIN_HEADER_LENGTH] = match self.compression_type {
                    CompressionType::Zlib => 0,
                    CompressionType::Zstd => 1,
                };
            }
        }
        out
    }

    /// Serialises everything that lives at the start of cluster 0: fields, extensions (in QEMU's
    /// order: backing format first), end marker, backing name. Updates `backing_file_offset` and
    /// `backing_file_size` to match. Fails if it would not fit in the first cluster.
    pub fn to_bytes(&mut self) -> Result<Vec<u8>> {
        let mut extensions = Vec::new();
        let mut ordered: Vec<&Extension> = self
            .extensions
            .iter()
            .filter(|e| e.kind == EXT_BACKING_FORMAT)
            .collect();
        ordered.extend(
            self.extensions
                .iter()
                .filter(|e| e.kind != EXT_BACKING_FORMAT),
        );
        for ext in ordered {
            extensions.extend_from_slice(&ext.kind.to_be_bytes());
            extensions.extend_from_slice(&(ext.data.len() as u32).to_be_bytes());
            extensions.extend_from_slice(&ext.data);
            extensions.resize(extensions.len().div_ceil(8) * 8, 0);
        }
        extensions.extend_from_slice(&[0u8; 8]);
        let fields_len = self.fields_to_bytes().len();
        let name_offset = fields_len + extensions.len();
        match &self.backing_name {
            Some(name) => {
                self.backing_file_offset = name_offset as u64;
                self.backing_file_size = name.len() as u32;
            }
            None => {
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
        }
        let mut out = self.fields_to_bytes();
        out.extend_from_slice(&extensions);
        if let Some(name) = &self.backing_name {
            out.extend_from_slice(name.as_bytes());
        }
        if out.len() as u64 > self.cluster_size() {
            return Err(Error::invalid(format!(
                "Header, extensions and backing file name ({} bytes) do not fit in one cluster",
                out.len()
            )));
        }
        Ok(out)
    }
}

/// The feature name table QEMU writes into new version 3 images (qcow2.txt "Feature name table").
pub fn default_feature_table() -> Extension {
    let entries: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let mut data = Vec::with_capacity(entries.len() * 48);
    for (kind, bit, name) in entries {
        let mut entry = [0u8; 48];
        entry[0] = kind;
        entry[1] = bit;
        entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
        data.extend_from_slice(&entry);
    }
    Extension {
        kind: EXT_FEATURE_TABLE,
        data,
    }
}

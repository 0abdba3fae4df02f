//! The QED header: parsing, validation and serialisation (qed_spec.txt "Header").

use crate::error::{Error, Result};
use crate::probe::QED_MAGIC;
use crate::MAX_BACKING_NAME;
use std::ops::Range;

/// Size of the fixed header fields on disk (`sizeof(QEDHeader)`); the backing name may follow.
pub const HEADER_LEN: usize = 64;

/// `QED_F_BACKING_FILE`: the image has a backing file, named by the backing_filename fields.
pub const FEATURE_BACKING_FILE: u64 = 0x1;
/// `QED_F_NEED_CHECK`: the metadata may be inconsistent; check before use.
pub const FEATURE_NEED_CHECK: u64 = 0x2;
/// `QED_F_BACKING_FORMAT_NO_PROBE`: the backing file is raw and must never be probed.
pub const FEATURE_BACKING_FORMAT_NO_PROBE: u64 = 0x4;
/// Every `features` bit this driver understands; an image with any other bit must not be opened.
pub const KNOWN_FEATURES: u64 =
    FEATURE_BACKING_FILE | FEATURE_NEED_CHECK | FEATURE_BACKING_FORMAT_NO_PROBE;

/// Smallest `cluster_size` the spec allows (2^12).
pub const MIN_CLUSTER_SIZE: u64 = 1 << 12;
/// Largest `cluster_size` the spec allows (2^26).
pub const MAX_CLUSTER_SIZE: u64 = 1 << 26;
/// Smallest `table_size`, in clusters.
pub const MIN_TABLE_SIZE: u64 = 1;
/// Largest `table_size`, in clusters.
pub const MAX_TABLE_SIZE: u64 = 16;
/// `image_size` must be a multiple of the sector size.
pub const SECTOR_SIZE: u64 = 512;

/// The fixed header fields, in host byte order. Only meaningful once [`parse_header`] accepted
/// them, which guarantees the geometry helpers below cannot overflow or divide by zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Bytes per cluster: a power of two in `MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE`.
    pub cluster_size: u32,
    /// Clusters per L1 or L2 table: a power of two in `MIN_TABLE_SIZE..=MAX_TABLE_SIZE`.
    pub table_size: u32,
    /// Clusters taken by the header and anything stored before the first regular cluster.
    pub header_size: u32,
    /// Incompatible feature bits (`FEATURE_*`).
    pub features: u64,
    /// Compatible feature bits: none defined, unknown ones are ignored.
    pub compat_features: u64,
    /// Feature bits that a writer not knowing them must clear: none defined.
    pub autoclear_features: u64,
    /// Byte offset of the L1 table, cluster aligned.
    pub l1_table_offset: u64,
    /// Guest-visible size in bytes, a multiple of 512.
    pub image_size: u64,
    /// Where the backing file name starts, in bytes from the start of the header.
    pub backing_filename_offset: u32,
    /// Length of the backing file name in bytes (not NUL terminated).
    pub backing_filename_size: u32,
}

/// Reads a little-endian integer of `N` bytes at `at` from a buffer known to hold `HEADER_LEN`.
fn le<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut field = [0; N];
    field.copy_from_slice(&bytes[at..at + N]);
    field
}

/// Parses and validates the fixed header fields from the first bytes of an image.
///
/// Pure: checks everything that can be checked without knowing the file's size (see
/// [`Header::validate_layout`] for the rest). Never panics, whatever `bytes` holds.
pub fn parse_header(bytes: &[u8]) -> Result<Header> {
    if bytes.len() < HEADER_LEN {
        return Err(Error::corrupt(format!(
            "QED header truncated: {} bytes, the header needs {HEADER_LEN}",
            bytes.len()
        )));
    }
    let bytes = &bytes[..HEADER_LEN];
    if bytes[..4] != QED_MAGIC {
        return Err(Error::corrupt(format!(
            "Bad QED magic {:02x?} (expected \"QED\\0\")",
            &bytes[..4]
        )));
    }
    let header = Header {
        cluster_size: u32::from_le_bytes(le(bytes, 4)),
        table_size: u32::from_le_bytes(le(bytes, 8)),
        header_size: u32::from_le_bytes(le(bytes, 12)),
        features: u64::from_le_bytes(le(bytes, 16)),
        compat_features: u64::from_le_bytes(le(bytes, 24)),
        autoclear_features: u64::from_le_bytes(le(bytes, 32)),
        l1_table_offset: u64::from_le_bytes(le(bytes, 40)),
        image_size: u64::from_le_bytes(le(bytes, 48)),
        backing_filename_offset: u32::from_le_bytes(le(bytes, 56)),
        backing_filename_size: u32::from_le_bytes(le(bytes, 60)),
    };
    header.validate()?;
    Ok(header)
}

impl Header {
    /// Checks the fields against each other and against the spec's ranges.
    pub fn validate(&self) -> Result<()> {
        let unknown = self.features & !KNOWN_FEATURES;
        if unknown != 0 {
            return Err(Error::unsupported(format!(
                "Unsupported QED features 0x{unknown:x}"
            )));
        }
        validate_cluster_size(u64::from(self.cluster_size)).map_err(Error::corrupt)?;
        validate_table_size(u64::from(self.table_size)).map_err(Error::corrupt)?;
        if self.header_size == 0 {
            return Err(Error::corrupt(
                "QED header_size 0 out of range (at least 1 cluster)",
            ));
        }
        validate_image_size(self.image_size, self.cluster_size(), self.table_size())
            .map_err(Error::corrupt)?;
        if !is_aligned(self.l1_table_offset, self.cluster_size()) {
            return Err(Error::corrupt(format!(
                "QED l1_table_offset 0x{:x} is not aligned to the cluster size {}",
                self.l1_table_offset, self.cluster_size
            )));
        }
        if self.l1_table_offset < self.header_bytes() {
            return Err(Error::corrupt(format!(
                "QED l1_table_offset 0x{:x} lies inside the header ({} bytes)",
                self.l1_table_offset,
                self.header_bytes()
            )));
        }
        if self.has_backing_file() {
            let size = u64::from(self.backing_filename_size);
            if size > MAX_BACKING_NAME as u64 {
                return Err(Error::corrupt(format!(
                    "QED backing file name too long ({size} bytes, at most {MAX_BACKING_NAME})"
                )));
            }
            let end = u64::from(self.backing_filename_offset) + size;
            if end > self.header_bytes() {
                return Err(Error::corrupt(format!(
                    "QED backing file name (offset {}, {} bytes) extends past the header \
                     ({} bytes)",
                    self.backing_filename_offset,
                    size,
                    self.header_bytes()
                )));
            }
        }
        Ok(())
    }

    /// Checks what depends on the file's length: the header and the L1 table must lie inside it.
    pub fn validate_layout(&self, file_len: u64) -> Result<()> {
        if file_len < self.header_bytes() {
            return Err(Error::corrupt(format!(
                "QED image truncated: {file_len} bytes, but the header takes {} cluster(s) \
                 ({} bytes)",
                self.header_size,
                self.header_bytes()
            )));
        }
        let l1_end = self.l1_table_offset.saturating_add(self.table_bytes());
        if l1_end > file_len {
            return Err(Error::corrupt(format!(
                "QED L1 table at 0x{:x} ({} bytes) extends past the end of the file \
                 ({file_len} bytes)",
                self.l1_table_offset,
                self.table_bytes()
            )));
        }
        Ok(())
    }

    /// Serialises the fixed fields, little-endian.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0; HEADER_LEN];
        out[0..4].copy_from_slice(&QED_MAGIC);
        out[4..8].copy_from_slice(&self.cluster_size.to_le_bytes());
        out[8..12].copy_from_slice(&self.table_size.to_le_bytes());
        out[12..16].copy_from_slice(&self.header_size.to_le_bytes());
        out[16..24].copy_from_slice(&self.features.to_le_bytes());
        out[24..32].copy_from_slice(&self.compat_features.to_le_bytes());
        out[32..40].copy_from_slice(&self.autoclear_features.to_le_bytes());
        out[40..48].copy_from_slice(&self.l1_table_offset.to_le_bytes());
        out[48..56].copy_from_slice(&self.image_size.to_le_bytes());
        out[56..60].copy_from_slice(&self.backing_filename_offset.to_le_bytes());
        out[60..64].copy_from_slice(&self.backing_filename_size.to_le_bytes());
        out
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        u64::from(self.cluster_size)
    }

    /// Clusters per table.
    pub fn table_size(&self) -> u64 {
        u64::from(self.table_size)
    }

    /// Bytes taken by the header clusters; regular clusters start here.
    pub fn header_bytes(&self) -> u64 {
        u64::from(self.header_size) * self.cluster_size()
    }

    /// Bytes per L1 or L2 table.
    pub fn table_bytes(&self) -> u64 {
        self.table_size() * self.cluster_size()
    }

    /// Offsets per table (`TABLE_NOFFSETS`).
    pub fn entries_per_table(&self) -> u64 {
        self.table_bytes() / 8
    }

    /// Guest bytes covered by one L2 table.
    pub fn l2_span(&self) -> u64 {
        self.entries_per_table() * self.cluster_size()
    }

    /// Whether `QED_F_BACKING_FILE` is set.
    pub fn has_backing_file(&self) -> bool {
        self.features & FEATURE_BACKING_FILE != 0
    }

    /// Whether `QED_F_NEED_CHECK` is set.
    pub fn needs_check(&self) -> bool {
        self.features & FEATURE_NEED_CHECK != 0
    }

    /// Where the backing file name lies in the file, when the image has one.
    pub fn backing_name_range(&self) -> Option<Range<u64>> {
        self.has_backing_file().then(|| {
            let start = u64::from(self.backing_filename_offset);
            start..start + u64::from(self.backing_filename_size)
        })
    }
}

/// Whether `value` is a multiple of `align`, a power of two.
pub fn is_aligned(value: u64, align: u64) -> bool {
    value & (align - 1) == 0
}

/// Largest image that tables of this geometry can map (`TABLE_NOFFSETS² × cluster_size`),
/// saturated at `u64::MAX`.
pub fn max_image_size(cluster_size: u64, table_size: u64) -> u64 {
    let entries = table_size * cluster_size / 8;
    entries
        .checked_mul(entries)
        .and_then(|n| n.checked_mul(cluster_size))
        .unwrap_or(u64::MAX)
}

/// Checks a `cluster_size` value; the error names the problem.
pub fn validate_cluster_size(cluster_size: u64) -> std::result::Result<(), String> {
    if !cluster_size.is_power_of_two()
        || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cluster_size)
    {
        return Err(format!(
            "QED cluster_size {cluster_size} out of range (a power of 2 from \
             {MIN_CLUSTER_SIZE} to {MAX_CLUSTER_SIZE})"
        ));
    }
    Ok(())
}

/// Checks a `table_size` value; the error names the problem.
pub fn validate_table_size(table_size: u64) -> std::result::Result<(), String> {
    if !table_size.is_power_of_two() || !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&table_size) {
        return Err(format!(
            "QED table_size {table_size} out of range (a power of 2 from {MIN_TABLE_SIZE} \
             to {MAX_TABLE_SIZE})"
        ));
    }
    Ok(())
}

/// Checks an `image_size` against the sector size and what the tables can map.
pub fn validate_image_size(
    image_size: u64,
    cluster_size: u64,
    table_size: u64,
) -> std::result::Result<(), String> {
    if !is_aligned(image_size, SECTOR_SIZE) {
        return Err(format!(
            "QED image_size {image_size} is not a multiple of {SECTOR_SIZE}"
        ));
    }
    let max = max_image_size(cluster_size, table_size);
    if image_size > max {
        return Err(format!(
            "QED image_size {image_size} too large for the tables (at most {max} bytes with \
             cluster_size {cluster_size} and table_size {table_size})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    /// The header `qemu-img create -f qed a.qed 64M` writes (dumped with xxd).
    const QEMU_DEFAULT_HEADER: [u8; HEADER_LEN] = [
        0x51, 0x45, 0x44, 0x00, 0x00, 0x00, 0x01, 0x00, 0x04, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00,
    ];

    fn default_header() -> Header {
        Header {
            cluster_size: 65536,
            table_size: 4,
            header_size: 1,
            features: 0,
            compat_features: 0,
            autoclear_features: 0,
            l1_table_offset: 65536,
            image_size: 64 << 20,
            backing_filename_offset: 0,
            backing_filename_size: 0,
        }
    }

    /// Parses `header` after serialising it and expects an error of `kind` mentioning `needle`.
    fn assert_rejected(header: Header, kind: ErrorKind, needle: &str) {
        let err = parse_header(&header.to_bytes()).expect_err("header should be rejected");
        assert_eq!(err.kind(), kind, "{err}");
        assert!(
            err.to_string().contains(needle),
            "'{err}' should mention '{needle}'"
        );
    }

    #[test]
    fn parses_the_header_qemu_img_creates() {
        let header = parse_header(&QEMU_DEFAULT_HEADER).unwrap();
        assert_eq!(header, default_header());
        assert_eq!(header.entries_per_table(), 32768);
        assert_eq!(header.to_bytes(), QEMU_DEFAULT_HEADER);
    }

    #[test]
    fn truncated_header_is_corrupt() {
        let err = parse_header(&QEMU_DEFAULT_HEADER[..10]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn bad_magic_is_corrupt() {
        let mut bytes = QEMU_DEFAULT_HEADER;
        bytes[0] = b'X';
        let err = parse_header(&bytes).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert!(err.to_string().contains("magic"), "{err}");
    }

    #[test]
    fn table_size_must_be_a_power_of_two_from_1_to_16() {
        for bad in [0, 3, 32] {
            let header = Header {
                table_size: bad,
                ..default_header()
            };
            assert_rejected(
                header,
                ErrorKind::Corrupt,
                &format!("table_size {bad} out of range"),
            );
        }
        for good in [1, 2, 4, 8, 16] {
            let header = Header {
                table_size: good,
                ..default_header()
            };
            parse_header(&header.to_bytes()).unwrap();
        }
    }

    #[test]
    fn cluster_size_must_be_a_power_of_two_from_4k_to_64m() {
        for bad in [0, 65535, 3 << 12, 2048, 1 << 27] {
            let header = Header {
                cluster_size: bad,
                l1_table_offset: 1 << 27,
                ..default_header()
            };
            assert_rejected(header, ErrorKind::Corrupt, &format!("cluster_size {bad}"));
        }
    }

    #[test]
    fn l1_table_offset_must_be_cluster_aligned_and_past_the_header() {
        let unaligned = Header {
            l1_table_offset: 65536 + 512,
            ..default_header()
        };
        assert_rejected(
            unaligned,
            ErrorKind::Corrupt,
            "l1_table_offset 0x10200 is not aligned",
        );
        let in_header = Header {
            l1_table_offset: 0,
            ..default_header()
        };
        assert_rejected(in_header, ErrorKind::Corrupt, "inside the header");
    }

    #[test]
    fn header_size_zero_is_corrupt() {
        let header = Header {
            header_size: 0,
            ..default_header()
        };
        assert_rejected(header, ErrorKind::Corrupt, "header_size 0");
    }

    #[test]
    fn backing_name_must_fit_in_the_header_clusters() {
        let header = Header {
            features: FEATURE_BACKING_FILE,
            backing_filename_offset: 65536 - 4,
            backing_filename_size: 8,
            ..default_header()
        };
        assert_rejected(header, ErrorKind::Corrupt, "extends past the header");
    }

    #[test]
    fn backing_name_longer_than_1023_bytes_is_corrupt() {
        let header = Header {
            features: FEATURE_BACKING_FILE,
            backing_filename_offset: 64,
            backing_filename_size: 1024,
            ..default_header()
        };
        assert_rejected(
            header,
            ErrorKind::Corrupt,
            "backing file name too long (1024 bytes",
        );
    }

    #[test]
    fn backing_fields_are_ignored_without_the_backing_feature() {
        let header = Header {
            backing_filename_offset: u32::MAX,
            backing_filename_size: u32::MAX,
            ..default_header()
        };
        assert_eq!(
            parse_header(&header.to_bytes())
                .unwrap()
                .backing_name_range(),
            None
        );
    }

    #[test]
    fn unknown_feature_bits_are_unsupported_and_named() {
        let header = Header {
            features: FEATURE_BACKING_FILE | 0x30,
            backing_filename_offset: 64,
            ..default_header()
        };
        assert_rejected(header, ErrorKind::Unsupported, "0x30");
    }

    #[test]
    fn unknown_compat_and_autoclear_bits_are_accepted() {
        let header = Header {
            compat_features: 0xff,
            autoclear_features: 0xff,
            ..default_header()
        };
        parse_header(&header.to_bytes()).unwrap();
    }

    #[test]
    fn image_size_must_be_mappable_by_the_tables() {
        // 4 KiB clusters, 1-cluster tables: 512 entries each, at most 512 * 512 * 4 KiB = 1 GiB.
        let small = Header {
            cluster_size: 4096,
            table_size: 1,
            l1_table_offset: 4096,
            image_size: 1 << 30,
            ..default_header()
        };
        parse_header(&small.to_bytes()).unwrap();
        let too_large = Header {
            image_size: (1 << 30) + 512,
            ..small
        };
        assert_rejected(too_large, ErrorKind::Corrupt, "too large for the tables");
    }

    #[test]
    fn image_size_must_be_a_multiple_of_512() {
        let header = Header {
            image_size: 1000,
            ..default_header()
        };
        assert_rejected(
            header,
            ErrorKind::Corrupt,
            "image_size 1000 is not a multiple of 512",
        );
    }

    #[test]
    fn largest_geometry_does_not_overflow() {
        assert_eq!(max_image_size(MAX_CLUSTER_SIZE, MAX_TABLE_SIZE), u64::MAX);
        let header = Header {
            cluster_size: MAX_CLUSTER_SIZE as u32,
            table_size: MAX_TABLE_SIZE as u32,
            l1_table_offset: MAX_CLUSTER_SIZE,
            image_size: u64::MAX - 511,
            ..default_header()
        };
        parse_header(&header.to_bytes()).unwrap();
    }

    #[test]
    fn layout_must_fit_in_the_file() {
        let header = default_header();
        let err = header.validate_layout(4096).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        let err = header.validate_layout(65536 * 4).unwrap_err();
        assert!(err.to_string().contains("L1 table at 0x10000"), "{err}");
        header.validate_layout(65536 * 5).unwrap();
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let mut bytes = QEMU_DEFAULT_HEADER;
            for _ in 0..rng.gen_range(1..6) {
                let at = rng.gen_range(0..HEADER_LEN);
                bytes[at] = rng.gen();
            }
            let len = rng.gen_range(0..=HEADER_LEN);
            if let Ok(header) = parse_header(&bytes[..len]) {
                let _ = header.validate_layout(rng.gen());
                assert!(header.entries_per_table() > 0);
            }
        }
    }
}

//! Damaged and hostile images, made by qemu-img and then edited byte by byte at documented
//! header offsets (see `ondisk`). Each builder returns the image to open and its format.

use crate::ondisk::{self, qcow2, qed, Qcow2Header};
use crate::{qemu, KIB};
use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};

/// A damaged image and the format it claims to be (pass it with `-f`).
#[derive(Debug, Clone)]
pub struct Damaged {
    pub path: PathBuf,
    pub format: &'static str,
}

const SMALL_CLUSTER: u64 = 4 * KIB;

/// A healthy qcow2 v3 image with 4 KiB clusters and one written cluster, so L1, L2 and
/// refcount structures all exist.
pub fn healthy_qcow2(dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    qemu::create(&path, "qcow2", Some("cluster_size=4096"), None, Some("8M"))?;
    qemu::io(&path, "qcow2", &["write -P 0x5a 0 4k".to_string()])?;
    Ok(path)
}

fn damaged_qcow2(dir: &Path, edit: impl FnOnce(&Path) -> Result<()>) -> Result<Damaged> {
    let path = healthy_qcow2(dir, "damaged.qcow2")?;
    edit(&path)?;
    Ok(Damaged {
        path,
        format: "qcow2",
    })
}

fn file_len(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)?.len())
}

/// The file cut to 50 bytes, inside the 72-byte v2 header.
pub fn truncated_qcow2_header(dir: &Path) -> Result<Damaged> {
    damaged_qcow2(dir, |p| {
        let f = std::fs::OpenOptions::new().write(true).open(p)?;
        Ok(f.set_len(50)?)
    })
}

/// `magic` replaced by `QFI\0`.
pub fn qcow2_bad_magic(dir: &Path) -> Result<Damaged> {
    damaged_qcow2(dir, |p| ondisk::patch(p, qcow2::MAGIC, b"QFI\0"))
}

pub fn qcow2_version(dir: &Path, version: u32) -> Result<Damaged> {
    damaged_qcow2(dir, |p| ondisk::put_be32(p, qcow2::VERSION, version))
}

pub fn qcow2_cluster_bits(dir: &Path, bits: u32) -> Result<Damaged> {
    damaged_qcow2(dir, |p| ondisk::put_be32(p, qcow2::CLUSTER_BITS, bits))
}

/// `l1_size` set so the L1 table would extend four times past the end of the file (still below
/// QEMU's 32 MiB L1 limit).
pub fn qcow2_l1_larger_than_file(dir: &Path) -> Result<Damaged> {
    damaged_qcow2(dir, |p| {
        let entries = u32::try_from(file_len(p)? / 8 * 4)?;
        ondisk::put_be32(p, qcow2::L1_SIZE, entries)
    })
}

pub fn qcow2_l1_size(dir: &Path, entries: u32) -> Result<Damaged> {
    damaged_qcow2(dir, |p| ondisk::put_be32(p, qcow2::L1_SIZE, entries))
}

/// `l1_table_offset` moved to an aligned offset 16 clusters past the end of the file.
pub fn qcow2_l1_offset_beyond_eof(dir: &Path) -> Result<Damaged> {
    damaged_qcow2(dir, |p| {
        let beyond = file_len(p)?.next_multiple_of(SMALL_CLUSTER) + 16 * SMALL_CLUSTER;
        ondisk::put_be64(p, qcow2::L1_TABLE_OFFSET, beyond)
    })
}

/// `l1_table_offset` moved 8 bytes into its cluster (inside the file, misaligned).
pub fn qcow2_l1_offset_unaligned(dir: &Path) -> Result<Damaged> {
    damaged_qcow2(dir, |p| {
        let l1 = ondisk::get_be64(p, qcow2::L1_TABLE_OFFSET)?;
        ondisk::put_be64(p, qcow2::L1_TABLE_OFFSET, l1 + 8)
    })
}

/// `refcount_table_offset` moved to an aligned offset 16 clusters past the end of the file.
pub fn qcow2_refcount_table_offset_beyond_eof(dir: &Path) -> Result<Damaged> {
    damaged_qcow2(dir, |p| {
        let beyond = file_len(p)?.next_multiple_of(SMALL_CLUSTER) + 16 * SMALL_CLUSTER;
        ondisk::put_be64(p, qcow2::REFCOUNT_TABLE_OFFSET, beyond)
    })
}

/// `refcount_table_offset` moved 8 bytes into its cluster.
pub fn qcow2_refcount_table_offset_unaligned(dir: &Path) -> Result<Damaged> {
    damaged_qcow2(dir, |p| {
        let rt = ondisk::get_be64(p, qcow2::REFCOUNT_TABLE_OFFSET)?;
        ondisk::put_be64(p, qcow2::REFCOUNT_TABLE_OFFSET, rt + 8)
    })
}

/// Sets `bit` of `incompatible_features` in a v3 header.
pub fn qcow2_incompatible_feature_bit(dir: &Path, bit: u32) -> Result<Damaged> {
    damaged_qcow2(dir, |p| {
        let features = ondisk::get_be64(p, qcow2::INCOMPATIBLE_FEATURES)?;
        ondisk::put_be64(p, qcow2::INCOMPATIBLE_FEATURES, features | 1 << bit)
    })
}

/// A raw base with data and a qcow2 overlay naming it (relatively) as backing, `-F raw`.
pub fn overlay_over_raw(dir: &Path, base_name: &str) -> Result<(PathBuf, PathBuf)> {
    let base = dir.join(base_name);
    qemu::create(&base, "raw", None, None, Some("1M"))?;
    qemu::io(&base, "raw", &["write -P 0x11 0 64k".to_string()])?;
    let top = dir.join("top.qcow2");
    qemu::create(&top, "qcow2", None, Some((base_name, "raw")), Some("1M"))?;
    Ok((top, base))
}

/// `backing_file_size` set to 1024, one more than QEMU's limit of 1023.
pub fn qcow2_backing_name_length(dir: &Path, len: u32) -> Result<Damaged> {
    let (top, _) = overlay_over_raw(dir, "base.raw")?;
    ondisk::put_be32(&top, qcow2::BACKING_FILE_SIZE, len)?;
    Ok(Damaged {
        path: top,
        format: "qcow2",
    })
}

/// An overlay whose backing file `base.raw` has been deleted.
pub fn qcow2_missing_backing(dir: &Path) -> Result<Damaged> {
    let (top, base) = overlay_over_raw(dir, "base.raw")?;
    std::fs::remove_file(base)?;
    Ok(Damaged {
        path: top,
        format: "qcow2",
    })
}

/// `a.qcow2 -> b.qcow2 -> a.qcow2`: made with qemu-img create, closed with `rebase -u`.
pub fn qcow2_backing_loop(dir: &Path) -> Result<Damaged> {
    let a = dir.join("a.qcow2");
    let b = dir.join("b.qcow2");
    qemu::create(&b, "qcow2", None, None, Some("1M"))?;
    qemu::create(&a, "qcow2", None, Some(("b.qcow2", "qcow2")), None)?;
    qemu::rebase_unsafe(&b, "qcow2", Some(("a.qcow2", "qcow2")))?;
    Ok(Damaged {
        path: a,
        format: "qcow2",
    })
}

/// A chain of `depth` qcow2 overlays over one qcow2 base (`d000.qcow2` <- ... <- top), made by
/// copying one qemu-img overlay and patching its backing name (fixed width), because qemu-img
/// create opens the whole chain each time and 300 of them would take a minute.
pub fn qcow2_deep_chain(dir: &Path, depth: usize) -> Result<Damaged> {
    ensure!((1..1000).contains(&depth), "depth must fit in 3 digits");
    let name = |i: usize| format!("d{i:03}.qcow2");
    qemu::create(&dir.join(name(0)), "qcow2", None, None, Some("1M"))?;
    qemu::create(
        &dir.join(name(1)),
        "qcow2",
        None,
        Some((&name(0), "qcow2")),
        None,
    )?;
    let template = std::fs::read(dir.join(name(1)))?;
    let t = dir.join(name(1));
    let name_offset = ondisk::get_be64(&t, qcow2::BACKING_FILE_OFFSET)? as usize;
    let name_len = ondisk::get_be32(&t, qcow2::BACKING_FILE_SIZE)? as usize;
    ensure!(
        template[name_offset..name_offset + name_len] == *name(0).as_bytes(),
        "backing name not where the header says"
    );
    for i in 2..=depth {
        let mut image = template.clone();
        image[name_offset..name_offset + name_len].copy_from_slice(name(i - 1).as_bytes());
        std::fs::write(dir.join(name(i)), image)?;
    }
    Ok(Damaged {
        path: dir.join(name(depth)),
        format: "qcow2",
    })
}

fn damaged_qed(dir: &Path, edit: impl FnOnce(&Path) -> Result<()>) -> Result<Damaged> {
    let path = dir.join("damaged.qed");
    qemu::create(&path, "qed", None, None, Some("8M"))?;
    qemu::io(&path, "qed", &["write -P 0x5a 0 4k".to_string()])?;
    edit(&path)?;
    Ok(Damaged {
        path,
        format: "qed",
    })
}

pub fn qed_table_size(dir: &Path, table_size: u32) -> Result<Damaged> {
    damaged_qed(dir, |p| ondisk::put_le32(p, qed::TABLE_SIZE, table_size))
}

pub fn qed_cluster_size(dir: &Path, cluster_size: u32) -> Result<Damaged> {
    damaged_qed(dir, |p| {
        ondisk::put_le32(p, qed::CLUSTER_SIZE, cluster_size)
    })
}

/// A hostile raw base: its bytes are a real qcow2 image whose backing file is `target`. A qcow2
/// overlay uses it with `-F raw`, so a reader must treat those bytes as data and never probe
/// them or follow the name. Returns `(overlay, base)`.
pub fn raw_base_disguised_as_qcow2(dir: &Path, target: &str) -> Result<(PathBuf, PathBuf)> {
    let base = dir.join("disguised.img");
    qemu::create(&base, "qcow2", None, Some((target, "raw")), Some("1M"))?;
    let top = dir.join("top.qcow2");
    qemu::create(
        &top,
        "qcow2",
        None,
        Some(("disguised.img", "raw")),
        Some("1M"),
    )?;
    Ok((top, base))
}

/// qcow2 v3 (64 KiB clusters, one data cluster) with one extra cluster appended to the file
/// whose refcount is set to 1 although nothing references it: a leak.
pub fn qcow2_with_leaked_cluster(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("leaky.qcow2");
    qemu::create(&path, "qcow2", None, None, Some("4M"))?;
    qemu::io(&path, "qcow2", &["write -P 0x77 0 64k".to_string()])?;
    let h = Qcow2Header::read(&path)?;
    let clusters = file_len(&path)?.div_ceil(h.cluster_size());
    let f = std::fs::OpenOptions::new().write(true).open(&path)?;
    f.set_len((clusters + 1) * h.cluster_size())?;
    h.set_refcount(&path, clusters, 1)?;
    Ok(path)
}

/// qcow2 v3 (64 KiB clusters) whose one data cluster, referenced by an L2 entry, has its
/// refcount set to 0: a corruption.
pub fn qcow2_with_unrefcounted_data_cluster(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("corrupt.qcow2");
    qemu::create(&path, "qcow2", None, None, Some("4M"))?;
    qemu::io(&path, "qcow2", &["write -P 0x77 0 64k".to_string()])?;
    let map = qemu::map(&path, Some("qcow2"))?;
    let host = map[0]["offset"]
        .as_u64()
        .context("first map entry has no host offset")?;
    let h = Qcow2Header::read(&path)?;
    h.set_refcount(&path, host / h.cluster_size(), 0)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    //! Each damaged image is checked against QEMU: where QEMU rejects it, with the message that
    //! proves the edit hit the intended field.
    use super::*;

    fn qemu_rejects(d: &Damaged, message: &str) {
        let out = qemu::io_unchecked(&d.path, d.format, &["read 0 512"]).unwrap();
        assert!(
            !out.success() && out.stderr.contains(message),
            "qemu-io should fail with `{message}`:\n{}",
            out.describe()
        );
    }

    fn qemu_reads(d: &Damaged) {
        let out = qemu::io_unchecked(&d.path, d.format, &["read 0 512"]).unwrap();
        assert!(out.success(), "{}", out.describe());
    }

    type Builder = fn(&Path) -> Result<Damaged>;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn healthy_image_is_read_by_qemu() {
        let t = tmp();
        let path = healthy_qcow2(t.path(), "ok.qcow2").unwrap();
        qemu_reads(&Damaged {
            path,
            format: "qcow2",
        });
    }

    #[test]
    fn qemu_rejects_each_damaged_qcow2_header_for_the_intended_reason() {
        let cases: Vec<(Builder, &str)> = vec![
            (truncated_qcow2_header, "qcow2 header too short"),
            (qcow2_bad_magic, "Image is not in qcow2 format"),
            (|d| qcow2_version(d, 1), "Unsupported qcow2 version 1"),
            (
                |d| qcow2_cluster_bits(d, 8),
                "Unsupported cluster size: 2^8",
            ),
            (
                |d| qcow2_cluster_bits(d, 22),
                "Unsupported cluster size: 2^22",
            ),
            (
                |d| qcow2_l1_size(d, 0x8000_0000),
                "Active L1 table too large",
            ),
            (qcow2_l1_offset_unaligned, "Active L1 table offset invalid"),
            (
                qcow2_refcount_table_offset_unaligned,
                "Reference count table offset invalid",
            ),
            (
                |d| qcow2_incompatible_feature_bit(d, 10),
                "Unknown incompatible feature: 400",
            ),
            (
                |d| qcow2_backing_name_length(d, 1024),
                "Backing file name too long",
            ),
            (qcow2_missing_backing, "No such file or directory"),
            (|d| qed_table_size(d, 0), "QED table size is invalid"),
            (|d| qed_table_size(d, 32), "QED table size is invalid"),
            (
                |d| qed_cluster_size(d, 12288),
                "QED cluster size is invalid",
            ),
        ];
        for (build, message) in cases {
            let t = tmp();
            qemu_rejects(&build(t.path()).unwrap(), message);
        }
    }

    /// QEMU 10 opens these and reads zeroes for the missing tables; imgstream is meant to
    /// refuse them. This only proves the edits landed where intended.
    #[test]
    fn out_of_file_table_edits_land_in_the_intended_fields() {
        let t = tmp();
        let d = qcow2_l1_larger_than_file(t.path()).unwrap();
        let l1_bytes = 8 * ondisk::get_be32(&d.path, qcow2::L1_SIZE).unwrap() as u64;
        assert!(l1_bytes > file_len(&d.path).unwrap());
        qemu_reads(&d);

        let t = tmp();
        let d = qcow2_l1_offset_beyond_eof(t.path()).unwrap();
        let l1 = ondisk::get_be64(&d.path, qcow2::L1_TABLE_OFFSET).unwrap();
        assert!(l1 > file_len(&d.path).unwrap() && l1 & (SMALL_CLUSTER - 1) == 0);

        let t = tmp();
        let d = qcow2_refcount_table_offset_beyond_eof(t.path()).unwrap();
        let rt = ondisk::get_be64(&d.path, qcow2::REFCOUNT_TABLE_OFFSET).unwrap();
        assert!(rt > file_len(&d.path).unwrap() && rt & (SMALL_CLUSTER - 1) == 0);
    }

    #[test]
    fn qemu_img_reports_the_backing_loop() {
        let t = tmp();
        let d = qcow2_backing_loop(t.path()).unwrap();
        let out = qemu::qemu_img(&[
            "info".into(),
            "--backing-chain".into(),
            d.path.to_string_lossy().into(),
        ])
        .unwrap();
        assert!(
            !out.success() && out.stderr.contains("infinite loop"),
            "{}",
            out.describe()
        );
    }

    #[test]
    fn deep_chain_is_followed_by_qemu_to_its_base() {
        let t = tmp();
        let d = qcow2_deep_chain(t.path(), 300).unwrap();
        let info = qemu::info(&d.path, None, true).unwrap();
        let chain = info.as_array().unwrap();
        assert_eq!(chain.len(), 301);
        assert!(chain[300]["filename"]
            .as_str()
            .unwrap()
            .ends_with("d000.qcow2"));
    }

    #[test]
    fn disguised_raw_base_is_read_as_bytes_by_qemu() {
        let t = tmp();
        let (top, base) = raw_base_disguised_as_qcow2(t.path(), "/etc/passwd").unwrap();
        let info = qemu::info(&top, None, true).unwrap();
        assert_eq!(info.as_array().unwrap().len(), 2, "{info}");
        assert_eq!(info[1]["format"], "raw");
        let out = t.path().join("out.raw");
        qemu::convert_to_raw(&top, Some("qcow2"), &out).unwrap();
        let base_bytes = std::fs::read(&base).unwrap();
        assert_eq!(
            &std::fs::read(&out).unwrap()[..base_bytes.len()],
            &base_bytes[..]
        );
    }

    #[test]
    fn leaked_cluster_makes_qemu_check_exit_3_and_repair_fixes_it() {
        let t = tmp();
        let path = qcow2_with_leaked_cluster(t.path()).unwrap();
        let c = qemu::check(&path, Some("qcow2"), None).unwrap();
        assert_eq!(c.code, 3, "{}", c.output.describe());
        assert_eq!(c.report.unwrap()["leaks"], 1);
        assert_eq!(
            qemu::check(&path, Some("qcow2"), Some("leaks"))
                .unwrap()
                .code,
            0
        );
        qemu::check_clean(&path, "qcow2").unwrap();
    }

    #[test]
    fn unrefcounted_data_cluster_makes_qemu_check_exit_2() {
        let t = tmp();
        let path = qcow2_with_unrefcounted_data_cluster(t.path()).unwrap();
        let c = qemu::check(&path, Some("qcow2"), None).unwrap();
        assert_eq!(c.code, 2, "{}", c.output.describe());
        assert!(c.report.unwrap()["corruptions"].as_u64().unwrap() >= 1);
    }
}

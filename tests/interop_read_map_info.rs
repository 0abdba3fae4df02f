//! imgstream's read path, `map` and `info` against QEMU's on the same images: qcow2 v2/v3 and
//! QED, 4 KiB / 64 KiB / 2 MiB clusters, standalone and over two-deep backing chains, with
//! partial, zero and compressed clusters.
//!
//! Each scenario module builds its chain with qemu-img/qemu-io and has a fixture guard
//! (`qemu_reads_the_fixture_model`, qemu only) and three tests of imgstream:
//! `convert_matches_qemu` (guest content byte for byte), `map_matches_qemu` (parsed JSON equal),
//! `info_matches_qemu` (the fields imgstream reports, for the top and with `--backing-chain`).

use anyhow::{ensure, Context, Result};
use imgstream_tests::fixtures::{first_difference, Chain, Format};
use imgstream_tests::{imgstream, qemu, KIB, MIB};
use serde_json::Value;
use std::path::Path;

/// `qemu-img info` fields imgstream reports; each must be equal, or absent from both.
const INFO_FIELDS: &[&str] = &[
    "filename",
    "format",
    "virtual-size",
    "actual-size",
    "cluster-size",
    "backing-filename",
    "full-backing-filename",
    "backing-filename-format",
    "dirty-flag",
    "format-specific",
];

fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn qemu_reads_the_fixture_model(chain: &Chain) -> Result<()> {
    let top = chain.top()?;
    let model = chain.dir().join("model.raw");
    chain.expected().write_raw(&model)?;
    match qemu::compare(&model, "raw", &top.path, top.format.name())? {
        None => Ok(()),
        Some(diff) => anyhow::bail!("fixture bug: qemu-img compare model vs top: {diff}"),
    }
}

fn convert_matches_qemu(chain: &Chain) -> Result<()> {
    let top = chain.top()?;
    let ours = chain.dir().join("imgstream.raw");
    let theirs = chain.dir().join("qemu.raw");
    imgstream::run_ok(&["convert", "-O", "raw", &p(&top.path), &p(&ours)])?;
    qemu::convert_to_raw(&top.path, None, &theirs)?;
    let theirs = std::fs::read(&theirs)?;
    // Guards the fixture itself: qemu must agree with the model of what was written.
    if let Some(diff) = chain.expected().first_difference(&theirs) {
        anyhow::bail!("fixture bug: qemu-img convert disagrees with the model: {diff}");
    }
    let ours = std::fs::read(&ours).context("imgstream convert wrote no output file")?;
    if let Some(diff) = first_difference(&theirs, &ours) {
        anyhow::bail!("imgstream convert differs from qemu-img convert: {diff}");
    }
    Ok(())
}

fn map_matches_qemu(chain: &Chain) -> Result<()> {
    let top = &chain.top()?.path;
    let ours = imgstream::run_json(&["map", "--output", "json", &p(top)])?;
    let theirs = qemu::map(top, None)?;
    let (ours_list, theirs_list) = (
        ours.as_array()
            .context("imgstream map did not print a list")?,
        theirs
            .as_array()
            .context("qemu-img map did not print a list")?,
    );
    for (i, (o, t)) in ours_list.iter().zip(theirs_list).enumerate() {
        ensure!(
            o == t,
            "map entry {i} differs:\n  imgstream: {o}\n  qemu-img:  {t}"
        );
    }
    ensure!(
        ours_list.len() == theirs_list.len(),
        "imgstream map has {} entries, qemu-img map {}:\n  imgstream: {ours}\n  qemu-img:  {theirs}",
        ours_list.len(),
        theirs_list.len()
    );
    Ok(())
}

fn info_fields_match(label: &str, ours: &Value, theirs: &Value) -> Result<()> {
    for field in INFO_FIELDS {
        ensure!(
            ours.get(field) == theirs.get(field),
            "{label}: `{field}` differs: imgstream {:?}, qemu-img {:?}",
            ours.get(field),
            theirs.get(field)
        );
    }
    Ok(())
}

fn info_matches_qemu(chain: &Chain) -> Result<()> {
    let top = &chain.top()?.path;
    let ours = imgstream::run_json(&["info", "--output", "json", &p(top)])?;
    let theirs = qemu::info(top, None, false)?;
    info_fields_match("info of the top image", &ours, &theirs)?;

    let ours = imgstream::run_json(&["info", "--backing-chain", "--output", "json", &p(top)])?;
    let theirs = qemu::info(top, None, true)?;
    let (o, t) = (
        ours.as_array()
            .context("info --backing-chain must print a list")?,
        theirs.as_array().context("qemu-img printed no list")?,
    );
    ensure!(
        o.len() == t.len() && t.len() == chain.layers().len(),
        "--backing-chain lists {} images, qemu-img {}, the chain has {}",
        o.len(),
        t.len(),
        chain.layers().len()
    );
    for (i, (o, t)) in o.iter().zip(t).enumerate() {
        info_fields_match(&format!("--backing-chain entry {i}"), o, t)?;
    }
    Ok(())
}

/// Data writes that exercise one top layer of cluster size `cs` in an image of `size` bytes:
/// a partial first cluster, a write straddling two clusters, one crossing an L2 table boundary
/// (for 4 KiB clusters: 512 entries cover 2 MiB), whole clusters, and the last sector.
fn scatter_writes(chain: Chain, cs: u64, size: u64, pattern: u8) -> Result<Chain> {
    let l2_boundary = 2 * MIB;
    chain
        .write(512, 1024, pattern)?
        .write(cs - 512, 1024, pattern.wrapping_add(1))?
        .write(l2_boundary - 4 * KIB, 8 * KIB, pattern.wrapping_add(2))?
        .write(size / 2, 2 * cs.min(MIB), pattern.wrapping_add(3))?
        .write(size - 512, 512, pattern.wrapping_add(4))
}

macro_rules! scenario {
    ($(#[$doc:meta])* $name:ident, $build:expr) => {
        $(#[$doc])*
        mod $name {
            use super::*;

            fn build(dir: &Path) -> Result<Chain> {
                let build: fn(&Path) -> Result<Chain> = $build;
                build(dir)
            }

            /// Guards the fixture: QEMU reads what the model says was written.
            #[test]
            fn qemu_reads_the_fixture_model() -> Result<()> {
                let dir = tempfile::tempdir()?;
                super::qemu_reads_the_fixture_model(&build(dir.path())?)
            }

            #[test]
            fn convert_matches_qemu() -> Result<()> {
                let dir = tempfile::tempdir()?;
                super::convert_matches_qemu(&build(dir.path())?)
            }

            #[test]
            fn map_matches_qemu() -> Result<()> {
                let dir = tempfile::tempdir()?;
                super::map_matches_qemu(&build(dir.path())?)
            }

            #[test]
            fn info_matches_qemu() -> Result<()> {
                let dir = tempfile::tempdir()?;
                super::info_matches_qemu(&build(dir.path())?)
            }
        }
    };
}

scenario!(
    /// An image nobody wrote to: everything unallocated.
    qcow2_v3_64k_empty,
    |d| Chain::new(d).base(Format::qcow2_v3(64 * KIB), "4M")
);

scenario!(
    /// qcow2 v2, 4 KiB clusters, 8 MiB: four L2 tables, data and compressed clusters.
    qcow2_v2_4k_standalone_with_compressed_clusters,
    |d| {
        let c = Chain::new(d).base(Format::qcow2_v2(4 * KIB), "8M")?;
        scatter_writes(c, 4 * KIB, 8 * MIB, 0x10)?
            .write_compressed(6 * MIB, 16 * KIB, 0x20)?
            .write_compressed(7 * MIB, 4 * KIB, 0x00)
    }
);

scenario!(
    /// qcow2 v2 64 KiB over qcow2 v2 4 KiB over a raw base half the top's size.
    qcow2_v2_64k_with_two_deep_chain_over_shorter_raw_base,
    |d| {
        let c = Chain::new(d).base(Format::Raw, "2M")?.write(0, 2 * MIB, 0xa0)?;
        let c = c.overlay_sized(Format::qcow2_v2(4 * KIB), "4M")?;
        let c = scatter_writes(c, 4 * KIB, 4 * MIB, 0xb0)?.write_compressed(MIB, 8 * KIB, 0xbb)?;
        let c = c.overlay(Format::qcow2_v2(64 * KIB))?;
        scatter_writes(c, 64 * KIB, 4 * MIB, 0xc0)?.write_zeroes(192 * KIB, 64 * KIB)
    }
);

scenario!(
    /// qcow2 v3 4 KiB standalone: data, zero clusters and compressed clusters across L2 tables.
    qcow2_v3_4k_standalone_with_zero_and_compressed_clusters,
    |d| {
        let c = Chain::new(d).base(Format::qcow2_v3(4 * KIB), "8M")?;
        scatter_writes(c, 4 * KIB, 8 * MIB, 0x30)?
            .write_zeroes(MIB, 64 * KIB)?
            .write_compressed(5 * MIB, 32 * KIB, 0x31)?
            .write_zeroes(5 * MIB + 8 * KIB, 4 * KIB)
    }
);

scenario!(
    /// qcow2 v3 4 KiB over qcow2 v3 64 KiB over qcow2 v3 4 KiB: zero clusters in upper layers
    /// hide data below; compressed clusters in the middle.
    qcow2_v3_4k_with_two_deep_qcow2_chain_zero_clusters_hide_backing_data,
    |d| {
        let c = Chain::new(d)
            .base(Format::qcow2_v3(4 * KIB), "8M")?
            .write(0, 8 * MIB, 0x40)?;
        let c = c.overlay(Format::qcow2_v3(64 * KIB))?;
        let c = scatter_writes(c, 64 * KIB, 8 * MIB, 0x50)?
            .write_zeroes(3 * MIB, 256 * KIB)?
            .write_compressed(5 * MIB, 128 * KIB, 0x55)?;
        let c = c.overlay(Format::qcow2_v3(4 * KIB))?;
        scatter_writes(c, 4 * KIB, 8 * MIB, 0x60)?
            .write_zeroes(4 * MIB, 8 * KIB)?
            .write_zeroes(6 * MIB, 4 * KIB)
    }
);

scenario!(
    /// qcow2 v3 with 2 MiB clusters over a raw base shorter than the top.
    qcow2_v3_2m_with_two_deep_chain_over_shorter_raw_base,
    |d| {
        let c = Chain::new(d).base(Format::Raw, "3M")?.write(MIB, 2 * MIB, 0x70)?;
        let c = c.overlay_sized(Format::qcow2_v3(2 * MIB), "6M")?;
        let c = c.write(100, 1000, 0x71)?.write_compressed(4 * MIB, 2 * MIB, 0x72)?;
        let c = c.overlay_sized(Format::qcow2_v3(2 * MIB), "8M")?;
        c.write(3 * MIB - 512, 1024, 0x73)?
            .write_zeroes(2 * MIB, 512 * KIB)?
            .write(7 * MIB, 4 * KIB, 0x74)
    }
);

scenario!(
    /// QED 4 KiB standalone with zero clusters.
    qed_4k_standalone_with_zero_clusters,
    |d| {
        let c = Chain::new(d).base(Format::qed(4 * KIB), "8M")?;
        scatter_writes(c, 4 * KIB, 8 * MIB, 0x80)?
            .write(3 * MIB, 64 * KIB, 0x81)?
            .write_zeroes(3 * MIB + 8 * KIB, 8 * KIB)
    }
);

scenario!(
    /// QED 64 KiB over QED 4 KiB over a QED 2 MiB base; zero clusters hide backing data.
    qed_64k_with_two_deep_qed_chain,
    |d| {
        let c = Chain::new(d)
            .base(Format::qed(2 * MIB), "4M")?
            .write(0, 4 * MIB, 0x90)?;
        let c = c.overlay(Format::qed(4 * KIB))?;
        let c = scatter_writes(c, 4 * KIB, 4 * MIB, 0x91)?.write_zeroes(MIB, 16 * KIB)?;
        let c = c.overlay(Format::qed(64 * KIB))?;
        scatter_writes(c, 64 * KIB, 4 * MIB, 0x92)?.write_zeroes(3 * MIB, 128 * KIB)
    }
);

scenario!(
    /// QED 2 MiB clusters over a raw base shorter than the top.
    qed_2m_over_shorter_raw_base,
    |d| {
        let c = Chain::new(d).base(Format::Raw, "2M")?.write(0, 2 * MIB, 0xa1)?;
        let c = c.overlay_sized(Format::qed(2 * MIB), "6M")?;
        c.write(MIB, 4 * KIB, 0xa2)?.write(5 * MIB, 512, 0xa3)
    }
);

scenario!(
    /// Mixed formats: qcow2 v3 4 KiB over QED 64 KiB over qcow2 v2 64 KiB.
    qcow2_v3_over_qed_over_qcow2_v2_mixed_chain,
    |d| {
        let c = Chain::new(d)
            .base(Format::qcow2_v2(64 * KIB), "4M")?
            .write(0, 3 * MIB, 0xb1)?
            .write_compressed(3 * MIB, 64 * KIB, 0xb2)?;
        let c = c.overlay(Format::qed(64 * KIB))?;
        let c = scatter_writes(c, 64 * KIB, 4 * MIB, 0xb3)?.write_zeroes(MIB, 64 * KIB)?;
        let c = c.overlay(Format::qcow2_v3(4 * KIB))?;
        scatter_writes(c, 4 * KIB, 4 * MIB, 0xb4)?.write_zeroes(2 * MIB + 512 * KIB, 4 * KIB)
    }
);

//! Damaged and hostile images: `imgstream info` and `imgstream io -c 'read 0 512'` must both
//! fail cleanly (non-zero exit, a message naming the problem, no panic) and leave the file's
//! bytes untouched. Images come from `imgstream_tests::damaged`, whose self-tests show QEMU
//! rejecting the same edits for the same reasons.

use anyhow::{ensure, Result};
use imgstream_tests::damaged::{self, Damaged};
use imgstream_tests::fixtures::first_difference;
use imgstream_tests::imgstream;
use std::path::Path;

/// Groups of alternatives: the message must contain (case-insensitively) at least one string
/// of every group.
type Naming<'a> = &'a [&'a [&'a str]];

fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn fails_naming_problem(args: &[String], file: &Path, naming: Naming) -> Result<()> {
    let before = std::fs::read(file)?;
    let out = imgstream::run(args)?;
    ensure!(
        !out.success(),
        "{} should have failed:\n{}",
        out.command,
        out.describe()
    );
    let message = out.stderr.to_lowercase();
    for group in naming {
        ensure!(
            group
                .iter()
                .any(|word| message.contains(&word.to_lowercase())),
            "{}: the error message should mention one of {group:?}:\n{}",
            out.command,
            out.describe()
        );
    }
    let after = std::fs::read(file)?;
    if let Some(diff) = first_difference(&before, &after) {
        anyhow::bail!("{} modified {}: {diff}", out.command, file.display());
    }
    Ok(())
}

/// Both `info` (with `--backing-chain` when the problem is in the chain) and a read fail.
fn rejected(d: &Damaged, chain_problem: bool, naming: Naming) -> Result<()> {
    let mut info = vec!["info".to_string(), "-f".into(), d.format.into()];
    if chain_problem {
        info.push("--backing-chain".into());
    }
    info.extend(["--output".into(), "json".into(), p(&d.path)]);
    fails_naming_problem(&info, &d.path, naming)?;
    let io = [
        "io".to_string(),
        "-f".into(),
        d.format.into(),
        p(&d.path),
        "-c".into(),
        "read 0 512".into(),
    ];
    fails_naming_problem(&io, &d.path, naming)
}

fn header(d: &Damaged, naming: Naming) -> Result<()> {
    rejected(d, false, naming)
}

const L1: Naming = &[&["l1"]];
const REFCOUNT_TABLE: Naming = &[&["refcount", "reference count"]];
const CLUSTER_SIZE: Naming = &[&[
    "cluster size",
    "cluster_size",
    "cluster_bits",
    "cluster bits",
]];

#[test]
fn qcow2_header_truncated_at_50_bytes_is_rejected() -> Result<()> {
    let t = tempfile::tempdir()?;
    let d = damaged::truncated_qcow2_header(t.path())?;
    header(
        &d,
        &[&["short", "truncat", "too small", "end of file", "eof"]],
    )
}

#[test]
fn qcow2_bad_magic_is_rejected() -> Result<()> {
    let t = tempfile::tempdir()?;
    header(
        &damaged::qcow2_bad_magic(t.path())?,
        &[&["magic", "not in qcow2 format", "not a qcow2"]],
    )
}

#[test]
fn qcow2_version_1_is_rejected() -> Result<()> {
    let t = tempfile::tempdir()?;
    header(
        &damaged::qcow2_version(t.path(), 1)?,
        &[&["version"], &["1"]],
    )
}

#[test]
fn qcow2_cluster_bits_8_is_rejected() -> Result<()> {
    let t = tempfile::tempdir()?;
    header(&damaged::qcow2_cluster_bits(t.path(), 8)?, CLUSTER_SIZE)
}

#[test]
fn qcow2_cluster_bits_22_is_rejected() -> Result<()> {
    let t = tempfile::tempdir()?;
    header(&damaged::qcow2_cluster_bits(t.path(), 22)?, CLUSTER_SIZE)
}

/// QEMU 10 accepts this one and reads zeroes past EOF; imgstream is stricter by design.
#[test]
fn qcow2_l1_table_larger_than_the_file_is_rejected() -> Result<()> {
    let t = tempfile::tempdir()?;
    header(&damaged::qcow2_l1_larger_than_file(t.path())?, L1)
}

#[test]
fn qcow2_l1_size_of_2_pow_31_entries_is_rejected() -> Result<()> {
    let t = tempfile::tempdir()?;
    header(&damaged::qcow2_l1_size(t.path(), 1 << 31)?, L1)
}

/// QEMU 10 accepts this one and reads zeroes past EOF; imgstream is stricter by design.
#[test]
fn qcow2_l1_table_offset_beyond_eof_is_rejected() -> Result<()> {
    let t = tempfile::tempdir()?;
    header(&damaged::qcow2_l1_offset_beyond_eof(t.path())?, L1)
}

#[test]
fn qcow2_l1_table_offset_unaligned_is_rejected() -> Result<()> {
    let t = tempfile::tempdir()?;
    header(&damaged::qcow2_l1_offset_unaligned(t.path())?, L1)
}

/// QEMU 10 accepts this one for reading; imgstream is stricter by design.
#[test]
fn qcow2_refcount_table_offset_beyond_eof_is_rejected() -> Result<()> {
    let t = tempfile::tempdir()?;
    header(
        &damaged::qcow2_refcount_table_offset_beyond_eof(t.path())?,
        REFCOUNT_TABLE,
    )
}

#[test]
fn qcow2_refcount_table_offset_unaligned_is_rejected() -> Result<()> {
    let t = tempfile::tempdir()?;
    header(
        &damaged::qcow2_refcount_table_offset_unaligned(t.path())?,
        REFCOUNT_TABLE,
    )
}

#[test]
fn qcow2_backing_name_length_1024_is_rejected() -> Result<()> {
    let t = tempfile::tempdir()?;
    header(
        &damaged::qcow2_backing_name_length(t.path(), 1024)?,
        &[&["backing"], &["too long", "length", "1024"]],
    )
}

#[test]
fn qcow2_unknown_incompatible_feature_bit_10_is_rejected_and_named() -> Result<()> {
    let t = tempfile::tempdir()?;
    header(
        &damaged::qcow2_incompatible_feature_bit(t.path(), 10)?,
        &[&["incompatible", "feature"], &["bit 10", "0x400", "400"]],
    )
}

#[test]
fn missing_backing_file_is_rejected_naming_it() -> Result<()> {
    let t = tempfile::tempdir()?;
    rejected(
        &damaged::qcow2_missing_backing(t.path())?,
        true,
        &[&["base.raw"]],
    )
}

#[test]
fn backing_loop_of_two_images_is_rejected() -> Result<()> {
    let t = tempfile::tempdir()?;
    rejected(
        &damaged::qcow2_backing_loop(t.path())?,
        true,
        &[&["loop", "cycle", "circular", "recurs"]],
    )
}

#[test]
fn backing_chain_300_deep_is_rejected_as_too_deep() -> Result<()> {
    let t = tempfile::tempdir()?;
    rejected(
        &damaged::qcow2_deep_chain(t.path(), 300)?,
        true,
        &[&["deep", "depth", "too many", "too long", "limit"]],
    )
}

#[test]
fn qed_table_size_0_is_rejected() -> Result<()> {
    let t = tempfile::tempdir()?;
    header(
        &damaged::qed_table_size(t.path(), 0)?,
        &[&["table size", "table_size"]],
    )
}

#[test]
fn qed_table_size_32_is_rejected() -> Result<()> {
    let t = tempfile::tempdir()?;
    header(
        &damaged::qed_table_size(t.path(), 32)?,
        &[&["table size", "table_size"]],
    )
}

#[test]
fn qed_cluster_size_not_a_power_of_two_is_rejected() -> Result<()> {
    let t = tempfile::tempdir()?;
    header(
        &damaged::qed_cluster_size(t.path(), 12 * 1024)?,
        CLUSTER_SIZE,
    )
}

/// The base is a real qcow2 file naming /etc/passwd as its backing file, but the overlay says
/// `-F raw`: its bytes are guest data. imgstream must read them as such (the convert output
/// starts with the qcow2 header bytes) and list no third image in the chain.
#[test]
fn raw_backing_holding_a_qcow2_header_is_read_as_raw_and_never_followed() -> Result<()> {
    let t = tempfile::tempdir()?;
    let (top, base) = damaged::raw_base_disguised_as_qcow2(t.path(), "/etc/passwd")?;
    let base_before = std::fs::read(&base)?;

    let read = imgstream::run_ok(&["io", "-f", "qcow2", &p(&top), "-c", "read 0 512"])?;
    ensure!(
        read.stdout.contains("read 512/512 bytes at offset 0"),
        "{}",
        read.describe()
    );

    let out = t.path().join("out.raw");
    imgstream::run_ok(&["convert", "-f", "qcow2", "-O", "raw", &p(&top), &p(&out)])?;
    let content = std::fs::read(&out)?;
    ensure!(
        content.len() >= base_before.len() && content[..base_before.len()] == base_before[..],
        "the overlay must read the disguised base's raw bytes"
    );
    ensure!(
        content[base_before.len()..].iter().all(|&b| b == 0),
        "past the raw base's end the overlay must read zeroes"
    );

    let info = imgstream::run_json(&["info", "--backing-chain", "--output", "json", &p(&top)])?;
    let chain = info.as_array().map(Vec::len);
    ensure!(chain == Some(2), "chain must be overlay + raw base: {info}");
    ensure!(info[1]["format"] == "raw", "base must be raw: {info}");
    ensure!(
        !info.to_string().contains("passwd"),
        "the disguised backing name leaked into info: {info}"
    );
    ensure!(std::fs::read(&base)? == base_before, "base was modified");
    Ok(())
}

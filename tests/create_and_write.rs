//! Images written by imgstream, judged by QEMU: `create` (formats, options, backing files),
//! writes through `imgstream io` (data, zeroes, discard, copy-on-write of partial clusters),
//! `rebase -u`, and `check` compared with `qemu-img check`, including leaks and corruption.

use anyhow::{bail, ensure, Result};
use imgstream_tests::damaged;
use imgstream_tests::fixtures::{first_difference, Chain, Format, Model};
use imgstream_tests::{imgstream, qemu, KIB, MIB};
use serde_json::Value;
use std::path::Path;

fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn data(info: &Value) -> &Value {
    &info["format-specific"]["data"]
}

// ---------------------------------------------------------------------------------- create

#[test]
fn create_qcow2_with_defaults_is_clean_v3_with_64k_clusters() -> Result<()> {
    let t = tempfile::tempdir()?;
    let f = t.path().join("a.qcow2");
    imgstream::run_ok(&["create", "-f", "qcow2", &p(&f), "64M"])?;
    qemu::check_clean(&f, "qcow2")?;
    let info = qemu::info(&f, Some("qcow2"), false)?;
    ensure!(info["virtual-size"] == 64 * MIB, "{info}");
    ensure!(info["cluster-size"] == 65536, "{info}");
    ensure!(data(&info)["compat"] == "1.1", "{info}");
    ensure!(data(&info)["refcount-bits"] == 16, "{info}");
    ensure!(data(&info)["lazy-refcounts"] == false, "{info}");
    Ok(())
}

#[test]
fn create_qcow2_v2_with_4k_clusters_is_clean_and_has_compat_0_10() -> Result<()> {
    let t = tempfile::tempdir()?;
    let f = t.path().join("a.qcow2");
    imgstream::run_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096,compat=0.10",
        &p(&f),
        "1G",
    ])?;
    qemu::check_clean(&f, "qcow2")?;
    let info = qemu::info(&f, Some("qcow2"), false)?;
    ensure!(info["virtual-size"] == 1u64 << 30, "{info}");
    ensure!(info["cluster-size"] == 4096, "{info}");
    ensure!(data(&info)["compat"] == "0.10", "{info}");
    Ok(())
}

#[test]
fn create_qcow2_with_lazy_refcounts_and_8_bit_refcounts_records_both() -> Result<()> {
    let t = tempfile::tempdir()?;
    let f = t.path().join("a.qcow2");
    imgstream::run_ok(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "compat=1.1,lazy_refcounts=on,refcount_bits=8",
        &p(&f),
        "16M",
    ])?;
    qemu::check_clean(&f, "qcow2")?;
    let info = qemu::info(&f, Some("qcow2"), false)?;
    ensure!(data(&info)["lazy-refcounts"] == true, "{info}");
    ensure!(data(&info)["refcount-bits"] == 8, "{info}");
    Ok(())
}

#[test]
fn create_qed_with_4k_clusters_is_clean() -> Result<()> {
    let t = tempfile::tempdir()?;
    let f = t.path().join("a.qed");
    imgstream::run_ok(&[
        "create",
        "-f",
        "qed",
        "-o",
        "cluster_size=4096",
        &p(&f),
        "2G",
    ])?;
    qemu::check_clean(&f, "qed")?;
    let info = qemu::info(&f, Some("qed"), false)?;
    ensure!(info["format"] == "qed", "{info}");
    ensure!(info["virtual-size"] == 2u64 << 30, "{info}");
    ensure!(info["cluster-size"] == 4096, "{info}");
    Ok(())
}

#[test]
fn create_raw_has_exactly_the_requested_size() -> Result<()> {
    let t = tempfile::tempdir()?;
    let f = t.path().join("a.raw");
    imgstream::run_ok(&["create", "-f", "raw", &p(&f), "3M"])?;
    ensure!(std::fs::metadata(&f)?.len() == 3 * MIB);
    let info = qemu::info(&f, Some("raw"), false)?;
    ensure!(info["virtual-size"] == 3 * MIB, "{info}");
    Ok(())
}

fn create_overlay_without_size(format: &str) -> Result<()> {
    let t = tempfile::tempdir()?;
    let chain = Chain::new(t.path())
        .base(Format::qcow2_v3(64 * KIB), "5M")?
        .write(MIB, 64 * KIB, 0x42)?;
    let base = chain.top()?.path.clone();
    let top = t.path().join(format!("top.{format}"));
    imgstream::run_ok(&[
        "create",
        "-f",
        format,
        "-b",
        "layer0.qcow2",
        "-F",
        "qcow2",
        &p(&top),
    ])?;
    qemu::check_clean(&top, format)?;
    let info = qemu::info(&top, Some(format), false)?;
    ensure!(
        info["virtual-size"] == 5 * MIB,
        "size comes from the backing file: {info}"
    );
    ensure!(info["backing-filename"] == "layer0.qcow2", "{info}");
    // QED records only "backing is raw" (no-probe bit): QEMU shows no format for a qcow2 base.
    if format == "qcow2" {
        ensure!(info["backing-filename-format"] == "qcow2", "{info}");
    }
    if let Some(diff) = qemu::compare(&base, "qcow2", &top, format)? {
        bail!("a new overlay must read as its backing file: {diff}");
    }
    Ok(())
}

#[test]
fn create_qcow2_overlay_without_size_takes_the_backing_size() -> Result<()> {
    create_overlay_without_size("qcow2")
}

#[test]
fn create_qed_overlay_without_size_takes_the_backing_size() -> Result<()> {
    create_overlay_without_size("qed")
}

// ---------------------------------------------------------------------------------- writes

/// Runs `imgstream io -f FMT FILE -c CMD` and applies it to the model.
struct Writer<'a> {
    file: &'a Path,
    format: &'a str,
    model: Model,
}

impl Writer<'_> {
    fn io(&self, command: &str) -> Result<()> {
        imgstream::run_ok(&["io", "-f", self.format, &p(self.file), "-c", command])?;
        Ok(())
    }

    fn write(&mut self, offset: u64, len: u64, pattern: u8) -> Result<()> {
        self.model.fill(offset, len, pattern)?;
        self.io(&format!("write -P {pattern:#x} {offset} {len}"))
    }

    fn zero(&mut self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.model.fill(offset, len, 0)?;
        let u = if unmap { "-u " } else { "" };
        self.io(&format!("write -z {u}{offset} {len}"))
    }

    /// Passes if `qemu-img check` is clean and `qemu-img compare` finds the model.
    fn verify(&self, dir: &Path) -> Result<()> {
        qemu::check_clean(self.file, self.format)?;
        let model = dir.join("model.raw");
        self.model.write_raw(&model)?;
        if let Some(diff) = qemu::compare(&model, "raw", self.file, self.format)? {
            bail!("qemu reads something else than was written: {diff}");
        }
        Ok(())
    }
}

/// Overlay of `format` over a 4 MiB raw base holding 0x11 in its first 3 MiB, then data,
/// zero and partial-cluster writes (each partial one is a copy-on-write from the base).
fn writes_over_raw_backing(format: Format) -> Result<()> {
    let t = tempfile::tempdir()?;
    let chain = Chain::new(t.path())
        .base(Format::Raw, "4M")?
        .write(0, 3 * MIB, 0x11)?
        .overlay(format)?;
    let top = chain.top()?.path.clone();
    let mut w = Writer {
        file: &top,
        format: format.name(),
        model: chain.expected().clone(),
    };
    w.write(0, 64 * KIB, 0x22)?;
    w.write(70_000, 1000, 0x33)?;
    w.write(MIB - 512, 1024, 0x44)?;
    w.zero(2 * MIB, 64 * KIB, false)?;
    w.zero(2 * MIB + 128 * KIB, 128 * KIB, true)?;
    w.zero(100_000, 3000, false)?;
    w.write(3 * MIB + 512 * KIB, 4 * KIB, 0x55)?;
    w.write(4 * MIB - 1, 1, 0x66)?;
    w.verify(t.path())
}

#[test]
fn io_writes_over_raw_backing_read_back_in_qemu_and_check_clean_for_qcow2_v2() -> Result<()> {
    writes_over_raw_backing(Format::qcow2_v2(64 * KIB))
}

#[test]
fn io_writes_over_raw_backing_read_back_in_qemu_and_check_clean_for_qcow2_v3() -> Result<()> {
    writes_over_raw_backing(Format::qcow2_v3(64 * KIB))
}

#[test]
fn io_writes_over_raw_backing_read_back_in_qemu_and_check_clean_for_qcow2_v3_4k() -> Result<()> {
    writes_over_raw_backing(Format::qcow2_v3(4 * KIB))
}

#[test]
fn io_writes_over_raw_backing_read_back_in_qemu_and_check_clean_for_qed() -> Result<()> {
    writes_over_raw_backing(Format::qed(64 * KIB))
}

/// A standalone 4 KiB-cluster qcow2 v3 written across several L2 tables (2 MiB each), so new
/// L2 tables and refcount entries must be allocated.
#[test]
fn io_writes_across_l2_tables_of_new_qcow2_v3_4k_image_check_clean() -> Result<()> {
    let t = tempfile::tempdir()?;
    let chain = Chain::new(t.path()).base(Format::qcow2_v3(4 * KIB), "8M")?;
    let top = chain.top()?.path.clone();
    let mut w = Writer {
        file: &top,
        format: "qcow2",
        model: chain.expected().clone(),
    };
    for (i, offset) in [
        0,
        2 * MIB - 2 * KIB,
        4 * MIB + 512,
        6 * MIB,
        8 * MIB - 4 * KIB,
    ]
    .into_iter()
    .enumerate()
    {
        w.write(offset, 4 * KIB, 0x70 + i as u8)?;
    }
    w.zero(6 * MIB, 4 * KIB, false)?;
    w.verify(t.path())
}

/// Discard may leave old data, zeroes or the backing content; anything else is a bug, and
/// the image must stay consistent.
fn discard_over_backing(format: Format) -> Result<()> {
    let t = tempfile::tempdir()?;
    let chain = Chain::new(t.path())
        .base(Format::Raw, "1M")?
        .write(0, MIB, 0x11)?
        .overlay(format)?;
    let top = chain.top()?.path.clone();
    let mut w = Writer {
        file: &top,
        format: format.name(),
        model: chain.expected().clone(),
    };
    w.write(0, 256 * KIB, 0x22)?;
    w.io(&format!("discard {} {}", 64 * KIB, 128 * KIB))?;
    qemu::check_clean(&top, format.name())?;

    let out = t.path().join("out.raw");
    qemu::convert_to_raw(&top, Some(format.name()), &out)?;
    let content = std::fs::read(&out)?;
    let (start, end) = (64 * KIB as usize, 192 * KIB as usize);
    for (i, sector) in content[start..end].chunks(512).enumerate() {
        let first = sector[0];
        ensure!(
            [0x22, 0x00, 0x11].contains(&first) && sector.iter().all(|&b| b == first),
            "discarded sector at {} reads neither old data, zeroes nor backing data",
            start + 512 * i
        );
    }
    let expected = w.model.bytes();
    for (a, b) in [(0, start), (end, content.len())] {
        if let Some(diff) = first_difference(&expected[a..b], &content[a..b]) {
            bail!("outside the discarded range, from byte {a}: {diff}");
        }
    }
    Ok(())
}

#[test]
fn discard_over_backing_keeps_qcow2_v3_consistent() -> Result<()> {
    discard_over_backing(Format::qcow2_v3(64 * KIB))
}

#[test]
fn discard_over_backing_keeps_qed_consistent() -> Result<()> {
    discard_over_backing(Format::qed(64 * KIB))
}

#[test]
fn io_read_pattern_mismatch_is_reported_and_exits_1() -> Result<()> {
    let t = tempfile::tempdir()?;
    let chain = Chain::new(t.path())
        .base(Format::qcow2_v3(64 * KIB), "1M")?
        .write(0, 4 * KIB, 0x05)?
        .write(1000, 1, 0x07)?;
    let f = p(&chain.top()?.path);
    let ok = imgstream::run_ok(&["io", "-f", "qcow2", &f, "-c", "read -P 0x5 2k 2k"])?;
    ensure!(
        ok.stdout.contains("read 2048/2048 bytes at offset 2048"),
        "{}",
        ok.describe()
    );
    let bad = imgstream::run(&["io", "-f", "qcow2", &f, "-c", "read -P 0x5 0 4k"])?;
    ensure!(bad.code == Some(1), "{}", bad.describe());
    // qemu-io names the request's offset (0); naming the first bad byte (1000) is also fine.
    let said = format!("{}{}", bad.stdout, bad.stderr);
    ensure!(
        said.contains("Pattern verification failed at offset 0")
            || said.contains("Pattern verification failed at offset 1000"),
        "{}",
        bad.describe()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------- rebase

fn rebase_both_ways(format: Format) -> Result<()> {
    let t = tempfile::tempdir()?;
    let chain = Chain::new(t.path())
        .base(Format::Raw, "1M")?
        .write(0, MIB, 0x11)?
        .overlay(format)?
        .write(0, 64 * KIB, 0x22)?;
    let top = chain.top()?.path.clone();
    let fmt = format.name();
    // A longer name than the original, so the header's name area must grow.
    let new_name = format!("{}.raw", "new-backing-file-with-a-long-name-".repeat(4));
    let new_base = t.path().join(&new_name);
    qemu::create(&new_base, "raw", None, None, Some("1M"))?;
    qemu::io(&new_base, "raw", &["write -P 0x33 0 1M".to_string()])?;

    imgstream::run_ok(&[
        "rebase",
        "-u",
        "-f",
        fmt,
        "-b",
        &new_name,
        "-F",
        "raw",
        &p(&top),
    ])?;
    qemu::check_clean(&top, fmt)?;
    let info = qemu::info(&top, Some(fmt), false)?;
    ensure!(info["backing-filename"] == new_name.as_str(), "{info}");
    ensure!(info["backing-filename-format"] == "raw", "{info}");
    let mut model = Model::zeroed(MIB);
    model.fill(0, MIB, 0x33)?;
    model.fill(0, 64 * KIB, 0x22)?;
    let model_file = t.path().join("model.raw");
    model.write_raw(&model_file)?;
    if let Some(diff) = qemu::compare(&model_file, "raw", &top, fmt)? {
        bail!("after rebase -u to {new_name}: {diff}");
    }

    imgstream::run_ok(&["rebase", "-u", "-f", fmt, "-b", "", &p(&top)])?;
    qemu::check_clean(&top, fmt)?;
    let info = qemu::info(&top, Some(fmt), false)?;
    ensure!(info.get("backing-filename").is_none(), "{info}");
    ensure!(info.get("backing-filename-format").is_none(), "{info}");
    model.fill(64 * KIB, MIB - 64 * KIB, 0)?;
    model.write_raw(&model_file)?;
    if let Some(diff) = qemu::compare(&model_file, "raw", &top, fmt)? {
        bail!("after dropping the backing file: {diff}");
    }
    Ok(())
}

#[test]
fn rebase_unsafe_to_longer_name_then_to_none_for_qcow2_v2() -> Result<()> {
    rebase_both_ways(Format::qcow2_v2(64 * KIB))
}

#[test]
fn rebase_unsafe_to_longer_name_then_to_none_for_qcow2_v3() -> Result<()> {
    rebase_both_ways(Format::qcow2_v3(64 * KIB))
}

#[test]
fn rebase_unsafe_to_longer_name_then_to_none_for_qed() -> Result<()> {
    rebase_both_ways(Format::qed(64 * KIB))
}

// ---------------------------------------------------------------------------------- check

/// `qemu-img check --output=json` fields imgstream reports; equal or absent from both.
const CHECK_FIELDS: &[&str] = &[
    "check-errors",
    "leaks",
    "corruptions",
    "leaks-fixed",
    "corruptions-fixed",
    "image-end-offset",
    "total-clusters",
    "allocated-clusters",
    "filename",
    "format",
];

/// Runs both checks (read-only) and requires the same exit code and reported fields.
fn check_agrees_with_qemu(file: &Path, format: &str) -> Result<i32> {
    let theirs = qemu::check(file, Some(format), None)?;
    let ours = imgstream::run(&["check", "-f", format, "--output", "json", &p(file)])?;
    ensure!(
        ours.code == Some(theirs.code),
        "imgstream check exit {:?}, qemu-img check {}:\n{}",
        ours.code,
        theirs.code,
        ours.describe()
    );
    let code = theirs.code;
    let ours: Value = serde_json::from_str(&ours.stdout)?;
    let theirs = theirs.report.unwrap_or(Value::Null);
    for field in CHECK_FIELDS {
        ensure!(
            ours.get(field) == theirs.get(field),
            "check field `{field}`: imgstream {:?}, qemu-img {:?}",
            ours.get(field),
            theirs.get(field)
        );
    }
    Ok(code)
}

fn clean_image_check(format: Format) -> Result<()> {
    let t = tempfile::tempdir()?;
    let chain = Chain::new(t.path())
        .base(format, "4M")?
        .write(0, MIB, 0x12)?
        .write(3 * MIB + 100, 5000, 0x13)?;
    let code = check_agrees_with_qemu(&chain.top()?.path, format.name())?;
    ensure!(code == 0, "fixture must be clean");
    Ok(())
}

#[test]
fn check_agrees_with_qemu_on_clean_qcow2_v2() -> Result<()> {
    clean_image_check(Format::qcow2_v2(4 * KIB))
}

#[test]
fn check_agrees_with_qemu_on_clean_qcow2_v3() -> Result<()> {
    clean_image_check(Format::qcow2_v3(64 * KIB))
}

#[test]
fn check_agrees_with_qemu_on_clean_qed() -> Result<()> {
    clean_image_check(Format::qed(64 * KIB))
}

#[test]
fn check_reports_leaked_cluster_with_exit_3_and_repair_leaks_fixes_it() -> Result<()> {
    let t = tempfile::tempdir()?;
    let f = damaged::qcow2_with_leaked_cluster(t.path())?;
    let code = check_agrees_with_qemu(&f, "qcow2")?;
    ensure!(code == 3, "fixture must have only leaks");
    imgstream::run_ok(&["check", "-f", "qcow2", "-r", "leaks", &p(&f)])?;
    qemu::check_clean(&f, "qcow2")
}

#[test]
fn check_reports_data_cluster_with_refcount_0_as_corruption_exit_2_without_repairing() -> Result<()>
{
    let t = tempfile::tempdir()?;
    let f = damaged::qcow2_with_unrefcounted_data_cluster(t.path())?;
    let before = std::fs::read(&f)?;
    let code = check_agrees_with_qemu(&f, "qcow2")?;
    ensure!(code == 2, "fixture must be corrupt");
    ensure!(
        std::fs::read(&f)? == before,
        "check without -r modified the image"
    );
    Ok(())
}

#[test]
fn check_on_raw_exits_63_like_qemu_img() -> Result<()> {
    let t = tempfile::tempdir()?;
    let f = t.path().join("a.raw");
    qemu::create(&f, "raw", None, None, Some("1M"))?;
    let out = imgstream::run(&["check", "-f", "raw", &p(&f)])?;
    ensure!(out.code == Some(63), "{}", out.describe());
    Ok(())
}

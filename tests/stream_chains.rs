//! `imgstream stream` on chains made by QEMU's tools, judged by QEMU's tools: the header names
//! the expected backing file (or none), `qemu-img check` is clean, the content is what it was,
//! nothing at or below the base was copied, zero ranges became zero clusters, and the images
//! below the top are byte-for-byte unchanged. Also: a stream cancelled by SIGINT and restarted
//! completes and skips what the first run copied.

use anyhow::{ensure, Context, Result};
use imgstream_tests::fixtures::{Chain, Format};
use imgstream_tests::{imgstream, qemu, KIB, MIB};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const CS: u64 = 64 * KIB;

fn sha(path: &Path) -> Result<Vec<u8>> {
    // Whole files are small here; equality of the bytes is what matters.
    Ok(std::fs::read(path)?)
}

/// One qemu-img map entry.
#[derive(Debug, Clone, Copy)]
struct Extent {
    start: u64,
    length: u64,
    depth: u64,
    present: bool,
    zero: bool,
    data: bool,
}

fn extents(file: &Path, fmt: &str) -> Result<Vec<Extent>> {
    let map = qemu::map(file, Some(fmt))?;
    map.as_array()
        .context("map is an array")?
        .iter()
        .map(|e| {
            Ok(Extent {
                start: e["start"].as_u64().context("start")?,
                length: e["length"].as_u64().context("length")?,
                depth: e["depth"].as_u64().context("depth")?,
                present: e["present"].as_bool().unwrap_or(true),
                zero: e["zero"].as_bool().context("zero")?,
                data: e["data"].as_bool().context("data")?,
            })
        })
        .collect()
}

fn at(map: &[Extent], offset: u64) -> Extent {
    *map.iter()
        .find(|e| e.start <= offset && offset < e.start + e.length)
        .unwrap_or_else(|| panic!("no map entry at {offset}"))
}

/// A chain before its stream: the top, the images below with their bytes, the content as raw
/// and qemu-img's map.
struct Before {
    top: PathBuf,
    fmt: &'static str,
    below: Vec<(PathBuf, Vec<u8>)>,
    raw: PathBuf,
    map: Vec<Extent>,
    zero_clusters: bool,
}

fn snapshot(chain: &Chain) -> Result<Before> {
    let top = chain.top()?;
    let raw = chain.dir().join("before.raw");
    qemu::convert_to_raw(&top.path, Some(top.format.name()), &raw)?;
    let mut below = Vec::new();
    for layer in &chain.layers()[..chain.layers().len() - 1] {
        below.push((layer.path.clone(), sha(&layer.path)?));
    }
    Ok(Before {
        top: top.path.clone(),
        fmt: top.format.name(),
        below,
        raw,
        map: extents(&top.path, top.format.name())?,
        zero_clusters: top.format.has_zero_clusters(),
    })
}

/// Runs `imgstream stream ARGS TOP` and checks everything the module comment promises.
/// `kept` is the depth of the base in the old chain (the chain length for a full stream);
/// `backing` what the header must name afterwards.
/// What the header must name after the stream.
enum Backing<'a> {
    None,
    /// Exactly this string (`--backing-file`).
    Verbatim(&'a str),
    /// Any name that resolves (from the top's folder) to this file.
    SameFile(&'a Path),
}

fn stream_and_verify(before: &Before, args: &[&str], kept: u64, backing: Backing) -> Result<()> {
    let mut full = vec!["stream".to_string()];
    full.extend(args.iter().map(|a| a.to_string()));
    full.push(before.top.to_string_lossy().into_owned());
    imgstream::run_ok(&full)?;
    let context = format!("imgstream {}", full.join(" "));
    let info = qemu::info(&before.top, None, false)?;
    ensure!(
        info["format"] == before.fmt,
        "{context}: format {}",
        info["format"]
    );
    let recorded = info["backing-filename"].as_str();
    let ok = match backing {
        Backing::None => recorded.is_none(),
        Backing::Verbatim(name) => recorded == Some(name),
        Backing::SameFile(file) => recorded.is_some_and(|r| {
            let resolved = before.top.parent().unwrap().join(r);
            resolved.canonicalize().ok() == file.canonicalize().ok()
        }),
    };
    ensure!(ok, "{context}: header names {recorded:?}");
    qemu::check_clean(&before.top, before.fmt)?;
    if let Some(diff) = qemu::compare(&before.top, before.fmt, &before.raw, "raw")? {
        anyhow::bail!("{context}: content changed: {diff}");
    }
    for (path, bytes) in &before.below {
        ensure!(
            &sha(path)? == bytes,
            "{context}: {} changed",
            path.display()
        );
    }
    let after = extents(&before.top, before.fmt)?;
    for old in &before.map {
        let mut offset = old.start;
        while offset < old.start + old.length {
            let new = at(&after, offset);
            let what = format!("{context}: at {offset}: before {old:?}, after {new:?}");
            if !old.present {
                ensure!(!new.data, "{what}: became data");
            } else if old.depth == 0 {
                ensure!(new.depth == 0, "{what}: top data moved");
            } else if old.depth >= kept {
                ensure!(new.depth >= 1, "{what}: base data was copied");
            } else {
                ensure!(new.depth == 0 && new.present, "{what}: not copied");
                if old.zero && !old.data && before.zero_clusters {
                    ensure!(new.zero && !new.data, "{what}: zeroes not a zero cluster");
                }
                if !before.zero_clusters {
                    ensure!(new.data, "{what}: v2 has no zero clusters, expected data");
                }
            }
            offset = (offset / CS + 1) * CS;
        }
    }
    Ok(())
}

/// base (fmt) <- mid qcow2 <- top (fmt), 8 MiB, data, zero clusters and unaligned writes.
fn three_deep(dir: &Path, base: Format, top: Format) -> Result<Chain> {
    let mut chain = Chain::new(dir).base(base, "8M")?;
    chain = chain.write(0, 3 * MIB, 0xaa)?.write(5 * MIB, MIB, 0xab)?;
    if base != Format::Raw {
        chain = chain.write_zeroes(6 * MIB, 256 * KIB)?;
    }
    chain = chain
        .overlay(Format::qcow2_v3(CS))?
        .write(MIB, 512 * KIB, 0xcc)?
        .write_zeroes(2 * MIB, 256 * KIB)?
        .write(4 * MIB + 1000, 3000, 0xcd)?
        .write_zeroes(5 * MIB + 128 * KIB, 128 * KIB)?;
    chain
        .overlay(top)?
        .write(1536 * KIB, 64 * KIB, 0xdd)?
        .write(7 * MIB + 777, 5000, 0xde)
}

fn name(chain: &Chain, depth: usize) -> String {
    let layers = chain.layers();
    layers[layers.len() - 1 - depth]
        .path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn full_stream_of_qcow2_and_qed_tops_over_raw_qcow2_and_qed_bases() -> Result<()> {
    let bases = [Format::Raw, Format::qcow2_v3(CS), Format::qed(CS)];
    let tops = [Format::qcow2_v3(CS), Format::qed(CS)];
    for base in bases {
        for top in tops {
            let dir = tempfile::tempdir()?;
            let chain = three_deep(dir.path(), base, top)?;
            let before = snapshot(&chain)?;
            stream_and_verify(&before, &[], 3, Backing::None)
                .with_context(|| format!("base {base:?}, top {top:?}"))?;
        }
    }
    Ok(())
}

#[test]
fn full_stream_of_a_qcow2_v2_top_turns_zeroes_into_data() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let chain = three_deep(dir.path(), Format::qcow2_v3(CS), Format::qcow2_v2(CS))?;
    let before = snapshot(&chain)?;
    stream_and_verify(&before, &[], 3, Backing::None)
}

#[test]
fn stream_with_base_keeps_base_data_by_relative_and_absolute_name() -> Result<()> {
    for absolute in [false, true] {
        let dir = tempfile::tempdir()?;
        let chain = three_deep(dir.path(), Format::qcow2_v3(CS), Format::qcow2_v3(CS))?;
        let base = name(&chain, 2);
        let arg = if absolute {
            dir.path().join(&base).to_string_lossy().into_owned()
        } else {
            base.clone()
        };
        let before = snapshot(&chain)?;
        let base_path = dir.path().join(&base);
        stream_and_verify(&before, &["--base", &arg], 2, Backing::SameFile(&base_path))
            .with_context(|| format!("--base {arg}"))?;
    }
    Ok(())
}

#[test]
fn stream_with_base_node_and_with_bottom_copy_only_the_middle() -> Result<()> {
    for args in [["--base-node", "top.2"], ["--bottom", "top.1"]] {
        let dir = tempfile::tempdir()?;
        let chain = three_deep(dir.path(), Format::Raw, Format::qed(CS))?;
        let base_path = chain.layers()[0].path.to_string_lossy().into_owned();
        let before = snapshot(&chain)?;
        let out = imgstream::run(&[
            "stream".to_string(),
            args[0].into(),
            args[1].into(),
            before.top.to_string_lossy().into_owned(),
        ])?;
        ensure!(out.success(), "{args:?}: {}", out.describe());
        let now = qemu::info(&before.top, None, false)?;
        let recorded = now["backing-filename"]
            .as_str()
            .context("backing")?
            .to_string();
        ensure!(
            Path::new(&recorded).file_name() == Path::new(&base_path).file_name(),
            "{args:?}: backing {recorded}"
        );
        ensure!(now["backing-filename-format"] == "raw", "{args:?}: {now}");
        qemu::check_clean(&before.top, before.fmt)?;
        ensure!(qemu::compare(&before.top, before.fmt, &before.raw, "raw")?.is_none());
        for (path, bytes) in &before.below {
            ensure!(&sha(path)? == bytes, "{args:?}: {} changed", path.display());
        }
        let after = extents(&before.top, before.fmt)?;
        for old in before.map.iter().filter(|e| e.present && e.depth == 2) {
            ensure!(
                at(&after, old.start).depth == 1,
                "{args:?}: base data copied at {}",
                old.start
            );
        }
        for old in before.map.iter().filter(|e| e.present && e.depth == 1) {
            ensure!(
                at(&after, old.start).depth == 0,
                "{args:?}: mid data not copied at {}",
                old.start
            );
        }
    }
    Ok(())
}

#[test]
fn stream_onto_the_immediate_backing_file_is_a_no_op() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let chain = three_deep(dir.path(), Format::qcow2_v3(CS), Format::qcow2_v3(CS))?;
    let before = snapshot(&chain)?;
    let top_bytes = sha(&before.top)?;
    let out = imgstream::run_ok(&[
        "stream".to_string(),
        "--json".into(),
        "--base-node".into(),
        "top.1".into(),
        before.top.to_string_lossy().into_owned(),
    ])?;
    let done = last_event(&out.stdout, "BLOCK_JOB_COMPLETED")?;
    ensure!(done["len"] == 0 && done["offset"] == 0, "{done}");
    ensure!(sha(&before.top)? == top_bytes, "the top changed");
    Ok(())
}

#[test]
fn backing_file_option_is_written_verbatim() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let chain = three_deep(dir.path(), Format::qcow2_v3(CS), Format::qcow2_v3(CS))?;
    let custom = format!("./{}", name(&chain, 2));
    let before = snapshot(&chain)?;
    stream_and_verify(
        &before,
        &["--base-node", "top.2", "--backing-file", &custom],
        2,
        Backing::Verbatim(&custom),
    )
}

#[test]
fn full_stream_over_a_shorter_backing_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let chain = Chain::new(dir.path())
        .base(Format::Raw, "1M")?
        .write(0, MIB, 0x11)?
        .overlay_sized(Format::qcow2_v3(CS), "4M")?
        .write(3 * MIB, 64 * KIB, 0x22)?;
    let before = snapshot(&chain)?;
    stream_and_verify(&before, &[], 2, Backing::None)?;
    let after = extents(&before.top, before.fmt)?;
    ensure!(
        !at(&after, 2 * MIB).data,
        "past the backing file's end became data: {after:?}"
    );
    Ok(())
}

fn last_event(stdout: &str, name: &str) -> Result<Value> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .rfind(|v| v["event"] == name)
        .with_context(|| format!("no {name} in:\n{stdout}"))
}

#[test]
fn restarted_stream_after_sigint_completes_and_skips_what_was_copied() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut chain = Chain::new(dir.path()).base(Format::qcow2_v3(CS), "32M")?;
    chain = chain
        .write(0, 32 * MIB, 0x5a)?
        .overlay(Format::qcow2_v3(CS))?;
    let before = snapshot(&chain)?;
    // 2 MiB/s over 32 MiB: the first progress line (after about a second) comes long before
    // the end; flushing every 512 KiB makes what was copied durable before the interrupt.
    let mut child = Command::new(imgstream::binary()?)
        .args([
            "stream",
            "--json",
            "--speed",
            "2M",
            "--flush-interval",
            "524288",
        ])
        .arg(&before.top)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut output = String::new();
    for line in lines.by_ref() {
        let line = line?;
        output.push_str(&line);
        output.push('\n');
        if line.contains("\"PROGRESS\"") {
            break;
        }
    }
    let pid = child.id().to_string();
    Command::new("kill").args(["-INT", &pid]).status()?;
    for line in lines {
        output.push_str(&line?);
        output.push('\n');
    }
    let status = child.wait()?;
    ensure!(status.code() == Some(130), "exit {status:?}:\n{output}");
    let first = last_event(&output, "STREAM_SUMMARY")?["copied"]
        .as_u64()
        .context("copied")?;
    ensure!(first > 0 && first < 32 * MIB, "first run copied {first}");
    last_event(&output, "BLOCK_JOB_CANCELLED")?;
    let info = qemu::info(&before.top, None, false)?;
    ensure!(
        info["backing-filename"].is_string(),
        "backing dropped by a cancelled stream"
    );
    qemu::check_clean(&before.top, before.fmt)?;
    ensure!(qemu::compare(&before.top, before.fmt, &before.raw, "raw")?.is_none());
    let out = imgstream::run_ok(&[
        "stream".to_string(),
        "--json".into(),
        before.top.to_string_lossy().into_owned(),
    ])?;
    let second = last_event(&out.stdout, "STREAM_SUMMARY")?["copied"]
        .as_u64()
        .context("copied")?;
    ensure!(
        first + second == 32 * MIB,
        "first run copied {first}, the second {second}: together not exactly the 32 MiB"
    );
    let info = qemu::info(&before.top, None, false)?;
    ensure!(info["backing-filename"].is_null(), "{info}");
    qemu::check_clean(&before.top, before.fmt)?;
    ensure!(qemu::compare(&before.top, before.fmt, &before.raw, "raw")?.is_none());
    Ok(())
}

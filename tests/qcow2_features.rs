//! qcow2 features through the `imgstream` binary, with QEMU's tools as oracles: every refcount
//! width, images left dirty by lazy refcounts, the corrupt bit, header extensions kept by
//! `rebase -u`, copy-on-write from compressed clusters, zstd, and extended L2 refused.

use anyhow::{bail, Context, Result};
use imgstream_tests::{imgstream, ondisk, qemu};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

/// incompatible_features (qcow2.txt, header bytes 72..80) and its bits.
const INCOMPAT_OFFSET: u64 = 72;
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// A header extension type no QEMU knows, which it must keep (qcow2.txt: unknown extensions).
const EXT_UNKNOWN: u32 = 0x1d5e_a5e0;

fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

fn io_lines(commands: &[&str]) -> Vec<String> {
    commands.iter().map(|c| c.to_string()).collect()
}

/// Runs `imgstream io [-r] -c ... FILE` and requires success.
fn imgstream_io(file: &Path, read_only: bool, commands: &[&str]) -> Result<()> {
    let mut args = vec!["io".to_string(), "-f".into(), "qcow2".into()];
    if read_only {
        args.push("-r".into());
    }
    for c in commands {
        args.extend(["-c".into(), c.to_string()]);
    }
    args.push(s(file).into());
    let out = imgstream::run(&args)?;
    if !out.success() || out.stdout.contains("failed") {
        bail!("imgstream {args:?} failed:\n{}", out.describe());
    }
    Ok(())
}

#[test]
fn every_refcount_width_grows_refcount_blocks_and_stays_clean() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for bits in [1u32, 2, 4, 8, 16, 32, 64] {
        let img = dir.path().join(format!("rc{bits}.qcow2"));
        // 512-byte clusters: one refcount block covers 4096 / bits clusters, so 3 MiB of data
        // needs new refcount blocks at every width.
        qemu::create(
            &img,
            "qcow2",
            Some(&format!("refcount_bits={bits},cluster_size=512")),
            None,
            Some("16M"),
        )?;
        imgstream_io(
            &img,
            false,
            &[
                "write -P 0x61 0 3M",
                "write -P 0x62 8M 1M",
                "write -P 0x63 1000 5000",
            ],
        )?;
        qemu::check_clean(&img, "qcow2").with_context(|| format!("refcount_bits={bits}"))?;
        qemu::io(
            &img,
            "qcow2",
            &io_lines(&[
                "read -P 0x61 0 1000",
                "read -P 0x63 1000 5000",
                "read -P 0x61 6000 3139728",
                "read -P 0 3M 5M",
                "read -P 0x62 8M 1M",
            ]),
        )
        .with_context(|| format!("refcount_bits={bits}"))?;
    }
    Ok(())
}

/// Writes through qemu-io on a lazy-refcounts image and SIGKILLs it before it can exit, so
/// the dirty bit stays set and the refcounts are stale.
fn leave_dirty_by_qemu(img: &Path) -> Result<()> {
    let mut child = Command::new("qemu-io")
        .args(["-f", "qcow2", s(img)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("qemu-io is required (qemu-utils)")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
    // One command at a time: qemu-io handles only one buffered line per wakeup of its stdin.
    // `-f` (FUA) makes each write durable, data and tables, without a `flush` (which prints
    // nothing to wait for).
    for (command, answer) in [
        ("write -f -P 0x5a 0 1M", "wrote 1048576/1048576"),
        ("write -f -P 0x5b 2M 64k", "wrote 65536/65536"),
    ] {
        writeln!(stdin, "{command}")?;
        stdin.flush()?;
        let mut line = String::new();
        loop {
            line.clear();
            if stdout.read_line(&mut line)? == 0 {
                bail!("qemu-io ended before answering `{command}`");
            }
            if line.contains(answer) {
                break;
            }
        }
    }
    child.kill()?;
    child.wait()?;
    Ok(())
}

#[test]
fn lazy_refcounts_image_left_dirty_by_qemu_is_repaired_on_writable_open() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("lazy.qcow2");
    qemu::create(&img, "qcow2", Some("lazy_refcounts=on"), None, Some("8M"))?;
    leave_dirty_by_qemu(&img)?;
    let incompat = ondisk::get_be64(&img, INCOMPAT_OFFSET)?;
    assert_ne!(
        incompat & INCOMPAT_DIRTY,
        0,
        "qemu-io killed with lazy refcounts should leave the dirty bit set"
    );
    imgstream_io(&img, false, &["write -P 0x33 4M 100k"])?;
    let incompat = ondisk::get_be64(&img, INCOMPAT_OFFSET)?;
    assert_eq!(incompat & INCOMPAT_DIRTY, 0, "dirty bit still set");
    qemu::check_clean(&img, "qcow2")?;
    qemu::io(
        &img,
        "qcow2",
        &io_lines(&[
            "read -P 0x5a 0 1M",
            "read -P 0 1M 1M",
            "read -P 0x5b 2M 64k",
            "read -P 0x33 4M 100k",
        ]),
    )?;
    Ok(())
}

#[test]
fn corrupt_image_refuses_writes_unchanged_and_still_reads() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("corrupt.qcow2");
    qemu::create(&img, "qcow2", None, None, Some("8M"))?;
    qemu::io(&img, "qcow2", &io_lines(&["write -P 0xab 0 64k"]))?;
    let incompat = ondisk::get_be64(&img, INCOMPAT_OFFSET)?;
    ondisk::put_be64(&img, INCOMPAT_OFFSET, incompat | INCOMPAT_CORRUPT)?;
    let before = std::fs::read(&img)?;

    let out = imgstream::run(&["io", "-f", "qcow2", "-c", "write -P 1 0 512", s(&img)])?;
    assert!(!out.success(), "write to a corrupt image succeeded");
    let text = format!("{}{}", out.stdout, out.stderr).to_lowercase();
    assert!(
        text.contains("corrupt"),
        "refusal does not say the image is corrupt:\n{}",
        out.describe()
    );
    assert!(
        std::fs::read(&img)? == before,
        "refused write changed the file"
    );
    imgstream_io(&img, true, &["read -P 0xab 0 64k"])?;
    assert!(
        std::fs::read(&img)? == before,
        "read-only open changed the file"
    );
    Ok(())
}

/// The header extensions as (type, data) in on-disk order, and where they end.
fn extensions(header: &[u8]) -> Vec<(u32, Vec<u8>)> {
    let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().unwrap());
    let mut at = be32(100) as usize; // header_length (version 3)
    let mut found = Vec::new();
    loop {
        let kind = be32(at);
        let len = be32(at + 4) as usize;
        if kind == 0 {
            return found;
        }
        found.push((kind, header[at + 8..at + 8 + len].to_vec()));
        at += 8 + len.next_multiple_of(8);
    }
}

/// Adds an unknown extension in front of the end marker, moving the backing name behind it.
fn add_unknown_extension(img: &Path, data: &[u8]) -> Result<()> {
    let mut header = ondisk::read_at(img, 0, 65536)?;
    let be32 = |h: &[u8], at: usize| u32::from_be_bytes(h[at..at + 4].try_into().unwrap());
    let backing_offset = u64::from_be_bytes(header[8..16].try_into()?) as usize;
    let backing_len = be32(&header, 16) as usize;
    let backing = header[backing_offset..backing_offset + backing_len].to_vec();
    let mut at = be32(&header, 100) as usize;
    while be32(&header, at) != 0 {
        at += 8 + (be32(&header, at + 4) as usize).next_multiple_of(8);
    }
    let mut tail = Vec::new();
    tail.extend(EXT_UNKNOWN.to_be_bytes());
    tail.extend((data.len() as u32).to_be_bytes());
    tail.extend(data);
    tail.resize(8 + data.len().next_multiple_of(8), 0);
    tail.extend([0u8; 8]); // end marker
    let new_backing = at + tail.len();
    tail.extend(&backing);
    header[at..at + tail.len()].copy_from_slice(&tail);
    header[8..16].copy_from_slice(&(new_backing as u64).to_be_bytes());
    ondisk::patch(img, 0, &header[..at + tail.len()])?;
    Ok(())
}

#[test]
fn rebase_unsafe_keeps_feature_table_and_unknown_extension_byte_for_byte() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base = dir.path().join("base.raw");
    let other = dir.path().join("other.raw");
    let img = dir.path().join("top.qcow2");
    qemu::create(&base, "raw", None, None, Some("8M"))?;
    qemu::create(&other, "raw", None, None, Some("8M"))?;
    qemu::create(&img, "qcow2", None, Some((s(&base), "raw")), Some("8M"))?;
    add_unknown_extension(&img, b"imgstream keeps what it does not know")?;
    qemu::check_clean(&img, "qcow2")?;
    let before = extensions(&ondisk::read_at(&img, 0, 65536)?);
    assert!(before.iter().any(|(k, _)| *k == EXT_FEATURE_TABLE));
    assert!(before.iter().any(|(k, _)| *k == EXT_UNKNOWN));

    imgstream::run_ok(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        s(&other),
        "-F",
        "raw",
        s(&img),
    ])?;
    let after = extensions(&ondisk::read_at(&img, 0, 65536)?);
    for kind in [EXT_FEATURE_TABLE, EXT_UNKNOWN] {
        let old = before.iter().find(|(k, _)| *k == kind);
        let new = after.iter().find(|(k, _)| *k == kind);
        assert_eq!(old, new, "extension {kind:#x} changed across rebase -u");
    }
    let info = qemu::info(&img, Some("qcow2"), false)?;
    assert_eq!(info["backing-filename"], s(&other));
    qemu::check_clean(&img, "qcow2")?;
    Ok(())
}

#[test]
fn partial_overwrite_of_compressed_clusters_copies_them_and_stays_clean() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("comp.qcow2");
    qemu::create(&img, "qcow2", None, None, Some("8M"))?;
    qemu::io(
        &img,
        "qcow2",
        &io_lines(&["write -c -P 0x77 0 64k", "write -c -P 0x78 64k 64k"]),
    )?;
    imgstream_io(
        &img,
        false,
        &["write -P 0x99 1000 3000", "write -P 0x9a 70000 100"],
    )?;
    qemu::check_clean(&img, "qcow2")?;
    qemu::io(
        &img,
        "qcow2",
        &io_lines(&[
            "read -P 0x77 0 1000",
            "read -P 0x99 1000 3000",
            "read -P 0x77 4000 61536",
            "read -P 0x78 65536 4464",
            "read -P 0x9a 70000 100",
            "read -P 0x78 70100 60972",
        ]),
    )?;
    Ok(())
}

#[test]
fn zstd_compressed_clusters_read_right() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("zstd.qcow2");
    qemu::create(
        &img,
        "qcow2",
        Some("compression_type=zstd"),
        None,
        Some("8M"),
    )?;
    qemu::io(
        &img,
        "qcow2",
        &io_lines(&["write -c -P 0x42 0 128k", "write -c -P 0x43 1M 64k"]),
    )?;
    let map = qemu::map(&img, Some("qcow2"))?;
    assert!(
        map.to_string().contains("\"compressed\":true"),
        "qemu-io did not write compressed clusters: {map}"
    );
    imgstream_io(
        &img,
        true,
        &[
            "read -P 0x42 0 128k",
            "read -P 0 128k 896k",
            "read -P 0x43 1M 64k",
        ],
    )?;
    Ok(())
}

#[test]
fn extended_l2_images_are_refused_with_a_message_naming_them() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let img = dir.path().join("extl2.qcow2");
    qemu::create(&img, "qcow2", Some("extended_l2=on"), None, Some("8M"))?;
    let before = std::fs::read(&img)?;
    for read_only in [false, true] {
        let mut args = vec!["io", "-f", "qcow2"];
        if read_only {
            args.push("-r");
        }
        args.extend(["-c", "read 0 512", s(&img)]);
        let out = imgstream::run(&args)?;
        let text = format!("{}{}", out.stdout, out.stderr).to_lowercase();
        assert!(
            !out.success() && (text.contains("extended l2") || text.contains("subcluster")),
            "extended L2 not refused clearly (read_only {read_only}):\n{}",
            out.describe()
        );
    }
    assert!(std::fs::read(&img)? == before, "refusal changed the file");
    Ok(())
}

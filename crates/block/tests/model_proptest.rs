//! Model-based property test of the block layer: random sequences of writes, zeroes, discards,
//! flushes and reopens on one small overlay (over a raw base with data), compared with a byte
//! model after every operation and checked by `qemu-img check` at the end. Proptest shrinks a
//! failure to a minimal sequence of operations.

use imgstream_block::{BackingRef, ChainOptions, Disk};
use imgstream_format::{create_format, CreateOptions, FileStorage, FormatKind};
use proptest::prelude::*;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

/// Held while spawning a QEMU tool and while reopening an image. A child forked by another
/// test thread holds copies of our descriptors until it execs, and with them our OFD locks:
/// a reopen in that window would find the image "in use by another process".
static SPAWN_OR_REOPEN: Mutex<()> = Mutex::new(());

const CLUSTER: u64 = 4096;
/// The operations touch a window around the first L2 boundary of a 4 KiB-cluster qcow2
/// (512 entries * 4 KiB = 2 MiB), so they allocate in two L2 tables.
const WINDOW_START: u64 = (2 << 20) - 8 * CLUSTER;
const WINDOW: u64 = 16 * CLUSTER;
const SIZE: u64 = (2 << 20) + 16 * CLUSTER;
/// The base holds this pattern over the first half of the window.
const BASE_PATTERN: u8 = 0x5b;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: u64, pattern: u8 },
    Zeroes { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
    Flush,
    Reopen,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..WINDOW).prop_flat_map(|offset| (Just(offset), 1..=(WINDOW - offset).min(5 * CLUSTER)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), 1..=255u8).prop_map(|((offset, len), pattern)| Op::Write { offset, len, pattern }),
        2 => range().prop_map(|(offset, len)| Op::Zeroes { offset, len }),
        2 => range().prop_map(|(offset, len)| Op::Discard { offset, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Clone, Copy)]
struct Target {
    kind: FormatKind,
    qcow2_version: Option<u32>,
    /// Whether discard turns whole clusters into zeroes (qcow2 v3) or does nothing (qcow2 v2
    /// over a backing file, QED), as `Disk::discard` documents.
    discard_zeroes: bool,
}

fn qemu_check(path: &Path, format: &str) -> std::result::Result<(), String> {
    let _guard = SPAWN_OR_REOPEN.lock().unwrap_or_else(|p| p.into_inner());
    let out = Command::new("qemu-img")
        .args(["check", "-f", format, path.to_str().unwrap()])
        .output()
        .map_err(|e| format!("qemu-img is required (qemu-utils): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "qemu-img check:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn run_ops(target: Target, ops: &[Op]) -> std::result::Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.img");
    let mut base_bytes = vec![0u8; SIZE as usize];
    let half = (WINDOW_START + WINDOW / 2) as usize;
    base_bytes[WINDOW_START as usize + 100..half].fill(BASE_PATTERN);
    std::fs::write(&base, &base_bytes).unwrap();
    let storage = FileStorage::create(&top).unwrap();
    create_format(
        target.kind,
        &storage,
        &CreateOptions {
            backing: Some(BackingRef {
                name: base.to_str().unwrap().into(),
                format: Some("raw".into()),
            }),
            cluster_size: Some(CLUSTER),
            qcow2_version: target.qcow2_version,
            ..CreateOptions::new(SIZE)
        },
    )
    .unwrap();
    drop(storage);

    let mut model = base_bytes[WINDOW_START as usize..(WINDOW_START + WINDOW) as usize].to_vec();
    let mut disk = Disk::open(&top, &ChainOptions::writable()).unwrap();
    for (i, op) in ops.iter().enumerate() {
        match *op {
            Op::Write {
                offset,
                len,
                pattern,
            } => {
                disk.write(WINDOW_START + offset, &vec![pattern; len as usize], false)
                    .unwrap();
                model[offset as usize..(offset + len) as usize].fill(pattern);
            }
            Op::Zeroes { offset, len } => {
                disk.write_zeroes(WINDOW_START + offset, len, false)
                    .unwrap();
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            Op::Discard { offset, len } => {
                disk.discard(WINDOW_START + offset, len).unwrap();
                if target.discard_zeroes {
                    let from = offset.div_ceil(CLUSTER) * CLUSTER;
                    let to = (offset + len) / CLUSTER * CLUSTER;
                    if to > from {
                        model[from as usize..to as usize].fill(0);
                    }
                }
            }
            Op::Flush => disk.flush().unwrap(),
            Op::Reopen => {
                let _guard = SPAWN_OR_REOPEN.lock().unwrap_or_else(|p| p.into_inner());
                drop(disk);
                disk = Disk::open(&top, &ChainOptions::writable()).unwrap();
            }
        }
        let mut seen = vec![0u8; WINDOW as usize];
        disk.read(WINDOW_START, &mut seen).unwrap();
        if let Some(at) = (0..seen.len()).find(|&j| seen[j] != model[j]) {
            return Err(TestCaseError::fail(format!(
                "after op {i} ({op:?}): guest byte {} reads {:#x}, model says {:#x}",
                WINDOW_START + at as u64,
                seen[at],
                model[at]
            )));
        }
    }
    drop(disk);
    qemu_check(&top, target.kind.name()).map_err(TestCaseError::fail)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn qcow2_v3_reads_what_the_model_says_after_any_op_sequence(ops in prop::collection::vec(op(), 1..24)) {
        run_ops(Target { kind: FormatKind::Qcow2, qcow2_version: Some(3), discard_zeroes: true }, &ops)?;
    }

    #[test]
    fn qcow2_v2_reads_what_the_model_says_after_any_op_sequence(ops in prop::collection::vec(op(), 1..24)) {
        run_ops(Target { kind: FormatKind::Qcow2, qcow2_version: Some(2), discard_zeroes: false }, &ops)?;
    }

    #[test]
    fn qed_reads_what_the_model_says_after_any_op_sequence(ops in prop::collection::vec(op(), 1..24)) {
        run_ops(Target { kind: FormatKind::Qed, qcow2_version: None, discard_zeroes: false }, &ops)?;
    }
}

//! Concurrent stress of the block layer on chains made by QEMU: 8 threads of random reads,
//! writes, zeroes, discards and flushes against an in-memory model, then a phase in which all
//! threads overwrite the same clusters; afterwards `qemu-img check` must be clean and
//! `qemu-img compare` must find the image equal to the model.
//!
//! Each thread owns a disjoint set of cluster-aligned regions, so the model stays exact under
//! concurrency: a thread's reads of its own regions must match the model byte for byte, reads
//! of anything else must merely succeed. Regions are laid out around L2 table boundaries, so
//! writes cross clusters and L2 tables. The seed is fixed (override with `STRESS_SEED`) and
//! printed in every failure. Half the reads are made as the NBD server makes them, with
//! `read_if_cached` first.

use imgstream_block::{ChainOptions, Disk};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

mod common;
use common::{run_ok, s};

const THREADS: usize = 8;
const REGIONS_PER_THREAD: usize = 6;
/// Clusters per region: a write inside one region can span up to this many clusters.
const REGION_CLUSTERS: u64 = 3;
const OPS_PER_THREAD: usize = 300;
/// The shared clusters of the overwrite phase.
const HAMMER_CLUSTERS: u64 = 4;
const HAMMER_WRITES_PER_THREAD: usize = 60;
const DEFAULT_SEED: u64 = 0x5eed_2024;

fn seed() -> u64 {
    std::env::var("STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED)
}

/// A guest read, as the NBD server makes it when `cached_first`: the non-blocking attempt
/// first, the full read only if that gives up. Both must see what the model says.
fn read(
    disk: &Disk,
    offset: u64,
    buf: &mut [u8],
    cached_first: bool,
) -> imgstream_block::Result<()> {
    if cached_first && disk.read_if_cached(offset, buf)? {
        return Ok(());
    }
    disk.read(offset, buf)
}

/// What discard does to whole clusters of the top image (see `Disk::discard`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum DiscardEffect {
    /// qcow2 v3: whole clusters become zero clusters.
    Zeroes,
    /// qcow2 v2 over a backing file, QED: discard is advisory and changes nothing.
    Nothing,
}

#[derive(Debug, Clone, Copy)]
struct Config {
    name: &'static str,
    /// `qemu-img create -f` and `-o` of the overlay.
    format: &'static str,
    options: &'static str,
    cluster_size: u64,
    /// Guest bytes one L2 table covers.
    l2_span: u64,
    /// Format of the base: raw or qcow2.
    base_format: &'static str,
    discard: DiscardEffect,
}

/// A cluster-aligned range owned by one thread.
#[derive(Debug, Clone, Copy)]
struct Region {
    start: u64,
    len: u64,
}

/// The guest layout of one run: regions around L2 boundaries, the base's data, the hammer area.
struct Layout {
    size: u64,
    regions: Vec<Region>,
    /// (offset, length, pattern) written into the base.
    base_writes: Vec<(u64, u64, u8)>,
    hammer_start: u64,
}

fn layout(config: &Config) -> Layout {
    let cs = config.cluster_size;
    let region = REGION_CLUSTERS * cs;
    let per_spot = (THREADS * REGIONS_PER_THREAD / 3) as u64;
    let mut regions = Vec::new();
    let mut base_writes = Vec::new();
    for spot in 0..3u64 {
        // Spot 0 starts the disk; spots 1 and 2 straddle an L2 boundary, with one region
        // crossing it (the boundary falls one cluster into a region).
        let start = if spot == 0 {
            0
        } else {
            spot * config.l2_span - (per_spot / 2) * region - cs
        };
        for i in 0..per_spot {
            regions.push(Region {
                start: start + i * region,
                len: region,
            });
        }
        // The base holds data under the first half of each spot, at an unaligned offset.
        base_writes.push((start + 512, per_spot / 2 * region, 0xb0 + spot as u8));
    }
    let last = regions.last().expect("regions exist");
    let hammer_start = last.start + last.len + cs;
    let size = (hammer_start + (HAMMER_CLUSTERS + 1) * cs).next_multiple_of(1 << 20);
    Layout {
        size,
        regions,
        base_writes,
        hammer_start,
    }
}

/// Makes base and overlay with QEMU and returns the overlay's path.
fn make_chain(dir: &Path, config: &Config, layout: &Layout) -> PathBuf {
    let base = dir.join(format!("base.{}", config.base_format));
    let top = dir.join(format!("top.{}", config.format));
    let size = layout.size.to_string();
    if config.base_format == "raw" {
        run_ok(
            "qemu-img",
            &["create", "-q", "-f", "raw", s(&base), size.as_str()],
        );
    } else {
        run_ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", s(&base), size.as_str()],
        );
    }
    let writes: Vec<String> = layout
        .base_writes
        .iter()
        .map(|(o, l, p)| format!("write -P {p:#x} {o} {l}"))
        .collect();
    let mut args = vec!["-f", config.base_format];
    for w in &writes {
        args.extend(["-c", w.as_str()]);
    }
    args.push(s(&base));
    run_ok("qemu-io", &args);
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            config.format,
            "-o",
            config.options,
            "-b",
            s(&base),
            "-F",
            config.base_format,
            s(&top),
            size.as_str(),
        ],
    );
    top
}

/// Guest content as the model knows it: the base's data, then each region's bytes.
fn base_content(layout: &Layout, start: u64, len: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; len as usize];
    for &(o, l, p) in &layout.base_writes {
        let from = o.max(start);
        let to = (o + l).min(start + len);
        if from < to {
            bytes[(from - start) as usize..(to - start) as usize].fill(p);
        }
    }
    bytes
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// One thread's work on its own regions, checked against its part of the model.
fn region_worker(
    disk: &Disk,
    config: &Config,
    layout: &Layout,
    mine: Vec<usize>,
    model: &mut HashMap<usize, Vec<u8>>,
    seed: u64,
    thread: usize,
) {
    let cs = config.cluster_size;
    let mut rng = StdRng::seed_from_u64(seed ^ (thread as u64 + 1).wrapping_mul(0x9e37_79b9));
    let ctx = |op: usize, what: &str| {
        format!(
            "{}: seed {seed}, thread {thread}, op {op}: {what}",
            config.name
        )
    };
    for op in 0..OPS_PER_THREAD {
        let r = mine[rng.gen_range(0..mine.len())];
        let region = layout.regions[r];
        let off = rng.gen_range(0..region.len);
        let len = rng.gen_range(1..=region.len - off);
        let guest = region.start + off;
        let expected = model.get_mut(&r).expect("own region");
        match rng.gen_range(0..100) {
            0..=24 => {
                let mut buf = vec![0u8; len as usize];
                read(disk, guest, &mut buf, rng.gen())
                    .unwrap_or_else(|e| panic!("{}", ctx(op, &format!("read failed: {e}"))));
                if let Some(i) = (0..buf.len()).find(|&i| buf[i] != expected[off as usize + i]) {
                    panic!(
                        "{}",
                        ctx(
                            op,
                            &format!(
                                "read {guest}+{len}: byte at {} is {:#x}, model says {:#x}",
                                guest + i as u64,
                                buf[i],
                                expected[off as usize + i]
                            )
                        )
                    );
                }
            }
            25..=34 => {
                // Reads anywhere, across other threads' regions: must not fail.
                let at = rng.gen_range(0..layout.size - 1);
                let n = rng.gen_range(1..=(4 * cs).min(layout.size - at));
                let mut buf = vec![0u8; n as usize];
                read(disk, at, &mut buf, rng.gen()).unwrap_or_else(|e| {
                    panic!("{}", ctx(op, &format!("read {at}+{n} failed: {e}")))
                });
            }
            35..=69 => {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data[..]);
                let fua = rng.gen_ratio(1, 10);
                disk.write(guest, &data, fua).unwrap_or_else(|e| {
                    panic!("{}", ctx(op, &format!("write {guest}+{len} failed: {e}")))
                });
                expected[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            70..=81 => {
                disk.write_zeroes(guest, len, false).unwrap_or_else(|e| {
                    panic!("{}", ctx(op, &format!("zeroes {guest}+{len} failed: {e}")))
                });
                expected[off as usize..(off + len) as usize].fill(0);
            }
            82..=93 => {
                disk.discard(guest, len).unwrap_or_else(|e| {
                    panic!("{}", ctx(op, &format!("discard {guest}+{len} failed: {e}")))
                });
                if config.discard == DiscardEffect::Zeroes {
                    // Whole clusters only (the disk's end is never inside a region).
                    let from = align_up(guest, cs);
                    let to = (guest + len) / cs * cs;
                    if to > from {
                        let a = (from - region.start) as usize;
                        let b = (to - region.start) as usize;
                        expected[a..b].fill(0);
                    }
                }
            }
            _ => disk
                .flush()
                .unwrap_or_else(|e| panic!("{}", ctx(op, &format!("flush failed: {e}")))),
        }
    }
}

/// The tag written by one hammer write, repeated over whole clusters.
fn hammer_tag(thread: usize, write: usize) -> u64 {
    0xa5a5_0000_0000_0000 | ((thread as u64) << 32) | write as u64
}

/// The u64 a cluster is filled with, or `None` if it is not one repeated value.
fn uniform_tag(cluster: &[u8]) -> Option<u64> {
    let first = u64::from_le_bytes(cluster[..8].try_into().ok()?);
    cluster
        .chunks_exact(8)
        .all(|c| u64::from_le_bytes(c.try_into().unwrap()) == first)
        .then_some(first)
}

/// All threads overwrite the same clusters with whole-cluster tagged writes and read them back
/// meanwhile; every cluster read must be one written tag (or its old content), and at the end
/// each cluster must hold the last tag some thread wrote to it.
fn hammer(disk: &Disk, config: &Config, layout: &Layout, seed: u64) -> Vec<u64> {
    let cs = config.cluster_size;
    let start = layout.hammer_start;
    // For each cluster, the last tag each thread wrote there.
    let last_writes: Vec<Mutex<HashMap<usize, u64>>> = (0..HAMMER_CLUSTERS)
        .map(|_| Mutex::new(HashMap::new()))
        .collect();
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            let last_writes = &last_writes;
            scope.spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed ^ 0xabcd ^ thread as u64);
                for write in 0..HAMMER_WRITES_PER_THREAD {
                    let first = rng.gen_range(0..HAMMER_CLUSTERS);
                    let count = rng.gen_range(1..=HAMMER_CLUSTERS - first);
                    if rng.gen_ratio(1, 3) {
                        let mut buf = vec![0u8; (count * cs) as usize];
                        read(disk, start + first * cs, &mut buf, rng.gen()).unwrap();
                        for (i, cluster) in buf.chunks_exact(cs as usize).enumerate() {
                            let tag = uniform_tag(cluster);
                            assert!(
                                tag == Some(0) || tag.is_some_and(|t| t >> 48 == 0xa5a5),
                                "{}: seed {seed}: hammer cluster {} read torn or foreign \
                                 content (thread {thread}, write {write})",
                                config.name,
                                first + i as u64
                            );
                        }
                        continue;
                    }
                    let tag = hammer_tag(thread, write);
                    let data: Vec<u8> =
                        std::iter::repeat_n(tag.to_le_bytes(), (count * cs / 8) as usize)
                            .flatten()
                            .collect();
                    disk.write(start + first * cs, &data, false).unwrap();
                    for c in first..first + count {
                        last_writes[c as usize].lock().unwrap().insert(thread, tag);
                    }
                }
            });
        }
    });
    let mut finals = Vec::new();
    for c in 0..HAMMER_CLUSTERS {
        let mut buf = vec![0u8; cs as usize];
        disk.read(start + c * cs, &mut buf).unwrap();
        let tag = uniform_tag(&buf);
        let candidates: Vec<u64> = last_writes[c as usize]
            .lock()
            .unwrap()
            .values()
            .copied()
            .collect();
        assert!(
            tag.is_some_and(|t| candidates.contains(&t))
                || (candidates.is_empty() && tag == Some(0)),
            "{}: seed {seed}: hammer cluster {c} holds {tag:x?}, not the last write of any \
             thread ({candidates:x?})",
            config.name
        );
        finals.push(tag.unwrap());
    }
    finals
}

fn run_stress(config: Config) {
    let seed = seed();
    let dir = tempfile::tempdir().unwrap();
    let layout = layout(&config);
    let top = make_chain(dir.path(), &config, &layout);

    let mut models: Vec<HashMap<usize, Vec<u8>>> = vec![HashMap::new(); THREADS];
    for (r, region) in layout.regions.iter().enumerate() {
        models[r % THREADS].insert(r, base_content(&layout, region.start, region.len));
    }
    let finals = {
        let disk = Arc::new(Disk::open(&top, &ChainOptions::writable()).unwrap());
        std::thread::scope(|scope| {
            for (thread, model) in models.iter_mut().enumerate() {
                let disk = &disk;
                let layout = &layout;
                let config = &config;
                let mine: Vec<usize> = (0..layout.regions.len())
                    .filter(|r| r % THREADS == thread)
                    .collect();
                scope.spawn(move || region_worker(disk, config, layout, mine, model, seed, thread));
            }
        });
        let finals = hammer(&disk, &config, &layout, seed);
        disk.flush().unwrap();
        finals
    };

    // The whole guest as the model has it, in a raw file, for qemu-img compare.
    let expected = dir.path().join("expected.raw");
    let file = std::fs::File::create(&expected).unwrap();
    file.set_len(layout.size).unwrap();
    use std::os::unix::fs::FileExt;
    for &(o, l, p) in &layout.base_writes {
        file.write_all_at(&vec![p; l as usize], o).unwrap();
    }
    for model in &models {
        for (r, bytes) in model {
            file.write_all_at(bytes, layout.regions[*r].start).unwrap();
        }
    }
    let cs = config.cluster_size;
    for (c, tag) in finals.iter().enumerate() {
        let data: Vec<u8> = std::iter::repeat_n(tag.to_le_bytes(), (cs / 8) as usize)
            .flatten()
            .collect();
        file.write_all_at(&data, layout.hammer_start + c as u64 * cs)
            .unwrap();
    }
    drop(file);

    let check = Command::new("qemu-img")
        .args(["check", "-f", config.format, s(&top)])
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}: seed {seed}: qemu-img check is not clean:\n{}{}",
        config.name,
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let compare = Command::new("qemu-img")
        .args([
            "compare",
            "-f",
            config.format,
            "-F",
            "raw",
            s(&top),
            s(&expected),
        ])
        .output()
        .unwrap();
    assert!(
        compare.status.success(),
        "{}: seed {seed}: image differs from the model:\n{}{}",
        config.name,
        String::from_utf8_lossy(&compare.stdout),
        String::from_utf8_lossy(&compare.stderr)
    );
}

#[test]
fn qcow2_v3_64k_over_raw_survives_eight_threads_and_matches_the_model() {
    run_stress(Config {
        name: "qcow2 v3 64k over raw",
        format: "qcow2",
        options: "compat=1.1,cluster_size=65536",
        cluster_size: 65536,
        l2_span: 65536 / 8 * 65536,
        base_format: "raw",
        discard: DiscardEffect::Zeroes,
    });
}

#[test]
fn qcow2_v3_4k_over_qcow2_survives_eight_threads_and_matches_the_model() {
    run_stress(Config {
        name: "qcow2 v3 4k over qcow2",
        format: "qcow2",
        options: "compat=1.1,cluster_size=4096",
        cluster_size: 4096,
        l2_span: 4096 / 8 * 4096,
        base_format: "qcow2",
        discard: DiscardEffect::Zeroes,
    });
}

#[test]
fn qcow2_v2_over_raw_survives_eight_threads_and_matches_the_model() {
    run_stress(Config {
        name: "qcow2 v2 4k over raw",
        format: "qcow2",
        options: "compat=0.10,cluster_size=4096",
        cluster_size: 4096,
        l2_span: 4096 / 8 * 4096,
        base_format: "raw",
        discard: DiscardEffect::Nothing,
    });
}

#[test]
fn qed_over_raw_survives_eight_threads_and_matches_the_model() {
    // QED's default table_size is 4 clusters: one L2 table covers 4 * 4096 / 8 clusters.
    run_stress(Config {
        name: "qed 4k over raw",
        format: "qed",
        options: "cluster_size=4096",
        cluster_size: 4096,
        l2_span: 4 * 4096 / 8 * 4096,
        base_format: "raw",
        discard: DiscardEffect::Nothing,
    });
}

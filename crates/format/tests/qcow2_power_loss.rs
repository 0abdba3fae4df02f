//! qcow2 driver under power loss: a storage that records every write and flush rebuilds the
//! file as it would be if power failed after any operation — everything up to the last
//! completed flush, plus all, none, the last one, or a seeded random subset of the later
//! writes. Every such state must open with our driver, pass our check and `qemu-img check`
//! without corruption, and every mapped guest cluster must hold the data written for it.
//!
//! The workload allocates new L2 tables, new refcount blocks and a larger refcount table: with
//! 512-byte clusters, a 64-bit refcount block covers only 64 clusters and the first refcount
//! table only 64 blocks; with 1-bit refcounts a block covers 4096 clusters.
//!
//! A flush writes the tables back without the metadata lock, from a copy. The racing variant
//! makes a change from another thread during every sync of every write-back, so that guest
//! changes land between the copy and the marking clean. A model of every guest cluster checks
//! the closed image: a table marked clean with a change unwritten would lose that change.

use imgstream_format::qcow2::{self, Qcow2};
use imgstream_format::recording::{Operation, RecordingStorage};
use imgstream_format::{BackingRef, CreateOptions, ImageFormat, Mapping, OpenOptions, RepairMode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Weak};

mod common;
use common::{on_another_thread, Guest, Model, RacingChange, RacingStorage};

const RW: OpenOptions = OpenOptions { writable: true };
const RO: OpenOptions = OpenOptions { writable: false };
const CLUSTER: u64 = 512;
const SIZE: u64 = 8 << 20;
const SEED: u64 = 0x9011e7;
/// qemu-img check is run on this many cut states (spread evenly); ours runs on all of them.
const QEMU_CHECKS: usize = 150;

/// What guest cluster `cluster` holds: its index, repeated, so a mapping that points at
/// another cluster's (or freed and reused) data is caught.
fn cluster_data(cluster: u64) -> Vec<u8> {
    std::iter::repeat_n(
        (cluster as u32 | 0x8000_0000).to_le_bytes(),
        (CLUSTER / 4) as usize,
    )
    .flatten()
    .collect()
}

const GUEST_CLUSTERS: u64 = SIZE / CLUSTER;

/// Allocates host space for `count` guest clusters, writes their data, maps them.
fn write_run(image: &Qcow2, model: &Model, first: u64, count: u64) {
    let host = image.allocate_clusters(count).unwrap();
    let data: Vec<u8> = (first..first + count).flat_map(cluster_data).collect();
    image.storage().write_at(host, &data).unwrap();
    image.map_clusters(first * CLUSTER, host, count).unwrap();
    model.set(first, count, Guest::Data);
}

/// Zeroes guest clusters where the version can (3), releasing their host clusters.
fn zero_run(image: &Qcow2, model: &Model, first: u64, count: u64) {
    if image.zero_clusters(first * CLUSTER, count).unwrap() {
        model.set(first, count, Guest::Zero);
    }
}

fn unmap_run(image: &Qcow2, model: &Model, first: u64, count: u64) {
    image.unmap_clusters(first * CLUSTER, count).unwrap();
    model.set(first, count, Guest::Unallocated);
}

/// Enough allocation to need many L2 tables, refcount blocks and (with 64-bit refcounts) a
/// larger refcount table; overwrites, zeroes and unmaps release clusters for reuse; a backing
/// file is set midway; the last writes are never flushed (only the close writes them back).
fn workload(image: &Qcow2, model: &Model, racing: Option<&RacingStorage>, rounds: u64) {
    let mut rng = StdRng::seed_from_u64(SEED);
    for round in 0..rounds {
        for _ in 0..4 {
            let count = rng.gen_range(1..=160);
            let first = rng.gen_range(0..GUEST_CLUSTERS - count);
            write_run(image, model, first, count);
        }
        let first = rng.gen_range(0..GUEST_CLUSTERS - 8);
        zero_run(image, model, first, rng.gen_range(1..=8));
        let first = rng.gen_range(0..GUEST_CLUSTERS - 8);
        unmap_run(image, model, first, rng.gen_range(1..=8));
        if round % 3 != 2 {
            match racing {
                Some(racing) => racing.during(|| image.flush()),
                None => image.flush(),
            }
            .unwrap();
        }
        if round == rounds / 2 {
            image
                .set_backing(Some(&BackingRef {
                    name: "base.raw".into(),
                    format: Some("raw".into()),
                }))
                .unwrap();
        }
    }
    write_run(image, model, 17, 5);
    write_run(image, model, GUEST_CLUSTERS - 40, 30);
}

/// The change made during each sync: a run written (new L2 tables and refcount blocks, or an
/// overwrite that frees the old clusters), zeroed or unmapped, on a thread of its own.
fn racing_change(image: Weak<Qcow2>, model: Arc<Model>) -> RacingChange {
    let mut rng = StdRng::seed_from_u64(SEED ^ 0x4ace);
    Box::new(move || {
        let Some(image) = image.upgrade() else {
            return;
        };
        let kind = rng.gen_range(0..4);
        let count = rng.gen_range(1..=24);
        let first = rng.gen_range(0..GUEST_CLUSTERS - count);
        let model = model.clone();
        on_another_thread(move || match kind {
            0 => zero_run(&image, &model, first, count),
            1 => unmap_run(&image, &model, first, count),
            _ => write_run(&image, &model, first, count),
        });
    })
}

/// Opens a state read-only: our check finds no corruption, and each data cluster holds the
/// data written for its guest cluster.
fn assert_consistent(bytes: Vec<u8>, what: &str) {
    let storage = Arc::new(RecordingStorage::in_memory(bytes, "recording.qcow2"));
    let image = Qcow2::open(storage, RO).unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
    let report = image
        .check(RepairMode::None)
        .unwrap_or_else(|e| panic!("{what}: check failed: {e}"));
    assert_eq!(report.corruptions, 0, "{what}: {:?}", report.messages);
    let mut guest = 0;
    while guest < image.virtual_size() {
        let extent = image.map(guest, u64::MAX).unwrap();
        if let Mapping::Data { host_offset, .. } = extent.mapping {
            for i in 0..extent.length / CLUSTER {
                let cluster = guest / CLUSTER + i;
                let mut data = vec![0u8; CLUSTER as usize];
                image
                    .storage()
                    .read_at(host_offset + i * CLUSTER, &mut data)
                    .unwrap();
                assert!(
                    data == cluster_data(cluster),
                    "{what}: guest cluster {cluster} points at data never written for it"
                );
            }
        }
        guest += extent.length;
    }
}

fn qemu_check_no_corruption(path: &Path, what: &str) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", path.to_str().unwrap()])
        .output()
        .expect("qemu-img is required by this test (qemu-utils)");
    // 0: clean; 3: leaked clusters only, which a power cut may leave.
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "{what}: qemu-img check exited {:?}:\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn power_loss_at_every_point(version: u32, refcount_bits: u32, rounds: u64, raced: bool) {
    let created = RecordingStorage::in_memory(Vec::new(), "recording.qcow2");
    qcow2::create(
        &created,
        &CreateOptions {
            cluster_size: Some(CLUSTER),
            qcow2_version: Some(version),
            refcount_bits: Some(refcount_bits),
            ..CreateOptions::new(SIZE)
        },
    )
    .unwrap();
    let initial = created.bytes().unwrap();
    let initial_reftable = u64::from_be_bytes(initial[48..56].try_into().unwrap());

    let storage = Arc::new(RecordingStorage::in_memory(
        initial.clone(),
        "recording.qcow2",
    ));
    let racing = Arc::new(RacingStorage::new(storage.clone()));
    let model = Arc::new(Model::new(GUEST_CLUSTERS));
    let image = Arc::new(Qcow2::open(racing.clone(), RW).unwrap());
    racing.set_change(racing_change(Arc::downgrade(&image), model.clone()));
    workload(&image, &model, raced.then_some(&*racing), rounds);
    drop(image);
    let events = storage.operations();
    let final_bytes = storage.bytes().unwrap();
    let final_reftable = u64::from_be_bytes(final_bytes[48..56].try_into().unwrap());
    if refcount_bits == 64 {
        assert_ne!(
            initial_reftable, final_reftable,
            "the workload must grow (move) the refcount table"
        );
    }
    let host_clusters = final_bytes.len() as u64 / CLUSTER;
    let per_block = CLUSTER * 8 / refcount_bits as u64;
    assert!(
        host_clusters > per_block,
        "the workload must need a second refcount block ({host_clusters} host clusters)"
    );

    let closed = RecordingStorage::in_memory(final_bytes.clone(), "closed.qcow2");
    model.assert_matches(&Qcow2::open(Arc::new(closed), RO).unwrap());

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cut.qcow2");
    std::fs::File::create(dir.path().join("base.raw"))
        .and_then(|base| base.set_len(SIZE))
        .unwrap();
    let mut rng = StdRng::seed_from_u64(SEED ^ 0xc07);
    let qemu_every = (events.len() / QEMU_CHECKS).max(1);
    let mut durable = initial.clone();
    let mut durable_upto = 0;
    for cut in 0..=events.len() {
        let later = &events[durable_upto..cut];
        // All later writes in order; only the last (it overtook the others); a random subset.
        let mut in_order = durable.clone();
        later.iter().for_each(|e| e.apply(&mut in_order));
        let mut last_only = durable.clone();
        if let Some(e) = later.last() {
            e.apply(&mut last_only);
        }
        let mut subset = durable.clone();
        later
            .iter()
            .filter(|_| rng.gen_bool(0.5))
            .for_each(|e| e.apply(&mut subset));
        let mut states = vec![(in_order, "in order"), (last_only, "last only")];
        // The random subsets are the costliest to check: every fourth cut.
        if cut % 4 == 0 {
            states.push((subset, "random subset"));
        }
        for (state, model) in states {
            let what = format!(
                "v{version} refcount_bits={refcount_bits}: cut after {cut} of {} operations \
                 ({model}, seed {SEED})",
                events.len()
            );
            if cut % qemu_every == 0 && model != "last only" {
                std::fs::write(&file, &state).unwrap();
                qemu_check_no_corruption(&file, &what);
            }
            assert_consistent(state, &what);
        }
        if let Some(Operation::Flush) = events.get(cut) {
            for event in &events[durable_upto..cut] {
                event.apply(&mut durable);
            }
            durable_upto = cut;
        }
    }
    // The image as closed is clean, leaks included.
    std::fs::write(&file, &final_bytes).unwrap();
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "closed image is not clean:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn v3_refcount_bits_64_power_loss_anywhere_leaves_a_consistent_image() {
    power_loss_at_every_point(3, 64, 16, false);
}

#[test]
fn v3_refcount_bits_1_power_loss_anywhere_leaves_a_consistent_image() {
    power_loss_at_every_point(3, 1, 16, false);
}

#[test]
fn v2_power_loss_anywhere_leaves_a_consistent_image() {
    power_loss_at_every_point(2, 16, 16, false);
}

#[test]
fn v3_changes_during_every_sync_of_a_flush_are_kept_and_power_loss_anywhere_is_consistent() {
    power_loss_at_every_point(3, 64, 16, true);
}

#[test]
fn v2_changes_during_every_sync_of_a_flush_are_kept_and_power_loss_anywhere_is_consistent() {
    power_loss_at_every_point(2, 16, 16, true);
}

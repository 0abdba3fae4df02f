//! qcow2 `map` merges clusters that map alike into one extent, reading each L2 table once per
//! call. Its extents must equal those built one cluster at a time (a one-cluster `map` reads
//! only the first cluster's entry), across L2 table boundaries and for runs that end anywhere.

use imgstream_format::recording::MemoryStorage;
use imgstream_format::{
    create_format, open_format, CreateOptions, Extent, FormatKind, ImageFormat, Mapping,
    OpenOptions,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

/// 512-byte clusters: an L2 table holds 64 entries and covers 32 KiB.
const CLUSTER: u64 = 512;
const CLUSTERS: u64 = 2048;
const SEED: u64 = 0x6d_6170;

/// An image whose clusters are, at random, unallocated, zero, or data; data clusters often
/// come in runs of contiguous host clusters, some of them across table boundaries.
fn random_image(rng: &mut StdRng) -> Arc<dyn ImageFormat> {
    let mut options = CreateOptions::new(CLUSTERS * CLUSTER);
    options.cluster_size = Some(CLUSTER);
    let created = MemoryStorage::new(Vec::new(), "new");
    create_format(FormatKind::Qcow2, &created, &options).expect("create");
    let storage = Arc::new(MemoryStorage::new(created.bytes(), "image"));
    let image =
        open_format(FormatKind::Qcow2, storage, OpenOptions { writable: true }).expect("open");
    let mut cluster = 0;
    while cluster < CLUSTERS {
        let count = rng.gen_range(1..=100).min(CLUSTERS - cluster);
        match rng.gen_range(0..3) {
            0 => {}
            1 => {
                image.zero_clusters(cluster * CLUSTER, count).expect("zero");
            }
            _ => {
                let host = image.allocate_clusters(count).expect("allocate");
                image
                    .map_clusters(cluster * CLUSTER, host, count)
                    .expect("map");
            }
        }
        cluster += count;
    }
    image
}

/// The extent from `offset` to at most `end`, merged one cluster at a time.
fn extent_by_clusters(image: &dyn ImageFormat, offset: u64, end: u64) -> Extent {
    let first = image.map(offset, 1).expect("map").mapping;
    let start = offset / CLUSTER * CLUSTER;
    let mut length = (start + CLUSTER).min(end) - offset;
    while offset + length < end {
        let here = offset + length;
        let next = image.map(here, 1).expect("map").mapping;
        let distance = here - start;
        let shifted = match first {
            Mapping::Data {
                host_offset,
                in_place,
            } => Mapping::Data {
                host_offset: host_offset - offset % CLUSTER + distance,
                in_place,
            },
            Mapping::Zero {
                host_offset: Some(host),
            } => Mapping::Zero {
                host_offset: Some(host - offset % CLUSTER + distance),
            },
            other => other,
        };
        if next != shifted {
            break;
        }
        length = (length + CLUSTER).min(end - offset);
    }
    Extent {
        mapping: first,
        length,
    }
}

#[test]
fn map_merges_runs_across_l2_tables_as_cluster_by_cluster_mapping_does() {
    let mut rng = StdRng::seed_from_u64(SEED);
    for _ in 0..4 {
        let image = random_image(&mut rng);
        let size = CLUSTERS * CLUSTER;
        for _ in 0..500 {
            let offset = rng.gen_range(0..size);
            let end = rng.gen_range(offset + 1..=size);
            let extent = image.map(offset, end - offset).expect("map");
            let expected = extent_by_clusters(image.as_ref(), offset, end);
            assert_eq!(
                (extent.mapping, extent.length),
                (expected.mapping, expected.length),
                "map({offset}, {end})"
            );
        }
        // Whole-image walks, as a stream's count of what is left to copy makes.
        let mut offset = 0;
        while offset < size {
            let extent = image.map(offset, size - offset).expect("map");
            let expected = extent_by_clusters(image.as_ref(), offset, size);
            assert_eq!(extent.length, expected.length, "walk at {offset}");
            offset += extent.length;
        }
    }
}

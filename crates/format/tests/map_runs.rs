//! `map` (qcow2 and QED) merges clusters that map alike into one extent, reading each L2 table
//! once per call. Its extents must equal those built one cluster at a time (a one-cluster
//! `map` reads only the first cluster's entry), across L2 table boundaries and for runs that
//! end anywhere.

use imgstream_format::recording::MemoryStorage;
use imgstream_format::{
    create_format, open_format, CreateOptions, Extent, FormatKind, ImageFormat, Mapping,
    OpenOptions,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

const SEED: u64 = 0x6d_6170;

/// A format with clusters small enough for a small image to span many L2 tables.
#[derive(Clone, Copy)]
struct Layout {
    kind: FormatKind,
    cluster: u64,
    clusters: u64,
}

/// qcow2 with 512-byte clusters: an L2 table holds 64 entries (32 KiB of guest data).
const QCOW2: Layout = Layout {
    kind: FormatKind::Qcow2,
    cluster: 512,
    clusters: 2048,
};

/// QED with its smallest clusters (4 KiB) and default tables: 2048 entries (8 MiB) each.
const QED: Layout = Layout {
    kind: FormatKind::Qed,
    cluster: 4096,
    clusters: 8192,
};

/// An image whose clusters are, at random, unallocated, zero, or data; data clusters come in
/// runs of contiguous host clusters, some of them across table boundaries, and two data runs
/// side by side in the guest are contiguous in the file only half of the time.
fn random_image(layout: Layout, rng: &mut StdRng) -> Arc<dyn ImageFormat> {
    let Layout {
        kind,
        cluster: size,
        clusters,
    } = layout;
    let mut options = CreateOptions::new(clusters * size);
    options.cluster_size = Some(size);
    let created = MemoryStorage::new(Vec::new(), "new");
    create_format(kind, &created, &options).expect("create");
    let storage = Arc::new(MemoryStorage::new(created.bytes(), "image"));
    let image = open_format(kind, storage, OpenOptions { writable: true }).expect("open");
    let mut cluster = 0;
    while cluster < clusters {
        let count = rng.gen_range(1..=100).min(clusters - cluster);
        match rng.gen_range(0..3) {
            0 => {}
            1 => {
                image.zero_clusters(cluster * size, count).expect("zero");
            }
            _ => {
                if rng.gen_bool(0.5) {
                    // A gap in the file: this run's data does not follow the last run's.
                    image.allocate_clusters(1).expect("allocate a gap");
                }
                let host = image.allocate_clusters(count).expect("allocate");
                image
                    .map_clusters(cluster * size, host, count)
                    .expect("map");
            }
        }
        cluster += count;
    }
    image
}

/// The extent from `offset` to at most `end`, merged one cluster at a time.
fn extent_by_clusters(image: &dyn ImageFormat, offset: u64, end: u64) -> Extent {
    let cluster = image.cluster_size();
    let first = image.map(offset, 1).expect("map").mapping;
    let start = offset / cluster * cluster;
    let mut length = (start + cluster).min(end) - offset;
    while offset + length < end {
        let here = offset + length;
        let next = image.map(here, 1).expect("map").mapping;
        let distance = here - start;
        let shifted = match first {
            Mapping::Data {
                host_offset,
                in_place,
            } => Mapping::Data {
                host_offset: host_offset - offset % cluster + distance,
                in_place,
            },
            Mapping::Zero {
                host_offset: Some(host),
            } => Mapping::Zero {
                host_offset: Some(host - offset % cluster + distance),
            },
            other => other,
        };
        if next != shifted {
            break;
        }
        length = (length + cluster).min(end - offset);
    }
    Extent {
        mapping: first,
        length,
    }
}

fn map_merges_runs_as_cluster_by_cluster_mapping_does(layout: Layout) {
    let mut rng = StdRng::seed_from_u64(SEED);
    let size = layout.clusters * layout.cluster;
    for _ in 0..4 {
        let image = random_image(layout, &mut rng);
        for _ in 0..500 {
            let offset = rng.gen_range(0..size);
            let end = rng.gen_range(offset + 1..=size);
            let extent = image.map(offset, end - offset).expect("map");
            let expected = extent_by_clusters(image.as_ref(), offset, end);
            assert_eq!(
                (extent.mapping, extent.length),
                (expected.mapping, expected.length),
                "{:?}: map({offset}, {end})",
                layout.kind
            );
        }
        // Whole-image walks, as a stream's count of what is left to copy makes.
        let mut offset = 0;
        while offset < size {
            let extent = image.map(offset, size - offset).expect("map");
            let expected = extent_by_clusters(image.as_ref(), offset, size);
            assert_eq!(
                extent.length, expected.length,
                "{:?}: walk at {offset}",
                layout.kind
            );
            offset += extent.length;
        }
    }
}

#[test]
fn qcow2_map_merges_runs_across_l2_tables_as_cluster_by_cluster_mapping_does() {
    map_merges_runs_as_cluster_by_cluster_mapping_does(QCOW2);
}

#[test]
fn qed_map_merges_runs_across_l2_tables_as_cluster_by_cluster_mapping_does() {
    map_merges_runs_as_cluster_by_cluster_mapping_does(QED);
}

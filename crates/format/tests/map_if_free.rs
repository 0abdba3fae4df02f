//! `ImageFormat::map_if_free`, the mapping an event loop may ask for: it declines while the
//! table it needs is not in memory (reading it may wait for the device; loading it may evict
//! a dirty table and write it back), and then answers as `map` does, within that table.

use imgstream_format::recording::MemoryStorage;
use imgstream_format::{create_format, open_format, CreateOptions, FormatKind, OpenOptions};
use std::sync::Arc;

const SIZE: u64 = 16 << 20;

/// A `kind` image with data in its first cluster, written back and closed.
fn image_with_data(kind: FormatKind) -> Vec<u8> {
    let created = MemoryStorage::new(Vec::new(), "new");
    create_format(kind, &created, &CreateOptions::new(SIZE)).expect("create");
    let storage = Arc::new(MemoryStorage::new(created.bytes(), "image"));
    let image = open_format(kind, storage.clone(), OpenOptions { writable: true }).expect("open");
    let cluster = image.cluster_size();
    let host = image.allocate_clusters(1).expect("allocate");
    image
        .storage()
        .write_at(host, &vec![0x5a; cluster as usize])
        .expect("write");
    image.map_clusters(0, host, 1).expect("map");
    drop(image);
    storage.bytes()
}

fn declines_until_the_table_is_cached_then_agrees_with_map(kind: FormatKind) {
    let storage = Arc::new(MemoryStorage::new(image_with_data(kind), "image"));
    let image = open_format(kind, storage, OpenOptions { writable: false }).expect("open");
    assert!(
        image.map_if_free(0, SIZE).expect("map_if_free").is_none(),
        "{kind:?}: the L2 table is not cached yet"
    );
    let full = image.map(0, SIZE).expect("map");
    let free = image
        .map_if_free(0, SIZE)
        .expect("map_if_free")
        .expect("the table is cached now");
    assert_eq!(free.mapping, full.mapping, "{kind:?}");
    assert!(free.length > 0 && free.length <= full.length, "{kind:?}");
}

#[test]
fn qcow2_map_if_free_declines_until_the_table_is_cached_then_agrees_with_map() {
    declines_until_the_table_is_cached_then_agrees_with_map(FormatKind::Qcow2);
}

#[test]
fn qed_map_if_free_declines_until_the_table_is_cached_then_agrees_with_map() {
    declines_until_the_table_is_cached_then_agrees_with_map(FormatKind::Qed);
}

//! Fuzzes opening a whole qcow2 image held in memory (read-only) and mapping it: L1, L2 and
//! refcount tables, entry decoding, compressed-cluster descriptors and decompression.
#![no_main]

use imgstream_format::{open_format, FormatKind, OpenOptions};
use imgstream_fuzz::{image_storage, walk, MAX_IMAGE_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_IMAGE_BYTES {
        return;
    }
    let storage = image_storage(data);
    if let Ok(image) = open_format(FormatKind::Qcow2, storage, OpenOptions { writable: false }) {
        walk(image.as_ref());
    }
});

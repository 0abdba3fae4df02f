//! Fuzzes opening a whole QED image held in memory (read-only) and mapping it: header, backing
//! name, L1 table, L2 loads through the cache, entry validation.
#![no_main]

use imgstream_format::{open_format, FormatKind, OpenOptions};
use imgstream_fuzz::{image_storage, walk, MAX_IMAGE_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_IMAGE_BYTES {
        return;
    }
    let storage = image_storage(data);
    if let Ok(image) = open_format(FormatKind::Qed, storage, OpenOptions { writable: false }) {
        walk(image.as_ref());
    }
});

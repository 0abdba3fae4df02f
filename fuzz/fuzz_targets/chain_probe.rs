//! Fuzzes one step of opening a backing chain, in memory: probe the format from the first
//! bytes, open the image as that format, read the backing name and format it records, parse
//! the format name and resolve the backing name against the overlay's path.
#![no_main]

use imgstream_block::chain::resolve_backing;
use imgstream_format::probe::probe_format;
use imgstream_format::{open_format, FormatKind, OpenOptions};
use imgstream_fuzz::{image_storage, MAX_IMAGE_BYTES};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_IMAGE_BYTES {
        return;
    }
    // The block layer probes from the first 8 bytes, zero-padded.
    let mut head = [0u8; 8];
    let n = data.len().min(8);
    head[..n].copy_from_slice(&data[..n]);
    // (A 3-byte file "QED" probes as QED here, the zero padding completing the magic; the
    // open that follows must then fail cleanly.)
    let kind = probe_format(&head);
    let storage = image_storage(data);
    let Ok(image) = open_format(kind, storage, OpenOptions { writable: false }) else {
        return;
    };
    assert_eq!(image.kind(), kind);
    if let Some(backing) = image.backing() {
        if let Some(format) = &backing.format {
            if let Ok(parsed) = FormatKind::from_name(format) {
                assert_eq!(FormatKind::from_name(parsed.name()).ok(), Some(parsed));
            }
        }
        let _ = resolve_backing(Path::new("/images/overlay.qcow2"), &backing.name);
    }
});

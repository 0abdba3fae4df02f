//! Fuzzes qcow2 header parsing (fields, extensions, backing name) and its serialisation: a
//! header we accept must serialise without panicking and parse back the same.
#![no_main]

use imgstream_format::qcow2::header::Header;
use imgstream_fuzz::file_size_from;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for file_size in [data.len() as u64, file_size_from(data)] {
        let Ok(header) = Header::parse(data, file_size) else {
            continue;
        };
        let _ = header.backing_format();
        let mut copy = header.clone();
        if let Ok(mut bytes) = copy.to_bytes() {
            // Parse wants the whole first cluster (the rest of it is zeroes on disk).
            bytes.resize(header.cluster_size() as usize, 0);
            let reparsed = Header::parse(&bytes, file_size.max(bytes.len() as u64))
                .expect("a header we serialised must parse again");
            assert_eq!(reparsed.backing_name, header.backing_name);
            assert_eq!(reparsed.size, header.size);
            assert_eq!(reparsed.l1_table_offset, header.l1_table_offset);
        }
    }
});

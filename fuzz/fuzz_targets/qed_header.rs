//! Fuzzes QED header parsing and validation, and L1/L2 table validation: the bytes after the
//! header are decoded as a table and checked against a file of the input's length.
#![no_main]

use imgstream_format::qed::header::HEADER_LEN;
use imgstream_format::qed::table::decode_table;
use imgstream_format::qed::{parse_header, validate_table, TableKind};
use imgstream_fuzz::file_size_from;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = parse_header(data) else {
        return;
    };
    assert_eq!(
        parse_header(&header.to_bytes()).ok().as_ref(),
        Some(&header),
        "a header we accepted must round-trip"
    );
    let _ = header.backing_name_range();
    let _ = (header.entries_per_table(), header.l2_span());
    for file_len in [data.len() as u64, file_size_from(data)] {
        let _ = header.validate_layout(file_len);
        let table = decode_table(&data[HEADER_LEN..]);
        let _ = validate_table(TableKind::L1, &table, &header, file_len);
        let _ = validate_table(TableKind::L2, &table, &header, file_len);
    }
});

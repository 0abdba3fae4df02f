//! Byte-exact replies of qemu-storage-daemon 10.0.2 to unusual QMP input: duplicate keys,
//! `execute` with `exec-oob`, numbers and strings in `id`, stray and invalid bytes, several
//! unexpected members. Each case was sent on a new connection after `qmp_capabilities`,
//! followed by `SENTINEL`; the table holds every line QSD sent before the sentinel's reply.
//! `recorded_replies_are_qsds` checks the table against a live QSD, the other tests our
//! daemon against the table.

mod common;

use imgstream_qmp::Daemon;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::UnixStream;

/// Input and the lines (without `\r\n`) QSD answered it with.
type Case = (&'static [u8], &'static [&'static str]);

/// Sent after each case: its reply marks the end of the case's replies, so no timeout is
/// needed to know that nothing more will come.
const SENTINEL: &[u8] = br#"{"execute": "query-block", "id": "end"}"#;
const SENTINEL_REPLY: &str = r#"{"return": [], "id": "end"}"#;
const WAIT: Duration = Duration::from_secs(30);

/// A key twice in one object, at any depth: a parse error, no `id` echoed. QEMU checks after
/// parsing the value, so an error inside the value comes first.
const DUPLICATE_KEYS: &[Case] = &[
    (
        b"{\"execute\": \"quit\", \"execute\": \"query-version\", \"id\": 1}",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 1, \"id\": 2}",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"arguments\": {\"a\": 1, \"a\": 2}, \"id\": 3}",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": {\"x\": 1, \"x\": 2}}",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}}"#],
    ),
    (
        b"[{\"a\": 1, \"a\": 2}]",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}}"#],
    ),
    (
        b"{\"a\": {\"b\": 1, \"b\": 2}, \"a\": 3}",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}}"#],
    ),
    (
        b"{\"a\": 1, \"a\": 2 \"b\"}",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}}"#],
    ),
    (
        b"{\"a\": 1, \"a\": }",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#],
    ),
];

/// Request members in QDict order once OOB is enabled: the second of `execute`/`exec-oob`
/// clashes with the first.
const EXEC_OOB_WITH_OOB: &[Case] = &[
    (
        b"{\"execute\": \"query-block\", \"exec-oob\": \"query-block\", \"id\": 1}",
        &[
            r#"{"id": 1, "error": {"class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"}}"#,
        ],
    ),
    (
        b"{\"exec-oob\": \"query-block\", \"execute\": 5, \"id\": 2}",
        &[
            r#"{"id": 2, "error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}"#,
        ],
    ),
    (
        b"{\"exec-oob\": 5, \"execute\": \"query-block\", \"id\": 3}",
        &[
            r#"{"id": 3, "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' must be a string"}}"#,
        ],
    ),
    (
        b"{\"zzz\": 1, \"exec-oob\": \"x\", \"execute\": \"x\", \"id\": 4}",
        &[
            r#"{"id": 4, "error": {"class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"}}"#,
        ],
    ),
    (
        b"{\"aaa\": 1, \"exec-oob\": \"x\", \"execute\": \"x\", \"id\": 5}",
        &[
            r#"{"id": 5, "error": {"class": "GenericError", "desc": "QMP input member 'aaa' is unexpected"}}"#,
        ],
    ),
    (
        b"{\"arguments\": 1, \"exec-oob\": \"x\", \"execute\": \"x\", \"id\": 6}",
        &[
            r#"{"id": 6, "error": {"class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"}}"#,
        ],
    ),
    (
        b"{\"exec-oob\": \"query-block\", \"id\": 7}",
        &[
            r#"{"id": 7, "error": {"class": "GenericError", "desc": "The command query-block does not support OOB"}}"#,
        ],
    ),
];

/// Request members in QDict order without OOB (`a` and `rb` share a QDict bucket: the one
/// given last is looked at first).
const EXEC_OOB_WITHOUT_OOB: &[Case] = &[
    (
        b"{\"execute\": \"query-block\", \"exec-oob\": \"query-block\", \"id\": 1}",
        &[
            r#"{"id": 1, "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}"#,
        ],
    ),
    (
        b"{\"rb\": 1, \"a\": 2, \"execute\": \"query-block\", \"id\": 2}",
        &[
            r#"{"id": 2, "error": {"class": "GenericError", "desc": "QMP input member 'a' is unexpected"}}"#,
        ],
    ),
    (
        b"{\"a\": 1, \"rb\": 2, \"execute\": \"query-block\", \"id\": 3}",
        &[
            r#"{"id": 3, "error": {"class": "GenericError", "desc": "QMP input member 'rb' is unexpected"}}"#,
        ],
    ),
];

/// Objects in `id` come back with their members in QDict order, at any depth (`a` and `rb`
/// share a bucket: the one given last comes first).
const OBJECT_IDS: &[Case] = &[
    (
        b"{\"execute\": \"query-block\", \"id\": {\"b\": 1, \"a\": [{\"d\": 1, \"c\": 2}], \"rb\": 3, \"f\": {\"e\": {}, \"c\": []}}}",
        &[r#"{"return": [], "id": {"rb": 3, "a": [{"d": 1, "c": 2}], "f": {"e": {}, "c": []}, "b": 1}}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": {\"rb\": 1, \"a\": 2}}",
        &[r#"{"return": [], "id": {"a": 2, "rb": 1}}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": {\"a\": 1, \"rb\": 2}}",
        &[r#"{"return": [], "id": {"rb": 2, "a": 1}}"#],
    ),
];

/// Numbers in `id` come back as QEMU stores them: int64, else uint64, else a double printed
/// with `%.17g`.
const IDS: &[Case] = &[
    (
        b"{\"execute\": \"query-block\", \"id\": 1.0}",
        &[r#"{"return": [], "id": 1}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 0.1}",
        &[r#"{"return": [], "id": 0.10000000000000001}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 1e2}",
        &[r#"{"return": [], "id": 100}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 1E2}",
        &[r#"{"return": [], "id": 100}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": -0.0}",
        &[r#"{"return": [], "id": -0}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": -0}",
        &[r#"{"return": [], "id": 0}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 1.5}",
        &[r#"{"return": [], "id": 1.5}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 1e-7}",
        &[r#"{"return": [], "id": 9.9999999999999995e-08}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 123456789.123456789}",
        &[r#"{"return": [], "id": 123456789.12345679}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 9223372036854775807}",
        &[r#"{"return": [], "id": 9223372036854775807}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 9223372036854775808}",
        &[r#"{"return": [], "id": 9223372036854775808}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 18446744073709551615}",
        &[r#"{"return": [], "id": 18446744073709551615}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 18446744073709551616}",
        &[r#"{"return": [], "id": 1.8446744073709552e+19}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": -9223372036854775808}",
        &[r#"{"return": [], "id": -9223372036854775808}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": -9223372036854775809}",
        &[r#"{"return": [], "id": -9.2233720368547758e+18}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 123456789012345678901234567890}",
        &[r#"{"return": [], "id": 1.2345678901234568e+29}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 1e-400}",
        &[r#"{"return": [], "id": 0}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 2251799813685247.25}",
        &[r#"{"return": [], "id": 2251799813685247.2}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 0.000123}",
        &[r#"{"return": [], "id": 0.00012300000000000001}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 1e16}",
        &[r#"{"return": [], "id": 10000000000000000}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 1e17}",
        &[r#"{"return": [], "id": 1e+17}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 12345678901234567}",
        &[r#"{"return": [], "id": 12345678901234567}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 1.7976931348623157e308}",
        &[r#"{"return": [], "id": 1.7976931348623157e+308}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 5e-324}",
        &[r#"{"return": [], "id": 4.9406564584124654e-324}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": 100000000000000000000000}",
        &[r#"{"return": [], "id": 9.9999999999999992e+22}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": [1.0, {\"a\": 2.50}]}",
        &[r#"{"return": [], "id": [1, {"a": 2.5}]}"#],
    ),
];

/// Strings in modified UTF-8: `C0 80` is NUL; surrogates, noncharacters and overlong forms are
/// refused; a bad escape is shown as written. Control characters and non-ASCII go back as
/// `\uXXXX` with upper-case hex.
const STRINGS: &[Case] = &[
    (
        b"{\"execute\": \"query-block\", \"id\": \"\\uDC00\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\uDC00 is not a valid Unicode character"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\\udc00\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\udc00 is not a valid Unicode character"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\\uD800\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\uD800 is not a valid Unicode character"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\\uD800x\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\uD800 is not a valid Unicode character"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\\uD800\\u0041\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\uD800 is not a valid Unicode character"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\\uD83D\\uDE00\"}",
        &[r#"{"return": [], "id": "\uD83D\uDE00"}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\\uFFFE\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\uFFFE is not a valid Unicode character"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\\uFDD0\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\uFDD0 is not a valid Unicode character"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\\uD83F\\uDFFE\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\uD83F\\uDFFE is not a valid Unicode character"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\\u0000\"}",
        &[r#"{"return": [], "id": "\u0000"}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\xc0\x80\"}",
        &[r#"{"return": [], "id": "\u0000"}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"a\xc0\x80b\"}",
        &[r#"{"return": [], "id": "a\u0000b"}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\xef\xbf\xbe\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8 sequence in string"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\xef\xb7\x90\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8 sequence in string"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\xed\xa0\x80\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8 sequence in string"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\xe0\x80\x80\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8 sequence in string"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\xc1\xbf\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8 sequence in string"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\xf4\x90\x80\x80\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8 sequence in string"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\xf8\x88\x80\x80\x80\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8 sequence in string"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\xc3\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8 sequence in string"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\xc3(\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8 sequence in string"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\x80\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid UTF-8 sequence in string"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\xc3\xa9\xf0\x9f\x98\x80\"}",
        &[r#"{"return": [], "id": "\u00E9\uD83D\uDE00"}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\\u00\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\u00\" is not a valid Unicode character"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\\u00e\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\u00e\" is not a valid Unicode character"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\\uD800\\u00\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\uD800 is not a valid Unicode character"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\\uD800\\uzzzz\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\uD800 is not a valid Unicode character"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\\u0\xc3\xa9\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, \\u0\u00E9\" is not a valid Unicode character"}}"#,
        ],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"\\u001f\\u007f\\u0080\"}",
        &[r#"{"return": [], "id": "\u001F\u007F\u0080"}"#],
    ),
];

/// Lexical errors: the token so far (up to a NUL byte, invalid UTF-8 as U+FFFD per sequence),
/// then recovery up to a structural or control character.
const STRAY_BYTES: &[Case] = &[
    (
        b"\x00",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray ''"}}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"id\": \"ab\x00cd\"}",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"ab'"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
        ],
    ),
    (
        b"\"ab\x01",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"ab\u0001'"}}"#,
        ],
    ),
    (
        b"\"ab\xfe",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"ab\uFFFD'"}}"#,
        ],
    ),
    (
        b"\"\xe0\x80\x01",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"\uFFFD\u0001'"}}"#,
        ],
    ),
    (
        b"\x80",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#],
    ),
    (
        b"\xc3\xa9",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#],
    ),
    (
        b"\xe0\x80\x01",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\u0001'"}}"#,
        ],
    ),
    (
        b"\"\xc0\x80\x02",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"\u0000\u0002'"}}"#,
        ],
    ),
    (
        b"\"\xf0\x9f\x98\x80\x02",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"\uD83D\uDE00\u0002'"}}"#,
        ],
    ),
    (
        b"@\x00",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '@'"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray ''"}}"#,
        ],
    ),
    (
        b"x\x00",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'x'"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray ''"}}"#,
        ],
    ),
    (
        b"-\x00",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '-'"}}"#],
    ),
    (
        b"1.\x00",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '1.'"}}"#],
    ),
    (
        b"\"\xed\xa0\x80\x03",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"\uFFFD\u0003'"}}"#,
        ],
    ),
    (
        b"\"\xe0\x80\xe0\x80\x80\x04",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"\uFFFD\uFFFD\u0004'"}}"#,
        ],
    ),
    (
        b"\"\xf8\x88\x80\x80\x80\x05",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"\uFFFD\u0005'"}}"#,
        ],
    ),
    (
        b"\"\xc3\xa9\x06",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"\u00E9\u0006'"}}"#,
        ],
    ),
    (
        b"'ab\x00",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray ''ab'"}}"#],
    ),
    (
        b"\"\\\x00",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"\\'"}}"#],
    ),
    (
        b"\"\\u12\x07",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"\\u12\u0007'"}}"#,
        ],
    ),
    (
        b"\xfe",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#],
    ),
    (
        b"\xff",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#],
    ),
    (
        b"1e\x00",
        &[r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '1e'"}}"#],
    ),
    (
        b"tru\x01",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'tru'"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\u0001'"}}"#,
        ],
    ),
    (
        b"\"\xc1\x81\x01",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"\uFFFD\u0001'"}}"#,
        ],
    ),
    (
        b"\"\xef\xbf\xbe\x01",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\"\uFFFD\u0001'"}}"#,
        ],
    ),
    (
        b"@x,y:z",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '@'"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'y'"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'z'"}}"#,
        ],
    ),
    (
        b"tru\xc3\xa9 ",
        &[
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, invalid keyword 'tru'"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#,
        ],
    ),
    (
        b"1\xc3 ",
        &[
            r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#,
        ],
    ),
    (
        b"1.5\xff ",
        &[
            r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#,
        ],
    ),
];

/// Several unexpected arguments: QAPI names the first left in its GLib hash table.
const UNEXPECTED_ARGUMENTS: &[Case] = &[
    (
        b"{\"execute\": \"query-block\", \"arguments\": {\"zz\": 1, \"aa\": 2, \"mm\": 3}, \"id\": 1}",
        &[r#"{"id": 1, "error": {"class": "GenericError", "desc": "Parameter 'aa' is unexpected"}}"#],
    ),
    (
        b"{\"execute\": \"block-stream\", \"arguments\": {\"device\": \"nosuch\", \"foo\": 1, \"zzz\": 2}, \"id\": 2}",
        &[r#"{"id": 2, "error": {"class": "GenericError", "desc": "Parameter 'zzz' is unexpected"}}"#],
    ),
    (
        b"{\"execute\": \"block-stream\", \"arguments\": {\"x\": 1, \"device\": \"nosuch\", \"speed\": 1, \"base\": \"b\", \"bottom\": \"c\", \"q\": 1, \"on-error\": \"report\", \"job-id\": \"j\", \"r\": 1}, \"id\": 3}",
        &[r#"{"id": 3, "error": {"class": "GenericError", "desc": "Parameter 'r' is unexpected"}}"#],
    ),
    (
        b"{\"execute\": \"block-stream\", \"arguments\": {\"a1\": 1, \"a2\": 1, \"a3\": 1, \"a4\": 1, \"a5\": 1, \"a6\": 1, \"a7\": 1, \"a8\": 1, \"a9\": 1, \"device\": \"nosuch\", \"speed\": 1}, \"id\": 4}",
        &[r#"{"id": 4, "error": {"class": "GenericError", "desc": "Parameter 'a4' is unexpected"}}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"arguments\": {\"rb\": 1, \"a\": 2}, \"id\": 5}",
        &[r#"{"id": 5, "error": {"class": "GenericError", "desc": "Parameter 'rb' is unexpected"}}"#],
    ),
    (
        b"{\"execute\": \"query-block\", \"arguments\": {\"a\": 1, \"rb\": 2}, \"id\": 6}",
        &[r#"{"id": 6, "error": {"class": "GenericError", "desc": "Parameter 'rb' is unexpected"}}"#],
    ),
    (
        b"{\"execute\": \"block-job-cancel\", \"arguments\": {\"device\": \"j\", \"force\": true, \"bb\": 1, \"ab\": 2}, \"id\": 7}",
        &[r#"{"id": 7, "error": {"class": "GenericError", "desc": "Parameter 'bb' is unexpected"}}"#],
    ),
    (
        b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"oob\"], \"zz\": 1, \"foo\": 2}, \"id\": 8}",
        &[r#"{"id": 8, "error": {"class": "GenericError", "desc": "Parameter 'zz' is unexpected"}}"#],
    ),
    (
        b"{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"file\", \"filename\": \"/nonexistent/x\", \"node-name\": \"n\", \"zz\": 1, \"foo\": 2, \"aio\": \"threads\"}, \"id\": 9}",
        &[r#"{"id": 9, "error": {"class": "GenericError", "desc": "Parameter 'zz' is unexpected"}}"#],
    ),
    (
        b"{\"execute\": \"blockdev-add\", \"arguments\": {\"driver\": \"file\", \"filename\": \"/nonexistent/x\", \"node-name\": \"n\", \"cache\": {\"direct\": false, \"zz\": 1, \"foo\": 2}}, \"id\": 10}",
        &[r#"{"id": 10, "error": {"class": "GenericError", "desc": "Parameter 'cache.zz' is unexpected"}}"#],
    ),
    (
        b"{\"execute\": \"nbd-server-start\", \"arguments\": {\"addr\": {\"type\": \"unix\", \"data\": {\"path\": \"/nonexistent/s\", \"zz\": 1, \"foo\": 2}}}, \"id\": 11}",
        &[r#"{"id": 11, "error": {"class": "GenericError", "desc": "Parameter 'addr.data.zz' is unexpected"}}"#],
    ),
];

/// The next line from the server, without its `\r\n`.
async fn next_line(reader: &mut BufReader<OwnedReadHalf>) -> String {
    let mut line = Vec::new();
    let read = tokio::time::timeout(WAIT, reader.read_until(b'\n', &mut line)).await;
    assert!(matches!(read, Ok(Ok(n)) if n > 0), "connection ended");
    let line = String::from_utf8(line).expect("the server sends ASCII");
    line.strip_suffix("\r\n").expect("CRLF").to_string()
}

/// Every line the server sends for `input` on a new connection (OOB enabled if `oob`), up to
/// the sentinel's reply.
async fn replies(path: &Path, oob: bool, input: &[u8]) -> Vec<String> {
    let stream = UnixStream::connect(path).await.expect("connect");
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    next_line(&mut reader).await;
    let negotiate: &[u8] = if oob {
        br#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#
    } else {
        br#"{"execute": "qmp_capabilities"}"#
    };
    write.write_all(negotiate).await.expect("send");
    assert_eq!(next_line(&mut reader).await, r#"{"return": {}}"#);
    write.write_all(input).await.expect("send");
    write.write_all(SENTINEL).await.expect("send");
    let mut lines = Vec::new();
    loop {
        let line = next_line(&mut reader).await;
        if line == SENTINEL_REPLY {
            return lines;
        }
        lines.push(line);
    }
}

/// The cases whose replies from the server at `path` differ from the table.
async fn differences(path: &Path, oob: bool, cases: &[Case]) -> Vec<String> {
    let mut out = Vec::new();
    for (input, expected) in cases {
        let actual = replies(path, oob, input).await;
        if actual != *expected {
            out.push(format!(
                "{}\n  QSD:  {expected:?}\n  ours: {actual:?}",
                String::from_utf8_lossy(input)
            ));
        }
    }
    out
}

async fn assert_ours_match(oob: bool, cases: &[Case]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let daemon = Daemon::new();
    let (path, stop, _) = common::serve(&daemon, dir.path()).await;
    let mismatches = differences(&path, oob, cases).await;
    let _ = stop.send(());
    assert!(
        mismatches.is_empty(),
        "{} replies differ from QSD's:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

#[tokio::test]
async fn duplicate_keys_are_refused_as_qsd_does() {
    assert_ours_match(false, DUPLICATE_KEYS).await;
}

#[tokio::test]
async fn execute_and_exec_oob_clash_as_in_qsd() {
    assert_ours_match(true, EXEC_OOB_WITH_OOB).await;
}

#[tokio::test]
async fn request_members_are_checked_in_qsds_order() {
    assert_ours_match(false, EXEC_OOB_WITHOUT_OOB).await;
}

#[tokio::test]
async fn object_ids_are_echoed_in_qsds_member_order() {
    assert_ours_match(false, OBJECT_IDS).await;
}

#[tokio::test]
async fn numeric_ids_are_echoed_as_qsd_prints_them() {
    assert_ours_match(false, IDS).await;
}

#[tokio::test]
async fn string_escapes_and_bytes_are_read_as_qsd_reads_them() {
    assert_ours_match(false, STRINGS).await;
}

#[tokio::test]
async fn stray_bytes_get_qsds_errors_and_recovery() {
    assert_ours_match(false, STRAY_BYTES).await;
}

#[tokio::test]
async fn unexpected_argument_is_the_one_qsd_names() {
    assert_ours_match(false, UNEXPECTED_ARGUMENTS).await;
}

/// An `id` beyond the range of a double: QEMU prints `inf`, which is not JSON; we send the
/// largest finite double instead (docs/qmp.md).
#[tokio::test]
async fn infinite_id_is_echoed_as_the_largest_double() {
    let cases: &[Case] = &[
        (
            br#"{"execute": "query-block", "id": 1e400}"#,
            &[r#"{"return": [], "id": 1.7976931348623157e+308}"#],
        ),
        (
            br#"{"execute": "query-block", "id": [-1e400]}"#,
            &[r#"{"return": [], "id": [-1.7976931348623157e+308]}"#],
        ),
    ];
    assert_ours_match(false, cases).await;
}

/// A qemu-storage-daemon with a monitor socket, killed when dropped.
struct Qsd {
    child: Child,
    socket: PathBuf,
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_qsd(dir: &Path) -> Qsd {
    let socket = dir.join("qsd.qmp");
    let pidfile = dir.join("qsd.pid");
    let child = Command::new("qemu-storage-daemon")
        .arg("--chardev")
        .arg(format!(
            "socket,id=m0,path={},server=on,wait=off",
            socket.display()
        ))
        .args(["--monitor", "chardev=m0,mode=control", "--pidfile"])
        .arg(&pidfile)
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon (Debian qemu-utils) is needed");
    let qsd = Qsd { child, socket };
    // QSD writes its pid file once its sockets listen.
    let deadline = Instant::now() + WAIT;
    while !pidfile.exists() {
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    qsd
}

/// The table is what QSD sends (the oracle, when the table needs new cases: print
/// `differences` for them).
#[tokio::test]
async fn recorded_replies_are_qsds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let qsd = start_qsd(dir.path());
    let tables: &[(bool, &[Case])] = &[
        (false, DUPLICATE_KEYS),
        (true, EXEC_OOB_WITH_OOB),
        (false, EXEC_OOB_WITHOUT_OOB),
        (false, OBJECT_IDS),
        (false, IDS),
        (false, STRINGS),
        (false, STRAY_BYTES),
        (false, UNEXPECTED_ARGUMENTS),
    ];
    let mut mismatches = Vec::new();
    for (oob, cases) in tables {
        mismatches.extend(differences(&qsd.socket, *oob, cases).await);
    }
    assert!(
        mismatches.is_empty(),
        "QSD no longer answers as recorded:\n{}",
        mismatches.join("\n")
    );
}

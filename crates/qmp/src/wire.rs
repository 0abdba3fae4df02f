//! The QMP wire: client input as a stream of JSON values (no newlines needed, a value runs as
//! soon as it is complete, partial reads and several values per read handled, one message's
//! size bounded), and server output as one JSON object plus `\r\n` per message.

use crate::error::QmpError;
use crate::json::{Json, Parsed, Streamer};
use crate::qdict::KeyOrder;
use serde::Serialize;
use serde_json::Value;
use std::time::SystemTime;

/// Largest message a client may send, in bytes. QEMU allows 64 MiB per token; no QMP command
/// needs more than a few KiB, so a smaller bound keeps a hostile client from holding memory.
pub const MAX_MESSAGE_SIZE: usize = 1 << 20;

/// What the reader found in the input.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A complete JSON value, and the input order of its objects' keys.
    Value(Value, KeyOrder),
    /// Malformed input; QEMU answers it with this error and reads on.
    Malformed(String),
    /// The message grew past [`MAX_MESSAGE_SIZE`]: answer and disconnect.
    TooLarge,
}

/// Turns bytes read from a client into [`Input`]s.
#[derive(Debug, Default)]
pub struct MessageReader {
    streamer: Streamer,
}

impl MessageReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one read's bytes. After [`Input::TooLarge`] the connection must be closed.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Input> {
        let mut inputs = Vec::new();
        let mut parsed: Vec<Parsed> = Vec::new();
        // Feed in slices so the bound is checked while a huge read is consumed.
        for chunk in bytes.chunks(4096) {
            self.streamer.feed(chunk, &mut parsed);
            inputs.extend(parsed.drain(..).map(|p| match p {
                Ok((value, order)) => Input::Value(value, order),
                Err(message) => Input::Malformed(message),
            }));
            if self.streamer.buffered() > MAX_MESSAGE_SIZE {
                inputs.push(Input::TooLarge);
                return inputs;
            }
        }
        inputs
    }
}

/// The error text for [`Input::TooLarge`] (QEMU's text for its own limit).
pub const TOO_LARGE_MESSAGE: &str = "JSON token size limit exceeded";

/// `{"return": value, "id": id}` (id only when the request had one, serialized by
/// [`Json::of_input`]).
pub fn reply(value: &Json, id: Option<&Json>) -> String {
    match id {
        Some(id) => format!(
            "{{\"return\": {}, \"id\": {}}}\r\n",
            value.as_str(),
            id.as_str()
        ),
        None => format!("{{\"return\": {}}}\r\n", value.as_str()),
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    class: &'a str,
    desc: &'a str,
}

/// `{"id": id, "error": {"class": ..., "desc": ...}}` (QEMU puts the id first here).
pub fn error(error: &QmpError, id: Option<&Json>) -> String {
    let body = Json::of(&ErrorBody {
        class: error.class.name(),
        desc: &error.desc,
    });
    match id {
        Some(id) => format!(
            "{{\"id\": {}, \"error\": {}}}\r\n",
            id.as_str(),
            body.as_str()
        ),
        None => format!("{{\"error\": {}}}\r\n", body.as_str()),
    }
}

/// When an event happened, as QMP's `timestamp` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Timestamp {
    pub seconds: u64,
    pub microseconds: u32,
}

impl Timestamp {
    pub fn now() -> Timestamp {
        let since = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp {
            seconds: since.as_secs(),
            microseconds: since.subsec_micros(),
        }
    }
}

/// `{"timestamp": {...}, "event": NAME, "data": {...}}`.
pub fn event(name: &str, data: &Json, timestamp: Timestamp) -> String {
    format!(
        "{{\"timestamp\": {}, \"event\": {}, \"data\": {}}}\r\n",
        Json::of(&timestamp).as_str(),
        Json::of(name).as_str(),
        data.as_str()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;
    use serde_json::json;

    /// The order of a flat object with `keys`.
    fn order(keys: &[&str]) -> KeyOrder {
        let mut order = KeyOrder::default();
        for key in keys {
            order.push(key.to_string(), KeyOrder::default());
        }
        order
    }

    #[test]
    fn message_split_across_reads_runs_when_complete() {
        let mut reader = MessageReader::new();
        assert!(reader.feed(b"{\"execute\": \"qmp_cap").is_empty());
        assert_eq!(
            reader.feed(b"abilities\"}"),
            vec![Input::Value(
                json!({"execute": "qmp_capabilities"}),
                order(&["execute"])
            )]
        );
    }

    #[test]
    fn garbage_then_valid_message() {
        let mut reader = MessageReader::new();
        let inputs = reader.feed(b"not json\n{\"execute\": \"quit\"}");
        assert_eq!(
            inputs,
            vec![
                Input::Malformed("JSON parse error, invalid keyword 'not'".into()),
                Input::Malformed("JSON parse error, invalid keyword 'json'".into()),
                Input::Value(json!({"execute": "quit"}), order(&["execute"])),
            ]
        );
    }

    #[test]
    fn huge_message_is_refused() {
        let mut reader = MessageReader::new();
        let mut input = b"{\"execute\": \"".to_vec();
        input.extend(std::iter::repeat_n(b'a', MAX_MESSAGE_SIZE + 10));
        let inputs = reader.feed(&input);
        assert_eq!(inputs.last(), Some(&Input::TooLarge));
    }

    #[test]
    fn many_small_tokens_are_bounded_too() {
        let mut reader = MessageReader::new();
        let mut input = b"[".to_vec();
        for _ in 0..(MAX_MESSAGE_SIZE / 2) {
            input.extend_from_slice(b"1,");
        }
        assert_eq!(reader.feed(&input).last(), Some(&Input::TooLarge));
    }

    #[test]
    fn random_bytes_never_panic() {
        // A fixed linear congruential generator: reproducible without a dependency.
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut reader = MessageReader::new();
        for _ in 0..2000 {
            let bytes: Vec<u8> = (0..64)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    // Mostly JSON's own characters, so the parser gets deep, not just the lexer.
                    let alphabet = b"{}[]:,\"'\\ 0123456789-+.eEtruefalsn\x00\xff\xc3";
                    alphabet[(state >> 33) as usize % alphabet.len()]
                })
                .collect();
            if reader.feed(&bytes).contains(&Input::TooLarge) {
                reader = MessageReader::new();
            }
        }
    }

    #[test]
    fn frames_match_qemus_layout() {
        let id = Json::of(&json!("c1"));
        assert_eq!(
            reply(&Json::empty_object(), Some(&id)),
            "{\"return\": {}, \"id\": \"c1\"}\r\n"
        );
        let e = QmpError::new(ErrorClass::CommandNotFound, "x");
        assert_eq!(
            error(&e, Some(&Json::of(&json!(42)))),
            "{\"id\": 42, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"x\"}}\r\n"
        );
        let ts = Timestamp {
            seconds: 1,
            microseconds: 2,
        };
        assert_eq!(
            event("E", &Json::of(&json!({"a": 1})), ts),
            "{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"E\", \"data\": {\"a\": 1}}\r\n"
        );
    }
}

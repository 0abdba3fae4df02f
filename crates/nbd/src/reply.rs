//! Replies of the transmission phase: their encoding as simple replies or
//! structured reply chunks, and the one writer that keeps each reply whole.

use std::io;

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::Mutex;

use crate::protocol::*;

/// The answer to one request, before it is put on the wire.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Success with nothing to return.
    Done,
    /// Bytes read at `offset`.
    Data { offset: u64, data: Vec<u8> },
    /// `(length, flags)` descriptors for one metadata context.
    BlockStatus {
        context_id: u32,
        extents: Vec<(u32, u32)>,
    },
    /// Failure: an NBD error value, and a message for structured replies.
    Error { error: u32, message: String },
}

/// Encodes everything of `reply` but the bulk data of a read, which the
/// caller sends after it so that it is never copied.
///
/// `structured` says whether `NBD_OPT_STRUCTURED_REPLY` was negotiated. Each
/// reply is a single chunk flagged `NBD_REPLY_FLAG_DONE`: reads are answered
/// with one `NBD_REPLY_TYPE_OFFSET_DATA` chunk, since requests are at most
/// 32 MiB and a chunk can carry up to 4 GiB.
pub(crate) fn encode_head(reply: &Reply, handle: u64, structured: bool) -> Vec<u8> {
    let mut head = Vec::with_capacity(32);
    if !structured {
        let error = match reply {
            Reply::Done | Reply::Data { .. } => 0,
            Reply::Error { error, .. } => *error,
            // Block status is refused unless structured replies were
            // negotiated, so this is only reached by a bug in the caller.
            Reply::BlockStatus { .. } => NBD_EINVAL,
        };
        head.extend_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
        head.extend_from_slice(&error.to_be_bytes());
        head.extend_from_slice(&handle.to_be_bytes());
        return head;
    }

    let chunk_header = |head: &mut Vec<u8>, kind: u16, payload_len: usize| {
        head.extend_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
        head.extend_from_slice(&NBD_REPLY_FLAG_DONE.to_be_bytes());
        head.extend_from_slice(&kind.to_be_bytes());
        head.extend_from_slice(&handle.to_be_bytes());
        // Payloads are bounded well below 4 GiB by the request limits.
        head.extend_from_slice(&(payload_len as u32).to_be_bytes());
    };
    match reply {
        Reply::Done => chunk_header(&mut head, NBD_REPLY_TYPE_NONE, 0),
        // An OFFSET_DATA chunk must carry at least one byte.
        Reply::Data { data, .. } if data.is_empty() => {
            chunk_header(&mut head, NBD_REPLY_TYPE_NONE, 0)
        }
        Reply::Data { offset, data } => {
            chunk_header(&mut head, NBD_REPLY_TYPE_OFFSET_DATA, 8 + data.len());
            head.extend_from_slice(&offset.to_be_bytes());
        }
        Reply::BlockStatus {
            context_id,
            extents,
        } => {
            chunk_header(
                &mut head,
                NBD_REPLY_TYPE_BLOCK_STATUS,
                4 + 8 * extents.len(),
            );
            head.extend_from_slice(&context_id.to_be_bytes());
            for (len, flags) in extents {
                head.extend_from_slice(&len.to_be_bytes());
                head.extend_from_slice(&flags.to_be_bytes());
            }
        }
        Reply::Error { error, message } => {
            let message = truncate_to_char_boundary(message, NBD_MAX_STRING_SIZE);
            chunk_header(&mut head, NBD_REPLY_TYPE_ERROR, 6 + message.len());
            head.extend_from_slice(&error.to_be_bytes());
            head.extend_from_slice(&(message.len() as u16).to_be_bytes());
            head.extend_from_slice(message.as_bytes());
        }
    }
    head
}

fn truncate_to_char_boundary(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The write side of a connection, shared by every request task. A reply is
/// written whole while the lock is held, so chunks of different replies are
/// never interleaved.
pub(crate) struct ReplyWriter<W> {
    out: Mutex<BufWriter<W>>,
    structured: bool,
}

impl<W: AsyncWrite + Unpin> ReplyWriter<W> {
    pub(crate) fn new(out: W, structured: bool) -> Self {
        ReplyWriter {
            out: Mutex::new(BufWriter::new(out)),
            structured,
        }
    }

    pub(crate) async fn send(&self, handle: u64, reply: &Reply) -> io::Result<()> {
        let head = encode_head(reply, handle, self.structured);
        let mut out = self.out.lock().await;
        out.write_all(&head).await?;
        if let Reply::Data { data, .. } = reply {
            out.write_all(data).await?;
        }
        out.flush().await
    }

    /// Flushes what is buffered and shuts the write side down.
    pub(crate) async fn close(&self) -> io::Result<()> {
        let mut out = self.out.lock().await;
        out.flush().await?;
        out.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be32(b: &[u8]) -> u32 {
        u32::from_be_bytes(b.try_into().unwrap())
    }
    fn be16(b: &[u8]) -> u16 {
        u16::from_be_bytes(b.try_into().unwrap())
    }

    #[test]
    fn simple_reply_carries_error_and_handle_only() {
        let reply = Reply::Error {
            error: NBD_EPERM,
            message: "read-only".into(),
        };
        let head = encode_head(&reply, 0x1122_3344_5566_7788, false);
        assert_eq!(head.len(), 16);
        assert_eq!(be32(&head[0..4]), NBD_SIMPLE_REPLY_MAGIC);
        assert_eq!(be32(&head[4..8]), NBD_EPERM);
        assert_eq!(&head[8..16], &0x1122_3344_5566_7788u64.to_be_bytes());
    }

    #[test]
    fn structured_read_is_one_offset_data_chunk_marked_done() {
        let reply = Reply::Data {
            offset: 4096,
            data: vec![7; 100],
        };
        let head = encode_head(&reply, 9, true);
        assert_eq!(head.len(), 20 + 8);
        assert_eq!(be32(&head[0..4]), NBD_STRUCTURED_REPLY_MAGIC);
        assert_eq!(be16(&head[4..6]), NBD_REPLY_FLAG_DONE);
        assert_eq!(be16(&head[6..8]), NBD_REPLY_TYPE_OFFSET_DATA);
        assert_eq!(be32(&head[16..20]), 108);
        assert_eq!(&head[20..28], &4096u64.to_be_bytes());
    }

    #[test]
    fn structured_empty_read_is_a_none_chunk() {
        let reply = Reply::Data {
            offset: 0,
            data: vec![],
        };
        let head = encode_head(&reply, 1, true);
        assert_eq!(head.len(), 20);
        assert_eq!(be16(&head[6..8]), NBD_REPLY_TYPE_NONE);
        assert_eq!(be32(&head[16..20]), 0);
    }

    #[test]
    fn structured_block_status_lists_context_then_descriptors() {
        let reply = Reply::BlockStatus {
            context_id: 1,
            extents: vec![(4096, 0), (8192, NBD_STATE_HOLE | NBD_STATE_ZERO)],
        };
        let head = encode_head(&reply, 1, true);
        assert_eq!(be16(&head[6..8]), NBD_REPLY_TYPE_BLOCK_STATUS);
        assert_eq!(be32(&head[16..20]), 4 + 16);
        assert_eq!(be32(&head[20..24]), 1);
        assert_eq!(be32(&head[24..28]), 4096);
        assert_eq!(be32(&head[28..32]), 0);
        assert_eq!(be32(&head[32..36]), 8192);
        assert_eq!(be32(&head[36..40]), 3);
    }

    #[test]
    fn structured_error_carries_a_message_cut_to_the_string_limit() {
        let reply = Reply::Error {
            error: NBD_EIO,
            message: "é".repeat(3000),
        };
        let head = encode_head(&reply, 1, true);
        assert_eq!(be16(&head[6..8]), NBD_REPLY_TYPE_ERROR);
        let message_len = be16(&head[24..26]) as usize;
        assert!(message_len <= NBD_MAX_STRING_SIZE);
        assert_eq!(be32(&head[16..20]) as usize, 6 + message_len);
        assert!(std::str::from_utf8(&head[26..]).is_ok());
        assert_eq!(head.len(), 26 + message_len);
    }
}

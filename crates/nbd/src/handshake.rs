//! Fixed newstyle negotiation: the greeting, option haggling, and entry into
//! the transmission phase with `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use crate::export::{Export, ExportTable};
use crate::protocol::*;
use crate::transmission::{MAX_PAYLOAD_SIZE, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE};

/// Longest option payload accepted. Every option we understand fits in far
/// less (a name and a few queries of at most 4 KiB each); a client sending
/// more is treated as a denial of service and disconnected, as the spec allows.
pub(crate) const MAX_OPTION_LEN: u32 = 64 * 1024;

/// The metadata context id of `base:allocation`, the only context we offer.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// What the client chose by the end of negotiation.
pub(crate) struct Negotiated {
    pub(crate) export: Arc<Export>,
    pub(crate) size: u64,
    pub(crate) structured: bool,
    /// `base:allocation` was selected for this export's name.
    pub(crate) base_allocation: bool,
}

pub(crate) enum Outcome {
    Transmission(Negotiated),
    /// The client aborted, or asked for an export name that does not exist
    /// with `NBD_OPT_EXPORT_NAME` (which cannot report errors).
    Closed,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    #[error("I/O error during negotiation: {0}")]
    Io(#[from] io::Error),
    #[error("Client broke the protocol during negotiation: {0}")]
    Protocol(String),
}

/// A reply-worthy failure of one option: the error reply type and a message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct OptionError {
    pub(crate) reply: u32,
    pub(crate) message: String,
}

impl OptionError {
    fn invalid(message: impl Into<String>) -> Self {
        OptionError {
            reply: NBD_REP_ERR_INVALID,
            message: message.into(),
        }
    }
}

/// The transmission flags advertised for `export`, with `structured` replies negotiated or not.
///
/// Write-like commands are not advertised on a read-only export (as QEMU
/// does); a client that sends them anyway gets `NBD_EPERM`. `NBD_FLAG_SEND_DF` comes with
/// structured replies, as the spec asks: a read is always answered in one chunk anyway.
pub(crate) fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut flags = NBD_FLAG_HAS_FLAGS
        | NBD_FLAG_SEND_FLUSH
        | NBD_FLAG_SEND_FUA
        | NBD_FLAG_SEND_CACHE
        | NBD_FLAG_CAN_MULTI_CONN;
    if export.read_only {
        flags |= NBD_FLAG_READ_ONLY;
    } else {
        flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
    }
    if structured {
        flags |= NBD_FLAG_SEND_DF;
    }
    flags
}

/// Reads big-endian fields off an option payload.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], OptionError> {
        if self.0.len() < n {
            return Err(OptionError::invalid(format!(
                "Option data too short for {what}"
            )));
        }
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(taken)
    }

    fn u16(&mut self, what: &str) -> Result<u16, OptionError> {
        let b = self.bytes(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, OptionError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A string prefixed by its 32-bit length.
    fn string(&mut self, what: &str) -> Result<String, OptionError> {
        let len = self.u32(what)? as usize;
        if len > NBD_MAX_STRING_SIZE {
            return Err(OptionError::invalid(format!(
                "{what} is longer than 4096 bytes"
            )));
        }
        let bytes = self.bytes(len, what)?;
        utf8(bytes, what)
    }

    fn finish(&self) -> Result<(), OptionError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(OptionError::invalid("Option data has trailing bytes"))
        }
    }
}

fn utf8(bytes: &[u8], what: &str) -> Result<String, OptionError> {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.contains('\0') => Ok(s.to_owned()),
        _ => Err(OptionError::invalid(format!(
            "{what} is not a valid string"
        ))),
    }
}

/// The payload of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct InfoRequest {
    pub(crate) name: String,
    pub(crate) infos: Vec<u16>,
}

pub(crate) fn parse_info_request(data: &[u8]) -> Result<InfoRequest, OptionError> {
    let mut fields = Fields(data);
    let name = fields.string("export name")?;
    let count = fields.u16("information request count")?;
    let infos = (0..count)
        .map(|_| fields.u16("information request"))
        .collect::<Result<Vec<_>, _>>()?;
    fields.finish()?;
    Ok(InfoRequest { name, infos })
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct MetaContextRequest {
    pub(crate) name: String,
    pub(crate) queries: Vec<String>,
}

pub(crate) fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest, OptionError> {
    let mut fields = Fields(data);
    let name = fields.string("export name")?;
    let count = fields.u32("query count")?;
    // Each query takes at least its 4-byte length: a larger count is a lie,
    // and checking it first keeps the vector below from growing on it.
    if count as usize > fields.0.len() / 4 {
        return Err(OptionError::invalid("Query count exceeds the option data"));
    }
    let queries = (0..count)
        .map(|_| fields.string("query"))
        .collect::<Result<Vec<_>, _>>()?;
    fields.finish()?;
    Ok(MetaContextRequest { name, queries })
}

/// Whether `queries` select `base:allocation`. When listing, no queries
/// means "everything" and `base:` is a wildcard for its namespace; when
/// setting, both select nothing. Unknown queries are ignored, as required.
pub(crate) fn selects_base_allocation(queries: &[String], listing: bool) -> bool {
    if listing && queries.is_empty() {
        return true;
    }
    queries
        .iter()
        .any(|q| q == BASE_ALLOCATION || (listing && q == "base:"))
}

/// Negotiation state carried between options.
struct Haggle<'a, S> {
    stream: &'a mut S,
    exports: &'a ExportTable,
    no_zeroes: bool,
    structured: bool,
    /// Export name and whether `base:allocation` was selected for it by the
    /// last `NBD_OPT_SET_META_CONTEXT`.
    meta: Option<(String, bool)>,
}

/// Runs fixed newstyle negotiation on `stream` until the client enters the
/// transmission phase or leaves.
pub(crate) async fn negotiate<S>(
    stream: &mut S,
    exports: &ExportTable,
) -> Result<Outcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting).await?;
    stream.flush().await?;

    let client_flags = stream.read_u32().await?;
    let known = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(HandshakeError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }

    let mut haggle = Haggle {
        stream,
        exports,
        no_zeroes: client_flags & NBD_FLAG_C_NO_ZEROES != 0,
        structured: false,
        meta: None,
    };
    loop {
        let magic = haggle.stream.read_u64().await?;
        if magic != NBD_OPTS_MAGIC {
            return Err(HandshakeError::Protocol(format!(
                "bad option magic {magic:#x}"
            )));
        }
        let option = haggle.stream.read_u32().await?;
        let len = haggle.stream.read_u32().await?;
        if len > MAX_OPTION_LEN {
            return Err(HandshakeError::Protocol(format!(
                "option {option} with {len} bytes of data"
            )));
        }
        let mut data = vec![0; len as usize];
        haggle.stream.read_exact(&mut data).await?;
        debug!(option, len, "NBD option");
        if let Some(outcome) = haggle.option(option, &data).await? {
            return Ok(outcome);
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Haggle<'_, S> {
    /// Handles one option; `Some` ends negotiation.
    async fn option(
        &mut self,
        option: u32,
        data: &[u8],
    ) -> Result<Option<Outcome>, HandshakeError> {
        let result = match option {
            NBD_OPT_EXPORT_NAME => return self.export_name(data).await,
            NBD_OPT_ABORT => {
                // The client may already be gone; it owes us nothing more.
                let _ = self.reply(option, NBD_REP_ACK, &[]).await;
                return Ok(Some(Outcome::Closed));
            }
            NBD_OPT_LIST => self.list(data).await,
            NBD_OPT_INFO | NBD_OPT_GO => match self.info(option, data).await {
                Ok(Some(negotiated)) => return Ok(Some(Outcome::Transmission(negotiated))),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            },
            NBD_OPT_STRUCTURED_REPLY => self.structured_reply(data).await,
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                self.meta_context(option, data).await
            }
            _ => Err(OptionError {
                reply: NBD_REP_ERR_UNSUP,
                message: format!("Option {option} is not supported"),
            }
            .into()),
        };
        match result {
            Ok(()) => Ok(None),
            Err(OptionErrorOr::Option(e)) => {
                debug!(option, message = %e.message, "NBD option refused");
                self.reply(option, e.reply, e.message.as_bytes()).await?;
                Ok(None)
            }
            Err(OptionErrorOr::Io(e)) => Err(e.into()),
        }
    }

    async fn reply(&mut self, option: u32, kind: u32, payload: &[u8]) -> io::Result<()> {
        let mut msg = Vec::with_capacity(20 + payload.len());
        msg.extend_from_slice(&NBD_REP_MAGIC.to_be_bytes());
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&kind.to_be_bytes());
        msg.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        msg.extend_from_slice(payload);
        self.stream.write_all(&msg).await?;
        self.stream.flush().await
    }

    async fn export_name(&mut self, data: &[u8]) -> Result<Option<Outcome>, HandshakeError> {
        // This option cannot report errors: all the spec leaves us is to hang up.
        let Ok(name) = utf8(data, "export name") else {
            return Err(HandshakeError::Protocol(
                "export name is not a valid string".into(),
            ));
        };
        let Some(export) = self.exports.get(&name) else {
            debug!(name, "NBD_OPT_EXPORT_NAME for an unknown export");
            return Ok(Some(Outcome::Closed));
        };
        let size = export.backend.size();
        let mut msg = Vec::with_capacity(10 + 124);
        msg.extend_from_slice(&size.to_be_bytes());
        msg.extend_from_slice(&transmission_flags(&export, self.structured).to_be_bytes());
        if !self.no_zeroes {
            msg.extend_from_slice(&[0; 124]);
        }
        self.stream.write_all(&msg).await?;
        self.stream.flush().await?;
        Ok(Some(Outcome::Transmission(
            self.negotiated(&name, export, size),
        )))
    }

    fn negotiated(&self, name: &str, export: Arc<Export>, size: u64) -> Negotiated {
        let base_allocation =
            self.structured && matches!(&self.meta, Some((meta_name, true)) if meta_name == name);
        Negotiated {
            export,
            size,
            structured: self.structured,
            base_allocation,
        }
    }

    async fn list(&mut self, data: &[u8]) -> Result<(), OptionErrorOr> {
        if !data.is_empty() {
            return Err(OptionError::invalid("NBD_OPT_LIST takes no data").into());
        }
        for (name, description) in self.exports.list() {
            let mut payload = Vec::new();
            payload.extend_from_slice(&(name.len() as u32).to_be_bytes());
            payload.extend_from_slice(name.as_bytes());
            if let Some(description) = description {
                payload.extend_from_slice(description.as_bytes());
            }
            self.reply(NBD_OPT_LIST, NBD_REP_SERVER, &payload).await?;
        }
        self.reply(NBD_OPT_LIST, NBD_REP_ACK, &[]).await?;
        Ok(())
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`; returns the session for a successful GO.
    async fn info(
        &mut self,
        option: u32,
        data: &[u8],
    ) -> Result<Option<Negotiated>, OptionErrorOr> {
        let request = parse_info_request(data)?;
        let Some(export) = self.exports.get(&request.name) else {
            return Err(OptionError {
                reply: NBD_REP_ERR_UNKNOWN,
                message: format!("No export named {:?}", request.name),
            }
            .into());
        };
        let size = export.backend.size();

        let mut info = Vec::with_capacity(12);
        info.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
        info.extend_from_slice(&size.to_be_bytes());
        info.extend_from_slice(&transmission_flags(&export, self.structured).to_be_bytes());
        self.reply(option, NBD_REP_INFO, &info).await?;

        // Sent whether asked for or not: the maximum is tighter than the
        // spec's default, and a client that ignores it is answered EINVAL.
        let mut info = Vec::with_capacity(14);
        info.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
        info.extend_from_slice(&MIN_BLOCK_SIZE.to_be_bytes());
        info.extend_from_slice(&PREFERRED_BLOCK_SIZE.to_be_bytes());
        info.extend_from_slice(&MAX_PAYLOAD_SIZE.to_be_bytes());
        self.reply(option, NBD_REP_INFO, &info).await?;

        if let Some(description) = &export.description {
            let mut info = NBD_INFO_DESCRIPTION.to_be_bytes().to_vec();
            info.extend_from_slice(description.as_bytes());
            self.reply(option, NBD_REP_INFO, &info).await?;
        }
        if request.infos.contains(&NBD_INFO_NAME) {
            let mut info = NBD_INFO_NAME.to_be_bytes().to_vec();
            info.extend_from_slice(request.name.as_bytes());
            self.reply(option, NBD_REP_INFO, &info).await?;
        }
        self.reply(option, NBD_REP_ACK, &[]).await?;

        if option == NBD_OPT_GO {
            Ok(Some(self.negotiated(&request.name, export, size)))
        } else {
            Ok(None)
        }
    }

    async fn structured_reply(&mut self, data: &[u8]) -> Result<(), OptionErrorOr> {
        if !data.is_empty() {
            return Err(OptionError::invalid("NBD_OPT_STRUCTURED_REPLY takes no data").into());
        }
        if self.structured {
            return Err(OptionError::invalid("Structured replies are already negotiated").into());
        }
        self.structured = true;
        self.reply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, &[])
            .await?;
        Ok(())
    }

    async fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<(), OptionErrorOr> {
        let listing = option == NBD_OPT_LIST_META_CONTEXT;
        if !listing {
            // A SET replaces the previous selection even when it fails.
            self.meta = None;
        }
        if !self.structured {
            return Err(OptionError::invalid("Negotiate structured replies first").into());
        }
        let request = parse_meta_context_request(data)?;
        if self.exports.get(&request.name).is_none() {
            return Err(OptionError {
                reply: NBD_REP_ERR_UNKNOWN,
                message: format!("No export named {:?}", request.name),
            }
            .into());
        }
        let selected = selects_base_allocation(&request.queries, listing);
        if selected {
            // Listed ids are reserved and should be zero.
            let id = if listing { 0 } else { BASE_ALLOCATION_ID };
            let mut payload = id.to_be_bytes().to_vec();
            payload.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(option, NBD_REP_META_CONTEXT, &payload).await?;
        }
        if !listing {
            self.meta = Some((request.name, selected));
        }
        self.reply(option, NBD_REP_ACK, &[]).await?;
        Ok(())
    }
}

/// An option either fails with a reply to the client, or the connection breaks.
enum OptionErrorOr {
    Option(OptionError),
    Io(io::Error),
}

impl From<OptionError> for OptionErrorOr {
    fn from(e: OptionError) -> Self {
        OptionErrorOr::Option(e)
    }
}

impl From<io::Error> for OptionErrorOr {
    fn from(e: io::Error) -> Self {
        OptionErrorOr::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[test]
    fn info_request_parses_name_and_requests() {
        let parsed =
            parse_info_request(&info_data(b"disk", &[NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE])).unwrap();
        assert_eq!(parsed.name, "disk");
        assert_eq!(parsed.infos, vec![NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE]);
    }

    #[test]
    fn info_request_accepts_the_empty_default_name() {
        let parsed = parse_info_request(&info_data(b"", &[])).unwrap();
        assert_eq!(parsed.name, "");
        assert!(parsed.infos.is_empty());
    }

    #[test]
    fn info_request_rejects_every_truncation() {
        let full = info_data(b"disk", &[NBD_INFO_NAME]);
        for cut in 0..full.len() {
            let err = parse_info_request(&full[..cut]).unwrap_err();
            assert_eq!(err.reply, NBD_REP_ERR_INVALID, "cut at {cut}");
        }
    }

    #[test]
    fn info_request_rejects_trailing_bytes() {
        let mut data = info_data(b"disk", &[]);
        data.push(0);
        assert_eq!(
            parse_info_request(&data).unwrap_err().reply,
            NBD_REP_ERR_INVALID
        );
    }

    #[test]
    fn info_request_rejects_a_name_length_past_the_data() {
        let mut data = u32::MAX.to_be_bytes().to_vec();
        data.extend_from_slice(&[0; 2]);
        assert_eq!(
            parse_info_request(&data).unwrap_err().reply,
            NBD_REP_ERR_INVALID
        );
    }

    #[test]
    fn info_request_rejects_names_that_are_not_strings() {
        for bad in [&b"\xff\xfe"[..], b"a\0b"] {
            assert_eq!(
                parse_info_request(&info_data(bad, &[])).unwrap_err().reply,
                NBD_REP_ERR_INVALID
            );
        }
    }

    #[test]
    fn meta_context_request_parses_queries() {
        let parsed = parse_meta_context_request(&meta_data(
            "disk",
            &["base:allocation", "qemu:dirty-bitmap:x"],
        ))
        .unwrap();
        assert_eq!(parsed.name, "disk");
        assert_eq!(
            parsed.queries,
            vec!["base:allocation", "qemu:dirty-bitmap:x"]
        );
    }

    #[test]
    fn meta_context_request_rejects_a_query_count_larger_than_the_data() {
        let mut data = meta_data("disk", &[]);
        let at = data.len() - 4;
        data[at..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            parse_meta_context_request(&data).unwrap_err().reply,
            NBD_REP_ERR_INVALID
        );
    }

    #[test]
    fn meta_context_request_rejects_every_truncation() {
        let full = meta_data("disk", &["base:allocation"]);
        for cut in 0..full.len() {
            assert!(
                parse_meta_context_request(&full[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn meta_context_request_rejects_a_query_longer_than_a_string_may_be() {
        let long = "x".repeat(NBD_MAX_STRING_SIZE + 1);
        let data = meta_data("disk", &[&long]);
        assert_eq!(
            parse_meta_context_request(&data).unwrap_err().reply,
            NBD_REP_ERR_INVALID
        );
    }

    #[test]
    fn base_allocation_is_selected_by_its_name_and_listed_by_wildcards() {
        let q = |qs: &[&str]| qs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(selects_base_allocation(&q(&["base:allocation"]), false));
        assert!(selects_base_allocation(
            &q(&["x-foo:bar", "base:allocation"]),
            false
        ));
        assert!(!selects_base_allocation(&q(&["base:"]), false));
        assert!(!selects_base_allocation(&q(&[]), false));
        assert!(!selects_base_allocation(
            &q(&["base:allocationX", "qemu:dirty-bitmap:a"]),
            false
        ));
        assert!(selects_base_allocation(&q(&[]), true));
        assert!(selects_base_allocation(&q(&["base:"]), true));
        assert!(!selects_base_allocation(&q(&["qemu:"]), true));
    }
}

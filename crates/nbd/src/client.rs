//! A small blocking NBD client: fixed newstyle handshake with NBD_OPT_GO, then one request at
//! a time with simple replies. For `imgstream demo` and tests; not a performance client.

use crate::protocol::*;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// A connection to one export.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    size: u64,
    flags: u16,
    next_handle: u64,
}

fn protocol_error(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

fn read_u16(stream: &mut UnixStream) -> io::Result<u16> {
    let mut raw = [0u8; 2];
    stream.read_exact(&mut raw)?;
    Ok(u16::from_be_bytes(raw))
}

fn read_u32(stream: &mut UnixStream) -> io::Result<u32> {
    let mut raw = [0u8; 4];
    stream.read_exact(&mut raw)?;
    Ok(u32::from_be_bytes(raw))
}

fn read_u64(stream: &mut UnixStream) -> io::Result<u64> {
    let mut raw = [0u8; 8];
    stream.read_exact(&mut raw)?;
    Ok(u64::from_be_bytes(raw))
}

/// Longest option reply payload we accept (the spec bounds strings to 4 KiB).
const MAX_OPTION_REPLY: u32 = 64 << 10;

impl Client {
    /// Connects to the unix socket at `path` and selects `export`.
    pub fn connect_unix(path: &Path, export: &str) -> io::Result<Client> {
        let mut stream = UnixStream::connect(path)?;
        if read_u64(&mut stream)? != NBD_MAGIC || read_u64(&mut stream)? != NBD_OPTS_MAGIC {
            return Err(protocol_error("server is not a newstyle NBD server"));
        }
        let server_flags = read_u16(&mut stream)?;
        if server_flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol_error("server does not speak fixed newstyle"));
        }
        let mut client_flags = NBD_FLAG_C_FIXED_NEWSTYLE;
        if server_flags & NBD_FLAG_NO_ZEROES != 0 {
            client_flags |= NBD_FLAG_C_NO_ZEROES;
        }
        stream.write_all(&client_flags.to_be_bytes())?;
        let mut option = Vec::new();
        option.extend_from_slice(&(export.len() as u32).to_be_bytes());
        option.extend_from_slice(export.as_bytes());
        option.extend_from_slice(&0u16.to_be_bytes());
        let mut request = Vec::new();
        request.extend_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
        request.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        request.extend_from_slice(&(option.len() as u32).to_be_bytes());
        request.extend_from_slice(&option);
        stream.write_all(&request)?;
        let mut size = None;
        let mut flags = 0;
        loop {
            if read_u64(&mut stream)? != NBD_REP_MAGIC {
                return Err(protocol_error("bad option reply magic"));
            }
            let _option = read_u32(&mut stream)?;
            let reply = read_u32(&mut stream)?;
            let length = read_u32(&mut stream)?;
            if length > MAX_OPTION_REPLY {
                return Err(protocol_error("option reply too long"));
            }
            let mut payload = vec![0u8; length as usize];
            stream.read_exact(&mut payload)?;
            match reply {
                NBD_REP_ACK => break,
                NBD_REP_INFO if payload.len() >= 12 => {
                    let kind = u16::from_be_bytes([payload[0], payload[1]]);
                    if kind == NBD_INFO_EXPORT {
                        let mut raw = [0u8; 8];
                        raw.copy_from_slice(&payload[2..10]);
                        size = Some(u64::from_be_bytes(raw));
                        flags = u16::from_be_bytes([payload[10], payload[11]]);
                    }
                }
                NBD_REP_INFO => {}
                error => {
                    return Err(protocol_error(format!(
                        "server refused export '{export}' (reply {error:#x}): {}",
                        String::from_utf8_lossy(&payload)
                    )))
                }
            }
        }
        let size = size.ok_or_else(|| protocol_error("server sent no export size"))?;
        Ok(Client {
            stream,
            size,
            flags,
            next_handle: 1,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the export is read-only.
    pub fn is_read_only(&self) -> bool {
        self.flags & NBD_FLAG_READ_ONLY != 0
    }

    fn request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut header = Vec::with_capacity(NBD_REQUEST_SIZE + payload.len());
        header.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        header.extend_from_slice(&flags.to_be_bytes());
        header.extend_from_slice(&command.to_be_bytes());
        header.extend_from_slice(&handle.to_be_bytes());
        header.extend_from_slice(&offset.to_be_bytes());
        header.extend_from_slice(&length.to_be_bytes());
        header.extend_from_slice(payload);
        self.stream.write_all(&header)?;
        if command == NBD_CMD_DISC {
            return Ok(());
        }
        if read_u32(&mut self.stream)? != NBD_SIMPLE_REPLY_MAGIC {
            return Err(protocol_error("bad reply magic"));
        }
        let error = read_u32(&mut self.stream)?;
        if read_u64(&mut self.stream)? != handle {
            return Err(protocol_error("reply for another request"));
        }
        if error != 0 {
            return Err(io::Error::other(format!(
                "NBD request failed with error {error}"
            )));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let length = u32::try_from(buf.len()).map_err(|_| protocol_error("read too long"))?;
        self.request(NBD_CMD_READ, 0, offset, length, &[])?;
        self.stream.read_exact(buf)
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let length = u32::try_from(data.len()).map_err(|_| protocol_error("write too long"))?;
        self.request(NBD_CMD_WRITE, 0, offset, length, data)
    }

    /// Makes every completed write durable.
    pub fn flush(&mut self) -> io::Result<()> {
        self.request(NBD_CMD_FLUSH, 0, 0, 0, &[])
    }

    /// Ends the session cleanly.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.request(NBD_CMD_DISC, 0, 0, 0, &[])
    }
}

//! A small blocking QMP client: greeting, capability negotiation, commands with ids, events
//! queued while waiting for a reply. Used by `imgstream ctl` and `imgstream demo`.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Largest message we accept from the server.
const MAX_MESSAGE: usize = 16 << 20;

/// A QMP error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    pub class: String,
    pub desc: String,
}

impl std::fmt::Display for QmpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.desc, self.class)
    }
}

impl std::error::Error for QmpError {}

pub struct QmpClient {
    stream: UnixStream,
    pending: Vec<u8>,
    events: VecDeque<Value>,
    next_id: u64,
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path) -> Result<QmpClient> {
        let stream = UnixStream::connect(path)
            .with_context(|| format!("Could not connect to QMP socket '{}'", path.display()))?;
        let mut client = QmpClient {
            stream,
            pending: Vec::new(),
            events: VecDeque::new(),
            next_id: 1,
        };
        let greeting = client
            .read_message(None)?
            .context("QMP server closed the connection before greeting")?;
        if greeting.get("QMP").is_none() {
            bail!("Not a QMP server: unexpected greeting {greeting}");
        }
        client.execute("qmp_capabilities", None)?;
        Ok(client)
    }

    /// Reads one message; `None` on timeout.
    fn read_message(&mut self, timeout: Option<Duration>) -> Result<Option<Value>> {
        self.stream.set_read_timeout(timeout)?;
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                return Ok(Some(
                    serde_json::from_str(text)
                        .with_context(|| format!("Malformed QMP message: {text}"))?,
                ));
            }
            if self.pending.len() > MAX_MESSAGE {
                bail!("QMP message too long");
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => bail!("QMP server closed the connection"),
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends a raw JSON command object and returns the whole reply object.
    pub fn raw(&mut self, mut command: Value) -> Result<Value> {
        let id = json!(format!("ctl-{}", self.next_id));
        self.next_id += 1;
        command["id"] = id.clone();
        let mut text = serde_json::to_vec(&command)?;
        text.extend_from_slice(b"\r\n");
        self.stream.write_all(&text)?;
        loop {
            let message = self
                .read_message(None)?
                .context("QMP server closed the connection")?;
            if message.get("event").is_some() {
                self.events.push_back(message);
            } else if message.get("id") == Some(&id) {
                return Ok(message);
            }
        }
    }

    /// Runs `name` with `arguments`; a QMP error becomes a [`QmpError`].
    pub fn execute(&mut self, name: &str, arguments: Option<Value>) -> Result<Value> {
        let mut command = json!({ "execute": name });
        if let Some(arguments) = arguments {
            command["arguments"] = arguments;
        }
        let reply = self.raw(command)?;
        if let Some(error) = reply.get("error") {
            return Err(anyhow!(QmpError {
                class: error["class"].as_str().unwrap_or("").to_string(),
                desc: error["desc"].as_str().unwrap_or("").to_string(),
            }));
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    /// The next event that arrived while a command waited for its reply, without reading.
    pub fn queued_event(&mut self) -> Option<Value> {
        self.events.pop_front()
    }

    /// The next event, waiting at most `timeout`.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Value>> {
        if let Some(event) = self.events.pop_front() {
            return Ok(Some(event));
        }
        match self.read_message(Some(timeout))? {
            Some(message) if message.get("event").is_some() => Ok(Some(message)),
            _ => Ok(None),
        }
    }
}

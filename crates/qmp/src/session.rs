//! One monitor connection: greeting, capability negotiation, request checks with QEMU's
//! errors, command execution, and the events the monitor receives once negotiated. Also
//! the unix socket server that runs one session per connection.

use crate::commands::{self, After};
use crate::error::{ErrorClass, QmpError};
use crate::json::Json;
use crate::qdict::KeyOrder;
use crate::state::{Daemon, Event};
use crate::wire::{self, Input, MessageReader, TOO_LARGE_MESSAGE};
use serde_json::{Map, Value};
use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::broadcast;
use tokio::task::JoinSet;

/// Bytes read from a client at a time.
const READ_SIZE: usize = 64 << 10;

/// A session's own state.
struct Session {
    /// Receives events once capabilities are negotiated (`None` before).
    events: Option<broadcast::Receiver<Arc<Event>>>,
    oob: bool,
}

/// The reply to one request, and whether the session should end after it.
struct Outcome {
    text: String,
    after: After,
}

fn request_error(desc: impl Into<String>, id: Option<&Json>) -> Outcome {
    Outcome {
        text: wire::error(&QmpError::generic(desc), id),
        after: After::Continue,
    }
}

impl Session {
    async fn handle(&mut self, daemon: &Arc<Daemon>, request: Value, order: KeyOrder) -> Outcome {
        let Value::Object(request) = request else {
            return request_error("QMP input must be a JSON object", None);
        };
        let id = request
            .get("id")
            .map(|id| Json::of_input(id, &order.member("id")));
        let id = id.as_ref();
        let (name, oob) = match self.check_members(&request, &order) {
            Ok(found) => found,
            Err(desc) => return request_error(desc, id),
        };
        let arguments = match request.get("arguments") {
            Some(Value::Object(arguments)) => arguments.clone(),
            _ => Map::new(),
        };
        let arguments_order = order.member("arguments");
        match self
            .execute(daemon, name, oob, arguments, arguments_order)
            .await
        {
            Ok((reply, after)) => Outcome {
                text: wire::reply(&reply, id),
                after,
            },
            Err(error) => Outcome {
                text: wire::error(&error, id),
                after: After::Continue,
            },
        }
    }

    /// QEMU's `qmp_dispatch_check_obj()`: the members in QDict order, the first fault wins.
    /// Returns the command and whether it came as `exec-oob`.
    fn check_members<'r>(
        &self,
        request: &'r Map<String, Value>,
        order: &KeyOrder,
    ) -> Result<(&'r str, bool), String> {
        let mut command: Option<(&str, &str)> = None;
        for key in order.qdict_keys(request) {
            let value = &request[key];
            match key {
                "execute" | "exec-oob" if key == "execute" || self.oob => {
                    let Some(name) = value.as_str() else {
                        return Err(format!("QMP input member '{key}' must be a string"));
                    };
                    if let Some((first, _)) = command {
                        return Err(format!("QMP input member '{key}' clashes with '{first}'"));
                    }
                    command = Some((key, name));
                }
                "arguments" if !value.is_object() => {
                    return Err("QMP input member 'arguments' must be an object".into());
                }
                "arguments" | "id" => {}
                _ => return Err(format!("QMP input member '{key}' is unexpected")),
            }
        }
        match command {
            Some((key, name)) => Ok((name, key == "exec-oob")),
            None => Err("QMP input lacks member 'execute'".into()),
        }
    }

    async fn execute(
        &mut self,
        daemon: &Arc<Daemon>,
        name: &str,
        oob: bool,
        arguments: Map<String, Value>,
        order: KeyOrder,
    ) -> Result<(Json, After), QmpError> {
        let negotiating = self.events.is_none();
        if negotiating && name != "qmp_capabilities" {
            return Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        if commands::members(name).is_none() {
            return Err(commands::not_found(name));
        }
        if oob {
            return Err(QmpError::generic(format!(
                "The command {name} does not support OOB"
            )));
        }
        if name != "qmp_capabilities" {
            return commands::dispatch(daemon, name, arguments, order).await;
        }
        let enable = commands::check_capabilities(arguments, &order)?;
        if !negotiating {
            return Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        self.oob = enable.iter().any(|c| c == "oob");
        self.events = Some(daemon.events());
        Ok((Json::empty_object(), After::Continue))
    }

    /// Events that are already queued, so that those a command caused precede its reply.
    fn pending_events(&mut self) -> Vec<Arc<Event>> {
        let mut out = Vec::new();
        if let Some(rx) = self.events.as_mut() {
            loop {
                match rx.try_recv() {
                    Ok(event) => out.push(event),
                    Err(broadcast::error::TryRecvError::Lagged(n)) => lagged(n),
                    Err(_) => break,
                }
            }
        }
        out
    }
}

fn lagged(missed: u64) {
    tracing::warn!("a QMP monitor read too slowly and missed {missed} events");
}

/// The next event for a negotiated session; never resolves before negotiation.
async fn next_event(events: &mut Option<broadcast::Receiver<Arc<Event>>>) -> Arc<Event> {
    let Some(rx) = events.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        match rx.recv().await {
            Ok(event) => return event,
            Err(broadcast::error::RecvError::Lagged(n)) => lagged(n),
            Err(broadcast::error::RecvError::Closed) => return std::future::pending().await,
        }
    }
}

fn event_text(event: &Event) -> String {
    wire::event(&event.name, &event.data, event.timestamp)
}

impl Daemon {
    /// Runs one monitor session on `stream` until the client leaves, sends `quit`, or the
    /// daemon quits.
    pub async fn serve_connection<S>(self: &Arc<Self>, stream: S) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (mut reader, mut writer) = tokio::io::split(stream);
        writer.write_all(commands::greeting().as_bytes()).await?;
        let mut session = Session {
            events: None,
            oob: false,
        };
        let mut messages = MessageReader::new();
        let mut buf = vec![0u8; READ_SIZE];
        loop {
            tokio::select! {
                read = reader.read(&mut buf) => {
                    let n = read?;
                    if n == 0 {
                        return Ok(());
                    }
                    for input in messages.feed(&buf[..n]) {
                        let (text, after) = match input {
                            Input::Value(request, order) => {
                                let outcome = session.handle(self, request, order).await;
                                (outcome.text, outcome.after)
                            }
                            Input::Malformed(desc) => {
                                (wire::error(&QmpError::generic(desc), None), After::Continue)
                            }
                            Input::TooLarge => {
                                let error = QmpError::generic(TOO_LARGE_MESSAGE);
                                writer.write_all(wire::error(&error, None).as_bytes()).await?;
                                return Ok(());
                            }
                        };
                        for event in session.pending_events() {
                            writer.write_all(event_text(&event).as_bytes()).await?;
                        }
                        writer.write_all(text.as_bytes()).await?;
                        if after == After::Quit {
                            writer.flush().await?;
                            self.request_quit();
                            return Ok(());
                        }
                    }
                }
                event = next_event(&mut session.events) => {
                    writer.write_all(event_text(&event).as_bytes()).await?;
                }
                _ = self.quit_requested() => return Ok(()),
            }
        }
    }

    /// Serves monitors on a unix socket at `path` (mode 0600), several at once, until
    /// `shutdown` resolves or a client sends `quit`. The socket file is removed at the end.
    pub async fn serve_unix(
        self: &Arc<Self>,
        path: &Path,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let listener = bind_private(path)?;
        self.serve_unix_listener(listener, path, shutdown).await
    }

    /// Like [`Daemon::serve_unix`] on a socket already bound with [`bind_unix_socket`], so the
    /// caller knows exactly when clients can connect. `path` is removed at the end.
    pub async fn serve_unix_listener(
        self: &Arc<Self>,
        listener: UnixListener,
        path: &Path,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let mut sessions = JoinSet::new();
        tokio::pin!(shutdown);
        let result = loop {
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                _ = self.quit_requested() => break Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let daemon = self.clone();
                        sessions.spawn(async move {
                            if let Err(e) = daemon.serve_connection(stream).await {
                                tracing::debug!("QMP session ended: {e}");
                            }
                        });
                    }
                    Err(e) => {
                        // Out of descriptors and the like: wait rather than spin.
                        tracing::warn!("accepting a QMP connection failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            }
        };
        sessions.abort_all();
        let _ = std::fs::remove_file(path);
        result
    }
}

/// Binds a unix socket that only the owner can connect to: made in a private folder, set to
/// 0600, then moved into place, so there is no moment when others could connect. A stale
/// socket at `path` is replaced; any other file there is an error.
pub fn bind_unix_socket(path: &Path) -> std::io::Result<UnixListener> {
    bind_private(path)
}

fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private = parent.join(format!(".qmp-{}.tmp", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let temporary = private.join("s");
    let bound = (|| {
        let listener = UnixListener::bind(&temporary)?;
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&temporary, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&temporary);
    let _ = std::fs::remove_dir(&private);
    bound
}

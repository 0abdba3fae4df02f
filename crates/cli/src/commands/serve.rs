//! `imgstream serve`: the storage daemon. Opens images with their chains, exports each top over
//! NBD, answers QMP on a control socket, and flushes everything on SIGTERM, SIGINT or `quit`.

use crate::export::NbdServerHost;
use anyhow::{bail, Context, Result};
use imgstream_block::Disk;
use imgstream_qmp::qsd_args::{parse_option, Opts};
use imgstream_qmp::{Daemon, NbdAddr, NbdHost, QmpError};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The QMP control socket to create (mode 0600).
    #[arg(long)]
    qmp: Option<PathBuf>,
    /// Where to serve NBD: unix:PATH or HOST:PORT.
    #[arg(long)]
    nbd: Option<String>,
    /// Open the images read-only (no stream can run) and export them read-only.
    #[arg(long)]
    read_only: bool,
    /// Write the daemon's process id here.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// NODE=IMAGE: open IMAGE with its backing chain as node NODE (backing nodes NODE.1,
    /// NODE.2, ...), exported over NBD as NODE.
    #[arg(required_unless_present_any = ["blockdev", "chardev", "nbd_server", "export", "monitor"])]
    nodes: Vec<String>,
    #[command(flatten)]
    qsd: QsdOptions,
}

/// qemu-storage-daemon's options, in its syntax (dotted keys or JSON); see `docs/qmp.md`.
/// They are applied in this order: block nodes, NBD server, exports, monitors.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct QsdOptions {
    /// A block node: driver=file|qcow2|qed|raw,node-name=...,... (as QMP blockdev-add).
    #[arg(long, value_name = "OPTIONS")]
    blockdev: Vec<String>,
    /// The NBD server: addr.type=unix,addr.path=... or addr.type=inet,addr.host=..,addr.port=..
    #[arg(long, value_name = "OPTIONS")]
    nbd_server: Option<String>,
    /// An export: [type=]nbd,id=...,node-name=...[,name=...][,writable=on|off].
    #[arg(long, value_name = "OPTIONS")]
    export: Vec<String>,
    /// A character device for a monitor: socket,id=...,path=...,server=on,wait=off.
    #[arg(long, value_name = "OPTIONS")]
    chardev: Vec<String>,
    /// A QMP monitor on a character device: [chardev=]ID.
    #[arg(long, value_name = "OPTIONS")]
    monitor: Vec<String>,
    /// Write the daemon's process id here once it listens (QSD's spelling of --pid-file).
    #[arg(long, value_name = "FILE")]
    pidfile: Option<PathBuf>,
    /// Run in the background once every socket listens.
    #[arg(long)]
    daemonize: bool,
    /// The options above in command-line order (filled by `run`).
    #[arg(skip)]
    order: Vec<QsdOption>,
}

/// One QSD option as written: its name, its value, and its spelling for messages.
#[derive(Debug, Clone)]
struct QsdOption {
    name: &'static str,
    value: String,
    spelled: String,
}

/// Where the NBD server listens.
#[derive(Debug, Clone)]
pub enum NbdAddress {
    Unix(PathBuf),
    Tcp(String),
}

impl NbdAddress {
    pub fn parse(text: &str) -> Result<NbdAddress> {
        if let Some(path) = text.strip_prefix("unix:") {
            return Ok(NbdAddress::Unix(PathBuf::from(path)));
        }
        if text
            .rsplit_once(':')
            .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
        {
            return Ok(NbdAddress::Tcp(text.to_string()));
        }
        bail!("Invalid NBD address '{text}' (unix:PATH or HOST:PORT)")
    }
}

/// What the daemon serves.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub qmp: Option<PathBuf>,
    pub nbd: Option<NbdAddress>,
    pub read_only: bool,
    pub pid_file: Option<PathBuf>,
    pub nodes: Vec<(String, PathBuf)>,
}

pub fn run(mut args: Args) -> Result<u8> {
    let argv: Vec<String> = std::env::args().collect();
    args.qsd.order = command_line_order(&argv);
    let nodes = args
        .nodes
        .iter()
        .map(|spec| {
            let (name, path) = spec
                .split_once('=')
                .with_context(|| format!("Invalid node '{spec}' (expected NODE=IMAGE)"))?;
            if !imgstream_qmp::state::id_wellformed(name) {
                bail!("Invalid node name '{name}' (a letter, then letters, digits, '-', '.', '_')");
            }
            Ok((name.to_string(), PathBuf::from(path)))
        })
        .collect::<Result<Vec<_>>>()?;
    let config = ServeConfig {
        qmp: args.qmp,
        nbd: args.nbd.as_deref().map(NbdAddress::parse).transpose()?,
        read_only: args.read_only,
        pid_file: args.pid_file.or(args.qsd.pidfile.clone()),
        nodes,
    };
    let notify = if args.qsd.daemonize {
        match daemonize()? {
            Some(notify) => Some(notify),
            None => return Ok(0),
        }
    } else {
        None
    };
    serve_with(config, args.qsd, move || {
        if let Some(notify) = notify {
            notify.ready();
        }
    })?;
    Ok(0)
}

/// The daemonized child's way to tell its waiting parent that it is ready.
struct ReadyPipe(std::os::fd::OwnedFd);

impl ReadyPipe {
    fn ready(self) {
        use std::io::Write;
        let mut pipe = std::fs::File::from(self.0);
        let _ = pipe.write_all(b"1");
        // The parent has gone: detach from its terminal as QSD does.
        if let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            use std::os::fd::AsRawFd;
            for fd in 0..3 {
                // SAFETY: dup2 onto the standard descriptors with a valid open descriptor.
                unsafe { libc::dup2(null.as_raw_fd(), fd) };
            }
        }
    }
}

/// `--daemonize`: forks; the parent waits until the child is ready (or failed) and returns
/// `None`, the child returns the pipe to signal readiness on. Runs before any thread starts.
fn daemonize() -> Result<Option<ReadyPipe>> {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two descriptors into the array we own.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the descriptors were just created and are owned here alone.
    let (read, write) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    // SAFETY: no other thread runs yet (called before the runtime is built).
    match unsafe { libc::fork() } {
        -1 => bail!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            drop(read);
            // SAFETY: setsid has no memory-safety preconditions.
            unsafe { libc::setsid() };
            Ok(Some(ReadyPipe(write)))
        }
        _ => {
            drop(write);
            let mut byte = [0u8; 1];
            let mut pipe = std::fs::File::from(read);
            match pipe.read(&mut byte) {
                Ok(1) => Ok(None),
                // The child failed and said why on stderr.
                _ => std::process::exit(1),
            }
        }
    }
}

/// Runs the daemon until SIGTERM, SIGINT or QMP `quit`; `ready` is called once every socket
/// listens (the demo and tests wait for it instead of polling).
pub fn serve(config: ServeConfig, ready: impl FnOnce()) -> Result<()> {
    serve_with(config, QsdOptions::default(), ready)
}

/// [`serve`] with qemu-storage-daemon's options as well.
pub fn serve_with(config: ServeConfig, qsd: QsdOptions, ready: impl FnOnce()) -> Result<()> {
    let mut disks = Vec::new();
    for (name, path) in &config.nodes {
        let options = imgstream_block::ChainOptions {
            writable: !config.read_only,
            ..imgstream_block::ChainOptions::read_only()
        };
        let disk = Disk::open(path, &options)
            .with_context(|| format!("Could not open node '{name}' ('{}')", path.display()))?;
        disks.push((name.clone(), Arc::new(disk)));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("imgstream-serve")
        .build()?;
    let daemon = Daemon::new();
    let result = runtime.block_on(serve_async(&config, &qsd, &daemon, &disks, ready));
    // Whatever happened, make every completed write durable before exiting.
    for (name, disk) in &disks {
        if let Err(e) = disk.flush() {
            eprintln!("imgstream: flushing node '{name}' failed: {e}");
        }
    }
    for node in daemon.nodes() {
        if let Err(e) = node.disk.flush() {
            eprintln!("imgstream: flushing node '{}' failed: {e}", node.name);
        }
    }
    if let Some(pid_file) = &config.pid_file {
        let _ = std::fs::remove_file(pid_file);
    }
    result
}

/// Turns a QSD-style option failure into QSD's message: `--OPTION VALUE: reason`.
fn option_error(spelled: &str, desc: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{spelled}: {desc}")
}

/// The QSD options in the order QSD applies them: command-line order when known, else nodes,
/// NBD server, exports, character devices, monitors.
fn ordered_options(qsd: &QsdOptions) -> Vec<QsdOption> {
    if !qsd.order.is_empty() {
        return qsd.order.clone();
    }
    let named = |name: &'static str, texts: &[String]| -> Vec<QsdOption> {
        texts
            .iter()
            .map(|text| QsdOption {
                name,
                value: text.clone(),
                spelled: format!("--{name} {text}"),
            })
            .collect()
    };
    let mut order = named("blockdev", &qsd.blockdev);
    order.extend(named("nbd-server", qsd.nbd_server.as_slice()));
    order.extend(named("export", &qsd.export));
    order.extend(named("chardev", &qsd.chardev));
    order.extend(named("monitor", &qsd.monitor));
    order
}

/// The QSD options of `argv` in command-line order (`--name value` or `--name=value`); clap
/// has checked them already and collects them by name only.
fn command_line_order(argv: &[String]) -> Vec<QsdOption> {
    const NAMES: &[&str] = &["blockdev", "nbd-server", "export", "chardev", "monitor"];
    let mut order = Vec::new();
    let mut args = argv.iter();
    while let Some(arg) = args.next() {
        if arg == "--" {
            break;
        }
        let Some(option) = arg.strip_prefix("--") else {
            continue;
        };
        let (name, inline) = match option.split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            None => (option, None),
        };
        if let Some(name) = NAMES.iter().find(|n| **n == name) {
            let spelled_inline = inline.is_some();
            if let Some(value) = inline.or_else(|| args.next().cloned()) {
                // QSD's messages repeat the option as it was written.
                let spelled = if spelled_inline {
                    arg.clone()
                } else {
                    format!("{arg} {value}")
                };
                order.push(QsdOption {
                    name,
                    value,
                    spelled,
                });
            }
        }
    }
    order
}

/// A `--chardev`: only unix sockets that serve (QSD's monitor sockets).
fn read_chardev(opts: &mut Opts) -> Result<(String, PathBuf), QmpError> {
    let backend = opts.req_str("backend")?;
    let id = opts.req_str("id")?;
    if backend != "socket" {
        return Err(QmpError::generic(format!(
            "imgstream: chardev backend '{backend}' is not supported"
        )));
    }
    let path = opts.req_str("path")?;
    opts.bool("server")?;
    opts.bool("wait")?;
    opts.finish()?;
    Ok((id, PathBuf::from(path)))
}

/// A `--monitor`: the socket path of its character device.
fn read_monitor(opts: &mut Opts, chardevs: &[(String, PathBuf)]) -> Result<PathBuf, QmpError> {
    let id = opts.req_str("chardev")?;
    opts.str("id")?;
    opts.enum_value("mode", &["readline", "control"])?;
    opts.bool("pretty")?;
    opts.finish()?;
    chardevs
        .iter()
        .find(|(c, _)| *c == id)
        .map(|(_, path)| path.clone())
        .ok_or_else(|| QmpError::generic(format!("chardev \"{id}\" not found")))
}

/// Applies the QSD options to `daemon` in QSD's order; returns the monitor socket paths.
fn apply_qsd_options(daemon: &Arc<Daemon>, qsd: &QsdOptions) -> Result<Vec<PathBuf>> {
    use imgstream_qmp::commands::{blockdev, exports};
    let mut chardevs = Vec::new();
    let mut monitors = Vec::new();
    for QsdOption {
        name,
        value: text,
        spelled,
    } in ordered_options(qsd)
    {
        let implied = match name {
            "export" => Some("type"),
            "chardev" => Some("backend"),
            "monitor" => Some("chardev"),
            _ => None,
        };
        let mut opts = parse_option(&text, implied).map_err(|e| option_error(&spelled, e))?;
        let applied = match name {
            "blockdev" => blockdev::blockdev_add(daemon, opts),
            "nbd-server" => exports::nbd_server_start(daemon, opts, false).map(drop),
            "export" => exports::block_export_add(daemon, opts).map(drop),
            "chardev" => read_chardev(&mut opts).map(|c| chardevs.push(c)),
            _ => read_monitor(&mut opts, &chardevs).map(|m| monitors.push(m)),
        };
        applied.map_err(|e| option_error(&spelled, e.desc))?;
    }
    Ok(monitors)
}

async fn serve_async(
    config: &ServeConfig,
    qsd: &QsdOptions,
    daemon: &Arc<Daemon>,
    disks: &[(String, Arc<Disk>)],
    ready: impl FnOnce(),
) -> Result<()> {
    let daemon = daemon.clone();
    let nbd = Arc::new(NbdServerHost::new(tokio::runtime::Handle::current()));
    daemon.set_nbd_host(nbd.clone());
    if let Some(address) = &config.nbd {
        let addr = match address {
            NbdAddress::Unix(path) => NbdAddr::Unix(path.clone()),
            NbdAddress::Tcp(text) => {
                let (host, port) = text.rsplit_once(':').unwrap_or((text, ""));
                NbdAddr::Inet {
                    host: host.trim_matches(['[', ']']).to_string(),
                    port: port.to_string(),
                }
            }
        };
        nbd.start(
            &addr,
            u32::MAX,
            Some(imgstream_nbd::DEFAULT_HANDSHAKE_TIMEOUT),
        )
        .map_err(|e| anyhow::anyhow!("Could not listen on {address:?}: {e}"))?;
        daemon.set_nbd_running(addr);
    }
    for (name, disk) in disks {
        daemon.add_chain(name, disk.clone())?;
        if config.nbd.is_some() {
            nbd.add_export(name, disk.clone(), !config.read_only)
                .map_err(|e| anyhow::anyhow!(e))?;
        }
        daemon.add_export(name, name, !config.read_only)?;
    }
    let monitors = apply_qsd_options(&daemon, qsd)?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let mut qmp_tasks = Vec::new();
    for path in config.qmp.iter().chain(&monitors) {
        let daemon = daemon.clone();
        let path = path.clone();
        let mut stop = stop_rx.clone();
        let listener = imgstream_qmp::bind_unix_socket(&path)
            .with_context(|| format!("Could not create the QMP socket '{}'", path.display()))?;
        qmp_tasks.push(tokio::spawn(async move {
            daemon
                .serve_unix_listener(listener, &path, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
        }));
    }
    if let Some(pid_file) = &config.pid_file {
        std::fs::write(pid_file, format!("{}\n", std::process::id()))
            .with_context(|| format!("Could not write pid file '{}'", pid_file.display()))?;
    }
    ready();
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
        _ = daemon.quit_requested() => tracing::info!("quit: shutting down"),
    }
    // Running jobs are cancelled (QEMU's quit does the same): headers stay as they are.
    let cancelling = daemon.clone();
    let _ = tokio::task::spawn_blocking(move || cancelling.cancel_all_jobs()).await;
    // QSD deletes its exports on the way out, and says so (BLOCK_EXPORT_DELETED) to the
    // monitors before they close.
    let _ = imgstream_qmp::commands::exports::nbd_server_stop(&daemon);
    let _ = stop_tx.send(true);
    nbd.shutdown();
    // Every write a client was answered must be in the images before the last flush: the
    // connections answer what they have in flight before they close.
    nbd.wait_closed().await;
    for task in qmp_tasks {
        let _ = task.await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qsd_options_keep_command_line_order_and_spelling() {
        let argv: Vec<String> = [
            "imgstream",
            "serve",
            "--export",
            "type=nbd,id=e,node-name=d",
            "--blockdev=driver=file,filename=x,node-name=d",
            "--pidfile",
            "p",
            "--monitor",
            "chardev=m",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let order = command_line_order(&argv);
        let seen: Vec<(&str, &str, &str)> = order
            .iter()
            .map(|o| (o.name, o.value.as_str(), o.spelled.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                (
                    "export",
                    "type=nbd,id=e,node-name=d",
                    "--export type=nbd,id=e,node-name=d"
                ),
                (
                    "blockdev",
                    "driver=file,filename=x,node-name=d",
                    "--blockdev=driver=file,filename=x,node-name=d"
                ),
                ("monitor", "chardev=m", "--monitor chardev=m"),
            ]
        );
    }
}

//! `imgstream serve`: the storage daemon. Opens images with their chains, exports each top over
//! NBD, answers QMP on a control socket, and flushes everything on SIGTERM, SIGINT or `quit`.

use crate::export::NbdServerHost;
use anyhow::{bail, Context, Result};
use imgstream_block::Disk;
use imgstream_qmp::{Daemon, NbdAddr, NbdHost};
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
    /// Export the images read-only.
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

pub fn run(args: Args) -> Result<u8> {
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
fn option_error(option: &str, text: &str, desc: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("--{option} {text}: {desc}")
}

/// Applies the QSD options (nodes, NBD server, exports) to `daemon`; returns the monitor
/// socket paths.
fn apply_qsd_options(daemon: &Arc<Daemon>, qsd: &QsdOptions) -> Result<Vec<PathBuf>> {
    use imgstream_qmp::commands::{blockdev, exports};
    use imgstream_qmp::qsd_args::parse_option;
    for text in &qsd.blockdev {
        let opts = parse_option(text, None).map_err(|e| option_error("blockdev", text, e))?;
        blockdev::blockdev_add(daemon, opts).map_err(|e| option_error("blockdev", text, e.desc))?;
    }
    if let Some(text) = &qsd.nbd_server {
        let opts = parse_option(text, None).map_err(|e| option_error("nbd-server", text, e))?;
        exports::nbd_server_start(daemon, opts, false)
            .map_err(|e| option_error("nbd-server", text, e.desc))?;
    }
    for text in &qsd.export {
        let opts = parse_option(text, Some("type")).map_err(|e| option_error("export", text, e))?;
        exports::block_export_add(daemon, opts)
            .map_err(|e| option_error("export", text, e.desc))?;
    }
    let mut chardevs = Vec::new();
    for text in &qsd.chardev {
        let mut opts =
            parse_option(text, Some("backend")).map_err(|e| option_error("chardev", text, e))?;
        let read = |opts: &mut imgstream_qmp::qsd_args::Opts| -> Result<(String, PathBuf), imgstream_qmp::QmpError> {
            let backend = opts.req_str("backend")?;
            let id = opts.req_str("id")?;
            if backend != "socket" {
                return Err(imgstream_qmp::QmpError::generic(format!(
                    "imgstream: chardev backend '{backend}' is not supported"
                )));
            }
            let path = opts.req_str("path")?;
            opts.bool("server")?;
            opts.bool("wait")?;
            opts.finish()?;
            Ok((id, PathBuf::from(path)))
        };
        chardevs.push(read(&mut opts).map_err(|e| option_error("chardev", text, e.desc))?);
    }
    let mut monitors = Vec::new();
    for text in &qsd.monitor {
        let mut opts =
            parse_option(text, Some("chardev")).map_err(|e| option_error("monitor", text, e))?;
        let read =
            |opts: &mut imgstream_qmp::qsd_args::Opts| -> Result<PathBuf, imgstream_qmp::QmpError> {
                let id = opts.req_str("chardev")?;
                opts.str("id")?;
                opts.enum_value("mode", &["readline", "control"])?;
                opts.bool("pretty")?;
                opts.finish()?;
                chardevs
                    .iter()
                    .find(|(c, _)| *c == id)
                    .map(|(_, path)| path.clone())
                    .ok_or_else(|| {
                        imgstream_qmp::QmpError::generic(format!("chardev \"{id}\" not found"))
                    })
            };
        monitors.push(read(&mut opts).map_err(|e| option_error("monitor", text, e.desc))?);
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
        nbd.start(&addr, u32::MAX)
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
    for task in qmp_tasks {
        let _ = task.await;
    }
    Ok(())
}

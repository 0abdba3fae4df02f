//! `imgstream serve`: the storage daemon. Opens images with their chains, exports each top over
//! NBD, answers QMP on a control socket, and flushes everything on SIGTERM, SIGINT or `quit`.

use crate::export::DiskExport;
use anyhow::{bail, Context, Result};
use imgstream_block::Disk;
use imgstream_nbd::{Export, Server, ServerConfig};
use imgstream_qmp::Daemon;
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
    #[arg(required = true)]
    nodes: Vec<String>,
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
        pid_file: args.pid_file,
        nodes,
    };
    serve(config, || {})?;
    Ok(0)
}

/// Runs the daemon until SIGTERM, SIGINT or QMP `quit`; `ready` is called once every socket
/// listens (the demo and tests wait for it instead of polling).
pub fn serve(config: ServeConfig, ready: impl FnOnce()) -> Result<()> {
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
    let result = runtime.block_on(serve_async(&config, &disks, ready));
    // Whatever happened, make every completed write durable before exiting.
    for (name, disk) in &disks {
        if let Err(e) = disk.flush() {
            eprintln!("imgstream: flushing node '{name}' failed: {e}");
        }
    }
    if let Some(pid_file) = &config.pid_file {
        let _ = std::fs::remove_file(pid_file);
    }
    result
}

async fn serve_async(
    config: &ServeConfig,
    disks: &[(String, Arc<Disk>)],
    ready: impl FnOnce(),
) -> Result<()> {
    let daemon = Daemon::new();
    let nbd = Server::new(ServerConfig::default());
    for (name, disk) in disks {
        daemon.add_chain(name, disk.clone())?;
        let export =
            Export::new(Arc::new(DiskExport::new(disk.clone()))).read_only(config.read_only);
        nbd.add_export(name.clone(), export)?;
        daemon.add_export(name, name, !config.read_only)?;
    }
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let nbd_task = match &config.nbd {
        Some(NbdAddress::Unix(path)) => {
            let listener = bind_unix(path)?;
            let server = nbd.clone();
            Some(tokio::spawn(async move {
                server.serve_unix_listener(listener).await
            }))
        }
        Some(NbdAddress::Tcp(address)) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("Could not listen on {address}"))?;
            let server = nbd.clone();
            Some(tokio::spawn(async move {
                server.serve_tcp_listener(listener).await
            }))
        }
        None => None,
    };
    let qmp_task = match &config.qmp {
        Some(path) => {
            let daemon = daemon.clone();
            let path = path.clone();
            let mut stop = stop_rx.clone();
            let listener = imgstream_qmp::bind_unix_socket(&path)
                .with_context(|| format!("Could not create the QMP socket '{}'", path.display()))?;
            Some(tokio::spawn(async move {
                daemon
                    .serve_unix_listener(listener, &path, async move {
                        let _ = stop.wait_for(|s| *s).await;
                    })
                    .await
            }))
        }
        None => None,
    };
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
    let _ = stop_tx.send(true);
    nbd.shutdown();
    if let Some(task) = nbd_task {
        let _ = task.await;
    }
    if let Some(task) = qmp_task {
        let _ = task.await;
    }
    if let Some(NbdAddress::Unix(path)) = &config.nbd {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// Binds the NBD unix socket (replacing a stale socket file, never another kind of file).
fn bind_unix(path: &std::path::Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            bail!("'{}' exists and is not a socket", path.display());
        }
    }
    tokio::net::UnixListener::bind(path)
        .with_context(|| format!("Could not listen on '{}'", path.display()))
}

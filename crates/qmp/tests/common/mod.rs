//! Shared test fixtures: the reference's test chain made with qemu-img/qemu-io, a daemon
//! serving it on a unix socket, and a line-oriented QMP client.

#![allow(dead_code)]

use imgstream_block::{ChainOptions, Disk};
use imgstream_qmp::commands::blockdev::blockdev_add;
use imgstream_qmp::qsd_args::parse_option;
use imgstream_qmp::Daemon;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

pub const MIB: u64 = 1 << 20;

fn run(dir: &Path, program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{program} could not run: {e}"));
    assert!(status.success(), "{program} {args:?} failed");
}

/// Which base the chain has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseKind {
    Qcow2,
    /// A raw file (the reference's B_rawproto experiments).
    Raw,
}

/// The reference's chain in `dir`: base (0xaa @0-8M, 0xbb @32-36M, zero @40-41M) ← mid
/// (0xcc @4-8M, zero @33M-33.5M) ← top (0xdd @6-7M), 64 MiB, plus a standalone `lone.qcow2`.
pub fn make_chain(dir: &Path, base: BaseKind) {
    make_chain_with(dir, base, BackingNames::Relative);
}

/// How the chain's headers name their backing files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingNames {
    /// `mid.qcow2`, as the reference made them.
    Relative,
    /// The absolute path, which is how nodes opened by absolute path are named: the header
    /// then names its backing node by its filename, as the reference's did for QSD, which ran
    /// in the images' folder and opened them by relative name.
    Absolute,
}

/// [`make_chain`] with the backing files named as `names` says.
pub fn make_chain_with(dir: &Path, base: BaseKind, names: BackingNames) {
    let (base_file, base_format) = match base {
        BaseKind::Qcow2 => ("base.qcow2", "qcow2"),
        BaseKind::Raw => ("base.raw", "raw"),
    };
    run(
        dir,
        "qemu-img",
        &["create", "-f", base_format, base_file, "64M"],
    );
    let mut base_writes = vec!["-f", base_format];
    base_writes.extend(["-c", "write -P 0xaa 0 8M", "-c", "write -P 0xbb 32M 4M"]);
    if base == BaseKind::Qcow2 {
        base_writes.extend(["-c", "write -z 40M 1M"]);
    }
    base_writes.push(base_file);
    run(dir, "qemu-io", &base_writes);
    let name = |file: &str| match names {
        BackingNames::Relative => file.to_string(),
        BackingNames::Absolute => dir.join(file).display().to_string(),
    };
    run(
        dir,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            &name(base_file),
            "-F",
            base_format,
            "mid.qcow2",
        ],
    );
    run(
        dir,
        "qemu-io",
        &[
            "-c",
            "write -P 0xcc 4M 4M",
            "-c",
            "write -z 33M 512k",
            "mid.qcow2",
        ],
    );
    run(
        dir,
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            &name("mid.qcow2"),
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    run(dir, "qemu-io", &["-c", "write -P 0xdd 6M 1M", "top.qcow2"]);
    run(
        dir,
        "qemu-img",
        &["create", "-f", "qcow2", "lone.qcow2", "64M"],
    );
}

/// A daemon with the chain registered as QSD's transcripts name it: `top`, `mid`, `base`
/// (renamed from `top.1`, `top.2`) and `lone`.
pub fn daemon_for(dir: &Path) -> Arc<Daemon> {
    let daemon = Daemon::new();
    // A job thread of the previous daemon may still be letting go of the image.
    let mut tries = 0;
    let top = loop {
        match Disk::open(&dir.join("top.qcow2"), &ChainOptions::writable()) {
            Ok(disk) => break disk,
            Err(e) if tries < 100 => {
                tries += 1;
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("open top: {e}"),
        }
    };
    daemon.add_chain("top", Arc::new(top)).expect("add top");
    daemon.rename_node("top.1", "mid").expect("rename mid");
    daemon.rename_node("top.2", "base").expect("rename base");
    let lone = Disk::open(&dir.join("lone.qcow2"), &ChainOptions::writable()).expect("open lone");
    daemon.add_chain("lone", Arc::new(lone)).expect("add lone");
    daemon
}

/// A daemon with the chain's nodes made as the reference QSD's were (its `--blockdev`
/// options, `tests/harness/daemon.rs`): for each image a `file` node `NAME-file` and a format
/// node `NAME` over it, each format node's `backing` naming the node below, the bottom one
/// opening its header's chain (none); `lone` likewise.
pub fn daemon_as_qsd(dir: &Path) -> Arc<Daemon> {
    let daemon = Daemon::new();
    let base_format = if dir.join("base.raw").exists() {
        ("base.raw", "raw")
    } else {
        ("base.qcow2", "qcow2")
    };
    let nodes = [
        ("lone", "lone.qcow2", "qcow2", None),
        ("base", base_format.0, base_format.1, None),
        ("mid", "mid.qcow2", "qcow2", Some("base")),
        ("top", "top.qcow2", "qcow2", Some("mid")),
    ];
    for (node, file, format, backing) in nodes {
        let path = dir.join(file);
        let protocol = format!(
            "driver=file,filename={},node-name={node}-file,aio=threads",
            path.display()
        );
        let backing = backing.map(|b| format!(",backing={b}")).unwrap_or_default();
        let format = format!("driver={format},file={node}-file,node-name={node}{backing}");
        for option in [protocol, format] {
            let opts = parse_option(&option, None).unwrap_or_else(|e| panic!("{option}: {e}"));
            blockdev_add(&daemon, opts).unwrap_or_else(|e| panic!("{option}: {e}"));
        }
    }
    daemon
}

/// Serves `daemon` on `dir/qmp.sock`; returns the socket path and a handle that stops it.
pub async fn serve(
    daemon: &Arc<Daemon>,
    dir: &Path,
) -> (
    PathBuf,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let path = dir.join("qmp.sock");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = daemon.clone();
    let socket = path.clone();
    let handle = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        server
            .serve_unix(&socket, shutdown)
            .await
            .expect("serve_unix");
    });
    for _ in 0..200 {
        if path.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (path, stop, handle)
}

/// A raw QMP connection reading one message per `\r\n`-terminated line.
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Client {
    pub async fn connect(path: &Path) -> (Client, Value) {
        let stream = UnixStream::connect(path).await.expect("connect");
        let (read, write) = stream.into_split();
        let mut client = Client {
            reader: BufReader::new(read),
            writer: write,
        };
        let greeting = client.next(Duration::from_secs(5)).await.expect("greeting");
        (client, greeting)
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("send");
    }

    /// The next message, or `None` on timeout or end of stream.
    pub async fn next(&mut self, timeout: Duration) -> Option<Value> {
        let mut line = String::new();
        match tokio::time::timeout(timeout, self.reader.read_line(&mut line)).await {
            Ok(Ok(n)) if n > 0 => {
                assert!(
                    line.ends_with("\r\n"),
                    "message not ended by CRLF: {line:?}"
                );
                Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")))
            }
            _ => None,
        }
    }
}

pub fn is_event(message: &Value) -> bool {
    message.get("event").is_some()
}

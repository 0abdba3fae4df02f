//! Shared by the integration tests: an in-memory backend with a real
//! allocation map, a server running in its own runtime on a unix socket in a
//! temporary directory, a raw protocol client, and helpers to run the real
//! clients (qemu-io, qemu-img, nbdinfo, nbdsh, nbdcopy, fio).

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imgstream_nbd::protocol::*;
use imgstream_nbd::{
    BackendError, Export, ExportBackend, Server, ServerConfig, StatusRun, ZeroFlags,
};

/// Granularity of the test backend's allocation map.
pub const CLUSTER: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not allocated; reads as zeroes.
    Hole,
    /// Allocated and known to read as zeroes.
    Zero,
    Data,
}

struct Mem {
    data: Vec<u8>,
    map: Vec<State>,
}

/// A disk in memory that tracks allocation per cluster like a sparse file.
pub struct MemBackend {
    mem: Mutex<Mem>,
    /// A read starting at this offset takes half a second.
    pub slow_read_at: Option<u64>,
    /// Reads at `slow_read_at` begun so far: once it moves, the server has
    /// taken the request and must answer it before it closes the connection.
    pub slow_reads_started: AtomicUsize,
    /// Every read and write takes this long, so that requests overlap.
    pub op_delay: Duration,
    pub zeroes_are_fast: bool,
    pub flushes: AtomicUsize,
    in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
}

impl MemBackend {
    pub fn new(size: u64) -> Self {
        MemBackend {
            mem: Mutex::new(Mem {
                data: vec![0; size as usize],
                map: vec![State::Hole; size.div_ceil(CLUSTER) as usize],
            }),
            slow_read_at: None,
            slow_reads_started: AtomicUsize::new(0),
            op_delay: Duration::ZERO,
            zeroes_are_fast: true,
            flushes: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.mem.lock().unwrap().data.clone()
    }

    pub fn state_at(&self, offset: u64) -> State {
        self.mem.lock().unwrap().map[(offset / CLUSTER) as usize]
    }

    /// Writes `byte` over a range as data, bypassing the server.
    pub fn fill(&self, offset: u64, len: u64, byte: u8) {
        self.write(offset, &vec![byte; len as usize], false)
            .unwrap();
    }

    /// Allocation runs of the whole disk as `(offset, len, state)`, merged.
    pub fn runs(&self) -> Vec<(u64, u64, State)> {
        let mem = self.mem.lock().unwrap();
        let size = mem.data.len() as u64;
        let mut runs: Vec<(u64, u64, State)> = Vec::new();
        for (i, &state) in mem.map.iter().enumerate() {
            let start = i as u64 * CLUSTER;
            let len = CLUSTER.min(size - start);
            match runs.last_mut() {
                Some((_, l, s)) if *s == state => *l += len,
                _ => runs.push((start, len, state)),
            }
        }
        runs
    }

    fn track<T>(&self, op: impl FnOnce() -> T) -> T {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        if !self.op_delay.is_zero() {
            std::thread::sleep(self.op_delay);
        }
        let out = op();
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        out
    }

    /// Clusters entirely inside `[offset, offset + len)`.
    fn whole_clusters(offset: u64, len: u64) -> std::ops::Range<usize> {
        let first = offset.div_ceil(CLUSTER);
        let end = (offset + len) / CLUSTER;
        first as usize..end.max(first) as usize
    }
}

impl ExportBackend for MemBackend {
    fn size(&self) -> u64 {
        self.mem.lock().unwrap().data.len() as u64
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        if self.slow_read_at == Some(offset) {
            self.slow_reads_started.fetch_add(1, Ordering::AcqRel);
            std::thread::sleep(Duration::from_millis(500));
        }
        self.track(|| {
            let mem = self.mem.lock().unwrap();
            let start = offset as usize;
            buf.copy_from_slice(&mem.data[start..start + buf.len()]);
            Ok(())
        })
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), BackendError> {
        self.track(|| {
            let mut mem = self.mem.lock().unwrap();
            let start = offset as usize;
            mem.data[start..start + data.len()].copy_from_slice(data);
            if !data.is_empty() {
                let first = (offset / CLUSTER) as usize;
                let last = ((offset + data.len() as u64 - 1) / CLUSTER) as usize;
                mem.map[first..=last].fill(State::Data);
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), BackendError> {
        if flags.fast_only && !self.zeroes_are_fast {
            return Err(BackendError::new(
                libc::ENOTSUP,
                "zeroing is not faster than writing here",
            ));
        }
        let mut mem = self.mem.lock().unwrap();
        mem.data[offset as usize..(offset + len) as usize].fill(0);
        let state = if flags.may_unmap {
            State::Hole
        } else {
            State::Zero
        };
        mem.map[Self::whole_clusters(offset, len)].fill(state);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        let mut mem = self.mem.lock().unwrap();
        let clusters = Self::whole_clusters(offset, len);
        let bytes = clusters.start * CLUSTER as usize
            ..(clusters.end * CLUSTER as usize).min(mem.data.len());
        if !clusters.is_empty() {
            mem.data[bytes].fill(0);
        }
        mem.map[clusters].fill(State::Hole);
        Ok(())
    }

    fn flush(&self) -> Result<(), BackendError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<StatusRun>, BackendError> {
        let mem = self.mem.lock().unwrap();
        let end = (offset + len).min(mem.data.len() as u64);
        let mut runs = Vec::new();
        let mut at = offset;
        while at < end {
            let next = ((at / CLUSTER + 1) * CLUSTER).min(end);
            let state = mem.map[(at / CLUSTER) as usize];
            runs.push(StatusRun {
                len: next - at,
                hole: state == State::Hole,
                zero: state != State::Data,
            });
            at = next;
        }
        Ok(runs)
    }
}

/// A server on a unix socket in a temporary directory, run by its own runtime.
pub struct TestServer {
    pub server: Server,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
    runtime: Option<tokio::runtime::Runtime>,
    serving: Option<tokio::task::JoinHandle<io::Result<()>>>,
}

impl TestServer {
    pub fn start(exports: Vec<(&str, Export)>) -> Self {
        Self::start_with(ServerConfig::default(), exports)
    }

    pub fn start_with(config: ServerConfig, exports: Vec<(&str, Export)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = Server::new(config);
        for (name, export) in exports {
            server.add_export(name, export).unwrap();
        }
        let listener = {
            let _guard = runtime.enter();
            tokio::net::UnixListener::bind(&socket).unwrap()
        };
        let serving = runtime.spawn({
            let server = server.clone();
            async move { server.serve_unix_listener(listener).await }
        });
        TestServer {
            server,
            socket,
            dir,
            runtime: Some(runtime),
            serving: Some(serving),
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Shuts the server down and waits until every connection has closed.
    pub fn stop(&mut self) {
        self.server.shutdown();
        if let (Some(runtime), Some(serving)) = (&self.runtime, self.serving.take()) {
            let done = runtime
                .block_on(async { tokio::time::timeout(Duration::from_secs(10), serving).await });
            done.expect("server did not stop within 10 s")
                .unwrap()
                .unwrap();
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.server.shutdown();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

pub fn export(backend: &Arc<MemBackend>) -> Export {
    Export::new(Arc::clone(backend) as Arc<dyn ExportBackend>)
}

/// Fails the test, clearly, if `tool` is not installed.
pub fn require_tool(tool: &str) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if !std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()) {
        let package = match tool {
            "nbdinfo" | "nbdcopy" => "libnbd-bin",
            "nbdsh" => "python3-libnbd",
            "fio" => "fio",
            _ => "qemu-utils",
        };
        panic!("required client `{tool}` is not installed: apt-get install -y {package}");
    }
}

/// Runs a client to completion (at most 120 s) and returns its output.
pub fn run(program: &str, args: &[&str]) -> Output {
    require_tool(program);
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            // SAFETY: kill(2) on the pid of our own child, which is not yet reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("{program} {args:?} did not finish within 120 s");
        }
    }
}

/// Runs a client and fails the test, with its output, unless it succeeds.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let output = run(program, args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// A client speaking the protocol by hand, to send what real clients won't.
pub struct RawClient {
    pub stream: UnixStream,
}

impl RawClient {
    /// Connects and reads the greeting, without answering it.
    pub fn greet(socket: &Path) -> Self {
        Self::greet_on(UnixStream::connect(socket).unwrap())
    }

    /// Reads the greeting on a stream already connected.
    pub fn greet_on(stream: UnixStream) -> Self {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut client = RawClient { stream };
        let greeting = client.read(18);
        assert_eq!(&greeting[0..8], &NBD_MAGIC.to_be_bytes());
        assert_eq!(&greeting[8..16], &NBD_OPTS_MAGIC.to_be_bytes());
        let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        assert_eq!(flags, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        client
    }

    /// Connects and answers the greeting as a fixed newstyle client.
    pub fn connect(socket: &Path) -> Self {
        let mut client = Self::greet(socket);
        client.send(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes());
        client
    }

    /// Connects and enters transmission on `export`; returns the client and
    /// the export's size and transmission flags.
    pub fn transmission(socket: &Path, export: &str, structured: bool) -> (Self, u64, u16) {
        let mut client = Self::connect(socket);
        if structured {
            client.option(NBD_OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(client.option_reply().1, NBD_REP_ACK);
        }
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        client.option(NBD_OPT_GO, &data);
        let (mut size, mut flags) = (None, 0);
        loop {
            let (_, kind, payload) = client.option_reply();
            match kind {
                NBD_REP_INFO if payload[0..2] == NBD_INFO_EXPORT.to_be_bytes() => {
                    size = Some(u64::from_be_bytes(payload[2..10].try_into().unwrap()));
                    flags = u16::from_be_bytes([payload[10], payload[11]]);
                }
                NBD_REP_INFO => {}
                NBD_REP_ACK => break,
                other => panic!("NBD_OPT_GO failed with reply {other:#x}"),
            }
        }
        (
            client,
            size.expect("no NBD_INFO_EXPORT before NBD_REP_ACK"),
            flags,
        )
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends bytes the server may already have hung up on.
    pub fn send_after_violation(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    pub fn read(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.stream.read_exact(&mut buf).unwrap();
        buf
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut msg = NBD_OPTS_MAGIC.to_be_bytes().to_vec();
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.send(&msg);
    }

    /// Reads one option reply: (option, reply type, payload).
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let head = self.read(20);
        assert_eq!(&head[0..8], &NBD_REP_MAGIC.to_be_bytes());
        let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        (option, kind, self.read(len as usize))
    }

    pub fn request(&mut self, kind: u16, flags: u16, handle: u64, offset: u64, len: u32) {
        let mut msg = NBD_REQUEST_MAGIC.to_be_bytes().to_vec();
        msg.extend_from_slice(&flags.to_be_bytes());
        msg.extend_from_slice(&kind.to_be_bytes());
        msg.extend_from_slice(&handle.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
        self.send(&msg);
    }

    /// Reads a simple reply header: (error, handle).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let head = self.read(16);
        assert_eq!(
            &head[0..4],
            &NBD_SIMPLE_REPLY_MAGIC.to_be_bytes(),
            "not a simple reply"
        );
        (
            u32::from_be_bytes(head[4..8].try_into().unwrap()),
            u64::from_be_bytes(head[8..16].try_into().unwrap()),
        )
    }

    /// Reads a structured reply chunk: (flags, type, handle, payload).
    pub fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let head = self.read(20);
        assert_eq!(
            &head[0..4],
            &NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes(),
            "not a structured reply"
        );
        let flags = u16::from_be_bytes([head[4], head[5]]);
        let kind = u16::from_be_bytes([head[6], head[7]]);
        let handle = u64::from_be_bytes(head[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        (flags, kind, handle, self.read(len as usize))
    }

    /// Whether the server has closed the connection (EOF or reset within 5 s).
    pub fn is_closed_by_server(&mut self) -> bool {
        let mut byte = [0; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
        }
    }
}

/// A fresh client can still enter transmission on `export` and read from it.
pub fn assert_server_still_serves(socket: &Path, export: &str) {
    let (mut client, size, _) = RawClient::transmission(socket, export, false);
    let len = size.min(4096) as u32;
    client.request(NBD_CMD_READ, 0, 7, 0, len);
    assert_eq!(client.simple_reply(), (0, 7));
    client.read(len as usize);
    client.request(NBD_CMD_DISC, 0, 8, 0, 0);
    assert!(client.is_closed_by_server());
}

/// Parses `qemu-img map --output=json` into `(start, length, data, zero)`.
pub fn parse_qemu_img_map(json: &str) -> Vec<(u64, u64, bool, bool)> {
    let field = |obj: &str, name: &str| -> String {
        let key = format!("\"{name}\":");
        let at = obj
            .find(&key)
            .unwrap_or_else(|| panic!("no {name} in {obj}"))
            + key.len();
        obj[at..]
            .trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric())
            .collect()
    };
    json.split('{')
        .skip(1)
        .map(|obj| {
            (
                field(obj, "start").parse().unwrap(),
                field(obj, "length").parse().unwrap(),
                field(obj, "data") == "true",
                field(obj, "zero") == "true",
            )
        })
        .collect()
}

/// The backend's allocation as `(start, length, data, zero)` runs, merged
/// the way QEMU reports them (HOLE means no data; ZERO means zero).
pub fn expected_map(backend: &MemBackend) -> Vec<(u64, u64, bool, bool)> {
    let mut runs: Vec<(u64, u64, bool, bool)> = Vec::new();
    for (start, len, state) in backend.runs() {
        let (data, zero) = (state != State::Hole, state != State::Data);
        match runs.last_mut() {
            Some((_, l, d, z)) if (*d, *z) == (data, zero) => *l += len,
            _ => runs.push((start, len, data, zero)),
        }
    }
    runs
}

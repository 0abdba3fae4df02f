//! The differential harness: starts `qemu-storage-daemon` or `imgstream serve` with the same
//! arguments, drives the same QMP scenario against each, and returns normalised transcripts
//! (replies, events, guest I/O output, final images) for the two to be compared.

use anyhow::{bail, Context, Result};
use imgstream_tests::qemu::QemuIoSession;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a daemon may take to start listening, and a reply or an event to arrive.
const STARTUP_LIMIT: Duration = Duration::from_secs(20);
const REPLY_LIMIT: Duration = Duration::from_secs(20);
/// Between two attempts to find the pid file (a bounded retry, not a synchronisation sleep).
const RETRY_INTERVAL: Duration = Duration::from_millis(20);

/// Which daemon runs the scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    Qsd,
    Imgstream,
}

impl Daemon {
    fn command(self) -> Result<Command> {
        Ok(match self {
            Daemon::Qsd => Command::new("qemu-storage-daemon"),
            Daemon::Imgstream => {
                let mut command = Command::new(imgstream_tests::imgstream::binary()?);
                command.arg("serve");
                command
            }
        })
    }
}

/// One step of a scenario; `$DIR` in any string stands for the scenario's folder.
pub enum Step {
    /// Runs a QMP command; its reply goes into the transcript.
    Qmp(Value),
    /// Runs a QMP command; the transcript gets `project(reply)`.
    QmpProject(Value, fn(&Value) -> Value),
    /// Waits for an event whose normalised text contains this (every event is recorded as
    /// it arrives): an event name, or `"status":"null"`.
    WaitEvent(&'static str),
    /// Guest I/O with `qemu-io` over the NBD export `name` on `$DIR/nbd.sock`.
    GuestIo(&'static str, Vec<&'static str>),
    /// What `nbdinfo` says of export `name` on `$DIR/nbd.sock`.
    NbdInfo(&'static str),
    /// Connects an NBD client (`qemu-io`, kept open) to export `name`.
    Connect(&'static str),
    /// Disconnects the clients of [`Step::Connect`]; the transcript gets their exit codes.
    Disconnect,
    /// Each client of [`Step::Connect`] reads its first sector; the transcript gets
    /// qemu-io's answer (done, or the error once the server closed the connection).
    ClientRead,
}

/// A scenario: images made by `setup`, the daemon's arguments, the steps, and the images to
/// compare at the end (path relative to the folder, format).
pub struct Scenario {
    pub name: &'static str,
    pub setup: fn(&Path) -> Result<()>,
    pub args: Vec<String>,
    pub steps: Vec<Step>,
    pub images: Vec<(&'static str, &'static str)>,
}

/// What one daemon did, normalised.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Transcript {
    pub replies: Vec<String>,
    pub events: Vec<String>,
    pub images: Vec<String>,
}

/// Kills the daemon when the run ends, whatever happened.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn subst(value: &str, dir: &Path) -> String {
    value.replace("$DIR", &dir.display().to_string())
}

fn subst_json(value: &Value, dir: &Path) -> Value {
    serde_json::from_str(&subst(&value.to_string(), dir)).expect("valid JSON stays valid")
}

/// Removes what legitimately differs between runs: the folder, timestamps, and the progress
/// of jobs still in flight.
fn normalise(value: &Value, dir: &Path) -> String {
    let mut value = value.clone();
    if let Some(object) = value.as_object_mut() {
        object.remove("timestamp");
    }
    let text = value.to_string();
    text.replace(&dir.display().to_string(), "$DIR")
}

/// Replaces the progress of a job that is not finished.
pub fn hide_progress(reply: &Value) -> Value {
    let mut reply = reply.clone();
    if let Some(jobs) = reply.as_array_mut() {
        for job in jobs {
            if let Some(job) = job.as_object_mut() {
                for key in ["offset", "current-progress", "total-progress"] {
                    if job.contains_key(key) {
                        job.insert(key.into(), json!("N"));
                    }
                }
            }
        }
    }
    reply
}

/// The fields of `query-named-block-nodes` the two daemons agree on (see `docs/qmp.md`).
pub fn node_summary(reply: &Value) -> Value {
    let nodes = reply.as_array().cloned().unwrap_or_default();
    Value::Array(
        nodes
            .iter()
            .filter(|n| !n["node-name"].as_str().unwrap_or("#").starts_with('#'))
            .map(|n| {
                json!({
                    "node-name": n["node-name"], "drv": n["drv"], "ro": n["ro"],
                    "file": n["file"], "backing_file": n["backing_file"],
                    "backing_file_depth": n["backing_file_depth"],
                    "image": {
                        "format": n["image"]["format"],
                        // A file node's size is its image file's length: how far a job
                        // got and how each implementation allocates, not compared.
                        "virtual-size": if n["drv"] == "file" { Value::Null } else { n["image"]["virtual-size"].clone() },
                        "filename": n["image"]["filename"],
                        "backing-filename": n["image"]["backing-filename"],
                        "cluster-size": n["image"]["cluster-size"],
                    },
                })
            })
            .collect(),
    )
}

struct Monitor {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Monitor {
    fn connect(path: &Path) -> Result<Monitor> {
        let stream = UnixStream::connect(path)
            .with_context(|| format!("connecting to {}", path.display()))?;
        stream.set_read_timeout(Some(REPLY_LIMIT))?;
        Ok(Monitor {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("monitor closed");
        }
        Ok(serde_json::from_str(&line)?)
    }

    fn send(&mut self, command: &Value) -> Result<()> {
        // One write per message, as QMP clients send them.
        self.writer.write_all(format!("{command}\n").as_bytes())?;
        Ok(())
    }
}

/// Runs `scenario` against `daemon` in `dir`; returns its normalised transcript.
pub fn run(daemon: Daemon, scenario: &Scenario, dir: &Path) -> Result<Transcript> {
    (scenario.setup)(dir)?;
    let pidfile = dir.join("pid");
    let qmp = dir.join("qmp.sock");
    let mut command = daemon.command()?;
    command
        .args(scenario.args.iter().map(|a| subst(a, dir)))
        .arg("--chardev")
        .arg(format!(
            "socket,id=mon0,path={},server=on,wait=off",
            qmp.display()
        ))
        .args(["--monitor", "chardev=mon0"])
        .arg("--pidfile")
        .arg(&pidfile)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = Running(command.spawn().context("starting the daemon")?);
    let started = Instant::now();
    while !pidfile.exists() {
        if let Some(status) = child.0.try_wait()? {
            let mut stderr = String::new();
            if let Some(mut err) = child.0.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
            }
            bail!("{daemon:?} exited with {status}: {stderr}");
        }
        if started.elapsed() > STARTUP_LIMIT {
            bail!("{daemon:?} did not write its pid file");
        }
        std::thread::sleep(RETRY_INTERVAL);
    }
    let result = drive(scenario, dir, &qmp, &mut child);
    if result.is_err() {
        let status = child.0.try_wait();
        let _ = child.0.kill();
        let result = result.with_context(|| format!("daemon status then: {status:?}"));
        let mut stderr = String::new();
        if let Some(mut err) = child.0.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
        }
        return result.with_context(|| format!("{daemon:?} stderr: {stderr}"));
    }
    result
}

/// The scenario's steps, `quit`, and the checks of the final images.
fn drive(scenario: &Scenario, dir: &Path, qmp: &Path, child: &mut Running) -> Result<Transcript> {
    let mut monitor = Monitor::connect(qmp)?;
    let mut transcript = Transcript::default();
    monitor.read()?; // the greeting differs by design (package name)
    monitor.send(&json!({"execute": "qmp_capabilities"}))?;
    monitor.read()?;
    let mut clients = Vec::new();
    for (index, step) in scenario.steps.iter().enumerate() {
        run_step(&mut monitor, &mut transcript, &mut clients, step, dir)
            .with_context(|| format!("step {index}"))?;
    }
    finish(monitor, transcript, scenario, dir, child)
}

fn run_step(
    monitor: &mut Monitor,
    transcript: &mut Transcript,
    clients: &mut Vec<QemuIoSession>,
    step: &Step,
    dir: &Path,
) -> Result<()> {
    let reply_of = |monitor: &mut Monitor, transcript: &mut Transcript| -> Result<Value> {
        loop {
            let message = monitor.read()?;
            if message.get("event").is_some() {
                transcript
                    .events
                    .push(normalise(&event_shape(&message), dir));
                continue;
            }
            return Ok(message);
        }
    };
    {
        match step {
            Step::Qmp(command) | Step::QmpProject(command, _) => {
                monitor.send(&subst_json(command, dir))?;
                let mut reply = reply_of(monitor, transcript)?;
                if let (Step::QmpProject(_, project), Some(ret)) = (step, reply.get("return")) {
                    reply = json!({"return": project(ret)});
                }
                transcript.replies.push(normalise(&reply, dir));
            }
            Step::WaitEvent(pattern) => {
                let seen = |t: &Transcript| t.events.iter().any(|e| e.contains(pattern));
                while !seen(transcript) {
                    let message = monitor.read().with_context(|| {
                        format!("waiting for {pattern}; events: {:?}", transcript.events)
                    })?;
                    if message.get("event").is_some() {
                        transcript
                            .events
                            .push(normalise(&event_shape(&message), dir));
                    }
                }
            }
            Step::Connect(export) => {
                let uri = format!(
                    "nbd+unix:///{export}?socket={}",
                    dir.join("nbd.sock").display()
                );
                clients.push(QemuIoSession::open(Path::new(&uri), "raw")?);
            }
            Step::ClientRead => {
                for client in clients.iter_mut() {
                    let answer =
                        client.command_answer("read 0 512", &["read 512/512", "failed"])?;
                    transcript.replies.push(format!("client: {answer}"));
                }
            }
            Step::Disconnect => {
                for client in clients.drain(..) {
                    let code = client.close_with_code()?;
                    transcript
                        .replies
                        .push(format!("client exit code: {code:?}"));
                }
            }
            Step::NbdInfo(export) => {
                let info = nbdinfo(dir, export)?;
                transcript.replies.push(normalise(&info, dir));
            }
            Step::GuestIo(export, commands) => {
                let uri = format!(
                    "nbd+unix:///{export}?socket={}",
                    dir.join("nbd.sock").display()
                );
                let mut io = Command::new("qemu-io");
                io.args(["-f", "raw"]);
                for c in commands {
                    io.arg("-c").arg(c);
                }
                let out = io.arg(&uri).output()?;
                let text: Vec<String> = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .chain(String::from_utf8_lossy(&out.stderr).lines())
                    .filter(|l| !l.contains(" ops; "))
                    .map(String::from)
                    .collect();
                let line = format!("qemu-io {}: {}", out.status.success(), text.join(" | "));
                transcript
                    .replies
                    .push(line.replace(&dir.display().to_string(), "$DIR"));
            }
        }
    }
    Ok(())
}

/// `quit`, the events up to the monitor's close, and the final images.
fn finish(
    mut monitor: Monitor,
    mut transcript: Transcript,
    scenario: &Scenario,
    dir: &Path,
    child: &mut Running,
) -> Result<Transcript> {
    monitor.send(&json!({"execute": "quit"})).with_context(|| {
        format!(
            "quit after {:?} {:?}",
            transcript.replies, transcript.events
        )
    })?;
    // Events up to the monitor's close belong to the scenario too.
    while let Ok(message) = monitor.read() {
        if message.get("event").is_some() {
            transcript
                .events
                .push(normalise(&event_shape(&message), dir));
        }
    }
    let stopped = Instant::now();
    while child.0.try_wait()?.is_none() {
        if stopped.elapsed() > STARTUP_LIMIT {
            bail!("the daemon did not exit after quit");
        }
        std::thread::sleep(RETRY_INTERVAL);
    }
    for (image, format) in &scenario.images {
        let path = dir.join(image);
        let info = Command::new("qemu-img")
            .args(["info", "--output=json", "-f", format])
            .arg(&path)
            .output()?;
        let mut info: Value = serde_json::from_slice(&info.stdout).unwrap_or(Value::Null);
        strip_actual_size(&mut info);
        transcript.images.push(normalise(&info, dir));
        let check = Command::new("qemu-img")
            .args(["check", "-f", format])
            .arg(&path)
            .output()?;
        transcript
            .images
            .push(format!("check {image}: {}", check.status.success()));
    }
    Ok(transcript)
}

/// An event without its timestamp, with the progress of a cancelled job hidden.
fn event_shape(message: &Value) -> Value {
    let mut message = message.clone();
    if message["event"] == "BLOCK_JOB_CANCELLED" {
        message["data"]["offset"] = json!("N");
    }
    message
}

/// Runs `scenario` against both daemons and fails on the first difference; also requires
/// the final images to hold the same data (`qemu-img compare`).
pub fn compare(scenario: &Scenario) -> Result<()> {
    let qsd_dir = tempfile::tempdir()?;
    let ours_dir = tempfile::tempdir()?;
    let qsd = run(Daemon::Qsd, scenario, qsd_dir.path())
        .with_context(|| format!("{}: qemu-storage-daemon", scenario.name))?;
    let ours = run(Daemon::Imgstream, scenario, ours_dir.path())
        .with_context(|| format!("{}: imgstream serve", scenario.name))?;
    let mut differences = Vec::new();
    for (what, a, b) in [
        ("reply", &qsd.replies, &ours.replies),
        ("event", &qsd.events, &ours.events),
        ("image", &qsd.images, &ours.images),
    ] {
        for i in 0..a.len().max(b.len()) {
            let (x, y) = (a.get(i), b.get(i));
            if x != y {
                // Long replies: show where they start to differ.
                let (x, y) = (
                    x.cloned().unwrap_or_default(),
                    y.cloned().unwrap_or_default(),
                );
                let common = x
                    .char_indices()
                    .zip(y.chars())
                    .find(|((_, a), b)| a != b)
                    .map_or(x.len().min(y.len()), |((i, _), _)| i);
                let from = x[..common]
                    .char_indices()
                    .rev()
                    .nth(80)
                    .map_or(0, |(i, _)| i);
                differences.push(format!(
                    "{what} {i} (from byte {from}):\n  qsd:       {}\n  imgstream: {}",
                    x.get(from..).unwrap_or_default(),
                    y.get(from..).unwrap_or_default()
                ));
            }
        }
    }
    for (image, format) in &scenario.images {
        let out = Command::new("qemu-img")
            .args(["compare", "-f", format, "-F", format])
            .arg(qsd_dir.path().join(image))
            .arg(ours_dir.path().join(image))
            .output()?;
        if !out.status.success() {
            differences.push(format!(
                "image {image} data: {}",
                String::from_utf8_lossy(&out.stdout).trim()
            ));
        }
    }
    if !differences.is_empty() {
        bail!("{}:\n{}", scenario.name, differences.join("\n"));
    }
    Ok(())
}

/// `qemu-img create` in `dir`.
pub fn create(
    dir: &Path,
    name: &str,
    format: &str,
    size: &str,
    backing: Option<(&str, &str)>,
) -> Result<PathBuf> {
    let path = dir.join(name);
    let mut command = Command::new("qemu-img");
    command.args(["create", "-q", "-f", format]);
    if let Some((file, fmt)) = backing {
        command.args(["-b", file, "-F", fmt]);
    }
    let out = command.arg(&path).arg(size).output()?;
    if !out.status.success() {
        bail!("qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(path)
}

/// `qemu-io -c "write -P pattern offset len"` on an image in `dir`.
pub fn write(
    dir: &Path,
    name: &str,
    format: &str,
    pattern: u8,
    offset: &str,
    len: &str,
) -> Result<()> {
    let out = Command::new("qemu-io")
        .args([
            "-f",
            format,
            "-c",
            &format!("write -P {pattern} {offset} {len}"),
        ])
        .arg(dir.join(name))
        .output()?;
    if !out.status.success() {
        bail!("qemu-io: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// `actual-size` depends on how each implementation allocates: not compared.
fn strip_actual_size(value: &mut Value) {
    match value {
        Value::Object(object) => {
            object.remove("actual-size");
            object.values_mut().for_each(strip_actual_size);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_actual_size),
        _ => {}
    }
}

/// Starts both daemons with `args` (which must make them fail at startup) and requires the
/// same exit code and the same message after the program's name.
pub fn compare_startup_error(args: &[&str]) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut results = Vec::new();
    for daemon in [Daemon::Qsd, Daemon::Imgstream] {
        let args: Vec<String> = args.iter().map(|a| subst(a, dir.path())).collect();
        let out = daemon
            .command()?
            .args(&args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let message = stderr
            .lines()
            .next()
            .unwrap_or_default()
            .split_once(": ")
            .map(|(_, rest)| rest.to_string())
            .unwrap_or_default();
        results.push((
            out.status.code(),
            normalise(&Value::String(message), dir.path()),
        ));
    }
    if results[0] != results[1] {
        bail!(
            "{args:?}:\n  qsd:       {:?}\n  imgstream: {:?}",
            results[0],
            results[1]
        );
    }
    Ok(())
}

/// `nbdinfo --json` on export `name` of `$DIR/nbd.sock`: the fields both servers must agree on.
pub fn nbdinfo(dir: &Path, name: &str) -> Result<Value> {
    let uri = format!(
        "nbd+unix:///{name}?socket={}",
        dir.join("nbd.sock").display()
    );
    let out = Command::new("nbdinfo").args(["--json", &uri]).output()?;
    if !out.status.success() {
        bail!("nbdinfo: {}", String::from_utf8_lossy(&out.stderr));
    }
    let info: Value = serde_json::from_slice(&out.stdout)?;
    let export = &info["exports"][0];
    Ok(json!({
        "export-name": export["export-name"],
        "export-size": export["export-size"],
        "is_read_only": export["is_read_only"],
        "can_flush": export["can_flush"],
        "can_trim": export["can_trim"],
        "can_zero": export["can_zero"],
        "contexts": export["contexts"],
    }))
}

/// Starts `daemon` with `--daemonize`: the launcher must exit 0 once the daemon listens; the
/// daemon then answers QMP and exits on `quit`. The daemon is killed if anything fails.
pub fn daemonized_session(daemon: Daemon) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pidfile = dir.path().join("pid");
    let qmp = dir.path().join("qmp.sock");
    let status = daemon
        .command()?
        .arg("--chardev")
        .arg(format!(
            "socket,id=m,path={},server=on,wait=off",
            qmp.display()
        ))
        .args(["--monitor", "chardev=m", "--daemonize", "--pidfile"])
        .arg(&pidfile)
        .stdin(Stdio::null())
        .status()?;
    let pid = std::fs::read_to_string(&pidfile).unwrap_or_default();
    let pid = pid.trim().to_string();
    // Kills the daemonized process however this ends.
    struct Pid(String);
    impl Drop for Pid {
        fn drop(&mut self) {
            if !self.0.is_empty() && Path::new(&format!("/proc/{}", self.0)).exists() {
                let _ = Command::new("kill").args(["-9", &self.0]).status();
            }
        }
    }
    let guard = Pid(pid.clone());
    if !status.success() || pid.is_empty() {
        bail!("{daemon:?}: launcher exited with {status}, pid file '{pid}'");
    }
    let mut monitor = Monitor::connect(&qmp)?;
    monitor.read()?;
    monitor.send(&json!({"execute": "qmp_capabilities"}))?;
    monitor.read()?;
    monitor.send(&json!({"execute": "query-block-exports"}))?;
    let reply = monitor.read()?;
    if reply != json!({"return": []}) {
        bail!("{daemon:?}: {reply}");
    }
    monitor.send(&json!({"execute": "quit"}))?;
    while monitor.read().is_ok() {}
    let stopped = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        if stopped.elapsed() > STARTUP_LIMIT {
            bail!("{daemon:?} did not exit after quit");
        }
        std::thread::sleep(RETRY_INTERVAL);
    }
    drop(guard);
    Ok(())
}

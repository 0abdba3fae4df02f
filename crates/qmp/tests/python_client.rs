//! Drives a whole stream in the real `imgstream serve` with QEMU's own Python QMP library
//! (`qemu.qmp`, from PyPI): the proof that a client written for QEMU works unchanged, events
//! included. The job runs with auto-finalize and auto-dismiss off, so the client walks it
//! through every state QEMU has, checking `query-block-jobs` and `query-jobs` in each. Then
//! qemu-img checks the image: no backing file left, consistent, the same content as before.
//!
//! The conversation asserted, message by message, is qemu-storage-daemon's (QEMU 10.0.2), seen
//! by running this same script against it with the same chain as nodes `top` <- `mid` <-
//! `base`:
//! - `block-stream` is answered after `JOB_STATUS_CHANGE` created and running;
//! - without auto-finalize the job goes waiting, pending, then sends `BLOCK_JOB_PENDING`;
//! - `job-finalize` is answered after `BLOCK_JOB_COMPLETED` and then `JOB_STATUS_CHANGE`
//!   concluded, and `job-dismiss` after `JOB_STATUS_CHANGE` null;
//! - a concluded job is still listed by both queries (status `concluded`), a dismissed one by
//!   neither.
//!
//! Not asserted: where the reply to `block-job-set-speed` falls among the last events (QSD
//! answered before `waiting`, its job runs on the same thread as its monitor; ours runs on its
//! own and may get there first), and, while the job runs, its progress and `busy` (QSD's
//! `query-block-jobs` had `busy` true and `offset` 0 where the `query-jobs` right after it had
//! `current-progress` 524288).

mod common;

use common::{make_chain, BaseKind, MIB};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The chain's virtual size (`make_chain`).
const LEN: u64 = 64 * MIB;

/// The client. It prints one JSON object: the queries made in each state, and `wire`, every
/// message in the order it crossed the socket (commands sent, replies, events without their
/// timestamps), recorded through the hooks the library provides for subclasses
/// (`_cb_outbound`, `_cb_inbound`).
const CLIENT: &str = r#"
import asyncio, json, sys
from qemu.qmp import EventListener, QMPClient

# A guard against a hang, not a timing: every wait ends on an event the job must send.
GUARD = 120

class Recording(QMPClient):
    def __init__(self, name):
        super().__init__(name)
        self.wire = []
        self.commands = {}

    def _cb_outbound(self, msg):
        self.commands[msg.get('id')] = msg['execute']
        self.wire.append({'sent': msg['execute']})
        return super()._cb_outbound(msg)

    def _cb_inbound(self, msg):
        if 'QMP' in msg:
            self.wire.append({'greeting': msg['QMP']['capabilities']})
        elif 'event' in msg:
            self.wire.append({'event': msg['event'], 'data': msg['data']})
        else:
            self.wire.append({'reply': self.commands.get(msg.get('id')),
                              'return': msg.get('return', msg.get('error'))})
        return super()._cb_inbound(msg)

async def main(path, device):
    qmp = Recording('imgstream-test')
    await qmp.connect(path)
    listener = EventListener()
    out = {}

    async def seen(name, status=None):
        def match(event):
            return event['event'] == name and (
                status is None or event['data'].get('status') == status)
        while not any(match(e) for e in listener.history):
            await asyncio.wait_for(listener.get(), GUARD)

    async def queries(state):
        out[state] = {'query-block-jobs': await qmp.execute('query-block-jobs'),
                      'query-jobs': await qmp.execute('query-jobs')}

    with qmp.listen(listener):
        # 1 byte/s: the job copies its first chunk and waits, so that it is seen running.
        await qmp.execute('block-stream', {
            'device': device, 'job-id': 'py', 'speed': 1,
            'auto-finalize': False, 'auto-dismiss': False})
        await seen('JOB_STATUS_CHANGE', 'running')
        await queries('running')
        await qmp.execute('block-job-set-speed', {'device': 'py', 'speed': 0})
        await seen('BLOCK_JOB_PENDING')
        await queries('pending')
        await qmp.execute('job-finalize', {'id': 'py'})
        await seen('JOB_STATUS_CHANGE', 'concluded')
        await queries('concluded')
        await qmp.execute('job-dismiss', {'id': 'py'})
        await seen('JOB_STATUS_CHANGE', 'null')
        await queries('dismissed')
    await qmp.disconnect()
    out['wire'] = qmp.wire
    print(json.dumps(out))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"#;

/// How often and how long to look for the daemon's pid file (10 s in all).
const READY_POLL: Duration = Duration::from_millis(10);
const READY_TRIES: u32 = 1000;

/// The binary under test: `$IMGSTREAM_BIN`, else `<target>/debug/imgstream`, where `<target>`
/// is `$CARGO_TARGET_DIR` (relative to the workspace) or the workspace's `target`, as the
/// integration tests in `tests/` find it.
fn imgstream_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("IMGSTREAM_BIN").filter(|b| !b.is_empty()) {
        return PathBuf::from(bin);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = match std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => workspace.join(dir),
        None => workspace.join("target"),
    };
    target.join("debug").join("imgstream")
}

/// `imgstream serve` as a child process, killed if the test fails before it stops it.
struct Serve {
    child: Option<Child>,
    stderr: PathBuf,
}

impl Serve {
    /// `imgstream serve --qmp QMP --pid-file PID top=top.qcow2`, once its sockets listen.
    fn start(dir: &Path, qmp: &Path) -> Serve {
        let binary = imgstream_binary();
        assert!(
            binary.is_file(),
            "imgstream binary not found at {}: run `cargo build -p imgstream` first",
            binary.display()
        );
        let pid_file = dir.join("serve.pid");
        let stderr = dir.join("serve.stderr");
        let child = Command::new(&binary)
            .arg("serve")
            .arg("--qmp")
            .arg(qmp)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(format!("top={}", dir.join("top.qcow2").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start imgstream serve");
        let mut serve = Serve {
            child: Some(child),
            stderr,
        };
        // The pid file is written once every socket listens.
        for _ in 0..READY_TRIES {
            if std::fs::read_to_string(&pid_file).is_ok_and(|t| t.ends_with('\n')) {
                return serve;
            }
            if let Some(status) = serve.child().try_wait().expect("try_wait") {
                panic!("imgstream serve exited with {status}:\n{}", serve.stderr());
            }
            std::thread::sleep(READY_POLL);
        }
        panic!(
            "imgstream serve never wrote its pid file:\n{}",
            serve.stderr()
        );
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("the daemon runs")
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGTERM; the daemon must exit 0.
    fn stop(mut self) {
        let pid = self.child().id().to_string();
        let kill = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(kill.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        let status = self.child().wait().expect("wait for imgstream serve");
        self.child = None;
        assert!(
            status.success(),
            "imgstream serve exited with {status} on SIGTERM:\n{}",
            self.stderr()
        );
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img")
}

fn qemu_qmp_installed() -> bool {
    Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .status()
        .is_ok_and(|s| s.success())
}

/// `query-block-jobs` of the one job in `status`, all of QEMU's keys. The running job's
/// offset is only bounded, and `busy` is left out: QSD's reply had it true while the job
/// waited on its speed limit.
fn check_block_job(reply: &Value, status: &str, speed: u64) {
    let jobs = reply.as_array().expect("query-block-jobs: a list");
    assert_eq!(jobs.len(), 1, "{reply}");
    let mut job = jobs[0].clone();
    let busy = job
        .as_object_mut()
        .and_then(|j| j.remove("busy"))
        .expect("busy");
    assert!(busy.is_boolean(), "{reply}");
    let offset = job["offset"].as_u64().expect("offset");
    if status == "running" {
        assert!(offset <= LEN, "{reply}");
    } else {
        assert_eq!(offset, LEN, "{reply}");
    }
    job["offset"] = json!(offset);
    assert_eq!(
        job,
        json!({
            "auto-finalize": false, "io-status": "ok", "device": "py", "auto-dismiss": false,
            "len": LEN, "offset": offset, "status": status, "paused": false, "speed": speed,
            "ready": false, "type": "stream"
        }),
        "query-block-jobs while {status}"
    );
}

/// `query-jobs` of the one job in `status`.
fn check_job(reply: &Value, status: &str) {
    let jobs = reply.as_array().expect("query-jobs: a list");
    assert_eq!(jobs.len(), 1, "{reply}");
    let current = jobs[0]["current-progress"].as_u64().expect("progress");
    if status == "running" {
        assert!(current <= LEN, "{reply}");
    } else {
        assert_eq!(current, LEN, "{reply}");
    }
    assert_eq!(
        jobs[0],
        json!({
            "current-progress": current, "status": status, "total-progress": LEN,
            "type": "stream", "id": "py"
        }),
        "query-jobs while {status}"
    );
}

#[test]
fn qemu_python_library_walks_a_stream_through_every_job_state() {
    assert!(
        qemu_qmp_installed(),
        "QEMU's Python QMP library is missing: run `pip install qemu.qmp` first"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    make_chain(dir.path(), BaseKind::Qcow2);
    let top = dir.path().join("top.qcow2");
    let before = dir.path().join("before.raw");
    let converted = qemu_img(&[
        "convert",
        "-O",
        "raw",
        top.to_str().expect("utf-8 path"),
        before.to_str().expect("utf-8 path"),
    ]);
    assert!(converted.status.success(), "{converted:?}");

    let qmp = dir.path().join("qmp.sock");
    let serve = Serve::start(dir.path(), &qmp);
    let output = Command::new("python3")
        .args(["-c", CLIENT])
        .arg(&qmp)
        .arg("top")
        .output()
        .expect("run python3");
    assert!(
        output.status.success(),
        "python client failed:\n{}{}\ndaemon:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        serve.stderr()
    );
    let out: Value = serde_json::from_slice(&output.stdout).expect("the client's JSON");

    // The whole conversation but the queries, whose replies are checked below, and the reply
    // to block-job-set-speed, which races the job's last events (it is no longer held back).
    let wire = out["wire"].as_array().expect("wire");
    let is_query = |m: &&Value| {
        ["sent", "reply"]
            .iter()
            .any(|k| m[*k].as_str().is_some_and(|c| c.starts_with("query-")))
    };
    let set_speed_reply = json!({"reply": "block-job-set-speed", "return": {}});
    assert_eq!(
        wire.iter().filter(|m| **m == set_speed_reply).count(),
        1,
        "{out}"
    );
    let conversation: Vec<&Value> = wire
        .iter()
        .filter(|m| !is_query(m) && **m != set_speed_reply)
        .collect();
    let sent = |command: &str| json!({"sent": command});
    let reply = |command: &str| json!({"reply": command, "return": {}});
    let event = |name: &str, data: Value| json!({"event": name, "data": data});
    let status = |status: &str| event("JOB_STATUS_CHANGE", json!({"status": status, "id": "py"}));
    let expected = [
        json!({"greeting": ["oob"]}),
        sent("qmp_capabilities"),
        reply("qmp_capabilities"),
        sent("block-stream"),
        status("created"),
        status("running"),
        reply("block-stream"),
        sent("block-job-set-speed"),
        status("waiting"),
        status("pending"),
        event("BLOCK_JOB_PENDING", json!({"type": "stream", "id": "py"})),
        sent("job-finalize"),
        event(
            "BLOCK_JOB_COMPLETED",
            json!({"device": "py", "len": LEN, "offset": LEN, "speed": 0, "type": "stream"}),
        ),
        status("concluded"),
        reply("job-finalize"),
        sent("job-dismiss"),
        status("null"),
        reply("job-dismiss"),
    ];
    let expected: Vec<&Value> = expected.iter().collect();
    assert_eq!(conversation, expected, "{out}");

    check_block_job(&out["running"]["query-block-jobs"], "running", 1);
    check_job(&out["running"]["query-jobs"], "running");
    check_block_job(&out["pending"]["query-block-jobs"], "pending", 0);
    check_job(&out["pending"]["query-jobs"], "pending");
    check_block_job(&out["concluded"]["query-block-jobs"], "concluded", 0);
    check_job(&out["concluded"]["query-jobs"], "concluded");
    assert_eq!(
        out["dismissed"],
        json!({"query-block-jobs": [], "query-jobs": []}),
        "{out}"
    );

    serve.stop();
    let top = top.to_str().expect("utf-8 path");
    let info = qemu_img(&["info", "--output=json", top]);
    let info: Value = serde_json::from_slice(&info.stdout).expect("info json");
    assert!(info.get("backing-filename").is_none(), "{info}");
    assert_eq!(info["virtual-size"], LEN);
    let check = qemu_img(&["check", top]);
    assert!(
        check.status.success() && String::from_utf8_lossy(&check.stdout).contains("No errors"),
        "{check:?}"
    );
    let compare = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        before.to_str().expect("utf-8 path"),
        top,
    ]);
    assert!(
        compare.status.success(),
        "the streamed image differs from the chain before:\n{}",
        String::from_utf8_lossy(&compare.stdout)
    );
}

//! Replays the client side of QSD 10.0.2's recorded QMP transcripts
//! (copied from the workplace's `shared/reference/qsd-transcripts/` into
//! `tests/qsd-transcripts/`, so that a fresh clone has them) against our daemon serving the
//! same chain with the same nodes (`daemon_as_qsd`), and compares: every reply (keys, types,
//! error classes and texts, and every value but those [`VOLATILE`] lists, paths as names in
//! the scenario folder) and each job's event sequence (names and payloads; byte offsets of
//! unfinished jobs and timestamps aside), including events QSD never sent: for a job it never
//! had, or after its last one (read up to the reply to a final request). Before each request
//! the replay waits for the events QSD had sent before it (before a query, also those QSD
//! sent before answering it), so job states line up. The `comparator_*` tests check that the
//! comparison does report such differences.
//!
//! The error-policy transcripts `D_*` are replayed with their errors made for real
//! ([`Fault`]): EIO on mid's first data read, and ENOSPC from a full tmpfs under the images
//! (needs root); there the progress at each error is compared too.
//!
//! Transcripts not replayed, and why:
//! - `H`: filter nodes in the graph and parallel `bottom` jobs in one 5-image chain (we
//!   stream only into the top of a disk).
//! - `I`: read-only and auto-read-only nodes opened with `blockdev-add` options.
//! - `R`, `S`, `SB`, `V2`: other chains (256 MiB, 1 MiB raw backing, qcow2 v2) with NBD I/O;
//!   their QMP side is covered by the ones replayed here.
//! - `hmp`, `schema`: QSD has no HMP; we do not implement `query-qmp-schema`.
//!
//! `B_device_mid` (stream into an intermediate image) is a documented difference: it gets
//! our error, checked in `stream_into_intermediate_node_is_refused`.

mod common;

use common::{
    daemon_as_qsd, daemon_for, is_event, make_chain, make_chain_with, serve, BackingNames,
    BaseKind, Client,
};
use imgstream_block::chain::open_layer;
use imgstream_block::{Disk, FormatKind, Layer};
use imgstream_format::{open_format, FileStorage, Storage};
use imgstream_qmp::Daemon;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the reference transcripts are: `$IMGSTREAM_TRANSCRIPTS`, else the copy in the
/// repository.
fn transcripts_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("IMGSTREAM_TRANSCRIPTS") {
        return dir.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qsd-transcripts")
}
const WAIT: Duration = Duration::from_secs(30);

/// Replies QSD sent after its recording stopped, by transcript: `exp1.log` ends with the
/// reply that `[1,2]` completed for `not json`, not with the one to `[1,2]` itself (QSD's,
/// as `tests/wire_quirks.rs` checks for such input).
const UNRECORDED_REPLIES: &[(&str, &str)] = &[(
    "exp1.log",
    r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#,
)];

/// One request and what QSD sent until the next request.
#[derive(Debug, Default)]
struct Window {
    request: String,
    replies: Vec<Value>,
    events: Vec<Value>,
    /// How many of `events` QSD sent before its first reply.
    events_before_reply: usize,
}

/// A connection's worth of transcript.
type Session = Vec<Window>;

fn read_transcript(name: &str) -> String {
    let path = transcripts_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (the reference transcripts are needed)",
            path.display()
        )
    })
}

fn parse_transcript(text: &str) -> Vec<Session> {
    let mut sessions: Vec<Session> = Vec::new();
    for line in text.lines() {
        if let Some(request) = line.strip_prefix("-> ") {
            let session = sessions.last_mut().expect("request before greeting");
            session.push(Window {
                request: request.to_string(),
                ..Window::default()
            });
        } else if let Some(message) = line.strip_prefix("<- ") {
            let Ok(message) = serde_json::from_str::<Value>(message) else {
                continue;
            };
            if message.get("QMP").is_some() {
                sessions.push(Vec::new());
                continue;
            }
            let Some(window) = sessions.last_mut().and_then(|s| s.last_mut()) else {
                continue;
            };
            if is_event(&message) {
                window.events.push(message);
                if window.replies.is_empty() {
                    window.events_before_reply = window.events.len();
                }
            } else {
                window.replies.push(message);
            }
        }
    }
    for session in &mut sessions {
        for window in session.iter_mut() {
            drop_internal_drains(window);
        }
    }
    sessions
}

/// QEMU drains the graph inside some commands, which shows as `paused` then `running` of a
/// job within one request; we have no such drains (docs/qmp.md), so those pairs go.
fn drop_internal_drains(window: &mut Window) {
    loop {
        let status = |e: &Value| {
            (e["event"] == "JOB_STATUS_CHANGE").then(|| {
                (
                    e["data"]["id"].as_str().unwrap_or("").to_string(),
                    e["data"]["status"].as_str().unwrap_or("").to_string(),
                )
            })
        };
        let mut found = None;
        'outer: for (i, e) in window.events.iter().enumerate() {
            if let Some((id, s)) = status(e) {
                if s != "paused" {
                    continue;
                }
                for (j, later) in window.events.iter().enumerate().skip(i + 1) {
                    if let Some((id2, s2)) = status(later) {
                        if id2 == id {
                            if s2 == "running" {
                                found = Some((i, j));
                            }
                            continue 'outer;
                        }
                    }
                }
            }
        }
        match found {
            Some((i, j)) => {
                let before = window.events_before_reply;
                window.events_before_reply -= usize::from(j < before) + usize::from(i < before);
                window.events.remove(j);
                window.events.remove(i);
            }
            None => return,
        }
    }
}

fn job_of(event: &Value) -> String {
    let data = &event["data"];
    data.get("id")
        .or_else(|| data.get("device"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

/// Keys whose values are compared only by type, each for a reason that holds by design:
/// - `offset`, `current-progress`: how far an unfinished job got when asked (timing);
/// - `busy`: whether the job was inside a chunk at that moment (timing);
/// - `package`: the build's name (`Debian 1:10.0.2+ds-2...` against `imgstream 0.1.0`);
/// - `actual-size`: host allocation, which depends on the file system and on how each
///   daemon preallocates and writes back.
///
/// Everything else is compared exactly, paths as names inside the scenario folder
/// ([`Replay::in_scenario`]), except a file node's `virtual-size` ([`FILE_SIZE`]).
const VOLATILE: &[&str] = &[
    "offset",
    "current-progress",
    "busy",
    "package",
    "actual-size",
];

/// A `file` node's `virtual-size` is its file's length, which depends on where each daemon
/// put its clusters and on the room it reserved (docs/qmp.md; `tests/qsd_diff.rs` does not
/// compare it either). A format node's is compared.
const FILE_SIZE: &str = "virtual-size";

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn compare(expected: &Value, actual: &Value, path: &str, volatile: &[&str], out: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            let ek: Vec<&String> = e.keys().collect();
            let ak: Vec<&String> = a.keys().collect();
            let mut es = ek.clone();
            let mut as_ = ak.clone();
            es.sort();
            as_.sort();
            if es != as_ {
                out.push(format!("{path}: keys {ek:?} != {ak:?}"));
                return;
            }
            let file_node_image = e.get("format") == Some(&Value::from("file"));
            for (key, value) in e {
                let sub = format!("{path}.{key}");
                if volatile.contains(&key.as_str()) || (file_node_image && key == FILE_SIZE) {
                    if kind(value) != kind(&a[key]) {
                        out.push(format!("{sub}: type {} != {}", kind(value), kind(&a[key])));
                    }
                } else {
                    compare(value, &a[key], &sub, volatile, out);
                }
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            // Node lists: QSD has protocol (`-file`) nodes we do not; compare shared names.
            if e.iter().any(|n| n.get("node-name").is_some()) {
                for node in a {
                    let name = &node["node-name"];
                    if let Some(theirs) = e.iter().find(|n| &n["node-name"] == name) {
                        compare(theirs, node, &format!("{path}[{name}]"), volatile, out);
                    }
                }
                return;
            }
            if e.len() != a.len() {
                out.push(format!("{path}: {} items != {}", e.len(), a.len()));
                return;
            }
            for (i, (x, y)) in e.iter().zip(a).enumerate() {
                compare(x, y, &format!("{path}[{i}]"), volatile, out);
            }
        }
        _ if expected != actual => out.push(format!("{path}: {expected} != {actual}")),
        _ => {}
    }
}

/// Event payloads: offsets are compared only where QSD's job had finished (offset == len).
fn compare_event(expected: &Value, actual: &Value, volatile: &[&str], out: &mut Vec<String>) {
    let mut e = expected.clone();
    let mut a = actual.clone();
    for v in [&mut e, &mut a] {
        if let Some(obj) = v.as_object_mut() {
            obj.remove("timestamp");
        }
    }
    let finished = e["data"].get("offset").is_some() && e["data"]["offset"] == e["data"]["len"];
    if finished {
        if let Some(data) = e["data"].as_object_mut() {
            let offset = data.get("offset").cloned().unwrap_or(Value::Null);
            data.insert("offset-final".into(), offset);
        }
        if let Some(data) = a["data"].as_object_mut() {
            let offset = data.get("offset").cloned().unwrap_or(Value::Null);
            data.insert("offset-final".into(), offset);
        }
    }
    compare(&e, &a, &format!("{}", expected["event"]), volatile, out);
}

struct Replay<'a> {
    dir: &'a Path,
    name: &'a str,
    /// Keys compared only by type ([`VOLATILE`] unless the scenario pins them down).
    volatile: &'a [&'a str],
    /// Called with each request before it is sent (to change the world as QSD's recording
    /// did at that point).
    before_request: &'a (dyn Fn(&str) + Sync),
    mismatches: Vec<String>,
}

impl Replay<'_> {
    /// `value` with paths as names inside the scenario folder: QSD ran in its folder and
    /// named files relative to it, or as `/scratch/NAME/...` where a request gave a full path;
    /// ours are under `self.dir`. `ours` says which side `value` comes from.
    fn in_scenario(&self, value: &Value, ours: bool) -> Value {
        let prefixes = if ours {
            vec![format!("{}/", self.dir.display())]
        } else {
            vec![
                format!(
                    "/scratch/{}/",
                    self.name.trim_end_matches(".log").trim_end_matches("-qmp")
                ),
                "/scratch/".to_string(),
            ]
        };
        match value {
            Value::String(text) => {
                Value::String(prefixes.iter().fold(text.clone(), |text, prefix| {
                    text.replace(prefix.as_str(), "")
                }))
            }
            Value::Array(items) => {
                Value::Array(items.iter().map(|v| self.in_scenario(v, ours)).collect())
            }
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), self.in_scenario(v, ours)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    fn substitute(&self, request: &str) -> String {
        let dir = format!("{}/", self.dir.display());
        let abs = format!(
            "/scratch/{}/",
            self.name.trim_end_matches(".log").trim_end_matches("-qmp")
        );
        request.replace(&abs, &dir).replace("/scratch/", &dir)
    }

    async fn session(&mut self, path: &Path, session: &Session) {
        let (mut client, _) = Client::connect(path).await;
        let mut ours: HashMap<String, Vec<Value>> = HashMap::new();
        let mut theirs: HashMap<String, Vec<Value>> = HashMap::new();
        let mut order = Vec::new();
        for (i, window) in session.iter().enumerate() {
            // A query changes nothing: the events QSD sent before answering it happened on
            // their own (a job reaching its pause point after an error, say), and asking
            // before ours has them would compare a state QSD was not in.
            let is_query = serde_json::from_str::<Value>(&window.request).is_ok_and(|r| {
                r["execute"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("query-"))
            });
            let (before_reply, after_reply) = if is_query {
                window.events.split_at(window.events_before_reply)
            } else {
                (&[][..], &window.events[..])
            };
            for event in before_reply {
                let job = job_of(event);
                if !order.contains(&job) {
                    order.push(job.clone());
                }
                theirs.entry(job).or_default().push(event.clone());
            }
            // Wait until we have sent every event QSD had sent before this request.
            self.collect_events(&mut client, &mut ours, &theirs).await;
            let request = self.substitute(&window.request);
            (self.before_request)(&request);
            client.send_raw(request.as_bytes()).await;
            let mut replies = Vec::new();
            let deadline = Instant::now() + WAIT;
            while replies.len() < window.replies.len() && Instant::now() < deadline {
                match client.next(deadline - Instant::now()).await {
                    Some(m) if is_event(&m) => ours.entry(job_of(&m)).or_default().push(m),
                    Some(m) => replies.push(m),
                    None => break,
                }
            }
            for (n, expected) in window.replies.iter().enumerate() {
                let label = format!("{} request {i} {}", self.name, window.request);
                match replies.get(n) {
                    Some(actual) => {
                        let mut out = Vec::new();
                        compare(
                            &self.in_scenario(expected, false),
                            &self.in_scenario(actual, true),
                            "reply",
                            self.volatile,
                            &mut out,
                        );
                        self.mismatches
                            .extend(out.into_iter().map(|m| format!("{label}: {m}")));
                    }
                    None => self.mismatches.push(format!("{label}: no reply")),
                }
            }
            for event in after_reply {
                let job = job_of(event);
                if !order.contains(&job) {
                    order.push(job.clone());
                }
                theirs.entry(job).or_default().push(event.clone());
            }
        }
        self.collect_events(&mut client, &mut ours, &theirs).await;
        self.sync(&mut client, &mut ours).await;
        // Events for a job QSD never had (say, one it refused to create) are differences too.
        let mut extra: Vec<&String> = ours
            .keys()
            .filter(|job| !theirs.contains_key(*job))
            .collect();
        extra.sort();
        for job in extra {
            order.push(job.clone());
        }
        let names = |list: &[Value]| -> Vec<String> {
            list.iter()
                .map(|e| {
                    let status = e["data"]["status"].as_str().unwrap_or("");
                    format!("{}{}", e["event"].as_str().unwrap_or(""), status)
                })
                .collect()
        };
        for job in order {
            let expected = theirs.get(&job).cloned().unwrap_or_default();
            let actual = ours.get(&job).cloned().unwrap_or_default();
            if expected.len() != actual.len() {
                self.mismatches.push(format!(
                    "{}: job {job}: events {:?} != {:?}",
                    self.name,
                    names(&expected),
                    names(&actual)
                ));
                continue;
            }
            for (e, a) in expected.iter().zip(&actual) {
                let mut out = Vec::new();
                compare_event(
                    &self.in_scenario(e, false),
                    &self.in_scenario(a, true),
                    self.volatile,
                    &mut out,
                );
                self.mismatches.extend(
                    out.into_iter()
                        .map(|m| format!("{}: job {job}: {m}", self.name)),
                );
            }
        }
        cleanup_jobs(&mut client).await;
    }

    /// Reads everything our daemon sent before answering one more request: it sends the
    /// events that happened before a request ahead of its reply, so any event beyond QSD's
    /// (after its last expected one, or for a job it never had) is seen without waiting for
    /// a time. A reply QSD's recording does not have is a difference, unless the recording
    /// stopped before it ([`UNRECORDED_REPLIES`]).
    async fn sync(&mut self, client: &mut Client, ours: &mut HashMap<String, Vec<Value>>) {
        client
            .send_raw(br#"{"execute": "query-jobs", "id": "sync"}"#)
            .await;
        let mut unrecorded = UNRECORDED_REPLIES
            .iter()
            .filter(|(name, _)| *name == self.name)
            .map(|(_, reply)| serde_json::from_str::<Value>(reply).expect("JSON"));
        loop {
            match client.next(WAIT).await {
                Some(m) if is_event(&m) => ours.entry(job_of(&m)).or_default().push(m),
                Some(m) if m["id"] == "sync" => return,
                Some(m) if unrecorded.next().as_ref() == Some(&m) => {}
                Some(m) => self
                    .mismatches
                    .push(format!("{}: a reply QSD did not send: {m}", self.name)),
                None => panic!("{}: no reply to the final query-jobs", self.name),
            }
        }
    }

    /// Reads events until each job has as many as QSD had sent so far.
    async fn collect_events(
        &self,
        client: &mut Client,
        ours: &mut HashMap<String, Vec<Value>>,
        theirs: &HashMap<String, Vec<Value>>,
    ) {
        let deadline = Instant::now() + WAIT;
        loop {
            let behind = theirs
                .iter()
                .any(|(job, list)| ours.get(job).map_or(0, Vec::len) < list.len());
            if !behind || Instant::now() >= deadline {
                return;
            }
            match client.next(deadline - Instant::now()).await {
                Some(m) if is_event(&m) => ours.entry(job_of(&m)).or_default().push(m),
                Some(m) => panic!("{}: unexpected reply {m}", self.name),
                None => return,
            }
        }
    }
}

/// Ends whatever jobs a transcript left running (QSD was restarted between sessions).
async fn cleanup_jobs(client: &mut Client) {
    for _ in 0..100 {
        client
            .send_raw(br#"{"execute": "query-jobs", "id": "cleanup"}"#)
            .await;
        let jobs = loop {
            match client.next(WAIT).await {
                Some(m) if m["id"] == "cleanup" => break m["return"].clone(),
                Some(_) => continue,
                None => return,
            }
        };
        let Some(jobs) = jobs.as_array().filter(|j| !j.is_empty()) else {
            return;
        };
        for job in jobs {
            let verb = if job["status"] == "concluded" {
                "job-dismiss"
            } else {
                "job-cancel"
            };
            let request = json!({"execute": verb, "arguments": {"id": job["id"]}});
            client.send_raw(request.to_string().as_bytes()).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a transcript's sessions ran on the images the previous one left (a restart
/// experiment) or each on new images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Images {
    Fresh,
    Kept,
}

async fn replay(name: &str, base: BaseKind, images: Images) {
    let mismatches = replay_text(name, &read_transcript(name), base, images).await;
    assert!(
        mismatches.is_empty(),
        "{} differences from QSD:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

/// Replays transcript `text` (named `name`); returns the differences.
async fn replay_text(name: &str, text: &str, base: BaseKind, images: Images) -> Vec<String> {
    let sessions = parse_transcript(text);
    let mut mismatches = Vec::new();
    // Nodes as QSD's were (`daemon_as_qsd`) over a chain whose headers name each backing
    // file as its node was opened (QSD: by relative name, in the images' folder; we cannot
    // change folder, so by absolute path): QEMU's rules that compare the two (`json:`
    // filenames, `base` lookup) then meet the same case.
    let mut dir = tempfile::tempdir().expect("tempdir");
    make_chain_with(dir.path(), base, BackingNames::Absolute);
    for (n, session) in sessions.iter().enumerate() {
        if n > 0 && images == Images::Fresh {
            dir = tempfile::tempdir().expect("tempdir");
            make_chain_with(dir.path(), base, BackingNames::Absolute);
        }
        let mut replay = Replay {
            dir: dir.path(),
            name,
            volatile: VOLATILE,
            before_request: &|_| {},
            mismatches: Vec::new(),
        };
        // A daemon per session: QSD was restarted between them.
        let daemon = daemon_as_qsd(dir.path());
        let (path, stop, handle) = serve(&daemon, dir.path()).await;
        replay.session(&path, session).await;
        mismatches.append(&mut replay.mismatches);
        let _ = stop.send(());
        let _ = handle.await;
        // QSD was a process that had exited before the next session: wait until this
        // daemon's images are closed (a job, its flush thread or a connection task may hold a
        // disk a moment longer) before the next daemon locks them again.
        let disks: Vec<std::sync::Weak<Disk>> = daemon
            .nodes()
            .iter()
            .map(|node| Arc::downgrade(&node.disk))
            .collect();
        drop(daemon);
        for _ in 0..1000 {
            if disks.iter().all(|disk| disk.strong_count() == 0) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            disks.iter().all(|disk| disk.strong_count() == 0),
            "{name}: an image of session {n} was still open 10 s after its daemon stopped"
        );
    }
    mismatches
}

macro_rules! transcript {
    ($test:ident, $file:expr) => {
        transcript!($test, $file, BaseKind::Qcow2, Images::Fresh);
    };
    ($test:ident, $file:expr, $base:expr) => {
        transcript!($test, $file, $base, Images::Fresh);
    };
    ($test:ident, $file:expr, $base:expr, $images:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            replay($file, $base, $images).await;
        }
    };
}

transcript!(exp1_errors_verbs_and_malformed_input_match_qsd, "exp1.log");
transcript!(exp2_throttled_stream_cancel_matches_qsd, "exp2.log");
transcript!(expa_full_stream_and_node_query_match_qsd, "expA.log");
transcript!(expc_manual_finalize_and_dismiss_match_qsd, "expC.log");
transcript!(b_backing_file_matches_qsd, "B_backingfile-qmp.log");
transcript!(b_base_mid_is_a_no_op_as_in_qsd, "B_base_mid-qmp.log");
transcript!(b_base_filename_matches_qsd, "B_basefile-qmp.log");
transcript!(
    b_base_absolute_filename_matches_qsd,
    "B_basefile_abs-qmp.log"
);
transcript!(b_base_node_matches_qsd, "B_basenode-qmp.log");
transcript!(b_bottom_matches_qsd, "B_bottom-qmp.log");
transcript!(
    b_bottom_with_backing_file_is_refused_as_in_qsd,
    "B_bottom_backingfile-qmp.log"
);
transcript!(b_bottom_top_is_a_no_op_as_in_qsd, "B_bottom_top-qmp.log");
transcript!(b_negative_speed_matches_qsd, "B_negspeed-qmp.log");
transcript!(
    b_raw_base_with_mask_matches_qsd,
    "B_rawproto_mask-qmp.log",
    BaseKind::Raw
);
transcript!(
    b_raw_base_without_mask_matches_qsd,
    "B_rawproto_nomask-qmp.log",
    BaseKind::Raw
);
transcript!(e_set_speed_mid_stream_matches_qsd, "E-qmp.log");
transcript!(
    g_cancel_and_restart_match_qsd,
    "G-qmp.log",
    BaseKind::Qcow2,
    Images::Kept
);
transcript!(q_throttled_query_matches_qsd, "Q-qmp.log");
transcript!(q2_unthrottled_stream_matches_qsd, "Q-qmp2.log");
transcript!(t_argument_types_and_limits_match_qsd, "T-qmp.log");
transcript!(
    t2_backing_file_with_immediate_base_matches_qsd,
    "T2-qmp.log"
);
transcript!(
    cor_throttled_partial_stream_cancel_matches_qsd,
    "COR-qmp.log"
);

/// How the errors of QSD's `D_*` transcripts are made for real here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// EIO on the first read of mid's own data (guest 4 MiB). QSD's recording injected it
    /// with blkdebug on mid's reads, once (docs/qemu-block-stream.md); we fail that read in
    /// mid's storage, once.
    MidDataReadEio,
    /// The top's file system is full from the start. QSD's recording injected ENOSPC once on
    /// the top's writes; we keep the images on a small tmpfs filled to the last page, and
    /// make room before `block-job-resume` (as QSD's injection was spent).
    FullFileSystem,
}

/// Linux's EIO (this crate does not depend on `libc`).
const EIO: i32 = 5;

/// A storage that fails reads of `range` with EIO while it has failures `left`.
#[derive(Debug)]
struct FailingReads {
    inner: Arc<dyn Storage>,
    range: (u64, u64),
    left: Arc<AtomicU32>,
}

impl Storage for FailingReads {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> imgstream_format::Result<()> {
        let (start, end) = self.range;
        let overlaps = offset < end && offset + buf.len() as u64 > start;
        if overlaps
            && self
                .left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(imgstream_format::Error::io(
                "Injected read error",
                std::io::Error::from_raw_os_error(EIO),
            ));
        }
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> imgstream_format::Result<()> {
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> imgstream_format::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> imgstream_format::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> imgstream_format::Result<()> {
        self.inner.set_len(len)
    }
    fn data_or_hole(&self, offset: u64) -> imgstream_format::Result<Option<(bool, u64)>> {
        self.inner.data_or_hole(offset)
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
}

/// The host range of `image`'s first own data extent, from `qemu-img map`.
fn first_data_extent(image: &Path) -> (u64, u64) {
    let output = std::process::Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2", "-U"])
        .arg(image)
        .output()
        .expect("qemu-img map");
    let map: Value = serde_json::from_slice(&output.stdout).expect("qemu-img map JSON");
    let extent = map
        .as_array()
        .and_then(|extents| {
            extents
                .iter()
                .find(|e| e["depth"] == 0 && e["data"] == true && e["offset"].is_u64())
        })
        .unwrap_or_else(|| panic!("no data in {}: {map}", image.display()));
    let host = extent["offset"].as_u64().unwrap_or_default();
    (host, host + extent["length"].as_u64().unwrap_or_default())
}

/// The chain in `dir` served as QSD's short-form test daemon names it (`top`, `mid`, `base`),
/// with mid's reads of its own data failing once once `arm` is called.
fn daemon_with_failing_mid(dir: &Path) -> (Arc<Daemon>, impl Fn()) {
    let range = first_data_extent(&dir.join("mid.qcow2"));
    let left = Arc::new(AtomicU32::new(0));
    let layer = |file: &str, writable: bool| {
        open_layer(
            &dir.join(file),
            file,
            Some(FormatKind::Qcow2),
            writable,
            false,
        )
        .unwrap_or_else(|e| panic!("{file}: {e}"))
    };
    let path = dir.join("mid.qcow2");
    let storage = Arc::new(FailingReads {
        inner: Arc::new(FileStorage::open(&path, false).expect("open mid")),
        range,
        left: left.clone(),
    });
    let image = open_format(
        FormatKind::Qcow2,
        storage,
        imgstream_format::OpenOptions { writable: false },
    )
    .expect("mid");
    let mid = Layer {
        image,
        path,
        recorded_name: "mid.qcow2".into(),
        format: FormatKind::Qcow2,
    };
    let disk = Disk::from_layers(
        vec![layer("top.qcow2", true), mid, layer("base.qcow2", false)],
        true,
    );
    let daemon = Daemon::new();
    daemon.add_chain("top", Arc::new(disk)).expect("add top");
    daemon.rename_node("top.1", "mid").expect("rename mid");
    daemon.rename_node("top.2", "base").expect("rename base");
    // Armed only now: opening the chain must not trip over it.
    (daemon, move || left.store(1, Ordering::SeqCst))
}

/// A tmpfs mounted on a new folder, unmounted when dropped (we run as root).
struct Tmpfs {
    mount: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let parent = tempfile::tempdir().expect("tempdir");
        let mount = parent.path().join("fs");
        std::fs::create_dir(&mount).expect("mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mount)
            .status()
            .expect("mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed (the ENOSPC replays need root)"
        );
        Tmpfs {
            mount,
            _parent: parent,
        }
    }

    /// Fills the file system to its last page with `filler`; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.mount.join("filler");
        let mut file = std::fs::File::create(&path).expect("filler");
        let page = [0u8; 4096];
        loop {
            match file.write(&page) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => return path,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mount)
            .status();
    }
}

/// Where the error strikes does not depend on timing, so progress is compared too.
const PINNED_DOWN: &[&str] = &["package", "actual-size"];

/// Replays an error-policy transcript with its error made by `fault`.
async fn replay_fault(name: &str, fault: Fault) {
    let sessions = parse_transcript(&read_transcript(name));
    assert_eq!(sessions.len(), 1, "{name}: one session");
    let sockets = tempfile::tempdir().expect("tempdir");
    let scratch = tempfile::tempdir().expect("tempdir");
    let tmpfs = (fault == Fault::FullFileSystem).then(|| Tmpfs::new("32M"));
    let dir = tmpfs
        .as_ref()
        .map_or(scratch.path(), |fs| fs.mount.as_path());
    make_chain_with(dir, BaseKind::Qcow2, BackingNames::Absolute);
    let (daemon, filler) = match fault {
        Fault::MidDataReadEio => {
            let (daemon, arm) = daemon_with_failing_mid(dir);
            arm();
            (daemon, None)
        }
        Fault::FullFileSystem => (daemon_as_qsd(dir), tmpfs.as_ref().map(|fs| fs.fill())),
    };
    let make_room = |request: &str| {
        if request.contains("block-job-resume") {
            if let Some(filler) = &filler {
                std::fs::remove_file(filler).expect("make room");
            }
        }
    };
    let (path, stop, handle) = serve(&daemon, sockets.path()).await;
    let mut replay = Replay {
        dir,
        name,
        volatile: PINNED_DOWN,
        before_request: &make_room,
        mismatches: Vec::new(),
    };
    replay.session(&path, &sessions[0]).await;
    let _ = stop.send(());
    let _ = handle.await;
    drop(daemon);
    assert!(
        replay.mismatches.is_empty(),
        "{} differences from QSD:\n{}",
        replay.mismatches.len(),
        replay.mismatches.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_report_read_error_fails_the_job_as_in_qsd() {
    replay_fault("D_report-qmp.log", Fault::MidDataReadEio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_stop_read_error_pauses_then_resumes_as_in_qsd() {
    replay_fault("D_stop-qmp.log", Fault::MidDataReadEio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_ignore_read_error_goes_on_then_fails_as_in_qsd() {
    replay_fault("D_ignore-qmp.log", Fault::MidDataReadEio).await;
}

/// Recorded for imgstream (see the transcripts' README): a job stopped by an error needs
/// `force` to be cancelled, and then resumes before it aborts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_stop_then_force_cancel_as_in_qsd() {
    replay_fault("D_stop_force_cancel-qmp.log", Fault::MidDataReadEio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_enospc_policy_reports_a_read_error_as_in_qsd() {
    replay_fault("D_enospc_eio-qmp.log", Fault::MidDataReadEio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_enospc_policy_pauses_on_a_full_file_system_as_in_qsd() {
    replay_fault("D_enospc_enospc-qmp.log", Fault::FullFileSystem).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d_report_full_file_system_fails_the_job_as_in_qsd() {
    replay_fault("D_report_enospc-qmp.log", Fault::FullFileSystem).await;
}

/// `name`'s transcript with `edit` applied, replayed: the differences found.
async fn replay_altered(name: &str, edit: impl Fn(&str) -> String) -> Vec<String> {
    let original = read_transcript(name);
    let altered = edit(&original);
    assert_ne!(altered, original, "the edit changed nothing");
    replay_text(name, &altered, BaseKind::Qcow2, Images::Fresh).await
}

/// A stand-in for a daemon that sends, for each request of the single session in `text`, the
/// lines QSD sent after it, in QSD's order, and `late` after the last request's; any further
/// request gets `{"return": [], "id": ...}`.
async fn fake_qsd(listener: tokio::net::UnixListener, text: String, late: Option<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut greeting = String::new();
    let mut answers: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.starts_with("-> ") {
            answers.push(String::new());
        } else if let Some(message) = line.strip_prefix("<- ") {
            let out = answers.last_mut().unwrap_or(&mut greeting);
            out.push_str(message);
            out.push_str("\r\n");
        }
    }
    if let (Some(last), Some(late)) = (answers.last_mut(), late) {
        last.push_str(&late);
        last.push_str("\r\n");
    }
    let (mut stream, _) = listener.accept().await.expect("accept");
    stream
        .write_all(greeting.as_bytes())
        .await
        .expect("greeting");
    let mut answers = answers.into_iter();
    let mut requests = imgstream_qmp::json::Streamer::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut parsed = Vec::new();
        requests.feed(&buf[..n], &mut parsed);
        for request in parsed {
            let answer = answers.next().unwrap_or_else(|| {
                let id = request.map(|(v, _)| v["id"].clone()).unwrap_or_default();
                format!("{}\r\n", json!({"return": [], "id": id}))
            });
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

/// Replays the last session of `name` against [`fake_qsd`] sending QSD's own lines plus
/// `late`.
async fn replay_against_qsd_itself(name: &str, late: Option<String>) -> Vec<String> {
    let whole = read_transcript(name);
    let last_greeting = whole.rfind("<- {\"QMP\"").expect("a greeting");
    let text = whole[last_greeting..].to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fake.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind");
    let server = tokio::spawn(fake_qsd(listener, text.clone(), late));
    let sessions = parse_transcript(&text);
    assert_eq!(sessions.len(), 1, "one session");
    let mut replay = Replay {
        dir: dir.path(),
        name,
        volatile: VOLATILE,
        before_request: &|_| {},
        mismatches: Vec::new(),
    };
    replay.session(&path, &sessions[0]).await;
    server.abort();
    replay.mismatches
}

/// The comparator's own test: QSD's replies and events match themselves, and an event after
/// QSD's last one for a job, sent after the last reply, is a difference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comparator_reports_an_event_after_the_last_expected_one() {
    assert_eq!(
        replay_against_qsd_itself("expC.log", None).await,
        Vec::<String>::new()
    );
    let late = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "JOB_STATUS_CHANGE", "data": {"status": "null", "id": "m3"}}"#;
    let mismatches = replay_against_qsd_itself("expC.log", Some(late.into())).await;
    assert!(
        mismatches.iter().any(|m| m.contains("job m3: events")),
        "{mismatches:?}"
    );
}

/// The comparator's own test: events for a job QSD never had are differences.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comparator_reports_events_of_a_job_qsd_never_had() {
    let mismatches = replay_altered("expC.log", |text| {
        text.lines()
            .filter(|line| !(line.contains(r#""event""#) && line.contains(r#""m3""#)))
            .map(|line| format!("{line}\n"))
            .collect()
    })
    .await;
    assert!(
        mismatches
            .iter()
            .any(|m| m.contains("job m3: events [] != [\"JOB_STATUS_CHANGEcreated\"")),
        "{mismatches:?}"
    );
}

/// The comparator's own test: `ro`, `backing_file_depth` and `backing_file` are compared by
/// value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comparator_reports_node_ro_depth_and_backing_file() {
    let mid = r#""ro": false, "node-name": "mid", "backing_file_depth": 0, "drv": "qcow2", "iops": 0, "bps_wr": 0, "write_threshold": 0, "backing_file": "base.qcow2""#;
    let altered = r#""ro": true, "node-name": "mid", "backing_file_depth": 1, "drv": "qcow2", "iops": 0, "bps_wr": 0, "write_threshold": 0, "backing_file": "other.qcow2""#;
    let mismatches = replay_altered("expA.log", |text| text.replace(mid, altered)).await;
    for field in [
        r#"["mid"].ro: true != false"#,
        r#"["mid"].backing_file_depth: 1 != 0"#,
        r#"["mid"].backing_file: "other.qcow2" != "base.qcow2""#,
    ] {
        assert!(
            mismatches.iter().any(|m| m.contains(field)),
            "{field} not reported: {mismatches:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_into_intermediate_node_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_chain(dir.path(), BaseKind::Qcow2);
    let daemon = daemon_for(dir.path());
    let (path, stop, _) = serve(&daemon, dir.path()).await;
    let (mut client, _) = Client::connect(&path).await;
    client.send_raw(br#"{"execute": "qmp_capabilities"}"#).await;
    client.next(WAIT).await;
    client
        .send_raw(br#"{"execute": "block-stream", "arguments": {"device": "mid", "job-id": "s"}, "id": 1}"#)
        .await;
    let reply = client.next(WAIT).await.expect("reply");
    assert_eq!(reply["error"]["class"], "GenericError");
    assert_eq!(
        reply["error"]["desc"],
        "Node 'mid' is a backing image of 'top': imgstream streams only into the top image of a chain"
    );
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_monitors_both_get_every_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_chain(dir.path(), BaseKind::Qcow2);
    let daemon = daemon_for(dir.path());
    let (path, stop, _) = serve(&daemon, dir.path()).await;
    let (mut a, _) = Client::connect(&path).await;
    let (mut b, _) = Client::connect(&path).await;
    for client in [&mut a, &mut b] {
        client.send_raw(br#"{"execute": "qmp_capabilities"}"#).await;
        assert_eq!(client.next(WAIT).await, Some(json!({"return": {}})));
    }
    a.send_raw(br#"{"execute": "block-stream", "arguments": {"device": "top", "job-id": "s"}}"#)
        .await;
    let mut seen = Vec::new();
    for client in [&mut a, &mut b] {
        let mut events = Vec::new();
        while let Some(m) = client.next(Duration::from_secs(10)).await {
            if is_event(&m) {
                let status = m["data"]["status"].as_str().unwrap_or("").to_string();
                events.push(format!("{}{}", m["event"].as_str().unwrap_or(""), status));
                if status == "null" {
                    break;
                }
            }
        }
        seen.push(events);
    }
    let expected = [
        "JOB_STATUS_CHANGEcreated",
        "JOB_STATUS_CHANGErunning",
        "JOB_STATUS_CHANGEwaiting",
        "JOB_STATUS_CHANGEpending",
        "BLOCK_JOB_COMPLETED",
        "JOB_STATUS_CHANGEconcluded",
        "JOB_STATUS_CHANGEnull",
    ];
    assert_eq!(seen[0], expected);
    assert_eq!(seen[1], expected);
    let _ = stop.send(());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_private_and_quit_stops_the_server() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    make_chain(dir.path(), BaseKind::Qcow2);
    let daemon = daemon_for(dir.path());
    let (path, _stop, handle) = serve(&daemon, dir.path()).await;
    let mode = std::fs::metadata(&path)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let (mut client, greeting) = Client::connect(&path).await;
    assert_eq!(
        greeting["QMP"]["version"]["qemu"],
        json!({"micro": 2, "minor": 0, "major": 10})
    );
    client
        .send_raw(br#"{"execute": "qmp_capabilities"}{"execute": "quit", "id": "q"}"#)
        .await;
    assert_eq!(client.next(WAIT).await, Some(json!({"return": {}})));
    assert_eq!(
        client.next(WAIT).await,
        Some(json!({"return": {}, "id": "q"}))
    );
    assert_eq!(client.next(WAIT).await, None);
    tokio::time::timeout(WAIT, handle)
        .await
        .expect("server stops after quit")
        .expect("server task");
    assert!(daemon.is_quit_requested());
    assert!(!path.exists());
}

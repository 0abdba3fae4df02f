//! `imgstream ctl` against `imgstream serve` and against qemu-storage-daemon on the same chain:
//! the HMP-style job list, pause/resume/set-speed/cancel as `query-block-jobs` sees them, raw
//! QMP, and `watch` following a stream to its end. Running the same commands against QSD proves
//! wire compatibility from the client side.

use anyhow::{ensure, Context, Result};
use imgstream_tests::daemon::Daemon;
use imgstream_tests::fixtures::{Chain, Format};
use imgstream_tests::qemu;
use imgstream_tests::{KIB, MIB};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};

/// qcow2 base <- qcow2 top, 16 MiB of data in the base so a throttled stream lasts.
fn chain(dir: &Path) -> Result<Chain> {
    Chain::new(dir)
        .base(Format::qcow2_v3(64 * KIB), "32M")?
        .write(0, 16 * MIB, 0x42)?
        .overlay(Format::qcow2_v3(64 * KIB))?
        .write(MIB, 64 * KIB, 0x43)
}

/// The job's `query-block-jobs` entry, required to exist.
fn job(daemon: &Daemon) -> Result<Value> {
    daemon.job()?.context("no job")
}

/// The ctl session shared by both daemons; `device` is the node name of the top.
fn ctl_drives_a_stream_job(daemon: &Daemon, device: &str) -> Result<()> {
    let jobs = daemon.ctl_ok(&["jobs"])?;
    ensure!(jobs.stdout == "No active jobs\n", "{}", jobs.describe());

    let version = daemon.ctl_ok(&["qmp", r#"{"execute":"query-version"}"#])?;
    let reply: Value = serde_json::from_str(&version.stdout)?;
    ensure!(reply["return"]["qemu"]["major"].is_u64(), "{reply}");

    // 1 byte/s: the job copies its first chunk and then waits, so what we query is stable.
    daemon.ctl_ok(&["stream", device, "--job-id", "job0", "--speed", "1"])?;
    let jobs = daemon.ctl_ok(&["jobs"])?;
    let line = jobs.stdout.trim_end();
    ensure!(
        line.starts_with("Streaming device job0: Completed ")
            && line.ends_with(&format!(" of {} bytes, speed limit 1 bytes/s", 32 * MIB)),
        "{}",
        jobs.describe()
    );
    ensure!(job(daemon)?["status"] == "running");

    daemon.ctl_ok(&["pause", "job0"])?;
    let paused = job(daemon)?;
    ensure!(
        paused["paused"] == true && paused["status"] == "paused",
        "{paused}"
    );
    daemon.ctl_ok(&["resume"])?;
    let resumed = job(daemon)?;
    ensure!(resumed["paused"] == false, "{resumed}");

    daemon.ctl_ok(&["set-speed", "job0", "2M"])?;
    ensure!(job(daemon)?["speed"] == 2 * MIB);
    daemon.ctl_ok(&["set-speed", "1"])?;
    ensure!(job(daemon)?["speed"] == 1);

    daemon.ctl_ok(&["cancel"])?;
    // Cancel is asynchronous: watch reports the final event (exit 1: the job did not complete).
    let watched = daemon.ctl(&["watch", "job0"])?;
    ensure!(
        watched.stdout.contains("BLOCK_JOB_CANCELLED")
            || watched.stdout.contains("is no longer active"),
        "{}",
        watched.describe()
    );
    ensure!(daemon.job()?.is_none(), "the job is still listed");
    let jobs = daemon.ctl_ok(&["jobs"])?;
    ensure!(jobs.stdout == "No active jobs\n", "{}", jobs.describe());

    // Errors come back as QMP errors with a non-zero exit.
    let err = daemon.ctl(&[
        "qmp",
        r#"{"execute":"block-job-pause","arguments":{"device":"nosuch"}}"#,
    ])?;
    ensure!(
        err.code == Some(1) && err.stdout.contains("DeviceNotActive"),
        "{}",
        err.describe()
    );
    Ok(())
}

#[test]
fn ctl_drives_imgstream_serve() -> Result<()> {
    let t = tempfile::tempdir()?;
    let chain = chain(t.path())?;
    let top = chain.top()?.path.clone();
    let daemon = Daemon::serve(t.path(), &[("top", &top)], &[])?;
    ctl_drives_a_stream_job(&daemon, "top")?;
    daemon.stop()?;
    qemu::check_clean(&top, "qcow2")?;
    let model = t.path().join("model.raw");
    chain.expected().write_raw(&model)?;
    ensure!(qemu::compare(&model, "raw", &top, "qcow2")?.is_none());
    Ok(())
}

#[test]
fn ctl_drives_qemu_storage_daemon_the_same_way() -> Result<()> {
    let t = tempfile::tempdir()?;
    let chain = chain(t.path())?;
    let layers = chain.layers();
    let daemon = Daemon::qsd(
        t.path(),
        &[
            ("top", &layers[1].path, "qcow2"),
            ("base", &layers[0].path, "qcow2"),
        ],
        "top",
    )?;
    ctl_drives_a_stream_job(&daemon, "top")?;
    daemon.stop()?;
    qemu::check_clean(&layers[1].path, "qcow2")
}

/// A base full of data under a 64 MiB top: every byte of a stream is copied, so its speed limit
/// holds it back from start to end.
fn full_chain(dir: &Path) -> Result<Chain> {
    Chain::new(dir)
        .base(Format::qcow2_v3(64 * KIB), "64M")?
        .write(0, 64 * MIB, 0x42)?
        .overlay(Format::qcow2_v3(64 * KIB))?
        .write(MIB, 64 * KIB, 0x43)
}

/// One plain progress line of `watch`:
/// `JOB: DONE of TOTAL (P%), RATE/s, TIME left, STATUS, speed limit S` (or `no speed limit`),
/// with `rate not known yet` or `0 B/s, time left unknown` in place of the rate and time left.
#[derive(Debug)]
struct ProgressLine {
    total: String,
    percent: u64,
    /// The rate and the time left, when both are known.
    pace: Option<(String, String)>,
    status: String,
}

fn parse_progress_line(job: &str, line: &str) -> Result<ProgressLine> {
    let fields: Vec<&str> = line
        .strip_prefix(&format!("{job}: "))
        .with_context(|| format!("not a progress line of {job}: {line:?}"))?
        .split(", ")
        .collect();
    let (done, rest) = fields.split_first().context("empty line")?;
    let (_, of) = done
        .split_once(" of ")
        .with_context(|| format!("no 'of' in {line:?}"))?;
    let (total, percent) = of
        .strip_suffix("%)")
        .and_then(|t| t.split_once(" ("))
        .with_context(|| format!("no percentage in {line:?}"))?;
    let (pace, rest) = match rest {
        ["rate not known yet", rest @ ..] => (None, rest),
        ["0 B/s", "time left unknown", rest @ ..] => (None, rest),
        [rate, left, rest @ ..] if rate.ends_with("/s") && left.ends_with(" left") => {
            (Some((rate.to_string(), left.to_string())), rest)
        }
        _ => anyhow::bail!("no rate in {line:?}"),
    };
    let [status, limit] = rest else {
        anyhow::bail!("expected STATUS, LIMIT at the end of {line:?}");
    };
    ensure!(
        *limit == "no speed limit" || limit.starts_with("speed limit "),
        "{line:?}"
    );
    Ok(ProgressLine {
        total: total.to_string(),
        percent: percent.parse()?,
        pace,
        status: status.to_string(),
    })
}

/// `ctl watch` through a whole stream, its stdout a pipe: plain progress lines, one with the
/// rate and time left at least, then the final event as JSON and exit 0. Deterministic without
/// timing: the stream is held at 1 MiB/s (a minute for 64 MiB) until watch has printed a line
/// with a rate, and only then unthrottled; watch prints one at least every second while the
/// job moves. `control` is a second QMP socket for the set-speed while watch holds the first.
fn watch_follows_a_stream_to_completion(
    daemon: &Daemon,
    device: &str,
    control: &Path,
) -> Result<()> {
    daemon.ctl_ok(&["stream", device, "--job-id", "job0", "--speed", "1M"])?;
    let mut watch = Command::new(imgstream_tests::imgstream::binary()?)
        .arg("ctl")
        .arg(&daemon.qmp)
        .args(["watch", "job0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = BufReader::new(watch.stdout.take().context("watch stdout")?);
    let mut lines = Vec::new();
    let mut unthrottled = false;
    for line in stdout.lines() {
        let line = line?;
        if !unthrottled
            && !line.starts_with('{')
            && parse_progress_line("job0", &line)?.pace.is_some()
        {
            let control = control.display().to_string();
            imgstream_tests::imgstream::run_ok(&["ctl", &control, "set-speed", "job0", "0"])?;
            unthrottled = true;
        }
        lines.push(line);
    }
    let status = watch.wait()?;
    let mut stderr = String::new();
    watch
        .stderr
        .take()
        .context("watch stderr")?
        .read_to_string(&mut stderr)?;
    let all = lines.join("\n");
    ensure!(
        status.success(),
        "watch exited with {status}:\n{all}\n{stderr}"
    );
    ensure!(
        unthrottled,
        "the stream ended before watch printed a rate:\n{all}"
    );

    let (last, progress) = lines.split_last().context("watch printed nothing")?;
    let event: Value = serde_json::from_str(last)
        .with_context(|| format!("the last line is not the final event:\n{all}"))?;
    ensure!(event["event"] == "BLOCK_JOB_COMPLETED", "{event}");
    let data = &event["data"];
    ensure!(
        data["device"] == "job0"
            && data["type"] == "stream"
            && data["len"] == 64 * MIB
            && data["offset"] == 64 * MIB
            && data.get("error").is_none(),
        "{event}"
    );
    ensure!(event["timestamp"]["seconds"].is_u64(), "{event}");

    let progress = progress
        .iter()
        .map(|line| parse_progress_line("job0", line))
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        progress.iter().any(|p| p.pace.is_some()),
        "no line with a rate and time left:\n{all}"
    );
    ensure!(
        progress
            .iter()
            .all(|p| p.total == "64 MiB" && p.status == "running"),
        "{all}"
    );
    ensure!(
        progress.windows(2).all(|w| w[0].percent <= w[1].percent),
        "progress went back:\n{all}"
    );
    let jobs = daemon.ctl_ok(&["jobs"])?;
    ensure!(jobs.stdout == "No active jobs\n", "{}", jobs.describe());
    Ok(())
}

#[test]
fn watch_follows_a_stream_of_imgstream_serve_to_completion() -> Result<()> {
    let t = tempfile::tempdir()?;
    let chain = full_chain(t.path())?;
    let top = chain.top()?.path.clone();
    let daemon = Daemon::serve(t.path(), &[("top", &top)], &[])?;
    // imgstream serve takes several clients on one QMP socket.
    watch_follows_a_stream_to_completion(&daemon, "top", &daemon.qmp)?;
    daemon.stop()?;
    ensure!(qemu::info(&top, Some("qcow2"), false)?
        .get("backing-filename")
        .is_none());
    qemu::check_clean(&top, "qcow2")
}

#[test]
fn watch_follows_a_stream_of_qemu_storage_daemon_the_same_way() -> Result<()> {
    let t = tempfile::tempdir()?;
    let chain = full_chain(t.path())?;
    let layers = chain.layers();
    let control = t.path().join("qsd-control.sock");
    let chardev = format!("socket,path={},server=on,wait=off,id=m2", control.display());
    let daemon = Daemon::qsd_with(
        t.path(),
        &[
            ("top", &layers[1].path, "qcow2"),
            ("base", &layers[0].path, "qcow2"),
        ],
        "top",
        &["--chardev", &chardev, "--monitor", "chardev=m2"],
    )?;
    watch_follows_a_stream_to_completion(&daemon, "top", &control)?;
    daemon.stop()?;
    qemu::check_clean(&layers[1].path, "qcow2")
}

/// On a terminal (a pty made by `script`), `watch` draws indicatif's bar instead of lines: a
/// frame with a rate and time left, no plain progress line, then the final event. Held at
/// 1 MiB/s until such a frame has come, as above.
#[test]
fn watch_draws_a_progress_bar_on_a_terminal() -> Result<()> {
    let t = tempfile::tempdir()?;
    let chain = full_chain(t.path())?;
    let top = chain.top()?.path.clone();
    let daemon = Daemon::serve(t.path(), &[("top", &top)], &[])?;
    daemon.ctl_ok(&["stream", "top", "--job-id", "job0", "--speed", "1M"])?;
    let watch = format!(
        "{} ctl {} watch job0",
        imgstream_tests::imgstream::binary()?.display(),
        daemon.qmp.display()
    );
    let script = imgstream_tests::tools::require("script", "bsdutils")?;
    // -e: script exits with watch's code; its own typescript goes nowhere.
    let mut child = Command::new(script)
        .args(["-qec", &watch, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdout = child.stdout.take().context("script stdout")?;
    let mut seen = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut unthrottled = false;
    loop {
        let n = stdout.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&chunk[..n]);
        if !unthrottled && bar_frame_with_rate(&String::from_utf8_lossy(&seen)) {
            daemon.ctl_ok(&["set-speed", "job0", "0"])?;
            unthrottled = true;
        }
    }
    let status = child.wait()?;
    let text = String::from_utf8_lossy(&seen).into_owned();
    ensure!(
        status.success(),
        "watch under script: {status}\n{:?}",
        tail(&text)
    );
    ensure!(
        unthrottled,
        "no bar frame with a rate and eta:\n{:?}",
        tail(&text)
    );
    ensure!(
        !text.contains(" of 64 MiB ("),
        "plain progress lines on a terminal:\n{:?}",
        tail(&text)
    );
    let last = text
        .lines()
        .map(|l| l.trim_matches(|c: char| c.is_control() || c == ' '))
        .rfind(|l| !l.is_empty())
        .context("nothing printed")?;
    let event: Value = serde_json::from_str(&last[last.find('{').unwrap_or(0)..])
        .with_context(|| format!("the last line is not the final event:\n{:?}", tail(&text)))?;
    ensure!(
        event["event"] == "BLOCK_JOB_COMPLETED" && event["data"]["device"] == "job0",
        "{event}"
    );
    daemon.stop()
}

/// Whether indicatif has drawn a frame of `{bytes}/{total_bytes} {binary_bytes_per_sec} eta
/// {eta}` with a rate of at least 1 KiB/s, e.g. `3.06 MiB/64.00 MiB 1.38 MiB/s eta 44s`.
fn bar_frame_with_rate(output: &str) -> bool {
    output
        .split("iB/s eta ")
        .skip(1)
        .any(|after| after.starts_with(|c: char| c.is_ascii_digit()))
}

/// The end of a long terminal output, for a failure message.
fn tail(text: &str) -> &str {
    let start = text.len().saturating_sub(2000);
    let start = (start..=text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[start..]
}

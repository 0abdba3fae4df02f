//! `imgstream ctl`: drive a running daemon (imgstream serve or qemu-storage-daemon) over QMP.

use crate::qmp_client::QmpClient;
use crate::size::{human_size, parse_size};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The daemon's QMP socket.
    socket: PathBuf,
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, clap::Subcommand)]
enum Action {
    /// Start streaming into DEVICE (block-stream).
    Stream {
        device: String,
        #[arg(long)]
        base: Option<String>,
        #[arg(long)]
        base_node: Option<String>,
        /// Bytes per second (k, M, G suffixes); 0 = unlimited.
        #[arg(long)]
        speed: Option<String>,
        /// Job id (defaults to the device name).
        #[arg(long)]
        job_id: Option<String>,
        #[arg(long)]
        on_error: Option<String>,
    },
    /// List the block jobs as QEMU's `info block-jobs` prints them.
    Jobs,
    /// Pause a job (the only job if none is named).
    Pause { job: Option<String> },
    /// Resume a paused job.
    Resume { job: Option<String> },
    /// Cancel a job.
    Cancel {
        job: Option<String>,
        #[arg(long)]
        force: bool,
    },
    /// Change a job's speed limit (bytes per second; 0 = unlimited).
    SetSpeed {
        /// The speed, or the job then the speed.
        #[arg(num_args = 1..=2)]
        values: Vec<String>,
    },
    /// Follow a job until it ends, then print its final event as JSON: a progress bar on a
    /// terminal, else a plain progress line at most every second.
    Watch { job: Option<String> },
    /// Send any QMP command as JSON and print the reply.
    Qmp { json: String },
}

pub fn run(args: Args) -> Result<u8> {
    let mut client = QmpClient::connect(&args.socket)?;
    match args.action {
        Action::Stream {
            device,
            base,
            base_node,
            speed,
            job_id,
            on_error,
        } => {
            let mut arguments =
                json!({ "device": device, "job-id": job_id.unwrap_or_else(|| device.clone()) });
            if let Some(base) = base {
                arguments["base"] = json!(base);
            }
            if let Some(node) = base_node {
                arguments["base-node"] = json!(node);
            }
            if let Some(speed) = speed {
                arguments["speed"] = json!(parse_size(&speed)?);
            }
            if let Some(policy) = on_error {
                arguments["on-error"] = json!(policy);
            }
            client.execute("block-stream", Some(arguments))?;
        }
        Action::Jobs => print!(
            "{}",
            format_jobs(&client.execute("query-block-jobs", None)?)
        ),
        Action::Pause { job } => {
            let job = pick_job(&mut client, job)?;
            client.execute("block-job-pause", Some(json!({ "device": job })))?;
        }
        Action::Resume { job } => {
            let job = pick_job(&mut client, job)?;
            client.execute("block-job-resume", Some(json!({ "device": job })))?;
        }
        Action::Cancel { job, force } => {
            let job = pick_job(&mut client, job)?;
            client.execute(
                "block-job-cancel",
                Some(json!({ "device": job, "force": force })),
            )?;
        }
        Action::SetSpeed { values } => {
            let (job, speed) = match values.as_slice() {
                [speed] => (None, speed.clone()),
                [job, speed] => (Some(job.clone()), speed.clone()),
                _ => bail!("set-speed takes [JOB] SPEED"),
            };
            let job = pick_job(&mut client, job)?;
            client.execute(
                "block-job-set-speed",
                Some(json!({ "device": job, "speed": parse_size(&speed)? })),
            )?;
        }
        Action::Watch { job } => return watch(&mut client, job),
        Action::Qmp { json } => {
            let command: Value = serde_json::from_str(&json).context("Invalid JSON")?;
            let reply = client.raw(command)?;
            println!("{}", serde_json::to_string_pretty(&reply)?);
            return Ok(if reply.get("error").is_some() { 1 } else { 0 });
        }
    }
    Ok(0)
}

/// The text of HMP `info block-jobs`.
pub fn format_jobs(jobs: &Value) -> String {
    let jobs = jobs.as_array().cloned().unwrap_or_default();
    if jobs.is_empty() {
        return "No active jobs\n".to_string();
    }
    jobs.iter()
        .map(|job| {
            let kind = job["type"].as_str().unwrap_or("");
            let device = job["device"].as_str().unwrap_or("");
            let what = if kind == "stream" {
                format!("Streaming device {device}")
            } else {
                format!("Type {kind}, device {device}")
            };
            format!(
                "{what}: Completed {} of {} bytes, speed limit {} bytes/s\n",
                job["offset"], job["len"], job["speed"]
            )
        })
        .collect()
}

fn pick_job(client: &mut QmpClient, job: Option<String>) -> Result<String> {
    if let Some(job) = job {
        return Ok(job);
    }
    let jobs = client.execute("query-block-jobs", None)?;
    match jobs.as_array().map(Vec::as_slice) {
        Some([only]) => Ok(only["device"].as_str().unwrap_or("").to_string()),
        Some([]) | None => bail!("No active jobs"),
        Some(_) => bail!("Several jobs are running: name one"),
    }
}

/// How often `watch` asks the daemon where the job is.
const WATCH_POLL: Duration = Duration::from_millis(200);
/// When stdout is not a terminal, `watch` prints a progress line at most this often (and at
/// once when the job's status changes), so that a log of a long stream stays readable.
const PROGRESS_LINE_INTERVAL: Duration = Duration::from_secs(1);
/// The rate shown is the job's over this last stretch of time.
const RATE_WINDOW: Duration = Duration::from_secs(10);

fn watch(client: &mut QmpClient, job: Option<String>) -> Result<u8> {
    let job = pick_job(client, job)?;
    let mut progress = if std::io::stdout().is_terminal() {
        Progress::bar()
    } else {
        Progress::Lines(ProgressLines::default())
    };
    loop {
        while let Some(event) = client.next_event(WATCH_POLL)? {
            if let Some(code) = handle_event(&job, &event, &progress)? {
                return Ok(code);
            }
        }
        let jobs = client.execute("query-block-jobs", None)?;
        // The daemon sends the events emitted before a reply ahead of it: if the job has gone
        // from the list, its final event is queued already (unless it came before we
        // subscribed).
        while let Some(event) = client.queued_event() {
            if let Some(code) = handle_event(&job, &event, &progress)? {
                return Ok(code);
            }
        }
        let Some(info) = jobs.as_array().and_then(|all| {
            all.iter()
                .find(|j| j["device"].as_str() == Some(job.as_str()))
        }) else {
            progress.finish();
            println!("Job {job} is no longer active");
            return Ok(0);
        };
        progress.update(&job, info, Instant::now());
    }
}

/// Acts on one event for `job`: its final event is printed as JSON and gives `watch`'s exit
/// code (0 completed, 1 cancelled or failed); an error event is reported as it comes.
fn handle_event(job: &str, event: &Value, progress: &Progress) -> Result<Option<u8>> {
    let name = event["event"].as_str().unwrap_or("");
    let data = &event["data"];
    if data["device"].as_str() != Some(job) {
        return Ok(None);
    }
    match name {
        "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" => {
            progress.finish();
            println!("{}", serde_json::to_string(event)?);
            let failed = name == "BLOCK_JOB_CANCELLED" || data.get("error").is_some();
            Ok(Some(if failed { 1 } else { 0 }))
        }
        "BLOCK_JOB_ERROR" => {
            progress.println(&format!("error: {data}"));
            Ok(None)
        }
        _ => Ok(None),
    }
}

/// How `watch` shows progress: a bar redrawn in place on a terminal; elsewhere (a pipe, a log
/// file) plain lines, since a bar there would be either invisible or a mess of redraws.
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines(ProgressLines),
}

impl Progress {
    /// The bar takes what the line leaves: a line longer than the terminal wraps, and each
    /// redraw then leaves a stale line behind.
    fn bar() -> Progress {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(1),
            indicatif::ProgressDrawTarget::stdout(),
        );
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Progress::Bar(bar)
    }

    fn update(&mut self, job: &str, info: &Value, now: Instant) {
        let sample = JobSample::of(info);
        match self {
            Progress::Bar(bar) => {
                bar.set_length(sample.len.max(1));
                bar.set_position(sample.offset);
                bar.set_message(format!("{}, {}", sample.status, speed_limit(sample.speed)));
            }
            Progress::Lines(lines) => {
                if let Some(line) = lines.update(job, sample, now) {
                    println!("{line}");
                }
            }
        }
    }

    fn println(&self, text: &str) {
        match self {
            Progress::Bar(bar) => bar.println(text),
            Progress::Lines(_) => println!("{text}"),
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// What `query-block-jobs` says of the job.
#[derive(Debug, Clone, PartialEq, Eq)]
struct JobSample {
    offset: u64,
    len: u64,
    speed: u64,
    status: String,
}

impl JobSample {
    fn of(info: &Value) -> JobSample {
        JobSample {
            offset: info["offset"].as_u64().unwrap_or(0),
            len: info["len"].as_u64().unwrap_or(0),
            speed: info["speed"].as_u64().unwrap_or(0),
            status: info["status"].as_str().unwrap_or("").to_string(),
        }
    }
}

/// Plain progress lines: the first sample at once, then a line at most every
/// [`PROGRESS_LINE_INTERVAL`] while the job moves, and one whenever its status changes.
#[derive(Debug, Default)]
struct ProgressLines {
    /// (time, offset) over the last [`RATE_WINDOW`], oldest first.
    samples: VecDeque<(Instant, u64)>,
    last_line: Option<(Instant, JobSample)>,
}

impl ProgressLines {
    /// Records a sample; returns the line to print, if one is due.
    fn update(&mut self, job: &str, sample: JobSample, now: Instant) -> Option<String> {
        self.samples.push_back((now, sample.offset));
        while self
            .samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        let due = match &self.last_line {
            None => true,
            Some((at, last)) => {
                last.status != sample.status
                    || (now.duration_since(*at) >= PROGRESS_LINE_INTERVAL && *last != sample)
            }
        };
        if !due {
            return None;
        }
        let line = progress_line(job, &sample, self.rate());
        self.last_line = Some((now, sample));
        Some(line)
    }

    /// Bytes per second over the window; `None` until two samples are some time apart.
    fn rate(&self) -> Option<f64> {
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        let seconds = last.0.duration_since(first.0).as_secs_f64();
        (seconds > 0.0).then(|| last.1.saturating_sub(first.1) as f64 / seconds)
    }
}

/// One progress line: `JOB: DONE of TOTAL (P%), RATE/s, TIME left, STATUS, speed limit S`.
fn progress_line(job: &str, sample: &JobSample, rate: Option<f64>) -> String {
    let percent = sample.offset.saturating_mul(100) / sample.len.max(1);
    let pace = match rate {
        Some(rate) if rate >= 1.0 => {
            let left = sample.len.saturating_sub(sample.offset) as f64 / rate;
            format!(
                "{}/s, {} left",
                human_size(rate as u64),
                human_duration(Duration::try_from_secs_f64(left).unwrap_or(Duration::MAX))
            )
        }
        Some(_) => "0 B/s, time left unknown".to_string(),
        None => "rate not known yet".to_string(),
    };
    format!(
        "{job}: {} of {} ({percent}%), {pace}, {}, {}",
        human_size(sample.offset),
        human_size(sample.len),
        sample.status,
        speed_limit(sample.speed)
    )
}

fn speed_limit(speed: u64) -> String {
    if speed == 0 {
        "no speed limit".to_string()
    } else {
        format!("speed limit {}/s", human_size(speed))
    }
}

/// `45s`, `2m 05s`, `1h 02m 03s` (rounded up to the second).
fn human_duration(duration: Duration) -> String {
    let total = duration
        .as_secs()
        .saturating_add(u64::from(duration.subsec_nanos() > 0));
    let (hours, minutes, seconds) = (total / 3600, total / 60 % 60, total % 60);
    if hours > 0 {
        format!("{hours}h {minutes:02}m {seconds:02}s")
    } else if minutes > 0 {
        format!("{minutes}m {seconds:02}s")
    } else {
        format!("{seconds}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_print_like_hmp_info_block_jobs() {
        assert_eq!(format_jobs(&json!([])), "No active jobs\n");
        let jobs = json!([{"type": "stream", "device": "job0", "offset": 1048576, "len": 67108864, "speed": 0}]);
        assert_eq!(
            format_jobs(&jobs),
            "Streaming device job0: Completed 1048576 of 67108864 bytes, speed limit 0 bytes/s\n"
        );
    }

    fn sample(offset: u64, status: &str) -> JobSample {
        JobSample {
            offset,
            len: 64 << 20,
            speed: 1 << 20,
            status: status.to_string(),
        }
    }

    #[test]
    fn progress_lines_give_rate_and_time_left_once_the_job_has_moved() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut lines = ProgressLines::default();
        assert_eq!(
            lines.update("job0", sample(0, "running"), at(0)).as_deref(),
            Some("job0: 0 B of 64 MiB (0%), rate not known yet, running, speed limit 1 MiB/s")
        );
        // Not again within the interval, even though the job moved.
        assert_eq!(
            lines.update("job0", sample(1 << 19, "running"), at(500)),
            None
        );
        assert_eq!(
            lines
                .update("job0", sample(2 << 20, "running"), at(2000))
                .as_deref(),
            Some("job0: 2 MiB of 64 MiB (3%), 1 MiB/s, 1m 02s left, running, speed limit 1 MiB/s")
        );
        // A status change is printed at once; a job that does not move prints nothing.
        assert!(lines
            .update("job0", sample(2 << 20, "paused"), at(2100))
            .is_some_and(|l| l.contains(", paused, ")));
        assert_eq!(
            lines.update("job0", sample(2 << 20, "paused"), at(9000)),
            None
        );
    }

    #[test]
    fn a_stalled_job_has_no_time_left() {
        let line = progress_line("j", &sample(5, "running"), Some(0.0));
        assert!(line.contains(", 0 B/s, time left unknown, "), "{line}");
        let unlimited = JobSample {
            speed: 0,
            ..sample(0, "running")
        };
        assert!(progress_line("j", &unlimited, None).ends_with(", no speed limit"));
    }

    #[test]
    fn durations_read_in_hours_minutes_seconds() {
        assert_eq!(human_duration(Duration::from_millis(44_200)), "45s");
        assert_eq!(human_duration(Duration::from_secs(125)), "2m 05s");
        assert_eq!(human_duration(Duration::from_secs(3723)), "1h 02m 03s");
        // What an absurd estimate gives: no overflow.
        assert!(human_duration(Duration::MAX).starts_with(&format!("{}h ", u64::MAX / 3600)));
    }
}

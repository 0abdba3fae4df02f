//! `imgstream ctl`: drive a running daemon (imgstream serve or qemu-storage-daemon) over QMP.

use crate::qmp_client::QmpClient;
use crate::size::{human_size, parse_size};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

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
    /// Follow a job with a progress bar until it ends, then print its final event.
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

fn watch(client: &mut QmpClient, job: Option<String>) -> Result<u8> {
    let job = pick_job(client, job)?;
    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        while let Some(event) = client.next_event(Duration::from_millis(200))? {
            let name = event["event"].as_str().unwrap_or("");
            let data = &event["data"];
            let ours = data["device"].as_str() == Some(job.as_str());
            if ours && matches!(name, "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED") {
                bar.finish_and_clear();
                println!("{}", serde_json::to_string(&event)?);
                let failed = name == "BLOCK_JOB_CANCELLED" || data.get("error").is_some();
                return Ok(if failed { 1 } else { 0 });
            }
            if ours && name == "BLOCK_JOB_ERROR" {
                bar.println(format!("error: {data}"));
            }
        }
        let jobs = client.execute("query-block-jobs", None)?;
        let Some(info) = jobs.as_array().and_then(|all| {
            all.iter()
                .find(|j| j["device"].as_str() == Some(job.as_str()))
        }) else {
            // Gone without an event we saw (it ended before we subscribed).
            bar.finish_and_clear();
            println!("Job {job} is no longer active");
            return Ok(0);
        };
        bar.set_length(info["len"].as_u64().unwrap_or(0).max(1));
        bar.set_position(info["offset"].as_u64().unwrap_or(0));
        bar.set_message(format!(
            "{} speed limit {}",
            info["status"].as_str().unwrap_or(""),
            human_size(info["speed"].as_u64().unwrap_or(0))
        ));
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
}

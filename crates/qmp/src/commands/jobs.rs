//! Job queries and verbs: `query-block-jobs`, `query-jobs`, `block-job-*` and `job-*`.
//! A verb's effect shows up in events before its reply where QEMU's does (pause, resume,
//! cancel, finalize, dismiss), so each waits briefly for the job to get there.

use crate::args::Args;
use crate::error::{Failure, QmpError};
use crate::json::Json;
use crate::state::Daemon;
use imgstream_jobs::{Job, JobInfo, JobStatus, JobVerb};
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long pause and cancel wait for their effect before replying anyway: the job thread may
/// be in the middle of a chunk, or retrying I/O. Finalize and dismiss wait for theirs: the job
/// thread is waiting for just that verb, as QEMU's monitor runs them before it replies.
const VERB_SETTLE: Duration = Duration::from_secs(2);

#[derive(Serialize)]
struct BlockJobInfo<'a> {
    #[serde(rename = "auto-finalize")]
    auto_finalize: bool,
    #[serde(rename = "io-status")]
    io_status: &'a str,
    device: &'a str,
    #[serde(rename = "auto-dismiss")]
    auto_dismiss: bool,
    busy: bool,
    len: u64,
    offset: u64,
    status: &'a str,
    paused: bool,
    speed: u64,
    ready: bool,
    #[serde(rename = "type")]
    job_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

#[derive(Serialize)]
struct JobInfoReply<'a> {
    #[serde(rename = "current-progress")]
    current_progress: u64,
    status: &'a str,
    #[serde(rename = "total-progress")]
    total_progress: u64,
    #[serde(rename = "type")]
    job_type: &'a str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

/// Snapshots of the jobs, newest first, as QEMU lists them.
fn infos(daemon: &Daemon) -> Vec<JobInfo> {
    let entries = daemon.jobs();
    entries.iter().rev().map(|e| e.job.info()).collect()
}

pub fn query_block_jobs(daemon: &Daemon) -> Json {
    let infos = infos(daemon);
    let list: Vec<BlockJobInfo> = infos
        .iter()
        .map(|i| BlockJobInfo {
            auto_finalize: i.auto_finalize,
            io_status: i.io_status.name(),
            device: &i.id,
            auto_dismiss: i.auto_dismiss,
            busy: i.busy,
            len: i.len,
            offset: i.offset,
            status: i.status.name(),
            paused: i.paused,
            speed: i.speed,
            ready: false,
            job_type: i.job_type,
            error: i.error.as_deref(),
        })
        .collect();
    Json::of(&list)
}

pub fn query_jobs(daemon: &Daemon) -> Json {
    let infos = infos(daemon);
    let list: Vec<JobInfoReply> = infos
        .iter()
        .map(|i| JobInfoReply {
            current_progress: i.offset,
            status: i.status.name(),
            total_progress: i.len,
            job_type: i.job_type,
            id: &i.id,
            error: i.error.as_deref(),
        })
        .collect();
    Json::of(&list)
}

/// Which family of commands is asking: they name the job differently and answer an unknown
/// job differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// `block-job-*` with `device`: unknown → `DeviceNotActive`.
    BlockJob,
    /// `block-job-finalize`/`-dismiss` with `id`: unknown → `DeviceNotActive`.
    BlockJobId,
    /// `job-*` with `id`: unknown → `Job not found`.
    Job,
}

fn find(daemon: &Daemon, args: &Args, naming: Naming) -> Result<Job, QmpError> {
    let key = match naming {
        Naming::BlockJob => "device",
        Naming::BlockJobId | Naming::Job => "id",
    };
    let id = args.str(key).unwrap_or_default();
    daemon.job(id).ok_or_else(|| {
        match naming {
            Naming::Job => Failure::JobNotFound,
            _ => Failure::BlockJobNotFound(id.to_string()),
        }
        .into()
    })
}

/// Waits (off the async threads) until `done` holds for the job's status or, with a
/// `deadline`, that long passed.
async fn settle(job: &Job, done: fn(JobStatus) -> bool, deadline: Option<Duration>) {
    let job = job.clone();
    let waited = tokio::task::spawn_blocking(move || {
        let deadline = deadline.map(|after| Instant::now() + after);
        while !done(job.info().status) && deadline.is_none_or(|d| Instant::now() < d) {
            // Short slices: a change between the check and the wait is not missed for long.
            job.wait_change(Duration::from_millis(20));
        }
    })
    .await;
    if let Err(e) = waited {
        tracing::warn!("waiting for a job verb to take effect failed: {e}");
    }
}

fn ended(status: JobStatus) -> bool {
    matches!(status, JobStatus::Concluded | JobStatus::Null)
}

async fn cancel(job: Job) -> Result<Json, QmpError> {
    job.cancel().map_err(Failure::Verb)?;
    settle(&job, ended, Some(VERB_SETTLE)).await;
    Ok(Json::empty_object())
}

pub async fn block_job_cancel(daemon: &Daemon, args: &Args) -> Result<Json, QmpError> {
    let job = find(daemon, args, Naming::BlockJob)?;
    let force = args.bool("force").unwrap_or(false);
    // A stream has no soft cancel, so `force` only matters for a paused job.
    if job.info().paused && !force {
        return Err(QmpError::generic(format!(
            "The block job for device '{}' is currently paused",
            job.id()
        )));
    }
    cancel(job).await
}

pub async fn job_cancel(daemon: &Daemon, args: &Args) -> Result<Json, QmpError> {
    cancel(find(daemon, args, Naming::Job)?).await
}

pub async fn pause(daemon: &Daemon, args: &Args, naming: Naming) -> Result<Json, QmpError> {
    let job = find(daemon, args, naming)?;
    job.pause().map_err(Failure::Verb)?;
    settle(
        &job,
        |s| s != JobStatus::Running && s != JobStatus::Created,
        Some(VERB_SETTLE),
    )
    .await;
    Ok(Json::empty_object())
}

pub async fn resume(daemon: &Daemon, args: &Args, naming: Naming) -> Result<Json, QmpError> {
    let job = find(daemon, args, naming)?;
    job.resume().map_err(Failure::Verb)?;
    settle(&job, |s| s != JobStatus::Paused, Some(VERB_SETTLE)).await;
    Ok(Json::empty_object())
}

pub fn set_speed(daemon: &Daemon, args: &Args) -> Result<Json, QmpError> {
    let job = find(daemon, args, Naming::BlockJob)?;
    let speed = args.int("speed").unwrap_or(0);
    // QEMU checks the verb before the value.
    let Ok(speed) = u64::try_from(speed) else {
        let status = job.info().status;
        if !JobVerb::SetSpeed.allowed_in(status) {
            return Err(QmpError::generic(format!(
                "Job '{}' in state '{}' cannot accept command verb 'set-speed'",
                job.id(),
                status.name()
            )));
        }
        return Err(negative_speed());
    };
    job.set_speed(speed).map_err(Failure::Verb)?;
    Ok(Json::empty_object())
}

pub fn negative_speed() -> QmpError {
    QmpError::generic("Parameter 'speed' expects a non-negative value")
}

pub fn complete(daemon: &Daemon, args: &Args, naming: Naming) -> Result<Json, QmpError> {
    let job = find(daemon, args, naming)?;
    job.complete().map_err(Failure::Verb)?;
    Ok(Json::empty_object())
}

pub async fn finalize(daemon: &Daemon, args: &Args, naming: Naming) -> Result<Json, QmpError> {
    let job = find(daemon, args, naming)?;
    job.finalize().map_err(Failure::Verb)?;
    settle(&job, ended, None).await;
    Ok(Json::empty_object())
}

pub async fn dismiss(daemon: &Arc<Daemon>, args: &Args, naming: Naming) -> Result<Json, QmpError> {
    let job = find(daemon, args, naming)?;
    job.dismiss().map_err(Failure::Verb)?;
    settle(&job, |s| s == JobStatus::Null, None).await;
    Ok(Json::empty_object())
}

//! QMP event names and payloads for what jobs announce (QEMU's key order).

use crate::json::Json;
use imgstream_jobs::JobEvent;
use serde::Serialize;

#[derive(Serialize)]
struct StatusChange<'a> {
    status: &'a str,
    id: &'a str,
}

#[derive(Serialize)]
struct Finished<'a> {
    device: &'a str,
    len: u64,
    offset: u64,
    speed: u64,
    #[serde(rename = "type")]
    job_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

#[derive(Serialize)]
struct BlockJobError<'a> {
    device: &'a str,
    operation: &'a str,
    action: &'a str,
}

#[derive(Serialize)]
struct Pending<'a> {
    #[serde(rename = "type")]
    job_type: &'a str,
    id: &'a str,
}

pub const JOB_STATUS_CHANGE: &str = "JOB_STATUS_CHANGE";

/// `JOB_STATUS_CHANGE`'s payload.
pub fn status_change(id: &str, status: &str) -> Json {
    Json::of(&StatusChange { status, id })
}

/// The QMP event for a job event: name and payload.
pub fn job_event(event: &JobEvent) -> (&'static str, Json) {
    match event {
        JobEvent::StatusChange { id, status } => {
            (JOB_STATUS_CHANGE, status_change(id, status.name()))
        }
        JobEvent::Completed {
            id,
            job_type,
            len,
            offset,
            speed,
            error,
        } => (
            "BLOCK_JOB_COMPLETED",
            Json::of(&Finished {
                device: id,
                len: *len,
                offset: *offset,
                speed: *speed,
                job_type,
                error: error.as_deref(),
            }),
        ),
        JobEvent::Cancelled {
            id,
            job_type,
            len,
            offset,
            speed,
        } => (
            "BLOCK_JOB_CANCELLED",
            Json::of(&Finished {
                device: id,
                len: *len,
                offset: *offset,
                speed: *speed,
                job_type,
                error: None,
            }),
        ),
        JobEvent::Error {
            id,
            operation,
            action,
        } => (
            "BLOCK_JOB_ERROR",
            Json::of(&BlockJobError {
                device: id,
                operation,
                action: action.name(),
            }),
        ),
        JobEvent::Pending { id, job_type } => {
            ("BLOCK_JOB_PENDING", Json::of(&Pending { job_type, id }))
        }
    }
}

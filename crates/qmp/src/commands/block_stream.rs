//! `block-stream`: resolving device, base, base-node and bottom in the disk's chain, QEMU's
//! checks in QEMU's order (blockdev.c `qmp_block_stream`, then `stream_start`), and starting
//! the stream job with its events wired to the event bus.

use super::jobs::negative_speed;
use crate::args::Args;
use crate::error::QmpError;
use crate::events::{status_change, JOB_STATUS_CHANGE};
use crate::json::Json;
use crate::state::{id_wellformed, Daemon, JobEntry, Node};
use imgstream_block::{BackingRef, Layer};
use imgstream_jobs::{Job, JobOptions, JobStatus, OnError, StreamJob, StreamOptions};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// QEMU's node names must fit in 32 bytes with their NUL.
const MAX_NODE_NAME: usize = 31;

/// How long `block-stream` waits for a job with nothing to copy to finish, so that, as in
/// QEMU, its events come before the reply.
const NO_OP_SETTLE: Duration = Duration::from_secs(2);

fn not_found(device: &str, node: &str) -> QmpError {
    QmpError::generic(format!(
        "Cannot find device='{device}' nor node-name='{node}'"
    ))
}

fn busy(node: &str) -> QmpError {
    QmpError::generic(format!(
        "Node '{node}' is busy: block device is in use by block job: stream"
    ))
}

/// Looks a base-node/bottom name up (QEMU reports device='' for these).
fn lookup(daemon: &Daemon, name: &str) -> Result<Node, QmpError> {
    daemon.node(name).ok_or_else(|| not_found("", name))
}

/// Depth of `node` in `chain` (the device's disk's layers) if it lies at or below `from`.
fn depth_in(chain: &[Arc<Layer>], node: &Node, from: usize) -> Option<usize> {
    chain
        .iter()
        .enumerate()
        .skip(from)
        .find(|(_, l)| Arc::ptr_eq(l, &node.layer))
        .map(|(depth, _)| depth)
}

/// The layer below `from` that the `base` filename designates, matched as QEMU's
/// `bdrv_find_backing_image()` matches it: the name recorded by the overlay, the path the
/// layer was opened from, or the same file, a relative name being read from the overlay's
/// folder (not the daemon's).
fn find_base(chain: &[Arc<Layer>], from: usize, name: &str) -> Option<usize> {
    let canonical = |path: &Path| std::fs::canonicalize(path).ok();
    chain
        .iter()
        .enumerate()
        .skip(from + 1)
        .find(|(depth, layer)| {
            let overlay_folder = chain[depth - 1].path.parent().unwrap_or(Path::new(""));
            let wanted = canonical(&overlay_folder.join(name));
            layer.recorded_name == name
                || layer.path == Path::new(name)
                || wanted.is_some() && canonical(&layer.path) == wanted
        })
        .map(|(depth, _)| depth)
}

pub async fn block_stream(daemon: &Arc<Daemon>, args: &Args) -> Result<Json, QmpError> {
    let device = args.str("device").unwrap_or_default();
    let base = args.str("base");
    let base_node = args.str("base-node");
    let bottom = args.str("bottom");
    let backing_file = args.str("backing-file");

    if base.is_some() && base_node.is_some() {
        return Err(QmpError::generic(
            "'base' and 'base-node' cannot be specified at the same time",
        ));
    }
    if base.is_some() && bottom.is_some() {
        return Err(QmpError::generic(
            "'base' and 'bottom' cannot be specified at the same time",
        ));
    }
    if bottom.is_some() && base_node.is_some() {
        return Err(QmpError::generic(
            "'bottom' and 'base-node' cannot be specified at the same time",
        ));
    }

    // A job's filter node stands above its device and is as busy as the device.
    if daemon
        .jobs()
        .iter()
        .any(|j| j.filter.as_deref() == Some(device))
    {
        return Err(busy(device));
    }
    let node = daemon
        .node(device)
        .ok_or_else(|| not_found(device, device))?;
    let chain = node.disk.layers();
    // A node an earlier stream dropped from its disk's chain keeps its backing (as QEMU's
    // does), but no disk of ours holds that chain any more to stream it through.
    let Some(top) = node.depth() else {
        return Err(QmpError::generic(format!(
            "Node '{device}' was dropped from its chain by an earlier stream; streaming it \
             is not supported"
        )));
    };

    // Index of the kept base in `chain` (chain.len() = stream everything).
    let mut base_depth = chain.len();
    let mut base_given = false;
    if let Some(base) = base {
        base_depth = find_base(&chain, top, base).ok_or_else(|| {
            QmpError::generic(format!("Can't find '{base}' in the backing chain"))
        })?;
        base_given = true;
    }
    if let Some(name) = base_node {
        let base = lookup(daemon, name)?;
        base_depth = depth_in(&chain, &base, top + 1).ok_or_else(|| {
            QmpError::generic(format!(
                "Node '{name}' is not a backing image of '{device}'"
            ))
        })?;
        base_given = true;
    }
    if let Some(name) = bottom {
        let bottom = lookup(daemon, name)?;
        base_depth = depth_in(&chain, &bottom, top).ok_or_else(|| {
            QmpError::generic(format!(
                "Node '{name}' is not in a chain starting from '{device}'"
            ))
        })? + 1;
    }

    // The nodes this job would use: from the device down to the lowest copied one.
    let used: Vec<Arc<Layer>> = chain[top..base_depth.max(top + 1)].to_vec();
    let jobs = daemon.jobs();
    for layer in &used {
        if jobs
            .iter()
            .any(|j| j.layers.iter().any(|l| Arc::ptr_eq(l, layer)))
        {
            let name = daemon
                .node_name_of(layer)
                .unwrap_or_else(|| device.to_string());
            return Err(busy(&name));
        }
    }

    if !base_given && backing_file.is_some() {
        return Err(QmpError::generic(
            "backing file specified, but streaming the entire chain",
        ));
    }

    if !node.disk.is_writable() {
        return Err(QmpError::generic("Block node is read-only"));
    }
    if top != 0 {
        let below = chain
            .first()
            .and_then(|l| daemon.node_name_of(l))
            .unwrap_or_default();
        return Err(QmpError::generic(format!(
            "Node '{device}' is a backing image of '{below}': imgstream streams only into \
             the top image of a chain"
        )));
    }

    let filter = args.str("filter-node-name");
    if let Some(name) = filter {
        check_filter_name(daemon, &jobs, name)?;
    }

    let job_id = args.str("job-id").unwrap_or("");
    if !id_wellformed(job_id) {
        return Err(QmpError::generic(format!("Invalid job ID '{job_id}'")));
    }

    let job = {
        let mut registry = daemon.jobs_locked();
        if registry.iter().any(|j| j.id == job_id) {
            return Err(QmpError::generic(format!(
                "Job ID '{job_id}' already in use"
            )));
        }
        let Ok(speed) = u64::try_from(args.int("speed").unwrap_or(0)) else {
            // QEMU has created the job when it checks the speed, and destroys it again.
            drop(registry);
            daemon.emit(JOB_STATUS_CHANGE, status_change(job_id, "created"));
            daemon.emit(JOB_STATUS_CHANGE, status_change(job_id, "null"));
            return Err(negative_speed());
        };

        // What the header names once done: the base as it was opened (or `backing-file`).
        let new_backing = chain.get(base_depth).map(|base| BackingRef {
            name: backing_file
                .map(String::from)
                .unwrap_or_else(|| base.path.display().to_string()),
            // Our raw bases are `raw` format nodes, so `backing-mask-protocol` changes nothing.
            format: Some(base.format.name().to_string()),
        });
        let on_error = args
            .str("on-error")
            .and_then(OnError::parse)
            .unwrap_or(OnError::Report);
        let flush_after = imgstream_jobs::stream::flush_once_completed(node.disk.clone());
        let work = StreamJob::new(
            node.disk.clone(),
            StreamOptions {
                base_depth: base_depth - top,
                new_backing,
                rewrite_header_always: backing_file.is_some(),
                on_error,
                flush_interval: imgstream_jobs::stream::FLUSH_INTERVAL,
                // The guest comes first; the flush at the event writes back what is left.
                write_back_as_copied: false,
            },
        );
        let options = JobOptions {
            id: job_id.to_string(),
            speed,
            auto_finalize: args.bool("auto-finalize").unwrap_or(true),
            auto_dismiss: args.bool("auto-dismiss").unwrap_or(true),
        };
        // The registry stays locked until the job is in it, so that a job finishing at once
        // leaves it only after it was entered.
        let job = Job::start(
            options,
            Box::new(work),
            vec![daemon.job_listener(), flush_after],
        )
        .map_err(|e| QmpError::generic(e.message))?;
        registry.push(JobEntry {
            id: job_id.to_string(),
            job: job.clone(),
            layers: used,
            filter: filter.map(String::from),
        });
        job
    };

    if base_depth <= top + 1 {
        settle_no_op(job).await;
    }
    Ok(Json::empty_object())
}

/// QEMU's `bdrv_assign_node_name` checks, in its order, with `bdrv_insert_node`'s prefix.
fn check_filter_name(daemon: &Daemon, jobs: &[JobEntry], name: &str) -> Result<(), QmpError> {
    let fail = |why: String| QmpError::generic(format!("Could not create node: {why}"));
    if !id_wellformed(name) {
        return Err(fail(format!("Invalid node-name: '{name}'")));
    }
    if daemon.node(name).is_some() || jobs.iter().any(|j| j.filter.as_deref() == Some(name)) {
        return Err(fail(format!("Duplicate nodes with node-name='{name}'")));
    }
    if name.len() > MAX_NODE_NAME {
        return Err(fail("Node name too long".into()));
    }
    Ok(())
}

/// Lets a job with nothing to copy run to its end (or to `pending` without auto-finalize)
/// before the reply, as QEMU's does.
async fn settle_no_op(job: Job) {
    let waited = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + NO_OP_SETTLE;
        loop {
            let info = job.info();
            let status = info.status;
            let parked = (status == JobStatus::Pending && !info.auto_finalize)
                || (status == JobStatus::Concluded && !info.auto_dismiss);
            if status == JobStatus::Null || parked || Instant::now() >= deadline {
                return;
            }
            job.wait_change(Duration::from_millis(20));
        }
    })
    .await;
    if let Err(e) = waited {
        tracing::warn!("waiting for a no-op stream job failed: {e}");
    }
}

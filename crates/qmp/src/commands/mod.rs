//! Command dispatch: the table of commands we answer (name and QAPI arguments) and the call
//! of each handler once its arguments passed the QAPI checks.

mod block_stream;
pub mod blockdev;
pub mod exports;
mod jobs;
mod misc;
mod nodes;

use crate::args::{self, check, opt, req, ArgType, Args, Member};
use crate::error::{ErrorClass, QmpError};
use crate::json::Json;
use crate::qdict::KeyOrder;
use crate::qsd_args::Opts;
use crate::state::Daemon;
use serde_json::{Map, Value};
use std::sync::Arc;

pub use misc::{greeting, QEMU_VERSION};

/// QAPI `BlockdevOnError`.
pub const ON_ERROR: &[&str] = &["report", "ignore", "enospc", "stop", "auto"];
/// QAPI `QMPCapability`.
pub const CAPABILITIES: &[&str] = &["oob"];

const BLOCK_STREAM: &[Member] = &[
    opt("job-id", ArgType::Str),
    req("device", ArgType::Str),
    opt("base", ArgType::Str),
    opt("base-node", ArgType::Str),
    opt("backing-file", ArgType::Str),
    opt("backing-mask-protocol", ArgType::Bool),
    opt("bottom", ArgType::Str),
    opt("speed", ArgType::Int),
    opt("on-error", ArgType::Enum(ON_ERROR)),
    opt("filter-node-name", ArgType::Str),
    opt("auto-finalize", ArgType::Bool),
    opt("auto-dismiss", ArgType::Bool),
];
const DEVICE: &[Member] = &[req("device", ArgType::Str)];
const ID: &[Member] = &[req("id", ArgType::Str)];
const CANCEL: &[Member] = &[req("device", ArgType::Str), opt("force", ArgType::Bool)];
const SET_SPEED: &[Member] = &[req("device", ArgType::Str), req("speed", ArgType::Int)];
const FLAT: &[Member] = &[opt("flat", ArgType::Bool)];
pub(crate) const QMP_CAPABILITIES: &[Member] = &[opt("enable", ArgType::EnumList(CAPABILITIES))];
const NONE: &[Member] = &[];

/// Every command we answer, with its arguments as QAPI declares them.
pub const COMMANDS: &[(&str, &[Member])] = &[
    ("qmp_capabilities", QMP_CAPABILITIES),
    ("query-version", NONE),
    ("query-commands", NONE),
    ("quit", NONE),
    ("block-stream", BLOCK_STREAM),
    ("query-block-jobs", NONE),
    ("query-jobs", NONE),
    ("block-job-cancel", CANCEL),
    ("block-job-pause", DEVICE),
    ("block-job-resume", DEVICE),
    ("block-job-set-speed", SET_SPEED),
    ("block-job-complete", DEVICE),
    ("block-job-finalize", ID),
    ("block-job-dismiss", ID),
    ("job-cancel", ID),
    ("job-pause", ID),
    ("job-resume", ID),
    ("job-complete", ID),
    ("job-finalize", ID),
    ("job-dismiss", ID),
    ("query-named-block-nodes", FLAT),
    ("query-block-exports", NONE),
    ("query-block", NONE),
    // Free-form arguments (flat unions), checked by their handlers.
    ("blockdev-add", NONE),
    ("blockdev-del", BLOCKDEV_DEL),
    ("nbd-server-start", NONE),
    ("nbd-server-stop", NONE),
    ("block-export-add", NONE),
    ("block-export-del", NONE),
];

const BLOCKDEV_DEL: &[Member] = &[req("node-name", ArgType::Str)];

/// Commands whose arguments their handler reads itself.
const FREE_FORM: &[&str] = &[
    "blockdev-add",
    "nbd-server-start",
    "block-export-add",
    "block-export-del",
];

/// The declared arguments of `name`, if we have that command.
pub fn members(name: &str) -> Option<&'static [Member]> {
    COMMANDS.iter().find(|(n, _)| *n == name).map(|(_, m)| *m)
}

/// What a command asks of the session beyond its reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Continue,
    /// `quit`: close after the reply, then stop the daemon.
    Quit,
}

/// Checks the arguments of a command found in [`COMMANDS`] and runs it (all but
/// `qmp_capabilities`, which belongs to the session).
pub async fn dispatch(
    daemon: &Arc<Daemon>,
    name: &str,
    arguments: Map<String, Value>,
    order: KeyOrder,
) -> Result<(Json, After), QmpError> {
    let members = members(name).ok_or_else(|| not_found(name))?;
    if FREE_FORM.contains(&name) {
        let opts = Opts::qmp(arguments, order);
        let reply = match name {
            "blockdev-add" => {
                blockdev::blockdev_add(daemon, opts)?;
                Json::empty_object()
            }
            "nbd-server-start" => exports::nbd_server_start(daemon, opts, true)?,
            "block-export-add" => exports::block_export_add(daemon, opts)?,
            _ => exports::block_export_del(daemon, opts)?,
        };
        return Ok((reply, After::Continue));
    }
    let args: Args = args::check(members, arguments, &order)?;
    let reply = match name {
        "query-version" => misc::query_version(),
        "query-commands" => misc::query_commands(),
        "quit" => {
            // QSD deletes its exports on the way out and tells the monitors
            // (BLOCK_EXPORT_DELETED) before they close; ours close with the reply.
            let _ = exports::nbd_server_stop(daemon);
            return Ok((Json::empty_object(), After::Quit));
        }
        "block-stream" => block_stream::block_stream(daemon, &args).await?,
        "query-block-jobs" => jobs::query_block_jobs(daemon),
        "query-jobs" => jobs::query_jobs(daemon),
        "block-job-cancel" => jobs::block_job_cancel(daemon, &args).await?,
        "block-job-pause" => jobs::pause(daemon, &args, jobs::Naming::BlockJob).await?,
        "block-job-resume" => jobs::resume(daemon, &args, jobs::Naming::BlockJob).await?,
        "block-job-set-speed" => jobs::set_speed(daemon, &args)?,
        "block-job-complete" => jobs::complete(daemon, &args, jobs::Naming::BlockJob)?,
        "block-job-finalize" => jobs::finalize(daemon, &args, jobs::Naming::BlockJobId).await?,
        "block-job-dismiss" => jobs::dismiss(daemon, &args, jobs::Naming::BlockJobId).await?,
        "job-cancel" => jobs::job_cancel(daemon, &args).await?,
        "job-pause" => jobs::pause(daemon, &args, jobs::Naming::Job).await?,
        "job-resume" => jobs::resume(daemon, &args, jobs::Naming::Job).await?,
        "job-complete" => jobs::complete(daemon, &args, jobs::Naming::Job)?,
        "job-finalize" => jobs::finalize(daemon, &args, jobs::Naming::Job).await?,
        "job-dismiss" => jobs::dismiss(daemon, &args, jobs::Naming::Job).await?,
        "query-named-block-nodes" => nodes::query_named_block_nodes(daemon, &args),
        "query-block-exports" => nodes::query_block_exports(daemon),
        // A storage daemon has no guest devices.
        "query-block" => Json::of(&Vec::<Value>::new()),
        "blockdev-del" => {
            blockdev::blockdev_del(daemon, args.str("node-name").unwrap_or_default())?;
            Json::empty_object()
        }
        "nbd-server-stop" => exports::nbd_server_stop(daemon)?,
        _ => return Err(not_found(name)),
    };
    Ok((reply, After::Continue))
}

/// Checks `qmp_capabilities`' arguments; returns the capabilities asked for.
pub fn check_capabilities(
    arguments: Map<String, Value>,
    order: &KeyOrder,
) -> Result<Vec<String>, QmpError> {
    let args = check(QMP_CAPABILITIES, arguments, order)?;
    Ok(args
        .str_list("enable")
        .into_iter()
        .map(String::from)
        .collect())
}

pub fn not_found(name: &str) -> QmpError {
    QmpError::new(
        ErrorClass::CommandNotFound,
        format!("The command {name} has not been found"),
    )
}

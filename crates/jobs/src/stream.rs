//! The stream job: copy into the top image every range it still borrows from the layers
//! above the base, then make the header name the base (or nothing). Short, as QEMU's
//! block/stream.c is, because the block layer's copy-up does the hard part (serialising
//! against guest writes and re-checking allocation under the range lock).

use crate::error_policy::{ErrorAction, OnError};
use crate::job::{JobControl, JobError, JobWork};
use imgstream_block::{BackingRef, Disk};
use std::sync::Arc;

/// Bytes copied per step (QEMU's STREAM_BUFFER_SIZE is 512 KiB); also the granularity of
/// pause, cancel and rate limiting.
pub const STREAM_CHUNK: u64 = 512 << 10;

/// Copied bytes after which the job flushes the image, so that a crash loses at most this
/// much of the work done (a restarted stream skips what was flushed).
pub const FLUSH_INTERVAL: u64 = 256 << 20;

/// What to stream.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Index in the chain of the base image, which is kept (the chain length for a full
    /// stream). Layers `1..base_depth` are copied; `base_depth <= 1` copies nothing.
    pub base_depth: usize,
    /// What the header names when the job completes: `None` for a full stream.
    pub new_backing: Option<BackingRef>,
    /// Rewrite the header even when nothing is copied (a `backing-file` was given).
    pub rewrite_header_always: bool,
    pub on_error: OnError,
    /// Copied bytes between flushes ([`FLUSH_INTERVAL`] normally; crash tests lower it so
    /// that a small image sees several durable checkpoints).
    pub flush_interval: u64,
}

/// A stream job over an open disk.
pub struct StreamJob {
    disk: Arc<Disk>,
    options: StreamOptions,
}

impl StreamJob {
    pub fn new(disk: Arc<Disk>, options: StreamOptions) -> Self {
        StreamJob { disk, options }
    }
}

fn job_error(error: imgstream_block::Error) -> JobError {
    JobError::new(error.errno(), error.to_string())
}

impl JobWork for StreamJob {
    fn job_type(&self) -> &'static str {
        "stream"
    }

    fn run(&mut self, control: &JobControl) -> Result<(), JobError> {
        let base_depth = self.options.base_depth;
        if base_depth <= 1 {
            // Nothing lies between the top and the base: QEMU reports len 0.
            return Ok(());
        }
        let disk = &self.disk;
        let len = disk.size();
        control.set_len(len);
        // Guest reads now pull what they touch above the base, as QEMU's COR filter does.
        disk.set_copy_on_read(base_depth);
        let mut first_error = None;
        let mut since_flush = 0;
        let mut offset = 0;
        while offset < len {
            if !control.pause_point() {
                return Ok(());
            }
            let step = disk
                .copy_up_needed(offset, len - offset, base_depth)
                .and_then(|(needed, run)| {
                    if !needed {
                        return Ok((run, None));
                    }
                    let n = run.min(STREAM_CHUNK);
                    disk.populate(offset, n, base_depth)
                        .map(|done| (n, Some(done)))
                });
            match step {
                Ok((n, outcome)) => {
                    let written = outcome.map_or(0, |o| o.copied + o.zeroed);
                    control.progress(n, written);
                    if outcome.is_some() {
                        control.account(written);
                    }
                    since_flush += written;
                    if since_flush >= self.options.flush_interval.max(1) {
                        disk.flush().map_err(job_error)?;
                        since_flush = 0;
                    }
                    offset += n;
                }
                Err(error) => {
                    let error = job_error(error);
                    match control.error_action(self.options.on_error, &error) {
                        // Paused by the policy: retry the same range once resumed.
                        ErrorAction::Stop => continue,
                        ErrorAction::Report => return Err(error),
                        ErrorAction::Ignore => {
                            first_error.get_or_insert(error);
                            let n = STREAM_CHUNK.min(len - offset);
                            control.progress(n, 0);
                            offset += n;
                        }
                    }
                }
            }
        }
        disk.flush().map_err(job_error)?;
        // An ignored error still fails the job, and the header is left as it was.
        first_error.map_or(Ok(()), Err)
    }

    fn prepare(&mut self) -> Result<(), JobError> {
        let options = &self.options;
        if options.base_depth <= 1 && !options.rewrite_header_always {
            return Ok(());
        }
        if self.disk.layers().len() <= 1 && options.new_backing.is_none() {
            return Ok(());
        }
        self.disk
            .replace_backing(options.base_depth, options.new_backing.as_ref())
            .map_err(|e| JobError::new(libc::EPERM, e.to_string()))
    }

    fn clean(&mut self) {
        self.disk.set_copy_on_read(0);
    }
}

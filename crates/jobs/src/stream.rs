//! The stream job: copy into the top image every range it still borrows from the layers
//! above the base, then make the header name the base (or nothing). Short, as QEMU's
//! block/stream.c is, because the block layer's copy-up does the hard part (serialising
//! against guest writes and re-checking allocation under the range lock).

use crate::error_policy::{ErrorAction, OnError};
use crate::job::{JobControl, JobError, JobEvent, JobWork};
use crate::space_reservation::{SpaceReservation, RESERVATION_CHUNK};
use crate::writeback_pacer::{
    windows_left_dirty, FileRange, WindowClosed, WritebackPacer, WINDOWS_IN_FLIGHT,
};
use crate::writeback_starter::WritebackStarter;
use imgstream_block::{BackingRef, Disk, Writeback};
use std::sync::Arc;

/// Bytes copied per step under a speed limit (QEMU's STREAM_BUFFER_SIZE is 512 KiB): the
/// granularity of pause, cancel and rate limiting.
pub const STREAM_CHUNK: u64 = 512 << 10;

/// Bytes copied per step without a speed limit. A step holds its range exclusively, so a
/// guest request that lands in it waits for the whole step; fewer steps wake the copy
/// threads less often. bench/serve.py stream+fio, 5 runs interleaved with QSD, medians of
/// the per-run ratios to QSD (stream time, guest read p99, write p99): 1 MiB 0.88/0.93/0.98,
/// 4 MiB 0.76/0.94/0.99, 8 MiB 0.80/0.85/0.94. (Before the write gate and the NBD server's
/// own backend threads, 4 MiB steps had cost the guest: p99 1.24x QSD's against 1.02x.)
pub const UNLIMITED_CHUNK: u64 = 4 << 20;

/// The job flushes the image after this much copied data or [`FLUSH_PERIOD`], whichever
/// comes first, so a crash loses at most that much work (a restarted stream skips what was
/// flushed). Each flush waits for the device, so they must stay rare.
pub const FLUSH_INTERVAL: u64 = 4 << 30;
pub const FLUSH_PERIOD: std::time::Duration = std::time::Duration::from_secs(10);

/// Bytes the job copies before it waits for the flushes under way
/// ([`Disk::wait_for_flushes_under_way`]): at most this much of its copies lands in each
/// guest flush (about 15 ms of a disk that writes 1.2 GB/s). A flush makes durable
/// everything written before it, and a stream fills the page cache faster than a disk
/// empties it: copying on through the flushes of a guest that flushed every 8 writes made
/// each of them wait for nearly the whole stream (1.0-1.2 s, QSD 31-65 ms p99). Under that
/// guest, held to 12000 IOPS (bench/results/serve-2026-11-27-deferred-header.md, 3-4 runs
/// interleaved with QSD, medians of per-run ratios): waiting at every 4 MiB step gave the
/// guest 3.55x QSD's IOPS and 0.60x its flush p99 but took 2.21x QSD's stream time; 8 MiB
/// 0.90x the time, 2.05x the IOPS, flush p99 0.44x; 16 MiB 0.68-0.72x the time, 1.04-1.48x
/// the IOPS, flush p99 0.80-2.09x (QSD's own moved between 28 and 275 ms); 64 MiB 0.50x the
/// time but 0.40x the IOPS.
pub const FLUSH_YIELD_BYTES: u64 = 16 << 20;

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
    /// Write back each window of copies as it closes, for a stream whose end waits for the
    /// device anyway (the `stream` command: the copies and their writeback overlap). Otherwise
    /// what fits under the kernel's background threshold is left to the page cache
    /// ([`windows_left_dirty`]), for a daemon whose guest would compete with that writeback.
    pub write_back_as_copied: bool,
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

/// Starts and waits for writeback as the pacer asks. A wait failing is only logged: writeback
/// is a hint, and the flush that makes the data durable reports the real problem.
fn write_back(disk: &Disk, starter: &mut WritebackStarter, closed: WindowClosed) {
    let Some(start) = closed.start else {
        return;
    };
    starter.start(start);
    if let Some((offset, len)) = closed.wait.filter(|&(_, len)| len > 0) {
        // The window waited for is the oldest in flight: its writeback must have been started
        // for the wait to wait for anything.
        starter.wait_until_started_all_but(WINDOWS_IN_FLIGHT);
        if let Err(error) = disk.write_back(offset, len, Writeback::AwaitStarted) {
            tracing::debug!("writeback of {len} bytes at {offset} not waited for: {error}");
        }
    }
}

/// Starts the writeback of `(offset, len)` of the top's file. Errors are only logged, as
/// above.
fn start_writeback(disk: &Disk, (offset, len): FileRange) {
    // A length of 0 would mean "to the end of the file": an empty window has nothing to do.
    if len == 0 {
        return;
    }
    if let Err(error) = disk.write_back(offset, len, Writeback::Start) {
        tracing::debug!("writeback of {len} bytes at {offset} not started: {error}");
    }
}

/// Reserves the top's space for what is left to copy, as `reservation` decides, at a file
/// length of `file_len`.
fn reserve_space(
    disk: &Disk,
    reservation: &mut SpaceReservation,
    file_len: u64,
    base_depth: usize,
) {
    reservation.top_up(
        file_len,
        |from| count_to_copy(disk, from, base_depth),
        |offset, len| {
            disk.reserve_top(offset, len).unwrap_or_else(|error| {
                tracing::debug!("no space reserved for the stream: {error}");
                false
            })
        },
    );
}

/// Bytes to copy from guest offset `from`, up to [`RESERVATION_CHUNK`], and where the count
/// stopped. An error ends the count there: the reservation is only a hint, and the copy
/// reports the error.
fn count_to_copy(disk: &Disk, from: u64, base_depth: usize) -> (u64, u64) {
    let len = disk.size();
    let (mut pos, mut found) = (from, 0);
    while pos < len && found < RESERVATION_CHUNK {
        let Ok((needed, run)) = disk.copy_up_needed(pos, len - pos, base_depth) else {
            return (found, len);
        };
        let run = if needed {
            let run = run.min(RESERVATION_CHUNK - found);
            found += run;
            run
        } else {
            run
        };
        pos += run.max(1);
    }
    (found, pos.min(len))
}

/// A listener for a stream job's events that starts a flush of `disk`, on a thread of its own,
/// once the job has completed. That flush writes the header change the job scheduled, after
/// the copied data is durable ([`Disk::replace_backing`]).
///
/// The job itself does not wait for the device: `BLOCK_JOB_COMPLETED` comes when the copies
/// are in the page cache and the chain is replaced in memory, as QEMU's does (its header
/// rewrite is not flushed either, and its copies are not flushed at all). Waiting for
/// durability first made our stream's time that of the device: on a machine whose disk wrote
/// the bench chain's 1.22 GiB in 0.85 s, 1.0-1.35x QSD's time with no guest I/O and 1.8-2.0x
/// under a rate-limited guest, against 0.67x and 0.86x without the flush
/// (bench/results/serve-2026-11-27-deferred-header.md).
pub fn flush_once_completed(disk: Arc<Disk>) -> Arc<dyn Fn(&JobEvent) + Send + Sync> {
    Arc::new(move |event| {
        if !matches!(event, JobEvent::Completed { error: None, .. }) {
            return;
        }
        let disk = Arc::clone(&disk);
        let spawned = std::thread::Builder::new()
            .name("imgstream-flush".into())
            .spawn(move || {
                if let Err(error) = disk.flush() {
                    tracing::warn!("flushing the image after its stream completed failed: {error}");
                }
            });
        if let Err(error) = spawned {
            tracing::warn!("no thread to flush the streamed image ({error}): its header changes at the next flush");
        }
    })
}

fn job_error(error: imgstream_block::Error) -> JobError {
    JobError::new(error.errno(), error.to_string())
}

impl StreamJob {
    /// Copies what the top borrows from above the base, flushing the top now and then.
    fn copy(&self, control: &JobControl, starter: &mut WritebackStarter) -> Result<(), JobError> {
        let base_depth = self.options.base_depth;
        let disk = &self.disk;
        let len = disk.size();
        let mut first_error = None;
        let mut since_flush = 0;
        // Written since the job last let the guest's flushes under way end.
        let mut since_wait = 0;
        let file_len = disk.top_file_len().unwrap_or(0);
        let mut reservation = SpaceReservation::new();
        reserve_space(disk, &mut reservation, file_len, base_depth);
        let left_dirty = if self.options.write_back_as_copied {
            0
        } else {
            windows_left_dirty()
        };
        let mut pacer = WritebackPacer::new(file_len, left_dirty);
        let mut last_flush = std::time::Instant::now();
        let mut offset = 0;
        while offset < len {
            if !control.pause_point() {
                return Ok(());
            }
            if since_wait >= FLUSH_YIELD_BYTES {
                disk.wait_for_flushes_under_way();
                since_wait = 0;
            }
            let step = disk
                .copy_up_needed(offset, len - offset, base_depth)
                .and_then(|(needed, run)| {
                    if !needed {
                        return Ok((run, None));
                    }
                    let chunk = if control.speed() == 0 {
                        UNLIMITED_CHUNK
                    } else {
                        STREAM_CHUNK
                    };
                    let n = run.min(chunk);
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
                    since_wait += written;
                    // Zero clusters write no data: only copied bytes fill a window.
                    let data = outcome.map_or(0, |o| o.copied);
                    if let Some(closed) = pacer.copied(data, || disk.top_file_len().ok()) {
                        write_back(disk, starter, closed);
                        reserve_space(disk, &mut reservation, closed.end, base_depth);
                    }
                    if since_flush >= self.options.flush_interval.max(1)
                        || (since_flush > 0 && last_flush.elapsed() >= FLUSH_PERIOD)
                    {
                        disk.flush().map_err(job_error)?;
                        since_flush = 0;
                        last_flush = std::time::Instant::now();
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
        // No flush here: the header change that `prepare` schedules is written by the flush
        // after it, once all of this is durable ([`flush_once_completed`]).
        // An ignored error still fails the job, and the header is left as it was.
        first_error.map_or(Ok(()), Err)
    }
}

impl JobWork for StreamJob {
    fn job_type(&self) -> &'static str {
        "stream"
    }

    fn total_bytes(&self) -> u64 {
        if self.options.base_depth <= 1 {
            // Nothing lies between the top and the base: QEMU reports len 0.
            0
        } else {
            self.disk.size()
        }
    }

    fn run(&mut self, control: &JobControl) -> Result<(), JobError> {
        let base_depth = self.options.base_depth;
        if base_depth <= 1 {
            // Nothing lies between the top and the base: QEMU reports len 0.
            return Ok(());
        }
        // This thread copies too (its share of each step): background work, below the guest.
        imgstream_block::become_background_thread();
        // Guest reads now pull what they touch above the base, as QEMU's COR filter does.
        self.disk.set_copy_on_read(base_depth);
        // The job copies on while a thread of its own starts each window's writeback.
        let this = &*self;
        let start = |range| start_writeback(&this.disk, range);
        std::thread::scope(|scope| this.copy(control, &mut WritebackStarter::new(scope, &start)))
    }

    /// Drops the streamed layers from the chain and schedules the header change: nothing is
    /// written yet (see [`Disk::replace_backing`]), so the guest is held only briefly.
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

//! A job: its state machine, progress and speed, the verbs clients call on it (with QEMU's
//! errors), the events it emits, and the pause/cancel/throttle points its work calls between
//! chunks. The work itself runs on a thread of its own.

use crate::error_policy::{strerror, ErrorAction, IoStatus, OnError};
use crate::rate_limit::RateLimit;
use crate::status::{JobStatus, JobVerb};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Something that went wrong in a job's work, with the errno QEMU would report.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    pub errno: i32,
    pub message: String,
}

impl JobError {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        JobError {
            errno,
            message: message.into(),
        }
    }
}

/// A verb refused in the job's current state, with QEMU's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct VerbError(pub String);

/// What a job announces (the QMP events it maps to are named on each variant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    /// `JOB_STATUS_CHANGE`
    StatusChange { id: String, status: JobStatus },
    /// `BLOCK_JOB_COMPLETED` (with `error` on failure)
    Completed {
        id: String,
        job_type: &'static str,
        len: u64,
        offset: u64,
        speed: u64,
        error: Option<String>,
    },
    /// `BLOCK_JOB_CANCELLED`
    Cancelled {
        id: String,
        job_type: &'static str,
        len: u64,
        offset: u64,
        speed: u64,
    },
    /// `BLOCK_JOB_ERROR`
    Error {
        id: String,
        operation: &'static str,
        action: ErrorAction,
    },
    /// `BLOCK_JOB_PENDING`
    Pending { id: String, job_type: &'static str },
}

/// The work a job does. `run` calls [`JobControl`]'s points between chunks.
pub trait JobWork: Send + 'static {
    /// The job type on the wire (`stream`).
    fn job_type(&self) -> &'static str;
    /// Total work in bytes, known before the job starts (reported from `created` on).
    fn total_bytes(&self) -> u64;
    /// Does the work; an error fails the job.
    fn run(&mut self, control: &JobControl) -> Result<(), JobError>;
    /// Applies the result (e.g. rewrites the image header) once the job succeeded and is
    /// being finalized. An error fails the job.
    fn prepare(&mut self) -> Result<(), JobError>;
    /// Always called last, whatever the outcome.
    fn clean(&mut self);
}

/// A snapshot of a job for queries.
#[derive(Debug, Clone, PartialEq)]
pub struct JobInfo {
    pub id: String,
    pub job_type: &'static str,
    pub status: JobStatus,
    /// Total work in bytes (the virtual size for stream).
    pub len: u64,
    /// Work done in bytes (copied or skipped).
    pub offset: u64,
    /// Bytes actually copied into the image.
    pub copied: u64,
    pub speed: u64,
    pub busy: bool,
    pub paused: bool,
    pub io_status: IoStatus,
    pub error: Option<String>,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
    /// Seconds since the job started.
    pub elapsed: Duration,
    /// Estimated time left, from the progress rate so far.
    pub remaining: Option<Duration>,
}

type Listener = Arc<dyn Fn(&JobEvent) + Send + Sync>;

struct State {
    status: JobStatus,
    user_paused: bool,
    pause_count: u32,
    cancelled: bool,
    limit: RateLimit,
    speed: u64,
    len: u64,
    offset: u64,
    copied: u64,
    io_status: IoStatus,
    error: Option<String>,
    auto_finalize: bool,
    auto_dismiss: bool,
    busy: bool,
    finalize_requested: bool,
    dismiss_requested: bool,
    finished: bool,
    started: Instant,
}

struct Inner {
    id: String,
    job_type: &'static str,
    state: Mutex<State>,
    wake: Condvar,
    listeners: Vec<Listener>,
}

/// A handle to a job; clones refer to the same job.
#[derive(Clone)]
pub struct Job {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("id", &self.inner.id).finish()
    }
}

/// How a job is set up.
#[derive(Debug, Clone)]
pub struct JobOptions {
    pub id: String,
    pub speed: u64,
    pub auto_finalize: bool,
    pub auto_dismiss: bool,
}

impl Job {
    /// Creates the job, moves it to `running` (both announced before this returns, as QEMU
    /// does before answering `block-stream`), and starts its work on a new thread.
    pub fn start(
        options: JobOptions,
        work: Box<dyn JobWork>,
        listeners: Vec<Listener>,
    ) -> Result<Job, JobError> {
        let now = Instant::now();
        let job = Job {
            inner: Arc::new(Inner {
                id: options.id,
                job_type: work.job_type(),
                state: Mutex::new(State {
                    status: JobStatus::Undefined,
                    user_paused: false,
                    pause_count: 0,
                    cancelled: false,
                    limit: RateLimit::new(options.speed),
                    speed: options.speed,
                    len: work.total_bytes(),
                    offset: 0,
                    copied: 0,
                    io_status: IoStatus::Ok,
                    error: None,
                    auto_finalize: options.auto_finalize,
                    auto_dismiss: options.auto_dismiss,
                    busy: true,
                    finalize_requested: false,
                    dismiss_requested: false,
                    finished: false,
                    started: now,
                }),
                wake: Condvar::new(),
                listeners,
            }),
        };
        {
            let mut state = job.lock();
            job.transition(&mut state, JobStatus::Created);
            job.transition(&mut state, JobStatus::Running);
        }
        let runner = job.clone();
        std::thread::Builder::new()
            .name(format!("job-{}", job.inner.id))
            .spawn(move || runner.run(work))
            .map_err(|e| JobError::new(libc::EAGAIN, format!("Could not start job thread: {e}")))?;
        Ok(job)
    }

    pub fn id(&self) -> &str {
        &self.inner.id
    }

    pub fn job_type(&self) -> &'static str {
        self.inner.job_type
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, event: JobEvent) {
        for listener in &self.inner.listeners {
            listener(&event);
        }
    }

    /// Moves to `next`, announcing it (only real changes are announced, as in QEMU).
    fn transition(&self, state: &mut State, next: JobStatus) {
        if state.status == next {
            return;
        }
        debug_assert!(
            state.status.can_become(next),
            "illegal job transition {:?} -> {:?}",
            state.status,
            next
        );
        state.status = next;
        self.emit(JobEvent::StatusChange {
            id: self.inner.id.clone(),
            status: next,
        });
        self.inner.wake.notify_all();
    }

    pub fn info(&self) -> JobInfo {
        let state = self.lock();
        let elapsed = state.started.elapsed();
        let remaining = (state.offset > 0 && state.offset < state.len).then(|| {
            let rate = state.offset as f64 / elapsed.as_secs_f64().max(1e-6);
            Duration::from_secs_f64((state.len - state.offset) as f64 / rate)
        });
        JobInfo {
            id: self.inner.id.clone(),
            job_type: self.inner.job_type,
            status: state.status,
            len: state.len,
            offset: state.offset,
            copied: state.copied,
            speed: state.speed,
            busy: state.busy,
            paused: state.pause_count > 0,
            io_status: state.io_status,
            error: state.error.clone(),
            auto_finalize: state.auto_finalize,
            auto_dismiss: state.auto_dismiss,
            elapsed,
            remaining,
        }
    }

    fn check_verb(&self, state: &State, verb: JobVerb) -> Result<(), VerbError> {
        if verb.allowed_in(state.status) {
            Ok(())
        } else {
            Err(VerbError(format!(
                "Job '{}' in state '{}' cannot accept command verb '{}'",
                self.inner.id,
                state.status.name(),
                verb.name()
            )))
        }
    }

    /// A user pause; the job stops at its next pause point.
    pub fn pause(&self) -> Result<(), VerbError> {
        let mut state = self.lock();
        self.check_verb(&state, JobVerb::Pause)?;
        if state.user_paused {
            return Err(VerbError("Job is already paused".into()));
        }
        state.user_paused = true;
        state.pause_count += 1;
        self.inner.wake.notify_all();
        Ok(())
    }

    /// Ends a user pause (or an error stop, which is one); resets the I/O status.
    pub fn resume(&self) -> Result<(), VerbError> {
        let mut state = self.lock();
        self.check_verb(&state, JobVerb::Resume)?;
        if !state.user_paused {
            return Err(VerbError("Can't resume a job that was not paused".into()));
        }
        state.user_paused = false;
        state.pause_count -= 1;
        state.io_status = IoStatus::Ok;
        self.inner.wake.notify_all();
        Ok(())
    }

    /// Cancels: the job stops at its next pause point and changes nothing more.
    pub fn cancel(&self) -> Result<(), VerbError> {
        let mut state = self.lock();
        self.check_verb(&state, JobVerb::Cancel)?;
        state.cancelled = true;
        if state.user_paused {
            state.user_paused = false;
            state.pause_count -= 1;
        }
        self.inner.wake.notify_all();
        Ok(())
    }

    /// Changes the speed limit (bytes per second, 0 = none) while running.
    pub fn set_speed(&self, speed: u64) -> Result<(), VerbError> {
        let mut state = self.lock();
        self.check_verb(&state, JobVerb::SetSpeed)?;
        state.speed = speed;
        state.limit.set_speed(speed);
        self.inner.wake.notify_all();
        Ok(())
    }

    /// Stream jobs have no completion phase; this is always refused, as QEMU refuses it.
    pub fn complete(&self) -> Result<(), VerbError> {
        let state = self.lock();
        self.check_verb(&state, JobVerb::Complete)?;
        Ok(())
    }

    /// Lets a job waiting in `pending` (auto-finalize off) apply its result.
    pub fn finalize(&self) -> Result<(), VerbError> {
        let mut state = self.lock();
        self.check_verb(&state, JobVerb::Finalize)?;
        state.finalize_requested = true;
        self.inner.wake.notify_all();
        Ok(())
    }

    /// Removes a concluded job (auto-dismiss off).
    pub fn dismiss(&self) -> Result<(), VerbError> {
        let mut state = self.lock();
        self.check_verb(&state, JobVerb::Dismiss)?;
        state.dismiss_requested = true;
        self.inner.wake.notify_all();
        Ok(())
    }

    /// Waits until the job has reached `concluded` (or `null`), and returns its error, if any.
    pub fn wait_concluded(&self) -> Option<String> {
        let mut state = self.lock();
        while !matches!(state.status, JobStatus::Concluded | JobStatus::Null) {
            state = self
                .inner
                .wake
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        state.error.clone()
    }

    /// Waits up to `timeout` for the job's state to change; returns the status.
    pub fn wait_change(&self, timeout: Duration) -> JobStatus {
        let state = self.lock();
        let (state, _) = self
            .inner
            .wake
            .wait_timeout(state, timeout)
            .unwrap_or_else(|p| p.into_inner());
        state.status
    }

    /// Whether the job's thread has finished everything (status `null` or `concluded`
    /// waiting for dismiss).
    pub fn is_finished(&self) -> bool {
        self.lock().finished
    }

    fn run(&self, mut work: Box<dyn JobWork>) {
        let control = JobControl { job: self.clone() };
        let result = work.run(&control);
        let mut state = self.lock();
        state.busy = false;
        match result {
            Ok(()) if !state.cancelled => {
                self.transition(&mut state, JobStatus::Waiting);
                self.transition(&mut state, JobStatus::Pending);
                if !state.auto_finalize {
                    self.emit(JobEvent::Pending {
                        id: self.inner.id.clone(),
                        job_type: self.inner.job_type,
                    });
                    while !state.finalize_requested && !state.cancelled {
                        state = self
                            .inner
                            .wake
                            .wait(state)
                            .unwrap_or_else(|p| p.into_inner());
                    }
                }
                if state.cancelled {
                    self.abort_cancelled(&mut state);
                } else {
                    drop(state);
                    let prepared = work.prepare();
                    state = self.lock();
                    match prepared {
                        Ok(()) => self.emit(self.completed_event(&state, None)),
                        Err(error) => self.abort_failed(&mut state, &error),
                    }
                }
            }
            Ok(()) => self.abort_cancelled(&mut state),
            Err(_) if state.cancelled => self.abort_cancelled(&mut state),
            Err(error) => self.abort_failed(&mut state, &error),
        }
        drop(state);
        work.clean();
        // Let go of what the work holds (its disk) before anyone can see the job finished: a
        // command that exits once its job is finished then closes the image itself, instead
        // of racing this thread to it.
        drop(work);
        let mut state = self.lock();
        self.transition(&mut state, JobStatus::Concluded);
        if !state.auto_dismiss {
            state.finished = true;
            while !state.dismiss_requested {
                state = self
                    .inner
                    .wake
                    .wait(state)
                    .unwrap_or_else(|p| p.into_inner());
            }
        }
        self.transition(&mut state, JobStatus::Null);
        state.finished = true;
        self.inner.wake.notify_all();
    }

    fn completed_event(&self, state: &State, error: Option<String>) -> JobEvent {
        JobEvent::Completed {
            id: self.inner.id.clone(),
            job_type: self.inner.job_type,
            len: state.len,
            offset: state.offset,
            speed: state.speed,
            error,
        }
    }

    fn abort_cancelled(&self, state: &mut State) {
        self.transition(state, JobStatus::Aborting);
        state.error = Some("Operation canceled".into());
        self.emit(JobEvent::Cancelled {
            id: self.inner.id.clone(),
            job_type: self.inner.job_type,
            len: state.len,
            offset: state.offset,
            speed: state.speed,
        });
    }

    fn abort_failed(&self, state: &mut State, error: &JobError) {
        self.transition(state, JobStatus::Aborting);
        let text = strerror(error.errno);
        state.error = Some(text.clone());
        self.emit(self.completed_event(state, Some(text)));
    }
}

/// What a job's work sees of its job: progress reporting, and the points where it pauses,
/// notices cancellation, sleeps for the speed limit, and applies its error policy.
pub struct JobControl {
    job: Job,
}

impl JobControl {
    /// Records `processed` more bytes of progress, `copied` of which were written.
    pub fn progress(&self, processed: u64, copied: u64) {
        let mut state = self.job.lock();
        state.offset += processed;
        state.copied += copied;
    }

    /// Accounts `bytes` of copied data against the speed limit.
    pub fn account(&self, bytes: u64) {
        let mut state = self.job.lock();
        state.limit.delay_at(bytes, Instant::now());
    }

    /// The current speed limit (0 = none).
    pub fn speed(&self) -> u64 {
        self.job.lock().speed
    }

    pub fn is_cancelled(&self) -> bool {
        self.job.lock().cancelled
    }

    /// The point between chunks: parks while paused, sleeps as the speed limit demands
    /// (waking early for cancel, pause or a new speed). Returns false if the job is cancelled.
    pub fn pause_point(&self) -> bool {
        let job = &self.job;
        let mut state = job.lock();
        loop {
            if state.cancelled {
                return false;
            }
            if state.pause_count > 0 {
                state.busy = false;
                job.transition(&mut state, JobStatus::Paused);
                while state.pause_count > 0 && !state.cancelled {
                    state = job
                        .inner
                        .wake
                        .wait(state)
                        .unwrap_or_else(|p| p.into_inner());
                }
                job.transition(&mut state, JobStatus::Running);
                state.busy = true;
                continue;
            }
            let delay = state.limit.delay_at(0, Instant::now());
            if delay.is_zero() {
                return true;
            }
            state.busy = false;
            let (next, _) = job
                .inner
                .wake
                .wait_timeout(state, delay)
                .unwrap_or_else(|p| p.into_inner());
            state = next;
            state.busy = true;
        }
    }

    /// Applies `policy` to an I/O error, announcing `BLOCK_JOB_ERROR` (stream always says
    /// `read`). With `stop`, the job is user-paused and the caller retries the same range
    /// after the next pause point.
    pub fn error_action(&self, policy: OnError, error: &JobError) -> ErrorAction {
        let action = policy.action_for(error.errno);
        let job = &self.job;
        let mut state = job.lock();
        job.emit(JobEvent::Error {
            id: job.inner.id.clone(),
            operation: "read",
            action,
        });
        if action == ErrorAction::Stop {
            state.io_status = if error.errno == libc::ENOSPC {
                IoStatus::Nospace
            } else {
                IoStatus::Failed
            };
            if !state.user_paused {
                state.user_paused = true;
                state.pause_count += 1;
            }
        }
        action
    }
}

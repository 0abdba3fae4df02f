//! The threads that run backend calls: a fixed pool of the server's own, fed in arrival order.
//!
//! Backend calls block (they are file I/O), so they cannot run on the async runtime's
//! workers. tokio's blocking pool was the first home for them, but every call then went
//! through that pool's shared mutex, and on two busy cores its holder was often preempted:
//! a sched profile during a stream under guest load showed the runtime's workers stalled
//! there for over a millisecond 15 times in 0.8 s, each stall holding up every request of
//! the connection. With this pool (bench/serve.py stream+fio, 5 runs interleaved with QSD)
//! the guest's read p99 went from 1.9-2.7 ms to 1.5-2.0 ms (QSD: 1.8-2.3 ms) and the stream
//! from 1.27-1.61 s to 1.10-1.35 s (QSD: 1.39-1.52 s).
//!
//! The queue's lock is held only to add or take a call; idle threads wait on a condition
//! variable, so each call that arrives wakes a thread of its own. The pool's first queue was a
//! channel whose receiver the threads shared behind a lock, held while waiting: one idle
//! thread waited for calls and the others for that lock. Two calls arriving together then
//! took two wakeups in turn, the second thread only getting the lock once the first had been
//! scheduled; on two busy cores each wakeup can take a millisecond. With this queue (8 runs
//! interleaved with QSD, medians of per-run ratios) the guest's read/write p99 during a stream
//! went from 1.13/1.17x QSD's to 0.93/1.04x (stream+fio) and from 1.31/1.21x to 1.00/1.00x
//! (stream+fio-rate); the guest's IOPS from 1.51x to 1.62x.

use crate::export::BackendError;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

type Call = Box<dyn FnOnce() + Send>;

/// Calls waiting for a thread, and whether the pool is closing.
#[derive(Default)]
struct Pending {
    calls: VecDeque<Call>,
    closed: bool,
}

/// The pool's queue: see the module documentation.
#[derive(Default)]
struct CallQueue {
    pending: Mutex<Pending>,
    /// Signalled once per call added, and to every thread when the pool closes.
    ready: Condvar,
}

impl CallQueue {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Only whole calls are added and taken under the lock: a panic leaves it consistent.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, call: Call) {
        self.pending().calls.push_back(call);
        self.ready.notify_one();
    }

    /// The next call, waiting for one; `None` once the pool is closing.
    fn next(&self) -> Option<Call> {
        let mut pending = self.pending();
        loop {
            if let Some(call) = pending.calls.pop_front() {
                return Some(call);
            }
            if pending.closed {
                return None;
            }
            pending = self
                .ready
                .wait(pending)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn close(&self) {
        self.pending().closed = true;
        self.ready.notify_all();
    }
}

impl std::fmt::Debug for CallQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallQueue").finish_non_exhaustive()
    }
}

/// Runs backend calls, at most as many at once as it has threads, the others queued in
/// arrival order; with no threads, every call gets a thread of tokio's blocking pool.
#[derive(Debug)]
pub(crate) struct BackendWorkers {
    queue: Option<Arc<CallQueue>>,
}

impl BackendWorkers {
    /// A pool of `threads` threads (0: [`unlimited`](Self::unlimited)).
    pub(crate) fn new(threads: usize) -> std::io::Result<Self> {
        if threads == 0 {
            return Ok(Self::unlimited());
        }
        let queue = Arc::new(CallQueue::default());
        // Built first, so that a failed spawn closes the queue and stops the threads started.
        let workers = BackendWorkers {
            queue: Some(Arc::clone(&queue)),
        };
        for index in 0..threads {
            let queue = Arc::clone(&queue);
            std::thread::Builder::new()
                .name(format!("nbd-backend-{index}"))
                .spawn(move || run_calls(&queue))?;
        }
        Ok(workers)
    }

    /// No threads of its own: every call gets a thread of tokio's blocking pool.
    pub(crate) fn unlimited() -> Self {
        BackendWorkers { queue: None }
    }

    /// Runs `call` on a pool thread and waits for its result; a panic becomes `EIO`.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        call: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let Some(queue) = &self.queue else {
            return run_on_blocking_pool(call).await;
        };
        let (reply, result) = tokio::sync::oneshot::channel();
        let job: Call = Box::new(move || {
            let outcome = catch_unwind(AssertUnwindSafe(call)).unwrap_or_else(|_| Err(panicked()));
            // The request may have been dropped (its connection closed): nobody to tell.
            let _ = reply.send(outcome);
        });
        // The threads only stop when the pool is dropped, which is after this borrow ends.
        queue.push(job);
        result.await.unwrap_or_else(|_| Err(panicked()))
    }
}

impl Drop for BackendWorkers {
    /// The threads finish the calls queued, then stop.
    fn drop(&mut self) {
        if let Some(queue) = &self.queue {
            queue.close();
        }
    }
}

/// A worker's life: take the next call, run it, until the pool is dropped.
fn run_calls(queue: &CallQueue) {
    while let Some(call) = queue.next() {
        call();
    }
}

/// Runs a call on tokio's blocking pool; a panic becomes `EIO`.
pub(crate) async fn run_on_blocking_pool<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
) -> Result<T, BackendError> {
    tokio::task::spawn_blocking(call)
        .await
        .unwrap_or_else(|_| Err(panicked()))
}

fn panicked() -> BackendError {
    BackendError::new(libc::EIO, "Backend call panicked")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_call_fails_with_eio_and_the_thread_serves_the_next_one() {
        let workers = BackendWorkers::new(1).unwrap();
        let failed = workers
            .run(|| -> Result<(), BackendError> { panic!("backend bug") })
            .await
            .unwrap_err();
        assert_eq!(failed.nbd_error(), crate::protocol::NBD_EIO);
        assert_eq!(workers.run(|| Ok(7)).await.unwrap(), 7);
    }

    /// Every thread takes a call while the others are busy: calls that each wait for all of
    /// them to have started complete only if each found a thread of its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn as_many_calls_run_at_once_as_the_pool_has_threads() {
        const THREADS: usize = 4;
        let pool = Arc::new(BackendWorkers::new(THREADS).unwrap());
        for _round in 0..50 {
            let all_started = Arc::new(std::sync::Barrier::new(THREADS));
            let calls: Vec<_> = (0..THREADS)
                .map(|_| {
                    let (pool, all_started) = (Arc::clone(&pool), Arc::clone(&all_started));
                    tokio::spawn(async move {
                        pool.run(move || {
                            all_started.wait();
                            Ok(std::thread::current().name().map(str::to_owned))
                        })
                        .await
                    })
                })
                .collect();
            let mut names = Vec::new();
            for call in calls {
                names.push(call.await.unwrap().unwrap());
            }
            names.sort();
            names.dedup();
            assert_eq!(names.len(), THREADS, "each call ran on a thread of its own");
        }
    }

    #[tokio::test]
    async fn calls_run_on_the_pools_threads_or_without_a_pool_on_tokios() {
        let name = || Ok(std::thread::current().name().map(str::to_owned));
        let pool = BackendWorkers::new(2).unwrap();
        let on_pool = pool.run(name).await.unwrap().unwrap();
        assert!(on_pool.starts_with("nbd-backend-"), "{on_pool}");
        let unlimited = BackendWorkers::unlimited();
        let elsewhere = unlimited.run(name).await.unwrap();
        assert!(!elsewhere.unwrap_or_default().starts_with("nbd-backend-"));
    }
}

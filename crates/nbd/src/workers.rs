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

use crate::export::BackendError;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};

type Call = Box<dyn FnOnce() + Send>;

/// Runs backend calls, at most as many at once as it has threads, the others queued in
/// arrival order; with no threads, every call gets a thread of tokio's blocking pool.
#[derive(Debug)]
pub(crate) struct BackendWorkers {
    queue: Option<Sender<Call>>,
}

impl BackendWorkers {
    /// A pool of `threads` threads (0: [`unlimited`](Self::unlimited)).
    pub(crate) fn new(threads: usize) -> std::io::Result<Self> {
        if threads == 0 {
            return Ok(Self::unlimited());
        }
        let (queue, calls) = mpsc::channel::<Call>();
        let calls = Arc::new(Mutex::new(calls));
        for index in 0..threads {
            let calls = Arc::clone(&calls);
            std::thread::Builder::new()
                .name(format!("nbd-backend-{index}"))
                .spawn(move || run_calls(&calls))?;
        }
        Ok(BackendWorkers { queue: Some(queue) })
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
        // The threads only stop when the queue is dropped, which is after this borrow ends.
        if queue.send(job).is_err() {
            return Err(BackendError::new(libc::EIO, "Backend threads are gone"));
        }
        result.await.unwrap_or_else(|_| Err(panicked()))
    }
}

/// A worker's life: take the next call (one idle thread waits on the queue, the others on
/// the lock), run it, until the pool is dropped.
fn run_calls(calls: &Mutex<Receiver<Call>>) {
    loop {
        let next = calls.lock().unwrap_or_else(PoisonError::into_inner).recv();
        match next {
            Ok(call) => call(),
            Err(_) => return,
        }
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

//! Background writers: for each file that background threads (a stream's copy threads, at a
//! low CPU priority) write to, one thread at normal priority that makes those writes for
//! them.
//!
//! A buffered write holds the file's inode lock in the kernel, and a guest write to the same
//! file waits for it. Made by a thread at nice 19, that write was a priority inversion: under
//! guest load the guest's own threads kept the holder off the CPU, so the guest waited for it.
//! Perf showed the copy threads preempted inside `pwrite` ~2000 times in one 4 s stream, up to
//! 0.85 ms each, while guest writes queued behind the one waiting for them (guest p99 10 ms
//! against QSD's 3). Here the copying (reading the backing data, looking for zeroes) stays at
//! the copy threads' low priority (nice 19 then, nice 10 now) and only the copy into the page
//! cache runs at normal priority. 6 runs of stream+fio
//! interleaved with QSD and the previous build (medians of per-run ratios to QSD): guest p99
//! 0.75x/0.77x QSD's against 0.84x/0.90x, guest IOPS 1.54x against 1.37x, stream time the same
//! (0.89x) (bench/results/serve-2026-11-27-background-turns.md).
//!
//! A writer per file, not one for the process: each file's writes are serialised by its inode
//! lock anyway, and two streams into two images then copy into the page cache at once. With
//! one writer for the process, two streams started together in one daemon took 3.74 s to both
//! events against 2.81 s with each copy thread writing for itself (QSD: 4.31-4.48 s)
//! (bench/results/serve-2026-11-27-writer-per-file.md).
//!
//! A thread inherits the CPU priority of the thread that creates it, and an unprivileged
//! process cannot raise a priority once lowered. So writers are created by the launcher, one
//! process-wide thread that [`start`] creates at the caller's priority:
//! [`mark_background_thread`](crate::write_gate::mark_background_thread) calls it before the
//! caller lowers its own.

use std::any::Any;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::OnceLock;

/// A task handed to a thread. Fields drop in order: the task (and what it borrows) before
/// `done`, whose closing tells the caller that the task is gone.
struct Job {
    task: Box<dyn FnOnce() + Send + 'static>,
    done: SyncSender<Result<(), Box<dyn Any + Send>>>,
}

/// The launcher's queue, or `None` if its thread could not start.
static LAUNCHER: OnceLock<Option<Sender<Job>>> = OnceLock::new();

/// Starts the launcher if it is not running, at the calling thread's CPU priority.
pub fn start() {
    LAUNCHER.get_or_init(|| spawn("imgstream-launcher"));
}

/// One file's writer: its thread starts at the first [`run`](Self::run) and ends when this is
/// dropped.
#[derive(Debug, Default)]
pub struct BackgroundWriter {
    /// The thread's queue, or `None` if it could not start (or the launcher could not).
    queue: OnceLock<Option<Sender<Job>>>,
}

impl BackgroundWriter {
    /// Runs `task` on this writer's thread and returns once it has run there; a panic in it
    /// resumes here. Runs it on the calling thread if there is no writer thread, or if the
    /// caller is a writer (it might wait for itself).
    pub fn run(&self, task: impl FnOnce() + Send) {
        if on_writer_thread() {
            return task();
        }
        let queue = self.queue.get_or_init(|| {
            // Without the launcher, background threads write for themselves: correct, only
            // worse for the guest's latency.
            let Some(Some(launcher)) = LAUNCHER.get() else {
                return None;
            };
            // Created by the launcher, so at its priority rather than the caller's.
            let mut queue = None;
            hand_over(launcher, || queue = spawn("imgstream-writer"));
            queue
        });
        match queue {
            Some(queue) => hand_over(queue, task),
            None => task(),
        }
    }
}

/// Starts a thread that runs the jobs sent on the returned queue until it is dropped.
fn spawn(name: &str) -> Option<Sender<Job>> {
    let (jobs, queue) = mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || run(queue))
        .ok()
        .map(|_| jobs)
}

thread_local! {
    static IS_WRITER: Cell<bool> = const { Cell::new(false) };
}

fn run(queue: Receiver<Job>) {
    IS_WRITER.with(|is_writer| is_writer.set(true));
    for Job { task, done } in queue {
        let outcome = panic::catch_unwind(AssertUnwindSafe(task));
        // The caller waits on this; it cannot have gone away.
        let _ = done.send(outcome);
    }
}

/// Runs `task` on the thread behind `queue` and returns once it has run there; a panic in it
/// resumes here. Runs it here if that thread is gone.
fn hand_over(queue: &Sender<Job>, task: impl FnOnce() + Send) {
    let mut slot = Some(task);
    let slot_ref = &mut slot;
    let borrowed: Box<dyn FnOnce() + Send + '_> = Box::new(move || {
        if let Some(task) = slot_ref.take() {
            task()
        }
    });
    // SAFETY: the boxed task borrows `slot` (and `task` may borrow more). It is made 'static only
    // to cross the channel; this function does not return while the box exists. The thread
    // drops the box before it sends on `done`; if the job is dropped unrun instead, its box
    // drops before `done` (field order), and `recv` below fails only once `done` is dropped.
    // If `send` fails the job comes back here and is dropped before `slot` is used again.
    let task: Box<dyn FnOnce() + Send + 'static> = unsafe { std::mem::transmute(borrowed) };
    let (done, is_done) = mpsc::sync_channel(1);
    let outcome = match queue.send(Job { task, done }) {
        Ok(()) => is_done.recv().ok(),
        Err(unsent) => {
            drop(unsent);
            None
        }
    };
    match outcome {
        Some(Ok(())) => {}
        Some(Err(panic)) => panic::resume_unwind(panic),
        // Never ran (the thread is gone): run it here.
        None => {
            if let Some(task) = slot.take() {
                task()
            }
        }
    }
}

/// Whether the calling thread is a writer (or the launcher).
pub(crate) fn on_writer_thread() -> bool {
    IS_WRITER.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_task_runs_on_the_writer_and_its_borrows_come_back() {
        start();
        let writer = BackgroundWriter::default();
        let mut seen = Vec::new();
        writer.run(|| seen.push(on_writer_thread()));
        assert_eq!(seen, [true]);
    }

    #[test]
    fn a_task_handed_over_on_a_writer_runs_there_at_once_instead_of_waiting_for_itself() {
        start();
        let (writer, other) = (BackgroundWriter::default(), BackgroundWriter::default());
        let mut inner = Vec::new();
        writer.run(|| {
            writer.run(|| inner.push(on_writer_thread()));
            other.run(|| inner.push(on_writer_thread()));
        });
        assert_eq!(inner, [true, true]);
    }

    #[test]
    fn a_panic_on_the_writer_resumes_in_the_caller_and_the_writer_goes_on() {
        start();
        let writer = BackgroundWriter::default();
        let caught = panic::catch_unwind(|| writer.run(|| panic!("disk on fire")));
        let message = caught.expect_err("the panic came back");
        assert_eq!(message.downcast_ref::<&str>(), Some(&"disk on fire"));
        let mut ran = false;
        writer.run(|| ran = true);
        assert!(ran, "the writer survived the panic");
    }

    #[test]
    fn two_files_writers_run_at_the_same_time() {
        start();
        let (first, second) = (BackgroundWriter::default(), BackgroundWriter::default());
        let (started, first_started) = mpsc::channel();
        let (send, receive) = mpsc::channel();
        std::thread::scope(|scope| {
            // The first writer's task waits for the second's: one thread for both would never
            // get to the second (the timeout only keeps that failure from hanging the suite).
            let waiting = scope.spawn(move || {
                let mut received = None;
                let slot = &mut received;
                first.run(move || {
                    started.send(()).expect("started");
                    *slot = receive.recv_timeout(Duration::from_secs(60)).ok();
                });
                received
            });
            first_started.recv().expect("the first task started");
            second.run(|| send.send("from the second writer").expect("send"));
            assert_eq!(
                waiting.join().expect("the first writer's caller"),
                Some("from the second writer")
            );
        });
    }
}

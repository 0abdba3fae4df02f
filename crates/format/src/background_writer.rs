//! The background writer: one thread, at normal CPU priority, that makes the file writes of
//! background threads (a stream's copy threads, at the lowest priority) for them.
//!
//! A buffered write holds the file's inode lock in the kernel, and a guest write to the same
//! file waits for it. Made by a thread at nice 19, that write was a priority inversion: under
//! guest load the guest's own threads kept the holder off the CPU, so the guest waited for it.
//! Perf showed the copy threads preempted inside `pwrite` ~2000 times in one 4 s stream, up to
//! 0.85 ms each, while guest writes queued behind the one waiting for them (guest p99 10 ms
//! against QSD's 3). Here the copying (reading the backing data, looking for zeroes) stays at
//! nice 19 and only the copy into the page cache runs at normal priority. 6 runs of stream+fio
//! interleaved with QSD and the previous build (medians of per-run ratios to QSD): guest p99
//! 0.75x/0.77x QSD's against 0.84x/0.90x, guest IOPS 1.54x against 1.37x, stream time the same
//! (0.89x) (bench/results/serve-2026-11-27-background-turns.md).
//!
//! One thread serves the whole process, so the background writes of two images (two streams)
//! take turns too; each file's writes were serialised by its inode lock anyway.
//!
//! The thread inherits the CPU priority of the thread that starts it, and an unprivileged
//! process cannot raise a priority once lowered, so [`start`] must run before the caller lowers
//! its own: [`mark_background_thread`](crate::write_gate::mark_background_thread) calls it
//! first.

use std::any::Any;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::OnceLock;

/// A write handed to the writer. Fields drop in order: the task (and what it borrows) before
/// `done`, whose closing tells the caller that the task is gone.
struct Job {
    task: Box<dyn FnOnce() + Send + 'static>,
    done: SyncSender<Result<(), Box<dyn Any + Send>>>,
}

/// The writer's queue, or `None` if its thread could not start.
static WRITER: OnceLock<Option<Sender<Job>>> = OnceLock::new();

/// Starts the writer thread if it is not running, at the calling thread's CPU priority.
pub fn start() {
    WRITER.get_or_init(|| {
        let (jobs, queue) = mpsc::channel();
        std::thread::Builder::new()
            .name("imgstream-writer".into())
            .spawn(move || run(queue))
            // Without the writer, background threads write for themselves: correct, only
            // worse for the guest's latency.
            .ok()
            .map(|_| jobs)
    });
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

/// Runs `task` on the writer thread and returns once it has run there; a panic in it resumes
/// here. Runs it on the calling thread if the writer was not started, or is the caller (it
/// would wait for itself).
pub fn run_on_writer(task: impl FnOnce() + Send) {
    let Some(Some(jobs)) = WRITER.get() else {
        return task();
    };
    if on_writer_thread() {
        return task();
    }
    let mut slot = Some(task);
    let slot_ref = &mut slot;
    let borrowed: Box<dyn FnOnce() + Send + '_> = Box::new(move || {
        if let Some(task) = slot_ref.take() {
            task()
        }
    });
    // SAFETY: the boxed task borrows `slot` (and `task` may borrow more). It is made 'static only
    // to cross the channel; this function does not return while the box exists. The writer
    // drops the box before it sends on `done`; if the job is dropped unrun instead, its box
    // drops before `done` (field order), and `recv` below fails only once `done` is dropped.
    // If `send` fails the job comes back here and is dropped before `slot` is used again.
    let task: Box<dyn FnOnce() + Send + 'static> = unsafe { std::mem::transmute(borrowed) };
    let (done, is_done) = mpsc::sync_channel(1);
    let outcome = match jobs.send(Job { task, done }) {
        Ok(()) => is_done.recv().ok(),
        Err(unsent) => {
            drop(unsent);
            None
        }
    };
    match outcome {
        Some(Ok(())) => {}
        Some(Err(panic)) => panic::resume_unwind(panic),
        // Never ran (the writer is gone): run it here.
        None => {
            if let Some(task) = slot.take() {
                task()
            }
        }
    }
}

/// Whether the calling thread is the writer.
pub(crate) fn on_writer_thread() -> bool {
    IS_WRITER.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_runs_on_the_writer_and_its_borrows_come_back() {
        start();
        let mut seen = Vec::new();
        run_on_writer(|| seen.push(on_writer_thread()));
        assert_eq!(seen, [true]);
    }

    #[test]
    fn a_task_handed_over_on_the_writer_runs_there_at_once_instead_of_waiting_for_itself() {
        start();
        let mut inner = None;
        run_on_writer(|| run_on_writer(|| inner = Some(on_writer_thread())));
        assert_eq!(inner, Some(true));
    }

    #[test]
    fn a_panic_on_the_writer_resumes_in_the_caller_and_the_writer_goes_on() {
        start();
        let caught = panic::catch_unwind(|| run_on_writer(|| panic!("disk on fire")));
        let message = caught.expect_err("the panic came back");
        assert_eq!(message.downcast_ref::<&str>(), Some(&"disk on fire"));
        let mut ran = false;
        run_on_writer(|| ran = true);
        assert!(ran, "the writer survived the panic");
    }
}

//! Starts a stream's writeback windows on a thread of the job's, so that the job copies on
//! while the kernel allocates a window's blocks and queues its writes.
//!
//! Starting the writeback of a 128 MiB window took the job's thread 5-20 ms under guest load
//! (ext4 allocates the delayed blocks then, and the block layer's writeback throttling can
//! hold the submitter), about a tenth of a 1 s stream spent not copying.

use crate::writeback_pacer::FileRange;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::Scope;

/// What starts the writeback of one range (the job's: `Disk::write_back` with
/// `Writeback::Start`).
pub type StartWriteback<'env> = dyn Fn(FileRange) + Sync + 'env;

/// Starts writeback as the job asks, in order, on a thread that lives in the job's scope.
pub struct WritebackStarter<'env> {
    start: &'env StartWriteback<'env>,
    /// Ranges to the thread, and its word back after each; `None` if the thread could not
    /// start (the job then starts writeback itself).
    thread: Option<(Sender<FileRange>, Receiver<()>)>,
    /// Ranges handed to the thread that it has not yet reported started.
    unconfirmed: usize,
}

impl<'env> WritebackStarter<'env> {
    /// Starts the thread in `scope`, at the caller's CPU priority; it ends when this is
    /// dropped, and the scope joins it.
    pub fn new<'scope>(
        scope: &'scope Scope<'scope, 'env>,
        start: &'env StartWriteback<'env>,
    ) -> Self {
        let (ranges, to_start) = mpsc::channel::<FileRange>();
        let (report, reports) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("imgstream-wb".into())
            .spawn_scoped(scope, move || {
                for range in to_start {
                    start(range);
                    if report.send(()).is_err() {
                        break;
                    }
                }
            });
        let thread = match spawned {
            Ok(_) => Some((ranges, reports)),
            Err(error) => {
                tracing::debug!("no writeback thread ({error}); the job starts writeback itself");
                None
            }
        };
        WritebackStarter {
            start,
            thread,
            unconfirmed: 0,
        }
    }

    /// Has the writeback of `range` started, without waiting for that.
    pub fn start(&mut self, range: FileRange) {
        if let Some((ranges, _)) = &self.thread {
            if ranges.send(range).is_ok() {
                self.unconfirmed += 1;
                return;
            }
        }
        (self.start)(range);
    }

    /// Returns once the writeback of every range but the `newest` ranges handed over has been
    /// started.
    pub fn wait_until_started_all_but(&mut self, newest: usize) {
        while self.unconfirmed > newest {
            let Some((_, reports)) = &self.thread else {
                return;
            };
            if reports.recv().is_err() {
                // The thread is gone, and so are the ranges it had not started: nothing is
                // left to wait for. Later ranges are started here.
                self.thread = None;
                self.unconfirmed = 0;
                return;
            }
            self.unconfirmed -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn ranges_start_in_order_off_the_callers_thread_and_the_wait_covers_the_older_ones() {
        let (release, released) = mpsc::channel::<()>();
        let released = Mutex::new(released);
        let started = Mutex::new(Vec::new());
        let start = |range: FileRange| {
            // Each start waits for the test's word: the caller must not wait with it.
            released
                .lock()
                .expect("lock")
                .recv()
                .expect("the test releases every start");
            started.lock().expect("lock").push(range);
        };
        std::thread::scope(|scope| {
            let mut starter = WritebackStarter::new(scope, &start);
            for range in [(0, 10), (10, 20), (30, 5)] {
                starter.start(range);
            }
            assert!(
                started.lock().expect("lock").is_empty(),
                "the caller hands ranges over without starting them itself"
            );
            for _ in 0..2 {
                release.send(()).expect("the thread runs");
            }
            starter.wait_until_started_all_but(1);
            assert_eq!(
                *started.lock().expect("lock"),
                [(0, 10), (10, 20)],
                "all but the newest range started, in order, when the wait returns"
            );
            release.send(()).expect("the thread runs");
            starter.wait_until_started_all_but(0);
            assert_eq!(*started.lock().expect("lock"), [(0, 10), (10, 20), (30, 5)]);
        });
    }
}

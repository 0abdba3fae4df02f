//! The write gate of one file: guest writes enter the kernel one at a time, background writes
//! one small piece at a time, and neither kind waits for the other here.
//!
//! Linux serialises buffered writes to one file anyway (ext4 and XFS take the inode lock
//! exclusively for each), but a writer that finds the lock taken spins on it while the holder
//! runs. With a stream job's copies and a dozen guest requests writing to the same image on two
//! cores, perf showed 55% of the daemon's CPU in `rwsem_spin_on_owner`, CPU the guest and the
//! NBD client needed. So:
//! - guest writes wait for each other here, asleep;
//! - background writes (from a thread marked by [`mark_background_thread`], such as a stream's
//!   copy threads) are made by the file's [background writer](crate::background_writer), at
//!   normal CPU priority, in [`BACKGROUND_PIECE`]s; they wait for each other there, asleep;
//! - a guest write never queues behind background ones here: at most one of each kind is in
//!   the kernel, so a guest write waits there for at most one piece.
//!
//! Background writes used to queue here behind waiting guest writes: the stream then spent a
//! sixth of its time asleep at the gate or waking up from it, and under guest load took 0.86x
//! QSD's time against 0.57x without (bench/serve.py stream+fio, 6 runs interleaved with QSD).
//! Background writes not waiting for each other cost a stream with no guest I/O a fifth of its
//! CPU in `rwsem_spin_on_owner` (the job's thread and a copy thread writing at once); under
//! guest load that spinning took CPU from the guest and from the stream's own copies. Taking
//! turns here (4 runs interleaved with QSD, medians of per-run ratios, stream+fio): stream
//! 0.73x QSD's time against 1.05x, guest p99 0.84x/0.90x against 1.08x/1.24x, guest IOPS 1.45x
//! against 1.30x (bench/results/serve-2026-11-27-background-turns.md).

use crate::background_writer::{self, BackgroundWriter};
use std::cell::Cell;
use std::sync::{Mutex, PoisonError};

/// Bytes a background write hands to the kernel at once (a guest write waits for at most one
/// of these).
pub const BACKGROUND_PIECE: usize = 128 << 10;

thread_local! {
    static BACKGROUND: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as background work: at any [`WriteGate`], its writes are made by
/// the file's background writer, in pieces, take turns with other background writes and do not
/// queue behind guest writes. Starts the writers' launcher, which takes the caller's CPU
/// priority and gives it to every writer: call this before lowering it.
pub fn mark_background_thread() {
    background_writer::start();
    BACKGROUND.with(|background| background.set(true));
}

fn is_background_thread() -> bool {
    BACKGROUND.with(Cell::get)
}

/// One file's gate; see the module documentation.
#[derive(Debug, Default)]
pub struct WriteGate {
    /// Held by the guest write in the kernel.
    foreground: Mutex<()>,
    /// Held by the background piece in the kernel.
    background: Mutex<()>,
    /// Makes the background writes.
    writer: BackgroundWriter,
}

impl WriteGate {
    /// Runs `write(offset, bytes)` for `data` at `offset`: in one call, alone among foreground
    /// writes, for a foreground thread; in [`BACKGROUND_PIECE`]s, each alone among background
    /// writes, for a background one.
    pub fn write<E: Send>(
        &self,
        offset: u64,
        data: &[u8],
        mut write: impl FnMut(u64, &[u8]) -> Result<(), E> + Send,
    ) -> Result<(), E> {
        // Nothing is left half-updated under these locks: a panic in `write` does not matter.
        if is_background_thread() {
            let mut outcome = Ok(());
            self.writer.run(|| {
                outcome =
                    data.chunks(BACKGROUND_PIECE)
                        .enumerate()
                        .try_for_each(|(index, piece)| {
                            // Released between pieces, so that background writers take turns
                            // (where the writer could not start and each makes its own writes).
                            let _alone = self
                                .background
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner);
                            write(offset + (index * BACKGROUND_PIECE) as u64, piece)
                        });
            });
            return outcome;
        }
        let _alone = self
            .foreground
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        write(offset, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    use std::thread;

    /// Holds the gate with a write (a background one if `background`) until the returned sender
    /// is dropped.
    fn hold(gate: &Arc<WriteGate>, background: bool) -> (mpsc::Sender<()>, thread::JoinHandle<()>) {
        let (release, released) = mpsc::channel::<()>();
        let (entered, is_entered) = mpsc::channel();
        let gate = Arc::clone(gate);
        let holder = thread::spawn(move || {
            if background {
                mark_background_thread();
            }
            gate.write(0, &[0u8; 1], move |_, _| {
                entered.send(()).map_err(|_| ())?;
                let _ = released.recv();
                Ok::<(), ()>(())
            })
            .expect("holder write");
        });
        is_entered.recv().expect("the holder entered");
        (release, holder)
    }

    /// Writes `len` bytes from a new thread; returns the (offset, length) of each call.
    fn write_from_thread(
        gate: &Arc<WriteGate>,
        background: bool,
        len: usize,
        done: Arc<AtomicBool>,
    ) -> thread::JoinHandle<Vec<(u64, usize)>> {
        let gate = Arc::clone(gate);
        thread::spawn(move || {
            if background {
                mark_background_thread();
            }
            let mut calls = Vec::new();
            gate.write(0, &vec![0u8; len], |offset, bytes| {
                calls.push((offset, bytes.len()));
                Ok::<(), ()>(())
            })
            .expect("write");
            done.store(true, Ordering::SeqCst);
            calls
        })
    }

    #[test]
    fn background_writes_go_in_pieces_and_foreground_ones_whole() {
        let gate = Arc::new(WriteGate::default());
        let len = 2 * BACKGROUND_PIECE + 100;
        let flag = || Arc::new(AtomicBool::new(false));
        let background = write_from_thread(&gate, true, len, flag()).join().unwrap();
        let piece = BACKGROUND_PIECE as u64;
        assert_eq!(
            background,
            [
                (0, BACKGROUND_PIECE),
                (piece, BACKGROUND_PIECE),
                (2 * piece, 100)
            ]
        );
        let foreground = write_from_thread(&gate, false, len, flag()).join().unwrap();
        assert_eq!(foreground, [(0, len)]);
    }

    /// With a write of one kind in the kernel, a write of the other kind goes through and one
    /// of the same kind waits for it.
    fn a_write_waits_only_for_its_own_kind(holder_is_background: bool) {
        let gate = Arc::new(WriteGate::default());
        let (release, holder) = hold(&gate, holder_is_background);
        let other_done = Arc::new(AtomicBool::new(false));
        let other = write_from_thread(&gate, !holder_is_background, 10, Arc::clone(&other_done));
        other.join().unwrap();
        assert!(other_done.load(Ordering::SeqCst));

        let same_done = Arc::new(AtomicBool::new(false));
        let same = write_from_thread(&gate, holder_is_background, 10, Arc::clone(&same_done));
        // It cannot finish while the holder is in; give it every chance to (wrongly) do so.
        for _ in 0..1000 {
            thread::yield_now();
        }
        assert!(!same_done.load(Ordering::SeqCst));
        drop(release);
        holder.join().unwrap();
        assert_eq!(same.join().unwrap(), [(0, 10)]);
    }

    #[test]
    fn a_foreground_write_waits_for_the_one_in_the_kernel_and_a_background_one_does_not() {
        a_write_waits_only_for_its_own_kind(false);
    }

    #[test]
    fn a_background_piece_waits_for_the_one_in_the_kernel_and_a_foreground_write_does_not() {
        a_write_waits_only_for_its_own_kind(true);
    }

    #[test]
    fn background_writes_are_made_by_the_writer_at_the_priority_the_thread_had() {
        let gate = Arc::new(WriteGate::default());
        let gate_in_thread = Arc::clone(&gate);
        let (own_nice, writer_nice, on_writer) = thread::spawn(move || {
            // SAFETY: plain syscalls on the calling thread (`who = 0`).
            let nice = || unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
            let before = nice();
            mark_background_thread();
            // SAFETY: as above; raising one's own nice needs no privilege.
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) }, 0);
            let mut seen = (before, None, false);
            gate_in_thread
                .write(0, &[1u8; 10], |_, _| {
                    seen.1 = Some(nice());
                    seen.2 = background_writer::on_writer_thread();
                    Ok::<(), ()>(())
                })
                .expect("write");
            seen
        })
        .join()
        .unwrap();
        assert!(on_writer, "made by the writer thread");
        assert_ne!(
            own_nice, 19,
            "the test must start below nice 19 to show anything"
        );
        assert_eq!(
            writer_nice,
            Some(own_nice),
            "at the priority the thread had"
        );
        let mut foreground_on_writer = true;
        gate.write(0, &[1u8; 10], |_, _| {
            foreground_on_writer = background_writer::on_writer_thread();
            Ok::<(), ()>(())
        })
        .expect("write");
        assert!(
            !foreground_on_writer,
            "guest writes are made by their own thread"
        );
    }

    #[test]
    fn a_failed_write_reports_its_error_and_opens_the_gate() {
        let gate = WriteGate::default();
        assert_eq!(
            gate.write(0, &[1, 2, 3], |_, _| Err("disk full")),
            Err("disk full")
        );
        let mut written = 0;
        gate.write(0, &[1, 2, 3], |_, bytes| {
            written += bytes.len();
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(written, 3);
    }
}

//! The write gate of one file: guest writes enter the kernel one at a time, background writes
//! in small pieces.
//!
//! Linux serialises buffered writes to one file anyway (ext4 and XFS take the inode lock
//! exclusively for each), but a writer that finds the lock taken spins on it while the holder
//! runs. With a stream job's copies and a dozen guest requests writing to the same image on two
//! cores, perf showed 55% of the daemon's CPU in `rwsem_spin_on_owner`, CPU the guest and the
//! NBD client needed. So:
//! - guest writes wait for each other here, asleep, and at most one spins in the kernel;
//! - background writes (from a thread marked by [`mark_background_thread`], such as a stream's
//!   copy threads) do not wait here, but enter the kernel in [`BACKGROUND_PIECE`]s, so that a
//!   guest write waits there for at most a piece per copy thread.
//!
//! Background writes used to queue here too, behind waiting guest writes: the stream then
//! spent a sixth of its time asleep at the gate or waking up from it, and under guest load took
//! 0.86x QSD's time against 0.57x without (bench/serve.py stream+fio, 6 runs interleaved with
//! QSD), with the same guest p99.

use std::cell::Cell;
use std::sync::{Mutex, PoisonError};

/// Bytes a background write hands to the kernel at once (a guest write waits for at most one
/// of these per copy thread).
pub const BACKGROUND_PIECE: usize = 128 << 10;

thread_local! {
    static BACKGROUND: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as background work: its writes go in pieces and do not queue
/// behind guest writes at any [`WriteGate`].
pub fn mark_background_thread() {
    BACKGROUND.with(|background| background.set(true));
}

fn is_background_thread() -> bool {
    BACKGROUND.with(Cell::get)
}

/// One file's gate; see the module documentation.
#[derive(Debug, Default)]
pub struct WriteGate {
    foreground: Mutex<()>,
}

impl WriteGate {
    /// Runs `write(offset, bytes)` for `data` at `offset`: in one call, alone among foreground
    /// writes, for a foreground thread; in [`BACKGROUND_PIECE`]s, without waiting, for a
    /// background one.
    pub fn write<E>(
        &self,
        offset: u64,
        data: &[u8],
        mut write: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        if is_background_thread() {
            for (index, piece) in data.chunks(BACKGROUND_PIECE).enumerate() {
                write(offset + (index * BACKGROUND_PIECE) as u64, piece)?;
            }
            return Ok(());
        }
        // Nothing is left half-updated under this lock: a panic in `write` does not matter.
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

    /// Holds the gate with a foreground write until the returned sender is dropped.
    fn hold(gate: &Arc<WriteGate>) -> (mpsc::Sender<()>, thread::JoinHandle<()>) {
        let (release, released) = mpsc::channel::<()>();
        let (entered, is_entered) = mpsc::channel();
        let gate = Arc::clone(gate);
        let holder = thread::spawn(move || {
            gate.write(0, &[0u8; 1], |_, _| {
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

    #[test]
    fn a_foreground_write_waits_for_the_one_in_the_kernel_and_a_background_one_does_not() {
        let gate = Arc::new(WriteGate::default());
        let (release, holder) = hold(&gate);
        let background_done = Arc::new(AtomicBool::new(false));
        let background = write_from_thread(&gate, true, 10, Arc::clone(&background_done));
        background.join().unwrap();
        assert!(background_done.load(Ordering::SeqCst));

        let foreground_done = Arc::new(AtomicBool::new(false));
        let foreground = write_from_thread(&gate, false, 10, Arc::clone(&foreground_done));
        // It cannot finish while the holder is in; give it every chance to (wrongly) do so.
        for _ in 0..1000 {
            thread::yield_now();
        }
        assert!(!foreground_done.load(Ordering::SeqCst));
        drop(release);
        holder.join().unwrap();
        assert_eq!(foreground.join().unwrap(), [(0, 10)]);
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

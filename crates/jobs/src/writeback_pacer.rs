//! Paces a stream to its device: the job's copies run at most [`WINDOWS_IN_FLIGHT`] windows
//! of [`WRITEBACK_WINDOW`] ahead of what the device has received.
//!
//! A stream's new clusters go to the end of the top's file, so what it wrote since the last
//! window closed is the file's tail. When a window closes, the job has that tail's writeback
//! started (by a thread of its own, [`crate::writeback_starter`]) and waits for the writeback
//! already started of the oldest window still in flight. When the device keeps up the wait finds nothing to do (a stream with no guest I/O
//! took the same time); when it does not, the job copies at the device's pace instead of
//! filling the page cache and then waiting for all of it in the flush before the header
//! rewrite. That flush made the end of a stream under guest load a long writeback the guest
//! competed with. With fio saturating the guest's disk during the stream (bench/serve.py
//! stream+fio, three runs of 5, medians of per-run ratios to QSD), pacing took the guest's p99
//! from 1.16-1.50x QSD's to 0.75-0.91x and its IOPS from 1.07x to 1.34-1.41x. Windows of
//! 32 MiB with one in flight gave 0.72x QSD's p99 but 1.08x its stream time; the chosen
//! 128 MiB and two keep the stream's copies at most 384 MiB ahead of the device
//! (bench/results/serve-2026-11-27-tail.md).
//!
//! The wait sends nothing again. Guest writes keep dirtying the clusters they allocated among
//! the stream's, and a wait that wrote the window again (Linux's data-integrity writeback)
//! waited for those too: 0.38-0.76 s of a 1.3-1.7 s stream under fio. Waiting only for what was
//! started (6 runs interleaved with QSD, medians of per-run ratios): stream+fio 0.78x QSD's
//! stream time against 0.91x, stream+fio-rate 0.84x against 1.16x, guest p99 0.93-0.98x
//! against 0.77-0.91x. Not waiting at all took the stream to 0.80x but the guest's p99 to
//! 1.14-1.18x (bench/results/serve-2026-11-27-await-started.md).

/// Bytes the job copies between two writeback calls.
pub const WRITEBACK_WINDOW: u64 = 128 << 20;
/// Closed windows whose writeback may still be running.
pub const WINDOWS_IN_FLIGHT: usize = 2;

/// A range of the top's file: `(offset, length)`.
pub type FileRange = (u64, u64);

/// What to do when a window closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowClosed {
    /// Start the writeback of this range (the window that just closed).
    pub start: FileRange,
    /// Then wait for the writeback of this one (the oldest window in flight), if any.
    pub wait: Option<FileRange>,
}

/// Where the windows are; see the module documentation.
#[derive(Debug)]
pub struct WritebackPacer {
    /// Bytes copied since the current window opened.
    copied: u64,
    /// File offset where the current window starts (the file's end when it opened).
    window_start: u64,
    /// Closed windows, oldest first, whose writeback was started and not waited for.
    in_flight: std::collections::VecDeque<FileRange>,
}

impl WritebackPacer {
    /// For a top file `file_len` bytes long when the job starts (0 if unknown: the first
    /// window then covers the whole file, which is still right).
    pub fn new(file_len: u64) -> Self {
        WritebackPacer {
            copied: 0,
            window_start: file_len,
            in_flight: Default::default(),
        }
    }

    /// Records `bytes` copied. When that closes a window, returns what to write back, given
    /// the file's length now (`None` if unknown: the window stays open).
    pub fn copied(
        &mut self,
        bytes: u64,
        file_len: impl FnOnce() -> Option<u64>,
    ) -> Option<WindowClosed> {
        self.copied += bytes;
        if self.copied < WRITEBACK_WINDOW {
            return None;
        }
        let end = file_len()?;
        self.copied = 0;
        let start = self.window_start.min(end);
        self.window_start = end;
        self.in_flight.push_back((start, end - start));
        let wait = if self.in_flight.len() > WINDOWS_IN_FLIGHT {
            self.in_flight.pop_front()
        } else {
            None
        };
        Some(WindowClosed {
            start: (start, end - start),
            wait,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = WRITEBACK_WINDOW;

    #[test]
    fn a_window_closes_after_its_bytes_and_covers_the_files_new_tail() {
        let mut pacer = WritebackPacer::new(1000);
        assert_eq!(pacer.copied(W - 1, || Some(5000)), None);
        let closed = pacer.copied(1, || Some(1000 + W));
        assert_eq!(
            closed,
            Some(WindowClosed {
                start: (1000, W),
                wait: None
            })
        );
    }

    #[test]
    fn the_oldest_window_is_waited_for_once_more_than_the_allowed_are_in_flight() {
        let mut pacer = WritebackPacer::new(0);
        let mut waits = Vec::new();
        for n in 1..=WINDOWS_IN_FLIGHT as u64 + 2 {
            let closed = pacer.copied(W, || Some(n * W)).expect("a window closes");
            assert_eq!(closed.start, ((n - 1) * W, W));
            waits.push(closed.wait);
        }
        let mut expected = vec![None; WINDOWS_IN_FLIGHT];
        expected.push(Some((0, W)));
        expected.push(Some((W, W)));
        assert_eq!(waits, expected);
    }

    #[test]
    fn an_unknown_file_length_keeps_the_window_open_until_it_is_known() {
        let mut pacer = WritebackPacer::new(0);
        assert_eq!(pacer.copied(W, || None), None);
        let closed = pacer.copied(10, || Some(W + 10)).expect("closes now");
        assert_eq!(closed.start, (0, W + 10));
    }

    #[test]
    fn a_file_shorter_than_the_window_start_gives_an_empty_range_not_an_underflow() {
        let mut pacer = WritebackPacer::new(10 * W);
        let closed = pacer.copied(W, || Some(W)).expect("closes");
        assert_eq!(closed.start, (W, 0));
    }
}

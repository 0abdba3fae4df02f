//! Paces a stream to its device once it has left enough to the page cache: the job leaves
//! its last [`windows_left_dirty`] windows of [`WRITEBACK_WINDOW`] to the kernel, writes back
//! the older ones itself, and runs at most [`WINDOWS_IN_FLIGHT`] of those ahead of what the
//! device has received.
//!
//! A stream's new clusters go to the end of the top's file, so what it wrote since the last
//! window closed is the file's tail. When a window closes and more than the allowed windows
//! are dirty, the job has the oldest one's writeback started (by a thread of its own,
//! [`crate::writeback_starter`]) and waits for the writeback already started of the oldest
//! window still in flight. When the device keeps up the wait finds nothing to do; when it
//! does not, the job copies at the device's pace instead of filling the page cache until
//! Linux throttles every writer, the guest's first.
//!
//! Windows left dirty: while the job flushed before its completion event, writing back every
//! window at once kept that flush short, and took the guest's p99 under fio from 1.16-1.50x
//! QSD's to 0.75-0.91x (bench/results/serve-2026-11-27-tail.md). Now that the event does not
//! wait for the device (crate::stream::flush_once_completed), writeback during the stream
//! only competes with the guest: on the bench chain (1.22 GiB copied), rate-limited fio,
//! p99 1.52/1.66x QSD's with every window written back against 0.75/0.70x with none
//! (bench/results/serve-2026-11-27-deferred-header.md). Below the kernel's own background
//! threshold nothing is written back by Linux either, which is where QEMU's stream stays.
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
    /// Where the window that closed ends: the file's length when it closed.
    pub end: u64,
    /// Start the writeback of this range (the oldest window left dirty), if any.
    pub start: Option<FileRange>,
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
    /// Closed windows left to the page cache, oldest first.
    dirty: std::collections::VecDeque<FileRange>,
    /// How many closed windows stay in `dirty` before the oldest is written back.
    windows_left_dirty: usize,
    /// Closed windows, oldest first, whose writeback was started and not waited for.
    in_flight: std::collections::VecDeque<FileRange>,
}

impl WritebackPacer {
    /// For a top file `file_len` bytes long when the job starts (0 if unknown: the first
    /// window then covers the whole file, which is still right), leaving the last
    /// `windows_left_dirty` closed windows to the page cache.
    pub fn new(file_len: u64, windows_left_dirty: usize) -> Self {
        WritebackPacer {
            copied: 0,
            window_start: file_len,
            dirty: Default::default(),
            windows_left_dirty,
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
        self.dirty.push_back((start, end - start));
        let start = if self.dirty.len() > self.windows_left_dirty {
            self.dirty.pop_front()
        } else {
            None
        };
        let wait = match start {
            Some(started) => {
                self.in_flight.push_back(started);
                if self.in_flight.len() > WINDOWS_IN_FLIGHT {
                    self.in_flight.pop_front()
                } else {
                    None
                }
            }
            None => None,
        };
        Some(WindowClosed { end, start, wait })
    }
}

/// Closed windows a stream leaves to the page cache, from the kernel's dirty-memory settings:
/// half of the dirty bytes at which Linux starts writing back in the background. Below that
/// threshold Linux writes nothing back itself, so a stream that stays below it writes like
/// QEMU's; above it, the stream starts the writeback of its oldest windows rather than leave
/// the kernel to throttle every writer of the machine, the guest first. 0 (write back every
/// window) when the settings cannot be read.
pub fn windows_left_dirty() -> usize {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let allowance = dirty_allowance(
        read("/proc/sys/vm/dirty_background_bytes").as_deref(),
        read("/proc/sys/vm/dirty_background_ratio").as_deref(),
        read("/proc/meminfo").as_deref(),
    );
    usize::try_from(allowance / WRITEBACK_WINDOW).unwrap_or(usize::MAX)
}

/// Half the background writeback threshold: `dirty_background_bytes` if set (non-zero), else
/// `dirty_background_ratio` percent of `MemAvailable` (the memory Linux counts as dirtyable,
/// near enough); 0 if what is needed is missing or malformed.
fn dirty_allowance(
    background_bytes: Option<&str>,
    background_ratio: Option<&str>,
    meminfo: Option<&str>,
) -> u64 {
    let number = |text: Option<&str>| text.and_then(|t| t.trim().parse::<u64>().ok());
    if let Some(bytes) = number(background_bytes).filter(|&b| b > 0) {
        return bytes / 2;
    }
    let available_kib = meminfo.and_then(|info| {
        info.lines()
            .find_map(|line| line.strip_prefix("MemAvailable:"))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse::<u64>().ok())
    });
    match (number(background_ratio), available_kib) {
        (Some(ratio), Some(kib)) => {
            (kib.saturating_mul(1024) / 100).saturating_mul(ratio.min(100)) / 2
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = WRITEBACK_WINDOW;

    #[test]
    fn a_window_closes_after_its_bytes_and_covers_the_files_new_tail() {
        let mut pacer = WritebackPacer::new(1000, 0);
        assert_eq!(pacer.copied(W - 1, || Some(5000)), None);
        let closed = pacer.copied(1, || Some(1000 + W));
        assert_eq!(
            closed,
            Some(WindowClosed {
                end: 1000 + W,
                start: Some((1000, W)),
                wait: None
            })
        );
    }

    #[test]
    fn the_oldest_window_is_waited_for_once_more_than_the_allowed_are_in_flight() {
        let mut pacer = WritebackPacer::new(0, 0);
        let mut waits = Vec::new();
        for n in 1..=WINDOWS_IN_FLIGHT as u64 + 2 {
            let closed = pacer.copied(W, || Some(n * W)).expect("a window closes");
            assert_eq!(closed.start, Some(((n - 1) * W, W)));
            waits.push(closed.wait);
        }
        let mut expected = vec![None; WINDOWS_IN_FLIGHT];
        expected.push(Some((0, W)));
        expected.push(Some((W, W)));
        assert_eq!(waits, expected);
    }

    #[test]
    fn windows_left_dirty_are_written_back_only_once_more_close() {
        let mut pacer = WritebackPacer::new(0, 3);
        let closed: Vec<_> = (1..=6u64)
            .map(|n| pacer.copied(W, || Some(n * W)).expect("a window closes"))
            .collect();
        let starts: Vec<_> = closed.iter().map(|c| c.start).collect();
        assert_eq!(
            starts,
            [
                None,
                None,
                None,
                Some((0, W)),
                Some((W, W)),
                Some((2 * W, W))
            ]
        );
        assert_eq!(
            closed[5].wait,
            Some((0, W)),
            "waits count started windows only"
        );
        assert_eq!(closed[2].end, 3 * W);
    }

    #[test]
    fn an_unknown_file_length_keeps_the_window_open_until_it_is_known() {
        let mut pacer = WritebackPacer::new(0, 0);
        assert_eq!(pacer.copied(W, || None), None);
        let closed = pacer.copied(10, || Some(W + 10)).expect("closes now");
        assert_eq!(closed.start, Some((0, W + 10)));
    }

    #[test]
    fn a_file_shorter_than_the_window_start_gives_an_empty_range_not_an_underflow() {
        let mut pacer = WritebackPacer::new(10 * W, 0);
        let closed = pacer.copied(W, || Some(W)).expect("closes");
        assert_eq!(closed.start, Some((W, 0)));
    }

    const MEMINFO: &str =
        "MemTotal:       24000000 kB\nMemFree:        20000000 kB\nMemAvailable:   22000000 kB\n";

    #[test]
    fn the_allowance_is_half_the_background_threshold() {
        // 10% of 22 000 000 KiB, halved.
        let expected = 22_000_000 * 1024 / 100 * 10 / 2;
        assert_eq!(
            dirty_allowance(Some("0\n"), Some("10\n"), Some(MEMINFO)),
            expected
        );
        assert_eq!(
            dirty_allowance(Some("536870912\n"), Some("10\n"), Some(MEMINFO)),
            256 << 20,
            "dirty_background_bytes overrides the ratio"
        );
    }

    #[test]
    fn unreadable_settings_leave_nothing_dirty() {
        assert_eq!(dirty_allowance(None, None, None), 0);
        assert_eq!(dirty_allowance(Some("0"), Some("ten"), Some(MEMINFO)), 0);
        assert_eq!(
            dirty_allowance(Some("0"), Some("10"), Some("MemFree: 5 kB\n")),
            0
        );
    }
}

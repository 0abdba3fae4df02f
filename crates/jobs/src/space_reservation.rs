//! Reserves the space a stream's copies will take in the top's file before it makes them, so
//! that their writeback allocates no blocks.
//!
//! The stream's new clusters go past the end of the top's file. On ext4 (delayed allocation)
//! their blocks are allocated when they are written back, under the inode's `i_data_sem`, and
//! an allocation in a block group whose bitmap is not at hand waits for the bitmap's I/O. That
//! I/O queues behind the stream's own writeback: off-CPU profiles of stream+fio-rate runs
//! (perf sched_switch) showed the holder waiting in `ext4_wait_block_bitmap` for 20-46 ms at a
//! time, 4-10 times in a stream, while every guest write to a new cluster waited for the lock
//! (and the guest's other writes at the write gate behind it). Space reserved with
//! `fallocate` before the stream starts is allocated while the device is quiet (about 1 ms for
//! 1.3 GiB); writeback then only converts it.
//!
//! Since the daemon's stream leaves its copies to the page cache, most of that writeback comes
//! after `BLOCK_JOB_COMPLETED`, while the guest goes on. There the reservation matters most: a
//! guest held to 12000 IOPS for 2 s past the event had a write p99 of 0.49-0.68 ms with it
//! (QSD: 0.55-0.64) and 3-22 ms in 5 of 6 runs without
//! (bench/results/serve-2026-11-27-flushes.md). Its cost is at the start: the `fallocate`
//! holds the inode lock, and guest writes wait, while it reads block bitmaps from a busy
//! device (up to ~20 ms once per stream).
//!
//! Each reservation covers what is left to copy, counted from the allocation status, up to
//! [`RESERVATION_CHUNK`], plus [`RESERVATION_SLACK`] for the metadata and guest clusters that
//! grow the file too. The next is made when the file comes within half a chunk of the
//! reserved end. What is not used stays reserved past the end of the file, invisible to
//! readers and to `qemu-img check`, until the image is closed.

/// Bytes still to copy that one reservation covers at most.
pub const RESERVATION_CHUNK: u64 = 2 << 30;
/// Added to each reservation.
pub const RESERVATION_SLACK: u64 = 64 << 20;

/// Where the reservation stands; see the module documentation.
#[derive(Debug, Default)]
pub struct SpaceReservation {
    /// File offset where the space reserved so far ends (0: nothing reserved yet).
    reserved_end: u64,
    /// Guest offset up to which the bytes to copy have been counted.
    counted_to: u64,
    /// No more reservations: all that is left to copy is covered, or one was refused.
    done: bool,
}

impl SpaceReservation {
    pub fn new() -> Self {
        Self::default()
    }

    /// Called with the length of the top's file, when the stream starts and as it goes. When
    /// the file has come within half a chunk of the reserved end (or nothing is reserved yet),
    /// counts what is left to copy past what was counted (`count(from)` returns the bytes to
    /// copy it found from guest offset `from`, at most a chunk, and where it stopped) and
    /// reserves that and the slack from the reserved end or the file's end, whichever is
    /// further (`reserve(offset, len)` returns whether it did).
    pub fn top_up(
        &mut self,
        file_len: u64,
        count: impl FnOnce(u64) -> (u64, u64),
        reserve: impl FnOnce(u64, u64) -> bool,
    ) {
        if self.done || self.reserved_end > file_len.saturating_add(RESERVATION_CHUNK / 2) {
            return;
        }
        let (to_copy, counted_to) = count(self.counted_to);
        self.counted_to = counted_to;
        if to_copy == 0 {
            self.done = true;
            return;
        }
        let from = self.reserved_end.max(file_len);
        let len = to_copy + RESERVATION_SLACK;
        if reserve(from, len) {
            self.reserved_end = from + len;
        } else {
            self.done = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// A disk of `len` guest bytes where everything is to copy; returns the reservations made
    /// by `top_up` at each file length in `file_lens`.
    fn reservations(len: u64, file_lens: &[u64], refuse: bool) -> Vec<(u64, u64)> {
        let mut reservation = SpaceReservation::new();
        let mut made = Vec::new();
        for &file_len in file_lens {
            reservation.top_up(
                file_len,
                |from| {
                    let to = (from + RESERVATION_CHUNK).min(len);
                    (to - from, to)
                },
                |offset, len| {
                    made.push((offset, len));
                    !refuse
                },
            );
        }
        made
    }

    #[test]
    fn a_stream_shorter_than_a_chunk_reserves_once_at_the_start() {
        let made = reservations(GIB, &[100, 200, GIB / 2, GIB], false);
        assert_eq!(made, [(100, GIB + RESERVATION_SLACK)]);
    }

    #[test]
    fn a_longer_stream_reserves_the_next_chunk_from_the_reserved_end_when_the_file_nears_it() {
        let first_end = 100 + RESERVATION_CHUNK + RESERVATION_SLACK;
        let near = first_end - RESERVATION_CHUNK / 2;
        let made = reservations(5 * GIB, &[100, near - 1, near, near + 1], false);
        assert_eq!(
            made,
            [
                (100, RESERVATION_CHUNK + RESERVATION_SLACK),
                (first_end, RESERVATION_CHUNK + RESERVATION_SLACK),
            ]
        );
    }

    #[test]
    fn a_file_grown_past_the_reserved_end_reserves_from_its_own_end() {
        let made = reservations(5 * GIB, &[0, 3 * GIB], false);
        assert_eq!(made[1].0, 3 * GIB);
    }

    #[test]
    fn a_refused_reservation_is_not_tried_again() {
        let made = reservations(5 * GIB, &[0, 3 * GIB, 6 * GIB], true);
        assert_eq!(made.len(), 1);
    }

    #[test]
    fn nothing_left_to_copy_reserves_nothing() {
        assert_eq!(reservations(0, &[0, 10], false), []);
    }
}

//! The rate limiter of QEMU block jobs (include/qemu/ratelimit.h, BLOCK_JOB_SLICE_TIME): a
//! byte quota per 100 ms slice; going over the quota stretches the slice, and the job sleeps
//! until its end.

use std::time::{Duration, Instant};

/// Length of one accounting slice (BLOCK_JOB_SLICE_TIME).
pub const SLICE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct RateLimit {
    /// Bytes per slice; 0 = unlimited.
    quota: u64,
    slice_start: Instant,
    slice_end: Instant,
    dispatched: u64,
}

impl RateLimit {
    /// A limiter for `bytes_per_second` (0 = unlimited).
    pub fn new(bytes_per_second: u64) -> Self {
        let now = Instant::now();
        // No slice yet (QEMU's ratelimit_init zeroes slice_end): the first accounting, even at
        // an instant taken just before this one, starts a fresh slice.
        let past = now.checked_sub(SLICE).unwrap_or(now);
        let mut limit = RateLimit {
            quota: 0,
            slice_start: past,
            slice_end: past,
            dispatched: 0,
        };
        limit.set_speed(bytes_per_second);
        limit
    }

    /// Changes the speed; takes effect for the next accounting.
    pub fn set_speed(&mut self, bytes_per_second: u64) {
        self.quota = if bytes_per_second == 0 {
            0
        } else {
            // The quota per slice is at least one byte (ratelimit_set_speed).
            ((bytes_per_second as u128 * SLICE.as_nanos() / 1_000_000_000) as u64).max(1)
        };
    }

    /// Accounts `bytes` at `now` and returns how long to wait before the next transfer.
    pub fn delay_at(&mut self, bytes: u64, now: Instant) -> Duration {
        if self.quota == 0 {
            return Duration::ZERO;
        }
        if self.slice_end < now {
            self.slice_start = now;
            self.slice_end = now + SLICE;
            self.dispatched = 0;
        }
        self.dispatched += bytes;
        if self.dispatched < self.quota {
            return Duration::ZERO;
        }
        let slices = (self.dispatched / self.quota).min(u32::MAX as u64) as u32;
        self.slice_end = self.slice_start + SLICE * slices;
        self.slice_end.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let mut limit = RateLimit::new(0);
        assert_eq!(limit.delay_at(u64::MAX / 2, Instant::now()), Duration::ZERO);
    }

    #[test]
    fn going_over_the_quota_waits_for_the_slices_it_used() {
        let start = Instant::now();
        let mut limit = RateLimit::new(10 * 1024 * 1024);
        // A fresh slice: the quota is 1 MiB per 100 ms.
        assert_eq!(limit.delay_at(0, start), Duration::ZERO);
        let delay = limit.delay_at(3 * 1024 * 1024, start);
        assert_eq!(delay, SLICE * 3);
        // Halfway through, the remaining wait shrinks accordingly.
        let later = start + Duration::from_millis(150);
        assert_eq!(limit.delay_at(0, later), Duration::from_millis(150));
    }

    #[test]
    fn tiny_speeds_still_allow_progress_one_chunk_at_a_time() {
        let start = Instant::now();
        let mut limit = RateLimit::new(1);
        assert_eq!(limit.delay_at(0, start), Duration::ZERO);
        // speed=1: quota 1 byte per slice; one 512 KiB chunk buys 524288 slices of waiting.
        assert_eq!(limit.delay_at(524288, start), SLICE * 524288);
    }
}

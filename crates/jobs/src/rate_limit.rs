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
    /// The current slice (start, end); `None` before the first transfer.
    slice: Option<(Instant, Instant)>,
    dispatched: u64,
}

impl RateLimit {
    /// A limiter for `bytes_per_second` (0 = unlimited).
    pub fn new(bytes_per_second: u64) -> Self {
        let mut limit = RateLimit {
            quota: 0,
            slice: None,
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
        let (start, end) = match self.slice {
            Some((start, end)) if end >= now => (start, end),
            _ => {
                self.dispatched = 0;
                (now, now + SLICE)
            }
        };
        self.dispatched += bytes;
        if self.dispatched < self.quota {
            self.slice = Some((start, end));
            return Duration::ZERO;
        }
        // The slice stretches by the fraction of a quota the excess is, not whole quotas:
        // rounding down would let a chunk that does not divide the quota run up to twice as fast
        // as the limit (ratelimit_calculate_delay keeps the fraction as a double).
        let stretched_nanos = self.dispatched as u128 * SLICE.as_nanos() / self.quota as u128;
        let stretched = Duration::from_nanos(stretched_nanos.min(u64::MAX as u128) as u64);
        let end = start.checked_add(stretched).unwrap_or(end);
        self.slice = Some((start, end));
        end.saturating_duration_since(now)
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
    fn a_chunk_that_does_not_divide_the_quota_waits_for_its_fraction_of_a_slice() {
        let start = Instant::now();
        // 6 MiB/s: a quota of 629145 bytes per slice; two 512 KiB chunks are 1.67 quotas.
        let mut limit = RateLimit::new(6 << 20);
        assert_eq!(limit.delay_at(512 << 10, start), Duration::ZERO);
        let delay = limit.delay_at(512 << 10, start);
        assert_eq!(
            delay,
            Duration::from_nanos(100_000_000 * (1 << 20) / 629_145)
        );
    }

    #[test]
    fn a_stream_of_chunks_keeps_to_the_speed() {
        // Chunks sent as soon as the limiter allows, on a simulated clock where each chunk's
        // copy takes 1 ms (so the stretched slice has ended when the next chunk is accounted,
        // as in a real job), for speeds that the 512 KiB chunk divides and does not: the
        // elapsed time is that of the bytes at the speed, within the chunk sent ahead.
        const CHUNK: u64 = 512 << 10;
        const COPY: Duration = Duration::from_millis(1);
        for speed in [1 << 20, 3 << 20, 6 << 20, 10 << 20, 100 << 20] {
            let start = Instant::now();
            let mut limit = RateLimit::new(speed);
            let mut now = start;
            let chunks = 200;
            for _ in 0..chunks {
                now += COPY;
                now += limit.delay_at(CHUNK, now);
            }
            let elapsed = now - start;
            let expected = Duration::from_secs_f64((chunks * CHUNK) as f64 / speed as f64);
            let one_chunk = Duration::from_secs_f64(CHUNK as f64 / speed as f64);
            // The quota per slice is rounded down to whole bytes, as QEMU's is: a hair slower.
            let slowest = expected.mul_f64(1.0001) + COPY * chunks as u32;
            assert!(
                elapsed + one_chunk >= expected && elapsed <= slowest,
                "{speed} B/s: {elapsed:?} for what takes {expected:?}"
            );
        }
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

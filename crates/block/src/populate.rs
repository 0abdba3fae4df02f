//! Copy-up: pulling into the top what layers above a base define, cluster by cluster, under
//! the range lock. The stream job and copy-on-read both use it; it re-checks the top's
//! allocation under the lock, so it never overwrites what the guest wrote.

use crate::chain::Layer;
use crate::copy_pool;
use crate::io::{read_through, top_of, write_allocated};
use crate::status::allocated_above;
use crate::{Disk, Result};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

/// What one copy-up did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PopulateOutcome {
    /// Bytes written into the top as data.
    pub copied: u64,
    /// Bytes recorded in the top as zero clusters.
    pub zeroed: u64,
}

impl PopulateOutcome {
    fn add(&mut self, other: PopulateOutcome) {
        self.copied += other.copied;
        self.zeroed += other.zeroed;
    }
}

fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets aligned bytes.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

impl Disk {
    /// Copies into the top every cluster of `[offset, offset + length)` that the top does not
    /// define and that layers `1..limit` define (limit = index of the base, or the chain
    /// length for a full stream). Holds the clusters exclusively while it works.
    pub fn populate(&self, offset: u64, length: u64, limit: usize) -> Result<PopulateOutcome> {
        self.check_writable()?;
        let first = self.align_down(offset);
        let last = self
            .align_up(offset.saturating_add(length))
            .min(self.align_up(self.size));
        if last <= first {
            return Ok(PopulateOutcome::default());
        }
        let layers = self.read_layers();
        let _guard = self.locks.exclusive(first, last);
        self.populate_locked(&layers, first, last, limit)
    }

    /// Whether the range from `offset` needs copying up (some cluster the top does not define
    /// is defined by layers `1..limit`), and for how many bytes that answer holds. A "no" is
    /// cluster aligned so that skipping it never skips part of a cluster that needs copying.
    pub fn copy_up_needed(&self, offset: u64, max: u64, limit: usize) -> Result<(bool, u64)> {
        self.check_range(offset, max.max(1))?;
        let layers = self.read_layers();
        let limit = limit.min(layers.len());
        let top = &top_of(&layers)?.image;
        let extent = top.map(offset, max)?;
        if extent.mapping.is_allocated() {
            return Ok((false, extent.length));
        }
        if limit <= 1 {
            return Ok((false, extent.length));
        }
        let (defined, run) = allocated_above(&layers, 1, limit, offset, extent.length)?;
        if defined {
            return Ok((true, run));
        }
        let end = offset + run;
        if end >= self.size {
            return Ok((false, run));
        }
        let down = self.align_down(end);
        if down > offset {
            Ok((false, down - offset))
        } else {
            // Less than a cluster undefined: let the copy-up decide for the whole cluster.
            Ok((true, run))
        }
    }

    /// Copy-up of the cluster-aligned `[first, last)`, which the caller holds exclusively.
    pub(crate) fn populate_locked(
        &self,
        layers: &[Arc<Layer>],
        first: u64,
        last: u64,
        limit: usize,
    ) -> Result<PopulateOutcome> {
        let mut outcome = PopulateOutcome::default();
        let limit = limit.min(layers.len());
        if limit <= 1 {
            return Ok(outcome);
        }
        let top = &top_of(layers)?.image;
        let mut pos = first;
        while pos < last {
            let extent = top.map(pos, last - pos)?;
            let end = self.align_up(pos + extent.length).min(last);
            if !extent.mapping.is_allocated() {
                let mut sub = pos;
                while sub < end {
                    let (defined, run_end) = self.cluster_run_above(layers, limit, sub, end)?;
                    if defined {
                        outcome.add(self.copy_up(layers, sub, run_end)?);
                    }
                    sub = run_end;
                }
            }
            pos = end;
        }
        Ok(outcome)
    }

    /// From cluster-aligned `start`, a run of whole clusters that layers `1..limit` either
    /// define (partly is enough) or do not define at all.
    fn cluster_run_above(
        &self,
        layers: &[Arc<Layer>],
        limit: usize,
        start: u64,
        end: u64,
    ) -> Result<(bool, u64)> {
        let (defined, run) = allocated_above(layers, 1, limit, start, end - start)?;
        if defined {
            return Ok((true, self.align_up(start + run).min(end)));
        }
        let down = self.align_down(start + run);
        if down > start {
            return Ok((false, down));
        }
        // Undefined for less than a cluster: the cluster is copied if anything in it is defined.
        let cluster_end = (start + self.cluster_size).min(end);
        let mut pos = start + run;
        while pos < cluster_end {
            let (defined, run) = allocated_above(layers, 1, limit, pos, cluster_end - pos)?;
            if defined {
                return Ok((true, cluster_end));
            }
            pos += run;
        }
        Ok((false, cluster_end))
    }

    /// Copies the guest content of whole clusters `[start, end)` into the top. Large runs are
    /// split between the calling thread and the copy-up threads: the range is held
    /// exclusively, and the driver serialises its own allocations, so the parts only share the
    /// disk's bandwidth. (The caller working too, rather than waiting for the pool, made a
    /// 2 GiB stream 12-22% faster: one wake-up less per step.)
    fn copy_up(&self, layers: &[Arc<Layer>], start: u64, end: u64) -> Result<PopulateOutcome> {
        let _change = self.change_begins();
        let clusters = (end - start) / self.cluster_size;
        let pool = match copy_pool::pool() {
            Some(pool) if end - start >= PARALLEL_COPY_MIN && clusters >= 2 => pool,
            _ => return self.copy_run(layers, start, end),
        };
        let workers = copy_pool::copy_workers() as u64;
        let per_worker = clusters.div_ceil(workers) * self.cluster_size;
        let parts: Vec<(u64, u64)> = (0..workers)
            .map(|i| start + i * per_worker)
            .filter(|&from| from < end)
            .map(|from| (from, (from + per_worker).min(end)))
            .collect();
        let copy = |&(from, to): &(u64, u64)| {
            std::panic::catch_unwind(AssertUnwindSafe(|| self.copy_run(layers, from, to)))
                .unwrap_or_else(|_| {
                    Err(imgstream_format::Error::new(
                        imgstream_format::ErrorKind::Io,
                        "A copy-up thread panicked",
                    ))
                })
        };
        // The calling thread copies the first part itself while the pool copies the others.
        let Some((first, rest)) = parts.split_first() else {
            return Ok(PopulateOutcome::default());
        };
        let rest_results = std::sync::Mutex::new(Vec::with_capacity(rest.len()));
        let first_result = pool.in_place_scope(|scope| {
            for part in rest {
                let (copy, rest_results) = (&copy, &rest_results);
                scope.spawn(move |_| {
                    let result = copy(part);
                    rest_results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(result);
                });
            }
            copy(first)
        });
        let mut results = rest_results.into_inner().unwrap_or_else(|e| e.into_inner());
        results.push(first_result);
        let mut outcome = PopulateOutcome::default();
        for result in results {
            outcome.add(result?);
        }
        Ok(outcome)
    }

    /// Copies whole clusters `[start, end)`: clusters that read as zeroes become zero
    /// clusters (never zero-filled data, where the format can), the rest new data clusters.
    fn copy_run(&self, layers: &[Arc<Layer>], start: u64, end: u64) -> Result<PopulateOutcome> {
        copy_pool::with_buffer((end - start) as usize, |buffer| {
            read_through(layers, 1, start, buffer)?;
            self.write_copied(layers, start, end, buffer)
        })
    }

    /// Writes `buffer`, the content of clusters `[start, end)`, into the top.
    fn write_copied(
        &self,
        layers: &[Arc<Layer>],
        start: u64,
        end: u64,
        buffer: &[u8],
    ) -> Result<PopulateOutcome> {
        let top = &top_of(layers)?.image;
        let cs = self.cluster_size;
        let mut outcome = PopulateOutcome::default();
        let mut run_start = start;
        while run_start < end {
            let zero = is_zero(&buffer[(run_start - start) as usize..][..cs as usize]);
            let mut run_end = run_start + cs;
            while run_end < end
                && is_zero(&buffer[(run_end - start) as usize..][..cs as usize]) == zero
            {
                run_end += cs;
            }
            let count = (run_end - run_start) / cs;
            if zero && top.zero_clusters(run_start, count)? {
                outcome.zeroed += run_end - run_start;
            } else {
                let host = top.allocate_clusters(count)?;
                write_allocated(
                    top.as_ref(),
                    host,
                    count,
                    &buffer[(run_start - start) as usize..(run_end - start) as usize],
                )?;
                top.map_clusters(run_start, host, count)?;
                outcome.copied += run_end - run_start;
            }
            run_start = run_end;
        }
        Ok(outcome)
    }
}

/// Runs shorter than this are copied by the calling thread alone.
const PARALLEL_COPY_MIN: u64 = 256 << 10;

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zero_detection_sees_a_single_set_byte_anywhere() {
        let mut buffer = vec![0u8; 4099];
        assert!(is_zero(&buffer));
        for at in [0, 1, 7, 8, 2048, 4095, 4098] {
            buffer[at] = 1;
            assert!(!is_zero(&buffer[..]), "byte {at}");
            buffer[at] = 0;
        }
    }
}

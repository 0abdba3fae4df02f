//! `imgstream bench`: a simple I/O benchmark in the style of `qemu-img bench`. Sends COUNT
//! requests of SIZE bytes, DEPTH of them in flight (one thread each), at offsets advancing by
//! STEP (wrapping at the end of the disk as qemu-img does) or at seeded random offsets.

use crate::size::parse_size;
use anyhow::{bail, Context, Result};
use imgstream_block::Disk;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Instant;

#[derive(Debug, clap::Args)]
#[command(about = "Measure I/O throughput with simple request patterns (like qemu-img bench)")]
pub struct Args {
    /// Number of requests to send.
    #[arg(short = 'c', default_value_t = 75000)]
    count: u64,
    /// Requests in flight at once (one thread per request in flight).
    #[arg(short = 'd', default_value_t = 64)]
    depth: u64,
    /// Request size.
    #[arg(short = 's', default_value = "4k")]
    size: String,
    /// Offset step between requests (default: the request size, i.e. sequential).
    #[arg(short = 'S')]
    step: Option<String>,
    /// Offset of the first request.
    #[arg(short = 'o', default_value = "0")]
    offset: String,
    /// Send write requests instead of reads.
    #[arg(short = 'w')]
    write: bool,
    /// Byte that write requests fill their buffer with (default 0, as qemu-img bench).
    #[arg(long, default_value_t = 0)]
    pattern: u8,
    /// Random request offsets (aligned to the request size) from a generator seeded with SEED,
    /// instead of stepping; the same seed gives the same offsets.
    #[arg(long, value_name = "SEED", num_args = 0..=1, default_missing_value = "1")]
    random: Option<u64>,
    /// Flush after every N completed requests, waiting for those in flight first (as
    /// qemu-img bench's default without --no-drain). 0: never.
    #[arg(long, value_name = "N", default_value_t = 0)]
    flush_interval: u64,
    /// Print only the result line.
    #[arg(short = 'q')]
    quiet: bool,
    #[arg(short = 'f')]
    format: Option<String>,
    file: PathBuf,
}

/// Where requests go, fixed before the run so that every thread computes the same sequence.
#[derive(Debug, Clone, Copy)]
enum Offsets {
    /// qemu-img's rule: the first request at `start`; after each, add `step` and wrap modulo
    /// the disk size (a request that would still cross the end restarts at 0).
    Stepped { start: u64, step: u64 },
    /// Uniform over the request-size-aligned offsets of the disk.
    Random { seed: u64 },
}

impl Offsets {
    /// Offset of request number `index`, for a disk of `disk_size` bytes and requests of
    /// `request` bytes (`request <= disk_size`).
    fn nth(self, index: u64, disk_size: u64, request: u64) -> u64 {
        match self {
            Offsets::Stepped { start, step } => {
                let offset = if index == 0 {
                    start
                } else {
                    ((start as u128 + index as u128 * step as u128) % disk_size as u128) as u64
                };
                if offset + request > disk_size {
                    0
                } else {
                    offset
                }
            }
            Offsets::Random { seed } => {
                let slots = disk_size / request;
                splitmix64(seed ^ splitmix64(index)) % slots * request
            }
        }
    }
}

/// SplitMix64: a small, well-mixed generator, enough for spreading benchmark offsets.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub fn run(args: Args) -> Result<u8> {
    let request = parse_size(&args.size)?;
    let step = match &args.step {
        Some(step) => parse_size(step)?,
        None => request,
    };
    let start = parse_size(&args.offset)?;
    if args.count == 0 || args.depth == 0 || request == 0 {
        bail!("-c, -d and -s must be at least 1");
    }
    let request_len = usize::try_from(request).context("Request size too large")?;
    let disk = super::open_disk(&args.file, args.format.as_deref(), args.write, false, false)?;
    let disk_size = disk.size();
    if request > disk_size || start.saturating_add(request) > disk_size {
        bail!("Requests of {request} bytes at offset {start} do not fit in the disk ({disk_size} bytes)");
    }
    let offsets = match args.random {
        Some(seed) => Offsets::Random { seed },
        None => Offsets::Stepped { start, step },
    };
    let depth = args.depth.min(args.count);
    if !args.quiet {
        let kind = if args.write { "write" } else { "read" };
        match offsets {
            Offsets::Stepped { .. } => println!(
                "Sending {} {kind} requests, {request} bytes each, {depth} in parallel \
                 (starting at offset {start}, step size {step})",
                args.count
            ),
            Offsets::Random { seed } => println!(
                "Sending {} {kind} requests, {request} bytes each, {depth} in parallel \
                 (random offsets, seed {seed})",
                args.count
            ),
        }
        if args.flush_interval > 0 {
            println!("Sending flush every {} requests", args.flush_interval);
        }
    }

    let bench = Bench {
        disk: &disk,
        offsets,
        count: args.count,
        request,
        write: args.write,
        flush_interval: args.flush_interval,
        next: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        drain: RwLock::new(()),
    };
    let began = Instant::now();
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..depth)
            .map(|_| {
                let bench = &bench;
                let pattern = args.pattern;
                scope.spawn(move || bench.worker(request_len, pattern))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| bail!("A request thread panicked"))
            })
            .collect()
    });
    let seconds = began.elapsed().as_secs_f64();
    for result in results {
        result?;
    }
    println!("Run completed in {seconds:.3} seconds.");
    if !args.quiet {
        let iops = args.count as f64 / seconds;
        let mib = iops * request as f64 / (1 << 20) as f64;
        println!("{iops:.0} IOPS, {mib:.1} MiB/s");
    }
    // Not timed, as in qemu-img bench, whose flush happens when it closes the image.
    disk.flush()?;
    Ok(0)
}

/// The state the request threads share.
struct Bench<'a> {
    disk: &'a Disk,
    offsets: Offsets,
    count: u64,
    request: u64,
    write: bool,
    flush_interval: u64,
    /// Index of the next request to send.
    next: AtomicU64,
    completed: AtomicU64,
    /// Held shared by each request, exclusively by a flush: a flush waits for (drains) the
    /// requests in flight, as qemu-img bench does by default.
    drain: RwLock<()>,
}

impl Bench<'_> {
    fn worker(&self, request_len: usize, pattern: u8) -> Result<()> {
        let mut buffer = vec![pattern; request_len];
        let disk_size = self.disk.size();
        loop {
            let index = self.next.fetch_add(1, Ordering::Relaxed);
            if index >= self.count {
                return Ok(());
            }
            let offset = self.offsets.nth(index, disk_size, self.request);
            {
                let _in_flight = self.drain.read().unwrap_or_else(|p| p.into_inner());
                if self.write {
                    self.disk.write(offset, &buffer, false)
                } else {
                    self.disk.read(offset, &mut buffer)
                }
                .with_context(|| format!("Failed request at offset {offset}"))?;
            }
            let done = self.completed.fetch_add(1, Ordering::Relaxed) + 1;
            if self.flush_interval > 0 && done.is_multiple_of(self.flush_interval) {
                let _drained = self.drain.write().unwrap_or_else(|p| p.into_inner());
                self.disk.flush().context("Failed flush request")?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stepped_offsets_wrap_like_qemu_img_bench() {
        let offsets = Offsets::Stepped {
            start: 4096,
            step: 8192,
        };
        let seq: Vec<u64> = (0..5).map(|i| offsets.nth(i, 32768, 4096)).collect();
        assert_eq!(seq, [4096, 12288, 20480, 28672, 4096]);
    }

    #[test]
    fn random_offsets_are_aligned_in_range_and_seeded() {
        let offsets = Offsets::Random { seed: 7 };
        for i in 0..1000 {
            let offset = offsets.nth(i, 1 << 30, 4096);
            assert_eq!(offset % 4096, 0);
            assert!(offset + 4096 <= 1 << 30);
            assert_eq!(offset, offsets.nth(i, 1 << 30, 4096));
        }
        assert_ne!(
            offsets.nth(1, 1 << 30, 4096),
            Offsets::Random { seed: 8 }.nth(1, 1 << 30, 4096)
        );
    }
}

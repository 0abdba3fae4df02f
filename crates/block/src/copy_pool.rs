//! The copy-up worker threads: a small persistent pool that splits large copies across the
//! cores, and the copy buffers its threads keep between copies.
//!
//! Spawning threads and mapping fresh zeroed buffers for every run cost about as much as
//! the copy itself on a fragmented chain, so both are kept for the life of the process.
//! The threads run at a low CPU priority, below the threads serving the guest.

use std::cell::{Cell, RefCell};
use std::sync::OnceLock;

/// Threads that copy one run in parallel: the machine's cores, at most 4.
pub(crate) fn copy_workers() -> usize {
    static WORKERS: OnceLock<usize> = OnceLock::new();
    *WORKERS.get_or_init(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(4)
    })
}

/// The pool, or `None` when there is one core (or it cannot be started): then the caller
/// copies alone.
pub(crate) fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        if copy_workers() < 2 {
            return None;
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(copy_workers())
            .thread_name(|i| format!("imgstream-copy-{i}"))
            .start_handler(|_| become_background_thread())
            .build()
            .map_err(|e| tracing::warn!("no copy-up threads ({e}); copying on one thread"))
            .ok()
    })
    .as_ref()
}

/// Nice value of the copy-up threads: well below the guest's threads, not the lowest. Copy-up
/// is background work; on a busy host the guest's requests (served by other threads) must not
/// wait behind it. Measured with bench/serve.py (stream+fio, 5 runs a series): the guest's read
/// p99 during a stream went from 10.9 to 2.9 ms (4 MiB steps) and from 12.4 to 8.4 ms (1 MiB
/// steps, slow disk) between nice 0 and nice 19, with the stream no slower. Once the server
/// answered cached reads on its event loop, a guest saturating its disk took the CPU that a
/// nice-19 stream only gets when nothing else wants it: the stream took 0.86-0.99x QSD's time.
/// At nice 10 (6 runs interleaved with nice 19, nice 5 and QSD, medians of per-run ratios),
/// stream+fio: stream 0.58x QSD's time against 0.86x, guest read/write p99 0.90/1.17x against
/// 0.82/1.19x; stream+fio-rate: 0.68x against 0.74x, p99 0.90/0.85x against 0.83/0.89x (nice
/// 5: 0.67x, p99 1.10/1.08x).
const COPY_THREAD_NICE: libc::c_int = 10;

/// Makes the calling thread a background copier, for the copy-up threads and for a job's
/// own thread, which copies too: [`COPY_THREAD_NICE`] (on Linux, nice is per thread), file
/// writes in small pieces that do not queue behind the guest's
/// ([`mark_background_thread`](imgstream_format::write_gate::mark_background_thread)), and a
/// copy buffer kept between copies.
pub fn become_background_thread() {
    KEEPS_BUFFER.with(|keeps| keeps.set(true));
    imgstream_format::write_gate::mark_background_thread();
    // SAFETY: plain syscall; `who = 0` is the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, COPY_THREAD_NICE) };
    if rc != 0 {
        tracing::debug!(
            "copy-up thread keeps its CPU priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Buffers larger than this are not kept after use.
const KEPT_BUFFER_MAX: usize = 4 << 20;

thread_local! {
    static KEEPS_BUFFER: Cell<bool> = const { Cell::new(false) };
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on a buffer of `len` bytes whose content is unspecified (the caller overwrites
/// all of it). Background threads reuse theirs; other threads (many, in a server's blocking
/// pool) get a fresh one, so that idle buffers stay few.
pub(crate) fn with_buffer<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    let keep = len <= KEPT_BUFFER_MAX && KEEPS_BUFFER.with(Cell::get);
    if !keep {
        return f(&mut vec![0; len]);
    }
    BUFFER.with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        if buffer.len() < len {
            buffer.resize(len, 0);
        }
        f(&mut buffer[..len])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_threads_reuse_their_buffer_and_others_get_fresh_ones() {
        let Some(pool) = pool() else {
            assert_eq!(copy_workers(), 1, "the copy-up pool did not start");
            return; // one core: the caller copies alone, there is no pool to test
        };
        pool.install(|| {
            with_buffer(8192, |b| b.fill(7));
            with_buffer(4096, |b| {
                assert_eq!(b, &[7; 4096][..], "a worker keeps its buffer")
            });
        });
        with_buffer(8192, |b| b.fill(7));
        with_buffer(4096, |b| {
            assert!(b.iter().all(|&x| x == 0), "others allocate afresh")
        });
    }

    #[test]
    fn a_background_thread_keeps_its_buffer_like_the_pool_threads() {
        std::thread::spawn(|| {
            become_background_thread();
            with_buffer(8192, |b| b.fill(7));
            with_buffer(4096, |b| {
                assert_eq!(b, &[7; 4096][..], "a job's thread keeps its buffer")
            });
        })
        .join()
        .unwrap();
    }
}

//! Guest writes and reads through the same disk while a throttled stream copies under them:
//! every read of a thread's own regions matches the model (pre-stream content plus that
//! thread's writes, in order), so copy-on-read and copy-up never return or leave stale data;
//! afterwards the image is standalone, clean, and equal to the model.

mod common;

use common::*;
use imgstream_jobs::{JobStatus, StreamOptions};
use rand::{Rng, SeedableRng};
use std::sync::{Arc, Mutex};

const THREADS: u64 = 4;
/// Regions are handed out round-robin, so each thread's writes interleave with the others'
/// across the whole image while every byte has exactly one writer.
const REGION: u64 = 256 * KIB;
const OPS_PER_THREAD: usize = 800;
const SPEED: u64 = 8 * MIB;

fn guest_io_during_stream(fmt: &'static str, stream: bool) {
    let (mut rng, seed) = seeded(&format!("guest_io_during_stream({fmt})"));
    let f = Fixture::new(fmt, 32);
    let model = Arc::new(Mutex::new(std::fs::read(&f.before).unwrap()));
    let disk = f.open();
    let setup = JobSetup {
        speed: SPEED,
        ..Default::default()
    };
    let options = StreamOptions {
        base_depth: if stream { 3 } else { 1 },
        ..full_stream()
    };
    let (job, events) = start(&disk, options, setup);
    let regions = f.size / REGION;
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let disk = disk.clone();
            let model = model.clone();
            let mut rng = rand::rngs::StdRng::seed_from_u64(rng.gen());
            std::thread::spawn(move || {
                let owned: Vec<u64> = (0..regions).filter(|r| r % THREADS == t).collect();
                for op in 0..OPS_PER_THREAD {
                    let region = owned[rng.gen_range(0..owned.len())] * REGION;
                    let start = region + rng.gen_range(0..REGION);
                    let len = rng.gen_range(1..=(region + REGION - start).min(100 * KIB));
                    let range = start as usize..(start + len) as usize;
                    match rng.gen_range(0..10) {
                        0..=3 => {
                            let mut data = vec![0u8; len as usize];
                            rng.fill(&mut data[..]);
                            disk.write(start, &data, false).unwrap();
                            model.lock().unwrap()[range].copy_from_slice(&data);
                        }
                        4 => {
                            disk.write_zeroes(start, len, false).unwrap();
                            model.lock().unwrap()[range].fill(0);
                        }
                        _ => {
                            let mut got = vec![0u8; len as usize];
                            disk.read(start, &mut got).unwrap();
                            let want = model.lock().unwrap()[range].to_vec();
                            if got != want {
                                let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
                                panic!(
                                    "thread {t} op {op}: read {start}+{len} differs at guest \
                                     offset {}: got {:#04x}, model {:#04x}",
                                    start + at as u64,
                                    got[at],
                                    want[at]
                                );
                            }
                        }
                    }
                }
            })
        })
        .collect();
    let mut failed = None;
    for worker in workers {
        if let Err(panic) = worker.join() {
            failed.get_or_insert(panic);
        }
    }
    if let Some(panic) = failed {
        eprintln!("guest_io_during_stream({fmt}): failed with seed {seed}");
        std::panic::resume_unwind(panic);
    }
    let during = job.info();
    eprintln!(
        "{fmt}: guest I/O done with the stream at {} of {} ({} copied, status {})",
        during.offset,
        during.len,
        during.copied,
        during.status.name()
    );
    if during.status == JobStatus::Running || during.status == JobStatus::Paused {
        let _ = job.set_speed(0);
    }
    assert_eq!(
        job.wait_concluded(),
        None,
        "seed {seed}: {:?}",
        events.names()
    );
    wait_until(&job, &events, "null", || job.is_finished());
    // A guest flushes before it goes away. Twice: qcow2 applies released clusters' refcounts
    // in memory at the end of a write-back and writes them with the next one, and its close
    // does a single write-back, so without this overwritten clusters show up as leaks (see
    // closing_after_overwrites_leaks_nothing).
    disk.flush().unwrap();
    disk.flush().unwrap();
    close(disk);
    let expected = f.dir.path().join("expected.raw");
    std::fs::write(&expected, &*model.lock().unwrap()).unwrap();
    let context = format!("{fmt}, seed {seed}");
    let backing = backing_of(&f.top, fmt);
    assert_eq!(backing.is_none(), stream, "{context}: backing {backing:?}");
    assert_check_clean(&f.top, fmt, &context);
    assert_same_as_raw(&f.top, fmt, &expected, &context);
}

#[test]
fn guest_writes_and_reads_during_a_throttled_stream_of_a_qcow2_top() {
    guest_io_during_stream("qcow2", true);
}

#[test]
fn guest_writes_and_reads_during_a_throttled_stream_of_a_qed_top() {
    guest_io_during_stream("qed", true);
}

#[test]
fn guest_writes_and_reads_without_a_stream_leave_a_clean_qcow2() {
    guest_io_during_stream("qcow2", false);
}

#[test]
fn closing_after_overwrites_leaks_nothing() {
    let f = Fixture::new("qcow2", 4);
    let disk = f.open();
    disk.write(0, &[1u8; 128 * 1024], false).unwrap();
    disk.flush().unwrap();
    // Whole-cluster zeroes release the clusters written above.
    disk.write_zeroes(0, 128 * KIB, false).unwrap();
    close(disk);
    assert_check_clean(&f.top, "qcow2", "closed without a flush after overwrites");
}

/// Two guest threads flushing without pause, so that a flush is nearly always under way when
/// the stream waits for the flushes under way: it still completes, with the right content.
/// (That a flush begun after the wait does not hold it back is
/// imgstream-block's `a_flush_begun_later_does_not_hold_back_a_waiter`.)
#[test]
fn a_stream_completes_while_the_guest_flushes_without_pause() {
    let f = Fixture::new("qcow2", 48);
    let disk = f.open();
    let (job, events) = start(&disk, full_stream(), JobSetup::default());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flushers: Vec<_> = (0..2)
        .map(|_| {
            let (disk, stop) = (disk.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    disk.flush().unwrap();
                }
            })
        })
        .collect();
    wait_until(&job, &events, "the stream's end", || job.is_finished());
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for flusher in flushers {
        flusher.join().unwrap();
    }
    assert!(
        events.contains("BLOCK_JOB_COMPLETED"),
        "{:?}",
        events.names()
    );
    assert_eq!(job.wait_concluded(), None);
    close(disk);
    assert_eq!(backing_of(&f.top, "qcow2"), None);
    assert_check_clean(&f.top, "qcow2", "after the stream");
    assert_same_as_raw(&f.top, "qcow2", &f.before, "after the stream");
}

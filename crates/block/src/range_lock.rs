//! Byte-range locks that keep guest writes and copy-ups of the same clusters apart: shared for
//! reads, exclusive for anything that may allocate or rewrite a cluster.

use std::sync::{Condvar, Mutex};

#[derive(Debug, Clone, Copy)]
struct Held {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
}

impl Held {
    fn conflicts(&self, start: u64, end: u64, exclusive: bool) -> bool {
        self.start < end && start < self.end && (self.exclusive || exclusive)
    }
}

#[derive(Debug, Default)]
struct State {
    held: Vec<Held>,
    next_id: u64,
}

/// A set of held ranges; waiters block until no conflicting range is held.
#[derive(Debug, Default)]
pub struct RangeLocks {
    state: Mutex<State>,
    released: Condvar,
}

/// A held range; released on drop.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

impl RangeLocks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits until `[start, end)` can be held shared (no exclusive holder overlaps).
    pub fn shared(&self, start: u64, end: u64) -> RangeGuard<'_> {
        self.acquire(start, end, false)
    }

    /// Waits until `[start, end)` can be held exclusively (no holder overlaps).
    pub fn exclusive(&self, start: u64, end: u64) -> RangeGuard<'_> {
        self.acquire(start, end, true)
    }

    /// `[start, end)` held shared if no exclusive holder overlaps it now; `None` otherwise.
    pub fn try_shared(&self, start: u64, end: u64) -> Option<RangeGuard<'_>> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.held.iter().any(|h| h.conflicts(start, end, false)) {
            return None;
        }
        Some(self.hold(&mut state, start, end, false))
    }

    fn acquire(&self, start: u64, end: u64, exclusive: bool) -> RangeGuard<'_> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while state
            .held
            .iter()
            .any(|h| h.conflicts(start, end, exclusive))
        {
            state = self.released.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        self.hold(&mut state, start, end, exclusive)
    }

    fn hold(&self, state: &mut State, start: u64, end: u64, exclusive: bool) -> RangeGuard<'_> {
        let id = state.next_id;
        state.next_id += 1;
        state.held.push(Held {
            id,
            start,
            end,
            exclusive,
        });
        RangeGuard { locks: self, id }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut state = self.locks.state.lock().unwrap_or_else(|p| p.into_inner());
        state.held.retain(|h| h.id != self.id);
        drop(state);
        self.locks.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn readers_share_and_writers_exclude() {
        let locks = RangeLocks::new();
        let a = locks.shared(0, 100);
        let b = locks.shared(50, 150);
        drop((a, b));
        let _c = locks.exclusive(0, 10);
        let _d = locks.exclusive(10, 20);
    }

    #[test]
    fn try_shared_fails_only_where_an_exclusive_holder_overlaps() {
        let locks = RangeLocks::new();
        let writer = locks.exclusive(100, 200);
        assert!(locks.try_shared(150, 160).is_none());
        assert!(locks.try_shared(50, 101).is_none());
        let reader = locks.try_shared(200, 300).expect("no overlap");
        let second = locks.try_shared(250, 260).expect("readers share");
        drop(writer);
        let _again = locks.try_shared(100, 200).expect("writer gone");
        drop((reader, second));
    }

    #[test]
    fn exclusive_waits_for_overlapping_holder() {
        let locks = Arc::new(RangeLocks::new());
        let entered = Arc::new(AtomicBool::new(false));
        let guard = locks.shared(0, 4096);
        let thread = {
            let locks = locks.clone();
            let entered = entered.clone();
            std::thread::spawn(move || {
                let _g = locks.exclusive(4095, 8192);
                entered.store(true, Ordering::SeqCst);
            })
        };
        // The writer cannot have entered while we hold an overlapping range.
        assert!(!entered.load(Ordering::SeqCst));
        drop(guard);
        thread.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
    }
}

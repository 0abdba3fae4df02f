//! A one-way signal that many tasks can wait on: server shutdown, and the
//! hang-up of one connection.

use std::sync::Arc;

use tokio::sync::watch;

/// Starts open; once tripped it stays tripped, and every waiter wakes.
#[derive(Clone, Debug)]
pub(crate) struct Latch {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Latch {
    fn default() -> Self {
        Latch::new()
    }
}

impl Latch {
    pub(crate) fn new() -> Self {
        Latch {
            tx: Arc::new(watch::channel(false).0),
        }
    }

    pub(crate) fn trip(&self) {
        self.tx.send_replace(true);
    }

    pub(crate) fn is_tripped(&self) -> bool {
        *self.tx.borrow()
    }

    /// Completes once the latch is tripped (at once if it already is).
    pub(crate) async fn tripped(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives as long as `self`, so this cannot fail.
        let _ = rx.wait_for(|tripped| *tripped).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_tripped_latch_wakes_current_and_later_waiters() {
        let latch = Latch::new();
        assert!(!latch.is_tripped());
        let waiter = tokio::spawn({
            let latch = latch.clone();
            async move { latch.tripped().await }
        });
        latch.trip();
        waiter.await.unwrap();
        latch.tripped().await;
        assert!(latch.is_tripped());
    }
}

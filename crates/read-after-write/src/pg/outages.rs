//! [`Outages`]: when a node was last seen down.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// When a node was last seen down, so its pool can drop connections opened
/// before the outage without a test query per checkout.
#[derive(Debug)]
pub(crate) struct Outages {
    origin: Instant,
    /// Nanoseconds after `origin` of the last outage; 0 for none.
    last_down: AtomicU64,
}

impl Outages {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Outages {
            origin: Instant::now(),
            last_down: AtomicU64::new(0),
        })
    }

    pub(crate) fn mark_down(&self) {
        let nanos = u64::try_from(self.origin.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        self.last_down.store(nanos, Ordering::Relaxed);
    }

    /// Whether a connection of this age was opened before the last outage.
    pub(crate) fn predates_last_outage(&self, age: Duration) -> bool {
        let last_down = self.last_down.load(Ordering::Relaxed);
        if last_down == 0 {
            return false;
        }
        let now = self.origin.elapsed();
        let opened = now.saturating_sub(age);
        opened < Duration::from_nanos(last_down)
    }
}

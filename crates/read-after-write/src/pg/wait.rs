//! The one wait loop every waiting read runs (fixed, predicted and
//! monotonic alike): re-check on every tracker change or after a nap, never
//! past the read's deadline.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::PgReplicaSet;

/// What a wait loop's check decides; see `PgReplicaSet::wait_loop`.
pub(super) enum Step<R> {
    /// Stop waiting, with this answer.
    Done(R),
    /// Keep waiting; re-check on the tracker's next change, or after at
    /// most this long.
    Wait(Duration),
}

impl PgReplicaSet {
    /// The one wait loop: calls `check` with the time left, and, while it
    /// asks to keep waiting, sleeps until the tracker's next change or the
    /// nap it asks for, whichever comes first, never past `deadline`.
    /// `None` when the deadline passed (or the tracker stopped) first.
    pub(super) async fn wait_loop<R>(
        &self,
        deadline: Instant,
        mut check: impl FnMut(Duration) -> Step<R>,
    ) -> Option<R> {
        let until = deadline;
        let _waiting = Waiting::new(&self.inner.tracker.waiting_reads);
        let mut changed = self.inner.tracker.changed.subscribe();
        loop {
            changed.borrow_and_update();
            let left = deadline.saturating_duration_since(Instant::now());
            let nap = match check(left) {
                Step::Done(answer) => return Some(answer),
                Step::Wait(nap) => nap.max(self.inner.wait_poll_interval),
            };
            if left.is_zero() {
                return None;
            }
            let next = tokio::time::timeout(nap, changed.changed());
            match tokio::time::timeout_at(until, next).await {
                Ok(Ok(Ok(()))) | Ok(Err(_)) => continue,
                Ok(Ok(Err(_))) | Err(_) => return None,
            }
        }
    }

    /// Nanoseconds after the tracker's origin at which a wait of `left`
    /// from now ends.
    pub(super) fn wait_ends(&self, left: Duration) -> u64 {
        let left = u64::try_from(left.as_nanos()).unwrap_or(u64::MAX);
        self.inner.tracker.nanos().saturating_add(left)
    }
}

/// Counts a read in a wait loop for as long as it is in one, however the
/// loop ends (an answer, the deadline, or the read's future dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

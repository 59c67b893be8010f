//! [`PrimaryBudget`]: a cap on the primary's share of session reads, and
//! the sliding window that measures it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// A cap on the primary's share of session reads; see
/// [`primary_budget`](super::PgReplicaSetBuilder::primary_budget).
///
/// While more than `share` of the session reads in the last `window` went to
/// the primary, a read that finds no replica caught up waits up to
/// `hard_max_wait` for a replica predicted to get there in that time,
/// instead of its `max_wait`. **This is the one exception to `max_wait`
/// being the longest a session read waits**: the primary's load is worth
/// that wait to whoever set the cap. It still never reads from a replica
/// that lacks the write, and reads with a `max_wait` of zero are not made
/// to wait.
///
/// ```
/// use read_after_write::pg::PrimaryBudget;
/// use std::time::Duration;
///
/// let budget = PrimaryBudget::new(0.15, Duration::from_secs(10), Duration::from_millis(200))
///     .min_reads(50);
/// assert_eq!(budget.share(), 0.15);
/// // Out-of-range shares are clamped, not a panic.
/// assert_eq!(PrimaryBudget::new(7.0, Duration::from_secs(1), Duration::ZERO).share(), 1.0);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrimaryBudget {
    share: f64,
    window: Duration,
    hard_max_wait: Duration,
    min_reads: u64,
}

impl PrimaryBudget {
    /// At most `share` (0 to 1) of session reads on the primary over a
    /// sliding `window` (at least 10 ms); reads may wait up to
    /// `hard_max_wait` to keep to it. The cap applies once the window holds
    /// 20 reads ([`min_reads`](Self::min_reads)).
    pub fn new(share: f64, window: Duration, hard_max_wait: Duration) -> Self {
        let share = if share.is_nan() {
            1.0
        } else {
            share.clamp(0.0, 1.0)
        };
        PrimaryBudget {
            share,
            window: window.max(Duration::from_millis(10)),
            hard_max_wait,
            min_reads: 20,
        }
    }

    /// How many session reads the window must hold before the cap applies
    /// (default 20, at least 1), so that the first few reads after a quiet
    /// spell do not count as a 100 % share.
    pub fn min_reads(mut self, reads: u64) -> Self {
        self.min_reads = reads.max(1);
        self
    }

    /// The largest share of session reads the primary should serve.
    pub fn share(&self) -> f64 {
        self.share
    }

    /// The window the share is measured over.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The longest a read waits while the share is over the cap.
    pub fn hard_max_wait(&self) -> Duration {
        self.hard_max_wait
    }
}

/// Buckets in the primary share's sliding window.
const BUCKETS: usize = 10;

/// One slice of the sliding window.
#[derive(Default)]
struct Bucket {
    /// Which slice of time the counts are for (time / bucket length).
    epoch: AtomicU64,
    reads: AtomicU64,
    primary: AtomicU64,
}

/// Session reads and primary reads over a sliding window, in buckets of
/// atomics: recording is three atomic operations, reading the share thirty
/// loads. A bucket reused for a new slice of time is reset by whichever
/// read gets there first; a count racing with that reset may be lost,
/// which a share does not notice.
pub(crate) struct PrimaryShare {
    budget: PrimaryBudget,
    buckets: [Bucket; BUCKETS],
    bucket_nanos: u64,
    origin: Instant,
}

impl PrimaryShare {
    pub(crate) fn new(budget: PrimaryBudget) -> Self {
        let bucket_nanos = u64::try_from(budget.window.as_nanos() / BUCKETS as u128)
            .unwrap_or(u64::MAX)
            .max(1);
        PrimaryShare {
            budget,
            buckets: Default::default(),
            bucket_nanos,
            origin: Instant::now(),
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        // Epoch 0 would match a fresh bucket: start at 1.
        let nanos = u64::try_from(now.saturating_duration_since(self.origin).as_nanos())
            .unwrap_or(u64::MAX);
        nanos / self.bucket_nanos + 1
    }

    /// Counts one session read, and whether it went to the primary.
    pub(crate) fn record(&self, to_primary: bool, now: Instant) {
        let epoch = self.epoch(now);
        let bucket = &self.buckets[(epoch % BUCKETS as u64) as usize];
        let seen = bucket.epoch.load(Ordering::Acquire);
        if seen < epoch
            && bucket
                .epoch
                .compare_exchange(seen, epoch, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            bucket.reads.store(0, Ordering::Relaxed);
            bucket.primary.store(0, Ordering::Relaxed);
        }
        bucket.reads.fetch_add(1, Ordering::Relaxed);
        if to_primary {
            bucket.primary.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Session reads and primary reads in the window ending `now`.
    fn counts(&self, now: Instant) -> (u64, u64) {
        let epoch = self.epoch(now);
        let oldest = epoch.saturating_sub(BUCKETS as u64 - 1);
        self.buckets
            .iter()
            .filter(|b| (oldest..=epoch).contains(&b.epoch.load(Ordering::Acquire)))
            .fold((0, 0), |(reads, primary), b| {
                (
                    reads + b.reads.load(Ordering::Relaxed),
                    primary + b.primary.load(Ordering::Relaxed),
                )
            })
    }

    pub(crate) fn hard_max_wait(&self) -> Duration {
        self.budget.hard_max_wait
    }

    /// Whether the primary's share in the window is over the cap.
    pub(crate) fn over_cap(&self, now: Instant) -> bool {
        let (reads, primary) = self.counts(now);
        reads >= self.budget.min_reads && primary as f64 > self.budget.share * reads as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_primary_share_counts_a_sliding_window() {
        let budget = PrimaryBudget::new(0.25, Duration::from_secs(10), Duration::from_millis(100))
            .min_reads(4);
        let share = PrimaryShare::new(budget);
        let start = share.origin;
        // Three reads, all on the primary: under min_reads, no cap yet.
        for _ in 0..3 {
            share.record(true, start);
        }
        assert!(!share.over_cap(start));
        share.record(false, start);
        assert!(share.over_cap(start), "3 of 4 on the primary");
        // Replica reads bring the share down to the cap: 3 of 12 is 25 %.
        for _ in 0..8 {
            share.record(false, start + Duration::from_secs(1));
        }
        assert!(!share.over_cap(start + Duration::from_secs(1)));
        // A window later the old buckets no longer count.
        let later = start + Duration::from_secs(10) + Duration::from_millis(500);
        assert_eq!(share.counts(later), (8, 0));
        let much_later = start + Duration::from_secs(60);
        assert_eq!(share.counts(much_later), (0, 0));
        // A reused bucket starts from zero.
        share.record(true, much_later);
        assert_eq!(share.counts(much_later), (1, 1));
    }

    #[test]
    fn a_nan_share_is_no_cap() {
        let budget = PrimaryBudget::new(f64::NAN, Duration::ZERO, Duration::ZERO);
        assert_eq!(budget.share(), 1.0);
        assert_eq!(budget.window(), Duration::from_millis(10));
    }
}

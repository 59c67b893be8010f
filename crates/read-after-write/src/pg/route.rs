//! Where a read goes: the routing policy of [`PgReplicaSet`], fed by the
//! [`ReplicaTracker`](super::ReplicaTracker)'s atomics and the
//! [predictions](super::predict) made from them.
//!
//! - **Session reads** go to a replica that has replayed the token's
//!   position. When none has, [`WaitPolicy::Predicted`] (the default) waits
//!   only if some replica is predicted to replay it within the latency
//!   budget, and goes to the primary at once otherwise
//!   (`reason="predicted_late"`); [`WaitPolicy::Fixed`] waits the full
//!   `max_wait` whatever the replicas look like.
//! - A [`PrimaryBudget`] caps the primary's share of session reads: while a
//!   sliding window is over the cap, reads wait longer for a replica. Never
//!   for a replica that lacks the write: waiting longer is all it does.
//! - **Eventual reads** go to any healthy replica whose staleness is within
//!   `max_staleness`, else the primary (`reason="too_stale"`).
//!
//! # Example
//!
//! ```no_run
//! use read_after_write::pg::{PgReplicaSet, PrimaryBudget};
//! use std::time::Duration;
//!
//! # async fn run() -> Result<(), read_after_write::pg::PgSetupError> {
//! let replicas = PgReplicaSet::builder()
//!     .primary_url("postgres://app@db-primary/app")
//!     .replica_url("replica-1", "postgres://app@db-replica-1/app")
//!     // Wait for a replica only if it is predicted within 30 ms.
//!     .latency_budget(Duration::from_millis(30))
//!     // At most 15 % of session reads on the primary over 10 s; to keep
//!     // to it, reads may wait up to 200 ms for a replica.
//!     .primary_budget(PrimaryBudget::new(
//!         0.15,
//!         Duration::from_secs(10),
//!         Duration::from_millis(200),
//!     ))
//!     // Eventual reads skip replicas more than 5 s behind.
//!     .max_staleness(Duration::from_secs(5))
//!     .connect()
//!     .await?;
//! # Ok(())
//! # }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::predict;
use super::server::ReplicaState;
use super::PgReplicaSet;
use crate::backend::{RouteReason, Routed, Target};
use crate::bookmark::Bookmark;
use crate::position::WritePosition;

/// How a session read that finds no replica caught up decides whether to
/// wait; set with [`latency_budget`](super::PgReplicaSetBuilder::latency_budget),
/// [`fixed_wait`](super::PgReplicaSetBuilder::fixed_wait) or
/// [`wait_policy`](super::PgReplicaSetBuilder::wait_policy).
///
/// ```
/// use read_after_write::pg::WaitPolicy;
///
/// // By default the budget is each read's own max_wait.
/// assert_eq!(WaitPolicy::default(), WaitPolicy::Predicted { latency_budget: None });
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WaitPolicy {
    /// Wait only while some replica is predicted to replay the position
    /// within the budget of the read's start: the `max_wait` the read is
    /// given, capped by `latency_budget` if set. Otherwise read from the
    /// primary at once (`reason="predicted_late"`). The prediction is
    /// re-checked on every tracker change: a replica that pauses or falls
    /// behind mid-wait ends the wait at once.
    Predicted {
        /// A cap on what any read adds waiting for a replica, below the
        /// `max_wait` it is given; `None` for no cap beyond `max_wait`.
        latency_budget: Option<Duration>,
    },
    /// Wait up to the full `max_wait` for any replica, then read from the
    /// primary (`reason="wait_timed_out"`): the behaviour before predictions.
    Fixed,
}

impl Default for WaitPolicy {
    /// [`Predicted`](Self::Predicted) with no cap of its own: each read's
    /// budget is the `max_wait` it is given (the layer's, or
    /// `Db::read_within`'s), the bound its caller already chose. A second
    /// default cap would silently cut an explicit `read_within(200 ms)`
    /// short; and since a predicted wait is only spent when a replica is
    /// expected to end it, a generous `max_wait` costs little.
    fn default() -> Self {
        WaitPolicy::Predicted {
            latency_budget: None,
        }
    }
}

/// A cap on the primary's share of session reads; see
/// [`primary_budget`](super::PgReplicaSetBuilder::primary_budget).
///
/// While more than `share` of the session reads in the last `window` went to
/// the primary, a read that finds no replica caught up waits up to
/// `hard_max_wait` (instead of the latency budget or `max_wait`) for a
/// replica predicted to get there in that time. It still never reads from a
/// replica that lacks the write. Reads with a `max_wait` of zero are not
/// made to wait.
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
    /// sliding `window`; reads may wait up to `hard_max_wait` to keep to it.
    /// The cap applies once the window holds 20 reads
    /// ([`min_reads`](Self::min_reads)).
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
    /// (default 20), so that the first few reads after a quiet spell do not
    /// count as a 100 % share.
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

    /// Whether the primary's share in the window is over the cap.
    pub(crate) fn over_cap(&self, now: Instant) -> bool {
        let (reads, primary) = self.counts(now);
        reads >= self.budget.min_reads && primary as f64 > self.budget.share * reads as f64
    }

    pub(crate) fn hard_max_wait(&self) -> Duration {
        self.budget.hard_max_wait
    }
}

/// A bijective mix of a counter (the splitmix64 finaliser): a cheap,
/// lock-free pseudo-random sequence, enough to spread reads.
fn scramble(ticket: usize) -> usize {
    let mut x = (ticket as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    x as usize
}

impl PgReplicaSet {
    /// A replica for which `qualifies` holds, by the configured selection.
    pub(super) fn pick(&self, qualifies: impl Fn(&ReplicaState) -> bool) -> Option<&ReplicaState> {
        let replicas = &self.inner.tracker.servers;
        let count = replicas.len();
        if count == 0 {
            return None;
        }
        match self.inner.selection {
            super::Selection::RoundRobin | super::Selection::Random => {
                let ticket = self.inner.next.fetch_add(1, Ordering::Relaxed);
                let start = if self.inner.selection == super::Selection::Random {
                    scramble(ticket)
                } else {
                    ticket
                };
                (0..count)
                    .filter_map(|i| replicas.get((start % count + i) % count))
                    .find(|r| qualifies(r))
            }
            super::Selection::LeastLag => replicas
                .iter()
                .filter(|r| qualifies(r))
                .max_by_key(|r| r.replayed.load(Ordering::Acquire)),
        }
    }

    /// Whether a read with a token on `timeline` may wait for `replica`:
    /// it is known to follow that timeline, or, with heartbeats, it follows
    /// no known one yet and may prove it when it replays the heartbeat
    /// written after the token's write (right after a start, or after the
    /// primary changed, no heartbeat of the new primary is visible
    /// anywhere). Waiting is never reading: the read still needs the proof.
    fn may_prove(&self, replica: &ReplicaState, timeline: u32) -> bool {
        replica.is_on(timeline)
            || (self.inner.tracker.heartbeat.is_some()
                && timeline != 0
                && replica.healthy.load(Ordering::Acquire)
                && replica.tied()
                && replica.known_timeline() == 0)
    }

    /// Why no replica can serve a token on `timeline`, if none can: none is
    /// healthy, or none was seen on that timeline.
    fn none_eligible(&self, timeline: u32) -> Option<RouteReason> {
        let mut healthy = false;
        for replica in self.replica_states() {
            if self.may_prove(replica, timeline) {
                return None;
            }
            healthy |= replica.healthy.load(Ordering::Acquire);
        }
        Some(if healthy {
            RouteReason::NoReplicaOnTimeline
        } else {
            RouteReason::NoHealthyReplica
        })
    }

    /// An eventual read: a healthy replica following the primary whose
    /// staleness is within `max_staleness` (any, for `None`), else the
    /// primary.
    pub(super) fn route_eventual(&self, max_staleness: Option<Duration>) -> Routed<'_, PgPool> {
        let timeline = self.timeline();
        // Read the clock only when there is a bound to hold it against.
        let bound = max_staleness.map(|bound| (bound, self.inner.tracker.nanos()));
        // A bound needs the read to run where the staleness was measured.
        let fresh = |r: &ReplicaState| {
            bound.is_none_or(|(bound, now)| r.tied() && r.staleness(now) <= bound)
        };
        match self.pick(|r| r.serves_eventual(timeline) && fresh(r)) {
            Some(replica) => super::monotonic::bookmarked(
                replica,
                RouteReason::Eventual,
                super::monotonic::eventual_bookmark(replica, self.system_id()),
            ),
            None if max_staleness.is_some()
                && self.replica_states().any(|r| r.serves_eventual(timeline)) =>
            {
                Routed::primary(self.primary_pool(), RouteReason::TooStale)
            }
            None => Routed::primary(self.primary_pool(), RouteReason::NoHealthyReplica),
        }
    }

    /// A session read, counted against the primary budget if one is set.
    pub(super) async fn route_session(
        &self,
        required: WritePosition,
        max_wait: Duration,
    ) -> Routed<'_, PgPool> {
        let routed = self.route_session_uncounted(required, max_wait).await;
        if let Some(share) = &self.inner.primary_share {
            share.record(routed.target == Target::Primary, Instant::now());
        }
        routed
    }

    async fn route_session_uncounted(
        &self,
        required: WritePosition,
        max_wait: Duration,
    ) -> Routed<'_, PgPool> {
        self.inner.tracker.note_needed();
        if required.system_id != self.system_id() {
            let mut routed = self.route_eventual(self.inner.max_staleness);
            if routed.reason == RouteReason::Eventual {
                routed.reason = RouteReason::ForeignCluster;
            }
            return routed;
        }
        if required.timeline != self.timeline() {
            return Routed::primary(self.primary_pool(), RouteReason::TimelineChanged);
        }
        let caught_up = |r: &ReplicaState| r.has_replayed(required.lsn, required.timeline);
        if let Some(replica) = self.pick(caught_up) {
            self.inner.canary.sample(replica, required.lsn);
            return super::monotonic::bookmarked(
                replica,
                RouteReason::CaughtUp,
                Bookmark::new(required),
            );
        }
        if let Some(reason) = self.none_eligible(required.timeline) {
            return Routed::primary(self.primary_pool(), reason);
        }
        if max_wait.is_zero() {
            return Routed::primary(self.primary_pool(), RouteReason::Lagging);
        }
        let over_cap = self
            .inner
            .primary_share
            .as_ref()
            .filter(|share| share.over_cap(Instant::now()));
        let started = Instant::now();
        // Over the primary's cap, the budget's hard bound replaces the
        // latency budget and max_wait, whichever is longer.
        let bound = over_cap.map(|share| share.hard_max_wait().max(max_wait));
        let routed = match self.inner.wait_policy {
            WaitPolicy::Predicted { latency_budget } => {
                let capped = latency_budget.map_or(max_wait, |cap| cap.min(max_wait));
                let budget = bound.unwrap_or(capped);
                self.wait_predicted(required, budget, started).await
            }
            WaitPolicy::Fixed => {
                self.wait_fixed(required, bound.unwrap_or(max_wait), started)
                    .await
            }
        };
        metrics::histogram!("read_after_write_read_wait_seconds")
            .record(started.elapsed().as_secs_f64());
        routed
    }

    /// A replica that has replayed `required` now, as a read that waited
    /// for it is routed: tied to that replica for monotonic reads.
    fn caught_up_after_wait(&self, required: WritePosition) -> Option<Routed<'_, PgPool>> {
        self.pick(|r| r.has_replayed(required.lsn, required.timeline))
            .map(|replica| {
                self.inner.canary.sample(replica, required.lsn);
                super::monotonic::bookmarked(
                    replica,
                    RouteReason::CaughtUpAfterWait,
                    Bookmark::new(required),
                )
            })
    }

    /// The wait before predictions: up to `max_wait` for any replica, asking
    /// every replica for a poll each wait-poll interval.
    async fn wait_fixed(
        &self,
        required: WritePosition,
        max_wait: Duration,
        started: Instant,
    ) -> Routed<'_, PgPool> {
        let deadline = tokio::time::Instant::from_std(started + max_wait);
        let mut changed = self.inner.tracker.changed.subscribe();
        loop {
            changed.borrow_and_update();
            self.inner.tracker.request_refresh();
            if let Some(routed) = self.caught_up_after_wait(required) {
                return routed;
            }
            // Wake on the tracker's next change, or after one wait-poll
            // interval to ask for another poll when the last one showed no
            // progress.
            let next = tokio::time::timeout(self.inner.wait_poll_interval, changed.changed());
            match tokio::time::timeout_at(deadline, next).await {
                Ok(Ok(Ok(()))) | Ok(Err(_)) => continue,
                // The deadline passed, or the tracker is gone: stop waiting.
                Ok(Ok(Err(_))) | Err(_) => {
                    return self.caught_up_after_wait(required).unwrap_or_else(|| {
                        Routed::primary(self.primary_pool(), RouteReason::WaitTimedOut)
                    });
                }
            }
        }
    }

    /// The predicted wait: while some replica is predicted to replay
    /// `required` within `budget` of `started`, wait for it; the moment none
    /// is, the primary.
    ///
    /// Polling stays bounded: until shortly before the soonest prediction
    /// the tracker's regular polls suffice; from then on only the replicas
    /// predicted within the budget are asked for a poll, at most one per
    /// wait-poll interval each, however many reads wait.
    async fn wait_predicted(
        &self,
        required: WritePosition,
        budget: Duration,
        started: Instant,
    ) -> Routed<'_, PgPool> {
        let deadline = tokio::time::Instant::from_std(started + budget);
        let mut changed = self.inner.tracker.changed.subscribe();
        // Fast polls start this long before the soonest prediction: two
        // regular polls, the error a prediction made from them can have.
        let lead = self.inner.poll_interval.saturating_mul(2);
        loop {
            changed.borrow_and_update();
            if let Some(routed) = self.caught_up_after_wait(required) {
                return routed;
            }
            let elapsed = started.elapsed();
            let left = budget.saturating_sub(elapsed);
            let soonest = self.soonest(required, left, lead);
            let Some(soonest) = soonest.filter(|&eta| eta <= left) else {
                return Routed::primary(self.primary_pool(), RouteReason::PredictedLate);
            };
            // Sleep until fast polls are due, or until the prediction of a
            // replica that stands still would pass the budget: a late
            // replica's prediction grows as fast as time passes while the
            // budget left shrinks as fast, so they meet halfway. Nothing
            // changes in the tracker while a replica stands still, so only
            // this wake-up re-checks it.
            let until_fast = soonest.saturating_sub(lead);
            let until_slip = (left - soonest) / 2;
            let nap = until_fast
                .min(until_slip)
                .max(self.inner.wait_poll_interval);
            let next = tokio::time::timeout(nap, changed.changed());
            match tokio::time::timeout_at(deadline, next).await {
                Ok(Ok(Ok(()))) | Ok(Err(_)) => continue,
                Ok(Ok(Err(_))) | Err(_) => {
                    return self.caught_up_after_wait(required).unwrap_or_else(|| {
                        Routed::primary(self.primary_pool(), RouteReason::WaitTimedOut)
                    });
                }
            }
        }
    }

    /// When `replica` is predicted to replay `required`, from now; `None`
    /// for never (paused, or no prediction can be made).
    pub(super) fn predict_one(
        &self,
        replica: &ReplicaState,
        required: WritePosition,
    ) -> Option<Duration> {
        let target = required.lsn.as_u64();
        let tracker = &self.inner.tracker;
        let now = Instant::now();
        let now_nanos = tracker.nanos();
        tracker
            .primary
            .with_history(|history| {
                let since_written = predict::since_written(history, target, now);
                let replayed = replica.replayed.load(Ordering::Acquire);
                let lag_now = predict::first_missing(history, replayed)
                    .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
                let view = replica.view(lag_now, now_nanos);
                predict::predict(&view, target, since_written, self.inner.poll_interval)
            })
            .flatten()
    }

    /// The budget of a session read given `max_wait`, by the wait policy:
    /// `None` for a fixed wait (wait up to `max_wait` whatever the
    /// prediction).
    pub(super) fn predicted_budget(&self, max_wait: Duration) -> Option<Duration> {
        match self.inner.wait_policy {
            WaitPolicy::Predicted { latency_budget } => {
                Some(latency_budget.map_or(max_wait, |cap| cap.min(max_wait)))
            }
            WaitPolicy::Fixed => None,
        }
    }

    /// The soonest any replica that may serve `required` (healthy, on its
    /// timeline, following the primary) is predicted to replay it; `None`
    /// when every one is predicted never. Asks those predicted within `lead`
    /// of now, and within `left`, for a poll.
    fn soonest(&self, required: WritePosition, left: Duration, lead: Duration) -> Option<Duration> {
        let target = required.lsn.as_u64();
        let tracker = &self.inner.tracker;
        let slack = self.inner.poll_interval;
        let now = Instant::now();
        let now_nanos = tracker.nanos();
        let soonest = tracker.primary.with_history(|history| {
            let since_written = predict::since_written(history, target, now);
            let mut soonest: Option<Duration> = None;
            for replica in self.replica_states() {
                if !self.may_prove(replica, required.timeline)
                    || replica.diverged.load(Ordering::Relaxed)
                {
                    continue;
                }
                let replayed = replica.replayed.load(Ordering::Acquire);
                let lag_now = predict::first_missing(history, replayed)
                    .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
                let view = replica.view(lag_now, now_nanos);
                let Some(eta) = predict::predict(&view, target, since_written, slack) else {
                    continue;
                };
                if eta <= left && eta <= lead {
                    replica.request_refresh();
                }
                soonest = Some(soonest.map_or(eta, |s| s.min(eta)));
            }
            soonest
        });
        soonest.flatten()
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

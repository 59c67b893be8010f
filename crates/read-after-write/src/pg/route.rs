//! Where a read goes: the routing policy of [`PgReplicaSet`], fed by the
//! [`ReplicaTracker`](super::ReplicaTracker)'s atomics and the predictions
//! made from them (`predict`). The rule this code keeps is written once, in
//! [how routing decides](crate::guide::routing): session reads, the
//! [`WaitPolicy`], the [`PrimaryBudget`] (the one wait beyond `max_wait`)
//! and eventual reads within a staleness bound.
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
//!     // At most 15 % of session reads on the primary over 10 s; to keep
//!     // to it, reads may wait up to 200 ms for a replica.
//!     .primary_budget(PrimaryBudget::new(
//!         0.15,
//!         Duration::from_secs(10),
//!         Duration::from_millis(200),
//!     ))
//!     .connect()
//!     .await?;
//! # Ok(())
//! # }
//! ```

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use sqlx::PgPool;

use super::predict;
use super::server::ReplicaState;
use super::wait::Step;
use super::PgReplicaSet;
use crate::backend::{RouteReason, Routed, Target};
use crate::bookmark::Bookmark;
use crate::position::WritePosition;

/// How a session read that finds no replica caught up decides whether to
/// wait; set with [`wait_policy`](super::PgReplicaSetBuilder::wait_policy).
/// Either way it never waits longer than its `max_wait` (the layer's, or
/// `Db::read_within`'s).
///
/// ```
/// use read_after_write::pg::WaitPolicy;
///
/// assert_eq!(WaitPolicy::default(), WaitPolicy::Predicted);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum WaitPolicy {
    /// Wait only while some replica is predicted to replay the position
    /// within the read's `max_wait`; otherwise read from the primary at once
    /// (`reason="predicted_late"`). The prediction is re-checked on every
    /// tracker change: a replica that pauses or falls behind mid-wait ends
    /// the wait at once. The default: since a predicted wait is spent only
    /// when a replica is expected to end it, a generous `max_wait` costs
    /// little.
    #[default]
    Predicted,
    /// Wait up to the full `max_wait` for any replica, then read from the
    /// primary (`reason="wait_timed_out"`): the behaviour before
    /// predictions.
    Fixed,
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
                .max_by_key(|r| r.replayed()),
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
                && replica.is_healthy()
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
            healthy |= replica.is_healthy();
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
            let mut routed = self.route_eventual(None);
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
        // Over the primary's cap, its hard bound replaces max_wait, when
        // longer: the one exception to max_wait bounding the wait.
        let bound = self
            .inner
            .primary_share
            .as_ref()
            .filter(|share| share.over_cap(Instant::now()))
            .map_or(max_wait, |share| share.hard_max_wait().max(max_wait));
        let started = Instant::now();
        let routed = match self.inner.wait_policy {
            WaitPolicy::Predicted => self.wait_predicted(required, bound, started).await,
            WaitPolicy::Fixed => self.wait_fixed(required, bound, started).await,
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

    /// The wait before predictions: up to `max_wait` for any replica that
    /// may prove the position, each waiting for it on the server.
    async fn wait_fixed(
        &self,
        required: WritePosition,
        max_wait: Duration,
        started: Instant,
    ) -> Routed<'_, PgPool> {
        let target = required.lsn.as_u64();
        let waited = self
            .wait_loop(started + max_wait, |left| {
                if let Some(routed) = self.caught_up_after_wait(required) {
                    return Step::Done(routed);
                }
                let until = self.wait_ends(left);
                for replica in self.replica_states() {
                    if self.may_prove(replica, required.timeline) {
                        replica.await_position(target, until, None);
                    }
                }
                Step::Wait(left)
            })
            .await;
        waited.unwrap_or_else(|| {
            self.caught_up_after_wait(required)
                .unwrap_or_else(|| Routed::primary(self.primary_pool(), RouteReason::WaitTimedOut))
        })
    }

    /// The predicted wait: while some replica is predicted to replay
    /// `required` within `budget` of `started`, wait for it; the moment none
    /// is, the primary.
    ///
    /// The replicas predicted within the budget wait for the position on
    /// the server (see [`ReplicaState::await_position`]), so the read
    /// resumes within about a millisecond of the replay; the others are not
    /// asked anything. However many reads wait, each server runs one such
    /// wait at a time, for the highest position asked.
    async fn wait_predicted(
        &self,
        required: WritePosition,
        budget: Duration,
        started: Instant,
    ) -> Routed<'_, PgPool> {
        let waited = self
            .wait_loop(started + budget, |left| {
                if let Some(routed) = self.caught_up_after_wait(required) {
                    return Step::Done(routed);
                }
                match self.soonest(required, left).filter(|&eta| eta <= left) {
                    None => Step::Done(Routed::primary(
                        self.primary_pool(),
                        RouteReason::PredictedLate,
                    )),
                    // Re-check when the prediction of a replica that stands
                    // still would pass the budget: a late replica's
                    // prediction grows as fast as time passes while the
                    // budget left shrinks as fast, so they meet halfway.
                    // Nothing changes in the tracker while a replica stands
                    // still, so only this wake-up re-checks it.
                    Some(soonest) => Step::Wait((left - soonest) / 2),
                }
            })
            .await;
        waited.unwrap_or_else(|| {
            self.caught_up_after_wait(required)
                .unwrap_or_else(|| Routed::primary(self.primary_pool(), RouteReason::WaitTimedOut))
        })
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
                let replayed = replica.replayed();
                let lag_now = predict::first_missing(history, replayed)
                    .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
                let view = replica.view(lag_now, now_nanos);
                predict::predict(&view, target, since_written, self.inner.poll_interval)
            })
            .flatten()
    }

    /// Whether a read given `max_wait` waits by prediction (`Some`, with
    /// that budget) or up to `max_wait` whatever the prediction (`None`).
    pub(super) fn predicted_budget(&self, max_wait: Duration) -> Option<Duration> {
        match self.inner.wait_policy {
            WaitPolicy::Predicted => Some(max_wait),
            WaitPolicy::Fixed => None,
        }
    }

    /// The soonest any replica that may serve `required` (healthy, on its
    /// timeline, following the primary) is predicted to replay it; `None`
    /// when every one is predicted never. Asks those predicted within
    /// `left` to wait for it on the server.
    fn soonest(&self, required: WritePosition, left: Duration) -> Option<Duration> {
        let until = self.wait_ends(left);
        let target = required.lsn.as_u64();
        let tracker = &self.inner.tracker;
        let slack = self.inner.poll_interval;
        let now = Instant::now();
        let now_nanos = tracker.nanos();
        let soonest = tracker.primary.with_history(|history| {
            let since_written = predict::since_written(history, target, now);
            let mut soonest: Option<Duration> = None;
            for replica in self.replica_states() {
                if !self.may_prove(replica, required.timeline) || replica.is_diverged() {
                    continue;
                }
                let replayed = replica.replayed();
                let lag_now = predict::first_missing(history, replayed)
                    .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
                let view = replica.view(lag_now, now_nanos);
                let Some(eta) = predict::predict(&view, target, since_written, slack) else {
                    continue;
                };
                if eta <= left {
                    let at = self.wait_ends(eta);
                    replica.await_position(target, until, Some(at));
                }
                soonest = Some(soonest.map_or(eta, |s| s.min(eta)));
            }
            soonest
        });
        soonest.flatten()
    }
}

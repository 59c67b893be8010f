//! Monotonic reads over a [`PgReplicaSet`]: where a session that holds a
//! [`Bookmark`] may read without going back in time.
//!
//! The rule (see [`bookmark`](crate::bookmark) for why): a bookmark tied to
//! a replica is honoured only by that replica, and only while it is the same
//! server incarnation (its tag, which covers the postmaster's start time,
//! matches), healthy, not diverged, and on the bookmark's timeline. Replay
//! on one incarnation never goes backwards, so for an eventual read its
//! position need not be compared with anything: the replica is at least
//! where it was when the session read it, whatever this instance's tracker
//! last polled. A session read also needs the bookmark's position (the
//! user's writes) and waits for that replica to replay it. A bookmark tied
//! to no replica is honoured by any replica that has replayed its
//! position; the read then ties the session to that replica.

use std::time::Duration;

use tokio::time::Instant;

use sqlx::PgPool;

use super::server::ReplicaState;
use super::wait::Step;
use super::PgReplicaSet;
use crate::backend::{RouteReason, Routed};
use crate::bookmark::{Bookmark, ReplicaTag};
use crate::position::{Lsn, WritePosition};

impl ReplicaState {
    /// Whether a session that read this replica as `tag` may read it again:
    /// the same incarnation, healthy, not diverged, on `timeline`.
    fn still_is(&self, tag: ReplicaTag, timeline: u32) -> bool {
        self.is_healthy()
            && self.tied()
            && self.replica_tag() == Some(tag)
            && !self.is_diverged()
            && timeline != 0
            && self.known_timeline() == timeline
    }
}

/// A route to `replica` that carries `bookmark`, moved to it, when the
/// replica's incarnation is known.
pub(crate) fn bookmarked<'a>(
    replica: &'a ReplicaState,
    reason: RouteReason,
    bookmark: Bookmark,
) -> Routed<'a, PgPool> {
    let routed = Routed::replica(&replica.pool, &replica.name, reason);
    match replica.replica_tag() {
        Some(tag) => routed.with_bookmark(bookmark.on_replica(tag)),
        None => routed,
    }
}

/// The bookmark an eventual read on `replica` earns: the position the
/// tracker last saw it at (a lower bound of what the read sees, which is
/// all a position may promise), on that replica.
pub(crate) fn eventual_bookmark(replica: &ReplicaState, system_id: u64) -> Bookmark {
    Bookmark::new(WritePosition::new(
        Lsn::new(replica.replayed()),
        replica.known_timeline(),
        system_id,
    ))
}

impl PgReplicaSet {
    /// See [`Backend::monotonic`](crate::Backend::monotonic) and the
    /// [module docs](self).
    pub(crate) async fn route_monotonic(
        &self,
        bookmark: Option<Bookmark>,
        max_wait: Option<Duration>,
        max_staleness: Option<Duration>,
    ) -> Routed<'_, PgPool> {
        // Nothing read here yet: any replica, and the session stays there.
        let Some(bookmark) = bookmark else {
            return self.route_eventual(max_staleness);
        };
        let position = bookmark.position;
        if position.system_id != self.system_id() {
            // Another cluster's bookmark says nothing about this one.
            let mut routed = self.route_eventual(max_staleness);
            routed.reason = RouteReason::ForeignCluster;
            return routed;
        }
        if position.pins_primary() {
            return Routed::primary(self.primary_pool(), RouteReason::PositionUnknown);
        }
        if position.timeline != self.timeline() {
            return Routed::primary(self.primary_pool(), RouteReason::TimelineChanged);
        }
        let Some(tag) = bookmark.replica else {
            // Everything the session saw is at most `position`: any replica
            // that has it is safe.
            self.inner.tracker.note_needed();
            let caught_up = |r: &ReplicaState| r.has_replayed(position.lsn, position.timeline);
            return match (self.pick(caught_up), max_wait) {
                (Some(replica), _) => {
                    self.inner.canary.sample(replica, position.lsn);
                    bookmarked(replica, RouteReason::CaughtUp, bookmark)
                }
                (None, Some(max_wait)) => self.route_session(position, max_wait).await,
                (None, None) => Routed::primary(self.primary_pool(), RouteReason::Lagging),
            };
        };
        let Some(replica) = self
            .replica_states()
            .find(|r| r.still_is(tag, position.timeline))
        else {
            // Its replica is gone: nothing bounds what the session saw there.
            return Routed::primary(self.primary_pool(), RouteReason::LeftReplica);
        };
        // A bound on staleness holds for the session's replica too: one that
        // fell too far behind is left, through the primary.
        if let Some(bound) = max_staleness {
            if replica.staleness(self.inner.tracker.nanos()) > bound {
                return Routed::primary(self.primary_pool(), RouteReason::TooStale);
            }
        }
        let sticky =
            |reason| Routed::replica(&replica.pool, &replica.name, reason).with_bookmark(bookmark);
        // Left through the primary because the replica lags: the session
        // may come back once it replays the primary's position, when no
        // other replica is predicted to get there clearly sooner.
        let leave = |reason| {
            let routed = Routed::primary(self.primary_pool(), reason);
            match self.keeps(replica, position) {
                true => routed.with_bookmark(bookmark),
                false => routed,
            }
        };
        let Some(max_wait) = max_wait else {
            // A floor the session saw binds eventual reads too.
            if bookmark.floor && !replica.has_replayed(position.lsn, position.timeline) {
                return leave(RouteReason::Lagging);
            }
            return sticky(RouteReason::Sticky);
        };
        if replica.has_replayed(position.lsn, position.timeline) {
            return sticky(RouteReason::Sticky);
        }
        // The user wrote after reading here: wait for this replica to
        // replay the write, as a session read waits for any; with
        // predictions, only while it is predicted to make it in time.
        self.inner.tracker.note_needed();
        let started = Instant::now();
        let budget = self.predicted_budget(max_wait);
        let in_time = |left: Duration| {
            budget.is_none()
                || self
                    .predict_one(replica, position)
                    .is_some_and(|eta| eta <= left)
        };
        if !in_time(budget.unwrap_or(max_wait)) {
            return leave(RouteReason::PredictedLate);
        }
        let bound = budget.unwrap_or(max_wait);
        let target = position.lsn.as_u64();
        let mut slipped = false;
        let reached = self
            .wait_loop(started + bound, |left| {
                if replica.has_replayed(position.lsn, position.timeline)
                    || !replica.still_is(tag, position.timeline)
                {
                    return Step::Done(());
                }
                if !in_time(left) {
                    slipped = true;
                    return Step::Done(());
                }
                let eta = self
                    .predict_one(replica, position)
                    .map(|eta| self.wait_ends(eta));
                replica.await_position(target, self.wait_ends(left), eta);
                Step::Wait(left)
            })
            .await
            .is_some();
        metrics::histogram!("read_after_write_read_wait_seconds")
            .record(started.elapsed().as_secs_f64());
        if reached && replica.has_replayed(position.lsn, position.timeline) {
            sticky(RouteReason::CaughtUpAfterWait)
        } else if !replica.still_is(tag, position.timeline) {
            Routed::primary(self.primary_pool(), RouteReason::LeftReplica)
        } else if slipped {
            leave(RouteReason::PredictedLate)
        } else {
            leave(RouteReason::WaitTimedOut)
        }
    }

    /// Whether a session leaving `replica` through the primary for lag may
    /// come back to it: it is predicted to replay `position`, and no other
    /// replica it could move to is predicted to get there more than
    /// [`KEEP_SLACK`] sooner. Where replicas lag alike the session stays,
    /// and its next replica read re-issues no token; where another is
    /// clearly faster, the session is tied to none and moves there.
    fn keeps(&self, replica: &ReplicaState, position: WritePosition) -> bool {
        let Some(mine) = self.predict_one(replica, position) else {
            return false;
        };
        self.replica_states()
            .filter(|other| {
                !std::ptr::eq(*other, replica)
                    && other.is_healthy()
                    && other.tied()
                    && !other.is_diverged()
                    && other.known_timeline() == position.timeline
            })
            .filter_map(|other| self.predict_one(other, position))
            .all(|theirs| mine <= theirs + KEEP_SLACK)
    }
}

/// How much later than the fastest other replica a session's replica may
/// be predicted to replay a position and still be kept (see
/// [`PgReplicaSet::keeps`]).
const KEEP_SLACK: Duration = Duration::from_millis(20);

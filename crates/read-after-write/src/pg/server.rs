//! One replica server as the tracker knows it: [`ReplicaState`], and the
//! rule by which it proves it holds a write ([`qualifies`]).
//!
//! A replica URL may reach several servers (a reader endpoint, DNS round
//! robin, a pooler with several hosts): each server the tracker finds
//! behind it gets its own `ReplicaState`, its own probe connection and its
//! own pool, whose connections are admitted only when their fingerprint is
//! this server's (see [`endpoint`](super::endpoint)). Routing a read is then
//! a choice among servers, never among addresses.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::Notify;

use super::endpoint::Admission;
use super::fingerprint::Fingerprint;
use super::outages::Outages;
use super::predict::ReplicaView;
use super::probe_conn::ProbeConn;
use crate::position::Lsn;

/// An unset nanosecond atomic: no delay measured yet, nothing missing.
pub(crate) const UNKNOWN: u64 = u64::MAX;

/// `missing_since` of a replica whose position cannot be known (Aurora):
/// infinitely stale, so no staleness bound admits it.
pub(crate) const STALE_FOREVER: u64 = u64::MAX - 1;

/// [`ReplicaState::sees_timelines`] before the tracker first connected.
pub(crate) const SEES_TIMELINES_UNKNOWN: u8 = 0;
/// The tracker's role is a member of `pg_read_all_stats`.
pub(crate) const SEES_TIMELINES_YES: u8 = 1;
/// The tracker's role cannot see replica timelines.
pub(crate) const SEES_TIMELINES_NO: u8 = 2;

/// What the tracker knows about one replica server. Written only by its
/// task; read by every routing decision.
pub(crate) struct ReplicaState {
    /// The server's name: the endpoint's name for the first server found
    /// behind it, `name#2`, `name#3`, ... for the others.
    pub(crate) name: String,
    /// Index of the endpoint (configured replica) this server is behind.
    pub(crate) endpoint: usize,
    /// Reads on this server go through this pool, whose connections are
    /// admitted only if they reached this server (see `endpoint`).
    pub(crate) pool: PgPool,
    /// The server this state follows (`None` until one was found), shared
    /// with the pool's admission check. May change only while the state is
    /// down: a repointed address, or a restart.
    pub(crate) admission: Arc<Admission>,
    /// A probe connection another task opened and found to reach this
    /// server, handed over for this server's task to take.
    inbox: Mutex<Option<(ProbeConn, Fingerprint)>>,
    /// Last `pg_last_wal_replay_lsn()`; meaningful only while `healthy`.
    pub(crate) replayed: AtomicU64,
    /// Last timeline this process saw the replica receiving on
    /// (`pg_stat_wal_receiver.received_tli`); 0 while never seen (no WAL
    /// receiver since this process started, or no privilege to see it).
    pub(crate) timeline: AtomicU32,
    /// The heartbeat proof: the highest primary position this replica has
    /// shown a heartbeat of the *current* primary for (see
    /// [`heartbeat`](super::heartbeat)); 0 for none.
    pub(crate) proven: AtomicU64,
    /// The timeline of the primary whose heartbeat proves `proven`; 0 when
    /// nothing is proven.
    pub(crate) proven_timeline: AtomicU32,
    /// Answering, in recovery, with a replay position.
    pub(crate) healthy: AtomicBool,
    /// When it was last seen going down, in nanoseconds after the
    /// tracker's origin (at least 1); 0 while up or never polled.
    pub(crate) down_since: AtomicU64,
    /// When `replayed` last moved, in nanoseconds after the tracker's origin.
    pub(crate) advanced_at: AtomicU64,
    /// Seen on a timeline other than the primary's, its replay stalled
    /// while the primary wrote, or it replayed past a heartbeat of the
    /// current primary without showing it: it has left the primary's
    /// history, so it serves no reads at all.
    pub(crate) diverged: AtomicBool,
    /// When the replica was last seen down; its pool discards connections
    /// opened before then instead of failing a read on them.
    pub(crate) outages: Arc<Outages>,
    /// Wakes this server's task for an immediate poll, or to take a
    /// connection from its inbox.
    pub(crate) refresh: Notify,
    /// Set once a warning about this node not replaying WAL was logged.
    pub(crate) warned: AtomicBool,
    /// The [`ReplicaTag`](crate::bookmark::ReplicaTag) of the incarnation last polled; 0 while unknown
    /// or down.
    pub(crate) tag: AtomicU64,
    /// Set once the "cannot see timelines" warning was logged.
    pub(crate) warned_privilege: AtomicBool,
    /// A replay pause is requested or in effect.
    pub(crate) paused: AtomicBool,
    /// Smoothed replay delay in nanoseconds; [`UNKNOWN`] until measured.
    delay: AtomicU64,
    /// Smoothed replay rate in bytes per second, as `f64` bits.
    rate: AtomicU64,
    /// When the primary was first seen with WAL this replica lacked at its
    /// last poll, in nanoseconds after the tracker's origin; [`UNKNOWN`]
    /// when it lacked nothing the tracker had seen.
    pub(crate) missing_since: AtomicU64,
    /// When the last poll that answered with a position arrived.
    pub(crate) polled_at: AtomicU64,
    /// Whether the tracker's role may read `pg_stat_wal_receiver`.
    pub(crate) sees_timelines: AtomicU8,
    /// What reads are waiting for this server to prove; its task waits
    /// for it on the server itself (see
    /// [`await_position`](Self::await_position)). Touched by waiting reads
    /// and the task only, never on a read that does not wait.
    pub(crate) wait: Mutex<WaitRequest>,
}

impl ReplicaState {
    pub(crate) fn new(
        name: String,
        endpoint: usize,
        pool: PgPool,
        admission: Arc<Admission>,
        outages: Arc<Outages>,
    ) -> Self {
        ReplicaState {
            name,
            endpoint,
            pool,
            admission,
            inbox: Mutex::new(None),
            replayed: AtomicU64::new(0),
            timeline: AtomicU32::new(0),
            proven: AtomicU64::new(0),
            proven_timeline: AtomicU32::new(0),
            healthy: AtomicBool::new(false),
            down_since: AtomicU64::new(0),
            advanced_at: AtomicU64::new(0),
            diverged: AtomicBool::new(false),
            outages,
            refresh: Notify::new(),
            warned: AtomicBool::new(false),
            warned_privilege: AtomicBool::new(false),
            tag: AtomicU64::new(0),
            sees_timelines: AtomicU8::new(SEES_TIMELINES_UNKNOWN),
            paused: AtomicBool::new(false),
            delay: AtomicU64::new(UNKNOWN),
            rate: AtomicU64::new(0f64.to_bits()),
            missing_since: AtomicU64::new(UNKNOWN),
            polled_at: AtomicU64::new(0),
            wait: Mutex::new(WaitRequest::default()),
        }
    }

    /// The server this state follows, if one was found.
    pub(crate) fn identity(&self) -> Option<Fingerprint> {
        self.admission.identity()
    }

    /// Whether this state follows `found`'s server (any incarnation).
    pub(crate) fn is_server(&self, found: &Fingerprint) -> bool {
        self.identity()
            .is_some_and(|known| known.same_server(found))
    }

    /// Follows `found` from now on: its pool admits only connections to
    /// it. Returns the previous identity.
    pub(crate) fn set_identity(&self, found: Fingerprint) -> Option<Fingerprint> {
        self.admission.set_identity(found)
    }

    /// Leaves a connection that reached `found` for this server's task,
    /// which takes it at its next poll. Returns it back if one is already
    /// waiting.
    pub(crate) fn hand_over(
        &self,
        conn: ProbeConn,
        found: Fingerprint,
    ) -> Result<(), (ProbeConn, Fingerprint)> {
        let mut inbox = self.inbox.lock().unwrap_or_else(PoisonError::into_inner);
        if inbox.is_some() {
            return Err((conn, found));
        }
        *inbox = Some((conn, found));
        drop(inbox);
        self.refresh.notify_one();
        Ok(())
    }

    /// Takes a connection left by [`hand_over`](Self::hand_over).
    pub(crate) fn take_handed_over(&self) -> Option<(ProbeConn, Fingerprint)> {
        self.inbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Whether a connection is waiting in the inbox.
    pub(crate) fn has_handed_over(&self) -> bool {
        self.inbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    // Reads of the tracker's state, each with its memory ordering chosen
    // here once: routing and status go through these, never the atomics.

    /// The last replay position polled (meaningful while healthy).
    #[inline]
    pub(crate) fn replayed(&self) -> u64 {
        self.replayed.load(Ordering::Acquire)
    }

    /// Answering, in recovery, with a replay position.
    #[inline]
    pub(crate) fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Left the primary's history: serves no reads.
    #[inline]
    pub(crate) fn is_diverged(&self) -> bool {
        self.diverged.load(Ordering::Relaxed)
    }

    /// A replay pause was requested or is in effect.
    pub(crate) fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// The timeline its WAL receiver was last seen on; 0 unknown.
    pub(crate) fn receiver_timeline(&self) -> u32 {
        self.timeline.load(Ordering::Relaxed)
    }

    /// This replica's tag, if its incarnation is known.
    pub(crate) fn replica_tag(&self) -> Option<crate::bookmark::ReplicaTag> {
        crate::bookmark::ReplicaTag::new(self.tag.load(Ordering::Relaxed))
    }

    /// Whether a heartbeat of the current primary proves what it holds.
    pub(crate) fn heartbeat_proven(&self) -> bool {
        self.proven_timeline.load(Ordering::Relaxed) != 0
    }

    /// Whether the tracker's role may see its timeline; `None` before the
    /// tracker first connected.
    pub(crate) fn sees_timelines(&self) -> Option<bool> {
        match self.sees_timelines.load(Ordering::Relaxed) {
            SEES_TIMELINES_YES => Some(true),
            SEES_TIMELINES_NO => Some(false),
            _ => None,
        }
    }

    /// The smoothed replay delay, if one was measured.
    pub(crate) fn delay(&self) -> Option<Duration> {
        match self.delay.load(Ordering::Relaxed) {
            UNKNOWN => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }

    pub(crate) fn set_delay(&self, delay: Duration) {
        let nanos = u64::try_from(delay.as_nanos()).unwrap_or(UNKNOWN - 1);
        self.delay.store(nanos, Ordering::Relaxed);
    }

    /// The smoothed replay rate, bytes per second.
    pub(crate) fn rate(&self) -> f64 {
        f64::from_bits(self.rate.load(Ordering::Relaxed))
    }

    pub(crate) fn set_rate(&self, rate: f64) {
        self.rate.store(rate.to_bits(), Ordering::Relaxed);
    }

    /// How stale this replica's reads are at `now` (nanoseconds after the
    /// tracker's origin): how long ago the primary first had WAL it lacked
    /// at its last poll; zero when it lacked nothing.
    #[inline]
    pub(crate) fn staleness(&self, now: u64) -> Duration {
        match self.missing_since.load(Ordering::Relaxed) {
            UNKNOWN => Duration::ZERO,
            STALE_FOREVER => Duration::MAX,
            since => Duration::from_nanos(now.saturating_sub(since)),
        }
    }

    /// What a prediction needs at `now`, with `lag_now` worked out by the
    /// caller from the primary's history.
    pub(crate) fn view(&self, lag_now: Duration, now: u64) -> ReplicaView {
        let advanced_at = self.advanced_at.load(Ordering::Relaxed);
        ReplicaView {
            replayed: self.replayed.load(Ordering::Acquire),
            paused: self.paused.load(Ordering::Relaxed),
            delay: self.delay(),
            rate: self.rate(),
            still_for: Duration::from_nanos(now.saturating_sub(advanced_at)),
            lag_now,
        }
    }

    /// Asks this server's task for an immediate poll (no sooner than the
    /// minimum gap after its last one).
    pub(crate) fn request_refresh(&self) {
        self.refresh.notify_one();
    }

    /// Asks this server's task to wait, on the server, until it can prove
    /// `lsn` or `until` (nanoseconds after the tracker's origin) passes:
    /// one query that returns the moment replay gets there, instead of a
    /// poll every few milliseconds.
    ///
    /// Waiting reads coalesce on the *lowest* position asked, until the
    /// latest deadline: the wait returns as soon as the first of them can
    /// be served, the reads re-check on the poll that follows, and those
    /// still waiting ask again, for what they still need. A read waiting
    /// for an early position is never held back by a later one.
    pub(crate) fn await_position(&self, lsn: u64, until: u64, eta: Option<u64>) {
        let mut wait = self.wait.lock().unwrap_or_else(PoisonError::into_inner);
        let lower = wait.lsn.is_none_or(|asked| lsn < asked);
        if lower {
            wait.lsn = Some(lsn);
        }
        wait.until = wait.until.max(until);
        if let Some(eta) = eta {
            wait.eta = Some(wait.eta.map_or(eta, |known| known.min(eta)));
        }
        drop(wait);
        // The task takes up a wait still pending by itself: wake it only
        // for a new or lower one.
        if lower {
            self.refresh.notify_one();
        }
    }

    /// The wait asked of this server's task, if one is due at `now`: the
    /// position, how long at most, and in how long it is predicted.
    pub(crate) fn pending_wait(&self, now: u64) -> Option<(u64, Duration, Option<Duration>)> {
        let wait = self.wait.lock().unwrap_or_else(PoisonError::into_inner);
        let lsn = wait.lsn?;
        let eta = wait
            .eta
            .map(|eta| Duration::from_nanos(eta.saturating_sub(now)));
        (wait.until > now).then(|| (lsn, Duration::from_nanos(wait.until - now), eta))
    }

    /// Forgets the wait for `lsn` once it is proven or its time is up
    /// (keeping a lower one asked meanwhile). Reads that still wait for a
    /// higher position ask again when they re-check after this poll.
    pub(crate) fn end_wait(&self, lsn: u64, now: u64) {
        let proven = self.proven.load(Ordering::Acquire).max(
            if self.timeline.load(Ordering::Relaxed) != 0 {
                self.replayed.load(Ordering::Acquire)
            } else {
                0
            },
        );
        let mut wait = self.wait.lock().unwrap_or_else(PoisonError::into_inner);
        if wait.lsn == Some(lsn) && (proven >= lsn || wait.until <= now) {
            *wait = WaitRequest::default();
        }
    }

    /// Forgets any wait asked: no read is waiting any more.
    pub(crate) fn drop_wait(&self) {
        *self.wait.lock().unwrap_or_else(PoisonError::into_inner) = WaitRequest::default();
    }

    /// The timeline this replica is known to follow: the one its WAL
    /// receiver was seen on, else the one a heartbeat of the current primary
    /// proves; 0 when neither is known.
    #[inline]
    pub(crate) fn known_timeline(&self) -> u32 {
        match self.timeline.load(Ordering::Relaxed) {
            0 => self.proven_timeline.load(Ordering::Relaxed),
            seen => seen,
        }
    }

    /// Whether reads on this server's pool run on this server: false when
    /// its URL reaches several servers through a pool the application
    /// brought, which cannot be tied to one.
    #[inline]
    pub(crate) fn tied(&self) -> bool {
        !self.admission.endpoint.is_indistinct()
    }

    /// Whether this replica is healthy and provably holds a write at `lsn`
    /// on `timeline`; see [`qualifies`].
    #[inline]
    pub(crate) fn has_replayed(&self, lsn: Lsn, timeline: u32) -> bool {
        self.healthy.load(Ordering::Acquire)
            && self.tied()
            && qualifies(
                Proof {
                    replayed: self.replayed.load(Ordering::Acquire),
                    receiver_timeline: self.timeline.load(Ordering::Relaxed),
                    proven: self.proven.load(Ordering::Acquire),
                    proven_timeline: self.proven_timeline.load(Ordering::Relaxed),
                },
                lsn,
                timeline,
            )
    }

    /// Whether this replica is healthy and known to follow `timeline`: the
    /// replicas a token on `timeline` may wait for.
    #[inline]
    pub(crate) fn is_on(&self, timeline: u32) -> bool {
        self.healthy.load(Ordering::Acquire)
            && self.tied()
            && timeline != 0
            && self.known_timeline() == timeline
    }

    /// Whether eventual reads may go here: healthy, not diverged, and not
    /// seen on a timeline other than the primary's `primary_timeline`.
    #[inline]
    pub(crate) fn serves_eventual(&self, primary_timeline: u32) -> bool {
        if !self.healthy.load(Ordering::Acquire) || self.diverged.load(Ordering::Relaxed) {
            return false;
        }
        let timeline = self.known_timeline();
        timeline == 0 || timeline == primary_timeline
    }

    /// Forgets what only a live connection to this incarnation proves: its
    /// timeline and heartbeat proof. Called when it goes down or turns out
    /// to be another incarnation or server.
    pub(crate) fn forget_proofs(&self) {
        self.timeline.store(0, Ordering::Relaxed);
        self.forget_heartbeat();
    }

    /// Forgets the heartbeat proof (the primary changed).
    pub(crate) fn forget_heartbeat(&self) {
        self.proven_timeline.store(0, Ordering::Relaxed);
        self.proven.store(0, Ordering::Release);
    }
}

/// What a replica has shown that may prove it holds a write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Proof {
    /// `pg_last_wal_replay_lsn()`.
    pub(crate) replayed: u64,
    /// The timeline its WAL receiver was seen on (privileged); 0 unknown.
    pub(crate) receiver_timeline: u32,
    /// The highest position a heartbeat of the current primary it replayed
    /// carries; 0 for none.
    pub(crate) proven: u64,
    /// The current primary's timeline, when `proven` is set; else 0.
    pub(crate) proven_timeline: u32,
}

/// A wait asked of a server's task, coalesced over the reads asking.
#[derive(Debug, Default)]
pub(crate) struct WaitRequest {
    /// The lowest position asked; `None`: no wait.
    lsn: Option<u64>,
    /// The latest deadline asked, nanoseconds after the tracker's origin.
    until: u64,
    /// The earliest predicted arrival, nanoseconds after the tracker's
    /// origin; `None`: no prediction.
    eta: Option<u64>,
}

/// The replay check on its own: a replica holds a write at `lsn` on
/// `timeline` when either
/// - **its WAL receiver** was seen by this process on that very timeline
///   and it has replayed `lsn` (needs `pg_read_all_stats` to see), or
/// - **a heartbeat** written by the current primary on that timeline, at a
///   position at or past `lsn`, is visible on it: it then replayed the
///   primary's own WAL up to there, so it holds every write before it
///   (any role can read a table).
///
/// An unknown timeline and no heartbeat never qualify. After a failover an
/// orphaned replica can sit past a new-timeline LSN without holding the
/// write, and nothing but its history shows it: unknown means unsafe.
pub(crate) fn qualifies(proof: Proof, lsn: Lsn, timeline: u32) -> bool {
    if timeline == 0 {
        return false;
    }
    let by_receiver = proof.receiver_timeline == timeline && proof.replayed >= lsn.as_u64();
    let by_heartbeat = proof.proven_timeline == timeline && proof.proven >= lsn.as_u64();
    by_receiver || by_heartbeat
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receiver(replayed: u64, timeline: u32) -> Proof {
        Proof {
            replayed,
            receiver_timeline: timeline,
            ..Proof::default()
        }
    }

    fn heartbeat(replayed: u64, proven: u64, timeline: u32) -> Proof {
        Proof {
            replayed,
            receiver_timeline: 0,
            proven,
            proven_timeline: timeline,
        }
    }

    #[test]
    fn a_receiver_seen_on_the_tokens_timeline_proves_any_replayed_position() {
        let lsn = Lsn::new(1_000);
        assert!(qualifies(receiver(1_000, 1), lsn, 1));
        assert!(qualifies(receiver(1_001, 1), lsn, 1));
        assert!(!qualifies(receiver(999, 1), lsn, 1));
        // Another timeline never qualifies, however far it replayed.
        assert!(!qualifies(receiver(u64::MAX, 1), lsn, 2));
        assert!(!qualifies(receiver(u64::MAX, 2), lsn, 1));
        // An unknown timeline never qualifies, on any timeline: after an
        // app restart following a failover the orphan looks exactly so.
        assert!(!qualifies(receiver(1_000, 0), lsn, 1));
        assert!(!qualifies(receiver(u64::MAX, 0), lsn, 2));
        assert!(!qualifies(receiver(u64::MAX, 0), Lsn::ZERO, 0));
    }

    #[test]
    fn a_heartbeat_proves_only_up_to_its_own_position() {
        let lsn = Lsn::new(1_000);
        // Replayed past the write, but the newest heartbeat of the current
        // primary it shows is older: its history after that heartbeat is
        // unproven (it may have switched to another primary since).
        assert!(!qualifies(heartbeat(5_000, 999, 1), lsn, 1));
        assert!(qualifies(heartbeat(5_000, 1_000, 1), lsn, 1));
        // A heartbeat of another timeline's primary proves nothing here.
        assert!(!qualifies(heartbeat(5_000, 5_000, 2), lsn, 1));
        assert!(!qualifies(heartbeat(5_000, 5_000, 0), Lsn::ZERO, 0));
    }

    #[test]
    fn either_proof_is_enough() {
        let both = Proof {
            replayed: 2_000,
            receiver_timeline: 3,
            proven: 500,
            proven_timeline: 3,
        };
        assert!(qualifies(both, Lsn::new(1_500), 3));
        assert!(!qualifies(both, Lsn::new(2_500), 3));
    }
}

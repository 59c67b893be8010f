//! [`ReplicaTracker`]: one background task per node keeps each replica's
//! replay position, timeline and health in atomics, so routing a read costs a
//! few atomic loads and no database round trip.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection, PgPool};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::capture::{query_position, CaptureError, PrimaryPosition};
use super::pools::PrimaryPools;
use super::predict::{self, ReplicaView};
use crate::bookmark::ReplicaTag;
use crate::position::{Lsn, WalGeometry};

/// `application_name` of the tracker's own connections, so they can be told
/// apart in `pg_stat_activity`.
pub const TRACKER_APPLICATION_NAME: &str = "read_after_write_tracker";

/// What the tracker knows about one replica. Written only by its task; read
/// by every routing decision.
pub(crate) struct ReplicaState {
    pub(crate) name: String,
    pub(crate) pool: PgPool,
    connect: PgConnectOptions,
    /// Last `pg_last_wal_replay_lsn()`; meaningful only while `healthy`.
    pub(crate) replayed: AtomicU64,
    /// Last timeline this process saw the replica receiving on
    /// (`pg_stat_wal_receiver.received_tli`); 0 while never seen (no WAL
    /// receiver since this process started, or no privilege to see it). An
    /// unknown timeline never qualifies the replica for a token.
    pub(crate) timeline: AtomicU32,
    /// Answering, in recovery, with a replay position.
    pub(crate) healthy: AtomicBool,
    /// When `replayed` last moved, in nanoseconds after the tracker's origin.
    advanced_at: AtomicU64,
    /// Seen on a timeline other than the primary's, or its replay stalled
    /// while the primary wrote: it has left the primary's history (an
    /// orphan) or stopped following it, so it serves no reads at all.
    pub(crate) diverged: AtomicBool,
    /// When the replica was last seen down; its pool discards connections
    /// opened before then instead of failing a read on them.
    pub(crate) outages: Arc<Outages>,
    /// Wakes this replica's task for an immediate poll.
    refresh: Notify,
    /// Set once a warning about this node not replaying WAL was logged, so a
    /// misconfigured node does not flood logs.
    warned: AtomicBool,
    /// The [`ReplicaTag`] of the server incarnation last polled (its name
    /// and postmaster start time); 0 while unknown or down. Monotonic
    /// reads stay on a replica only while its tag is the one they read.
    pub(crate) tag: AtomicU64,
    /// Set once the "cannot see timelines" warning was logged.
    warned_privilege: AtomicBool,
    /// A replay pause is requested or in effect (`pg_is_wal_replay_paused()`
    /// at the last poll): the replica is predicted never to catch up.
    pub(crate) paused: AtomicBool,
    /// Smoothed replay delay in nanoseconds ([`predict::smooth_delay`]);
    /// [`UNKNOWN`] until the replica was seen replaying past a position in
    /// the primary's history.
    delay: AtomicU64,
    /// Smoothed replay rate in bytes per second, as `f64` bits.
    rate: AtomicU64,
    /// When the primary was first seen with WAL this replica lacked at its
    /// last poll, in nanoseconds after the tracker's origin; [`UNKNOWN`]
    /// when it lacked nothing the tracker had seen. How stale its reads are
    /// is the time since (to within a poll).
    missing_since: AtomicU64,
    /// When the last poll that answered with a position arrived, in
    /// nanoseconds after the tracker's origin, for the replay rate.
    polled_at: AtomicU64,
    /// Whether the tracker's role may read `pg_stat_wal_receiver`, as asked
    /// when its connection opened: [`SEES_TIMELINES_UNKNOWN`] until then,
    /// else [`SEES_TIMELINES_YES`] or [`SEES_TIMELINES_NO`].
    pub(crate) sees_timelines: AtomicU8,
}

/// An unset nanosecond atomic: no delay measured yet, nothing missing.
pub(crate) const UNKNOWN: u64 = u64::MAX;

/// [`ReplicaState::sees_timelines`] before the tracker first connected.
pub(crate) const SEES_TIMELINES_UNKNOWN: u8 = 0;
/// The tracker's role is a member of `pg_read_all_stats`.
pub(crate) const SEES_TIMELINES_YES: u8 = 1;
/// The tracker's role cannot see replica timelines.
pub(crate) const SEES_TIMELINES_NO: u8 = 2;

impl ReplicaState {
    pub(crate) fn new(
        name: String,
        pool: PgPool,
        connect: PgConnectOptions,
        outages: Arc<Outages>,
    ) -> Self {
        ReplicaState {
            name,
            pool,
            connect,
            replayed: AtomicU64::new(0),
            timeline: AtomicU32::new(0),
            healthy: AtomicBool::new(false),
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
        }
    }

    /// The smoothed replay delay, if one was measured.
    pub(crate) fn delay(&self) -> Option<Duration> {
        match self.delay.load(Ordering::Relaxed) {
            UNKNOWN => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }

    /// The smoothed replay rate, bytes per second.
    pub(crate) fn rate(&self) -> f64 {
        f64::from_bits(self.rate.load(Ordering::Relaxed))
    }

    /// How stale this replica's reads are at `now` (nanoseconds after the
    /// tracker's origin): how long ago the primary first had WAL it lacked
    /// at its last poll; zero when it lacked nothing.
    #[inline]
    pub(crate) fn staleness(&self, now: u64) -> Duration {
        match self.missing_since.load(Ordering::Relaxed) {
            UNKNOWN => Duration::ZERO,
            since => Duration::from_nanos(now.saturating_sub(since)),
        }
    }

    /// What a prediction needs at `now` (nanoseconds after the tracker's
    /// origin), with `lag_now` worked out by the caller from the primary's
    /// history.
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

    /// Asks this replica's task for an immediate poll (no sooner than the
    /// minimum gap after its last one).
    pub(crate) fn request_refresh(&self) {
        self.refresh.notify_one();
    }

    /// Whether this replica is healthy and has replayed `lsn` on `timeline`.
    #[inline]
    pub(crate) fn has_replayed(&self, lsn: Lsn, timeline: u32) -> bool {
        self.healthy.load(Ordering::Acquire)
            && qualifies(
                self.replayed.load(Ordering::Acquire),
                self.timeline.load(Ordering::Relaxed),
                lsn,
                timeline,
            )
    }

    /// Whether this replica is healthy and this process has seen it on
    /// `timeline`: the replicas a token on `timeline` may wait for.
    #[inline]
    pub(crate) fn is_on(&self, timeline: u32) -> bool {
        self.healthy.load(Ordering::Acquire)
            && timeline != 0
            && self.timeline.load(Ordering::Relaxed) == timeline
    }

    /// Whether eventual reads may go here: healthy, not diverged, and not
    /// seen on a timeline other than the primary's `primary_timeline`.
    #[inline]
    pub(crate) fn serves_eventual(&self, primary_timeline: u32) -> bool {
        if !self.healthy.load(Ordering::Acquire) || self.diverged.load(Ordering::Relaxed) {
            return false;
        }
        let timeline = self.timeline.load(Ordering::Relaxed);
        timeline == 0 || timeline == primary_timeline
    }
}

/// The replay check on its own: a replica that replayed `replayed` on
/// `replica_timeline` holds a write at `lsn` on `timeline` when this process
/// saw it on that very timeline and it is at or past `lsn`.
///
/// An unknown timeline (0: no WAL receiver seen since this process started,
/// or no privilege to see it) never qualifies. After a failover an orphaned
/// replica can sit past a new-timeline LSN without holding the write, and
/// nothing but its timeline shows it: unknown means unsafe.
pub(crate) fn qualifies(replayed: u64, replica_timeline: u32, lsn: Lsn, timeline: u32) -> bool {
    replica_timeline != 0 && replica_timeline == timeline && replayed >= lsn.as_u64()
}

/// What the tracker knows about the primary.
pub(crate) struct PrimaryState {
    /// The primary's pool, replaced when the primary is seen frozen.
    pub(crate) pools: Arc<PrimaryPools>,
    /// How the tracker opens its own connection to the primary: its probes
    /// never wait behind (or get stuck with) the application's pool.
    pub(crate) connect: PgConnectOptions,
    /// Page and segment sizes, to round polled positions off a page header
    /// as captures are: a replica's replay stops at the record end.
    pub(crate) geometry: WalGeometry,
    /// Latest insert position seen on the current timeline, for lag figures.
    pub(crate) inserted: AtomicU64,
    /// Current timeline; changes when a failover promoted a new primary.
    pub(crate) timeline: AtomicU32,
    pub(crate) system_id: u64,
    pub(crate) outages: Arc<Outages>,
    pub(crate) healthy: AtomicBool,
    /// When the primary's insert position was first seen at each value on
    /// the current timeline, for the last [`LAG_WINDOW`]: a replica's time
    /// lag is the age of the first position past its replay position.
    pub(crate) history: Mutex<VecDeque<(Instant, u64)>>,
    /// When the primary's position or timeline last changed, in nanoseconds
    /// after the tracker's origin: a replica that has not moved since is
    /// stalled once that is old enough.
    pub(crate) changed_at: AtomicU64,
    /// Set once the pool was replaced for the current silence; cleared by
    /// the next probe that answers.
    pub(crate) pool_replaced: AtomicBool,
}

/// How far back the primary's position history reaches; longer time lags
/// are reported as at least this.
const LAG_WINDOW: Duration = Duration::from_secs(60);

impl PrimaryState {
    /// Records a position the primary reported on its current timeline.
    /// Returns whether it was new.
    fn record_position(&self, lsn: u64) -> bool {
        let Ok(mut history) = self.history.lock() else {
            return false;
        };
        if history.back().is_some_and(|&(_, last)| last >= lsn) {
            return false;
        }
        let now = Instant::now();
        history.push_back((now, lsn));
        while history
            .front()
            .is_some_and(|&(at, _)| now.duration_since(at) > LAG_WINDOW)
        {
            history.pop_front();
        }
        true
    }

    /// Runs `f` over the position history; `None` if its lock is poisoned.
    pub(crate) fn with_history<R>(
        &self,
        f: impl FnOnce(&VecDeque<(Instant, u64)>) -> R,
    ) -> Option<R> {
        self.history.lock().ok().map(|history| f(&history))
    }

    /// How long ago the primary first had WAL that `replayed` lacks; zero
    /// when the replica has everything the tracker has seen.
    pub(crate) fn time_behind(&self, replayed: u64) -> Duration {
        let Ok(history) = self.history.lock() else {
            return Duration::ZERO;
        };
        let first_ahead = history.partition_point(|&(_, lsn)| lsn <= replayed);
        history
            .get(first_ahead)
            .map_or(Duration::ZERO, |&(at, _)| at.elapsed())
    }
}

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

/// Tuning for the tracker.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TrackerConfig {
    pub(crate) poll_interval: Duration,
    pub(crate) probe_timeout: Duration,
    pub(crate) max_backoff: Duration,
    /// Shortest gap between two polls of one replica when reads are waiting.
    pub(crate) min_refresh_gap: Duration,
    /// Poll interval once nothing has needed positions for [`IDLE_AFTER`].
    pub(crate) idle_poll_interval: Duration,
    /// How long a replica's replay may stand still while the primary moves
    /// before the replica counts as diverged and leaves eventual reads.
    pub(crate) stall_timeout: Duration,
}

/// How long after the last session read with a token, or the last capture,
/// the tracker slows to its idle interval.
pub(crate) const IDLE_AFTER: Duration = Duration::from_secs(5);

/// The background tracker of one replica set: a task per replica polling
/// `pg_last_wal_replay_lsn()`, one polling the primary's insert position,
/// and the notification waiting reads sleep on.
///
/// Owned by [`PgReplicaSet`](super::PgReplicaSet); it stops when the replica
/// set is shut down or its last clone is dropped.
pub struct ReplicaTracker {
    pub(crate) replicas: Vec<Arc<ReplicaState>>,
    pub(crate) primary: Arc<PrimaryState>,
    /// Bumped after every poll that changed a replica's state; waiting reads
    /// re-check on each change.
    pub(crate) changed: watch::Sender<u64>,
    pub(crate) polls: AtomicU64,
    /// When positions were last needed, in nanoseconds after `origin`.
    last_needed: AtomicU64,
    origin: Instant,
    /// Wakes the primary's task when the tracker leaves idle.
    wake_primary: Notify,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl ReplicaTracker {
    pub(crate) fn new(replicas: Vec<Arc<ReplicaState>>, primary: Arc<PrimaryState>) -> Arc<Self> {
        Arc::new(ReplicaTracker {
            replicas,
            primary,
            changed: watch::channel(0).0,
            polls: AtomicU64::new(0),
            last_needed: AtomicU64::new(0),
            origin: Instant::now(),
            wake_primary: Notify::new(),
            shutdown: watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
        })
    }

    /// Polls every replica once, then starts the background tasks.
    pub(crate) async fn start(self: &Arc<Self>, config: TrackerConfig) {
        let first_polls = self.replicas.iter().map(|replica| {
            let tracker = Arc::clone(self);
            let replica = Arc::clone(replica);
            async move {
                let mut conn = None;
                tracker.poll_replica(&replica, &mut conn, config).await;
                conn
            }
        });
        let connections = futures_join_all(first_polls).await;
        let mut tasks = Vec::with_capacity(self.replicas.len() + 1);
        for (replica, conn) in self.replicas.iter().zip(connections) {
            let tracker = Arc::clone(self);
            let replica = Arc::clone(replica);
            tasks.push(tokio::spawn(async move {
                tracker.run_replica(replica, conn, config).await
            }));
        }
        let tracker = Arc::clone(self);
        tasks.push(tokio::spawn(
            async move { tracker.run_primary(config).await },
        ));
        if let Ok(mut slot) = self.tasks.lock() {
            slot.extend(tasks);
        }
    }

    /// Asks every replica's task for an immediate poll. Requests made while a
    /// poll is running coalesce into one more poll.
    /// Records that positions are needed (a session read with a token, or a
    /// write). Leaving idle polls every node at once, so the first read after
    /// a quiet spell routes on fresh positions.
    #[inline]
    pub(crate) fn note_needed(&self) {
        let now = self.nanos();
        let before = self.last_needed.swap(now, Ordering::Relaxed);
        if now.saturating_sub(before) > IDLE_AFTER.as_nanos() as u64 {
            self.request_refresh();
            self.wake_primary.notify_one();
        }
    }

    /// Nanoseconds since the tracker's origin.
    pub(crate) fn nanos(&self) -> u64 {
        self.nanos_at(Instant::now())
    }

    fn nanos_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// The poll interval right now: fast while positions are needed, slow
    /// when idle.
    fn interval(&self, config: &TrackerConfig) -> Duration {
        let since = self
            .nanos()
            .saturating_sub(self.last_needed.load(Ordering::Relaxed));
        if since > IDLE_AFTER.as_nanos() as u64 {
            config.idle_poll_interval.max(config.poll_interval)
        } else {
            config.poll_interval
        }
    }

    pub(crate) fn request_refresh(&self) {
        for replica in &self.replicas {
            replica.refresh.notify_one();
        }
    }

    /// Stops every task and closes the tracker's connections; waits for them.
    pub(crate) async fn shutdown(&self) {
        self.shutdown.send_replace(true);
        let tasks = match self.tasks.lock() {
            Ok(mut tasks) => std::mem::take(&mut *tasks),
            Err(_) => Vec::new(),
        };
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Signals shutdown without waiting, for `Drop`.
    pub(crate) fn stop(&self) {
        self.shutdown.send_replace(true);
    }

    /// Number of replica polls made so far.
    pub(crate) fn polls(&self) -> u64 {
        self.polls.load(Ordering::Relaxed)
    }

    async fn run_replica(
        self: Arc<Self>,
        replica: Arc<ReplicaState>,
        mut conn: Option<PgConnection>,
        config: TrackerConfig,
    ) {
        let mut shutdown = self.shutdown.subscribe();
        let mut backoff = config.poll_interval;
        let mut last_poll = Instant::now();
        while !*shutdown.borrow() {
            let healthy = replica.healthy.load(Ordering::Relaxed);
            let pause = if healthy {
                self.interval(&config)
            } else {
                backoff
            };
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep(pause) => {}
                // A down replica is re-probed on its backoff only: reads
                // waiting for a position must not hammer a dead node.
                _ = replica.refresh.notified(), if healthy => {
                    let since = last_poll.elapsed();
                    if since < config.min_refresh_gap {
                        tokio::time::sleep(config.min_refresh_gap - since).await;
                    }
                }
            }
            let up = self.poll_replica(&replica, &mut conn, config).await;
            last_poll = Instant::now();
            backoff = if up {
                config.poll_interval
            } else {
                (backoff * 2).clamp(config.poll_interval, config.max_backoff)
            };
        }
        if let Some(conn) = conn {
            let _ = tokio::time::timeout(config.probe_timeout, conn.close()).await;
        }
    }

    /// Polls one replica, updates its state, and reports whether it is up.
    async fn poll_replica(
        &self,
        replica: &ReplicaState,
        conn: &mut Option<PgConnection>,
        config: TrackerConfig,
    ) -> bool {
        self.polls.fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(
            config.probe_timeout,
            probe_replica(
                &replica.connect,
                conn,
                self.primary.system_id,
                &replica.warned_privilege,
                &replica.sees_timelines,
            ),
        )
        .await;
        let was_healthy = replica.healthy.load(Ordering::Relaxed);
        let name = replica.name.as_str();
        let up = match result {
            Ok(Ok(Probe {
                replayed: Some(replayed),
                in_recovery: true,
                timeline,
                started,
                paused,
            })) => {
                let now = self.nanos();
                let tag = started.map_or(0, |micros| ReplicaTag::of(name, micros).get());
                replica.tag.store(tag, Ordering::Relaxed);
                let previous = replica.replayed.swap(replayed.as_u64(), Ordering::AcqRel);
                self.learn(replica, previous, replayed.as_u64(), was_healthy, now);
                let pause_changed = replica.paused.swap(paused, Ordering::Relaxed) != paused;
                if previous != replayed.as_u64() {
                    replica.advanced_at.store(now, Ordering::Relaxed);
                }
                // Keep the last timeline seen: with its upstream gone the WAL
                // receiver stops and reports nothing, but the replica still
                // holds that timeline's history.
                if let Some(timeline) = timeline {
                    replica.timeline.store(timeline, Ordering::Relaxed);
                }
                let diverged = self.judge_divergence(replica, now, config.stall_timeout);
                if !was_healthy {
                    replica.healthy.store(true, Ordering::Release);
                    tracing::info!(replica = name, lsn = %replayed, "replica admitted");
                    metrics::gauge!("read_after_write_replica_up", "replica" => replica.name.clone()).set(1.0);
                    self.bump();
                } else if previous != replayed.as_u64() || diverged || pause_changed {
                    self.bump();
                }
                self.report_lag(replica, replayed.as_u64());
                return true;
            }
            Ok(Ok(probe)) => {
                // Answers, but is not a replica any more: promoted, or
                // misconfigured. Exclude it; keep probing in case it was
                // rebuilt as a replica. Whatever it holds when it comes back
                // is a new history: forget the timeline seen before.
                replica.timeline.store(0, Ordering::Relaxed);
                if was_healthy || !replica.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        replica = name,
                        node = %describe(&replica.connect),
                        in_recovery = probe.in_recovery,
                        "node is not replaying WAL (promoted or not a standby); excluded from reads"
                    );
                }
                true
            }
            Ok(Err(error)) => {
                if was_healthy || !replica.warned.swap(true, Ordering::Relaxed) {
                    let node = describe(&replica.connect);
                    if matches!(error, sqlx::Error::Configuration(_)) {
                        // It answered: the problem is what it is, not
                        // whether it can be reached.
                        tracing::warn!(replica = name, %node, %error, "replica refused; excluded from reads");
                    } else {
                        tracing::warn!(replica = name, %node, %error, "replica unreachable; excluded from reads");
                    }
                }
                *conn = None;
                false
            }
            Err(_elapsed) => {
                if was_healthy {
                    let node = describe(&replica.connect);
                    tracing::warn!(replica = name, %node, timeout = ?config.probe_timeout, "replica probe timed out (down, frozen or partitioned); excluded from reads");
                }
                *conn = None;
                false
            }
        };
        replica.tag.store(0, Ordering::Relaxed);
        if !up {
            // Down: it may come back as something else (restored from a
            // backup, rebuilt after a promotion) with no WAL receiver to
            // show it. Only a timeline seen after it returns counts.
            replica.timeline.store(0, Ordering::Relaxed);
        }
        if was_healthy {
            replica.healthy.store(false, Ordering::Release);
            replica.outages.mark_down();
            metrics::gauge!("read_after_write_replica_up", "replica" => replica.name.clone())
                .set(0.0);
            // An excluded replica's lag is unknown, not what it last was.
            metrics::gauge!("read_after_write_replica_lag_bytes", "replica" => replica.name.clone())
                .set(f64::NAN);
            metrics::gauge!("read_after_write_replica_lag_seconds", "replica" => replica.name.clone())
                .set(f64::NAN);
            self.bump();
        }
        up
    }

    /// Updates what predictions need after a poll found `replica` at
    /// `replayed`, `previous` before: its replay delay and rate, and since
    /// when it lacks WAL. Delay and rate learn only from a replica that was
    /// healthy at the poll before (else `previous` is from before an
    /// outage) and follows the primary's timeline.
    fn learn(
        &self,
        replica: &ReplicaState,
        previous: u64,
        replayed: u64,
        was_healthy: bool,
        now: u64,
    ) {
        let at = Instant::now();
        let timeline = replica.timeline.load(Ordering::Relaxed);
        let same_timeline =
            timeline == 0 || timeline == self.primary.timeline.load(Ordering::Relaxed);
        let learned = self.primary.with_history(|history| {
            let sample = predict::delay_sample(history, previous, replayed, at);
            (sample, predict::first_missing(history, replayed))
        });
        let Some((sample, missing)) = learned else {
            return;
        };
        replica.missing_since.store(
            missing.map_or(UNKNOWN, |at| self.nanos_at(at)),
            Ordering::Relaxed,
        );
        let polled_before = replica.polled_at.swap(now, Ordering::Relaxed);
        if !was_healthy || !same_timeline {
            return;
        }
        if let Some(sample) = sample {
            let delay = predict::smooth_delay(replica.delay(), sample);
            let nanos = u64::try_from(delay.as_nanos()).unwrap_or(UNKNOWN - 1);
            replica.delay.store(nanos, Ordering::Relaxed);
        }
        let elapsed = Duration::from_nanos(now.saturating_sub(polled_before));
        let rate = predict::smooth_rate(replica.rate(), replayed.saturating_sub(previous), elapsed);
        replica.rate.store(rate.to_bits(), Ordering::Relaxed);
    }

    /// Decides whether `replica` has left the primary's history: seen on
    /// another timeline, or its replay stood still for `stall_timeout` while
    /// the primary moved (the only sign of an orphan whose timeline cannot
    /// be seen). Updates the flag and its gauge; returns whether it changed.
    fn judge_divergence(&self, replica: &ReplicaState, now: u64, stall_timeout: Duration) -> bool {
        let timeline = replica.timeline.load(Ordering::Relaxed);
        let primary_timeline = self.primary.timeline.load(Ordering::Relaxed);
        let other_timeline = timeline != 0 && timeline != primary_timeline;
        let advanced_at = replica.advanced_at.load(Ordering::Relaxed);
        let primary_moved_since = self.primary.changed_at.load(Ordering::Relaxed) > advanced_at;
        // A replica at exactly the primary's position is caught up, however
        // long ago it got there (it may have seen the WAL before the
        // primary's poll did). Behind, or past it (an orphan's position on
        // a history the primary left), and standing still: stalled.
        let elsewhere = replica.replayed.load(Ordering::Acquire)
            != self.primary.inserted.load(Ordering::Relaxed);
        let stalled = primary_moved_since
            && elsewhere
            && now.saturating_sub(advanced_at)
                > u64::try_from(stall_timeout.as_nanos()).unwrap_or(u64::MAX);
        let diverged = other_timeline || stalled;
        let before = replica.diverged.swap(diverged, Ordering::Relaxed);
        if before != diverged {
            if diverged {
                tracing::warn!(
                    replica = %replica.name,
                    timeline,
                    primary_timeline,
                    stalled,
                    "replica is not following the primary's history (orphaned after a failover, \
                     still on the old timeline, or its replay stalled); it serves no reads"
                );
            } else {
                tracing::info!(replica = %replica.name, timeline, "replica follows the primary again");
            }
            metrics::gauge!("read_after_write_replica_diverged", "replica" => replica.name.clone())
                .set(if diverged { 1.0 } else { 0.0 });
        }
        before != diverged
    }

    /// Sets the lag gauges of a replica that answered. Lag compares
    /// positions, which mean nothing across timelines: a replica seen on
    /// another timeline than the primary's reports NaN (unknown).
    fn report_lag(&self, replica: &ReplicaState, replayed: u64) {
        let timeline = replica.timeline.load(Ordering::Relaxed);
        let same_timeline =
            timeline == 0 || timeline == self.primary.timeline.load(Ordering::Relaxed);
        let (bytes, seconds) = if same_timeline {
            let inserted = self.primary.inserted.load(Ordering::Relaxed);
            (
                inserted.saturating_sub(replayed) as f64,
                self.primary.time_behind(replayed).as_secs_f64(),
            )
        } else {
            (f64::NAN, f64::NAN)
        };
        metrics::gauge!("read_after_write_replica_lag_bytes", "replica" => replica.name.clone())
            .set(bytes);
        metrics::gauge!("read_after_write_replica_lag_seconds", "replica" => replica.name.clone())
            .set(seconds);
        // What predictions are made from; NaN until measured.
        let delay = replica.delay().map_or(f64::NAN, |d| d.as_secs_f64());
        metrics::gauge!("read_after_write_replica_replay_delay_seconds", "replica" => replica.name.clone())
            .set(delay);
    }

    /// Polls the primary's position on the tracker's own connection, with
    /// the probe timeout on connecting and on every query. A frozen or
    /// partitioned primary (no RST) is noticed within that timeout; the
    /// connection is then dropped, so a repointed primary address is picked
    /// up by the next poll, and the primary's pool drops its connections
    /// that predate the outage.
    async fn run_primary(self: Arc<Self>, config: TrackerConfig) {
        let mut shutdown = self.shutdown.subscribe();
        let mut conn: Option<PgConnection> = None;
        // Consecutive probes that got no answer at all.
        let mut silent = 0u32;
        while !*shutdown.borrow() {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep(self.interval(&config)) => {}
                _ = self.wake_primary.notified() => {}
            }
            let result = tokio::time::timeout(
                config.probe_timeout,
                probe_primary(&self.primary.connect, &mut conn),
            )
            .await;
            match result {
                Ok(Ok(position)) => {
                    silent = 0;
                    self.primary.pool_replaced.store(false, Ordering::Relaxed);
                    self.note_primary_position(PrimaryPosition {
                        lsn: position.lsn.round_down_page_header(self.primary.geometry),
                        timeline: position.timeline,
                    });
                    if !self.primary.healthy.swap(true, Ordering::Relaxed) {
                        tracing::info!("primary reachable");
                    }
                }
                Ok(Err(error)) => {
                    conn = None;
                    silent = 0;
                    self.primary_down(&error.to_string(), false);
                }
                Err(_elapsed) => {
                    conn = None;
                    silent += 1;
                    // Two silent probes in a row, not one slow answer under
                    // load, before the pool is replaced.
                    self.primary_down(
                        &format!(
                            "no answer within the probe timeout ({:?}): frozen or partitioned",
                            config.probe_timeout
                        ),
                        silent >= 2,
                    );
                }
            }
        }
        if let Some(conn) = conn {
            let _ = tokio::time::timeout(config.probe_timeout, conn.close()).await;
        }
    }

    /// Marks the primary down. A silent primary (`frozen`: no answer, no
    /// error) also gets a fresh pool, since connections stuck on it would
    /// hold their pool slots; see [`PrimaryPools`].
    fn primary_down(&self, error: &str, frozen: bool) {
        if self.primary.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                primary = %describe(&self.primary.connect),
                %error,
                "primary unreachable; writes fail until it answers again"
            );
            self.primary.outages.mark_down();
        }
        // Once per silence, also when it follows an outage that errored.
        if frozen && !self.primary.pool_replaced.swap(true, Ordering::Relaxed) {
            self.primary.outages.mark_down();
            if self.primary.pools.replace() {
                tracing::warn!("replaced the primary's pool: connections stuck on the silent primary keep no slots");
            }
        }
    }

    /// Records the primary's position and timeline, as seen by a capture or
    /// a poll. A new timeline (a failover) restarts the position history:
    /// its positions cannot be compared with the old timeline's.
    pub(crate) fn note_primary_position(&self, position: PrimaryPosition) {
        let lsn = position.lsn.as_u64();
        let timeline = position.timeline;
        // Timelines only grow in one cluster: a late answer from the old
        // primary (a capture in flight across a failover, a connection in
        // a split brain) must not take the tracker back.
        let before = self.primary.timeline.fetch_max(timeline, Ordering::Relaxed);
        if timeline < before {
            return;
        }
        let moved = if before != timeline {
            if before != 0 {
                tracing::warn!(
                    from = before,
                    to = timeline,
                    "primary timeline changed (failover)"
                );
            }
            self.primary.inserted.store(lsn, Ordering::Relaxed);
            if let Ok(mut history) = self.primary.history.lock() {
                history.clear();
            }
            self.primary.record_position(lsn);
            true
        } else {
            self.primary.inserted.fetch_max(lsn, Ordering::Relaxed);
            self.primary.record_position(lsn)
        };
        if moved {
            self.primary
                .changed_at
                .store(self.nanos(), Ordering::Relaxed);
        }
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

struct Probe {
    replayed: Option<Lsn>,
    in_recovery: bool,
    timeline: Option<u32>,
    /// `pg_postmaster_start_time()` in Unix microseconds: a restart makes
    /// the replica another incarnation.
    started: Option<i64>,
    /// A replay pause is requested or in effect.
    paused: bool,
}

/// One round trip on the tracker's own connection, opening it if needed.
async fn probe_replica(
    connect: &PgConnectOptions,
    conn: &mut Option<PgConnection>,
    system_id: u64,
    warned_privilege: &AtomicBool,
    sees_timelines_flag: &AtomicU8,
) -> Result<Probe, sqlx::Error> {
    if conn.is_none() {
        let mut fresh = connect
            .clone()
            .application_name(TRACKER_APPLICATION_NAME)
            .connect()
            .await?;
        // A replica of another cluster (a wrong URL, another environment)
        // has replay positions that mean nothing here: never admit it.
        let (theirs,): (String,) =
            sqlx::query_as("select system_identifier::text from pg_control_system()")
                .fetch_one(&mut fresh)
                .await?;
        if system_id != 0 && theirs.parse::<u64>().ok() != Some(system_id) {
            let _ = fresh.close().await;
            return Err(sqlx::Error::Configuration(
                format!(
                    "this node belongs to another cluster (system identifier {theirs}, the primary's is {system_id}); \
                     check the replica URL"
                )
                .into(),
            ));
        }
        // Timelines are what keep an orphaned replica from serving tokens;
        // PostgreSQL shows them only to these roles.
        let (sees_timelines,): (bool,) =
            sqlx::query_as("select pg_has_role('pg_read_all_stats', 'USAGE')")
                .fetch_one(&mut fresh)
                .await?;
        sees_timelines_flag.store(
            if sees_timelines {
                SEES_TIMELINES_YES
            } else {
                SEES_TIMELINES_NO
            },
            Ordering::Relaxed,
        );
        if !sees_timelines && !warned_privilege.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                replica = %describe(connect),
                "the tracker's role cannot see replica timelines (pg_stat_wal_receiver); without them \
                 no replica can be proven to hold a token's write, so every read with a token goes to \
                 the primary. Grant pg_monitor (or pg_read_all_stats) to this role"
            );
        }
        *conn = Some(fresh);
    }
    let Some(connection) = conn.as_mut() else {
        return Err(sqlx::Error::PoolClosed);
    };
    // pg_is_wal_replay_paused() raises an error outside recovery; since
    // PostgreSQL 14 it is true as soon as a pause is requested.
    let (replayed, in_recovery, timeline, paused, started): (
        Option<String>,
        bool,
        Option<i32>,
        bool,
        Option<i64>,
    ) = sqlx::query_as(
        "select pg_last_wal_replay_lsn()::text, pg_is_in_recovery(), \
                (select received_tli from pg_stat_wal_receiver), \
                case when pg_is_in_recovery() then pg_is_wal_replay_paused() else false end, \
                (extract(epoch from pg_postmaster_start_time()) * 1000000)::int8",
    )
    .persistent(true)
    .fetch_one(connection)
    .await?;
    Ok(Probe {
        replayed: replayed.and_then(|text| text.parse().ok()),
        in_recovery,
        timeline: timeline.and_then(|t| u32::try_from(t).ok()),
        started,
        paused,
    })
}

/// One position query on the tracker's own connection to the primary,
/// opening it if needed.
async fn probe_primary(
    connect: &PgConnectOptions,
    conn: &mut Option<PgConnection>,
) -> Result<PrimaryPosition, CaptureError> {
    if conn.is_none() {
        let fresh = connect
            .clone()
            .application_name(TRACKER_APPLICATION_NAME)
            .connect()
            .await
            .map_err(|error| CaptureError::Query(Arc::new(error)))?;
        *conn = Some(fresh);
    }
    let Some(connection) = conn.as_mut() else {
        return Err(CaptureError::Abandoned);
    };
    query_position(connection).await
}

/// `host:port` of a node, for logs and errors.
pub(crate) fn describe(connect: &PgConnectOptions) -> String {
    format!("{}:{}", connect.get_host(), connect.get_port())
}

/// Waits for every future, in order. The tracker starts a handful of nodes,
/// so a plain sequential join of spawned tasks is enough.
async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>) -> Vec<Option<PgConnection>>
where
    F: std::future::Future<Output = Option<PgConnection>> + Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.ok().flatten());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tracker over a primary that is never contacted: the pool is lazy.
    fn tracker() -> Arc<ReplicaTracker> {
        let connect: PgConnectOptions = "postgres://nobody@127.0.0.1:1/none".parse().unwrap();
        let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy_with(connect.clone());
        let primary = Arc::new(PrimaryState {
            pools: Arc::new(PrimaryPools::new(pool, None)),
            connect,
            geometry: WalGeometry::default(),
            inserted: 0.into(),
            timeline: 0.into(),
            system_id: 7,
            outages: Outages::new(),
            healthy: true.into(),
            history: Default::default(),
            changed_at: 0.into(),
            pool_replaced: false.into(),
        });
        ReplicaTracker::new(Vec::new(), primary)
    }

    fn at(lsn: u64, timeline: u32) -> PrimaryPosition {
        PrimaryPosition {
            lsn: Lsn::new(lsn),
            timeline,
        }
    }

    fn replica(timeline: u32, advanced_at: u64) -> ReplicaState {
        let connect: PgConnectOptions = "postgres://nobody@127.0.0.1:1/none".parse().unwrap();
        let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy_with(connect.clone());
        let replica = ReplicaState::new("replica-1".into(), pool, connect, Outages::new());
        replica.timeline.store(timeline, Ordering::Relaxed);
        replica.advanced_at.store(advanced_at, Ordering::Relaxed);
        replica.healthy.store(true, Ordering::Relaxed);
        replica
    }

    #[tokio::test]
    async fn replicas_off_the_primarys_history_serve_no_reads() {
        const SECOND: u64 = 1_000_000_000;
        let stall = Duration::from_secs(5);
        let tracker = tracker();
        tracker.note_primary_position(at(4_000, 2));
        tracker
            .primary
            .changed_at
            .store(10 * SECOND, Ordering::Relaxed);

        // Following the primary: on its timeline and moving.
        let following = replica(2, 10 * SECOND);
        tracker.judge_divergence(&following, 60 * SECOND, stall);
        assert!(following.serves_eventual(2));
        // Seen on the old timeline: an orphan, out at once.
        let orphan = replica(1, 10 * SECOND);
        tracker.judge_divergence(&orphan, 11 * SECOND, stall);
        assert!(!orphan.serves_eventual(2));
        assert!(orphan.diverged.load(Ordering::Relaxed));
        // Timeline unknown: serves eventual reads while it moves...
        let unknown = replica(0, 9 * SECOND);
        tracker.judge_divergence(&unknown, 12 * SECOND, stall);
        assert!(unknown.serves_eventual(2));
        assert!(!unknown.is_on(2), "but never qualifies for a token");
        // ...and leaves them once it stood still for the stall timeout
        // while the primary moved.
        tracker.judge_divergence(&unknown, 15 * SECOND, stall);
        assert!(!unknown.serves_eventual(2));
        // A quiet primary is no reason to distrust a quiet replica.
        let quiet = replica(2, 11 * SECOND);
        tracker.judge_divergence(&quiet, 600 * SECOND, stall);
        assert!(quiet.serves_eventual(2));
        // Nor is a replica that reached the primary's position before the
        // primary's own poll saw it: caught up is caught up.
        let early = replica(2, 9 * SECOND);
        early.replayed.store(4_000, Ordering::Relaxed);
        tracker.judge_divergence(&early, 600 * SECOND, stall);
        assert!(early.serves_eventual(2));
    }

    #[tokio::test]
    async fn the_primarys_timeline_never_moves_backwards() {
        let tracker = tracker();
        tracker.note_primary_position(at(9_000, 2));
        // A late answer from the old primary across a failover.
        tracker.note_primary_position(at(12_000, 1));
        assert_eq!(tracker.primary.timeline.load(Ordering::Relaxed), 2);
        assert_eq!(tracker.primary.inserted.load(Ordering::Relaxed), 9_000);
    }

    #[tokio::test]
    async fn a_new_timeline_restarts_the_position_history() {
        let tracker = tracker();
        tracker.note_primary_position(at(10_000, 1));
        std::thread::sleep(Duration::from_millis(50));
        // An unplanned failover: timeline 2 forked below where timeline 1
        // had got to, so its positions are lower.
        tracker.note_primary_position(at(4_000, 2));
        tracker.note_primary_position(at(4_200, 2));
        let primary = &tracker.primary;
        assert_eq!(primary.timeline.load(Ordering::Relaxed), 2);
        // Lag is measured against timeline 2, not the old timeline's peak.
        assert_eq!(primary.inserted.load(Ordering::Relaxed), 4_200);
        assert!(
            primary.time_behind(4_100) < Duration::from_millis(50),
            "{:?}",
            primary.time_behind(4_100)
        );
        assert_eq!(primary.time_behind(4_200), Duration::ZERO);
        // On one timeline, positions only move forward.
        tracker.note_primary_position(at(4_100, 2));
        assert_eq!(primary.inserted.load(Ordering::Relaxed), 4_200);
    }

    #[test]
    fn a_replica_qualifies_only_on_the_tokens_timeline_and_at_or_past_its_lsn() {
        let lsn = Lsn::new(1_000);
        // Same timeline: inclusive comparison.
        assert!(qualifies(1_000, 1, lsn, 1));
        assert!(qualifies(1_001, 1, lsn, 1));
        assert!(!qualifies(999, 1, lsn, 1));
        // Another timeline never qualifies, however far it replayed.
        assert!(!qualifies(u64::MAX, 1, lsn, 2));
        assert!(!qualifies(u64::MAX, 2, lsn, 1));
        // An unknown timeline never qualifies, on any timeline: after an
        // app restart following a failover the orphan looks exactly so.
        assert!(!qualifies(1_000, 0, lsn, 1));
        assert!(!qualifies(u64::MAX, 0, lsn, 2));
        assert!(!qualifies(u64::MAX, 0, Lsn::ZERO, 0));
    }
}

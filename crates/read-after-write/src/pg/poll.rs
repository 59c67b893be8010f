//! Polling one replica server: its task, and what a poll's answer changes
//! in its state (health, position, timeline, heartbeat proof, predictions,
//! divergence, gauges).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::probe::{self, ProbeKind, ReplicaProbe};
use super::probe_conn::{ProbeConn, ProbeError};
use super::server::{ReplicaState, STALE_FOREVER, UNKNOWN};
use super::tracker::{describe, ReplicaTracker};
use crate::position::Lsn;

/// A wait to do on a server before a poll.
struct WaitPlan<'a> {
    /// The position.
    lsn: u64,
    /// How long it may take.
    slice: Duration,
    /// When to start checking without sleeping: shortly before the
    /// predicted replay.
    spin_after: Option<Duration>,
    /// The heartbeat table and epoch that prove it; none: the replay
    /// position does.
    heartbeat: Option<(&'a str, u64)>,
}

/// How long before the predicted replay a wait stops sleeping between
/// checks and checks back to back, for a few milliseconds: a sleep on the
/// server lasts at least a millisecond, too coarse to resume within one.
const SPIN_LEAD: Duration = Duration::from_millis(2);

/// The longest one wait on a server lasts before the poll returns: a read
/// that waits longer gets another. Short enough that a server freezing
/// mid-wait is noticed within about a probe timeout.
const WAIT_SLICE: Duration = Duration::from_millis(100);

impl ReplicaTracker {
    pub(crate) async fn run_server(
        self: Arc<Self>,
        server: Arc<ReplicaState>,
        mut conn: Option<ProbeConn>,
    ) {
        let config = self.config;
        let mut shutdown = self.shutdown.subscribe();
        let mut backoff = config.poll_interval;
        let mut last_poll = Instant::now();
        while !*shutdown.borrow() {
            let healthy = server.is_healthy();
            let pause = if healthy { self.interval() } else { backoff };
            // A wait still pending (its slice ended first) goes on at once.
            let waiting = healthy && self.pending_wait(&server).is_some();
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep(pause), if !waiting => {}
                _ = std::future::ready(()), if waiting => {}
                // A down replica is re-probed on its backoff only (unless a
                // connection to it was handed over): reads waiting for a
                // position must not hammer a dead node.
                _ = server.refresh.notified(), if healthy || server.has_handed_over() => {
                    // A wait for a position starts at once (it is one query,
                    // however long); plain refreshes keep a minimum gap.
                    let since = last_poll.elapsed();
                    if since < config.min_refresh_gap && self.pending_wait(&server).is_none() {
                        tokio::time::sleep(config.min_refresh_gap - since).await;
                    }
                }
            }
            let up = self.poll_server(&server, &mut conn).await;
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

    /// Polls one replica server, updates its state, and reports whether it
    /// is up.
    pub(crate) async fn poll_server(
        &self,
        server: &ReplicaState,
        conn: &mut Option<ProbeConn>,
    ) -> bool {
        self.polls.fetch_add(1, Ordering::Relaxed);
        if conn.is_none() {
            if let Some((handed, found)) = server.take_handed_over() {
                // Another task found it reaching this server; it is this
                // state's only if it is the incarnation followed (or the
                // state follows none yet).
                if let Ok(handed) = self.place(server, handed, &found) {
                    *conn = Some(handed);
                }
            }
        }
        let config = self.config;
        // A read waits for a position here: wait for it on the server, in
        // the poll itself, for at most a slice of the read's time (so that a
        // server that froze meanwhile is noticed within about a probe
        // timeout, and a later, higher wait is taken up soon).
        let wait = self.wait_plan(server);
        let (sql, waited) = match &wait {
            Some(plan) => (
                probe::wait_then_probe_sql(
                    &self.probe_sql,
                    Lsn::new(plan.lsn),
                    plan.slice,
                    plan.spin_after,
                    plan.heartbeat,
                ),
                plan.slice,
            ),
            None => (self.probe_sql.clone(), Duration::ZERO),
        };
        let wait = wait.map(|plan| plan.lsn);
        let result = tokio::time::timeout(config.probe_timeout + waited, async {
            if conn.is_none() {
                *conn = Some(self.connect_to(server).await?);
            }
            match conn.as_deref_mut() {
                Some(connection) => probe::replica(connection, &sql).await,
                None => Err(ProbeError::unreachable("no tracker connection")),
            }
        })
        .await;
        let was_healthy = server.is_healthy();
        let name = server.name.as_str();
        let endpoint = &self.endpoints[server.endpoint];
        let up = match result {
            Ok(Ok(probe)) if server.identity().as_ref() != Some(&probe.fingerprint) => {
                // The connection now reaches another server: a pooler in
                // transaction mode with several hosts. Reads through such
                // a URL cannot be tied to a server.
                if let Some(known) = server.identity() {
                    endpoint.mark_indistinct(&probe.fingerprint, &known);
                }
                *conn = None;
                false
            }
            Ok(Ok(probe)) if self.probe_kind == ProbeKind::Aurora => {
                self.admit_unpositioned(server, &probe, was_healthy)
            }
            Ok(Ok(probe)) if probe.in_recovery && probe.replayed.is_some() => {
                self.record_probe(server, &probe, was_healthy);
                if let Some(lsn) = wait {
                    server.end_wait(lsn, self.nanos());
                }
                return true;
            }
            Ok(Ok(probe)) => {
                // Answers, but is not a replica any more: promoted, or
                // misconfigured. Exclude it; keep probing in case it was
                // rebuilt as a replica. Whatever it holds when it comes back
                // is a new history: forget what was proven before.
                server.forget_proofs();
                if was_healthy || !server.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        replica = name,
                        server = %probe.fingerprint,
                        in_recovery = probe.in_recovery,
                        "node is not replaying WAL (promoted or not a standby); excluded from reads"
                    );
                }
                true
            }
            Ok(Err(error)) => {
                if was_healthy || !server.warned.swap(true, Ordering::Relaxed) {
                    let url = describe(&endpoint.options());
                    if error.is_refused() {
                        // It answered: the problem is what it is, not
                        // whether it can be reached.
                        tracing::warn!(replica = name, %url, %error, "replica refused; excluded from reads");
                    } else {
                        tracing::warn!(replica = name, %url, %error, "replica unreachable; excluded from reads");
                    }
                }
                *conn = None;
                false
            }
            Err(_elapsed) => {
                if was_healthy {
                    let url = describe(&endpoint.options());
                    tracing::warn!(replica = name, %url, timeout = ?config.probe_timeout, "replica probe timed out (down, frozen or partitioned); excluded from reads");
                }
                *conn = None;
                false
            }
        };
        if up && self.probe_kind == ProbeKind::Aurora && server.is_healthy() {
            return true;
        }
        server.tag.store(0, Ordering::Relaxed);
        if !up {
            // Down: it may come back as something else (restored from a
            // backup, rebuilt after a promotion) with no WAL receiver to
            // show it. Only what is seen after it returns counts.
            server.forget_proofs();
        }
        if was_healthy {
            server.healthy.store(false, Ordering::Release);
            server
                .down_since
                .store(self.nanos().max(1), Ordering::Relaxed);
            server.outages.mark_down();
            metrics::gauge!("read_after_write_replica_up", "replica" => server.name.clone())
                .set(0.0);
            // An excluded replica's lag is unknown, not what it last was.
            metrics::gauge!("read_after_write_replica_lag_bytes", "replica" => server.name.clone())
                .set(f64::NAN);
            metrics::gauge!("read_after_write_replica_lag_seconds", "replica" => server.name.clone())
                .set(f64::NAN);
            self.bump();
        } else if server.down_since.load(Ordering::Relaxed) == 0 {
            server
                .down_since
                .store(self.nanos().max(1), Ordering::Relaxed);
        }
        up
    }

    /// The wait a poll of `server` should do first, if a read asked for one
    /// that the server could prove: the position, the slice of time (at
    /// most [`WAIT_SLICE`]), and the heartbeat table and epoch when the
    /// proof is a heartbeat (the server's WAL receiver unseen).
    fn wait_plan(&self, server: &ReplicaState) -> Option<WaitPlan<'_>> {
        if !server.is_healthy() || self.probe_kind == ProbeKind::Aurora {
            return None;
        }
        let (lsn, left, eta) = self.pending_wait(server)?;
        let mut plan = WaitPlan {
            lsn,
            slice: left.min(WAIT_SLICE),
            spin_after: eta.map(|eta| eta.saturating_sub(SPIN_LEAD)),
            heartbeat: None,
        };
        if server.receiver_timeline() != 0 {
            return Some(plan);
        }
        let heartbeat = self.heartbeat.as_deref()?;
        let epoch = self.primary.epoch();
        plan.heartbeat = Some((heartbeat.table.as_str(), epoch));
        (epoch != 0).then_some(plan)
    }

    /// Takes in what a poll of a streaming replica in recovery found.
    pub(crate) fn record_probe(
        &self,
        server: &ReplicaState,
        probe: &ReplicaProbe,
        was_healthy: bool,
    ) {
        let Some(replayed) = probe.replayed else {
            return;
        };
        let replayed = replayed.as_u64();
        let now = self.nanos();
        server
            .tag
            .store(probe.fingerprint.tag(&server.name).get(), Ordering::Relaxed);
        let previous = server.replayed.swap(replayed, Ordering::AcqRel);
        // Keep the last timeline seen: with its upstream gone the WAL
        // receiver stops and reports nothing, but the replica still holds
        // that timeline's history.
        if let Some(timeline) = probe.timeline {
            server.timeline.store(timeline, Ordering::Relaxed);
        }
        let proof_moved = self.record_heartbeats(server, &probe.heartbeats);
        self.learn(server, previous, replayed, was_healthy, now);
        let pause_changed = server.paused.swap(probe.paused, Ordering::Relaxed) != probe.paused;
        if previous != replayed {
            server.advanced_at.store(now, Ordering::Relaxed);
        }
        let diverged = self.judge_divergence(server, now);
        if !was_healthy {
            server.down_since.store(0, Ordering::Relaxed);
            server.healthy.store(true, Ordering::Release);
            tracing::info!(replica = %server.name, server = %probe.fingerprint, lsn = %probe.replayed.unwrap_or_default(), "replica admitted");
            metrics::gauge!("read_after_write_replica_up", "replica" => server.name.clone())
                .set(1.0);
            self.bump();
        } else if previous != replayed || diverged || pause_changed || proof_moved {
            self.bump();
        }
        self.report_lag(server, replayed);
    }

    /// The heartbeat proof from the rows a poll saw: the highest position of
    /// the current primary's epoch. Returns whether it moved.
    pub(crate) fn record_heartbeats(
        &self,
        server: &ReplicaState,
        heartbeats: &[(u64, u64)],
    ) -> bool {
        if self.heartbeat.is_none() {
            return false;
        }
        let epoch = self.primary.epoch();
        let proven = probe::proven_position(heartbeats, epoch);
        let before = server.proven.load(Ordering::Acquire);
        if proven == 0 {
            server.forget_heartbeat();
            return before != 0;
        }
        server.proven_timeline.store(0, Ordering::Relaxed);
        server.proven.store(proven, Ordering::Release);
        server
            .proven_timeline
            .store((epoch >> 32) as u32, Ordering::Relaxed);
        before != proven
    }

    /// A replica whose positions cannot be known (Aurora): admitted for
    /// eventual reads while it answers in recovery, never for a read with a
    /// token, and counted as infinitely stale.
    pub(crate) fn admit_unpositioned(
        &self,
        server: &ReplicaState,
        probe: &ReplicaProbe,
        was_healthy: bool,
    ) -> bool {
        if !probe.in_recovery {
            return true;
        }
        server.missing_since.store(STALE_FOREVER, Ordering::Relaxed);
        if !was_healthy {
            server.down_since.store(0, Ordering::Relaxed);
            server.healthy.store(true, Ordering::Release);
            tracing::info!(replica = %server.name, server = %probe.fingerprint, "replica admitted for eventual reads only (its positions cannot be known)");
            metrics::gauge!("read_after_write_replica_up", "replica" => server.name.clone())
                .set(1.0);
            self.bump();
        }
        true
    }

    /// Updates what predictions need after a poll found `replica` at
    /// `replayed`, `previous` before: its replay delay and rate, and since
    /// when it lacks WAL. Delay and rate learn only from a replica that was
    /// healthy at the poll before (else `previous` is from before an
    /// outage) and follows the primary's timeline.
    pub(crate) fn learn(
        &self,
        replica: &ReplicaState,
        previous: u64,
        replayed: u64,
        was_healthy: bool,
        now: u64,
    ) {
        let at = Instant::now();
        let timeline = replica.known_timeline();
        let same_timeline = timeline == 0 || timeline == self.primary.timeline();
        let learned = self.primary.with_history(|history| {
            let sample = super::predict::delay_sample(history, previous, replayed, at);
            (sample, super::predict::first_missing(history, replayed))
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
            replica.set_delay(super::predict::smooth_delay(replica.delay(), sample));
        }
        let elapsed = Duration::from_nanos(now.saturating_sub(polled_before));
        replica.set_rate(super::predict::smooth_rate(
            replica.rate(),
            replayed.saturating_sub(previous),
            elapsed,
        ));
    }

    /// Decides whether `replica` has left the primary's history: seen on
    /// another timeline; its replay stood still for `stall_timeout` while
    /// the primary moved (the only sign of an orphan whose timeline cannot
    /// be seen); or it replayed past a heartbeat of the current primary
    /// without showing one (it follows another primary). Updates the flag
    /// and its gauge; returns whether it changed.
    pub(crate) fn judge_divergence(&self, replica: &ReplicaState, now: u64) -> bool {
        let timeline = replica.receiver_timeline();
        let primary_timeline = self.primary.timeline();
        let other_timeline = timeline != 0 && timeline != primary_timeline;
        let advanced_at = replica.advanced_at.load(Ordering::Relaxed);
        let primary_moved_since = self.primary.changed_at.load(Ordering::Relaxed) > advanced_at;
        let replayed = replica.replayed();
        // A replica at exactly the primary's position is caught up, however
        // long ago it got there (it may have seen the WAL before the
        // primary's poll did). Behind, or past it (an orphan's position on
        // a history the primary left), and standing still: stalled.
        let elsewhere = replayed != self.primary.inserted();
        let stalled = primary_moved_since
            && elsewhere
            && now.saturating_sub(advanced_at)
                > u64::try_from(self.config.stall_timeout.as_nanos()).unwrap_or(u64::MAX);
        let floor = self.primary.heartbeat_floor.load(Ordering::Relaxed);
        let off_history = self.heartbeat.is_some()
            && floor != 0
            && timeline == 0
            && replica.proven_timeline.load(Ordering::Relaxed) == 0
            && replayed >= floor;
        let diverged = other_timeline || stalled || off_history;
        let before = replica.diverged.swap(diverged, Ordering::Relaxed);
        if before != diverged {
            if diverged {
                tracing::warn!(
                    replica = %replica.name,
                    timeline,
                    primary_timeline,
                    stalled,
                    off_history,
                    "replica is not following the primary's history (orphaned after a failover, \
                     still on the old timeline, following another primary, or its replay stalled); \
                     it serves no reads"
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
    pub(crate) fn report_lag(&self, replica: &ReplicaState, replayed: u64) {
        let timeline = replica.known_timeline();
        let same_timeline = timeline == 0 || timeline == self.primary.timeline();
        let (bytes, seconds) = if same_timeline {
            let inserted = self.primary.inserted();
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
}

//! Polling the primary: its position, timeline and epoch, the tracker's own
//! heartbeats, and what a silent primary changes.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::heartbeat::Heartbeat;
use super::probe::{self, PrimaryProbe};
use super::probe_conn::{ProbeConn, ProbeConnector, ProbeError, ProbeTarget};
use super::tracker::{describe, ReplicaTracker};

impl ReplicaTracker {
    /// Polls the primary's position on the tracker's own connection, with
    /// the probe timeout on connecting and on every query, writing a
    /// heartbeat about once per heartbeat interval while positions are in
    /// use. A frozen or partitioned primary (no RST) is noticed within that
    /// timeout; the connection is then dropped, so a repointed primary
    /// address is picked up by the next poll, and the primary's pool drops
    /// its connections that predate the outage.
    pub(crate) async fn run_primary(self: Arc<Self>, mut conn: Option<ProbeConn>) {
        let config = self.config;
        let mut shutdown = self.shutdown.subscribe();
        let plain_sql = probe::primary_position_sql(None);
        // Consecutive probes that got no answer at all.
        let mut silent = 0u32;
        while !*shutdown.borrow() {
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                _ = tokio::time::sleep(self.interval()) => {}
                _ = self.wake_primary.notified() => {}
            }
            let heartbeat = self.heartbeat_due();
            let sql = match heartbeat {
                Some(heartbeat) => heartbeat.write_sql(),
                None => plain_sql.clone(),
            };
            let result = tokio::time::timeout(
                config.probe_timeout,
                probe_primary(
                    &*self.connector,
                    &self.primary.probe_target(),
                    &mut conn,
                    &sql,
                    heartbeat.is_some(),
                ),
            )
            .await;
            match result {
                Ok(Ok(position)) => {
                    silent = 0;
                    self.primary.pool_replaced.store(false, Ordering::Relaxed);
                    self.note_primary_position(PrimaryProbe {
                        lsn: position.lsn.round_down_page_header(self.primary.geometry),
                        ..position
                    });
                    if !self.primary.healthy.swap(true, Ordering::Relaxed) {
                        tracing::info!("primary reachable");
                    }
                }
                Ok(Err(error)) if heartbeat.is_some() && Heartbeat::is_permanent(error.code()) => {
                    // The tracker's role may not write the heartbeat; the
                    // captures (the application's role) still may.
                    if !self.periodic_heartbeat_failed.swap(true, Ordering::Relaxed) {
                        tracing::warn!(%error, "the tracker cannot write the heartbeat table; only write-position captures will");
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

    /// The heartbeat to write with this primary poll, if one is due: in
    /// heartbeat mode, while positions are in use, when none was written for
    /// a heartbeat interval.
    pub(crate) fn heartbeat_due(&self) -> Option<&Heartbeat> {
        let heartbeat = self.heartbeat.as_deref()?;
        if self.periodic_heartbeat_failed.load(Ordering::Relaxed)
            || !heartbeat.is_enabled()
            || self.idle()
        {
            return None;
        }
        let since = self
            .nanos()
            .saturating_sub(self.last_heartbeat.load(Ordering::Relaxed));
        (since >= self.config.heartbeat_interval.as_nanos() as u64).then_some(heartbeat)
    }

    /// Marks the primary down. A silent primary (`frozen`: no answer, no
    /// error) also gets a fresh pool, since connections stuck on it would
    /// hold their pool slots; see [`PrimaryPools`](super::pools::PrimaryPools).
    pub(crate) fn primary_down(&self, error: &str, frozen: bool) {
        if self.primary.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                primary = %describe(&self.primary.pools.current().connect_options()),
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

    /// Records the primary's position, timeline and epoch, as seen by a
    /// capture or a poll. A new timeline (a failover) restarts the position
    /// history: its positions cannot be compared with the old timeline's. A
    /// new epoch (a failover or a restart of the primary) voids every
    /// heartbeat proof.
    pub(crate) fn note_primary_position(&self, position: PrimaryProbe) {
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
        if position.epoch != 0 {
            let previous = self.primary.epoch.swap(position.epoch, Ordering::AcqRel);
            if previous != position.epoch {
                self.primary.first_heartbeat.store(0, Ordering::Relaxed);
                self.primary.heartbeat_floor.store(0, Ordering::Relaxed);
                for server in self.servers.iter() {
                    server.forget_heartbeat();
                }
                if previous != 0 {
                    tracing::info!("the primary is another server or incarnation now; heartbeats of the one before prove nothing");
                }
                self.bump();
            }
        }
        if position.heartbeat {
            self.last_heartbeat.store(self.nanos(), Ordering::Relaxed);
            self.primary.note_heartbeat(position.epoch, lsn);
        }
        if moved {
            self.primary
                .changed_at
                .store(self.nanos(), Ordering::Relaxed);
        }
    }
}

/// One position query on the tracker's own connection to the primary,
/// opening it if needed.
async fn probe_primary(
    connector: &dyn ProbeConnector,
    target: &ProbeTarget,
    conn: &mut Option<ProbeConn>,
    sql: &str,
    heartbeat: bool,
) -> Result<PrimaryProbe, ProbeError> {
    if conn.is_none() {
        *conn = Some(connector.connect(target).await?);
    }
    let Some(connection) = conn.as_deref_mut() else {
        return Err(ProbeError::unreachable("no tracker connection"));
    };
    probe::primary(connection, sql, heartbeat).await
}

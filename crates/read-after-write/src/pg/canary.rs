//! The canary: a production check of the promise itself.
//!
//! Every rule in this crate exists so that a session read routed to a
//! replica finds its user's write there. The canary checks that it did, on
//! a sample of those reads, where it matters: on the server that served
//! them. Right after such a read is routed (one in `1 / rate`, counted
//! without a lock), a task takes an idle connection of the very pool the
//! read was handed, asks that server `pg_last_wal_replay_lsn()` and which
//! server it is, and counts a violation when the server had not replayed
//! the position the read required, or is not the server the tracker
//! follows.
//!
//! Why that is the read's server: each replica server's pool admits only
//! connections whose fingerprint is that server's (see
//! [`endpoint`](super::endpoint)), so any connection of the pool reached the
//! server the read ran on; and replay on one incarnation never goes
//! backwards, so a server that has the position a moment after the read
//! was routed had it when the read ran only if routing was right, and
//! lacks it now only if routing was wrong. A pool the application brought
//! is checked the same way, which is what catches one that reaches other
//! servers than the tracker sees.
//!
//! It costs one query on an idle replica connection per sampled read, off
//! the read's path (no idle connection: no check), and nothing when the rate
//! is 0. Violations are `read_after_write_canary_violations_total{replica}`
//! and a `check()` finding; alert on any.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sqlx::{AssertSqlSafe, PgPool, Row};

use super::fingerprint::Fingerprint;
use super::server::ReplicaState;
use crate::position::Lsn;

/// The sampling state and counts of one replica set's canary.
#[derive(Debug)]
pub(crate) struct Canary {
    /// Check one read in this many; 0: never.
    every: u64,
    seen: AtomicU64,
    pub(crate) counts: Arc<CanaryCounts>,
}

/// What the canary found so far.
#[derive(Debug, Default)]
pub(crate) struct CanaryCounts {
    pub(crate) checks: AtomicU64,
    pub(crate) violations: AtomicU64,
}

impl Canary {
    pub(crate) fn new(rate: f64) -> Self {
        let every = if rate > 0.0 {
            (1.0 / rate).round().clamp(1.0, u64::MAX as f64) as u64
        } else {
            0
        };
        Canary {
            every,
            seen: AtomicU64::new(0),
            counts: Arc::default(),
        }
    }

    /// Samples a session read routed to `replica` that required `lsn`, and
    /// checks it in the background when sampled.
    #[inline]
    pub(crate) fn sample(&self, replica: &ReplicaState, lsn: Lsn) {
        if self.every == 0
            || !self
                .seen
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(self.every)
        {
            return;
        }
        let Some(identity) = replica.identity() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(check(
            replica.pool.clone(),
            replica.name.clone(),
            identity,
            lsn,
            Arc::clone(&self.counts),
        ));
    }
}

/// Confirms on an idle connection of `pool` that its server is `identity`
/// and has replayed `lsn`.
async fn check(
    pool: PgPool,
    name: String,
    identity: Fingerprint,
    lsn: Lsn,
    counts: Arc<CanaryCounts>,
) {
    let Some(mut conn) = pool.try_acquire() else {
        return;
    };
    let sql = "select pg_last_wal_replay_lsn()::text, \
                      (select system_identifier::text from pg_control_system()), \
                      host(inet_server_addr()), inet_server_port()::text, \
                      ((extract(epoch from pg_postmaster_start_time()) * 1000000)::int8)::text";
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        sqlx::raw_sql(AssertSqlSafe(sql)).fetch_one(&mut *conn),
    )
    .await;
    let Ok(Ok(row)) = answer else {
        return;
    };
    let text = |i: usize| row.try_get::<Option<String>, _>(i).ok().flatten();
    let replayed = text(0).and_then(|t| t.parse::<Lsn>().ok());
    let same_server = text(1).and_then(|t| t.parse::<u64>().ok()) == Some(identity.system_id)
        && text(2) == identity.addr
        && text(3).and_then(|t| t.parse::<u16>().ok()) == identity.port
        && text(4).and_then(|t| t.parse::<i64>().ok()) == Some(identity.started_micros);
    counts.checks.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("read_after_write_canary_checks_total", "replica" => name.clone())
        .increment(1);
    let held = replayed.is_some_and(|replayed| replayed >= lsn);
    if held && same_server {
        return;
    }
    counts.violations.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("read_after_write_canary_violations_total", "replica" => name.clone())
        .increment(1);
    tracing::error!(
        replica = %name,
        required = %lsn,
        replayed = ?replayed,
        same_server,
        expected = %identity,
        "canary: a session read went to a replica that had not replayed its user's write; reads \
         reach servers the tracker does not see (check the replica URLs, pools and the monitoring \
         options)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_becomes_one_in_n() {
        assert_eq!(Canary::new(0.01).every, 100);
        assert_eq!(Canary::new(1.0).every, 1);
        assert_eq!(Canary::new(0.0).every, 0);
        assert_eq!(Canary::new(0.3).every, 3);
    }
}

//! The canary: a production check of the promise itself.
//!
//! Every rule in this crate exists so that a session read routed to a
//! replica finds its user's write there. The canary checks that it did, on
//! a sample of those reads, where it matters: on the server that served
//! them. Right after such a read is routed (one in `1 / rate`, counted
//! without a lock), a task takes an idle connection of the very pool the
//! read was handed (the set's own, or a driver's through `Driver::canary`),
//! asks that server `pg_last_wal_replay_lsn()` and which
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
//! the read's path, and nothing when the rate is 0. A check never opens a
//! connection nor takes one a read waits for: it looks for an idle one, and
//! while the pool has none (the read it checks may hold the only one) it
//! looks again every millisecond for up to [`CANARY_IDLE_WAIT`], then gives
//! up. So a check runs at once on a busy pool with idle connections, and
//! right after its read on a quiet one, where a sequential user's reads
//! would otherwise never be checked. Violations are `read_after_write_canary_violations_total{replica}`
//! and a `check()` finding; alert on any.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::{AssertSqlSafe, PgPool, Row};

use super::fingerprint::Fingerprint;
use super::server::ReplicaState;
use crate::position::Lsn;

/// What the canary asks the server a read was routed to: one row of five
/// text columns, the replay position and the server's fingerprint.
pub(crate) const CANARY_SQL: &str = "select pg_last_wal_replay_lsn()::text as replayed, \
     (select system_identifier::text from pg_control_system()) as system_id, \
     host(inet_server_addr()) as addr, inet_server_port()::text as port, \
     ((extract(epoch from pg_postmaster_start_time()) * 1000000)::int8)::text as started";

/// How long the canary's query may take before the check is dropped.
pub(crate) const CANARY_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a sampled check looks for an idle connection before it is
/// dropped: long enough for the read it checks to give back a quiet pool's
/// only connection, short enough that the server is asked while a wrong
/// route would still show (a server the tracker does not see lags by more).
pub(crate) const CANARY_IDLE_WAIT: Duration = Duration::from_millis(50);

/// Runs `attempt` (the canary's query on a connection idle now; `None`
/// when there is none or the query failed) until it answers, again every
/// millisecond for up to [`CANARY_IDLE_WAIT`], each try bounded by
/// [`CANARY_TIMEOUT`].
pub(crate) async fn first_answer<F, Fut>(mut attempt: F) -> Option<[Option<String>; 5]>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<[Option<String>; 5]>>,
{
    let deadline = tokio::time::Instant::now() + CANARY_IDLE_WAIT;
    loop {
        if let Ok(Some(row)) = tokio::time::timeout(CANARY_TIMEOUT, attempt()).await {
            return Some(row);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Runs a sampled check on the pool a read was handed, when that pool is
/// not the set's own (a driver's, `pg::driver`): given the
/// server and the check, it spawns the query on an idle connection of the
/// driver's pool of that server and hands the row to [`CanaryCheck::judge`].
pub(crate) type CanaryRunner = Box<dyn Fn(&ReplicaState, CanaryCheck) + Send + Sync>;

/// The sampling state and counts of one replica set's canary.
pub(crate) struct Canary {
    /// Check one read in this many; 0: never.
    every: u64,
    seen: AtomicU64,
    pub(crate) counts: Arc<CanaryCounts>,
    /// Set when reads run on a driver's pools, not the set's.
    pub(crate) runner: OnceLock<CanaryRunner>,
}

impl std::fmt::Debug for Canary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Canary")
            .field("every", &self.every)
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

/// What the canary found so far.
#[derive(Debug, Default)]
pub(crate) struct CanaryCounts {
    pub(crate) checks: AtomicU64,
    pub(crate) violations: AtomicU64,
}

/// One sampled read to confirm: the server it went to, as the tracker
/// follows it, and the position it required.
pub(crate) struct CanaryCheck {
    name: String,
    identity: Fingerprint,
    lsn: Lsn,
    counts: Arc<CanaryCounts>,
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
            runner: OnceLock::new(),
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
        let check = CanaryCheck {
            name: replica.name.clone(),
            identity,
            lsn,
            counts: Arc::clone(&self.counts),
        };
        if let Some(runner) = self.runner.get() {
            return runner(replica, check);
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(check_on(replica.pool.clone(), check));
    }
}

/// Confirms on an idle connection of the set's own `pool` ([`first_answer`]).
async fn check_on(pool: PgPool, check: CanaryCheck) {
    let row = first_answer(|| async {
        let mut conn = pool.try_acquire()?;
        let row = sqlx::raw_sql(AssertSqlSafe(CANARY_SQL))
            .fetch_one(&mut *conn)
            .await
            .ok()?;
        let text = |i: usize| row.try_get::<Option<String>, _>(i).ok().flatten();
        Some([text(0), text(1), text(2), text(3), text(4)])
    })
    .await;
    if let Some(row) = row {
        check.judge(row);
    }
}

impl CanaryCheck {
    /// Counts the check from [`CANARY_SQL`]'s row, and a violation when the
    /// server had not replayed the position or is not the server the
    /// tracker follows.
    pub(crate) fn judge(self, row: [Option<String>; 5]) {
        let CanaryCheck {
            name,
            identity,
            lsn,
            counts,
        } = self;
        let [replayed, system_id, addr, port, started] = row;
        let replayed = replayed.and_then(|t| t.parse::<Lsn>().ok());
        let same_server = system_id.and_then(|t| t.parse::<u64>().ok()) == Some(identity.system_id)
            && addr == identity.addr
            && port.and_then(|t| t.parse::<u16>().ok()) == identity.port
            && started.and_then(|t| t.parse::<i64>().ok()) == Some(identity.started_micros);
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

    fn row() -> [Option<String>; 5] {
        std::array::from_fn(|i| Some(i.to_string()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_waits_for_the_read_to_give_its_connection_back() {
        // The read holds the pool's only connection for 3 ms.
        let start = tokio::time::Instant::now();
        let tries = std::cell::Cell::new(0);
        let answer = first_answer(|| {
            tries.set(tries.get() + 1);
            let idle = start.elapsed() >= Duration::from_millis(3);
            async move { idle.then(row) }
        })
        .await;
        assert_eq!(answer, Some(row()));
        assert!((3..=5).contains(&tries.get()), "{} tries", tries.get());
    }

    #[tokio::test(start_paused = true)]
    async fn a_check_that_never_finds_an_idle_connection_gives_up() {
        let start = tokio::time::Instant::now();
        let tries = std::cell::Cell::new(0);
        let answer = first_answer(|| {
            tries.set(tries.get() + 1);
            async { None }
        })
        .await;
        assert_eq!(answer, None);
        let waited = start.elapsed();
        assert!(
            waited >= CANARY_IDLE_WAIT && waited < CANARY_IDLE_WAIT * 2,
            "{waited:?}"
        );
        assert!(tries.get() <= 52, "{} tries", tries.get());
    }

    #[tokio::test(start_paused = true)]
    async fn a_query_that_hangs_is_dropped_after_the_timeout() {
        let start = tokio::time::Instant::now();
        let answer = first_answer(std::future::pending).await;
        assert_eq!(answer, None);
        assert!(start.elapsed() >= CANARY_TIMEOUT && start.elapsed() < CANARY_TIMEOUT * 2);
    }
}

//! Capturing the primary's write position after a commit, one query shared by
//! every concurrent writer that may safely share it.
//!
//! PostgreSQL does not report a commit's LSN on the wire, so a writing request
//! costs one `pg_current_wal_insert_lsn()` round trip after its commit. A
//! result may be shared only by requests whose commits finished before the
//! query *started*. So a request joins the batch that has not started yet;
//! one driver task runs batches back to back, taking the pending batch just
//! before it sends each query. Under load, every writer that arrives while a
//! query is in flight shares the next one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use super::heartbeat::Heartbeat;
use super::pools::PrimaryPools;
use super::probe::{self, PrimaryProbe};
use super::probe_sqlx;
use crate::position::WalGeometry;

/// Why the write position could not be captured. The layer then returns the
/// response with a token that pins the user's session reads to the primary
/// (their write may have committed, but nobody knows where), and logs this.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    /// The capture query failed (primary down, connection lost, ...).
    #[error("capture query on the primary failed: {0}")]
    Query(#[source] Arc<sqlx::Error>),
    /// The capture query did not answer in time.
    #[error("capture query on the primary did not answer within {0:?}")]
    TimedOut(Duration),
    /// The primary answered with something that is not a position.
    #[error("primary returned an unreadable WAL position: {0}")]
    Unreadable(String),
    /// The task running the query ended without an answer (runtime shutting
    /// down).
    #[error("capture task ended without an answer")]
    Abandoned,
}

type Slot = Option<Result<PrimaryProbe, CaptureError>>;

/// Single-flight capture of the primary's write position.
pub(crate) struct Capture {
    primary: Arc<PrimaryPools>,
    /// Written by every capture while replicas are proven by heartbeats:
    /// the capture is then an upsert returning the same position.
    heartbeat: Option<Arc<Heartbeat>>,
    geometry: WalGeometry,
    timeout: Duration,
    state: Mutex<State>,
    queries: AtomicU64,
}

struct State {
    /// A driver task is running batches.
    running: bool,
    /// The batch whose query has not started; new writers join it.
    pending: Option<watch::Sender<Slot>>,
}

impl Capture {
    pub(crate) fn new(
        primary: Arc<PrimaryPools>,
        heartbeat: Option<Arc<Heartbeat>>,
        geometry: WalGeometry,
        timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Capture {
            primary,
            heartbeat,
            geometry,
            timeout,
            state: Mutex::new(State {
                running: false,
                pending: None,
            }),
            queries: AtomicU64::new(0),
        })
    }

    /// Capture queries sent so far.
    pub(crate) fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// The write position covering every commit that finished before this
    /// call. Bounded: at most the query in flight plus this caller's own.
    pub(crate) async fn capture(self: &Arc<Self>) -> Result<PrimaryProbe, CaptureError> {
        let mut receiver = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let receiver = match &state.pending {
                Some(batch) => batch.subscribe(),
                None => {
                    let (batch, receiver) = watch::channel(None);
                    state.pending = Some(batch);
                    receiver
                }
            };
            if !state.running {
                state.running = true;
                tokio::spawn(Arc::clone(self).drive());
            }
            receiver
        };
        let bound = self.timeout.saturating_mul(2) + Duration::from_millis(100);
        let outcome = match tokio::time::timeout(bound, receiver.wait_for(Option::is_some)).await {
            Ok(Ok(slot)) => slot.clone().unwrap_or(Err(CaptureError::Abandoned)),
            Ok(Err(_closed)) => Err(CaptureError::Abandoned),
            Err(_elapsed) => Err(CaptureError::TimedOut(bound)),
        };
        outcome
    }

    /// Runs pending batches one after another until none is left.
    async fn drive(self: Arc<Self>) {
        let mut guard = DriverGuard {
            capture: &self,
            finished: false,
        };
        loop {
            let batch = {
                let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                match state.pending.take() {
                    Some(batch) => batch,
                    None => {
                        state.running = false;
                        guard.finished = true;
                        return;
                    }
                }
            };
            // Every member joined before `take` above, so before this query
            // starts: their commits are covered.
            self.queries.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("read_after_write_capture_queries_total").increment(1);
            let result = match tokio::time::timeout(self.timeout, self.query()).await {
                Ok(Ok(position)) => Ok(PrimaryProbe {
                    lsn: position.lsn.round_down_page_header(self.geometry),
                    ..position
                }),
                Ok(Err(error)) => Err(CaptureError::Query(Arc::new(error))),
                Err(_elapsed) => Err(CaptureError::TimedOut(self.timeout)),
            };
            batch.send_replace(Some(result));
        }
    }
}

/// Hands the driver role back if the driver task ends early (dropped with
/// its runtime, or a panic): otherwise `running` would stay set and every
/// later capture would wait out its bound for a driver that never comes.
struct DriverGuard<'a> {
    capture: &'a Capture,
    finished: bool,
}

impl Drop for DriverGuard<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let mut state = self
                .capture
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            state.running = false;
            // Dropping the pending batch's sender wakes its members with
            // `Abandoned` at once.
            state.pending = None;
        }
    }
}

impl Capture {
    /// One round trip: the primary's insert position, timeline and epoch,
    /// writing this instance's heartbeat at that position when heartbeats
    /// are in use. A heartbeat that cannot be written at all (no table, no
    /// privilege) is turned off, loudly, and the position asked plainly.
    async fn query(&self) -> Result<PrimaryProbe, sqlx::Error> {
        let pool = self.primary.current();
        if let Some(heartbeat) = self.heartbeat.as_deref().filter(|h| h.is_enabled()) {
            match probe_sqlx::primary(pool, &heartbeat.write_sql(), true).await {
                Err(error) if Heartbeat::is_permanent(sqlstate(&error).as_deref()) => {
                    heartbeat.disable(&error)
                }
                answer => return answer,
            }
        }
        probe_sqlx::primary(pool, &probe::primary_position_sql(None), false).await
    }
}

/// The SQLSTATE a sqlx error carries, if the server raised one.
fn sqlstate(error: &sqlx::Error) -> Option<String> {
    error
        .as_database_error()
        .and_then(|db| db.code())
        .map(|code| code.into_owned())
}

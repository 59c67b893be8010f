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
//!
//! One query is in flight at a time, so the capture holds one connection to
//! the primary of its own, opened through the set's
//! [`ProbeConnector`] as the application's role (the primary pool's
//! options, or the driver's primary URL). A query that fails or does not
//! answer in time drops it, so a frozen or failed-over primary never keeps
//! it stuck; the next capture opens another. So does a primary outage the
//! tracker saw, as it does for the primary pool's connections: the address
//! may point elsewhere now.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::heartbeat::Heartbeat;
use super::outages::Outages;
use super::pools::PrimaryPools;
use super::probe::{self, PrimaryProbe};
use super::probe_conn::{ProbeConn, ProbeConnection, ProbeConnector, ProbeError, ProbeTarget};
use crate::position::WalGeometry;

/// Why the write position could not be captured. The layer then returns the
/// response with a token that pins the user's session reads to the primary
/// (their write may have committed, but nobody knows where), and logs this.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    /// The capture query failed, or its connection to the primary could not
    /// be opened (primary down, connection lost, ...).
    #[error("capture query on the primary failed: {0}")]
    Query(#[source] ProbeError),
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
    /// The primary's pools: the capture connects with the options of the
    /// one in use (the application's role, as rotated credentials left it).
    primary: Arc<PrimaryPools>,
    connector: Arc<dyn ProbeConnector>,
    /// The capture's connection to the primary between queries, and when
    /// it was opened. Only the driver task takes it, for one query at a
    /// time.
    conn: Mutex<Option<(ProbeConn, Instant)>>,
    /// When the tracker last saw the primary down: a connection opened
    /// before that is not used again.
    outages: Arc<Outages>,
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
        connector: Arc<dyn ProbeConnector>,
        outages: Arc<Outages>,
        heartbeat: Option<Arc<Heartbeat>>,
        geometry: WalGeometry,
        timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Capture {
            primary,
            connector,
            conn: Mutex::new(None),
            outages,
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
            // The connection is taken for the query: if it fails or does
            // not answer in time, it is dropped with it. One opened before
            // the primary was last seen down may reach a server the address
            // no longer points to: dropped now.
            let held = self
                .conn
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
                .filter(|(_, opened)| !self.outages.predates_last_outage(opened.elapsed()));
            let result = match tokio::time::timeout(self.timeout, self.on_connection(held)).await {
                Ok(Ok((conn, position))) => {
                    *self.conn.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn);
                    Ok(PrimaryProbe {
                        lsn: position.lsn.round_down_page_header(self.geometry),
                        ..position
                    })
                }
                Ok(Err(error)) => Err(CaptureError::Query(error)),
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
    /// Runs the capture query on `held`, the connection kept from the last
    /// capture, or on a new one. A kept connection may have been cut while
    /// idle (the server restarted, an administrator or a credential
    /// rotation ended its session), which a pool would have noticed before
    /// handing it out: if it fails, the query is sent once more on a new
    /// connection. Returns the connection to keep with the answer.
    async fn on_connection(
        &self,
        held: Option<(ProbeConn, Instant)>,
    ) -> Result<((ProbeConn, Instant), PrimaryProbe), ProbeError> {
        if let Some((mut conn, opened)) = held {
            match self.query(&mut *conn).await {
                Ok(position) => return Ok(((conn, opened), position)),
                Err(error) => {
                    tracing::debug!(%error, "capture connection failed; opening another");
                }
            }
        }
        let opened = Instant::now();
        let mut conn = self.connect().await?;
        let position = self.query(&mut *conn).await?;
        Ok(((conn, opened), position))
    }

    /// Opens the capture's connection to the primary, as the application's
    /// role: the primary pool's options as they are now (rotated
    /// credentials, a rebuilt pool), not the tracker's.
    async fn connect(&self) -> Result<ProbeConn, ProbeError> {
        let options = self.primary.current().connect_options().as_ref().clone();
        self.connector.connect(&ProbeTarget::capture(options)).await
    }

    /// One round trip: the primary's insert position, timeline and epoch,
    /// writing this instance's heartbeat at that position when heartbeats
    /// are in use. A heartbeat that cannot be written at all (no table, no
    /// privilege) is turned off, loudly, and the position asked plainly.
    async fn query(&self, conn: &mut dyn ProbeConnection) -> Result<PrimaryProbe, ProbeError> {
        if let Some(heartbeat) = self.heartbeat.as_deref().filter(|h| h.is_enabled()) {
            match probe::primary(conn, &heartbeat.write_sql(), true).await {
                Err(error) if Heartbeat::is_permanent(error.code()) => heartbeat.disable(&error),
                answer => return answer,
            }
        }
        probe::primary(conn, &probe::primary_position_sql(None), false).await
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::atomic::AtomicUsize;

    use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

    use super::*;
    use crate::pg::probe_conn::{ProbeFuture, Rows};

    /// What the fake primary does with the next query.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Next {
        Answer,
        Fail,
        Hang,
    }

    /// A fake primary: counts connections opened and queries answered on
    /// each, and does what `next` says with each query.
    struct Fake {
        opened: AtomicUsize,
        next: Mutex<Vec<Next>>,
        /// The `application_name` each connection was asked for.
        names: Mutex<Vec<Option<&'static str>>>,
    }

    struct FakeConn {
        fake: Arc<Fake>,
        id: usize,
    }

    impl ProbeConnection for FakeConn {
        fn query<'a>(&'a mut self, _sql: &'a str) -> ProbeFuture<'a, Rows> {
            let next = {
                let mut next = self.fake.next.lock().unwrap();
                if next.is_empty() {
                    Next::Answer
                } else {
                    next.remove(0)
                }
            };
            let id = self.id;
            Box::pin(async move {
                match next {
                    Next::Answer => Ok(vec![vec![
                        // The connection's number as the position, so the
                        // test sees which connection answered.
                        Some(format!("0/{:X}", 0x1000 * id + 0x100)),
                        Some("00000001".to_owned()),
                        Some("7".to_owned()),
                    ]]),
                    Next::Fail => Err(ProbeError::unreachable("connection reset")),
                    Next::Hang => std::future::pending().await,
                }
            })
        }

        fn close(self: Box<Self>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
            Box::pin(async {})
        }
    }

    struct FakeConnector(Arc<Fake>);

    impl ProbeConnector for FakeConnector {
        fn connect<'a>(&'a self, target: &'a ProbeTarget) -> ProbeFuture<'a, ProbeConn> {
            Box::pin(async move {
                assert!(target.is_primary());
                self.0.names.lock().unwrap().push(target.application_name());
                let id = self.0.opened.fetch_add(1, Ordering::SeqCst) + 1;
                Ok(Box::new(FakeConn {
                    fake: Arc::clone(&self.0),
                    id,
                }) as ProbeConn)
            })
        }
    }

    fn capture(fake: &Arc<Fake>, outages: &Arc<Outages>) -> Arc<Capture> {
        let pool = PgPoolOptions::new().connect_lazy_with(
            PgConnectOptions::new()
                .host("127.0.0.1")
                .port(1)
                .application_name("the_app"),
        );
        Capture::new(
            Arc::new(PrimaryPools::new(pool, None)),
            Arc::new(FakeConnector(Arc::clone(fake))),
            Arc::clone(outages),
            None,
            WalGeometry::default(),
            Duration::from_millis(200),
        )
    }

    fn fake(next: &[Next]) -> Arc<Fake> {
        Arc::new(Fake {
            opened: AtomicUsize::new(0),
            next: Mutex::new(next.to_vec()),
            names: Mutex::new(Vec::new()),
        })
    }

    #[tokio::test]
    async fn one_connection_serves_captures_one_after_another() {
        let fake = fake(&[]);
        let capture = capture(&fake, &Outages::new());
        for _ in 0..3 {
            let position = capture.capture().await.unwrap();
            assert_eq!(position.lsn.to_string(), "0/1100");
            assert_eq!((position.timeline, position.epoch), (1, 7));
        }
        assert_eq!(fake.opened.load(Ordering::SeqCst), 1);
        assert_eq!(capture.queries(), 3);
        // The application's connection, not one named as the tracker's.
        assert_eq!(*fake.names.lock().unwrap(), vec![None]);
    }

    #[tokio::test]
    async fn a_failed_query_drops_the_connection_and_the_next_reconnects() {
        // The first capture's query fails on a new connection: an error,
        // and that connection is not kept.
        let fake = fake(&[Next::Fail]);
        let capture = capture(&fake, &Outages::new());
        let error = capture.capture().await.unwrap_err();
        assert!(
            matches!(&error, CaptureError::Query(e) if e.message() == "connection reset"),
            "{error:?}"
        );
        assert!(std::error::Error::source(&error).is_some());
        let position = capture.capture().await.unwrap();
        assert_eq!(position.lsn.to_string(), "0/2100");
        assert_eq!(fake.opened.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_kept_connection_that_was_cut_is_replaced_within_the_capture() {
        let fake = fake(&[]);
        let capture = capture(&fake, &Outages::new());
        assert_eq!(capture.capture().await.unwrap().lsn.to_string(), "0/1100");
        // The kept connection was cut while idle: the capture opens another
        // and answers from it.
        fake.next.lock().unwrap().push(Next::Fail);
        assert_eq!(capture.capture().await.unwrap().lsn.to_string(), "0/2100");
        assert_eq!(fake.opened.load(Ordering::SeqCst), 2);
        assert_eq!(capture.queries(), 2);
    }

    #[tokio::test]
    async fn a_capture_that_times_out_drops_the_stuck_connection() {
        let fake = fake(&[]);
        let capture = capture(&fake, &Outages::new());
        assert_eq!(capture.capture().await.unwrap().lsn.to_string(), "0/1100");
        // The primary freezes: the query on the kept connection never
        // answers, and the capture gives up.
        fake.next.lock().unwrap().push(Next::Hang);
        let error = capture.capture().await.unwrap_err();
        assert!(matches!(error, CaptureError::TimedOut(_)), "{error:?}");
        // The next capture does not wait on the stuck connection again.
        assert_eq!(capture.capture().await.unwrap().lsn.to_string(), "0/2100");
        assert_eq!(fake.opened.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_primary_outage_retires_the_kept_connection() {
        let fake = fake(&[]);
        let outages = Outages::new();
        let capture = capture(&fake, &outages);
        assert_eq!(capture.capture().await.unwrap().lsn.to_string(), "0/1100");
        // The tracker saw the primary down: the address may point to
        // another server now, so the kept connection is not used again.
        tokio::time::sleep(Duration::from_millis(2)).await;
        outages.mark_down();
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(capture.capture().await.unwrap().lsn.to_string(), "0/2100");
        assert_eq!(capture.capture().await.unwrap().lsn.to_string(), "0/2100");
        assert_eq!(fake.opened.load(Ordering::SeqCst), 2);
    }
}

//! What the lab learns from each read beyond its body, measured around the
//! social app instead of inside it, so the example stays an example.
//!
//! Two pieces work together:
//!
//! - [`Instrumented`], a [`Backend`] that wraps the one the app runs on and
//!   notes, for the request it serves, the pool its last read was routed to
//!   and, for a session read that went to the primary because no replica
//!   caught up in time ([`RouteReason::WaitTimedOut`]) or none was
//!   predicted to ([`RouteReason::PredictedLate`]), how long routing it
//!   took: time spent waiting that bought nothing.
//! - [`record_readings`], an axum middleware around the whole app that
//!   gives each request a place for those notes (a task-local: the app's
//!   handlers run in the request's task) and, once the app has answered,
//!   reads `lab_counter` on the noted pool and answers both in headers:
//!   [`COUNTER_HEADER`] and [`WASTED_WAIT_HEADER`]. When the layer captures
//!   the primary's position for the response's token (a write, or a
//!   monotonic read the primary served), the wrapper reads the counter
//!   right before that capture instead: the token promises what the read
//!   saw, so a counter read after the capture could show more than it
//!   covers and make the session's next read look older.
//!
//! A pool is one node, so the counter read after the request is what that
//! node had replayed by the end of the read (it never goes back on one
//! node): the workload compares it across a session's reads to count
//! monotonic-read violations.
//!
//! The wrapper works over the pools of both apps the lab serves: sqlx's
//! `PgPool` (the social app) and `deadpool_postgres::Pool` (the same API
//! over tokio-postgres); see [`CounterPool`].
//!
//! The wrapper also keeps the layer's settings that the layer's self-check
//! hands it ([`Instrumented::settings`]): that is how the lab learns the
//! `max_wait` a layer runs with, its default included.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use read_after_write::backend::{Finding, LayerSettings};
use read_after_write::tokio_postgres::deadpool_postgres;
use read_after_write::{Backend, Bookmark, RouteReason, Routed, Target, WritePosition};
use sqlx::PgPool;

/// The response header that carries `lab_counter` as the node of the
/// request's last read had it.
pub const COUNTER_HEADER: &str = "x-lab-counter";

/// The response header that carries how long a session read waited for a
/// replica before it went to the primary anyway, in microseconds.
pub const WASTED_WAIT_HEADER: &str = "x-lab-wasted-wait-us";

/// A pool the lab reads `lab_counter` on: one node, through the driver the
/// app runs its queries with.
#[derive(Clone)]
pub enum NodePool {
    /// The social app's.
    Sqlx(PgPool),
    /// The tokio-postgres app's.
    TokioPostgres(deadpool_postgres::Pool),
}

impl NodePool {
    /// `lab_counter` as this pool's node has it now; `None` when it cannot
    /// be read.
    async fn read_counter(&self) -> Option<i64> {
        const SQL: &str = "select value from lab_counter";
        match self {
            NodePool::Sqlx(pool) => sqlx::query_as::<_, (i64,)>(SQL)
                .fetch_one(pool)
                .await
                .ok()
                .map(|(value,)| value),
            NodePool::TokioPostgres(pool) => {
                let client = pool.get().await.ok()?;
                let statement = client.prepare_cached(SQL).await.ok()?;
                let row = client.query_one(&statement, &[]).await.ok()?;
                row.try_get(0).ok()
            }
        }
    }
}

/// The pool types [`Instrumented`] can note: those it can read the
/// counter on.
pub trait CounterPool: Send + Sync + 'static {
    /// This pool, to read the counter on later.
    fn node_pool(&self) -> NodePool;
}

impl CounterPool for PgPool {
    fn node_pool(&self) -> NodePool {
        NodePool::Sqlx(self.clone())
    }
}

impl CounterPool for deadpool_postgres::Pool {
    fn node_pool(&self) -> NodePool {
        NodePool::TokioPostgres(self.clone())
    }
}

/// What one request's reads left for [`record_readings`].
#[derive(Default)]
struct Notes {
    /// The pool the last read was routed to.
    pool: Option<NodePool>,
    /// How long a session read waited before it went to the primary anyway.
    wasted_wait: Option<Duration>,
    /// The counter read on `pool` before the layer captured the primary's
    /// position for this request's token, when it did.
    counter: Option<i64>,
}

tokio::task_local! {
    static NOTES: RefCell<Notes>;
}

/// Notes a routed read for the request being served; nothing outside one
/// (the layer's self-check, say).
fn note<P: CounterPool>(routed: &Routed<'_, P>, wasted_wait: Option<Duration>) {
    let _ = NOTES.try_with(|notes| {
        let mut notes = notes.borrow_mut();
        notes.pool = Some(routed.pool.node_pool());
        if wasted_wait.is_some() {
            notes.wasted_wait = wasted_wait;
        }
    });
}

/// How long a session read that took `waited` to route wasted: all of it
/// when it went to the primary because no replica caught up in time.
fn wasted<P>(routed: &Routed<'_, P>, waited: Duration) -> Option<Duration> {
    let in_vain = routed.target == Target::Primary
        && matches!(
            routed.reason,
            RouteReason::WaitTimedOut | RouteReason::PredictedLate
        );
    in_vain.then_some(waited)
}

/// A backend that routes exactly as `B` does and notes each read for
/// [`record_readings`] (see the [module docs](self)).
pub struct Instrumented<B> {
    inner: B,
    settings: Arc<Mutex<Option<LayerSettings>>>,
}

impl<B> Instrumented<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        Instrumented {
            inner,
            settings: Arc::default(),
        }
    }

    /// A handle on the settings the layer's self-check
    /// ([`ReadAfterWriteLayer::check`](read_after_write::ReadAfterWriteLayer::check))
    /// last handed this backend; `None` before it ran.
    pub fn settings(&self) -> SettingsSeen {
        SettingsSeen(Arc::clone(&self.settings))
    }
}

/// The settings a layer's self-check handed an [`Instrumented`] backend.
#[derive(Clone)]
pub struct SettingsSeen(Arc<Mutex<Option<LayerSettings>>>);

impl SettingsSeen {
    /// The layer's `max_wait`, once its self-check ran.
    pub fn max_wait(&self) -> Option<Duration> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|settings| settings.max_wait)
    }
}

impl<B> Backend for Instrumented<B>
where
    B: Backend,
    B::Pool: CounterPool,
{
    type Pool = B::Pool;
    type Error = B::Error;

    fn primary(&self) -> &B::Pool {
        // Writes and critical reads: nothing for the lab to note.
        self.inner.primary()
    }

    fn eventual(&self) -> Routed<'_, B::Pool> {
        let routed = self.inner.eventual();
        note(&routed, None);
        routed
    }

    fn eventual_within(&self, max_staleness: Duration) -> Routed<'_, B::Pool> {
        let routed = self.inner.eventual_within(max_staleness);
        note(&routed, None);
        routed
    }

    async fn session(&self, required: WritePosition, max_wait: Duration) -> Routed<'_, B::Pool> {
        let started = Instant::now();
        let routed = self.inner.session(required, max_wait).await;
        note(&routed, wasted(&routed, started.elapsed()));
        routed
    }

    fn cluster_id(&self) -> Option<u64> {
        self.inner.cluster_id()
    }

    async fn monotonic(
        &self,
        bookmark: Option<Bookmark>,
        max_wait: Option<Duration>,
        max_staleness: Option<Duration>,
    ) -> Routed<'_, B::Pool> {
        // Ready at first poll whenever the inner future is: an eventual
        // read with monotonic reads must not wait.
        let started = Instant::now();
        let routed = self
            .inner
            .monotonic(bookmark, max_wait, max_staleness)
            .await;
        let wasted = max_wait.and_then(|_| wasted(&routed, started.elapsed()));
        note(&routed, wasted);
        routed
    }

    async fn write_position(&self) -> Result<WritePosition, B::Error> {
        // A read this request made is measured before the capture: the
        // token covers what the read saw, not what the node had once the
        // response was on its way, so a counter read after the capture
        // could report a value the token never promised.
        let pool = NOTES
            .try_with(|notes| {
                let notes = notes.borrow();
                if notes.counter.is_some() {
                    None
                } else {
                    notes.pool.clone()
                }
            })
            .ok()
            .flatten();
        if let Some(pool) = pool {
            if let Some(value) = pool.read_counter().await {
                let _ = NOTES.try_with(|notes| notes.borrow_mut().counter = Some(value));
            }
        }
        self.inner.write_position().await
    }

    async fn diagnose(&self, settings: &LayerSettings) -> Vec<Finding> {
        *self.settings.lock().unwrap_or_else(PoisonError::into_inner) = Some(*settings);
        self.inner.diagnose(settings).await
    }
}

/// The axum middleware (for `axum::middleware::from_fn`) around the whole
/// app that answers what the request's reads noted (see the
/// [module docs](self)).
pub async fn record_readings(request: Request, next: Next) -> Response {
    let (mut response, notes) = NOTES
        .scope(RefCell::new(Notes::default()), async {
            let response = next.run(request).await;
            (response, NOTES.with(RefCell::take))
        })
        .await;
    let counter = match (notes.counter, &notes.pool) {
        (Some(value), _) => Some(value),
        (None, Some(pool)) => pool.read_counter().await,
        (None, None) => None,
    };
    // A read without a counter is counted but not checked.
    if let Some(value) = counter {
        response
            .headers_mut()
            .insert(COUNTER_HEADER, HeaderValue::from(value));
    }
    if let Some(waited) = notes.wasted_wait {
        let micros = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        response
            .headers_mut()
            .insert(WASTED_WAIT_HEADER, HeaderValue::from(micros));
    }
    response
}

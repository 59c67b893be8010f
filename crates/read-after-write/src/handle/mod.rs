//! The per-request database handle the layer puts into request extensions.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use smallvec::SmallVec;

use crate::backend::{Backend, RouteReason, Routed, Target};
use crate::config::Shared;
use crate::token::UserId;

mod carry;

pub(crate) use crate::request::{ClusterState, LastRoute, RequestState, Required, Unread};
pub use crate::request::{Route, TokenOutcome};

/// The database handle for one request: pick the pool by the consistency the
/// read needs.
///
/// [`ReadAfterWriteLayer`](crate::ReadAfterWriteLayer) inserts one into every
/// request's extensions. Take it out with `req.extensions().get::<Db<B>>()`,
/// or with the axum extractor (feature `axum`). Clones share the request's
/// state, so a write through any clone marks the request as writing.
///
/// | method | goes to | use it for |
/// |---|---|---|
/// | [`read`](Self::read) | a replica proven to hold the user's last write, else the primary, waiting at most `max_wait` ([how routing decides](crate::guide::routing)) | the user's own data |
/// | [`eventual`](Self::eventual) | any healthy replica | other users' data, feeds |
/// | [`primary`](Self::primary) | the primary | critical reads (balances, uniqueness checks) |
/// | [`write`](Self::write) | the primary, and marks the request as writing | `INSERT`, `UPDATE`, `DELETE` |
///
/// `read` is async, since it may wait for a replica: `.fetch_one(db.read().await)`.
/// Without the `.await`, sqlx's error is that `Executor` "is not implemented
/// for `impl Future<Output = &Pool>`". The other three return the pool at
/// once.
///
/// # Example
///
/// ```
/// use read_after_write::{Backend, Db};
///
/// async fn show_profile<B: Backend>(db: &Db<B>) {
///     let pool = db.read().await; // sees this user's own last write
///     // sqlx::query("select ...").fetch_one(pool).await ...
///     # let _ = pool;
/// }
/// ```
pub struct Db<B: Backend> {
    shared: Arc<Shared<B>>,
    state: Arc<RequestState>,
    /// Which of the layer's clusters this handle reads and writes.
    cluster: usize,
}

impl<B: Backend> Db<B> {
    pub(crate) fn new(shared: Arc<Shared<B>>, state: Arc<RequestState>) -> Self {
        Db {
            shared,
            state,
            cluster: 0,
        }
    }

    /// The handle for the layer's cluster called `name` (added with
    /// [`ReadAfterWriteLayer::cluster`](crate::ReadAfterWriteLayer::cluster);
    /// the first is [`DEFAULT_CLUSTER`](crate::middleware::DEFAULT_CLUSTER)),
    /// sharing this request's state: a write through it is covered by the
    /// response's token, as a bookmark of that cluster. `None` for a name
    /// the layer does not know.
    ///
    /// ```
    /// use read_after_write::{Backend, Db};
    ///
    /// async fn place_order<B: Backend>(db: &Db<B>) {
    ///     let Some(orders) = db.cluster("orders") else { return };
    ///     let pool = orders.write(); // INSERT INTO orders ...
    ///     # let _ = pool;
    /// }
    /// ```
    pub fn cluster(&self, name: &str) -> Option<Db<B>> {
        let cluster = self.shared.clusters.iter().position(|c| c.name == name)?;
        Some(Db {
            shared: Arc::clone(&self.shared),
            state: Arc::clone(&self.state),
            cluster,
        })
    }

    /// The name of the cluster this handle uses.
    pub fn cluster_name(&self) -> &str {
        &self.shared.clusters[self.cluster].name
    }

    fn target(&self) -> &B {
        &self.shared.clusters[self.cluster].backend
    }

    fn own(&self) -> &ClusterState {
        &self.state.clusters[self.cluster]
    }

    /// A session-consistent read: a node that has everything this user wrote.
    ///
    /// With a valid token, a replica proven to hold the token's write, else
    /// the primary, waiting at most the layer's `max_wait` for one (the
    /// rule: [how routing decides](crate::guide::routing)). Without a token,
    /// any healthy replica. After this request has itself written, the
    /// primary.
    ///
    /// # `read()` is async: `.await` it
    ///
    /// It may wait for a replica to catch up, so it returns a future:
    /// `.fetch_one(db.read().await)`. Without the `.await`, sqlx reports
    /// that "the trait `Executor<'_>` is not implemented for `impl
    /// Future<Output = &Pool>`" (or `&PgPool`): the fix is the missing
    /// `.await`, not a conversion. [`eventual`](Self::eventual),
    /// [`primary`](Self::primary) and [`write`](Self::write) never wait and
    /// return the pool directly.
    ///
    /// ```
    /// use read_after_write::{Backend, Db};
    ///
    /// async fn my_posts<B: Backend>(db: &Db<B>) {
    ///     let pool: &B::Pool = db.read().await; // not `db.read()`
    ///     // sqlx::query("select ...").fetch_all(db.read().await).await ...
    ///     # let _ = pool;
    /// }
    /// ```
    #[must_use = "`read()` returns (a future of) the pool to query: `.fetch_one(db.read().await)`"]
    pub async fn read(&self) -> &B::Pool {
        self.read_within(self.shared.max_wait).await
    }

    /// [`read`](Self::read) with its own bound on the wait instead of the
    /// layer's `max_wait`. Async like `read`: `.await` it.
    #[must_use = "`read_within()` returns (a future of) the pool to query: `.fetch_one(db.read_within(wait).await)`"]
    pub async fn read_within(&self, max_wait: Duration) -> &B::Pool {
        if self.shared.monotonic() {
            return self
                .monotonic(Some(max_wait), self.shared.max_staleness)
                .await;
        }
        let backend = self.target();
        let routed = if self.own().wrote() {
            Routed::primary(backend.primary(), RouteReason::WroteThisRequest)
        } else {
            match self.own().required {
                // Nothing to wait for: an eventual read, so within the
                // layer's `max_staleness` like `eventual()`.
                Required::Nothing => {
                    let mut routed = match self.shared.max_staleness {
                        Some(bound) => backend.eventual_within(bound),
                        None => backend.eventual(),
                    };
                    if routed.target == Target::Replica {
                        routed.reason = RouteReason::NoToken;
                    }
                    routed
                }
                Required::Position(bookmark) => backend.session(bookmark.position, max_wait).await,
                Required::Primary(reason) => Routed::primary(backend.primary(), reason),
            }
        };
        self.record(routed)
    }

    /// A read with monotonic reads on: never an older state than the
    /// session saw before (see [`bookmark`](crate::bookmark)). `max_wait`
    /// is `None` for [`eventual`](Self::eventual), which never waits;
    /// `max_staleness` bounds how far behind the session's replica may be.
    async fn monotonic(
        &self,
        max_wait: Option<Duration>,
        max_staleness: Option<Duration>,
    ) -> &B::Pool {
        let own = self.own();
        let backend = self.target();
        let routed = if own.wrote() {
            Routed::primary(backend.primary(), RouteReason::WroteThisRequest)
        } else if own.read_primary() {
            Routed::primary(backend.primary(), RouteReason::ReadPrimaryThisRequest)
        } else if let Required::Primary(reason) = own.required {
            Routed::primary(backend.primary(), reason)
        } else {
            let routed = backend
                .monotonic(own.bookmark(), max_wait, max_staleness)
                .await;
            if routed.target == Target::Replica && own.bookmark().is_none() && max_wait.is_some() {
                Routed {
                    reason: RouteReason::NoToken,
                    ..routed
                }
            } else {
                routed
            }
        };
        self.note_monotonic(&routed);
        self.record(routed)
    }

    /// Keeps what a monotonic read saw: the replica it may stay on, or,
    /// for a read no bookmark can describe, that the response must capture
    /// the primary's position.
    fn note_monotonic(&self, routed: &Routed<'_, B::Pool>) {
        let own = self.own();
        match (routed.target, routed.bookmark) {
            // Routed from the session's current bookmark, so it replaces it.
            (Target::Replica, Some(bookmark)) => {
                *own.earned.lock().unwrap_or_else(PoisonError::into_inner) = Some(bookmark);
            }
            // The primary because the session's replica lagged: the replica
            // it may come back to once it replays what the primary showed.
            (Target::Primary, Some(bookmark)) => {
                if let Some(tag) = bookmark.replica {
                    own.kept.store(tag.get(), Ordering::Relaxed);
                }
                own.read_primary.store(true, Ordering::Relaxed);
            }
            // The primary, or a replica the backend cannot name.
            _ => own.read_primary.store(true, Ordering::Relaxed),
        }
    }

    /// An eventually consistent read from any healthy replica (the primary
    /// if none is healthy), whatever the token says, within the layer's
    /// [`max_staleness`](crate::ReadAfterWriteLayer::max_staleness) if set.
    ///
    /// With [`Consistency::Monotonic`](crate::Consistency::Monotonic) it
    /// still never shows the session an older state than it saw: the
    /// replica the session read last, or one that has replayed what its
    /// token requires, else the primary. It never waits.
    pub fn eventual(&self) -> &B::Pool {
        self.eventual_bounded(self.shared.max_staleness)
    }

    fn eventual_bounded(&self, max_staleness: Option<Duration>) -> &B::Pool {
        if self.shared.monotonic() {
            // Never waits, so the future is ready at its first poll. A
            // backend that breaks that rule gets the primary, never a panic.
            if let Some(pool) = poll_once(self.monotonic(None, max_staleness)) {
                return pool;
            }
            self.own().read_primary.store(true, Ordering::Relaxed);
            return self.record(Routed::primary(
                self.target().primary(),
                RouteReason::LeftReplica,
            ));
        }
        let backend = self.target();
        self.record(match max_staleness {
            Some(bound) => backend.eventual_within(bound),
            None => backend.eventual(),
        })
    }

    /// Like [`eventual`](Self::eventual), from a replica at most
    /// `max_staleness` behind (the primary when none is), whatever the
    /// layer's [default](crate::ReadAfterWriteLayer::max_staleness); with
    /// monotonic reads, the session leaves a replica further behind,
    /// through the primary.
    ///
    /// ```
    /// use read_after_write::{Backend, Db};
    /// use std::time::Duration;
    ///
    /// async fn feed<B: Backend>(db: &Db<B>) {
    ///     let pool = db.eventual_within(Duration::from_secs(2)); // a feed may lag, not by minutes
    ///     # let _ = pool;
    /// }
    /// ```
    pub fn eventual_within(&self, max_staleness: Duration) -> &B::Pool {
        self.eventual_bounded(Some(max_staleness))
    }

    /// A critical read from the primary. Does not mark the request as
    /// writing.
    pub fn primary(&self) -> &B::Pool {
        if self.shared.monotonic() {
            self.own().read_primary.store(true, Ordering::Relaxed);
        }
        self.record(Routed::primary(
            self.target().primary(),
            RouteReason::Critical,
        ))
    }

    /// The primary, for writes. Marks the request as writing, so the
    /// response carries a fresh token.
    pub fn write(&self) -> &B::Pool {
        self.mark_written();
        self.record(Routed::primary(self.target().primary(), RouteReason::Write))
    }

    /// Marks the request as writing without handing out a pool, for writes
    /// made through another path (a queue consumer, a stored procedure
    /// called elsewhere).
    pub fn mark_written(&self) {
        self.own().wrote.store(true, Ordering::Relaxed);
    }

    /// What became of the request's token.
    pub fn token_outcome(&self) -> TokenOutcome {
        self.state.token
    }

    /// Whom this request's tokens are for: the user the handler bound it
    /// to with [`bind_user`](Self::bind_user) (the last binding of any
    /// clone wins), else the requester's identity as the layer's identity
    /// function saw it (the anonymous id where anonymous tokens are
    /// allowed). `None`: no one, so no token is issued.
    ///
    /// ```
    /// use read_after_write::{Backend, Db};
    ///
    /// fn audit<B: Backend>(db: &Db<B>) {
    ///     if let Some(user) = db.user() {
    ///         tracing::info!(?user, "acting for");
    ///     }
    /// }
    /// ```
    pub fn user(&self) -> Option<UserId> {
        self.state.user()
    }

    /// Binds this request to `user`, for a handler that establishes who
    /// the requester is: sign-up, login, switching accounts.
    ///
    /// The layer's identity function runs before the handler, so a handler
    /// that creates a user or signs one in writes while the request is
    /// anonymous (or someone else's). Without a binding the response's
    /// token is not that user's (or there is none), and their next page may
    /// read a replica that lacks the row just written. Once bound, the
    /// response's token is for `user` and covers every write of the
    /// request, before or after the binding, as do
    /// [`forward_header`](Self::forward_header) and
    /// [`requirement`](Self::requirement).
    ///
    /// What the request's tokens promised goes with the binding when the
    /// request was anonymous (or had no identity): the same browser, and
    /// promises only grow, so such a request issues a token for `user` even
    /// if it did not write. When it was another named user's, their
    /// promises stay theirs and are dropped. Reads later in the same request
    /// still route by the tokens it carried.
    ///
    /// Every clone of the handle shares the binding; the last call wins.
    /// Binding the anonymous (empty) id binds the anonymous user where
    /// anonymous tokens are allowed, and no one otherwise (no token is
    /// issued).
    ///
    /// ```no_run
    /// use read_after_write::pg::PgDb;
    /// use read_after_write::UserId;
    ///
    /// /// `POST /signup`: the request has no identity yet.
    /// async fn sign_up(db: PgDb, name: String) -> Result<i64, sqlx::Error> {
    ///     let (id,): (i64,) = sqlx::query_as("insert into users (name) values ($1) returning id")
    ///         .bind(&name)
    ///         .fetch_one(db.write())
    ///         .await?;
    ///     // The response's token is this new user's: their profile page,
    ///     // read with db.read(), finds the row.
    ///     db.bind_user(UserId::from(id));
    ///     Ok(id) // and set the session cookie your authentication reads
    /// }
    /// ```
    pub fn bind_user(&self, user: UserId) {
        self.state.bind(self.shared.admit(Some(user)));
    }

    /// The backend, for what the handle does not cover.
    pub fn backend(&self) -> &B {
        self.target()
    }

    /// Where this request's last routed database access went (through any
    /// clone of this handle): the node, primary or replica, and why. `None`
    /// before the first.
    ///
    /// For logs and for handlers that explain themselves; the debug header
    /// ([`debug_header`](crate::ReadAfterWriteLayer::debug_header)) shows
    /// the same to clients. Kept for every request at the cost of copying
    /// the node's name, so calling it allocates but routing does not.
    ///
    /// ```
    /// use read_after_write::{Backend, Db, RouteReason, Target};
    ///
    /// async fn show_profile<B: Backend>(db: &Db<B>) {
    ///     let _pool = db.read().await;
    ///     if let Some(route) = db.last_route() {
    ///         if route.target == Target::Primary && route.reason == RouteReason::WaitTimedOut {
    ///             tracing::info!(node = %route.node, "no replica caught up within max_wait");
    ///         }
    ///     }
    /// }
    /// ```
    pub fn last_route(&self) -> Option<Route> {
        self.state
            .last_route
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(LastRoute::route)
    }

    fn record<'a>(&self, routed: Routed<'a, B::Pool>) -> &'a B::Pool {
        crate::telemetry::count_read(routed.target, routed.reason);
        tracing::debug!(
            target: "read_after_write::route",
            node = routed.node,
            target_kind = routed.target.as_str(),
            reason = routed.reason.as_str(),
            "routed database access"
        );
        let mut last = self
            .state
            .last_route
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match &mut *last {
            // Reuses the buffer: a name that once spilled to the heap keeps
            // its allocation for the rest of the request.
            Some(last) => {
                last.target = routed.target;
                last.reason = routed.reason;
                last.node.clear();
                last.node.extend_from_slice(routed.node.as_bytes());
            }
            None => {
                *last = Some(LastRoute {
                    target: routed.target,
                    reason: routed.reason,
                    node: SmallVec::from_slice(routed.node.as_bytes()),
                })
            }
        }
        drop(last);
        routed.pool
    }
}

impl<B: Backend> Clone for Db<B> {
    fn clone(&self) -> Self {
        Db {
            shared: Arc::clone(&self.shared),
            state: Arc::clone(&self.state),
            cluster: self.cluster,
        }
    }
}

impl<B: Backend> fmt::Debug for Db<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Db")
            .field("cluster", &self.cluster_name())
            .field("required", &self.own().required)
            .field("token", &self.state.token)
            .field("user", &self.state.user())
            .field("wrote", &self.own().wrote())
            .field("time_window", &self.shared.consistency)
            .finish_non_exhaustive()
    }
}

/// Polls a future once: its output if it is ready, else `None` (it is
/// dropped). Used where a sync method shares its routing with an async one
/// whose waiting branch it never takes.
fn poll_once<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

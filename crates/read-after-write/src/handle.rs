//! The per-request database handle the layer puts into request extensions.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use smallvec::SmallVec;

use crate::backend::{Backend, RouteReason, Routed, Target};
use crate::middleware::{Mode, Shared};
use crate::position::WritePosition;
use crate::requirement::Requirement;
use crate::token::{TokenError, UserId};

/// What the request's token said, after every check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenOutcome {
    /// The request carried no token.
    Absent,
    /// A token verified and belongs to the requester.
    Valid,
    /// A token was refused; it is treated as absent.
    Rejected(TokenError),
    /// A token verified but belongs to another user; treated as absent.
    OtherUser,
    /// A token came with a request that has no identity while anonymous
    /// tokens are not allowed; treated as absent.
    NoIdentity,
}

impl TokenOutcome {
    /// The `outcome` label on `read_after_write_tokens_total`.
    ///
    /// ```
    /// use read_after_write::{TokenError, TokenOutcome};
    ///
    /// assert_eq!(TokenOutcome::Rejected(TokenError::Expired).as_str(), "expired");
    /// assert_eq!(TokenOutcome::OtherUser.as_str(), "other_user");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            TokenOutcome::Absent => "absent",
            TokenOutcome::Valid => "valid",
            TokenOutcome::Rejected(reason) => reason.as_str(),
            TokenOutcome::OtherUser => "other_user",
            TokenOutcome::NoIdentity => "no_identity",
        }
    }
}

/// What a verified token asks of this request's session reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Required {
    /// No valid token: session reads are eventual.
    Nothing,
    /// Read from a node that has replayed this position.
    Position(WritePosition),
    /// Read from the primary: in time-window mode the user wrote recently;
    /// in position mode the token pins the user to the primary because the
    /// position of their last write is unknown (its capture failed).
    Primary,
}

/// Per-request state shared by the handle's clones and the response future.
pub(crate) struct RequestState {
    pub(crate) required: Required,
    pub(crate) user: Option<UserId>,
    pub(crate) token: TokenOutcome,
    /// Set by [`Db::write`]; read once the handler has returned. Relaxed is
    /// enough: the handler's future completes before the response future
    /// reads it, on the same task.
    pub(crate) wrote: AtomicBool,
    /// The last routing decision, for [`Db::last_route`] and the debug
    /// header. Written on every routed access, so it holds no `String`: the
    /// node's name is copied into an inline buffer (no allocation for names
    /// up to [`INLINE_NODE_NAME`] bytes).
    pub(crate) last_route: Mutex<Option<LastRoute>>,
}

/// Node names up to this many bytes are kept without allocating.
const INLINE_NODE_NAME: usize = 32;

/// A routing decision as [`RequestState`] keeps it.
pub(crate) struct LastRoute {
    target: Target,
    reason: RouteReason,
    /// The node's name, UTF-8 copied from a `&str`.
    node: SmallVec<[u8; INLINE_NODE_NAME]>,
}

impl LastRoute {
    /// The node's name. Always the `&str` it was copied from; the fallback
    /// is never taken.
    pub(crate) fn node(&self) -> &str {
        std::str::from_utf8(&self.node).unwrap_or("?")
    }

    pub(crate) fn reason(&self) -> RouteReason {
        self.reason
    }

    fn route(&self) -> Route {
        Route {
            node: self.node().to_owned(),
            target: self.target,
            reason: self.reason,
        }
    }
}

/// Where a request's database access went: its node, the kind of node, and
/// why. Returned by [`Db::last_route`].
///
/// ```
/// use read_after_write::handle::Route;
/// use read_after_write::{RouteReason, Target};
///
/// fn explain(route: &Route) -> String {
///     match (route.target, route.reason) {
///         (Target::Primary, RouteReason::WaitTimedOut) => {
///             format!("no replica caught up in time; read {}", route.node)
///         }
///         _ => route.to_string(),
///     }
/// }
/// # let _ = explain;
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Route {
    /// The node's name, as the backend calls it (`primary`, `replica-1`).
    pub node: String,
    /// Primary or replica.
    pub target: Target,
    /// Why it went there.
    pub reason: RouteReason,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node={}; target={}; reason={}",
            self.node, self.target, self.reason
        )
    }
}

impl RequestState {
    pub(crate) fn new(
        required: Required,
        user: Option<UserId>,
        token: TokenOutcome,
        wrote: bool,
    ) -> Self {
        RequestState {
            required,
            user,
            token,
            wrote: AtomicBool::new(wrote),
            last_route: Mutex::new(None),
        }
    }

    pub(crate) fn wrote(&self) -> bool {
        self.wrote.load(Ordering::Relaxed)
    }

    fn mark_written(&self) {
        self.wrote.store(true, Ordering::Relaxed);
    }
}

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
/// | [`read`](Self::read) | a replica that has replayed the user's last write; else waits up to `max_wait`; else the primary | the user's own data |
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
}

impl<B: Backend> Db<B> {
    pub(crate) fn new(shared: Arc<Shared<B>>, state: Arc<RequestState>) -> Self {
        Db { shared, state }
    }

    /// A session-consistent read: a node that has everything this user wrote.
    ///
    /// With a valid token, a replica that has replayed the token's position;
    /// if none has, waits up to the layer's `max_wait` for one, then the
    /// primary. Without a token, any healthy replica. After this request has
    /// itself written, the primary.
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
        let backend = &*self.shared.backend;
        let routed = if self.state.wrote() {
            Routed::primary(backend.primary(), RouteReason::WroteThisRequest)
        } else {
            match self.state.required {
                Required::Nothing => {
                    let mut routed = backend.eventual();
                    if routed.target == Target::Replica {
                        routed.reason = RouteReason::NoToken;
                    }
                    routed
                }
                Required::Position(position) => backend.session(position, max_wait).await,
                Required::Primary => {
                    let reason = match self.shared.mode {
                        Mode::TimeWindow(_) => RouteReason::TimeWindow,
                        Mode::Position => RouteReason::PositionUnknown,
                    };
                    Routed::primary(backend.primary(), reason)
                }
            }
        };
        self.record(routed)
    }

    /// An eventually consistent read from any healthy replica (the primary
    /// if none is healthy), whatever the token says.
    pub fn eventual(&self) -> &B::Pool {
        self.record(self.shared.backend.eventual())
    }

    /// A critical read from the primary. Does not mark the request as
    /// writing.
    pub fn primary(&self) -> &B::Pool {
        self.record(Routed::primary(
            self.shared.backend.primary(),
            RouteReason::Critical,
        ))
    }

    /// The primary, for writes. Marks the request as writing, so the
    /// response carries a fresh token.
    pub fn write(&self) -> &B::Pool {
        self.mark_written();
        self.record(Routed::primary(
            self.shared.backend.primary(),
            RouteReason::Write,
        ))
    }

    /// Marks the request as writing without handing out a pool, for writes
    /// made through another path (a queue consumer, a stored procedure
    /// called elsewhere).
    pub fn mark_written(&self) {
        self.state.mark_written();
    }

    /// The token header to send to a downstream service that reads this
    /// user's data: a token for this request's user covering everything the
    /// request wrote so far (see [`requirement`](Self::requirement)), or
    /// `None` when there is nothing to require or no identity.
    /// [`ForwardTokenLayer`](crate::forward::ForwardTokenLayer) calls this
    /// for you; use it directly where that layer cannot see the request (a
    /// spawned task).
    ///
    /// ```no_run
    /// # async fn handler(db: read_after_write::pg::PgDb) {
    /// let mut call = http::Request::get("http://feed-service/feed").body(()).unwrap();
    /// if let Some((name, value)) = db.forward_header().await {
    ///     call.headers_mut().insert(name, value);
    /// }
    /// # }
    /// ```
    pub async fn forward_header(&self) -> Option<(http::HeaderName, http::HeaderValue)> {
        let user = self.state.user.clone()?;
        let position = match self.requirement().await {
            Requirement::Nothing => return None,
            Requirement::Position(position) => position,
            Requirement::Primary => WritePosition::default(),
        };
        let token = crate::middleware::mint_token(&self.shared, user, position);
        let name = self.shared.token_header.clone().unwrap_or_else(|| {
            http::HeaderName::from_static(crate::middleware::DEFAULT_TOKEN_HEADER)
        });
        let value = http::HeaderValue::from_str(&token).ok()?;
        Some((name, value))
    }

    /// What reads acting for this request's user must see, to hand to work
    /// done elsewhere: a background job's payload, a queue message. Use it
    /// after the request's writes, with [`Requirement::route`] on the other
    /// side.
    ///
    /// When the request wrote, this captures the primary's position now
    /// (one query, shared with concurrent writers), so it covers the writes
    /// committed before the call; the response captures again for its own
    /// token (a capture cannot tell whether a write handed out before it
    /// committed before it, so none is reused). Otherwise it is what the
    /// request's token required. A lost capture gives
    /// [`Requirement::Primary`], as it pins the user's own token.
    ///
    /// ```no_run
    /// # async fn handler(db: read_after_write::pg::PgDb) -> Result<(), sqlx::Error> {
    /// let (post_id,): (i64,) =
    ///     sqlx::query_as("insert into posts (user_id, content) values (1, 'hi') returning id")
    ///         .fetch_one(db.write())
    ///         .await?;
    /// let requirement = db.requirement().await;
    /// sqlx::query("insert into jobs (post_id, requirement) values ($1, $2)")
    ///     .bind(post_id)
    ///     .bind(requirement.to_string())
    ///     .execute(db.write())
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn requirement(&self) -> Requirement {
        let carried = match self.state.required {
            Required::Nothing => Requirement::Nothing,
            Required::Position(position) => Requirement::Position(position),
            Required::Primary => Requirement::Primary,
        };
        if !self.state.wrote() {
            return carried;
        }
        if let Mode::TimeWindow(_) = self.shared.mode {
            return Requirement::Primary;
        }
        let written = crate::middleware::capture_position(&self.shared).await;
        carried.after_write(written)
    }

    /// The position this request's session reads must see, if its token
    /// verified.
    pub fn required_position(&self) -> Option<WritePosition> {
        match self.state.required {
            Required::Position(position) => Some(position),
            Required::Nothing | Required::Primary => None,
        }
    }

    /// What became of the request's token.
    pub fn token_outcome(&self) -> TokenOutcome {
        self.state.token
    }

    /// The requester's identity as the layer's identity function saw it.
    pub fn user(&self) -> Option<&UserId> {
        self.state.user.as_ref()
    }

    /// The backend, for what the handle does not cover.
    pub fn backend(&self) -> &B {
        &self.shared.backend
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
        }
    }
}

impl<B: Backend> fmt::Debug for Db<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Db")
            .field("required", &self.state.required)
            .field("token", &self.state.token)
            .field("user", &self.state.user)
            .field("wrote", &self.state.wrote())
            .field(
                "time_window",
                &matches!(self.shared.mode, Mode::TimeWindow(_)),
            )
            .finish_non_exhaustive()
    }
}

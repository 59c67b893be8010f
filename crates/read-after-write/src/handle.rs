//! The per-request database handle the layer puts into request extensions.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::backend::{Backend, RouteReason, Routed, Target};
use crate::middleware::{Mode, Shared};
use crate::position::WritePosition;
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
    /// The last routing decision, kept only when the debug header is on.
    pub(crate) last_route: Mutex<Option<(String, RouteReason)>>,
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
    pub async fn read(&self) -> &B::Pool {
        self.read_within(self.shared.max_wait).await
    }

    /// [`read`](Self::read) with its own bound on the wait instead of the
    /// layer's `max_wait`.
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
        self.state.wrote.store(true, Ordering::Relaxed);
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

    fn record<'a>(&self, routed: Routed<'a, B::Pool>) -> &'a B::Pool {
        crate::telemetry::count_read(routed.target, routed.reason);
        tracing::debug!(
            target: "read_after_write::route",
            node = routed.node,
            target_kind = routed.target.as_str(),
            reason = routed.reason.as_str(),
            "routed database access"
        );
        if self.shared.debug_header.is_some() {
            if let Ok(mut last) = self.state.last_route.lock() {
                *last = Some((routed.node.to_owned(), routed.reason));
            }
        }
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

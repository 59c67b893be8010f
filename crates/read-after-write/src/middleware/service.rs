use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::{transport, ResponseFuture, Shared, MAX_MACS_PER_REQUEST};
use crate::backend::Backend;
use crate::bookmark::Bookmarks;
use crate::handle::{ClusterState, Db, RequestState, Required, TokenOutcome};
use crate::token::{Checked, MacBudget, TokenBuffer, TokenError, UnverifiedToken, UserId};

/// Middleware that gives each request a [`Db`] handle bound to the
/// requester's last write, and issues a token when the request writes.
///
/// Built by [`ReadAfterWriteLayer`](crate::ReadAfterWriteLayer).
pub struct ReadAfterWrite<S, B: Backend> {
    inner: S,
    shared: Arc<Shared<B>>,
}

impl<S, B: Backend> ReadAfterWrite<S, B> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<B>>) -> Self {
        ReadAfterWrite { inner, shared }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, B: Backend> Clone for ReadAfterWrite<S, B> {
    fn clone(&self) -> Self {
        ReadAfterWrite {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, B: Backend> fmt::Debug for ReadAfterWrite<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadAfterWrite")
            .field("inner", &self.inner)
            .field("config", &self.shared)
            .finish()
    }
}

impl<S, B, ReqBody, ResBody> Service<Request<ReqBody>> for ReadAfterWrite<S, B>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    B: Backend,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, B, ResBody>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        let shared = &self.shared;
        let user = shared.identify(&parts);
        let read = read_token(shared, &parts.headers, user.as_ref());
        let token = read.outcome;
        if token != TokenOutcome::Absent {
            crate::telemetry::count_token(token);
            if token != TokenOutcome::Valid {
                tracing::debug!(outcome = token.as_str(), "affinity token ignored");
            }
        }
        let writes_by_method = shared.writes_on_unsafe_methods && !parts.method.is_safe();
        let clusters = shared
            .clusters
            .iter()
            .map(|cluster| ClusterState::new(read.required(shared, cluster.id), writes_by_method))
            .collect();
        let state = Arc::new(RequestState::new(
            user,
            token,
            read.carried,
            read.expires_at,
            clusters,
        ));
        let db = Db::new(Arc::clone(shared), Arc::clone(&state));
        let forward = shared
            .forward_tokens
            .then(|| Arc::new(db.clone()) as Arc<dyn crate::forward::TokenSource>);
        parts.extensions.insert(db);
        let future = self.inner.call(Request::from_parts(parts, body));
        ResponseFuture::new(future, Arc::clone(shared), state, forward)
    }
}

/// Finds, verifies and binds the request's token. Every failure is an
/// outcome, never an error: a bad token is treated as absent.
///
/// Every candidate goes through the cheap checks; only one that names the
/// requester and would beat the best token so far costs a MAC, at most
/// [`MAX_MACS_PER_REQUEST`] of them. A browser can hold a stale host-only
/// cookie beside a fresh domain cookie, or a client a stale header beside a
/// fresh cookie: the valid token that promises the most decides.
/// What a request's tokens said, all of them checked and merged.
struct ReadTokens {
    outcome: TokenOutcome,
    /// Every valid token's bookmarks, merged cluster by cluster.
    carried: Bookmarks,
    /// The latest expiry among the valid tokens (0: none).
    expires_at: u64,
    /// Nothing proves what the user wrote last: only the primary is safe.
    unsafe_to_route: bool,
}

impl ReadTokens {
    /// What the tokens ask of the cluster `id`'s session reads.
    fn required<B>(&self, shared: &Shared<B>, id: Option<u64>) -> Required {
        if self.unsafe_to_route {
            return Required::Primary;
        }
        let bookmarks = self.carried.as_slice();
        if bookmarks.is_empty() {
            return Required::Nothing;
        }
        if let super::Mode::TimeWindow(_) = shared.mode {
            return Required::Primary;
        }
        // The all-zero position (a version 1 pin) pins every cluster.
        if bookmarks
            .iter()
            .any(|b| b.position == crate::WritePosition::default())
        {
            return Required::Primary;
        }
        let bookmark = match id {
            Some(id) => match self.carried.get(id) {
                Some(bookmark) => *bookmark,
                // Another cluster's token: for a single cluster, its
                // backend rules on it (`ForeignCluster`); beside other
                // clusters, it is theirs.
                None if shared.clusters.len() == 1 => bookmarks[0],
                None => return Required::Nothing,
            },
            // A backend that cannot name its cluster has one; bookmarks of
            // several clusters leave which is its own to a guess: unknown
            // means unsafe.
            None if bookmarks.len() > 1 => return Required::Primary,
            None => bookmarks[0],
        };
        if bookmark.position.pins_primary() {
            Required::Primary
        } else {
            Required::Position(bookmark)
        }
    }
}

fn read_token<B: Backend>(
    shared: &Shared<B>,
    headers: &http::HeaderMap,
    user: Option<&UserId>,
) -> ReadTokens {
    let mut carried = Bookmarks::new();
    let mut valid = false;
    let mut expires_at = 0;
    let mut first_failure = None;
    let mut now = None;
    let mut budget = MacBudget::new(MAX_MACS_PER_REQUEST);
    // Candidates left unchecked that might have promised more, or more
    // clusters than a token covers: then nothing proves what the user wrote
    // last, and only the primary is safe.
    let mut unchecked = false;
    let mut buffer = TokenBuffer::new();
    let found = transport::for_each_candidate(
        headers,
        &shared.cookie_name,
        shared.token_header.as_ref(),
        |text| {
            let now = *now.get_or_insert_with(|| shared.clock.now_unix());
            let candidate = match UnverifiedToken::parse(text, now, &mut buffer) {
                Ok(candidate) => candidate,
                Err(reason) => {
                    first_failure.get_or_insert(TokenOutcome::Rejected(reason));
                    return false;
                }
            };
            if !shared.keys.knows(candidate.key_id()) {
                first_failure.get_or_insert(TokenOutcome::Rejected(TokenError::UnknownKey));
                return false;
            }
            // Bound to its user before the MAC: a token that could not be
            // used even if authentic is not worth one. Such a token may be
            // forged; it is counted by what it claims.
            let Some(user) = user else {
                first_failure.get_or_insert(TokenOutcome::NoIdentity);
                return false;
            };
            if candidate.user() != user.as_bytes() {
                first_failure.get_or_insert(TokenOutcome::OtherUser);
                return false;
            }
            // Not worth a MAC: it adds nothing to what valid tokens already
            // promise (only its expiry might be later).
            if valid && !candidate.adds_to(&carried) {
                return false;
            }
            match candidate.authenticate(&shared.cookie_name, &shared.keys, &mut budget) {
                Checked::Authentic(token) => {
                    valid = true;
                    expires_at = expires_at.max(token.expires_at());
                    // Several valid tokens of one user: every promise holds.
                    unchecked |= !carried.merge(token.bookmarks());
                }
                Checked::Forged => {
                    first_failure.get_or_insert(TokenOutcome::Rejected(TokenError::BadSignature));
                }
                Checked::Unchecked => {
                    metrics::counter!("read_after_write_token_mac_budget_exhausted_total")
                        .increment(1);
                    tracing::debug!(
                        budget = MAX_MACS_PER_REQUEST,
                        "affinity token MAC budget spent; session reads go to the primary"
                    );
                    unchecked = true;
                    return true;
                }
            }
            false
        },
    );
    let outcome = if valid {
        TokenOutcome::Valid
    } else if found || unchecked {
        first_failure.unwrap_or(TokenOutcome::Rejected(TokenError::Malformed))
    } else {
        TokenOutcome::Absent
    };
    // Planted well-formed forgeries may sit in front of the real token:
    // unknown means unsafe. The cost is primary reads for this request,
    // never a stale one.
    ReadTokens {
        outcome,
        carried,
        expires_at,
        unsafe_to_route: unchecked,
    }
}

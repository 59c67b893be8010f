use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::{transport, ResponseFuture, Shared, MAX_MACS_PER_REQUEST};
use crate::backend::Backend;
use crate::handle::{Db, RequestState, Required, TokenOutcome};
use crate::token::{AffinityToken, TokenBuffer, TokenError, UnverifiedToken, UserId};

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
        let (required, token) = read_token(shared, &parts.headers, user.as_ref());
        if token != TokenOutcome::Absent {
            crate::telemetry::count_token(token);
            if token != TokenOutcome::Valid {
                tracing::debug!(outcome = token.as_str(), "affinity token ignored");
            }
        }
        let writes_by_method = shared.writes_on_unsafe_methods && !parts.method.is_safe();
        let state = Arc::new(RequestState::new(required, user, token, writes_by_method));
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
fn read_token<B: Backend>(
    shared: &Shared<B>,
    headers: &http::HeaderMap,
    user: Option<&UserId>,
) -> (Required, TokenOutcome) {
    let mut best: Option<AffinityToken> = None;
    let mut first_failure = None;
    let mut now = None;
    let mut macs = 0;
    // Candidates left unchecked that might have promised more: then nothing
    // proves what the user wrote last, and only the primary is safe.
    let mut unchecked = false;
    // Valid tokens from different clusters (keys shared across
    // environments): which one this backend serves is not ours to guess.
    let mut incomparable = false;
    let mut buffer = TokenBuffer::new();
    let found = transport::for_each_candidate(
        headers,
        &shared.cookie_name,
        shared.token_header.as_ref(),
        |text| {
            let now = *now.get_or_insert_with(|| shared.clock.now_unix());
            let candidate = match UnverifiedToken::parse(text, &shared.keys, now, &mut buffer) {
                Ok(candidate) => candidate,
                Err(reason) => {
                    first_failure.get_or_insert(TokenOutcome::Rejected(reason));
                    return false;
                }
            };
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
            // Not worth a MAC: it cannot beat the best so far. One from
            // another cluster is checked anyway (see `incomparable`).
            if best.as_ref().is_some_and(|best| {
                !candidate.could_beat(best)
                    && best.position().cmp_promise(&candidate.position()).is_some()
            }) {
                return false;
            }
            if macs == MAX_MACS_PER_REQUEST {
                metrics::counter!("read_after_write_token_mac_budget_exhausted_total").increment(1);
                tracing::debug!(
                    budget = MAX_MACS_PER_REQUEST,
                    "affinity token MAC budget spent; session reads go to the primary"
                );
                unchecked = true;
                return true;
            }
            macs += 1;
            match candidate.authenticate(&shared.cookie_name, &shared.keys) {
                Ok(token) => {
                    incomparable |= best.as_ref().is_some_and(|best| {
                        best.position().cmp_promise(&token.position()).is_none()
                    });
                    best = Some(token);
                }
                Err(reason) => {
                    first_failure.get_or_insert(TokenOutcome::Rejected(reason));
                }
            }
            false
        },
    );
    if unchecked || incomparable {
        // Planted well-formed forgeries may sit in front of the real token,
        // or two valid tokens promise positions of different clusters:
        // unknown means unsafe. The cost is primary reads for this request,
        // never a stale one.
        let outcome = match best {
            Some(_) => TokenOutcome::Valid,
            None => first_failure.unwrap_or(TokenOutcome::Rejected(TokenError::Malformed)),
        };
        return (Required::Primary, outcome);
    }
    match best {
        Some(token) => {
            let required = match shared.mode {
                // A token that promises no position was issued in time-window
                // mode, or after a write whose position could not be
                // captured: honour it with the primary.
                super::Mode::Position if token.position().pins_primary() => Required::Primary,
                super::Mode::Position => Required::Position(token.position()),
                super::Mode::TimeWindow(_) => Required::Primary,
            };
            (required, TokenOutcome::Valid)
        }
        None if found => (
            Required::Nothing,
            first_failure.unwrap_or(TokenOutcome::Rejected(TokenError::Malformed)),
        ),
        None => (Required::Nothing, TokenOutcome::Absent),
    }
}

//! [`ReadAfterWrite`], the service: per request, reads and verifies every
//! token candidate, works out what each cluster's session reads require,
//! and hands the handler a [`Db`] before calling it.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::{transport, ResponseFuture};
use crate::backend::Backend;
use crate::backend::RouteReason;
use crate::bookmark::{Bookmark, Bookmarks};
use crate::config::{Shared, MAX_MACS_PER_REQUEST};
use crate::handle::{ClusterState, Db, RequestState, Required, TokenOutcome, Unread};
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
        let cluster_state = |cluster: &crate::config::Cluster<B>| {
            ClusterState::new(read.required(shared, cluster.id), writes_by_method)
        };
        let clusters = match shared.clusters.as_slice() {
            // The common case, without the iterator's size bookkeeping.
            [one] => smallvec::smallvec![cluster_state(one)],
            many => many.iter().map(cluster_state).collect(),
        };
        let state = Arc::new(RequestState::new(
            user,
            token,
            read.carried,
            read.unread,
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

/// The furthest ahead a token the layer cannot verify may claim to expire,
/// in seconds from now: the longest TTL any instance issues, and a day for
/// clocks that disagree.
const UNVERIFIABLE_HORIZON: u64 = crate::config::MAX_TTL_SECONDS + 24 * 60 * 60;

/// What a request's tokens said, all of them checked and merged.
struct ReadTokens {
    outcome: TokenOutcome,
    /// Every valid token's bookmarks, merged cluster by cluster.
    carried: Bookmarks,
    /// What the tokens the layer could not read claimed.
    unread: Unread,
    /// The latest expiry among the valid tokens (0: none).
    expires_at: u64,
}

impl ReadTokens {
    /// What the tokens ask of the cluster `id`'s session reads.
    fn required<B>(&self, shared: &Shared<B>, id: Option<u64>) -> Required {
        // A token the layer could not read may promise a write here:
        // unknown means unsafe, so the primary, never an eventual read.
        if let Some(reason) = self.unread.pins(id) {
            return Required::Primary(reason);
        }
        let bookmarks = self.carried.as_slice();
        if bookmarks.is_empty() {
            return Required::Nothing;
        }
        if shared.time_window() {
            return Required::Primary(RouteReason::TimeWindow);
        }
        // The all-zero position (a version 1 pin) pins every cluster.
        if bookmarks.iter().any(Bookmark::pins_every_cluster) {
            return Required::Primary(RouteReason::PositionUnknown);
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
            None if bookmarks.len() > 1 => return Required::Primary(RouteReason::PositionUnknown),
            None => bookmarks[0],
        };
        if bookmark.position.pins_primary() {
            Required::Primary(RouteReason::PositionUnknown)
        } else {
            Required::Position(bookmark)
        }
    }
}

/// Finds, verifies and binds the request's tokens. Every failure is an
/// outcome, never an error response.
///
/// Every candidate goes through the cheap checks. One that names the
/// requester and would add to what the valid tokens so far promise costs
/// MACs, at most [`MAX_MACS_PER_REQUEST`] for the whole request. A browser
/// can hold a stale host-only cookie beside a fresh domain cookie, or a
/// client a stale header beside a fresh cookie: the valid tokens are merged,
/// every promise holds. A token that names the requester but cannot be read
/// (its key id is unknown here, its format is a later release's, or the
/// budget ran out before it) is not absent: what it claims goes into
/// [`Unread`].
fn read_token<B: Backend>(
    shared: &Shared<B>,
    headers: &http::HeaderMap,
    user: Option<&UserId>,
) -> ReadTokens {
    let mut carried = Bookmarks::new();
    let mut unread = Unread::default();
    let mut valid = false;
    let mut unknown_key = false;
    let mut newer = false;
    let mut budget_spent = false;
    let mut expires_at = 0;
    let mut first_failure = None;
    let mut now = None;
    let mut budget = MacBudget::new(MAX_MACS_PER_REQUEST);
    // Zeroed only for a request that has a candidate: most have none.
    let mut buffer: Option<TokenBuffer> = None;
    let found = transport::for_each_candidate(
        headers,
        &shared.cookie_finder,
        shared.token_header.as_ref(),
        |text| {
            let now = *now.get_or_insert_with(|| shared.clock.now_unix());
            // Expired tokens fail here, whichever key signed them: the TTL
            // bounds every promise.
            let buffer = buffer.get_or_insert_with(TokenBuffer::new);
            let candidate = match UnverifiedToken::parse(text, now, buffer) {
                Ok(candidate) => candidate,
                Err(reason) => {
                    first_failure.get_or_insert(TokenOutcome::Rejected(reason));
                    return false;
                }
            };
            let known_key = shared.keys.knows(candidate.key_id());
            // A token the layer cannot verify (a later format, an unknown
            // key) claims its expiry unchecked. No instance issues one
            // further ahead than the longest TTL: beyond that (and a day
            // for clocks that disagree) it is junk that happened to parse,
            // not a promise, and a planted one cannot pin a user longer.
            if (candidate.is_newer() || !known_key)
                && candidate.expires_at() > now.saturating_add(UNVERIFIABLE_HORIZON)
            {
                first_failure.get_or_insert(TokenOutcome::Rejected(TokenError::Malformed));
                return false;
            }
            // Bound to its user before the MAC (by the user id of versions 1
            // and 2, by the keyed tag of version 3): a token that could not
            // be used even if authentic is not worth one. Such a token may
            // be forged; it is counted by what it claims. A version 3 token
            // under an unknown key may be anyone's: it counts as the
            // requester's.
            let naming = user.map(|user| candidate.naming(user, &shared.keys));
            let Some(naming) = naming.filter(|naming| naming.may_be_theirs()) else {
                first_failure.get_or_insert(match (known_key, user) {
                    (false, _) if candidate.is_newer() => {
                        TokenOutcome::Rejected(TokenError::WrongVersion)
                    }
                    (false, _) => TokenOutcome::Rejected(TokenError::UnknownKey),
                    (true, None) => TokenOutcome::NoIdentity,
                    (true, Some(_)) => TokenOutcome::OtherUser,
                });
                return false;
            };
            if candidate.is_newer() {
                // A later release's format, naming the requester (under a
                // known key) or anyone (under an unknown one): during a
                // rolling upgrade, another instance's genuine token. Its
                // bookmarks cannot be read, so it claims every cluster.
                newer = true;
                unread.unknown_version.add(&candidate.bookmarks());
                return false;
            }
            if !known_key {
                // Signed with a key this instance does not have: during a
                // rolling key rotation, another instance's genuine token. It
                // may promise a write, so it is not absent; it costs no MAC.
                unknown_key = true;
                unread.unknown_key.add(&candidate.bookmarks());
                return false;
            }
            // Not worth a MAC: it adds nothing to what valid tokens already
            // promise (only its expiry might be later).
            if valid && !candidate.adds_to(&carried) {
                return false;
            }
            match candidate.authenticate_as(&shared.cookie_name, &naming, &mut budget) {
                Checked::Authentic(token) => {
                    valid = true;
                    expires_at = expires_at.max(token.expires_at());
                    // Several valid tokens of one user: every promise holds.
                    // One that finds no room is kept as unread: read from
                    // the primary, pinned in what the response issues.
                    if !carried.merge(token.bookmarks()) {
                        unread.unchecked.add(token.bookmarks());
                    }
                }
                Checked::Forged => {
                    first_failure.get_or_insert(TokenOutcome::Rejected(TokenError::BadSignature));
                }
                Checked::Unchecked => {
                    if !budget_spent {
                        budget_spent = true;
                        metrics::counter!("read_after_write_token_mac_budget_exhausted_total")
                            .increment(1);
                        tracing::debug!(
                            budget = MAX_MACS_PER_REQUEST,
                            "affinity token MAC budget spent; the clusters the tokens left \
                             unchecked name are read from the primary"
                        );
                    }
                    // Planted well-formed forgeries may sit in front of the
                    // real token: what it claims is unknown, so unsafe. The
                    // cost is primary reads, never a stale one.
                    unread.unchecked.add(&candidate.bookmarks());
                }
            }
            // Every candidate is looked at: later ones cost no MAC once the
            // budget is spent, and may name clusters to keep.
            false
        },
    );
    if !unread.is_empty() {
        unread.forget_covered(&carried);
    }
    let outcome = if valid {
        TokenOutcome::Valid
    } else if unknown_key {
        // The two refusals that decide where reads go.
        TokenOutcome::Rejected(TokenError::UnknownKey)
    } else if newer {
        TokenOutcome::Rejected(TokenError::WrongVersion)
    } else if found {
        first_failure.unwrap_or(TokenOutcome::Rejected(TokenError::Malformed))
    } else {
        TokenOutcome::Absent
    };
    ReadTokens {
        outcome,
        carried,
        unread,
        expires_at,
    }
}

//! Per-request state: what the request's tokens said, and what the
//! handler did with each cluster. Shared by the handle's clones and the
//! response future through one `Arc`.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use smallvec::SmallVec;

use crate::backend::{RouteReason, Target};
use crate::bookmark::{Bookmark, Bookmarks, ReplicaTag};
use crate::token::{TokenError, UserId};

/// What the request's token said, after every check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenOutcome {
    /// The request carried no token.
    Absent,
    /// A token verified and belongs to the requester.
    Valid,
    /// A token was refused; it is treated as absent, but for one signed
    /// with a key id this instance does not know
    /// ([`TokenError::UnknownKey`]) or in a later release's format
    /// ([`TokenError::WrongVersion`]) that names the requester and has not
    /// expired: it may promise a write, so the clusters it names (every
    /// cluster, for a later format) are read from the primary (see the
    /// [middleware docs](crate::middleware#tokens-the-layer-cannot-read)).
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

/// Where a request's database access went: its node, the kind of node, and
/// why. Returned by [`Db::last_route`](crate::Db::last_route).
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

/// What a verified token asks of this request's session reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Required {
    /// No valid token: session reads are eventual.
    Nothing,
    /// Read from a node that has replayed the bookmark's position (or,
    /// with monotonic reads, stay on its replica).
    Position(Bookmark),
    /// Read from the primary, counted under the reason: in time-window
    /// mode the user wrote recently; in position mode the token pins the
    /// user to the primary because the position of their last write is
    /// unknown (its capture failed), or a token the layer could not read
    /// may promise a write (see [`Unread`]).
    Primary(RouteReason),
}

/// Bookmarks claimed by tokens the layer could not read, merged per
/// cluster. Attacker controlled: they only ever send reads to the primary
/// and add pins to issued tokens, never let a read go to a replica.
#[derive(Clone, Debug, Default)]
pub(crate) struct Claims {
    bookmarks: Bookmarks,
    /// Some claim found no room beside the others (more clusters than a
    /// token covers): which clusters it named is lost, so every cluster
    /// counts as named.
    overflow: bool,
}

impl Claims {
    /// No token claimed anything here.
    #[inline]
    fn is_empty(&self) -> bool {
        !self.overflow && self.bookmarks.is_empty()
    }

    /// Adds what one token claims.
    pub(crate) fn add(&mut self, claimed: &Bookmarks) {
        self.overflow |= !self.bookmarks.merge(claimed);
    }

    /// Drops the claims that `carried` covers: a verified token promising
    /// at least as much makes them moot, genuine or not.
    fn forget_covered(&mut self, carried: &Bookmarks) {
        self.bookmarks
            .retain(|claim| !carried.covers(&Bookmarks::one(*claim)));
    }

    /// Every cluster a claim names by its system identifier (not the
    /// all-zero claim, which names them all).
    fn clusters(&self) -> impl Iterator<Item = u64> + '_ {
        self.bookmarks
            .as_slice()
            .iter()
            .filter(|claim| !claim.pins_every_cluster())
            .map(Bookmark::system_id)
    }

    /// Whether a claim names the cluster `id` (`None`: a cluster that cannot
    /// name itself, which any claim may be about).
    fn names(&self, id: Option<u64>) -> bool {
        let bookmarks = self.bookmarks.as_slice();
        self.overflow
            || bookmarks.iter().any(Bookmark::pins_every_cluster)
            || match id {
                Some(id) => self.bookmarks.get(id).is_some(),
                None => !bookmarks.is_empty(),
            }
    }
}

/// What the request's tokens claimed that the layer could not read:
/// candidates that name the requester and have not expired but were signed
/// with a key id this instance does not know, are in a later release's
/// format (claiming every cluster), or were left unchecked when the MAC
/// budget ran out (and verified bookmarks that found no room beside the
/// others). Not the same as no token: if genuine, each may promise a
/// write. The clusters they name are read from the primary, and pinned in
/// the token the response issues unless the request captured them.
#[derive(Clone, Debug, Default)]
pub(crate) struct Unread {
    /// Claims of tokens under a key id this instance does not know (a key
    /// rotation rolling out).
    pub(crate) unknown_key: Claims,
    /// Claims of tokens in a later release's format (every cluster: their
    /// bookmarks cannot be read).
    pub(crate) unknown_version: Claims,
    /// Claims of tokens the MAC budget left unchecked.
    pub(crate) unchecked: Claims,
}

impl Unread {
    /// Every token was read (or there was none): nothing pins a cluster.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.unknown_key.is_empty() && self.unknown_version.is_empty() && self.unchecked.is_empty()
    }

    /// Drops what the valid tokens, merged into `carried`, already promise.
    pub(crate) fn forget_covered(&mut self, carried: &Bookmarks) {
        self.unknown_key.forget_covered(carried);
        self.unknown_version.forget_covered(carried);
        self.unchecked.forget_covered(carried);
    }

    /// Every cluster an unread token names by its system identifier.
    pub(crate) fn clusters(&self) -> impl Iterator<Item = u64> + '_ {
        self.unknown_key
            .clusters()
            .chain(self.unknown_version.clusters())
            .chain(self.unchecked.clusters())
    }

    /// Whether an unread token claims the all-zero position, which pins
    /// every cluster.
    pub(crate) fn claims_every_cluster(&self) -> bool {
        [&self.unknown_key, &self.unknown_version, &self.unchecked]
            .iter()
            .any(|claims| {
                claims
                    .bookmarks
                    .as_slice()
                    .iter()
                    .any(Bookmark::pins_every_cluster)
            })
    }

    /// Whether some unread token's clusters found no room: which clusters
    /// they were is lost.
    pub(crate) fn overflowed(&self) -> bool {
        self.unknown_key.overflow || self.unknown_version.overflow || self.unchecked.overflow
    }

    /// Why session reads of the cluster `id` must go to the primary, if an
    /// unread token names it.
    pub(crate) fn pins(&self, id: Option<u64>) -> Option<RouteReason> {
        if self.is_empty() {
            None
        } else if self.unknown_key.names(id) {
            Some(RouteReason::UnknownKey)
        } else if self.unknown_version.names(id) {
            Some(RouteReason::UnknownVersion)
        } else if self.unchecked.names(id) {
            Some(RouteReason::PositionUnknown)
        } else {
            None
        }
    }
}

/// Per-request state shared by the handle's clones and the response future.
pub(crate) struct RequestState {
    /// Who the identity function found before the handler ran (the
    /// anonymous id where anonymous tokens are allowed); `None`: no one.
    identified: Option<UserId>,
    /// Set by [`Db::bind_user`](crate::Db::bind_user): `Some(user)` once the
    /// handler bound the request, where `user` is `None` for a binding to
    /// no one. A mutex, not a `OnceLock`, because a later binding replaces
    /// an earlier one; inline, so a request that never binds allocates
    /// nothing for it, and uncontended.
    bound: Mutex<Option<Option<UserId>>>,
    /// Whether `bound` was ever set: a request that never binds (nearly
    /// all) answers who its user is without taking the lock.
    was_bound: AtomicBool,
    pub(crate) token: TokenOutcome,
    /// Every bookmark the request's valid tokens carried, merged: this
    /// layer's clusters' and other services' clusters', passed on unchanged
    /// in the tokens this request issues.
    pub(crate) carried: Bookmarks,
    /// What tokens the layer could not read claimed, beyond `carried`.
    pub(crate) unread: Unread,
    /// When the carried token expires, Unix seconds (0: none).
    pub(crate) carried_expiry: u64,
    /// One per cluster of the layer, in the layer's order.
    pub(crate) clusters: SmallVec<[ClusterState; 1]>,
    /// The last routing decision, for [`Db::last_route`](crate::Db::last_route) and the debug
    /// header. Written on every routed access, so it holds no `String`: the
    /// node's name is copied into an inline buffer (no allocation for names
    /// up to [`INLINE_NODE_NAME`] bytes).
    pub(crate) last_route: Mutex<Option<LastRoute>>,
}

/// What one request did with one cluster.
pub(crate) struct ClusterState {
    /// What the token asks of this cluster's session reads.
    pub(crate) required: Required,
    /// Set by [`Db::write`](crate::Db::write); read once the handler has returned. Relaxed is
    /// enough: the handler's future completes before the response future
    /// reads it, on the same task.
    pub(super) wrote: AtomicBool,
    /// Monotonic reads: a read of this request went to the primary, so the
    /// session may have seen its latest state; later reads of the request
    /// go there too, and the response captures the primary's position.
    pub(super) read_primary: AtomicBool,
    /// Monotonic reads: the bookmark this request's reads earned (the
    /// replica they read); later reads of the request stay there.
    pub(crate) earned: Mutex<Option<Bookmark>>,
    /// Monotonic reads: the replica a read left for the primary because it
    /// lagged, which the session may come back to once it replays the
    /// position captured after the request (0: none).
    pub(super) kept: AtomicU64,
}

impl ClusterState {
    pub(crate) fn new(required: Required, wrote: bool) -> Self {
        ClusterState {
            required,
            wrote: AtomicBool::new(wrote),
            read_primary: AtomicBool::new(false),
            earned: Mutex::new(None),
            kept: AtomicU64::new(0),
        }
    }

    /// The replica a read of this request left for lag and may come back
    /// to (see [`Bookmark::returning_to`]).
    pub(crate) fn kept(&self) -> Option<ReplicaTag> {
        ReplicaTag::new(self.kept.load(Ordering::Relaxed))
    }

    pub(crate) fn wrote(&self) -> bool {
        self.wrote.load(Ordering::Relaxed)
    }

    pub(crate) fn read_primary(&self) -> bool {
        self.read_primary.load(Ordering::Relaxed)
    }

    /// The bookmark session reads route by now: what this request earned,
    /// else what the token carried.
    pub(crate) fn bookmark(&self) -> Option<Bookmark> {
        let earned = *self.earned.lock().unwrap_or_else(PoisonError::into_inner);
        earned.or(match self.required {
            Required::Position(bookmark) => Some(bookmark),
            Required::Nothing | Required::Primary(_) => None,
        })
    }

    pub(crate) fn earned(&self) -> Option<Bookmark> {
        *self.earned.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Node names up to this many bytes are kept without allocating.
const INLINE_NODE_NAME: usize = 32;

/// A routing decision as [`RequestState`] keeps it.
pub(crate) struct LastRoute {
    pub(super) target: Target,
    pub(super) reason: RouteReason,
    /// The node's name, UTF-8 copied from a `&str`.
    pub(super) node: SmallVec<[u8; INLINE_NODE_NAME]>,
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

    pub(super) fn route(&self) -> Route {
        Route {
            node: self.node().to_owned(),
            target: self.target,
            reason: self.reason,
        }
    }
}

impl RequestState {
    pub(crate) fn new(
        user: Option<UserId>,
        token: TokenOutcome,
        carried: Bookmarks,
        unread: Unread,
        carried_expiry: u64,
        clusters: SmallVec<[ClusterState; 1]>,
    ) -> Self {
        RequestState {
            identified: user,
            bound: Mutex::new(None),
            was_bound: AtomicBool::new(false),
            token,
            carried,
            unread,
            carried_expiry,
            clusters,
            last_route: Mutex::new(None),
        }
    }

    /// Whether the request wrote to any cluster.
    pub(crate) fn wrote(&self) -> bool {
        self.clusters.iter().any(ClusterState::wrote)
    }

    /// Whom the request's tokens are for: the user the handler bound it to
    /// (the last binding wins), else the identified one.
    pub(crate) fn user(&self) -> Option<UserId> {
        if !self.was_bound.load(Ordering::Acquire) {
            return self.identified.clone();
        }
        match &*self.bound.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(bound) => bound.clone(),
            None => self.identified.clone(),
        }
    }

    /// Whether the request's tokens are for someone: [`user`](Self::user)
    /// is `Some`, without copying the id.
    pub(crate) fn has_user(&self) -> bool {
        if !self.was_bound.load(Ordering::Acquire) {
            return self.identified.is_some();
        }
        match &*self.bound.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(bound) => bound.is_some(),
            None => self.identified.is_some(),
        }
    }

    /// Binds the request to `user` (`None`: to no one).
    pub(crate) fn bind(&self, user: Option<UserId>) {
        *self.bound.lock().unwrap_or_else(PoisonError::into_inner) = Some(user);
        self.was_bound.store(true, Ordering::Release);
    }

    /// Whether the bound user takes over what the request's tokens carried
    /// and claimed: unbound, or bound from an anonymous (or no) identity to
    /// anyone (same browser, and promises only grow), or to the identified
    /// user again. A named user's promises never pass to another user.
    pub(crate) fn inherits(&self) -> bool {
        if !self.was_bound.load(Ordering::Acquire) {
            return true;
        }
        let bound = self.bound.lock().unwrap_or_else(PoisonError::into_inner);
        match (&*bound, &self.identified) {
            (None, _) | (Some(_), None) => true,
            (Some(_), Some(identified)) if identified.is_anonymous() => true,
            (Some(bound), Some(identified)) => bound.as_ref() == Some(identified),
        }
    }

    /// Whether the handler bound the request to someone other than the
    /// identified user, so the response's token is for a new user.
    pub(crate) fn rebound(&self) -> bool {
        if !self.was_bound.load(Ordering::Acquire) {
            return false;
        }
        let bound = self.bound.lock().unwrap_or_else(PoisonError::into_inner);
        bound
            .as_ref()
            .is_some_and(|bound| *bound != self.identified)
    }
}

//! The Tower middleware: [`ReadAfterWriteLayer`], [`ReadAfterWrite`] and its
//! [`ResponseFuture`].
//!
//! On each request the middleware
//! 1. reads the token from the `primary_affinity` cookie (every `Cookie`
//!    header) or from the token header;
//! 2. verifies it and checks that it belongs to the requester; a token that
//!    fails any check is treated as absent and counted by reason, never
//!    turned into an error response, except one that may be genuine but
//!    cannot be read ([below](#tokens-the-layer-cannot-read));
//! 3. inserts a [`Db`](crate::Db) handle into the request extensions;
//! 4. after the handler returns, if the request wrote, asks the backend for
//!    the write position and appends a `Set-Cookie` (and sets the token
//!    header) for a token at the larger of the old and new positions, for
//!    the requester or the user the handler bound the request to
//!    ([`Db::bind_user`](crate::Db::bind_user)). This happens for error
//!    responses too: a commit may have happened.
//!
//! # Hostile requests
//!
//! A request may carry any number of `Cookie` and token headers. Every
//! candidate is parsed (one pass over the header bytes, no allocation), but
//! only a candidate that passes every check needing no key (length,
//! base64url, layout, version, unexpired, a known key id, and naming the
//! requester) and that would add to what the valid tokens found so far
//! promise costs an HMAC: one per key with its key id, at most
//! [`MAX_MACS_PER_REQUEST`] for the whole request. Junk, expired tokens,
//! other users' tokens and duplicates of a valid token are free, so they
//! cannot hide a valid token. Several valid tokens are merged: every
//! promise holds, cluster by cluster.
//!
//! Well-formed forgeries that name the requester do cost MACs, so enough of
//! them, planted ahead of the real token, leave it unchecked. It is then a
//! token the layer cannot read, never an absent one (below): the clusters
//! it names are read from the primary, never stale. The residual risks are
//! on [`MAX_MACS_PER_REQUEST`].
//!
//! # Tokens the layer cannot read
//!
//! A candidate that names the requester and has not expired, but that the
//! layer cannot verify, may be genuine and promise a write:
//!
//! - one signed with a key id this instance does not know, as when a key
//!   rotation rolls out instance by instance (see [`KeySet`] for the order
//!   that avoids it); it costs no MAC and counts as `unknown_key` in
//!   `read_after_write_tokens_total`;
//! - one the MAC budget left unchecked;
//! - a valid token whose clusters found no room beside the other valid
//!   tokens' (more than [`MAX_CLUSTERS`](crate::bookmark::MAX_CLUSTERS)).
//!
//! None is treated as absent. Unless the request's valid tokens already
//! promise as much, every cluster such a token names (each one the layer
//! serves, for a backend that reports no cluster id) is read from the
//! primary: `reason="unknown_key"` for an unknown key, `position_unknown`
//! otherwise. A cluster it does not name reads as it would without it. An
//! expired one is absent like any expired token: the TTL bounds every
//! promise.
//!
//! # What an issued token keeps
//!
//! The token a response issues never promises less than the request's
//! tokens did, whether the layer could read them or not:
//!
//! - the valid tokens' bookmarks travel on, each cluster's moved on by
//!   what this request captured (its writes, or with monotonic reads its
//!   replica); a capture covers every commit before it in its cluster, so
//!   it also replaces a bookmark pinned to the primary;
//! - a backend that reports no [cluster id](crate::Backend::cluster_id)
//!   gets its bookmark under the system identifier its capture reports,
//!   beside other services' bookmarks (it cannot tell which of several is
//!   its own, so it reads such a user's session data from the primary:
//!   backends whose users also carry other services' bookmarks should
//!   report their cluster id);
//! - each cluster a token the layer could not read names gets a bookmark
//!   [pinned to the primary](crate::Bookmark::pinned), unless this request
//!   captured that cluster;
//! - the all-zero position, which pins every cluster (a version 1 pin, a
//!   time-window instance sharing the keys, or the fallback below), stays
//!   until the user writes again: that write's capture covers it, so the
//!   clusters captured get their position and the layer's others a pin,
//!   instead of the marker keeping every read on the primary for good.
//!   What it stood for in other services' clusters is not written down
//!   anywhere, so it ends there (a residual risk: their bookmarks, where
//!   they fitted beside the marker, travel on);
//! - when those pins do not all fit in
//!   [`MAX_CLUSTERS`](crate::bookmark::MAX_CLUSTERS) beside the other
//!   bookmarks, the token carries the all-zero position instead, which
//!   pins every cluster (with other services' bookmarks beside it, where
//!   they fit). A pin never pushes out a verified bookmark; this layer's
//!   own bookmarks do push out other services' when there is no room.
//!
//! A request the handler bound to another named user
//! ([`Db::bind_user`](crate::Db::bind_user)) issues that user's token from
//! this request's captures alone: the old user's promises are not theirs.
//! Bound from an anonymous session, everything above carries over.
//!
//! # Monotonic reads
//!
//! With [`ReadAfterWriteLayer::monotonic_reads`] on, a session (a user, or an
//! anonymous browser when anonymous tokens are allowed) never sees the
//! database go back in time, across requests, tabs and web instances: its
//! token carries a [bookmark](crate::bookmark) naming the replica it read,
//! and it stays there; it leaves only through the primary. The token is
//! re-issued on a read only when the bookmark moved (the first read, a new
//! replica) or less than half its TTL is left.
//!
//! It is off by default because it costs what read-your-writes alone does
//! not: a `Set-Cookie` on some read responses (which shared HTTP caches will
//! not store), a token for sessions that never wrote, and reads that stay on
//! one replica instead of spreading across all of them. With one primary,
//! monotonic writes and writes-follow-reads already hold.
//!
//! Two tabs that both change the cookie race like any cookie: the last
//! response wins. A read response can then replace a token that a
//! concurrent write response set; the loser's promise is lost until its
//! next write.
//!
//! # Example
//!
//! ```
//! use http::{Request, Response};
//! use read_after_write::{Backend, Db, KeySet, ReadAfterWriteLayer, SigningKey, UserId};
//! use std::convert::Infallible;
//! use tower::{ServiceBuilder, ServiceExt};
//! # use read_after_write::{Lsn, RouteReason, Routed, WritePosition};
//! # use std::time::Duration;
//! # #[derive(Default)]
//! # struct MyBackend { pool: () }
//! # impl Backend for MyBackend {
//! #     type Pool = ();
//! #     type Error = std::io::Error;
//! #     fn primary(&self) -> &() { &self.pool }
//! #     fn eventual(&self) -> Routed<'_, ()> { Routed::replica(&self.pool, "replica-1", RouteReason::Eventual) }
//! #     async fn session(&self, _: WritePosition, _: Duration) -> Routed<'_, ()> {
//! #         Routed::replica(&self.pool, "replica-1", RouteReason::CaughtUp)
//! #     }
//! #     async fn write_position(&self) -> Result<WritePosition, std::io::Error> {
//! #         Ok(WritePosition::new(Lsn::new(0x1000), 1, 7))
//! #     }
//! # }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let keys = KeySet::from(SigningKey::from_bytes(&[7; 32])?);
//! let layer = ReadAfterWriteLayer::new(MyBackend::default(), keys)
//!     // Bind tokens to the user an auth layer (or a header, here) identified.
//!     .identity(|parts| {
//!         let id = parts.headers.get("x-user-id")?.to_str().ok()?.parse::<u64>().ok()?;
//!         Some(UserId::from(id))
//!     })
//!     .max_wait(Duration::from_millis(20));
//!
//! let service = ServiceBuilder::new().layer(layer).service_fn(|req: Request<()>| async move {
//!     let db = req.extensions().get::<Db<MyBackend>>().expect("layer installed");
//!     let _pool = db.write(); // run the INSERT on this pool
//!     Ok::<_, Infallible>(Response::new(()))
//! });
//!
//! let request = Request::post("/posts").header("x-user-id", "42").body(())?;
//! let response = service.oneshot(request).await?;
//! let cookie = response.headers()["set-cookie"].to_str()?;
//! assert!(cookie.starts_with("primary_affinity="));
//! assert!(cookie.contains("HttpOnly"));
//! # Ok(())
//! # }
//! ```

mod check;
mod future;
mod layer;
mod service;
mod transport;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;

pub use self::check::{CheckContext, SelfCheck};
pub use self::future::ResponseFuture;
pub(crate) use self::future::{capture_all, capture_position, mint_token, next_bookmarks};
pub use self::layer::ReadAfterWriteLayer;
pub use self::service::ReadAfterWrite;
use crate::clock::{Clock, SystemClock};
use crate::token::{KeySet, UserId};

/// Name of the affinity cookie unless configured otherwise.
pub const DEFAULT_COOKIE_NAME: &str = "primary_affinity";
/// Name of the token header for API and gRPC clients unless configured
/// otherwise. Lower case, so it is also valid gRPC metadata.
pub const DEFAULT_TOKEN_HEADER: &str = "x-primary-affinity";
/// Name of the optional debug response header.
pub const DEBUG_HEADER: &str = "x-read-after-write";

/// The most token MACs one request can cost, whatever it carries and
/// whatever the key list.
///
/// Every MAC computed counts: a token's key id is one byte, so when several
/// keys of the [`KeySet`] share an id a token is tried under each of them,
/// a MAC apiece. Only candidates that pass every cheap check and name the
/// requester get that far (see the [module docs](self#hostile-requests)). A
/// legitimate request carries a handful: a host-only cookie, domain cookies
/// for a parent domain or two, one per `Path`, and the header. 16 leaves
/// room for all of them while capping the work at about 4 µs (16 × ~240 ns
/// per MAC), less than parsing the headers.
///
/// Residual risk: whoever can set cookies for this site (a sibling
/// subdomain, for a cookie without the `__Host-` prefix) can plant well
/// formed tokens naming a victim's user id (ids are often guessable) with a
/// far expiry, and:
///
/// - with a known key id (visible in any token), 16 of them sent ahead of
///   the real cookie (a longer `Path` is sent first) use up the budget
///   before the real token is checked;
/// - with a key id the layer does not know, one of them looks like a token
///   from an instance that rotated keys first.
///
/// Neither verifies, and neither hides what the real token promised: the
/// clusters an unread token names are read from the primary (unknown means
/// unsafe) and pinned in the tokens the victim's responses issue (see
/// [what an issued token keeps](self#what-an-issued-token-keeps)). Planted
/// tokens naming more clusters than a token holds make those tokens pin
/// every cluster, so all the victim's session reads go to the primary until
/// a write of theirs captures a position. The cost is primary reads for as
/// long as the planted cookies live, counted by
/// `read_after_write_token_mac_budget_exhausted_total` and
/// `read_after_write_tokens_total{outcome="unknown_key"}`, never a stale
/// read or a forged one. To shut all of this out, name the cookie with the
/// `__Host-` prefix (`__Host-primary_affinity`, with `Secure`, `Path=/` and
/// no `Domain`, which the layer's defaults give), which no other subdomain
/// can set.
pub const MAX_MACS_PER_REQUEST: usize = 16;

/// The longest token lifetime and cookie `Max-Age` honoured: 400 days, the
/// cap RFC 6265bis tells browsers to apply. Longer settings of
/// [`ttl`](ReadAfterWriteLayer::ttl) and
/// [`time_window`](ReadAfterWriteLayer::time_window) are clamped to it.
pub const MAX_TTL: Duration = Duration::from_secs(transport::MAX_TTL_SECONDS);

/// A configuration value the layer refuses, so that a misconfiguration fails
/// at startup instead of silently on every response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The cookie name is not an RFC 6265 token.
    #[error(
        "cookie name {name:?} is not valid: use one or more visible ASCII characters \
         other than spaces and ( ) < > @ , ; : \\ \" / [ ] ? = {{ }}, for example `primary_affinity`"
    )]
    InvalidCookieName {
        /// The rejected name.
        name: String,
    },
    /// The cookie domain is not a host name.
    #[error(
        "cookie domain {domain:?} is not a host name: use letters, digits, '-' and '.' only \
         (an optional leading '.', labels of 1 to 63 characters, at most 253 in all, \
         punycode for international names), for example `example.com`"
    )]
    InvalidDomain {
        /// The rejected domain.
        domain: String,
    },
    /// A cluster added to a layer over several clusters cannot be told
    /// apart from the others.
    #[error(
        "cluster {name:?} cannot join this layer: {why}. Each cluster of one layer needs a \
         distinct name and a backend that reports its cluster id (PgReplicaSet does: its \
         system identifier), and one token covers at most {max} clusters",
        max = crate::bookmark::MAX_CLUSTERS
    )]
    InvalidCluster {
        /// The cluster's name.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
}

pub(crate) type IdentityFn = Arc<dyn Fn(&http::request::Parts) -> Option<UserId> + Send + Sync>;

/// How session reads are kept consistent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Tokens carry the write position; reads go to a replica that has it.
    Position,
    /// Tokens carry only "wrote recently"; reads go to the primary for the
    /// window.
    TimeWindow(Duration),
}

/// Configuration shared by the layer, every service it builds and every
/// request's handle.
pub(crate) struct Shared<B> {
    /// The first cluster's backend, `clusters[0]`.
    pub(crate) backend: Arc<B>,
    /// Every cluster, the first one (named [`DEFAULT_CLUSTER`]) included.
    pub(crate) clusters: Vec<Cluster<B>>,
    pub(crate) keys: KeySet,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) identity: Option<IdentityFn>,
    /// `None`: allowed exactly when no identity function is set.
    pub(crate) allow_anonymous: Option<bool>,
    pub(crate) cookie_name: String,
    pub(crate) token_header: Option<HeaderName>,
    pub(crate) ttl: Duration,
    pub(crate) max_wait: Duration,
    pub(crate) secure: bool,
    pub(crate) domain: Option<String>,
    pub(crate) debug_header: Option<HeaderName>,
    pub(crate) writes_on_unsafe_methods: bool,
    pub(crate) mode: Mode,
    /// `Set-Cookie` text before and after the token, derived from the fields
    /// above by [`Shared::refresh`].
    pub(crate) set_cookie: (String, String),
    /// Rate limit of the "wrote without an identity" warning: one per layer
    /// per [`Throttle::INTERVAL_SECONDS`], however many requests hit it.
    pub(crate) no_identity_warning: Throttle,
    /// Outgoing clients with [`ForwardTokenLayer`](crate::forward::ForwardTokenLayer)
    /// see the request being handled.
    pub(crate) forward_tokens: bool,
    /// Monotonic reads: a session's reads never observe an older state than
    /// its earlier reads did (see [`ReadAfterWriteLayer::monotonic_reads`]).
    pub(crate) monotonic: bool,
    /// The staleness bound of [`Db::eventual`](crate::Db::eventual), if any.
    pub(crate) max_staleness: Option<Duration>,
}

/// The name of a layer's first cluster, the one [`Db`](crate::Db)'s
/// methods use unless [`Db::cluster`](crate::Db::cluster) picks another.
pub const DEFAULT_CLUSTER: &str = "default";

/// One cluster of a layer.
pub(crate) struct Cluster<B> {
    pub(crate) name: String,
    pub(crate) backend: Arc<B>,
    /// The backend's cluster id, asked once.
    pub(crate) id: Option<u64>,
}

impl<B> Clone for Cluster<B> {
    fn clone(&self) -> Self {
        Cluster {
            name: self.name.clone(),
            backend: Arc::clone(&self.backend),
            id: self.id,
        }
    }
}

/// Lets an event through at most once per [`INTERVAL_SECONDS`] of the
/// layer's clock, so a misconfiguration that every request hits is loud once
/// a minute, not a flood.
///
/// [`INTERVAL_SECONDS`]: Self::INTERVAL_SECONDS
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    /// Unix second from which the next event may pass; 0: never passed.
    next: AtomicU64,
}

impl Throttle {
    pub(crate) const INTERVAL_SECONDS: u64 = 60;

    /// Whether an event at `now` (Unix seconds) may pass. Of callers racing
    /// for one slot, exactly one wins. A clock set back by more than an
    /// interval reopens the slot instead of silencing events until it
    /// catches up.
    pub(crate) fn allow(&self, now: u64) -> bool {
        let next = self.next.load(Ordering::Relaxed);
        let open = now >= next || next > now.saturating_add(Self::INTERVAL_SECONDS);
        open && self
            .next
            .compare_exchange(
                next,
                now.saturating_add(Self::INTERVAL_SECONDS),
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
    }
}

impl<B: crate::Backend> Shared<B> {
    fn new(backend: Arc<B>, keys: KeySet) -> Self {
        let mut shared = Shared {
            clusters: vec![Cluster {
                name: DEFAULT_CLUSTER.to_owned(),
                id: backend.cluster_id(),
                backend: Arc::clone(&backend),
            }],
            backend,
            keys,
            clock: Arc::new(SystemClock),
            identity: None,
            allow_anonymous: None,
            cookie_name: DEFAULT_COOKIE_NAME.to_owned(),
            token_header: Some(HeaderName::from_static(DEFAULT_TOKEN_HEADER)),
            ttl: Duration::from_secs(30),
            max_wait: Duration::from_millis(50),
            secure: true,
            domain: None,
            debug_header: None,
            writes_on_unsafe_methods: false,
            mode: Mode::Position,
            set_cookie: (String::new(), String::new()),
            no_identity_warning: Throttle::default(),
            forward_tokens: false,
            monotonic: false,
            max_staleness: None,
        };
        shared.refresh();
        shared
    }
}

impl<B> Shared<B> {
    /// Recomputes what is derived from the configuration.
    pub(crate) fn refresh(&mut self) {
        self.set_cookie = transport::set_cookie_template(self);
    }

    /// The requester's identity; `None` means no token may be read or issued.
    ///
    /// An identity function that answers with the empty (anonymous) id has
    /// found no one: that request is anonymous, and gets the anonymous id
    /// only when anonymous tokens are allowed.
    pub(crate) fn identify(&self, parts: &http::request::Parts) -> Option<UserId> {
        self.admit(self.identity.as_ref().and_then(|identify| identify(parts)))
    }

    /// `user` as a request's identity: the empty (anonymous) id, like no id,
    /// is the anonymous id where anonymous tokens are allowed and no one
    /// otherwise. Shared by the identity function and
    /// [`Db::bind_user`](crate::Db::bind_user).
    pub(crate) fn admit(&self, user: Option<UserId>) -> Option<UserId> {
        let anonymous_ok = self.allow_anonymous.unwrap_or(self.identity.is_none());
        let found = user.filter(|user| !user.is_anonymous());
        found.or_else(|| anonymous_ok.then(UserId::anonymous))
    }
}

impl<B> Clone for Shared<B> {
    fn clone(&self) -> Self {
        Shared {
            backend: Arc::clone(&self.backend),
            clusters: self.clusters.clone(),
            keys: self.keys.clone(),
            clock: Arc::clone(&self.clock),
            identity: self.identity.clone(),
            allow_anonymous: self.allow_anonymous,
            cookie_name: self.cookie_name.clone(),
            token_header: self.token_header.clone(),
            ttl: self.ttl,
            max_wait: self.max_wait,
            secure: self.secure,
            domain: self.domain.clone(),
            debug_header: self.debug_header.clone(),
            writes_on_unsafe_methods: self.writes_on_unsafe_methods,
            mode: self.mode,
            set_cookie: self.set_cookie.clone(),
            no_identity_warning: Throttle::default(),
            forward_tokens: self.forward_tokens,
            monotonic: self.monotonic,
            max_staleness: self.max_staleness,
        }
    }
}

impl<B> fmt::Debug for Shared<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("keys", &self.keys)
            .field("identity", &self.identity.as_ref().map(|_| "<fn>"))
            .field("allow_anonymous", &self.allow_anonymous)
            .field("cookie_name", &self.cookie_name)
            .field("token_header", &self.token_header)
            .field("ttl", &self.ttl)
            .field("max_wait", &self.max_wait)
            .field("secure", &self.secure)
            .field("domain", &self.domain)
            .field("debug_header", &self.debug_header.is_some())
            .field("writes_on_unsafe_methods", &self.writes_on_unsafe_methods)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod tests_identity;
#[cfg(test)]
mod tests_sessions;
#[cfg(test)]
mod tests_unread;

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
//!   rotation rolls out instance by instance (see [`KeySet`](crate::KeySet) for the order
//!   that avoids it); it costs no MAC and counts as `unknown_key` in
//!   `read_after_write_tokens_total`;
//! - one in a later release's token format, as when an upgrade that
//!   changes the format rolls out instance by instance: its head (key id,
//!   user tag, expiry) is read, its bookmarks are not, so it names every
//!   cluster ([later versions](crate::token#later-versions)); it costs no
//!   MAC and counts as `wrong_version`;
//! - one the MAC budget left unchecked;
//! - a valid token whose clusters found no room beside the other valid
//!   tokens' (more than [`MAX_CLUSTERS`](crate::bookmark::MAX_CLUSTERS)).
//!
//! None is treated as absent. Unless the request's valid tokens already
//! promise as much, every cluster such a token names (each one the layer
//! serves, for a backend that reports no cluster id) is read from the
//! primary: `reason="unknown_key"` for an unknown key, `unknown_version`
//! for a later format, `position_unknown` otherwise. A cluster it does not
//! name reads as it would without it. An expired one is absent like any
//! expired token: the TTL bounds every promise. So is one under an unknown key or in a later format that
//! claims an expiry more than [`MAX_TTL`] and a day ahead, which no
//! instance issues: random bytes that happen to parse, or a planted token
//! meant to pin a user for good. These are rows of [the failure table](crate::guide::failures#tokens),
//! with the tests that prove them.
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
//! With [`crate::Consistency::Monotonic`], a session (a user, or an
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
//!     });
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

pub use self::check::{CheckContext, SelfCheck};
pub use self::future::ResponseFuture;
pub use self::layer::ReadAfterWriteLayer;
pub use self::service::ReadAfterWrite;
pub use crate::config::{
    ConfigError, Consistency, DEBUG_HEADER, DEFAULT_CLUSTER, DEFAULT_COOKIE_NAME, DEFAULT_MAX_WAIT,
    DEFAULT_TOKEN_HEADER, DEFAULT_TTL, MAX_MACS_PER_REQUEST, MAX_TTL,
};

// The layer's tests, by topic, over the harness in `tests.rs`.
#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod tests_config;
#[cfg(test)]
mod tests_forwarding;
#[cfg(test)]
mod tests_hostile;
#[cfg(test)]
mod tests_identity;
#[cfg(test)]
mod tests_issuance;
#[cfg(test)]
mod tests_reading;
#[cfg(test)]
mod tests_routes;
#[cfg(test)]
mod tests_sessions;
#[cfg(test)]
mod tests_telemetry;
#[cfg(test)]
mod tests_unread;

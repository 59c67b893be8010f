//! Read-after-write consistency over PostgreSQL read replicas, as a Tower
//! middleware.
//!
//! A user who writes and is redirected should see their write, even when the
//! next page reads from an asynchronous replica 100 ms behind. After a request
//! writes, [`ReadAfterWriteLayer`] sets a short-lived, signed
//! `primary_affinity` cookie (and a header, for API and gRPC clients) holding
//! the user id and the primary's WAL position. On the user's later requests
//! the [`Db`] handle reads from a replica that has replayed that position,
//! waits a bounded moment if none has, and only then falls back to the
//! primary. Other users' reads stay eventual and cheap. Nothing is stored on
//! the server: web instances share only the signing keys.
//!
//! # Layout
//!
//! - [`position`]: [`Lsn`] and [`WritePosition`], what a token promises and a
//!   replica has replayed, with the WAL page-boundary rounding.
//! - [`token`]: [`AffinityToken`], its binary format and HMAC, and the
//!   [`KeySet`] that allows key rotation.
//! - [`clock`]: the [`Clock`] token expiry is read from, with a
//!   [`ManualClock`] for tests.
//! - [`backend`]: the [`Backend`] trait the layer routes through, and the
//!   [`RouteReason`] each read is counted under.
//! - [`middleware`]: [`ReadAfterWriteLayer`], the [`ReadAfterWrite`] service
//!   and its [`ResponseFuture`].
//! - [`handle`]: [`Db`], the per-request handle with `read`, `eventual`,
//!   `primary` and `write`.
//! - `extract` (feature `axum`): the axum extractor for [`Db`], with the
//!   notes on layer order.
//! - `pg` (feature `postgres`, on by default): [`PgReplicaSet`](pg::PgReplicaSet),
//!   the sqlx backend for a primary and its streaming replicas, and the
//!   [`ReplicaTracker`](pg::ReplicaTracker) that follows their replay positions.
//!
//! # Example
//!
//! See [`middleware`] for a complete, runnable example, and the README for
//! one on axum with a real PostgreSQL cluster.
//!
//! # Metrics
//!
//! Through the [`metrics`] facade: `read_after_write_reads_total{target,
//! reason}`, `read_after_write_tokens_total{outcome}`,
//! `read_after_write_tokens_issued_total`, `read_after_write_writes_total`
//! and `read_after_write_capture_failures_total`; backends add their own.

#![deny(missing_docs, unreachable_pub, unsafe_code)]
#![warn(rust_2018_idioms)]

pub mod backend;
pub mod clock;
#[cfg(feature = "axum")]
pub mod extract;
pub mod handle;
pub mod middleware;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod position;
mod telemetry;
pub mod token;

pub use backend::{Backend, RouteReason, Routed, Target};
pub use clock::{Clock, ManualClock, SystemClock};
pub use handle::{Db, TokenOutcome};
pub use middleware::{
    ConfigError, ReadAfterWrite, ReadAfterWriteLayer, ResponseFuture, MAX_MACS_PER_REQUEST, MAX_TTL,
};
pub use position::{Lsn, ParseLsnError, WalGeometry, WritePosition};
pub use token::{AffinityToken, KeyError, KeySet, SigningKey, TokenError, UserId, UserIdTooLong};

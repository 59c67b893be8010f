//! Read-after-write consistency over PostgreSQL read replicas, as a Tower
//! middleware.
//!
//! A user who writes and is redirected should see their write, even when the
//! next page reads from an asynchronous replica 100 ms behind. After a request
//! writes, [`ReadAfterWriteLayer`] sets a short-lived, signed
//! `primary_affinity` cookie (and a header, for API and gRPC clients) holding
//! the primary's WAL position and a keyed tag of the user (not the id itself). On the user's later requests
//! the [`Db`] handle reads from a replica proven to have replayed that
//! position, waits only while one is predicted to within a bound, and
//! otherwise reads the primary ([how routing decides](guide::routing)).
//! Other users' reads stay eventual and cheap. Nothing is stored on the
//! server: web instances share only the signing keys.
//!
//! # Layout
//!
//! - [`position`]: [`Lsn`] and [`WritePosition`], what a token promises and a
//!   replica has replayed, with the WAL page-boundary rounding.
//! - [`requirement`]: [`Requirement`], what reads acting for a user must
//!   see, in a text form that travels into job payloads and messages.
//! - [`bookmark`]: a session's place in each cluster, as a token carries
//!   it: the position its reads must include, and the replica it may stay
//!   on for monotonic reads.
//! - [`token`]: [`AffinityToken`], its binary format and HMAC, and the
//!   [`KeySet`] that allows key rotation.
//! - [`clock`]: the [`Clock`] token expiry is read from, with a
//!   [`ManualClock`] for tests.
//! - [`backend`]: the [`Backend`] trait the layer routes through, and the
//!   [`RouteReason`] each read is counted under.
//! - [`middleware`]: [`ReadAfterWriteLayer`], the [`ReadAfterWrite`] service
//!   and its [`ResponseFuture`].
//! - [`forward`]: [`ForwardTokenLayer`](forward::ForwardTokenLayer), which
//!   sends the handled request's token along with outgoing client calls.
//! - [`handle`]: [`Db`], the per-request handle with `read`, `eventual`,
//!   `primary` and `write`.
//! - `extract` (feature `axum`): the axum extractor for [`Db`], with the
//!   notes on layer order.
//! - [`guide`]: guide pages, each the one home of what it holds: the
//!   [configuration reference](guide::configuration),
//!   [how routing decides](guide::routing), the
//!   [failure table](guide::failures), [operations](guide::operations)
//!   (metrics, alerts, sizing, keys), [platforms](guide::platforms),
//!   [identity](guide::identity) (axum-login, tower-sessions, Loco),
//!   [testing your app](guide::testing) and the [evidence](guide::evidence)
//!   (the lab, fault drills, benchmarks).
//! - `pg` (feature `postgres`, on by default): [`PgReplicaSet`](pg::PgReplicaSet),
//!   the sqlx backend for a primary and its streaming replicas, the
//!   [`ReplicaTracker`](pg::ReplicaTracker) that follows their replay
//!   positions, and [`pg::driver`]: the same routing over another driver's
//!   pools.
//! - Other drivers, each a feature, each on the one routing engine:
//!   `sea_orm` (SeaORM 2 over the sqlx pools), `tokio_postgres`
//!   (deadpool-postgres pools) and `diesel_async` (its deadpool pools).
//!
//! # Quickstart
//!
//! ```toml
//! [dependencies]
//! read-after-write = { version = "0.1", features = ["axum", "tls-rustls"] } # `postgres` is on by default
//! sqlx = { version = "0.9", features = ["postgres", "runtime-tokio", "tls-rustls"] } # the sqlx this crate is built on
//! ```
//!
//! An axum app whose users always read their own posts, although reads go
//! to a replica: the layer binds tokens to the user an authentication layer
//! put into the request extensions, [`db.write()`](Db::write) marks the
//! request as writing (its response carries a fresh token), and
//! [`db.read().await`](Db::read) picks a replica that has replayed that
//! user's last write.
//!
//! ```no_run
//! # #[cfg(all(feature = "axum", feature = "postgres"))]
//! # mod quickstart {
//! use std::time::Duration;
//!
//! use axum::extract::Request;
//! use axum::http::StatusCode;
//! use axum::middleware::{self, Next};
//! use axum::response::Response;
//! use axum::routing::get;
//! use axum::{Extension, Router};
//! use read_after_write::pg::{PgDb, PgReplicaSet};
//! use read_after_write::{KeySet, ReadAfterWriteLayer, UserId};
//!
//! /// Who is signed in, as your authentication layer records it.
//! #[derive(Clone)]
//! struct CurrentUser {
//!     id: i64,
//! }
//!
//! /// A stand-in for real authentication: trusts an `x-user-id` header.
//! async fn authenticate(mut req: Request, next: Next) -> Result<Response, StatusCode> {
//!     let id = req
//!         .headers()
//!         .get("x-user-id")
//!         .and_then(|value| value.to_str().ok()?.parse().ok())
//!         .ok_or(StatusCode::UNAUTHORIZED)?;
//!     req.extensions_mut().insert(CurrentUser { id });
//!     Ok(next.run(req).await)
//! }
//!
//! async fn create_post(
//!     db: PgDb,
//!     Extension(user): Extension<CurrentUser>,
//!     content: String,
//! ) -> Result<StatusCode, StatusCode> {
//!     sqlx::query("insert into posts (user_id, content) values ($1, $2)")
//!         .bind(user.id)
//!         .bind(content)
//!         .execute(db.write()) // the primary; the response carries a fresh token
//!         .await
//!         .map_err(internal)?;
//!     Ok(StatusCode::CREATED)
//! }
//!
//! async fn my_posts(db: PgDb, Extension(user): Extension<CurrentUser>) -> Result<String, StatusCode> {
//!     // A replica that has replayed this user's last write, else the
//!     // primary after at most `max_wait`.
//!     let posts: Vec<String> =
//!         sqlx::query_scalar("select content from posts where user_id = $1 order by id")
//!             .bind(user.id)
//!             .fetch_all(db.read().await)
//!             .await
//!             .map_err(internal)?;
//!     Ok(posts.join("\n"))
//! }
//!
//! fn internal(error: sqlx::Error) -> StatusCode {
//!     tracing::error!(%error, "query failed");
//!     StatusCode::INTERNAL_SERVER_ERROR
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let replicas = PgReplicaSet::builder()
//!         .primary_url(std::env::var("DATABASE_URL")?)
//!         // One URL per replica, or one reader endpoint over several.
//!         .replica_urls(std::env::var("REPLICA_URLS")?.split(','))
//!         .connect()
//!         .await?;
//!     // One or more base64 keys, comma-separated, newest first:
//!     // `openssl rand -base64 32`. Every instance of the app shares them.
//!     let keys = KeySet::from_env("AFFINITY_KEY")?;
//!     let layer = ReadAfterWriteLayer::new(replicas, keys)
//!         .identity(|parts| parts.extensions.get::<CurrentUser>().map(|user| UserId::from(user.id)))
//!         .max_wait(Duration::from_millis(100)) // a bound; the default is DEFAULT_MAX_WAIT
//!         // `Secure` by default; COOKIE_SECURE=false for plain-HTTP development.
//!         .secure(std::env::var("COOKIE_SECURE").map_or(true, |value| value != "false"));
//!
//!     let app: Router = Router::new()
//!         .route("/posts", get(my_posts).post(create_post))
//!         .layer(layer) // inner: sees the `CurrentUser` that authentication inserted
//!         .layer(middleware::from_fn(authenticate)); // outer: runs first
//!
//!     // Serve `app` like any axum app, with a request timeout around it
//!     // (axum's `tokio` and `http1` features):
//!     // axum::serve(tokio::net::TcpListener::bind("127.0.0.1:3000").await?, app).await?;
//!     # let _ = app;
//!     Ok(())
//! }
//! # }
//! # fn main() {}
//! ```
//!
//! What a newcomer needs to know:
//!
//! - **`max_wait` bounds the wait** (default
//!   [`DEFAULT_MAX_WAIT`](middleware::DEFAULT_MAX_WAIT)): a read after a
//!   write waits for a replica only while one is predicted to replay the
//!   write within it, else reads the primary at once. See
//!   [how routing decides](guide::routing), sizing it in
//!   [operations](guide::operations), and every other setting in the
//!   [configuration reference](guide::configuration).
//! - **The cookie is `Secure` by default**, so browsers keep and send it
//!   only over HTTPS: over plain `http://` users silently get no
//!   read-your-writes. For plain-HTTP development turn it off with
//!   [`.secure(false)`](ReadAfterWriteLayer::secure); keep it on in
//!   production.
//! - **Prove what replicas hold**: grant `pg_monitor` to the role the
//!   tracker connects as, or (least privilege) create the heartbeat table
//!   ([`pg::HEARTBEAT_DDL`]). With neither, every
//!   read after a write goes to the primary (safe, costly), and
//!   [`check`](ReadAfterWriteLayer::check) says so. Where each managed
//!   PostgreSQL stands: [the platforms guide](guide::platforms).
//! - **Bound your handlers with a request timeout** (e.g. tower-http's
//!   `TimeoutLayer`, outside this layer). A frozen or partitioned primary
//!   makes queries hang without an error; the timeout is what drops them.
//!   What every other failure does: [the failure table](guide::failures).
//! - **Pick one user id type everywhere.** The token is bound to the id's bytes:
//!   `UserId::from(42i32)` and `UserId::from(42i64)` are different users
//!   (see [`UserId`]).
//!
//! Without the `axum` feature, take the handle from the request extensions
//! (`req.extensions().get::<Db<PgReplicaSet>>()`); [`middleware`] has a
//! runnable example on plain Tower.
//!
//! # Metrics
//!
//! Through the [metrics](https://docs.rs/metrics) facade, from the layer
//! (reads by target and reason, tokens by outcome, writes, captures) and
//! the PostgreSQL backend (replica lag, health, divergence, the canary).
//! Every metric, the alert rules and the dashboard that ship with the
//! repository: [the operations guide](guide::operations).

#![deny(missing_docs, unreachable_pub, unsafe_code)]
#![warn(rust_2018_idioms)]
// docs.rs builds with `--cfg docsrs` on nightly (see Cargo.toml), where
// `doc_cfg` labels feature-gated items ("Available on crate feature `axum`
// only"). Inert on stable. (`doc_auto_cfg` was merged into it in 1.92.)
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(any(feature = "tokio-postgres", feature = "diesel-async"))]
mod admitted;
pub mod backend;
pub mod bookmark;
pub mod clock;
mod config;
#[cfg(feature = "diesel-async")]
pub mod diesel_async;
#[cfg(feature = "axum")]
pub mod extract;
pub mod forward;
pub mod guide;
pub mod handle;
mod issue;
pub mod middleware;
#[cfg(feature = "postgres")]
pub mod pg;
pub mod position;
mod request;
pub mod requirement;
#[cfg(feature = "sea-orm")]
pub mod sea_orm;
pub mod sqlstate;
mod telemetry;
#[cfg(test)]
mod testing;
pub mod token;
#[cfg(feature = "tokio-postgres")]
pub mod tokio_postgres;

// The shared test double (`testing::FakeBackend`) is written against the
// public API, as `read_after_write::…`, so the integration tests and benches
// can include it by path: this name lets the unit tests compile it too.
#[cfg(test)]
extern crate self as read_after_write;

pub use backend::{Backend, Finding, LayerSettings, RouteReason, Routed, Severity, Target};
pub use bookmark::{Bookmark, Bookmarks, ReplicaTag};
pub use clock::{Clock, ManualClock, SystemClock};
pub use handle::{Db, Route, TokenOutcome};
pub use middleware::{
    CheckContext, ConfigError, Consistency, ReadAfterWrite, ReadAfterWriteLayer, ResponseFuture,
    SelfCheck, MAX_MACS_PER_REQUEST, MAX_TTL,
};
pub use position::{Lsn, ParseLsnError, WalGeometry, WritePosition};
pub use requirement::{ParseRequirementError, Requirement};
pub use token::{
    AffinityToken, BookmarkCountError, KeyError, KeySet, SigningKey, TokenError, UserId,
    UserIdTooLong,
};

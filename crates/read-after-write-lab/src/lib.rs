//! The project's showcase and measuring bench: the social app that the
//! `social` example serves and the lab drives.
//!
//! # Layout
//!
//! - [`social`]: the social app's router, handlers and schema, compiled from
//!   `examples/social/app.rs` so the example, the tests in `tests/` and the
//!   lab run the very same code.
//! - [`tokio_social`]: the same JSON API over tokio-postgres
//!   (deadpool-postgres pools), compiled from `examples/tokio_postgres/app.rs`
//!   for the `tokio_postgres` example, its test, the lab's
//!   `adaptive-tokio-postgres` strategy and the drills' `--backend
//!   tokio-postgres`.
//! - [`diesel_social`]: the same JSON API over diesel-async, compiled from
//!   `examples/diesel_async/app.rs` for the `diesel_async` example, its
//!   test and the drills' `--backend diesel-async`.
//! - [`sea_social`]: the same JSON API over SeaORM 2 (entities and partial
//!   models on the sqlx pools), compiled from `examples/sea_orm/app.rs` for
//!   the `sea_orm` example, its test and the drills' `--backend sea-orm`.
//! - [`jobs`]: background jobs that read their user's writes, compiled
//!   from `examples/jobs/jobs.rs` for the `jobs` example and its test.
//! - [`schema`]: waiting for a new table to reach the replicas.
//! - [`roles`]: the database roles the app connects as (superuser, with
//!   `pg_monitor`, plain), for the lab and the drills alike.
//! - [`lab`]: the lab that `cargo run --release` runs at the workspace root:
//!   strategies, virtual users and reports.
//! - [`drills`]: the fault campaign that the `drills` binary runs: a load
//!   generator that logs every operation, fault drills on a real cluster
//!   behind a TCP proxy, and a checker that judges the history afterwards.

#![deny(unsafe_code)]

#[path = "../../../examples/social/app.rs"]
pub mod social;

#[path = "../../../examples/tokio_postgres/app.rs"]
pub mod tokio_social;

#[path = "../../../examples/diesel_async/app.rs"]
pub mod diesel_social;

#[path = "../../../examples/sea_orm/app.rs"]
pub mod sea_social;

#[path = "../../../examples/jobs/jobs.rs"]
pub mod jobs;

pub mod drills;
pub mod lab;
pub mod roles;
pub mod schema;

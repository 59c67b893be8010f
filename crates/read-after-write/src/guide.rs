//! Guide pages: longer material than an item's docs, written once and
//! linked from wherever it applies.
//!
//! - [`configuration`]: every setting, where it lives, and its default.
//! - [`routing`]: how a read picks its node: the routing rule.
//! - [`failures`]: the failure table, each row with the test that proves it.
//! - [`operations`]: metrics, alert rules and the dashboard, sizing
//!   `max_wait` and the TTL, key rotation, incidents, connections.
//! - [`platforms`]: where each managed PostgreSQL stands.
//! - [`identity`]: where tokens get their user: axum-login, tower-sessions
//!   and Loco.
//! - [`testing`]: testing your own app on real lagging clusters.
//! - [`evidence`]: the lab, the fault campaign and the benchmarks, with the
//!   commands that reproduce them.

#[doc = include_str!("../docs/configuration.md")]
pub mod configuration {}

#[doc = include_str!("../docs/routing.md")]
pub mod routing {}

#[doc = include_str!("../docs/failures.md")]
pub mod failures {}

#[doc = include_str!("../docs/operations.md")]
pub mod operations {}

#[doc = include_str!("../docs/platforms.md")]
pub mod platforms {}

#[doc = include_str!("../docs/identity.md")]
pub mod identity {}

#[doc = include_str!("../docs/testing.md")]
pub mod testing {}

#[doc = include_str!("../docs/evidence.md")]
pub mod evidence {}

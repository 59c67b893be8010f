//! The project's showcase and measuring bench: the social app that the
//! `social` example serves and the lab drives.
//!
//! # Layout
//!
//! - [`social`]: the social app's router, handlers and schema, compiled from
//!   `examples/social/app.rs` so the example, the tests in `tests/` and the
//!   lab run the very same code.
//! - [`lab`]: the lab that `cargo run --release` runs at the workspace root:
//!   strategies, virtual users and reports.

#![deny(unsafe_code)]

#[path = "../../../examples/social/app.rs"]
pub mod social;

pub mod lab;

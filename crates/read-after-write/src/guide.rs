//! Guide pages: longer material than an item's docs, written once and
//! linked from wherever it applies.

#[doc = include_str!("../docs/platforms.md")]
pub mod platforms {}

//! The social app's tables as diesel sees them, and the SQL that renders
//! their timestamps.
//!
//! The tables are created by the social app's migrations
//! (`examples/social/migrations`), which [`migrate`](super::migrate) runs:
//! these definitions only mirror them. The timestamps are `timestamptz`,
//! which diesel reads into Rust only with its `chrono` or `time` feature;
//! the API serves them as text anyway, so the server formats them (as the
//! sqlx and tokio-postgres apps do) and diesel reads a `Text`.

use diesel::dsl;
use diesel::expression::functions::declare_sql_function;
use diesel::sql_types::{Text, Timestamp, Timestamptz};

diesel::table! {
    /// What users post.
    posts (id) {
        /// The post's id, from a sequence.
        id -> Int8,
        /// Its author.
        user_id -> Int8,
        /// What was posted.
        content -> Text,
        /// When it was written.
        created_at -> Timestamptz,
    }
}

diesel::table! {
    /// One profile per user, written by `PUT /api/profile` and sign-up.
    profiles (user_id) {
        /// Whose profile.
        user_id -> Int8,
        /// Display name.
        name -> Text,
        /// About the user.
        bio -> Text,
        /// When it last changed.
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    /// The accounts sign-up creates; ids start at 1,000,000.
    accounts (id) {
        /// The account's id, the user id it signs in as.
        id -> Int8,
        /// The name given at sign-up.
        name -> Text,
        /// When it was created.
        created_at -> Timestamptz,
    }
}

diesel::table! {
    /// A row per login.
    logins (id) {
        /// The login's id, from a sequence.
        id -> Int8,
        /// Who logged in.
        user_id -> Int8,
        /// When.
        at -> Timestamptz,
    }
}

#[declare_sql_function]
extern "SQL" {
    /// PostgreSQL's `timezone(zone, t)`, which `t at time zone zone`
    /// stands for: the wall-clock time in `zone`, without a zone.
    fn timezone(zone: Text, t: Timestamptz) -> Timestamp;

    /// PostgreSQL's `to_char(t, format)`.
    fn to_char(t: Timestamp, format: Text) -> Text;
}

/// RFC 3339 in UTC with microseconds, the social app's rendering of a
/// timestamp (`2026-12-04T01:30:33.123456Z`).
const RFC3339_UTC: &str = "YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"";

/// `posts.created_at` as RFC 3339 text in UTC, formatted by the server.
#[dsl::auto_type]
pub fn post_created_at() -> _ {
    let utc: &'static str = "UTC";
    let format: &'static str = RFC3339_UTC;
    to_char(timezone(utc, posts::created_at), format)
}

/// `logins.at` as RFC 3339 text in UTC, formatted by the server.
#[dsl::auto_type]
pub fn login_at() -> _ {
    let utc: &'static str = "UTC";
    let format: &'static str = RFC3339_UTC;
    to_char(timezone(utc, logins::at), format)
}

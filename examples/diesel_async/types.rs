//! The API's JSON, in the shapes the sqlx social app (`examples/social`)
//! and the tokio-postgres one answer, so one client talks to all three.
//! The types read from the database derive diesel's `Queryable` and
//! `Selectable`, their timestamps selected as text ([`super::schema`]).

use diesel::prelude::*;
use serde::{Deserialize, Serialize};

use super::schema::{login_at, logins, post_created_at, posts, profiles};

/// A post as the API returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = posts, check_for_backend(diesel::pg::Pg))]
pub struct Post {
    /// The post's id.
    pub id: i64,
    /// Its author.
    pub user_id: i64,
    /// What was posted.
    pub content: String,
    /// When, RFC 3339 in UTC.
    #[diesel(select_expression = post_created_at())]
    pub created_at: String,
}

/// The body of `POST /api/posts`.
#[derive(Debug, Deserialize)]
pub struct NewPost {
    /// What to post.
    pub content: String,
}

/// The answer to `POST /api/posts` and `POST /api/signup`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Created {
    /// The new post's (or account's) id.
    pub id: i64,
}

/// A profile as the API returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = profiles, check_for_backend(diesel::pg::Pg))]
pub struct Profile {
    /// Whose profile.
    pub user_id: i64,
    /// Display name.
    pub name: String,
    /// About the user.
    pub bio: String,
}

/// The body of `PUT /api/profile`.
#[derive(Debug, Deserialize)]
pub struct ProfileUpdate {
    /// Display name.
    pub name: String,
    /// About the user.
    #[serde(default)]
    pub bio: String,
}

/// The body of `POST /api/signup`.
#[derive(Debug, Deserialize)]
pub struct SignUp {
    /// Display name.
    pub name: String,
}

/// The body of `POST /api/login`.
#[derive(Debug, Deserialize)]
pub struct Login {
    /// Who signs in (demo-only: no password).
    pub user_id: i64,
}

/// The answer to `POST /api/login`.
#[derive(Debug, Serialize, Deserialize)]
pub struct LoggedIn {
    /// The login row's id.
    pub login_id: i64,
}

/// One login, as the dashboard shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = logins, check_for_backend(diesel::pg::Pg))]
pub struct LoginRecord {
    /// The login row's id.
    pub id: i64,
    /// When, RFC 3339 in UTC.
    #[diesel(select_expression = login_at())]
    pub at: String,
}

/// The answer to `GET /api/dashboard`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Dashboard {
    /// Whose dashboard.
    pub user_id: i64,
    /// Their latest login, if they ever logged in.
    pub last_login: Option<LoginRecord>,
    /// How many posts they have.
    pub posts: i64,
}

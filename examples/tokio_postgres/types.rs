//! The API's JSON: the same shapes as the social app's
//! (`examples/social/app.rs`), so a client of one is a client of the other.

use serde::{Deserialize, Serialize};
use tokio_postgres::Row;

/// A post as the API returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Post {
    /// The post's id.
    pub id: i64,
    /// Its author.
    pub user_id: i64,
    /// What was posted.
    pub content: String,
    /// When, RFC 3339 in UTC.
    pub created_at: String,
}

impl Post {
    /// From a row with the post's columns.
    pub(super) fn from_row(row: &Row) -> Result<Post, tokio_postgres::Error> {
        Ok(Post {
            id: row.try_get("id")?,
            user_id: row.try_get("user_id")?,
            content: row.try_get("content")?,
            created_at: row.try_get("created_at")?,
        })
    }
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Profile {
    /// Whose profile.
    pub user_id: i64,
    /// Display name.
    pub name: String,
    /// About the user.
    pub bio: String,
}

impl Profile {
    /// From a row with the profile's columns.
    pub(super) fn from_row(row: &Row) -> Result<Profile, tokio_postgres::Error> {
        Ok(Profile {
            user_id: row.try_get("user_id")?,
            name: row.try_get("name")?,
            bio: row.try_get("bio")?,
        })
    }
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoginRecord {
    /// The login row's id.
    pub id: i64,
    /// When, RFC 3339 in UTC.
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

//! The API's JSON, in the shapes the sqlx social app (`examples/social`)
//! and the other drivers' apps answer, so one client talks to all of them.
//! The types read from the database are SeaORM partial models of
//! [`super::entities`]: each selects just its fields, the timestamps as
//! the server formats them.

use sea_orm::sea_query::Expr;
use sea_orm::DerivePartialModel;
use serde::{Deserialize, Serialize};

use super::entities::{login, post, profile};

/// A post as the API returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, DerivePartialModel)]
#[sea_orm(entity = "post::Entity")]
pub struct Post {
    /// The post's id.
    pub id: i64,
    /// Its author.
    pub user_id: i64,
    /// What was posted.
    pub content: String,
    /// When, RFC 3339 in UTC.
    #[sea_orm(from_expr = "Expr::cust(post::CREATED_AT)")]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, DerivePartialModel)]
#[sea_orm(entity = "profile::Entity")]
pub struct Profile {
    /// Whose profile.
    pub user_id: i64,
    /// Display name.
    pub name: String,
    /// About the user.
    pub bio: String,
}

impl From<profile::Model> for Profile {
    /// The row an upsert returns, as the API shows it.
    fn from(row: profile::Model) -> Self {
        Profile {
            user_id: row.user_id,
            name: row.name,
            bio: row.bio,
        }
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, DerivePartialModel)]
#[sea_orm(entity = "login::Entity")]
pub struct LoginRecord {
    /// The login row's id.
    pub id: i64,
    /// When, RFC 3339 in UTC.
    #[sea_orm(from_expr = "Expr::cust(login::AT)")]
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

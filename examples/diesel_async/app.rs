//! The diesel-async app: a table, three handlers and the router. `main.rs`
//! serves it; `tests/diesel_async.rs` drives it on a lagging cluster.
//!
//! Each handler asks its [`DieselDb`] for the pool its access is routed to
//! and checks a connection out of it: `db.write()` (the primary, and marks
//! the request as writing), `db.read().await` (a replica that has the
//! user's last write, waiting for one briefly, else the primary) or
//! `db.eventual()` (any healthy replica).

use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use diesel::prelude::*;
use diesel_async::pooled_connection::deadpool::{Pool, PoolError};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use read_after_write::diesel_async::{DieselDb, DieselReplicaSet};
use read_after_write::{KeySet, ReadAfterWriteLayer, UserId};

diesel::table! {
    /// The posts: the SeaORM example's table (the social app's has these
    /// columns and more), so the examples can share a database.
    posts (id) {
        /// The post's id, from a sequence.
        id -> Int8,
        /// Who wrote it.
        user_id -> Int8,
        /// What they wrote.
        content -> Text,
    }
}

/// One post, as stored and as served.
#[derive(Clone, Debug, PartialEq, Eq, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = posts, check_for_backend(diesel::pg::Pg))]
pub struct Post {
    /// The post's id.
    pub id: i64,
    /// Who wrote it.
    pub user_id: i64,
    /// What they wrote.
    pub content: String,
}

/// The longest post accepted, in bytes.
pub const MAX_POST_BYTES: usize = 4096;

/// How many posts a list returns at most (the newest).
const PAGE: i64 = 100;

/// `POST /posts`: the body, as text, becomes the user's new post, inserted
/// on the primary through `db.write()`; the response carries a fresh token.
async fn create_post(
    db: DieselDb,
    user: CurrentUser,
    content: String,
) -> Result<Json<Post>, AppError> {
    let content = validate(content)?;
    let mut conn = db.write().get().await?; // write(): the primary, and marks the request
    let created = diesel::insert_into(posts::table)
        .values((posts::user_id.eq(user.id), posts::content.eq(content)))
        .returning(Post::as_returning())
        .get_result(&mut conn)
        .await?;
    Ok(Json(created))
}

/// `GET /posts`: the user's own posts, newest first, from a replica that
/// has their last write.
async fn my_posts(db: DieselDb, user: CurrentUser) -> Result<Json<Vec<Post>>, AppError> {
    let mut conn = db.read().await.get().await?; // read() may wait for a replica: .await it
    let found = posts::table
        .filter(posts::user_id.eq(user.id))
        .order(posts::id.desc())
        .limit(PAGE)
        .select(Post::as_select())
        .load(&mut conn)
        .await?;
    Ok(Json(found))
}

/// `GET /feed`: everyone's latest posts, eventually consistent.
async fn feed(db: DieselDb) -> Result<Json<Vec<Post>>, AppError> {
    let mut conn = db.eventual().get().await?;
    let found = posts::table
        .order(posts::id.desc())
        .limit(20)
        .select(Post::as_select())
        .load(&mut conn)
        .await?;
    Ok(Json(found))
}

/// A post's text, or why it cannot be one. PostgreSQL's `text` refuses NUL
/// bytes, so they are caught here rather than as a database error.
fn validate(content: String) -> Result<String, AppError> {
    if content.trim().is_empty() {
        return Err(AppError::Invalid("a post needs some text"));
    }
    if content.len() > MAX_POST_BYTES {
        return Err(AppError::Invalid("a post is at most 4096 bytes"));
    }
    if content.contains('\0') {
        return Err(AppError::Invalid("a post cannot contain NUL characters"));
    }
    Ok(content)
}

/// The layer: tokens bound to the user authentication found.
pub fn layer(replicas: DieselReplicaSet, keys: KeySet) -> ReadAfterWriteLayer<DieselReplicaSet> {
    ReadAfterWriteLayer::new(replicas, keys)
        .identity(|parts| Some(UserId::from(parts.extensions.get::<CurrentUser>()?.id)))
        // The cookie is `Secure` (HTTPS only) by default; this demo serves HTTP.
        .secure(false)
}

/// The app: diesel-async handlers behind the layer, authentication outside it.
pub fn router(layer: ReadAfterWriteLayer<DieselReplicaSet>) -> Router {
    Router::new()
        .route("/posts", get(my_posts).post(create_post))
        .route("/feed", get(feed))
        .layer(layer) // inner: sees the user authentication inserted
        .layer(middleware::from_fn(authenticate)) // outer: runs first
}

/// Creates the table on the primary, if missing, with raw SQL.
pub async fn create_table(
    primary: &Pool<AsyncPgConnection>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut conn = primary.get().await?;
    conn.batch_execute(
        "create table if not exists posts \
         (id bigserial primary key, user_id bigint not null, content text not null)",
    )
    .await?;
    Ok(())
}

/// Who is asking, as your authentication layer puts it into the request's
/// extensions.
#[derive(Clone, Copy, Debug)]
pub struct CurrentUser {
    /// The user's id.
    pub id: i64,
}

/// Stand-in authentication: trusts an `x-user-id` header. Use your own.
/// No header is 401; one that is not an integer is 400.
async fn authenticate(mut request: Request, next: Next) -> Response {
    let Some(value) = request.headers().get("x-user-id") else {
        return (StatusCode::UNAUTHORIZED, "send an x-user-id header\n").into_response();
    };
    let Some(id) = value.to_str().ok().and_then(|v| v.trim().parse().ok()) else {
        return (StatusCode::BAD_REQUEST, "x-user-id must be an integer\n").into_response();
    };
    request.extensions_mut().insert(CurrentUser { id });
    next.run(request).await
}

impl<S: Send + Sync> FromRequestParts<S> for CurrentUser {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, StatusCode> {
        parts
            .extensions
            .get::<CurrentUser>()
            .copied()
            .ok_or(StatusCode::UNAUTHORIZED)
    }
}

/// What a handler can fail with, and the status each maps to.
#[derive(Debug)]
pub enum AppError {
    /// The request's input is unusable: 422, saying why.
    Invalid(&'static str),
    /// No connection in time, or the node failed: 503, try again.
    Pool(PoolError),
    /// The query failed: 503 (every input is checked before it reaches a
    /// query, so this is the database's side).
    Query(diesel::result::Error),
}

impl From<PoolError> for AppError {
    fn from(error: PoolError) -> Self {
        AppError::Pool(error)
    }
}

impl From<diesel::result::Error> for AppError {
    fn from(error: diesel::result::Error) -> Self {
        AppError::Query(error)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        match self {
            AppError::Invalid(why) => (StatusCode::UNPROCESSABLE_ENTITY, format!("{why}\n")),
            AppError::Pool(error) => {
                eprintln!("no database connection: {error}");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database unavailable\n".to_owned(),
                )
            }
            AppError::Query(error) => {
                eprintln!("database error: {error}");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database unavailable\n".to_owned(),
                )
            }
        }
        .into_response()
    }
}

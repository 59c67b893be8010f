//! The social app's JSON API over diesel-async: the routes, JSON, status
//! codes and consistency choices of `examples/social/app.rs` (and of the
//! tokio-postgres example), each query written with diesel's DSL and run
//! on an `AsyncPgConnection` checked out of the pool its access is routed
//! to.
//!
//! | access | route | pool |
//! |---|---|---|
//! | the user's own data | `GET /api/posts`, `GET /api/profile/{id}`, `GET /api/dashboard` | `db.read().await` |
//! | everyone's, eventual | `GET /api/feed` | `db.eventual()` |
//! | a critical read | `GET /api/posts/{id}` | `db.primary()` |
//! | writes | `POST /api/posts`, `PUT /api/profile`, `POST /api/signup`, `POST /api/login` | `db.write()` |
//!
//! The handlers are generic over the [`Backend`], so the app runs on a
//! [`DieselReplicaSet`](read_after_write::diesel_async::DieselReplicaSet)
//! or on any backend that hands out the same pools (one that wraps it to
//! measure it, say).
//!
//! Identity is demo-only, as in the social app: the `x-user-id: <integer>`
//! header, else the `demo_user` cookie that sign-up and login set. Sign-up
//! and login learn who the requester is inside the handler and call
//! [`Db::bind_user`], so the next page sees the rows they wrote. The social
//! app's HTML page and `/metrics` are left out.
//!
//! The schema is the social app's: [`migrate`] runs its migrations with
//! the routing engine's own sqlx pool on the primary, so the sqlx,
//! tokio-postgres and diesel-async apps can share one database;
//! [`schema`] holds diesel's view of its tables.

use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::header::{COOKIE, SET_COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{BoxError, Json, Router};
use diesel::prelude::*;
use diesel::result::DatabaseErrorKind;
use diesel::upsert::excluded;
use read_after_write::diesel_async::diesel_async::pooled_connection::deadpool::{Pool, PoolError};
use read_after_write::diesel_async::diesel_async::{
    AsyncConnection, AsyncPgConnection, RunQueryDsl,
};
use read_after_write::pg::PgReplicaSet;
use read_after_write::{Backend, Db, KeySet, ReadAfterWriteLayer, UserId};
use tower::ServiceBuilder;

#[path = "schema.rs"]
pub mod schema;
#[path = "types.rs"]
mod types;
pub use types::*;

use schema::{accounts, logins, posts, profiles};

/// The pool every access is routed to: diesel-async's deadpool pool.
pub type DieselPool = Pool<AsyncPgConnection>;

/// The header that carries the demo identity.
pub const USER_HEADER: &str = "x-user-id";
/// The cookie sign-up and login set, the demo identity's fallback.
pub const USER_COOKIE: &str = "demo_user";
/// The longest post accepted, in characters.
pub const MAX_POST_CHARS: usize = 2_000;
/// How many posts a list returns at most (the newest).
const PAGE: i64 = 100;

/// How the app's layer is configured.
#[derive(Clone, Debug)]
pub struct AppConfig {
    /// Signing keys, shared by every instance.
    pub keys: KeySet,
    /// `Secure` on the affinity cookie; off for plain-HTTP development.
    pub cookie_secure: bool,
    /// How long a session read may wait for a replica before the primary;
    /// `None` leaves the layer's default.
    pub max_wait: Option<Duration>,
    /// Add the `x-read-after-write` debug header to responses.
    pub debug_header: bool,
    /// Answer 503 when a request takes longer than this. The pools bound
    /// checkouts and connection attempts, not queries, and diesel-async
    /// has no query timeout: a query on a frozen server never returns on
    /// its own, so the app bounds its requests. `None` leaves them
    /// unbounded.
    pub request_timeout: Option<Duration>,
}

/// Runs the social app's migrations on the primary through the routing
/// engine's sqlx pool (`pools.set()`), recorded in sqlx's table: the
/// social and tokio-postgres examples, run on the same database, find
/// them done (and this finds theirs).
pub async fn migrate(set: &PgReplicaSet) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("../../examples/social/migrations")
        .run(set.primary_pool())
        .await
}

/// The app's API behind the read-after-write layer, and `/healthz`.
pub fn router<B>(backend: B, replicas: PgReplicaSet, config: &AppConfig) -> Router
where
    B: Backend<Pool = DieselPool>,
{
    router_with_layer(layer(backend, config), replicas, config)
}

/// The app's read-after-write layer over `backend`: the demo identity,
/// and the cookie, debug header and `max_wait` of `config`. Adjust it (a
/// consistency mode, say) and serve it with [`router_with_layer`].
pub fn layer<B>(backend: B, config: &AppConfig) -> ReadAfterWriteLayer<B>
where
    B: Backend<Pool = DieselPool>,
{
    let layer = ReadAfterWriteLayer::new(backend, config.keys.clone())
        .identity(demo_identity)
        .secure(config.cookie_secure)
        .debug_header(config.debug_header);
    match config.max_wait {
        Some(max_wait) => layer.max_wait(max_wait),
        None => layer,
    }
}

/// [`router`] with a layer of your own (from [`layer`], adjusted);
/// `replicas` (the routing engine, `pools.set()`) answers `/healthz`, and
/// of `config` only the request timeout is used here.
pub fn router_with_layer<B>(
    layer: ReadAfterWriteLayer<B>,
    replicas: PgReplicaSet,
    config: &AppConfig,
) -> Router
where
    B: Backend<Pool = DieselPool>,
{
    let router = Router::new()
        .route("/api/posts", post(create_post::<B>).get(my_posts::<B>))
        .route("/api/posts/{id}", get(post_by_id::<B>))
        .route("/api/feed", get(feed::<B>))
        .route("/api/profile", put(put_profile::<B>))
        .route("/api/profile/{user_id}", get(get_profile::<B>))
        .route("/api/signup", post(sign_up::<B>))
        .route("/api/login", post(log_in::<B>))
        .route("/api/dashboard", get(dashboard::<B>))
        .route_layer(layer)
        .route("/healthz", get(healthz))
        .with_state(replicas);
    match config.request_timeout {
        // Around every route, the layer's capture included: when it fires,
        // the handler's future is dropped, and the query it awaited with it.
        Some(limit) => router.layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(request_timed_out))
                .timeout(limit),
        ),
        None => router,
    }
}

/// The answer to a request that outlived [`AppConfig::request_timeout`]:
/// 503, which clients retry like any unavailable backend.
async fn request_timed_out(error: BoxError) -> (StatusCode, String) {
    if error.is::<tower::timeout::error::Elapsed>() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "request timed out, try again".to_owned(),
        )
    } else {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unhandled error: {error}"),
        )
    }
}

/// Demo-only identity: the `x-user-id` header, else the `demo_user` cookie.
pub fn demo_identity(parts: &Parts) -> Option<UserId> {
    user_from_headers(&parts.headers).map(UserId::from)
}

/// The header's user if there is one (an unparsable header is no one, not
/// the cookie's user), else the cookie's.
fn user_from_headers(headers: &HeaderMap) -> Option<i64> {
    if let Some(value) = headers.get(USER_HEADER) {
        return value.to_str().ok()?.trim().parse().ok();
    }
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|text| text.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == USER_COOKIE)
        .and_then(|(_, value)| value.parse().ok())
}

/// The requester, or 401.
struct DemoUser(i64);

impl<S: Send + Sync> FromRequestParts<S> for DemoUser {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        user_from_headers(&parts.headers)
            .map(DemoUser)
            .ok_or(AppError::Unauthenticated)
    }
}

/// What a handler can fail with, as an HTTP response.
#[derive(Debug)]
pub enum AppError {
    /// No `x-user-id` header or `demo_user` cookie.
    Unauthenticated,
    /// The request's content is unacceptable.
    Invalid(&'static str),
    /// Nothing with that id.
    NotFound,
    /// No connection could be checked out of the pool.
    Pool(PoolError),
    /// A query failed.
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

impl AppError {
    /// 503 where the database could not serve the request now (no
    /// connection in time, one that could not be opened, a closed pool, a
    /// query that could not be sent or lost its connection, a write on a
    /// primary that was demoted), as the social app answers; 500 for the
    /// rest. diesel hands over no SQLSTATE beyond a few kinds, so a server
    /// going away mid-query (`57P01`, see [`read_after_write::sqlstate`])
    /// is a 500 here unless its connection is seen closed.
    fn database_status(&self) -> StatusCode {
        let unreachable = match self {
            AppError::Pool(PoolError::NoRuntimeSpecified) => false,
            AppError::Pool(_) => true,
            AppError::Query(diesel::result::Error::DatabaseError(kind, _)) => matches!(
                kind,
                DatabaseErrorKind::UnableToSendCommand
                    | DatabaseErrorKind::ClosedConnection
                    | DatabaseErrorKind::ReadOnlyTransaction
            ),
            _ => false,
        };
        if unreachable {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        match self {
            AppError::Unauthenticated => (
                StatusCode::UNAUTHORIZED,
                "send x-user-id: <integer> (demo-only identity)",
            )
                .into_response(),
            AppError::Invalid(why) => (StatusCode::UNPROCESSABLE_ENTITY, why).into_response(),
            AppError::NotFound => StatusCode::NOT_FOUND.into_response(),
            AppError::Pool(_) | AppError::Query(_) => {
                let status = self.database_status();
                match &self {
                    AppError::Pool(error) => tracing::error!(%error, "database error"),
                    error => tracing::error!(?error, "database error"),
                }
                (status, "database unavailable, try again").into_response()
            }
        }
    }
}

/// Text PostgreSQL cannot store: a NUL character. Refused as invalid
/// input, not left for the server to fail the query with (a 500).
fn storable(text: &str) -> bool {
    !text.contains('\0')
}

fn validate_name(name: &str) -> Result<&str, AppError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(AppError::Invalid("name must be 1 to 100 characters"));
    }
    if !storable(name) {
        return Err(AppError::Invalid("name must not contain NUL characters"));
    }
    Ok(name)
}

fn validate(content: &str) -> Result<&str, AppError> {
    let content = content.trim();
    if content.is_empty() {
        return Err(AppError::Invalid("content must not be empty"));
    }
    if content.chars().count() > MAX_POST_CHARS {
        return Err(AppError::Invalid("content is longer than 2000 characters"));
    }
    if !storable(content) {
        return Err(AppError::Invalid("content must not contain NUL characters"));
    }
    Ok(content)
}

// diesel-async caches each connection's prepared statements for queries
// whose SQL is fixed at compile time, as all of these are (values are
// bound): after a connection's first, each query is one round trip, as
// sqlx's statement cache makes it for the social app.

/// `POST /api/posts {"content"}`: 201 with the id.
async fn create_post<B: Backend<Pool = DieselPool>>(
    db: Db<B>,
    DemoUser(user): DemoUser,
    Json(body): Json<NewPost>,
) -> Result<(StatusCode, Json<Created>), AppError> {
    let content = validate(&body.content)?;
    let mut conn = db.write().get().await?; // write(): the primary, and marks the request
    let id = diesel::insert_into(posts::table)
        .values((posts::user_id.eq(user), posts::content.eq(content)))
        .returning(posts::id)
        .get_result(&mut conn)
        .await?;
    Ok((StatusCode::CREATED, Json(Created { id })))
}

/// `GET /api/posts`: the user's own 100 newest posts. Session-consistent.
async fn my_posts<B: Backend<Pool = DieselPool>>(
    db: Db<B>,
    DemoUser(user): DemoUser,
) -> Result<Json<Vec<Post>>, AppError> {
    let mut conn = db.read().await.get().await?; // read() may wait for a replica: .await it
    let found = posts::table
        .filter(posts::user_id.eq(user))
        .order(posts::id.desc())
        .limit(PAGE)
        .select(Post::as_select())
        .load(&mut conn)
        .await?;
    Ok(Json(found))
}

/// `GET /api/feed`: the latest 100 posts by anyone. Eventual.
async fn feed<B: Backend<Pool = DieselPool>>(db: Db<B>) -> Result<Json<Vec<Post>>, AppError> {
    let mut conn = db.eventual().get().await?;
    let found = posts::table
        .order(posts::id.desc())
        .limit(PAGE)
        .select(Post::as_select())
        .load(&mut conn)
        .await?;
    Ok(Json(found))
}

/// `GET /api/posts/{id}`: one post, a critical read from the primary.
async fn post_by_id<B: Backend<Pool = DieselPool>>(
    db: Db<B>,
    Path(id): Path<i64>,
) -> Result<Json<Post>, AppError> {
    let mut conn = db.primary().get().await?;
    let found = posts::table
        .find(id)
        .select(Post::as_select())
        .first(&mut conn)
        .await
        .optional()?;
    found.map(Json).ok_or(AppError::NotFound)
}

/// `PUT /api/profile {"name","bio"}`: creates or replaces the user's
/// profile; 200 with it.
async fn put_profile<B: Backend<Pool = DieselPool>>(
    db: Db<B>,
    DemoUser(user): DemoUser,
    Json(update): Json<ProfileUpdate>,
) -> Result<Json<Profile>, AppError> {
    let name = validate_name(&update.name)?;
    if update.bio.chars().count() > MAX_POST_CHARS {
        return Err(AppError::Invalid("bio is longer than 2000 characters"));
    }
    if !storable(&update.bio) {
        return Err(AppError::Invalid("bio must not contain NUL characters"));
    }
    let mut conn = db.write().get().await?;
    let profile = diesel::insert_into(profiles::table)
        .values((
            profiles::user_id.eq(user),
            profiles::name.eq(name),
            profiles::bio.eq(&update.bio),
        ))
        .on_conflict(profiles::user_id)
        .do_update()
        .set((
            profiles::name.eq(excluded(profiles::name)),
            profiles::bio.eq(excluded(profiles::bio)),
            profiles::updated_at.eq(diesel::dsl::now),
        ))
        .returning(Profile::as_returning())
        .get_result(&mut conn)
        .await?;
    Ok(Json(profile))
}

/// `GET /api/profile/{user_id}`: session-consistent, so a user sees their
/// own edit at once.
async fn get_profile<B: Backend<Pool = DieselPool>>(
    db: Db<B>,
    Path(user_id): Path<i64>,
) -> Result<Json<Profile>, AppError> {
    let mut conn = db.read().await.get().await?;
    let found = profiles::table
        .find(user_id)
        .select(Profile::as_select())
        .first(&mut conn)
        .await
        .optional()?;
    found.map(Json).ok_or(AppError::NotFound)
}

/// `POST /api/signup {"name"}`: creates an account and its profile in one
/// transaction and signs the new user in; 201 with their id, and the
/// `demo_user` cookie.
///
/// The request has no identity yet (the layer's identity function found no
/// one), so [`Db::bind_user`] makes the response's token the new user's:
/// their profile page, a session read, finds the rows written here.
async fn sign_up<B: Backend<Pool = DieselPool>>(
    db: Db<B>,
    Json(body): Json<SignUp>,
) -> Result<Response, AppError> {
    let name = validate_name(&body.name)?;
    let mut conn = db.write().get().await?;
    let id = conn
        .transaction::<i64, AppError, _>(async |conn| {
            let id = diesel::insert_into(accounts::table)
                .values(accounts::name.eq(name))
                .returning(accounts::id)
                .get_result(conn)
                .await?;
            diesel::insert_into(profiles::table)
                .values((profiles::user_id.eq(id), profiles::name.eq(name)))
                .execute(conn)
                .await?;
            Ok(id)
        })
        .await?;
    db.bind_user(UserId::from(id));
    Ok(signed_in((StatusCode::CREATED, Json(Created { id })), id))
}

/// `POST /api/login {"user_id"}`: signs the user in and records the login;
/// 200 with the login row's id, and the `demo_user` cookie.
///
/// Whoever the request was before (anonymous, or another account), it is
/// `user_id`'s from here: [`Db::bind_user`] gives the response that user's
/// token, covering the login row, so their dashboard shows this login.
async fn log_in<B: Backend<Pool = DieselPool>>(
    db: Db<B>,
    Json(body): Json<Login>,
) -> Result<Response, AppError> {
    // A real app checks the password here; then it knows who this is.
    db.bind_user(UserId::from(body.user_id));
    let mut conn = db.write().get().await?;
    let login_id = diesel::insert_into(logins::table)
        .values(logins::user_id.eq(body.user_id))
        .returning(logins::id)
        .get_result(&mut conn)
        .await?;
    Ok(signed_in(Json(LoggedIn { login_id }), body.user_id))
}

/// `GET /api/dashboard`: the user's latest login and how many posts they
/// have. Session-consistent, so right after a login it shows that login.
async fn dashboard<B: Backend<Pool = DieselPool>>(
    db: Db<B>,
    DemoUser(user): DemoUser,
) -> Result<Json<Dashboard>, AppError> {
    // One connection for both queries, so the two agree.
    let mut conn = db.read().await.get().await?;
    let last_login = logins::table
        .filter(logins::user_id.eq(user))
        .order(logins::id.desc())
        .select(LoginRecord::as_select())
        .first(&mut conn)
        .await
        .optional()?;
    let posts = posts::table
        .filter(posts::user_id.eq(user))
        .count()
        .get_result(&mut conn)
        .await?;
    Ok(Json(Dashboard {
        user_id: user,
        last_login,
        posts,
    }))
}

/// `response` with the `demo_user` cookie for `user`: the demo identity
/// the next requests carry.
fn signed_in(response: impl IntoResponse, user: i64) -> Response {
    let mut response = response.into_response();
    if let Ok(value) = format!("{USER_COOKIE}={user}; Path=/; SameSite=Lax; HttpOnly").parse() {
        response.headers_mut().append(SET_COOKIE, value);
    }
    response
}

/// `GET /healthz`: 200 with each replica's state, as the tracker sees it.
async fn healthz(State(replicas): State<PgReplicaSet>) -> Response {
    let nodes: Vec<_> = replicas
        .replicas()
        .into_iter()
        .map(|replica| {
            serde_json::json!({
                "name": replica.name,
                "healthy": replica.healthy,
                "replayed": replica.replayed.to_string(),
            })
        })
        .collect();
    Json(serde_json::json!({
        "status": "ok",
        "timeline": replicas.timeline(),
        "replicas": nodes,
    }))
    .into_response()
}

//! The social app's JSON API over tokio-postgres: the same routes, JSON,
//! status codes and consistency choices as `examples/social/app.rs`, with
//! every query run on a `deadpool_postgres` client checked out of the pool
//! each access is routed to.
//!
//! | access | route | pool |
//! |---|---|---|
//! | the user's own data | `GET /api/posts`, `GET /api/profile/{id}`, `GET /api/dashboard` | `db.read().await` |
//! | everyone's, eventual | `GET /api/feed` | `db.eventual()` |
//! | a critical read | `GET /api/posts/{id}` | `db.primary()` |
//! | writes | `POST /api/posts`, `PUT /api/profile`, `POST /api/signup`, `POST /api/login` | `db.write()` |
//!
//! The handlers are generic over the [`Backend`], so the app runs on a
//! [`TokioPgReplicaSet`](read_after_write::tokio_postgres::TokioPgReplicaSet)
//! or on a backend that wraps one (the lab measures it that way).
//!
//! Identity is demo-only, as in the social app: the `x-user-id: <integer>`
//! header, else the `demo_user` cookie that sign-up and login set. Sign-up
//! and login establish it inside the handler and call [`Db::bind_user`], so
//! the next page sees the rows they wrote. The social app's HTML page and
//! `/metrics` are left out.
//!
//! The schema is the social app's (`examples/social/migrations`);
//! [`migrate`] runs it with the routing engine's own sqlx pool on the
//! primary, so either example can share one database.

use std::error::Error as _;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::header::{COOKIE, SET_COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{BoxError, Json, Router};
use read_after_write::pg::PgReplicaSet;
use read_after_write::tokio_postgres::deadpool_postgres::{Object, Pool, PoolError};
use read_after_write::{Backend, Db, KeySet, ReadAfterWriteLayer, UserId};
use tokio_postgres::Statement;
use tower::ServiceBuilder;

#[path = "types.rs"]
mod types;
pub use types::*;

/// The header that carries the demo identity.
pub const USER_HEADER: &str = "x-user-id";
/// The cookie sign-up and login set, the demo identity's fallback.
pub const USER_COOKIE: &str = "demo_user";
/// The longest post accepted, in characters.
pub const MAX_POST_CHARS: usize = 2_000;

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
    /// checkouts and connection attempts, not queries: a query on a frozen
    /// server never returns on its own, so the app bounds its requests.
    /// `None` leaves them unbounded.
    pub request_timeout: Option<Duration>,
}

/// Runs the social app's schema migrations on the primary, through the
/// routing engine's sqlx pool (`pools.set()`), recorded as sqlx records
/// them: running the social example on the same database finds them done.
pub async fn migrate(set: &PgReplicaSet) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("../../examples/social/migrations")
        .run(set.primary_pool())
        .await
}

/// The app's API with the read-after-write layer over every route that
/// touches the database, and `/healthz`.
pub fn router<B>(backend: B, replicas: PgReplicaSet, config: &AppConfig) -> Router
where
    B: Backend<Pool = Pool>,
{
    router_with_layer(layer(backend, config), replicas, config)
}

/// The app's read-after-write layer over `backend`: the demo identity,
/// and the cookie, debug header and `max_wait` of `config`. Adjust it (a
/// consistency mode, say) and serve it with [`router_with_layer`].
pub fn layer<B>(backend: B, config: &AppConfig) -> ReadAfterWriteLayer<B>
where
    B: Backend<Pool = Pool>,
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
    B: Backend<Pool = Pool>,
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
        // The timeout wraps every route, the layer's capture included; the
        // handler's future (and the query it awaits) is dropped when it fires.
        Some(limit) => router.layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(request_timed_out))
                .timeout(limit),
        ),
        None => router,
    }
}

/// What a request that hit [`AppConfig::request_timeout`] answers: 503, so
/// clients retry as they would for any unavailable backend.
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
    /// No client could be checked out of the pool.
    Pool(PoolError),
    /// A query failed.
    Query(tokio_postgres::Error),
}

impl From<PoolError> for AppError {
    fn from(error: PoolError) -> Self {
        AppError::Pool(error)
    }
}

impl From<tokio_postgres::Error> for AppError {
    fn from(error: tokio_postgres::Error) -> Self {
        AppError::Query(error)
    }
}

impl AppError {
    /// 503 where the database could not serve the request now (a checkout
    /// that timed out, a connection that failed or was lost, a server going
    /// away or no longer taking writes: [`read_after_write::sqlstate`]), as
    /// the social app answers; 500 for the rest.
    fn database_status(&self) -> StatusCode {
        let unreachable = match self {
            AppError::Pool(PoolError::NoRuntimeSpecified) => false,
            AppError::Pool(_) => true,
            AppError::Query(error) => {
                error.is_closed()
                    || error
                        .source()
                        .is_some_and(|source| source.is::<std::io::Error>())
                    || error.code().is_some_and(|state| {
                        read_after_write::sqlstate::is_unavailable(state.code())
                    })
            }
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
                match self {
                    AppError::Pool(error) => tracing::error!(%error, "database error"),
                    error => tracing::error!(?error, "database error"),
                }
                (status, "database unavailable, try again").into_response()
            }
        }
    }
}

/// `select <the post's columns>` followed by the rest of the statement.
macro_rules! select_posts {
    ($rest:literal) => {
        concat!(
            "select id, user_id, content, \
             to_char(created_at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') as created_at ",
            $rest
        )
    };
}

/// Text PostgreSQL cannot store: a NUL character. Refused as invalid input
/// rather than left for the server to fail the query with.
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

/// `sql` prepared on `client`, once per connection (deadpool's statement
/// cache): after the first, each query is one round trip, as sqlx's
/// statement cache makes it for the social app.
async fn prepared(client: &Object, sql: &str) -> Result<Statement, AppError> {
    Ok(client.prepare_cached(sql).await?)
}

/// `POST /api/posts {"content"}`: 201 with the id.
async fn create_post<B: Backend<Pool = Pool>>(
    db: Db<B>,
    DemoUser(user): DemoUser,
    Json(body): Json<NewPost>,
) -> Result<(StatusCode, Json<Created>), AppError> {
    let content = validate(&body.content)?;
    let client = db.write().get().await?;
    let sql = "insert into posts (user_id, content) values ($1, $2) returning id";
    let statement = prepared(&client, sql).await?;
    let row = client.query_one(&statement, &[&user, &content]).await?;
    let id = row.try_get(0)?;
    Ok((StatusCode::CREATED, Json(Created { id })))
}

/// `GET /api/posts`: the user's own 100 newest posts. Session-consistent.
async fn my_posts<B: Backend<Pool = Pool>>(
    db: Db<B>,
    DemoUser(user): DemoUser,
) -> Result<Json<Vec<Post>>, AppError> {
    let client = db.read().await.get().await?;
    let sql = select_posts!("from posts where user_id = $1 order by id desc limit 100");
    let statement = prepared(&client, sql).await?;
    let rows = client.query(&statement, &[&user]).await?;
    let posts = rows.iter().map(Post::from_row).collect::<Result<_, _>>()?;
    Ok(Json(posts))
}

/// `GET /api/feed`: the latest 100 posts by anyone. Eventual.
async fn feed<B: Backend<Pool = Pool>>(db: Db<B>) -> Result<Json<Vec<Post>>, AppError> {
    let client = db.eventual().get().await?;
    let sql = select_posts!("from posts order by id desc limit 100");
    let statement = prepared(&client, sql).await?;
    let rows = client.query(&statement, &[]).await?;
    let posts = rows.iter().map(Post::from_row).collect::<Result<_, _>>()?;
    Ok(Json(posts))
}

/// `GET /api/posts/{id}`: one post, a critical read from the primary.
async fn post_by_id<B: Backend<Pool = Pool>>(
    db: Db<B>,
    Path(id): Path<i64>,
) -> Result<Json<Post>, AppError> {
    let client = db.primary().get().await?;
    let statement = prepared(&client, select_posts!("from posts where id = $1")).await?;
    let row = client.query_opt(&statement, &[&id]).await?;
    let row = row.ok_or(AppError::NotFound)?;
    Ok(Json(Post::from_row(&row)?))
}

/// `PUT /api/profile {"name","bio"}`.
async fn put_profile<B: Backend<Pool = Pool>>(
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
    let client = db.write().get().await?;
    let sql = "insert into profiles (user_id, name, bio) values ($1, $2, $3) \
         on conflict (user_id) do update set name = excluded.name, bio = excluded.bio, updated_at = now() \
         returning user_id, name, bio";
    let statement = prepared(&client, sql).await?;
    let row = client
        .query_one(&statement, &[&user, &name, &update.bio])
        .await?;
    Ok(Json(Profile::from_row(&row)?))
}

/// `GET /api/profile/{user_id}`: session-consistent, so a user sees their
/// own edit at once.
async fn get_profile<B: Backend<Pool = Pool>>(
    db: Db<B>,
    Path(user_id): Path<i64>,
) -> Result<Json<Profile>, AppError> {
    let client = db.read().await.get().await?;
    let sql = "select user_id, name, bio from profiles where user_id = $1";
    let statement = prepared(&client, sql).await?;
    let row = client.query_opt(&statement, &[&user_id]).await?;
    let row = row.ok_or(AppError::NotFound)?;
    Ok(Json(Profile::from_row(&row)?))
}

/// `POST /api/signup {"name"}`: creates an account and its profile in one
/// transaction and signs the new user in; 201 with their id, and the
/// `demo_user` cookie.
///
/// The request has no identity yet, so [`Db::bind_user`] makes the
/// response's token the new user's: their profile page, a session read,
/// finds the rows written here.
async fn sign_up<B: Backend<Pool = Pool>>(
    db: Db<B>,
    Json(body): Json<SignUp>,
) -> Result<Response, AppError> {
    let name = validate_name(&body.name)?;
    let mut client = db.write().get().await?;
    let account = client
        .prepare_cached("insert into accounts (name) values ($1) returning id")
        .await?;
    let profile = client
        .prepare_cached("insert into profiles (user_id, name) values ($1, $2)")
        .await?;
    let tx = client.transaction().await?;
    let id: i64 = tx.query_one(&account, &[&name]).await?.try_get(0)?;
    tx.execute(&profile, &[&id, &name]).await?;
    tx.commit().await?;
    db.bind_user(UserId::from(id));
    Ok(signed_in((StatusCode::CREATED, Json(Created { id })), id))
}

/// `POST /api/login {"user_id"}`: signs the user in and records the login;
/// 200 with the login row's id, and the `demo_user` cookie.
///
/// Whoever the request was before, it is `user_id`'s from here:
/// [`Db::bind_user`] gives the response that user's token, covering the
/// login row, so their dashboard shows this login.
async fn log_in<B: Backend<Pool = Pool>>(
    db: Db<B>,
    Json(body): Json<Login>,
) -> Result<Response, AppError> {
    // A real app checks the password here; then it knows who this is.
    db.bind_user(UserId::from(body.user_id));
    let client = db.write().get().await?;
    let sql = "insert into logins (user_id) values ($1) returning id";
    let statement = prepared(&client, sql).await?;
    let login_id = client
        .query_one(&statement, &[&body.user_id])
        .await?
        .try_get(0)?;
    Ok(signed_in(Json(LoggedIn { login_id }), body.user_id))
}

/// `GET /api/dashboard`: the user's latest login and how many posts they
/// have. Session-consistent, so right after a login it shows that login.
async fn dashboard<B: Backend<Pool = Pool>>(
    db: Db<B>,
    DemoUser(user): DemoUser,
) -> Result<Json<Dashboard>, AppError> {
    // One connection for both queries, so the two agree.
    let client = db.read().await.get().await?;
    let sql =
        "select id, to_char(at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') as at \
         from logins where user_id = $1 order by id desc limit 1";
    let statement = prepared(&client, sql).await?;
    let last_login = match client.query_opt(&statement, &[&user]).await? {
        Some(row) => Some(LoginRecord {
            id: row.try_get("id")?,
            at: row.try_get("at")?,
        }),
        None => None,
    };
    let sql = "select count(*) from posts where user_id = $1";
    let statement = prepared(&client, sql).await?;
    let posts = client.query_one(&statement, &[&user]).await?.try_get(0)?;
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
        .map(|r| serde_json::json!({"name": r.name, "healthy": r.healthy, "replayed": r.replayed.to_string()}))
        .collect();
    Json(serde_json::json!({"status": "ok", "timeline": replicas.timeline(), "replicas": nodes}))
        .into_response()
}

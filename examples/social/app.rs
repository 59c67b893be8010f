//! The social app: routes, handlers and schema.
//!
//! A user posts and is redirected to a page that must show the post. Reads of
//! the user's own data are session-consistent (`db.read()`), the feed is
//! eventual (`db.eventual()`), a single post by id is a critical read
//! (`db.primary()`), and writes go through `db.write()`, which makes the
//! layer issue the affinity token.
//!
//! The handlers are generic over the [`Backend`], so the same app runs on
//! [`PgReplicaSet`] or on any other backend over sqlx pools (the lab's
//! baselines, or a backend that wraps one to measure it).
//!
//! Identity is demo-only: the `x-user-id: <integer>` header, or for the HTML
//! page a `demo_user` cookie set by its login form. A real app puts its
//! authenticated user into the request extensions instead.
//!
//! Sign-up (`POST /api/signup`) and login (`POST /api/login`) establish the
//! identity inside the handler, after the layer has asked who the requester
//! is: they write (the new account, the login row) and call
//! [`Db::bind_user`], so the response's token is the new user's and the next
//! page (`GET /api/profile/{id}`, `GET /api/dashboard`) sees those rows.

use std::sync::OnceLock;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::header::{COOKIE, SET_COOKIE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{BoxError, Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use read_after_write::pg::PgReplicaSet;
use read_after_write::{Backend, Db, KeySet, ReadAfterWriteLayer, UserId};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tower::ServiceBuilder;

#[path = "html.rs"]
mod html;
use html::{create_post_form, home, login_form};

/// The header that carries the demo identity.
pub const USER_HEADER: &str = "x-user-id";
/// The cookie the HTML page's login form sets.
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
    /// Answer 503 when a request takes longer than this. sqlx has no
    /// client-side query timeout, so a query on a frozen server never
    /// returns on its own: the app must bound its requests. `None` leaves
    /// them unbounded.
    pub request_timeout: Option<Duration>,
}

/// Runs the schema migrations on the primary.
pub async fn migrate(primary: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("../../examples/social/migrations")
        .run(primary)
        .await
}

/// The process-wide Prometheus recorder: installed on first use, shared by
/// every app in the process.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics shows only this exporter's view");
            }
            let upkeep = handle.clone();
            std::thread::spawn(move || loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            });
            handle
        })
        .clone()
}

#[derive(Clone)]
struct AppState {
    replicas: PgReplicaSet,
    metrics: PrometheusHandle,
}

/// The whole app: API, HTML page and operations endpoints, with the
/// read-after-write layer over every route that touches the database.
pub fn router<B>(backend: B, replicas: PgReplicaSet, config: &AppConfig) -> Router
where
    B: Backend<Pool = PgPool>,
{
    router_with_layer(layer(backend, config), replicas, config)
}

/// The app's read-after-write layer over `backend`: the demo identity,
/// and the cookie, debug header and `max_wait` of `config`. Adjust it (a
/// consistency mode, say) and serve it with [`router_with_layer`].
pub fn layer<B>(backend: B, config: &AppConfig) -> ReadAfterWriteLayer<B>
where
    B: Backend<Pool = PgPool>,
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

/// [`router`] with a layer of your own (from [`layer`], adjusted); of
/// `config` only the request timeout is used here.
pub fn router_with_layer<B>(
    layer: ReadAfterWriteLayer<B>,
    replicas: PgReplicaSet,
    config: &AppConfig,
) -> Router
where
    B: Backend<Pool = PgPool>,
{
    let state = AppState {
        replicas,
        metrics: metrics_handle(),
    };
    let router = Router::new()
        .route("/", get(home::<B>))
        .route("/posts", post(create_post_form::<B>))
        .route("/api/posts", post(create_post::<B>).get(my_posts::<B>))
        .route("/api/posts/{id}", get(post_by_id::<B>))
        .route("/api/feed", get(feed::<B>))
        .route("/api/profile", put(put_profile::<B>))
        .route("/api/profile/{user_id}", get(get_profile::<B>))
        .route("/api/signup", post(sign_up::<B>))
        .route("/api/login", post(log_in::<B>))
        .route("/api/dashboard", get(dashboard::<B>))
        .route_layer(layer)
        // Operations endpoints and the login form do not touch the database
        // through the layer.
        .route("/login", post(login_form))
        .route("/healthz", get(healthz))
        .route("/metrics", get(render_metrics))
        .with_state(state);
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
    /// The database failed.
    Database(sqlx::Error),
}

impl From<sqlx::Error> for AppError {
    fn from(error: sqlx::Error) -> Self {
        AppError::Database(error)
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
            AppError::Database(error) => {
                tracing::error!(%error, "database error");
                let status = if sqlx_unavailable(&error) {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                };
                (status, "database unavailable, try again").into_response()
            }
        }
    }
}

/// Whether a sqlx error means the database could not serve the request
/// now (503, clients retry) rather than that the request or the code is
/// wrong (500): no connection from the pool in time, a closed pool, a
/// connection that failed or was lost, or a server going away or no longer
/// taking writes, as during a failover ([`read_after_write::sqlstate`]).
fn sqlx_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(error) => error
            .code()
            .is_some_and(|code| read_after_write::sqlstate::is_unavailable(&code)),
        _ => false,
    }
}

/// A post as the API returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, sqlx::FromRow)]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, sqlx::FromRow)]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, sqlx::FromRow)]
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

/// `select <the post's columns>` followed by the rest of the statement, as
/// one `&'static str`: sqlx 0.9 takes only static SQL (or SQL explicitly
/// asserted safe), so the column list is spliced in at compile time.
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
/// rather than left for the server to fail the query with (a 500).
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

async fn insert_post<B: Backend<Pool = PgPool>>(
    db: &Db<B>,
    user: i64,
    content: &str,
) -> Result<i64, AppError> {
    let content = validate(content)?;
    let (id,): (i64,) =
        sqlx::query_as("insert into posts (user_id, content) values ($1, $2) returning id")
            .bind(user)
            .bind(content)
            .fetch_one(db.write())
            .await?;
    Ok(id)
}

/// The user's own 100 newest posts, a session read.
async fn own_posts<B: Backend<Pool = PgPool>>(
    db: &Db<B>,
    user: i64,
) -> Result<Vec<Post>, AppError> {
    let sql = select_posts!("from posts where user_id = $1 order by id desc limit 100");
    Ok(sqlx::query_as(sql)
        .bind(user)
        .fetch_all(db.read().await)
        .await?)
}

/// `POST /api/posts {"content"}`: 201 with the id.
async fn create_post<B: Backend<Pool = PgPool>>(
    db: Db<B>,
    DemoUser(user): DemoUser,
    Json(body): Json<NewPost>,
) -> Result<(StatusCode, Json<Created>), AppError> {
    let id = insert_post(&db, user, &body.content).await?;
    Ok((StatusCode::CREATED, Json(Created { id })))
}

/// `GET /api/posts`: the user's own posts, newest first. Session-consistent.
async fn my_posts<B: Backend<Pool = PgPool>>(
    db: Db<B>,
    DemoUser(user): DemoUser,
) -> Result<Json<Vec<Post>>, AppError> {
    Ok(Json(own_posts(&db, user).await?))
}

/// `GET /api/feed`: the latest 100 posts by anyone. Eventual.
async fn feed<B: Backend<Pool = PgPool>>(db: Db<B>) -> Result<Json<Vec<Post>>, AppError> {
    let sql = select_posts!("from posts order by id desc limit 100");
    Ok(Json(sqlx::query_as(sql).fetch_all(db.eventual()).await?))
}

/// `GET /api/posts/{id}`: one post, a critical read from the primary.
async fn post_by_id<B: Backend<Pool = PgPool>>(
    db: Db<B>,
    Path(id): Path<i64>,
) -> Result<Json<Post>, AppError> {
    let sql = select_posts!("from posts where id = $1");
    let post: Option<Post> = sqlx::query_as(sql)
        .bind(id)
        .fetch_optional(db.primary())
        .await?;
    post.map(Json).ok_or(AppError::NotFound)
}

/// `PUT /api/profile {"name","bio"}`.
async fn put_profile<B: Backend<Pool = PgPool>>(
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
    let profile: Profile = sqlx::query_as(
        "insert into profiles (user_id, name, bio) values ($1, $2, $3) \
         on conflict (user_id) do update set name = excluded.name, bio = excluded.bio, updated_at = now() \
         returning user_id, name, bio",
    )
    .bind(user)
    .bind(name)
    .bind(&update.bio)
    .fetch_one(db.write())
    .await?;
    Ok(Json(profile))
}

/// `GET /api/profile/{user_id}`: session-consistent, so a user sees their
/// own edit at once.
async fn get_profile<B: Backend<Pool = PgPool>>(
    db: Db<B>,
    Path(user_id): Path<i64>,
) -> Result<Json<Profile>, AppError> {
    let profile: Option<Profile> =
        sqlx::query_as("select user_id, name, bio from profiles where user_id = $1")
            .bind(user_id)
            .fetch_optional(db.read().await)
            .await?;
    profile.map(Json).ok_or(AppError::NotFound)
}

/// `POST /api/signup {"name"}`: creates an account and its profile and
/// signs the new user in; 201 with their id, and the `demo_user` cookie.
///
/// The request has no identity yet (the layer's identity function found no
/// one), so [`Db::bind_user`] makes the response's token the new user's:
/// their profile page, a session read, finds the rows written here instead
/// of asking a replica that may not have them.
async fn sign_up<B: Backend<Pool = PgPool>>(
    db: Db<B>,
    Json(body): Json<SignUp>,
) -> Result<Response, AppError> {
    let name = validate_name(&body.name)?;
    let mut tx = db.write().begin().await?;
    let (id,): (i64,) = sqlx::query_as("insert into accounts (name) values ($1) returning id")
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query("insert into profiles (user_id, name) values ($1, $2)")
        .bind(id)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    db.bind_user(UserId::from(id));
    Ok(signed_in((StatusCode::CREATED, Json(Created { id })), id))
}

/// `POST /api/login {"user_id"}`: signs the user in and records the login;
/// 200 with the login row's id, and the `demo_user` cookie.
///
/// Whoever the request was before (anonymous, or another account), it is
/// `user_id`'s from here: [`Db::bind_user`] gives the response that user's
/// token, covering the login row, so their dashboard shows this login.
async fn log_in<B: Backend<Pool = PgPool>>(
    db: Db<B>,
    Json(body): Json<Login>,
) -> Result<Response, AppError> {
    // A real app checks the password here; then it knows who this is.
    db.bind_user(UserId::from(body.user_id));
    let (login_id,): (i64,) =
        sqlx::query_as("insert into logins (user_id) values ($1) returning id")
            .bind(body.user_id)
            .fetch_one(db.write())
            .await?;
    Ok(signed_in(Json(LoggedIn { login_id }), body.user_id))
}

/// `GET /api/dashboard`: the user's latest login and how many posts they
/// have. Session-consistent, so right after a login it shows that login.
async fn dashboard<B: Backend<Pool = PgPool>>(
    db: Db<B>,
    DemoUser(user): DemoUser,
) -> Result<Json<Dashboard>, AppError> {
    // One node for both queries, so the two agree.
    let pool = db.read().await;
    let last_login: Option<LoginRecord> = sqlx::query_as(
        "select id, to_char(at at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') as at \
         from logins where user_id = $1 order by id desc limit 1",
    )
    .bind(user)
    .fetch_optional(pool)
    .await?;
    let (posts,): (i64,) = sqlx::query_as("select count(*) from posts where user_id = $1")
        .bind(user)
        .fetch_one(pool)
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

/// `GET /healthz`: 200 with each replica's state once the pools are up.
async fn healthz(State(state): State<AppState>) -> Response {
    let replicas: Vec<_> = state
        .replicas
        .replicas()
        .into_iter()
        .map(|r| serde_json::json!({"name": r.name, "healthy": r.healthy, "replayed": r.replayed.to_string()}))
        .collect();
    Json(serde_json::json!({"status": "ok", "timeline": state.replicas.timeline(), "replicas": replicas})).into_response()
}

/// `GET /metrics`: Prometheus text.
async fn render_metrics(State(state): State<AppState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
        .into_response()
}

//! The social app's JSON API over SeaORM 2: the routes, JSON, status codes
//! and consistency choices of `examples/social/app.rs` (and of the
//! tokio-postgres and diesel-async examples), each query built from
//! SeaORM [`entities`] and partial models and run on the
//! `DatabaseConnection` that [`SeaDb`] gives for the node its access is
//! routed to.
//!
//! | access | route | connection |
//! |---|---|---|
//! | the user's own data | `GET /api/posts`, `GET /api/profile/{id}`, `GET /api/dashboard` | `db.read().await` |
//! | everyone's, eventual | `GET /api/feed` | `db.eventual()` |
//! | a critical read | `GET /api/posts/{id}` | `db.primary()` |
//! | writes | `POST /api/posts`, `PUT /api/profile`, `POST /api/signup`, `POST /api/login` | `db.write()` |
//!
//! SeaORM 2 runs on sqlx 0.9, so the connections are the sqlx backend's
//! own pools: the handlers are generic over any [`Backend`] whose pool is a
//! `PgPool`, [`PgReplicaSet`] itself or one that wraps it (to measure it,
//! say).
//!
//! Identity is demo-only, as in the social app: the `x-user-id: <integer>`
//! header, else the `demo_user` cookie that sign-up and login set. Sign-up
//! and login learn who the requester is inside the handler and call
//! [`Db::bind_user`](read_after_write::Db::bind_user) (through
//! [`SeaDb::db`]), so the next page sees the rows they wrote. The social
//! app's HTML page and `/metrics` are left out.
//!
//! The schema is the social app's: [`migrate`] runs its migrations on the
//! primary's sqlx pool, so every example can share one database;
//! [`entities`] is SeaORM's view of its tables.

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
use read_after_write::sea_orm::SeaDb;
use read_after_write::{Backend, KeySet, ReadAfterWriteLayer, UserId};
use sea_orm::sea_query::{Alias, Expr, Func, OnConflict};
use sea_orm::{
    ActiveValue, ColumnTrait, ConnAcquireErr, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, RuntimeErr, TransactionTrait,
};
use sqlx::PgPool;
use tower::ServiceBuilder;

#[path = "entities.rs"]
pub mod entities;
#[path = "types.rs"]
mod types;
pub use types::*;

use entities::{account, login, post, profile};

/// The header that carries the demo identity.
pub const USER_HEADER: &str = "x-user-id";
/// The cookie sign-up and login set, the demo identity's fallback.
pub const USER_COOKIE: &str = "demo_user";
/// The longest post accepted, in characters.
pub const MAX_POST_CHARS: usize = 2_000;
/// How many posts a list returns at most (the newest).
const PAGE: u64 = 100;

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
    /// Answer 503 when a request takes longer than this. sqlx, under
    /// SeaORM, has no client-side query timeout: a query on a frozen server
    /// never returns on its own, so the app bounds its requests. `None`
    /// leaves them unbounded.
    pub request_timeout: Option<Duration>,
}

/// Runs the social app's migrations on the primary's sqlx pool (the one
/// SeaORM's writes share), recorded in sqlx's table: the other examples,
/// run on the same database, find them done (and this finds theirs).
pub async fn migrate(set: &PgReplicaSet) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("../../examples/social/migrations")
        .run(set.primary_pool())
        .await
}

/// The app's API behind the read-after-write layer, and `/healthz`.
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

/// [`router`] with a layer of your own (from [`layer`], adjusted);
/// `replicas` (the routing engine) answers `/healthz`, and of `config`
/// only the request timeout is used here.
pub fn router_with_layer<B>(
    layer: ReadAfterWriteLayer<B>,
    replicas: PgReplicaSet,
    config: &AppConfig,
) -> Router
where
    B: Backend<Pool = PgPool>,
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
    /// SeaORM failed: no connection, or a query that failed.
    Database(DbErr),
}

impl From<DbErr> for AppError {
    fn from(error: DbErr) -> Self {
        AppError::Database(error)
    }
}

impl AppError {
    /// 503 where the database could not serve the request now (no
    /// connection from the pool in time, a closed pool, a connection that
    /// failed or was lost, a server going away or no longer taking writes:
    /// [`read_after_write::sqlstate`]), as the social app answers the same
    /// sqlx errors underneath; 500 for the rest.
    fn database_status(&self) -> StatusCode {
        let unreachable = match self {
            AppError::Database(DbErr::ConnectionAcquire(
                ConnAcquireErr::Timeout | ConnAcquireErr::ConnectionClosed,
            )) => true,
            AppError::Database(
                DbErr::Conn(RuntimeErr::SqlxError(error))
                | DbErr::Exec(RuntimeErr::SqlxError(error))
                | DbErr::Query(RuntimeErr::SqlxError(error)),
            ) => match &**error {
                sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => true,
                sqlx::Error::Database(error) => error
                    .code()
                    .is_some_and(|code| read_after_write::sqlstate::is_unavailable(&code)),
                _ => false,
            },
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
            AppError::Database(ref error) => {
                let status = self.database_status();
                tracing::error!(%error, "database error");
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

// SeaORM sends each statement through sqlx, whose per-connection statement
// cache prepares it once: after a connection's first, each query is one
// round trip, as for the social app. An insert's id comes back with it
// (`RETURNING`), not in a second query.

/// `POST /api/posts {"content"}`: 201 with the id.
async fn create_post<B: Backend<Pool = PgPool>>(
    db: SeaDb<B>,
    DemoUser(user): DemoUser,
    Json(body): Json<NewPost>,
) -> Result<(StatusCode, Json<Created>), AppError> {
    let content = validate(&body.content)?;
    let new = post::ActiveModel {
        user_id: ActiveValue::Set(user),
        content: ActiveValue::Set(content.to_owned()),
        ..Default::default()
    };
    // write(): the primary, and marks the request, so it gets a token.
    let inserted = post::Entity::insert(new).exec(&db.write()).await?;
    let id = inserted.last_insert_id;
    Ok((StatusCode::CREATED, Json(Created { id })))
}

/// `GET /api/posts`: the user's own 100 newest posts. Session-consistent.
async fn my_posts<B: Backend<Pool = PgPool>>(
    db: SeaDb<B>,
    DemoUser(user): DemoUser,
) -> Result<Json<Vec<Post>>, AppError> {
    let found = post::Entity::find()
        .filter(post::Column::UserId.eq(user))
        .order_by_desc(post::Column::Id)
        .limit(PAGE)
        .into_partial_model::<Post>()
        .all(&db.read().await) // read() may wait for a replica: .await it
        .await?;
    Ok(Json(found))
}

/// `GET /api/feed`: the latest 100 posts by anyone. Eventual.
async fn feed<B: Backend<Pool = PgPool>>(db: SeaDb<B>) -> Result<Json<Vec<Post>>, AppError> {
    let found = post::Entity::find()
        .order_by_desc(post::Column::Id)
        .limit(PAGE)
        .into_partial_model::<Post>()
        .all(&db.eventual())
        .await?;
    Ok(Json(found))
}

/// `GET /api/posts/{id}`: one post, a critical read from the primary.
async fn post_by_id<B: Backend<Pool = PgPool>>(
    db: SeaDb<B>,
    Path(id): Path<i64>,
) -> Result<Json<Post>, AppError> {
    let found = post::Entity::find_by_id(id)
        .into_partial_model::<Post>()
        .one(&db.primary())
        .await?;
    found.map(Json).ok_or(AppError::NotFound)
}

/// `PUT /api/profile {"name","bio"}`: creates or replaces the user's
/// profile; 200 with it.
async fn put_profile<B: Backend<Pool = PgPool>>(
    db: SeaDb<B>,
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
    let row = profile::ActiveModel {
        user_id: ActiveValue::Set(user),
        name: ActiveValue::Set(name.to_owned()),
        bio: ActiveValue::Set(update.bio),
    };
    // One statement: insert, or on the user's existing row update it.
    let upsert = OnConflict::column(profile::Column::UserId)
        .update_columns([profile::Column::Name, profile::Column::Bio])
        .value(Alias::new(profile::UPDATED_AT), Expr::current_timestamp())
        .to_owned();
    let saved = profile::Entity::insert(row)
        .on_conflict(upsert)
        .exec_with_returning(&db.write())
        .await?;
    Ok(Json(Profile::from(saved)))
}

/// `GET /api/profile/{user_id}`: session-consistent, so a user sees their
/// own edit at once.
async fn get_profile<B: Backend<Pool = PgPool>>(
    db: SeaDb<B>,
    Path(user_id): Path<i64>,
) -> Result<Json<Profile>, AppError> {
    let found = profile::Entity::find_by_id(user_id)
        .into_partial_model::<Profile>()
        .one(&db.read().await)
        .await?;
    found.map(Json).ok_or(AppError::NotFound)
}

/// `POST /api/signup {"name"}`: creates an account and its profile in one
/// transaction and signs the new user in; 201 with their id, and the
/// `demo_user` cookie.
///
/// The request has no identity yet (the layer's identity function found no
/// one), so `bind_user` makes the response's token the new user's: their
/// profile page, a session read, finds the rows written here.
async fn sign_up<B: Backend<Pool = PgPool>>(
    db: SeaDb<B>,
    Json(body): Json<SignUp>,
) -> Result<Response, AppError> {
    let name = validate_name(&body.name)?;
    let tx = db.write().begin().await?;
    let account = account::ActiveModel {
        name: ActiveValue::Set(name.to_owned()),
        ..Default::default()
    };
    let id = account::Entity::insert(account)
        .exec(&tx)
        .await?
        .last_insert_id;
    let profile = profile::ActiveModel {
        user_id: ActiveValue::Set(id),
        name: ActiveValue::Set(name.to_owned()),
        // The table's default, an empty bio.
        bio: ActiveValue::NotSet,
    };
    profile::Entity::insert(profile)
        .exec_without_returning(&tx)
        .await?;
    tx.commit().await?;
    db.db().bind_user(UserId::from(id));
    Ok(signed_in((StatusCode::CREATED, Json(Created { id })), id))
}

/// `POST /api/login {"user_id"}`: signs the user in and records the login;
/// 200 with the login row's id, and the `demo_user` cookie.
///
/// Whoever the request was before (anonymous, or another account), it is
/// `user_id`'s from here: `bind_user` gives the response that user's
/// token, covering the login row, so their dashboard shows this login.
async fn log_in<B: Backend<Pool = PgPool>>(
    db: SeaDb<B>,
    Json(body): Json<Login>,
) -> Result<Response, AppError> {
    // A real app checks the password here; then it knows who this is.
    db.db().bind_user(UserId::from(body.user_id));
    let login = login::ActiveModel {
        user_id: ActiveValue::Set(body.user_id),
        ..Default::default()
    };
    let login_id = login::Entity::insert(login)
        .exec(&db.write())
        .await?
        .last_insert_id;
    Ok(signed_in(Json(LoggedIn { login_id }), body.user_id))
}

/// `GET /api/dashboard`: the user's latest login and how many posts they
/// have. Session-consistent, so right after a login it shows that login.
async fn dashboard<B: Backend<Pool = PgPool>>(
    db: SeaDb<B>,
    DemoUser(user): DemoUser,
) -> Result<Json<Dashboard>, AppError> {
    // One node for both queries, so the two agree.
    let conn = db.read().await;
    let last_login = login::Entity::find()
        .filter(login::Column::UserId.eq(user))
        .order_by_desc(login::Column::Id)
        .into_partial_model::<LoginRecord>()
        .one(&conn)
        .await?;
    // `count(id)` as a bigint, where `PaginatorTrait::count` would give a
    // u64 through a subquery.
    let posts: Option<i64> = post::Entity::find()
        .select_only()
        .column_as(
            Expr::from(Func::count(post::Column::Id.into_expr())),
            "posts",
        )
        .filter(post::Column::UserId.eq(user))
        .into_tuple()
        .one(&conn)
        .await?;
    Ok(Json(Dashboard {
        user_id: user,
        last_login,
        // An aggregate without `group by` always answers one row.
        posts: posts.unwrap_or(0),
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

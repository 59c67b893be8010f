//! The auth example's app: axum-login over tower-sessions (a memory store)
//! with its users in PostgreSQL, and a `ReadAfterWriteLayer` whose identity
//! function reads the user axum-login loaded.
//!
//! | route | what it does |
//! |---|---|
//! | `POST /signup {"name"}` | creates the user, logs them in and binds the request to them ([`Db::bind_user`]); 201 `{"id"}` |
//! | `POST /login {"name"}` | logs the user in, records the login, binds the request; 200 `{"id", "login_id"}` |
//! | `POST /logout` | ends the session; 204 |
//! | `POST /notes {"text"}` | writes a note; 201 `{"id"}` |
//! | `GET /me` | the profile: name, number of logins and notes, read with `db.read().await` |
//!
//! The order of layers is the point: axum-login's `AuthManagerLayer` is
//! added after (so runs before) the read-after-write layer, which then finds
//! axum-login's `AuthSession` in the request's extensions. Sign-up and login
//! establish the identity inside the handler, after the layer has looked,
//! so they call `db.bind_user`: the response's token is then the user's, and
//! their next page finds what the handler wrote although it reads a replica.
//!
//! Credentials are a name only, to keep the example small: a real app
//! checks a password in [`Users::authenticate`] (with a password-hashing
//! crate) and stores nothing but the hash.

use axum::extract::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use axum_login::{AuthManagerLayerBuilder, AuthSession, AuthUser, AuthnBackend};
use read_after_write::pg::{sqlx, PgDb, PgReplicaSet};
use read_after_write::{KeySet, ReadAfterWriteLayer, UserId};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tower_sessions::{MemoryStore, SessionManagerLayer};

/// Creates the tables (idempotent) on the primary.
pub async fn migrate(primary: &PgPool) -> Result<(), sqlx::Error> {
    for statement in [
        // `session_key` is what axum-login checks a session against:
        // changing it logs the user out everywhere (a password hash serves
        // the same purpose in an app with passwords).
        "create table if not exists auth_users (id bigserial primary key, \
         name text not null unique, \
         session_key text not null default gen_random_uuid()::text)",
        "create table if not exists auth_logins (id bigserial primary key, \
         user_id bigint not null references auth_users, at timestamptz not null default now())",
        "create table if not exists auth_notes (id bigserial primary key, \
         user_id bigint not null references auth_users, text text not null)",
    ] {
        sqlx::query(statement).execute(primary).await?;
    }
    Ok(())
}

/// A user, as axum-login keeps it in the session's `AuthSession`.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct User {
    /// The `auth_users.id`: an `int8`, so the token's `UserId` is built
    /// from an `i64` everywhere.
    pub id: i64,
    session_key: String,
}

impl AuthUser for User {
    type Id = i64;

    fn id(&self) -> i64 {
        self.id
    }

    fn session_auth_hash(&self) -> &[u8] {
        self.session_key.as_bytes()
    }
}

/// What `POST /signup` and `POST /login` take.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Credentials {
    /// The user's name (the demo's whole credential).
    pub name: String,
}

/// axum-login's backend: finds users on the primary.
///
/// axum-login's middleware calls [`get_user`](AuthnBackend::get_user) on
/// every request, before the read-after-write layer has read any token, so
/// it cannot route by one: it reads the primary. A replica could lack a
/// user who signed up a moment ago, and would log them straight out.
#[derive(Clone, Debug)]
pub struct Users {
    primary: PgPool,
}

impl AuthnBackend for Users {
    type User = User;
    type Credentials = Credentials;
    type Error = sqlx::Error;

    async fn authenticate(&self, credentials: Credentials) -> Result<Option<User>, sqlx::Error> {
        // A real app verifies the password hash here.
        sqlx::query_as("select id, session_key from auth_users where name = $1")
            .bind(credentials.name)
            .fetch_optional(&self.primary)
            .await
    }

    async fn get_user(&self, id: &i64) -> Result<Option<User>, sqlx::Error> {
        sqlx::query_as("select id, session_key from auth_users where id = $1")
            .bind(id)
            .fetch_optional(&self.primary)
            .await
    }
}

/// The requester, for the read-after-write layer: the user axum-login's
/// middleware (which runs first) loaded into the request's extensions.
pub fn identity(parts: &axum::http::request::Parts) -> Option<UserId> {
    let auth = parts.extensions.get::<AuthSession<Users>>()?;
    Some(UserId::from(auth.user.as_ref()?.id))
}

/// The app: routes, the read-after-write layer over `replicas` with `keys`,
/// and axum-login over a memory session store outside it. `https`: whether
/// the app is served over HTTPS, for the cookies' `Secure` flag (this demo
/// serves plain HTTP).
pub fn router(replicas: PgReplicaSet, keys: KeySet, https: bool) -> Router {
    let users = Users {
        primary: replicas.primary_pool().clone(),
    };
    let sessions = SessionManagerLayer::new(MemoryStore::default()).with_secure(https);
    let auth = AuthManagerLayerBuilder::new(users, sessions).build();
    let read_after_write = ReadAfterWriteLayer::new(replicas, keys)
        .identity(identity)
        .secure(https);
    Router::new()
        .route("/signup", post(sign_up))
        .route("/login", post(log_in))
        .route("/logout", post(log_out))
        .route("/notes", post(create_note))
        .route("/me", get(profile))
        .layer(read_after_write) // inner: reads the AuthSession axum-login inserted
        .layer(auth) // outer: runs first, loads the session and the user
}

/// The answer to `POST /signup` and `POST /notes`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Created {
    /// The new row's id.
    pub id: i64,
}

/// The answer to `POST /login`.
#[derive(Debug, Serialize, Deserialize)]
pub struct LoggedIn {
    /// The user's id.
    pub id: i64,
    /// The login's row.
    pub login_id: i64,
}

/// One note.
#[derive(Debug, Serialize, Deserialize, sqlx::FromRow)]
pub struct Note {
    /// The note's id.
    pub id: i64,
    /// What it says.
    pub text: String,
}

/// The answer to `GET /me`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Profile {
    /// The user's id.
    pub id: i64,
    /// Their name, as the node read has it.
    pub name: String,
    /// How many times they logged in (sign-up not counted).
    pub logins: i64,
    /// Their notes, oldest first.
    pub notes: Vec<Note>,
}

/// `POST /signup`: the request arrives with no identity, so the layer's
/// identity function found no one; the handler creates the user, logs them
/// in and binds the request to them.
async fn sign_up(
    mut auth: AuthSession<Users>,
    db: PgDb,
    Json(credentials): Json<Credentials>,
) -> Result<(StatusCode, Json<Created>), AppError> {
    let user: User = sqlx::query_as(
        "insert into auth_users (name) values ($1) on conflict (name) do nothing \
         returning id, session_key",
    )
    .bind(&credentials.name)
    .fetch_optional(db.write())
    .await?
    .ok_or(AppError::Status(StatusCode::CONFLICT))?;
    auth.login(&user).await?;
    // The response's token is the new user's: their next page, read with
    // db.read(), finds the row although it was written a moment ago.
    db.bind_user(UserId::from(user.id));
    Ok((StatusCode::CREATED, Json(Created { id: user.id })))
}

/// `POST /login`: the identity is established here, so the handler binds
/// the request to the user, whose token then covers the login row.
async fn log_in(
    mut auth: AuthSession<Users>,
    db: PgDb,
    Json(credentials): Json<Credentials>,
) -> Result<Json<LoggedIn>, AppError> {
    let user = auth
        .authenticate(credentials)
        .await?
        .ok_or(AppError::Status(StatusCode::UNAUTHORIZED))?;
    auth.login(&user).await?;
    db.bind_user(UserId::from(user.id));
    let (login_id,): (i64,) =
        sqlx::query_as("insert into auth_logins (user_id) values ($1) returning id")
            .bind(user.id)
            .fetch_one(db.write())
            .await?;
    Ok(Json(LoggedIn {
        id: user.id,
        login_id,
    }))
}

/// `POST /logout`: ends the session. Nothing to do for the layer: the
/// browser's affinity cookie names the user only through a keyed tag, is
/// ignored for any other requester and expires with its TTL.
async fn log_out(mut auth: AuthSession<Users>) -> Result<StatusCode, AppError> {
    auth.logout().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Who is logged in, or 401.
fn current(auth: &AuthSession<Users>) -> Result<&User, AppError> {
    auth.user
        .as_ref()
        .ok_or(AppError::Status(StatusCode::UNAUTHORIZED))
}

/// `POST /notes {"text"}`: an ordinary write by a logged-in user, whose
/// token the identity function already bound.
async fn create_note(
    auth: AuthSession<Users>,
    db: PgDb,
    Json(note): Json<NewNote>,
) -> Result<(StatusCode, Json<Created>), AppError> {
    let user = current(&auth)?;
    let (id,): (i64,) =
        sqlx::query_as("insert into auth_notes (user_id, text) values ($1, $2) returning id")
            .bind(user.id)
            .bind(note.text)
            .fetch_one(db.write())
            .await?;
    Ok((StatusCode::CREATED, Json(Created { id })))
}

/// The body of `POST /notes`.
#[derive(Debug, Serialize, Deserialize)]
pub struct NewNote {
    /// What the note says.
    pub text: String,
}

/// `GET /me`: the user's own rows, read with `db.read().await` (a replica
/// that has replayed their last write, else the primary). 404 when the node
/// read has no such user: what a stale read looks like here.
async fn profile(auth: AuthSession<Users>, db: PgDb) -> Result<Json<Profile>, AppError> {
    let id = current(&auth)?.id;
    let pool = db.read().await;
    let (name, logins): (String, i64) = sqlx::query_as(
        "select name, (select count(*) from auth_logins where user_id = u.id) \
         from auth_users u where id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?
    .ok_or(AppError::Status(StatusCode::NOT_FOUND))?;
    let notes = sqlx::query_as("select id, text from auth_notes where user_id = $1 order by id")
        .bind(id)
        .fetch_all(pool)
        .await?;
    Ok(Json(Profile {
        id,
        name,
        logins,
        notes,
    }))
}

/// What a handler answers when it fails.
#[derive(Debug)]
enum AppError {
    Status(StatusCode),
    Database(sqlx::Error),
    Session(axum_login::Error<Users>),
}

impl From<sqlx::Error> for AppError {
    fn from(error: sqlx::Error) -> Self {
        AppError::Database(error)
    }
}

impl From<axum_login::Error<Users>> for AppError {
    fn from(error: axum_login::Error<Users>) -> Self {
        AppError::Session(error)
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        match self {
            AppError::Status(status) => status.into_response(),
            AppError::Database(error) => {
                tracing::warn!(%error, "database error");
                StatusCode::SERVICE_UNAVAILABLE.into_response()
            }
            AppError::Session(error) => {
                tracing::warn!(%error, "session error");
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        }
    }
}

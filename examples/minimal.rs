//! The README's quickstart, complete: an axum app whose users read their own
//! posts back at once, although reads go to lagging replicas.
//!
//! ```sh
//! # Any primary with streaming replicas; the role should have pg_monitor.
//! DATABASE_URL=postgres://app@localhost:5432/app \
//! REPLICA_URLS=postgres://app@localhost:5433/app,postgres://app@localhost:5434/app \
//! AFFINITY_KEY=$(openssl rand -base64 32) \
//! cargo run --example minimal
//!
//! curl -si -c jar -b jar -H 'x-user-id: 1' -d 'hello' http://127.0.0.1:3000/posts
//! curl -s  -c jar -b jar -H 'x-user-id: 1' http://127.0.0.1:3000/posts
//! ```
//!
//! No cluster at hand? `cargo run --example social` starts a throwaway one
//! and prints its URLs.

use std::time::Duration;

use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use read_after_write::pg::{sqlx, PgDb, PgReplicaSet};
use read_after_write::{KeySet, ReadAfterWriteLayer, UserId};
use tower_http::timeout::TimeoutLayer;

/// Who is asking, as your authentication layer puts it into the request's
/// extensions.
#[derive(Clone, Copy, Debug)]
struct CurrentUser {
    id: i64,
}

/// Stand-in authentication: trusts an `x-user-id` header. Use your own.
async fn authenticate(mut request: Request, next: Next) -> Result<Response, StatusCode> {
    let id = request
        .headers()
        .get("x-user-id")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
        .ok_or(StatusCode::UNAUTHORIZED)?;
    request.extensions_mut().insert(CurrentUser { id });
    Ok(next.run(request).await)
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

/// `GET /posts`: the user's own posts, from a replica that has their last
/// write (or the primary, after at most `max_wait`).
async fn my_posts(db: PgDb, user: CurrentUser) -> Result<Json<Vec<String>>, StatusCode> {
    let rows: Vec<(String,)> =
        sqlx::query_as("select content from posts where user_id = $1 order by id desc")
            .bind(user.id)
            .fetch_all(db.read().await) // read() is async: note the .await
            .await
            .map_err(internal)?;
    Ok(Json(rows.into_iter().map(|(content,)| content).collect()))
}

/// `POST /posts`: writes on the primary; the response carries a fresh token.
async fn create_post(
    db: PgDb,
    user: CurrentUser,
    content: String,
) -> Result<StatusCode, StatusCode> {
    sqlx::query("insert into posts (user_id, content) values ($1, $2)")
        .bind(user.id)
        .bind(content)
        .execute(db.write()) // write() marks the request as writing
        .await
        .map_err(internal)?;
    Ok(StatusCode::CREATED)
}

fn internal(error: sqlx::Error) -> StatusCode {
    eprintln!("database error: {error}");
    StatusCode::SERVICE_UNAVAILABLE
}

#[tokio::main]
async fn main() {
    if let Err(error) = run().await {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    // DATABASE_URL is the primary, REPLICA_URLS the replicas.
    let replicas = PgReplicaSet::from_env().await?;
    sqlx::query(
        "create table if not exists posts \
         (id bigserial primary key, user_id bigint not null, content text not null)",
    )
    .execute(replicas.primary_pool())
    .await?;

    let layer = ReadAfterWriteLayer::new(replicas, KeySet::from_env("AFFINITY_KEY")?)
        // Tokens belong to the user authentication found.
        .identity(|parts| {
            let user = parts.extensions.get::<CurrentUser>()?;
            Some(UserId::from(user.id))
        })
        // Default 20 ms: a session read waits at most this long for a
        // replica, then reads the primary. Set it a little above your lag.
        .max_wait(Duration::from_millis(50))
        // The cookie is Secure by default (sent back over HTTPS only); this
        // example serves plain HTTP.
        .secure(false);

    let app = Router::new()
        .route("/posts", get(my_posts).post(create_post))
        // Inner: sees what authentication inserted.
        .layer(layer)
        // Outer: runs first. Inside the layer, the identity is still unknown
        // when the layer looks, and no token is ever issued.
        .layer(middleware::from_fn(authenticate))
        // A query on a frozen server never returns on its own: bound every
        // request.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(5),
        ));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("serving on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

//! The README's example, complete: an axum app whose users read their own
//! posts back at once, although reads go to lagging replicas. The README
//! shows the region between the `ANCHOR` comments, and CI checks that it
//! matches (`.ci/readme-example`).
//!
//! ```sh
//! # Any primary with streaming replicas. For replicas to serve reads after
//! # a write, the role needs pg_monitor or the heartbeat table (HEARTBEAT_DDL).
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
use tower_http::timeout::TimeoutLayer;

// ANCHOR: readme
use read_after_write::pg::{sqlx, PgDb, PgReplicaSet};
use read_after_write::{CheckContext, KeySet, ReadAfterWriteLayer, UserId};

/// `POST /posts`: a write on the primary; the response carries a fresh token.
async fn create_post(db: PgDb, user: CurrentUser, text: String) -> Result<StatusCode, StatusCode> {
    sqlx::query("insert into posts (user_id, content) values ($1, $2)")
        .bind(user.id)
        .bind(text)
        .execute(db.write()) // write(): the primary, and marks the request as writing
        .await
        .map_err(internal)?;
    Ok(StatusCode::CREATED)
}

/// `GET /posts`: the user's own posts, from a replica that has their last write.
async fn my_posts(db: PgDb, user: CurrentUser) -> Result<Json<Vec<String>>, StatusCode> {
    let posts = sqlx::query_scalar("select content from posts where user_id = $1 order by id")
        .bind(user.id)
        .fetch_all(db.read().await) // read() may wait for a replica: .await it
        .await
        .map_err(internal)?;
    Ok(Json(posts))
}

async fn app() -> Result<Router, Box<dyn std::error::Error>> {
    let replicas = PgReplicaSet::from_env().await?; // DATABASE_URL, REPLICA_URLS
    create_table(replicas.primary_pool()).await?;
    // One or more base64 keys, newest first, the same on every instance.
    let layer = ReadAfterWriteLayer::new(replicas, KeySet::from_env("AFFINITY_KEY")?)
        // Tokens belong to the user your authentication layer found.
        .identity(|parts| {
            let user = parts.extensions.get::<CurrentUser>()?;
            Some(UserId::from(user.id))
        })
        // The cookie is `Secure` (HTTPS only) by default; this demo serves HTTP.
        .secure(false);
    // Whatever would quietly cost consistency or primary capacity, if anything.
    let served = CheckContext::new().served_over_https(false);
    eprint!("{}", layer.check(served).await);
    Ok(Router::new()
        .route("/posts", get(my_posts).post(create_post))
        .layer(layer) // inner: sees the user authentication inserted
        .layer(middleware::from_fn(authenticate)) // outer: runs first
        // A query on a frozen server never returns on its own: bound requests.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(5),
        )))
}
// ANCHOR_END: readme

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

async fn create_table(primary: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "create table if not exists posts \
         (id bigserial primary key, user_id bigint not null, content text not null)",
    )
    .execute(primary)
    .await?;
    Ok(())
}

fn internal(error: sqlx::Error) -> StatusCode {
    eprintln!("database error: {error}");
    StatusCode::SERVICE_UNAVAILABLE
}

#[tokio::main]
async fn main() {
    if let Err(error) = serve().await {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    let app = app().await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("serving on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

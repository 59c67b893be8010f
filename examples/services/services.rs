//! Two services, one user session: service A writes a post and calls
//! service B, which reads the user's posts from its own replicas.
//!
//! A's outgoing client is wrapped in `ForwardTokenLayer` and A's layer has
//! `forward_tokens(true)`, so the call carries a token covering the post A
//! just wrote; B's `ReadAfterWriteLayer` (same keys, identity from the
//! forwarded `x-user-id`) routes its read to a replica that has the post.
//! For comparison, A makes the same call once more through a plain client:
//! B then reads any replica, and often misses the post.

use std::time::Duration;

use axum::extract::Json;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use read_after_write::forward::{ForwardToken, ForwardTokenLayer};
use read_after_write::pg::{sqlx, PgDb, PgReplicaSet};
use read_after_write::{KeySet, ReadAfterWriteLayer, UserId};
use serde::{Deserialize, Serialize};
use tower::{Layer, Service, ServiceExt};

type PlainClient = Client<HttpConnector, Empty<Bytes>>;

fn user(headers: &HeaderMap) -> Option<i64> {
    headers.get("x-user-id")?.to_str().ok()?.parse().ok()
}

fn layer(replicas: PgReplicaSet, keys: KeySet) -> ReadAfterWriteLayer<PgReplicaSet> {
    ReadAfterWriteLayer::new(replicas, keys)
        .identity(|parts| user(&parts.headers).map(UserId::from))
        .max_wait(Duration::from_millis(500))
        .secure(false)
}

/// Creates the table (idempotent) on the primary.
pub async fn migrate(primary: &sqlx::PgPool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "create table if not exists service_posts \
         (id bigserial primary key, user_id bigint not null, content text not null)",
    )
    .execute(primary)
    .await
    .map(drop)
}

/// Service B: `GET /posts` lists the caller's post ids, read with
/// `db.read()`.
pub fn service_b(replicas: PgReplicaSet, keys: KeySet) -> Router {
    Router::new()
        .route("/posts", get(list_posts))
        .layer(layer(replicas, keys))
}

async fn list_posts(db: PgDb, headers: HeaderMap) -> Result<Json<Vec<i64>>, StatusCode> {
    let user = user(&headers).ok_or(StatusCode::UNAUTHORIZED)?;
    let ids: Vec<(i64,)> = sqlx::query_as("select id from service_posts where user_id = $1")
        .bind(user)
        .fetch_all(db.read().await)
        .await
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    Ok(Json(ids.into_iter().map(|(id,)| id).collect()))
}

/// What `POST /posts` on service A answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct Outcome {
    /// The new post.
    pub id: i64,
    /// Whether B listed it when called with the forwarded token.
    pub forwarded_saw: bool,
    /// Whether B listed it when called without.
    pub plain_saw: bool,
}

#[derive(Clone)]
struct ServiceA {
    b: String,
    forwarding: ForwardToken<PlainClient>,
    plain: PlainClient,
}

/// Service A: `POST /posts` writes a post, then asks service B (at `b`,
/// e.g. `http://127.0.0.1:4001`) for the user's posts, with and without
/// the forwarded token.
pub fn service_a(replicas: PgReplicaSet, keys: KeySet, b: String) -> Router {
    let plain: PlainClient = Client::builder(TokioExecutor::new()).build_http();
    let state = ServiceA {
        b,
        forwarding: ForwardTokenLayer.layer(plain.clone()),
        plain,
    };
    Router::new()
        .route("/posts", post(create_post))
        .with_state(state)
        .layer(layer(replicas, keys).forward_tokens(true))
}

async fn create_post(
    axum::extract::State(a): axum::extract::State<ServiceA>,
    db: PgDb,
    headers: HeaderMap,
    content: String,
) -> Result<Json<Outcome>, StatusCode> {
    let user = user(&headers).ok_or(StatusCode::UNAUTHORIZED)?;
    let (id,): (i64,) =
        sqlx::query_as("insert into service_posts (user_id, content) values ($1, $2) returning id")
            .bind(user)
            .bind(content)
            .fetch_one(db.write())
            .await
            .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    let forwarded_saw = b_lists(a.forwarding.clone(), &a.b, user, id).await?;
    let plain_saw = b_lists(a.plain.clone(), &a.b, user, id).await?;
    Ok(Json(Outcome {
        id,
        forwarded_saw,
        plain_saw,
    }))
}

/// Calls B's `GET /posts` as `user` through `client`; whether it lists `id`.
async fn b_lists<C>(client: C, b: &str, user: i64, id: i64) -> Result<bool, StatusCode>
where
    C: Service<http::Request<Empty<Bytes>>, Response = http::Response<hyper::body::Incoming>>,
    C::Error: std::fmt::Display,
{
    let request = http::Request::get(format!("{b}/posts"))
        .header("x-user-id", user.to_string())
        .body(Empty::new())
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let response = client.oneshot(request).await.map_err(|error| {
        tracing::warn!(%error, "call to service B failed");
        StatusCode::BAD_GATEWAY
    })?;
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|_| StatusCode::BAD_GATEWAY)?
        .to_bytes();
    let ids: Vec<i64> = serde_json::from_slice(&body).map_err(|_| StatusCode::BAD_GATEWAY)?;
    Ok(ids.contains(&id))
}

/// What [`demo`] counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Posts written through A.
    pub posts: usize,
    /// Of those, how many B listed when the token came along.
    pub forwarded_saw: usize,
    /// And how many without it.
    pub plain_saw: usize,
}

/// Serves B and A on loopback (each with its own replica set of the same
/// cluster, as separate services would have), posts `posts` times through
/// A, and counts what B saw.
pub async fn demo(
    replicas_a: PgReplicaSet,
    replicas_b: PgReplicaSet,
    keys: KeySet,
    posts: usize,
) -> Result<Report, Box<dyn std::error::Error + Send + Sync>> {
    migrate(replicas_a.primary_pool()).await?;
    // B reads from replicas: wait until they have the table.
    read_after_write_lab::schema::wait_for_relation(
        &replicas_b,
        "service_posts",
        Duration::from_secs(10),
    )
    .await?;
    let keys_b = keys.clone();
    let b_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let b_url = format!("http://{}", b_listener.local_addr()?);
    let b =
        tokio::spawn(async move { axum::serve(b_listener, service_b(replicas_b, keys_b)).await });
    let a_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let a_url = format!("http://{}", a_listener.local_addr()?);
    let a =
        tokio::spawn(
            async move { axum::serve(a_listener, service_a(replicas_a, keys, b_url)).await },
        );

    let client = reqwest::Client::new();
    let mut report = Report {
        posts,
        forwarded_saw: 0,
        plain_saw: 0,
    };
    for i in 0..posts {
        let outcome: Outcome = client
            .post(format!("{a_url}/posts"))
            .header("x-user-id", (i % 3 + 1).to_string())
            .body(format!("post {i}"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        report.forwarded_saw += usize::from(outcome.forwarded_saw);
        report.plain_saw += usize::from(outcome.plain_saw);
    }
    a.abort();
    b.abort();
    Ok(report)
}

//! Background jobs that read their user's writes: a handler writes a post
//! and enqueues a job in a PostgreSQL table; workers take jobs with
//! `FOR UPDATE SKIP LOCKED` and read the post from a replica.
//!
//! The handler puts [`Db::requirement`](read_after_write::Db::requirement)
//! into the job's payload, after its write; the consistent worker reads with
//! [`Requirement::route`]: a replica that has the post, a bounded wait, or
//! the primary. Jobs run faster than replication, so a naive worker, which
//! reads any replica, often misses the post. Each post gets one job per
//! worker kind, so both read the same writes at the same moment.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Json;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use read_after_write::pg::{PgDb, PgReplicaSet};
use read_after_write::{KeySet, ReadAfterWriteLayer, Requirement, UserId};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// The job kinds: the same work, with and without the requirement.
pub const KINDS: [WorkerKind; 2] = [WorkerKind::Consistent, WorkerKind::Naive];

/// How a worker reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerKind {
    /// With the job's requirement.
    Consistent,
    /// From any replica, ignoring it.
    Naive,
}

impl WorkerKind {
    /// The `kind` column's value.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerKind::Consistent => "consistent",
            WorkerKind::Naive => "naive",
        }
    }
}

/// Creates the tables (idempotent) on the primary.
pub async fn migrate(primary: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(
        "create table if not exists job_posts (\
             id bigserial primary key, user_id bigint not null, content text not null);\
         create table if not exists jobs (\
             id bigserial primary key, kind text not null, post_id bigint not null,\
             requirement text not null, done_at timestamptz, found boolean);\
         create index if not exists jobs_pending on jobs (kind, id) where done_at is null;",
    )
    .execute(primary)
    .await
    .map(drop)
}

/// What `POST /posts` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct Created {
    /// The post's id.
    pub id: i64,
    /// The requirement its jobs carry, as text.
    pub requirement: String,
}

/// The app: `POST /posts` (body: the text; identity: `x-user-id`) writes a
/// post and enqueues its jobs.
pub fn router(replicas: PgReplicaSet, keys: KeySet) -> Router {
    let layer = ReadAfterWriteLayer::new(replicas, keys)
        .identity(user)
        .secure(false);
    Router::new()
        .route("/posts", post(create_post))
        .layer(layer)
}

fn user(parts: &Parts) -> Option<UserId> {
    let id: i64 = parts
        .headers
        .get("x-user-id")?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(UserId::from(id))
}

async fn create_post(
    db: PgDb,
    headers: HeaderMap,
    content: String,
) -> Result<(StatusCode, Json<Created>), StatusCode> {
    let user: i64 = headers
        .get("x-user-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or(StatusCode::UNAUTHORIZED)?;
    let (id,): (i64,) =
        sqlx::query_as("insert into job_posts (user_id, content) values ($1, $2) returning id")
            .bind(user)
            .bind(content)
            .fetch_one(db.write())
            .await
            .map_err(unavailable)?;
    // After the write: the requirement covers it.
    let requirement = db.requirement().await.to_string();
    for kind in KINDS {
        sqlx::query("insert into jobs (kind, post_id, requirement) values ($1, $2, $3)")
            .bind(kind.as_str())
            .bind(id)
            .bind(&requirement)
            .execute(db.write())
            .await
            .map_err(unavailable)?;
    }
    Ok((StatusCode::CREATED, Json(Created { id, requirement })))
}

fn unavailable(error: sqlx::Error) -> StatusCode {
    tracing::warn!(%error, "database error");
    StatusCode::SERVICE_UNAVAILABLE
}

/// Takes jobs of one kind until `stop`, reading each job's post.
pub async fn work(
    replicas: PgReplicaSet,
    kind: WorkerKind,
    max_wait: Duration,
    stop: Arc<AtomicBool>,
) -> Result<u64, sqlx::Error> {
    let mut done = 0;
    while !stop.load(Ordering::Relaxed) {
        if run_one(&replicas, kind, max_wait).await? {
            done += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    Ok(done)
}

/// Runs one pending job of `kind`, if there is one.
async fn run_one(
    replicas: &PgReplicaSet,
    kind: WorkerKind,
    max_wait: Duration,
) -> Result<bool, sqlx::Error> {
    let mut job = replicas.primary_pool().begin().await?;
    let taken: Option<(i64, i64, String)> = sqlx::query_as(
        "select id, post_id, requirement from jobs \
         where kind = $1 and done_at is null order by id limit 1 for update skip locked",
    )
    .bind(kind.as_str())
    .fetch_optional(&mut *job)
    .await?;
    let Some((id, post_id, requirement)) = taken else {
        return Ok(false);
    };
    let requirement = match kind {
        // A malformed payload is a bug of ours; the primary is always safe.
        WorkerKind::Consistent => requirement.parse().unwrap_or(Requirement::Primary),
        WorkerKind::Naive => Requirement::Nothing,
    };
    let routed = requirement.route(replicas, max_wait).await;
    let read: Result<(bool,), _> =
        sqlx::query_as("select exists(select 1 from job_posts where id = $1)")
            .bind(post_id)
            .fetch_one(routed.pool)
            .await;
    // A failed read (a replica restarting, say) did not see the post.
    let found = match read {
        Ok((found,)) => found,
        Err(error) => {
            tracing::warn!(node = routed.node, %error, "job read failed");
            false
        }
    };
    sqlx::query("update jobs set done_at = now(), found = $2 where id = $1")
        .bind(id)
        .bind(found)
        .execute(&mut *job)
        .await?;
    job.commit().await?;
    Ok(true)
}

/// Jobs of `kind` done so far, and how many found their post.
pub async fn tally(primary: &PgPool, kind: WorkerKind) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "select count(*), count(*) filter (where found) from jobs \
         where kind = $1 and done_at is not null",
    )
    .bind(kind.as_str())
    .fetch_one(primary)
    .await
}

/// What a run of [`demo`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemoReport {
    /// Posts written (one job per worker kind each).
    pub posts: i64,
    /// Jobs of the consistent worker that found their post.
    pub consistent_found: i64,
    /// Jobs of the naive worker that found their post.
    pub naive_found: i64,
}

/// Serves the app on loopback, runs one worker of each kind, writes `posts`
/// posts through HTTP (a few milliseconds apart, from five users), waits
/// until every job ran (at most 60 s), and tallies.
pub async fn demo(
    replicas: PgReplicaSet,
    keys: KeySet,
    posts: usize,
    max_wait: Duration,
) -> Result<DemoReport, Box<dyn std::error::Error + Send + Sync>> {
    migrate(replicas.primary_pool()).await?;
    // The workers read from replicas: wait until they have the tables.
    crate::schema::wait_for_relation(&replicas, "job_posts", Duration::from_secs(10)).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let app = router(replicas.clone(), keys);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = KINDS
        .into_iter()
        .map(|kind| tokio::spawn(work(replicas.clone(), kind, max_wait, Arc::clone(&stop))))
        .collect();

    let client = reqwest::Client::new();
    let (before, _) = tally(replicas.primary_pool(), WorkerKind::Naive).await?;
    for i in 0..posts {
        let response = client
            .post(format!("{base}/posts"))
            .header("x-user-id", (i % 5 + 1).to_string())
            .body(format!("post {i}"))
            .send()
            .await?;
        if response.status() != reqwest::StatusCode::CREATED {
            return Err(format!("POST /posts answered {}", response.status()).into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let expected = before + posts as i64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let report = loop {
        let (consistent_done, consistent_found) =
            tally(replicas.primary_pool(), WorkerKind::Consistent).await?;
        let (naive_done, naive_found) = tally(replicas.primary_pool(), WorkerKind::Naive).await?;
        if consistent_done >= expected && naive_done >= expected {
            break DemoReport {
                posts: expected,
                consistent_found,
                naive_found,
            };
        }
        if tokio::time::Instant::now() > deadline {
            return Err("the workers did not finish within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await??;
    }
    server.abort();
    Ok(report)
}

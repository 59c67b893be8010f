//! Shared by the integration tests: a real cluster, the schema, and a layer
//! over the real `PgReplicaSet`.
#![allow(dead_code, unreachable_pub)]

use std::convert::Infallible;
use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use http::header::{COOKIE, SET_COOKIE};
use http::{Request, Response};
use read_after_write::pg::{PgDb, PgReplicaSet};
use read_after_write::{KeySet, ReadAfterWriteLayer, SigningKey, UserId};
use read_after_write_testkit::TestCluster;
use tower::{service_fn, Layer, ServiceExt};

pub const FAST_LAG: Duration = Duration::from_millis(50);
pub const SLOW_LAG: Duration = Duration::from_millis(200);

/// A primary with two replicas lagging 50 ms and 200 ms, with
/// pg_stat_statements loaded so tests can count queries per node.
pub async fn start_cluster() -> TestCluster {
    TestCluster::builder()
        .replica(FAST_LAG)
        .replica(SLOW_LAG)
        .setting("shared_preload_libraries", "pg_stat_statements")
        .setting("pg_stat_statements.track", "all")
        .start()
        .await
        .expect("start a PostgreSQL primary with two streaming replicas")
}

/// Creates the test table (idempotent) and waits until every replica has it.
pub async fn create_schema(cluster: &TestCluster) {
    cluster
        .execute_on_primary(
            "create table if not exists posts (id bigserial primary key, user_id bigint not null, body text not null); \
             create extension if not exists pg_stat_statements",
        )
        .await
        .expect("create schema");
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .expect("replicas replay the schema");
}

pub async fn replica_set(cluster: &TestCluster) -> PgReplicaSet {
    replica_set_with(cluster, |b| b).await
}

pub async fn replica_set_with(
    cluster: &TestCluster,
    configure: impl FnOnce(
        read_after_write::pg::PgReplicaSetBuilder,
    ) -> read_after_write::pg::PgReplicaSetBuilder,
) -> PgReplicaSet {
    let mut builder = PgReplicaSet::builder()
        .primary_url(cluster.primary_url())
        .poll_interval(Duration::from_millis(10))
        .probe_timeout(Duration::from_millis(300))
        .max_backoff(Duration::from_millis(400));
    for replica in cluster.replicas() {
        builder = builder.replica_url(replica.name(), replica.url());
    }
    configure(builder)
        .connect()
        .await
        .expect("connect the replica set")
}

pub fn keys() -> KeySet {
    KeySet::new(SigningKey::from_bytes(&[42; 32]).unwrap())
}

/// The tests' identity function: the user is the `x-user-id` header.
pub fn identify(parts: &http::request::Parts) -> Option<UserId> {
    let id = parts
        .headers
        .get("x-user-id")?
        .to_str()
        .ok()?
        .parse::<i64>()
        .ok()?;
    Some(UserId::from(id))
}

/// What the test handler reports back in response extensions.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub post_id: Option<i64>,
    pub found: Option<bool>,
}

/// A service over the real replica set: `POST /posts/<body>` inserts a post
/// through `db.write()`; `GET /posts/<id>` checks with `db.read()` whether the
/// user's post is visible.
pub fn app(
    set: PgReplicaSet,
    max_wait: Duration,
) -> impl tower::Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send>
       + Clone
       + Send {
    let layer = ReadAfterWriteLayer::new(set, keys())
        .identity(identify)
        .max_wait(max_wait)
        .secure(false)
        .debug_header(true);
    layer.layer(service_fn(|req: Request<()>| async move {
        let db = req
            .extensions()
            .get::<PgDb>()
            .cloned()
            .expect("layer installed");
        let user: i64 = req.headers()["x-user-id"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let tail = req.uri().path().trim_start_matches("/posts/").to_owned();
        let mut response = Response::new(());
        let outcome = if req.method() == http::Method::POST {
            let id: Option<(i64,)> =
                sqlx::query_as("insert into posts (user_id, body) values ($1, $2) returning id")
                    .bind(user)
                    .bind(&tail)
                    .fetch_one(db.write())
                    .await
                    .ok();
            if id.is_none() {
                *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            }
            Outcome {
                post_id: id.map(|(id,)| id),
                found: None,
            }
        } else {
            let id: i64 = tail.parse().unwrap();
            let found: Option<(bool,)> =
                sqlx::query_as("select exists(select 1 from posts where id = $1 and user_id = $2)")
                    .bind(id)
                    .bind(user)
                    .fetch_one(db.read().await)
                    .await
                    .ok();
            Outcome {
                post_id: None,
                found: found.map(|(f,)| f),
            }
        };
        response.extensions_mut().insert(outcome);
        Ok::<_, Infallible>(response)
    }))
}

/// A tiny browser: one user, one cookie jar.
pub struct Browser<S> {
    pub service: S,
    pub user: i64,
    pub cookie: Option<String>,
}

impl<S> Browser<S>
where
    S: tower::Service<Request<()>, Response = Response<()>, Error = Infallible> + Clone,
{
    pub fn new(service: S, user: i64) -> Self {
        Browser {
            service,
            user,
            cookie: None,
        }
    }

    pub async fn send(&mut self, method: http::Method, path: &str) -> Response<()> {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header("x-user-id", self.user.to_string());
        if let Some(cookie) = &self.cookie {
            builder = builder.header(COOKIE, cookie);
        }
        let response = self
            .service
            .clone()
            .oneshot(builder.body(()).unwrap())
            .await
            .unwrap();
        for value in response.headers().get_all(SET_COOKIE) {
            let text = value.to_str().unwrap();
            if let Some(pair) = text
                .split(';')
                .next()
                .filter(|p| p.starts_with("primary_affinity="))
            {
                self.cookie = Some(pair.to_owned());
            }
        }
        response
    }

    /// Posts and returns the new post's id.
    pub async fn post(&mut self, body: &str) -> i64 {
        let response = self
            .send(http::Method::POST, &format!("/posts/{body}"))
            .await;
        response
            .extensions()
            .get::<Outcome>()
            .unwrap()
            .post_id
            .expect("insert succeeded")
    }

    /// Whether the user's post `id` is visible to a session read, and the
    /// debug header saying where the read went.
    pub async fn sees(&mut self, id: i64) -> (bool, String) {
        let response = self.send(http::Method::GET, &format!("/posts/{id}")).await;
        let found = response
            .extensions()
            .get::<Outcome>()
            .unwrap()
            .found
            .expect("read succeeded");
        let route = response
            .headers()
            .get("x-read-after-write")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (found, route)
    }
}

/// Whether post `id` is visible on one replica, read naively.
pub async fn visible_on(set: &PgReplicaSet, replica: &str, id: i64) -> bool {
    let pool = set.replica_pool(replica).expect("replica exists");
    let (found,): (bool,) = sqlx::query_as("select exists(select 1 from posts where id = $1)")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("naive read");
    found
}

/// Calls of statements whose text contains `marker`, summed per node.
pub async fn statement_calls(cluster: &TestCluster, marker: &str) -> Vec<i64> {
    let mut urls = vec![cluster.primary_url().to_owned()];
    urls.extend(cluster.replica_urls());
    let mut counts = Vec::new();
    for url in urls {
        let pool = sqlx::PgPool::connect(&url)
            .await
            .expect("connect for stats");
        let (calls,): (Option<i64>,) =
            sqlx::query_as("select sum(calls)::bigint from pg_stat_statements where query like '%' || $1 || '%' and query not like '%pg_stat_statements%'")
                .bind(marker)
                .fetch_one(&pool)
                .await
                .expect("read pg_stat_statements");
        counts.push(calls.unwrap_or(0));
        pool.close().await;
    }
    counts
}

/// Awaits `future` and counts how often it was polled. One poll means it was
/// ready at once: it never waited, neither slept nor asked a server
/// anything. That is how a test says "at once" without reading a clock,
/// which a loaded machine stretches (no wall-clock upper bounds in tests).
pub async fn polls_to_finish<F: Future>(future: F) -> (F::Output, u32) {
    let mut future = std::pin::pin!(future);
    let mut polls = 0;
    let output = std::future::poll_fn(|cx| {
        polls += 1;
        future.as_mut().poll(cx)
    })
    .await;
    (output, polls)
}

/// A bound, in the set's own tracker polls, on a wait for something the
/// tracker (or anything else the set runs) must get done: unlike a
/// deadline, a loaded machine slows the bound down with the work, so it
/// cannot fail a test that is correct. (A tracker that stopped polling
/// would hang the test instead of failing it.)
pub struct PollBudget<'a> {
    set: &'a PgReplicaSet,
    start: u64,
    polls: u64,
}

impl<'a> PollBudget<'a> {
    /// `polls` more polls of `set`'s tracker, from now.
    pub fn new(set: &'a PgReplicaSet, polls: u64) -> Self {
        PollBudget {
            set,
            start: set.tracker_polls(),
            polls,
        }
    }

    /// Polls spent so far.
    pub fn spent(&self) -> u64 {
        self.set.tracker_polls() - self.start
    }

    /// Panics, saying `what` did not happen, once the polls are spent.
    pub fn check(&self, what: impl Display) {
        let spent = self.spent();
        assert!(
            spent <= self.polls,
            "{what}: not within {spent} tracker polls: {:?}",
            self.set.replicas()
        );
    }
}

/// Waits until `done` holds, for at most `polls` polls of `set`'s tracker
/// (see [`PollBudget`]); returns the polls it took.
pub async fn until_polled(
    set: &PgReplicaSet,
    polls: u64,
    what: impl Display,
    mut done: impl FnMut() -> bool,
) -> u64 {
    let budget = PollBudget::new(set, polls);
    while !done() {
        budget.check(&what);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    budget.spent()
}

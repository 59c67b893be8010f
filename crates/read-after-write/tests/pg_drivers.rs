//! The tokio-postgres (deadpool-postgres) and diesel-async backends on a
//! real primary with two streaming replicas lagging 50 ms and 200 ms, and
//! behind a reader endpoint over both: the user's own reads see their
//! writes, eventual reads stay on replicas, a replica that stops replaying
//! sends session reads to the primary, each server's pool behind an
//! endpoint reaches that very server, a restarted replica serves again
//! without a failed read, and with the primary down or frozen a write
//! fails at once or within the acquire timeout. Each test also reads the naive way,
//! the driver's pool straight to a lagging replica, and shows it stale, so
//! it could fail.
//!
//! One cluster serves the whole binary; the tests take turns.
#![cfg(all(feature = "tokio-postgres", feature = "diesel-async"))]

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use http::{Method, Request, Response};
use read_after_write::diesel_async::{DieselDeadpool, DieselReplicaSet};
use read_after_write::pg::driver::{Driver, ReplicaPools};
use read_after_write::pg::PgReplicaSetBuilder;
use read_after_write::tokio_postgres::{Deadpool, TokioPgReplicaSet};
use read_after_write::{Backend, Db, ReadAfterWriteLayer};
use read_after_write_testkit::{TcpProxy, TestCluster};
use tokio::sync::{Mutex, OnceCell};
use tower::{service_fn, Layer, Service};

static CLUSTER: OnceCell<TestCluster> = OnceCell::const_new();
/// The paused-replay test stops replication for everyone: one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// A role that logs in with a password, rotated while the app runs.
const ROTATING: &str = "drivers_rotating";

async fn cluster() -> &'static TestCluster {
    CLUSTER
        .get_or_init(|| async {
            let cluster = TestCluster::builder()
                .replica(FAST_LAG)
                .replica(SLOW_LAG)
                .hba_line(format!("host all {ROTATING} 127.0.0.1/32 scram-sha-256"))
                .hba_line(format!("host all {ROTATING} ::1/128 scram-sha-256"))
                .start()
                .await
                .expect("start a PostgreSQL primary with two streaming replicas");
            create_schema(&cluster).await;
            cluster
                .execute_on_primary(&format!(
                    "create role {ROTATING} login password 'first'; grant pg_monitor to {ROTATING}; \
                     grant select, insert on posts to {ROTATING}; \
                     grant usage on sequence posts_id_seq to {ROTATING}"
                ))
                .await
                .expect("create the rotating role");
            cluster
                .wait_for_replicas_caught_up(Duration::from_secs(10))
                .await
                .expect("replicas replay the role");
            cluster
        })
        .await
}

diesel::table! {
    posts (id) {
        id -> Int8,
        user_id -> Int8,
        body -> Text,
    }
}

/// The builder every test starts from: the cluster's URLs, fast polls.
fn builder(cluster: &TestCluster) -> PgReplicaSetBuilder {
    let mut builder = read_after_write::pg::PgReplicaSet::builder()
        .primary_url(cluster.primary_url())
        .poll_interval(Duration::from_millis(10))
        .probe_timeout(Duration::from_millis(300))
        .max_backoff(Duration::from_millis(400))
        // Every session read on a replica confirmed where it ran.
        .canary_rate(1.0);
    for replica in cluster.replicas() {
        builder = builder.replica_url(replica.name(), replica.url());
    }
    builder
}

/// Waits, up to 5 s, for the canary to have confirmed some reads; asserts
/// it found none on a server lacking its write.
async fn canary_confirms<D: Driver>(set: &ReplicaPools<D>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while set.set().canary_counts().0 == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (checks, violations) = set.set().canary_counts();
    eprintln!("canary: {checks} reads confirmed on the driver's pools, {violations} violations");
    assert!(
        checks > 0,
        "the canary confirmed no read on the driver's pools"
    );
    assert_eq!(violations, 0);
}

/// One driver's queries, as a handler writes them.
trait Queries: Driver + Sized {
    fn new() -> Self;
    /// A pool straight to `url`, tied to no server (the naive way).
    fn pool_for_url(&self, url: &str) -> Option<Self::Pool>;
    /// Inserts a post by `user`; its id.
    fn insert(pool: &Self::Pool, user: i64, body: &str)
        -> impl Future<Output = Option<i64>> + Send;
    /// Whether post `id` by `user` is visible; `None` if the query failed.
    fn finds(pool: &Self::Pool, id: i64, user: i64) -> impl Future<Output = Option<bool>> + Send;
    /// The ports of the servers `n` connections of the pool, held at once
    /// (so each is another connection), reached.
    fn server_ports(pool: &Self::Pool, n: usize) -> impl Future<Output = Vec<i32>> + Send;
}

impl Queries for Deadpool {
    fn new() -> Self {
        Deadpool::new()
    }

    fn pool_for_url(&self, url: &str) -> Option<Self::Pool> {
        let config: tokio_postgres::Config = url.parse().ok()?;
        let manager = deadpool_postgres::Manager::new(config, tokio_postgres::NoTls);
        deadpool_postgres::Pool::builder(manager)
            .max_size(1)
            .build()
            .ok()
    }

    async fn insert(pool: &Self::Pool, user: i64, body: &str) -> Option<i64> {
        let client = pool.get().await.ok()?;
        let row = client
            .query_one(
                "insert into posts (user_id, body) values ($1, $2) returning id",
                &[&user, &body],
            )
            .await
            .ok()?;
        Some(row.get(0))
    }

    async fn finds(pool: &Self::Pool, id: i64, user: i64) -> Option<bool> {
        let client = pool.get().await.ok()?;
        let row = client
            .query_one(
                "select exists(select 1 from posts where id = $1 and user_id = $2)",
                &[&id, &user],
            )
            .await
            .ok()?;
        Some(row.get(0))
    }

    async fn server_ports(pool: &Self::Pool, n: usize) -> Vec<i32> {
        let mut held = Vec::new();
        let mut ports = Vec::new();
        for _ in 0..n {
            let client = pool.get().await.expect("a connection");
            let row = client
                .query_one("select inet_server_port()", &[])
                .await
                .expect("port");
            ports.push(row.get(0));
            held.push(client);
        }
        ports
    }
}

impl Queries for DieselDeadpool {
    fn new() -> Self {
        DieselDeadpool
    }

    fn pool_for_url(&self, url: &str) -> Option<Self::Pool> {
        let manager = diesel_async::pooled_connection::AsyncDieselConnectionManager::<
            diesel_async::AsyncPgConnection,
        >::new(url);
        Self::Pool::builder(manager).max_size(1).build().ok()
    }

    async fn insert(pool: &Self::Pool, user: i64, body: &str) -> Option<i64> {
        let mut conn = pool.get().await.ok()?;
        diesel::insert_into(posts::table)
            .values((posts::user_id.eq(user), posts::body.eq(body)))
            .returning(posts::id)
            .get_result(&mut conn)
            .await
            .ok()
    }

    async fn finds(pool: &Self::Pool, id: i64, user: i64) -> Option<bool> {
        let mut conn = pool.get().await.ok()?;
        diesel::select(diesel::dsl::exists(
            posts::table.filter(posts::id.eq(id).and(posts::user_id.eq(user))),
        ))
        .get_result(&mut conn)
        .await
        .ok()
    }

    async fn server_ports(pool: &Self::Pool, n: usize) -> Vec<i32> {
        #[derive(QueryableByName)]
        struct Port {
            #[diesel(sql_type = diesel::sql_types::Integer)]
            port: i32,
        }
        let mut held = Vec::new();
        let mut ports = Vec::new();
        for _ in 0..n {
            let mut conn = pool.get().await.expect("a connection");
            let found: Port = diesel::sql_query("select inet_server_port() as port")
                .get_result(&mut conn)
                .await
                .expect("port");
            ports.push(found.port);
            held.push(conn);
        }
        ports
    }
}

/// The app over `set`, through the driver's pools only: `POST /posts/<body>`
/// inserts with `db.write()`, `GET /posts/<id>` checks with `db.read()`
/// whether the user's post is visible, `GET /feed` reads with
/// `db.eventual()`.
fn app<D: Queries>(
    set: ReplicaPools<D>,
) -> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send> + Clone + Send
{
    let layer = ReadAfterWriteLayer::new(set, keys())
        .identity(identify)
        .max_wait(Duration::from_millis(100))
        .secure(false)
        .debug_header(true);
    layer.layer(service_fn(|req: Request<()>| async move {
        let db = req
            .extensions()
            .get::<Db<ReplicaPools<D>>>()
            .cloned()
            .expect("layer installed");
        let user: i64 = req.headers()["x-user-id"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let path = req.uri().path().to_owned();
        let outcome = if let Some(body) = path
            .strip_prefix("/posts/")
            .filter(|_| req.method() == Method::POST)
        {
            Outcome {
                post_id: D::insert(db.write(), user, body).await,
                found: None,
            }
        } else if path == "/feed" {
            Outcome {
                post_id: None,
                found: D::finds(db.eventual(), 0, user).await,
            }
        } else {
            let id: i64 = path.trim_start_matches("/posts/").parse().unwrap();
            Outcome {
                post_id: None,
                found: D::finds(db.read().await, id, user).await,
            }
        };
        let mut response = Response::new(());
        if outcome.post_id.is_none() && outcome.found.is_none() {
            *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        }
        response.extensions_mut().insert(outcome);
        Ok::<_, Infallible>(response)
    }))
}

/// Writes and reads back `pairs` times through the layer; also reads each
/// write naively from the 200 ms replica's pool right after it.
async fn reads_see_writes<D: Queries>(set: ReplicaPools<D>, user: i64, pairs: usize) {
    let naive = set.replica_pool("replica-2").expect("replica-2");
    let mut browser = Browser::new(app(set.clone()), user);
    let (mut stale_naive, mut on_replicas) = (0, 0);
    for i in 0..pairs {
        let id = browser.post(&format!("driver-{i}")).await;
        stale_naive += usize::from(!D::finds(naive, id, user).await.expect("naive read"));
        let (found, route) = browser.sees(id).await;
        assert!(found, "write {i} not seen by the session read ({route})");
        on_replicas += usize::from(route.contains("node=replica"));
    }
    eprintln!(
        "{}: {pairs} writes, each read back through Db::read ({on_replicas} from a replica); \
         the naive read of the 200 ms replica was stale {stale_naive} times",
        std::any::type_name::<D>()
    );
    assert!(
        stale_naive > 0,
        "the naive read never went stale, so this test proves nothing"
    );
    // Other users' posts: eventual, from a replica.
    let response = browser.send(Method::GET, "/feed").await;
    assert_eq!(
        response.extensions().get::<Outcome>().unwrap().found,
        Some(false)
    );
    let route = response.headers()["x-read-after-write"].to_str().unwrap();
    assert!(route.contains("node=replica"), "{route}");
    canary_confirms(&set).await;
    set.set().shutdown().await;
}

/// With both replicas' replay paused, the naive read is stale and every
/// session read goes to the primary, and sees the write.
async fn paused_replay_reads_the_primary<D: Queries>(set: ReplicaPools<D>, user: i64) {
    let cluster = cluster().await;
    let mut browser = Browser::new(app(set.clone()), user);
    cluster.pause_replay(0).await.unwrap();
    cluster.pause_replay(1).await.unwrap();
    let id = browser.post("paused").await;
    for replica in ["replica-1", "replica-2"] {
        let naive = set.replica_pool(replica).unwrap();
        assert_eq!(
            D::finds(naive, id, user).await,
            Some(false),
            "a naive read of a paused replica is stale"
        );
    }
    for _ in 0..5 {
        let (found, route) = browser.sees(id).await;
        assert!(found, "{route}");
        assert!(route.contains("node=primary"), "{route}");
    }
    cluster.resume_replay(0).await.unwrap();
    cluster.resume_replay(1).await.unwrap();
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();
    set.set().shutdown().await;
}

/// Behind a reader endpoint over both replicas: each server's pool reaches
/// that server only (its connections are admitted by fingerprint), and no
/// own read is stale, while a naive pool over the endpoint goes stale.
async fn reader_endpoint<D: Queries>(user: i64) {
    let cluster = cluster().await;
    let endpoint = TcpProxy::start_balanced(&cluster.replica_ports())
        .await
        .expect("start the reader endpoint");
    let endpoint_url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        endpoint.port()
    );
    let mut builder = read_after_write::pg::PgReplicaSet::builder()
        .primary_url(cluster.primary_url())
        .replica_url("readers", &endpoint_url)
        .poll_interval(Duration::from_millis(10));
    let naive = ReplicaPools::connect(builder, D::new())
        .await
        .expect("connect over the endpoint");
    // The naive read: a driver pool over the endpoint, tied to no server,
    // misses fresh writes whenever it lands on the slow replica.
    let endpoint_only = D::new()
        .pool_for_url(&endpoint_url)
        .expect("a pool over the endpoint");
    let mut naive_stale = 0;
    for _ in 0..20 {
        let id = D::insert(naive.primary_pool(), user, "naive")
            .await
            .unwrap();
        naive_stale += usize::from(!D::finds(&endpoint_only, id, user).await.unwrap());
    }
    naive.set().shutdown().await;
    assert!(
        naive_stale > 0,
        "the endpoint never reached the lagging replica"
    );

    builder = read_after_write::pg::PgReplicaSet::builder()
        .primary_url(cluster.primary_url())
        .replica_url("readers", &endpoint_url)
        .poll_interval(Duration::from_millis(10));
    let set = ReplicaPools::connect(builder.canary_rate(1.0), D::new())
        .await
        .expect("connect over the endpoint");
    let servers = set.replicas();
    assert_eq!(servers.len(), 2, "{servers:?}");
    // Each server's pool reaches that server, however the endpoint deals
    // connections out (the endpoint alternates; four connections held at
    // once are four new ones, about half of them refused and reopened).
    for server in &servers {
        let pool = set.replica_pool(&server.name).unwrap();
        let expected = server.server.clone().unwrap();
        for port in D::server_ports(pool, 4).await {
            assert_eq!(format!("127.0.0.1:{port}"), expected, "{}", server.name);
        }
    }
    let service = app(set.clone());
    let mut stale = 0;
    let mut nodes = std::collections::BTreeMap::<String, usize>::new();
    for round in 0..30 {
        let mut browser = Browser::new(service.clone(), user + round);
        let id = browser.post("endpoint").await;
        let (found, route) = browser.sees(id).await;
        stale += usize::from(!found);
        let node = route.split("; ").next().unwrap_or("").to_owned();
        *nodes.entry(node).or_default() += 1;
    }
    assert_eq!(stale, 0, "{nodes:?}");
    assert!(
        nodes.keys().any(|node| node.starts_with("node=readers")),
        "reads should use the servers behind the endpoint: {nodes:?}"
    );
    canary_confirms(&set).await;
    set.set().shutdown().await;
}

/// Waits, up to 10 s, until the tracker sees `name` healthy (or not).
async fn wait_health<D: Driver>(set: &ReplicaPools<D>, name: &str, healthy: bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !set
        .replicas()
        .iter()
        .any(|r| r.name == name && r.healthy == healthy)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never became healthy={healthy}: {:?}",
            set.replicas()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` eventual reads through the backend, each run on the pool it was
/// routed to: how many went to `name`. A failed read fails the test.
async fn eventual_reads<D: Queries>(set: &ReplicaPools<D>, n: usize, name: &str) -> usize {
    let mut hits = 0;
    for _ in 0..n {
        let routed = set.eventual();
        D::finds(routed.pool, 0, 0)
            .await
            .unwrap_or_else(|| panic!("an eventual read on {} failed", routed.node));
        hits += usize::from(routed.node == name);
    }
    hits
}

/// A stopped, then a killed, replica is left by reads and serves them again
/// after its restart, without failing a read on the connections its pool
/// held before the outage.
async fn restarted_replica<D: Queries>() {
    let cluster = cluster().await;
    let set = ReplicaPools::connect(builder(cluster), D::new())
        .await
        .unwrap();
    let pool = set.replica_pool("replica-2").unwrap();
    // Connections opened before each outage, left in the pool.
    D::server_ports(pool, 3).await;
    cluster.stop_replica(1).await.unwrap();
    wait_health(&set, "replica-2", false).await;
    assert_eq!(eventual_reads(&set, 30, "replica-2").await, 0);
    cluster.start_replica(1).await.unwrap();
    wait_health(&set, "replica-2", true).await;
    assert!(eventual_reads(&set, 30, "replica-2").await > 0);

    D::server_ports(pool, 3).await;
    cluster.kill_replica(1).await.unwrap();
    wait_health(&set, "replica-2", false).await;
    assert_eq!(eventual_reads(&set, 30, "replica-2").await, 0);
    cluster.start_replica(1).await.unwrap();
    wait_health(&set, "replica-2", true).await;
    assert!(eventual_reads(&set, 30, "replica-2").await > 0);
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();
    set.set().shutdown().await;
}

/// With the primary down, a write fails within the acquire timeout (1 s by
/// default), never by waiting on anything else; eventual reads go on from
/// the replicas.
async fn primary_down<D: Queries>() {
    let cluster = cluster().await;
    let set = ReplicaPools::connect(builder(cluster), D::new())
        .await
        .unwrap();
    cluster.stop_primary().await.unwrap();
    let started = std::time::Instant::now();
    let inserted = D::insert(set.primary_pool(), 1, "down").await;
    let took = started.elapsed();
    eprintln!(
        "{}: a write with the primary down failed after {took:?}",
        std::any::type_name::<D>()
    );
    assert_eq!(inserted, None);
    assert!(set.set().write_position().await.is_err());
    assert_eq!(eventual_reads(&set, 20, "primary").await, 0);
    cluster.start_primary().await.unwrap();
    set.set().shutdown().await;
    // Wait until the primary takes writes again, for the next test.
    let again = ReplicaPools::connect(builder(cluster), D::new());
    tokio::time::timeout(Duration::from_secs(10), again)
        .await
        .expect("the restarted primary answers")
        .expect("connect after the restart")
        .set()
        .shutdown()
        .await;
}

/// With the primary frozen (SIGSTOP: it accepts connections and answers
/// nothing), a write's checkout on a pool with no connection yet fails
/// within the acquire timeout (1 s by default) instead of hanging.
async fn primary_frozen<D: Queries>() {
    let cluster = cluster().await;
    let set = ReplicaPools::connect(builder(cluster), D::new())
        .await
        .unwrap();
    cluster.freeze_primary().await.unwrap();
    let started = std::time::Instant::now();
    let inserted = tokio::time::timeout(
        Duration::from_secs(10),
        D::insert(set.primary_pool(), 1, "frozen"),
    )
    .await
    .expect("the checkout is bounded");
    let took = started.elapsed();
    eprintln!(
        "{}: a write with the primary frozen failed after {took:?}",
        std::any::type_name::<D>()
    );
    cluster.thaw_primary().await.unwrap();
    assert_eq!(inserted, None);
    set.set().shutdown().await;
}

/// A password rotated while the app runs: once told with `update_urls`,
/// the driver's pools and the engine reconnect with the new one, and own
/// reads are still never stale.
async fn rotated_password<D: Queries>(user: i64) {
    let cluster = cluster().await;
    // Each test starts from the first password (the other one rotated it).
    cluster
        .execute_on_primary(&format!("alter role {ROTATING} password 'first'"))
        .await
        .unwrap();
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();
    let url = |port: u16, password: &str| {
        format!("postgres://{ROTATING}:{password}@127.0.0.1:{port}/postgres?sslmode=disable")
    };
    let mut builder = read_after_write::pg::PgReplicaSet::builder()
        .primary_url(url(cluster.primary_port(), "first"))
        .poll_interval(Duration::from_millis(10))
        .probe_timeout(Duration::from_millis(300))
        .max_backoff(Duration::from_millis(200));
    for replica in cluster.replicas() {
        builder = builder.replica_url(replica.name(), url(replica.port(), "first"));
    }
    let set = ReplicaPools::connect(builder, D::new()).await.unwrap();
    let mut browser = Browser::new(app(set.clone()), user);
    let id = browser.post("before").await;
    assert!(browser.sees(id).await.0);

    // The credential rotates: the old password stops working and every
    // session that used it is cut, as an expiring IAM token does.
    cluster
        .execute_on_primary(&format!("alter role {ROTATING} password 'second'"))
        .await
        .unwrap();
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();
    set.update_urls(|_node, old| old.replacen(":first@", ":second@", 1))
        .unwrap();
    let cut = format!(
        "select count(pg_terminate_backend(pid)) from pg_stat_activity where usename = '{ROTATING}'"
    );
    cluster.execute_on_primary(&cut).await.unwrap();
    let mut admins = Vec::new();
    for replica in cluster.replicas() {
        let admin = sqlx::PgPool::connect(replica.url()).await.unwrap();
        let cut_at: String = sqlx::query_scalar(
            "select clock_timestamp()::text from (select count(pg_terminate_backend(pid)) \
             from pg_stat_activity where usename = $1) cut",
        )
        .bind(ROTATING)
        .fetch_one(&admin)
        .await
        .unwrap();
        admins.push((replica.name().to_owned(), admin, cut_at));
    }
    // Every connection the pools and the tracker held is gone; wait for
    // the tracker to be back on both replicas with a connection opened
    // after the cut, so with the new password. (Its replica may look
    // unhealthy for a poll or two only: too short to wait for.)
    for (name, admin, cut_at) in &admins {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let back: i64 = sqlx::query_scalar(
                "select count(*) from pg_stat_activity where usename = $1 \
                 and application_name = $2 and backend_start > $3::timestamptz",
            )
            .bind(ROTATING)
            .bind(read_after_write::pg::TRACKER_APPLICATION_NAME)
            .bind(cut_at)
            .fetch_one(admin)
            .await
            .unwrap();
            if back > 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the tracker never reconnected to {name} with the new password: {:?}",
                set.replicas()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        wait_health(&set, name, true).await;
    }
    let (mut stale, mut on_replicas, mut failed) = (0, 0, 0);
    let mut routes = Vec::new();
    for i in 0..20 {
        let response = browser
            .send(Method::POST, &format!("/posts/after-{i}"))
            .await;
        let Some(id) = response.extensions().get::<Outcome>().unwrap().post_id else {
            failed += 1;
            continue;
        };
        let response = browser.send(Method::GET, &format!("/posts/{id}")).await;
        match response.extensions().get::<Outcome>().unwrap().found {
            Some(found) => stale += usize::from(!found),
            None => failed += 1,
        }
        let route = response.headers()["x-read-after-write"].to_str().unwrap();
        on_replicas += usize::from(route.contains("node=replica"));
        routes.push(route.to_owned());
    }
    routes.sort();
    routes.dedup();
    eprintln!(
        "{}: after the rotation, 20 writes: {failed} failed, {stale} stale, {on_replicas} read from a \
         replica; routes: {routes:?}",
        std::any::type_name::<D>()
    );
    // A checkout may meet a connection cut by the rotation once; none
    // after that, and none is stale.
    assert!(
        failed <= 2,
        "{failed} requests failed after the rotation: {routes:#?}"
    );
    assert_eq!(stale, 0, "{routes:#?}");
    // The replicas' pools connect with the new password: eventual reads
    // run there (own reads may all have gone to the primary when a loaded
    // machine let the replicas fall past the 100 ms wait).
    let mut eventual_on_replicas = 0;
    for _ in 0..10 {
        let response = browser.send(Method::GET, "/feed").await;
        let outcome = response.extensions().get::<Outcome>().unwrap();
        assert!(
            outcome.found.is_some(),
            "an eventual read failed after the rotation"
        );
        let route = response.headers()["x-read-after-write"].to_str().unwrap();
        eventual_on_replicas += usize::from(route.contains("node=replica"));
    }
    assert!(
        eventual_on_replicas > 0,
        "no eventual read ran on a replica after the rotation"
    );
    set.set().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_reads_see_the_users_writes_and_the_naive_read_is_stale() {
    let _serial = SERIAL.lock().await;
    let set = TokioPgReplicaSet::connect(builder(cluster().await), Deadpool::new())
        .await
        .unwrap();
    reads_see_writes(set, 8_001, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diesel_async_reads_see_the_users_writes_and_the_naive_read_is_stale() {
    let _serial = SERIAL.lock().await;
    let set = DieselReplicaSet::connect(builder(cluster().await), DieselDeadpool)
        .await
        .unwrap();
    reads_see_writes(set, 8_101, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replay_paused_tokio_postgres_session_reads_go_to_the_primary() {
    let _serial = SERIAL.lock().await;
    let set = TokioPgReplicaSet::connect(builder(cluster().await), Deadpool::new())
        .await
        .unwrap();
    paused_replay_reads_the_primary(set, 8_201).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replay_paused_diesel_async_session_reads_go_to_the_primary() {
    let _serial = SERIAL.lock().await;
    let set = DieselReplicaSet::connect(builder(cluster().await), DieselDeadpool)
        .await
        .unwrap();
    paused_replay_reads_the_primary(set, 8_301).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_reader_endpoint_tokio_postgres_pools_reach_their_own_server() {
    let _serial = SERIAL.lock().await;
    reader_endpoint::<Deadpool>(8_400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_reader_endpoint_diesel_async_pools_reach_their_own_server() {
    let _serial = SERIAL.lock().await;
    reader_endpoint::<DieselDeadpool>(8_500).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_serves_tokio_postgres_reads_again_without_a_failed_read() {
    let _serial = SERIAL.lock().await;
    restarted_replica::<Deadpool>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_serves_diesel_async_reads_again_without_a_failed_read() {
    let _serial = SERIAL.lock().await;
    restarted_replica::<DieselDeadpool>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_primary_down_tokio_postgres_writes_fail_fast() {
    let _serial = SERIAL.lock().await;
    primary_down::<Deadpool>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_primary_down_diesel_async_writes_fail_fast() {
    let _serial = SERIAL.lock().await;
    primary_down::<DieselDeadpool>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_primary_frozen_a_tokio_postgres_write_fails_within_the_acquire_timeout() {
    let _serial = SERIAL.lock().await;
    primary_frozen::<Deadpool>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_primary_frozen_a_diesel_async_write_fails_within_the_acquire_timeout() {
    let _serial = SERIAL.lock().await;
    primary_frozen::<DieselDeadpool>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_password_reaches_the_tokio_postgres_pools() {
    let _serial = SERIAL.lock().await;
    rotated_password::<Deadpool>(8_600).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_password_reaches_the_diesel_async_pools() {
    let _serial = SERIAL.lock().await;
    rotated_password::<DieselDeadpool>(8_700).await;
}

/// A TLS connector that makes no TLS and counts the connections opened
/// through it.
#[derive(Clone, Default)]
struct Counting(Arc<AtomicUsize>);

impl tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> for Counting {
    type Stream = tokio_postgres::tls::NoTlsStream;
    type TlsConnect = tokio_postgres::NoTls;
    type Error = Infallible;

    fn make_tls_connect(&mut self, _domain: &str) -> Result<Self::TlsConnect, Infallible> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(tokio_postgres::NoTls)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tracker_of_a_tokio_postgres_set_connects_with_tokio_postgres_through_its_tls() {
    let _serial = SERIAL.lock().await;
    let cluster = cluster().await;
    let counting = Counting::default();
    let set = TokioPgReplicaSet::connect(builder(cluster), Deadpool::with_tls(counting.clone()))
        .await
        .unwrap();
    for replica in cluster.replicas() {
        wait_health(&set, replica.name(), true).await;
    }
    // The driver's pools open connections only for reads and writes, and
    // none ran: every connection so far is the tracker's (the primary's, and
    // at least one per replica), opened through the driver's connector.
    let opened = counting.0.load(Ordering::Relaxed);
    assert!(
        opened > cluster.replicas().len(),
        "the tracker opened {opened} connections through the driver's TLS connector"
    );
    set.set().shutdown().await;

    // With the tracker's connect options mapped (sqlx options), sqlx keeps
    // the tracker's connections: none goes through the driver.
    let counting = Counting::default();
    let set = TokioPgReplicaSet::connect(
        builder(cluster).tracker_connect_options(|options| options),
        Deadpool::with_tls(counting.clone()),
    )
    .await
    .unwrap();
    for replica in cluster.replicas() {
        wait_health(&set, replica.name(), true).await;
    }
    assert_eq!(counting.0.load(Ordering::Relaxed), 0);
    set.set().shutdown().await;
}

//! Where users deploy: a reader endpoint over two replicas, a
//! least-privilege role proven by the heartbeat, a monitoring role of its
//! own, credentials rotated while the app runs, Aurora detected, and the
//! canary catching a read routed to a server the tracker does not see. Each
//! on a real cluster (replicas 50 ms and 200 ms behind), each with the
//! naive read shown stale in the same test.

mod common;

use std::time::Duration;

use read_after_write::pg::{PgReplicaSet, PgReplicaSetBuilder, HEARTBEAT_DDL};
use read_after_write::{Backend, LayerSettings};
use read_after_write_testkit::{TcpProxy, TestCluster};
use sqlx::AssertSqlSafe;
use tokio::sync::OnceCell;

use common::{app, until_polled, Browser, PollBudget, FAST_LAG, SLOW_LAG};

/// The least-privilege role: LOGIN, owner of its database, nothing else.
const PLAIN: &str = "deploy_plain";
/// A role with `pg_monitor` and nothing else, for the tracker.
const MONITOR: &str = "deploy_monitor";
/// A role that logs in with a password, rotated while the app runs.
const ROTATING: &str = "deploy_rotating";

static CLUSTER: OnceCell<TestCluster> = OnceCell::const_new();

/// One cluster for the binary: the roles, and a database per test so that
/// tests running side by side do not share tables.
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
            cluster
                .execute_on_primary(&format!(
                    "create role {PLAIN} login; create role {MONITOR} login; grant pg_monitor to {MONITOR}; \
                     create role {ROTATING} login password 'first'; grant pg_monitor to {ROTATING}"
                ))
                .await
                .expect("create roles");
            cluster
        })
        .await
}

/// A database owned by the plain role, with the test table (and, if asked,
/// the heartbeat table) created by that role; replicas have it on return.
async fn database(cluster: &TestCluster, name: &str, heartbeat: bool) -> String {
    database_of(cluster, PLAIN, name, heartbeat).await
}

/// A database owned by `owner`, as [`database`].
async fn database_of(cluster: &TestCluster, owner: &str, name: &str, heartbeat: bool) -> String {
    cluster
        .execute_on_primary(&format!("create database {name} owner {owner}"))
        .await
        .expect("create database");
    let url = url(cluster.primary_port(), owner, name);
    let pool = sqlx::PgPool::connect(&url)
        .await
        .expect("connect as the plain role");
    sqlx::raw_sql(
        "create table posts (id bigserial primary key, user_id bigint not null, body text not null)",
    )
    .execute(&pool)
    .await
    .expect("the plain role creates its table");
    if heartbeat {
        sqlx::raw_sql(HEARTBEAT_DDL)
            .execute(&pool)
            .await
            .expect("the plain role creates the heartbeat table");
    }
    pool.close().await;
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .expect("replicas replay the schema");
    url
}

fn url(port: u16, user: &str, database: &str) -> String {
    format!("postgres://{user}@127.0.0.1:{port}/{database}")
}

/// A replica set for `user` on `database`, tuned like the other tests'.
async fn replica_set(
    cluster: &TestCluster,
    user: &str,
    database: &str,
    configure: impl FnOnce(PgReplicaSetBuilder) -> PgReplicaSetBuilder,
) -> PgReplicaSet {
    let mut builder = PgReplicaSet::builder()
        .primary_url(url(cluster.primary_port(), user, database))
        .poll_interval(Duration::from_millis(10))
        .probe_timeout(Duration::from_millis(300))
        .max_backoff(Duration::from_millis(400));
    for replica in cluster.replicas() {
        builder = builder.replica_url(replica.name(), url(replica.port(), user, database));
    }
    configure(builder)
        .connect()
        .await
        .expect("connect the replica set")
}

/// What a run of write-then-read rounds saw.
#[derive(Debug, Default)]
struct Rounds {
    reads: usize,
    stale: usize,
    on_replica: usize,
    /// The same post read naively from the slow replica right after the
    /// write, missing.
    naive_stale: usize,
    reasons: Vec<String>,
}

/// `rounds` times: a user posts, reads the post back at once through the
/// layer, and the slow replica (`replica-2`) is asked naively too.
async fn write_then_read(set: &PgReplicaSet, rounds: usize) -> Rounds {
    write_then_read_naively_on(set, rounds, Some("replica-2")).await
}

/// [`write_then_read`], asking `naive` naively (none: no naive read).
async fn write_then_read_naively_on(
    set: &PgReplicaSet,
    rounds: usize,
    naive: Option<&str>,
) -> Rounds {
    let service = app(set.clone(), Duration::from_millis(400));
    let mut seen = Rounds::default();
    for round in 0..rounds {
        let mut browser = Browser::new(service.clone(), 1_000 + round as i64);
        let id = browser.post("hello").await;
        if let Some(replica) = naive {
            if !common::visible_on(set, replica, id).await {
                seen.naive_stale += 1;
            }
        }
        let (found, route) = browser.sees(id).await;
        seen.reads += 1;
        if !found {
            seen.stale += 1;
        }
        if route.starts_with("node=replica") {
            seen.on_replica += 1;
        }
        let reason = route
            .split("; ")
            .find_map(|part| part.strip_prefix("reason="))
            .unwrap_or("?")
            .to_owned();
        if !seen.reasons.contains(&reason) {
            seen.reasons.push(reason);
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_role_reads_its_writes_from_replicas_proven_by_the_heartbeat() {
    let cluster = cluster().await;
    database(cluster, "deploy_heartbeat", true).await;

    // Without the heartbeat nothing proves what a replica holds to this
    // role: every read after a write goes to the primary (safe, costly).
    let blind = replica_set(cluster, PLAIN, "deploy_heartbeat", |b| {
        b.without_heartbeat()
    })
    .await;
    assert_eq!(blind.heartbeat_table(), None);
    let before = write_then_read(&blind, 10).await;
    assert_eq!(before.stale, 0, "{before:?}");
    assert_eq!(before.on_replica, 0, "{before:?}");
    assert_eq!(before.reasons, ["no_replica_on_timeline"], "{before:?}");
    blind.shutdown().await;

    // With it (found at connect), the same role reads from replicas.
    let set = replica_set(cluster, PLAIN, "deploy_heartbeat", |b| b.canary_rate(1.0)).await;
    assert_eq!(set.heartbeat_table(), Some("read_after_write_heartbeat"));
    assert!(set
        .replicas()
        .iter()
        .all(|r| r.sees_timelines == Some(false)));
    let after = write_then_read(&set, 30).await;
    assert_eq!(after.stale, 0, "{after:?}");
    assert!(
        after.naive_stale > 0,
        "the slow replica never lagged: {after:?}"
    );
    assert!(
        after.on_replica * 10 >= after.reads * 8,
        "at least 80 % of reads after a write on a replica: {after:?}"
    );
    assert!(set.replicas().iter().any(|r| r.heartbeat_proven));
    let findings = set
        .diagnose(&LayerSettings::new(
            Duration::from_millis(400),
            Duration::from_secs(30),
        ))
        .await;
    assert!(
        findings
            .iter()
            .all(|f| f.code() != "replica_role_cannot_see_timelines"),
        "{findings:?}"
    );
    // The canary checked every replica read; none lacked its write. Its
    // checks run on their own: wait for one, within the tracker's polls.
    until_polled(&set, 2_500, "a canary check", || set.canary_counts().0 > 0).await;
    let (checks, violations) = set.canary_counts();
    assert!(checks > 0, "the canary checked nothing");
    assert_eq!(violations, 0);
    set.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitoring_role_of_its_own_keeps_pg_monitor_off_the_application_role() {
    let cluster = cluster().await;
    database(cluster, "deploy_monitor", false).await;
    let set = replica_set(cluster, PLAIN, "deploy_monitor", |b| {
        b.without_heartbeat()
            .tracker_connect_options(|options| options.username(MONITOR))
    })
    .await;
    assert!(set
        .replicas()
        .iter()
        .all(|r| r.sees_timelines == Some(true)));
    let seen = write_then_read(&set, 20).await;
    assert_eq!(seen.stale, 0, "{seen:?}");
    assert!(
        seen.naive_stale > 0,
        "the slow replica never lagged: {seen:?}"
    );
    assert!(
        seen.on_replica * 10 >= seen.reads * 8,
        "at least 80 % of reads after a write on a replica: {seen:?}"
    );
    set.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aurora_is_detected_and_degrades_loudly_to_the_writer_for_reads_with_a_token() {
    let cluster = cluster().await;
    database(cluster, "deploy_aurora", true).await;
    // Aurora's own function, as a stand-in: what the detection looks for.
    let pool = sqlx::PgPool::connect(&url(cluster.primary_port(), PLAIN, "deploy_aurora"))
        .await
        .unwrap();
    sqlx::raw_sql(
        "create function aurora_version() returns text language sql as $$ select '16.4.0' $$",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();

    let set = replica_set(cluster, PLAIN, "deploy_aurora", |b| b).await;
    let findings = set
        .diagnose(&LayerSettings::new(
            Duration::from_millis(400),
            Duration::from_secs(30),
        ))
        .await;
    assert!(
        findings
            .iter()
            .any(|f| f.code() == "aurora_replicas_unverifiable"
                && f.severity() == read_after_write::Severity::Error),
        "{findings:?}"
    );
    assert_eq!(
        set.heartbeat_table(),
        None,
        "no heartbeat can prove anything there"
    );
    let seen = write_then_read(&set, 5).await;
    assert_eq!(seen.stale, 0, "{seen:?}");
    assert_eq!(
        seen.on_replica, 0,
        "reads with a token go to the writer: {seen:?}"
    );
    // Eventual reads still use the replicas, but not under a staleness
    // bound nobody can measure there.
    assert_eq!(set.eventual().target, read_after_write::Target::Replica);
    assert_eq!(
        set.eventual_within(Duration::from_secs(60)).target,
        read_after_write::Target::Primary
    );
    set.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_counts_reads_routed_to_a_server_the_tracker_does_not_see() {
    let cluster = cluster().await;
    database(cluster, "deploy_canary", false).await;
    // Routing made wrong on purpose: the pool reads the slow replica while
    // the tracker's (misconfigured) monitoring options watch the fast one.
    let fast_port = cluster.replica(0).port();
    let slow_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_lazy(&url(cluster.replica(1).port(), "postgres", "deploy_canary"))
        .unwrap();
    let set = PgReplicaSet::builder()
        .primary_url(url(cluster.primary_port(), "postgres", "deploy_canary"))
        .replica_pool("replica-2", slow_pool)
        .tracker_connect_options(move |options| options.port(fast_port))
        .poll_interval(Duration::from_millis(10))
        .canary_rate(1.0)
        .connect()
        .await
        .unwrap();
    let service = app(set.clone(), Duration::from_millis(400));
    let mut stale = 0;
    for round in 0..20 {
        let mut browser = Browser::new(service.clone(), 2_000 + round);
        let id = browser.post("hello").await;
        let (found, _) = browser.sees(id).await;
        if !found {
            stale += 1;
        }
    }
    assert!(stale > 0, "the misrouted reads should have been stale");
    until_polled(&set, 2_500, "a canary violation", || {
        set.canary_counts().1 > 0
    })
    .await;
    let (checks, violations) = set.canary_counts();
    assert!(violations > 0, "{checks} checks found no violation");
    let findings = set
        .diagnose(&LayerSettings::new(
            Duration::from_millis(400),
            Duration::from_secs(30),
        ))
        .await;
    assert!(
        findings.iter().any(|f| f.code() == "canary_violations"),
        "{findings:?}"
    );
    set.shutdown().await;
}

/// `url`, logging in as [`ROTATING`] with `password`.
fn rotating_url(port: u16, password: &str, database: &str) -> String {
    format!("postgres://{ROTATING}:{password}@127.0.0.1:{port}/{database}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_endpoint_over_two_replicas_never_serves_a_stale_own_read() {
    let cluster = cluster().await;
    database(cluster, "deploy_endpoint", false).await;
    // One address over both replicas, each new connection to the next one,
    // as Aurora's cluster-ro, a Cloud SQL read pool or HAProxy hand them out.
    let endpoint = TcpProxy::start_balanced(&cluster.replica_ports())
        .await
        .expect("start the reader endpoint");
    let endpoint_url = url(endpoint.port(), "postgres", "deploy_endpoint");
    let primary_url = url(cluster.primary_port(), "postgres", "deploy_endpoint");

    // The naive read: a pool over the endpoint misses fresh writes
    // whenever it lands on the slow replica.
    let naive = sqlx::PgPool::connect(&endpoint_url).await.unwrap();
    let primary = sqlx::PgPool::connect(&primary_url).await.unwrap();
    let mut naive_stale = 0;
    for round in 0..20 {
        let (id,): (i64,) =
            sqlx::query_as("insert into posts (user_id, body) values ($1, 'naive') returning id")
                .bind(round)
                .fetch_one(&primary)
                .await
                .unwrap();
        let (found,): (bool,) = sqlx::query_as("select exists(select 1 from posts where id = $1)")
            .bind(id)
            .fetch_one(&naive)
            .await
            .unwrap();
        if !found {
            naive_stale += 1;
        }
    }
    assert!(
        naive_stale > 0,
        "the endpoint never reached the lagging replica"
    );

    // A pool of our own over the endpoint cannot be tied to one server:
    // it is found out and serves no read that needs a position.
    let brought = PgReplicaSet::builder()
        .primary_url(&primary_url)
        .replica_pool(
            "readers",
            sqlx::PgPool::connect_lazy(&endpoint_url).unwrap(),
        )
        .poll_interval(Duration::from_millis(10))
        .connect()
        .await
        .unwrap();
    assert!(
        brought.replicas().iter().all(|r| r.indistinct),
        "{:?}",
        brought.replicas()
    );
    let findings = brought
        .diagnose(&LayerSettings::new(
            Duration::from_millis(400),
            Duration::from_secs(30),
        ))
        .await;
    assert!(
        findings.iter().any(|f| f.code() == "replica_indistinct"),
        "{findings:?}"
    );
    let seen = write_then_read_naively_on(&brought, 5, None).await;
    assert_eq!((seen.stale, seen.on_replica), (0, 0), "{seen:?}");
    brought.shutdown().await;

    // Given as a URL, each server behind it is followed and pooled on its
    // own: reads run where they were routed.
    let set = PgReplicaSet::builder()
        .primary_url(&primary_url)
        .replica_url("readers", &endpoint_url)
        .poll_interval(Duration::from_millis(10))
        .canary_rate(1.0)
        .connect()
        .await
        .unwrap();
    let servers = set.replicas();
    assert_eq!(servers.len(), 2, "{servers:?}");
    let mut addresses: Vec<_> = servers.iter().filter_map(|r| r.server.clone()).collect();
    addresses.sort();
    let mut expected: Vec<_> = cluster
        .replica_ports()
        .into_iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();
    expected.sort();
    assert_eq!(addresses, expected);
    assert!(servers.iter().all(|r| r.url == "readers" && !r.indistinct));

    let service = app(set.clone(), Duration::from_millis(400));
    let mut stale = 0;
    let mut nodes = std::collections::BTreeMap::<String, usize>::new();
    for round in 0..40 {
        let mut browser = Browser::new(service.clone(), 3_000 + round);
        let id = browser.post("hello").await;
        let (found, route) = browser.sees(id).await;
        if !found {
            stale += 1;
        }
        let node = route.split("; ").next().unwrap_or("").to_owned();
        *nodes.entry(node).or_default() += 1;
    }
    assert_eq!(stale, 0, "{nodes:?}");
    assert!(
        nodes.keys().any(|node| node.starts_with("node=readers")),
        "reads should use the servers behind the endpoint: {nodes:?}"
    );
    // Eventual reads spread over both servers.
    let mut eventual = std::collections::BTreeSet::new();
    for _ in 0..10 {
        eventual.insert(set.eventual().node.to_owned());
    }
    assert_eq!(eventual.len(), 2, "{eventual:?}");
    // Give the canary the time of 2,500 tracker polls to check (what is
    // asserted is that it found nothing wrong).
    let budget = PollBudget::new(&set, 2_500);
    while set.canary_counts().0 == 0 && budget.spent() < 2_500 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        set.canary_counts().1,
        0,
        "the canary found a misrouted read"
    );
    set.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_rotated_while_the_app_runs_reaches_the_tracker_and_the_pools() {
    let cluster = cluster().await;
    let database = "deploy_rotation";
    database_of(cluster, "postgres", database, false).await;
    cluster
        .execute_on_primary(&format!("grant all on database {database} to {ROTATING}"))
        .await
        .unwrap();
    let grant = sqlx::PgPool::connect(&url(cluster.primary_port(), "postgres", database))
        .await
        .unwrap();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "grant select, insert on posts to {ROTATING}; grant usage on sequence posts_id_seq to {ROTATING}"
    )))
    .execute(&grant)
    .await
    .unwrap();
    grant.close().await;
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();

    let connect = |password: &'static str| async move {
        let mut builder = PgReplicaSet::builder()
            .primary_url(rotating_url(cluster.primary_port(), password, database))
            .poll_interval(Duration::from_millis(10))
            .probe_timeout(Duration::from_millis(300))
            .max_backoff(Duration::from_millis(200));
        for replica in cluster.replicas() {
            builder = builder.replica_url(
                replica.name(),
                rotating_url(replica.port(), password, database),
            );
        }
        builder
            .connect()
            .await
            .expect("connect with the first password")
    };
    let rotated = connect("first").await;
    let stuck = connect("first").await;
    let before = write_then_read(&rotated, 10).await;
    assert_eq!(before.stale, 0, "{before:?}");
    assert!(
        before.naive_stale > 0,
        "the slow replica never lagged: {before:?}"
    );

    // The credential rotates: the old password stops working, and every
    // session that used it is cut, as an expiring IAM token does.
    cluster
        .execute_on_primary(&format!("alter role {ROTATING} password 'second'"))
        .await
        .unwrap();
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();
    rotated.update_connect_options(|_node, options| options.password("second"));
    let cut = format!(
        "select count(pg_terminate_backend(pid)) from pg_stat_activity where usename = '{ROTATING}'"
    );
    cluster.execute_on_primary(&cut).await.unwrap();
    for index in 0..cluster.replica_count() {
        cluster.execute_on_replica(index, &cut).await.unwrap();
    }

    // The set that was told follows: its tracker reconnects and its reads
    // are on replicas again, never stale.
    until_polled(
        &rotated,
        5_000,
        "the told set's replicas healthy again",
        || rotated.replicas().iter().all(|r| r.healthy),
    )
    .await;
    let after = write_then_read(&rotated, 10).await;
    assert_eq!(after.stale, 0, "{after:?}");
    assert!(after.on_replica * 10 >= after.reads * 8, "{after:?}");
    // The one that was not told cannot reconnect: its replicas are down,
    // and it says so instead of reading anywhere it cannot vouch for.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        stuck.replicas().iter().all(|r| !r.healthy),
        "{:?}",
        stuck.replicas()
    );
    rotated.shutdown().await;
    stuck.shutdown().await;
}

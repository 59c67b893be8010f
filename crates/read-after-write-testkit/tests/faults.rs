//! Fault drills on real clusters: the TCP proxy (freeze, cut, repoint) and
//! the cluster's fault building blocks. Each test has its own cluster.

use std::time::{Duration, Instant};

use read_after_write_testkit::{KitError, ReplicaState, TcpProxy, TestCluster};
use sqlx::{Connection, PgConnection};
use tokio::time::timeout;

async fn connect(port: u16) -> PgConnection {
    PgConnection::connect(&format!("postgres://postgres@127.0.0.1:{port}/postgres"))
        .await
        .unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

async fn count(conn: &mut PgConnection, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(conn).await.unwrap()
}

async fn in_recovery(conn: &mut PgConnection) -> bool {
    sqlx::query_scalar("select pg_is_in_recovery()")
        .fetch_one(conn)
        .await
        .unwrap()
}

/// Polls `sql` (a count) on `conn` until it returns `expected`, for at most
/// `within`.
async fn eventually(conn: &mut PgConnection, sql: &'static str, expected: i64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let n = count(conn, sql).await;
        if n == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql} returned {n}, never {expected}"
        );
        tokio::time::sleep(ms(10)).await;
    }
}

/// Asserts that `sql` (a count) on `conn` keeps returning `expected` for
/// `during`.
async fn stays(conn: &mut PgConnection, sql: &'static str, expected: i64, during: Duration) {
    let until = Instant::now() + during;
    while Instant::now() < until {
        assert_eq!(count(conn, sql).await, expected, "{sql}");
        tokio::time::sleep(ms(50)).await;
    }
}

async fn server_port(conn: &mut PgConnection) -> u16 {
    let port: i32 = sqlx::query_scalar("select inet_server_port()")
        .fetch_one(conn)
        .await
        .unwrap();
    u16::try_from(port).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_freezes_cuts_and_repoints() {
    let started = Instant::now();
    let cluster = TestCluster::start_with_delays(&[Duration::ZERO])
        .await
        .unwrap();
    let primary = cluster.primary_port();
    let replica = cluster.replica(0).port();
    let proxy = TcpProxy::start(primary).await.unwrap();
    assert_eq!(proxy.target_port(), primary);

    // Queries go through.
    let mut conn = connect(proxy.port()).await;
    assert_eq!(server_port(&mut conn).await, primary);
    assert_eq!(proxy.open_sessions(), 1);

    // Frozen: the query hangs, the connection stays open, and the very same
    // query finishes after the thaw.
    proxy.freeze();
    {
        let query = sqlx::query_scalar::<_, i32>("select 42").fetch_one(&mut conn);
        tokio::pin!(query);
        assert!(
            timeout(Duration::from_secs(1), &mut query).await.is_err(),
            "a query finished through a frozen proxy"
        );
        assert_eq!(proxy.open_sessions(), 1, "freezing closed the session");
        proxy.thaw();
        assert_eq!(
            timeout(Duration::from_secs(5), query)
                .await
                .unwrap()
                .unwrap(),
            42
        );
    }

    // Cut: the open connection's next query fails at once.
    assert_eq!(proxy.cut_all(), 1);
    let t0 = Instant::now();
    let failed = timeout(
        Duration::from_secs(1),
        sqlx::query("select 1").execute(&mut conn),
    )
    .await
    .expect("a query on a cut connection hung instead of failing");
    assert!(failed.is_err());
    eprintln!("query on a cut connection failed in {:?}", t0.elapsed());
    drop(conn);

    // Repoint: new connections land on the new target, old ones stay put.
    let mut old = connect(proxy.port()).await;
    proxy.repoint(replica);
    assert_eq!(proxy.target_port(), replica);
    let mut new = connect(proxy.port()).await;
    assert_eq!(server_port(&mut new).await, replica);
    assert_eq!(server_port(&mut old).await, primary);
    assert_eq!(proxy.open_sessions(), 2);
    eprintln!("proxy test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_primary_answers_nothing_until_thawed_and_drop_still_cleans_up() {
    let started = Instant::now();
    let cluster = TestCluster::start_with_delays(&[]).await.unwrap();
    let mut conn = cluster.connect_primary().await.unwrap();

    cluster.freeze_primary().await.unwrap();
    {
        let query = sqlx::query_scalar::<_, i32>("select 7").fetch_one(&mut conn);
        tokio::pin!(query);
        assert!(
            timeout(Duration::from_secs(1), &mut query).await.is_err(),
            "a frozen primary answered"
        );
        cluster.thaw_primary().await.unwrap();
        assert_eq!(
            timeout(Duration::from_secs(5), query)
                .await
                .unwrap()
                .unwrap(),
            7
        );
    }
    cluster.execute_on_primary("select 1").await.unwrap();

    // Dropped while frozen: the servers still go, and so do the files.
    cluster.freeze_primary().await.unwrap();
    let pid_file =
        std::fs::read_to_string(cluster.primary_data_dir().join("postmaster.pid")).unwrap();
    let postmaster: i32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
    let dir = cluster.dir().to_owned();
    let dropping = Instant::now();
    drop(conn);
    drop(cluster);
    let dropped_in = dropping.elapsed();
    let state = std::fs::read_to_string(format!("/proc/{postmaster}/stat")).ok();
    assert!(
        state.is_none_or(|stat| stat
            .rsplit_once(") ")
            .is_some_and(|(_, s)| s.starts_with('Z'))),
        "the frozen postmaster survived the drop"
    );
    assert!(!dir.exists(), "the cluster's files survived the drop");
    assert!(
        dropped_in < Duration::from_secs(5),
        "drop took {dropped_in:?}"
    );
    eprintln!(
        "freeze test took {:?} (drop of a frozen primary: {dropped_in:?})",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_primary_connections_breaks_open_ones() {
    let started = Instant::now();
    let cluster = TestCluster::start_with_delays(&[Duration::ZERO])
        .await
        .unwrap();
    let mut first = cluster.connect_primary().await.unwrap();
    let mut second = connect(cluster.primary_port()).await;
    assert_eq!(cluster.terminate_primary_connections().await.unwrap(), 2);
    for conn in [&mut first, &mut second] {
        let result = timeout(
            Duration::from_secs(1),
            sqlx::query("select 1").execute(conn),
        )
        .await
        .expect("a query on a terminated connection hung");
        assert!(result.is_err());
    }
    // The primary, and replication (WAL senders are spared), carry on.
    cluster
        .execute_on_primary("create table after_terminate (id int)")
        .await
        .unwrap();
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(cluster.terminate_primary_connections().await.unwrap(), 0);
    eprintln!("terminate test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_replica_falls_behind_until_it_follows_again() {
    let started = Instant::now();
    let cluster = TestCluster::start_with_delays(&[Duration::ZERO])
        .await
        .unwrap();
    cluster
        .execute_on_primary("create table detach_probe (id int)")
        .await
        .unwrap();
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();

    cluster.detach_replica(0).await.unwrap();
    cluster
        .execute_on_primary("insert into detach_probe values (1)")
        .await
        .unwrap();
    let mut replica = cluster.connect_replica(0).await.unwrap();
    let probe = "select count(*) from detach_probe";
    stays(&mut replica, probe, 0, ms(500)).await;
    assert!(in_recovery(&mut replica).await);
    assert_eq!(
        count(&mut replica, "select count(*) from pg_stat_wal_receiver").await,
        0
    );

    cluster.follow(0, cluster.primary_port()).await.unwrap();
    eventually(&mut replica, probe, 1, Duration::from_secs(5)).await;
    assert!(in_recovery(&mut replica).await);
    eprintln!("detach/follow test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_failover_loses_nothing_and_the_other_replica_follows() {
    let started = Instant::now();
    let cluster = TestCluster::start_with_delays(&[Duration::ZERO, ms(100)])
        .await
        .unwrap();
    // Not waited for: the failover itself must ship and replay it.
    cluster
        .execute_on_primary("create table planned (id int); insert into planned values (1)")
        .await
        .unwrap();

    let t0 = Instant::now();
    let failover = cluster.planned_failover(0).await.unwrap();
    eprintln!("planned failover took {:?}: {failover:?}", t0.elapsed());
    assert_eq!(failover.new_primary, 0);
    assert_eq!(failover.port, cluster.replica(0).port());
    assert_eq!(failover.timeline, 2);
    assert_eq!(failover.orphan, None);
    assert_eq!(cluster.replica(0).state(), ReplicaState::Promoted);
    assert!(
        cluster.connect_primary().await.is_err(),
        "the old primary still runs"
    );

    let mut new_primary = connect(failover.port).await;
    assert!(!in_recovery(&mut new_primary).await);
    assert_eq!(
        count(&mut new_primary, "select count(*) from planned").await,
        1
    );
    sqlx::query("insert into planned values (2)")
        .execute(&mut new_primary)
        .await
        .unwrap();

    let mut follower = cluster.connect_replica(1).await.unwrap();
    eventually(
        &mut follower,
        "select count(*) from planned where id = 2",
        1,
        Duration::from_secs(5),
    )
    .await;
    assert!(in_recovery(&mut follower).await);
    let timeline: i32 = sqlx::query_scalar("select received_tli from pg_stat_wal_receiver")
        .fetch_one(&mut follower)
        .await
        .unwrap();
    assert_eq!(timeline, 2);
    eprintln!("planned failover test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplanned_failover_leaves_an_orphan_with_writes_the_new_primary_lacks() {
    let started = Instant::now();
    let cluster = TestCluster::start_with_delays(&[Duration::ZERO, ms(200)])
        .await
        .unwrap();

    let t0 = Instant::now();
    let failover = cluster.unplanned_failover_with_orphan(0, 1).await.unwrap();
    eprintln!("unplanned failover took {:?}: {failover:?}", t0.elapsed());
    assert_eq!(failover.new_primary, 0);
    assert_eq!(failover.port, cluster.replica(0).port());
    assert_eq!(failover.timeline, 2);
    assert_eq!(failover.orphan, Some(1));
    assert_eq!(
        cluster.replica(1).apply_delay(),
        ms(200),
        "delay not restored"
    );
    assert!(
        cluster.connect_primary().await.is_err(),
        "the old primary still runs"
    );

    let mut new_primary = connect(failover.port).await;
    let mut orphan = cluster.connect_replica(1).await.unwrap();
    assert!(!in_recovery(&mut new_primary).await);
    assert!(in_recovery(&mut orphan).await);
    let past_fork: bool = sqlx::query_scalar("select pg_last_wal_replay_lsn() > $1::pg_lsn")
        .bind(&failover.fork_lsn)
        .fetch_one(&mut orphan)
        .await
        .unwrap();
    assert!(past_fork);

    // The orphan has writes the new primary never had...
    let orphaned = "select count(*) from read_after_write_testkit_orphaned_writes";
    assert!(count(&mut orphan, orphaned).await > 0);
    let missing =
        "select count(*) from pg_class where relname = 'read_after_write_testkit_orphaned_writes'";
    assert_eq!(count(&mut new_primary, missing).await, 0);

    // ...and never gets what the new primary writes.
    sqlx::raw_sql("create table after_failover (id int); insert into after_failover values (1)")
        .execute(&mut new_primary)
        .await
        .unwrap();
    let landed = "select count(*) from pg_class where relname = 'after_failover'";
    stays(&mut orphan, landed, 0, Duration::from_secs(2)).await;
    assert!(in_recovery(&mut orphan).await);
    let log = std::fs::read_to_string(cluster.replica(1).log_file()).unwrap();
    assert!(
        log.contains("forked off current database system timeline 1 before current recovery point"),
        "the orphan's log does not say why it cannot follow"
    );
    eprintln!("unplanned failover test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balanced_proxy_spreads_new_connections_and_a_session_keeps_its_server() {
    let started = Instant::now();
    let cluster = TestCluster::start_with_delays(&[Duration::ZERO, Duration::ZERO])
        .await
        .unwrap();
    let replicas = cluster.replica_ports();
    assert_eq!(replicas.len(), 2);
    let reader = TcpProxy::start_balanced(&replicas).await.unwrap();
    assert_eq!(reader.targets(), replicas);

    // Fresh connections land on both replicas, in turn.
    let mut sessions = Vec::new();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let mut conn = connect(reader.port()).await;
        seen.push(server_port(&mut conn).await);
        assert!(in_recovery(&mut conn).await);
        sessions.push(conn);
    }
    assert_eq!(
        seen,
        [replicas[0], replicas[1], replicas[0], replicas[1]],
        "new connections did not take turns"
    );

    // Each session stays on its server, however many connections come and go.
    for _ in 0..3 {
        drop(connect(reader.port()).await);
        for (conn, &expected) in sessions.iter_mut().zip(&seen) {
            assert_eq!(server_port(conn).await, expected);
        }
    }

    // Taking a replica out (a health check) sends new connections elsewhere
    // only; open sessions on it stay.
    reader.set_targets(&replicas[1..]);
    for _ in 0..2 {
        let mut conn = connect(reader.port()).await;
        assert_eq!(server_port(&mut conn).await, replicas[1]);
    }
    assert_eq!(server_port(&mut sessions[0]).await, replicas[0]);
    eprintln!("balanced proxy test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_replica_answers_nothing_until_thawed_and_drop_still_cleans_up() {
    let started = Instant::now();
    let cluster = TestCluster::start_with_delays(&[Duration::ZERO, Duration::ZERO])
        .await
        .unwrap();
    cluster
        .execute_on_primary("create table frozen_probe (id int)")
        .await
        .unwrap();
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();
    let mut conn = cluster.connect_replica(0).await.unwrap();

    cluster.freeze_replica(0).await.unwrap();
    assert_eq!(cluster.replica(0).state(), ReplicaState::Frozen);
    assert_eq!(cluster.replica(1).state(), ReplicaState::Replaying);
    // The kit's own controls refuse instead of hanging...
    assert!(matches!(
        cluster.connect_replica(0).await,
        Err(KitError::Frozen { .. })
    ));
    assert!(matches!(
        cluster.pause_replay(0).await,
        Err(KitError::Frozen { .. })
    ));
    assert!(matches!(
        cluster.stop_replica(0).await,
        Err(KitError::Frozen { .. })
    ));
    // ...and catching up leaves the frozen replica out.
    cluster
        .execute_on_primary("insert into frozen_probe values (1)")
        .await
        .unwrap();
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();
    {
        // An open session hangs, and so does a new one: no reset.
        let query =
            sqlx::query_scalar::<_, i64>("select count(*) from frozen_probe").fetch_one(&mut conn);
        tokio::pin!(query);
        assert!(
            timeout(Duration::from_secs(1), &mut query).await.is_err(),
            "a frozen replica answered"
        );
        assert!(
            timeout(Duration::from_secs(1), async {
                PgConnection::connect(cluster.replica(0).url()).await
            })
            .await
            .is_err(),
            "a frozen replica accepted a session"
        );
        cluster.thaw_replica(0).await.unwrap();
        assert_eq!(cluster.replica(0).state(), ReplicaState::Replaying);
        // The query that waited finishes, and the replica catches up.
        timeout(Duration::from_secs(5), query)
            .await
            .expect("the query did not finish after the thaw")
            .unwrap();
    }
    eventually(
        &mut conn,
        "select count(*) from frozen_probe",
        1,
        Duration::from_secs(5),
    )
    .await;
    cluster
        .execute_on_replica(0, "checkpoint; select 1")
        .await
        .unwrap();
    assert!(matches!(
        cluster
            .execute_on_replica(0, "insert into frozen_probe values (2)")
            .await,
        Err(KitError::Sql { .. })
    ));

    // Dropped while frozen: the servers still go, and so do the files.
    cluster.freeze_replica(1).await.unwrap();
    let pid_file =
        std::fs::read_to_string(cluster.replica(1).data_dir().join("postmaster.pid")).unwrap();
    let postmaster: i32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
    let dir = cluster.dir().to_owned();
    drop(conn);
    let dropping = Instant::now();
    drop(cluster);
    let dropped_in = dropping.elapsed();
    let state = std::fs::read_to_string(format!("/proc/{postmaster}/stat")).ok();
    assert!(
        state.is_none_or(|stat| stat
            .rsplit_once(") ")
            .is_some_and(|(_, s)| s.starts_with('Z'))),
        "the frozen replica's postmaster survived the drop"
    );
    assert!(!dir.exists(), "the cluster's files survived the drop");
    assert!(
        dropped_in < Duration::from_secs(5),
        "drop took {dropped_in:?}"
    );
    eprintln!(
        "frozen replica test took {:?} (drop of a frozen replica: {dropped_in:?})",
        started.elapsed()
    );
}

//! Real clusters: lag made by the server, replay and lifecycle controls,
//! cleanup. Each test that changes the topology has its own cluster.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use read_after_write_testkit::{KitError, ReplicaState, TestCluster};
use sqlx::{ConnectOptions, PgConnection};

const CATCH_UP: Duration = Duration::from_secs(10);

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

/// Polls `sql` (a count) on `conn` until it returns `expected`, and returns
/// when that happened, measured from `since`.
async fn visible_after(
    conn: &mut PgConnection,
    sql: &'static str,
    expected: i64,
    since: Instant,
) -> Duration {
    let deadline = since + Duration::from_secs(10);
    while count(conn, sql).await != expected {
        assert!(Instant::now() < deadline, "{sql} never returned {expected}");
        tokio::time::sleep(ms(5)).await;
    }
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_is_made_by_the_server_and_primary_restarts() {
    let started = Instant::now();
    let cluster = TestCluster::start_with_delays(&[ms(50), ms(200)])
        .await
        .unwrap();
    eprintln!("primary + 2 replicas started in {:?}", started.elapsed());

    assert_eq!(cluster.replica_count(), 2);
    assert_eq!(cluster.replica_urls().len(), 2);
    assert_eq!(cluster.replica(0).name(), "replica-1");
    assert_eq!(cluster.replica(1).apply_delay(), ms(200));
    assert_eq!(
        cluster.primary_url(),
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            cluster.primary_port()
        )
    );
    assert!(cluster.server_version_num() >= 130000);
    for replica in cluster.replicas() {
        assert_eq!(replica.state(), ReplicaState::Replaying);
        let mut conn = <PgConnection as sqlx::Connection>::connect(replica.url())
            .await
            .unwrap();
        assert!(in_recovery(&mut conn).await);
    }

    cluster
        .execute_on_primary("create table lag_probe (id int primary key)")
        .await
        .unwrap();
    cluster.wait_for_replicas_caught_up(CATCH_UP).await.unwrap();

    let mut fast = cluster.connect_replica(0).await.unwrap();
    let mut slow = cluster.connect_replica(1).await.unwrap();
    let probe = "select count(*) from lag_probe where id = 1";
    let t0 = Instant::now();
    cluster
        .execute_on_primary("insert into lag_probe values (1)")
        .await
        .unwrap();
    assert_eq!(
        count(&mut slow, probe).await,
        0,
        "the 200 ms replica saw the row at once"
    );
    let fast_lag = visible_after(&mut fast, probe, 1, t0).await;
    let slow_lag = visible_after(&mut slow, probe, 1, t0).await;
    eprintln!("row visible after {fast_lag:?} (50 ms replica), {slow_lag:?} (200 ms replica)");
    // The commit happens after t0 and each server applies it its delay after
    // the commit timestamp (5 ms slack for clock rounding); the upper bound
    // leaves room for a loaded 2-core machine.
    assert!(fast_lag >= ms(45), "{fast_lag:?}");
    assert!(slow_lag >= ms(195), "{slow_lag:?}");
    assert!(slow_lag <= ms(1500), "{slow_lag:?}");
    tokio::time::sleep_until((t0 + ms(300)).into()).await;
    assert_eq!(count(&mut slow, probe).await, 1);

    // Waiting for catch-up takes the longest apply delay.
    let t1 = Instant::now();
    cluster
        .execute_on_primary("insert into lag_probe values (2)")
        .await
        .unwrap();
    cluster.wait_for_replicas_caught_up(CATCH_UP).await.unwrap();
    let waited = t1.elapsed();
    assert!(waited >= ms(190), "caught up after only {waited:?}");
    let all = "select count(*) from lag_probe";
    assert_eq!(count(&mut fast, all).await, 2);
    assert_eq!(count(&mut slow, all).await, 2);
    // Nothing new: returns at once, no page-boundary stall.
    let t2 = Instant::now();
    cluster.wait_for_replicas_caught_up(CATCH_UP).await.unwrap();
    assert!(t2.elapsed() < ms(500), "{:?}", t2.elapsed());

    // Primary restart: replicas keep serving reads and reconnect.
    cluster.stop_primary().await.unwrap();
    assert!(cluster.connect_primary().await.is_err());
    assert!(matches!(
        cluster.wait_for_replicas_caught_up(CATCH_UP).await,
        Err(KitError::NodeStopped { .. })
    ));
    assert_eq!(count(&mut fast, all).await, 2);
    cluster.start_primary().await.unwrap();
    cluster
        .execute_on_primary("insert into lag_probe values (3)")
        .await
        .unwrap();
    cluster.wait_for_replicas_caught_up(CATCH_UP).await.unwrap();
    assert_eq!(count(&mut fast, all).await, 3);
    assert_eq!(count(&mut slow, all).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_apply_delay() {
    let cluster = TestCluster::start_with_delays(&[Duration::ZERO])
        .await
        .unwrap();
    cluster
        .execute_on_primary("create table p (id int)")
        .await
        .unwrap();
    cluster.wait_for_replicas_caught_up(CATCH_UP).await.unwrap();
    let mut replica = cluster.connect_replica(0).await.unwrap();
    let rows = "select count(*) from p";

    // Paused: writes stay invisible, and catch-up skips the replica.
    cluster.pause_replay(0).await.unwrap();
    assert_eq!(cluster.replica(0).state(), ReplicaState::Paused);
    cluster
        .execute_on_primary("insert into p values (1)")
        .await
        .unwrap();
    cluster.wait_for_replicas_caught_up(CATCH_UP).await.unwrap();
    tokio::time::sleep(ms(300)).await;
    assert_eq!(count(&mut replica, rows).await, 0);
    cluster.resume_replay(0).await.unwrap();
    assert_eq!(cluster.replica(0).state(), ReplicaState::Replaying);
    cluster.wait_for_replicas_caught_up(CATCH_UP).await.unwrap();
    assert_eq!(count(&mut replica, rows).await, 1);

    // A live change of the delay takes effect for the next commit.
    cluster.set_apply_delay(0, ms(300)).await.unwrap();
    assert_eq!(cluster.replica(0).apply_delay(), ms(300));
    let shown: String = sqlx::query_scalar("show recovery_min_apply_delay")
        .fetch_one(&mut replica)
        .await
        .unwrap();
    assert_eq!(shown, "300ms");
    let t0 = Instant::now();
    cluster
        .execute_on_primary("insert into p values (2)")
        .await
        .unwrap();
    let lag = visible_after(&mut replica, rows, 2, t0).await;
    assert!(
        lag >= ms(290),
        "visible after {lag:?} despite a 300 ms delay"
    );

    // Lowering the delay releases a commit the replica is waiting on.
    cluster
        .set_apply_delay(0, Duration::from_secs(60))
        .await
        .unwrap();
    let t1 = Instant::now();
    cluster
        .execute_on_primary("insert into p values (3)")
        .await
        .unwrap();
    tokio::time::sleep(ms(200)).await;
    assert_eq!(count(&mut replica, rows).await, 2);
    cluster.set_apply_delay(0, Duration::ZERO).await.unwrap();
    let lag = visible_after(&mut replica, rows, 3, t1).await;
    assert!(lag < Duration::from_secs(5), "{lag:?}");

    // Changing the delay of a stopped replica edits its configuration.
    drop(replica);
    cluster.stop_replica(0).await.unwrap();
    assert_eq!(cluster.replica(0).state(), ReplicaState::Stopped);
    assert!(matches!(
        cluster.pause_replay(0).await,
        Err(KitError::NodeStopped { .. })
    ));
    cluster.set_apply_delay(0, ms(20)).await.unwrap();
    cluster.start_replica(0).await.unwrap();
    let mut replica = cluster.connect_replica(0).await.unwrap();
    let shown: String = sqlx::query_scalar("show recovery_min_apply_delay")
        .fetch_one(&mut replica)
        .await
        .unwrap();
    assert_eq!(shown, "20ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_restart_and_promote() {
    let cluster = TestCluster::start_with_delays(&[Duration::ZERO, Duration::ZERO])
        .await
        .unwrap();
    let rows = "select count(*) from k";
    cluster
        .execute_on_primary("create table k (id int); insert into k values (1)")
        .await
        .unwrap();
    cluster.wait_for_replicas_caught_up(CATCH_UP).await.unwrap();

    // Crash a replica; it misses a write, then recovers and catches up.
    cluster.kill_replica(0).await.unwrap();
    assert_eq!(cluster.replica(0).state(), ReplicaState::Stopped);
    assert!(TcpStream::connect(("127.0.0.1", cluster.replica(0).port())).is_err());
    cluster
        .execute_on_primary("insert into k values (2)")
        .await
        .unwrap();
    cluster.start_replica(0).await.unwrap();
    cluster.wait_for_replicas_caught_up(CATCH_UP).await.unwrap();
    let mut conn = cluster.connect_replica(0).await.unwrap();
    assert!(in_recovery(&mut conn).await);
    assert_eq!(count(&mut conn, rows).await, 2);

    // Crash the primary; the replica reconnects after the restart.
    cluster.kill_primary().await.unwrap();
    cluster.start_primary().await.unwrap();
    cluster
        .execute_on_primary("insert into k values (3)")
        .await
        .unwrap();
    cluster.wait_for_replicas_caught_up(CATCH_UP).await.unwrap();
    assert_eq!(count(&mut conn, rows).await, 3);

    // Promote the second replica: out of recovery, on a new timeline.
    let mut promoted = cluster.connect_replica(1).await.unwrap();
    let timeline = "select timeline_id::bigint from pg_control_checkpoint()";
    assert_eq!(count(&mut promoted, timeline).await, 1);
    drop(promoted);
    cluster.promote_replica(1).await.unwrap();
    assert_eq!(cluster.replica(1).state(), ReplicaState::Promoted);
    let mut promoted = cluster.connect_replica(1).await.unwrap();
    assert!(!in_recovery(&mut promoted).await);
    let wal_timeline: String =
        sqlx::query_scalar("select substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")
            .fetch_one(&mut promoted)
            .await
            .unwrap();
    assert_eq!(u32::from_str_radix(&wal_timeline, 16).unwrap(), 2);
    sqlx::query("insert into k values (100)")
        .execute(&mut promoted)
        .await
        .unwrap();
    assert!(matches!(
        cluster.pause_replay(1).await,
        Err(KitError::Promoted { .. })
    ));
    // The other replica still follows the original primary.
    cluster
        .execute_on_primary("insert into k values (4)")
        .await
        .unwrap();
    cluster.wait_for_replicas_caught_up(CATCH_UP).await.unwrap();
    assert_eq!(count(&mut conn, rows).await, 4);
    assert_eq!(count(&mut promoted, rows).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_sweep_and_drop_cleanup() {
    // A directory left by a process that no longer exists.
    let root = std::env::temp_dir().join("read-after-write-testkit");
    std::fs::create_dir_all(&root).unwrap();
    let leftover = root.join(format!("{}-0-deadbeef", i32::MAX - 1));
    // Built under a name no sweep touches, then renamed into place: a sweep
    // by a cluster starting in parallel must never see it half made.
    let staging = root.join(format!("staging-{}", std::process::id()));
    std::fs::create_dir_all(staging.join("primary/data")).unwrap();
    std::fs::rename(&staging, &leftover).unwrap();

    let cluster = TestCluster::builder()
        .setting("work_mem", "8MB")
        .start()
        .await
        .unwrap();
    assert!(!leftover.exists(), "leftover cluster was not swept");
    assert_eq!(cluster.replica_count(), 0);
    assert!(matches!(
        cluster.pause_replay(3).await,
        Err(KitError::NoSuchReplica { index: 3, count: 0 })
    ));
    let mut conn = cluster.connect_primary().await.unwrap();
    let work_mem: String = sqlx::query_scalar("show work_mem")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(work_mem, "8MB");
    drop(conn);

    let dir = cluster.dir().to_path_buf();
    let port = cluster.primary_port();
    assert!(dir.join("primary/postgres.log").exists());
    drop(cluster);
    if std::env::var_os("KEEP_TEST_CLUSTER").is_some_and(|v| !v.is_empty() && v != "0") {
        assert!(dir.join("KEPT").exists());
    } else {
        assert!(!dir.exists(), "{} was not removed", dir.display());
    }
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hba_lines_ask_chosen_roles_for_a_password_on_every_node() {
    let cluster = TestCluster::builder()
        .replica(Duration::ZERO)
        .hba_line("host all app 127.0.0.1/32 scram-sha-256")
        .start()
        .await
        .unwrap();
    // PostgreSQL 13 stores md5 by default, which scram-sha-256 refuses.
    cluster
        .execute_on_primary(
            "set password_encryption = 'scram-sha-256'; \
             create role app login password 'first secret'",
        )
        .await
        .unwrap();
    cluster.wait_for_replicas_caught_up(CATCH_UP).await.unwrap();

    let ports = [cluster.primary_port(), cluster.replica(0).port()];
    assert_eq!(cluster.replica_ports(), ports[1..]);
    for port in ports {
        let options = sqlx::postgres::PgConnectOptions::new()
            .host("127.0.0.1")
            .port(port)
            .username("app")
            .database("postgres");
        let mut conn = options
            .clone()
            .password("first secret")
            .connect()
            .await
            .unwrap_or_else(|e| panic!("app with its password on port {port}: {e}"));
        assert_eq!(count(&mut conn, "select 1::bigint").await, 1);
        for refused in [options.clone(), options.clone().password("wrong")] {
            let err = refused
                .connect()
                .await
                .expect_err("app got in without its password");
            let code = err
                .as_database_error()
                .and_then(|e| e.code())
                .map(|c| c.into_owned());
            // invalid_password
            assert_eq!(code.as_deref(), Some("28P01"), "port {port}: {err}");
        }
    }
    // The kit's own connections need no password.
    cluster.execute_on_replica(0, "select 1").await.unwrap();
    cluster.wait_for_replicas_caught_up(CATCH_UP).await.unwrap();

    let err = TestCluster::builder()
        .hba_line("host all app 127.0.0.1/32 md5\nhost all all 0.0.0.0/0 trust")
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, KitError::InvalidArgument { .. }), "{err}");
}

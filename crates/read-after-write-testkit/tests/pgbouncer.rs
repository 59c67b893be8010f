//! PgBouncer 1.18 in transaction mode in front of a real primary and a real
//! replica. Needs `pgbouncer` (`bash .ci/ensure-pgbouncer`).

use std::net::TcpStream;
use std::time::Duration;

use read_after_write_testkit::{PgBouncer, PoolMode, TestCluster};
use sqlx::{Connection, PgConnection, Row};

/// One value through the simple query protocol, which PgBouncer 1.18 in
/// transaction mode pools safely.
async fn simple_i64(conn: &mut PgConnection, sql: &'static str) -> i64 {
    let row = sqlx::raw_sql(sql).fetch_one(conn).await.unwrap();
    row.get::<i64, _>(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_pools_in_front_of_the_primary_and_a_replica() {
    let cluster = TestCluster::start_with_delays(&[Duration::ZERO])
        .await
        .unwrap();
    cluster
        .execute_on_primary(
            "create role app login; create table pooled (id int); grant all on pooled to app",
        )
        .await
        .unwrap();
    let primary = PgBouncer::builder(cluster.primary_port())
        .pool_mode(PoolMode::Transaction)
        .users(["postgres", "app"])
        .start()
        .await
        .unwrap();
    let replica = PgBouncer::builder(cluster.replica(0).port())
        .pool_mode(PoolMode::Transaction)
        .users(["postgres", "app"])
        .start()
        .await
        .unwrap();
    assert_eq!(primary.pool_mode(), PoolMode::Transaction);
    assert_eq!(replica.target_port(), cluster.replica(0).port());
    assert_ne!(primary.port(), replica.port());

    // Writes through the primary's PgBouncer, from two clients at once.
    let mut writers = Vec::new();
    for _ in 0..2 {
        writers.push(
            PgConnection::connect(&primary.url("app", "postgres"))
                .await
                .unwrap(),
        );
    }
    for (i, conn) in writers.iter_mut().enumerate() {
        for _ in 0..=i {
            sqlx::raw_sql("begin; insert into pooled values (1); commit")
                .execute(&mut *conn)
                .await
                .unwrap();
        }
        assert_eq!(
            simple_i64(conn, "select inet_server_port()::bigint").await,
            i64::from(cluster.primary_port())
        );
    }
    assert_eq!(
        simple_i64(&mut writers[1], "select count(*) from pooled").await,
        3
    );

    // Reads through the replica's PgBouncer reach the replica.
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();
    for user in ["postgres", "app"] {
        let mut reader = PgConnection::connect(&replica.url(user, "postgres"))
            .await
            .unwrap();
        assert_eq!(
            simple_i64(&mut reader, "select inet_server_port()::bigint").await,
            i64::from(cluster.replica(0).port())
        );
        assert_eq!(
            simple_i64(&mut reader, "select pg_is_in_recovery()::int::bigint").await,
            1
        );
        assert_eq!(
            simple_i64(&mut reader, "select count(*) from pooled").await,
            3
        );
    }

    // A role that is not listed does not get in.
    let refused = PgConnection::connect(&replica.url("nobody", "postgres")).await;
    assert!(refused.is_err(), "an unlisted user got through PgBouncer");

    // Dropping it stops it and removes its files.
    let log = primary.log_file();
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("listening on 127.0.0.1"));
    let port = primary.port();
    drop(writers);
    drop(primary);
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    if std::env::var_os("KEEP_TEST_CLUSTER").is_none_or(|v| v.is_empty() || v == "0") {
        assert!(!log.parent().unwrap().exists(), "PgBouncer's files remain");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_pool_keeps_prepared_statements() {
    let cluster = TestCluster::start_with_delays(&[]).await.unwrap();
    let bouncer = PgBouncer::builder(cluster.primary_port())
        .start()
        .await
        .unwrap();
    assert_eq!(bouncer.pool_mode(), PoolMode::Session);
    let mut conn = PgConnection::connect(&bouncer.url("postgres", "postgres"))
        .await
        .unwrap();
    for n in 0..3_i32 {
        let back: i32 = sqlx::query_scalar("select $1::int")
            .bind(n)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(back, n);
    }
}

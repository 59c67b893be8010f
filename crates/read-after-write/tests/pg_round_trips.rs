//! Routing a read costs no database round trip: counted with
//! pg_stat_statements on every node of a real cluster. This binary has its
//! own cluster so no other test's statements are counted.

mod common;

use std::time::Duration;

use common::*;
use read_after_write::{Backend, Target};

/// Statements run on each node, leaving out the tracker's polls (with the
/// `pg_sleep` inside a wait it runs on a replica for reads that waited),
/// the capture query, the fingerprint a replica pool takes once per new
/// connection (connection setup: sqlx may open one when a released
/// connection is not back yet) and these counting queries themselves.
async fn statements(urls: &[String]) -> i64 {
    let mut sum = 0;
    for url in urls {
        let pool = sqlx::PgPool::connect(url).await.unwrap();
        let (calls,): (Option<i64>,) = sqlx::query_as(
            "select sum(calls)::bigint from pg_stat_statements \
             where query not like '%pg_stat_statements%' \
               and query not like '%pg_last_wal_replay_lsn%' \
               and query not like '%pg_current_wal_insert_lsn%' \
               and query not like '%pg_sleep%' \
               and query not like '%inet_server_addr%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        sum += calls.unwrap_or(0);
        pool.close().await;
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_a_read_adds_no_database_round_trip() {
    let cluster = start_cluster().await;
    create_schema(&cluster).await;
    // Routing alone: the canary's sampled re-checks (one query each, off
    // the read's path, on an idle connection it may make the next read
    // open anew) are their own, documented cost.
    let set = replica_set_with(&cluster, |builder| builder.canary_rate(0.0)).await;
    let mut urls = vec![cluster.primary_url().to_owned()];
    urls.extend(cluster.replica_urls());

    sqlx::query("insert into posts (user_id, body) values (1, 'round trips')")
        .execute(set.primary_pool())
        .await
        .unwrap();
    let position = set.write_position().await.unwrap();
    // Let a replica catch up so that session reads route without waiting.
    let routed = set.session(position, Duration::from_secs(2)).await;
    assert_eq!(routed.target, Target::Replica);
    // Warm the pools so connection setup is not counted either way.
    for _ in 0..4 {
        sqlx::query("select 0")
            .execute(set.session(position, Duration::ZERO).await.pool)
            .await
            .unwrap();
        sqlx::query("select 0")
            .execute(set.eventual().pool)
            .await
            .unwrap();
    }

    const READS: i64 = 500;
    let before = statements(&urls).await;
    for _ in 0..READS {
        let routed = set.session(position, Duration::from_millis(50)).await;
        assert_eq!(routed.target, Target::Replica);
        sqlx::query("select 1").execute(routed.pool).await.unwrap();
        sqlx::query("select 2")
            .execute(set.eventual().pool)
            .await
            .unwrap();
    }
    let ran = statements(&urls).await - before;
    let extra = ran - 2 * READS;
    eprintln!(
        "{} routed reads ran {ran} statements in all: {extra} extra round trips ({:.3} per read)",
        2 * READS,
        extra as f64 / (2 * READS) as f64
    );
    assert_eq!(extra, 0, "routing added statements to the read path");

    // Routing alone, with no reads at all, runs nothing anywhere.
    let before = statements(&urls).await;
    for _ in 0..2_000 {
        let _ = set.session(position, Duration::from_millis(50)).await;
        let _ = set.eventual();
    }
    assert_eq!(statements(&urls).await - before, 0);
}

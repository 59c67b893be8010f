//! Read-your-writes against a real primary with two streaming replicas that
//! lag by 50 ms and 200 ms (`recovery_min_apply_delay`). Every test also shows
//! the naive read of a lagging replica going stale, so it could fail.
//!
//! One cluster serves the whole binary; each test builds its own replica set
//! and counts only its own queries.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use read_after_write::{Backend, Lsn, RouteReason, Target, WritePosition};
use read_after_write_testkit::TestCluster;
use tokio::sync::OnceCell;

static CLUSTER: OnceCell<TestCluster> = OnceCell::const_new();

async fn cluster() -> &'static TestCluster {
    CLUSTER
        .get_or_init(|| async {
            let cluster = start_cluster().await;
            create_schema(&cluster).await;
            cluster
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_writes_are_each_read_back_at_once_and_the_naive_read_is_stale() {
    let cluster = cluster().await;
    let set = replica_set(cluster).await;
    // A wait budget above the fast replica's lag and below the slow one's.
    let service = app(set.clone(), Duration::from_millis(120));

    const USERS: i64 = 20;
    const PAIRS_PER_USER: usize = 50;
    let stale = Arc::new(AtomicUsize::new(0));
    let naive_stale = Arc::new(AtomicUsize::new(0));
    let replica_reads = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for user in 0..USERS {
        let mut browser = Browser::new(service.clone(), 1_000 + user);
        let set = set.clone();
        let (stale, naive_stale, replica_reads) =
            (stale.clone(), naive_stale.clone(), replica_reads.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..PAIRS_PER_USER {
                let id = browser.post(&format!("u{user}p{i}")).await;
                // The naive read: the slow replica, straight after the write.
                if !visible_on(&set, "replica-2", id).await {
                    naive_stale.fetch_add(1, Ordering::Relaxed);
                }
                let (seen, route) = browser.sees(id).await;
                if !seen {
                    stale.fetch_add(1, Ordering::Relaxed);
                }
                if route.starts_with("node=replica") {
                    replica_reads.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let pairs = USERS as usize * PAIRS_PER_USER;
    let (stale, naive_stale, replica_reads) = (
        stale.load(Ordering::Relaxed),
        naive_stale.load(Ordering::Relaxed),
        replica_reads.load(Ordering::Relaxed),
    );
    eprintln!("{pairs} write/read pairs: {stale} stale session reads, {replica_reads} served by replicas; naive reads of the 200 ms replica stale {naive_stale} times");
    assert!(pairs >= 1_000);
    assert_eq!(
        stale, 0,
        "session reads must always see the user's own write"
    );
    assert!(
        naive_stale > 0,
        "the naive read never went stale: the lag is not real"
    );
    assert!(
        replica_reads > 0,
        "with max_wait above the fast replica's lag, replicas serve session reads"
    );
}

/// Inserts a row on the primary and returns its id and the captured position.
async fn write_one(set: &read_after_write::pg::PgReplicaSet, body: &str) -> (i64, WritePosition) {
    let (id, position, _) = write_one_checked(set, body).await;
    (id, position)
}

/// Like `write_one`, also returning the insert position read inside the
/// transaction just before COMMIT: the commit record lies past it, so a
/// position that covers the commit must be greater.
async fn write_one_checked(
    set: &read_after_write::pg::PgReplicaSet,
    body: &str,
) -> (i64, WritePosition, Lsn) {
    let mut tx = set.primary_pool().begin().await.unwrap();
    let (id,): (i64,) =
        sqlx::query_as("insert into posts (user_id, body) values (1, $1) returning id")
            .bind(body)
            .fetch_one(&mut *tx)
            .await
            .unwrap();
    let (before_commit,): (String,) = sqlx::query_as("select pg_current_wal_insert_lsn()::text")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let position = set.write_position().await.unwrap();
    (id, position, before_commit.parse().unwrap())
}

async fn visible(pool: &sqlx::PgPool, id: i64) -> bool {
    let (found,): (bool,) = sqlx::query_as("select exists(select 1 from posts where id = $1)")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_budget_decides_between_replica_and_primary() {
    let cluster = cluster().await;
    let set = replica_set(cluster).await;

    // Budget above both lags: a replica serves, and it has the row.
    for i in 0..5 {
        let (id, position) = write_one(&set, &format!("budget-long-{i}")).await;
        assert!(
            !visible(set.replica_pool("replica-2").unwrap(), id).await || i > 0,
            "naive read not stale"
        );
        let (routed, polls) =
            polls_to_finish(set.session(position, Duration::from_millis(400))).await;
        assert_eq!(routed.target, Target::Replica, "{:?}", routed.reason);
        // A replica ended the wait, not the budget (a read the budget ends
        // goes to the primary, `wait_timed_out`); one already caught up
        // served at once.
        assert!(matches!(
            routed.reason,
            RouteReason::CaughtUpAfterWait | RouteReason::CaughtUp
        ));
        if routed.reason == RouteReason::CaughtUp {
            assert_eq!(polls, 1, "a caught-up replica serves without a wait");
        }
        assert!(
            visible(routed.pool, id).await,
            "routed to {} which lacks the row",
            routed.node
        );
    }

    // No budget: the primary, at once.
    let (id, position) = write_one(&set, "budget-zero").await;
    assert!(
        !visible(set.replica_pool("replica-1").unwrap(), id).await,
        "naive read of the 50 ms replica is stale"
    );
    let (routed, polls) = polls_to_finish(set.session(position, Duration::ZERO)).await;
    assert_eq!(
        (routed.target, routed.reason),
        (Target::Primary, RouteReason::Lagging)
    );
    assert_eq!(polls, 1, "no budget: ready at its first poll, no wait");
    assert!(visible(routed.pool, id).await);

    // A budget below both lags: the primary every time, and never after
    // more than the budget: the wait ends when no replica is predicted
    // within it (predicted_late) or when it runs out (wait_timed_out),
    // never by a replica. By default the set routes by prediction: once it
    // has seen the replicas replay, it reads from the primary at once
    // instead of waiting the budget out; tests/pg_adaptive.rs compares the
    // two. How long the reads took is printed, not asserted.
    let budget = Duration::from_millis(20);
    let mut worst = Duration::ZERO;
    let mut waited = 0;
    for i in 0..20 {
        let (id, position) = write_one(&set, &format!("budget-short-{i}")).await;
        let started = Instant::now();
        let (routed, polls) = polls_to_finish(set.session(position, budget)).await;
        worst = worst.max(started.elapsed());
        waited += usize::from(polls > 1);
        assert_eq!(routed.target, Target::Primary);
        assert!(
            matches!(
                routed.reason,
                RouteReason::PredictedLate | RouteReason::WaitTimedOut
            ),
            "{:?}",
            routed.reason
        );
        assert!(visible(routed.pool, id).await);
    }
    eprintln!("max_wait = {budget:?}: {waited}/20 reads waited; worst added latency {worst:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_share_capture_queries_and_each_position_covers_its_commit() {
    let cluster = cluster().await;
    let set = replica_set(cluster).await;
    const WRITERS: usize = 32;
    let before = set.capture_queries();
    let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS));
    let mut tasks = Vec::new();
    for i in 0..WRITERS {
        let set = set.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            write_one_checked(&set, &format!("flight-{i}")).await
        }));
    }
    let mut written = Vec::new();
    for task in tasks {
        let (id, position, before_commit) = task.await.unwrap();
        // A shared result that started before this writer's commit would
        // not be past the position read inside its transaction.
        assert!(
            position.lsn > before_commit,
            "captured {} is not past {before_commit}, read before COMMIT",
            position.lsn
        );
        written.push((id, position));
    }
    let queries = set.capture_queries() - before;
    eprintln!("{WRITERS} concurrent writers: {queries} capture queries");
    assert!(
        queries < WRITERS as u64,
        "{queries} capture queries for {WRITERS} writers"
    );
    assert!(queries >= 1);

    // Each shared position still covers its own writer's commit: a replica
    // that has replayed it has the row.
    for (id, position) in written {
        let routed = set.session(position, Duration::from_secs(2)).await;
        assert_eq!(routed.target, Target::Replica, "{:?}", routed.reason);
        assert!(
            visible(routed.pool, id).await,
            "position {} does not cover post {id}",
            position.lsn
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_another_timeline_or_cluster_follow_the_rule() {
    let cluster = cluster().await;
    let set = replica_set(cluster).await;
    let (_, position) = write_one(&set, "timeline").await;
    // Another timeline of this cluster: the primary, without waiting.
    let older = WritePosition::new(Lsn::new(1), position.timeline + 1, position.system_id);
    let (routed, polls) = polls_to_finish(set.session(older, Duration::from_secs(1))).await;
    assert_eq!(
        (routed.target, routed.reason),
        (Target::Primary, RouteReason::TimelineChanged)
    );
    assert_eq!(polls, 1, "ready at its first poll, no wait");
    // Another cluster: the token is ignored, the read is eventual.
    let foreign = WritePosition::new(
        Lsn::new(u64::MAX),
        position.timeline,
        position.system_id ^ 1,
    );
    let routed = set.session(foreign, Duration::from_secs(1)).await;
    assert_eq!(
        (routed.target, routed.reason),
        (Target::Replica, RouteReason::ForeignCluster)
    );
    assert_ne!(position.system_id, 0);
    assert!(position.timeline >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tracker_keeps_positions_fresh_and_shuts_down_cleanly() {
    let cluster = cluster().await;
    let set = replica_set(cluster).await;
    // Positions move within a poll of replay: after a write, once the slow
    // replica has replayed it, the tracker reports it without being asked
    // (nothing here asks: `replicas()` only reads what it has).
    let (_, position) = write_one(&set, "freshness").await;
    let polls = until_polled(
        &set,
        1_000,
        "both replicas reported replaying the write",
        || set.replicas().iter().all(|r| r.replayed >= position.lsn),
    )
    .await;
    eprintln!("the tracker reported the write replayed on both replicas within {polls} polls");
    for replica in set.replicas() {
        assert!(replica.healthy, "{replica:?}");
    }
    let polls = set.tracker_polls();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let active = (set.tracker_polls() - polls) * 2;
    // Five seconds without token reads or writes: the tracker slows down.
    tokio::time::sleep(Duration::from_millis(5_200)).await;
    let polls = set.tracker_polls();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = (set.tracker_polls() - polls) / 2;
    eprintln!("tracker polls per second for 2 replicas: {active} in use, {idle} idle");
    assert!(idle * 5 < active, "idle {idle}/s vs in use {active}/s");
    // The first token read after the quiet spell gets fresh positions.
    let (_, position) = write_one(&set, "after idle").await;
    let routed = set.session(position, Duration::from_millis(400)).await;
    assert_eq!(routed.target, Target::Replica, "{:?}", routed.reason);

    let count_tracker_connections = || async {
        let mut conn = cluster.connect_replica(0).await.unwrap();
        let (n,): (i64,) =
            sqlx::query_as("select count(*) from pg_stat_activity where application_name = $1")
                .bind(read_after_write::pg::TRACKER_APPLICATION_NAME)
                .fetch_one(&mut conn)
                .await
                .unwrap();
        n
    };
    assert!(count_tracker_connections().await >= 1);
    set.shutdown().await;
    // The tracker is gone, so no poll counts the wait: the checks do. The
    // servers end their sessions once the connections close; a loaded
    // machine makes each check slower, never fewer.
    let mut checks = 0;
    while count_tracker_connections().await > 0 {
        checks += 1;
        assert!(
            checks < 250,
            "tracker connections still open after shutdown, {checks} checks later"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let polls = set.tracker_polls();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(set.tracker_polls(), polls, "no polls after shutdown");
}

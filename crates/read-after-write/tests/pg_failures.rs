//! Rows of the failure table (`docs/failures.md`, the `guide::failures`
//! page of the crate docs, which names each test here), each on its own
//! real cluster (they change the topology): stopped, killed, frozen and
//! restarted replicas, replay paused everywhere, a failed capture, the
//! primary down or frozen, a replica of another cluster, an orphan, and a
//! failover.

mod common;

use std::time::{Duration, Instant};

use common::*;
use read_after_write::pg::PgReplicaSet;
use read_after_write::{Backend, RouteReason, Target};
use read_after_write_testkit::TcpProxy;

async fn healthy(set: &PgReplicaSet, name: &str) -> bool {
    set.replicas().iter().any(|r| r.name == name && r.healthy)
}

/// Waits until `name`'s health is `want`, for at most `polls` of the
/// tracker's polls; returns how many it took, and how long (printed only:
/// a loaded machine stretches it).
async fn wait_health(set: &PgReplicaSet, name: &str, want: bool, polls: u64) -> (u64, Duration) {
    let started = Instant::now();
    let budget = PollBudget::new(set, polls);
    while healthy(set, name).await != want {
        budget.check(format_args!("{name} healthy={want}"));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (budget.spent(), started.elapsed())
}

/// Runs `n` eventual reads; all must succeed. Returns how many hit `name`.
async fn eventual_reads(set: &PgReplicaSet, n: usize, name: &str) -> usize {
    let mut hits = 0;
    for _ in 0..n {
        let routed = set.eventual();
        sqlx::query("select 1")
            .execute(routed.pool)
            .await
            .unwrap_or_else(|e| panic!("read on {} failed: {e}", routed.node));
        hits += usize::from(routed.node == name);
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_or_killed_replica_is_excluded_and_readmitted_after_restart() {
    let cluster = start_cluster().await;
    let set = replica_set(&cluster).await;
    // Open pool connections to both replicas, so the restart below leaves
    // stale ones behind that must not fail a read.
    assert!(eventual_reads(&set, 20, "replica-2").await > 0);

    cluster.stop_replica(1).await.unwrap();
    let excluded = wait_health(&set, "replica-2", false, 1_000).await;
    eprintln!("stopped replica excluded after {excluded:?} (polls, time)");
    assert_eq!(eventual_reads(&set, 50, "replica-2").await, 0);

    cluster.start_replica(1).await.unwrap();
    let readmitted = wait_health(&set, "replica-2", true, 2_500).await;
    eprintln!("restarted replica readmitted after {readmitted:?} (polls, time)");
    assert!(
        eventual_reads(&set, 50, "replica-2").await > 0,
        "readmitted replica serves reads again"
    );

    cluster.kill_replica(0).await.unwrap();
    let excluded = wait_health(&set, "replica-1", false, 1_000).await;
    eprintln!("killed replica excluded after {excluded:?} (polls, time)");
    assert_eq!(eventual_reads(&set, 50, "replica-1").await, 0);
    cluster.start_replica(0).await.unwrap();
    wait_health(&set, "replica-1", true, 2_500).await;
    assert!(eventual_reads(&set, 50, "replica-1").await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replica_is_left_by_new_reads_and_readmitted_after_a_thaw() {
    let cluster = start_cluster().await;
    create_schema(&cluster).await;
    let set = replica_set(&cluster).await;
    assert!(eventual_reads(&set, 20, "replica-2").await > 0);

    // SIGSTOP: the replica keeps its sockets and answers nothing, no RST.
    cluster.freeze_replica(1).await.unwrap();
    // A read already sent there never returns on its own: only the app's
    // request timeout ends it.
    let pool = set.replica_pool("replica-2").unwrap();
    let stuck = tokio::time::timeout(
        Duration::from_millis(500),
        sqlx::query("select 1").execute(pool),
    )
    .await;
    assert!(stuck.is_err(), "the frozen replica answered: {stuck:?}");

    // New reads route around it once the tracker's poll of it times out.
    let excluded = wait_health(&set, "replica-2", false, 1_000).await;
    eprintln!("frozen replica excluded after {excluded:?}");
    let hits = tokio::time::timeout(
        Duration::from_secs(5),
        eventual_reads(&set, 50, "replica-2"),
    )
    .await
    .expect("no new read waits on the frozen replica");
    assert_eq!(hits, 0);
    let (id,): (i64,) =
        sqlx::query_as("insert into posts (user_id, body) values (1, 'frozen') returning id")
            .fetch_one(set.primary_pool())
            .await
            .unwrap();
    let position = set.write_position().await.unwrap();
    let routed = set.session(position, Duration::from_millis(400)).await;
    assert_ne!(routed.node, "replica-2", "{:?}", routed.reason);
    let (found,): (bool,) = sqlx::query_as("select exists(select 1 from posts where id = $1)")
        .bind(id)
        .fetch_one(routed.pool)
        .await
        .unwrap();
    assert!(found, "{} {:?}", routed.node, routed.reason);

    cluster.thaw_replica(1).await.unwrap();
    let readmitted = wait_health(&set, "replica-2", true, 2_500).await;
    eprintln!("thawed replica readmitted after {readmitted:?}");
    assert!(
        eventual_reads(&set, 50, "replica-2").await > 0,
        "the thawed replica serves reads again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replay_paused_everywhere_token_reads_go_to_the_primary_within_max_wait() {
    let cluster = start_cluster().await;
    create_schema(&cluster).await;
    let set = replica_set(&cluster).await;
    cluster.pause_replay(0).await.unwrap();
    cluster.pause_replay(1).await.unwrap();

    let (id,): (i64,) =
        sqlx::query_as("insert into posts (user_id, body) values (1, 'paused') returning id")
            .fetch_one(set.primary_pool())
            .await
            .unwrap();
    let position = set.write_position().await.unwrap();
    assert!(
        !visible_on(&set, "replica-1", id).await,
        "naive read of a paused replica is stale"
    );
    assert!(
        !visible_on(&set, "replica-2", id).await,
        "naive read of a paused replica is stale"
    );

    // Routed by prediction (the default), a paused replica is predicted
    // never: the primary at once (ready at its first poll, no wait) as soon
    // as the tracker has seen the pause, where max_wait would end a wait as
    // `wait_timed_out` (tests/pg_adaptive.rs covers the fixed wait).
    until_polled(&set, 1_000, "the tracker sees both pauses", || {
        set.replicas().iter().all(|r| r.paused)
    })
    .await;
    let max_wait = Duration::from_millis(100);
    for _ in 0..5 {
        let (routed, polls) = polls_to_finish(set.session(position, max_wait)).await;
        assert_eq!(
            (routed.target, routed.reason),
            (Target::Primary, RouteReason::PredictedLate)
        );
        assert_eq!(polls, 1, "predicted never: no wait");
        let (found,): (bool,) = sqlx::query_as("select exists(select 1 from posts where id = $1)")
            .bind(id)
            .fetch_one(routed.pool)
            .await
            .unwrap();
        assert!(found);
    }

    // The tracker reports how far behind the paused replicas are (the
    // reads above no longer wait, so let the lag build up).
    tokio::time::sleep(Duration::from_millis(450)).await;
    for replica in set.replicas() {
        assert!(replica.lag >= Duration::from_millis(400), "{replica:?}");
        assert!(replica.lag_bytes > 0, "{replica:?}");
    }

    assert!(set.replicas().iter().all(|r| r.paused));

    cluster.resume_replay(0).await.unwrap();
    cluster.resume_replay(1).await.unwrap();
    // Predictions follow the tracker: once its next poll sees replay
    // resumed, a read waits for a replica again.
    until_polled(&set, 1_000, "the tracker sees replay resumed", || {
        !set.replicas().iter().any(|r| r.paused)
    })
    .await;
    let routed = set.session(position, Duration::from_secs(2)).await;
    assert_eq!(routed.target, Target::Replica, "{:?}", routed.reason);
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(5))
        .await
        .unwrap();
    // The tracker's next polls see the lag gone.
    until_polled(&set, 1_000, "the tracker reports no lag", || {
        set.replicas().iter().all(|r| r.lag == Duration::ZERO)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_capture_pins_the_user_to_the_primary_instead_of_leaving_an_older_token() {
    let cluster = start_cluster().await;
    create_schema(&cluster).await;
    let set = replica_set(&cluster).await;
    // Another instance of the app whose capture query fails after its
    // commits, deterministically: its role loses the right to ask for the
    // WAL position once it has connected (in the field: connections
    // terminated, or a primary lost, between the commit and the capture).
    cluster
        .execute_on_primary(
            "create role capture_fails login; \
             grant select, insert on posts to capture_fails; \
             grant usage on sequence posts_id_seq to capture_fails",
        )
        .await
        .unwrap();
    let mut builder = PgReplicaSet::builder()
        .primary_url(cluster.primary_url().replace("postgres@", "capture_fails@"));
    for replica in cluster.replicas() {
        builder = builder.replica_url(replica.name(), replica.url());
    }
    let lossy = builder.connect().await.unwrap();
    cluster
        .execute_on_primary("revoke execute on function pg_current_wal_insert_lsn() from public")
        .await
        .unwrap();
    let wait = Duration::from_millis(300);

    let mut browser = Browser::new(app(set.clone(), wait), 7);
    let first = browser.post("first").await;
    let older = browser.cookie.clone().expect("a token for the first write");
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(5))
        .await
        .unwrap();
    // Both replicas hold the first write, then stop replaying.
    cluster.pause_replay(0).await.unwrap();
    cluster.pause_replay(1).await.unwrap();

    let mut lossy_browser = Browser {
        service: app(lossy.clone(), wait),
        user: 7,
        cookie: Some(older.clone()),
    };
    let second = lossy_browser.post("second").await;
    let pinned = lossy_browser.cookie.clone().unwrap();
    assert_ne!(pinned, older, "a lost capture still replaces the token");

    // What the client held before the fix: the older token, which a replica
    // satisfies without the second write. Stale.
    browser.cookie = Some(older);
    let (seen, route) = browser.sees(second).await;
    assert!(!seen, "the older token must read stale here: {route}");
    assert!(route.contains("node=replica"), "{route}");

    // The pinned token goes to the primary, at once, and sees the write.
    browser.cookie = Some(pinned);
    let (seen, route) = browser.sees(second).await;
    assert!(seen, "{route}");
    assert!(
        route.contains("node=primary; reason=position_unknown"),
        "{route}"
    );
    assert!(browser.sees(first).await.0);

    // The next write that captures its position replaces the pin.
    let third = browser.post("third").await;
    cluster.resume_replay(0).await.unwrap();
    cluster.resume_replay(1).await.unwrap();
    let (seen, route) = browser.sees(third).await;
    assert!(seen, "{route}");
    assert!(!route.contains("position_unknown"), "{route}");
    assert!(browser.sees(second).await.0);
}

/// Whether a write failed the way a dead primary makes it fail fast: at once
/// on a connection the server closed, or when the pool's checkout bound ran
/// out while the server refused new ones.
fn fails_fast(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => true,
        // The server's goodbye on shutdown (admin_shutdown).
        sqlx::Error::Database(error) => error.code().as_deref() == Some("57P01"),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_primary_down_writes_fail_fast_and_eventual_reads_continue() {
    let cluster = start_cluster().await;
    create_schema(&cluster).await;
    let set = replica_set(&cluster).await;
    cluster.stop_primary().await.unwrap();

    let started = Instant::now();
    let error = sqlx::query("insert into posts (user_id, body) values (1, 'x')")
        .execute(set.primary_pool())
        .await
        .unwrap_err();
    eprintln!(
        "write with the primary down failed after {:?}: {error:?}",
        started.elapsed()
    );
    // Fast, without a clock: at once on the connection the primary closed,
    // or when the pool's checkout bound ran out, 1 s by default (sqlx's own
    // default is 30 s). Never by anything else that might have waited.
    assert_eq!(
        set.primary_pool().options().get_acquire_timeout(),
        Duration::from_secs(1)
    );
    assert!(fails_fast(&error), "{error:?}");
    let capture = set.write_position().await.unwrap_err();
    assert!(capture.to_string().contains("primary"), "{capture}");
    assert_eq!(eventual_reads(&set, 20, "primary").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_never_serves_new_timeline_tokens_after_an_app_restart_and_leaves_eventual_reads()
{
    let cluster = start_cluster().await;
    create_schema(&cluster).await;
    // Unplanned failover that loses WAL: replica-1 is cut off, the primary
    // writes on (replica-2 replays it), the primary dies, replica-1 is
    // promoted. Timeline 2 forks before replica-2's position: replica-2 is
    // an orphan, in recovery, with WAL the new primary never had.
    cluster.stop_replica(0).await.unwrap();
    cluster
        .execute_on_primary(
            "insert into posts (user_id, body) select 0, 'timeline 1 only' from generate_series(1, 20000)",
        )
        .await
        .unwrap();
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();
    cluster.kill_primary().await.unwrap();
    cluster.start_replica(0).await.unwrap();
    cluster.promote_replica(0).await.unwrap();

    // The app (re)starts after the failover: it never saw the orphan's
    // timeline, and the orphan has no WAL receiver to show one.
    let set = PgReplicaSet::builder()
        .primary_url(cluster.replica(0).url())
        .replica_url("replica-2", cluster.replica(1).url())
        .poll_interval(Duration::from_millis(10))
        .stall_timeout(Duration::from_millis(500))
        .connect()
        .await
        .unwrap();
    wait_health(&set, "replica-2", true, 1_000).await;
    let (id,): (i64,) =
        sqlx::query_as("insert into posts (user_id, body) values (1, 'timeline 2') returning id")
            .fetch_one(set.primary_pool())
            .await
            .unwrap();
    let token = set.write_position().await.unwrap();
    let orphan = set.replicas().remove(0);
    assert!(
        orphan.replayed >= token.lsn,
        "the orphan sits past the new-timeline position ({} >= {}), so a position check alone would pass",
        orphan.replayed,
        token.lsn
    );
    // Ids restart from the fork on timeline 2, so the orphan may hold a
    // different row with the same id: look for this very row.
    let (on_orphan,): (bool,) =
        sqlx::query_as("select exists(select 1 from posts where id = $1 and body = 'timeline 2')")
            .bind(id)
            .fetch_one(set.replica_pool("replica-2").unwrap())
            .await
            .unwrap();
    assert!(
        !on_orphan,
        "the orphan lacks the write: a naive read is stale"
    );

    let routed = set.session(token, Duration::from_millis(200)).await;
    assert_eq!(
        (routed.target, routed.reason),
        (Target::Primary, RouteReason::NoReplicaOnTimeline)
    );

    // Eventual reads leave the orphan once its replay has stood still for
    // the stall timeout while the primary wrote.
    let budget = PollBudget::new(&set, 2_500);
    while !set.replicas()[0].diverged {
        budget.check("the orphan stops serving eventual reads");
        sqlx::query("insert into posts (user_id, body) values (2, 'tick')")
            .execute(set.primary_pool())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(eventual_reads(&set, 20, "replica-2").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_old_tokens_go_to_the_new_primary_and_nothing_hangs() {
    let cluster = start_cluster().await;
    create_schema(&cluster).await;
    let old = replica_set(&cluster).await;
    let (id,): (i64,) =
        sqlx::query_as("insert into posts (user_id, body) values (1, 'timeline 1') returning id")
            .fetch_one(old.primary_pool())
            .await
            .unwrap();
    let before = old.write_position().await.unwrap();
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(5))
        .await
        .unwrap();

    // Fail over: the primary dies, replica-1 is promoted.
    cluster.stop_primary().await.unwrap();
    cluster.promote_replica(0).await.unwrap();

    // The old set notices the promoted node is no replica any more and
    // stops reading from it; its reads keep working and never hang.
    wait_health(&old, "replica-1", false, 1_000).await;
    let (routed, polls) = polls_to_finish(old.session(before, Duration::from_millis(100))).await;
    assert_eq!(routed.node, "replica-2", "{:?}", routed.reason);
    assert_eq!(polls, 1, "{:?}: no wait, nothing hangs", routed.reason);
    assert!(visible_on(&old, "replica-2", id).await);

    // The app is pointed at the new primary (replica-2 still follows the
    // dead one).
    let new = PgReplicaSet::builder()
        .primary_url(cluster.replica(0).url())
        .replica_url("replica-2", cluster.replica(1).url())
        .poll_interval(Duration::from_millis(10))
        .connect()
        .await
        .unwrap();
    assert_eq!(new.system_id(), before.system_id);
    assert!(
        new.timeline() > before.timeline,
        "promotion starts a new timeline"
    );

    // A token from the old timeline goes to the new primary, which has the
    // write, at once.
    let (routed, polls) = polls_to_finish(new.session(before, Duration::from_millis(100))).await;
    assert_eq!(
        (routed.target, routed.reason),
        (Target::Primary, RouteReason::TimelineChanged)
    );
    assert_eq!(polls, 1, "ready at its first poll, no wait");
    let (found,): (bool,) = sqlx::query_as("select exists(select 1 from posts where id = $1)")
        .bind(id)
        .fetch_one(routed.pool)
        .await
        .unwrap();
    assert!(found);

    // A write on the new timeline: replica-2 stayed on the old one and
    // never qualifies, so the read goes to the primary without waiting.
    let (new_id,): (i64,) =
        sqlx::query_as("insert into posts (user_id, body) values (1, 'timeline 2') returning id")
            .fetch_one(new.primary_pool())
            .await
            .unwrap();
    let after = new.write_position().await.unwrap();
    assert_eq!(after.timeline, new.timeline());
    assert!(
        !visible_on(&new, "replica-2", new_id).await,
        "the abandoned replica is stale"
    );
    let routed = new.session(after, Duration::from_millis(100)).await;
    assert_eq!(
        (routed.target, routed.reason),
        (Target::Primary, RouteReason::NoReplicaOnTimeline),
        "no replica is on timeline 2: the primary at once, no wasted wait"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_of_another_cluster_is_never_admitted() {
    let ours = read_after_write_testkit::TestCluster::builder()
        .replica(Duration::ZERO)
        .start()
        .await
        .unwrap();
    let theirs = read_after_write_testkit::TestCluster::builder()
        .replica(Duration::ZERO)
        .start()
        .await
        .unwrap();
    let set = PgReplicaSet::builder()
        .primary_url(ours.primary_url())
        .replica_url("ours", ours.replica(0).url())
        .replica_url("theirs", theirs.replica(0).url())
        .poll_interval(Duration::from_millis(10))
        .connect()
        .await
        .unwrap();
    // The foreign replica answers, is in recovery and has a replay position
    // (it would pass every other check), but it is never routed to.
    wait_health(&set, "ours", true, 1_000).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!healthy(&set, "theirs").await, "{:?}", set.replicas());
    assert_eq!(eventual_reads(&set, 20, "theirs").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_primary_fails_writes_within_bounds_and_a_repointed_address_is_picked_up() {
    let cluster = start_cluster().await;
    create_schema(&cluster).await;
    // The app reaches the primary through a repointable address, as behind
    // HAProxy or a DNS name.
    let proxy = TcpProxy::start(cluster.primary_port()).await.unwrap();
    let mut builder = PgReplicaSet::builder()
        .primary_url(format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            proxy.port()
        ))
        .poll_interval(Duration::from_millis(10))
        .probe_timeout(Duration::from_millis(300))
        .max_connections(2)
        .acquire_timeout(Duration::from_millis(500));
    for replica in cluster.replicas() {
        builder = builder.replica_url(replica.name(), replica.url());
    }
    let set = builder.connect().await.unwrap();
    let insert = || {
        sqlx::query("insert into posts (user_id, body) values (1, 'frozen?')")
            .execute(set.primary_pool())
    };
    // Both pooled connections are open when the primary freezes.
    let (a, b) = tokio::join!(insert(), insert());
    a.unwrap();
    b.unwrap();
    // SIGSTOP: the server keeps its sockets and answers nothing, no RST.
    cluster.freeze_primary().await.unwrap();

    // Queries already on the wire never return on their own: the app's
    // request timeout drops them, and their pool slots must come back.
    let (a, b) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(1), insert()),
        tokio::time::timeout(Duration::from_secs(1), insert())
    );
    assert!(
        !matches!(a, Ok(Ok(_))) && !matches!(b, Ok(Ok(_))),
        "nothing succeeds on a frozen primary: {a:?} {b:?}"
    );
    // The tracker noticed on its own connection.
    until_polled(&set, 1_000, "the tracker sees the frozen primary", || {
        !set.primary_healthy()
    })
    .await;
    // New writes fail within the checkout bound, not hang: the pool's
    // 500 ms acquire timeout ends them (the frozen server answers nothing,
    // so nothing else can).
    let started = Instant::now();
    let error = insert().await.unwrap_err();
    eprintln!(
        "write on the frozen primary failed after {:?}: {error}",
        started.elapsed()
    );
    assert!(matches!(error, sqlx::Error::PoolTimedOut), "{error:?}");

    // Failover: replica-1 is promoted and the address repointed; the frozen
    // sessions stay open (HAProxy's default).
    cluster.promote_replica(0).await.unwrap();
    proxy.repoint(cluster.replica(0).port());
    // Each attempt is bounded by the app's request timeout; the attempts,
    // by the tracker's polls.
    let started = Instant::now();
    let budget = PollBudget::new(&set, 2_500);
    loop {
        match tokio::time::timeout(Duration::from_secs(1), insert()).await {
            Ok(Ok(_)) => break,
            outcome => budget.check(format_args!(
                "a write succeeds after the repoint (last: {outcome:?})"
            )),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "first write after the repoint: {:?}, {} tracker polls",
        started.elapsed(),
        budget.spent()
    );
    // The tracker follows the new primary and its timeline.
    until_polled(&set, 1_000, "the tracker follows timeline 2", || {
        set.timeline() >= 2 && set.primary_healthy()
    })
    .await;
    set.shutdown().await;
    drop(proxy);
    cluster.thaw_primary().await.unwrap();
}

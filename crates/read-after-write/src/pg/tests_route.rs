//! The routing rules on a replica set built by hand, with no server to
//! poll and tokio's clock paused: what a session read does for each state
//! of its replicas, decided by route reasons and the waits it asks for,
//! never by how long a test took.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::budget::{PrimaryBudget, PrimaryShare};
use super::canary::Canary;
use super::capture::Capture;
use super::endpoint::{Endpoint, EndpointSource, PoolSettings};
use super::heartbeat::{Heartbeat, DEFAULT_TABLE};
use super::outages::Outages;
use super::pools::PrimaryPools;
use super::primary::PrimaryState;
use super::probe::{PrimaryProbe, ProbeKind};
use super::server::ReplicaState;
use super::tracker::{ReplicaTracker, TrackerConfig};
use super::{Inner, PgReplicaSet, Selection, WaitPolicy};
use crate::backend::{RouteReason, Target};
use crate::position::{Lsn, WalGeometry, WritePosition};

const SYSTEM: u64 = 7;
const TIMELINE: u32 = 1;
const MS: Duration = Duration::from_millis(1);

fn options() -> PgConnectOptions {
    "postgres://nobody@127.0.0.1:1/none".parse().unwrap()
}

/// A replica set over `replicas` servers that are never contacted (lazy
/// pools, no tracker task), routing by `policy`, with heartbeats if asked.
fn set(
    replicas: usize,
    policy: WaitPolicy,
    heartbeat: bool,
    budget: Option<PrimaryBudget>,
) -> PgReplicaSet {
    let endpoints = (0..replicas)
        .map(|i| {
            Arc::new(Endpoint::new(
                format!("replica-{}", i + 1),
                EndpointSource::Options(Mutex::new(Arc::new(options()))),
                PoolSettings {
                    max_connections: 1,
                    acquire_timeout: Duration::from_secs(1),
                },
                Arc::new(|options| options),
            ))
        })
        .collect();
    let pools = Arc::new(PrimaryPools::new(
        PgPoolOptions::new().connect_lazy_with(options()),
        None,
    ));
    let primary = Arc::new(PrimaryState::new(
        Arc::clone(&pools),
        Arc::new(|options| options),
        WalGeometry::default(),
        SYSTEM,
        Outages::new(),
    ));
    let heartbeat = heartbeat.then(|| Arc::new(Heartbeat::new(DEFAULT_TABLE.into())));
    let config = TrackerConfig {
        poll_interval: 20 * MS,
        probe_timeout: 500 * MS,
        max_backoff: Duration::from_secs(2),
        min_refresh_gap: 2 * MS,
        idle_poll_interval: 500 * MS,
        stall_timeout: Duration::from_secs(5),
        heartbeat_interval: Duration::from_secs(1),
        discovery_interval: Duration::from_secs(60),
    };
    let tracker = ReplicaTracker::new(
        endpoints,
        primary,
        config,
        ProbeKind::Streaming {
            heartbeat: heartbeat.as_ref().map(|h| h.table.clone()),
        },
        heartbeat.clone(),
        Arc::new(super::probe_sqlx::SqlxConnector),
    );
    PgReplicaSet {
        inner: Arc::new(Inner {
            capture: Capture::new(
                pools,
                Arc::new(super::probe_sqlx::SqlxConnector),
                Outages::new(),
                heartbeat,
                WalGeometry::default(),
                Duration::from_secs(1),
            ),
            tracker,
            selection: Selection::RoundRobin,
            wait_poll_interval: 2 * MS,
            poll_interval: 20 * MS,
            next: AtomicUsize::new(0),
            wait_policy: policy,
            primary_share: budget.map(PrimaryShare::new),
            canary: Canary::new(0.0),
        }),
    }
}

impl PgReplicaSet {
    fn server(&self, index: usize) -> &ReplicaState {
        self.inner.tracker.servers.get(index).unwrap()
    }

    /// The position replica `index`'s task would wait for now; 0 for none.
    fn asked(&self, index: usize) -> u64 {
        self.inner
            .tracker
            .pending_wait(self.server(index))
            .map_or(0, |(lsn, _, _)| lsn)
    }

    /// The primary writes up to `lsn` now.
    fn primary_at(&self, lsn: u64) {
        self.inner.tracker.note_primary_position(PrimaryProbe {
            lsn: Lsn::new(lsn),
            timeline: TIMELINE,
            epoch: epoch(),
            heartbeat: false,
        });
    }

    /// Replica `index` answered a poll: healthy, at `replayed`, its WAL
    /// receiver seen on the timeline, replaying `delay` behind.
    fn replica_at(&self, index: usize, replayed: u64, delay: Option<Duration>) {
        let server = self.server(index);
        server.healthy.store(true, Ordering::Release);
        server.replayed.store(replayed, Ordering::Release);
        server.timeline.store(TIMELINE, Ordering::Relaxed);
        if let Some(delay) = delay {
            server.set_delay(delay);
        }
        let now = self.inner.tracker.nanos();
        server.advanced_at.store(now, Ordering::Relaxed);
        server.polled_at.store(now, Ordering::Relaxed);
        self.inner.tracker.bump();
    }
}

fn epoch() -> u64 {
    (u64::from(TIMELINE) << 32) | 0xABCD
}

fn at(lsn: u64) -> WritePosition {
    WritePosition::new(Lsn::new(lsn), TIMELINE, SYSTEM)
}

/// Routes a session read in a task of its own, so the test can move time
/// and the replicas while it waits.
fn route(
    set: &PgReplicaSet,
    lsn: u64,
    max_wait: Duration,
) -> tokio::task::JoinHandle<(Target, RouteReason)> {
    let set = set.clone();
    tokio::spawn(async move {
        let routed = set.route_session(at(lsn), max_wait).await;
        (routed.target, routed.reason)
    })
}

/// Lets spawned reads run up to their next wait.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_holds_the_write_serves_it_at_once() {
    let set = set(2, WaitPolicy::Predicted, false, None);
    set.primary_at(0x1000);
    set.replica_at(0, 0x1000, Some(30 * MS));
    set.replica_at(1, 0x0800, Some(30 * MS));
    let routed = set.route_session(at(0x1000), 50 * MS).await;
    assert_eq!(
        (routed.target, routed.node, routed.reason),
        (Target::Replica, "replica-1", RouteReason::CaughtUp)
    );
    assert_eq!(set.asked(0), 0, "nothing to wait for");
}

#[tokio::test(start_paused = true)]
async fn a_replica_predicted_in_time_is_waited_for_on_the_server_and_serves_the_read() {
    let set = set(1, WaitPolicy::Predicted, false, None);
    set.replica_at(0, 0x0800, Some(30 * MS));
    set.primary_at(0x1000);
    let read = route(&set, 0x1000, 50 * MS);
    settle().await;
    // Waiting: the server is asked to wait for the position itself.
    assert_eq!(set.asked(0), 0x1000);
    assert!(!read.is_finished());
    tokio::time::advance(30 * MS).await;
    set.replica_at(0, 0x1000, None);
    assert_eq!(
        read.await.unwrap(),
        (Target::Replica, RouteReason::CaughtUpAfterWait)
    );
}

#[tokio::test(start_paused = true)]
async fn a_replica_predicted_past_the_budget_sends_the_read_to_the_primary_without_a_wait() {
    let set = set(1, WaitPolicy::Predicted, false, None);
    set.replica_at(0, 0x0800, Some(150 * MS));
    set.primary_at(0x1000);
    let started = tokio::time::Instant::now();
    let routed = set.route_session(at(0x1000), 50 * MS).await;
    assert_eq!(
        (routed.target, routed.reason),
        (Target::Primary, RouteReason::PredictedLate)
    );
    // The paused clock did not move: the read went to the primary without
    // waiting at all, and asked no server to wait.
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(set.asked(0), 0);
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_pauses_mid_wait_ends_the_wait_at_once() {
    let set = set(1, WaitPolicy::Predicted, false, None);
    set.replica_at(0, 0x0800, Some(30 * MS));
    set.primary_at(0x1000);
    let read = route(&set, 0x1000, 50 * MS);
    settle().await;
    tokio::time::advance(10 * MS).await;
    set.server(0).paused.store(true, Ordering::Relaxed);
    set.inner.tracker.bump();
    let (target, reason) = read.await.unwrap();
    assert_eq!(
        (target, reason),
        (Target::Primary, RouteReason::PredictedLate)
    );
}

#[tokio::test(start_paused = true)]
async fn a_fixed_wait_waits_exactly_max_wait_then_reads_the_primary() {
    let set = set(1, WaitPolicy::Fixed, false, None);
    set.replica_at(0, 0x0800, Some(150 * MS));
    set.primary_at(0x1000);
    let started = tokio::time::Instant::now();
    let routed = set.route_session(at(0x1000), 50 * MS).await;
    assert_eq!(
        (routed.target, routed.reason),
        (Target::Primary, RouteReason::WaitTimedOut)
    );
    // Every wait is bounded: the paused clock shows exactly the bound.
    assert_eq!(started.elapsed(), 50 * MS);
}

#[tokio::test(start_paused = true)]
async fn without_a_proof_of_the_timeline_the_primary_serves_at_once() {
    let set = set(1, WaitPolicy::Predicted, false, None);
    set.replica_at(0, 0x2000, Some(MS));
    // The WAL receiver unseen (no privilege, no heartbeat table): replayed
    // past the write, but nothing proves it is the primary's history.
    set.server(0).timeline.store(0, Ordering::Relaxed);
    set.primary_at(0x1000);
    let routed = set.route_session(at(0x1000), 50 * MS).await;
    assert_eq!(
        (routed.target, routed.reason),
        (Target::Primary, RouteReason::NoReplicaOnTimeline)
    );
}

#[tokio::test(start_paused = true)]
async fn a_heartbeat_proves_a_write_only_up_to_its_own_position() {
    let set = set(1, WaitPolicy::Predicted, true, None);
    set.primary_at(0x1000);
    set.replica_at(0, 0x2000, Some(MS));
    let server = set.server(0);
    server.timeline.store(0, Ordering::Relaxed);
    // A heartbeat of this primary at 0x0F00: the replica's history is the
    // primary's up to there only, whatever it replayed since.
    server.proven.store(0x0F00, Ordering::Release);
    server.proven_timeline.store(TIMELINE, Ordering::Relaxed);
    let read = route(&set, 0x1000, 50 * MS);
    settle().await;
    assert!(
        !read.is_finished(),
        "waits for the heartbeat after the write"
    );
    assert_eq!(set.asked(0), 0x1000);
    server.proven.store(0x1000, Ordering::Release);
    set.inner.tracker.bump();
    assert_eq!(
        read.await.unwrap(),
        (Target::Replica, RouteReason::CaughtUpAfterWait)
    );
}

#[tokio::test(start_paused = true)]
async fn tokens_of_another_timeline_or_cluster_follow_the_rule() {
    let set = set(1, WaitPolicy::Predicted, false, None);
    set.primary_at(0x1000);
    set.replica_at(0, 0x2000, Some(MS));
    let old_timeline = WritePosition::new(Lsn::new(0x800), TIMELINE - 1 + 2, SYSTEM);
    let routed = set.route_session(old_timeline, 50 * MS).await;
    assert_eq!(
        (routed.target, routed.reason),
        (Target::Primary, RouteReason::TimelineChanged)
    );
    let foreign = WritePosition::new(Lsn::new(0x800), TIMELINE, SYSTEM + 1);
    let routed = set.route_session(foreign, 50 * MS).await;
    assert_eq!(
        (routed.target, routed.reason),
        (Target::Replica, RouteReason::ForeignCluster)
    );
}

#[tokio::test(start_paused = true)]
async fn over_the_primary_budget_a_read_waits_up_to_its_hard_bound() {
    let budget = PrimaryBudget::new(0.0, Duration::from_secs(10), 300 * MS).min_reads(1);
    let set = set(1, WaitPolicy::Predicted, false, Some(budget));
    set.replica_at(0, 0x0800, Some(150 * MS));
    set.primary_at(0x1000);
    // The first read goes to the primary (predicted late) and puts the
    // share over the 0 % cap.
    let routed = set.route_session(at(0x1000), 50 * MS).await;
    assert_eq!(routed.reason, RouteReason::PredictedLate);
    // Over the cap, the next read waits past max_wait for the replica
    // predicted within the hard bound.
    let read = route(&set, 0x1000, 50 * MS);
    settle().await;
    tokio::time::advance(150 * MS).await;
    set.replica_at(0, 0x1000, None);
    assert_eq!(
        read.await.unwrap(),
        (Target::Replica, RouteReason::CaughtUpAfterWait)
    );
}

#[tokio::test(start_paused = true)]
async fn waits_coalesce_on_the_lowest_position_and_end_with_their_reads() {
    let set = set(1, WaitPolicy::Fixed, false, None);
    set.primary_at(0x2000);
    set.replica_at(0, 0x0800, None);
    let early = route(&set, 0x1000, 50 * MS);
    let late = route(&set, 0x2000, 50 * MS);
    settle().await;
    // The server waits for the first position a read can be served at,
    // not the highest: the early read is not held back by the late one.
    assert_eq!(set.asked(0), 0x1000);
    set.replica_at(0, 0x1000, None);
    set.server(0).end_wait(0x1000, set.inner.tracker.nanos());
    set.inner.tracker.bump();
    assert_eq!(
        early.await.unwrap(),
        (Target::Replica, RouteReason::CaughtUpAfterWait)
    );
    settle().await;
    // The late read, still waiting, asked again for what it needs.
    assert_eq!(set.asked(0), 0x2000);
    // Once it gives up, no wait is left behind for the server to run.
    assert_eq!(
        late.await.unwrap(),
        (Target::Primary, RouteReason::WaitTimedOut)
    );
    assert_eq!(set.asked(0), 0);
}

//! The tracker's rules on state built by hand, with no server to poll:
//! divergence, timelines, epochs and heartbeat proofs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;

use super::endpoint::{Admission, Endpoint, EndpointSource, PoolSettings};
use super::heartbeat::Heartbeat;
use super::outages::Outages;
use super::pools::PrimaryPools;
use super::primary::PrimaryState;
use super::probe::{PrimaryProbe, ProbeKind};
use super::server::ReplicaState;
use super::tracker::{ReplicaTracker, TrackerConfig};
use crate::position::{Lsn, WalGeometry};

const SECOND: u64 = 1_000_000_000;

fn options() -> PgConnectOptions {
    "postgres://nobody@127.0.0.1:1/none".parse().unwrap()
}

fn config() -> TrackerConfig {
    TrackerConfig {
        poll_interval: Duration::from_millis(20),
        probe_timeout: Duration::from_millis(500),
        max_backoff: Duration::from_secs(2),
        min_refresh_gap: Duration::from_millis(2),
        idle_poll_interval: Duration::from_millis(500),
        stall_timeout: Duration::from_secs(5),
        heartbeat_interval: Duration::from_secs(1),
        discovery_interval: Duration::from_secs(60),
    }
}

/// A tracker over a primary that is never contacted: the pools are lazy,
/// and it has no replica URL (states are built by [`replica`]).
fn tracker(heartbeat: bool) -> Arc<ReplicaTracker> {
    let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy_with(options());
    let primary = Arc::new(PrimaryState::new(
        Arc::new(PrimaryPools::new(pool, None)),
        Arc::new(|options| options),
        WalGeometry::default(),
        7,
        Outages::new(),
    ));
    let heartbeat =
        heartbeat.then(|| Arc::new(Heartbeat::new("read_after_write_heartbeat".into())));
    ReplicaTracker::new(
        Vec::new(),
        primary,
        config(),
        ProbeKind::Streaming {
            heartbeat: heartbeat.as_ref().map(|h| h.table.clone()),
        },
        heartbeat,
        Arc::new(super::probe_sqlx::SqlxConnector),
    )
}

fn at(lsn: u64, timeline: u32) -> PrimaryProbe {
    PrimaryProbe {
        lsn: Lsn::new(lsn),
        timeline,
        epoch: 0,
        heartbeat: false,
    }
}

fn replica(timeline: u32, advanced_at: u64) -> ReplicaState {
    let endpoint = Arc::new(Endpoint::new(
        "replica-1".into(),
        EndpointSource::Options(std::sync::Mutex::new(Arc::new(options()))),
        PoolSettings {
            max_connections: 1,
            acquire_timeout: Duration::from_secs(1),
        },
        Arc::new(|options| options),
    ));
    let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy_with(options());
    let admission = Admission::new(endpoint, "replica-1".into(), Arc::new(|_: &_| false));
    let replica = ReplicaState::new("replica-1".into(), 0, pool, admission, Outages::new());
    replica.timeline.store(timeline, Ordering::Relaxed);
    replica.advanced_at.store(advanced_at, Ordering::Relaxed);
    replica.healthy.store(true, Ordering::Relaxed);
    replica
}

#[tokio::test]
async fn replicas_off_the_primarys_history_serve_no_reads() {
    let tracker = tracker(false);
    tracker.note_primary_position(at(4_000, 2));
    tracker
        .primary
        .changed_at
        .store(10 * SECOND, Ordering::Relaxed);

    // Following the primary: on its timeline and moving.
    let following = replica(2, 10 * SECOND);
    tracker.judge_divergence(&following, 60 * SECOND);
    assert!(following.serves_eventual(2));
    // Seen on the old timeline: an orphan, out at once.
    let orphan = replica(1, 10 * SECOND);
    tracker.judge_divergence(&orphan, 11 * SECOND);
    assert!(!orphan.serves_eventual(2));
    assert!(orphan.diverged.load(Ordering::Relaxed));
    // Timeline unknown: serves eventual reads while it moves...
    let unknown = replica(0, 9 * SECOND);
    tracker.judge_divergence(&unknown, 12 * SECOND);
    assert!(unknown.serves_eventual(2));
    assert!(!unknown.is_on(2), "but never qualifies for a token");
    // ...and leaves them once it stood still for the stall timeout
    // while the primary moved.
    tracker.judge_divergence(&unknown, 15 * SECOND);
    assert!(!unknown.serves_eventual(2));
    // A quiet primary is no reason to distrust a quiet replica.
    let quiet = replica(2, 11 * SECOND);
    tracker.judge_divergence(&quiet, 600 * SECOND);
    assert!(quiet.serves_eventual(2));
    // Nor is a replica that reached the primary's position before the
    // primary's own poll saw it: caught up is caught up.
    let early = replica(2, 9 * SECOND);
    early.replayed.store(4_000, Ordering::Relaxed);
    tracker.judge_divergence(&early, 600 * SECOND);
    assert!(early.serves_eventual(2));
}

#[tokio::test]
async fn the_primarys_timeline_never_moves_backwards() {
    let tracker = tracker(false);
    tracker.note_primary_position(at(9_000, 2));
    // A late answer from the old primary across a failover.
    tracker.note_primary_position(at(12_000, 1));
    assert_eq!(tracker.primary.timeline.load(Ordering::Relaxed), 2);
    assert_eq!(tracker.primary.inserted.load(Ordering::Relaxed), 9_000);
}

#[tokio::test]
async fn a_new_timeline_restarts_the_position_history() {
    let tracker = tracker(false);
    tracker.note_primary_position(at(10_000, 1));
    // An unplanned failover: timeline 2 forked below where timeline 1 had
    // got to, so its positions are lower.
    tracker.note_primary_position(at(4_000, 2));
    tracker.note_primary_position(at(4_200, 2));
    let primary = &tracker.primary;
    assert_eq!(primary.timeline.load(Ordering::Relaxed), 2);
    // Lag is measured against timeline 2, not the old timeline's peak.
    assert_eq!(primary.inserted.load(Ordering::Relaxed), 4_200);
    assert_eq!(primary.time_behind(4_200), Duration::ZERO);
    assert!(primary
        .with_history(|history| history.iter().all(|&(_, lsn)| lsn >= 4_000))
        .unwrap());
    // On one timeline, positions only move forward.
    tracker.note_primary_position(at(4_100, 2));
    assert_eq!(primary.inserted.load(Ordering::Relaxed), 4_200);
}

/// An epoch on `timeline` (high bits) for server `hash` (low bits).
fn epoch(timeline: u32, hash: u32) -> u64 {
    (u64::from(timeline) << 32) | u64::from(hash)
}

#[tokio::test]
async fn a_new_primary_epoch_voids_every_heartbeat_proof() {
    let tracker = tracker(true);
    let first = epoch(1, 0xAAAA);
    tracker.note_primary_position(PrimaryProbe {
        epoch: first,
        ..at(1_000, 1)
    });
    let proven = replica(0, 0);
    tracker.servers_push_for_test(proven);
    let server = tracker.servers.get(0).unwrap();
    server.proven.store(1_000, Ordering::Relaxed);
    server.proven_timeline.store(1, Ordering::Relaxed);
    assert!(server.has_replayed(Lsn::new(900), 1));
    // The primary restarted (same timeline, another start time): what its
    // old incarnation's heartbeats proved no longer counts.
    tracker.note_primary_position(PrimaryProbe {
        epoch: epoch(1, 0xBBBB),
        ..at(1_100, 1)
    });
    assert!(!server.has_replayed(Lsn::new(900), 1));
    assert_eq!(server.known_timeline(), 0);
}

#[tokio::test]
async fn a_replica_past_the_current_heartbeat_that_does_not_show_it_has_left_the_history() {
    let tracker = tracker(true);
    let current = epoch(2, 0xCCCC);
    tracker.note_primary_position(PrimaryProbe {
        epoch: current,
        ..at(5_000, 2)
    });
    // Two heartbeats written: the floor is the second one's position.
    for lsn in [5_000, 6_000] {
        tracker.note_primary_position(PrimaryProbe {
            epoch: current,
            heartbeat: true,
            ..at(lsn, 2)
        });
    }
    assert_eq!(
        tracker.primary.heartbeat_floor.load(Ordering::Relaxed),
        6_000
    );
    let now = 20 * SECOND;
    // Behind the floor, no proof yet: lagging, not diverged.
    let lagging = replica(0, now);
    lagging.replayed.store(5_500, Ordering::Relaxed);
    tracker.judge_divergence(&lagging, now);
    assert!(!lagging.diverged.load(Ordering::Relaxed));
    // Past the floor with a proof: following.
    let following = replica(0, now);
    following.replayed.store(6_500, Ordering::Relaxed);
    following.proven.store(6_000, Ordering::Relaxed);
    following.proven_timeline.store(2, Ordering::Relaxed);
    tracker.judge_divergence(&following, now);
    assert!(!following.diverged.load(Ordering::Relaxed));
    // Past the floor without any heartbeat of this primary: it replays
    // another primary's WAL (it re-followed a promoted replica, say), even
    // though it keeps moving.
    let elsewhere = replica(0, now);
    elsewhere.replayed.store(9_000, Ordering::Relaxed);
    tracker.judge_divergence(&elsewhere, now);
    assert!(elsewhere.diverged.load(Ordering::Relaxed));
    assert!(!elsewhere.serves_eventual(2));
}

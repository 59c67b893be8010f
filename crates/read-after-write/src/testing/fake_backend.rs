//! `FakeBackend`: the one test double behind the layer's unit tests, the
//! hostile-input test and the layer benchmarks.
//!
//! It answers from numbers a test sets by hand, so that tests and benches see
//! the layer's own work (tokens, cookies, routing by the token, issuance) and
//! nothing else. It is not a model of PostgreSQL and says nothing about a
//! database's behaviour or cost: database behaviour is tested against real
//! clusters in `tests/pg_*.rs`.
//!
//! Written against the public API only (`read_after_write::…`), so that the
//! integration tests and benches, which see nothing else, include this very
//! file by path (`#[path = "../src/testing/fake_backend.rs"] mod
//! fake_backend;`), and the crate's unit tests compile it as
//! `crate::testing`. It is not part of the crate's API.
//!
//! What it models, and no more:
//!
//! - A primary that reports `primary_at` when a write position is captured
//!   (optionally counting up by one per capture), or fails to.
//! - One replica that has replayed up to `replica_replayed`: a session read
//!   goes there when the token's LSN is at most that (inclusive), else to the
//!   primary (`lagging`). [`FakeBackend::replica_caught_up`] makes it hold
//!   everything.
//! - Optionally a cluster id, and a replica tag for monotonic reads.
//! - How far behind the replica is, in time: an eventual read bounded below
//!   that ([`Backend::eventual_within`]) goes to the primary (`too_stale`).

// Each target that includes this file uses its own part of it.
#![allow(dead_code)]

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use read_after_write::backend::{Finding, LayerSettings};
use read_after_write::{Backend, Bookmark, Lsn, ReplicaTag, RouteReason, Routed, WritePosition};

/// The fake's failed capture.
#[derive(Debug)]
pub(crate) struct CaptureFailed;

impl fmt::Display for CaptureFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("capture failed (the test's fake backend was told to fail)")
    }
}

impl std::error::Error for CaptureFailed {}

/// A hand-set stand-in for a primary and one replica: a test double, never
/// database behaviour (see the module docs).
///
/// Built with methods that take and return it, then shared in an `Arc`
/// (`ReadAfterWriteLayer::from_arc`); what a test changes while requests run
/// (positions, a failing capture) goes through `&self`.
pub(crate) struct FakeBackend {
    /// The pool handlers get for the primary.
    primary: &'static str,
    /// The pool handlers get for the replica.
    replica: &'static str,
    /// The replica's node name, in routes and the debug header.
    replica_node: &'static str,
    /// The system identifier of the positions it captures.
    system_id: u64,
    /// Whether it names its cluster ([`Backend::cluster_id`]).
    names_cluster: bool,
    /// The replica's tag: with one, replica routes carry bookmarks and
    /// monotonic reads stay on the replica; without, monotonic reads go to
    /// the primary (the trait's default).
    tag: Option<ReplicaTag>,
    /// Whether each capture reports one more than the last.
    counts_up: bool,
    /// Whether a capture returns `Pending` once first, as a round trip would.
    capture_yields: bool,
    primary_at: AtomicU64,
    /// `u64::MAX`: the replica holds everything.
    replica_replayed: AtomicU64,
    /// How far behind the replica is, in milliseconds.
    replica_behind_ms: AtomicU64,
    capture_fails: AtomicBool,
    captures: AtomicUsize,
    /// What `diagnose` reports.
    findings: Mutex<Vec<Finding>>,
    /// The settings `diagnose` was last asked with.
    diagnosed_with: Mutex<Option<LayerSettings>>,
}

impl FakeBackend {
    /// The system identifier of its positions unless told otherwise.
    pub(crate) const SYSTEM_ID: u64 = 0x5EED;

    /// Pools `primary-pool` and `replica-pool`, the replica `replica-1`
    /// having replayed nothing, the primary at LSN 0, system
    /// [`SYSTEM_ID`](Self::SYSTEM_ID) and no cluster id; captures succeed and
    /// yield once, like a round trip.
    pub(crate) fn new() -> Self {
        FakeBackend {
            primary: "primary-pool",
            replica: "replica-pool",
            replica_node: "replica-1",
            system_id: Self::SYSTEM_ID,
            names_cluster: false,
            tag: None,
            counts_up: false,
            capture_yields: true,
            primary_at: AtomicU64::new(0),
            replica_replayed: AtomicU64::new(0),
            replica_behind_ms: AtomicU64::new(0),
            capture_fails: AtomicBool::new(false),
            captures: AtomicUsize::new(0),
            findings: Mutex::new(Vec::new()),
            diagnosed_with: Mutex::new(None),
        }
    }

    /// One cluster, `id`, whose replica `replica-1` (tagged for monotonic
    /// reads) holds everything, and whose captures count up from `0x1000`.
    pub(crate) fn cluster(id: u64) -> Self {
        FakeBackend::new()
            .cluster_id(id)
            .replica_caught_up()
            .primary_at(0x1000)
            .counting_up()
            .replica_tag(Self::replica_1())
    }

    /// The tag [`cluster`](Self::cluster) gives its replica: `replica-1`,
    /// started at 1 µs.
    pub(crate) fn replica_1() -> ReplicaTag {
        ReplicaTag::of("replica-1", 1)
    }

    /// Names its cluster `id`, and captures positions of it.
    pub(crate) fn cluster_id(mut self, id: u64) -> Self {
        self.system_id = id;
        self.names_cluster = true;
        self
    }

    /// Captures positions of system `id`, without naming a cluster.
    pub(crate) fn system_id(mut self, id: u64) -> Self {
        self.system_id = id;
        self
    }

    /// The primary reports `lsn` on the next capture.
    pub(crate) fn primary_at(self, lsn: u64) -> Self {
        self.set_primary_at(lsn);
        self
    }

    /// The replica holds every position a token may name.
    pub(crate) fn replica_caught_up(self) -> Self {
        self.set_replica_replayed(u64::MAX);
        self
    }

    /// Each capture reports one more than the one before.
    pub(crate) fn counting_up(mut self) -> Self {
        self.counts_up = true;
        self
    }

    /// The replica's node name (default `replica-1`).
    pub(crate) fn replica_named(mut self, node: &'static str) -> Self {
        self.replica_node = node;
        self
    }

    /// Replica routes carry bookmarks tied to `tag`, and monotonic reads
    /// stay on the replica.
    pub(crate) fn replica_tag(mut self, tag: ReplicaTag) -> Self {
        self.tag = Some(tag);
        self
    }

    /// Captures answer at once, never `Pending`: for a future driven
    /// without a runtime.
    pub(crate) fn capture_at_once(mut self) -> Self {
        self.capture_yields = false;
        self
    }

    /// The primary reports `lsn` on the next capture.
    pub(crate) fn set_primary_at(&self, lsn: u64) {
        self.primary_at.store(lsn, Ordering::SeqCst);
    }

    /// The replica has replayed up to `lsn` (`u64::MAX`: everything).
    pub(crate) fn set_replica_replayed(&self, lsn: u64) {
        self.replica_replayed.store(lsn, Ordering::SeqCst);
    }

    /// The replica is `behind` behind the primary, in time.
    pub(crate) fn set_replica_behind(&self, behind: Duration) {
        let millis = u64::try_from(behind.as_millis()).unwrap_or(u64::MAX);
        self.replica_behind_ms.store(millis, Ordering::SeqCst);
    }

    /// Captures fail from now on (or succeed again).
    pub(crate) fn fail_captures(&self, fail: bool) {
        self.capture_fails.store(fail, Ordering::SeqCst);
    }

    /// `diagnose` reports `finding` too.
    pub(crate) fn add_finding(&self, finding: Finding) {
        self.findings.lock().unwrap().push(finding);
    }

    /// Captures asked for so far, failed ones included.
    pub(crate) fn captures(&self) -> usize {
        self.captures.load(Ordering::SeqCst)
    }

    /// The settings `diagnose` was last asked with.
    pub(crate) fn diagnosed_with(&self) -> Option<LayerSettings> {
        *self.diagnosed_with.lock().unwrap()
    }

    /// The replica tag, if it has one.
    pub(crate) fn tag(&self) -> Option<ReplicaTag> {
        self.tag
    }

    /// A position at `lsn` of this backend's system, timeline 1.
    pub(crate) fn at(&self, lsn: u64) -> WritePosition {
        WritePosition::new(Lsn::new(lsn), 1, self.system_id)
    }

    /// What a read on the replica has seen: the primary's position, or
    /// less when the replica lags (it never replays past the primary).
    fn replica_position(&self) -> WritePosition {
        let replayed = self.replica_replayed.load(Ordering::SeqCst);
        self.at(replayed.min(self.primary_at.load(Ordering::SeqCst)))
    }

    fn replica_route(&self, reason: RouteReason, bookmark: Bookmark) -> Routed<'_, &'static str> {
        let routed = Routed::replica(&self.replica, self.replica_node, reason);
        match self.tag {
            Some(tag) => routed.with_bookmark(bookmark.on_replica(tag)),
            None => routed,
        }
    }

    fn route_session(&self, required: WritePosition) -> Routed<'_, &'static str> {
        if required.lsn.as_u64() <= self.replica_replayed.load(Ordering::SeqCst) {
            self.replica_route(RouteReason::CaughtUp, Bookmark::new(required))
        } else {
            Routed::primary(&self.primary, RouteReason::Lagging)
        }
    }
}

impl Backend for FakeBackend {
    type Pool = &'static str;
    type Error = CaptureFailed;

    fn primary(&self) -> &&'static str {
        &self.primary
    }

    fn eventual(&self) -> Routed<'_, &'static str> {
        self.replica_route(
            RouteReason::Eventual,
            Bookmark::new(self.replica_position()),
        )
    }

    fn eventual_within(&self, max_staleness: Duration) -> Routed<'_, &'static str> {
        let behind = Duration::from_millis(self.replica_behind_ms.load(Ordering::SeqCst));
        if behind > max_staleness {
            Routed::primary(&self.primary, RouteReason::TooStale)
        } else {
            self.eventual()
        }
    }

    async fn session(
        &self,
        required: WritePosition,
        _max_wait: Duration,
    ) -> Routed<'_, &'static str> {
        self.route_session(required)
    }

    fn cluster_id(&self) -> Option<u64> {
        self.names_cluster.then_some(self.system_id)
    }

    /// With a tag: a session that has read nothing reads the replica; one
    /// tied to this replica stays while it holds what the read needs (else
    /// leaves through the primary, free to come back); one tied to another
    /// leaves through the primary; one tied to none reads the replica if it holds the
    /// bookmark (never waiting for it: the replica is as the test set it).
    /// Without a tag: the primary, as the trait's default.
    async fn monotonic(
        &self,
        bookmark: Option<Bookmark>,
        max_wait: Option<Duration>,
        _max_staleness: Option<Duration>,
    ) -> Routed<'_, &'static str> {
        let Some(tag) = self.tag else {
            return Routed::primary(&self.primary, RouteReason::LeftReplica);
        };
        match bookmark {
            None => self.eventual(),
            // Its own replica: it stays while the replica holds what the
            // read needs (the position for a session read or a floor), and
            // leaves through the primary otherwise, free to come back.
            Some(b) if b.replica == Some(tag) => {
                let holds = b.position.lsn.as_u64() <= self.replica_replayed.load(Ordering::SeqCst);
                match (max_wait, b.floor) {
                    (None, false) => {
                        Routed::replica(&self.replica, self.replica_node, RouteReason::Sticky)
                            .with_bookmark(b)
                    }
                    _ if holds => {
                        Routed::replica(&self.replica, self.replica_node, RouteReason::Sticky)
                            .with_bookmark(b)
                    }
                    (None, true) => {
                        Routed::primary(&self.primary, RouteReason::Lagging).with_bookmark(b)
                    }
                    (Some(_), _) => {
                        Routed::primary(&self.primary, RouteReason::PredictedLate).with_bookmark(b)
                    }
                }
            }
            Some(b) if b.replica.is_some() => {
                Routed::primary(&self.primary, RouteReason::LeftReplica)
            }
            Some(b) => match max_wait {
                Some(_) => self.route_session(b.position),
                None => Routed::primary(&self.primary, RouteReason::Lagging),
            },
        }
    }

    async fn write_position(&self) -> Result<WritePosition, CaptureFailed> {
        self.captures.fetch_add(1, Ordering::SeqCst);
        if self.capture_yields {
            YieldOnce(false).await;
        }
        if self.capture_fails.load(Ordering::SeqCst) {
            return Err(CaptureFailed);
        }
        let lsn = if self.counts_up {
            self.primary_at.fetch_add(1, Ordering::SeqCst)
        } else {
            self.primary_at.load(Ordering::SeqCst)
        };
        Ok(self.at(lsn))
    }

    async fn diagnose(&self, settings: &LayerSettings) -> Vec<Finding> {
        *self.diagnosed_with.lock().unwrap() = Some(*settings);
        self.findings.lock().unwrap().clone()
    }
}

/// `Pending` once (waking its task at once), then ready: a stand-in for a
/// round trip that needs no runtime, so the benches' and the hostile test's
/// hand-driven futures may meet it too.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

//! The sqlx backend: a PostgreSQL primary and its streaming replicas.
//!
//! [`PgReplicaSet`] implements [`Backend`]:
//! - **Write position.** After a writing request's handler returns, one
//!   `pg_current_wal_insert_lsn()` query on the primary, shared by concurrent
//!   writers when that is safe, rounded down off a WAL page header.
//! - **Replica positions.** A [`ReplicaTracker`] task per replica server
//!   polls `pg_last_wal_replay_lsn()` every `poll_interval` on its own
//!   connection and keeps it in an atomic. A session read that finds no
//!   replica caught up asks for an immediate poll and sleeps on a
//!   notification, up to `max_wait`.
//! - **Servers, not URLs.** A replica URL may reach several servers (a
//!   reader endpoint); each is followed, pooled and routed to on its own
//!   (see [reader endpoints](#reader-endpoints)).
//! - **Routing** ([`route`](self#routing-within-a-latency-budget)). A
//!   session read goes to a replica that has replayed the token's position
//!   (round-robin or least-lag among them). When none has, it waits only if
//!   a replica is predicted to get there within the latency budget, else
//!   reads from the primary at once. Eventual reads go to any healthy
//!   replica (within `max_staleness`, if set), the primary when none is.
//!   Routing a read that finds a replica ready is a few atomic loads: no
//!   database round trip is added to a read.
//! - **Health.** A replica that errors or times out is excluded and re-probed
//!   with exponential backoff; it is readmitted once it answers in recovery
//!   with a replay position. A node that answers `NULL` (promoted, or not a
//!   standby) is excluded and logged. The primary is never excluded.
//!
//! # Tokens from another timeline or cluster
//!
//! LSNs keep rising across a promotion, so comparing a token's LSN with a
//! replica on another timeline proves nothing. The rule:
//! - **Another cluster** (the token's system identifier is not this
//!   primary's, e.g. the database was rebuilt, or two environments share
//!   keys): the token is ignored and the read is eventual
//!   (`reason="foreign_cluster"`).
//! - **Another timeline** of this cluster (a failover happened between the
//!   write and the read, or this instance has not seen it yet): the read goes
//!   to the primary (`reason="timeline_changed"`), the only node sure to hold
//!   whatever of the write survived. This lasts at most one token TTL, and
//!   the user's next write replaces the token with one on the new timeline.
//! - **Same timeline**: a replica qualifies only if this process has seen
//!   its WAL receiver on that timeline and its replay position is at or past
//!   the token's. An unknown timeline never qualifies: after a failover an
//!   orphaned replica (still in recovery on the abandoned timeline, with WAL
//!   the new primary never had) can sit past a new-timeline position without
//!   holding the write, and after an app restart it shows no WAL receiver at
//!   all. When no healthy replica has been seen on the token's timeline, the
//!   read goes to the primary at once (`reason="no_replica_on_timeline"`)
//!   instead of waiting for a replica that cannot qualify.
//! - **Proof of history.** A replica qualifies only if something proves its
//!   WAL is the current primary's: its WAL receiver seen on the token's
//!   timeline (PostgreSQL shows it only to superusers and members of
//!   `pg_read_all_stats`, e.g. via `pg_monitor`), or, for any role, a
//!   [heartbeat] of the current primary at or past the token's
//!   position visible on the replica. With neither (no privilege and no
//!   heartbeat table) every read with a token goes to the primary (safe, but
//!   costly), and a warning says so.
//!
//! # Least privilege
//!
//! A role that owns its database and nothing else serves reads with a token
//! from replicas once the heartbeat table exists: run [`HEARTBEAT_DDL`] on
//! the primary (as that role, or grant it `SELECT, INSERT, UPDATE`), and
//! `connect()` finds and uses it when its role cannot see replica
//! timelines. Each write-position capture then writes the instance's
//! heartbeat row in the same round trip; the rule and why it is sound are
//! in [`heartbeat`]. To keep the monitoring privilege off the application's
//! role instead, give the tracker a role of its own with
//! [`tracker_connect_options`](PgReplicaSetBuilder::tracker_connect_options).
//!
//! # Reader endpoints
//!
//! Aurora's `cluster-ro`, Cloud SQL and AlloyDB read pools, the RDS Multi-AZ
//! reader endpoint, DNS round robin, HAProxy and poolers with several hosts
//! give one address for several servers: each new connection may land on
//! another one. Give such an address as a replica URL: the tracker
//! fingerprints every connection it opens (system identifier,
//! `inet_server_addr()`, `inet_server_port()`, `pg_postmaster_start_time()`,
//! readable by any role), follows each server it finds behind the URL on
//! its own (`name`, `name#2`, ...), and builds a pool per server whose
//! connections are kept only if they reached that server in the incarnation
//! the tracker follows (sqlx then opens another: behind an endpoint a pool
//! takes a few tries to reach its server, and sqlx logs each refusal at
//! error level, target `sqlx::pool`). A read therefore runs on the server it
//! was routed to, and a server the tracker never polled serves none. Servers
//! are looked for at start, whenever a pool meets one nobody follows, and
//! every [`discovery_interval`](PgReplicaSetBuilder::discovery_interval).
//!
//! A pool you bring with [`replica_pool`](PgReplicaSetBuilder::replica_pool)
//! cannot be filtered: if more than one server answers behind it, or a
//! connection's server changes between two polls (a pooler in transaction
//! mode over several hosts), the replica serves only unbounded eventual
//! reads, and says so at once and in `check()`.
//!
//! A node with another system identifier than the primary's is refused,
//! behind any URL.
//!
//! # The canary
//!
//! One in a hundred session reads routed to a replica (see
//! [`canary_rate`](PgReplicaSetBuilder::canary_rate)) is confirmed
//! afterwards on the server that served it: `read_after_write_canary_violations_total`
//! counts reads that went to a server lacking their user's write, which no
//! correct configuration produces. See [`canary`](self#the-canary) for how.
//!
//! # Replicas that left the primary's history
//!
//! A replica seen on a timeline other than the primary's, or whose replay
//! has not moved for `stall_timeout` (5 s by default) while the primary
//! wrote, serves no reads at all, eventual ones included: an orphan never
//! converges, so sending feeds there is not eventual consistency. It is
//! flagged by `read_after_write_replica_diverged{replica} = 1` and readmitted
//! once it follows the primary again. The stall rule is what catches an
//! orphan whose timeline cannot be seen (no privilege, or no WAL receiver
//! since this process started).
//!
//! # Routing within a latency budget
//!
//! A fixed wait is either too short (post-write reads go to the primary
//! whenever lag exceeds it) or too long (a read waits in full, then goes to
//! the primary anyway). From the positions it polls the tracker learns each
//! replica's replay delay (how long after the primary wrote WAL the replica
//! replays it) and replay rate, and so predicts when a replica will hold a
//! position; the rule and why it is robust are in `predict.rs`'s docs, in
//! short: when the primary first had the position, plus the replica's
//! delay, pushed later when the replica is running behind its own schedule,
//! never while its replay is paused.
//!
//! With the default [`WaitPolicy::Predicted`] a session read that finds no
//! replica caught up:
//! - waits only if some replica is predicted to replay the position within
//!   the budget: the read's `max_wait` (the layer's, or `read_within`'s),
//!   capped by [`latency_budget`](PgReplicaSetBuilder::latency_budget) if
//!   set; else it reads from the primary at once,
//!   `reason="predicted_late"`, with no time wasted waiting;
//! - re-checks on every change the tracker sees, and stops waiting the
//!   moment the prediction slips past the budget (the replica paused, or
//!   fell behind);
//! - asks for fast polls (every `wait_poll_interval`) only of the replicas
//!   predicted within the budget, and only from shortly before their
//!   predicted time, so the wait ends within about one fast poll of the
//!   replay.
//!
//! [`WaitPolicy::Fixed`] ([`fixed_wait`](PgReplicaSetBuilder::fixed_wait))
//! keeps the behaviour before predictions: wait up to `max_wait`, then the
//! primary. A [`PrimaryBudget`] caps the primary's share of session reads:
//! over the cap, reads wait up to its `hard_max_wait` for a replica. A read
//! never goes to a replica that lacks its write, whatever the policy.
//!
//! Eventual reads skip replicas more than
//! [`max_staleness`](PgReplicaSetBuilder::max_staleness) behind (the time
//! since the primary first had WAL the replica lacks, to within a poll) and
//! go to the primary when every healthy replica is that far behind,
//! `reason="too_stale"`.
//!
//! # Time bounds
//!
//! Every database call the library makes is bounded, and sent with the
//! simple query protocol, so it passes through a pooler in transaction
//! mode: the tracker's probes
//! (own connections, never the application's pools) by `probe_timeout`, the
//! write-position capture by `capture_timeout`, setup by `acquire_timeout`
//! plus `probe_timeout`, checkouts from pools built from URLs by
//! `acquire_timeout`. When a node stops answering (frozen or partitioned: no
//! RST), the tracker notices within `probe_timeout`, drops its own
//! connection (so a repointed address is picked up), and the node's pool
//! discards connections opened before the outage on checkout and on
//! release. A primary pool built from a URL is also replaced by a fresh one
//! when the primary goes silent: sqlx pings connections it takes back
//! without a bound, so every connection in flight at the freeze would
//! otherwise hold its slot until the old server dies, and writes would keep
//! failing after the address is repointed. Queries your handlers run are
//! yours to bound: a query sent to a frozen server never returns on its own
//! (sqlx has no client-side query timeout), so put a request timeout around
//! handlers (e.g. tower's `TimeoutLayer`). A frozen *replica* is left by new
//! reads within `probe_timeout` (half a second by default); reads already
//! running on it end with the request timeout.
//!
//! # Rotating credentials
//!
//! IAM tokens and Vault leases expire: the tracker and the pools built here
//! open every connection with the node's current options, so
//! [`update_connect_options`](PgReplicaSet::update_connect_options) (or
//! `PgPool::set_connect_options` on a pool you brought) reaches new
//! connections of the pools and of the tracker alike.
//!
//! # Example
//!
//! ```no_run
//! use read_after_write::pg::PgReplicaSet;
//! use read_after_write::{KeySet, ReadAfterWriteLayer};
//! use std::time::Duration;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let replicas = PgReplicaSet::builder()
//!     .primary_url("postgres://app@db-primary/app")
//!     .replica_url("replica-1", "postgres://app@db-replica-1/app")
//!     .replica_url("replica-2", "postgres://app@db-replica-2/app")
//!     .poll_interval(Duration::from_millis(20))
//!     .connect()
//!     .await?;
//! let layer = ReadAfterWriteLayer::new(replicas, KeySet::from_env("AFFINITY_KEY")?);
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```

mod builder;
mod canary;
mod capture;
mod discovery;
mod endpoint;
mod error;
mod fingerprint;
pub mod heartbeat;
mod monotonic;
mod outages;
mod placement;
mod poll;
mod pools;
mod predict;
mod primary;
mod primary_poll;
mod probe;
mod route;
mod server;
mod status;
#[cfg(test)]
mod tests_tracker;
mod tracker;

/// The sqlx this backend is built on (0.9): use it, or depend on the same
/// major yourself, so your queries and the pools handed out here share one
/// `Executor` trait. With another major, nothing compiles ("the trait
/// `Executor<'_>` is not implemented for `&Pool<Postgres>` ... multiple
/// different versions of crate `sqlx_core`").
///
/// ```
/// use read_after_write::pg::sqlx::PgPool;
/// # let _ = std::marker::PhantomData::<PgPool>;
/// ```
pub use sqlx;

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;

pub use self::builder::PgReplicaSetBuilder;
use self::canary::Canary;
use self::capture::Capture;
pub use self::capture::CaptureError;
pub use self::error::PgSetupError;
use self::probe::ProbeKind;
use self::route::PrimaryShare;
pub use self::route::{PrimaryBudget, WaitPolicy};
use self::server::{ReplicaState, SEES_TIMELINES_NO, SEES_TIMELINES_YES};
pub use self::status::ReplicaStatus;
use self::status::SetFacts;
pub use self::tracker::{ReplicaTracker, TRACKER_APPLICATION_NAME};
use crate::backend::{Backend, Finding, LayerSettings, Routed};
use crate::bookmark::Bookmark;
use crate::handle::Db;
use crate::position::{Lsn, WritePosition};

/// The [`Db`] handle for a [`PgReplicaSet`], as handlers take it.
pub type PgDb = Db<PgReplicaSet>;

/// The heartbeat table a least-privilege role needs, to run once on the
/// primary (as the application's role, or with `SELECT, INSERT, UPDATE`
/// granted to it). See [`heartbeat`] for what it proves.
///
/// ```
/// assert!(read_after_write::pg::HEARTBEAT_DDL.contains("read_after_write_heartbeat"));
/// ```
pub const HEARTBEAT_DDL: &str = "create table if not exists read_after_write_heartbeat (
    slot int2 primary key,
    epoch int8 not null,
    position pg_lsn not null,
    written_at timestamptz not null
)";

/// How a read picks among replicas that qualify.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Selection {
    /// Take turns, spreading load evenly.
    #[default]
    RoundRobin,
    /// The replica with the highest replay position.
    LeastLag,
    /// A random one, so that reads from many instances do not move in step.
    Random,
}

/// A PostgreSQL primary and its streaming replicas, with the tracker that
/// knows how far each replica has replayed.
///
/// Cheap to clone; clones share the pools and the tracker. The tracker stops
/// when [`shutdown`](Self::shutdown) is called or the last clone is dropped.
/// See the [module docs](self) for the routing rules and an example.
#[derive(Clone)]
pub struct PgReplicaSet {
    inner: Arc<Inner>,
}

struct Inner {
    tracker: Arc<ReplicaTracker>,
    capture: Arc<Capture>,
    selection: Selection,
    /// How often a waiting read asks for another poll.
    wait_poll_interval: Duration,
    /// How often replicas are polled when no read waits: how stale a
    /// position (and a prediction made from it) can be.
    poll_interval: Duration,
    /// Round-robin cursor.
    next: AtomicUsize,
    wait_policy: WaitPolicy,
    /// The primary's share of session reads, when capped.
    primary_share: Option<PrimaryShare>,
    /// Eventual reads skip replicas further behind.
    max_staleness: Option<Duration>,
    canary: Canary,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.tracker.stop();
    }
}

/// An environment variable's value: `None` when unset or empty.
fn env_var(name: &'static str) -> Result<Option<String>, PgSetupError> {
    match std::env::var(name) {
        Ok(value) if value.trim().is_empty() => Ok(None),
        Ok(value) => Ok(Some(value)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(PgSetupError::MissingEnv { name }),
    }
}

impl PgReplicaSet {
    /// Starts a builder with the defaults: poll every 20 ms, probe timeout
    /// 500 ms, backoff up to 2 s, capture timeout 1 s, stall timeout 5 s,
    /// round-robin, 10 connections per server, checkout timeout 1 s, session
    /// reads routed by prediction within their `max_wait`, no primary budget,
    /// no staleness bound on eventual reads, the heartbeat table used when it
    /// exists and the role cannot see timelines, a canary on one session read
    /// in a hundred.
    pub fn builder() -> PgReplicaSetBuilder {
        PgReplicaSetBuilder::new()
    }

    /// Connects to the cluster named by `DATABASE_URL` (the primary) and
    /// `REPLICA_URLS` (comma-separated), with the default settings; see
    /// [`PgReplicaSetBuilder::from_env`] to tune them.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), read_after_write::pg::PgSetupError> {
    /// let replicas = read_after_write::pg::PgReplicaSet::from_env().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn from_env() -> Result<PgReplicaSet, PgSetupError> {
        PgReplicaSetBuilder::from_env()?.connect().await
    }

    /// The primary's pool.
    ///
    /// Pools built from a URL are replaced when the primary freezes (see
    /// the [module docs](self#time-bounds)): take it per use, don't keep it.
    pub fn primary_pool(&self) -> &PgPool {
        self.inner.tracker.primary.pools.current()
    }

    /// A replica server's pool by name (`replica-1`, or `readers#2` for the
    /// second server found behind the URL `readers`), bypassing every
    /// check: for tools and tests that must read one node on purpose.
    pub fn replica_pool(&self, name: &str) -> Option<&PgPool> {
        self.replica_states()
            .find(|r| r.name == name)
            .map(|r| &r.pool)
    }

    /// What the tracker knows about each replica server, in the order they
    /// were found (the first server behind each URL in configuration order,
    /// then any more found later).
    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        let tracker = &self.inner.tracker;
        self.replica_states()
            .map(|r| {
                let replayed = r.replayed.load(Ordering::Acquire);
                let primary = &tracker.primary;
                let endpoint = &tracker.endpoints[r.endpoint];
                ReplicaStatus {
                    name: r.name.clone(),
                    healthy: r.healthy.load(Ordering::Acquire),
                    replayed: Lsn::new(replayed),
                    timeline: r.timeline.load(Ordering::Relaxed),
                    diverged: r.diverged.load(Ordering::Relaxed),
                    lag_bytes: primary
                        .inserted
                        .load(Ordering::Relaxed)
                        .saturating_sub(replayed),
                    lag: primary.time_behind(replayed),
                    sees_timelines: match r.sees_timelines.load(Ordering::Relaxed) {
                        SEES_TIMELINES_YES => Some(true),
                        SEES_TIMELINES_NO => Some(false),
                        _ => None,
                    },
                    paused: r.paused.load(Ordering::Relaxed),
                    replay_delay: r.delay(),
                    replay_rate: r.rate() as u64,
                    url: endpoint.name.clone(),
                    server: r.identity().map(|f| f.address()),
                    heartbeat_proven: r.proven_timeline.load(Ordering::Relaxed) != 0,
                    indistinct: endpoint.is_indistinct(),
                }
            })
            .collect()
    }

    /// The cluster's system identifier.
    pub fn system_id(&self) -> u64 {
        self.inner.tracker.primary.system_id
    }

    /// Whether the tracker's last probe of the primary answered within
    /// `probe_timeout`: false while it is down, frozen or partitioned.
    pub fn primary_healthy(&self) -> bool {
        self.inner.tracker.primary.healthy.load(Ordering::Relaxed)
    }

    /// The primary's timeline as last seen by a capture or a poll.
    pub fn timeline(&self) -> u32 {
        self.inner.tracker.primary.timeline.load(Ordering::Relaxed)
    }

    /// The heartbeat table replicas are proven by, if one is in use (see
    /// [`heartbeat`]).
    pub fn heartbeat_table(&self) -> Option<&str> {
        self.inner
            .tracker
            .heartbeat
            .as_ref()
            .filter(|h| h.is_enabled())
            .map(|h| h.table.as_str())
    }

    /// Capture queries sent so far (one per batch of concurrent writers).
    pub fn capture_queries(&self) -> u64 {
        self.inner.capture.queries()
    }

    /// Replica polls made by the tracker so far.
    pub fn tracker_polls(&self) -> u64 {
        self.inner.tracker.polls()
    }

    /// Session reads the [canary](self#the-canary) has checked, and how many
    /// of them went to a replica that lacked their position.
    pub fn canary_counts(&self) -> (u64, u64) {
        let counts = &self.inner.canary.counts;
        (
            counts.checks.load(Ordering::Relaxed),
            counts.violations.load(Ordering::Relaxed),
        )
    }

    /// Applies `update` to the connect options of every node (by name:
    /// `primary`, or a replica URL's name) for every connection opened from
    /// now on, by the pools and by the tracker alike: for credentials that
    /// rotate (RDS and Cloud SQL IAM tokens, Vault leases). Open
    /// connections keep theirs.
    ///
    /// ```no_run
    /// # async fn rotate(set: read_after_write::pg::PgReplicaSet, token: String) {
    /// set.update_connect_options(|_node, options| options.password(&token));
    /// # }
    /// ```
    pub fn update_connect_options(
        &self,
        update: impl Fn(&str, PgConnectOptions) -> PgConnectOptions,
    ) {
        let tracker = &self.inner.tracker;
        let primary = self.primary_pool();
        primary.set_connect_options(update(
            "primary",
            primary.connect_options().as_ref().clone(),
        ));
        for endpoint in &tracker.endpoints {
            let options = update(&endpoint.name, endpoint.options().as_ref().clone());
            endpoint.set_options(options.clone());
            if endpoint.builds_pools() {
                for server in tracker
                    .servers
                    .iter()
                    .filter(|s| tracker.endpoints[s.endpoint].name == endpoint.name)
                {
                    server.pool.set_connect_options(options.clone());
                }
            }
        }
    }

    /// Stops the tracker and waits for its tasks to close their connections.
    /// Reads keep routing on the last known positions afterwards.
    pub async fn shutdown(&self) {
        self.inner.tracker.shutdown().await;
    }

    fn replica_states(&self) -> impl Iterator<Item = &ReplicaState> {
        self.inner.tracker.servers.iter()
    }

    fn facts(&self) -> SetFacts {
        SetFacts {
            primary_healthy: self.primary_healthy(),
            heartbeat: self.heartbeat_table().is_some(),
            aurora: self.inner.tracker.probe_kind == ProbeKind::Aurora,
            canary_violations: self.canary_counts().1,
        }
    }
}

impl fmt::Debug for PgReplicaSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgReplicaSet")
            .field("system_id", &self.system_id())
            .field("timeline", &self.timeline())
            .field("replicas", &self.replicas())
            .field("selection", &self.inner.selection)
            .finish()
    }
}

impl Backend for PgReplicaSet {
    type Pool = PgPool;
    type Error = CaptureError;

    fn primary(&self) -> &PgPool {
        self.primary_pool()
    }

    fn cluster_id(&self) -> Option<u64> {
        Some(self.system_id())
    }

    async fn monotonic(
        &self,
        bookmark: Option<Bookmark>,
        max_wait: Option<Duration>,
    ) -> Routed<'_, PgPool> {
        self.route_monotonic(bookmark, max_wait).await
    }

    /// Any healthy replica following the primary, within `max_staleness`
    /// if one was set; else the primary.
    fn eventual(&self) -> Routed<'_, PgPool> {
        self.route_eventual(self.inner.max_staleness)
    }

    /// Like [`eventual`](Backend::eventual), with `max_staleness` for this
    /// read in place of the configured bound.
    fn eventual_within(&self, max_staleness: Duration) -> Routed<'_, PgPool> {
        self.route_eventual(Some(max_staleness))
    }

    /// A replica that has replayed `required`; else, by the
    /// [`WaitPolicy`], a wait for one predicted within the budget (or up to
    /// `max_wait`); else the primary. See the
    /// [module docs](self#routing-within-a-latency-budget).
    async fn session(&self, required: WritePosition, max_wait: Duration) -> Routed<'_, PgPool> {
        self.route_session(required, max_wait).await
    }

    async fn write_position(&self) -> Result<WritePosition, CaptureError> {
        self.inner.tracker.note_needed();
        let position = self.inner.capture.capture().await?;
        self.inner.tracker.note_primary_position(position);
        Ok(WritePosition::new(
            position.lsn,
            position.timeline,
            self.system_id(),
        ))
    }

    /// Findings from the tracker's current view (a snapshot: lag moves with
    /// load): the primary's and each replica's health, how replicas prove
    /// what they hold, reader endpoints, the canary, and replica lag against
    /// the layer's `max_wait` and token TTL.
    async fn diagnose(&self, settings: &LayerSettings) -> Vec<Finding> {
        status::diagnose(self.facts(), &self.replicas(), settings)
    }
}

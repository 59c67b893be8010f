//! The sqlx backend: a PostgreSQL primary and its streaming replicas.
//!
//! [`PgReplicaSet`] implements [`Backend`]:
//! - **Write position.** After a writing request's handler returns, one
//!   `pg_current_wal_insert_lsn()` query on the primary, shared by concurrent
//!   writers when that is safe, rounded down off a WAL page header.
//! - **Replica positions.** A [`ReplicaTracker`] task per replica server
//!   polls `pg_last_wal_replay_lsn()` every `poll_interval` on its own
//!   connection and keeps it in an atomic. A session read that finds no
//!   replica caught up waits on the tracker's notifications, never a sleep
//!   loop, only as the routing rule allows.
//! - **Servers, not URLs.** A replica URL may reach several servers (a
//!   reader endpoint); each is followed, pooled and routed to on its own
//!   (see [reader endpoints](#reader-endpoints)).
//! - **Routing** ([how routing decides](crate::guide::routing)). Routing a
//!   read that finds a replica ready is a few atomic loads: no database
//!   round trip is added to a read.
//! - **Health.** A replica that errors, times out or is no standby is
//!   excluded, re-probed with backoff, and readmitted once it answers in
//!   recovery; the primary is never excluded. What reads and writes do in
//!   each failure: [the failure table](crate::guide::failures).
//!
//! # Routing
//!
//! A session read goes to a replica server proven to hold the user's write
//! (its WAL receiver seen on the token's timeline, or a heartbeat of the
//! current primary at or past the token's position), else, by the
//! [`WaitPolicy`], waits for one predicted to within `max_wait`, else reads
//! from the primary. Eventual reads go to any healthy replica following the
//! primary, within a staleness bound if one is set. The whole rule, once:
//! [how routing decides](crate::guide::routing).
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
//! A share of the session reads routed to a replica
//! ([`canary_rate`](PgReplicaSetBuilder::canary_rate), default
//! [`CANARY_RATE`](defaults::CANARY_RATE)) is confirmed
//! afterwards on the server that served it: `read_after_write_canary_violations_total`
//! counts reads that went to a server lacking their user's write, which no
//! correct configuration produces. See [`canary`](self#the-canary) for how.
//!
//! # Time bounds
//!
//! Every database call the library makes is bounded, and sent with the
//! simple query protocol, so it passes through a pooler in transaction
//! mode: the tracker's probes
//! (own connections, never the application's pools) by `probe_timeout`, the
//! write-position capture by `capture_timeout`, setup by `acquire_timeout`
//! plus `probe_timeout`, checkouts from pools built from URLs by
//! `acquire_timeout`. A primary pool built from a URL is replaced by a
//! fresh one when the primary goes silent: sqlx pings connections it takes
//! back without a bound, so every connection in flight at a freeze would
//! otherwise hold its slot until the old server dies. Queries your handlers
//! run are yours to bound: a query sent to a frozen server never returns on
//! its own (sqlx has no client-side query timeout), so put a request
//! timeout around handlers (e.g. tower-http's `TimeoutLayer`). What a
//! frozen, partitioned or dead node means for reads and writes:
//! [the failure table](crate::guide::failures).
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
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let replicas = PgReplicaSet::builder()
//!     .primary_url("postgres://app@db-primary/app")
//!     .replica_url("replica-1", "postgres://app@db-replica-1/app")
//!     .replica_url("replica-2", "postgres://app@db-replica-2/app")
//!     .connect()
//!     .await?;
//! let layer = ReadAfterWriteLayer::new(replicas, KeySet::from_env("AFFINITY_KEY")?);
//! # let _ = layer;
//! # Ok(())
//! # }
//! ```

mod budget;
mod builder;
mod canary;
mod capture;
mod connect;
pub mod defaults;
mod discovery;
pub mod driver;
mod endpoint;
mod error;
mod fingerprint;
pub mod heartbeat;
mod monotonic;
mod node_urls;
mod outages;
mod placement;
mod poll;
mod pools;
mod predict;
mod primary;
mod primary_poll;
mod probe;
mod probe_conn;
mod probe_sqlx;
#[cfg(any(feature = "tokio-postgres", feature = "diesel-async"))]
mod probe_tokio_postgres;
mod route;
mod server;
mod status;
#[cfg(test)]
mod tests_route;
#[cfg(test)]
mod tests_tracker;
mod tracker;
mod wait;

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

pub use self::budget::PrimaryBudget;
use self::budget::PrimaryShare;
pub use self::builder::PgReplicaSetBuilder;
use self::canary::Canary;
use self::capture::Capture;
pub use self::capture::CaptureError;
pub use self::error::PgSetupError;
use self::probe::ProbeKind;
pub use self::probe_conn::TRACKER_APPLICATION_NAME;
pub use self::route::WaitPolicy;
use self::server::ReplicaState;
pub use self::status::ReplicaStatus;
use self::status::SetFacts;
pub use self::tracker::ReplicaTracker;
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
    /// Starts a builder with the defaults: the constants in [`defaults`],
    /// round-robin selection, session reads routed by prediction
    /// ([`WaitPolicy::Predicted`]), no primary budget, and the heartbeat
    /// table used when it exists and the role cannot see timelines. Every
    /// setting with its default: the
    /// [configuration reference](crate::guide::configuration).
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
        let primary = &tracker.primary;
        self.replica_states()
            .map(|r| {
                let replayed = r.replayed();
                let endpoint = &tracker.endpoints[r.endpoint];
                ReplicaStatus {
                    name: r.name.clone(),
                    healthy: r.is_healthy(),
                    replayed: Lsn::new(replayed),
                    timeline: r.receiver_timeline(),
                    diverged: r.is_diverged(),
                    lag_bytes: primary.inserted().saturating_sub(replayed),
                    lag: primary.time_behind(replayed),
                    sees_timelines: r.sees_timelines(),
                    paused: r.is_paused(),
                    replay_delay: r.delay(),
                    replay_rate: r.rate() as u64,
                    url: endpoint.name.clone(),
                    server: r.identity().map(|f| f.address()),
                    heartbeat_proven: r.heartbeat_proven(),
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
        self.inner.tracker.primary.is_healthy()
    }

    /// The primary's timeline as last seen by a capture or a poll.
    pub fn timeline(&self) -> u32 {
        self.inner.tracker.primary.timeline()
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
        max_staleness: Option<Duration>,
    ) -> Routed<'_, PgPool> {
        self.route_monotonic(bookmark, max_wait, max_staleness)
            .await
    }

    /// Any healthy replica following the primary; else the primary.
    fn eventual(&self) -> Routed<'_, PgPool> {
        self.route_eventual(None)
    }

    /// Like [`eventual`](Backend::eventual), from a replica at most
    /// `max_staleness` behind; the primary when none is
    /// (`reason="too_stale"`).
    fn eventual_within(&self, max_staleness: Duration) -> Routed<'_, PgPool> {
        self.route_eventual(Some(max_staleness))
    }

    /// A replica proven to hold `required`; else, by the [`WaitPolicy`], a
    /// wait for one within `max_wait`; else the primary. See
    /// [how routing decides](crate::guide::routing).
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

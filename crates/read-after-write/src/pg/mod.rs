//! The sqlx backend: a PostgreSQL primary and its streaming replicas.
//!
//! [`PgReplicaSet`] implements [`Backend`]:
//! - **Write position.** After a writing request's handler returns, one
//!   `pg_current_wal_insert_lsn()` query on the primary, shared by concurrent
//!   writers when that is safe, rounded down off a WAL page header.
//! - **Replica positions.** A [`ReplicaTracker`] task per replica polls
//!   `pg_last_wal_replay_lsn()` every `poll_interval` on its own connection
//!   and keeps it in an atomic. A session read that finds no replica caught up
//!   asks for an immediate poll and sleeps on a notification, up to
//!   `max_wait`.
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
//! - PostgreSQL shows a replica's timeline (`pg_stat_wal_receiver`) only to
//!   superusers and members of `pg_read_all_stats` (e.g. via `pg_monitor`).
//!   Without that privilege no replica can be proven to hold a write, so
//!   every read with a token goes to the primary (safe, but costly); a
//!   warning says so once per replica when the tracker connects.
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
//! Every database call the library makes is bounded: the tracker's probes
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
//! failing after the address is repointed. Queries your handlers run are yours to bound: a query sent to a
//! frozen server never returns on its own (sqlx has no client-side query
//! timeout), so put a request timeout around handlers (e.g. tower's
//! `TimeoutLayer`).
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

mod capture;
mod monotonic;
mod pools;
mod predict;
mod route;
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
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use self::capture::Capture;
pub use self::capture::CaptureError;
use self::pools::PrimaryPools;
use self::route::PrimaryShare;
pub use self::route::{PrimaryBudget, WaitPolicy};
use self::tracker::{
    Outages, PrimaryState, ReplicaState, TrackerConfig, SEES_TIMELINES_NO, SEES_TIMELINES_YES,
};
pub use self::tracker::{ReplicaTracker, TRACKER_APPLICATION_NAME};
use crate::backend::{Backend, Finding, LayerSettings, Routed};
use crate::bookmark::Bookmark;
use crate::handle::Db;
use crate::position::{Lsn, WalGeometry, WritePosition};

/// The [`Db`] handle for a [`PgReplicaSet`], as handlers take it.
pub type PgDb = Db<PgReplicaSet>;

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

/// Why a [`PgReplicaSet`] could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgSetupError {
    /// No primary was configured.
    #[error("no primary configured: call primary_url or primary_pool")]
    NoPrimary,
    /// A URL could not be parsed.
    #[error("invalid PostgreSQL URL for {node}: {source}")]
    InvalidUrl {
        /// The node the URL was for.
        node: String,
        /// The parser's complaint.
        #[source]
        source: sqlx::Error,
    },
    /// The primary could not be reached or queried.
    #[error("could not query the primary at {node}: {source}")]
    Primary {
        /// `host:port` of the primary.
        node: String,
        /// What went wrong.
        #[source]
        source: sqlx::Error,
    },
    /// The primary did not answer the setup queries in time.
    #[error(
        "the primary at {node} did not answer within {timeout:?} (down, frozen or unreachable)"
    )]
    PrimaryTimedOut {
        /// `host:port` of the primary.
        node: String,
        /// The bound that passed.
        timeout: Duration,
    },
    /// The primary URL points at a server in recovery.
    #[error("the primary URL points to a standby (pg_is_in_recovery() is true); give the read-write server")]
    PrimaryIsStandby,
    /// The primary reported something unreadable.
    #[error("could not read the primary's WAL position: {0}")]
    Capture(#[from] CaptureError),
    /// A required environment variable is unset or not valid Unicode.
    #[error("environment variable {name} is not set (or not valid Unicode); set it to a PostgreSQL URL such as postgres://app@db-primary:5432/app")]
    MissingEnv {
        /// The variable's name.
        name: &'static str,
    },
    /// Two replicas share a name.
    #[error("two replicas are named {0:?}; names must be unique")]
    DuplicateName(String),
}

enum Source {
    Url(String),
    Pool(PgPool),
}

/// Builder for [`PgReplicaSet`]; start with [`PgReplicaSet::builder`].
pub struct PgReplicaSetBuilder {
    primary: Option<Source>,
    replicas: Vec<(String, Source)>,
    poll_interval: Duration,
    wait_poll_interval: Duration,
    idle_poll_interval: Duration,
    probe_timeout: Duration,
    max_backoff: Duration,
    capture_timeout: Duration,
    stall_timeout: Duration,
    selection: Selection,
    max_connections: u32,
    acquire_timeout: Duration,
    wait_policy: WaitPolicy,
    primary_budget: Option<PrimaryBudget>,
    max_staleness: Option<Duration>,
}

impl fmt::Debug for PgReplicaSetBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgReplicaSetBuilder")
            .field(
                "replicas",
                &self
                    .replicas
                    .iter()
                    .map(|(name, _)| name)
                    .collect::<Vec<_>>(),
            )
            .field("poll_interval", &self.poll_interval)
            .field("selection", &self.selection)
            .field("wait_policy", &self.wait_policy)
            .field("primary_budget", &self.primary_budget)
            .field("max_staleness", &self.max_staleness)
            .finish_non_exhaustive()
    }
}

impl PgReplicaSetBuilder {
    /// The primary, by URL. The pool built for it fails fast when the
    /// primary is down (`acquire_timeout`).
    pub fn primary_url(mut self, url: impl Into<String>) -> Self {
        self.primary = Some(Source::Url(url.into()));
        self
    }

    /// The primary, as an existing pool.
    pub fn primary_pool(mut self, pool: PgPool) -> Self {
        self.primary = Some(Source::Pool(pool));
        self
    }

    /// A replica, by URL, under a name used in metrics and logs.
    ///
    /// The URL must name exactly one server: the tracker checks the server
    /// its own connection reached, and reads go wherever the pool's
    /// connections land. A round-robin reader endpoint, a pooler in front of
    /// several replicas, or a DNS name repointed at another server would
    /// let reads reach a replica the tracker never checked.
    pub fn replica_url(mut self, name: impl Into<String>, url: impl Into<String>) -> Self {
        self.replicas.push((name.into(), Source::Url(url.into())));
        self
    }

    /// Several replicas by URL, named `replica-1`, `replica-2`, ... in order
    /// (numbering continues after replicas added before).
    ///
    /// ```
    /// use read_after_write::pg::PgReplicaSet;
    ///
    /// let builder = PgReplicaSet::builder()
    ///     .primary_url("postgres://app@primary/app")
    ///     .replica_urls(["postgres://app@replica-a/app", "postgres://app@replica-b/app"]);
    /// assert!(format!("{builder:?}").contains("replica-2"));
    /// ```
    ///
    /// With the test kit: `.primary_url(cluster.primary_url())
    /// .replica_urls(cluster.replica_urls())` names them as the kit does.
    pub fn replica_urls<U: Into<String>>(mut self, urls: impl IntoIterator<Item = U>) -> Self {
        for url in urls {
            let name = format!("replica-{}", self.replicas.len() + 1);
            self = self.replica_url(name, url);
        }
        self
    }

    /// A builder from the environment: the primary from `DATABASE_URL`, the
    /// replicas from `REPLICA_URLS` (comma-separated, optional: without it
    /// every read goes to the primary, and a warning says so).
    ///
    /// ```no_run
    /// use read_after_write::pg::PgReplicaSetBuilder;
    /// use std::time::Duration;
    ///
    /// # async fn run() -> Result<(), read_after_write::pg::PgSetupError> {
    /// let replicas = PgReplicaSetBuilder::from_env()?
    ///     .poll_interval(Duration::from_millis(10))
    ///     .connect()
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_env() -> Result<Self, PgSetupError> {
        let primary = env_var("DATABASE_URL")?.ok_or(PgSetupError::MissingEnv {
            name: "DATABASE_URL",
        })?;
        let replicas: Vec<String> = env_var("REPLICA_URLS")?
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .collect();
        if replicas.is_empty() {
            tracing::warn!("REPLICA_URLS is not set: every read goes to the primary");
        }
        Ok(PgReplicaSet::builder()
            .primary_url(primary)
            .replica_urls(replicas))
    }

    /// A replica, as an existing pool. The tracker opens its own connection
    /// with the pool's connect options.
    ///
    /// Pools built here from URLs skip sqlx's per-checkout test query and
    /// instead drop connections opened before the node's last outage; a pool
    /// you bring keeps its own settings, including that test query.
    pub fn replica_pool(mut self, name: impl Into<String>, pool: PgPool) -> Self {
        self.replicas.push((name.into(), Source::Pool(pool)));
        self
    }

    /// How often each replica's replay position is polled while positions
    /// are in use (default 20 ms): how stale a position can be when no read
    /// is waiting. See [`idle_poll_interval`](Self::idle_poll_interval).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How often each replica is polled while reads are waiting for it to
    /// catch up (default 2 ms). Lower ends waits sooner after replay; higher
    /// costs the replicas fewer queries under load.
    pub fn wait_poll_interval(mut self, interval: Duration) -> Self {
        self.wait_poll_interval = interval;
        self
    }

    /// How often replicas and the primary are polled once no session read
    /// with a token and no write has happened for 5 s (default 500 ms). The
    /// first such read or write after a quiet spell polls every node at
    /// once. Set it equal to `poll_interval` to poll at one rate always.
    pub fn idle_poll_interval(mut self, interval: Duration) -> Self {
        self.idle_poll_interval = interval;
        self
    }

    /// How long a poll may take before the replica counts as down
    /// (default 500 ms).
    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    /// The longest pause between re-probes of a down replica (default 2 s).
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.max_backoff = backoff;
        self
    }

    /// How long the write-position query may take (default 1 s); past it the
    /// response carries a token that sends the user's session reads to the
    /// primary until their next write or the token's expiry.
    pub fn capture_timeout(mut self, timeout: Duration) -> Self {
        self.capture_timeout = timeout;
        self
    }

    /// How long a replica's replay may stand still while the primary writes
    /// before it counts as diverged and serves no reads (default 5 s); see
    /// the [module docs](self#replicas-that-left-the-primarys-history).
    pub fn stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout;
        self
    }

    /// How reads pick among qualifying replicas (default round-robin).
    pub fn selection(mut self, selection: Selection) -> Self {
        self.selection = selection;
        self
    }

    /// Route session reads by prediction (the default policy) with `budget`
    /// as a cap on every read's wait: a read that finds no replica caught up
    /// waits only if a replica is predicted to catch up within
    /// `min(budget, max_wait)`, and reads from the primary at once
    /// otherwise. Without it the budget is each read's `max_wait`; see the
    /// [module docs](self#routing-within-a-latency-budget).
    ///
    /// ```
    /// use read_after_write::pg::{PgReplicaSet, WaitPolicy};
    /// use std::time::Duration;
    ///
    /// let builder = PgReplicaSet::builder().latency_budget(Duration::from_millis(30));
    /// assert!(format!("{builder:?}").contains("30ms"));
    /// ```
    pub fn latency_budget(self, budget: Duration) -> Self {
        self.wait_policy(WaitPolicy::Predicted {
            latency_budget: Some(budget),
        })
    }

    /// Wait the full `max_wait` for a replica whatever the predictions say,
    /// then read from the primary: the behaviour before predictions
    /// ([`WaitPolicy::Fixed`]).
    ///
    /// ```
    /// use read_after_write::pg::PgReplicaSet;
    ///
    /// let builder = PgReplicaSet::builder().fixed_wait();
    /// assert!(format!("{builder:?}").contains("Fixed"));
    /// ```
    pub fn fixed_wait(self) -> Self {
        self.wait_policy(WaitPolicy::Fixed)
    }

    /// How a session read that finds no replica caught up decides whether
    /// to wait (default [`WaitPolicy::Predicted`], within each read's
    /// `max_wait`).
    pub fn wait_policy(mut self, policy: WaitPolicy) -> Self {
        self.wait_policy = policy;
        self
    }

    /// Cap the primary's share of session reads (default: no cap). While
    /// the share over the budget's window is above it, reads wait up to its
    /// `hard_max_wait` for a replica predicted to catch up in that time,
    /// instead of going to the primary. Never to a replica that lacks the
    /// write.
    ///
    /// ```
    /// use read_after_write::pg::{PgReplicaSet, PrimaryBudget};
    /// use std::time::Duration;
    ///
    /// let builder = PgReplicaSet::builder().primary_budget(PrimaryBudget::new(
    ///     0.15,
    ///     Duration::from_secs(10),
    ///     Duration::from_millis(200),
    /// ));
    /// assert!(format!("{builder:?}").contains("0.15"));
    /// ```
    pub fn primary_budget(mut self, budget: PrimaryBudget) -> Self {
        self.primary_budget = Some(budget);
        self
    }

    /// The most an eventual read may lag (default: no bound). A replica
    /// whose staleness (how long ago the primary first had WAL it lacks, to
    /// within a poll) exceeds it serves no eventual reads; when every
    /// healthy replica does, eventual reads go to the primary
    /// (`reason="too_stale"`).
    ///
    /// There is no default bound because it moves every eventual read to
    /// the primary exactly when replicas fall behind, which is often when
    /// the primary is busiest: choose it knowing the primary can take that
    /// load. A bound at or below the layer's token TTL keeps a user whose
    /// token has expired from reading a replica that lacks their write.
    /// Sessions that must not see older data than a bound can pass it per
    /// call with [`Backend::eventual_within`].
    ///
    /// ```
    /// use read_after_write::pg::PgReplicaSet;
    /// use std::time::Duration;
    ///
    /// let builder = PgReplicaSet::builder().max_staleness(Duration::from_secs(5));
    /// assert!(format!("{builder:?}").contains("5s"));
    /// ```
    pub fn max_staleness(mut self, bound: Duration) -> Self {
        self.max_staleness = Some(bound);
        self
    }

    /// Pool size for pools built from URLs (default 10 per node).
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// How long a checkout from a pool built from a URL waits (default 1 s):
    /// also how long a write takes to fail while the primary is down. Raise it
    /// for pools that are often exhausted under load.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    fn pool(
        &self,
        node: &str,
        source: Source,
        outages: &Arc<Outages>,
    ) -> Result<PgPool, PgSetupError> {
        match source {
            Source::Pool(pool) => Ok(pool),
            Source::Url(url) => {
                let options = PgConnectOptions::from_str(&url).map_err(|source| {
                    PgSetupError::InvalidUrl {
                        node: node.to_owned(),
                        source,
                    }
                })?;
                Ok(self.url_pool_factory(options, outages)())
            }
        }
    }

    /// Builds pools for a node given by URL; the primary's set keeps it to
    /// build a fresh pool when the primary freezes.
    fn url_pool_factory(
        &self,
        options: PgConnectOptions,
        outages: &Arc<Outages>,
    ) -> impl Fn() -> PgPool + Send + Sync + 'static {
        let outages = Arc::clone(outages);
        let max_connections = self.max_connections;
        let acquire_timeout = self.acquire_timeout;
        move || {
            let on_acquire = Arc::clone(&outages);
            let on_release = Arc::clone(&outages);
            PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(acquire_timeout)
                // No test query per checkout (a round trip on every read);
                // drop connections that predate an outage instead.
                .test_before_acquire(false)
                .before_acquire(move |_conn, meta| {
                    let keep = !on_acquire.predates_last_outage(meta.age);
                    Box::pin(async move { Ok(keep) })
                })
                // sqlx pings a released connection without a time bound: on
                // a frozen node that ping never returns and the slot is
                // lost. Close connections from before an outage instead.
                .after_release(move |_conn, meta| {
                    let keep = !on_release.predates_last_outage(meta.age);
                    Box::pin(async move { Ok(keep) })
                })
                .connect_lazy_with(options.clone())
        }
    }

    /// Connects to the primary, reads the cluster's identity, polls every
    /// replica once and starts the tracker.
    ///
    /// Fails if the primary cannot be queried. Replicas that are down are
    /// not an error: they are excluded until they answer.
    pub async fn connect(mut self) -> Result<PgReplicaSet, PgSetupError> {
        let primary_source = self.primary.take().ok_or(PgSetupError::NoPrimary)?;
        let primary_outages = Outages::new();
        let rebuild = match &primary_source {
            Source::Url(url) => PgConnectOptions::from_str(url).ok().map(|options| {
                Box::new(self.url_pool_factory(options, &primary_outages))
                    as Box<dyn Fn() -> PgPool + Send + Sync>
            }),
            Source::Pool(_) => None,
        };
        let primary = self.pool("primary", primary_source, &primary_outages)?;
        let primary_connect = (*primary.connect_options()).clone();
        let node = tracker::describe(&primary_connect);
        let bound = self.acquire_timeout + self.probe_timeout;
        let timed_out = || PgSetupError::PrimaryTimedOut {
            node: node.clone(),
            timeout: bound,
        };

        let setup = sqlx::query_as(
            "select pg_is_in_recovery(), (select system_identifier::text from pg_control_system()), \
                    current_setting('wal_block_size')::bigint, \
                    (select setting::bigint from pg_settings where name = 'wal_segment_size')",
        )
        .fetch_one(&primary);
        let (in_recovery, system_id, block_size, segment_size): (bool, String, i64, i64) =
            tokio::time::timeout(bound, setup)
                .await
                .map_err(|_| timed_out())?
                .map_err(|source| PgSetupError::Primary {
                    node: node.clone(),
                    source,
                })?;
        if in_recovery {
            return Err(PgSetupError::PrimaryIsStandby);
        }
        let system_id = system_id.parse::<u64>().unwrap_or(0);
        let geometry = WalGeometry {
            block_size: u64::try_from(block_size).unwrap_or(8192),
            segment_size: u64::try_from(segment_size).unwrap_or(16 << 20),
        };
        let first = tokio::time::timeout(bound, capture::query_position(&primary))
            .await
            .map_err(|_| timed_out())??;

        let mut replicas = Vec::with_capacity(self.replicas.len());
        for (name, source) in std::mem::take(&mut self.replicas) {
            if replicas.iter().any(|r: &Arc<ReplicaState>| r.name == name) {
                return Err(PgSetupError::DuplicateName(name));
            }
            let outages = Outages::new();
            let pool = self.pool(&name, source, &outages)?;
            let connect = (*pool.connect_options()).clone();
            replicas.push(Arc::new(ReplicaState::new(name, pool, connect, outages)));
        }

        let pools = Arc::new(PrimaryPools::new(primary.clone(), rebuild));
        let primary_state = Arc::new(PrimaryState {
            pools: Arc::clone(&pools),
            connect: primary_connect,
            geometry,
            inserted: 0.into(),
            timeline: 0.into(),
            system_id,
            outages: primary_outages,
            healthy: true.into(),
            history: Default::default(),
            changed_at: 0.into(),
            pool_replaced: false.into(),
        });
        let tracker = ReplicaTracker::new(replicas, primary_state);
        tracker.note_primary_position(first);
        tracker
            .start(TrackerConfig {
                poll_interval: self.poll_interval,
                probe_timeout: self.probe_timeout,
                max_backoff: self.max_backoff,
                min_refresh_gap: self.wait_poll_interval,
                idle_poll_interval: self.idle_poll_interval,
                stall_timeout: self.stall_timeout,
            })
            .await;
        // Every series exists from the start, so alerts and rate() work
        // before the first fault.
        for replica in &tracker.replicas {
            let up = replica.healthy.load(Ordering::Relaxed);
            metrics::gauge!("read_after_write_replica_up", "replica" => replica.name.clone())
                .set(if up { 1.0 } else { 0.0 });
            let diverged = replica.diverged.load(Ordering::Relaxed);
            metrics::gauge!("read_after_write_replica_diverged", "replica" => replica.name.clone())
                .set(if diverged { 1.0 } else { 0.0 });
        }
        metrics::counter!("read_after_write_capture_failures_total").increment(0);
        metrics::counter!("read_after_write_capture_queries_total").increment(0);
        tracing::info!(
            replicas = tracker.replicas.len(),
            system_id,
            timeline = first.timeline,
            "replica set connected"
        );
        Ok(PgReplicaSet {
            inner: Arc::new(Inner {
                capture: Capture::new(pools, geometry, self.capture_timeout),
                tracker,
                selection: self.selection,
                wait_poll_interval: self.wait_poll_interval.max(Duration::from_micros(100)),
                poll_interval: self.poll_interval,
                next: AtomicUsize::new(0),
                wait_policy: self.wait_policy,
                primary_share: self.primary_budget.map(PrimaryShare::new),
                max_staleness: self.max_staleness,
            }),
        })
    }
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

/// A snapshot of one replica as the tracker sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplicaStatus {
    /// The replica's name.
    pub name: String,
    /// Whether reads may go to it.
    pub healthy: bool,
    /// Last replay position seen.
    pub replayed: Lsn,
    /// Timeline this process last saw its WAL receiver on; 0 when unknown
    /// (an unknown timeline never qualifies the replica for a token).
    pub timeline: u32,
    /// On a timeline other than the primary's, or its replay stalled while
    /// the primary wrote: it serves no reads.
    pub diverged: bool,
    /// Bytes of WAL the primary had written beyond `replayed` at its last
    /// poll (meaningless when `timeline` differs from the primary's).
    pub lag_bytes: u64,
    /// How long ago the primary first had WAL this replica has not replayed
    /// (to within a poll interval); zero when it is caught up.
    pub lag: Duration,
    /// Whether the tracker's role can see this replica's timeline (is a
    /// member of `pg_read_all_stats`, e.g. through `pg_monitor`), as asked
    /// when the tracker connected; `None` before it first connected. Without
    /// it no read with a token can go to this replica.
    pub sees_timelines: Option<bool>,
    /// A replay pause was requested or is in effect
    /// (`pg_wal_replay_pause()`): reads are never made to wait for it.
    pub paused: bool,
    /// How long after the primary wrote WAL this replica replays it,
    /// smoothed (rises fast, falls slowly); `None` until measured. What
    /// predictions are made from.
    pub replay_delay: Option<Duration>,
    /// Bytes of WAL replayed per second, smoothed over about a second.
    pub replay_rate: u64,
}

impl PgReplicaSet {
    /// Starts a builder with the defaults: poll every 20 ms, probe timeout
    /// 500 ms, backoff up to 2 s, capture timeout 1 s, stall timeout 5 s,
    /// round-robin, 10 connections per node, checkout timeout 1 s, session
    /// reads routed by prediction within their `max_wait`, no primary budget,
    /// no staleness bound on eventual reads.
    pub fn builder() -> PgReplicaSetBuilder {
        PgReplicaSetBuilder {
            primary: None,
            replicas: Vec::new(),
            poll_interval: Duration::from_millis(20),
            wait_poll_interval: Duration::from_millis(2),
            idle_poll_interval: Duration::from_millis(500),
            probe_timeout: Duration::from_millis(500),
            max_backoff: Duration::from_secs(2),
            capture_timeout: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(5),
            selection: Selection::RoundRobin,
            max_connections: 10,
            acquire_timeout: Duration::from_secs(1),
            wait_policy: WaitPolicy::default(),
            primary_budget: None,
            max_staleness: None,
        }
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

    /// A replica's pool by name, bypassing every check: for tools and tests
    /// that must read one node on purpose.
    pub fn replica_pool(&self, name: &str) -> Option<&PgPool> {
        self.replica_states()
            .find(|r| r.name == name)
            .map(|r| &r.pool)
    }

    /// What the tracker knows about each replica, in configuration order.
    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        self.replica_states()
            .map(|r| {
                let replayed = r.replayed.load(Ordering::Acquire);
                let primary = &self.inner.tracker.primary;
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

    /// Capture queries sent so far (one per batch of concurrent writers).
    pub fn capture_queries(&self) -> u64 {
        self.inner.capture.queries()
    }

    /// Replica polls made by the tracker so far.
    pub fn tracker_polls(&self) -> u64 {
        self.inner.tracker.polls()
    }

    /// Stops the tracker and waits for its tasks to close their connections.
    /// Reads keep routing on the last known positions afterwards.
    pub async fn shutdown(&self) {
        self.inner.tracker.shutdown().await;
    }

    fn replica_states(&self) -> impl Iterator<Item = &ReplicaState> {
        self.inner.tracker.replicas.iter().map(|r| &**r)
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
    /// load): the primary's and each replica's health, whether the tracker's
    /// role can see replica timelines, and replica lag against the layer's
    /// `max_wait` and token TTL.
    async fn diagnose(&self, settings: &LayerSettings) -> Vec<Finding> {
        diagnose(self.primary_healthy(), &self.replicas(), settings)
    }
}

/// The findings for [`PgReplicaSet`]'s `diagnose`, from a snapshot.
fn diagnose(
    primary_healthy: bool,
    replicas: &[ReplicaStatus],
    settings: &LayerSettings,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    if !primary_healthy {
        findings.push(Finding::error(
            "primary_unhealthy",
            "the primary did not answer the tracker's last probe within probe_timeout: writes \
             fail until it does; check the primary and the primary URL",
        ));
    }
    if replicas.is_empty() {
        findings.push(Finding::info(
            "no_replicas",
            "no replicas are configured: every read goes to the primary; add them with \
             replica_url or replica_pool",
        ));
        return findings;
    }
    for replica in replicas {
        let name = &replica.name;
        if replica.diverged {
            findings.push(Finding::warning(
                "replica_diverged",
                format!(
                    "replica {name} is on another timeline than the primary, or its replay stalled \
                     while the primary wrote: it serves no reads; re-point it at the primary \
                     (pg_rewind or a fresh base backup)"
                ),
            ));
        } else if !replica.healthy {
            let since = if replica.sees_timelines.is_none() {
                " and has not answered since startup"
            } else {
                ""
            };
            findings.push(Finding::warning(
                "replica_unhealthy",
                format!(
                    "replica {name} serves no reads{since}: down, not answering within \
                     probe_timeout, or not in recovery; check it and its URL"
                ),
            ));
        }
        if replica.sees_timelines == Some(false) {
            findings.push(Finding::warning(
                "replica_role_cannot_see_timelines",
                format!(
                    "replica {name}: the role in its URL is not a member of pg_read_all_stats, so \
                     the tracker cannot see its timeline and no read with a token goes to it (they \
                     all go to the primary); run `GRANT pg_monitor TO <that role>` on the primary"
                ),
            ));
        }
    }
    let serving = || replicas.iter().filter(|r| r.healthy && !r.diverged);
    let Some(least_lag) = serving().map(|r| r.lag).min() else {
        findings.push(Finding::warning(
            "no_healthy_replica",
            "no replica is healthy: every read goes to the primary until one answers",
        ));
        return findings;
    };
    if settings.uses_positions && least_lag > settings.max_wait {
        findings.push(Finding::warning(
            "lag_exceeds_max_wait",
            format!(
                "every replica lags at least {least_lag:?}, more than max_wait ({:?}): a user's \
                 reads right after their write go to the primary (at once when routed by \
                 prediction, the default; after waiting max_wait with fixed_wait); raise \
                 max_wait above the lag, or accept those primary reads",
                settings.max_wait
            ),
        ));
    }
    for replica in serving().filter(|r| r.lag > settings.ttl) {
        findings.push(Finding::warning(
            "lag_exceeds_ttl",
            format!(
                "replica {} lags {:?}, more than the token TTL ({:?}): once a token expires its \
                 user's reads may go to this replica without their write; raise the layer's ttl \
                 above the worst lag",
                replica.name, replica.lag, settings.ttl
            ),
        ));
    }
    findings
}

#[cfg(test)]
mod diagnose_tests {
    use super::*;

    fn replica(name: &str, lag_ms: u64) -> ReplicaStatus {
        ReplicaStatus {
            name: name.to_owned(),
            healthy: true,
            replayed: Lsn::new(0x1000),
            timeline: 1,
            diverged: false,
            lag_bytes: 0,
            lag: Duration::from_millis(lag_ms),
            sees_timelines: Some(true),
            paused: false,
            replay_delay: None,
            replay_rate: 0,
        }
    }

    fn codes(findings: &[Finding]) -> Vec<&'static str> {
        findings.iter().map(Finding::code).collect()
    }

    fn settings() -> LayerSettings {
        LayerSettings::new(Duration::from_millis(20), Duration::from_secs(30))
    }

    #[test]
    fn a_healthy_set_finds_nothing() {
        let replicas = [replica("a", 0), replica("b", 5)];
        assert!(diagnose(true, &replicas, &settings()).is_empty());
    }

    #[test]
    fn a_role_without_pg_monitor_is_named_with_the_grant() {
        let mut blind = replica("replica-2", 0);
        blind.sees_timelines = Some(false);
        let findings = diagnose(true, &[replica("replica-1", 0), blind], &settings());
        assert_eq!(codes(&findings), ["replica_role_cannot_see_timelines"]);
        assert!(findings[0].message().contains("replica-2"));
        assert!(findings[0].message().contains("GRANT pg_monitor"));
    }

    #[test]
    fn lag_beyond_max_wait_warns_only_when_every_replica_lags() {
        let findings = diagnose(true, &[replica("a", 5), replica("b", 120)], &settings());
        assert!(findings.is_empty(), "{findings:?}");
        let findings = diagnose(true, &[replica("a", 50), replica("b", 120)], &settings());
        assert_eq!(codes(&findings), ["lag_exceeds_max_wait"]);
        let mut window = settings();
        window.uses_positions = false;
        assert!(diagnose(true, &[replica("a", 50)], &window).is_empty());
    }

    #[test]
    fn lag_beyond_the_ttl_warns_per_replica() {
        let findings = diagnose(true, &[replica("a", 0), replica("b", 40_000)], &settings());
        assert_eq!(codes(&findings), ["lag_exceeds_ttl"]);
        assert!(findings[0].message().contains("replica b"));
    }

    #[test]
    fn no_serving_replica_and_a_silent_primary_are_reported() {
        let mut down = replica("a", 0);
        down.healthy = false;
        down.sees_timelines = None;
        let mut orphan = replica("b", 0);
        orphan.diverged = true;
        let findings = diagnose(false, &[down, orphan], &settings());
        assert_eq!(
            codes(&findings),
            [
                "primary_unhealthy",
                "replica_unhealthy",
                "replica_diverged",
                "no_healthy_replica"
            ]
        );
        assert!(findings[1].message().contains("since startup"));
        assert_eq!(codes(&diagnose(true, &[], &settings())), ["no_replicas"]);
    }
}

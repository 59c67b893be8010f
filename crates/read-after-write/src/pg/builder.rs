//! [`PgReplicaSetBuilder`]: every setting of a replica set, its default
//! (from [`defaults`](super::defaults)), and where it comes from (URLs,
//! pools, the environment). [`connect`](PgReplicaSetBuilder::connect) is in
//! `connect.rs`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;

use super::budget::PrimaryBudget;
use super::defaults;
use super::endpoint::{PoolSettings, TrackerOptions};
use super::error::PgSetupError;
use super::probe_conn::ProbeConnector;
use super::route::WaitPolicy;
use super::{env_var, PgReplicaSet, Selection};

pub(super) enum Source {
    Url(String),
    Pool(PgPool),
}

/// Whether replicas may be proven by a heartbeat table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum HeartbeatSetting {
    /// The default table, if it exists and the role cannot see timelines.
    Auto,
    /// This table, required.
    Table(String),
    /// Never.
    Off,
}

/// Builder for [`PgReplicaSet`]; start with [`PgReplicaSet::builder`].
pub struct PgReplicaSetBuilder {
    pub(super) primary: Option<Source>,
    pub(super) replicas: Vec<(String, Source)>,
    pub(super) poll_interval: Duration,
    pub(super) wait_poll_interval: Duration,
    pub(super) idle_poll_interval: Duration,
    pub(super) probe_timeout: Duration,
    pub(super) max_backoff: Duration,
    pub(super) capture_timeout: Duration,
    pub(super) stall_timeout: Duration,
    pub(super) selection: Selection,
    pub(super) max_connections: u32,
    pub(super) acquire_timeout: Duration,
    pub(super) wait_policy: WaitPolicy,
    pub(super) primary_budget: Option<PrimaryBudget>,
    pub(super) tracker_options: TrackerOptions,
    pub(super) heartbeat: HeartbeatSetting,
    pub(super) heartbeat_interval: Duration,
    pub(super) discovery_interval: Duration,
    pub(super) canary_rate: f64,
    /// Opens the tracker's own connections; `None`: sqlx's.
    pub(super) probe_connector: Option<Arc<dyn ProbeConnector>>,
    /// Whether `tracker_connect_options` was called: a driver's connector
    /// reaches nodes by URL and cannot apply that mapping.
    pub(super) tracker_options_set: bool,
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
            .field("heartbeat", &self.heartbeat)
            .field("canary_rate", &self.canary_rate)
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
    /// The URL may name one server or several: a reader endpoint (Aurora's
    /// `cluster-ro`, a Cloud SQL or AlloyDB read pool, the RDS Multi-AZ
    /// reader endpoint), DNS round robin, HAProxy or a pooler with several
    /// hosts. Each server found behind it is followed on its own (named
    /// `name`, `name#2`, ...) with a pool of its own, whose connections are
    /// kept only if they reached that server: a read never runs on a server
    /// the tracker has not checked. See [`endpoint`](super#reader-endpoints).
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
    /// with the pool's connect options as they are at each connect (so it
    /// follows [`PgPool::set_connect_options`], e.g. rotated credentials).
    ///
    /// A pool you bring must reach exactly one server: it cannot be tied
    /// to one of several (give a reader endpoint as a URL instead). If the
    /// tracker finds more than one server behind it, the replica serves
    /// only unbounded eventual reads, and says so loudly.
    ///
    /// Pools built here from URLs skip sqlx's per-checkout test query and
    /// instead drop connections opened before the node's last outage; a pool
    /// you bring keeps its own settings, including that test query.
    pub fn replica_pool(mut self, name: impl Into<String>, pool: PgPool) -> Self {
        self.replicas.push((name.into(), Source::Pool(pool)));
        self
    }

    /// How often each replica's replay position is polled while positions
    /// are in use (default [`POLL_INTERVAL`](super::defaults::POLL_INTERVAL)): how stale
    /// a position can be when no read is waiting. See [`idle_poll_interval`](Self::idle_poll_interval).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// The shortest gap between two polls of one replica asked for by
    /// waiting reads, and between two re-checks of a waiting read (default
    /// [`WAIT_POLL_INTERVAL`](super::defaults::WAIT_POLL_INTERVAL)).
    ///
    /// A wait itself happens on the server: the replica's task sends one
    /// query that returns as soon as the replica replays the position, so
    /// a wait ends within about a millisecond of replay whatever this is.
    /// This bounds how often a replica is asked again when reads keep
    /// arriving for positions it has not replayed; higher costs the
    /// replicas fewer queries under load.
    pub fn wait_poll_interval(mut self, interval: Duration) -> Self {
        self.wait_poll_interval = interval;
        self
    }

    /// How often replicas and the primary are polled once no session read
    /// with a token and no write has happened for 5 s (default
    /// [`IDLE_POLL_INTERVAL`](super::defaults::IDLE_POLL_INTERVAL)). The
    /// first such read or write after a quiet spell polls every node at
    /// once. Set it equal to `poll_interval` to poll at one rate always.
    pub fn idle_poll_interval(mut self, interval: Duration) -> Self {
        self.idle_poll_interval = interval;
        self
    }

    /// How long a poll may take before the replica counts as down (default
    /// [`PROBE_TIMEOUT`](super::defaults::PROBE_TIMEOUT)): how soon a frozen or
    /// partitioned node is noticed.
    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    /// The longest pause between re-probes of a down replica (default
    /// [`MAX_BACKOFF`](super::defaults::MAX_BACKOFF)).
    pub fn max_backoff(mut self, backoff: Duration) -> Self {
        self.max_backoff = backoff;
        self
    }

    /// How long the write-position query may take (default
    /// [`CAPTURE_TIMEOUT`](super::defaults::CAPTURE_TIMEOUT)); past it the
    /// response carries a token that sends the user's session reads to the
    /// primary until their next write or the token's expiry.
    pub fn capture_timeout(mut self, timeout: Duration) -> Self {
        self.capture_timeout = timeout;
        self
    }

    /// How long a replica's replay may stand still while the primary writes
    /// before it counts as diverged and serves no reads (default
    /// [`STALL_TIMEOUT`](super::defaults::STALL_TIMEOUT)); see
    /// [diverged replicas](crate::guide::routing#diverged-replicas).
    pub fn stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout;
        self
    }

    /// How reads pick among qualifying replicas (default round-robin).
    pub fn selection(mut self, selection: Selection) -> Self {
        self.selection = selection;
        self
    }

    /// How a session read that finds no replica caught up decides whether
    /// to wait (default [`WaitPolicy::Predicted`]); either way within its
    /// `max_wait`.
    ///
    /// ```
    /// use read_after_write::pg::{PgReplicaSet, WaitPolicy};
    ///
    /// let builder = PgReplicaSet::builder().wait_policy(WaitPolicy::Fixed);
    /// assert!(format!("{builder:?}").contains("Fixed"));
    /// ```
    pub fn wait_policy(mut self, policy: WaitPolicy) -> Self {
        self.wait_policy = policy;
        self
    }

    /// Cap the primary's share of session reads (default: no cap). While
    /// the share over the budget's window is above it, reads wait up to its
    /// `hard_max_wait` for a replica predicted to catch up in that time,
    /// instead of going to the primary: the one exception to `max_wait`.
    /// Never for a replica that lacks the write.
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

    /// How the tracker connects, given the node's own connect options:
    /// the separate monitoring connection, so that a monitoring privilege
    /// can live on a role of its own instead of the application's (default:
    /// the application's options as they are). Called at every tracker
    /// connect, with the node's current options.
    ///
    /// ```
    /// use read_after_write::pg::PgReplicaSet;
    ///
    /// // A role with pg_monitor for the tracker; the application's role
    /// // keeps only its table privileges.
    /// let builder = PgReplicaSet::builder()
    ///     .tracker_connect_options(|options| options.username("raw_monitor").password("secret"));
    /// # let _ = builder;
    /// ```
    pub fn tracker_connect_options(
        mut self,
        map: impl Fn(PgConnectOptions) -> PgConnectOptions + Send + Sync + 'static,
    ) -> Self {
        self.tracker_options = Arc::new(map);
        self.tracker_options_set = true;
        self
    }

    /// Prove replicas by the heartbeat table `table` (optionally
    /// schema-qualified), which [`connect`](Self::connect) then requires.
    /// By default the table named [`HEARTBEAT_TABLE`](super::defaults::HEARTBEAT_TABLE) is used when
    /// it exists and the tracker's role cannot see replica timelines; see
    /// [`heartbeat`](super::heartbeat) and [`HEARTBEAT_DDL`](super::HEARTBEAT_DDL).
    ///
    /// ```
    /// use read_after_write::pg::PgReplicaSet;
    ///
    /// let builder = PgReplicaSet::builder().heartbeat_table("ops.raw_heartbeat");
    /// assert!(format!("{builder:?}").contains("ops.raw_heartbeat"));
    /// ```
    pub fn heartbeat_table(mut self, table: impl Into<String>) -> Self {
        self.heartbeat = HeartbeatSetting::Table(table.into());
        self
    }

    /// Never use a heartbeat table, even where one exists: without
    /// `pg_monitor`, reads with a token then go to the primary.
    pub fn without_heartbeat(mut self) -> Self {
        self.heartbeat = HeartbeatSetting::Off;
        self
    }

    /// How often the tracker writes its heartbeat while positions are in
    /// use and no capture wrote one (default
    /// [`HEARTBEAT_INTERVAL`](super::defaults::HEARTBEAT_INTERVAL)): how soon after a primary
    /// restart or failover replicas are proven again by heartbeats alone.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// How often each replica URL is checked for servers not followed yet
    /// (default [`DISCOVERY_INTERVAL`](super::defaults::DISCOVERY_INTERVAL)); a pool that
    /// meets one wakes the check at once.
    pub fn discovery_interval(mut self, interval: Duration) -> Self {
        self.discovery_interval = interval;
        self
    }

    /// The share of session reads routed to a replica that the canary
    /// confirms afterwards (default [`CANARY_RATE`](super::defaults::CANARY_RATE); 0
    /// turns it off): see [`canary`](super#the-canary).
    ///
    /// ```
    /// use read_after_write::pg::PgReplicaSet;
    ///
    /// let builder = PgReplicaSet::builder().canary_rate(0.001);
    /// assert!(format!("{builder:?}").contains("0.001"));
    /// ```
    pub fn canary_rate(mut self, rate: f64) -> Self {
        self.canary_rate = if rate.is_nan() {
            0.0
        } else {
            rate.clamp(0.0, 1.0)
        };
        self
    }

    /// Pool size for pools built from URLs, per server (default
    /// [`MAX_CONNECTIONS`](super::defaults::MAX_CONNECTIONS)); see
    /// [connections per app instance](crate::guide::operations#connections-per-app-instance).
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// How long a checkout from a pool built from a URL waits (default
    /// [`ACQUIRE_TIMEOUT`](super::defaults::ACQUIRE_TIMEOUT)):
    /// also how long a write takes to fail while the primary is down. Raise it
    /// for pools that are often exhausted under load.
    pub fn acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// The builder with every default; see [`PgReplicaSet::builder`].
    pub(crate) fn new() -> Self {
        PgReplicaSetBuilder {
            primary: None,
            replicas: Vec::new(),
            poll_interval: defaults::POLL_INTERVAL,
            wait_poll_interval: defaults::WAIT_POLL_INTERVAL,
            idle_poll_interval: defaults::IDLE_POLL_INTERVAL,
            probe_timeout: defaults::PROBE_TIMEOUT,
            max_backoff: defaults::MAX_BACKOFF,
            capture_timeout: defaults::CAPTURE_TIMEOUT,
            stall_timeout: defaults::STALL_TIMEOUT,
            selection: Selection::RoundRobin,
            max_connections: defaults::MAX_CONNECTIONS,
            acquire_timeout: defaults::ACQUIRE_TIMEOUT,
            wait_policy: WaitPolicy::default(),
            primary_budget: None,
            tracker_options: Arc::new(|options| options),
            heartbeat: HeartbeatSetting::Auto,
            heartbeat_interval: defaults::HEARTBEAT_INTERVAL,
            discovery_interval: defaults::DISCOVERY_INTERVAL,
            canary_rate: defaults::CANARY_RATE,
            probe_connector: None,
            tracker_options_set: false,
        }
    }

    pub(super) fn pool_settings(&self) -> PoolSettings {
        PoolSettings {
            max_connections: self.max_connections,
            acquire_timeout: self.acquire_timeout,
        }
    }

    pub(super) fn options(node: &str, url: &str) -> Result<PgConnectOptions, PgSetupError> {
        PgConnectOptions::from_str(url).map_err(|source| PgSetupError::InvalidUrl {
            node: node.to_owned(),
            source,
        })
    }
}

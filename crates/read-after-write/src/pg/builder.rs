//! [`PgReplicaSetBuilder`]: settings, and `connect()`, which checks the
//! primary, decides how replicas prove what they hold, and starts the
//! tracker.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgPool, Row};

use super::capture::Capture;
use super::endpoint::{Endpoint, EndpointSource, PoolSettings, TrackerOptions};
use super::error::PgSetupError;
use super::heartbeat::{self, Heartbeat};
use super::outages::Outages;
use super::pools::{PrimaryPools, Rebuild};
use super::primary::PrimaryState;
use super::probe::{self, ProbeKind};
use super::route::{PrimaryBudget, PrimaryShare, WaitPolicy};
use super::tracker::{describe, ReplicaTracker, TrackerConfig, TRACKER_APPLICATION_NAME};
use super::{env_var, Inner, PgReplicaSet, Selection};
use crate::position::WalGeometry;

enum Source {
    Url(String),
    Pool(PgPool),
}

/// Whether replicas may be proven by a heartbeat table.
#[derive(Clone, Debug, PartialEq, Eq)]
enum HeartbeatSetting {
    /// The default table, if it exists and the role cannot see timelines.
    Auto,
    /// This table, required.
    Table(String),
    /// Never.
    Off,
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
    tracker_options: TrackerOptions,
    heartbeat: HeartbeatSetting,
    heartbeat_interval: Duration,
    discovery_interval: Duration,
    canary_rate: f64,
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
    /// the [module docs](super#replicas-that-left-the-primarys-history).
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
    /// [module docs](super#routing-within-a-latency-budget).
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
    /// call with [`Backend::eventual_within`](crate::Backend::eventual_within).
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
        self
    }

    /// Prove replicas by the heartbeat table `table` (optionally
    /// schema-qualified), which [`connect`](Self::connect) then requires.
    /// By default the table named `read_after_write_heartbeat` is used when
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
    /// use and no capture wrote one (default 1 s): how soon after a primary
    /// restart or failover replicas are proven again by heartbeats alone.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// How often each replica URL is checked for servers not followed yet
    /// (default 60 s); a pool that meets one wakes the check at once.
    pub fn discovery_interval(mut self, interval: Duration) -> Self {
        self.discovery_interval = interval;
        self
    }

    /// The share of session reads routed to a replica that the canary
    /// confirms afterwards (default 0.01, one in a hundred; 0 turns it
    /// off): see [`canary`](super#the-canary).
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

    /// The builder with every default; see [`PgReplicaSet::builder`].
    pub(crate) fn new() -> Self {
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
            tracker_options: Arc::new(|options| options),
            heartbeat: HeartbeatSetting::Auto,
            heartbeat_interval: Duration::from_secs(1),
            discovery_interval: Duration::from_secs(60),
            canary_rate: 0.01,
        }
    }

    fn pool_settings(&self) -> PoolSettings {
        PoolSettings {
            max_connections: self.max_connections,
            acquire_timeout: self.acquire_timeout,
        }
    }

    fn options(node: &str, url: &str) -> Result<PgConnectOptions, PgSetupError> {
        PgConnectOptions::from_str(url).map_err(|source| PgSetupError::InvalidUrl {
            node: node.to_owned(),
            source,
        })
    }

    /// Builds the primary's pools from a URL; the primary's set keeps the
    /// factory to build a fresh pool when the primary freezes.
    fn primary_pool_factory(&self, outages: &Arc<Outages>) -> Rebuild {
        let outages = Arc::clone(outages);
        let settings = self.pool_settings();
        Box::new(move |options: PgConnectOptions| {
            let on_acquire = Arc::clone(&outages);
            let on_release = Arc::clone(&outages);
            PgPoolOptions::new()
                .max_connections(settings.max_connections)
                .acquire_timeout(settings.acquire_timeout)
                // No test query per checkout (a round trip on every write);
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
                .connect_lazy_with(options)
        })
    }

    /// Connects to the primary, reads the cluster's identity, decides how
    /// replicas prove what they hold (their WAL receiver's timeline, a
    /// heartbeat table, or nothing), polls every replica once, looks
    /// behind each URL for more servers, and starts the tracker.
    ///
    /// Fails if the primary cannot be queried, or a heartbeat table named
    /// with [`heartbeat_table`](Self::heartbeat_table) cannot be used.
    /// Replicas that are down are not an error: they are excluded until
    /// they answer.
    pub async fn connect(mut self) -> Result<PgReplicaSet, PgSetupError> {
        let primary_source = self.primary.take().ok_or(PgSetupError::NoPrimary)?;
        let primary_outages = Outages::new();
        let (primary, rebuild) = match primary_source {
            Source::Url(url) => {
                let options = Self::options("primary", &url)?;
                let factory = self.primary_pool_factory(&primary_outages);
                (factory(options), Some(factory))
            }
            Source::Pool(pool) => (pool, None),
        };
        let node = describe(&primary.connect_options());
        let bound = self.acquire_timeout + self.probe_timeout;
        let timed_out = || PgSetupError::PrimaryTimedOut {
            node: node.clone(),
            timeout: bound,
        };
        let failed = |source| PgSetupError::Primary {
            node: node.clone(),
            source,
        };

        let table = match &self.heartbeat {
            HeartbeatSetting::Table(table) if !heartbeat::valid_table_name(table) => {
                return Err(PgSetupError::Heartbeat {
                    table: table.clone(),
                    why: "not a plain identifier (letters, digits and underscores, optionally schema.table)",
                });
            }
            HeartbeatSetting::Table(table) => Some(table.clone()),
            HeartbeatSetting::Auto => Some(heartbeat::DEFAULT_TABLE.to_owned()),
            HeartbeatSetting::Off => None,
        };
        let setup = setup_sql(table.as_deref());
        let row = tokio::time::timeout(
            bound,
            sqlx::raw_sql(AssertSqlSafe(setup)).fetch_one(&primary),
        )
        .await
        .map_err(|_| timed_out())?
        .map_err(failed)?;
        let text = |i: usize| -> Result<String, PgSetupError> {
            row.try_get::<Option<String>, _>(i)
                .map_err(failed)
                .map(Option::unwrap_or_default)
        };
        if text(0)? == "true" {
            return Err(PgSetupError::PrimaryIsStandby);
        }
        let system_id = text(1)?.parse::<u64>().unwrap_or(0);
        let geometry = WalGeometry {
            block_size: text(2)?.parse().unwrap_or(8192),
            segment_size: text(3)?.parse().unwrap_or(16 << 20),
        };
        let aurora = text(4)? == "true";
        let table_usable = text(5)? == "true";

        // The tracker's own connection to the primary: it says whether the
        // tracker's role sees replica timelines (roles are cluster-wide),
        // and the primary's task keeps it.
        let tracker_primary = (self.tracker_options)(primary.connect_options().as_ref().clone());
        let tracker_conn = tokio::time::timeout(bound, async {
            use sqlx::ConnectOptions;
            let mut conn = tracker_primary
                .application_name(TRACKER_APPLICATION_NAME)
                .connect()
                .await?;
            let (_, sees) = probe::identify(&mut conn).await?;
            Ok::<_, sqlx::Error>((conn, sees))
        })
        .await;
        let (tracker_conn, tracker_sees) = match tracker_conn {
            Ok(Ok((conn, sees))) => (Some(conn), sees),
            Ok(Err(error)) => {
                tracing::warn!(%error, "the tracker could not connect to the primary; it retries");
                (None, false)
            }
            Err(_) => (None, false),
        };

        let heartbeat = match (&self.heartbeat, table) {
            (HeartbeatSetting::Table(_), Some(table)) if !table_usable => {
                return Err(PgSetupError::Heartbeat {
                    table,
                    why: "it does not exist, or the application's role may not SELECT, INSERT and UPDATE it",
                });
            }
            (HeartbeatSetting::Table(_), Some(table)) => Some(table),
            (HeartbeatSetting::Auto, Some(table)) if table_usable && !tracker_sees => Some(table),
            _ => None,
        }
        .filter(|_| !aurora)
        .map(|table| Arc::new(Heartbeat::new(table)));
        if aurora {
            tracing::error!(
                "Aurora PostgreSQL detected (aurora_version() exists): its replicas share storage \
                 and replay no WAL, so no replica can be proven to hold a write. Reads with a token \
                 go to the primary (the writer) for the token's life; replicas serve eventual reads \
                 only. See the platforms guide"
            );
        }
        // The first position; with heartbeats, written as one, so that
        // replicas are proven to follow this primary as soon as they replay
        // it, before the first write.
        let first_sql = probe::primary_position_sql(heartbeat.as_deref());
        let first = tokio::time::timeout(
            bound,
            probe::primary(&primary, &first_sql, heartbeat.is_some()),
        )
        .await
        .map_err(|_| timed_out())?
        .map_err(failed)?;
        let probe_kind = if aurora {
            ProbeKind::Aurora
        } else {
            ProbeKind::Streaming {
                heartbeat: heartbeat.as_ref().map(|h| h.table.clone()),
            }
        };

        let settings = self.pool_settings();
        let mut endpoints: Vec<Arc<Endpoint>> = Vec::with_capacity(self.replicas.len());
        for (name, source) in std::mem::take(&mut self.replicas) {
            if endpoints.iter().any(|e| e.name == name) {
                return Err(PgSetupError::DuplicateName(name));
            }
            let source = match source {
                Source::Url(url) => EndpointSource::Options(std::sync::Mutex::new(Arc::new(
                    Self::options(&name, &url)?,
                ))),
                Source::Pool(pool) => EndpointSource::Pool(pool),
            };
            endpoints.push(Arc::new(Endpoint::new(
                name,
                source,
                settings,
                Arc::clone(&self.tracker_options),
            )));
        }

        let pools = Arc::new(PrimaryPools::new(primary, rebuild));
        let primary_state = Arc::new(PrimaryState::new(
            Arc::clone(&pools),
            Arc::clone(&self.tracker_options),
            geometry,
            system_id,
            primary_outages,
        ));
        let tracker = ReplicaTracker::new(
            endpoints,
            primary_state,
            TrackerConfig {
                poll_interval: self.poll_interval,
                probe_timeout: self.probe_timeout,
                max_backoff: self.max_backoff,
                min_refresh_gap: self.wait_poll_interval,
                idle_poll_interval: self.idle_poll_interval,
                stall_timeout: self.stall_timeout,
                heartbeat_interval: self.heartbeat_interval,
                discovery_interval: self.discovery_interval,
            },
            probe_kind,
            heartbeat.clone(),
        );
        tracker.note_primary_position(super::probe::PrimaryProbe {
            lsn: first.lsn.round_down_page_header(geometry),
            ..first
        });
        tracker.start(tracker_conn).await;
        metrics::counter!("read_after_write_capture_failures_total").increment(0);
        metrics::counter!("read_after_write_capture_queries_total").increment(0);
        metrics::counter!("read_after_write_canary_violations_total").increment(0);
        tracing::info!(
            replicas = tracker.servers.len(),
            system_id,
            timeline = first.timeline,
            heartbeat = heartbeat.as_ref().map(|h| h.table.as_str()),
            "replica set connected"
        );
        Ok(PgReplicaSet {
            inner: Arc::new(Inner {
                capture: Capture::new(pools, heartbeat, geometry, self.capture_timeout),
                tracker,
                selection: self.selection,
                wait_poll_interval: self.wait_poll_interval.max(Duration::from_micros(100)),
                poll_interval: self.poll_interval,
                next: AtomicUsize::new(0),
                wait_policy: self.wait_policy,
                primary_share: self.primary_budget.map(PrimaryShare::new),
                max_staleness: self.max_staleness,
                canary: super::canary::Canary::new(self.canary_rate),
            }),
        })
    }
}

/// The setup query, sent as simple-protocol text: whether the primary is in
/// recovery, the system identifier, the WAL geometry, whether this is
/// Aurora, and whether `table` exists with the privileges heartbeats need.
fn setup_sql(table: Option<&str>) -> String {
    let usable = match table {
        Some(table) => format!(
            "(to_regclass('{table}') is not null and \
              has_table_privilege(to_regclass('{table}'), 'SELECT, INSERT, UPDATE'))::text"
        ),
        None => "'false'".to_owned(),
    };
    format!(
        "select pg_is_in_recovery()::text, \
                (select system_identifier::text from pg_control_system()), \
                current_setting('wal_block_size'), \
                (select setting from pg_settings where name = 'wal_segment_size'), \
                exists(select 1 from pg_proc where proname = 'aurora_version')::text, \
                {usable}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setup_query_names_the_heartbeat_table_only_when_given() {
        let with = setup_sql(Some("ops.raw_heartbeat"));
        assert!(with.contains("to_regclass('ops.raw_heartbeat')"));
        assert!(!setup_sql(None).contains("to_regclass"));
    }

    #[tokio::test]
    async fn a_heartbeat_table_that_is_not_an_identifier_is_refused_before_connecting() {
        let result = PgReplicaSetBuilder::new()
            .primary_url("postgres://nobody@127.0.0.1:1/none")
            .heartbeat_table("t; drop table users")
            .connect()
            .await;
        assert!(
            matches!(result, Err(PgSetupError::Heartbeat { .. })),
            "{result:?}"
        );
    }
}

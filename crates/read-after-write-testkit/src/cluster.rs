//! [`TestCluster`], its builder and its replicas.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

use crate::node::{self, Env, Node};
use crate::process::RunAs;
use crate::workdir::ClusterDir;
use crate::{KitError, PgBinaries};

/// How long to wait for a server to start, stop or reach a state, unless
/// [`ClusterBuilder::startup_timeout`] says otherwise.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often to poll a server while waiting for it.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Configures and starts a [`TestCluster`].
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use read_after_write_testkit::TestCluster;
///
/// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
/// let cluster = TestCluster::builder()
///     .replica(Duration::from_millis(50))
///     .replica(Duration::from_millis(200))
///     .setting("work_mem", "8MB")
///     .start()
///     .await?;
/// assert_eq!(cluster.replica_count(), 2);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default)]
#[must_use = "a builder does nothing until .start().await"]
pub struct ClusterBuilder {
    delays: Vec<Duration>,
    settings: Vec<(String, String)>,
    hba_lines: Vec<String>,
    binaries: Option<PgBinaries>,
    timeout: Option<Duration>,
}

impl ClusterBuilder {
    /// Adds a streaming replica whose server delays applying each commit by
    /// `apply_delay` (`recovery_min_apply_delay`, millisecond precision).
    /// Call once per replica; replicas are numbered from 0 in call order and
    /// named `replica-1`, `replica-2`, ...
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let cluster = TestCluster::builder()
    ///     .replica(Duration::ZERO)
    ///     .replica(Duration::from_secs(1))
    ///     .start()
    ///     .await?;
    /// assert_eq!(cluster.replica(1).apply_delay(), Duration::from_secs(1));
    /// # Ok(())
    /// # }
    /// ```
    pub fn replica(mut self, apply_delay: Duration) -> Self {
        self.delays.push(apply_delay);
        self
    }

    /// Adds a `postgresql.conf` setting for every node, after the kit's own
    /// (so it can override them, except the per-node `port`,
    /// `primary_conninfo` and `recovery_min_apply_delay`). The value is
    /// quoted for you.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let cluster = TestCluster::builder()
    ///     .setting("max_connections", "200")
    ///     .setting("log_statement", "all")
    ///     .start()
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Adds a line to every node's `pg_hba.conf`, ahead of the lines that
    /// let everyone in without a password (`initdb --auth=trust`), so it
    /// decides for the connections it matches: for instance
    /// `host all app 127.0.0.1/32 scram-sha-256` makes role `app` give a
    /// password over TCP. Call once per line; lines keep their order.
    ///
    /// The kit itself connects as `postgres` over 127.0.0.1 without a
    /// password, so a line of its own that keeps doing so
    /// (`host all postgres 127.0.0.1/32 trust`, and the same for
    /// `replication`) comes before yours: lines that match `postgres` do
    /// not apply to it. Replicas are copies of the primary's data
    /// directory, and failovers promote replicas in place, so every node
    /// has the lines from start to end. Roles and their passwords are
    /// yours to create, on the primary (replicas receive them):
    /// `set password_encryption = 'scram-sha-256'` first on PostgreSQL 13,
    /// whose default is `md5`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let cluster = TestCluster::builder()
    ///     .replica(Duration::ZERO)
    ///     .hba_line("host all app 127.0.0.1/32 scram-sha-256")
    ///     .start()
    ///     .await?;
    /// cluster
    ///     .execute_on_primary("create role app login password 'secret'")
    ///     .await?;
    /// let with_password = format!(
    ///     "postgres://app:secret@127.0.0.1:{}/postgres",
    ///     cluster.primary_port()
    /// );
    /// let _conn = <sqlx::PgConnection as sqlx::Connection>::connect(&with_password)
    ///     .await
    ///     .unwrap();
    /// # Ok(())
    /// # }
    /// ```
    pub fn hba_line(mut self, line: impl Into<String>) -> Self {
        self.hba_lines.push(line.into());
        self
    }

    /// Uses these server programs instead of [`PgBinaries::discover`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::{PgBinaries, TestCluster};
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let bins = PgBinaries::from_dir("/usr/lib/postgresql/15/bin")?;
    /// let cluster = TestCluster::builder().binaries(bins).start().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn binaries(mut self, binaries: PgBinaries) -> Self {
        self.binaries = Some(binaries);
        self
    }

    /// How long to wait for a server to start, stop, pause or promote
    /// (default 30 s).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let cluster = TestCluster::builder()
    ///     .startup_timeout(Duration::from_secs(120))
    ///     .start()
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Creates and starts the cluster: `initdb` the primary, copy its data
    /// directory to each replica before it first starts, start the primary,
    /// then configure and start the replicas in parallel, and wait until
    /// every replica accepts connections in recovery.
    ///
    /// Before that it removes clusters left behind by test processes that
    /// died without cleaning up.
    ///
    /// # Errors
    ///
    /// [`KitError`] if the programs are missing, a setting name is invalid,
    /// or a server fails to start; the message includes the tail of the
    /// failing server's log.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let cluster = TestCluster::builder()
    ///     .replica(Duration::from_millis(100))
    ///     .start()
    ///     .await?;
    /// println!("primary at {}", cluster.primary_url());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start(self) -> Result<TestCluster, KitError> {
        if let Some((name, _)) = self
            .settings
            .iter()
            .find(|(name, _)| !node::valid_setting_name(name))
        {
            return Err(KitError::InvalidSetting { name: name.clone() });
        }
        if let Some(line) = self
            .hba_lines
            .iter()
            .find(|line| !node::valid_hba_line(line))
        {
            return Err(KitError::InvalidArgument {
                what: format!("ClusterBuilder::hba_line({line:?})"),
                fix: "pass one pg_hba.conf line without line breaks or other control \
                      characters; call hba_line once per line"
                    .to_owned(),
            });
        }
        let started = Instant::now();
        let timeout = self.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let binaries = self.binaries;
        let settings = self.settings;
        let hba_lines = self.hba_lines;
        let replica_count = self.delays.len();
        let (env, dir, primary, copies) = blocking(move || {
            let env = Env {
                bins: match binaries {
                    Some(bins) => bins,
                    None => PgBinaries::discover()?,
                },
                run_as: RunAs::detect()?,
                timeout,
            };
            // Shared with the replica tasks: if this future is dropped while
            // they run, the directory is torn down only after they finish.
            let dir = Arc::new(ClusterDir::create(&env)?);
            let mut primary = Node::create(&env, dir.path(), "primary")?;
            primary.init_primary(&env, &settings, &hba_lines)?;
            // The copies need the primary cleanly stopped: before its start.
            let copies = clone_replicas(&env, dir.path(), &primary, replica_count)?;
            primary.start(&env, true)?;
            Ok((env, dir, primary, copies))
        })
        .await?;
        wait_ready(&primary, Some(false), timeout).await?;

        let mut tasks = Vec::with_capacity(copies.len());
        for (mut replica, &delay) in copies.into_iter().zip(&self.delays) {
            let env = env.clone();
            let primary_port = primary.port;
            tasks.push(tokio::task::spawn_blocking(move || {
                replica.configure_replica(&env, primary_port, delay)?;
                replica.start(&env, true)?;
                Ok::<_, KitError>(replica)
            }));
        }
        // Await every task before looking at errors, so that no replica is
        // still being set up when an error drops (and removes) the directory.
        let mut nodes = Vec::with_capacity(tasks.len());
        for task in tasks {
            nodes.push(task.await.map_err(join_error).and_then(|r| r));
        }
        let mut replicas = Vec::with_capacity(nodes.len());
        for (node, &delay) in nodes.into_iter().zip(&self.delays) {
            let node = node?;
            wait_ready(&node, Some(true), timeout).await?;
            replicas.push(ReplicaInfo {
                url: node.url(),
                node,
                apply_delay_ms: AtomicU64::new(delay.as_millis() as u64),
                flags: Mutex::new(Flags {
                    running: true,
                    paused: false,
                    promoted: false,
                    frozen: false,
                }),
            });
        }
        let mut conn = connect(&primary, true).await?;
        let version: String = sqlx::query_scalar("show server_version_num")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| sql_error(&primary, "reading server_version_num", e))?;
        let _ = conn.close().await;
        tracing::info!(
            dir = %dir.path().display(),
            primary = primary.port,
            replicas = replicas.len(),
            elapsed = ?started.elapsed(),
            "test cluster started"
        );
        Ok(TestCluster {
            server_version_num: version.parse().unwrap_or(0),
            primary_url: primary.url(),
            primary,
            primary_running: AtomicBool::new(true),
            replicas,
            env,
            dir,
        })
    }
}

/// A throwaway PostgreSQL cluster on 127.0.0.1: one primary and any number
/// of streaming replicas, each with its own server-side apply delay.
///
/// Dropping it stops every server (`pg_ctl stop -m immediate`) and removes
/// its files, also while a failing test unwinds; this blocks the dropping
/// thread for a few hundred milliseconds. If the process exits
/// without dropping it (a `static` cluster, `std::process::exit`, SIGKILL),
/// a small watchdog process does the same as soon as the process is gone,
/// and the next cluster start removes anything still left over. Set
/// `KEEP_TEST_CLUSTER=1` to keep the files (data directories and
/// `postgres.log` of each node, under [`dir`](Self::dir)) for debugging.
///
/// Control methods take replica indexes, from 0 to
/// [`replica_count`](Self::replica_count)` - 1`.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use read_after_write_testkit::TestCluster;
///
/// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
/// let cluster = TestCluster::start_with_delays(&[Duration::from_millis(200)]).await?;
/// cluster.execute_on_primary("create table t (id int); insert into t values (1)").await?;
/// // The replica applies the commit 200 ms after it happened.
/// cluster.wait_for_replicas_caught_up(Duration::from_secs(5)).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct TestCluster {
    server_version_num: u32,
    primary: Node,
    /// `primary.url()`, kept so it can be lent like a replica's.
    primary_url: String,
    primary_running: AtomicBool,
    replicas: Vec<ReplicaInfo>,
    env: Env,
    /// Declared last so that it is dropped last; its drop stops the servers.
    dir: Arc<ClusterDir>,
}

/// A replica of a [`TestCluster`].
///
/// # Examples
///
/// ```no_run
/// # use std::time::Duration;
/// # use read_after_write_testkit::TestCluster;
/// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
/// let cluster = TestCluster::start_with_delays(&[Duration::from_millis(50)]).await?;
/// let replica = cluster.replica(0);
/// assert_eq!(replica.name(), "replica-1");
/// assert_eq!(replica.apply_delay(), Duration::from_millis(50));
/// println!("{} listens on {}", replica.name(), replica.url());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct ReplicaInfo {
    node: Node,
    url: String,
    apply_delay_ms: AtomicU64,
    flags: Mutex<Flags>,
}

#[derive(Debug, Clone, Copy)]
struct Flags {
    running: bool,
    paused: bool,
    promoted: bool,
    /// Stopped by `SIGSTOP` ([`TestCluster::freeze_replica`]); the other
    /// flags say what it does once thawed.
    frozen: bool,
}

/// What a replica is doing, as far as the kit's controls know.
///
/// # Examples
///
/// ```no_run
/// # use std::time::Duration;
/// # use read_after_write_testkit::{ReplicaState, TestCluster};
/// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
/// let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
/// assert_eq!(cluster.replica(0).state(), ReplicaState::Replaying);
/// cluster.pause_replay(0).await?;
/// assert_eq!(cluster.replica(0).state(), ReplicaState::Paused);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReplicaState {
    /// Running and applying WAL from the primary.
    Replaying,
    /// Running, with replay paused by [`TestCluster::pause_replay`].
    Paused,
    /// Stopped or killed.
    Stopped,
    /// Promoted by [`TestCluster::promote_replica`]: running as a primary.
    Promoted,
    /// Frozen by [`TestCluster::freeze_replica`]: its processes are stopped
    /// (`SIGSTOP`) and answer nothing until
    /// [`TestCluster::thaw_replica`], after which it is in the state it was
    /// in before.
    Frozen,
}

impl ReplicaInfo {
    /// The replica's name: `replica-1` for index 0, and so on. It is also
    /// its `application_name` in the primary's `pg_stat_replication`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO, Duration::ZERO]).await?;
    /// assert_eq!(cluster.replica(1).name(), "replica-2");
    /// # Ok(())
    /// # }
    /// ```
    pub fn name(&self) -> &str {
        &self.node.name
    }

    /// The replica's connection URL,
    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
    /// let url = cluster.replica(0).url();
    /// assert!(url.starts_with("postgres://postgres@127.0.0.1:"));
    /// # Ok(())
    /// # }
    /// ```
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The replica's TCP port on 127.0.0.1.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
    /// assert_ne!(cluster.replica(0).port(), cluster.primary_port());
    /// # Ok(())
    /// # }
    /// ```
    pub fn port(&self) -> u16 {
        self.node.port
    }

    /// The replica's current `recovery_min_apply_delay`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
    /// cluster.set_apply_delay(0, Duration::from_millis(300)).await?;
    /// assert_eq!(cluster.replica(0).apply_delay(), Duration::from_millis(300));
    /// # Ok(())
    /// # }
    /// ```
    pub fn apply_delay(&self) -> Duration {
        Duration::from_millis(self.apply_delay_ms.load(Ordering::Relaxed))
    }

    /// What the replica is doing.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::{ReplicaState, TestCluster};
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
    /// cluster.stop_replica(0).await?;
    /// assert_eq!(cluster.replica(0).state(), ReplicaState::Stopped);
    /// # Ok(())
    /// # }
    /// ```
    pub fn state(&self) -> ReplicaState {
        let flags = self.flags();
        if !flags.running {
            ReplicaState::Stopped
        } else if flags.frozen {
            ReplicaState::Frozen
        } else if flags.promoted {
            ReplicaState::Promoted
        } else if flags.paused {
            ReplicaState::Paused
        } else {
            ReplicaState::Replaying
        }
    }

    /// The replica's data directory.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
    /// assert!(cluster.replica(0).data_dir().join("standby.signal").exists());
    /// # Ok(())
    /// # }
    /// ```
    pub fn data_dir(&self) -> &Path {
        &self.node.data
    }

    /// The replica's server log.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
    /// let log = std::fs::read_to_string(cluster.replica(0).log_file()).unwrap();
    /// # Ok(())
    /// # }
    /// ```
    pub fn log_file(&self) -> &Path {
        &self.node.log
    }

    fn frozen_error(&self) -> KitError {
        KitError::Frozen {
            node: self.node.name.clone(),
            hint: "TestCluster::thaw_replica",
        }
    }

    fn flags(&self) -> Flags {
        *self.flags.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, f: impl FnOnce(&mut Flags)) {
        f(&mut self.flags.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Records that the replica was frozen or thawed.
    pub(crate) fn set_frozen(&self, frozen: bool) {
        self.update(|f| f.frozen = frozen);
    }

    /// Fails unless the replica is running and not frozen (and, if
    /// `standby`, still a standby).
    fn require_running(&self, standby: bool) -> Result<Flags, KitError> {
        let flags = self.flags();
        if !flags.running {
            return Err(KitError::NodeStopped {
                node: self.node.name.clone(),
                hint: "TestCluster::start_replica",
            });
        }
        if flags.frozen {
            return Err(self.frozen_error());
        }
        if standby && flags.promoted {
            return Err(KitError::Promoted {
                node: self.node.name.clone(),
            });
        }
        Ok(flags)
    }
}

impl TestCluster {
    /// A builder for a cluster; without [`ClusterBuilder::replica`] calls
    /// the cluster is just a primary.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let cluster = TestCluster::builder()
    ///     .replica(Duration::from_millis(250))
    ///     .start()
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// Starts a primary and one replica per entry of `apply_delays`, with
    /// default settings.
    ///
    /// # Errors
    ///
    /// As [`ClusterBuilder::start`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let cluster = TestCluster::start_with_delays(&[
    ///     Duration::from_millis(50),
    ///     Duration::from_millis(200),
    /// ])
    /// .await?;
    /// assert_eq!(cluster.replica_count(), 2);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start_with_delays(apply_delays: &[Duration]) -> Result<Self, KitError> {
        apply_delays
            .iter()
            .fold(Self::builder(), |builder, &delay| builder.replica(delay))
            .start()
            .await
    }

    /// The primary's connection URL,
    /// `postgres://postgres@127.0.0.1:<port>/postgres` (no password needed).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[]).await?;
    /// let pool = sqlx::PgPool::connect(cluster.primary_url()).await.unwrap();
    /// # Ok(())
    /// # }
    /// ```
    pub fn primary_url(&self) -> &str {
        &self.primary_url
    }

    /// The primary's TCP port on 127.0.0.1.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[]).await?;
    /// assert!(cluster.primary_url().contains(&cluster.primary_port().to_string()));
    /// # Ok(())
    /// # }
    /// ```
    pub fn primary_port(&self) -> u16 {
        self.primary.port
    }

    /// The replicas' connection URLs, in index order.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO, Duration::ZERO]).await?;
    /// let urls = cluster.replica_urls();
    /// assert_eq!(urls.len(), 2);
    /// assert_eq!(urls[0], cluster.replica(0).url());
    /// # Ok(())
    /// # }
    /// ```
    pub fn replica_urls(&self) -> Vec<String> {
        self.replicas.iter().map(|r| r.url.clone()).collect()
    }

    /// The replicas' TCP ports on 127.0.0.1, in index order: what a reader
    /// endpoint ([`TcpProxy::start_balanced`]) is put in front of.
    ///
    /// [`TcpProxy::start_balanced`]: crate::TcpProxy::start_balanced
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::{TcpProxy, TestCluster};
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let cluster = TestCluster::start_with_delays(&[Duration::ZERO, Duration::ZERO]).await?;
    /// let ports = cluster.replica_ports();
    /// assert_eq!(ports, [cluster.replica(0).port(), cluster.replica(1).port()]);
    /// let reader_endpoint = TcpProxy::start_balanced(&ports).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn replica_ports(&self) -> Vec<u16> {
        self.replicas.iter().map(|r| r.node.port).collect()
    }

    /// How many replicas the cluster has.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
    /// assert_eq!(cluster.replica_count(), 1);
    /// # Ok(())
    /// # }
    /// ```
    pub fn replica_count(&self) -> usize {
        self.replicas.len()
    }

    /// The replica with index `index`.
    ///
    /// # Panics
    ///
    /// If `index >= replica_count()`, like slice indexing; see
    /// [`replicas`](Self::replicas) for a non-panicking alternative.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::from_millis(50)]).await?;
    /// assert_eq!(cluster.replica(0).apply_delay(), Duration::from_millis(50));
    /// # Ok(())
    /// # }
    /// ```
    pub fn replica(&self, index: usize) -> &ReplicaInfo {
        &self.replicas[index]
    }

    /// All replicas, in index order.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
    /// for replica in cluster.replicas() {
    ///     println!("{}: {:?}", replica.name(), replica.apply_delay());
    /// }
    /// assert!(cluster.replicas().get(5).is_none());
    /// # Ok(())
    /// # }
    /// ```
    pub fn replicas(&self) -> &[ReplicaInfo] {
        &self.replicas
    }

    /// The cluster's directory: one subdirectory per node (`primary`,
    /// `replica-1`, ...), each holding `data/` and `postgres.log`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[]).await?;
    /// assert!(cluster.dir().join("primary/postgres.log").exists());
    /// # Ok(())
    /// # }
    /// ```
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The primary's data directory.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[]).await?;
    /// assert!(cluster.primary_data_dir().join("PG_VERSION").exists());
    /// # Ok(())
    /// # }
    /// ```
    pub fn primary_data_dir(&self) -> &Path {
        &self.primary.data
    }

    /// The primary's server log.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[]).await?;
    /// assert!(cluster.primary_log_file().exists());
    /// # Ok(())
    /// # }
    /// ```
    pub fn primary_log_file(&self) -> &Path {
        &self.primary.log
    }

    /// The server version as a number, e.g. `150004` for 15.4.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[]).await?;
    /// assert!(cluster.server_version_num() >= 130000);
    /// # Ok(())
    /// # }
    /// ```
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// Opens a connection to the primary.
    ///
    /// # Errors
    ///
    /// [`KitError::Sql`] if the primary does not accept it (is it stopped?).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[]).await?;
    /// let mut conn = cluster.connect_primary().await?;
    /// let one: i32 = sqlx::query_scalar("select 1").fetch_one(&mut conn).await.unwrap();
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_primary(&self) -> Result<PgConnection, KitError> {
        connect(&self.primary, false).await
    }

    /// Opens a connection to replica `index`.
    ///
    /// # Errors
    ///
    /// [`KitError::NoSuchReplica`], [`KitError::Frozen`] if it is frozen
    /// (connect to [`ReplicaInfo::url`] yourself, under a timeout, to see a
    /// connection hang), or [`KitError::Sql`] if the replica does not
    /// accept it.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
    /// let mut conn = cluster.connect_replica(0).await?;
    /// let standby: bool = sqlx::query_scalar("select pg_is_in_recovery()")
    ///     .fetch_one(&mut conn)
    ///     .await
    ///     .unwrap();
    /// assert!(standby);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect_replica(&self, index: usize) -> Result<PgConnection, KitError> {
        let replica = self.get(index)?;
        if replica.flags().frozen {
            return Err(replica.frozen_error());
        }
        connect(&replica.node, false).await
    }

    /// Runs `sql` on the primary with the simple query protocol, so it may
    /// hold several `;`-separated statements, and returns the number of rows
    /// affected. Like `psql -c`, several statements run in one implicit
    /// transaction unless `sql` holds its own `begin`/`commit`.
    ///
    /// # Errors
    ///
    /// [`KitError::Sql`] if a statement fails.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[]).await?;
    /// let rows = cluster
    ///     .execute_on_primary("create table t (id int); insert into t values (1), (2)")
    ///     .await?;
    /// assert_eq!(rows, 2);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn execute_on_primary(&self, sql: &str) -> Result<u64, KitError> {
        let mut conn = self.connect_primary().await?;
        // The caller's own SQL, run as given: a test kit's job.
        let result = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut conn)
            .await
            .map_err(|e| sql_error(&self.primary, "running SQL on the primary", e))?;
        let _ = conn.close().await;
        Ok(result.rows_affected())
    }

    /// Runs `sql` on replica `index` the way
    /// [`execute_on_primary`](Self::execute_on_primary) runs it on the
    /// primary (simple query protocol, several statements allowed), and
    /// returns the number of rows affected. A standby refuses writes; reads,
    /// `set`, `checkpoint` and the like work.
    ///
    /// # Errors
    ///
    /// [`KitError::NoSuchReplica`], [`KitError::Frozen`], or
    /// [`KitError::Sql`] if it is stopped or a statement fails.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
    /// cluster.execute_on_replica(0, "select pg_is_in_recovery()").await?;
    /// assert!(cluster.execute_on_replica(0, "create table t (id int)").await.is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn execute_on_replica(&self, index: usize, sql: &str) -> Result<u64, KitError> {
        let mut conn = self.connect_replica(index).await?;
        let node = &self.get(index)?.node;
        // The caller's own SQL, run as given: a test kit's job.
        let result = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut conn)
            .await
            .map_err(|e| sql_error(node, "running SQL on the replica", e))?;
        let _ = conn.close().await;
        Ok(result.rows_affected())
    }

    /// Pauses WAL replay on replica `index` (`pg_wal_replay_pause()`) and
    /// waits until the server reports it paused. Writes on the primary stay
    /// invisible there until [`resume_replay`](Self::resume_replay).
    ///
    /// If the replica is waiting out its apply delay for a commit, the pause
    /// takes effect only after that wait, just before the commit is applied;
    /// so this can take up to the apply delay.
    ///
    /// # Errors
    ///
    /// [`KitError::NoSuchReplica`], [`KitError::NodeStopped`],
    /// [`KitError::Frozen`], [`KitError::Promoted`], or
    /// [`KitError::NotReady`] if the pause is not
    /// confirmed within the timeout plus the apply delay.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
    /// cluster.pause_replay(0).await?;
    /// cluster.execute_on_primary("create table t (id int)").await?;
    /// // ... the replica does not see `t` ...
    /// cluster.resume_replay(0).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn pause_replay(&self, index: usize) -> Result<(), KitError> {
        let replica = self.get(index)?;
        replica.require_running(true)?;
        let node = &replica.node;
        let mut conn = connect(node, true).await?;
        sqlx::query("select pg_wal_replay_pause()")
            .execute(&mut conn)
            .await
            .map_err(|e| sql_error(node, "pausing replay", e))?;
        // Since PostgreSQL 14 a pause is only requested until the startup
        // process acknowledges it; before, pg_is_wal_replay_paused() turned
        // true at once.
        if self.server_version_num >= 140000 {
            let timeout = self.env.timeout + replica.apply_delay();
            let deadline = Instant::now() + timeout;
            loop {
                let state: String = sqlx::query_scalar("select pg_get_wal_replay_pause_state()")
                    .fetch_one(&mut conn)
                    .await
                    .map_err(|e| sql_error(node, "reading the replay pause state", e))?;
                if state == "paused" {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(KitError::NotReady {
                        node: node.name.clone(),
                        timeout,
                        last_error: format!("replay pause state is still {state:?}"),
                        log_tail: node.log_tail(),
                    });
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
        let _ = conn.close().await;
        replica.update(|f| f.paused = true);
        Ok(())
    }

    /// Resumes WAL replay on replica `index` (`pg_wal_replay_resume()`).
    ///
    /// # Errors
    ///
    /// [`KitError::NoSuchReplica`], [`KitError::NodeStopped`],
    /// [`KitError::Frozen`], [`KitError::Promoted`] or [`KitError::Sql`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
    /// cluster.pause_replay(0).await?;
    /// cluster.resume_replay(0).await?;
    /// cluster.wait_for_replicas_caught_up(Duration::from_secs(5)).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn resume_replay(&self, index: usize) -> Result<(), KitError> {
        let replica = self.get(index)?;
        replica.require_running(true)?;
        let mut conn = connect(&replica.node, true).await?;
        sqlx::query("select pg_wal_replay_resume()")
            .execute(&mut conn)
            .await
            .map_err(|e| sql_error(&replica.node, "resuming replay", e))?;
        let _ = conn.close().await;
        replica.update(|f| f.paused = false);
        Ok(())
    }

    /// Stops replica `index` cleanly (`pg_ctl stop -m fast`). Does nothing
    /// if it is already stopped.
    ///
    /// # Errors
    ///
    /// [`KitError::NoSuchReplica`], [`KitError::Frozen`] (a frozen server
    /// cannot shut down: thaw it, or [`kill_replica`](Self::kill_replica)),
    /// or [`KitError::Command`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
    /// cluster.stop_replica(0).await?;
    /// assert!(cluster.connect_replica(0).await.is_err());
    /// cluster.start_replica(0).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn stop_replica(&self, index: usize) -> Result<(), KitError> {
        let replica = self.get(index)?;
        let flags = replica.flags();
        if !flags.running {
            return Ok(());
        }
        if flags.frozen {
            return Err(replica.frozen_error());
        }
        self.stop_node(&replica.node, "fast").await?;
        replica.update(|f| {
            f.running = false;
            f.paused = false;
        });
        Ok(())
    }

    /// Crashes replica `index`: SIGKILL to its postmaster and all its
    /// server processes, then waits until they are gone and its port is
    /// closed. [`start_replica`](Self::start_replica) brings it back
    /// through crash recovery. Works on a frozen replica too.
    ///
    /// # Errors
    ///
    /// [`KitError::NoSuchReplica`], or [`KitError::NotReady`] if the
    /// processes do not go away.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
    /// cluster.kill_replica(0).await?;
    /// cluster.start_replica(0).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn kill_replica(&self, index: usize) -> Result<(), KitError> {
        let replica = self.get(index)?;
        self.kill_node(&replica.node).await?;
        replica.update(|f| {
            f.running = false;
            f.paused = false;
            f.frozen = false;
        });
        Ok(())
    }

    /// Starts replica `index` after [`stop_replica`](Self::stop_replica) or
    /// [`kill_replica`](Self::kill_replica), and waits until it accepts
    /// connections (in recovery, unless it was promoted). Does nothing if it
    /// is running. Replay is not paused after a restart.
    ///
    /// # Errors
    ///
    /// [`KitError::NoSuchReplica`], [`KitError::Command`] or
    /// [`KitError::NotReady`], with the tail of the replica's log.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
    /// cluster.stop_replica(0).await?;
    /// cluster.start_replica(0).await?;
    /// let _conn = cluster.connect_replica(0).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start_replica(&self, index: usize) -> Result<(), KitError> {
        let replica = self.get(index)?;
        let flags = replica.flags();
        if flags.running {
            return Ok(());
        }
        self.start_node(&replica.node, Some(!flags.promoted))
            .await?;
        replica.update(|f| {
            f.running = true;
            f.paused = false;
        });
        Ok(())
    }

    /// Promotes replica `index` to a primary (`pg_promote()`), waiting until
    /// it leaves recovery. It then accepts writes on a new timeline; the
    /// other replicas keep following the original primary.
    ///
    /// # Errors
    ///
    /// [`KitError::NoSuchReplica`], [`KitError::NodeStopped`],
    /// [`KitError::Frozen`], or [`KitError::NotReady`] if promotion does not
    /// finish in time.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
    /// cluster.promote_replica(0).await?;
    /// let mut conn = cluster.connect_replica(0).await?;
    /// sqlx::query("create table written_on_the_new_primary (id int)")
    ///     .execute(&mut conn)
    ///     .await
    ///     .unwrap();
    /// # Ok(())
    /// # }
    /// ```
    pub async fn promote_replica(&self, index: usize) -> Result<(), KitError> {
        let replica = self.get(index)?;
        if replica.require_running(false)?.promoted {
            return Ok(());
        }
        let node = &replica.node;
        let mut conn = connect(node, true).await?;
        let secs = self.env.timeout.as_secs().clamp(1, i32::MAX as u64) as i32;
        let promoted: bool = sqlx::query_scalar("select pg_promote(true, $1)")
            .bind(secs)
            .fetch_one(&mut conn)
            .await
            .map_err(|e| sql_error(node, "promoting", e))?;
        let _ = conn.close().await;
        if !promoted {
            return Err(KitError::NotReady {
                node: node.name.clone(),
                timeout: self.env.timeout,
                last_error: "pg_promote() returned false: promotion did not finish".into(),
                log_tail: node.log_tail(),
            });
        }
        replica.update(|f| {
            f.promoted = true;
            f.paused = false;
        });
        wait_ready(node, Some(false), self.env.timeout).await
    }

    /// Stops the primary cleanly (`pg_ctl stop -m fast`); replicas keep
    /// running and retry connecting to it. Does nothing if it is stopped.
    ///
    /// # Errors
    ///
    /// [`KitError::Command`] if `pg_ctl` fails.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[]).await?;
    /// cluster.stop_primary().await?;
    /// assert!(cluster.connect_primary().await.is_err());
    /// cluster.start_primary().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn stop_primary(&self) -> Result<(), KitError> {
        if !self.primary_running.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.stop_node(&self.primary, "fast").await?;
        self.primary_running.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Crashes the primary: SIGKILL to all its server processes. See
    /// [`kill_replica`](Self::kill_replica).
    ///
    /// # Errors
    ///
    /// [`KitError::NotReady`] if the processes do not go away.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[]).await?;
    /// cluster.kill_primary().await?;
    /// cluster.start_primary().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn kill_primary(&self) -> Result<(), KitError> {
        self.kill_node(&self.primary).await?;
        self.primary_running.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Starts the primary after [`stop_primary`](Self::stop_primary) or
    /// [`kill_primary`](Self::kill_primary) and waits until it accepts
    /// connections. Does nothing if it is running.
    ///
    /// # Errors
    ///
    /// [`KitError::Command`] or [`KitError::NotReady`], with the tail of the
    /// primary's log.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[]).await?;
    /// cluster.stop_primary().await?;
    /// cluster.start_primary().await?;
    /// cluster.execute_on_primary("select 1").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start_primary(&self) -> Result<(), KitError> {
        if self.primary_running.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.start_node(&self.primary, Some(false)).await?;
        self.primary_running.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Changes replica `index`'s `recovery_min_apply_delay` while it runs
    /// (`ALTER SYSTEM` and `pg_reload_conf()`, which work on a hot standby),
    /// or in its configuration file while it is stopped. A commit the
    /// replica is already waiting on is released by the new delay.
    ///
    /// # Errors
    ///
    /// [`KitError::NoSuchReplica`], [`KitError::Promoted`],
    /// [`KitError::Frozen`], [`KitError::Sql`], or [`KitError::NotReady`] if
    /// the new value does not show up.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
    /// cluster.set_apply_delay(0, Duration::from_secs(2)).await?;
    /// cluster.set_apply_delay(0, Duration::ZERO).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn set_apply_delay(&self, index: usize, delay: Duration) -> Result<(), KitError> {
        let replica = self.get(index)?;
        let flags = replica.flags();
        if flags.promoted {
            return Err(KitError::Promoted {
                node: replica.node.name.clone(),
            });
        }
        if flags.running && flags.frozen {
            return Err(replica.frozen_error());
        }
        let node = &replica.node;
        if !flags.running {
            let env = self.env.clone();
            let offline = node.clone();
            blocking(move || {
                offline
                    .write_node_settings(&env, &[("recovery_min_apply_delay", node::millis(delay))])
            })
            .await?;
        } else {
            let mut conn = connect(node, true).await?;
            // Utility statements take no bind parameters; this is a number.
            let ms = delay.as_millis();
            // Two round trips: several statements in one simple query form
            // an implicit transaction, and ALTER SYSTEM refuses to run in one.
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "alter system set recovery_min_apply_delay = '{ms}ms'"
            )))
            .execute(&mut conn)
            .await
            .map_err(|e| sql_error(node, "changing recovery_min_apply_delay", e))?;
            sqlx::query("select pg_reload_conf()")
                .execute(&mut conn)
                .await
                .map_err(|e| sql_error(node, "reloading the configuration", e))?;
            let _ = conn.close().await;
            // pg_reload_conf() only signals the server: wait until a new
            // session sees the new value, which the startup process (woken
            // by the same SIGHUP) has then also read.
            let deadline = Instant::now() + self.env.timeout;
            loop {
                let mut conn = connect(node, true).await?;
                let current: i64 = sqlx::query_scalar(
                    "select setting::bigint from pg_settings where name = 'recovery_min_apply_delay'",
                )
                .fetch_one(&mut conn)
                .await
                .map_err(|e| sql_error(node, "reading recovery_min_apply_delay", e))?;
                let _ = conn.close().await;
                if current as u128 == ms {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(KitError::NotReady {
                        node: node.name.clone(),
                        timeout: self.env.timeout,
                        last_error: format!(
                            "recovery_min_apply_delay is still {current}ms, not {ms}ms, after a reload"
                        ),
                        log_tail: node.log_tail(),
                    });
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
        replica
            .apply_delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Waits until every replica that is replaying (running, not paused, not
    /// frozen, not promoted) has applied all WAL the primary had flushed when this was
    /// called, so every transaction committed before the call is visible on
    /// those replicas. With an apply delay this takes at least the delay
    /// after the last commit.
    ///
    /// The target is the primary's `pg_current_wal_flush_lsn()`, compared
    /// with each replica's `pg_last_wal_replay_lsn()`. Not
    /// `pg_current_wal_insert_lsn()`: on an idle primary it points past the
    /// header of the next WAL page (e.g. `0/3000028` while replicas have
    /// replayed up to `0/3000000`), which no replica ever reaches.
    ///
    /// # Errors
    ///
    /// [`KitError::NodeStopped`] if the primary is stopped, or
    /// [`KitError::CatchUpTimeout`] naming the replica that fell behind.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::from_millis(200)]).await?;
    /// cluster.execute_on_primary("create table t (id int)").await?;
    /// cluster.wait_for_replicas_caught_up(Duration::from_secs(5)).await?;
    /// let mut conn = cluster.connect_replica(0).await?;
    /// sqlx::query("select * from t").execute(&mut conn).await.unwrap();
    /// # Ok(())
    /// # }
    /// ```
    pub async fn wait_for_replicas_caught_up(&self, timeout: Duration) -> Result<(), KitError> {
        let deadline = Instant::now() + timeout;
        if !self.primary_running.load(Ordering::SeqCst) {
            return Err(KitError::NodeStopped {
                node: self.primary.name.clone(),
                hint: "TestCluster::start_primary",
            });
        }
        let mut conn = connect(&self.primary, true).await?;
        let target: i64 = sqlx::query_scalar("select (pg_current_wal_flush_lsn() - '0/0')::bigint")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| sql_error(&self.primary, "reading the primary's WAL position", e))?;
        let _ = conn.close().await;

        for replica in &self.replicas {
            if replica.state() != ReplicaState::Replaying {
                continue;
            }
            let node = &replica.node;
            let mut conn: Option<PgConnection> = None;
            let mut replayed: Option<i64> = None;
            loop {
                if conn.is_none() {
                    conn = connect(node, true).await.ok();
                }
                if let Some(c) = conn.as_mut() {
                    match sqlx::query_scalar::<_, Option<i64>>(
                        "select (pg_last_wal_replay_lsn() - '0/0')::bigint",
                    )
                    .fetch_one(&mut *c)
                    .await
                    {
                        Ok(lsn) => replayed = lsn,
                        Err(_) => conn = None,
                    }
                }
                if replayed.is_some_and(|lsn| lsn >= target) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(KitError::CatchUpTimeout {
                        node: node.name.clone(),
                        replayed: replayed.map_or_else(|| "unknown".to_owned(), format_lsn),
                        target: format_lsn(target),
                        timeout,
                        log_tail: node.log_tail(),
                    });
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            if let Some(c) = conn {
                let _ = c.close().await;
            }
        }
        Ok(())
    }

    fn get(&self, index: usize) -> Result<&ReplicaInfo, KitError> {
        self.replicas.get(index).ok_or(KitError::NoSuchReplica {
            index,
            count: self.replicas.len(),
        })
    }

    async fn stop_node(&self, node: &Node, mode: &'static str) -> Result<(), KitError> {
        let env = self.env.clone();
        let node = node.clone();
        blocking(move || node.stop(&env, mode)).await
    }

    async fn kill_node(&self, node: &Node) -> Result<(), KitError> {
        let env = self.env.clone();
        let node = node.clone();
        blocking(move || node.kill(&env)).await
    }

    async fn start_node(&self, node: &Node, in_recovery: Option<bool>) -> Result<(), KitError> {
        let env = self.env.clone();
        let mut owned = node.clone();
        // The port must not change: URLs were handed out.
        blocking(move || owned.start(&env, false)).await?;
        wait_ready(node, in_recovery, self.env.timeout).await
    }
}

/// What the fault drills (`faults.rs`) need from inside the cluster.
impl TestCluster {
    pub(crate) fn env(&self) -> &Env {
        &self.env
    }

    pub(crate) fn primary_node(&self) -> &Node {
        &self.primary
    }

    pub(crate) fn primary_is_running(&self) -> bool {
        self.primary_running.load(Ordering::SeqCst)
    }

    pub(crate) fn replica_node(&self, index: usize) -> Result<&Node, KitError> {
        Ok(&self.get(index)?.node)
    }

    pub(crate) fn replica_info(&self, index: usize) -> Result<&ReplicaInfo, KitError> {
        self.get(index)
    }
}

/// Creates `count` replica nodes (`replica-1`, ...) under `cluster_dir`,
/// each holding a copy of the data directory of `primary`, which must be
/// cleanly stopped. The copies are made in parallel: they are mostly system
/// time (about a thousand files), which a second core halves.
///
/// Copying needs no `pg_basebackup` (which the `@embedded-postgres`
/// packages lack) and is no slower than it: the primary's data directory
/// is small right after `initdb`, and the replicas then start at once.
fn clone_replicas(
    env: &Env,
    cluster_dir: &Path,
    primary: &Node,
    count: usize,
) -> Result<Vec<Node>, KitError> {
    std::thread::scope(|scope| {
        let copying: Vec<_> = (1..=count)
            .map(|n| {
                scope.spawn(move || {
                    let replica = Node::create(env, cluster_dir, &format!("replica-{n}"))?;
                    replica.clone_by_copy(env, primary)?;
                    tracing::debug!(node = %replica.name, "copied the primary's data directory");
                    Ok(replica)
                })
            })
            .collect();
        // Join every copy before returning, so that none is still writing
        // when an error drops (and removes) the cluster directory.
        let results: Vec<Result<Node, KitError>> = copying
            .into_iter()
            .map(|copy| {
                copy.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect();
        results.into_iter().collect()
    })
}

/// Runs blocking work (processes, files) on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KitError> + Send + 'static,
) -> Result<T, KitError> {
    tokio::task::spawn_blocking(f).await.map_err(join_error)?
}

fn join_error(e: tokio::task::JoinError) -> KitError {
    KitError::io(
        "running a blocking test-kit task",
        std::io::Error::other(e.to_string()),
    )
}

pub(crate) async fn connect(node: &Node, quiet: bool) -> Result<PgConnection, KitError> {
    let options = if quiet {
        node.quiet_connect_options()
    } else {
        node.connect_options()
    };
    PgConnection::connect_with(&options)
        .await
        .map_err(|e| sql_error(node, &format!("connecting to {}", node.url()), e))
}

pub(crate) fn sql_error(node: &Node, context: &str, source: sqlx::Error) -> KitError {
    KitError::Sql {
        context: format!("{context} ({})", node.name),
        log_file: node.log.display().to_string(),
        source,
    }
}

/// Waits until `node` accepts connections and, if `in_recovery` is given,
/// `pg_is_in_recovery()` says so.
async fn wait_ready(
    node: &Node,
    in_recovery: Option<bool>,
    timeout: Duration,
) -> Result<(), KitError> {
    let deadline = Instant::now() + timeout;
    let mut last_error;
    loop {
        match connect(node, true).await {
            Ok(mut conn) => {
                let result: Result<bool, _> = sqlx::query_scalar("select pg_is_in_recovery()")
                    .fetch_one(&mut conn)
                    .await;
                let _ = conn.close().await;
                match (result, in_recovery) {
                    (Ok(_), None) => return Ok(()),
                    (Ok(actual), Some(expected)) if actual == expected => return Ok(()),
                    (Ok(actual), Some(_)) => {
                        last_error = format!("pg_is_in_recovery() is {actual}");
                    }
                    (Err(e), _) => last_error = e.to_string(),
                }
            }
            Err(e) => last_error = e.to_string(),
        }
        if Instant::now() > deadline {
            return Err(KitError::NotReady {
                node: node.name.clone(),
                timeout,
                last_error,
                log_tail: node.log_tail(),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Formats an LSN the way PostgreSQL does (`16/B374D848`).
pub(crate) fn format_lsn(lsn: i64) -> String {
    let lsn = lsn as u64;
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_types_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<TestCluster>();
        assert_send_sync::<KitError>();
        assert_send_sync::<ClusterBuilder>();
    }

    #[test]
    fn lsn_formatting() {
        assert_eq!(format_lsn(0x3000028), "0/3000028");
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
    }

    #[tokio::test]
    async fn invalid_setting_is_rejected_before_anything_starts() {
        let err = TestCluster::builder()
            .setting("work_mem = 1\nfsync", "on")
            .start()
            .await
            .unwrap_err();
        assert!(matches!(err, KitError::InvalidSetting { .. }), "{err}");
    }
}

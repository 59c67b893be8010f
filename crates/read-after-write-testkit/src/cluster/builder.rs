//! [`ClusterBuilder`]: what a cluster is made of, and how it starts.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::Connection;

use super::replica::{Flags, ReplicaInfo};
use super::TestCluster;
use crate::node::{self, Env, Node};
use crate::process::RunAs;
use crate::sql::{connect, sql_error, wait_ready};
use crate::wait::{blocking, join_error, DEFAULT_TIMEOUT};
use crate::workdir::ClusterDir;
use crate::{KitError, PgBinaries};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ClusterBuilder>();
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

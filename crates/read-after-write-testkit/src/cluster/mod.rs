//! [`TestCluster`]: a running cluster, its accessors, and the drop that
//! thaws what the kit froze before the directory's teardown stops the
//! servers. The cluster's controls live in one file per concern: building
//! and starting (`builder`), connections and SQL (`connections`), replay
//! (`replay`), node lifecycle and freezing (`nodes`); its replicas in
//! `replica`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::node::{Env, Node};
use crate::workdir::ClusterDir;
use crate::KitError;

mod builder;
mod connections;
mod nodes;
mod replay;
mod replica;

pub use builder::ClusterBuilder;
pub use replica::{ReplicaInfo, ReplicaState};

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

impl TestCluster {
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

    fn get(&self, index: usize) -> Result<&ReplicaInfo, KitError> {
        self.replicas.get(index).ok_or(KitError::NoSuchReplica {
            index,
            count: self.replicas.len(),
        })
    }
}

/// What the fault drills (`faults`, built on the cluster) need from inside
/// it; the cluster never calls into them.
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

    /// The primary, or [`KitError::NodeStopped`].
    pub(crate) fn running_primary(&self) -> Result<&Node, KitError> {
        let node = self.primary_node();
        if !self.primary_is_running() {
            return Err(KitError::NodeStopped {
                node: node.name.clone(),
                hint: "TestCluster::start_primary",
            });
        }
        Ok(node)
    }
}

/// Thaws every node left frozen, so that the cluster directory's teardown
/// (`pg_ctl stop -m immediate`, which a stopped process would not answer)
/// can stop it.
impl Drop for TestCluster {
    fn drop(&mut self) {
        let replicas = self.replicas.iter().map(|r| &r.node);
        for node in std::iter::once(&self.primary).chain(replicas) {
            if node.is_frozen() {
                tracing::debug!(node = %node.name, "thawing a frozen node before stopping it");
                let _ = node.thaw();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_types_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<TestCluster>();
        assert_send_sync::<KitError>();
    }
}

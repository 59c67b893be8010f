//! [`ReplicaInfo`] and [`ReplicaState`]: one replica of a cluster and what
//! the kit's controls know it to be doing.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::node::Node;
use crate::KitError;

/// A replica of a [`TestCluster`](crate::TestCluster).
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
    pub(super) node: Node,
    pub(super) url: String,
    pub(super) apply_delay_ms: AtomicU64,
    pub(super) flags: Mutex<Flags>,
}

/// What the kit's controls did to a replica.
#[derive(Debug, Clone, Copy)]
pub(super) struct Flags {
    pub(super) running: bool,
    pub(super) paused: bool,
    pub(super) promoted: bool,
    /// Stopped by `SIGSTOP` ([`TestCluster::freeze_replica`](crate::TestCluster::freeze_replica)); the other
    /// flags say what it does once thawed.
    pub(super) frozen: bool,
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
    /// Running, with replay paused by [`TestCluster::pause_replay`](crate::TestCluster::pause_replay).
    Paused,
    /// Stopped or killed.
    Stopped,
    /// Promoted by [`TestCluster::promote_replica`](crate::TestCluster::promote_replica): running as a primary.
    Promoted,
    /// Frozen by [`TestCluster::freeze_replica`](crate::TestCluster::freeze_replica): its processes are stopped
    /// (`SIGSTOP`) and answer nothing until
    /// [`TestCluster::thaw_replica`](crate::TestCluster::thaw_replica), after which it is in the state it was
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

    pub(super) fn frozen_error(&self) -> KitError {
        KitError::Frozen {
            node: self.node.name.clone(),
            hint: "TestCluster::thaw_replica",
        }
    }

    pub(super) fn flags(&self) -> Flags {
        *self.flags.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut Flags)) {
        f(&mut self.flags.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Records that the replica was frozen or thawed.
    pub(super) fn set_frozen(&self, frozen: bool) {
        self.update(|f| f.frozen = frozen);
    }

    /// Fails unless the replica is running and not frozen (and, if
    /// `standby`, still a standby).
    pub(super) fn require_running(&self, standby: bool) -> Result<Flags, KitError> {
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

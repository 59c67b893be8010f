//! Node controls: stop, kill, start and promote a replica or the primary,
//! and freeze or thaw one (`SIGSTOP` / `SIGCONT`).

use std::sync::atomic::Ordering;

use sqlx::Connection;

use super::{ReplicaState, TestCluster};
use crate::node::Node;
use crate::sql::{connect, sql_error, wait_ready};
use crate::wait::blocking;
use crate::KitError;

impl TestCluster {
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

/// Freezing and thawing: what a client sees of a stalled machine.
impl TestCluster {
    /// Freezes the primary: `SIGSTOP` to its postmaster and every child,
    /// waiting until all of them are stopped. It keeps its sockets and
    /// accepts TCP connections (the kernel does that), but answers nothing:
    /// open connections hang, new ones hang in the startup handshake, and
    /// replicas receive no WAL. What a client sees of a stalled machine or a
    /// partition that drops packets.
    ///
    /// [`thaw_primary`](Self::thaw_primary) resumes it. Dropping the
    /// cluster thaws it too, but a frozen primary in a cluster that is never
    /// dropped (a `static`) ignores the watchdog's shutdown: thaw it before
    /// the test ends. Do not stop it while frozen (`pg_ctl stop` would wait
    /// in vain); [`kill_primary`](Self::kill_primary) works.
    ///
    /// # Errors
    ///
    /// [`KitError::NodeStopped`] if the primary is not running, or
    /// [`KitError::NotReady`] if its processes do not all stop in time.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[]).await?;
    /// let mut conn = cluster.connect_primary().await?;
    /// cluster.freeze_primary().await?;
    /// let query = sqlx::query("select 1").execute(&mut conn);
    /// assert!(tokio::time::timeout(Duration::from_secs(1), query).await.is_err());
    /// cluster.thaw_primary().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn freeze_primary(&self) -> Result<(), KitError> {
        let node = self.running_primary()?.clone();
        let timeout = self.env.timeout;
        blocking(move || node.freeze(timeout, "TestCluster::start_primary")).await
    }

    /// Resumes a primary frozen by [`freeze_primary`](Self::freeze_primary):
    /// `SIGCONT` to its postmaster and every child. Queries that waited go
    /// on. Does nothing if the primary is not running or not frozen.
    ///
    /// # Errors
    ///
    /// [`KitError::Io`] if a process cannot be signalled.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[]).await?;
    /// cluster.freeze_primary().await?;
    /// cluster.thaw_primary().await?;
    /// cluster.execute_on_primary("select 1").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn thaw_primary(&self) -> Result<(), KitError> {
        let node = self.primary.clone();
        blocking(move || node.thaw()).await
    }

    /// Freezes replica `index` the way
    /// [`freeze_primary`](Self::freeze_primary) freezes the primary:
    /// `SIGSTOP` to its postmaster and every child, waiting until all of
    /// them are stopped. Nothing is closed and no reset is sent: open
    /// connections hang, new ones hang in the startup handshake, and the
    /// replica neither receives nor replays WAL. What a client sees of a
    /// replica on a stalled machine, or of one behind a partition.
    ///
    /// Its [`ReplicaState`] is [`ReplicaState::Frozen`] until
    /// [`thaw_replica`](Self::thaw_replica); meanwhile the kit's controls
    /// that would wait for it ([`connect_replica`](Self::connect_replica),
    /// [`pause_replay`](Self::pause_replay),
    /// [`stop_replica`](Self::stop_replica), ...) fail with
    /// [`KitError::Frozen`] instead of hanging,
    /// [`wait_for_replicas_caught_up`](Self::wait_for_replicas_caught_up)
    /// and failovers leave it out, and
    /// [`kill_replica`](Self::kill_replica) works. Dropping the cluster
    /// thaws it before stopping it; a cluster that is never dropped (a
    /// `static`) must thaw it before the test ends, as for the primary.
    /// Freezing a frozen replica does nothing more.
    ///
    /// # Errors
    ///
    /// [`KitError::NoSuchReplica`], [`KitError::NodeStopped`] if it is not
    /// running, or [`KitError::NotReady`] if its processes do not all stop
    /// in time (it is then marked frozen: thaw it).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::{ReplicaState, TestCluster};
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
    /// let mut conn = cluster.connect_replica(0).await?;
    /// cluster.freeze_replica(0).await?;
    /// assert_eq!(cluster.replica(0).state(), ReplicaState::Frozen);
    /// let query = sqlx::query("select 1").execute(&mut conn);
    /// assert!(tokio::time::timeout(Duration::from_secs(1), query).await.is_err());
    /// cluster.thaw_replica(0).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn freeze_replica(&self, index: usize) -> Result<(), KitError> {
        let replica = self.get(index)?;
        if replica.state() == ReplicaState::Stopped {
            return Err(KitError::NodeStopped {
                node: replica.name().to_owned(),
                hint: "TestCluster::start_replica",
            });
        }
        // Marked first: a freeze that fails half-way leaves some processes
        // stopped, and thaw_replica (or the drop) must still see to them.
        replica.set_frozen(true);
        let node = replica.node.clone();
        let timeout = self.env.timeout;
        let result = blocking(move || node.freeze(timeout, "TestCluster::start_replica")).await;
        if let Err(KitError::NodeStopped { .. }) = result {
            replica.set_frozen(false);
        }
        result
    }

    /// Resumes replica `index` after [`freeze_replica`](Self::freeze_replica):
    /// `SIGCONT` to its postmaster and every child. Queries that waited go
    /// on, and the replica receives and replays the WAL it missed. Does
    /// nothing to a replica that is not frozen.
    ///
    /// # Errors
    ///
    /// [`KitError::NoSuchReplica`], or [`KitError::Io`] if a process cannot
    /// be signalled.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::{ReplicaState, TestCluster};
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
    /// cluster.freeze_replica(0).await?;
    /// cluster.thaw_replica(0).await?;
    /// assert_eq!(cluster.replica(0).state(), ReplicaState::Replaying);
    /// cluster.execute_on_replica(0, "select 1").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn thaw_replica(&self, index: usize) -> Result<(), KitError> {
        let replica = self.get(index)?;
        if replica.state() != ReplicaState::Frozen {
            return Ok(());
        }
        let node = replica.node.clone();
        blocking(move || node.thaw()).await?;
        replica.set_frozen(false);
        Ok(())
    }
}

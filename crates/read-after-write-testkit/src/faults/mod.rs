//! Fault drills on a [`TestCluster`], built on its controls: broken
//! connections, replicas detached from or re-pointed at another server, and
//! failovers (`failover`), planned or losing WAL, described by a
//! [`Failover`]. Freezing a node is a node control of the cluster itself.
//!
//! Split brain needs nothing from here: [`TestCluster::promote_replica`]
//! while the primary runs.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use read_after_write_testkit::TestCluster;
//!
//! # async fn example() -> Result<(), read_after_write_testkit::KitError> {
//! let cluster = TestCluster::start_with_delays(&[Duration::ZERO, Duration::ZERO]).await?;
//! cluster.execute_on_primary("create table t (id int); insert into t values (1)").await?;
//! let failover = cluster.planned_failover(0).await?;
//! // replica-1 is the primary now, on timeline 2, and replica-2 follows it.
//! assert_eq!(failover.timeline, 2);
//! let url = format!("postgres://postgres@127.0.0.1:{}/postgres", failover.port);
//! # Ok(())
//! # }
//! ```

use std::time::{Duration, Instant};

use sqlx::Connection;

use crate::node::Node;
use crate::sql::{connect, sql_error};
use crate::wait::POLL_INTERVAL;
use crate::{KitError, ReplicaState, TestCluster};

mod failover;

pub use failover::Failover;

impl TestCluster {
    /// Terminates every client session of the primary
    /// (`pg_terminate_backend()` on each `client backend` but the kit's own;
    /// WAL senders and background processes stay), and waits until they are
    /// gone. Their clients see `FATAL: terminating connection due to
    /// administrator command` or a closed connection on their next query.
    /// Returns how many sessions were terminated.
    ///
    /// # Errors
    ///
    /// [`KitError::NodeStopped`], [`KitError::Sql`], or
    /// [`KitError::NotReady`] if a terminated session does not go away.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[]).await?;
    /// let mut conn = cluster.connect_primary().await?;
    /// assert_eq!(cluster.terminate_primary_connections().await?, 1);
    /// assert!(sqlx::query("select 1").execute(&mut conn).await.is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn terminate_primary_connections(&self) -> Result<u64, KitError> {
        let node = self.running_primary()?;
        let mut conn = connect(node, true).await?;
        let pids: Vec<i32> = sqlx::query_scalar(
            "select pid from pg_stat_activity \
             where backend_type = 'client backend' and pid <> pg_backend_pid()",
        )
        .fetch_all(&mut conn)
        .await
        .map_err(|e| sql_error(node, "listing client sessions", e))?;
        let mut terminated = Vec::with_capacity(pids.len());
        for pid in pids {
            // False (with a warning) for a session that ended meanwhile.
            let signalled: bool = sqlx::query_scalar("select pg_terminate_backend($1)")
                .bind(pid)
                .fetch_one(&mut conn)
                .await
                .map_err(|e| sql_error(node, "terminating a client session", e))?;
            if signalled {
                terminated.push(pid);
            }
        }
        let deadline = Instant::now() + self.env().timeout;
        loop {
            let left: Vec<i32> =
                sqlx::query_scalar("select pid from pg_stat_activity where pid = any($1)")
                    .bind(&terminated)
                    .fetch_all(&mut conn)
                    .await
                    .map_err(|e| sql_error(node, "waiting for sessions to end", e))?;
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(KitError::NotReady {
                    node: node.name.clone(),
                    timeout: self.env().timeout,
                    last_error: format!("terminated sessions {left:?} are still there"),
                    log_tail: node.log_tail(),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        let _ = conn.close().await;
        Ok(terminated.len() as u64)
    }

    /// Detaches replica `index` from its upstream: empties its
    /// `primary_conninfo` (`ALTER SYSTEM` and a reload) and waits until its
    /// WAL receiver has stopped. It stays in recovery and serves reads, but
    /// falls behind: it still replays the WAL it had received, and nothing
    /// more. [`follow`](Self::follow) attaches it again.
    ///
    /// A replica holding back received WAL (an apply delay) stops its WAL
    /// receiver only once it has replayed it, so this can take up to its
    /// apply delay while the primary is busy.
    ///
    /// # Errors
    ///
    /// [`KitError::NoSuchReplica`], [`KitError::NodeStopped`],
    /// [`KitError::Frozen`], [`KitError::Promoted`], [`KitError::Sql`], or
    /// [`KitError::NotReady`] if the WAL receiver does not stop in time.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
    /// cluster.detach_replica(0).await?;
    /// cluster.execute_on_primary("create table t (id int)").await?;
    /// // ... replica 0 never gets `t` ...
    /// cluster.follow(0, cluster.primary_port()).await?;
    /// cluster.wait_for_replicas_caught_up(Duration::from_secs(5)).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn detach_replica(&self, index: usize) -> Result<(), KitError> {
        let node = self.standby(index)?;
        set_primary_conninfo(node, "", self.env().timeout).await?;
        let timeout = self.env().timeout + self.replica(index).apply_delay();
        let deadline = Instant::now() + timeout;
        let mut conn = connect(node, true).await?;
        loop {
            let receivers: i64 = sqlx::query_scalar("select count(*) from pg_stat_wal_receiver")
                .fetch_one(&mut conn)
                .await
                .map_err(|e| sql_error(node, "reading pg_stat_wal_receiver", e))?;
            if receivers == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(KitError::NotReady {
                    node: node.name.clone(),
                    timeout,
                    last_error: "the WAL receiver is still running with an empty primary_conninfo"
                        .into(),
                    log_tail: node.log_tail(),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        let _ = conn.close().await;
        Ok(())
    }

    /// Points replica `index`'s WAL receiver at the server on
    /// 127.0.0.1:`upstream_port` (`primary_conninfo` by `ALTER SYSTEM` and a
    /// reload), e.g. to follow a promoted replica, or to re-attach a
    /// replica after [`detach_replica`](Self::detach_replica). Its
    /// `recovery_target_timeline` stays `latest`, so it moves to the
    /// upstream's timeline if it can.
    ///
    /// Returns once the replica has the new setting; its WAL receiver
    /// reconnects the next time it needs WAL (at once if it is waiting for
    /// some). Whether it then streams is up to the servers: a replica that
    /// replayed past the point where the upstream's timeline forked off its
    /// own stays behind (see
    /// [`unplanned_failover_with_orphan`](Self::unplanned_failover_with_orphan)).
    ///
    /// # Errors
    ///
    /// [`KitError::NoSuchReplica`], [`KitError::NodeStopped`],
    /// [`KitError::Frozen`], [`KitError::Promoted`], [`KitError::Sql`], or
    /// [`KitError::NotReady`] if the setting does not show up.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO, Duration::ZERO]).await?;
    /// cluster.promote_replica(0).await?;
    /// // Cascade: replica 1 now follows replica 0 (on its new timeline).
    /// cluster.follow(1, cluster.replica(0).port()).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn follow(&self, index: usize, upstream_port: u16) -> Result<(), KitError> {
        let node = self.standby(index)?;
        let conninfo = format!(
            "host=127.0.0.1 port={upstream_port} user=postgres application_name={}",
            node.name
        );
        set_primary_conninfo(node, &conninfo, self.env().timeout).await
    }

    /// Replica `index` if it runs as a standby.
    fn standby(&self, index: usize) -> Result<&Node, KitError> {
        let node = self.replica_node(index)?;
        match self.replica(index).state() {
            ReplicaState::Stopped => Err(KitError::NodeStopped {
                node: node.name.clone(),
                hint: "TestCluster::start_replica",
            }),
            ReplicaState::Frozen => Err(KitError::Frozen {
                node: node.name.clone(),
                hint: "TestCluster::thaw_replica",
            }),
            ReplicaState::Promoted => Err(KitError::Promoted {
                node: node.name.clone(),
            }),
            _ => Ok(node),
        }
    }
}

/// Sets `primary_conninfo` on a running standby and waits until a new
/// session sees it (the startup process, woken by the same reload, then has
/// it too).
async fn set_primary_conninfo(
    node: &Node,
    conninfo: &str,
    timeout: Duration,
) -> Result<(), KitError> {
    let mut conn = connect(node, true).await?;
    // ALTER SYSTEM takes no bind parameters; quote the literal.
    // Quoted: single quotes doubled.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "alter system set primary_conninfo = '{}'",
        conninfo.replace('\'', "''")
    )))
    .execute(&mut conn)
    .await
    .map_err(|e| sql_error(node, "changing primary_conninfo", e))?;
    sqlx::query("select pg_reload_conf()")
        .execute(&mut conn)
        .await
        .map_err(|e| sql_error(node, "reloading the configuration", e))?;
    let _ = conn.close().await;
    let deadline = Instant::now() + timeout;
    loop {
        let mut conn = connect(node, true).await?;
        let current: String = sqlx::query_scalar("select current_setting('primary_conninfo')")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| sql_error(node, "reading primary_conninfo", e))?;
        let _ = conn.close().await;
        if current == conninfo {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(KitError::NotReady {
                node: node.name.clone(),
                timeout,
                last_error: format!(
                    "primary_conninfo is still {current:?}, not {conninfo:?}, after a reload"
                ),
                log_tail: node.log_tail(),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

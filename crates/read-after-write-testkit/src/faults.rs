//! Fault drills on a [`TestCluster`]: a frozen primary or replica, broken connections,
//! replicas detached from or re-pointed at another server, and failovers,
//! planned or losing WAL, described by a [`Failover`].
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

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sqlx::Connection;

use crate::cluster::{blocking, connect, format_lsn, sql_error, POLL_INTERVAL};
use crate::node::{Env, Node};
use crate::process;
use crate::{KitError, ReplicaState, TestCluster};

/// The table [`TestCluster::unplanned_failover_with_orphan`] writes on the
/// old primary after detaching the future primary: the orphan has it, the
/// new primary never does.
const ORPHANED_WRITES_TABLE: &str = "read_after_write_testkit_orphaned_writes";

/// What a failover changed: which replica is the primary now, where, on
/// which timeline, and where that timeline forked off the old one.
///
/// # Examples
///
/// ```no_run
/// # use std::time::Duration;
/// # use read_after_write_testkit::TestCluster;
/// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
/// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO, Duration::ZERO]).await?;
/// let failover = cluster.unplanned_failover_with_orphan(0, 1).await?;
/// assert_eq!(failover.new_primary, 0);
/// assert_eq!(failover.port, cluster.replica(0).port());
/// assert_eq!(failover.orphan, Some(1));
/// println!("timeline {} forked at {}", failover.timeline, failover.fork_lsn);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Failover {
    /// The index of the promoted replica.
    pub new_primary: usize,
    /// Its port on 127.0.0.1: where writes go now.
    pub port: u16,
    /// Its new timeline (2 after the first failover of a cluster).
    pub timeline: u32,
    /// Where the new timeline forked off the old one, as PostgreSQL prints
    /// an LSN (`0/3000158`): the switch point in the new timeline's history
    /// file. The new primary has exactly the old timeline's WAL up to here.
    pub fork_lsn: String,
    /// The replica left behind on the old timeline with WAL the new primary
    /// never had ([`TestCluster::unplanned_failover_with_orphan`]).
    pub orphan: Option<usize>,
}

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
        let timeout = self.env().timeout;
        blocking(move || freeze(&node, timeout, "TestCluster::start_primary")).await
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
        let data = self.primary_node().data.clone();
        blocking(move || thaw(&data)).await
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
        let replica = self.replica_info(index)?;
        if replica.state() == ReplicaState::Stopped {
            return Err(KitError::NodeStopped {
                node: replica.name().to_owned(),
                hint: "TestCluster::start_replica",
            });
        }
        // Marked first: a freeze that fails half-way leaves some processes
        // stopped, and thaw_replica (or the drop) must still see to them.
        replica.set_frozen(true);
        let node = self.replica_node(index)?.clone();
        let timeout = self.env().timeout;
        let result = blocking(move || freeze(&node, timeout, "TestCluster::start_replica")).await;
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
        let replica = self.replica_info(index)?;
        if replica.state() != ReplicaState::Frozen {
            return Ok(());
        }
        let data = self.replica_node(index)?.data.clone();
        blocking(move || thaw(&data)).await?;
        replica.set_frozen(false);
        Ok(())
    }

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

    /// A planned failover (a switchover) to replica `new_primary`, losing
    /// nothing:
    ///
    /// 1. stops the primary cleanly (`pg_ctl stop -m fast`, whose shutdown
    ///    ships all WAL, up to the shutdown checkpoint, to every connected
    ///    replica);
    /// 2. waits until every replaying replica (running, not paused, not
    ///    promoted) has replayed past that checkpoint, which can take up to
    ///    its apply delay;
    /// 3. promotes `new_primary` (resuming its replay first if it was
    ///    paused);
    /// 4. points every other running replica at it with
    ///    [`follow`](Self::follow), and waits until the replaying ones
    ///    stream its new timeline.
    ///
    /// Stopped and frozen replicas keep pointing at the old primary: after
    /// [`start_replica`](Self::start_replica) or
    /// [`thaw_replica`](Self::thaw_replica), call [`follow`](Self::follow). The old primary stays stopped;
    /// [`primary_url`](Self::primary_url) still names it, and
    /// [`Failover::port`] is where writes go now.
    ///
    /// # Errors
    ///
    /// [`KitError::NoSuchReplica`], [`KitError::NodeStopped`] (the primary
    /// or `new_primary` is not running), [`KitError::Frozen`] (`new_primary`
    /// is), [`KitError::Promoted`],
    /// [`KitError::CatchUpTimeout`] if a replica did not get all the WAL
    /// (it was disconnected when the primary stopped), or
    /// [`KitError::NotReady`] if a replica does not follow in time.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO, Duration::ZERO]).await?;
    /// cluster.execute_on_primary("create table t (id int); insert into t values (1)").await?;
    /// let failover = cluster.planned_failover(0).await?;
    /// let url = format!("postgres://postgres@127.0.0.1:{}/postgres", failover.port);
    /// let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await.unwrap();
    /// sqlx::query("insert into t values (2)").execute(&mut conn).await.unwrap();
    /// // Replica 1 follows the new primary and gets the row.
    /// # Ok(())
    /// # }
    /// ```
    pub async fn planned_failover(&self, new_primary: usize) -> Result<Failover, KitError> {
        self.standby(new_primary)?;
        self.running_primary()?;
        if self.replica(new_primary).state() == ReplicaState::Paused {
            self.resume_replay(new_primary).await?;
        }
        self.stop_primary().await?;
        let checkpoint = self.last_checkpoint_of_stopped_primary().await?;
        for index in 0..self.replica_count() {
            if self.replica(index).state() == ReplicaState::Replaying {
                self.wait_replayed_past(index, checkpoint).await?;
            }
        }
        self.promote_replica(new_primary).await?;
        let (port, timeline, fork_lsn) = self.new_timeline(new_primary).await?;
        let mut followers = Vec::new();
        for index in (0..self.replica_count()).filter(|&i| i != new_primary) {
            match self.replica(index).state() {
                ReplicaState::Replaying => {
                    self.follow(index, port).await?;
                    followers.push(index);
                }
                // It switches timelines when its replay resumes.
                ReplicaState::Paused => self.follow(index, port).await?,
                _ => {}
            }
        }
        for index in followers {
            self.wait_streaming(index, port, timeline).await?;
        }
        tracing::info!(new_primary, port, timeline, %fork_lsn, "planned failover done");
        Ok(Failover {
            new_primary,
            port,
            timeline,
            fork_lsn: format_lsn(fork_lsn),
            orphan: None,
        })
    }

    /// An unplanned failover that loses WAL and leaves an orphan replica:
    ///
    /// 1. detaches `new_primary` ([`detach_replica`](Self::detach_replica));
    /// 2. writes on the primary (rows in a kit-owned table,
    ///    `read_after_write_testkit_orphaned_writes`, created there) until
    ///    `orphan` has replayed past everything `new_primary` received
    ///    (`orphan`'s apply delay is set to zero meanwhile, then restored);
    /// 3. kills the primary (`SIGKILL`), promotes `new_primary`, and points
    ///    `orphan` at it.
    ///
    /// The orphan cannot follow (its log says "new timeline N forked off
    /// current database system timeline 1 before current recovery point"):
    /// it stays in recovery on the old timeline, serving reads of WAL the new
    /// primary never had, such as that table and its rows. This checks that
    /// the orphan is still in recovery and has replayed past
    /// [`Failover::fork_lsn`] before returning. Other replicas keep
    /// pointing at the dead primary; [`follow`](Self::follow) them if you
    /// like (a replica that had not replayed past the fork point can).
    ///
    /// # Errors
    ///
    /// [`KitError::Io`] if `new_primary == orphan`;
    /// [`KitError::NoSuchReplica`], [`KitError::NodeStopped`],
    /// [`KitError::Frozen`] or [`KitError::Promoted`] if either replica (or
    /// the primary) is not usable; [`KitError::NotReady`] if a step does not happen in time or
    /// the orphan did not end up orphaned.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::TestCluster;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let cluster = TestCluster::start_with_delays(&[Duration::ZERO, Duration::ZERO]).await?;
    /// let failover = cluster.unplanned_failover_with_orphan(0, 1).await?;
    /// let mut orphan = cluster.connect_replica(1).await?;
    /// let rows: i64 = sqlx::query_scalar(
    ///     "select count(*) from read_after_write_testkit_orphaned_writes",
    /// )
    /// .fetch_one(&mut orphan)
    /// .await
    /// .unwrap();
    /// assert!(rows > 0); // rows the new primary does not have
    /// # Ok(())
    /// # }
    /// ```
    pub async fn unplanned_failover_with_orphan(
        &self,
        new_primary: usize,
        orphan: usize,
    ) -> Result<Failover, KitError> {
        if new_primary == orphan {
            return Err(KitError::io(
                "unplanned_failover_with_orphan",
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "the new primary and the orphan are both replica {orphan}: \
                         pass two different replica indexes"
                    ),
                ),
            ));
        }
        self.standby(new_primary)?;
        self.standby(orphan)?;
        self.running_primary()?;
        for index in [new_primary, orphan] {
            if self.replica(index).state() == ReplicaState::Paused {
                self.resume_replay(index).await?;
            }
        }
        let delay = self.replica(orphan).apply_delay();
        if !delay.is_zero() {
            self.set_apply_delay(orphan, Duration::ZERO).await?;
        }
        let result = self.orphan_and_fail_over(new_primary, orphan).await;
        if !delay.is_zero() {
            let restored = self.set_apply_delay(orphan, delay).await;
            if result.is_ok() {
                restored?;
            }
        }
        let failover = result?;
        tracing::info!(
            new_primary,
            orphan,
            port = failover.port,
            timeline = failover.timeline,
            fork_lsn = %failover.fork_lsn,
            "unplanned failover with an orphan done"
        );
        Ok(failover)
    }

    /// The steps of [`unplanned_failover_with_orphan`] while the orphan
    /// replays without delay.
    ///
    /// [`unplanned_failover_with_orphan`]: Self::unplanned_failover_with_orphan
    async fn orphan_and_fail_over(
        &self,
        new_primary: usize,
        orphan: usize,
    ) -> Result<Failover, KitError> {
        self.detach_replica(new_primary).await?;
        // Promotion replays everything the replica received, so that is
        // where the new timeline will fork.
        let detached = self.replica_node(new_primary)?;
        let mut conn = connect(detached, true).await?;
        let received: i64 = sqlx::query_scalar(
            "select (greatest(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()) - '0/0')::bigint",
        )
        .fetch_one(&mut conn)
        .await
        .map_err(|e| sql_error(detached, "reading the detached replica's WAL position", e))?;
        let _ = conn.close().await;

        let primary = self.primary_node();
        let mut conn = connect(primary, true).await?;
        let mut created = false;
        loop {
            let write = if created {
                format!("insert into {ORPHANED_WRITES_TABLE} default values")
            } else {
                format!(
                    "create table if not exists {ORPHANED_WRITES_TABLE} \
                     (id bigserial primary key, written_at timestamptz not null default now()); \
                     insert into {ORPHANED_WRITES_TABLE} default values"
                )
            };
            sqlx::raw_sql(sqlx::AssertSqlSafe(write.clone()))
                .execute(&mut conn)
                .await
                .map_err(|e| sql_error(primary, "writing WAL the new primary will miss", e))?;
            created = true;
            let written: i64 =
                sqlx::query_scalar("select (pg_current_wal_flush_lsn() - '0/0')::bigint")
                    .fetch_one(&mut conn)
                    .await
                    .map_err(|e| sql_error(primary, "reading the primary's WAL position", e))?;
            if written > received {
                self.wait_replayed_past(orphan, written - 1).await?;
                break;
            }
        }
        let _ = conn.close().await;

        self.kill_primary().await?;
        self.promote_replica(new_primary).await?;
        let (port, timeline, fork_lsn) = self.new_timeline(new_primary).await?;
        self.follow(orphan, port).await?;

        let node = self.replica_node(orphan)?;
        let mut conn = connect(node, true).await?;
        let (in_recovery, replayed): (bool, i64) = sqlx::query_as(
            "select pg_is_in_recovery(), (pg_last_wal_replay_lsn() - '0/0')::bigint",
        )
        .fetch_one(&mut conn)
        .await
        .map_err(|e| sql_error(node, "checking the orphan", e))?;
        let _ = conn.close().await;
        if !in_recovery || replayed <= fork_lsn {
            return Err(KitError::NotReady {
                node: node.name.clone(),
                timeout: self.env().timeout,
                last_error: format!(
                    "the orphan should be in recovery past the fork point {}, but \
                     pg_is_in_recovery() is {in_recovery} and it replayed up to {}",
                    format_lsn(fork_lsn),
                    format_lsn(replayed)
                ),
                log_tail: node.log_tail(),
            });
        }
        Ok(Failover {
            new_primary,
            port,
            timeline,
            fork_lsn: format_lsn(fork_lsn),
            orphan: Some(orphan),
        })
    }

    /// The primary, or [`KitError::NodeStopped`].
    fn running_primary(&self) -> Result<&Node, KitError> {
        let node = self.primary_node();
        if !self.primary_is_running() {
            return Err(KitError::NodeStopped {
                node: node.name.clone(),
                hint: "TestCluster::start_primary",
            });
        }
        Ok(node)
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

    /// The location of the stopped primary's last checkpoint, from
    /// After a clean shutdown, the shutdown checkpoint: the last WAL record
    /// the primary wrote.
    async fn last_checkpoint_of_stopped_primary(&self) -> Result<i64, KitError> {
        let env = self.env().clone();
        let node = self.primary_node().clone();
        blocking(move || last_checkpoint(&env, &node)).await
    }

    /// Waits until replica `index` has replayed WAL beyond `lsn`.
    async fn wait_replayed_past(&self, index: usize, lsn: i64) -> Result<(), KitError> {
        let node = self.replica_node(index)?;
        let timeout = self.env().timeout + self.replica(index).apply_delay();
        let deadline = Instant::now() + timeout;
        let mut conn = connect(node, true).await?;
        loop {
            let replayed: Option<i64> =
                sqlx::query_scalar("select (pg_last_wal_replay_lsn() - '0/0')::bigint")
                    .fetch_one(&mut conn)
                    .await
                    .map_err(|e| sql_error(node, "reading the replay position", e))?;
            if replayed.is_some_and(|replayed| replayed > lsn) {
                break;
            }
            if Instant::now() > deadline {
                return Err(KitError::CatchUpTimeout {
                    node: node.name.clone(),
                    replayed: replayed.map_or_else(|| "unknown".to_owned(), format_lsn),
                    target: format_lsn(lsn + 1),
                    timeout,
                    log_tail: node.log_tail(),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        let _ = conn.close().await;
        Ok(())
    }

    /// The port, timeline and fork point of promoted replica `index`.
    async fn new_timeline(&self, index: usize) -> Result<(u16, u32, i64), KitError> {
        let node = self.replica_node(index)?;
        let mut conn = connect(node, true).await?;
        let file: String =
            sqlx::query_scalar("select substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")
                .fetch_one(&mut conn)
                .await
                .map_err(|e| sql_error(node, "reading the new timeline", e))?;
        let timeline = u32::from_str_radix(&file, 16)
            .map_err(|_| not_ready(node, format!("unexpected WAL file timeline {file:?}"), self))?;
        let history: String = sqlx::query_scalar("select pg_read_file($1)")
            .bind(format!("pg_wal/{timeline:08X}.history"))
            .fetch_one(&mut conn)
            .await
            .map_err(|e| sql_error(node, "reading the new timeline's history file", e))?;
        let _ = conn.close().await;
        let fork = fork_point(&history).ok_or_else(|| {
            not_ready(
                node,
                format!("no switch point in the history of timeline {timeline}: {history:?}"),
                self,
            )
        })?;
        Ok((node.port, timeline, fork))
    }

    /// Waits until replica `index` streams `timeline` from `port`.
    async fn wait_streaming(&self, index: usize, port: u16, timeline: u32) -> Result<(), KitError> {
        let node = self.replica_node(index)?;
        let timeout = self.env().timeout;
        let deadline = Instant::now() + timeout;
        let mut conn = connect(node, true).await?;
        loop {
            let (streaming, receiver): (bool, String) = sqlx::query_as(
                "select coalesce(bool_or(status = 'streaming' and sender_port = $1 \
                                         and receive_start_tli = $2), false), \
                        coalesce(string_agg(format('%s from port %s, timeline %s', \
                                 status, sender_port, receive_start_tli), ', '), 'none') \
                 from pg_stat_wal_receiver",
            )
            .bind(i32::from(port))
            .bind(timeline as i32)
            .fetch_one(&mut conn)
            .await
            .map_err(|e| sql_error(node, "reading pg_stat_wal_receiver", e))?;
            if streaming {
                break;
            }
            if Instant::now() > deadline {
                return Err(KitError::NotReady {
                    node: node.name.clone(),
                    timeout,
                    last_error: format!(
                        "not streaming timeline {timeline} from port {port} (WAL receiver: {receiver})"
                    ),
                    log_tail: node.log_tail(),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        let _ = conn.close().await;
        Ok(())
    }
}

/// Thaws every node left frozen, so that the cluster directory's teardown
/// (`pg_ctl stop -m immediate`, which a stopped process would not answer)
/// can stop it.
impl Drop for TestCluster {
    fn drop(&mut self) {
        let replicas = (0..self.replica_count()).filter_map(|i| self.replica_node(i).ok());
        for node in std::iter::once(self.primary_node()).chain(replicas) {
            if let Some(pid) = process::postmaster_pid(&node.data) {
                if process_state(pid) == Some('T') {
                    tracing::debug!(node = %node.name, pid, "thawing a frozen node before stopping it");
                    let _ = thaw(&node.data);
                }
            }
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

/// `SIGSTOP` to the postmaster (so it forks nothing new), then to each
/// child, until every one of them is stopped. `start_hint` names the
/// method that starts the node, for when it is not running.
fn freeze(node: &Node, timeout: Duration, start_hint: &'static str) -> Result<(), KitError> {
    let Some(postmaster) =
        process::postmaster_pid(&node.data).filter(|&pid| !process::process_is_gone(pid))
    else {
        return Err(KitError::NodeStopped {
            node: node.name.clone(),
            hint: start_hint,
        });
    };
    signal(postmaster, Signal::SIGSTOP)?;
    let deadline = Instant::now() + timeout;
    loop {
        let mut pids = process::children_of(postmaster);
        pids.push(postmaster);
        // A zombie is a child that exited; the frozen postmaster cannot
        // reap it, and it has nothing left to do.
        let running: Vec<i32> = pids
            .into_iter()
            .filter(|&pid| !matches!(process_state(pid), None | Some('T' | 'Z' | 'X')))
            .collect();
        if running.is_empty() {
            tracing::debug!(node = %node.name, postmaster, "frozen");
            return Ok(());
        }
        for &pid in &running {
            signal(pid, Signal::SIGSTOP)?;
        }
        if Instant::now() > deadline {
            return Err(KitError::NotReady {
                node: node.name.clone(),
                timeout,
                last_error: format!("processes {running:?} did not stop after SIGSTOP"),
                log_tail: node.log_tail(),
            });
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// `SIGCONT` to every child of the postmaster recorded in `data`, then to
/// the postmaster.
fn thaw(data: &Path) -> Result<(), KitError> {
    let Some(postmaster) = process::postmaster_pid(data) else {
        return Ok(());
    };
    if process::process_is_gone(postmaster) {
        return Ok(());
    }
    for child in process::children_of(postmaster) {
        signal(child, Signal::SIGCONT)?;
    }
    signal(postmaster, Signal::SIGCONT)
}

/// Sends `signal` to `pid`, ignoring a process that is already gone.
fn signal(pid: i32, signal: Signal) -> Result<(), KitError> {
    match kill(Pid::from_raw(pid), signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(KitError::io(
            format!("sending {signal} to process {pid}"),
            e.into(),
        )),
    }
}

/// A process's state letter (`R`, `S`, `D`, `T` for stopped, `Z`...), from
/// `/proc/<pid>/stat`; `None` if it is gone (or not on Linux).
fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the parenthesised command name, which may itself
    // contain spaces and parentheses.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.trim_start().chars().next()
}

/// The latest checkpoint location of a stopped node, read from
/// `global/pg_control` itself: relocatable builds (the npm packages the kit
/// uses for PostgreSQL 16 to 18) ship no `pg_controldata`.
///
/// `ControlFileData` starts with the system identifier (8 bytes), the
/// control file and catalog versions (4 + 4), the cluster state (4, then 4
/// of padding) and the time (8); `checkPoint` follows at byte 32, in the
/// machine's byte order. The layout has held since PostgreSQL 9.3.
fn last_checkpoint(env: &Env, node: &Node) -> Result<i64, KitError> {
    const CHECKPOINT_OFFSET: usize = 32;
    let path = node.data.join("global").join("pg_control");
    let bytes =
        std::fs::read(&path).map_err(|e| KitError::io(format!("reading {}", path.display()), e))?;
    bytes
        .get(CHECKPOINT_OFFSET..CHECKPOINT_OFFSET + 8)
        .and_then(|raw| <[u8; 8]>::try_from(raw).ok())
        .map(|raw| u64::from_ne_bytes(raw) as i64)
        .filter(|&lsn| lsn > 0)
        .ok_or_else(|| KitError::NotReady {
            node: node.name.clone(),
            timeout: env.timeout,
            last_error: format!("{} holds no checkpoint location", path.display()),
            log_tail: node.log_tail(),
        })
}

/// The switch point of a timeline history file: its last entry reads
/// `<parent timeline>\t<switch LSN>\t<reason>`.
fn fork_point(history: &str) -> Option<i64> {
    history
        .lines()
        .map(str::trim)
        .rfind(|line| !line.is_empty() && !line.starts_with('#'))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(parse_lsn)
}

/// Parses an LSN as PostgreSQL prints it (`16/B374D848`).
fn parse_lsn(text: &str) -> Option<i64> {
    let (high, low) = text.split_once('/')?;
    let high = u64::from_str_radix(high, 16).ok()?;
    let low = u64::from_str_radix(low, 16).ok()?;
    if high > u64::from(u32::MAX) || low > u64::from(u32::MAX) {
        return None;
    }
    i64::try_from(high << 32 | low).ok()
}

fn not_ready(node: &Node, last_error: String, cluster: &TestCluster) -> KitError {
    KitError::NotReady {
        node: node.name.clone(),
        timeout: cluster.env().timeout,
        last_error,
        log_tail: node.log_tail(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_parse_like_postgres_prints_them() {
        assert_eq!(parse_lsn("0/3000028"), Some(0x3000028));
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(parse_lsn("16/B374D848").unwrap()), "16/B374D848");
        assert_eq!(parse_lsn("3000028"), None);
        assert_eq!(parse_lsn("1/100000000"), None);
    }

    #[test]
    fn fork_point_is_the_last_switch() {
        assert_eq!(
            fork_point("1\t0/3000158\tno recovery target specified\n"),
            Some(0x3000158)
        );
        assert_eq!(
            fork_point(
                "1\t0/3000158\tno recovery target specified\n\n\
                 2\t0/5000060\tno recovery target specified\n"
            ),
            Some(0x5000060)
        );
        assert_eq!(fork_point(""), None);
    }

    #[test]
    fn own_process_is_running_not_stopped() {
        let state = process_state(std::process::id() as i32);
        assert!(matches!(state, Some('R' | 'S')), "{state:?}");
        assert_eq!(process_state(i32::MAX), None);
    }
}

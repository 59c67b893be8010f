//! Failovers: planned (a switchover that loses nothing) and unplanned
//! (losing WAL and leaving an orphan replica), and the [`Failover`] they
//! report.

use std::time::{Duration, Instant};

use sqlx::Connection;

use crate::node::{Env, Node};
use crate::sql::{connect, format_lsn, parse_lsn, sql_error};
use crate::wait::{blocking, POLL_INTERVAL};
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
}

//! Replay controls: pause and resume WAL replay on a replica, change its
//! apply delay, and wait until the replicas have caught up.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

use super::{ReplicaState, TestCluster};
use crate::node;
use crate::sql::{connect, format_lsn, sql_error};
use crate::wait::{blocking, POLL_INTERVAL};
use crate::KitError;

impl TestCluster {
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
}

//! Connections to the nodes and SQL run on them as text.

use sqlx::{Connection, PgConnection};

use super::TestCluster;
use crate::sql::{connect, sql_error};
use crate::KitError;

impl TestCluster {
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
    /// (connect to [`ReplicaInfo::url`](crate::ReplicaInfo::url) yourself, under a timeout, to see a
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
}

//! Counting what the primary ran for the workload, by the database itself:
//! `pg_stat_statements` on the primary, reset before a strategy's measured
//! window and summed after it.
//!
//! Every statement counts (`pg_stat_statements.track = all`): the app's
//! reads and writes, the layer's captures, the trackers' polls, the pools'
//! session setup. The lab's own background load runs as its own role,
//! [`BACKGROUND_ROLE`] (the counter writer, the burst writer), and is left
//! out, as are the statements that reset and read the view.

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};

/// The role the lab's background writers connect as, so the statements
/// they run on the primary are told apart from the workload's.
pub const BACKGROUND_ROLE: &str = "lab_background";

/// The `postgresql.conf` settings every node needs for
/// [`PrimaryStatements`]: load the module, count nested statements too.
pub const SETTINGS: [(&str, &str); 2] = [
    ("shared_preload_libraries", "pg_stat_statements"),
    ("pg_stat_statements.track", "all"),
];

/// Creates the extension and [`BACKGROUND_ROLE`] on the primary (once, as
/// the superuser) and grants the role what the background writers touch:
/// `tables`.
pub async fn install(primary_url: &str, tables: &[&str]) -> Result<(), sqlx::Error> {
    let mut connection = PgConnection::connect(primary_url).await?;
    sqlx::query("create extension if not exists pg_stat_statements")
        .execute(&mut connection)
        .await?;
    let (exists,): (bool,) =
        sqlx::query_as("select exists (select from pg_roles where rolname = $1)")
            .bind(BACKGROUND_ROLE)
            .fetch_one(&mut connection)
            .await?;
    if !exists {
        sqlx::query("create role lab_background login")
            .execute(&mut connection)
            .await?;
    }
    for table in tables {
        // Identifiers take no bind parameters; these are the lab's own names.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "grant select, insert, update, delete on {table} to {BACKGROUND_ROLE}"
        )))
        .execute(&mut connection)
        .await?;
    }
    connection.close().await
}

/// Connects to the primary as [`BACKGROUND_ROLE`].
pub async fn connect_background(primary_url: &str) -> Result<PgConnection, sqlx::Error> {
    let options = PgConnectOptions::from_str(primary_url)?.username(BACKGROUND_ROLE);
    PgConnection::connect_with(&options).await
}

/// A superuser connection to the primary that resets and sums
/// `pg_stat_statements`.
pub struct PrimaryStatements {
    connection: PgConnection,
}

impl PrimaryStatements {
    /// Connects to the primary (as the URL's user, a superuser in the kit).
    pub async fn connect(primary_url: &str) -> Result<Self, sqlx::Error> {
        Ok(PrimaryStatements {
            connection: PgConnection::connect(primary_url).await?,
        })
    }

    /// Forgets every count so far: call it when the measured window opens.
    pub async fn reset(&mut self) -> Result<(), sqlx::Error> {
        sqlx::query("select pg_stat_statements_reset()")
            .execute(&mut self.connection)
            .await?;
        Ok(())
    }

    /// Statements the primary ran since [`reset`](Self::reset), but for the
    /// background role's and this meter's own.
    pub async fn count(&mut self) -> Result<u64, sqlx::Error> {
        let (calls,): (i64,) = sqlx::query_as(
            "select coalesce(sum(calls), 0)::bigint from pg_stat_statements \
             where userid <> (select oid from pg_roles where rolname = $1) \
             and query not ilike '%pg_stat_statements%'",
        )
        .bind(BACKGROUND_ROLE)
        .fetch_one(&mut self.connection)
        .await?;
        Ok(u64::try_from(calls).unwrap_or(0))
    }
}

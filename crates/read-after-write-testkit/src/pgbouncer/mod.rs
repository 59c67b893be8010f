//! [`PgBouncer`]: a throwaway PgBouncer on 127.0.0.1 in front of one server,
//! the connection pooler many deployments put between the app and each
//! PostgreSQL node.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use read_after_write_testkit::{PgBouncer, PoolMode, TestCluster};
//! use sqlx::{Connection, Row};
//!
//! # async fn example() -> Result<(), read_after_write_testkit::KitError> {
//! let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
//! let bouncer = PgBouncer::builder(cluster.replica(0).port())
//!     .pool_mode(PoolMode::Transaction)
//!     .users(["postgres", "app"])
//!     .start()
//!     .await?;
//! let mut conn = sqlx::PgConnection::connect(&bouncer.url("postgres", "postgres"))
//!     .await
//!     .unwrap();
//! // The simple query protocol: PgBouncer 1.18 pools transactions only so.
//! let row = sqlx::raw_sql("select inet_server_port()")
//!     .fetch_one(&mut conn)
//!     .await
//!     .unwrap();
//! assert_eq!(row.get::<i32, _>(0), i32::from(cluster.replica(0).port()));
//! # Ok(())
//! # }
//! ```
//!
//! What it runs, and what PgBouncer 1.18 cannot do in transaction mode, is
//! documented on [`PgBouncer`] itself, where rustdoc shows it.

use std::fmt;
use std::path::PathBuf;

mod builder;
mod config;
mod program;
mod runner;

pub use builder::PgBouncerBuilder;
pub use config::PoolMode;

use runner::Runner;

/// A PgBouncer on 127.0.0.1 in front of one server, for tests of what
/// connection pooling does to a client.
///
/// Dropping it stops PgBouncer (`SIGTERM`: every client connection is
/// closed) and removes its files, blocking for a few milliseconds. It
/// holds no connection or task of the test's runtime, so a `static` one
/// may be shared by several tests; it stops when the process ends.
///
/// # PgBouncer 1.18 and prepared statements
///
/// Debian 12 ships PgBouncer 1.18. In transaction mode it hands each
/// transaction (and each statement outside one) to whichever server
/// connection is free, and before 1.21 (`max_prepared_statements`) it knows
/// nothing of protocol-level prepared statements: a statement prepared on
/// one server connection is missing on the next. A client that prepares
/// statements fails there, at random and more often under concurrency,
/// with `prepared statement "…" does not exist` (or "already exists").
///
/// So through 1.18 in transaction mode, use the simple query protocol, or
/// use [`PoolMode::Session`]. With sqlx, `sqlx::raw_sql(..)` and a plain
/// `&str` passed to an executor method (`conn.execute("…")`) use the simple
/// protocol; `sqlx::query(..)` does not, even without bound parameters: it
/// prepares and caches a named statement (`persistent(false)` makes it
/// unnamed, but sqlx still parses and executes it in two round trips, which
/// a transaction pooler may hand to two different server connections).
///
/// # How it runs
///
/// The program is found as [`PgBouncer::find_program`] says, and runs in
/// the foreground under a small `/bin/sh` that outlives the test process
/// only long enough to stop it: dropping the [`PgBouncer`], or the test
/// process ending in any way, stops PgBouncer and removes its directory
/// (`$TMPDIR/read-after-write-testkit/<pid>-<n>-<random>-pgbouncer/`, with
/// `pgbouncer.ini`, `userlist.txt`, the log `pgbouncer.log`, the pid file
/// and PgBouncer's standard error). `KEEP_TEST_CLUSTER=1` keeps the
/// directory. PgBouncer refuses to run as root: when the tests run as root,
/// it runs as the `postgres` OS user, like the servers.
///
/// Settings: `listen_addr = 127.0.0.1` on a free port and no Unix socket;
/// one wildcard database, `* = host=127.0.0.1 port=<target>`, so any
/// database name reaches the same name on the target; `auth_type = trust`
/// with an `auth_file` that lists the users (PgBouncer wants a user listed
/// even with trust), and the target's own authentication behind it (the
/// kit's clusters trust 127.0.0.1); `ignore_startup_parameters =
/// extra_float_digits`, which sqlx sends; PgBouncer's defaults otherwise
/// (`server_reset_query = DISCARD ALL`, used in session mode; pools of 20
/// server connections per user and database).
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use read_after_write_testkit::{PgBouncer, PoolMode, TestCluster};
///
/// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
/// let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
/// let primary = PgBouncer::builder(cluster.primary_port())
///     .pool_mode(PoolMode::Transaction)
///     .start()
///     .await?;
/// let replica = PgBouncer::builder(cluster.replica(0).port())
///     .pool_mode(PoolMode::Transaction)
///     .start()
///     .await?;
/// // The app under test knows only the two PgBouncer addresses.
/// let primary_url = primary.url("postgres", "postgres");
/// let replica_url = replica.url("postgres", "postgres");
/// # Ok(())
/// # }
/// ```
pub struct PgBouncer {
    port: u16,
    target_port: u16,
    pool_mode: PoolMode,
    /// The running program; dropping it stops PgBouncer and removes its
    /// files.
    runner: Runner,
}

impl PgBouncer {
    /// The port clients connect to, on 127.0.0.1.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::PgBouncer;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let bouncer = PgBouncer::builder(5432).start().await?;
    /// let url = format!("postgres://postgres@127.0.0.1:{}/postgres", bouncer.port());
    /// # Ok(())
    /// # }
    /// ```
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port of the server behind it, on 127.0.0.1.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::PgBouncer;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let bouncer = PgBouncer::builder(5432).start().await?;
    /// assert_eq!(bouncer.target_port(), 5432);
    /// # Ok(())
    /// # }
    /// ```
    pub fn target_port(&self) -> u16 {
        self.target_port
    }

    /// Its pool mode.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::{PgBouncer, PoolMode};
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let bouncer = PgBouncer::builder(5432).start().await?;
    /// assert_eq!(bouncer.pool_mode(), PoolMode::Session);
    /// # Ok(())
    /// # }
    /// ```
    pub fn pool_mode(&self) -> PoolMode {
        self.pool_mode
    }

    /// A connection URL through PgBouncer,
    /// `postgres://<user>@127.0.0.1:<port>/<database>`, with `user` and
    /// `database` percent-encoded. The user must be one of
    /// [`PgBouncerBuilder::users`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::PgBouncer;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let bouncer = PgBouncer::builder(5432).users(["app"]).start().await?;
    /// assert_eq!(
    ///     bouncer.url("app", "shop"),
    ///     format!("postgres://app@127.0.0.1:{}/shop", bouncer.port())
    /// );
    /// # Ok(())
    /// # }
    /// ```
    pub fn url(&self, user: &str, database: &str) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{}",
            percent_encode(user),
            self.port,
            percent_encode(database)
        )
    }

    /// PgBouncer's log file (`pgbouncer.log` in its directory).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::PgBouncer;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let bouncer = PgBouncer::builder(5432).start().await?;
    /// let log = std::fs::read_to_string(bouncer.log_file()).unwrap();
    /// assert!(log.contains("listening on 127.0.0.1"));
    /// # Ok(())
    /// # }
    /// ```
    pub fn log_file(&self) -> PathBuf {
        self.runner.dir().join("pgbouncer.log")
    }
}

impl fmt::Debug for PgBouncer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgBouncer")
            .field("port", &self.port)
            .field("target_port", &self.target_port)
            .field("pool_mode", &self.pool_mode)
            .field("dir", &self.runner.dir())
            .field("pid", &self.runner.pid())
            .finish()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // The runner's own drop stops PgBouncer and removes its files.
        tracing::debug!(port = self.port, "stopping PgBouncer");
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_percent_encoded() {
        assert_eq!(percent_encode("postgres"), "postgres");
        assert_eq!(percent_encode("a b@c/d"), "a%20b%40c%2Fd");
    }
}

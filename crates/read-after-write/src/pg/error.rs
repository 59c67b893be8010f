//! [`PgSetupError`]: why a replica set could not be built.

use std::time::Duration;

use super::capture::CaptureError;

/// Why a driver (`pg::driver::Driver`) could not build a pool.
pub type DriverError = Box<dyn std::error::Error + Send + Sync>;

/// Why a [`PgReplicaSet`](super::PgReplicaSet) could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgSetupError {
    /// No primary was configured.
    #[error("no primary configured: call primary_url or primary_pool")]
    NoPrimary,
    /// A driver's pools (`ReplicaPools`) are built from URLs, and this node
    /// was given as a sqlx pool.
    #[error("{node} was given as a sqlx pool, but this backend builds its own pools: give it as a URL (primary_url, replica_url)")]
    PoolGiven {
        /// The node given as a pool.
        node: String,
    },
    /// A driver (`pg::driver::Driver`) could not build a node's pool.
    #[error("could not build the pool for {node}: {source}")]
    Driver {
        /// The node.
        node: String,
        /// The driver's complaint.
        #[source]
        source: DriverError,
    },
    /// A URL could not be parsed.
    #[error("invalid PostgreSQL URL for {node}: {source}")]
    InvalidUrl {
        /// The node the URL was for.
        node: String,
        /// The parser's complaint.
        #[source]
        source: sqlx::Error,
    },
    /// The primary could not be reached or queried.
    #[error("could not query the primary at {node}: {source}")]
    Primary {
        /// `host:port` of the primary.
        node: String,
        /// What went wrong.
        #[source]
        source: sqlx::Error,
    },
    /// The primary did not answer the setup queries in time.
    #[error(
        "the primary at {node} did not answer within {timeout:?} (down, frozen or unreachable)"
    )]
    PrimaryTimedOut {
        /// `host:port` of the primary.
        node: String,
        /// The bound that passed.
        timeout: Duration,
    },
    /// The primary URL points at a server in recovery.
    #[error("the primary URL points to a standby (pg_is_in_recovery() is true); give the read-write server")]
    PrimaryIsStandby,
    /// The primary reported something unreadable.
    #[error("could not read the primary's WAL position: {0}")]
    Capture(#[from] CaptureError),
    /// A required environment variable is unset or not valid Unicode.
    #[error("environment variable {name} is not set (or not valid Unicode); set it to a PostgreSQL URL such as postgres://app@db-primary:5432/app")]
    MissingEnv {
        /// The variable's name.
        name: &'static str,
    },
    /// Two replicas share a name.
    #[error("two replicas are named {0:?}; names must be unique")]
    DuplicateName(String),
    /// The heartbeat table named with
    /// [`heartbeat_table`](super::PgReplicaSetBuilder::heartbeat_table)
    /// cannot be used.
    #[error("heartbeat table {table:?}: {why}; create it with read_after_write::pg::HEARTBEAT_DDL and grant SELECT, INSERT, UPDATE on it to the application's role, or leave heartbeat_table unset")]
    Heartbeat {
        /// The table's name.
        table: String,
        /// What is wrong.
        why: &'static str,
    },
}

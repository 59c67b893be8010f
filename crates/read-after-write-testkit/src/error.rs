//! The error type of the test kit.

use std::io;
use std::time::Duration;

/// Everything that can go wrong while starting or driving a [`TestCluster`].
///
/// Every message says what to do about it; when a server was involved the
/// message ends with the tail of that server's log file.
///
/// [`TestCluster`]: crate::TestCluster
///
/// # Examples
///
/// ```
/// use read_after_write_testkit::{KitError, PgBinaries};
///
/// match PgBinaries::from_dir("/nonexistent") {
///     Err(KitError::BinariesNotFound { .. }) => {}
///     other => panic!("unexpected: {other:?}"),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KitError {
    /// The PostgreSQL server programs could not be found.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found \
         (looked in {searched}); set PG_BIN=/path/to/bin or install them: \
         `apt-get install postgresql` (Debian/Ubuntu), `dnf install postgresql-server` \
         (Fedora/RHEL), `brew install postgresql@16` (macOS)"
    )]
    BinariesNotFound {
        /// The places that were searched.
        searched: String,
    },

    /// The process runs as root, and there is no unprivileged OS user to run
    /// the server as (`initdb` and `postgres` refuse to run as root).
    #[error(
        "running as root, but there is no `{user}` OS user to run the PostgreSQL server as \
         (initdb and postgres refuse to run as root); create it with \
         `useradd --system --user-group --no-create-home {user}` or run as a non-root user"
    )]
    NoServerUser {
        /// The OS user that was looked for.
        user: String,
    },

    /// A file system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the kit was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A PostgreSQL program (`initdb`, `pg_ctl`) exited with
    /// an error.
    #[error(
        "`{command}` failed ({status}); check the output below, and that the temporary \
         directory is writable and not full:\n{output}{log_tail}"
    )]
    Command {
        /// The command line that was run.
        command: String,
        /// How it exited.
        status: String,
        /// What it printed (stdout and stderr).
        output: String,
        /// The tail of the server log, or an empty string.
        log_tail: String,
    },

    /// A server did not accept connections (or did not reach the expected
    /// role) in time.
    #[error(
        "{node} was not ready within {timeout:?} ({last_error}); the machine may be \
         overloaded (raise ClusterBuilder::startup_timeout) or the server failed to start{log_tail}"
    )]
    NotReady {
        /// The node's name (`primary`, `replica-1`, ...).
        node: String,
        /// How long the kit waited.
        timeout: Duration,
        /// The last thing that went wrong while waiting.
        last_error: String,
        /// The tail of the server log, or an empty string.
        log_tail: String,
    },

    /// The PostgreSQL installation is older than the kit supports.
    #[error(
        "PostgreSQL {found} is too old: the test kit needs PostgreSQL 13 or newer; \
         point PG_BIN at a newer installation"
    )]
    UnsupportedVersion {
        /// The major version that was found.
        found: String,
    },

    /// A SQL statement sent by the kit failed.
    #[error("{context} failed: {source}; is the server running? (see its log file at {log_file})")]
    Sql {
        /// What the kit was doing.
        context: String,
        /// Where the node's server log is.
        log_file: String,
        /// The underlying error.
        #[source]
        source: sqlx::Error,
    },

    /// A replica index was out of range.
    #[error(
        "there is no replica with index {index}: the cluster has {count} replica(s), \
         so use an index below {count} (or add replicas with ClusterBuilder::replica)"
    )]
    NoSuchReplica {
        /// The index that was asked for.
        index: usize,
        /// How many replicas the cluster has.
        count: usize,
    },

    /// A `ClusterBuilder::setting` name is not a valid parameter name.
    #[error(
        "invalid setting name {name:?}: use a PostgreSQL parameter name made of letters, \
         digits, `_` and `.`, such as `work_mem`"
    )]
    InvalidSetting {
        /// The rejected name.
        name: String,
    },

    /// An argument the kit would write into a configuration file could
    /// change more than intended (a line break in a `pg_hba.conf` line, a
    /// control character in a user name).
    #[error("{what} is not usable: {fix}")]
    InvalidArgument {
        /// The call and the rejected value.
        what: String,
        /// What to change.
        fix: String,
    },

    /// The `pgbouncer` program could not be found.
    #[error(
        "pgbouncer not found (looked in {searched}); set PGBOUNCER=/path/to/pgbouncer or \
         install it: `bash .ci/ensure-pgbouncer` in this repository, or \
         `apt-get install pgbouncer` (Debian/Ubuntu), `dnf install pgbouncer` (Fedora/RHEL), \
         `brew install pgbouncer` (macOS)"
    )]
    PgBouncerNotFound {
        /// The places that were searched.
        searched: String,
    },

    /// The operation needs a node that is currently stopped.
    #[error("{node} is stopped; start it first with {hint}")]
    NodeStopped {
        /// The node's name.
        node: String,
        /// The method that starts it.
        hint: &'static str,
    },

    /// The operation needs a node that answers, but the kit froze it
    /// (`SIGSTOP`): it would wait in vain.
    #[error(
        "{node} is frozen (SIGSTOP) and answers nothing, so this would wait in vain; \
         thaw it first with {hint}"
    )]
    Frozen {
        /// The node's name.
        node: String,
        /// The method that thaws it.
        hint: &'static str,
    },

    /// The operation needs a replica that is still a standby, but it was
    /// promoted.
    #[error(
        "{node} has been promoted to a primary, so it no longer replays WAL; \
         use another replica or a fresh cluster"
    )]
    Promoted {
        /// The node's name.
        node: String,
    },

    /// [`TestCluster::wait_for_replicas_caught_up`] ran out of time.
    ///
    /// [`TestCluster::wait_for_replicas_caught_up`]: crate::TestCluster::wait_for_replicas_caught_up
    #[error(
        "{node} had replayed WAL up to {replayed} but the primary had flushed up to {target}, \
         still behind after {timeout:?}; use a timeout longer than the replica's apply delay, \
         and check that it is streaming{log_tail}"
    )]
    CatchUpTimeout {
        /// The replica that lagged.
        node: String,
        /// Its last replayed LSN.
        replayed: String,
        /// The primary's flush LSN at the time of the call.
        target: String,
        /// How long the kit waited.
        timeout: Duration,
        /// The tail of the replica's server log, or an empty string.
        log_tail: String,
    },
}

impl KitError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

//! The routing engine's own connections, behind a small interface: a
//! [`ProbeConnector`] opens a [`ProbeConnection`] to a node
//! ([`ProbeTarget`]), which runs the tracker's few queries and answers in
//! text rows; failures are [`ProbeError`]s.
//!
//! The tracker (replica and primary polls, discovery, placement behind a
//! reader endpoint) and the setup's first look at the primary know nothing
//! else of the driver: the rules are written once, over this interface.
//! Every query the tracker sends uses the simple query protocol (no bound
//! parameters, no prepared statement; several statements may be sent at
//! once), so every driver answers it the same way: text columns.
//!
//! The default connector is sqlx's; another driver implements
//! [`ProbeConnector`] (see its example).

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use sqlx::postgres::PgConnectOptions;

/// `application_name` of the tracker's own connections, so they can be told
/// apart in `pg_stat_activity`.
pub const TRACKER_APPLICATION_NAME: &str = "read_after_write_tracker";

/// The rows a query answered, over all its statements in order: each a
/// list of nullable text columns.
pub type Rows = Vec<Vec<Option<String>>>;

/// What the probe interface's methods return: a boxed future, since the
/// tracker holds connections as trait objects (one poll every few
/// milliseconds: dynamic dispatch costs nothing that matters here).
pub type ProbeFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ProbeError>> + Send + 'a>>;

/// One of the routing engine's own connections to a server, opened by a
/// [`ProbeConnector`] (see its example).
pub trait ProbeConnection: Send {
    /// Runs `sql` with the simple query protocol (it may hold several
    /// statements, e.g. a `DO` block and then a `select`) and returns every
    /// row of every statement, in order, each column as text (`None` for
    /// SQL `NULL`). A statement that returns no rows adds none.
    fn query<'a>(&'a mut self, sql: &'a str) -> ProbeFuture<'a, Rows>;

    /// Closes the connection politely (the caller bounds it in time).
    /// Dropping it instead just drops the socket.
    fn close(self: Box<Self>) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Opens the routing engine's own connections: the tracker's polls of the
/// primary and of every replica server, discovery behind reader endpoints,
/// the setup's first look at the primary, and the write-position capture's
/// connection to the primary. The default is sqlx's; a
/// [`Driver`](super::driver::Driver) may give its own
/// ([`Driver::probe_connector`](super::driver::Driver::probe_connector)).
///
/// ```
/// use std::future::Future;
/// use std::pin::Pin;
/// use read_after_write::pg::driver::{
///     ProbeConnection, ProbeConnector, ProbeError, ProbeFuture, ProbeTarget, Rows,
/// };
///
/// /// A connection that answers every query with one row, standing in for a
/// /// real one.
/// struct Canned;
///
/// impl ProbeConnection for Canned {
///     fn query<'a>(&'a mut self, sql: &'a str) -> ProbeFuture<'a, Rows> {
///         Box::pin(async move { Ok(vec![vec![Some(sql.to_owned())]]) })
///     }
///     fn close(self: Box<Self>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
///         Box::pin(async {})
///     }
/// }
///
/// struct Connector;
///
/// impl ProbeConnector for Connector {
///     fn connect<'a>(
///         &'a self,
///         target: &'a ProbeTarget,
///     ) -> ProbeFuture<'a, Box<dyn ProbeConnection>> {
///         // A real connector opens a connection to `target.node()` (the
///         // primary, or a replica URL by name), with `application_name` set
///         // to `target.application_name()` when that is given.
///         Box::pin(async move {
///             if target.node().is_empty() {
///                 return Err(ProbeError::refused("no such node"));
///             }
///             Ok(Box::new(Canned) as Box<dyn ProbeConnection>)
///         })
///     }
/// }
/// # let _ = Connector;
/// ```
pub trait ProbeConnector: Send + Sync + 'static {
    /// Opens a connection to `target`, with `application_name` set to
    /// [`ProbeTarget::application_name`] when it is given (otherwise the
    /// node's own settings stand). A server that answered but will
    /// not serve (authentication, a database that does not exist, a
    /// setting the driver refuses) is a [`ProbeError::refused`]; a server
    /// that could not be reached is a [`ProbeError::unreachable`]. The
    /// caller bounds it in time.
    fn connect<'a>(&'a self, target: &'a ProbeTarget) -> ProbeFuture<'a, Box<dyn ProbeConnection>>;
}

/// Where a [`ProbeConnector`] is asked to connect: the primary, or the
/// servers behind one configured replica URL (each connection may reach
/// another of them; the tracker tells them apart by their fingerprint).
///
/// The tracker's connections carry [`TRACKER_APPLICATION_NAME`]; the
/// write-position capture's connection to the primary carries none of its
/// own ([`application_name`](Self::application_name) is `None`): it is the
/// application's, like the primary pool's connections it used to borrow.
///
/// ```
/// use read_after_write::pg::driver::ProbeTarget;
/// fn describe(target: &ProbeTarget) -> String {
///     format!("{} (primary: {})", target.node(), target.is_primary())
/// }
/// # let _ = describe;
/// ```
#[derive(Clone)]
pub struct ProbeTarget {
    node: String,
    primary: bool,
    application_name: Option<&'static str>,
    /// How sqlx connects: the node's options through the tracker's own
    /// mapping (`tracker_connect_options`), as they are now; for the
    /// capture, the primary pool's own options.
    pub(crate) options: PgConnectOptions,
}

impl ProbeTarget {
    /// The primary, reached with `options`.
    pub(crate) fn primary(options: PgConnectOptions) -> Self {
        ProbeTarget {
            node: "primary".to_owned(),
            primary: true,
            application_name: Some(TRACKER_APPLICATION_NAME),
            options,
        }
    }

    /// The primary, for the write-position capture: reached with the
    /// primary pool's `options` (the application's role and settings, as
    /// rotated credentials left them), keeping their `application_name`.
    pub(crate) fn capture(options: PgConnectOptions) -> Self {
        ProbeTarget {
            node: "primary".to_owned(),
            primary: true,
            application_name: None,
            options,
        }
    }

    /// The replica URL named `name`, reached with `options`.
    pub(crate) fn replica(name: &str, options: PgConnectOptions) -> Self {
        ProbeTarget {
            node: name.to_owned(),
            primary: false,
            application_name: Some(TRACKER_APPLICATION_NAME),
            options,
        }
    }

    /// The node's name: `primary`, or the name of a replica URL (as given
    /// to the builder, e.g. `replica-1`).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether this is the primary.
    pub fn is_primary(&self) -> bool {
        self.primary
    }

    /// The `application_name` the connection must carry:
    /// [`TRACKER_APPLICATION_NAME`] for the tracker's connections, so they
    /// can be told apart in `pg_stat_activity`; `None` for the
    /// write-position capture's, which keeps whatever the node's URL or
    /// options set (the application's own, as its primary pool's
    /// connections have).
    pub fn application_name(&self) -> Option<&'static str> {
        self.application_name
    }
}

impl fmt::Debug for ProbeTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbeTarget")
            .field("node", &self.node)
            .field("primary", &self.primary)
            .field("application_name", &self.application_name)
            .finish_non_exhaustive()
    }
}

/// Why a probe connection could not be opened or a probe query failed.
///
/// What the routing engine needs of it: whether the server *refused*
/// (answered, but will not serve this way: logged as "refused" rather than
/// "unreachable"), the SQLSTATE code when the server raised an error (a
/// heartbeat that cannot be written at all is told by it), and a message
/// for the logs.
///
/// ```
/// use read_after_write::pg::driver::ProbeError;
/// let error = ProbeError::server(Some("42P01".into()), "relation does not exist");
/// assert_eq!(error.code(), Some("42P01"));
/// assert!(!error.is_refused());
/// assert!(ProbeError::refused("wrong cluster").is_refused());
/// ```
#[derive(Clone, Debug)]
pub struct ProbeError {
    refused: bool,
    code: Option<String>,
    message: String,
}

impl ProbeError {
    /// The server answered but will not serve this connection as it is
    /// configured (another cluster, a driver setting it refuses): a
    /// configuration problem, not an outage.
    pub fn refused(message: impl Into<String>) -> Self {
        ProbeError {
            refused: true,
            code: None,
            message: message.into(),
        }
    }

    /// The server raised an error, with its SQLSTATE `code` when known.
    pub fn server(code: Option<String>, message: impl Into<String>) -> Self {
        ProbeError {
            refused: false,
            code,
            message: message.into(),
        }
    }

    /// The server could not be reached, the connection broke, or its answer
    /// could not be read.
    pub fn unreachable(message: impl Into<String>) -> Self {
        ProbeError {
            refused: false,
            code: None,
            message: message.into(),
        }
    }

    /// Whether the server refused (see [`refused`](Self::refused)).
    pub fn is_refused(&self) -> bool {
        self.refused
    }

    /// The SQLSTATE the server raised, if it raised one.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// What went wrong, for the logs.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ProbeError {}

/// A probe connection the tracker holds.
pub(crate) type ProbeConn = Box<dyn ProbeConnection>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_keep_what_the_rules_read() {
        let refused = ProbeError::refused("error with configuration: another cluster");
        assert!(refused.is_refused());
        assert_eq!(refused.code(), None);
        assert_eq!(
            refused.to_string(),
            "error with configuration: another cluster"
        );
        let raised = ProbeError::server(Some("42501".into()), "permission denied");
        assert!(!raised.is_refused());
        assert_eq!(raised.code(), Some("42501"));
        assert_eq!(ProbeError::unreachable("reset").message(), "reset");
    }
}

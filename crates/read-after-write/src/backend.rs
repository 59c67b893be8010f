//! The contract between the layer and a database: where to read, where to
//! write, and where the last write landed.
//!
//! The layer knows nothing about any database driver. A backend owns the
//! connection pools and knows how far each replica has replayed;
//! [`PgReplicaSet`](crate::pg::PgReplicaSet) is the sqlx implementation for
//! PostgreSQL.
//!
//! # Example
//!
//! A backend for a single database with no replicas: every read is "caught
//! up" because it goes to the primary.
//!
//! ```
//! use read_after_write::{Backend, Lsn, RouteReason, Routed, WritePosition};
//! use std::time::Duration;
//!
//! struct SingleNode {
//!     pool: String, // stands in for a real connection pool
//! }
//!
//! impl Backend for SingleNode {
//!     type Pool = String;
//!     type Error = std::io::Error;
//!
//!     fn primary(&self) -> &String {
//!         &self.pool
//!     }
//!     fn eventual(&self) -> Routed<'_, String> {
//!         Routed::primary(&self.pool, RouteReason::NoHealthyReplica)
//!     }
//!     async fn session(&self, _required: WritePosition, _max_wait: Duration) -> Routed<'_, String> {
//!         Routed::primary(&self.pool, RouteReason::NoHealthyReplica)
//!     }
//!     async fn write_position(&self) -> Result<WritePosition, std::io::Error> {
//!         Ok(WritePosition::new(Lsn::ZERO, 1, 0))
//!     }
//! }
//! ```

use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::bookmark::Bookmark;
use crate::position::WritePosition;

/// A database topology the layer can route reads and writes over.
///
/// Implementations must make [`eventual`](Self::eventual) and, when a replica
/// is already caught up, [`session`](Self::session) cheap: they run on every
/// read and should cost no database round trip.
pub trait Backend: Send + Sync + 'static {
    /// What handlers run queries on, e.g. `sqlx::PgPool`.
    type Pool: Send + Sync + 'static;
    /// Why [`write_position`](Self::write_position) failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The primary, for writes and critical reads.
    fn primary(&self) -> &Self::Pool;

    /// Any healthy replica, or the primary when none is healthy. Ignores
    /// every position.
    fn eventual(&self) -> Routed<'_, Self::Pool>;

    /// Like [`eventual`](Self::eventual), but from a node no more than
    /// `max_staleness` behind the primary; the primary when no replica is
    /// that fresh. The default ignores the bound and calls `eventual`:
    /// backends that know their replicas' lag override it.
    ///
    /// ```
    /// use read_after_write::{Backend, Lsn, RouteReason, Routed, Target, WritePosition};
    /// use std::time::Duration;
    ///
    /// struct SingleNode(String);
    ///
    /// impl Backend for SingleNode {
    ///     type Pool = String;
    ///     type Error = std::io::Error;
    ///     fn primary(&self) -> &String {
    ///         &self.0
    ///     }
    ///     fn eventual(&self) -> Routed<'_, String> {
    ///         Routed::primary(&self.0, RouteReason::NoHealthyReplica)
    ///     }
    ///     async fn session(&self, _: WritePosition, _: Duration) -> Routed<'_, String> {
    ///         Routed::primary(&self.0, RouteReason::NoHealthyReplica)
    ///     }
    ///     async fn write_position(&self) -> Result<WritePosition, std::io::Error> {
    ///         Ok(WritePosition::new(Lsn::ZERO, 1, 0))
    ///     }
    /// }
    ///
    /// let node = SingleNode("primary".into());
    /// let routed = node.eventual_within(Duration::from_secs(1));
    /// assert_eq!(routed.target, Target::Primary);
    /// ```
    fn eventual_within(&self, max_staleness: Duration) -> Routed<'_, Self::Pool> {
        let _ = max_staleness;
        self.eventual()
    }

    /// A node that has replayed at least `required`.
    ///
    /// If no replica has, wait at most `max_wait` for one, then fall back to
    /// the primary. A `required` position from another timeline or cluster is
    /// the backend's to rule on, and it must document its rule.
    fn session(
        &self,
        required: WritePosition,
        max_wait: Duration,
    ) -> impl Future<Output = Routed<'_, Self::Pool>> + Send;

    /// Which cluster this is, when the backend can tell (PostgreSQL's
    /// system identifier): a layer over several clusters matches each
    /// token bookmark to its cluster by it, and needs it. The default,
    /// `None`, suits a layer over one cluster.
    fn cluster_id(&self) -> Option<u64> {
        None
    }

    /// A read with monotonic reads on, for a session holding `bookmark`
    /// of this cluster (`None`: it has read nothing here yet). It must never
    /// show the session an older state than its earlier reads saw (see
    /// [`bookmark`](crate::bookmark) for the rule), and, with `max_wait`
    /// (from [`Db::read`](crate::Db::read)), it must also include the
    /// bookmark's position, waiting at most `max_wait` for it. `max_wait`
    /// is `None` for [`Db::eventual`](crate::Db::eventual): then it must not
    /// wait at all (its future must be ready when first polled). With
    /// `max_staleness`, a replica further behind than that is left (through
    /// the primary).
    ///
    /// A replica route carries the bookmark the session continues with
    /// ([`Routed::bookmark`]); a route without one, the primary's included,
    /// makes the layer capture the primary's position after the request. A
    /// primary route that carries one (the session's bookmark, tied to the
    /// replica it leaves because that replica lags) lets the session come
    /// back there: the captured position becomes a floor on that replica
    /// ([`Bookmark::returning_to`]) instead of a bookmark tied to none.
    ///
    /// The default cannot tell replicas apart, so it always reads from the
    /// primary, which is always safe.
    fn monotonic(
        &self,
        bookmark: Option<Bookmark>,
        max_wait: Option<Duration>,
        max_staleness: Option<Duration>,
    ) -> impl Future<Output = Routed<'_, Self::Pool>> + Send {
        let _ = (bookmark, max_wait, max_staleness);
        std::future::ready(Routed::primary(self.primary(), RouteReason::LeftReplica))
    }

    /// The primary's current write position, asked after the request's
    /// commits so that it covers them.
    fn write_position(&self) -> impl Future<Output = Result<WritePosition, Self::Error>> + Send;

    /// What this backend finds wrong, or worth knowing, about its own state
    /// and how the layer uses it: for the startup self-check,
    /// [`ReadAfterWriteLayer::check`](crate::ReadAfterWriteLayer::check).
    ///
    /// Runs once at startup or on an operator's request, never per request:
    /// it may take its time, and may even ask the database. The default finds
    /// nothing. A finding's message says what to do about it.
    ///
    /// ```
    /// use read_after_write::backend::{Finding, LayerSettings};
    /// use read_after_write::{Backend, Lsn, RouteReason, Routed, WritePosition};
    /// use std::time::Duration;
    ///
    /// struct SingleNode {
    ///     pool: String,
    /// }
    ///
    /// impl Backend for SingleNode {
    ///     type Pool = String;
    ///     type Error = std::io::Error;
    ///     fn primary(&self) -> &String {
    ///         &self.pool
    ///     }
    ///     fn eventual(&self) -> Routed<'_, String> {
    ///         Routed::primary(&self.pool, RouteReason::NoHealthyReplica)
    ///     }
    ///     async fn session(&self, _: WritePosition, _: Duration) -> Routed<'_, String> {
    ///         Routed::primary(&self.pool, RouteReason::NoHealthyReplica)
    ///     }
    ///     async fn write_position(&self) -> Result<WritePosition, std::io::Error> {
    ///         Ok(WritePosition::new(Lsn::ZERO, 1, 0))
    ///     }
    ///     async fn diagnose(&self, _settings: &LayerSettings) -> Vec<Finding> {
    ///         vec![Finding::info(
    ///             "single_node",
    ///             "no replicas: every read goes to the primary, so the layer only adds cost",
    ///         )]
    ///     }
    /// }
    /// ```
    fn diagnose(&self, settings: &LayerSettings) -> impl Future<Output = Vec<Finding>> + Send {
        let _ = settings;
        std::future::ready(Vec::new())
    }
}

/// The layer's configuration that a backend's
/// [`diagnose`](Backend::diagnose) may weigh its state against.
///
/// ```
/// use read_after_write::backend::LayerSettings;
/// use std::time::Duration;
///
/// let settings = LayerSettings::new(Duration::from_millis(20), Duration::from_secs(30));
/// assert!(settings.uses_positions);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LayerSettings {
    /// How long a session read waits for a replica before the primary.
    pub max_wait: Duration,
    /// How long a token lives: the longest lag it covers.
    pub ttl: Duration,
    /// Whether tokens carry write positions (false in time-window mode, where
    /// a recent writer's session reads go to the primary and replica lag
    /// does not matter to them).
    pub uses_positions: bool,
    /// The consistency the layer keeps.
    pub consistency: crate::Consistency,
    /// The staleness bound of eventual reads, if any.
    pub max_staleness: Option<Duration>,
}

impl LayerSettings {
    /// Settings for position mode with this `max_wait` and token `ttl`, for
    /// testing a backend's [`diagnose`](Backend::diagnose).
    pub fn new(max_wait: Duration, ttl: Duration) -> Self {
        LayerSettings {
            max_wait,
            ttl,
            uses_positions: true,
            consistency: crate::Consistency::ReadYourWrites,
            max_staleness: None,
        }
    }
}

/// How much a [`Finding`] matters. Ordered: `Info < Warning < Error`.
///
/// ```
/// use read_after_write::backend::Severity;
///
/// assert!(Severity::Info < Severity::Warning);
/// assert_eq!(Severity::Error.to_string(), "error");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Severity {
    /// Worth knowing; nothing to fix.
    Info,
    /// Works, but not as well as it could: costs primary reads, stale reads
    /// past a token's life, or a weaker cookie.
    Warning,
    /// The layer cannot do its job as configured: no user would ever get a
    /// token, or browsers refuse the cookie.
    Error,
}

impl Severity {
    /// `info`, `warning` or `error`.
    ///
    /// ```
    /// assert_eq!(read_after_write::backend::Severity::Warning.as_str(), "warning");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One result of a self-check: how much it matters, a stable code to match
/// or alert on, and a message that says what to do.
///
/// ```
/// use read_after_write::backend::{Finding, Severity};
///
/// let finding = Finding::warning("no_healthy_replica", "no replica is healthy; check them");
/// assert_eq!(finding.severity(), Severity::Warning);
/// assert_eq!(finding.code(), "no_healthy_replica");
/// assert_eq!(
///     finding.to_string(),
///     "warning: no replica is healthy; check them [no_healthy_replica]"
/// );
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Finding {
    severity: Severity,
    code: &'static str,
    message: String,
}

impl Finding {
    /// A finding of any severity. `code` is a short `snake_case` name that
    /// stays the same across releases; `message` says what was found and
    /// what to do about it.
    pub fn new(severity: Severity, code: &'static str, message: impl Into<String>) -> Self {
        Finding {
            severity,
            code,
            message: message.into(),
        }
    }

    /// An [`Info`](Severity::Info) finding.
    pub fn info(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Severity::Info, code, message)
    }

    /// A [`Warning`](Severity::Warning) finding.
    pub fn warning(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Severity::Warning, code, message)
    }

    /// An [`Error`](Severity::Error) finding.
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, message)
    }

    /// How much it matters.
    pub fn severity(&self) -> Severity {
        self.severity
    }

    /// The stable code, e.g. `secure_cookie_over_http`.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// What was found and what to do.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} [{}]", self.severity, self.message, self.code)
    }
}

/// Where a read went and why.
#[derive(Debug)]
pub struct Routed<'a, P> {
    /// The pool to run the read on.
    pub pool: &'a P,
    /// Primary or replica.
    pub target: Target,
    /// The node's name, for logs and the debug header (e.g. `replica-1`).
    pub node: &'a str,
    /// Why it went there.
    pub reason: RouteReason,
    /// For monotonic reads: what a session that read here may carry on
    /// with, the required position and the replica it read (see
    /// [`bookmark`](crate::bookmark)). `None` when the read cannot be
    /// bookmarked (the primary, or a replica the backend cannot name); the
    /// layer then captures the primary's position after the request. On a
    /// route to the primary, the replica the session left for lag and may
    /// come back to ([`Backend::monotonic`]).
    pub bookmark: Option<Bookmark>,
}

impl<'a, P> Routed<'a, P> {
    /// The same route, carrying `bookmark`.
    ///
    /// ```
    /// use read_after_write::{Bookmark, ReplicaTag, RouteReason, Routed, WritePosition};
    ///
    /// let pool = ();
    /// let tag = ReplicaTag::of("replica-1", 0);
    /// let routed = Routed::replica(&pool, "replica-1", RouteReason::CaughtUp)
    ///     .with_bookmark(Bookmark::new(WritePosition::default()).on_replica(tag));
    /// assert_eq!(routed.bookmark.unwrap().replica, Some(tag));
    /// ```
    pub fn with_bookmark(self, bookmark: Bookmark) -> Self {
        Routed {
            bookmark: Some(bookmark),
            ..self
        }
    }

    /// A route to the primary, named `primary`.
    ///
    /// ```
    /// use read_after_write::{RouteReason, Routed, Target};
    ///
    /// let pool = ();
    /// let routed = Routed::primary(&pool, RouteReason::Critical);
    /// assert_eq!((routed.target, routed.node), (Target::Primary, "primary"));
    /// ```
    pub fn primary(pool: &'a P, reason: RouteReason) -> Self {
        Routed {
            pool,
            target: Target::Primary,
            node: "primary",
            reason,
            bookmark: None,
        }
    }

    /// A route to the replica called `node`.
    ///
    /// ```
    /// use read_after_write::{RouteReason, Routed, Target};
    ///
    /// let pool = ();
    /// let routed = Routed::replica(&pool, "replica-1", RouteReason::CaughtUp);
    /// assert_eq!(routed.target, Target::Replica);
    /// ```
    pub fn replica(pool: &'a P, node: &'a str, reason: RouteReason) -> Self {
        Routed {
            pool,
            target: Target::Replica,
            node,
            reason,
            bookmark: None,
        }
    }
}

/// The kind of node a read went to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// The primary.
    Primary,
    /// A read replica.
    Replica,
}

impl Target {
    /// `primary` or `replica`, the metric label.
    ///
    /// ```
    /// assert_eq!(read_after_write::Target::Replica.as_str(), "replica");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Primary => "primary",
            Target::Replica => "replica",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a read went where it did. Each is a `reason` label on
/// `read_after_write_reads_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RouteReason {
    /// Session read, no token: nothing to wait for, so any replica.
    NoToken,
    /// Session read; the replica had already replayed the token's position.
    CaughtUp,
    /// Session read; a replica caught up within `max_wait`.
    CaughtUpAfterWait,
    /// Session read; no replica caught up with `max_wait` of zero.
    Lagging,
    /// Session read; no replica caught up within `max_wait`.
    WaitTimedOut,
    /// Session read with a token from another timeline (a failover happened
    /// since the write); only the primary is sure to hold what survived.
    TimelineChanged,
    /// Session read with a token from another cluster (another system
    /// identifier); the token is ignored and the read is eventual.
    ForeignCluster,
    /// Session read within the time window after a write, in time-window mode.
    TimeWindow,
    /// Session read after this same request wrote.
    WroteThisRequest,
    /// An explicitly eventual read.
    Eventual,
    /// A read for which no replica was healthy.
    NoHealthyReplica,
    /// An explicit critical read from the primary.
    Critical,
    /// A write.
    Write,
    /// Session read with a token on the primary's timeline, but no healthy
    /// replica was seen on that timeline (after a failover, or when the
    /// tracker may not see timelines): the primary at once, no wasted wait.
    NoReplicaOnTimeline,
    /// Session read with a token that promises an unknown position: the
    /// user's last write committed but its position could not be captured,
    /// so only the primary is sure to have it.
    PositionUnknown,
    /// Monotonic session read on the replica the session read last.
    Sticky,
    /// Monotonic session read that had to leave the replica it read last
    /// (down, restarted, diverged): nothing bounds what it saw there, so
    /// the primary, and the response captures the primary's position.
    LeftReplica,
    /// Monotonic session read after this same request read the primary.
    ReadPrimaryThisRequest,
    /// Session read; no replica had replayed the token's position and none
    /// was predicted to within the read's `max_wait` (or the prediction
    /// slipped past it while waiting): the primary, with no wait wasted.
    PredictedLate,
    /// Eventual read; every healthy replica lagged more than the staleness
    /// bound, so the primary served it.
    TooStale,
    /// Session read with a token signed under a key id this instance does
    /// not know (a key rotation rolled out to some instances only): it may
    /// promise a write, so the primary, never an eventual read. See
    /// [`KeySet`](crate::KeySet) for rotating keys without it.
    UnknownKey,
    /// Session read with a token in a format version this instance does
    /// not read (a release with a newer token format rolling out): it may
    /// promise a write in any cluster, so the primary, never an eventual
    /// read. See [later versions](crate::token#later-versions).
    UnknownVersion,
}

impl RouteReason {
    /// The metric label, e.g. `caught_up`.
    ///
    /// ```
    /// assert_eq!(read_after_write::RouteReason::WaitTimedOut.as_str(), "wait_timed_out");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            RouteReason::NoToken => "no_token",
            RouteReason::CaughtUp => "caught_up",
            RouteReason::CaughtUpAfterWait => "caught_up_after_wait",
            RouteReason::Lagging => "lagging",
            RouteReason::WaitTimedOut => "wait_timed_out",
            RouteReason::TimelineChanged => "timeline_changed",
            RouteReason::ForeignCluster => "foreign_cluster",
            RouteReason::TimeWindow => "time_window",
            RouteReason::WroteThisRequest => "wrote_this_request",
            RouteReason::Eventual => "eventual",
            RouteReason::NoHealthyReplica => "no_healthy_replica",
            RouteReason::Critical => "critical",
            RouteReason::Write => "write",
            RouteReason::NoReplicaOnTimeline => "no_replica_on_timeline",
            RouteReason::PositionUnknown => "position_unknown",
            RouteReason::Sticky => "sticky",
            RouteReason::LeftReplica => "left_replica",
            RouteReason::ReadPrimaryThisRequest => "read_primary_this_request",
            RouteReason::PredictedLate => "predicted_late",
            RouteReason::TooStale => "too_stale",
            RouteReason::UnknownKey => "unknown_key",
            RouteReason::UnknownVersion => "unknown_version",
        }
    }
}

impl fmt::Display for RouteReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

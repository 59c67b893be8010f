//! The ways of routing reads the lab compares, and the two baseline backends
//! that are not modes of the library: every read to a random replica, and
//! every read to the primary.

use std::fmt;
use std::time::Duration;

use read_after_write::pg::{CaptureError, PgReplicaSet};
use read_after_write::{Backend, RouteReason, Routed, WritePosition};
use sqlx::PgPool;

/// One way of routing reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Every read goes to a random replica: fast, and stale after writes.
    Naive,
    /// Every read goes to the primary: consistent, and all load on one node.
    Primary,
    /// The library's time-window mode: a user's own reads go to the primary
    /// for 5 s after a write.
    TimeWindow,
    /// The library with `max_wait = 0`: a caught-up replica, else the primary.
    Lsn,
    /// The library with a `max_wait` a little above the smaller lag.
    LsnWait,
    /// `lsn-wait` with monotonic reads on the layer: a session also never
    /// reads an older state than it has read before.
    Monotonic,
}

impl Strategy {
    /// Every strategy, in the order the lab runs them.
    pub const ALL: [Strategy; 6] = [
        Strategy::Naive,
        Strategy::Primary,
        Strategy::TimeWindow,
        Strategy::Lsn,
        Strategy::LsnWait,
        Strategy::Monotonic,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Naive => "naive",
            Strategy::Primary => "primary",
            Strategy::TimeWindow => "time-window",
            Strategy::Lsn => "lsn",
            Strategy::LsnWait => "lsn-wait",
            Strategy::Monotonic => "monotonic",
        }
    }

    /// Whether the strategy promises read-your-writes (the lab asserts 0
    /// stale own reads for these in `--check` mode).
    pub fn promises_read_your_writes(self) -> bool {
        !matches!(self, Strategy::Naive)
    }

    /// Whether the strategy promises monotonic reads (the lab asserts 0
    /// violations for these in `--check` mode). `primary` keeps it
    /// trivially, every read on one node, so it also checks the checker.
    pub fn promises_monotonic_reads(self) -> bool {
        matches!(self, Strategy::Monotonic | Strategy::Primary)
    }

    /// The `max_wait` the strategy's reads wait for a replica: `lsn_wait`
    /// where the strategy waits, else zero.
    pub fn max_wait(self, lsn_wait: Duration) -> Duration {
        match self {
            Strategy::LsnWait | Strategy::Monotonic => lsn_wait,
            _ => Duration::ZERO,
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Strategy::ALL
            .into_iter()
            .find(|strategy| strategy.name() == s)
            .ok_or_else(|| {
                format!("unknown strategy {s:?}; use naive, primary, time-window, lsn, lsn-wait or monotonic")
            })
    }
}

/// Baseline: every read to a random healthy replica, whatever the token.
/// Writes still go to the primary. Build the set with
/// [`Selection::Random`](read_after_write::pg::Selection::Random).
pub struct RandomReplica {
    set: PgReplicaSet,
}

impl RandomReplica {
    /// Reads over `set`'s replicas.
    pub fn new(set: PgReplicaSet) -> Self {
        RandomReplica { set }
    }
}

impl Backend for RandomReplica {
    type Pool = PgPool;
    type Error = CaptureError;

    fn primary(&self) -> &PgPool {
        self.set.primary_pool()
    }

    fn eventual(&self) -> Routed<'_, PgPool> {
        self.set.eventual()
    }

    async fn session(&self, _required: WritePosition, _max_wait: Duration) -> Routed<'_, PgPool> {
        self.set.eventual()
    }

    async fn write_position(&self) -> Result<WritePosition, CaptureError> {
        // Not reached: the lab runs this baseline without tokens.
        Ok(WritePosition::default())
    }
}

/// Baseline: every read to the primary.
pub struct PrimaryOnly {
    set: PgReplicaSet,
}

impl PrimaryOnly {
    /// Reads on `set`'s primary.
    pub fn new(set: PgReplicaSet) -> Self {
        PrimaryOnly { set }
    }
}

impl Backend for PrimaryOnly {
    type Pool = PgPool;
    type Error = CaptureError;

    fn primary(&self) -> &PgPool {
        self.set.primary_pool()
    }

    fn eventual(&self) -> Routed<'_, PgPool> {
        Routed::primary(self.set.primary_pool(), RouteReason::Critical)
    }

    async fn session(&self, _required: WritePosition, _max_wait: Duration) -> Routed<'_, PgPool> {
        Routed::primary(self.set.primary_pool(), RouteReason::Critical)
    }

    async fn write_position(&self) -> Result<WritePosition, CaptureError> {
        Ok(WritePosition::default())
    }
}

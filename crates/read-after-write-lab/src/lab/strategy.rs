//! The ways of routing reads the lab compares, and the two baseline backends
//! that are not modes of the library: every read to a random replica, and
//! every read to the primary.

use std::fmt;
use std::time::Duration;

use read_after_write::pg::{CaptureError, PgReplicaSet, WaitPolicy};
use read_after_write::{Backend, Lsn, RouteReason, Routed, WritePosition};
use sqlx::PgPool;

/// The fixed `max_wait`s of the `lsn-wait-<n>ms` strategies the lab runs by
/// default, in milliseconds: from shorter than any lag to longer than the
/// high one.
pub const FIXED_WAITS_MS: [u32; 5] = [10, 20, 40, 80, 160];

/// One way of routing reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    /// The library with a fixed `max_wait` and the fixed wait policy
    /// (`wait_policy(WaitPolicy::Fixed)`): wait that long for a replica to
    /// catch up, then the primary. Named `lsn-wait-<n>ms`.
    LsnWait {
        /// The fixed `max_wait`, milliseconds.
        max_wait_ms: u32,
    },
    /// Monotonic reads on the layer, with the library's default wait policy
    /// and the layer's default `max_wait`: a session also never reads an
    /// older state than it has read before.
    Monotonic,
    /// The library's default routing, configured with nothing but URLs: the
    /// replica set's and the layer's defaults as they stand.
    Adaptive,
    /// `adaptive` over tokio-postgres: the same defaults, the instance
    /// connected with `read_after_write::tokio_postgres::connect` and serving
    /// the same API from `examples/tokio_postgres` (deadpool-postgres pools),
    /// so the report shows whether the driver changes anything.
    AdaptiveTokioPostgres,
}

impl Strategy {
    /// Every strategy, in the order the lab runs them.
    pub fn all() -> Vec<Strategy> {
        let mut all = vec![
            Strategy::Naive,
            Strategy::Primary,
            Strategy::TimeWindow,
            Strategy::Lsn,
        ];
        all.extend(
            FIXED_WAITS_MS
                .iter()
                .map(|&max_wait_ms| Strategy::LsnWait { max_wait_ms }),
        );
        // adaptive-tokio-postgres right after adaptive: every report shows
        // the two drivers side by side.
        all.extend([
            Strategy::Monotonic,
            Strategy::Adaptive,
            Strategy::AdaptiveTokioPostgres,
        ]);
        all
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> String {
        match self {
            Strategy::Naive => "naive".to_owned(),
            Strategy::Primary => "primary".to_owned(),
            Strategy::TimeWindow => "time-window".to_owned(),
            Strategy::Lsn => "lsn".to_owned(),
            Strategy::LsnWait { max_wait_ms } => format!("lsn-wait-{max_wait_ms}ms"),
            Strategy::Monotonic => "monotonic".to_owned(),
            Strategy::Adaptive => "adaptive".to_owned(),
            Strategy::AdaptiveTokioPostgres => "adaptive-tokio-postgres".to_owned(),
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

    /// The `max_wait` the strategy configures on the layer (zero where
    /// reads never wait); `None` where it runs with the layer's default,
    /// which the lab reads from the layer itself
    /// ([`Instrumented::settings`](super::readings::Instrumented::settings)).
    pub fn max_wait(self) -> Option<Duration> {
        match self {
            Strategy::LsnWait { max_wait_ms } => {
                Some(Duration::from_millis(u64::from(max_wait_ms)))
            }
            Strategy::Monotonic | Strategy::Adaptive | Strategy::AdaptiveTokioPostgres => None,
            Strategy::Naive | Strategy::Primary | Strategy::TimeWindow | Strategy::Lsn => {
                Some(Duration::ZERO)
            }
        }
    }

    /// `adaptive` over either driver: the library's defaults.
    pub fn is_adaptive(self) -> bool {
        matches!(self, Strategy::Adaptive | Strategy::AdaptiveTokioPostgres)
    }

    /// Whether the instance serves the tokio-postgres app instead of the
    /// social app on sqlx.
    pub fn is_tokio_postgres(self) -> bool {
        self == Strategy::AdaptiveTokioPostgres
    }

    /// The latency budget `adaptive` (over either driver) routes within,
    /// zero for the others:
    /// the default [`WaitPolicy`]'s own cap, or with none the read's
    /// `max_wait` (the one the layer runs with, `max_wait`).
    pub fn latency_budget(self, max_wait: Duration) -> Duration {
        if !self.is_adaptive() {
            return Duration::ZERO;
        }
        // A predicted wait is bounded by the read's max_wait; a fixed wait
        // has no budget of its own.
        if WaitPolicy::default() == WaitPolicy::Predicted {
            max_wait
        } else {
            Duration::ZERO
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl serde::Serialize for Strategy {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.name())
    }
}

impl std::str::FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fixed_wait = s
            .strip_prefix("lsn-wait-")
            .and_then(|rest| rest.strip_suffix("ms"))
            .and_then(|ms| ms.parse().ok())
            .filter(|&ms: &u32| ms > 0)
            .map(|max_wait_ms| Strategy::LsnWait { max_wait_ms });
        fixed_wait
            .or_else(|| {
                Strategy::all()
                    .into_iter()
                    .find(|strategy| strategy.name() == s)
            })
            .ok_or_else(|| {
                format!(
                    "unknown strategy {s:?}; use naive, primary, time-window, lsn, \
                     lsn-wait-<n>ms (e.g. lsn-wait-40ms), monotonic, adaptive or \
                     adaptive-tokio-postgres"
                )
            })
    }
}

/// What the baselines answer for a write's position: a constant, for a
/// layer that issues tokens the baselines then ignore. Not the all-zero
/// position, which means "unknown" and makes the layer send the user's
/// reads to the primary without asking the backend; and no database round
/// trip, which a baseline without the library would not make.
const BASELINE_POSITION: WritePosition = WritePosition::new(Lsn::new(1), 1, 0);

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
        Ok(BASELINE_POSITION)
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
        Ok(BASELINE_POSITION)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_and_monotonic_run_with_the_layers_default() {
        assert_eq!(Strategy::Adaptive.max_wait(), None);
        assert_eq!(Strategy::AdaptiveTokioPostgres.max_wait(), None);
        assert_eq!(Strategy::Monotonic.max_wait(), None);
        assert_eq!(Strategy::Lsn.max_wait(), Some(Duration::ZERO));
        let wait = Duration::from_millis(50);
        assert!(Strategy::Adaptive.latency_budget(wait) <= wait);
        assert_eq!(
            Strategy::AdaptiveTokioPostgres.latency_budget(wait),
            Strategy::Adaptive.latency_budget(wait)
        );
        assert_eq!(Strategy::Lsn.latency_budget(wait), Duration::ZERO);
    }

    #[test]
    fn every_strategy_parses_back_from_its_name() {
        for strategy in Strategy::all() {
            assert_eq!(strategy.name().parse::<Strategy>(), Ok(strategy));
        }
        assert_eq!(
            "lsn-wait-25ms".parse::<Strategy>(),
            Ok(Strategy::LsnWait { max_wait_ms: 25 })
        );
        assert!("lsn-wait".parse::<Strategy>().is_err());
        let all = Strategy::all();
        let adaptive = all.iter().position(|s| *s == Strategy::Adaptive);
        assert_eq!(
            all.get(adaptive.unwrap() + 1),
            Some(&Strategy::AdaptiveTokioPostgres),
            "the tokio-postgres run follows adaptive's"
        );
        assert!(Strategy::AdaptiveTokioPostgres.promises_read_your_writes());
        assert!("lsn-wait-0ms".parse::<Strategy>().is_err());
    }
}

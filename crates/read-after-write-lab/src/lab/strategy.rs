//! The ways of routing reads the lab compares, and the two baseline backends
//! that are not modes of the library: every read to a random replica, and
//! every read to the primary.

use std::fmt;
use std::time::Duration;

use std::sync::{Arc, Mutex};

use read_after_write::pg::{CaptureError, PgReplicaSet, WaitPolicy};
use read_after_write::{
    Backend, CheckContext, Finding, KeySet, LayerSettings, ReadAfterWriteLayer, RouteReason,
    Routed, WritePosition,
};
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
    /// (`PgReplicaSetBuilder::fixed_wait`): wait that long for a replica to
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
        all.extend([Strategy::Monotonic, Strategy::Adaptive]);
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

    /// The `max_wait` the strategy's reads wait for a replica at most (zero
    /// where they never wait), given the layer's default
    /// ([`layer_default_max_wait`]).
    pub fn max_wait(self, layer_default: Duration) -> Duration {
        match self {
            Strategy::LsnWait { max_wait_ms } => Duration::from_millis(u64::from(max_wait_ms)),
            Strategy::Monotonic | Strategy::Adaptive => layer_default,
            Strategy::Naive | Strategy::Primary | Strategy::TimeWindow | Strategy::Lsn => {
                Duration::ZERO
            }
        }
    }
}

impl Strategy {
    /// The latency budget `adaptive` routes within, zero for the others:
    /// the default [`WaitPolicy`]'s own cap, or with none the read's
    /// `max_wait` (the layer's default, `layer_default`).
    pub fn latency_budget(self, layer_default: Duration) -> Duration {
        if self != Strategy::Adaptive {
            return Duration::ZERO;
        }
        match WaitPolicy::default() {
            WaitPolicy::Predicted { latency_budget } => {
                latency_budget.map_or(layer_default, |budget| budget.min(layer_default))
            }
            // A fixed wait has no budget of its own.
            _ => Duration::ZERO,
        }
    }
}

/// The `max_wait` of a [`ReadAfterWriteLayer`] that was given none, asked of
/// the layer itself: its self-check hands the backend the settings, and
/// a probe backend keeps them.
pub async fn layer_default_max_wait(keys: &KeySet) -> Duration {
    let probe = Arc::new(SettingsProbe::default());
    let layer = ReadAfterWriteLayer::from_arc(Arc::clone(&probe), keys.clone());
    let _ = layer.check(CheckContext::new()).await;
    let seen = *probe
        .max_wait
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    seen.unwrap_or_default()
}

/// A backend without a database that keeps the `max_wait` the layer's
/// self-check gives it. Routes nowhere; only [`layer_default_max_wait`]
/// uses it.
#[derive(Default)]
struct SettingsProbe {
    max_wait: Mutex<Option<Duration>>,
}

impl Backend for SettingsProbe {
    type Pool = ();
    type Error = std::convert::Infallible;

    fn primary(&self) -> &() {
        &()
    }

    fn eventual(&self) -> Routed<'_, ()> {
        Routed::primary(&(), RouteReason::Critical)
    }

    async fn session(&self, _required: WritePosition, _max_wait: Duration) -> Routed<'_, ()> {
        Routed::primary(&(), RouteReason::Critical)
    }

    async fn write_position(&self) -> Result<WritePosition, Self::Error> {
        Ok(WritePosition::default())
    }

    async fn diagnose(&self, settings: &LayerSettings) -> Vec<Finding> {
        *self
            .max_wait
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(settings.max_wait);
        Vec::new()
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
                     lsn-wait-<n>ms (e.g. lsn-wait-40ms), monotonic or adaptive"
                )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_layers_default_max_wait_is_read_from_the_layer() {
        let keys = KeySet::new(read_after_write::SigningKey::generate().expect("a key"));
        let default = layer_default_max_wait(&keys).await;
        assert!(default > Duration::ZERO, "{default:?}");
        assert_eq!(Strategy::Adaptive.latency_budget(default), default);
        assert_eq!(Strategy::Lsn.latency_budget(default), Duration::ZERO);
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
        assert!("lsn-wait-0ms".parse::<Strategy>().is_err());
    }
}

//! Counters on the per-request path, with every metric key built once.
//!
//! `metrics::counter!` with label values that are not literals builds (and
//! allocates) its key on every call, even with no recorder installed. The
//! read and token counters run on every request, so their keys are built
//! once per label combination and looked up by index.

use std::sync::OnceLock;

use metrics::{Key, Label, Level, Metadata};

use crate::backend::{RouteReason, Target};
use crate::request::TokenOutcome;
use crate::token::TokenError;

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

const TARGETS: [Target; 2] = [Target::Primary, Target::Replica];

/// Every reason, in declaration order, so `reason as usize` indexes it.
const REASONS: [RouteReason; 22] = [
    RouteReason::NoToken,
    RouteReason::CaughtUp,
    RouteReason::CaughtUpAfterWait,
    RouteReason::Lagging,
    RouteReason::WaitTimedOut,
    RouteReason::TimelineChanged,
    RouteReason::ForeignCluster,
    RouteReason::TimeWindow,
    RouteReason::WroteThisRequest,
    RouteReason::Eventual,
    RouteReason::NoHealthyReplica,
    RouteReason::Critical,
    RouteReason::Write,
    RouteReason::NoReplicaOnTimeline,
    RouteReason::PositionUnknown,
    RouteReason::Sticky,
    RouteReason::LeftReplica,
    RouteReason::ReadPrimaryThisRequest,
    RouteReason::PredictedLate,
    RouteReason::TooStale,
    RouteReason::UnknownKey,
    RouteReason::UnknownVersion,
];

const TOKEN_ERRORS: [TokenError; 6] = [
    TokenError::Malformed,
    TokenError::BadSignature,
    TokenError::UnknownKey,
    TokenError::Expired,
    TokenError::WrongVersion,
    TokenError::TooLong,
];

/// Every outcome, in the order [`outcome_index`] numbers them.
fn outcomes() -> impl Iterator<Item = TokenOutcome> {
    [TokenOutcome::Absent, TokenOutcome::Valid]
        .into_iter()
        .chain(TOKEN_ERRORS.into_iter().map(TokenOutcome::Rejected))
        .chain([TokenOutcome::OtherUser, TokenOutcome::NoIdentity])
}

fn outcome_index(outcome: TokenOutcome) -> usize {
    match outcome {
        TokenOutcome::Absent => 0,
        TokenOutcome::Valid => 1,
        TokenOutcome::Rejected(error) => 2 + error as usize,
        TokenOutcome::OtherUser => 2 + TOKEN_ERRORS.len(),
        TokenOutcome::NoIdentity => 3 + TOKEN_ERRORS.len(),
    }
}

/// `read_after_write_reads_total{target, reason}` += 1.
pub(crate) fn count_read(target: Target, reason: RouteReason) {
    static KEYS: OnceLock<Vec<Key>> = OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        TARGETS
            .iter()
            .flat_map(|target| {
                REASONS.iter().map(move |reason| {
                    Key::from_parts(
                        "read_after_write_reads_total",
                        vec![
                            Label::new("target", target.as_str()),
                            Label::new("reason", reason.as_str()),
                        ],
                    )
                })
            })
            .collect()
    });
    let index = target as usize * REASONS.len() + reason as usize;
    if let Some(key) = keys.get(index) {
        metrics::with_recorder(|recorder| recorder.register_counter(key, &METADATA)).increment(1);
    }
}

/// `read_after_write_tokens_total{outcome}` += 1.
pub(crate) fn count_token(outcome: TokenOutcome) {
    static KEYS: OnceLock<Vec<Key>> = OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        outcomes()
            .map(|outcome| {
                Key::from_parts(
                    "read_after_write_tokens_total",
                    vec![Label::new("outcome", outcome.as_str())],
                )
            })
            .collect()
    });
    if let Some(key) = keys.get(outcome_index(outcome)) {
        metrics::with_recorder(|recorder| recorder.register_counter(key, &METADATA)).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_follow_declaration_order() {
        for (i, reason) in REASONS.iter().enumerate() {
            assert_eq!(*reason as usize, i, "{reason:?}");
        }
        for (i, target) in TARGETS.iter().enumerate() {
            assert_eq!(*target as usize, i);
        }
        for (i, error) in TOKEN_ERRORS.iter().enumerate() {
            assert_eq!(*error as usize, i);
        }
        for (i, outcome) in outcomes().enumerate() {
            assert_eq!(outcome_index(outcome), i, "{outcome:?}");
        }
    }
}

//! The checker: a pure function from a run's [`History`] and the [`Facts`]
//! read afterwards to the run's [`RunFigures`]. It decides what counts as a
//! stale own read, a lost write, a hung request and an error outside the
//! fault window; see [`check`] for the exact rules.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::history::{fingerprint, Facts, History, Op, OpKind};

/// How many posts `GET /api/posts` returns at most (the app's `limit 100`).
pub const OWN_READ_LIMIT: usize = 100;

/// A request longer than `max_wait` plus this is hung.
pub const HUNG_MARGIN_MS: f64 = 1000.0;

/// How many stale reads a run keeps as examples.
const EXAMPLES: usize = 5;

/// One stale own read, for the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StaleRead {
    /// Whose read.
    pub user: i64,
    /// When it started, milliseconds since the run's start.
    pub start_ms: f64,
    /// The newest acknowledged write it missed.
    pub missing_id: i64,
    /// When that write was acknowledged.
    pub write_end_ms: f64,
    /// How many acknowledged writes it missed.
    pub missing: usize,
    /// Where the server says it read (`node; reason; token`).
    pub route: String,
}

/// What one run measured, judged over the whole history.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunFigures {
    /// Every operation.
    pub requests: u64,
    /// Writes answered 2xx with an id.
    pub acked_writes: u64,
    /// Acknowledged writes whose response carried no affinity token.
    pub writes_without_token: u64,
    /// Successful own reads that had at least one write to check.
    pub own_reads_checked: u64,
    /// Own reads that missed an acknowledged write of the same user that
    /// exists on the final primary.
    pub stale_own_reads: u64,
    /// Up to five of them.
    pub stale_examples: Vec<StaleRead>,
    /// Own reads that lacked a post (present on the final primary) that an
    /// earlier own read of the same user, finished before this one started,
    /// had shown.
    pub monotonic_violations: u64,
    /// Acknowledged writes absent from the final primary.
    pub lost_writes: u64,
    /// Requests longer than `max_wait + 1 s` that do not overlap the fault
    /// window.
    pub hung: u64,
    /// The same, overlapping the window (reported, not judged).
    pub hung_in_window: u64,
    /// The longest request, milliseconds.
    pub longest_ms: f64,
    /// Non-2xx or transport errors overlapping the fault window.
    pub errors_in_window: u64,
    /// Non-2xx or transport errors outside it.
    pub errors_outside_window: u64,
    /// From the fault's injection to the end of the first successful write
    /// sent after the fault took effect (the injecting call returned),
    /// milliseconds.
    pub fault_to_first_write_ms: Option<f64>,
    /// From the fault to the end of the first own read served by a replica
    /// among those sent after the recovery action completed, milliseconds.
    pub replicas_serve_again_ms: Option<f64>,
    /// Share of successful reads (own and feed) that the primary served,
    /// among those that ended before the fault.
    pub primary_share_before: Option<f64>,
    /// The same for reads overlapping the window (grace included).
    pub primary_share_during: Option<f64>,
    /// The same for reads sent after the window.
    pub primary_share_after: Option<f64>,
    /// Successful own reads by where they went and why
    /// (`primary/position_unknown`, `replica/caught_up`, ...); profile and
    /// dashboard reads of a sign-up drill count as own reads.
    pub own_read_routes: BTreeMap<String, u64>,
    /// Successful reads the app routed because their token was signed with
    /// a key it does not know (`reason=unknown_key`): a rolling key
    /// rotation's drill proves nothing without some.
    #[serde(default)]
    pub unknown_key_reads: u64,
    /// Successful reads the app routed because their token was in a later
    /// release's format (`reason=unknown_version`): a rolling format
    /// upgrade's drill proves nothing without some.
    #[serde(default)]
    pub unknown_version_reads: u64,
    /// Of those, the ones sent after the window: in a rolling format
    /// upgrade every instance reads the later format by then, so any means
    /// the upgraded instances do not read their own tokens.
    #[serde(default)]
    pub unknown_version_reads_after: u64,
    /// Profile and dashboard reads checked for the user's own sign-up or
    /// login (counted in `own_reads_checked` too).
    #[serde(default)]
    pub sign_up_reads_checked: u64,
    /// Of those, how many were stale (counted in `stale_own_reads` too).
    #[serde(default)]
    pub stale_sign_up_reads: u64,
    /// From the fault's injection to the start of the last request that
    /// ran into the app's request timeout while overlapping the window
    /// (stuck on a frozen server, say), milliseconds: how long new requests
    /// kept being sent where they could not finish. `None` when none did.
    #[serde(default)]
    pub last_stuck_start_ms: Option<f64>,
}

/// Judges one run.
///
/// - **Stale own read.** A successful own read R of user U misses a write W
///   when W was acknowledged (2xx with an id) before R started
///   (`W.end < R.start`), W exists on the final primary (same id, author
///   and content: a failover that lost WAL reuses ids), W is among the
///   posts R must show, and R's list lacks it. R must show W when R returned
///   fewer than [`OWN_READ_LIMIT`] posts (then it showed every post it saw)
///   or W's id is above the smallest id R returned (then W would rank among
///   the newest 100 had R seen it). R counts once however many writes it
///   missed.
/// - **Monotonic-read violation.** The same rule, with "an id an earlier own
///   read of U showed (finished before R started) and that exists on the
///   final primary" in place of W.
/// - **Lost write.** An acknowledged write that is not on the final
///   primary (no post with its id, author and content): asynchronous replication loses such writes in an unplanned
///   failover. Counted apart; not a failure of the library.
/// - **Hung.** Longer than `max_wait + 1 s`; judged only outside the fault
///   window, whose requests may legitimately run into the app's timeout.
/// - **Errors.** Non-2xx statuses and transport errors, split by whether the
///   request overlaps the window `[injected, recovered + grace]`. A
///   profile read's 404 is an answer (the profile was not there), not an
///   error.
/// - **Sign-ups and logins.** A profile read of user U's own account that
///   started after U's sign-up was acknowledged, where the final primary
///   has that account, must find it; a dashboard read that started after
///   U's login was acknowledged, where the final primary has that login,
///   must show it or a later one. Either miss is a stale own read.
/// - **Stuck.** A request that ran into the app's request timeout while
///   overlapping the window; the last one's start is reported.
pub fn check(history: &History, facts: &Facts) -> RunFigures {
    let window = facts.window;
    let window_end = window.end_ms();
    let mut figures = RunFigures {
        requests: history.ops.len() as u64,
        ..RunFigures::default()
    };

    let mut by_user: HashMap<i64, Vec<&Op>> = HashMap::new();
    for op in &history.ops {
        by_user.entry(op.user).or_default().push(op);

        figures.longest_ms = figures.longest_ms.max(op.duration_ms());
        let in_window = op.overlaps(window.injected_ms, window_end);
        if in_window
            && facts.request_timeout_ms > 0.0
            && op.duration_ms() >= facts.request_timeout_ms
        {
            let since = op.start_ms - window.injected_ms;
            figures.last_stuck_start_ms =
                Some(figures.last_stuck_start_ms.map_or(since, |s| s.max(since)));
        }
        if op.duration_ms() > facts.max_wait_ms + HUNG_MARGIN_MS {
            if in_window {
                figures.hung_in_window += 1;
            } else {
                figures.hung += 1;
            }
        }
        if !op.succeeded() {
            if in_window {
                figures.errors_in_window += 1;
            } else {
                figures.errors_outside_window += 1;
            }
        }
        if op.kind.is_read() && op.succeeded() && op.reason.as_deref() == Some("unknown_key") {
            figures.unknown_key_reads += 1;
        }
        if op.kind.is_read() && op.succeeded() && op.reason.as_deref() == Some("unknown_version") {
            figures.unknown_version_reads += 1;
            if op.start_ms > window_end {
                figures.unknown_version_reads_after += 1;
            }
        }
        if op.is_session_read() && op.succeeded() {
            let target = if op.on_primary() {
                "primary"
            } else {
                "replica"
            };
            let reason = op.reason.as_deref().unwrap_or("?");
            *figures
                .own_read_routes
                .entry(format!("{target}/{reason}"))
                .or_default() += 1;
        }
        if op.kind.is_write() && op.outcome.is_success() && op.post_id.is_some() {
            figures.acked_writes += 1;
            if !facts.has_write(op) {
                figures.lost_writes += 1;
            }
            if op.token_issued == Some(false) {
                figures.writes_without_token += 1;
            }
        }
    }

    let mut users: Vec<_> = by_user.into_iter().collect();
    users.sort_by_key(|(user, _)| *user);
    let mut examples = Vec::new();
    for (user, ops) in &users {
        check_user(*user, ops, facts, &mut figures, &mut examples);
        check_sign_up(*user, ops, facts, &mut figures, &mut examples);
    }
    examples.sort_by(|a: &StaleRead, b| a.start_ms.total_cmp(&b.start_ms));
    examples.truncate(EXAMPLES);
    figures.stale_examples = examples;

    figures.fault_to_first_write_ms = history
        .ops
        .iter()
        .filter(|op| op.kind.is_write() && op.outcome.is_success())
        .filter(|op| op.start_ms >= window.applied_ms)
        .map(|op| op.end_ms)
        .min_by(f64::total_cmp)
        .map(|end| end - window.injected_ms);
    figures.replicas_serve_again_ms = history
        .ops
        .iter()
        .filter(|op| op.is_session_read() && op.succeeded() && op.on_replica())
        .filter(|op| op.start_ms >= window.recovered_ms)
        .map(|op| op.end_ms)
        .min_by(f64::total_cmp)
        .map(|end| end - window.injected_ms);

    let share = |keep: &dyn Fn(&Op) -> bool| {
        let reads: Vec<&Op> = history
            .ops
            .iter()
            .filter(|op| op.kind.is_read() && op.succeeded())
            .filter(|op| op.node.is_some())
            .filter(|op| keep(op))
            .collect();
        (!reads.is_empty())
            .then(|| reads.iter().filter(|op| op.on_primary()).count() as f64 / reads.len() as f64)
    };
    figures.primary_share_before = share(&|op| op.end_ms < window.injected_ms);
    figures.primary_share_during = share(&|op| op.overlaps(window.injected_ms, window_end));
    figures.primary_share_after = share(&|op| op.start_ms > window_end);
    figures
}

/// The sign-up rule of [`check`] for one user (an account id): its profile
/// reads after its sign-up, its dashboard reads after its logins.
fn check_sign_up(
    user: i64,
    ops: &[&Op],
    facts: &Facts,
    figures: &mut RunFigures,
    examples: &mut Vec<StaleRead>,
) {
    // What the user's reads must show, by acknowledgement time: the account
    // (its id and name) and each login (its id).
    let acked = |kind: OpKind| -> Vec<(f64, i64, u64)> {
        let mut acked: Vec<_> = ops
            .iter()
            .filter(|op| op.kind == kind && op.outcome.is_success() && facts.has_write(op))
            .filter_map(|op| {
                let print = op.content.as_deref().map_or(0, fingerprint);
                op.post_id.map(|id| (op.end_ms, id, print))
            })
            .collect();
        acked.sort_by(|a, b| a.0.total_cmp(&b.0));
        acked
    };
    let sign_ups = acked(OpKind::SignUp);
    let logins = acked(OpKind::Login);
    for read in ops.iter().filter(|op| op.succeeded()) {
        let shown = read.read_posts.as_deref().unwrap_or_default();
        let missed = match read.kind {
            // The account's own profile, by id and name.
            OpKind::ProfileRead => sign_ups
                .iter()
                .filter(|(end, _, _)| *end < read.start_ms)
                .find(|(_, id, print)| !shown.contains(&(*id, *print)))
                .map(|&(end, id, _)| (end, id)),
            // The newest login acknowledged before, or a later one.
            OpKind::DashboardRead => logins
                .iter()
                .filter(|(end, _, _)| *end < read.start_ms)
                .max_by_key(|(_, id, _)| *id)
                .filter(|(_, id, _)| shown.first().is_none_or(|(latest, _)| latest < id))
                .map(|&(end, id, _)| (end, id)),
            _ => continue,
        };
        let due = match read.kind {
            OpKind::ProfileRead => &sign_ups,
            _ => &logins,
        };
        if !due.iter().any(|(end, _, _)| *end < read.start_ms) {
            continue;
        }
        figures.own_reads_checked += 1;
        figures.sign_up_reads_checked += 1;
        if let Some((write_end_ms, missing_id)) = missed {
            figures.stale_own_reads += 1;
            figures.stale_sign_up_reads += 1;
            examples.push(StaleRead {
                user,
                start_ms: read.start_ms,
                missing_id,
                write_end_ms,
                missing: 1,
                route: read.route(),
            });
        }
    }
}

/// Whether a read that returned `ids` had to show `id` if it had seen it.
fn must_show(ids: &[i64], id: i64) -> bool {
    ids.len() < OWN_READ_LIMIT || ids.iter().min().is_some_and(|&smallest| id > smallest)
}

fn check_user(
    user: i64,
    ops: &[&Op],
    facts: &Facts,
    figures: &mut RunFigures,
    examples: &mut Vec<StaleRead>,
) {
    // Acknowledged writes that survived, by acknowledgement time, with the
    // fingerprint of what they posted (none if the history lacks it).
    let mut writes: Vec<(f64, i64, Option<u64>)> = ops
        .iter()
        .filter(|op| op.kind == OpKind::Write && op.outcome.is_success())
        .filter(|op| facts.has_write(op))
        .filter_map(|op| {
            let print = op.content.as_deref().map(fingerprint);
            op.post_id.map(|id| (op.end_ms, id, print))
        })
        .collect();
    writes.sort_by(|a, b| a.0.total_cmp(&b.0));

    let mut reads: Vec<(&Op, &[(i64, u64)])> = ops
        .iter()
        .filter(|op| op.kind == OpKind::OwnRead && op.outcome.is_success())
        .filter_map(|op| op.read_posts.as_deref().map(|posts| (*op, posts)))
        .collect();
    // Earlier reads, by end time, feed the monotonic check.
    let mut finished: Vec<(f64, &[(i64, u64)])> = reads
        .iter()
        .map(|(op, posts)| (op.end_ms, *posts))
        .collect();
    finished.sort_by(|a, b| a.0.total_cmp(&b.0));
    reads.sort_by(|a, b| a.0.start_ms.total_cmp(&b.0.start_ms));

    let mut seen: BTreeSet<(i64, u64)> = BTreeSet::new();
    let mut next_finished = 0;
    for (read, posts) in reads {
        while next_finished < finished.len() && finished[next_finished].0 < read.start_ms {
            seen.extend(
                finished[next_finished]
                    .1
                    .iter()
                    .filter(|post| facts.has_post(**post, user)),
            );
            next_finished += 1;
        }
        let ids: Vec<i64> = posts.iter().map(|(id, _)| *id).collect();
        let shown: HashMap<i64, u64> = posts.iter().copied().collect();
        let shows = |id: i64, print: Option<u64>| match (shown.get(&id), print) {
            (Some(shown), Some(print)) => *shown == print,
            (Some(_), None) => true,
            (None, _) => false,
        };

        let acked_before = writes.partition_point(|(end, _, _)| *end < read.start_ms);
        if acked_before > 0 {
            figures.own_reads_checked += 1;
        }
        let missed: Vec<(f64, i64)> = writes[..acked_before]
            .iter()
            .filter(|(_, id, print)| must_show(&ids, *id) && !shows(*id, *print))
            .map(|(end, id, _)| (*end, *id))
            .collect();
        if let Some(&(write_end_ms, missing_id)) = missed.iter().max_by_key(|(_, id)| *id) {
            figures.stale_own_reads += 1;
            examples.push(StaleRead {
                user,
                start_ms: read.start_ms,
                missing_id,
                write_end_ms,
                missing: missed.len(),
                route: read.route(),
            });
        }
        if seen
            .iter()
            .any(|&(id, print)| must_show(&ids, id) && !shows(id, Some(print)))
        {
            figures.monotonic_violations += 1;
        }
    }
}

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
    /// (`primary/position_unknown`, `replica/caught_up`, ...).
    pub own_read_routes: BTreeMap<String, u64>,
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
///   request overlaps the window `[injected, recovered + grace]`.
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
        if op.duration_ms() > facts.max_wait_ms + HUNG_MARGIN_MS {
            if in_window {
                figures.hung_in_window += 1;
            } else {
                figures.hung += 1;
            }
        }
        if !op.outcome.is_success() {
            if in_window {
                figures.errors_in_window += 1;
            } else {
                figures.errors_outside_window += 1;
            }
        }
        if op.kind == OpKind::OwnRead && op.outcome.is_success() {
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
        if op.kind == OpKind::Write && op.outcome.is_success() && op.post_id.is_some() {
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
    }
    examples.sort_by(|a: &StaleRead, b| a.start_ms.total_cmp(&b.start_ms));
    examples.truncate(EXAMPLES);
    figures.stale_examples = examples;

    figures.fault_to_first_write_ms = history
        .ops
        .iter()
        .filter(|op| op.kind == OpKind::Write && op.outcome.is_success())
        .filter(|op| op.start_ms >= window.applied_ms)
        .map(|op| op.end_ms)
        .min_by(f64::total_cmp)
        .map(|end| end - window.injected_ms);
    figures.replicas_serve_again_ms = history
        .ops
        .iter()
        .filter(|op| op.kind == OpKind::OwnRead && op.outcome.is_success() && op.on_replica())
        .filter(|op| op.start_ms >= window.recovered_ms)
        .map(|op| op.end_ms)
        .min_by(f64::total_cmp)
        .map(|end| end - window.injected_ms);

    let share = |keep: &dyn Fn(&Op) -> bool| {
        let reads: Vec<&Op> = history
            .ops
            .iter()
            .filter(|op| op.kind != OpKind::Write && op.outcome.is_success())
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
                route: format!(
                    "node={}; reason={}; token={}",
                    read.node.as_deref().unwrap_or("?"),
                    read.reason.as_deref().unwrap_or("?"),
                    read.token.as_deref().unwrap_or("?")
                ),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drills::history::{FaultWindow, Outcome, StoredPost};

    fn op(user: i64, kind: OpKind, start_ms: f64, end_ms: f64) -> Op {
        Op {
            user,
            kind,
            start_ms,
            end_ms,
            outcome: Outcome::Status(200),
            content: None,
            post_id: None,
            read_posts: None,
            node: Some("replica-1".into()),
            reason: Some("caught_up".into()),
            token: Some("valid".into()),
            token_issued: None,
        }
    }

    fn write(user: i64, start: f64, end: f64, id: i64) -> Op {
        Op {
            outcome: Outcome::Status(201),
            content: Some(format!("post {id}")),
            post_id: Some(id),
            node: Some("primary".into()),
            reason: Some("write".into()),
            token_issued: Some(true),
            ..op(user, OpKind::Write, start, end)
        }
    }

    fn read(user: i64, start: f64, end: f64, ids: &[i64]) -> Op {
        Op {
            read_posts: Some(
                ids.iter()
                    .map(|&id| (id, fingerprint(&format!("post {id}"))))
                    .collect(),
            ),
            ..op(user, OpKind::OwnRead, start, end)
        }
    }

    /// The final primary holds these posts of user 1, as `write` made them.
    fn facts(ids: &[i64]) -> Facts {
        facts_of(&ids.iter().map(|&id| (id, 1)).collect::<Vec<_>>())
    }

    /// The final primary holds these `(id, user)` posts.
    fn facts_of(posts: &[(i64, i64)]) -> Facts {
        let final_posts = posts
            .iter()
            .map(|&(id, user)| {
                let content = format!("post {id}");
                (id, StoredPost { user, content })
            })
            .collect();
        Facts {
            final_posts,
            window: FaultWindow {
                injected_ms: 1000.0,
                applied_ms: 1100.0,
                recovered_ms: 2000.0,
                grace_ms: 500.0,
            },
            max_wait_ms: 200.0,
        }
    }

    fn history(ops: Vec<Op>) -> History {
        History { ops }
    }

    #[test]
    fn a_read_after_the_acknowledgement_must_show_the_write() {
        let h = history(vec![
            write(1, 0.0, 10.0, 7),
            read(1, 11.0, 20.0, &[]),
            read(1, 21.0, 30.0, &[7]),
        ]);
        let f = check(&h, &facts(&[7]));
        assert_eq!(f.stale_own_reads, 1);
        assert_eq!(f.own_reads_checked, 2);
        assert_eq!(f.stale_examples[0].missing_id, 7);
        assert_eq!(f.stale_examples[0].user, 1);
        assert_eq!(f.acked_writes, 1);
        assert_eq!(f.lost_writes, 0);
    }

    #[test]
    fn a_read_concurrent_with_the_write_may_miss_it() {
        // The read started before the write was acknowledged.
        let h = history(vec![write(1, 0.0, 10.0, 7), read(1, 9.0, 20.0, &[])]);
        let f = check(&h, &facts(&[7]));
        assert_eq!(f.stale_own_reads, 0);
        assert_eq!(f.own_reads_checked, 0);
    }

    #[test]
    fn other_users_writes_do_not_count() {
        let h = history(vec![write(2, 0.0, 10.0, 7), read(1, 11.0, 20.0, &[])]);
        assert_eq!(check(&h, &facts_of(&[(7, 2)])).stale_own_reads, 0);
    }

    #[test]
    fn an_id_reused_on_the_new_timeline_does_not_make_a_lost_write_survive() {
        // User 1's post 7 was lost in the failover; the new primary gave id
        // 7 to a post by user 2, or to another post by user 1.
        let h = history(vec![write(1, 0.0, 10.0, 7), read(1, 11.0, 20.0, &[])]);
        let f = check(&h, &facts_of(&[(7, 2)]));
        assert_eq!((f.lost_writes, f.stale_own_reads), (1, 0));
        let mut other = facts(&[]);
        other.final_posts.insert(
            7,
            StoredPost {
                user: 1,
                content: "post 7, written again".into(),
            },
        );
        let f = check(&h, &other);
        assert_eq!((f.lost_writes, f.stale_own_reads), (1, 0));
    }

    #[test]
    fn a_lost_write_is_counted_apart_and_not_stale() {
        let h = history(vec![
            write(1, 0.0, 10.0, 7),
            write(1, 11.0, 12.0, 8),
            read(1, 13.0, 20.0, &[7]),
        ]);
        let f = check(&h, &facts(&[7]));
        assert_eq!(f.lost_writes, 1);
        assert_eq!(f.stale_own_reads, 0);
    }

    #[test]
    fn failed_writes_are_neither_stale_nor_lost() {
        let mut failed = write(1, 0.0, 10.0, 7);
        failed.outcome = Outcome::Status(503);
        failed.post_id = None;
        let h = history(vec![failed, read(1, 11.0, 20.0, &[])]);
        let f = check(&h, &facts(&[7]));
        assert_eq!(
            (f.stale_own_reads, f.lost_writes, f.acked_writes),
            (0, 0, 0)
        );
        assert_eq!(f.errors_outside_window, 1);
    }

    #[test]
    fn a_write_beyond_the_newest_hundred_is_not_required() {
        // The read returned a full page of newer posts: post 1 fell off.
        let page: Vec<i64> = (2..102).rev().collect();
        let mut ops = vec![write(1, 0.0, 1.0, 1)];
        let mut ids = vec![1];
        for id in 2..102 {
            ops.push(write(1, id as f64, id as f64 + 0.5, id));
            ids.push(id);
        }
        ops.push(read(1, 200.0, 210.0, &page));
        let f = check(&history(ops.clone()), &facts(&ids));
        assert_eq!(f.stale_own_reads, 0);

        // A full page that lacks a write newer than its oldest post is stale.
        let mut holed: Vec<i64> = (1..102).rev().filter(|&id| id != 50).collect();
        holed.truncate(OWN_READ_LIMIT);
        let last = ops.len() - 1;
        ops[last] = read(1, 200.0, 210.0, &holed);
        let f = check(&history(ops), &facts(&ids));
        assert_eq!(f.stale_own_reads, 1);
        assert_eq!(f.stale_examples[0].missing_id, 50);
    }

    #[test]
    fn a_read_that_forgets_what_an_earlier_read_showed_breaks_monotonic_reads() {
        // Post 9 was written by a request whose answer was lost (timeout),
        // so only the monotonic check can see it go missing.
        let h = history(vec![
            read(1, 0.0, 10.0, &[9]),
            read(1, 5.0, 15.0, &[]), // overlaps the first: not judged
            read(1, 20.0, 30.0, &[]),
        ]);
        let f = check(&h, &facts(&[9]));
        assert_eq!(f.monotonic_violations, 1);
        assert_eq!(f.stale_own_reads, 0);
        // Unless the post did not survive...
        assert_eq!(check(&h, &facts(&[])).monotonic_violations, 0);
        // ...and the final primary's post 9 is another post (an id the new
        // timeline handed out again).
        let mut reused = facts(&[]);
        reused.final_posts.insert(
            9,
            StoredPost {
                user: 1,
                content: "another post 9".into(),
            },
        );
        assert_eq!(check(&h, &reused).monotonic_violations, 0);
    }

    #[test]
    fn hung_requests_and_errors_are_split_by_the_window() {
        let mut slow_before = read(1, 0.0, 1300.0, &[]); // overlaps the window start
        slow_before.kind = OpKind::FeedRead;
        let slow_after = read(1, 3000.0, 4500.0, &[]); // after 2000 + 500
        let quick = read(1, 3000.0, 3100.0, &[]);
        let mut refused_in = read(1, 1500.0, 1501.0, &[]);
        refused_in.outcome = Outcome::Transport("connection refused".into());
        let mut refused_out = read(1, 2600.0, 2601.0, &[]);
        refused_out.outcome = Outcome::Status(503);
        let h = history(vec![
            slow_before,
            slow_after,
            quick,
            refused_in,
            refused_out,
        ]);
        let f = check(&h, &facts(&[]));
        assert_eq!(f.hung, 1);
        assert_eq!(f.hung_in_window, 1);
        assert_eq!(f.errors_in_window, 1);
        assert_eq!(f.errors_outside_window, 1);
        assert_eq!(f.longest_ms, 1500.0);
        assert_eq!(f.requests, 5);
    }

    #[test]
    fn recovery_times_and_primary_shares() {
        let mut before = read(1, 0.0, 10.0, &[]);
        before.node = Some("primary".into());
        let during = read(1, 1200.0, 1210.0, &[]);
        let mut late_primary = read(1, 2100.0, 2110.0, &[]);
        late_primary.node = Some("primary".into());
        let replica_again = read(1, 2200.0, 2300.0, &[]);
        let mut after = read(1, 2600.0, 2610.0, &[]);
        after.kind = OpKind::FeedRead;
        let mut failed_write = write(1, 1100.0, 1150.0, 3);
        failed_write.outcome = Outcome::Status(503);
        failed_write.post_id = None;
        let h = history(vec![
            before,
            during,
            late_primary,
            replica_again,
            after,
            write(1, 900.0, 1050.0, 1), // sent before the fault
            failed_write,
            write(1, 1400.0, 1450.0, 2),
        ]);
        let f = check(&h, &facts(&[1, 2]));
        assert_eq!(f.fault_to_first_write_ms, Some(450.0));
        // The read at 1200 ran on a replica but was sent before recovery.
        assert_eq!(f.replicas_serve_again_ms, Some(1300.0));
        assert_eq!(f.primary_share_before, Some(1.0));
        assert_eq!(f.primary_share_during, Some(1.0 / 3.0));
        assert_eq!(f.primary_share_after, Some(0.0));
    }

    #[test]
    fn naive_reads_of_a_lagging_replica_are_stale() {
        // What the negative control's history looks like: tokens off, so
        // writes get no token and own reads go to a replica (`no_token`)
        // that has not applied the write yet.
        let mut bare = write(1, 0.0, 10.0, 7);
        bare.token_issued = Some(false);
        let mut naive = read(1, 11.0, 14.0, &[6]);
        naive.reason = Some("no_token".into());
        naive.token = Some("absent".into());
        let mut later = read(1, 200.0, 203.0, &[7, 6]);
        later.reason = Some("no_token".into());
        let f = check(
            &history(vec![write(1, 0.0, 1.0, 6), bare, naive, later]),
            &facts(&[6, 7]),
        );
        assert_eq!(f.stale_own_reads, 1);
        assert_eq!(f.own_reads_checked, 2);
        assert_eq!(f.writes_without_token, 1);
        assert_eq!(f.own_read_routes.get("replica/no_token"), Some(&2));
        assert_eq!(f.stale_examples[0].missing_id, 7);
        assert_eq!(
            f.stale_examples[0].route,
            "node=replica-1; reason=no_token; token=absent"
        );
    }

    #[test]
    fn writes_without_a_token_are_counted() {
        let mut bare = write(1, 0.0, 10.0, 7);
        bare.token_issued = Some(false);
        let f = check(&history(vec![bare]), &facts(&[7]));
        assert_eq!(f.writes_without_token, 1);
    }
}

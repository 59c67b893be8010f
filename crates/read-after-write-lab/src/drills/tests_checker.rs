//! Tests of [`checker`](super::checker).

use std::collections::HashMap;

use super::checker::*;
use super::history::{
    fingerprint, Facts, FaultWindow, History, Op, OpKind, Outcome, StoredAccount, StoredPost,
};

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
        final_accounts: HashMap::new(),
        final_logins: HashMap::new(),
        window: FaultWindow {
            injected_ms: 1000.0,
            applied_ms: 1100.0,
            recovered_ms: 2000.0,
            grace_ms: 500.0,
        },
        max_wait_ms: 200.0,
        request_timeout_ms: 2000.0,
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

/// User 7's sign-up as "ada", ending at `end`.
fn sign_up(start: f64, end: f64) -> Op {
    Op {
        content: Some("ada".into()),
        post_id: Some(7),
        ..op(7, OpKind::SignUp, start, end)
    }
}

/// A read of user 7's profile that found `found` (a name) or not (404).
fn profile_read(start: f64, found: Option<&str>) -> Op {
    Op {
        outcome: Outcome::Status(if found.is_some() { 200 } else { 404 }),
        read_posts: Some(
            found
                .map(|name| (7, fingerprint(name)))
                .into_iter()
                .collect(),
        ),
        ..op(7, OpKind::ProfileRead, start, start + 5.0)
    }
}

fn signed_up_facts() -> Facts {
    let mut facts = facts(&[]);
    facts
        .final_accounts
        .insert(7, StoredAccount { name: "ada".into() });
    facts
}

#[test]
fn a_profile_read_after_the_sign_up_must_find_the_account() {
    let h = history(vec![
        sign_up(0.0, 10.0),
        profile_read(5.0, None), // concurrent with the sign-up: not judged
        profile_read(11.0, None),
        profile_read(20.0, Some("ada")),
    ]);
    let f = check(&h, &signed_up_facts());
    assert_eq!(f.stale_own_reads, 1);
    assert_eq!(f.stale_sign_up_reads, 1);
    assert_eq!(f.sign_up_reads_checked, 2);
    assert_eq!(f.own_reads_checked, 2);
    // A 404 is an answer, not an error.
    assert_eq!(f.errors_outside_window + f.errors_in_window, 0);
    assert_eq!(f.stale_examples[0].missing_id, 7);
    // An account the final primary lacks (lost in a failover) is not
    // required.
    let f = check(&h, &facts(&[]));
    assert_eq!((f.stale_own_reads, f.lost_writes), (0, 1));
}

#[test]
fn a_dashboard_read_after_a_login_must_show_it_or_a_later_one() {
    let login = |start: f64, end: f64, id: i64| Op {
        post_id: Some(id),
        ..op(7, OpKind::Login, start, end)
    };
    let dashboard = |start: f64, latest: Option<i64>| Op {
        read_posts: Some(latest.map(|id| (id, 0)).into_iter().collect()),
        ..op(7, OpKind::DashboardRead, start, start + 5.0)
    };
    let h = history(vec![
        login(0.0, 10.0, 40),
        dashboard(11.0, None),
        dashboard(20.0, Some(40)),
        login(30.0, 40.0, 41),
        dashboard(41.0, Some(40)),
        dashboard(50.0, Some(41)),
    ]);
    let mut facts = facts(&[]);
    facts.final_logins.extend([(40, 7), (41, 7)]);
    let f = check(&h, &facts);
    assert_eq!(f.stale_own_reads, 2);
    assert_eq!(f.sign_up_reads_checked, 4);
}

#[test]
fn unknown_key_and_version_routes_and_stuck_requests_are_counted() {
    let mut unknown = read(1, 1200.0, 1210.0, &[]);
    unknown.node = Some("primary".into());
    unknown.reason = Some("unknown_key".into());
    // Ran into the 2 s request timeout inside the window.
    let mut stuck = read(1, 1500.0, 3500.0, &[]);
    stuck.outcome = Outcome::Status(503);
    let mut earlier = read(1, 1100.0, 3100.0, &[]);
    earlier.outcome = Outcome::Status(503);
    let mut later = read(1, 1300.0, 1310.0, &[]);
    later.node = Some("primary".into());
    later.reason = Some("unknown_version".into());
    let f = check(&history(vec![unknown, later, stuck, earlier]), &facts(&[]));
    assert_eq!(f.unknown_key_reads, 1);
    assert_eq!(f.unknown_version_reads, 1);
    assert_eq!(f.unknown_version_reads_after, 0, "inside the window");
    assert_eq!(f.own_read_routes.get("primary/unknown_version"), Some(&1));
    assert_eq!(f.last_stuck_start_ms, Some(500.0));
    assert_eq!(f.own_read_routes.get("primary/unknown_key"), Some(&1));
}

#[test]
fn writes_without_a_token_are_counted() {
    let mut bare = write(1, 0.0, 10.0, 7);
    bare.token_issued = Some(false);
    let f = check(&history(vec![bare]), &facts(&[7]));
    assert_eq!(f.writes_without_token, 1);
}

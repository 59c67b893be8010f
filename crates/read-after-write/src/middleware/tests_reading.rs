//! Which tokens a request reads, from which transports, and where its reads
//! go by them (see `tests.rs` for the harness).

use std::sync::Arc;
use std::time::Duration;

use http::header::COOKIE;
use http::{HeaderValue, StatusCode};

use super::tests::*;
use super::*;
use crate::clock::ManualClock;
use crate::handle::TokenOutcome;
use crate::position::{Lsn, WritePosition};
use crate::token::{AffinityToken, KeySet, UserId};

#[tokio::test]
async fn no_token_reads_a_replica_and_sets_nothing() {
    let backend = fake();
    let app = App::new(layer(&backend, &ManualClock::new(NOW)));
    let answer = app.get("/read").user(1).send().await;
    assert_eq!(answer.status(), StatusCode::OK);
    assert!(answer.issued_cookie().is_none());
    let seen = answer.seen().clone();
    assert_eq!(
        (seen.read_pool, seen.outcome, seen.required),
        ("replica-pool", TokenOutcome::Absent, None)
    );
    assert_eq!(
        answer.debug(),
        "node=replica-1; reason=no_token; token=absent"
    );
    assert_eq!(backend.captures(), 0);
}

#[tokio::test]
async fn without_a_token_a_session_read_keeps_the_layers_staleness_bound() {
    let backend = fake();
    backend.set_replica_behind(Duration::from_secs(5));
    let bounded =
        App::new(layer(&backend, &ManualClock::new(NOW)).max_staleness(Duration::from_secs(1)));
    let answer = bounded.get("/read").user(1).send().await;
    assert_eq!(answer.seen().read_pool, "primary-pool");
    assert_eq!(
        answer.debug(),
        "node=primary; reason=too_stale; token=absent"
    );

    // Within the bound, or with none, the replica, as a read without a token.
    let loose =
        App::new(layer(&backend, &ManualClock::new(NOW)).max_staleness(Duration::from_secs(10)));
    let answer = loose.get("/read").user(1).send().await;
    assert_eq!(
        answer.debug(),
        "node=replica-1; reason=no_token; token=absent"
    );
    let unbounded = App::new(layer(&backend, &ManualClock::new(NOW)));
    let answer = unbounded.get("/read").user(1).send().await;
    assert_eq!(
        answer.debug(),
        "node=replica-1; reason=no_token; token=absent"
    );
}

#[tokio::test]
async fn the_token_routes_later_reads_by_position() {
    let backend = fake();
    backend.set_primary_at(0x9000);
    backend.set_replica_replayed(0x8FFF);
    let app = App::new(layer(&backend, &ManualClock::new(NOW)));
    let wrote = app.post("/write").user(7).send().await;
    let token = wrote.issued().unwrap();

    // The replica is one byte short: the read must not go there.
    let lagging = app.get("/read").user(7).token(&token).send().await;
    let seen_lagging = lagging.seen();
    assert_eq!(seen_lagging.outcome, TokenOutcome::Valid);
    assert_eq!(seen_lagging.required.unwrap().lsn, Lsn::new(0x9000));
    assert_eq!(seen_lagging.read_pool, "primary-pool");
    assert_eq!(lagging.debug(), "node=primary; reason=lagging; token=valid");
    assert!(
        lagging.issued_cookie().is_none(),
        "reads do not re-issue tokens"
    );

    // Inclusive comparison: replayed == token is caught up.
    backend.set_replica_replayed(0x9000);
    let caught_up = app.get("/read").user(7).token(&token).send().await;
    assert_eq!(caught_up.seen().read_pool, "replica-pool");

    // The header transport works the same.
    let header = wrote.token_header().unwrap();
    let via_header = app.get("/read").user(7).token_header(&header).send().await;
    assert_eq!(via_header.seen().outcome, TokenOutcome::Valid);
}

#[tokio::test]
async fn split_cookie_headers_are_all_read() {
    let backend = fake();
    backend.set_primary_at(0x100);
    let app = App::new(layer(&backend, &ManualClock::new(NOW)));
    let value = app.post("/write").user(3).send().await.issued().unwrap();
    let cookie = format!("primary_affinity={value}");

    // HTTP/2 sends one `cookie` header per cookie; ours is the last one.
    let answer = app
        .get("/")
        .user(3)
        .cookie("a=1")
        .cookie("b=2; c=3")
        .cookie(&cookie)
        .send()
        .await;
    assert_eq!(answer.seen().outcome, TokenOutcome::Valid);

    // Quoted, with odd spacing and non-ASCII neighbours.
    let quoted = format!("x=\u{e9}t\u{e9};primary_affinity=\"{value}\" ;  y");
    let answer = app
        .get("/")
        .user(3)
        .header(COOKIE, HeaderValue::from_bytes(quoted.as_bytes()).unwrap())
        .send()
        .await;
    assert_eq!(answer.seen().outcome, TokenOutcome::Valid);

    // And inside one HTTP/1.1 header, among others.
    let answer = app
        .get("/")
        .user(3)
        .cookie(format!("a=1; {cookie}; b=2"))
        .send()
        .await;
    assert_eq!(answer.seen().outcome, TokenOutcome::Valid);
}

#[tokio::test]
async fn of_several_valid_tokens_the_latest_issued_wins() {
    let backend = fake();
    let clock = ManualClock::new(NOW);
    let app = App::new(layer(&backend, &clock));
    backend.set_primary_at(0x100);
    let older = app.post("/write").user(9).send().await.token_header();
    let older = older.unwrap();
    clock.advance(Duration::from_secs(5));
    backend.set_primary_at(0x200);
    let newer = app.post("/write").user(9).send().await.token_header();
    let newer = newer.unwrap();
    // A stale cookie first (say host-only beside a domain cookie), and a
    // stale header beside a fresh cookie: the fresher token decides.
    for call in [
        app.get("/").user(9).cookie(format!(
            "primary_affinity={older}; primary_affinity={newer}"
        )),
        app.get("/").user(9).token_header(&older).token(&newer),
    ] {
        let answer = call.send().await;
        assert_eq!(answer.seen().required.unwrap().lsn, Lsn::new(0x200));
    }
}

#[tokio::test]
async fn of_several_valid_tokens_the_one_promising_most_wins() {
    let backend = fake();
    backend.set_replica_replayed(u64::MAX);
    let app = App::new(layer(&backend, &ManualClock::new(NOW)));
    let at =
        |lsn: u64, timeline: u32, system: u64| WritePosition::new(Lsn::new(lsn), timeline, system);
    // (winner, loser, what the handler must be asked for)
    let cases = [
        // Same cluster and timeline: the higher LSN, even expiring sooner.
        (
            minted(9, at(0x300, 1, SYSTEM), NOW + 10),
            minted(9, at(0x100, 1, SYSTEM), NOW + 30),
            Some(at(0x300, 1, SYSTEM)),
        ),
        // Same cluster, another timeline: the later timeline.
        (
            minted(9, at(0x100, 2, SYSTEM), NOW + 10),
            minted(9, at(0x900, 1, SYSTEM), NOW + 30),
            Some(at(0x100, 2, SYSTEM)),
        ),
        // Different clusters (keys shared across environments): which one
        // this backend serves is not the layer's to guess; the primary.
        (
            minted(9, at(0x1, 1, SYSTEM + 1), NOW + 30),
            minted(9, at(0x900, 1, SYSTEM), NOW + 10),
            None,
        ),
        // Pinned to the primary (no position) beats any position.
        (
            minted(9, WritePosition::default(), NOW + 10),
            minted(9, at(u64::MAX, u32::MAX, SYSTEM), NOW + 30),
            None,
        ),
    ];
    for (winner, loser, expected) in cases {
        for (first, second) in [(&winner, &loser), (&loser, &winner)] {
            for call in [
                app.get("/read").user(9).cookie(format!(
                    "primary_affinity={first}; primary_affinity={second}"
                )),
                app.get("/read").user(9).token_header(first).token(second),
            ] {
                let answer = call.send().await;
                let seen = answer.seen();
                assert_eq!(seen.outcome, TokenOutcome::Valid);
                assert_eq!(seen.required, expected, "{expected:?}");
                let pool = if expected.is_none() {
                    "primary-pool"
                } else {
                    "replica-pool"
                };
                assert_eq!(seen.read_pool, pool, "{expected:?}");
            }
        }
    }
}

#[tokio::test]
async fn rotated_keys_verify_old_tokens_and_resign_on_the_next_write() {
    let backend = fake();
    backend.set_primary_at(0x100);
    let clock = ManualClock::new(NOW);
    let old = App::new(layer(&backend, &clock));
    let token = old.post("/write").user(5).send().await.issued().unwrap();

    let rotated = KeySet::new(key(2)).with_previous(key(1));
    let new = App::new(
        ReadAfterWriteLayer::from_arc(Arc::clone(&backend), rotated.clone())
            .identity(identify)
            .clock(clock.clone()),
    );
    let read = new.get("/").user(5).token(&token).send().await;
    assert_eq!(read.seen().outcome, TokenOutcome::Valid);
    let rewritten = new.post("/write").user(5).token(&token).send().await;
    let token = decoded(&rewritten.token_header().unwrap(), &rotated, NOW);
    assert_eq!(token.key_id(), rotated.current().id());
}

#[tokio::test]
async fn time_window_mode_sends_recent_writers_to_the_primary() {
    let backend = fake();
    let clock = ManualClock::new(NOW);
    let app = App::new(
        layer(&backend, &clock)
            .consistency(Consistency::TimeWindow)
            .ttl(Duration::from_secs(5)),
    );
    let wrote = app.post("/write").user(1).send().await;
    let cookie = wrote.issued_cookie().unwrap();
    assert!(cookie.contains("Max-Age=5"), "{cookie}");
    assert_eq!(backend.captures(), 0, "no position is captured");
    let token = wrote.issued().unwrap();
    let read = app.get("/read").user(1).token(&token).send().await;
    assert_eq!(read.seen().read_pool, "primary-pool");
    assert_eq!(
        read.debug(),
        "node=primary; reason=time_window; token=valid"
    );
    clock.advance(Duration::from_secs(6));
    let later = app.get("/read").user(1).token(&token).send().await;
    assert_eq!(later.seen().read_pool, "replica-pool");
}

#[tokio::test]
async fn a_time_window_token_reaching_a_position_instance_reads_the_primary() {
    let backend = fake();
    backend.set_replica_replayed(u64::MAX);
    let clock = ManualClock::new(NOW);
    let window = App::new(
        layer(&backend, &clock)
            .consistency(Consistency::TimeWindow)
            .ttl(Duration::from_secs(5)),
    );
    let token = window.post("/write").user(1).send().await.token_header();
    let position = App::new(layer(&backend, &clock));
    let read = position
        .get("/read")
        .user(1)
        .token_header(&token.unwrap())
        .send()
        .await;
    assert_eq!(read.seen().read_pool, "primary-pool");
    assert_eq!(
        read.debug(),
        "node=primary; reason=position_unknown; token=valid"
    );
}

#[tokio::test]
async fn an_empty_identity_is_no_identity() {
    let backend = fake();
    backend.set_primary_at(0x100);
    let app = App::new(
        layer(&backend, &ManualClock::new(NOW))
            .identity(|_| Some(UserId::anonymous()))
            .allow_anonymous(false),
    );
    let wrote = app.post("/write").user(1).send().await;
    assert!(wrote.issued_cookie().is_none(), "no token for no one");
    let anonymous = AffinityToken::new(UserId::anonymous(), at(0x100, SYSTEM), NOW + 30)
        .sign(DEFAULT_COOKIE_NAME, &keys(1));
    let read = app.get("/").token(&anonymous).send().await;
    let seen = read.seen();
    assert_eq!(seen.outcome, TokenOutcome::NoIdentity);
    assert_eq!(seen.required, None);
}

//! The token a response issues and the cookie that carries it: who gets
//! one, what it promises, its attributes (see `tests.rs` for the harness).

use std::sync::Arc;
use std::time::Duration;

use http::header::SET_COOKIE;
use http::StatusCode;
use metrics_util::debugging::DebugValue;

use super::tests::*;
use super::*;
use crate::clock::ManualClock;
use crate::handle::TokenOutcome;
use crate::position::Lsn;
use crate::token::{AffinityToken, UserId};

#[tokio::test]
async fn a_write_appends_the_cookie_beside_the_handlers_own() {
    let backend = fake();
    backend.set_primary_at(0x4000);
    let app = App::new(layer(&backend, &ManualClock::new(NOW)));
    let answer = app.post("/own-cookie/write/read").user(1).send().await;

    let all: Vec<_> = answer.headers().get_all(SET_COOKIE).iter().collect();
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all
        .iter()
        .any(|v| v.to_str().unwrap() == "theme=dark; Path=/"));
    let cookie = answer.issued_cookie().unwrap();
    for attribute in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/", "Max-Age=30"] {
        assert!(
            cookie.contains(attribute),
            "{attribute} missing from {cookie}"
        );
    }
    assert!(!cookie.contains("Domain"));
    // The same token travels in the header for API and gRPC clients.
    let header = answer.token_header().unwrap();
    let pair = cookie.split(';').next().unwrap();
    assert_eq!(pair, format!("primary_affinity={header}"));
    let token = decoded(&header, &keys(1), NOW);
    assert_eq!(token.position(), at(0x4000, SYSTEM));
    assert!(
        AffinityToken::verify(
            &header,
            DEFAULT_COOKIE_NAME,
            &keys(1),
            NOW,
            &UserId::from(1u64)
        )
        .is_ok(),
        "the token is user 1's"
    );
    assert_eq!(token.expires_at(), NOW + 31, "TTL rounded up, never short");
    // Within the writing request, reads see its own write: the primary.
    assert_eq!(answer.seen().read_pool, "primary-pool");
    assert_eq!(backend.captures(), 1);
}

#[tokio::test]
async fn error_responses_after_a_write_still_carry_the_token() {
    let backend = fake();
    backend.set_primary_at(0x100);
    let app = App::new(layer(&backend, &ManualClock::new(NOW)));
    let answer = app.post("/write/fail").user(3).send().await;
    assert_eq!(answer.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(answer.issued_cookie().is_some());
}

#[tokio::test]
async fn a_failed_capture_pins_the_user_to_the_primary() {
    let metrics = Metrics::record();
    let backend = fake();
    backend.fail_captures(true);
    backend.set_replica_replayed(u64::MAX);
    let app = App::new(layer(&backend, &ManualClock::new(NOW)));
    let answer = app.post("/own-cookie/write").user(3).send().await;
    assert_eq!(answer.status(), StatusCode::OK);
    // The write may have committed: the client must not keep an older token
    // that promises less, so it gets one with an unknown position...
    let token = answer.token_header().unwrap();
    assert!(answer.issued_cookie().is_some());
    // ...beside the handler's own cookie, untouched.
    assert_eq!(answer.headers().get_all(SET_COOKIE).iter().count(), 2);
    // That token sends session reads to the primary, whatever replicas say.
    let read = app.get("/read").user(3).token_header(&token).send().await;
    assert_eq!(read.seen().read_pool, "primary-pool");
    assert_eq!(
        read.debug(),
        "node=primary; reason=position_unknown; token=valid"
    );
    assert_eq!(
        metrics.value("read_after_write_capture_failures_total"),
        Some(DebugValue::Counter(1))
    );
}

#[tokio::test]
async fn the_new_token_never_moves_backwards() {
    let backend = fake();
    backend.set_primary_at(0x9000);
    let app = App::new(layer(&backend, &ManualClock::new(NOW)));
    let first = app.post("/write").user(5).send().await.issued().unwrap();
    // A capture that reports an older position (another instance's primary
    // view lagging, say) must not lower the promise.
    backend.set_primary_at(0x10);
    let second = app.post("/write").user(5).token(&first).send().await;
    let token = decoded(&second.token_header().unwrap(), &keys(1), NOW);
    assert_eq!(token.position().lsn, Lsn::new(0x9000));
}

#[tokio::test]
async fn cookie_attributes_follow_the_configuration() {
    let backend = fake();
    let app = App::new(
        ReadAfterWriteLayer::from_arc(Arc::clone(&backend), keys(1))
            .cookie_name("raw")
            .unwrap()
            .secure(false)
            .domain("example.com")
            .unwrap()
            .ttl(Duration::from_secs(90))
            .without_token_header(),
    );
    let answer = app.post("/write").send().await;
    let cookie = answer
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap())
        .find(|v| v.starts_with("raw="))
        .unwrap()
        .to_owned();
    assert!(!cookie.contains("Secure"), "{cookie}");
    assert!(
        cookie.contains("Domain=example.com") && cookie.contains("Max-Age=90"),
        "{cookie}"
    );
    assert!(answer.token_header().is_none());
}

#[tokio::test]
async fn identity_rules_decide_who_gets_tokens() {
    let backend = fake();
    // With an identity function, anonymous requests get no token...
    let app = App::new(layer(&backend, &ManualClock::new(NOW)));
    let answer = app.post("/write").send().await;
    assert!(answer.issued_cookie().is_none());
    // ...unless anonymous tokens are allowed.
    let app = App::new(layer(&backend, &ManualClock::new(NOW)).allow_anonymous(true));
    let token = app.post("/write").send().await.issued().unwrap();
    let read = app.get("/").token(&token).send().await;
    assert_eq!(read.seen().outcome, TokenOutcome::Valid);
    // A logged-in user does not inherit the anonymous token.
    let read = app.get("/").user(8).token(&token).send().await;
    assert_eq!(read.seen().outcome, TokenOutcome::OtherUser);
}

#[tokio::test]
async fn unsafe_methods_can_count_as_writes() {
    let backend = fake();
    let app = App::new(layer(&backend, &ManualClock::new(NOW)).writes_on_unsafe_methods(true));
    let post = app.post("/").user(1).send().await;
    assert!(post.issued_cookie().is_some());
    let get = app.get("/").user(1).send().await;
    assert!(get.issued_cookie().is_none());
}

#[tokio::test]
async fn huge_ttls_are_clamped_to_four_hundred_days() {
    const CAP: u64 = 400 * 24 * 60 * 60;
    let backend = fake();
    for configured in [
        layer(&backend, &ManualClock::new(NOW)).ttl(Duration::MAX),
        layer(&backend, &ManualClock::new(NOW)).ttl(Duration::from_secs(u64::MAX)),
        layer(&backend, &ManualClock::new(NOW))
            .consistency(Consistency::TimeWindow)
            .ttl(Duration::MAX),
    ] {
        let wrote = App::new(configured).post("/write").user(1).send().await;
        let cookie = wrote.issued_cookie().unwrap();
        assert!(
            cookie.split("; ").any(|a| a == format!("Max-Age={CAP}")),
            "{cookie}"
        );
        let token = decoded(&wrote.token_header().unwrap(), &keys(1), NOW);
        assert_eq!(token.expires_at(), NOW + CAP + 1);
    }
}

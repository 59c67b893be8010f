//! Bad, junk and forged tokens: never an error, never a win, and never a
//! way to hide the requester's valid token (see `tests.rs` for the harness;
//! `tests/hostile.rs` generates such requests by the hundred thousand).

use std::time::Duration;

use http::StatusCode;

use super::tests::*;
use super::*;
use crate::clock::ManualClock;
use crate::handle::TokenOutcome;
use crate::position::{Lsn, WritePosition};
use crate::token::{AffinityToken, TokenError, UserId};

#[tokio::test]
async fn bad_tokens_are_ignored_and_counted_never_an_error() {
    let metrics = Metrics::record();

    let backend = fake();
    backend.set_primary_at(0x100);
    let clock = ManualClock::new(NOW);
    let app = App::new(layer(&backend, &clock));
    let token = app.post("/write").user(3).send().await.token_header();
    let token = token.unwrap();

    // A character of the tag: a forgery that still names user 3. (One that
    // changed the user id would be skipped before its MAC, as other_user.)
    let mut tampered = token.clone().into_bytes();
    tampered[60] = if tampered[60] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let foreign = AffinityToken::new(UserId::from(3u64), WritePosition::default(), NOW + 30)
        .sign(DEFAULT_COOKIE_NAME, &keys(9));

    type Headers = Vec<(&'static str, Vec<u8>)>;
    let cases: Vec<(Headers, TokenOutcome)> = vec![
        (
            vec![(
                "cookie",
                format!("primary_affinity={tampered}").into_bytes(),
            )],
            TokenOutcome::Rejected(TokenError::BadSignature),
        ),
        (
            vec![("cookie", format!("primary_affinity={foreign}").into_bytes())],
            TokenOutcome::Rejected(TokenError::UnknownKey),
        ),
        (
            vec![("cookie", b"primary_affinity=%%%garbage%%%".to_vec())],
            TokenOutcome::Rejected(TokenError::Malformed),
        ),
        (
            vec![(
                "cookie",
                format!("primary_affinity={}", "A".repeat(100_000)).into_bytes(),
            )],
            TokenOutcome::Rejected(TokenError::TooLong),
        ),
        (
            vec![("cookie", b"primary_affinity=\xff\xfe; x=\x80".to_vec())],
            TokenOutcome::Absent,
        ),
        (
            vec![(
                "cookie",
                b";;;=;primary_affinity;=primary_affinity".to_vec(),
            )],
            TokenOutcome::Absent,
        ),
        (
            vec![(DEFAULT_TOKEN_HEADER, b"\x80\x81".to_vec())],
            TokenOutcome::Absent,
        ),
        (
            vec![(DEFAULT_TOKEN_HEADER, b"   ".to_vec())],
            TokenOutcome::Rejected(TokenError::Malformed),
        ),
    ];
    for (headers, expected) in cases {
        let mut call = app.get("/read").user(3);
        for (name, value) in &headers {
            call = call.header(*name, value.as_slice());
        }
        let answer = call.send().await;
        assert_eq!(answer.status(), StatusCode::OK);
        let seen = answer.seen();
        assert_eq!(seen.outcome, expected, "{headers:?}");
        // A bad token reads like no token, but one under a key id this
        // instance does not know that names the requester: it may be
        // another instance's, after a key rotation, promising a write.
        let pool = if expected == TokenOutcome::Rejected(TokenError::UnknownKey) {
            "primary-pool"
        } else {
            "replica-pool"
        };
        assert_eq!(seen.read_pool, pool, "{headers:?}");
    }

    // Another user's valid token is ignored too.
    let answer = app.get("/").user(4).token_header(&token).send().await;
    assert_eq!(answer.seen().outcome, TokenOutcome::OtherUser);
    // So is an expired one.
    clock.advance(Duration::from_secs(31));
    let answer = app.get("/").user(3).token_header(&token).send().await;
    assert_eq!(
        answer.seen().outcome,
        TokenOutcome::Rejected(TokenError::Expired)
    );

    let counts = metrics.token_counts();
    for outcome in [
        "bad_signature",
        "unknown_key",
        "malformed",
        "too_long",
        "other_user",
        "expired",
    ] {
        assert!(
            counts.iter().any(|(o, n)| o == outcome && *n >= 1),
            "{outcome} not counted: {counts:?}"
        );
    }
    assert!(!counts.iter().any(|(o, _)| o == "absent"));
}

/// `token` with its LSN changed, so it is well formed, names the same user,
/// key and expiry, and fails only the MAC.
fn forged_from(token: &str, lsn: u64) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    let mut raw = URL_SAFE_NO_PAD.decode(token).unwrap();
    assert_eq!(raw[0], 3, "a version 3 token");
    // After the head (19 bytes), the first bookmark's system identifier
    // and timeline (12), then its LSN.
    let at = 19 + 12;
    raw[at..at + 8].copy_from_slice(&lsn.to_be_bytes());
    URL_SAFE_NO_PAD.encode(raw)
}

#[tokio::test]
async fn junk_cannot_hide_a_valid_token() {
    let backend = fake();
    let app = App::new(layer(&backend, &ManualClock::new(NOW)));
    let valid = minted(3, at(0x700, SYSTEM), NOW + 30);
    let other_user = minted(4, at(0x900, SYSTEM), NOW + 30);
    let expired = minted(3, at(0x900, SYSTEM), NOW - 1);
    // Under a key this instance does not know, promising no more than the
    // valid token: nothing to read from the primary for.
    let unknown_key = AffinityToken::new(UserId::from(3u64), at(0x600, SYSTEM), NOW + 30)
        .sign(DEFAULT_COOKIE_NAME, &keys(9));

    let stuffed = |junk: &str, count: usize| {
        let mut text = format!("{junk}; ").repeat(count);
        text.push_str(&format!("primary_affinity={valid}"));
        text
    };
    let mut cases: Vec<(String, Call<'_>)> = Vec::new();
    for junk in [
        "primary_affinity=x".to_owned(),
        format!("primary_affinity={other_user}"),
        format!("primary_affinity={expired}"),
        format!("primary_affinity={unknown_key}"),
        format!("primary_affinity={}", "A".repeat(5_000)),
        format!("primary_affinity={}", &valid[..valid.len() - 1]),
    ] {
        for count in [4, 5, 300] {
            cases.push((
                format!("{count} x {}", &junk[..junk.len().min(40)]),
                app.get("/read").user(3).cookie(stuffed(&junk, count)),
            ));
        }
    }
    // Junk token headers used to hide every cookie.
    let mut call = app.get("/read").user(3);
    for _ in 0..8 {
        call = call.token_header("junk");
    }
    cases.push(("8 junk headers".into(), call.token(&valid)));
    // Well-formed forgeries naming the requester spend the MAC budget, but
    // fewer than the budget cannot hide the valid token behind them.
    let forged = (0..MAX_MACS_PER_REQUEST as u64 - 1)
        .map(|i| format!("primary_affinity={}", forged_from(&valid, 0xFFFF_0000 + i)))
        .collect::<Vec<_>>()
        .join("; ");
    cases.push((
        "forgeries below the budget".into(),
        app.get("/read")
            .user(3)
            .cookie(format!("{forged}; primary_affinity={valid}")),
    ));
    for (name, call) in cases {
        let answer = call.send().await;
        let seen = answer.seen();
        assert_eq!(seen.outcome, TokenOutcome::Valid, "{name}");
        assert_eq!(
            seen.required.map(|p| p.lsn),
            Some(Lsn::new(0x700)),
            "{name}"
        );
    }
    // One under an unknown key that may promise more is not junk: the
    // primary, whatever the valid token says.
    let unknown_more = AffinityToken::new(UserId::from(3u64), at(0x900, SYSTEM), NOW + 30)
        .sign(DEFAULT_COOKIE_NAME, &keys(9));
    let answer = app
        .get("/read")
        .user(3)
        .cookie(format!(
            "primary_affinity={unknown_more}; primary_affinity={valid}"
        ))
        .send()
        .await;
    let pinned = answer.seen();
    assert_eq!(
        (pinned.outcome, pinned.required, pinned.read_pool),
        (TokenOutcome::Valid, None, "primary-pool")
    );

    // The bound itself: that many well-formed forgeries naming the requester
    // before the valid token cost exactly the budget in MACs, and leave the
    // valid token unchecked: nothing proves what the user wrote last, so
    // session reads go to the primary, never to a replica that may be stale.
    let forged = (0..MAX_MACS_PER_REQUEST as u64)
        .map(|i| format!("primary_affinity={}", forged_from(&valid, 0xFFFF_0000 + i)))
        .collect::<Vec<_>>()
        .join("; ");
    let answer = app
        .get("/read")
        .user(3)
        .cookie(format!("{forged}; primary_affinity={valid}"))
        .send()
        .await;
    let hidden = answer.seen();
    assert_eq!(
        hidden.outcome,
        TokenOutcome::Rejected(TokenError::BadSignature)
    );
    assert_eq!(hidden.read_pool, "primary-pool");
}

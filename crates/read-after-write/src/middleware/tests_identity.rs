//! Layer tests of [`Db::bind_user`]: a handler that establishes who the
//! requester is (sign-up, login) gets that user's token, over the shared
//! fake backend with a named cluster (HTTP mechanics only; the real-cluster
//! proof is `tests/pg_identity.rs`; see `tests.rs` for the harness, whose
//! step handler binds users with `bind-<n>`).

use super::tests::*;
use super::*;
use crate::bookmark::{Bookmark, Bookmarks};
use crate::clock::ManualClock;
use crate::requirement::Requirement;
use crate::token::{AffinityToken, KeySet, UserId};

/// Another service's cluster.
const ELSEWHERE: u64 = 99;

/// A bookmark at `lsn` of `system` (here, unlike the harness's `at`, a
/// bookmark).
fn at(lsn: u64, system: u64) -> Bookmark {
    Bookmark::new(super::tests::at(lsn, system))
}

/// A token of `user` carrying `bookmarks`.
fn token(user: UserId, bookmarks: &[Bookmark]) -> String {
    let mut set = Bookmarks::new();
    for bookmark in bookmarks {
        set.set(*bookmark);
    }
    AffinityToken::with_bookmarks(user, set, NOW + 30)
        .unwrap()
        .sign(DEFAULT_COOKIE_NAME, &keys(1))
}

fn layer() -> ReadAfterWriteLayer<FakeBackend> {
    ReadAfterWriteLayer::new(FakeBackend::cluster(7), keys(1))
        .identity(identify)
        .clock(ManualClock::new(NOW))
}

/// POSTs `path` as `user` (none: no identity) with `token` as the affinity
/// cookie; what the handler saw and the token the response issued, decoded.
async fn send(
    layer: ReadAfterWriteLayer<FakeBackend>,
    path: &str,
    user: Option<u64>,
    token: Option<&str>,
) -> (Seen, Option<AffinityToken>) {
    let app = App::new(layer);
    let mut call = app.post(path);
    if let Some(user) = user {
        call = call.user(user);
    }
    if let Some(token) = token {
        call = call.token(token);
    }
    let answer = call.send().await;
    (answer.seen().clone(), answer.issued().map(|t| decode(&t)))
}

/// Verifies a token for whichever of the users these tests bind (42, 41)
/// or the anonymous one it belongs to.
fn decode(text: &str) -> AffinityToken {
    [
        UserId::from(42u64),
        UserId::from(41u64),
        UserId::anonymous(),
    ]
    .iter()
    .find_map(|user| AffinityToken::verify(text, DEFAULT_COOKIE_NAME, &keys(1), NOW, user).ok())
    .expect("a token of one of the test's users")
}

#[tokio::test]
async fn a_sign_up_gets_the_new_users_token_whether_it_binds_before_or_after_writing() {
    let captured = FakeBackend::cluster(7).at(0x1000);
    for path in ["/write/bind-42", "/bind-42/write"] {
        let (seen, issued) = send(layer(), path, None, None).await;
        let issued = issued.unwrap_or_else(|| panic!("{path}: no token"));
        assert_eq!(issued.user(), &UserId::from(42u64), "{path}");
        assert_eq!(issued.bookmarks(), &Bookmarks::one(Bookmark::new(captured)));
        assert_eq!(seen.user, Some(UserId::from(42u64)));
    }
    // The control: without the binding the anonymous write gets nothing.
    let (seen, issued) = send(layer(), "/write", None, None).await;
    assert!(issued.is_none());
    assert_eq!(seen.user, None);
}

#[tokio::test]
async fn an_anonymous_sessions_promises_go_to_the_user_who_signs_in() {
    let layer = layer().allow_anonymous(true);
    let anonymous = token(UserId::anonymous(), &[at(0x500, 7), at(0x900, ELSEWHERE)]);
    // Signing in without a write: the token is re-issued for the user,
    // every promise kept.
    let (_, issued) = send(layer.clone(), "/bind-42", None, Some(&anonymous)).await;
    let issued = issued.expect("the promises move to the user");
    assert_eq!(issued.user(), &UserId::from(42u64));
    assert_eq!(issued.bookmark(7), Some(&at(0x500, 7)));
    assert_eq!(issued.bookmark(ELSEWHERE), Some(&at(0x900, ELSEWHERE)));
    // With a write (a last-login row): cluster 7 moves on, the other stays.
    let (seen, issued) = send(layer, "/write/bind-42/requirement", None, Some(&anonymous)).await;
    // (The backend's captures count up: the requirement took 0x1000, the
    // response 0x1001.)
    let issued = issued.unwrap();
    assert_eq!(
        issued.bookmark(7),
        Some(&Bookmark::new(FakeBackend::cluster(7).at(0x1001)))
    );
    assert_eq!(issued.bookmark(ELSEWHERE), Some(&at(0x900, ELSEWHERE)));
    assert_eq!(
        seen.requirements,
        [Requirement::Position(FakeBackend::cluster(7).at(0x1000))]
    );
}

#[tokio::test]
async fn another_named_users_promises_stay_theirs() {
    // Signed in as 7, the browser switches to account 42.
    let theirs = token(UserId::from(7u64), &[at(0x500, 7), at(0x900, ELSEWHERE)]);
    let (seen, issued) = send(layer(), "/bind-42/requirement", Some(7), Some(&theirs)).await;
    assert!(
        issued.is_none(),
        "nothing of 42's to carry, nothing written"
    );
    assert_eq!(seen.requirements, [Requirement::Nothing]);
    let (_, issued) = send(layer(), "/bind-42/write", Some(7), Some(&theirs)).await;
    assert_eq!(
        issued.unwrap().bookmarks(),
        &Bookmarks::one(Bookmark::new(FakeBackend::cluster(7).at(0x1000)))
    );
    // Binding the identified user again changes nothing.
    let (seen, issued) = send(layer(), "/bind-7/requirement", Some(7), Some(&theirs)).await;
    assert!(issued.is_none());
    assert_eq!(
        seen.requirements,
        [Requirement::Position(at(0x500, 7).position)]
    );
}

#[tokio::test]
async fn the_last_binding_of_any_clone_wins_and_downstream_calls_follow_it() {
    let (seen, issued) = send(layer(), "/write/bind-41/bind-42/forward", None, None).await;
    assert_eq!(seen.user, Some(UserId::from(42u64)));
    assert_eq!(issued.unwrap().user(), &UserId::from(42u64));
    let forwarded = decode(seen.forwarded[0].as_deref().unwrap());
    assert_eq!(forwarded.user(), &UserId::from(42u64));
    // Binding the anonymous id, with anonymous tokens off, binds no one.
    let (seen, issued) = send(layer(), "/bind-42/write/bind-anon", Some(7), None).await;
    assert_eq!((seen.user, issued), (None, None));
}

#[tokio::test]
async fn unread_tokens_move_with_an_anonymous_session_only() {
    // A token under a key this instance does not know, of the anonymous
    // browser session and of a named user.
    let rotated = KeySet::new(key(6));
    let unknown = |user: UserId| {
        AffinityToken::with_bookmarks(user, Bookmarks::one(at(0x900, ELSEWHERE)), NOW + 30)
            .unwrap()
            .sign(DEFAULT_COOKIE_NAME, &rotated)
    };
    let layer = layer().allow_anonymous(true);
    let (_, issued) = send(
        layer.clone(),
        "/bind-42",
        None,
        Some(&unknown(UserId::anonymous())),
    )
    .await;
    assert_eq!(
        issued.unwrap().bookmarks(),
        &Bookmarks::one(Bookmark::pinned(ELSEWHERE))
    );
    let (_, issued) = send(
        layer,
        "/bind-42/write",
        Some(8),
        Some(&unknown(UserId::from(8u64))),
    )
    .await;
    assert_eq!(issued.unwrap().bookmark(ELSEWHERE), None);
}

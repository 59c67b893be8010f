//! Layer tests of [`Db::bind_user`]: a handler that establishes who the
//! requester is (sign-up, login) gets that user's token, over the in-test
//! backend of the session tests (HTTP mechanics only; the real-cluster
//! proof is `tests/pg_identity.rs`).

use std::convert::Infallible;
use std::sync::Mutex;

use http::header::{COOKIE, SET_COOKIE};
use http::{Request, Response};
use tower::{service_fn, Layer, ServiceExt};

use super::tests_sessions::Tagged;
use super::*;
use crate::bookmark::{Bookmark, Bookmarks};
use crate::clock::ManualClock;
use crate::handle::Db;
use crate::position::{Lsn, WritePosition};
use crate::requirement::Requirement;
use crate::token::{AffinityToken, SigningKey};
use crate::token::{KeySet, UserId};

const NOW: u64 = 1_800_000_000;
/// Another service's cluster.
const ELSEWHERE: u64 = 99;

fn keys() -> KeySet {
    KeySet::new(SigningKey::from_bytes(&[5; 32]).unwrap())
}

fn identify(parts: &http::request::Parts) -> Option<UserId> {
    let id = parts
        .headers
        .get("x-user-id")?
        .to_str()
        .ok()?
        .parse::<u64>()
        .ok()?;
    Some(UserId::from(id))
}

fn at(lsn: u64, system: u64) -> Bookmark {
    Bookmark::new(WritePosition::new(Lsn::new(lsn), 1, system))
}

/// A token of `user` carrying `bookmarks`.
fn token(user: UserId, bookmarks: &[Bookmark]) -> String {
    let mut set = Bookmarks::new();
    for bookmark in bookmarks {
        set.set(*bookmark);
    }
    AffinityToken::with_bookmarks(user, set, NOW + 30)
        .unwrap()
        .sign(DEFAULT_COOKIE_NAME, &keys())
}

/// What the handler saw.
#[derive(Clone, Debug, Default)]
struct Seen {
    /// `db.user()` at the end of the handler.
    user: Option<UserId>,
    /// Each `requirement` step's answer.
    requirements: Vec<Requirement>,
    /// Each `forward` step's token.
    forwarded: Vec<Option<String>>,
}

/// Steps separated by `/`: `write`, `bind-<n>` (through a fresh clone of
/// the handle), `bind-anon`, `requirement`, `forward`.
async fn handler(req: Request<()>) -> Result<Response<()>, Infallible> {
    let db = req.extensions().get::<Db<Tagged>>().unwrap().clone();
    let seen = Mutex::new(Seen::default());
    for step in req.uri().path().split('/').filter(|s| !s.is_empty()) {
        match step {
            "write" => {
                let _ = db.write();
            }
            "bind-anon" => db.clone().bind_user(UserId::anonymous()),
            "requirement" => {
                let requirement = db.requirement().await;
                seen.lock().unwrap().requirements.push(requirement);
            }
            "forward" => {
                let header = db.forward_header().await;
                let value = header.map(|(_, v)| v.to_str().unwrap().to_owned());
                seen.lock().unwrap().forwarded.push(value);
            }
            other => {
                let id = other.strip_prefix("bind-").unwrap().parse::<u64>().unwrap();
                db.clone().bind_user(UserId::from(id));
            }
        }
    }
    let mut seen = seen.into_inner().unwrap();
    seen.user = db.user();
    let mut response = Response::new(());
    response.extensions_mut().insert(seen);
    Ok(response)
}

fn layer() -> ReadAfterWriteLayer<Tagged> {
    ReadAfterWriteLayer::new(Tagged::new(7), keys())
        .identity(identify)
        .clock(ManualClock::new(NOW))
}

/// Sends `path` as `user` (none: no identity) with `cookie`; what the
/// handler saw and the token the response issued, decoded.
async fn send(
    layer: ReadAfterWriteLayer<Tagged>,
    path: &str,
    user: Option<u64>,
    cookie: Option<&str>,
) -> (Seen, Option<AffinityToken>) {
    let mut request = Request::post(path);
    if let Some(user) = user {
        request = request.header("x-user-id", user.to_string());
    }
    if let Some(cookie) = cookie {
        request = request.header(COOKIE, format!("{DEFAULT_COOKIE_NAME}={cookie}"));
    }
    let response = layer
        .layer(service_fn(handler))
        .oneshot(request.body(()).unwrap())
        .await
        .unwrap();
    let issued = response.headers().get_all(SET_COOKIE).iter().find_map(|v| {
        let text = v.to_str().ok()?.split(';').next()?;
        let token = text.strip_prefix("primary_affinity=")?;
        Some(AffinityToken::verify(token, DEFAULT_COOKIE_NAME, &keys(), NOW).unwrap())
    });
    let seen = response.extensions().get::<Seen>().unwrap().clone();
    (seen, issued)
}

fn decode(text: &str) -> AffinityToken {
    AffinityToken::verify(text, DEFAULT_COOKIE_NAME, &keys(), NOW).unwrap()
}

#[tokio::test]
async fn a_sign_up_gets_the_new_users_token_whether_it_binds_before_or_after_writing() {
    let captured = Tagged::new(7).at(0x1000);
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
        Some(&Bookmark::new(Tagged::new(7).at(0x1001)))
    );
    assert_eq!(issued.bookmark(ELSEWHERE), Some(&at(0x900, ELSEWHERE)));
    assert_eq!(
        seen.requirements,
        [Requirement::Position(Tagged::new(7).at(0x1000))]
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
        &Bookmarks::one(Bookmark::new(Tagged::new(7).at(0x1000)))
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
    let rotated = KeySet::new(SigningKey::from_bytes(&[6; 32]).unwrap());
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

//! Monotonic reads and several clusters, over the fake backend's named
//! clusters with a tagged replica (HTTP mechanics only; the routing itself
//! is tested on real clusters in `tests/pg_sessions.rs`; see `tests.rs` for
//! the harness).

use std::sync::Arc;
use std::time::Duration;

use http::header::SET_COOKIE;

use super::tests::*;
use super::*;
use crate::backend::RouteReason;
use crate::bookmark::{Bookmark, Bookmarks, ReplicaTag};
use crate::clock::ManualClock;
use crate::position::Lsn;
use crate::token::{AffinityToken, UserId};

fn monotonic_layer(clock: &ManualClock) -> ReadAfterWriteLayer<FakeBackend> {
    ReadAfterWriteLayer::new(FakeBackend::cluster(7), keys(1))
        .clock(clock.clone())
        .consistency(Consistency::Monotonic)
}

/// Sends `path` with `token` as the affinity cookie; the token the response
/// set, if any, and the reason of the last access.
async fn send(app: &App, path: &str, token: Option<&str>) -> (Option<String>, RouteReason) {
    let mut call = app.get(path);
    if let Some(token) = token {
        call = call.token(token);
    }
    let answer = call.send().await;
    (answer.issued(), answer.reason())
}

fn decode(token: &str) -> AffinityToken {
    decoded(token, &keys(1), NOW)
}

#[tokio::test]
async fn a_first_read_ties_the_session_to_its_replica_and_later_reads_issue_nothing() {
    let clock = ManualClock::new(NOW);
    let app = App::new(monotonic_layer(&clock));
    let (token, reason) = send(&app, "/read", None).await;
    assert_eq!(reason, RouteReason::NoToken);
    let token = token.expect("a session that read gets a bookmark");
    let bookmark = decode(&token).bookmarks().as_slice()[0];
    assert_eq!(bookmark.replica, Some(FakeBackend::replica_1()));
    for path in ["/read", "/eventual", "/read/eventual"] {
        let (again, reason) = send(&app, path, Some(&token)).await;
        assert_eq!(reason, RouteReason::Sticky, "{path}");
        assert_eq!(again, None, "{path}: nothing changed, nothing issued");
    }
    // What a re-issue adds to a response: the cookie and the token header.
    let response = app.get("/read").send().await;
    let added: usize = response
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len())
        .sum();
    let cookie = response.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    eprintln!("a re-issued token adds {added} header bytes: set-cookie: {cookie}");
    assert!(added < 300, "{added}");
    // Without monotonic reads, a read never issues a token.
    let plain =
        App::new(ReadAfterWriteLayer::new(FakeBackend::cluster(7), keys(1)).clock(clock.clone()));
    assert_eq!(send(&plain, "/read", None).await.0, None);
}

#[tokio::test]
async fn a_reading_session_keeps_its_token_alive() {
    let clock = ManualClock::new(NOW);
    let app = App::new(monotonic_layer(&clock));
    let token = send(&app, "/read", None).await.0.unwrap();
    clock.advance(Duration::from_secs(14));
    assert_eq!(send(&app, "/read", Some(&token)).await.0, None);
    // Less than half the 30 s TTL left: re-issued, the same bookmark.
    clock.advance(Duration::from_secs(2));
    let renewed = send(&app, "/read", Some(&token)).await.0.expect("renewed");
    let (old, new) = (decode(&token), decode(&renewed));
    assert_eq!(old.bookmarks(), new.bookmarks());
    assert!(new.expires_at() > old.expires_at());
}

#[tokio::test]
async fn a_write_keeps_the_replica_and_a_primary_read_is_captured() {
    let clock = ManualClock::new(NOW);
    let layer = monotonic_layer(&clock);
    let backend = Arc::clone(layer.backend());
    let app = App::new(layer);
    let token = send(&app, "/read", None).await.0.unwrap();
    // A write raises the position and keeps the replica: a write is not
    // a read.
    let wrote = send(&app, "/write", Some(&token)).await.0.unwrap();
    let bookmark = decode(&wrote).bookmarks().as_slice()[0];
    assert_eq!(bookmark.position, backend.at(0x1000));
    assert_eq!(bookmark.replica, Some(FakeBackend::replica_1()));
    // A read of the primary: the capture after it bounds what the session
    // saw, and the bookmark is tied to no replica.
    let (read_primary, reason) = send(&app, "/primary", Some(&wrote)).await;
    assert_eq!(reason, RouteReason::Critical);
    let bookmark = decode(&read_primary.unwrap()).bookmarks().as_slice()[0];
    assert_eq!(bookmark, Bookmark::new(backend.at(0x1001)));
    assert_eq!(backend.captures(), 2);
    // Later reads of a request that read the primary stay there.
    let (_, reason) = send(&app, "/primary/read", Some(&wrote)).await;
    assert_eq!(reason, RouteReason::ReadPrimaryThisRequest);
}

#[tokio::test]
async fn a_session_that_left_a_lagging_replica_comes_back_to_it_without_a_new_token() {
    let clock = ManualClock::new(NOW);
    let layer = monotonic_layer(&clock);
    let backend = Arc::clone(layer.backend());
    let app = App::new(layer);
    let token = send(&app, "/read", None).await.0.unwrap();
    // The replica falls behind the user's write.
    backend.set_replica_replayed(0x0FFF);
    let wrote = send(&app, "/write", Some(&token)).await.0.unwrap();
    // The read right after leaves through the primary; the session keeps
    // its replica, with what the primary showed as a floor there.
    let (left, reason) = send(&app, "/read", Some(&wrote)).await;
    assert_eq!(reason, RouteReason::PredictedLate);
    let kept = decode(&left.unwrap()).bookmarks().as_slice()[0];
    assert_eq!(
        kept,
        Bookmark::new(backend.at(0x1001)).returning_to(FakeBackend::replica_1())
    );
    // A write the session has not read back binds session reads only.
    let (again, reason) = send(&app, "/eventual", Some(&wrote)).await;
    assert_eq!((again, reason), (None, RouteReason::Sticky));
    // A floor it has seen binds eventual reads too: until the replica
    // replays it they leave through the primary, and each raises it.
    let floor = AffinityToken::with_bookmarks(UserId::anonymous(), Bookmarks::one(kept), NOW + 30)
        .unwrap()
        .sign("primary_affinity", &keys(1));
    let (raised, reason) = send(&app, "/eventual", Some(&floor)).await;
    assert_eq!(reason, RouteReason::Lagging);
    let raised = decode(&raised.unwrap()).bookmarks().as_slice()[0];
    assert!(raised.floor && raised.position.lsn > kept.position.lsn);
    // Once it has, the session is back on it and nothing is re-issued.
    backend.set_replica_replayed(u64::MAX);
    for path in ["/read", "/eventual"] {
        let (issued, reason) = send(&app, path, Some(&floor)).await;
        assert_eq!((issued, reason), (None, RouteReason::Sticky), "{path}");
    }
    // A write keeps the floor: eventual reads there still wait for it.
    let wrote_again = send(&app, "/write", Some(&floor)).await.0.unwrap();
    let after = decode(&wrote_again).bookmarks().as_slice()[0];
    assert!(after.floor && after.replica == Some(FakeBackend::replica_1()));
}

#[tokio::test]
async fn a_session_that_loses_its_replica_reads_the_primary_and_is_captured() {
    let clock = ManualClock::new(NOW);
    let layer = monotonic_layer(&clock);
    let backend = Arc::clone(layer.backend());
    let app = App::new(layer);
    // A token tied to a replica this backend does not have (restarted).
    let gone = Bookmark::new(backend.at(0x10)).on_replica(ReplicaTag::of("replica-1", 2));
    let token = AffinityToken::with_bookmarks(UserId::anonymous(), Bookmarks::one(gone), NOW + 30)
        .unwrap()
        .sign("primary_affinity", &keys(1));
    for path in ["/read", "/eventual"] {
        let (issued, reason) = send(&app, path, Some(&token)).await;
        assert_eq!(reason, RouteReason::LeftReplica, "{path}");
        let bookmark = decode(&issued.unwrap()).bookmarks().as_slice()[0];
        assert_eq!(bookmark.replica, None, "{path}");
        assert!(bookmark.position.lsn >= Lsn::new(0x1000), "{path}");
    }
}

#[tokio::test]
async fn one_token_covers_two_clusters_and_each_bookmark_stays_with_its_own() {
    let clock = ManualClock::new(NOW);
    let layer = ReadAfterWriteLayer::new(FakeBackend::cluster(7), keys(1))
        .clock(clock.clone())
        .cluster("orders", FakeBackend::cluster(8))
        .unwrap();
    let app = App::new(layer);
    let token = send(&app, "/write/orders/write", None).await.0.unwrap();
    let token_read = decode(&token);
    assert_eq!(token_read.bookmarks().len(), 2);
    assert_eq!(token_read.bookmark(7).unwrap().position.system_id, 7);
    assert_eq!(token_read.bookmark(8).unwrap().position.system_id, 8);
    // Reads of each cluster honour that cluster's bookmark.
    let (_, reason) = send(&app, "/orders/read", Some(&token)).await;
    assert_eq!(reason, RouteReason::CaughtUp);
    // A token of cluster 8 only leaves cluster 7's reads eventual.
    let only_orders = send(&app, "/orders/write", None).await.0.unwrap();
    assert_eq!(decode(&only_orders).bookmarks().len(), 1);
    let (_, reason) = send(&app, "/read", Some(&only_orders)).await;
    assert_eq!(reason, RouteReason::NoToken);
    let (_, reason) = send(&app, "/orders/read", Some(&only_orders)).await;
    assert_eq!(reason, RouteReason::CaughtUp);
}

#[test]
fn clusters_must_be_told_apart() {
    let layer = || ReadAfterWriteLayer::new(FakeBackend::cluster(7), keys(1));
    assert!(
        layer().cluster("orders", FakeBackend::cluster(7)).is_err(),
        "same id"
    );
    assert!(
        layer().cluster("default", FakeBackend::cluster(8)).is_err(),
        "same name"
    );
    let full = layer()
        .cluster("b", FakeBackend::cluster(8))
        .and_then(|l| l.cluster("c", FakeBackend::cluster(9)))
        .and_then(|l| l.cluster("d", FakeBackend::cluster(10)))
        .unwrap();
    let error = full.cluster("e", FakeBackend::cluster(11)).err().unwrap();
    assert!(error.to_string().contains("at most 4 clusters"), "{error}");
}

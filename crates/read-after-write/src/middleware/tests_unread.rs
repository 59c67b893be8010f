//! Layer tests of tokens the layer cannot read (signed with a key id this
//! instance does not know, or left unchecked when the MAC budget ran out)
//! and of what the token a response issues keeps of them, over the
//! shared fake backend (HTTP mechanics only; see `tests.rs` for the
//! harness).

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use super::tests::*;
use super::*;
use crate::backend::RouteReason;
use crate::bookmark::{Bookmark, Bookmarks};
use crate::clock::ManualClock;
use crate::handle::TokenOutcome;
use crate::position::{Lsn, WritePosition};
use crate::token::{AffinityToken, KeySet, SigningKey, TokenError, UserId};

const USER: u64 = 3;
/// Another service's cluster, which no layer here serves.
const ELSEWHERE: u64 = 99;

/// The keys of the layers under test.
fn old_keys() -> KeySet {
    KeySet::new(key(3))
}

/// Keys an instance that rolled out a rotation signs with.
fn new_keys() -> KeySet {
    KeySet::new(key(4)).with_previous(key(3))
}

/// A bookmark at `lsn` of `system` (here, unlike the harness's `at`, a
/// bookmark).
fn at(lsn: u64, system: u64) -> Bookmark {
    Bookmark::new(WritePosition::new(Lsn::new(lsn), 1, system))
}

/// A token of `USER` carrying `bookmarks`, signed with `keys`.
fn token(bookmarks: &[Bookmark], keys: &KeySet) -> String {
    let mut set = Bookmarks::new();
    for bookmark in bookmarks {
        set.set(*bookmark);
    }
    AffinityToken::with_bookmarks(UserId::from(USER), set, NOW + 30)
        .unwrap()
        .sign(DEFAULT_COOKIE_NAME, keys)
}

/// `token` with its first bookmark's LSN changed: well formed, naming the
/// same user with the same key id and expiry, failing only its MAC. What
/// anyone who saw one of the victim's tokens can plant.
fn forged(token: &str, n: u64) -> String {
    let mut raw = URL_SAFE_NO_PAD.decode(token).unwrap();
    // After the head (19 bytes in version 3; 3, the user id, the expiry and
    // the count in version 2), the system identifier and timeline (12).
    let lsn = match raw[0] {
        3 => 19 + 12,
        2 => 3 + usize::from(raw[2]) + 8 + 1 + 12,
        version => panic!("version {version}"),
    };
    raw[lsn..lsn + 8].copy_from_slice(&(0xFFFF_0000 + n).to_be_bytes());
    URL_SAFE_NO_PAD.encode(raw)
}

/// `count` forgeries of `real`, then `real`, as one `Cookie` header: a
/// longer `Path` puts planted cookies first.
fn planted_before(real: &str, count: u64) -> String {
    let mut pairs: Vec<String> = (0..count)
        .map(|n| format!("{DEFAULT_COOKIE_NAME}={}", forged(real, n)))
        .collect();
    pairs.push(format!("{DEFAULT_COOKIE_NAME}={real}"));
    pairs.join("; ")
}

/// Sends `path` to `layer` as `USER` with `cookie` (none if empty).
async fn send(layer: &ReadAfterWriteLayer<FakeBackend>, path: &str, cookie: &str) -> Answer {
    let app = App::new(layer.clone());
    let mut call = app.get(path).user(USER);
    if !cookie.is_empty() {
        call = call.cookie(cookie);
    }
    call.send().await
}

fn decode(text: &str, keys: &KeySet) -> AffinityToken {
    AffinityToken::verify(text, DEFAULT_COOKIE_NAME, keys, NOW, &UserId::from(USER)).unwrap()
}

/// A layer over cluster 7 (`default`) and cluster 8 (`orders`).
fn two_clusters(keys: KeySet) -> ReadAfterWriteLayer<FakeBackend> {
    ReadAfterWriteLayer::new(FakeBackend::cluster(7), keys)
        .cluster("orders", FakeBackend::cluster(8))
        .unwrap()
        .identity(identify)
        .clock(ManualClock::new(NOW))
}

fn one_cluster(keys: KeySet) -> ReadAfterWriteLayer<FakeBackend> {
    ReadAfterWriteLayer::new(FakeBackend::cluster(7), keys)
        .identity(identify)
        .clock(ManualClock::new(NOW))
}

#[tokio::test]
async fn a_token_the_budget_left_unchecked_is_pinned_for_each_cluster_it_names() {
    // (a) The real token promises clusters 7 and 8; sixteen forgeries ahead
    // of it spend the MAC budget, so it is never checked.
    let layer = two_clusters(old_keys());
    let real = token(&[at(0x500, 7), at(0x600, 8)], &old_keys());
    let cookie = planted_before(&real, MAX_MACS_PER_REQUEST as u64);
    // Reads of either cluster cannot be proven safe: the primary.
    let read = send(&layer, "/read/orders/read", &cookie).await;
    assert_eq!(
        read.seen().reasons,
        [RouteReason::PositionUnknown, RouteReason::PositionUnknown]
    );
    assert_eq!(read.issued(), None, "nothing written, nothing issued");
    // A write to 7: captured; 8, which the request could not read, is
    // pinned instead of dropped.
    let wrote = send(&layer, "/write", &cookie).await;
    let issued = decode(&wrote.issued().unwrap(), &old_keys());
    assert_eq!(
        issued.bookmark(7),
        Some(&Bookmark::new(FakeBackend::cluster(7).at(0x1000)))
    );
    assert_eq!(issued.bookmark(8), Some(&Bookmark::pinned(8)));
    assert_eq!(issued.bookmarks().len(), 2);
}

#[tokio::test]
async fn another_services_bookmark_in_an_unchecked_token_is_pinned_not_dropped() {
    // (b) One cluster; the real token also carries another service's
    // bookmark, which a verified token would have passed on.
    let layer = one_cluster(old_keys());
    let real = token(&[at(0x500, 7), at(0x900, ELSEWHERE)], &old_keys());
    let cookie = planted_before(&real, MAX_MACS_PER_REQUEST as u64);
    let wrote = send(&layer, "/write", &cookie).await;
    let issued = decode(&wrote.issued().unwrap(), &old_keys());
    assert_eq!(
        issued.bookmark(7),
        Some(&Bookmark::new(FakeBackend::cluster(7).at(0x1000)))
    );
    assert_eq!(
        issued.bookmark(ELSEWHERE),
        Some(&Bookmark::pinned(ELSEWHERE))
    );
    // Without the forgeries the same token is verified and passed on.
    let wrote = send(&layer, "/write", &format!("primary_affinity={real}")).await;
    let issued = decode(&wrote.issued().unwrap(), &old_keys());
    assert_eq!(issued.bookmark(ELSEWHERE), Some(&at(0x900, ELSEWHERE)));
}

#[tokio::test]
async fn an_unknown_key_sends_reads_to_the_primary_and_a_write_pins_what_it_named() {
    // (c) No attacker: a rotation is rolling out, and this instance does
    // not know the key that signed the user's token yet.
    let layer = one_cluster(old_keys());
    let real = token(&[at(0x500, 7), at(0x900, ELSEWHERE)], &new_keys());
    let cookie = format!("primary_affinity={real}");
    let read = send(&layer, "/read", &cookie).await;
    assert_eq!(read.seen().reasons[0].as_str(), "unknown_key");
    assert_eq!(
        read.seen().outcome,
        TokenOutcome::Rejected(TokenError::UnknownKey)
    );
    let wrote = send(&layer, "/write", &cookie).await;
    let issued = decode(&wrote.issued().unwrap(), &old_keys());
    assert_eq!(
        issued.bookmark(7),
        Some(&Bookmark::new(FakeBackend::cluster(7).at(0x1000)))
    );
    assert_eq!(
        issued.bookmark(ELSEWHERE),
        Some(&Bookmark::pinned(ELSEWHERE))
    );
    // The instance that knows the new key reads it as it always did.
    let read = send(&one_cluster(new_keys()), "/read", &cookie).await;
    assert_eq!(read.seen().reasons, [RouteReason::CaughtUp]);
    assert_eq!(read.seen().outcome, TokenOutcome::Valid);
}

#[tokio::test]
async fn a_backend_without_a_cluster_id_keeps_other_services_bookmarks_on_a_write() {
    // (d) FakeBackend reports no cluster id; its captures name SYSTEM.
    let backend = Arc::new(FakeBackend::new().primary_at(0x4000));
    let layer = ReadAfterWriteLayer::from_arc(Arc::clone(&backend), old_keys())
        .identity(identify)
        .clock(ManualClock::new(NOW));
    let real = token(&[at(0x100, SYSTEM), at(0x900, ELSEWHERE)], &old_keys());
    let wrote = send(&layer, "/write", &format!("primary_affinity={real}")).await;
    let issued = decode(&wrote.issued().unwrap(), &old_keys());
    assert_eq!(issued.bookmark(SYSTEM), Some(&at(0x4000, SYSTEM)));
    assert_eq!(issued.bookmark(ELSEWHERE), Some(&at(0x900, ELSEWHERE)));
}

#[tokio::test]
async fn a_write_replaces_the_pin_every_cluster_marker() {
    // (e) The all-zero position pins every cluster (a version 1 pin, or a
    // time-window instance sharing the keys). A write captures every
    // commit before it, that token's included: the marker goes.
    let marker = token(&[Bookmark::new(WritePosition::default())], &old_keys());
    let cookie = format!("primary_affinity={marker}");
    let layer = one_cluster(old_keys());
    let read = send(&layer, "/read", &cookie).await;
    assert_eq!(read.seen().reasons, [RouteReason::PositionUnknown]);
    let wrote = send(&layer, "/write", &cookie).await;
    let issued = wrote.issued().unwrap();
    assert_eq!(
        decode(&issued, &old_keys()).bookmarks(),
        &Bookmarks::one(Bookmark::new(FakeBackend::cluster(7).at(0x1000)))
    );
    let read = send(&layer, "/read", &format!("primary_affinity={issued}")).await;
    assert_eq!(read.seen().reasons, [RouteReason::CaughtUp]);
    // Over two clusters, the one not written stays pinned.
    let layer = two_clusters(old_keys());
    let wrote = send(&layer, "/write", &cookie).await;
    let issued = decode(&wrote.issued().unwrap(), &old_keys());
    assert_eq!(
        issued.bookmark(7),
        Some(&Bookmark::new(FakeBackend::cluster(7).at(0x1000)))
    );
    assert_eq!(issued.bookmark(8), Some(&Bookmark::pinned(8)));
    assert_eq!(issued.bookmark(0), None);
}

#[tokio::test]
async fn pins_that_do_not_fit_give_the_every_cluster_marker_beside_other_services() {
    // A valid token of clusters 7, 8 and another service's, and one under
    // an unknown key naming two more clusters: five do not fit in a token.
    let layer = two_clusters(old_keys());
    let valid = token(
        &[at(0x500, 7), at(0x600, 8), at(0x900, ELSEWHERE)],
        &old_keys(),
    );
    let unknown = token(&[at(0x1, 100), at(0x1, 101)], &new_keys());
    let cookie = format!("primary_affinity={unknown}; primary_affinity={valid}");
    let wrote = send(&layer, "/write", &cookie).await;
    let issued = decode(&wrote.issued().unwrap(), &old_keys());
    assert_eq!(
        issued.bookmarks().as_slice(),
        [
            Bookmark::new(WritePosition::default()),
            at(0x900, ELSEWHERE)
        ]
    );
    // Every cluster's reads of the user go to the primary.
    let read = send(
        &layer,
        "/read/orders/read",
        &format!("primary_affinity={}", wrote_text(&issued)),
    )
    .await;
    assert_eq!(
        read.seen().reasons,
        [RouteReason::PositionUnknown, RouteReason::PositionUnknown]
    );
    // The user's next write replaces the marker; the other service's
    // bookmark outlives it.
    let again = send(
        &layer,
        "/orders/write",
        &format!("primary_affinity={}", wrote_text(&issued)),
    )
    .await;
    let again = decode(&again.issued().unwrap(), &old_keys());
    assert_eq!(
        again.bookmarks().as_slice(),
        [
            at(0x900, ELSEWHERE),
            Bookmark::new(FakeBackend::cluster(8).at(0x1000)),
            Bookmark::pinned(7)
        ]
    );
}

/// `token` signed again with the layer's keys.
fn wrote_text(token: &AffinityToken) -> String {
    token.sign(DEFAULT_COOKIE_NAME, &old_keys())
}

#[tokio::test]
async fn a_token_under_an_unknown_key_is_read_from_the_primary_not_eventually() {
    let metrics = Metrics::record();
    // This instance still runs the old key; the user's token comes from
    // one that rolled out the new key first.
    let layer = two_clusters(old_keys());
    let signed =
        |bookmarks: &[Bookmark]| format!("primary_affinity={}", token(bookmarks, &new_keys()));
    let macs = crate::token::macs_computed();
    let read = send(&layer, "/read/orders/read", &signed(&[at(0x500, 7)])).await;
    // Cluster 7's reads go to the primary; cluster 8, which the token does
    // not name, reads as it would without it.
    assert_eq!(
        read.seen().reasons,
        [RouteReason::UnknownKey, RouteReason::NoToken]
    );
    assert_eq!(
        read.seen().outcome,
        TokenOutcome::Rejected(TokenError::UnknownKey)
    );
    assert_eq!(crate::token::macs_computed(), macs, "no MAC spent");
    // Beside a valid token promising as much, it changes nothing...
    let valid = token(&[at(0x500, 7)], &old_keys());
    let both = format!("{}; primary_affinity={valid}", signed(&[at(0x400, 7)]));
    let read = send(&layer, "/read", &both).await;
    assert_eq!(
        (read.seen().outcome, &read.seen().reasons[..]),
        (TokenOutcome::Valid, &[RouteReason::CaughtUp][..])
    );
    // ...and promising more, it sends the reads to the primary.
    let both = format!("{}; primary_affinity={valid}", signed(&[at(0x600, 7)]));
    let read = send(&layer, "/read", &both).await;
    assert_eq!(
        (read.seen().outcome, &read.seen().reasons[..]),
        (TokenOutcome::Valid, &[RouteReason::UnknownKey][..])
    );

    // Expired, it is absent like any expired token: the TTL bounds every
    // promise.
    let late = one_cluster(old_keys()).clock(ManualClock::new(NOW + 30));
    let read = send(&late, "/read", &signed(&[at(0x500, 7)])).await;
    assert_eq!(read.seen().reasons, [RouteReason::NoToken]);
    assert_eq!(
        read.seen().outcome,
        TokenOutcome::Rejected(TokenError::Expired)
    );
    // Another user's, under a key this instance does not know, cannot be
    // told from the requester's (a version 3 token names its user by a
    // tag keyed by that key): it too may promise a write, so the primary.
    let other = AffinityToken::new(UserId::from(USER + 1), at(0x500, 7).position, NOW + 30)
        .sign(DEFAULT_COOKIE_NAME, &new_keys());
    let read = send(&layer, "/read", &format!("primary_affinity={other}")).await;
    assert_eq!(read.seen().reasons, [RouteReason::UnknownKey]);
    assert_eq!(
        read.seen().outcome,
        TokenOutcome::Rejected(TokenError::UnknownKey)
    );

    let counts = metrics.token_counts();
    assert!(
        counts
            .iter()
            .any(|(outcome, n)| outcome == "unknown_key" && *n == 2),
        "{counts:?}"
    );
}

/// `text`, a token of this release, as a later release would write it:
/// the head every format shares kept, the version raised and a field
/// appended (the MAC, now inside it, no longer checks out here).
fn later_format(text: &str) -> String {
    let mut raw = URL_SAFE_NO_PAD.decode(text).unwrap();
    raw[0] = crate::token::TOKEN_VERSION + 1;
    raw.push(0xA5);
    URL_SAFE_NO_PAD.encode(raw)
}

#[tokio::test]
async fn a_token_of_a_later_release_is_read_from_the_primary_in_every_cluster() {
    let metrics = Metrics::record();
    // An upgrade that changes the token format is rolling out: the user's
    // token comes from an instance already on the later release.
    let layer = two_clusters(old_keys());
    let newer = later_format(&token(&[at(0x500, 7)], &old_keys()));
    let cookie = format!("primary_affinity={newer}");
    let macs = crate::token::macs_computed();
    let read = send(&layer, "/read/orders/read", &cookie).await;
    // Which clusters it names cannot be read: every cluster's reads go to
    // the primary, at once.
    assert_eq!(
        read.seen().reasons,
        [RouteReason::UnknownVersion, RouteReason::UnknownVersion]
    );
    assert_eq!(
        read.seen().outcome,
        TokenOutcome::Rejected(TokenError::WrongVersion)
    );
    assert_eq!(crate::token::macs_computed(), macs, "no MAC spent");
    // Under a key this instance does not know as well: a later format
    // counts as such first.
    let unknown_key = later_format(&token(&[at(0x500, 7)], &new_keys()));
    let read = send(&layer, "/read", &format!("primary_affinity={unknown_key}")).await;
    assert_eq!(read.seen().reasons, [RouteReason::UnknownVersion]);
    // Beside a valid token of this release, it still may promise more.
    let valid = token(&[at(0x500, 7)], &old_keys());
    let both = format!("{cookie}; primary_affinity={valid}");
    let read = send(&layer, "/read", &both).await;
    assert_eq!(
        (read.seen().outcome, &read.seen().reasons[..]),
        (TokenOutcome::Valid, &[RouteReason::UnknownVersion][..])
    );
    // A write captures the cluster it wrote; the other stays pinned in the
    // token this release issues, which it reads itself.
    let wrote = send(&layer, "/write", &cookie).await;
    let issued = wrote.issued().unwrap();
    let decoded = decode(&issued, &old_keys());
    assert_eq!(
        decoded.bookmark(7),
        Some(&Bookmark::new(FakeBackend::cluster(7).at(0x1000)))
    );
    assert_eq!(decoded.bookmark(8), Some(&Bookmark::pinned(8)));
    assert_eq!(
        decoded.bookmark(0),
        None,
        "the every-cluster claim is replaced"
    );
    let read = send(
        &layer,
        "/read/orders/read",
        &format!("primary_affinity={issued}"),
    )
    .await;
    assert_eq!(
        read.seen().reasons,
        [RouteReason::CaughtUp, RouteReason::PositionUnknown]
    );
    // Over one cluster the capture covers everything the token could have
    // promised.
    let wrote = send(&one_cluster(old_keys()), "/write", &cookie).await;
    assert_eq!(
        decode(&wrote.issued().unwrap(), &old_keys()).bookmarks(),
        &Bookmarks::one(Bookmark::new(FakeBackend::cluster(7).at(0x1000)))
    );

    let counts = metrics.token_counts();
    assert!(
        counts
            .iter()
            .any(|(outcome, n)| outcome == "wrong_version" && *n == 4),
        "{counts:?}"
    );
}

#[tokio::test]
async fn a_later_format_of_another_user_or_expired_is_absent() {
    let layer = one_cluster(old_keys());
    // Under a key this instance knows, the tag says whose it is.
    let other = AffinityToken::new(UserId::from(USER + 1), at(0x500, 7).position, NOW + 30)
        .sign(DEFAULT_COOKIE_NAME, &old_keys());
    let cookie = format!("primary_affinity={}", later_format(&other));
    let read = send(&layer, "/read", &cookie).await;
    assert_eq!(
        (read.seen().outcome, &read.seen().reasons[..]),
        (TokenOutcome::OtherUser, &[RouteReason::NoToken][..])
    );
    // Expired, it is absent like any expired token: the TTL bounds every
    // promise, whatever the format.
    let newer = later_format(&token(&[at(0x500, 7)], &old_keys()));
    let late = one_cluster(old_keys()).clock(ManualClock::new(NOW + 30));
    let read = send(&late, "/read", &format!("primary_affinity={newer}")).await;
    assert_eq!(
        (read.seen().outcome, &read.seen().reasons[..]),
        (
            TokenOutcome::Rejected(TokenError::Expired),
            &[RouteReason::NoToken][..]
        )
    );
    // Too short to hold the shared head and a MAC (33 bytes): malformed,
    // absent. 34 bytes hold both: a later format's token.
    for (len, expected) in [
        (33, (TokenError::Malformed, RouteReason::NoToken)),
        (34, (TokenError::WrongVersion, RouteReason::UnknownVersion)),
    ] {
        let mut raw = vec![crate::token::TOKEN_VERSION + 1; len];
        raw[1] = 0;
        raw[10..18].copy_from_slice(&(NOW + 30).to_be_bytes());
        let cookie = format!("primary_affinity={}", URL_SAFE_NO_PAD.encode(raw));
        let read = send(&layer, "/read", &cookie).await;
        assert_eq!(
            (read.seen().outcome, &read.seen().reasons[..]),
            (TokenOutcome::Rejected(expected.0), &[expected.1][..]),
            "{len} bytes"
        );
    }
}

#[tokio::test]
async fn an_unverifiable_token_claiming_an_expiry_no_instance_issues_is_junk() {
    let layer = one_cluster(old_keys());
    // Unchecked, its expiry could be anything: random bytes that parse as
    // a later format, or a planted token meant to pin a user for years.
    // No instance issues one further ahead than the longest TTL; with a
    // day's slack for clocks, beyond it is junk.
    let horizon = NOW + crate::middleware::MAX_TTL.as_secs() + 24 * 60 * 60;
    let claiming = |expires_at: u64, keys: &KeySet| {
        let token = AffinityToken::new(UserId::from(USER), at(0x500, 7).position, expires_at)
            .sign(DEFAULT_COOKIE_NAME, keys);
        [
            format!("primary_affinity={token}"),
            format!("primary_affinity={}", later_format(&token)),
        ]
    };
    let [unknown_key, later] = claiming(horizon, &new_keys());
    assert_eq!(
        send(&layer, "/read", &unknown_key).await.seen().reasons,
        [RouteReason::UnknownKey]
    );
    assert_eq!(
        send(&layer, "/read", &later).await.seen().reasons,
        [RouteReason::UnknownVersion]
    );
    let junk = (
        TokenOutcome::Rejected(TokenError::Malformed),
        &[RouteReason::NoToken][..],
    );
    let [unknown_key, later] = claiming(horizon + 1, &new_keys());
    for cookie in [unknown_key, later] {
        let read = send(&layer, "/read", &cookie).await;
        assert_eq!((read.seen().outcome, &read.seen().reasons[..]), junk);
    }
    // A later format under a key it holds is no more checked than under
    // one it does not.
    let [own, later] = claiming(horizon + 1, &old_keys());
    let read = send(&layer, "/read", &later).await;
    assert_eq!((read.seen().outcome, &read.seen().reasons[..]), junk);
    // This release's own format under a key it holds is verified: its
    // signer is trusted, whatever the expiry.
    let read = send(&layer, "/read", &own).await;
    assert_eq!(
        (read.seen().outcome, &read.seen().reasons[..]),
        (TokenOutcome::Valid, &[RouteReason::CaughtUp][..])
    );
}

/// `count` keys whose one-byte ids are all the same: ids are one byte, so
/// a long enough key list has such keys, and a token's MAC is then tried
/// under each of them.
fn keys_sharing_an_id(count: usize) -> Vec<SigningKey> {
    let mut by_id: Vec<Vec<SigningKey>> = vec![Vec::new(); 256];
    for n in 0u16.. {
        let mut bytes = [0x5A; 32];
        bytes[..2].copy_from_slice(&n.to_be_bytes());
        let key = SigningKey::from_bytes(&bytes).unwrap();
        let same = &mut by_id[usize::from(key.id())];
        same.push(key);
        if same.len() == count {
            return same.clone();
        }
    }
    unreachable!("65,536 keys give some id {count} times")
}

#[tokio::test]
async fn the_mac_budget_counts_every_key_tried() {
    // (f) Four keys share one id; the user's token is signed with the last.
    let shared = keys_sharing_an_id(4);
    let keys = shared[1..]
        .iter()
        .fold(KeySet::new(shared[0].clone()), |set, key| {
            set.with_previous(key.clone())
        });
    let layer = one_cluster(keys.clone());
    // A version 2 token names its user in clear, so under each of the four
    // keys it names the requester and costs a MAC. (A version 3 token names
    // its user by a tag keyed by its own key: under the other three it
    // names someone else and costs nothing.)
    let real =
        AffinityToken::with_bookmarks(UserId::from(USER), Bookmarks::one(at(0x500, 7)), NOW + 30)
            .unwrap()
            .sign_v2_for_tests(DEFAULT_COOKIE_NAME, &KeySet::new(shared[3].clone()));
    // Three forgeries cost three MACs each... under four keys, four: 12,
    // and the real token its four: 16, the budget.
    let read = send(&layer, "/read", &planted_before(&real, 3)).await;
    assert_eq!(read.seen().outcome, TokenOutcome::Valid);
    assert_eq!(read.seen().reasons, [RouteReason::CaughtUp]);
    // A fourth forgery spends the budget before the real token.
    let read = send(&layer, "/read", &planted_before(&real, 4)).await;
    assert_eq!(
        read.seen().outcome,
        TokenOutcome::Rejected(TokenError::BadSignature)
    );
    assert_eq!(read.seen().reasons, [RouteReason::PositionUnknown]);
}

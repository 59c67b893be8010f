//! Layer tests over `tower::service_fn` and a small in-test backend.
//!
//! `FakeBackend` below is a stand-in for HTTP mechanics only: it reports
//! positions a test sets by hand. Database behaviour is tested against a real
//! PostgreSQL cluster in the crate's integration tests.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{COOKIE, SET_COOKIE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tower::{service_fn, Layer, Service, ServiceExt};

use super::*;
use crate::backend::{Backend, Finding, LayerSettings, RouteReason, Routed, Severity};
use crate::clock::ManualClock;
use crate::config::Throttle;
use crate::handle::{Db, TokenOutcome};
use crate::position::{Lsn, WritePosition};
use crate::token::{AffinityToken, SigningKey, TokenError};
use crate::token::{KeySet, UserId};

pub(super) const SYSTEM: u64 = 0x5EED;
const NOW: u64 = 1_800_000_000;

#[derive(Default)]
pub(crate) struct FakeBackend {
    replica_replayed: AtomicU64,
    pub(super) primary_at: AtomicU64,
    capture_fails: AtomicBool,
    captures: AtomicUsize,
    primary: &'static str,
    replica: &'static str,
    /// What `diagnose` reports, and the settings it was last asked with.
    findings: std::sync::Mutex<Vec<Finding>>,
    diagnosed_with: std::sync::Mutex<Option<LayerSettings>>,
}

impl FakeBackend {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(FakeBackend {
            primary: "primary-pool",
            replica: "replica-pool",
            ..FakeBackend::default()
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("capture failed")]
pub(crate) struct CaptureFailed;

impl Backend for FakeBackend {
    type Pool = &'static str;
    type Error = CaptureFailed;

    fn primary(&self) -> &&'static str {
        &self.primary
    }

    fn eventual(&self) -> Routed<'_, &'static str> {
        Routed::replica(&self.replica, "replica-1", RouteReason::Eventual)
    }

    async fn session(
        &self,
        required: WritePosition,
        _max_wait: Duration,
    ) -> Routed<'_, &'static str> {
        if required.lsn.as_u64() <= self.replica_replayed.load(Ordering::SeqCst) {
            Routed::replica(&self.replica, "replica-1", RouteReason::CaughtUp)
        } else {
            Routed::primary(&self.primary, RouteReason::Lagging)
        }
    }

    async fn write_position(&self) -> Result<WritePosition, CaptureFailed> {
        self.captures.fetch_add(1, Ordering::SeqCst);
        tokio::task::yield_now().await; // a real capture is a round trip
        if self.capture_fails.load(Ordering::SeqCst) {
            return Err(CaptureFailed);
        }
        Ok(WritePosition::new(
            Lsn::new(self.primary_at.load(Ordering::SeqCst)),
            1,
            SYSTEM,
        ))
    }

    async fn diagnose(&self, settings: &LayerSettings) -> Vec<Finding> {
        *self.diagnosed_with.lock().unwrap() = Some(*settings);
        self.findings.lock().unwrap().clone()
    }
}

pub(crate) fn keys(byte: u8) -> KeySet {
    KeySet::new(SigningKey::from_bytes(&[byte; 32]).unwrap())
}

fn user_header(parts: &http::request::Parts) -> Option<UserId> {
    let id = parts
        .headers
        .get("x-user-id")?
        .to_str()
        .ok()?
        .parse::<u64>()
        .ok()?;
    Some(UserId::from(id))
}

fn layer(backend: &Arc<FakeBackend>, clock: &ManualClock) -> ReadAfterWriteLayer<FakeBackend> {
    ReadAfterWriteLayer::from_arc(Arc::clone(backend), keys(1))
        .identity(user_header)
        .clock(clock.clone())
        .debug_header(true)
}

/// What the handler saw and did: its `Db`, and which pool `read()` gave it.
#[derive(Clone, Debug)]
struct Seen {
    read_pool: &'static str,
    outcome: TokenOutcome,
    required: Option<WritePosition>,
}

/// A handler that reads, writes when the path says so, sets its own cookie,
/// answers with the status the path asks for, and reports what it saw in
/// response extensions.
async fn handler(req: Request<()>) -> Result<Response<()>, Infallible> {
    let db = req
        .extensions()
        .get::<Db<FakeBackend>>()
        .expect("layer inserts Db")
        .clone();
    let path = req.uri().path().to_owned();
    if path.contains("write") {
        db.write();
    }
    let read_pool = *db.read().await;
    let mut response = Response::new(());
    response
        .headers_mut()
        .append(SET_COOKIE, HeaderValue::from_static("theme=dark; Path=/"));
    if path.contains("fail") {
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    }
    response.extensions_mut().insert(Seen {
        read_pool,
        outcome: db.token_outcome(),
        required: db.required_position(),
    });
    Ok(response)
}

async fn send(
    service: &mut (impl Service<Request<()>, Response = Response<()>, Error = Infallible> + Clone),
    req: Request<()>,
) -> Response<()> {
    service.clone().oneshot(req).await.unwrap()
}

fn request(method: Method, path: &str, user: u64) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header("x-user-id", user.to_string())
}

fn affinity_cookie(response: &Response<()>) -> Option<String> {
    response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|v| v.starts_with("primary_affinity="))
}

fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_owned()
}

fn seen(response: &Response<()>) -> Seen {
    response.extensions().get::<Seen>().unwrap().clone()
}

#[tokio::test]
async fn no_token_reads_a_replica_and_sets_nothing() {
    let backend = FakeBackend::new();
    let mut svc = layer(&backend, &ManualClock::new(NOW)).layer(service_fn(handler));
    let response = send(&mut svc, request(Method::GET, "/", 1).body(()).unwrap()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(affinity_cookie(&response).is_none());
    let seen = seen(&response);
    assert_eq!(
        (seen.read_pool, seen.outcome, seen.required),
        ("replica-pool", TokenOutcome::Absent, None)
    );
    assert_eq!(
        response.headers()[DEBUG_HEADER],
        "node=replica-1; reason=no_token; token=absent"
    );
    assert_eq!(backend.captures.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_write_appends_the_cookie_beside_the_handlers_own() {
    let backend = FakeBackend::new();
    backend.primary_at.store(0x4000, Ordering::SeqCst);
    let mut svc = layer(&backend, &ManualClock::new(NOW)).layer(service_fn(handler));
    let response = send(
        &mut svc,
        request(Method::POST, "/write", 1).body(()).unwrap(),
    )
    .await;

    let all: Vec<_> = response.headers().get_all(SET_COOKIE).iter().collect();
    assert_eq!(all.len(), 2, "{all:?}");
    assert!(all
        .iter()
        .any(|v| v.to_str().unwrap() == "theme=dark; Path=/"));
    let cookie = affinity_cookie(&response).unwrap();
    for attribute in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/", "Max-Age=30"] {
        assert!(
            cookie.contains(attribute),
            "{attribute} missing from {cookie}"
        );
    }
    assert!(!cookie.contains("Domain"));
    // The same token travels in the header for API and gRPC clients.
    let header = response.headers()[DEFAULT_TOKEN_HEADER].to_str().unwrap();
    assert_eq!(cookie_pair(&cookie), format!("primary_affinity={header}"));
    let token = AffinityToken::verify(header, DEFAULT_COOKIE_NAME, &keys(1), NOW).unwrap();
    assert_eq!(
        token.position(),
        WritePosition::new(Lsn::new(0x4000), 1, SYSTEM)
    );
    assert_eq!(token.user(), &UserId::from(1u64));
    assert_eq!(token.expires_at(), NOW + 31, "TTL rounded up, never short");
    // Within the writing request, reads see its own write: the primary.
    assert_eq!(seen(&response).read_pool, "primary-pool");
    assert_eq!(backend.captures.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn the_token_routes_later_reads_by_position() {
    let backend = FakeBackend::new();
    backend.primary_at.store(0x9000, Ordering::SeqCst);
    backend.replica_replayed.store(0x8FFF, Ordering::SeqCst);
    let mut svc = layer(&backend, &ManualClock::new(NOW)).layer(service_fn(handler));
    let wrote = send(
        &mut svc,
        request(Method::POST, "/write", 7).body(()).unwrap(),
    )
    .await;
    let cookie = cookie_pair(&affinity_cookie(&wrote).unwrap());

    // The replica is one byte short: the read must not go there.
    let lagging = send(
        &mut svc,
        request(Method::GET, "/", 7)
            .header(COOKIE, &cookie)
            .body(())
            .unwrap(),
    )
    .await;
    let seen_lagging = seen(&lagging);
    assert_eq!(seen_lagging.outcome, TokenOutcome::Valid);
    assert_eq!(seen_lagging.required.unwrap().lsn, Lsn::new(0x9000));
    assert_eq!(seen_lagging.read_pool, "primary-pool");
    assert_eq!(
        lagging.headers()[DEBUG_HEADER],
        "node=primary; reason=lagging; token=valid"
    );
    assert!(
        affinity_cookie(&lagging).is_none(),
        "reads do not re-issue tokens"
    );

    // Inclusive comparison: replayed == token is caught up.
    backend.replica_replayed.store(0x9000, Ordering::SeqCst);
    let caught_up = send(
        &mut svc,
        request(Method::GET, "/", 7)
            .header(COOKIE, &cookie)
            .body(())
            .unwrap(),
    )
    .await;
    assert_eq!(seen(&caught_up).read_pool, "replica-pool");

    // The header transport works the same.
    let token = wrote.headers()[DEFAULT_TOKEN_HEADER].clone();
    let via_header = send(
        &mut svc,
        request(Method::GET, "/", 7)
            .header(DEFAULT_TOKEN_HEADER, token)
            .body(())
            .unwrap(),
    )
    .await;
    assert_eq!(seen(&via_header).outcome, TokenOutcome::Valid);
}

#[tokio::test]
async fn split_cookie_headers_are_all_read() {
    let backend = FakeBackend::new();
    backend.primary_at.store(0x100, Ordering::SeqCst);
    let mut svc = layer(&backend, &ManualClock::new(NOW)).layer(service_fn(handler));
    let wrote = send(
        &mut svc,
        request(Method::POST, "/write", 3).body(()).unwrap(),
    )
    .await;
    let cookie = cookie_pair(&affinity_cookie(&wrote).unwrap());

    // HTTP/2 sends one `cookie` header per cookie; ours is the last one.
    let req = request(Method::GET, "/", 3)
        .header(COOKIE, "a=1")
        .header(COOKIE, "b=2; c=3")
        .header(COOKIE, &cookie)
        .body(())
        .unwrap();
    assert_eq!(
        seen(&send(&mut svc, req).await).outcome,
        TokenOutcome::Valid
    );

    // Quoted, with odd spacing and non-ASCII neighbours.
    let value = cookie.split_once('=').unwrap().1;
    let quoted = format!("x=\u{e9}t\u{e9};primary_affinity=\"{value}\" ;  y");
    let req = request(Method::GET, "/", 3)
        .header(COOKIE, HeaderValue::from_bytes(quoted.as_bytes()).unwrap())
        .body(())
        .unwrap();
    assert_eq!(
        seen(&send(&mut svc, req).await).outcome,
        TokenOutcome::Valid
    );

    // And inside one HTTP/1.1 header, among others.
    let req = request(Method::GET, "/", 3)
        .header(COOKIE, format!("a=1; {cookie}; b=2"))
        .body(())
        .unwrap();
    assert_eq!(
        seen(&send(&mut svc, req).await).outcome,
        TokenOutcome::Valid
    );
}

#[tokio::test]
async fn bad_tokens_are_ignored_and_counted_never_an_error() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);

    let backend = FakeBackend::new();
    backend.primary_at.store(0x100, Ordering::SeqCst);
    let clock = ManualClock::new(NOW);
    let mut svc = layer(&backend, &clock).layer(service_fn(handler));
    let wrote = send(
        &mut svc,
        request(Method::POST, "/write", 3).body(()).unwrap(),
    )
    .await;
    let token = wrote.headers()[DEFAULT_TOKEN_HEADER]
        .to_str()
        .unwrap()
        .to_owned();

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
        let mut builder = request(Method::GET, "/", 3);
        for (name, value) in &headers {
            builder = builder.header(*name, HeaderValue::from_bytes(value).unwrap());
        }
        let response = send(&mut svc, builder.body(()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK);
        let seen = seen(&response);
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
    let response = send(
        &mut svc,
        request(Method::GET, "/", 4)
            .header(DEFAULT_TOKEN_HEADER, &token)
            .body(())
            .unwrap(),
    )
    .await;
    assert_eq!(seen(&response).outcome, TokenOutcome::OtherUser);
    // So is an expired one.
    clock.advance(Duration::from_secs(31));
    let response = send(
        &mut svc,
        request(Method::GET, "/", 3)
            .header(DEFAULT_TOKEN_HEADER, &token)
            .body(())
            .unwrap(),
    )
    .await;
    assert_eq!(
        seen(&response).outcome,
        TokenOutcome::Rejected(TokenError::Expired)
    );

    let counts = token_counts(&snapshotter);
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

pub(super) fn token_counts(snapshotter: &Snapshotter) -> Vec<(String, u64)> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == "read_after_write_tokens_total")
        .filter_map(|(key, _, _, value)| {
            let outcome = key
                .key()
                .labels()
                .find(|l| l.key() == "outcome")?
                .value()
                .to_owned();
            match value {
                DebugValue::Counter(n) => Some((outcome, n)),
                _ => None,
            }
        })
        .collect()
}

#[tokio::test]
async fn error_responses_after_a_write_still_carry_the_token() {
    let backend = FakeBackend::new();
    backend.primary_at.store(0x100, Ordering::SeqCst);
    let mut svc = layer(&backend, &ManualClock::new(NOW)).layer(service_fn(handler));
    let response = send(
        &mut svc,
        request(Method::POST, "/write-then-fail", 3)
            .body(())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(affinity_cookie(&response).is_some());
}

#[tokio::test]
async fn a_failed_capture_pins_the_user_to_the_primary() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let backend = FakeBackend::new();
    backend.capture_fails.store(true, Ordering::SeqCst);
    backend.replica_replayed.store(u64::MAX, Ordering::SeqCst);
    let mut svc = layer(&backend, &ManualClock::new(NOW)).layer(service_fn(handler));
    let response = send(
        &mut svc,
        request(Method::POST, "/write", 3).body(()).unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    // The write may have committed: the client must not keep an older token
    // that promises less, so it gets one with an unknown position...
    let token = response.headers()[DEFAULT_TOKEN_HEADER].clone();
    assert!(affinity_cookie(&response).is_some());
    // ...beside the handler's own cookie, untouched.
    assert_eq!(response.headers().get_all(SET_COOKIE).iter().count(), 2);
    // That token sends session reads to the primary, whatever replicas say.
    let read = send(
        &mut svc,
        request(Method::GET, "/", 3)
            .header(DEFAULT_TOKEN_HEADER, token)
            .body(())
            .unwrap(),
    )
    .await;
    assert_eq!(seen(&read).read_pool, "primary-pool");
    assert_eq!(
        read.headers()[DEBUG_HEADER],
        "node=primary; reason=position_unknown; token=valid"
    );
    let failures = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .any(|(key, _, _, value)| {
            key.key().name() == "read_after_write_capture_failures_total"
                && value == DebugValue::Counter(1)
        });
    assert!(failures);
}

#[tokio::test]
async fn the_new_token_never_moves_backwards() {
    let backend = FakeBackend::new();
    backend.primary_at.store(0x9000, Ordering::SeqCst);
    let mut svc = layer(&backend, &ManualClock::new(NOW)).layer(service_fn(handler));
    let first = send(
        &mut svc,
        request(Method::POST, "/write", 5).body(()).unwrap(),
    )
    .await;
    let cookie = cookie_pair(&affinity_cookie(&first).unwrap());
    // A capture that reports an older position (another instance's primary
    // view lagging, say) must not lower the promise.
    backend.primary_at.store(0x10, Ordering::SeqCst);
    let second = send(
        &mut svc,
        request(Method::POST, "/write", 5)
            .header(COOKIE, &cookie)
            .body(())
            .unwrap(),
    )
    .await;
    let header = second.headers()[DEFAULT_TOKEN_HEADER].to_str().unwrap();
    let token = AffinityToken::verify(header, DEFAULT_COOKIE_NAME, &keys(1), NOW).unwrap();
    assert_eq!(token.position().lsn, Lsn::new(0x9000));
}

#[tokio::test]
async fn rotated_keys_verify_old_tokens_and_resign_on_the_next_write() {
    let backend = FakeBackend::new();
    backend.primary_at.store(0x100, Ordering::SeqCst);
    let clock = ManualClock::new(NOW);
    let mut old_svc = layer(&backend, &clock).layer(service_fn(handler));
    let wrote = send(
        &mut old_svc,
        request(Method::POST, "/write", 5).body(()).unwrap(),
    )
    .await;
    let cookie = cookie_pair(&affinity_cookie(&wrote).unwrap());

    let rotated = KeySet::new(SigningKey::from_bytes(&[2; 32]).unwrap())
        .with_previous(SigningKey::from_bytes(&[1; 32]).unwrap());
    let mut new_svc = ReadAfterWriteLayer::from_arc(Arc::clone(&backend), rotated.clone())
        .identity(user_header)
        .clock(clock.clone())
        .layer(service_fn(handler));
    let read = send(
        &mut new_svc,
        request(Method::GET, "/", 5)
            .header(COOKIE, &cookie)
            .body(())
            .unwrap(),
    )
    .await;
    assert_eq!(seen(&read).outcome, TokenOutcome::Valid);
    let rewritten = send(
        &mut new_svc,
        request(Method::POST, "/write", 5)
            .header(COOKIE, &cookie)
            .body(())
            .unwrap(),
    )
    .await;
    let header = rewritten.headers()[DEFAULT_TOKEN_HEADER].to_str().unwrap();
    let token = AffinityToken::verify(header, DEFAULT_COOKIE_NAME, &rotated, NOW).unwrap();
    assert_eq!(token.key_id(), rotated.current().id());
}

#[tokio::test]
async fn cookie_attributes_follow_the_configuration() {
    let backend = FakeBackend::new();
    let svc = ReadAfterWriteLayer::from_arc(Arc::clone(&backend), keys(1))
        .cookie_name("raw")
        .secure(false)
        .domain("example.com")
        .ttl(Duration::from_secs(90))
        .without_token_header()
        .layer(service_fn(handler));
    let response = svc
        .oneshot(Request::post("/write").body(()).unwrap())
        .await
        .unwrap();
    let cookie = response
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
    assert!(response.headers().get(DEFAULT_TOKEN_HEADER).is_none());
}

#[tokio::test]
async fn identity_rules_decide_who_gets_tokens() {
    let backend = FakeBackend::new();
    // With an identity function, anonymous requests get no token...
    let svc = layer(&backend, &ManualClock::new(NOW)).layer(service_fn(handler));
    let response = svc
        .clone()
        .oneshot(Request::post("/write").body(()).unwrap())
        .await
        .unwrap();
    assert!(affinity_cookie(&response).is_none());
    // ...unless anonymous tokens are allowed.
    let svc = layer(&backend, &ManualClock::new(NOW))
        .allow_anonymous(true)
        .layer(service_fn(handler));
    let response = svc
        .clone()
        .oneshot(Request::post("/write").body(()).unwrap())
        .await
        .unwrap();
    let cookie = cookie_pair(&affinity_cookie(&response).unwrap());
    let read = svc
        .clone()
        .oneshot(Request::get("/").header(COOKIE, &cookie).body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(seen(&read).outcome, TokenOutcome::Valid);
    // A logged-in user does not inherit the anonymous token.
    let read = svc
        .oneshot(
            request(Method::GET, "/", 8)
                .header(COOKIE, &cookie)
                .body(())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(seen(&read).outcome, TokenOutcome::OtherUser);
}

#[tokio::test]
async fn unsafe_methods_can_count_as_writes() {
    let backend = FakeBackend::new();
    let svc = layer(&backend, &ManualClock::new(NOW))
        .writes_on_unsafe_methods(true)
        .layer(service_fn(handler));
    let post = svc
        .clone()
        .oneshot(request(Method::POST, "/", 1).body(()).unwrap())
        .await
        .unwrap();
    assert!(affinity_cookie(&post).is_some());
    let get = svc
        .oneshot(request(Method::GET, "/", 1).body(()).unwrap())
        .await
        .unwrap();
    assert!(affinity_cookie(&get).is_none());
}

#[tokio::test]
async fn time_window_mode_sends_recent_writers_to_the_primary() {
    let backend = FakeBackend::new();
    let clock = ManualClock::new(NOW);
    let svc = layer(&backend, &clock)
        .time_window(Duration::from_secs(5))
        .layer(service_fn(handler));
    let wrote = svc
        .clone()
        .oneshot(request(Method::POST, "/write", 1).body(()).unwrap())
        .await
        .unwrap();
    let cookie = affinity_cookie(&wrote).unwrap();
    assert!(cookie.contains("Max-Age=5"), "{cookie}");
    assert_eq!(
        backend.captures.load(Ordering::SeqCst),
        0,
        "no position is captured"
    );
    let pair = cookie_pair(&cookie);
    let read = svc
        .clone()
        .oneshot(
            request(Method::GET, "/", 1)
                .header(COOKIE, &pair)
                .body(())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(seen(&read).read_pool, "primary-pool");
    assert_eq!(
        read.headers()[DEBUG_HEADER],
        "node=primary; reason=time_window; token=valid"
    );
    clock.advance(Duration::from_secs(6));
    let later = svc
        .oneshot(
            request(Method::GET, "/", 1)
                .header(COOKIE, &pair)
                .body(())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(seen(&later).read_pool, "replica-pool");
}

#[test]
fn the_service_is_clone_send_sync_and_its_future_is_send() {
    fn assert_traits<T: Clone + Send + Sync + 'static>(_: &T) {}
    fn assert_send<T: Send>(_: &T) {}
    let backend = FakeBackend::new();
    let mut svc = layer(&backend, &ManualClock::new(NOW)).layer(service_fn(handler));
    assert_traits(&svc);
    assert_traits(&layer(&backend, &ManualClock::new(NOW)));
    let future = svc.call(Request::get("/").body(()).unwrap());
    assert_send(&future);
}

#[tokio::test]
async fn of_several_valid_tokens_the_latest_issued_wins() {
    let backend = FakeBackend::new();
    let clock = ManualClock::new(NOW);
    let mut svc = layer(&backend, &clock).layer(service_fn(handler));
    backend.primary_at.store(0x100, Ordering::SeqCst);
    let first = send(
        &mut svc,
        request(Method::POST, "/write", 9).body(()).unwrap(),
    )
    .await;
    let older = first.headers()[DEFAULT_TOKEN_HEADER]
        .to_str()
        .unwrap()
        .to_owned();
    clock.advance(Duration::from_secs(5));
    backend.primary_at.store(0x200, Ordering::SeqCst);
    let second = send(
        &mut svc,
        request(Method::POST, "/write", 9).body(()).unwrap(),
    )
    .await;
    let newer = second.headers()[DEFAULT_TOKEN_HEADER]
        .to_str()
        .unwrap()
        .to_owned();
    // A stale cookie first (say host-only beside a domain cookie), and a
    // stale header beside a fresh cookie: the fresher token decides.
    for req in [
        request(Method::GET, "/", 9)
            .header(
                COOKIE,
                format!("primary_affinity={older}; primary_affinity={newer}"),
            )
            .body(())
            .unwrap(),
        request(Method::GET, "/", 9)
            .header(DEFAULT_TOKEN_HEADER, &older)
            .header(COOKIE, format!("primary_affinity={newer}"))
            .body(())
            .unwrap(),
    ] {
        let seen = seen(&send(&mut svc, req).await);
        assert_eq!(seen.required.unwrap().lsn, Lsn::new(0x200));
    }
}

#[tokio::test]
async fn a_time_window_token_reaching_a_position_instance_reads_the_primary() {
    let backend = FakeBackend::new();
    backend.replica_replayed.store(u64::MAX, Ordering::SeqCst);
    let clock = ManualClock::new(NOW);
    let window = layer(&backend, &clock)
        .time_window(Duration::from_secs(5))
        .layer(service_fn(handler));
    let wrote = window
        .oneshot(request(Method::POST, "/write", 1).body(()).unwrap())
        .await
        .unwrap();
    let token = wrote.headers()[DEFAULT_TOKEN_HEADER].clone();
    let position = layer(&backend, &clock).layer(service_fn(handler));
    let read = position
        .oneshot(
            request(Method::GET, "/", 1)
                .header(DEFAULT_TOKEN_HEADER, token)
                .body(())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(seen(&read).read_pool, "primary-pool");
    assert_eq!(
        read.headers()[DEBUG_HEADER],
        "node=primary; reason=position_unknown; token=valid"
    );
}

/// A token for `user` at `position`, signed with the test key, valid until
/// `expires_at`.
fn minted(user: u64, position: WritePosition, expires_at: u64) -> String {
    AffinityToken::new(UserId::from(user), position, expires_at).sign(DEFAULT_COOKIE_NAME, &keys(1))
}

/// `token` with its LSN changed, so it is well formed, names the same user,
/// key and expiry, and fails only the MAC.
fn forged_from(token: &str, lsn: u64) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    let mut raw = URL_SAFE_NO_PAD.decode(token).unwrap();
    let at = 3 + usize::from(raw[2]);
    raw[at..at + 8].copy_from_slice(&lsn.to_be_bytes());
    URL_SAFE_NO_PAD.encode(raw)
}

#[tokio::test]
async fn junk_cannot_hide_a_valid_token() {
    let backend = FakeBackend::new();
    let mut svc = layer(&backend, &ManualClock::new(NOW)).layer(service_fn(handler));
    let valid = minted(3, WritePosition::new(Lsn::new(0x700), 1, SYSTEM), NOW + 30);
    let other_user = minted(4, WritePosition::new(Lsn::new(0x900), 1, SYSTEM), NOW + 30);
    let expired = minted(3, WritePosition::new(Lsn::new(0x900), 1, SYSTEM), NOW - 1);
    // Under a key this instance does not know, promising no more than the
    // valid token: nothing to read from the primary for.
    let unknown_key = AffinityToken::new(
        UserId::from(3u64),
        WritePosition::new(Lsn::new(0x600), 1, SYSTEM),
        NOW + 30,
    )
    .sign(DEFAULT_COOKIE_NAME, &keys(9));

    let stuffed = |junk: &str, count: usize| {
        let mut text = format!("{junk}; ").repeat(count);
        text.push_str(&format!("primary_affinity={valid}"));
        text
    };
    let mut cases: Vec<(String, Request<()>)> = Vec::new();
    for junk in [
        "primary_affinity=x".to_owned(),
        format!("primary_affinity={other_user}"),
        format!("primary_affinity={expired}"),
        format!("primary_affinity={unknown_key}"),
        format!("primary_affinity={}", "A".repeat(5_000)),
        format!("primary_affinity={}", &valid[..valid.len() - 1]),
    ] {
        for count in [4, 5, 300] {
            let text = stuffed(&junk, count);
            cases.push((
                format!("{count} x {}", &junk[..junk.len().min(40)]),
                request(Method::GET, "/", 3)
                    .header(COOKIE, text)
                    .body(())
                    .unwrap(),
            ));
        }
    }
    // Junk token headers used to hide every cookie.
    let mut builder = request(Method::GET, "/", 3);
    for _ in 0..8 {
        builder = builder.header(DEFAULT_TOKEN_HEADER, "junk");
    }
    cases.push((
        "8 junk headers".into(),
        builder
            .header(COOKIE, format!("primary_affinity={valid}"))
            .body(())
            .unwrap(),
    ));
    // Well-formed forgeries naming the requester spend the MAC budget, but
    // fewer than the budget cannot hide the valid token behind them.
    let forged = (0..MAX_MACS_PER_REQUEST as u64 - 1)
        .map(|i| format!("primary_affinity={}", forged_from(&valid, 0xFFFF_0000 + i)))
        .collect::<Vec<_>>()
        .join("; ");
    cases.push((
        "forgeries below the budget".into(),
        request(Method::GET, "/", 3)
            .header(COOKIE, format!("{forged}; primary_affinity={valid}"))
            .body(())
            .unwrap(),
    ));
    for (name, req) in cases {
        let seen = seen(&send(&mut svc, req).await);
        assert_eq!(seen.outcome, TokenOutcome::Valid, "{name}");
        assert_eq!(
            seen.required.map(|p| p.lsn),
            Some(Lsn::new(0x700)),
            "{name}"
        );
    }
    // One under an unknown key that may promise more is not junk: the
    // primary, whatever the valid token says.
    let unknown_more = AffinityToken::new(
        UserId::from(3u64),
        WritePosition::new(Lsn::new(0x900), 1, SYSTEM),
        NOW + 30,
    )
    .sign(DEFAULT_COOKIE_NAME, &keys(9));
    let req = request(Method::GET, "/", 3)
        .header(
            COOKIE,
            format!("primary_affinity={unknown_more}; primary_affinity={valid}"),
        )
        .body(())
        .unwrap();
    let pinned = seen(&send(&mut svc, req).await);
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
    let req = request(Method::GET, "/", 3)
        .header(COOKIE, format!("{forged}; primary_affinity={valid}"))
        .body(())
        .unwrap();
    let hidden = seen(&send(&mut svc, req).await);
    assert_eq!(
        hidden.outcome,
        TokenOutcome::Rejected(TokenError::BadSignature)
    );
    assert_eq!(hidden.read_pool, "primary-pool");
}

#[tokio::test]
async fn of_several_valid_tokens_the_one_promising_most_wins() {
    let backend = FakeBackend::new();
    backend.replica_replayed.store(u64::MAX, Ordering::SeqCst);
    let mut svc = layer(&backend, &ManualClock::new(NOW)).layer(service_fn(handler));
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
            for req in [
                request(Method::GET, "/", 9)
                    .header(
                        COOKIE,
                        format!("primary_affinity={first}; primary_affinity={second}"),
                    )
                    .body(())
                    .unwrap(),
                request(Method::GET, "/", 9)
                    .header(DEFAULT_TOKEN_HEADER, first.as_str())
                    .header(COOKIE, format!("primary_affinity={second}"))
                    .body(())
                    .unwrap(),
            ] {
                let seen = seen(&send(&mut svc, req).await);
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
async fn an_empty_identity_is_no_identity() {
    let backend = FakeBackend::new();
    backend.primary_at.store(0x100, Ordering::SeqCst);
    let svc = layer(&backend, &ManualClock::new(NOW))
        .identity(|_| Some(UserId::anonymous()))
        .allow_anonymous(false)
        .layer(service_fn(handler));
    let wrote = svc
        .clone()
        .oneshot(request(Method::POST, "/write", 1).body(()).unwrap())
        .await
        .unwrap();
    assert!(affinity_cookie(&wrote).is_none(), "no token for no one");
    let anonymous = AffinityToken::new(
        UserId::anonymous(),
        WritePosition::new(Lsn::new(0x100), 1, SYSTEM),
        NOW + 30,
    )
    .sign(DEFAULT_COOKIE_NAME, &keys(1));
    let read = svc
        .oneshot(
            Request::get("/")
                .header(COOKIE, format!("primary_affinity={anonymous}"))
                .body(())
                .unwrap(),
        )
        .await
        .unwrap();
    let seen = seen(&read);
    assert_eq!(seen.outcome, TokenOutcome::NoIdentity);
    assert_eq!(seen.required, None);
}

#[tokio::test]
async fn huge_ttls_are_clamped_to_four_hundred_days() {
    const CAP: u64 = 400 * 24 * 60 * 60;
    let backend = FakeBackend::new();
    for configured in [
        layer(&backend, &ManualClock::new(NOW)).ttl(Duration::MAX),
        layer(&backend, &ManualClock::new(NOW)).ttl(Duration::from_secs(u64::MAX)),
        layer(&backend, &ManualClock::new(NOW)).time_window(Duration::MAX),
    ] {
        let svc = configured.layer(service_fn(handler));
        let wrote = svc
            .oneshot(request(Method::POST, "/write", 1).body(()).unwrap())
            .await
            .unwrap();
        let cookie = affinity_cookie(&wrote).unwrap();
        assert!(
            cookie.split("; ").any(|a| a == format!("Max-Age={CAP}")),
            "{cookie}"
        );
        let header = wrote.headers()[DEFAULT_TOKEN_HEADER].to_str().unwrap();
        let token = AffinityToken::verify(header, DEFAULT_COOKIE_NAME, &keys(1), NOW).unwrap();
        assert_eq!(token.expires_at(), NOW + CAP + 1);
    }
}

#[test]
#[should_panic(expected = "cookie domain")]
fn a_domain_that_injects_attributes_is_refused_at_configuration() {
    let _ = layer(&FakeBackend::new(), &ManualClock::new(NOW)).domain("example.com; SameSite=None");
}

#[test]
#[should_panic(expected = "cookie name")]
fn a_cookie_name_with_a_line_break_is_refused_at_configuration() {
    let _ = layer(&FakeBackend::new(), &ManualClock::new(NOW)).cookie_name("affinity\r\nX-Evil: 1");
}

#[test]
fn cookie_names_and_domains_are_checked_when_configured() {
    let layer = || layer(&FakeBackend::new(), &ManualClock::new(NOW));
    for good in [
        "primary_affinity",
        "__Host-affinity",
        "a",
        "x!#$%&'*+-.^_`|~9",
    ] {
        assert!(layer().try_cookie_name(good).is_ok(), "{good:?}");
    }
    for bad in [
        "",
        "a b",
        "a;b",
        "a=b",
        "a,b",
        "a\"b",
        "a\r\nb",
        "a\tb",
        "caf\u{e9}",
        "a\0",
        "(a)",
        "a/b",
        "a:b",
        "a@b",
        "{a}",
        "[a]",
        "a?",
        "a\\b",
        "<a>",
    ] {
        let error = layer().try_cookie_name(bad).err();
        assert_eq!(
            error,
            Some(ConfigError::InvalidCookieName { name: bad.into() }),
            "{bad:?}"
        );
    }
    for good in [
        "example.com",
        ".example.com",
        "a-b.example.com",
        "localhost",
        "127.0.0.1",
        "xn--bcher-kva.example",
        &format!("{}.com", vec!["a".repeat(63); 3].join(".")),
    ] {
        assert!(layer().try_domain(good).is_ok(), "{good:?}");
    }
    for bad in [
        "",
        ".",
        "..example.com",
        "example.com.",
        "example..com",
        "example.com; SameSite=None",
        "example.com\r\nSet-Cookie: x=1",
        "exa mple.com",
        "example.com,evil.com",
        "a=b",
        "-example.com",
        "example-.com",
        "ex_ample.com",
        "b\u{fc}cher.example",
        &format!("{}.com", "a".repeat(64)),
        &vec!["a".repeat(63); 4].join("."),
    ] {
        let error = layer().try_domain(bad).err();
        assert_eq!(
            error,
            Some(ConfigError::InvalidDomain { domain: bad.into() }),
            "{bad:?}"
        );
    }
    let message = layer().try_domain("a;b").err().unwrap().to_string();
    assert!(message.contains("for example `example.com`"), "{message}");
    let message = layer().try_cookie_name("a b").err().unwrap().to_string();
    assert!(
        message.contains("for example `primary_affinity`"),
        "{message}"
    );
}

/// Collects the messages of `WARN` events on this thread: a test subscriber
/// without `tracing-subscriber`.
#[derive(Clone, Default)]
struct Warnings(Arc<std::sync::Mutex<Vec<String>>>);

impl Warnings {
    fn taken(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }

    /// Collects this thread's warnings until the guard drops.
    ///
    /// tracing caches each call site's interest across threads: a test on
    /// another thread without a subscriber can leave a call site cached as
    /// "never", and this thread's warning is then lost. A global subscriber
    /// that answers "sometimes" for every call site keeps any from being
    /// cached as "never", so the thread's own subscriber is always asked.
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            let _ = tracing::subscriber::set_global_default(AskEveryTime);
        });
        tracing::subscriber::set_default(self.clone())
    }
}

/// A global subscriber that records nothing and never lets a call site be
/// cached as disabled (see [`Warnings::capture`]).
struct AskEveryTime;

impl tracing::Subscriber for AskEveryTime {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        false
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

impl tracing::Subscriber for Warnings {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Message<'a>(&'a mut String);
        impl tracing::field::Visit for Message<'_> {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    *self.0 = format!("{value:?}");
                }
            }
        }
        let mut message = String::new();
        event.record(&mut Message(&mut message));
        self.0.lock().unwrap().push(message);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

fn counter(snapshotter: &Snapshotter, name: &str) -> Option<DebugValue> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .find(|(key, ..)| key.key().name() == name)
        .map(|(.., value)| value)
}

#[tokio::test]
async fn a_write_without_identity_warns_once_a_minute_naming_the_layer_order() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let warnings = Warnings::default();
    let _tracing = warnings.capture();

    let backend = FakeBackend::new();
    let clock = ManualClock::new(NOW);
    let mut svc = layer(&backend, &clock).layer(service_fn(handler));
    // The auth layer sits inside: the identity function finds no user.
    let anonymous_write = || Request::post("/write").body(()).unwrap();
    let response = send(&mut svc, anonymous_write()).await;
    assert!(affinity_cookie(&response).is_none());
    let logged = warnings.taken();
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert!(
        logged[0].contains("is the authentication layer inside ReadAfterWriteLayer?"),
        "{}",
        logged[0]
    );
    assert!(logged[0].contains("added after it, with Router::layer"));

    // Within the minute: counted, not logged again. Reads and writes with
    // an identity are neither.
    clock.advance(Duration::from_secs(59));
    send(&mut svc, anonymous_write()).await;
    send(&mut svc, Request::get("/").body(()).unwrap()).await;
    send(
        &mut svc,
        request(Method::POST, "/write", 3).body(()).unwrap(),
    )
    .await;
    assert!(warnings.taken().is_empty());
    assert_eq!(
        counter(
            &snapshotter,
            "read_after_write_writes_without_identity_total"
        ),
        Some(DebugValue::Counter(2))
    );

    // A minute after the first warning, the next one gets through.
    clock.advance(Duration::from_secs(1));
    send(&mut svc, anonymous_write()).await;
    assert_eq!(warnings.taken().len(), 1);
    // A clock set back far does not silence it for as long.
    clock.set(NOW - 3600);
    send(&mut svc, anonymous_write()).await;
    assert_eq!(warnings.taken().len(), 1);
    assert_eq!(
        counter(
            &snapshotter,
            "read_after_write_writes_without_identity_total"
        ),
        Some(DebugValue::Counter(2)), // since the last snapshot
    );

    // Each layer has its own limit, and without an identity function the
    // message names the other cause.
    let mut bare = ReadAfterWriteLayer::from_arc(Arc::clone(&backend), keys(1))
        .allow_anonymous(false)
        .clock(clock.clone())
        .layer(service_fn(handler));
    send(&mut bare, anonymous_write()).await;
    let logged = warnings.taken();
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert!(
        logged[0].contains("no identity function is set"),
        "{}",
        logged[0]
    );
}

#[test]
fn the_throttle_lets_exactly_one_racer_through() {
    let throttle = Arc::new(Throttle::default());
    let passed = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..1000 {
                    if throttle.allow(NOW) {
                        passed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert_eq!(passed.load(Ordering::Relaxed), 1);
    assert!(!throttle.allow(NOW + Throttle::INTERVAL_SECONDS - 1));
    assert!(throttle.allow(NOW + Throttle::INTERVAL_SECONDS));
}

fn codes(check: &SelfCheck) -> Vec<&'static str> {
    check.findings().iter().map(Finding::code).collect()
}

#[tokio::test]
async fn the_self_check_weighs_the_cookie_against_how_the_app_is_served() {
    let backend = FakeBackend::new();
    let secure = ReadAfterWriteLayer::from_arc(Arc::clone(&backend), keys(1)).identity(user_header);
    let http = secure
        .check(CheckContext::new().served_over_https(false))
        .await;
    assert_eq!(
        codes(&http),
        ["secure_cookie_over_http", "layer_order_unchecked"]
    );
    assert!(!http.is_ok());
    assert!(http.findings()[0].message().contains(".secure(false)"));
    let https = secure
        .check(CheckContext::new().served_over_https(true))
        .await;
    assert_eq!(codes(&https), ["layer_order_unchecked"]);
    assert!(https.is_ok(), "{https}");
    let unsaid = secure.check(CheckContext::new()).await;
    assert_eq!(codes(&unsaid), ["secure_cookie", "layer_order_unchecked"]);
    assert!(unsaid.is_ok());

    let plain = secure.clone().secure(false);
    let check = plain
        .check(CheckContext::new().served_over_https(true))
        .await;
    assert_eq!(codes(&check)[0], "insecure_cookie_over_https");
    let check = plain
        .check(CheckContext::new().served_over_https(false))
        .await;
    assert!(check.is_ok(), "{check}");
}

#[tokio::test]
async fn the_self_check_reports_configurations_that_cannot_work() {
    let backend = FakeBackend::new();
    let base = || ReadAfterWriteLayer::from_arc(Arc::clone(&backend), keys(1));
    let https = || CheckContext::new().served_over_https(true);

    let check = base().allow_anonymous(false).check(https()).await;
    assert_eq!(codes(&check), ["no_identity_no_anonymous"]);
    assert_eq!(check.worst(), Some(Severity::Error));

    let check = base()
        .cookie_name("__Host-affinity")
        .domain("example.com")
        .check(https())
        .await;
    assert_eq!(codes(&check), ["cookie_prefix_refused", "anonymous_tokens"]);
    assert!(check.findings()[0].message().contains("no Domain"));
    let check = base()
        .cookie_name("__secure-affinity")
        .secure(false)
        .check(https())
        .await;
    assert_eq!(
        codes(&check)[..2],
        ["cookie_prefix_refused", "insecure_cookie_over_https"]
    );
    assert!(base()
        .cookie_name("__Host-affinity")
        .check(https())
        .await
        .is_ok());

    let check = base()
        .debug_header(true)
        .max_wait(Duration::ZERO)
        .check(https())
        .await;
    assert_eq!(
        codes(&check),
        ["anonymous_tokens", "debug_header_on", "no_wait"]
    );
    assert!(check.is_ok());
    // One line per finding, worst first.
    let text = check.to_string();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.starts_with("info: "), "{text}");
}

#[tokio::test]
async fn the_self_check_includes_the_backends_findings_and_gives_it_the_settings() {
    let backend = FakeBackend::new();
    backend.findings.lock().unwrap().push(Finding::warning(
        "no_healthy_replica",
        "no replica is healthy",
    ));
    let layer = ReadAfterWriteLayer::from_arc(Arc::clone(&backend), keys(1))
        .identity(user_header)
        .max_wait(Duration::from_millis(40))
        .ttl(Duration::from_millis(1500));
    let check = layer.check(CheckContext::new().served_over_https(true));
    fn assert_send<T: Send>(_: &T) {}
    assert_send(&check);
    let check = check.await;
    assert_eq!(
        codes(&check),
        ["no_healthy_replica", "layer_order_unchecked"]
    );
    assert!(!check.is_ok());
    let settings = backend.diagnosed_with.lock().unwrap().unwrap();
    // The TTL the cookie gets: whole seconds, rounded up.
    assert_eq!(
        (settings.max_wait, settings.ttl, settings.uses_positions),
        (Duration::from_millis(40), Duration::from_secs(2), true)
    );

    let check = layer
        .time_window(Duration::from_secs(3))
        .check(CheckContext::new().served_over_https(true))
        .await;
    assert!(codes(&check).contains(&"time_window_mode"));
    let settings = backend.diagnosed_with.lock().unwrap().unwrap();
    assert_eq!(
        (settings.ttl, settings.uses_positions),
        (Duration::from_secs(3), false)
    );
}

#[tokio::test]
async fn the_last_route_is_kept_without_the_debug_header() {
    use crate::backend::Target;
    use crate::handle::Route;

    let backend = FakeBackend::new();
    let layer = ReadAfterWriteLayer::from_arc(Arc::clone(&backend), keys(1))
        .identity(user_header)
        .clock(ManualClock::new(NOW));
    let svc = layer.layer(service_fn(|req: Request<()>| async move {
        let db = req.extensions().get::<Db<FakeBackend>>().unwrap().clone();
        let mut routes = vec![db.last_route()];
        let _ = db.read().await;
        routes.push(db.last_route());
        // A clone shares the request's state.
        db.clone().primary();
        routes.push(db.last_route());
        let mut response = Response::new(());
        response.extensions_mut().insert(routes);
        Ok::<_, Infallible>(response)
    }));
    let response = svc
        .oneshot(request(Method::GET, "/", 1).body(()).unwrap())
        .await
        .unwrap();
    assert!(response.headers().get(DEBUG_HEADER).is_none());
    let routes = response.extensions().get::<Vec<Option<Route>>>().unwrap();
    let route = |node: &str, target, reason| {
        Some(Route {
            node: node.to_owned(),
            target,
            reason,
        })
    };
    assert_eq!(
        routes,
        &[
            None,
            route("replica-1", Target::Replica, RouteReason::NoToken),
            route("primary", Target::Primary, RouteReason::Critical),
        ]
    );
    assert_eq!(
        routes[2].as_ref().unwrap().to_string(),
        "node=primary; target=primary; reason=critical"
    );
}

/// Names longer than the inline buffer are kept whole.
struct LongNames(&'static str);

impl Backend for LongNames {
    type Pool = &'static str;
    type Error = CaptureFailed;

    fn primary(&self) -> &&'static str {
        &self.0
    }
    fn eventual(&self) -> Routed<'_, &'static str> {
        Routed::replica(&self.0, self.0, RouteReason::Eventual)
    }
    async fn session(&self, _: WritePosition, _: Duration) -> Routed<'_, &'static str> {
        self.eventual()
    }
    async fn write_position(&self) -> Result<WritePosition, CaptureFailed> {
        Err(CaptureFailed)
    }
}

#[tokio::test]
async fn long_node_names_survive_the_last_route_and_the_debug_header() {
    const NAME: &str = "replica-eu-west-1a-production-analytics-02-ünïcode";
    let layer = ReadAfterWriteLayer::new(LongNames(NAME), keys(1)).debug_header(true);
    let svc = layer.layer(service_fn(|req: Request<()>| async move {
        let db = req.extensions().get::<Db<LongNames>>().unwrap().clone();
        db.eventual();
        db.primary();
        db.eventual();
        let node = db.last_route().unwrap().node;
        let mut response = Response::new(());
        response.extensions_mut().insert(node);
        Ok::<_, Infallible>(response)
    }));
    let response = svc
        .oneshot(Request::get("/").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.extensions().get::<String>().unwrap(), NAME);
    let header = response.headers()[DEBUG_HEADER].as_bytes();
    assert_eq!(
        header,
        format!("node={NAME}; reason=eventual; token=absent").as_bytes()
    );
}

#[tokio::test]
async fn a_requirement_taken_after_the_writes_covers_them() {
    use crate::requirement::Requirement;

    let backend = FakeBackend::new();
    backend.primary_at.store(0x500, Ordering::SeqCst);
    let seen_requirements = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = Arc::clone(&seen_requirements);
    let backend_in_handler = Arc::clone(&backend);
    let service =
        layer(&backend, &ManualClock::new(NOW)).layer(service_fn(move |req: Request<()>| {
            let record = Arc::clone(&record);
            let backend = Arc::clone(&backend_in_handler);
            async move {
                let db = req.extensions().get::<Db<FakeBackend>>().unwrap().clone();
                // Nothing written yet: the token's requirement, no capture.
                let requirement = db.requirement().await;
                record.lock().unwrap().push(requirement);
                db.write();
                let requirement = db.requirement().await;
                record.lock().unwrap().push(requirement);
                // Asked again with no write in between: the same capture.
                let requirement = db.requirement().await;
                record.lock().unwrap().push(requirement);
                if req.uri().path() == "/write-more" {
                    backend.primary_at.store(0x900, Ordering::SeqCst);
                    db.write();
                }
                Ok::<_, Infallible>(Response::new(()))
            }
        }));
    let response = service
        .clone()
        .oneshot(request(Method::POST, "/write", 3).body(()).unwrap())
        .await
        .unwrap();
    let at = |lsn| Requirement::Position(WritePosition::new(Lsn::new(lsn), 1, SYSTEM));
    assert_eq!(
        *seen_requirements.lock().unwrap(),
        vec![Requirement::Nothing, at(0x500), at(0x500)]
    );
    // One capture for the job payload (asked twice), one for the response's
    // token: a capture is never reused, since it cannot tell whether a write
    // handed out before it had committed.
    assert_eq!(backend.captures.load(Ordering::SeqCst), 3);
    let token = response.headers()[DEFAULT_TOKEN_HEADER].to_str().unwrap();
    let token = AffinityToken::verify(token, DEFAULT_COOKIE_NAME, &keys(1), NOW).unwrap();
    assert_eq!(token.position().lsn, Lsn::new(0x500));

    // A write after the requirement was taken: the response's token covers it.
    let response = service
        .oneshot(request(Method::POST, "/write-more", 3).body(()).unwrap())
        .await
        .unwrap();
    let token = response.headers()[DEFAULT_TOKEN_HEADER].to_str().unwrap();
    let token = AffinityToken::verify(token, DEFAULT_COOKIE_NAME, &keys(1), NOW).unwrap();
    assert_eq!(token.position().lsn, Lsn::new(0x900));
}

#[tokio::test]
async fn outgoing_calls_carry_a_token_covering_the_writes_made_before_them() {
    use crate::forward::ForwardTokenLayer;

    async fn run(forward: bool) -> (Option<String>, usize) {
        let backend = FakeBackend::new();
        backend.primary_at.store(0x700, Ordering::SeqCst);
        let sent = Arc::new(std::sync::Mutex::new(None));
        let record = Arc::clone(&sent);
        // The downstream client: records the token header it was given.
        let client = ForwardTokenLayer.layer(service_fn(move |req: Request<()>| {
            let record = Arc::clone(&record);
            async move {
                *record.lock().unwrap() = req
                    .headers()
                    .get(DEFAULT_TOKEN_HEADER)
                    .map(|v| v.to_str().unwrap().to_owned());
                Ok::<_, Infallible>(Response::new(()))
            }
        }));
        let service = layer(&backend, &ManualClock::new(NOW))
            .forward_tokens(forward)
            .layer(service_fn(move |req: Request<()>| {
                let client = client.clone();
                async move {
                    let db = req.extensions().get::<Db<FakeBackend>>().unwrap().clone();
                    db.write();
                    client
                        .oneshot(Request::get("http://downstream/").body(()).unwrap())
                        .await
                        .unwrap();
                    Ok::<_, Infallible>(Response::new(()))
                }
            }));
        service
            .oneshot(request(Method::POST, "/write", 3).body(()).unwrap())
            .await
            .unwrap();
        let token = sent.lock().unwrap().clone();
        (token, backend.captures.load(Ordering::SeqCst))
    }

    let (token, captures) = run(true).await;
    let token = token.expect("the downstream call carries a token");
    let token = AffinityToken::verify(&token, DEFAULT_COOKIE_NAME, &keys(1), NOW).unwrap();
    assert_eq!(token.position().lsn, Lsn::new(0x700));
    assert_eq!(token.user().as_bytes(), 3u64.to_be_bytes());
    // One capture for the call, one for the response's token.
    assert_eq!(captures, 2);

    // Off by default: nothing is sent, nothing captured early.
    let (token, captures) = run(false).await;
    assert_eq!(token, None);
    assert_eq!(captures, 1);
}

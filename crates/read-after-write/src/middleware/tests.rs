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
use crate::backend::{Backend, RouteReason, Routed};
use crate::clock::ManualClock;
use crate::handle::{Db, TokenOutcome};
use crate::position::{Lsn, WritePosition};
use crate::token::{AffinityToken, SigningKey, TokenError};

const SYSTEM: u64 = 0x5EED;
const NOW: u64 = 1_800_000_000;

#[derive(Default)]
pub(crate) struct FakeBackend {
    replica_replayed: AtomicU64,
    primary_at: AtomicU64,
    capture_fails: AtomicBool,
    captures: AtomicUsize,
    primary: &'static str,
    replica: &'static str,
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

    let mut tampered = token.clone().into_bytes();
    tampered[10] = if tampered[10] == b'A' { b'B' } else { b'A' };
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
        assert_eq!(
            seen.read_pool, "replica-pool",
            "a bad token reads like no token"
        );
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

fn token_counts(snapshotter: &Snapshotter) -> Vec<(String, u64)> {
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
async fn a_failed_capture_returns_the_response_without_a_token() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let backend = FakeBackend::new();
    backend.capture_fails.store(true, Ordering::SeqCst);
    let mut svc = layer(&backend, &ManualClock::new(NOW)).layer(service_fn(handler));
    let response = send(
        &mut svc,
        request(Method::POST, "/write", 3).body(()).unwrap(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(affinity_cookie(&response).is_none());
    assert!(response.headers().get(DEFAULT_TOKEN_HEADER).is_none());
    // The handler's own cookie is untouched.
    assert_eq!(response.headers().get_all(SET_COOKIE).iter().count(), 1);
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
        "node=primary; reason=time_window; token=valid"
    );
}

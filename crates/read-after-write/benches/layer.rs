//! Per-request overhead of `ReadAfterWriteLayer`, and what a user would
//! otherwise assemble on axum.
//!
//! Every layer benchmark runs over [`constant_position_source`], the crate's
//! shared fake backend answering at once from constants: these numbers are the layer's own work
//! (identity, cookie parsing, token verification, the `Db` handle, signing and
//! `Set-Cookie`), not a database's.
//!
//! - Group `layer`: the layer over a bare `tower::service_fn`, polled with a
//!   no-op waker (no runtime: nothing waits on I/O). Each scenario has its own
//!   bare baseline fed the very same request and running the same identity
//!   function, so `layer/<scenario>` − `layer/bare_service_fn/<request>` is
//!   the overhead.
//! - Group `alternatives`: axum `Router`s driven by `oneshot` on a
//!   current-thread tokio runtime: no extractor, axum-extra's
//!   `SignedCookieJar`, this layer, and tower-sessions with its memory store.
//!
//! Run with `cargo bench -p read-after-write --bench layer`.

use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::routing::{get, post};
use axum::{Extension, Router};
use axum_extra::extract::cookie::{Key, SignedCookieJar};
use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkGroup, Criterion};
use http::header::{HeaderName, COOKIE, SET_COOKIE};
use http::{Method, Request, Response};
use read_after_write::{
    AffinityToken, Bookmark, Bookmarks, Db, KeySet, Lsn, ReadAfterWriteLayer, ReplicaTag,
    SigningKey, UserId, WritePosition,
};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_sessions::{MemoryStore, Session, SessionManagerLayer};

#[path = "../src/testing/fake_backend.rs"]
mod fake_backend;

use fake_backend::FakeBackend;

/// The one position every write reports.
const POSITION: WritePosition = WritePosition::new(Lsn::new(0x16B_3748), 1, SYSTEM_ID);
const SYSTEM_ID: u64 = 7_301_234_567_890_123_456;

/// Constant position source: measures the layer's own work, not a database.
///
/// The crate's shared test double (`src/testing/fake_backend.rs`), set up so
/// that every read is routed to a replica that is already caught up and
/// every write position is the same constant, returned without waiting. It
/// says nothing about PostgreSQL's cost. Monotonic reads stay on
/// `replica-1`: a bookmark tied to it comes back unchanged; any other is
/// moved there (and so re-issued).
fn constant_position_source() -> FakeBackend {
    FakeBackend::new()
        .cluster_id(SYSTEM_ID)
        .primary_at(POSITION.lsn.as_u64())
        .replica_caught_up()
        .replica_tag(replica_tag())
        .capture_at_once()
}

/// The tag of the bench's one replica.
fn replica_tag() -> ReplicaTag {
    ReplicaTag::of("replica-1", 1_700_000_000_000_000)
}

const BACKEND_LABEL: &str = "const_position_source";
const USER: u64 = 42;
const OTHER_COOKIES_BEFORE: &str = "theme=dark";
const OTHER_COOKIES_AFTER: &str = "_ga=GA1.2.1234567890.1700000000";
/// What a browser sends to a site with analytics, consent and session
/// cookies: about 1 KB in one `Cookie` header, none of them ours.
const BROWSER_COOKIES: &str = "_ga=GA1.1.1234567890.1700000000; \
    _ga_ABCDEF1234=GS1.1.1700000000.12.1.1700000999.0.0.0; \
    _gid=GA1.2.987654321.1700000000; _fbp=fb.1.1700000000000.1234567890; \
    _gcl_au=1.1.1234567890.1700000000; \
    OptanonConsent=isGpcEnabled=0&datestamp=Tue+Nov+14+2023+10%3A00%3A00+GMT%2B0000&version=202310.1.0&browserGpcFlag=0&isIABGlobal=false&hosts=&consentId=0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0&interactionCount=1&landingPath=NotLandingPage&groups=C0001%3A1%2CC0002%3A1%2CC0003%3A1%2CC0004%3A1; \
    OptanonAlertBoxClosed=2023-11-14T10:00:00.000Z; \
    session=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI0MiIsImlhdCI6MTcwMDAwMDAwMCwiZXhwIjoxNzAwMDg2NDAwfQ.c2lnbmF0dXJlc2lnbmF0dXJlc2lnbmF0dXJlc2ln; \
    csrftoken=Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9v; \
    theme=dark; lang=en-GB; tz=Europe%2FLondon; \
    _hjSessionUser_123456=eyJpZCI6IjAxMjM0NTY3LTg5YWItY2RlZi0wMTIzLTQ1Njc4OWFiY2RlZiIsImNyZWF0ZWQiOjE3MDAwMDAwMDAwMDAsImV4aXN0aW5nIjp0cnVlfQ==; \
    _hjSession_123456=eyJpZCI6ImFiY2RlZjAxLTIzNDUtNjc4OS1hYmNkLWVmMDEyMzQ1Njc4OSIsImMiOjE3MDAwMDAwMDAwMDAsInMiOjAsInIiOjAsInNiIjowfQ==; \
    intercom-id-abc123=01234567-89ab-cdef-0123-456789abcdef; \
    intercom-session-abc123=; intercom-device-id-abc123=fedcba98-7654-3210-fedc-ba9876543210";
/// The value a `SignedCookieJar` user would sign instead of our token: 64
/// characters, the size of the token's raw bytes (version 2).
const JAR_VALUE: &str = "u42.lsn-0-16B3748.tl-1.sys-7301234567890123456.exp-1800.r-a1b2c3";
const JAR_COOKIE: &str = "affinity";

fn signing_keys() -> KeySet {
    KeySet::new(SigningKey::from_bytes(&[7; 32]).expect("32-byte key"))
}

/// The user id header, named once: looking a header up by `&str` parses and
/// validates the name on every call.
static X_USER_ID: HeaderName = HeaderName::from_static("x-user-id");

/// Identity from the `x-user-id` header, as an auth layer would provide it.
fn user_from_header(parts: &http::request::Parts) -> Option<UserId> {
    let id = parts
        .headers
        .get(&X_USER_ID)?
        .to_str()
        .ok()?
        .parse::<u64>()
        .ok()?;
    Some(UserId::from(id))
}

fn rw_layer() -> ReadAfterWriteLayer<FakeBackend> {
    ReadAfterWriteLayer::new(constant_position_source(), signing_keys()).identity(user_from_header)
}

/// A valid `primary_affinity` token for `USER`, good for an hour of
/// wall-clock time (the layer uses the system clock).
fn valid_token() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    AffinityToken::new(UserId::from(USER), POSITION, now + 3600)
        .sign("primary_affinity", &signing_keys())
}

/// A valid token for `USER` tied to the bench's replica, as a monotonic
/// session holds after its first read there.
fn sticky_token() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let bookmark = Bookmark::new(POSITION).on_replica(replica_tag());
    AffinityToken::with_bookmarks(UserId::from(USER), Bookmarks::one(bookmark), now + 3600)
        .expect("one bookmark")
        .sign("primary_affinity", &signing_keys())
}

/// A request with the user id header and, when `cookie` is given, one
/// `Cookie` header holding it between two unrelated cookies.
fn request<B>(method: Method, path: &str, cookie: Option<&str>, body: B) -> Request<B> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header(&X_USER_ID, USER.to_string());
    if let Some(cookie) = cookie {
        builder = builder.header(
            COOKIE,
            format!("{OTHER_COOKIES_BEFORE}; {cookie}; {OTHER_COOKIES_AFTER}"),
        );
    }
    builder.body(body).expect("valid request")
}

/// Drives a future that never waits on I/O to completion with a no-op
/// waker: no runtime, no scheduling.
fn complete<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..16 {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
    }
    panic!("the benchmarked future waited on something; nothing here should");
}

/// The one handler for every `layer` benchmark: the same trivial work with
/// or without the layer. Without it there is no `Db`, and the lookup in
/// empty extensions is all it does.
async fn handler(req: Request<()>) -> Result<Response<()>, Infallible> {
    if let Some(db) = req.extensions().get::<Db<FakeBackend>>() {
        if req.method() == Method::POST {
            black_box(db.write());
        } else {
            black_box(db.read().await);
        }
    }
    Ok(Response::new(()))
}

/// The handle of the floor service (see `layer`): the per-request state a
/// handler shares with the response.
#[derive(Clone)]
struct FloorHandle(Arc<AtomicBool>);

/// The token header, named once, as the layer names it.
static X_PRIMARY_AFFINITY: HeaderName = HeaderName::from_static("x-primary-affinity");

/// The handler of the floor service: finds the handle and reads its flag.
async fn floor_handler(req: Request<()>) -> Result<Response<()>, Infallible> {
    if let Some(handle) = req.extensions().get::<FloorHandle>() {
        black_box(handle.0.load(Ordering::Relaxed));
    }
    Ok(Response::new(()))
}

/// A handler that finds the `Db` handle and never uses it: a request that
/// never touches the database (a static page, a health check).
async fn untouched_handler(req: Request<()>) -> Result<Response<()>, Infallible> {
    black_box(req.extensions().get::<Db<FakeBackend>>());
    Ok(Response::new(()))
}

/// `ready` then `call`, the same for the bare service and the layered one.
fn send<S>(service: &mut S, req: Request<()>) -> Response<()>
where
    S: Service<Request<()>, Response = Response<()>, Error = Infallible>,
{
    complete(async move {
        let ready = service.ready().await.expect("infallible");
        ready.call(req).await.expect("infallible")
    })
}

fn configure(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .sample_size(50);
}

fn layer(c: &mut Criterion) {
    eprintln!(
        "layer benchmarks use the constant position source ({BACKEND_LABEL}): \
         they measure the layer's own work, not a database"
    );
    let token_cookie = format!("primary_affinity={}", valid_token());

    // The bare baseline runs the same identity function, as the
    // authentication the layer relies on would: the layer's overhead is
    // what it adds beyond that.
    let mut bare = service_fn(|req: Request<()>| {
        let (parts, body) = req.into_parts();
        black_box(user_from_header(&parts));
        handler(Request::from_parts(parts, body))
    });
    let mut layered = rw_layer().layer(service_fn(handler));
    // The floor: the least any layer giving handlers a per-request handle
    // must do on a request without a token, over the same bare service.
    // It looks for the token (the `Cookie` header and the token header),
    // allocates the state the handler shares with the response (here one
    // flag: did it write?), hands the handle over through the request's
    // extensions (what `http::Extensions` allocates: its map, table and
    // box), and reads the flag once the handler has answered.
    let mut floor = service_fn(|req: Request<()>| {
        let (mut parts, body) = req.into_parts();
        black_box(user_from_header(&parts));
        black_box(parts.headers.get(COOKIE));
        black_box(parts.headers.get(&X_PRIMARY_AFFINITY));
        let wrote = Arc::new(AtomicBool::new(false));
        parts.extensions.insert(FloorHandle(Arc::clone(&wrote)));
        let answer = floor_handler(Request::from_parts(parts, body));
        async move {
            let response = answer.await;
            black_box(wrote.load(Ordering::Relaxed));
            response
        }
    });

    // What each scenario sends; the bare baseline gets the same requests.
    let get_no_token = || request(Method::GET, "/", None, ());
    // A browser's request: about 1 KB of other cookies, without the token
    // and with it in the middle.
    let browser = |cookie: Option<&str>| {
        let mut req = request(Method::GET, "/", None, ());
        let header = match cookie {
            Some(cookie) => {
                let (before, after) = BROWSER_COOKIES.split_at(BROWSER_COOKIES.len() / 2);
                let split = after.find("; ").map_or(after.len(), |at| at + 2);
                format!("{before}{}{cookie}; {}", &after[..split], &after[split..])
            }
            None => BROWSER_COOKIES.to_owned(),
        };
        req.headers_mut()
            .insert(COOKIE, header.parse().expect("header value"));
        req
    };
    let get_browser_no_token = || browser(None);
    let get_browser_token = || browser(Some(&token_cookie));
    let get_token = || request(Method::GET, "/", Some(&token_cookie), ());
    let post = || {
        let others = format!("{OTHER_COOKIES_BEFORE}; {OTHER_COOKIES_AFTER}");
        let mut req = request(Method::POST, "/posts", None, ());
        req.headers_mut()
            .insert(COOKIE, others.parse().expect("header value"));
        req
    };

    // Check the scenarios do what they are named for before timing them.
    let response = send(&mut layered, get_token());
    assert!(response.headers().get(SET_COOKIE).is_none());
    let response = send(&mut layered, get_browser_token());
    assert!(response.headers().get(SET_COOKIE).is_none());
    let mut outcome = rw_layer().layer(service_fn(|req: Request<()>| async move {
        let db = req.extensions().get::<Db<FakeBackend>>().expect("a handle");
        assert_eq!(
            db.token_outcome().as_str(),
            "valid",
            "the token among 1 KB of cookies"
        );
        Ok::<_, Infallible>(Response::new(()))
    }));
    send(&mut outcome, get_browser_token());
    let response = send(&mut layered, post());
    let set_cookie = response.headers()[SET_COOKIE].to_str().expect("ascii");
    assert!(set_cookie.starts_with("primary_affinity="), "{set_cookie}");

    let mut group = c.benchmark_group("layer");
    configure(&mut group);
    for (name, make) in [
        ("get_no_token", &get_no_token as &dyn Fn() -> Request<()>),
        ("get_token_cookie", &get_token),
        ("post", &post),
        ("get_browser_cookies", &get_browser_no_token),
        ("get_browser_cookies_token", &get_browser_token),
    ] {
        group.bench_function(format!("bare_service_fn/{name}"), |b| {
            b.iter_batched(make, |req| send(&mut bare, req), BatchSize::SmallInput)
        });
    }
    group.bench_function("floor_service_fn/get_no_token", |b| {
        b.iter_batched(
            get_no_token,
            |req| send(&mut floor, req),
            BatchSize::SmallInput,
        )
    });
    group.bench_function(format!("no_token/{BACKEND_LABEL}"), |b| {
        b.iter_batched(
            get_no_token,
            |req| send(&mut layered, req),
            BatchSize::SmallInput,
        )
    });
    let mut untouched = rw_layer().layer(service_fn(untouched_handler));
    group.bench_function(format!("no_token_db_untouched/{BACKEND_LABEL}"), |b| {
        b.iter_batched(
            get_no_token,
            |req| send(&mut untouched, req),
            BatchSize::SmallInput,
        )
    });
    group.bench_function(format!("valid_token_read/{BACKEND_LABEL}"), |b| {
        b.iter_batched(
            get_token,
            |req| send(&mut layered, req),
            BatchSize::SmallInput,
        )
    });
    group.bench_function(format!("no_token_browser_cookies/{BACKEND_LABEL}"), |b| {
        b.iter_batched(
            get_browser_no_token,
            |req| send(&mut layered, req),
            BatchSize::SmallInput,
        )
    });
    group.bench_function(
        format!("valid_token_browser_cookies/{BACKEND_LABEL}"),
        |b| {
            b.iter_batched(
                get_browser_token,
                |req| send(&mut layered, req),
                BatchSize::SmallInput,
            )
        },
    );
    group.bench_function(format!("write_sets_cookie/{BACKEND_LABEL}"), |b| {
        b.iter_batched(post, |req| send(&mut layered, req), BatchSize::SmallInput)
    });

    // Monotonic reads: a read that keeps its bookmark issues nothing; one
    // that moves it (here: a token from a write, tied to no replica yet)
    // re-issues the token.
    let mut monotonic = rw_layer()
        .consistency(read_after_write::Consistency::Monotonic)
        .layer(service_fn(handler));
    let sticky_cookie = format!("primary_affinity={}", sticky_token());
    let get_sticky = || request(Method::GET, "/", Some(&sticky_cookie), ());
    let response = send(&mut monotonic, get_sticky());
    assert!(
        response.headers().get(SET_COOKIE).is_none(),
        "a sticky read keeps its token"
    );
    let response = send(&mut monotonic, get_token());
    assert!(
        response.headers().get(SET_COOKIE).is_some(),
        "a moved bookmark is re-issued"
    );
    group.bench_function(format!("monotonic_read_keeps_token/{BACKEND_LABEL}"), |b| {
        b.iter_batched(
            get_sticky,
            |req| send(&mut monotonic, req),
            BatchSize::SmallInput,
        )
    });
    group.bench_function(
        format!("monotonic_read_reissues_token/{BACKEND_LABEL}"),
        |b| {
            b.iter_batched(
                get_token,
                |req| send(&mut monotonic, req),
                BatchSize::SmallInput,
            )
        },
    );
    group.finish();
}

async fn plain_handler() {}

async fn signed_jar_handler(jar: SignedCookieJar) {
    black_box(jar.get(JAR_COOKIE));
}

async fn rw_handler(Extension(db): Extension<Db<FakeBackend>>) {
    black_box(db.read().await);
}

async fn session_handler(session: Session) {
    black_box(session.get::<u64>("user_id").await.expect("memory store"));
}

async fn session_login(session: Session) {
    session.insert("user_id", USER).await.expect("memory store");
}

fn alternatives(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    let cookie_key = Key::from(&[7u8; 64]);

    // axum-extra: the same 55-character value, signed by `SignedCookieJar`.
    let jar_cookie = {
        let mut jar = cookie::CookieJar::new();
        jar.signed_mut(&cookie_key)
            .add(cookie::Cookie::new(JAR_COOKIE, JAR_VALUE));
        jar.get(JAR_COOKIE).expect("just added").to_string()
    };
    let token_cookie = format!("primary_affinity={}", valid_token());

    let plain = Router::new()
        .route("/", get(plain_handler))
        .with_state(cookie_key.clone());
    let signed_jar = Router::new()
        .route("/", get(signed_jar_handler))
        .with_state(cookie_key.clone());
    let read_after_write = Router::new().route("/", get(rw_handler)).layer(rw_layer());
    let sessions = Router::new()
        .route("/", get(session_handler))
        .route("/login", post(session_login))
        .layer(SessionManagerLayer::new(MemoryStore::default()));

    // An existing session holding `user_id`, as a logged-in user has.
    let session_cookie = rt.block_on(async {
        let login = request(Method::POST, "/login", None, Body::empty());
        let response = sessions.clone().oneshot(login).await.expect("infallible");
        let set_cookie = response.headers()[SET_COOKIE].to_str().expect("ascii");
        set_cookie.split(';').next().expect("name=value").to_owned()
    });

    // Check each router answers and each extractor finds its cookie.
    rt.block_on(async {
        for (router, cookie) in [
            (&plain, &jar_cookie),
            (&signed_jar, &jar_cookie),
            (&read_after_write, &token_cookie),
            (&sessions, &session_cookie),
        ] {
            let req = request(Method::GET, "/", Some(cookie), Body::empty());
            let response = router.clone().oneshot(req).await.expect("infallible");
            assert!(response.status().is_success(), "{}", response.status());
        }
        let headers = request(Method::GET, "/", Some(&jar_cookie), ())
            .into_parts()
            .0;
        let jar = SignedCookieJar::from_headers(&headers.headers, cookie_key.clone());
        assert_eq!(
            jar.get(JAR_COOKIE).map(|c| c.value().to_owned()).as_deref(),
            Some(JAR_VALUE)
        );
    });

    let mut group = c.benchmark_group("alternatives");
    configure(&mut group);
    let cases = [
        ("axum_plain_handler", &plain, &jar_cookie),
        ("axum_extra_signed_cookie_jar", &signed_jar, &jar_cookie),
        (
            "axum_read_after_write_valid_token_read/const_position_source",
            &read_after_write,
            &token_cookie,
        ),
        (
            "axum_tower_sessions_memory_store_get",
            &sessions,
            &session_cookie,
        ),
    ];
    for (name, router, cookie) in cases {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_batched(
                || request(Method::GET, "/", Some(cookie), Body::empty()),
                |req| router.clone().oneshot(req),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, layer, alternatives);
criterion_main!(benches);

//! The harness of the layer tests: a layer over the shared fake backend
//! ([`FakeBackend`], a stand-in for HTTP mechanics that reports positions a
//! test sets by hand; database behaviour is tested against real clusters in
//! `tests/pg_*.rs`), a handler that makes the accesses a path names, and a
//! request and its answer in a line each:
//!
//! ```text
//! let app = App::new(layer(&backend, &clock));
//! let answer = app.get("/read").user(7).token(&token).send().await;
//! assert_eq!(answer.seen().read_pool, "replica-pool");
//! ```
//!
//! The tests sit beside this file by topic:
//!
//! - `tests_reading`: which tokens a request reads, and where its reads go.
//! - `tests_hostile`: bad, junk and forged tokens never win.
//! - `tests_issuance`: the token and cookie a response issues.
//! - `tests_config`: configuration refused when set, and the self-check.
//! - `tests_telemetry`: metrics and the warning about a missing identity.
//! - `tests_routes`: the last route and the debug header.
//! - `tests_forwarding`: tokens handed on to outgoing calls and jobs.
//! - `tests_sessions`: monotonic reads and several clusters.
//! - `tests_unread`: tokens the layer cannot read.
//! - `tests_identity`: `Db::bind_user`.

use std::convert::Infallible;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue, COOKIE, SET_COOKIE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tower::util::BoxCloneService;
use tower::{service_fn, Layer, ServiceExt};

use super::*;
use crate::backend::RouteReason;
use crate::clock::ManualClock;
use crate::handle::{Db, Route, TokenOutcome};
use crate::position::{Lsn, WritePosition};
use crate::requirement::Requirement;
pub(crate) use crate::testing::FakeBackend;
use crate::token::{AffinityToken, KeySet, SigningKey, UserId};

/// The fake clock's time when a test starts, in Unix seconds.
pub(super) const NOW: u64 = 1_800_000_000;
/// The system identifier of [`fake`]'s positions.
pub(super) const SYSTEM: u64 = FakeBackend::SYSTEM_ID;

/// The shared fake backend, in an `Arc` as the layer takes it: pools
/// `primary-pool` and `replica-pool`, a replica that has replayed nothing.
pub(crate) fn fake() -> Arc<FakeBackend> {
    Arc::new(FakeBackend::new())
}

/// A key set of one key, all `byte`.
pub(crate) fn keys(byte: u8) -> KeySet {
    KeySet::new(key(byte))
}

/// A signing key, all `byte`.
pub(super) fn key(byte: u8) -> SigningKey {
    SigningKey::from_bytes(&[byte; 32]).unwrap()
}

/// The identity function of the tests: user `n` for `x-user-id: n`.
pub(super) fn identify(parts: &http::request::Parts) -> Option<UserId> {
    let id = parts
        .headers
        .get("x-user-id")?
        .to_str()
        .ok()?
        .parse::<u64>()
        .ok()?;
    Some(UserId::from(id))
}

/// The layer most tests want: over `backend` with `keys(1)`, [`identify`],
/// `clock` and the debug header.
pub(super) fn layer(
    backend: &Arc<FakeBackend>,
    clock: &ManualClock,
) -> ReadAfterWriteLayer<FakeBackend> {
    ReadAfterWriteLayer::from_arc(Arc::clone(backend), keys(1))
        .identity(identify)
        .clock(clock.clone())
        .debug_header(true)
}

/// A position at `lsn` of `system`, timeline 1.
pub(super) fn at(lsn: u64, system: u64) -> WritePosition {
    WritePosition::new(Lsn::new(lsn), 1, system)
}

/// A token for `user` at `position`, signed with `keys(1)`, valid until
/// `expires_at`.
pub(super) fn minted(user: u64, position: WritePosition, expires_at: u64) -> String {
    AffinityToken::new(UserId::from(user), position, expires_at).sign(DEFAULT_COOKIE_NAME, &keys(1))
}

/// `token` read back with `keys` at `now`, whoever's it is.
pub(super) fn decoded(token: &str, keys: &KeySet, now: u64) -> AffinityToken {
    AffinityToken::decode_for_tests(token, DEFAULT_COOKIE_NAME, keys, now).unwrap()
}

/// What the step handler saw and did.
#[derive(Clone, Debug)]
pub(super) struct Seen {
    /// The pool the last `read` step got (empty when none read).
    pub(super) read_pool: &'static str,
    pub(super) outcome: TokenOutcome,
    pub(super) required: Option<WritePosition>,
    /// The route reason of each access, in the path's order.
    pub(super) reasons: Vec<RouteReason>,
    /// `db.last_route()` before the first step, then after each access.
    pub(super) routes: Vec<Option<Route>>,
    /// `db.user()` at the end of the handler.
    pub(super) user: Option<UserId>,
    /// Each `requirement` step's answer.
    pub(super) requirements: Vec<Requirement>,
    /// Each `forward` step's token.
    pub(super) forwarded: Vec<Option<String>>,
}

/// The handler of [`App::new`]: each segment of the path is one step, in
/// order, and what it saw goes into the response's extensions ([`Seen`]).
///
/// - `read`, `eventual`, `primary`, `write`: that access, on the default
///   cluster or, after `orders`, the cluster named `orders`;
/// - `requirement`, `forward`: records `db.requirement()` or the token of
///   `db.forward_header()`;
/// - `bind-<n>`, `bind-anon`: binds user `n` (the anonymous user) through a
///   fresh clone of the handle;
/// - `primary-at-<hex>`: the fake's primary moves on to that LSN;
/// - `own-cookie`: appends the handler's own `Set-Cookie: theme=dark`;
/// - `fail`: answers 500.
pub(super) async fn steps(req: Request<()>) -> Result<Response<()>, Infallible> {
    let db = req
        .extensions()
        .get::<Db<FakeBackend>>()
        .expect("the layer inserts Db")
        .clone();
    let mut target = db.clone();
    let mut response = Response::new(());
    let mut read_pool = "";
    let (mut reasons, mut requirements, mut forwarded) = (Vec::new(), Vec::new(), Vec::new());
    let mut routes = vec![db.last_route()];
    for step in req.uri().path().split('/').filter(|s| !s.is_empty()) {
        match step {
            "orders" => target = db.cluster("orders").expect("a cluster named orders"),
            "read" => read_pool = *target.read().await,
            "eventual" => {
                let _ = target.eventual();
            }
            "primary" => {
                let _ = target.primary();
            }
            "write" => {
                let _ = target.write();
            }
            "requirement" => requirements.push(db.requirement().await),
            "forward" => {
                let header = db.forward_header().await;
                forwarded.push(header.map(|(_, v)| v.to_str().unwrap().to_owned()));
            }
            "bind-anon" => db.clone().bind_user(UserId::anonymous()),
            "own-cookie" => {
                response
                    .headers_mut()
                    .append(SET_COOKIE, HeaderValue::from_static("theme=dark; Path=/"));
            }
            "fail" => *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
            other if other.starts_with("primary-at-") => {
                let lsn = u64::from_str_radix(&other["primary-at-".len()..], 16).unwrap();
                db.backend().set_primary_at(lsn);
            }
            other => {
                let id = other
                    .strip_prefix("bind-")
                    .and_then(|id| id.parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("unknown step {other}"));
                db.clone().bind_user(UserId::from(id));
            }
        }
        // Read through `db`, though `target` made the access: a clone
        // shares the request's state.
        if matches!(step, "read" | "eventual" | "primary" | "write") {
            let route = db.last_route();
            reasons.push(route.as_ref().expect("a route").reason);
            routes.push(route);
        }
    }
    response.extensions_mut().insert(Seen {
        read_pool,
        outcome: db.token_outcome(),
        required: db.required_position(),
        reasons,
        routes,
        user: db.user(),
        requirements,
        forwarded,
    });
    Ok(response)
}

/// A layered service to send requests to.
#[derive(Clone)]
pub(super) struct App {
    service: BoxCloneService<Request<()>, Response<()>, Infallible>,
}

impl App {
    /// `layer` over the step handler.
    pub(super) fn new(layer: ReadAfterWriteLayer<FakeBackend>) -> Self {
        App::over(layer.layer(service_fn(steps)))
    }

    /// Any service, e.g. a layer over a handler of the test's own.
    pub(super) fn over<S>(service: S) -> Self
    where
        S: tower::Service<Request<()>, Response = Response<()>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        App {
            service: BoxCloneService::new(service),
        }
    }

    /// A GET of `path`.
    pub(super) fn get(&self, path: &str) -> Call<'_> {
        self.request(Method::GET, path)
    }

    /// A POST to `path`.
    pub(super) fn post(&self, path: &str) -> Call<'_> {
        self.request(Method::POST, path)
    }

    fn request(&self, method: Method, path: &str) -> Call<'_> {
        Call {
            app: self,
            request: Request::builder().method(method).uri(path),
        }
    }
}

/// A request being built; [`send`](Self::send) it.
pub(super) struct Call<'a> {
    app: &'a App,
    request: http::request::Builder,
}

impl Call<'_> {
    /// As user `id` (`x-user-id`, which [`identify`] reads).
    pub(super) fn user(self, id: u64) -> Self {
        self.header("x-user-id", id.to_string())
    }

    /// One `Cookie` header, as given.
    pub(super) fn cookie(self, text: impl AsRef<str>) -> Self {
        self.header(COOKIE, text.as_ref())
    }

    /// `token` as the affinity cookie, in a `Cookie` header of its own.
    pub(super) fn token(self, token: &str) -> Self {
        self.cookie(format!("{DEFAULT_COOKIE_NAME}={token}"))
    }

    /// `token` in the token header.
    pub(super) fn token_header(self, token: &str) -> Self {
        self.header(DEFAULT_TOKEN_HEADER, token)
    }

    /// Any header, from anything `http` takes, raw bytes included.
    pub(super) fn header<K, V>(mut self, name: K, value: V) -> Self
    where
        K: TryInto<HeaderName>,
        <K as TryInto<HeaderName>>::Error: Into<http::Error>,
        V: TryInto<HeaderValue>,
        <V as TryInto<HeaderValue>>::Error: Into<http::Error>,
    {
        self.request = self.request.header(name, value);
        self
    }

    /// Sends it through the app and waits for the answer.
    pub(super) async fn send(self) -> Answer {
        let request = self.request.body(()).unwrap();
        Answer(self.app.service.clone().oneshot(request).await.unwrap())
    }
}

/// A response, read back.
#[derive(Debug)]
pub(super) struct Answer(pub(super) Response<()>);

impl Answer {
    pub(super) fn status(&self) -> StatusCode {
        self.0.status()
    }

    pub(super) fn headers(&self) -> &HeaderMap {
        self.0.headers()
    }

    /// What the step handler saw.
    pub(super) fn seen(&self) -> &Seen {
        self.0
            .extensions()
            .get::<Seen>()
            .expect("the step handler ran")
    }

    /// The reason of the last access.
    pub(super) fn reason(&self) -> RouteReason {
        *self.seen().reasons.last().expect("an access")
    }

    /// The debug header.
    pub(super) fn debug(&self) -> &str {
        self.0.headers()[DEBUG_HEADER].to_str().unwrap()
    }

    /// The affinity `Set-Cookie` header, attributes and all.
    pub(super) fn issued_cookie(&self) -> Option<String> {
        self.0
            .headers()
            .get_all(SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .find(|v| v.starts_with("primary_affinity="))
    }

    /// The token the affinity cookie carries.
    pub(super) fn issued(&self) -> Option<String> {
        let cookie = self.issued_cookie()?;
        let pair = cookie.split(';').next()?;
        Some(pair.strip_prefix("primary_affinity=")?.to_owned())
    }

    /// The token the token header carries.
    pub(super) fn token_header(&self) -> Option<String> {
        let value = self.0.headers().get(DEFAULT_TOKEN_HEADER)?;
        Some(value.to_str().unwrap().to_owned())
    }
}

/// The metrics recorded on this thread while it lives.
pub(super) struct Metrics {
    snapshotter: Snapshotter,
    _guard: metrics::LocalRecorderGuard<'static>,
}

impl Metrics {
    /// Records this thread's metrics from now on. (The recorder is leaked:
    /// a few bytes a test.)
    pub(super) fn record() -> Self {
        let recorder: &'static DebuggingRecorder = Box::leak(Box::new(DebuggingRecorder::new()));
        Metrics {
            snapshotter: recorder.snapshotter(),
            _guard: metrics::set_default_local_recorder(recorder),
        }
    }

    /// The metric `name`, counted since the last snapshot.
    pub(super) fn value(&self, name: &str) -> Option<DebugValue> {
        self.snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .find(|(key, ..)| key.key().name() == name)
            .map(|(.., value)| value)
    }

    /// `read_after_write_tokens_total` by outcome.
    pub(super) fn token_counts(&self) -> Vec<(String, u64)> {
        self.snapshotter
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
}

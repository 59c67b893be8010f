//! Layer tests of monotonic reads and several clusters, over a small
//! in-test backend that names one replica (HTTP mechanics only; the
//! routing itself is tested on real clusters in `tests/pg_sessions.rs`).

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{COOKIE, SET_COOKIE};
use http::{Request, Response};
use tower::{service_fn, Layer, ServiceExt};

use super::*;
use crate::backend::{Backend, RouteReason, Routed};
use crate::bookmark::{Bookmark, ReplicaTag};
use crate::clock::Clock;
use crate::clock::ManualClock;
use crate::handle::Db;
use crate::position::{Lsn, WritePosition};
use crate::token::{AffinityToken, SigningKey};
use crate::token::{KeySet, UserId};

const NOW: u64 = 1_800_000_000;

/// One cluster with one replica, `replica-1`, that has everything.
pub(super) struct Tagged {
    id: u64,
    primary: &'static str,
    replica: &'static str,
    captures: AtomicUsize,
}

impl Tagged {
    pub(super) fn new(id: u64) -> Self {
        Tagged {
            id,
            primary: "primary",
            replica: "replica",
            captures: AtomicUsize::new(0),
        }
    }

    fn tag() -> ReplicaTag {
        ReplicaTag::of("replica-1", 1)
    }

    pub(super) fn at(&self, lsn: u64) -> WritePosition {
        WritePosition::new(Lsn::new(lsn), 1, self.id)
    }
}

impl Backend for Tagged {
    type Pool = &'static str;
    type Error = Infallible;

    fn primary(&self) -> &&'static str {
        &self.primary
    }

    fn eventual(&self) -> Routed<'_, &'static str> {
        Routed::replica(&self.replica, "replica-1", RouteReason::Eventual)
            .with_bookmark(Bookmark::new(self.at(0x10)).on_replica(Tagged::tag()))
    }

    async fn session(&self, required: WritePosition, _: Duration) -> Routed<'_, &'static str> {
        Routed::replica(&self.replica, "replica-1", RouteReason::CaughtUp)
            .with_bookmark(Bookmark::new(required).on_replica(Tagged::tag()))
    }

    async fn write_position(&self) -> Result<WritePosition, Infallible> {
        let n = self.captures.fetch_add(1, Ordering::SeqCst) as u64;
        Ok(self.at(0x1000 + n))
    }

    fn cluster_id(&self) -> Option<u64> {
        Some(self.id)
    }

    async fn monotonic(
        &self,
        bookmark: Option<Bookmark>,
        max_wait: Option<Duration>,
    ) -> Routed<'_, &'static str> {
        match bookmark {
            None => self.eventual(),
            Some(b) if b.replica == Some(Tagged::tag()) => {
                Routed::replica(&self.replica, "replica-1", RouteReason::Sticky).with_bookmark(b)
            }
            Some(b) if b.replica.is_some() => {
                Routed::primary(&self.primary, RouteReason::LeftReplica)
            }
            Some(b) => match max_wait {
                Some(wait) => self.session(b.position, wait).await,
                None => Routed::primary(&self.primary, RouteReason::Lagging),
            },
        }
    }
}

fn keys() -> KeySet {
    KeySet::new(SigningKey::from_bytes(&[3; 32]).unwrap())
}

/// A handler for paths like `/read`, `/eventual`, `/primary`,
/// `/write`, `/orders/write`: each segment is one access, in order.
async fn handler(req: Request<()>) -> Result<Response<()>, Infallible> {
    let db = req.extensions().get::<Db<Tagged>>().unwrap().clone();
    let mut target = db.clone();
    for step in req.uri().path().split('/').filter(|s| !s.is_empty()) {
        match step {
            "orders" => target = db.cluster("orders").unwrap(),
            "read" => {
                let _ = target.read().await;
            }
            "eventual" => {
                let _ = target.eventual();
            }
            "primary" => {
                let _ = target.primary();
            }
            "write" => {
                let _ = target.write();
            }
            other => panic!("unknown step {other}"),
        }
    }
    let mut response = Response::new(());
    response
        .extensions_mut()
        .insert(db.last_route().map(|r| r.reason));
    Ok(response)
}

fn service(
    layer: ReadAfterWriteLayer<Tagged>,
) -> impl tower::Service<Request<()>, Response = Response<()>, Error = Infallible> + Clone {
    layer.layer(service_fn(handler))
}

fn monotonic_layer(clock: &ManualClock) -> ReadAfterWriteLayer<Tagged> {
    ReadAfterWriteLayer::new(Tagged::new(7), keys())
        .clock(clock.clone())
        .monotonic_reads(true)
}

/// Sends `path` with `cookie`; the token it set, if any, and the reason
/// of the last access.
async fn send<S>(service: &S, path: &str, cookie: Option<&str>) -> (Option<String>, RouteReason)
where
    S: tower::Service<Request<()>, Response = Response<()>, Error = Infallible> + Clone,
{
    let mut request = Request::get(path);
    if let Some(token) = cookie {
        request = request.header(COOKIE, format!("primary_affinity={token}"));
    }
    let response = service
        .clone()
        .oneshot(request.body(()).unwrap())
        .await
        .unwrap();
    let token = response.headers().get_all(SET_COOKIE).iter().find_map(|v| {
        v.to_str()
            .ok()?
            .split(';')
            .next()?
            .strip_prefix("primary_affinity=")
            .map(str::to_owned)
    });
    let reason = response
        .extensions()
        .get::<Option<RouteReason>>()
        .copied()
        .flatten()
        .unwrap();
    (token, reason)
}

fn decode(token: &str, clock: &ManualClock) -> AffinityToken {
    AffinityToken::verify(token, "primary_affinity", &keys(), clock.now_unix()).unwrap()
}

#[tokio::test]
async fn a_first_read_ties_the_session_to_its_replica_and_later_reads_issue_nothing() {
    let clock = ManualClock::new(NOW);
    let app = service(monotonic_layer(&clock));
    let (token, reason) = send(&app, "/read", None).await;
    assert_eq!(reason, RouteReason::NoToken);
    let token = token.expect("a session that read gets a bookmark");
    let bookmark = decode(&token, &clock).bookmarks().as_slice()[0];
    assert_eq!(bookmark.replica, Some(Tagged::tag()));
    for path in ["/read", "/eventual", "/read/eventual"] {
        let (again, reason) = send(&app, path, Some(&token)).await;
        assert_eq!(reason, RouteReason::Sticky, "{path}");
        assert_eq!(again, None, "{path}: nothing changed, nothing issued");
    }
    // What a re-issue adds to a response: the cookie and the token header.
    let response = app
        .clone()
        .oneshot(Request::get("/read").body(()).unwrap())
        .await
        .unwrap();
    let added: usize = response
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len())
        .sum();
    let cookie = response.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    eprintln!("a re-issued token adds {added} header bytes: set-cookie: {cookie}");
    assert!(added < 300, "{added}");
    // Without monotonic reads, a read never issues a token.
    let plain = service(ReadAfterWriteLayer::new(Tagged::new(7), keys()).clock(clock.clone()));
    assert_eq!(send(&plain, "/read", None).await.0, None);
}

#[tokio::test]
async fn a_reading_session_keeps_its_token_alive() {
    let clock = ManualClock::new(NOW);
    let app = service(monotonic_layer(&clock));
    let token = send(&app, "/read", None).await.0.unwrap();
    clock.advance(Duration::from_secs(14));
    assert_eq!(send(&app, "/read", Some(&token)).await.0, None);
    // Less than half the 30 s TTL left: re-issued, the same bookmark.
    clock.advance(Duration::from_secs(2));
    let renewed = send(&app, "/read", Some(&token)).await.0.expect("renewed");
    let (old, new) = (decode(&token, &clock), decode(&renewed, &clock));
    assert_eq!(old.bookmarks(), new.bookmarks());
    assert!(new.expires_at() > old.expires_at());
}

#[tokio::test]
async fn a_write_keeps_the_replica_and_a_primary_read_is_captured() {
    let clock = ManualClock::new(NOW);
    let layer = monotonic_layer(&clock);
    let backend = Arc::clone(layer.backend());
    let app = service(layer);
    let token = send(&app, "/read", None).await.0.unwrap();
    // A write raises the position and keeps the replica: a write is not
    // a read.
    let wrote = send(&app, "/write", Some(&token)).await.0.unwrap();
    let bookmark = decode(&wrote, &clock).bookmarks().as_slice()[0];
    assert_eq!(bookmark.position, backend.at(0x1000));
    assert_eq!(bookmark.replica, Some(Tagged::tag()));
    // A read of the primary: the capture after it bounds what the session
    // saw, and the bookmark is tied to no replica.
    let (read_primary, reason) = send(&app, "/primary", Some(&wrote)).await;
    assert_eq!(reason, RouteReason::Critical);
    let bookmark = decode(&read_primary.unwrap(), &clock)
        .bookmarks()
        .as_slice()[0];
    assert_eq!(bookmark, Bookmark::new(backend.at(0x1001)));
    assert_eq!(backend.captures.load(Ordering::SeqCst), 2);
    // Later reads of a request that read the primary stay there.
    let (_, reason) = send(&app, "/primary/read", Some(&wrote)).await;
    assert_eq!(reason, RouteReason::ReadPrimaryThisRequest);
}

#[tokio::test]
async fn a_session_that_loses_its_replica_reads_the_primary_and_is_captured() {
    let clock = ManualClock::new(NOW);
    let layer = monotonic_layer(&clock);
    let backend = Arc::clone(layer.backend());
    let app = service(layer);
    // A token tied to a replica this backend does not have (restarted).
    let gone = Bookmark::new(backend.at(0x10)).on_replica(ReplicaTag::of("replica-1", 2));
    let token = AffinityToken::with_bookmarks(
        UserId::anonymous(),
        crate::bookmark::Bookmarks::one(gone),
        NOW + 30,
    )
    .unwrap()
    .sign("primary_affinity", &keys());
    for path in ["/read", "/eventual"] {
        let (issued, reason) = send(&app, path, Some(&token)).await;
        assert_eq!(reason, RouteReason::LeftReplica, "{path}");
        let bookmark = decode(&issued.unwrap(), &clock).bookmarks().as_slice()[0];
        assert_eq!(bookmark.replica, None, "{path}");
        assert!(bookmark.position.lsn >= Lsn::new(0x1000), "{path}");
    }
}

#[tokio::test]
async fn one_token_covers_two_clusters_and_each_bookmark_stays_with_its_own() {
    let clock = ManualClock::new(NOW);
    let layer = ReadAfterWriteLayer::new(Tagged::new(7), keys())
        .clock(clock.clone())
        .cluster("orders", Tagged::new(8))
        .unwrap();
    let app = service(layer);
    let token = send(&app, "/write/orders/write", None).await.0.unwrap();
    let token_read = decode(&token, &clock);
    assert_eq!(token_read.bookmarks().len(), 2);
    assert_eq!(token_read.bookmark(7).unwrap().position.system_id, 7);
    assert_eq!(token_read.bookmark(8).unwrap().position.system_id, 8);
    // Reads of each cluster honour that cluster's bookmark.
    let (_, reason) = send(&app, "/orders/read", Some(&token)).await;
    assert_eq!(reason, RouteReason::CaughtUp);
    // A token of cluster 8 only leaves cluster 7's reads eventual.
    let only_orders = send(&app, "/orders/write", None).await.0.unwrap();
    assert_eq!(decode(&only_orders, &clock).bookmarks().len(), 1);
    let (_, reason) = send(&app, "/read", Some(&only_orders)).await;
    assert_eq!(reason, RouteReason::NoToken);
    let (_, reason) = send(&app, "/orders/read", Some(&only_orders)).await;
    assert_eq!(reason, RouteReason::CaughtUp);
}

#[test]
fn clusters_must_be_told_apart() {
    let layer = || ReadAfterWriteLayer::new(Tagged::new(7), keys());
    assert!(
        layer().cluster("orders", Tagged::new(7)).is_err(),
        "same id"
    );
    assert!(
        layer().cluster("default", Tagged::new(8)).is_err(),
        "same name"
    );
    let full = layer()
        .cluster("b", Tagged::new(8))
        .and_then(|l| l.cluster("c", Tagged::new(9)))
        .and_then(|l| l.cluster("d", Tagged::new(10)))
        .unwrap();
    let error = full.cluster("e", Tagged::new(11)).err().unwrap();
    assert!(error.to_string().contains("at most 4 clusters"), "{error}");
}

#[cfg(feature = "tonic")]
#[tokio::test]
async fn the_tonic_interceptor_forwards_the_token_and_pins_an_uncaptured_write() {
    use tonic::service::Interceptor;

    /// Calls the interceptor from inside the handler, after the path's
    /// accesses, and answers with the metadata it set.
    async fn calling(req: Request<()>) -> Result<Response<()>, Infallible> {
        let db = req.extensions().get::<Db<Tagged>>().unwrap().clone();
        if req.uri().path() == "/write" {
            let _ = db.write();
        }
        let call = crate::forward::ForwardTokenInterceptor
            .call(tonic::Request::new(()))
            .unwrap();
        let token = call
            .metadata()
            .get("x-primary-affinity")
            .map(|v| v.to_str().unwrap().to_owned());
        let mut response = Response::new(());
        response.extensions_mut().insert(token);
        Ok(response)
    }
    let clock = ManualClock::new(NOW);
    let app = ReadAfterWriteLayer::new(Tagged::new(7), keys())
        .clock(clock.clone())
        .forward_tokens(true)
        .layer(service_fn(calling));
    let forwarded = |response: Response<()>| {
        response
            .extensions()
            .get::<Option<String>>()
            .cloned()
            .flatten()
    };
    // Nothing to forward without a token or a write.
    let response = app
        .clone()
        .oneshot(Request::get("/read").body(()).unwrap())
        .await
        .unwrap();
    assert_eq!(forwarded(response), None);
    // A write not yet captured: the downstream reads go to the primary.
    let response = app
        .clone()
        .oneshot(Request::get("/write").body(()).unwrap())
        .await
        .unwrap();
    let token = decode(&forwarded(response).expect("a token"), &clock);
    assert_eq!(token.bookmark(7), Some(&Bookmark::pinned(7)));
    // A token carried in: forwarded as it is.
    let carried = AffinityToken::new(
        UserId::anonymous(),
        WritePosition::new(Lsn::new(0x99), 1, 7),
        NOW + 30,
    )
    .sign("primary_affinity", &keys());
    let request = Request::get("/read")
        .header(COOKIE, format!("primary_affinity={carried}"))
        .body(())
        .unwrap();
    let token = decode(
        &forwarded(app.clone().oneshot(request).await.unwrap()).unwrap(),
        &clock,
    );
    assert_eq!(token.bookmark(7).unwrap().position.lsn, Lsn::new(0x99));
    // Outside any handler it adds nothing.
    let call = crate::forward::ForwardTokenInterceptor
        .call(tonic::Request::new(()))
        .unwrap();
    assert!(call.metadata().is_empty());
}

//! What a handler hands on: a requirement for a job payload, and the token
//! outgoing HTTP and gRPC calls carry (see `tests.rs` for the harness).

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use tower::{service_fn, Layer, ServiceExt};

use super::tests::*;
use super::*;
use crate::clock::ManualClock;
use crate::handle::Db;
use crate::position::Lsn;
use crate::requirement::Requirement;
use crate::token::{AffinityToken, UserId};

#[tokio::test]
async fn a_requirement_taken_after_the_writes_covers_them() {
    let backend = fake();
    backend.set_primary_at(0x500);
    let app = App::new(layer(&backend, &ManualClock::new(NOW)));
    // Nothing written yet: the token's requirement, no capture. Then asked
    // again with no write in between: the same capture.
    let answer = app
        .post("/requirement/write/requirement/requirement")
        .user(3)
        .send()
        .await;
    let covering = |lsn| Requirement::Position(at(lsn, SYSTEM));
    assert_eq!(
        answer.seen().requirements,
        vec![Requirement::Nothing, covering(0x500), covering(0x500)]
    );
    // One capture for the job payload (asked twice), one for the response's
    // token: a capture is never reused, since it cannot tell whether a write
    // handed out before it had committed.
    assert_eq!(backend.captures(), 3);
    let token = decoded(&answer.token_header().unwrap(), &keys(1), NOW);
    assert_eq!(token.position().lsn, Lsn::new(0x500));

    // A write after the requirement was taken: the response's token covers it.
    let answer = app
        .post("/requirement/write/requirement/requirement/primary-at-900/write")
        .user(3)
        .send()
        .await;
    let token = decoded(&answer.token_header().unwrap(), &keys(1), NOW);
    assert_eq!(token.position().lsn, Lsn::new(0x900));
}

#[tokio::test]
async fn outgoing_calls_carry_a_token_covering_the_writes_made_before_them() {
    use crate::forward::ForwardTokenLayer;

    async fn run(forward: bool) -> (Option<String>, usize) {
        let backend = fake();
        backend.set_primary_at(0x700);
        let sent = Arc::new(Mutex::new(None));
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
        let app = App::over(
            layer(&backend, &ManualClock::new(NOW))
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
                })),
        );
        app.post("/write").user(3).send().await;
        let token = sent.lock().unwrap().clone();
        (token, backend.captures())
    }

    let (token, captures) = run(true).await;
    let token = token.expect("the downstream call carries a token");
    let token = AffinityToken::verify(
        &token,
        DEFAULT_COOKIE_NAME,
        &keys(1),
        NOW,
        &UserId::from(3u64),
    )
    .expect("a token of user 3");
    assert_eq!(token.position().lsn, Lsn::new(0x700));
    // One capture for the call, one for the response's token.
    assert_eq!(captures, 2);

    // Off by default: nothing is sent, nothing captured early.
    let (token, captures) = run(false).await;
    assert_eq!(token, None);
    assert_eq!(captures, 1);
}

#[cfg(feature = "tonic")]
#[tokio::test]
async fn the_tonic_interceptor_forwards_the_token_and_pins_an_uncaptured_write() {
    use crate::bookmark::Bookmark;
    use tonic::service::Interceptor;

    /// Calls the interceptor from inside the handler, after the path's
    /// accesses, and answers with the metadata it set.
    async fn calling(req: Request<()>) -> Result<Response<()>, Infallible> {
        let db = req.extensions().get::<Db<FakeBackend>>().unwrap().clone();
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
    let app = App::over(
        ReadAfterWriteLayer::new(FakeBackend::cluster(7), keys(1))
            .clock(ManualClock::new(NOW))
            .forward_tokens(true)
            .layer(service_fn(calling)),
    );
    let forwarded = |answer: Answer| {
        answer
            .0
            .extensions()
            .get::<Option<String>>()
            .cloned()
            .flatten()
    };
    // Nothing to forward without a token or a write.
    assert_eq!(forwarded(app.get("/read").send().await), None);
    // A write not yet captured: the downstream reads go to the primary.
    let token = forwarded(app.get("/write").send().await).expect("a token");
    let token = decoded(&token, &keys(1), NOW);
    assert_eq!(token.bookmark(7), Some(&Bookmark::pinned(7)));
    // A token carried in: forwarded as it is.
    let carried = AffinityToken::new(UserId::anonymous(), at(0x99, 7), NOW + 30)
        .sign("primary_affinity", &keys(1));
    let token = forwarded(app.get("/read").token(&carried).send().await).unwrap();
    let token = decoded(&token, &keys(1), NOW);
    assert_eq!(token.bookmark(7).unwrap().position.lsn, Lsn::new(0x99));
    // Outside any handler it adds nothing.
    let call = crate::forward::ForwardTokenInterceptor
        .call(tonic::Request::new(()))
        .unwrap();
    assert!(call.metadata().is_empty());
}

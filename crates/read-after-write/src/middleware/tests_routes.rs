//! What the layer tells about where reads went: the last route, kept
//! without the debug header, and the debug header (see `tests.rs` for the
//! harness).

use std::sync::Arc;

use super::tests::*;
use super::*;
use crate::backend::{RouteReason, Target};
use crate::clock::ManualClock;
use crate::handle::Route;

#[tokio::test]
async fn the_last_route_is_kept_without_the_debug_header() {
    let backend = fake();
    let app = App::new(
        ReadAfterWriteLayer::from_arc(Arc::clone(&backend), keys(1))
            .identity(identify)
            .clock(ManualClock::new(NOW)),
    );
    // Each access goes through a clone of the handle, and the route is
    // read from the original: a clone shares the request's state.
    let answer = app.get("/read/primary").user(1).send().await;
    assert!(answer.headers().get(DEBUG_HEADER).is_none());
    let routes = &answer.seen().routes;
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

#[tokio::test]
async fn long_node_names_survive_the_last_route_and_the_debug_header() {
    const NAME: &str = "replica-eu-west-1a-production-analytics-02-ünïcode";
    // Names longer than the inline buffer are kept whole.
    let app = App::new(
        ReadAfterWriteLayer::new(FakeBackend::new().replica_named(NAME), keys(1))
            .debug_header(true),
    );
    let answer = app.get("/eventual/primary/eventual").send().await;
    let last = answer.seen().routes.last().cloned().flatten().unwrap();
    assert_eq!(last.node, NAME);
    let header = answer.headers()[DEBUG_HEADER].as_bytes();
    assert_eq!(
        header,
        format!("node={NAME}; reason=eventual; token=absent").as_bytes()
    );
}

//! The diesel-async example on a real primary with a streaming replica
//! 200 ms behind: a user's own posts, read with diesel's DSL on a
//! connection from `db.read()`'s pool, show each post right after it is
//! written; the same query sent naively to the replica's pool misses it.
//! Bad input gets a 4xx, never a 5xx.

#[allow(dead_code)]
#[path = "../examples/diesel_async/app.rs"]
mod app;

use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::http::header::{COOKIE, SET_COOKIE};
use axum::http::{Request, StatusCode};
use axum::Router;
use diesel::prelude::*;
use diesel_async::pooled_connection::deadpool::Pool;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use read_after_write::pg::PgReplicaSet;
use read_after_write::{KeySet, SigningKey};
use read_after_write_testkit::TestCluster;
use tower::ServiceExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_posts_read_through_diesel_async_are_never_stale_and_naive_ones_are() {
    let cluster = TestCluster::builder()
        .replica(Duration::from_millis(200))
        .start()
        .await
        .expect("start a primary with a lagging replica");
    let replicas = read_after_write::diesel_async::connect(
        PgReplicaSet::builder()
            .primary_url(cluster.primary_url())
            .replica_urls(cluster.replica_urls()),
    )
    .await
    .unwrap();
    app::create_table(replicas.primary_pool()).await.unwrap();
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();
    // The naive way: the replica's own pool, past every check.
    let naive = replicas
        .replica_pool("replica-1")
        .expect("replica-1")
        .clone();
    let keys = KeySet::new(SigningKey::from_bytes(&[6; 32]).unwrap());
    let router = app::router(app::layer(replicas.clone(), keys));

    const POSTS: usize = 30;
    let user = 37;
    let mut cookie: Option<String> = None;
    let (mut stale_naive, mut seen) = (0, 0);
    for i in 0..POSTS {
        let mut request = Request::post("/posts").header("x-user-id", user.to_string());
        if let Some(cookie) = &cookie {
            request = request.header(COOKIE, cookie);
        }
        let response = router
            .clone()
            .oneshot(request.body(Body::from(format!("post {i}"))).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let set_cookie = response.headers()[SET_COOKIE].to_str().unwrap();
        cookie = Some(set_cookie.split(';').next().unwrap().to_owned());
        let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
        let created: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let id = created["id"].as_i64().expect("the created post");

        // The naive read: the same diesel query, on the replica, at once.
        let mut conn = naive.get().await.unwrap();
        let naive_ids: Vec<i64> = app::posts::table
            .filter(app::posts::user_id.eq(user))
            .select(app::posts::id)
            .load(&mut conn)
            .await
            .unwrap();
        drop(conn);
        stale_naive += usize::from(!naive_ids.contains(&id));

        let request = Request::get("/posts")
            .header("x-user-id", user.to_string())
            .header(COOKIE, cookie.as_deref().unwrap());
        let response = router
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
        let posts: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
        assert!(
            posts.iter().any(|post| post["id"].as_i64() == Some(id)),
            "post {i} missing from the user's own read"
        );
        seen += 1;
    }
    eprintln!(
        "{seen} of {POSTS} posts read back through diesel-async (0 stale); \
         the naive read missed {stale_naive}"
    );
    assert!(
        stale_naive > 0,
        "the naive read never went stale, so this test proves nothing"
    );

    bad_input_is_a_client_error(&router, replicas.primary_pool()).await;
    replicas.set().shutdown().await;
}

/// Each malformed request gets its 4xx, and no post is written for it.
async fn bad_input_is_a_client_error(router: &Router, primary: &Pool<AsyncPgConnection>) {
    let user = "38";
    let cases: [(&str, Option<&str>, Body, StatusCode); 7] = [
        ("GET", None, Body::empty(), StatusCode::UNAUTHORIZED),
        ("GET", Some("abc"), Body::empty(), StatusCode::BAD_REQUEST),
        ("GET", Some("1.5"), Body::empty(), StatusCode::BAD_REQUEST),
        (
            "POST",
            Some("99999999999999999999"),
            Body::from("x"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "POST",
            Some(user),
            Body::from("  "),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            Some(user),
            Body::from("nul \0 byte"),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            Some(user),
            Body::from(vec![0xff, 0xfe]),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (method, user_header, body, expected) in cases {
        let mut request = Request::builder().method(method).uri("/posts");
        if let Some(value) = user_header {
            request = request.header("x-user-id", value);
        }
        let response = router
            .clone()
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            expected,
            "{method} /posts with x-user-id {user_header:?}"
        );
    }
    let oversized = "x".repeat(app::MAX_POST_BYTES + 1);
    let response = router
        .clone()
        .oneshot(
            Request::post("/posts")
                .header("x-user-id", user)
                .body(Body::from(oversized))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);

    // None of them reached the table: counted on the primary itself.
    let mut conn = primary.get().await.unwrap();
    let written: i64 = app::posts::table
        .filter(app::posts::user_id.eq(38))
        .count()
        .get_result(&mut conn)
        .await
        .unwrap();
    assert_eq!(written, 0, "a rejected post was written");
}

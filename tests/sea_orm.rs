//! The SeaORM example on a real primary with a streaming replica 200 ms
//! behind: a user's own posts, read through SeaORM entities on
//! `db.read()`, show each post right after it is written; the same query
//! sent naively to the replica misses it.

#[allow(dead_code)]
#[path = "../examples/sea_orm/app.rs"]
mod app;

use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::http::header::{COOKIE, SET_COOKIE};
use axum::http::{Request, StatusCode};
use read_after_write::pg::PgReplicaSet;
use read_after_write::{KeySet, SigningKey};
use read_after_write_testkit::TestCluster;
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};
use tower::ServiceExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_posts_read_through_sea_orm_entities_are_never_stale_and_naive_ones_are() {
    let cluster = TestCluster::builder()
        .replica(Duration::from_millis(200))
        .start()
        .await
        .expect("start a primary with a lagging replica");
    let replicas = PgReplicaSet::builder()
        .primary_url(cluster.primary_url())
        .replica_urls(cluster.replica_urls())
        .connect()
        .await
        .unwrap();
    app::create_table(&DatabaseConnection::from(replicas.primary_pool().clone()))
        .await
        .unwrap();
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();
    let naive = DatabaseConnection::from(replicas.replica_pool("replica-1").unwrap().clone());
    let keys = KeySet::new(SigningKey::from_bytes(&[5; 32]).unwrap());
    let router = app::router(app::layer(replicas.clone(), keys));

    const POSTS: usize = 30;
    let user = 31;
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

        // The naive read: the same entity query, on the replica.
        let naive_posts = app::post::Entity::find()
            .filter(app::post::Column::UserId.eq(user))
            .all(&naive)
            .await
            .unwrap();
        stale_naive += usize::from(!naive_posts.iter().any(|post| post.id == id));

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
        "{seen} of {POSTS} posts read back through SeaORM; the naive read missed {stale_naive}"
    );
    assert!(
        stale_naive > 0,
        "the naive read never went stale, so this test proves nothing"
    );
    replicas.shutdown().await;
}

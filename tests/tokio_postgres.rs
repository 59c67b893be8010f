//! The social API over tokio-postgres (`examples/tokio_postgres`) on a real
//! primary with a streaming replica 200 ms behind: a user's own posts show
//! each post right after it is written, while the same query sent naively
//! on the replica's pool misses it; a sign-up's profile and a login's
//! dashboard show their rows on the next page. Responses are read with the
//! sqlx social app's types, so the two apps answer the same JSON.

use std::time::Duration;

use axum::body::Body;
use axum::http::header::CONTENT_TYPE;
use axum::http::{Request, StatusCode};
use axum::Router;
use read_after_write::pg::PgReplicaSet;
use read_after_write::tokio_postgres::TokioPgReplicaSet;
use read_after_write::{KeySet, SigningKey};
use read_after_write_lab::social::{Created, Dashboard, LoggedIn, Post, Profile};
use read_after_write_lab::tokio_social::{self as app, AppConfig};
use read_after_write_testkit::TestCluster;
use tokio::sync::OnceCell;
use tower::ServiceExt;

#[path = "common/visitor.rs"]
mod visitor;

use visitor::Visitor;

static CLUSTER: OnceCell<TestCluster> = OnceCell::const_new();

/// One cluster for the binary: a primary and a replica 200 ms behind, with
/// the social schema.
async fn cluster() -> &'static TestCluster {
    CLUSTER
        .get_or_init(|| async {
            TestCluster::builder()
                .replica(Duration::from_millis(200))
                .start()
                .await
                .expect("start a primary with a lagging replica")
        })
        .await
}

/// The app's pools on `cluster`, its schema migrated and on the replica.
async fn connect(cluster: &TestCluster) -> TokioPgReplicaSet {
    let pools = read_after_write::tokio_postgres::connect(
        PgReplicaSet::builder()
            .primary_url(cluster.primary_url())
            .replica_urls(cluster.replica_urls()),
    )
    .await
    .expect("connect the pools");
    app::migrate(pools.set()).await.expect("migrate");
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();
    pools
}

fn router(pools: &TokioPgReplicaSet) -> Router {
    let config = AppConfig {
        keys: KeySet::new(SigningKey::from_bytes(&[9; 32]).unwrap()),
        cookie_secure: false,
        max_wait: Some(Duration::from_millis(20)),
        debug_header: true,
        request_timeout: Some(Duration::from_secs(5)),
    };
    app::router(pools.clone(), pools.set().clone(), &config)
}

/// Whether post `id` by `user` is on the replica's pool now: the naive read.
async fn naive_finds(pools: &TokioPgReplicaSet, user: i64, id: i64) -> bool {
    let client = pools
        .replica_pool("replica-1")
        .expect("replica-1")
        .get()
        .await
        .expect("a replica connection");
    let rows = client
        .query(
            "select id from posts where user_id = $1 order by id desc limit 100",
            &[&user],
        )
        .await
        .expect("the naive read");
    rows.iter().any(|row| row.get::<_, i64>(0) == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_posts_are_never_stale_and_the_naive_read_is() {
    let cluster = cluster().await;
    let pools = connect(cluster).await;
    let router = router(&pools);
    let user = 4_101;
    let mut visitor = Visitor::new(&router, Some(user));
    const POSTS: usize = 30;
    let (mut stale, mut stale_naive, mut on_replica) = (0, 0, 0);
    for i in 0..POSTS {
        let content = format!("post {i}");
        let answer = visitor
            .send(
                "POST",
                "/api/posts",
                Some(serde_json::json!({ "content": content })),
            )
            .await;
        assert_eq!(answer.status, StatusCode::CREATED);
        let id = answer.json::<Created>().id;
        stale_naive += usize::from(!naive_finds(&pools, user, id).await);

        let answer = visitor.send("GET", "/api/posts", None).await;
        assert_eq!(answer.status, StatusCode::OK);
        on_replica += usize::from(answer.route.contains("node=replica"));
        let posts: Vec<Post> = answer.json();
        match posts.first() {
            Some(newest) if newest.id == id => {
                assert_eq!(
                    (newest.user_id, newest.content.as_str()),
                    (user, content.as_str())
                );
                assert!(newest.created_at.ends_with('Z'), "{}", newest.created_at);
            }
            _ => stale += 1,
        }
    }
    eprintln!(
        "{POSTS} posts read back through tokio-postgres: {stale} stale ({on_replica} reads on the replica); \
         the naive read missed {stale_naive}"
    );
    assert_eq!(stale, 0);
    assert!(
        stale_naive > 0,
        "the naive read never went stale, so this test proves nothing"
    );

    // Once the replica has the posts, the user's reads go there, through
    // its tokio-postgres pool.
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();
    let answer = visitor.get_until_served_by("/api/posts", "replica-1").await;
    assert!(answer.route.contains("node=replica-1"), "{}", answer.route);
    assert_eq!(answer.json::<Vec<Post>>().len(), POSTS);

    // The single post is a critical read, the feed eventual.
    let answer = visitor
        .send(
            "POST",
            "/api/posts",
            Some(serde_json::json!({ "content": "critical" })),
        )
        .await;
    let id = answer.json::<Created>().id;
    let answer = visitor.send("GET", &format!("/api/posts/{id}"), None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json::<Post>().content, "critical");
    assert!(
        answer.route.contains("node=primary; reason=critical"),
        "{}",
        answer.route
    );
    let answer = visitor.send("GET", "/api/feed", None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.route.contains("reason=eventual"), "{}", answer.route);
    let _: Vec<Post> = answer.json();
    pools.set().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_up_and_a_login_are_seen_on_the_next_page() {
    let cluster = cluster().await;
    let pools = connect(cluster).await;
    let router = router(&pools);
    for i in 0..10 {
        // A new visitor: no identity until the handler creates it.
        let mut visitor = Visitor::new(&router, None);
        let name = format!("Grace {i}");
        let answer = visitor
            .send(
                "POST",
                "/api/signup",
                Some(serde_json::json!({ "name": name })),
            )
            .await;
        assert_eq!(answer.status, StatusCode::CREATED);
        let id = answer.json::<Created>().id;
        assert_eq!(visitor.cookies.get("demo_user"), Some(&id.to_string()));
        let answer = visitor
            .send("GET", &format!("/api/profile/{id}"), None)
            .await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "sign-up {i}: {}",
            answer.route
        );
        assert!(answer.route.ends_with("token=valid"), "{}", answer.route);
        let profile: Profile = answer.json();
        assert_eq!(
            (profile.user_id, profile.name, profile.bio),
            (id, name, String::new())
        );

        // The same account logs in from another browser; its dashboard.
        let mut other = Visitor::new(&router, None);
        let answer = other
            .send(
                "POST",
                "/api/login",
                Some(serde_json::json!({ "user_id": id })),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        let login = answer.json::<LoggedIn>().login_id;
        let answer = other.send("GET", "/api/dashboard", None).await;
        assert_eq!(answer.status, StatusCode::OK);
        let dashboard: Dashboard = answer.json();
        assert_eq!(dashboard.user_id, id);
        assert_eq!(dashboard.last_login.map(|l| l.id), Some(login), "login {i}");
        assert_eq!(dashboard.posts, 0);
    }

    // A profile edit is seen at once.
    let mut visitor = Visitor::new(&router, Some(4_202));
    for i in 0..5 {
        let name = format!("Ada {i}");
        let answer = visitor
            .send(
                "PUT",
                "/api/profile",
                Some(serde_json::json!({ "name": name, "bio": "hi" })),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        let answer = visitor.send("GET", "/api/profile/4202", None).await;
        assert_eq!(answer.json::<Profile>().name, name);
    }
    pools.set().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_never_a_5xx() {
    let cluster = cluster().await;
    let pools = connect(cluster).await;
    let router = router(&pools);
    let mut anonymous = Visitor::new(&router, None);
    let mut user = Visitor::new(&router, Some(4_303));
    let long = "x".repeat(2_001);
    let json = |value: serde_json::Value| Some(value);
    // (anonymous, method, path, body, status)
    let cases = [
        (true, "GET", "/api/posts", None, 401),
        (true, "GET", "/api/dashboard", None, 401),
        (
            true,
            "POST",
            "/api/posts",
            json(serde_json::json!({ "content": "hi" })),
            401,
        ),
        (
            false,
            "POST",
            "/api/posts",
            json(serde_json::json!({ "content": "  " })),
            422,
        ),
        (
            false,
            "POST",
            "/api/posts",
            json(serde_json::json!({ "content": long })),
            422,
        ),
        (
            false,
            "POST",
            "/api/posts",
            json(serde_json::json!({ "content": "a\u{0}b" })),
            422,
        ),
        (
            false,
            "POST",
            "/api/posts",
            json(serde_json::json!({ "text": "hi" })),
            422,
        ),
        (
            false,
            "PUT",
            "/api/profile",
            json(serde_json::json!({ "name": "" })),
            422,
        ),
        (
            false,
            "PUT",
            "/api/profile",
            json(serde_json::json!({ "name": "n\u{0}" })),
            422,
        ),
        (
            false,
            "PUT",
            "/api/profile",
            json(serde_json::json!({ "name": "n", "bio": long })),
            422,
        ),
        (
            false,
            "POST",
            "/api/signup",
            json(serde_json::json!({ "name": long })),
            422,
        ),
        (
            false,
            "POST",
            "/api/login",
            json(serde_json::json!({ "user_id": "x" })),
            422,
        ),
        (false, "GET", "/api/posts/not-a-number", None, 400),
        (false, "GET", "/api/posts/99999999999999999999", None, 400),
        (false, "GET", "/api/posts/-1", None, 404),
        (false, "GET", "/api/profile/-1", None, 404),
    ];
    for (is_anonymous, method, path, body, expected) in cases {
        let visitor = if is_anonymous {
            &mut anonymous
        } else {
            &mut user
        };
        let answer = visitor.send(method, path, body.clone()).await;
        assert_eq!(answer.status.as_u16(), expected, "{method} {path} {body:?}");
    }
    // Garbage identity is an anonymous request.
    let answer = router
        .clone()
        .oneshot(
            Request::get("/api/posts")
                .header("x-user-id", "not a number")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
    // Not JSON at all.
    let answer = router
        .clone()
        .oneshot(
            Request::post("/api/posts")
                .header("x-user-id", "4303")
                .header(CONTENT_TYPE, "application/json")
                .body(Body::from("{"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(answer.status().is_client_error(), "{}", answer.status());
    pools.set().shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_a_demoted_primary_is_a_503_not_a_500() {
    let cluster = cluster().await;
    connect(cluster).await;
    let url = visitor::demoted_primary_url(cluster).await;
    let pools = read_after_write::tokio_postgres::connect(
        PgReplicaSet::builder()
            .primary_url(url)
            .replica_urls(cluster.replica_urls()),
    )
    .await
    .expect("connect the pools");
    visitor::a_write_on_a_demoted_primary_is_a_503(&router(&pools), 4_301).await;
}

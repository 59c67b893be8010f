//! The social API over SeaORM 2 (`examples/sea_orm`) on a real primary
//! with a streaming replica 200 ms behind: each post a user writes is in
//! their own posts at once, while the same SeaORM query sent naively on
//! the replica's connection misses some; a sign-up's profile and a login's
//! dashboard show their rows on the next page; bad input gets a 4xx and
//! writes nothing. Responses are decoded with the sqlx social app's types,
//! and compared with its answers on the same database, so the apps answer
//! the same JSON.

use std::time::Duration;

use axum::http::StatusCode;
use axum::Router;
use read_after_write::pg::PgReplicaSet;
use read_after_write::{KeySet, SigningKey};
use read_after_write_lab::sea_social::entities::{account, login, post, profile};
use read_after_write_lab::sea_social::{self as app, AppConfig};
use read_after_write_lab::social::{self, Created, Dashboard, LoggedIn, Post, Profile};
use read_after_write_testkit::TestCluster;
use sea_orm::{
    ColumnTrait, DatabaseConnection, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use serde_json::{json, Value};
use tokio::sync::OnceCell;

#[path = "common/visitor.rs"]
mod visitor;

use visitor::{is_rfc3339_utc_micros, Visitor};

static CLUSTER: OnceCell<TestCluster> = OnceCell::const_new();

/// The binary's cluster: a primary and a replica 200 ms behind.
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

/// The replica set on `cluster`, the social schema migrated and on the
/// replica.
async fn connect(cluster: &TestCluster) -> PgReplicaSet {
    let replicas = PgReplicaSet::builder()
        .primary_url(cluster.primary_url())
        .replica_urls(cluster.replica_urls())
        .connect()
        .await
        .expect("connect the replica set");
    app::migrate(&replicas).await.expect("migrate");
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .expect("the schema on the replica");
    replicas
}

fn keys() -> KeySet {
    KeySet::new(SigningKey::from_bytes(&[13; 32]).unwrap())
}

/// The SeaORM app, serving the debug header.
fn router(replicas: &PgReplicaSet) -> Router {
    let config = AppConfig {
        keys: keys(),
        cookie_secure: false,
        max_wait: Some(Duration::from_millis(20)),
        debug_header: true,
        request_timeout: Some(Duration::from_secs(5)),
    };
    app::router(replicas.clone(), replicas.clone(), &config)
}

/// The sqlx social app on the same cluster, through the same engine.
fn social_router(replicas: &PgReplicaSet) -> Router {
    let config = social::AppConfig {
        keys: keys(),
        cookie_secure: false,
        max_wait: Some(Duration::from_millis(20)),
        debug_header: true,
        request_timeout: Some(Duration::from_secs(5)),
    };
    social::router(replicas.clone(), replicas.clone(), &config)
}

/// `GET /api/posts`'s query, the app's own partial model, sent naively on
/// a SeaORM connection over the replica's pool: does it find post `id`?
async fn naive_finds(replicas: &PgReplicaSet, user: i64, id: i64) -> bool {
    let replica = replicas.replica_pool("replica-1").expect("replica-1");
    let naive = DatabaseConnection::from(replica.clone());
    let found: Vec<app::Post> = post::Entity::find()
        .filter(post::Column::UserId.eq(user))
        .order_by_desc(post::Column::Id)
        .limit(100)
        .into_partial_model()
        .all(&naive)
        .await
        .expect("the naive read");
    found.iter().any(|post| post.id == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_posts_are_never_stale_and_the_naive_read_is() {
    let cluster = cluster().await;
    let replicas = connect(cluster).await;
    let router = router(&replicas);
    let user = 6_101;
    let mut visitor = Visitor::new(&router, Some(user));
    const POSTS: usize = 30;
    let (mut stale, mut stale_naive, mut on_replica) = (0, 0, 0);
    for i in 0..POSTS {
        let content = format!("sea-orm post {i}");
        let answer = visitor
            .send("POST", "/api/posts", Some(json!({ "content": content })))
            .await;
        assert_eq!(answer.status, StatusCode::CREATED);
        assert!(answer.route.contains("node=primary"), "{}", answer.route);
        let id = answer.json::<Created>().id;
        stale_naive += usize::from(!naive_finds(&replicas, user, id).await);

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
                assert!(
                    is_rfc3339_utc_micros(&newest.created_at),
                    "{}",
                    newest.created_at
                );
            }
            _ => stale += 1,
        }
    }
    eprintln!(
        "{POSTS} posts read back through SeaORM: {stale} stale \
         ({on_replica} reads on the replica); the naive read missed {stale_naive}"
    );
    assert_eq!(stale, 0, "a user's own post was missing from their read");
    assert!(
        stale_naive > 0,
        "the naive read never went stale, so this test proves nothing"
    );

    // Once the replica has them, the user's reads go there.
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();
    let answer = visitor.get_until_served_by("/api/posts", "replica-1").await;
    assert!(answer.route.contains("node=replica-1"), "{}", answer.route);
    let mine: Vec<Post> = answer.json();
    assert_eq!(mine.len(), POSTS);

    // The sqlx social app, on the same database, answers the same JSON.
    let mut social_visitor = Visitor::new(&social_router(&replicas), Some(user));
    let theirs = social_visitor.send("GET", "/api/posts", None).await;
    assert_eq!(theirs.json::<Vec<Post>>(), mine);

    // A single post is a critical read, the feed eventual.
    let answer = visitor
        .send("POST", "/api/posts", Some(json!({ "content": "critical" })))
        .await;
    let id = answer.json::<Created>().id;
    let path = format!("/api/posts/{id}");
    let answer = visitor.send("GET", &path, None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer.route.contains("node=primary; reason=critical"),
        "{}",
        answer.route
    );
    let post: Post = answer.json();
    assert_eq!((post.id, post.content.as_str()), (id, "critical"));
    let theirs = social_visitor.send("GET", &path, None).await;
    assert_eq!(answer.json::<Value>(), theirs.json::<Value>());
    let answer = visitor.send("GET", "/api/feed", None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.route.contains("reason=eventual"), "{}", answer.route);
    let _: Vec<Post> = answer.json();

    let answer = visitor.send("GET", "/healthz", None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json::<Value>()["replicas"][0]["name"], "replica-1");
    replicas.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_up_and_a_login_are_seen_on_the_next_page() {
    let cluster = cluster().await;
    let replicas = connect(cluster).await;
    let router = router(&replicas);
    for i in 0..10 {
        // A new visitor: no identity until sign-up makes one.
        let mut visitor = Visitor::new(&router, None);
        let name = format!("Grace {i}");
        let answer = visitor
            .send("POST", "/api/signup", Some(json!({ "name": name })))
            .await;
        assert_eq!(answer.status, StatusCode::CREATED);
        let id = answer.json::<Created>().id;
        assert!(id >= 1_000_000, "account ids start at 1,000,000: {id}");
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

        // The account logs in from another browser; its dashboard.
        let mut other = Visitor::new(&router, None);
        let answer = other
            .send("POST", "/api/login", Some(json!({ "user_id": id })))
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        let login = answer.json::<LoggedIn>().login_id;
        let answer = other.send("GET", "/api/dashboard", None).await;
        assert_eq!(answer.status, StatusCode::OK, "login {i}: {}", answer.route);
        let dashboard: Dashboard = answer.json();
        assert_eq!(dashboard.user_id, id);
        let last_login = dashboard.last_login.expect("the login just made");
        assert_eq!(last_login.id, login, "login {i}");
        assert!(is_rfc3339_utc_micros(&last_login.at), "{}", last_login.at);
        assert_eq!(dashboard.posts, 0);
    }

    // A profile edit is seen at once, by its author and on the next page.
    let mut visitor = Visitor::new(&router, Some(6_202));
    for i in 0..5 {
        let name = format!("Ada {i}");
        let answer = visitor
            .send(
                "PUT",
                "/api/profile",
                Some(json!({ "name": name, "bio": "hi" })),
            )
            .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.json::<Profile>().name, name);
        let answer = visitor.send("GET", "/api/profile/6202", None).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.json::<Profile>().name, name, "edit {i}");
    }

    // The dashboard counts the user's posts, as the sqlx app does.
    for i in 0..3 {
        let content = format!("counted {i}");
        let answer = visitor
            .send("POST", "/api/posts", Some(json!({ "content": content })))
            .await;
        assert_eq!(answer.status, StatusCode::CREATED);
    }
    let answer = visitor.send("GET", "/api/dashboard", None).await;
    let dashboard: Dashboard = answer.json();
    assert_eq!((dashboard.user_id, dashboard.posts), (6_202, 3));
    assert_eq!(dashboard.last_login, None);
    replicas.shutdown().await;
}

/// Rows `user` has on the primary: posts, profile, logins.
async fn rows_of(replicas: &PgReplicaSet, user: i64) -> (u64, u64, u64) {
    let primary = DatabaseConnection::from(replicas.primary_pool().clone());
    let posts = post::Entity::find()
        .filter(post::Column::UserId.eq(user))
        .count(&primary)
        .await
        .unwrap();
    let profiles = profile::Entity::find_by_id(user)
        .count(&primary)
        .await
        .unwrap();
    let logins = login::Entity::find()
        .filter(login::Column::UserId.eq(user))
        .count(&primary)
        .await
        .unwrap();
    (posts, profiles, logins)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_never_a_5xx_and_writes_nothing() {
    let cluster = cluster().await;
    let replicas = connect(cluster).await;
    let router = router(&replicas);
    let user = 6_303;
    let before = rows_of(&replicas, user).await;
    visitor::every_refusal_is_a_4xx(&router, user, app::MAX_POST_CHARS).await;
    // The over-long name a refused sign-up sent.
    let long_name = "n".repeat(101);

    // None of it reached the tables: counted on the primary itself.
    assert_eq!(
        rows_of(&replicas, user).await,
        before,
        "a refused request wrote"
    );
    let primary = DatabaseConnection::from(replicas.primary_pool().clone());
    let refused_accounts = account::Entity::find()
        .filter(account::Column::Name.eq(long_name.as_str()))
        .count(&primary)
        .await
        .unwrap();
    assert_eq!(refused_accounts, 0, "a refused sign-up wrote");
    replicas.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_a_demoted_primary_is_a_503_not_a_500() {
    let cluster = cluster().await;
    connect(cluster).await;
    let url = visitor::demoted_primary_url(cluster).await;
    let replicas = PgReplicaSet::builder()
        .primary_url(url)
        .replica_urls(cluster.replica_urls())
        .connect()
        .await
        .expect("connect the replica set");
    visitor::a_write_on_a_demoted_primary_is_a_503(&router(&replicas), 4_303).await;
}

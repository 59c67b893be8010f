//! The social app driven over real HTTP on loopback, against a real primary
//! with two replicas lagging 50 ms and 200 ms.

use std::net::SocketAddr;
use std::time::Duration;

use read_after_write::pg::PgReplicaSet;
use read_after_write::{KeySet, SigningKey};
use read_after_write_lab::social::{self, AppConfig, Created, Post};
use read_after_write_testkit::TestCluster;
use reqwest::header::COOKIE;
use tokio::sync::OnceCell;

static CLUSTER: OnceCell<TestCluster> = OnceCell::const_new();

async fn cluster() -> &'static TestCluster {
    CLUSTER
        .get_or_init(|| async {
            let cluster = TestCluster::builder()
                .replica(Duration::from_millis(50))
                .replica(Duration::from_millis(200))
                .start()
                .await
                .expect("start a primary with two lagging replicas");
            let primary = sqlx::PgPool::connect(&cluster.primary_url()).await.unwrap();
            social::migrate(&primary).await.expect("migrate");
            cluster
                .wait_for_replicas_caught_up(Duration::from_secs(10))
                .await
                .unwrap();
            cluster
        })
        .await
}

fn keys(byte: u8) -> KeySet {
    KeySet::new(SigningKey::from_bytes(&[byte; 32]).unwrap())
}

/// Serves one app instance on an ephemeral port; it lives until the test's
/// runtime ends.
async fn serve(cluster: &TestCluster, keys: KeySet) -> SocketAddr {
    let mut builder = PgReplicaSet::builder().primary_url(cluster.primary_url());
    for replica in cluster.replicas() {
        builder = builder.replica_url(replica.name(), replica.url());
    }
    let replicas = builder.connect().await.expect("connect the replica set");
    let config = AppConfig {
        keys,
        cookie_secure: false,
        max_wait: Duration::from_millis(20),
        debug_header: true,
        time_window: None,
        tokens: true,
        request_timeout: Some(Duration::from_secs(5)),
    };
    let router = social::router(replicas.clone(), replicas, &config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    address
}

fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .build()
        .unwrap()
}

fn route(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("x-read-after-write")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

async fn create(
    client: &reqwest::Client,
    base: &str,
    user: i64,
    content: &str,
) -> (i64, reqwest::header::HeaderMap) {
    let response = client
        .post(format!("{base}/api/posts"))
        .header("x-user-id", user)
        .json(&serde_json::json!({ "content": content }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let headers = response.headers().clone();
    (response.json::<Created>().await.unwrap().id, headers)
}

async fn own_posts(client: &reqwest::Client, base: &str, user: i64) -> (Vec<Post>, String) {
    let response = client
        .get(format!("{base}/api/posts"))
        .header("x-user-id", user)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let route = route(&response);
    (response.json().await.unwrap(), route)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_posts_are_never_stale_with_the_cookie_and_stale_without_it() {
    let cluster = cluster().await;
    let base = format!("http://{}", serve(cluster, keys(1)).await);
    let with_cookie = browser();
    let without_cookie = reqwest::Client::new();
    let user = 101;
    let (mut stale, mut naive_stale) = (0, 0);
    const ROUNDS: usize = 150;
    for i in 0..ROUNDS {
        let (id, _) = create(&with_cookie, &base, user, &format!("post {i}")).await;
        // The same read without the cookie: eventual, so usually stale.
        let (posts, _) = own_posts(&without_cookie, &base, user).await;
        naive_stale += usize::from(!posts.iter().any(|p| p.id == id));
        let (posts, _) = own_posts(&with_cookie, &base, user).await;
        stale += usize::from(!posts.iter().any(|p| p.id == id));
        assert_eq!(posts.first().map(|p| p.id), Some(id), "newest first");
    }
    eprintln!("{ROUNDS} write/read pairs over HTTP: {stale} stale with the cookie, {naive_stale} stale without");
    assert_eq!(stale, 0);
    assert!(
        naive_stale > 0,
        "reads without the cookie were never stale: the lag is not real"
    );

    // The feed is eventual and the single post a critical read.
    let (id, _) = create(&with_cookie, &base, user, "critical").await;
    let response = with_cookie
        .get(format!("{base}/api/posts/{id}"))
        .header("x-user-id", user)
        .send()
        .await
        .unwrap();
    assert_eq!(
        route(&response),
        "node=primary; reason=critical; token=valid"
    );
    assert_eq!(response.json::<Post>().await.unwrap().content, "critical");
    let response = with_cookie
        .get(format!("{base}/api/feed"))
        .send()
        .await
        .unwrap();
    assert!(
        route(&response).contains("reason=eventual"),
        "{}",
        route(&response)
    );

    // /metrics shows where reads went.
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let replica_reads = metrics
        .lines()
        .filter(|l| {
            l.starts_with("read_after_write_reads_total{") && l.contains("target=\"replica\"")
        })
        .count();
    assert!(
        replica_reads > 0,
        "no replica reads in /metrics:\n{metrics}"
    );
    assert!(metrics.contains("read_after_write_replica_lag_bytes"));
    assert!(metrics.contains("read_after_write_tokens_total"));
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_edit_is_seen_at_once() {
    let cluster = cluster().await;
    let base = format!("http://{}", serve(cluster, keys(1)).await);
    let client = browser();
    for i in 0..20 {
        let name = format!("Ada {i}");
        let response = client
            .put(format!("{base}/api/profile"))
            .header("x-user-id", 202)
            .json(&serde_json::json!({"name": name, "bio": "hi"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let profile: serde_json::Value = client
            .get(format!("{base}/api/profile/202"))
            .header("x-user-id", 202)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(profile["name"], name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cookies_and_headers_give_200_never_5xx() {
    let cluster = cluster().await;
    let base = format!("http://{}", serve(cluster, keys(1)).await);
    let (_, headers) = create(&reqwest::Client::new(), &base, 303, "tamper").await;
    let token = headers["x-primary-affinity"].to_str().unwrap().to_owned();
    let mut tampered = token.clone().into_bytes();
    let last = tampered.len() - 5;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();

    let client = reqwest::Client::new();
    for (cookie, outcome) in [
        (format!("primary_affinity={tampered}"), "bad_signature"),
        (
            format!("primary_affinity={}", "x".repeat(5_000)),
            "too_long",
        ),
        ("primary_affinity=;;;==;".to_owned(), "malformed"),
        (format!("primary_affinity={token}"), "valid"),
    ] {
        let response = client
            .get(format!("{base}/api/posts"))
            .header("x-user-id", 303)
            .header(COOKIE, &cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{cookie}");
        assert!(
            route(&response).ends_with(&format!("token={outcome}")),
            "{}",
            route(&response)
        );
    }
    // Another user's token is ignored, not an error.
    let response = client
        .get(format!("{base}/api/posts"))
        .header("x-user-id", 304)
        .header("x-primary-affinity", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(route(&response).ends_with("token=other_user"));
    // Garbage identity is an anonymous request: 401 from the handler.
    let response = client
        .get(format!("{base}/api/posts"))
        .header("x-user-id", "not a number")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cookie_from_one_instance_is_honoured_by_another_sharing_the_key() {
    let cluster = cluster().await;
    let a = format!("http://{}", serve(cluster, keys(7)).await);
    let b = format!("http://{}", serve(cluster, keys(7)).await);
    let stranger = format!("http://{}", serve(cluster, keys(8)).await);
    let client = browser();
    let mut stale_on_b = 0;
    for i in 0..30 {
        let (id, _) = create(&client, &a, 404, &format!("from a {i}")).await;
        let response = client
            .get(format!("{b}/api/posts"))
            .header("x-user-id", 404)
            .send()
            .await
            .unwrap();
        assert!(
            route(&response).ends_with("token=valid"),
            "{}",
            route(&response)
        );
        let posts: Vec<Post> = response.json().await.unwrap();
        stale_on_b += usize::from(!posts.iter().any(|p| p.id == id));
    }
    assert_eq!(stale_on_b, 0);
    // An instance with other keys ignores the token, and still answers.
    let response = client
        .get(format!("{stranger}/api/posts"))
        .header("x-user-id", 404)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        route(&response).contains("token=unknown_key")
            || route(&response).contains("token=bad_signature")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_html_form_posts_redirects_and_shows_the_post() {
    let cluster = cluster().await;
    let base = format!("http://{}", serve(cluster, keys(1)).await);
    let client = browser();
    let login = client
        .post(format!("{base}/login"))
        .form(&[("user_id", "505")])
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200, "followed the 303 to the page");
    for i in 0..30 {
        let content = format!("photo <{i}>");
        let page = client
            .post(format!("{base}/posts"))
            .form(&[("content", content.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200);
        assert_eq!(page.url().path(), "/", "redirected back to the page");
        let html = page.text().await.unwrap();
        assert!(
            html.contains(&format!("photo &lt;{i}&gt;")),
            "the new post is missing from the page"
        );
    }
}

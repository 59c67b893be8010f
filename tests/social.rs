//! The social app driven over real HTTP on loopback, against a real primary
//! with two replicas lagging 50 ms and 200 ms.

use std::net::SocketAddr;
use std::time::Duration;

use read_after_write::pg::PgReplicaSet;
use read_after_write::{KeySet, SigningKey};
use read_after_write_lab::social::{self, AppConfig, Created, Dashboard, LoggedIn, Post};
use read_after_write_testkit::TestCluster;
use reqwest::header::COOKIE;
use tokio::sync::OnceCell;

// The driver apps' browser; here only its demoted-primary role.
#[allow(dead_code)]
#[path = "common/visitor.rs"]
mod visitor;

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
            let primary = sqlx::PgPool::connect(cluster.primary_url()).await.unwrap();
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
        max_wait: Some(Duration::from_millis(20)),
        debug_header: true,
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
async fn a_sign_up_and_a_login_are_seen_on_the_next_page() {
    let cluster = cluster().await;
    let base = format!("http://{}", serve(cluster, keys(1)).await);
    const ROUNDS: i64 = 15;
    let (mut missed, mut naive_missed) = (0, 0);
    for i in 0..ROUNDS {
        // A new visitor signs up: no identity until the handler creates it.
        let visitor = browser();
        let response = visitor
            .post(format!("{base}/api/signup"))
            .json(&serde_json::json!({ "name": format!("Grace {i}") }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        assert!(
            response.headers().get("x-primary-affinity").is_some(),
            "the sign-up's response carries the new user's token"
        );
        let id = response.json::<Created>().await.unwrap().id;
        // The naive control: the same profile read without the token.
        let naive = reqwest::Client::new()
            .get(format!("{base}/api/profile/{id}"))
            .header("x-user-id", id)
            .send()
            .await
            .unwrap();
        naive_missed += i64::from(naive.status() == 404);
        // The new user's profile page, with the cookies the sign-up set.
        let response = visitor
            .get(format!("{base}/api/profile/{id}"))
            .send()
            .await
            .unwrap();
        assert!(
            route(&response).ends_with("token=valid"),
            "{}",
            route(&response)
        );
        if response.status() == 200 {
            let profile: serde_json::Value = response.json().await.unwrap();
            assert_eq!(profile["name"], format!("Grace {i}"));
        } else {
            missed += 1;
        }
    }
    eprintln!("{ROUNDS} sign-ups: {missed} profiles missing, {naive_missed} without the token");
    assert_eq!(missed, 0);
    assert!(
        naive_missed > 0,
        "the profile was never missing without the token: the lag is not real"
    );

    let (mut missed, mut naive_missed) = (0, 0);
    for i in 0..ROUNDS {
        let user = 9_000 + i;
        let visitor = browser();
        let response = visitor
            .post(format!("{base}/api/login"))
            .json(&serde_json::json!({ "user_id": user }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let login = response.json::<LoggedIn>().await.unwrap().login_id;
        let last_login = |dashboard: Dashboard| dashboard.last_login.map(|l| l.id);
        let naive: Dashboard = reqwest::Client::new()
            .get(format!("{base}/api/dashboard"))
            .header("x-user-id", user)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        naive_missed += i64::from(last_login(naive) != Some(login));
        let dashboard: Dashboard = visitor
            .get(format!("{base}/api/dashboard"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(dashboard.user_id, user);
        missed += i64::from(last_login(dashboard) != Some(login));
    }
    eprintln!(
        "{ROUNDS} logins: {missed} dashboards without them, {naive_missed} without the token"
    );
    assert_eq!(missed, 0);
    assert!(
        naive_missed > 0,
        "the login was never missing without the token: the lag is not real"
    );
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

/// Input the app must refuse gets a 4xx, never a 5xx, and writes nothing:
/// text PostgreSQL cannot store (a NUL character), over-long or empty
/// text, ids that are not numbers, bodies that are not JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_never_a_5xx_and_writes_nothing() {
    let cluster = cluster().await;
    let base = format!("http://{}", serve(cluster, keys(1)).await);
    let client = reqwest::Client::new();
    let user = 306;
    let long = "x".repeat(2_001);
    let json = |value: serde_json::Value| Some(value);
    // (method, path, JSON body, status)
    let cases = [
        (
            "POST",
            "/api/posts",
            json(serde_json::json!({ "content": "a\u{0}b" })),
            422,
        ),
        (
            "POST",
            "/api/posts",
            json(serde_json::json!({ "content": "  " })),
            422,
        ),
        (
            "POST",
            "/api/posts",
            json(serde_json::json!({ "content": long })),
            422,
        ),
        (
            "POST",
            "/api/posts",
            json(serde_json::json!({ "text": "hi" })),
            422,
        ),
        (
            "PUT",
            "/api/profile",
            json(serde_json::json!({ "name": "n\u{0}" })),
            422,
        ),
        (
            "PUT",
            "/api/profile",
            json(serde_json::json!({ "name": "n", "bio": "b\u{0}" })),
            422,
        ),
        (
            "PUT",
            "/api/profile",
            json(serde_json::json!({ "name": "" })),
            422,
        ),
        (
            "POST",
            "/api/signup",
            json(serde_json::json!({ "name": "\u{0}" })),
            422,
        ),
        (
            "POST",
            "/api/login",
            json(serde_json::json!({ "user_id": "x" })),
            422,
        ),
        ("GET", "/api/posts/not-a-number", None, 400),
        ("GET", "/api/posts/99999999999999999999", None, 400),
        ("GET", "/api/posts/-1", None, 404),
    ];
    for (method, path, body, expected) in cases {
        let mut request = client
            .request(method.parse().unwrap(), format!("{base}{path}"))
            .header("x-user-id", user);
        if let Some(body) = &body {
            request = request.json(body);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status().as_u16(),
            expected,
            "{method} {path} {body:?}"
        );
    }
    // The HTML form, with the NUL percent-encoded, and a body that is not
    // JSON at all.
    let response = client
        .post(format!("{base}/posts"))
        .header("x-user-id", user)
        .form(&[("content", "a\u{0}b")])
        .send()
        .await
        .unwrap();
    assert!(response.status().is_client_error(), "{}", response.status());
    let response = client
        .post(format!("{base}/api/posts"))
        .header("x-user-id", user)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert!(response.status().is_client_error(), "{}", response.status());
    // Nothing was written: the user has no posts and no profile.
    let primary = sqlx::PgPool::connect(cluster.primary_url()).await.unwrap();
    let (posts, profiles): (i64, i64) = sqlx::query_as(
        "select (select count(*) from posts where user_id = $1), \
                (select count(*) from profiles where user_id = $1)",
    )
    .bind(user)
    .fetch_one(&primary)
    .await
    .unwrap();
    assert_eq!((posts, profiles), (0, 0));
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

// ---------------------------------------------------------------------------
// The metrics that examples/social/alerts.yml and grafana-dashboard.json name
// must be what the library exports: renaming a metric without updating them
// fails here.

/// The alert rules and the dashboard, as shipped.
const ALERTS: &str = include_str!("../examples/social/alerts.yml");
const DASHBOARD: &str = include_str!("../examples/social/grafana-dashboard.json");

/// Like [`serve`], on a replica set whose builder `tune` adjusts: for
/// instances that provoke the faults some series only appear after.
async fn serve_tuned(
    cluster: &TestCluster,
    keys: KeySet,
    tune: impl FnOnce(
        read_after_write::pg::PgReplicaSetBuilder,
    ) -> read_after_write::pg::PgReplicaSetBuilder,
) -> SocketAddr {
    let mut builder = PgReplicaSet::builder().primary_url(cluster.primary_url());
    for replica in cluster.replicas() {
        builder = builder.replica_url(replica.name(), replica.url());
    }
    let replicas = tune(builder)
        .connect()
        .await
        .expect("connect the replica set");
    let config = AppConfig {
        keys,
        cookie_secure: false,
        max_wait: Some(Duration::from_millis(20)),
        debug_header: true,
        request_timeout: Some(Duration::from_secs(5)),
    };
    let router = social::router(replicas.clone(), replicas, &config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    address
}

/// Whether `c` can continue a metric or label name.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// A label matcher in a selector: `(label, op, value)`.
type Matcher = (String, String, String);

/// Every `read_after_write_*` metric named in `text`, each with the label
/// matchers of the selector that follows it (`name{label op "value", ...}`),
/// if any.
fn metric_references(text: &str) -> Vec<(String, Vec<Matcher>)> {
    const PREFIX: &str = "read_after_write_";
    let mut found = Vec::new();
    for (start, _) in text.match_indices(PREFIX) {
        if text[..start].chars().next_back().is_some_and(is_name_char) {
            continue;
        }
        let rest = &text[start..];
        let end = rest.find(|c| !is_name_char(c)).unwrap_or(rest.len());
        let name = rest[..end].to_owned();
        let mut matchers = Vec::new();
        if let Some(body) = rest[end..].strip_prefix('{') {
            // label op "value", ...: values are quoted, so split by hand.
            let mut body = body.trim_start();
            while !body.starts_with('}') {
                let label_end = body.find(|c| !is_name_char(c)).expect("a label matcher");
                let label = body[..label_end].to_owned();
                let after = body[label_end..].trim_start();
                let op_end = after.find('"').expect("a quoted matcher value");
                let op = after[..op_end].trim().to_owned();
                let value_and_rest = &after[op_end + 1..];
                let value_end = value_and_rest.find('"').expect("a closing quote");
                let value = value_and_rest[..value_end].to_owned();
                body = value_and_rest[value_end + 1..].trim_start();
                body = body.strip_prefix(',').unwrap_or(body).trim_start();
                assert!(
                    ["=", "!=", "=~", "!~"].contains(&op.as_str()),
                    "{name}: matcher {label} {op} {value:?}"
                );
                matchers.push((label, op, value));
            }
        }
        found.push((name, matchers));
    }
    found
}

/// Every string in a JSON document, to search the dashboard's expressions,
/// variable queries and descriptions unescaped.
fn json_strings(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::String(text) => out.push(text.clone()),
        serde_json::Value::Array(items) => items.iter().for_each(|v| json_strings(v, out)),
        serde_json::Value::Object(map) => map.values().for_each(|v| json_strings(v, out)),
        _ => {}
    }
}

/// A Prometheus text exposition as metric name → the label sets of its
/// samples. Names are as exported: a summary shows as `name{quantile=..}`,
/// `name_sum` and `name_count`; a histogram would show `name_bucket{le=..}`
/// instead of the bare name.
fn scraped_series(
    text: &str,
) -> std::collections::BTreeMap<String, Vec<std::collections::BTreeMap<String, String>>> {
    let mut series = std::collections::BTreeMap::<String, Vec<_>>::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(|c| !is_name_char(c)).unwrap_or(line.len());
        let mut labels = std::collections::BTreeMap::new();
        if let Some(mut body) = line[name_end..].strip_prefix('{') {
            while let Some((label, after)) = body.split_once("=\"") {
                let mut value = String::new();
                let mut chars = after.char_indices();
                let mut rest = "";
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => value.extend(chars.next().map(|(_, c)| c)),
                        '"' => {
                            rest = &after[i + 1..];
                            break;
                        }
                        c => value.push(c),
                    }
                }
                labels.insert(label.trim_start_matches(',').trim().to_owned(), value);
                body = rest;
            }
        }
        series
            .entry(line[..name_end].to_owned())
            .or_default()
            .push(labels);
    }
    series
}

/// What `source` names that `scrape` lacks: metrics, labels their selectors
/// match on, and literal values of `=` matchers.
fn missing_from_scrape(source: &str, text: &str, scrape: &str) -> Vec<String> {
    let series = scraped_series(scrape);
    let mut missing = Vec::new();
    for (name, matchers) in metric_references(text) {
        let Some(samples) = series.get(&name) else {
            missing.push(format!("{source}: metric {name}"));
            continue;
        };
        for (label, op, value) in matchers {
            if !samples.iter().any(|s| s.contains_key(&label)) {
                missing.push(format!("{source}: label {label} on {name}"));
            } else if op == "="
                && !value.contains('$')
                && !samples
                    .iter()
                    .any(|s| s.get(&label).is_some_and(|v| *v == value))
            {
                missing.push(format!("{source}: {name}{{{label}=\"{value}\"}}"));
            }
        }
    }
    missing.sort();
    missing.dedup();
    missing
}

#[test]
fn metric_references_parse_selectors() {
    let refs = metric_references(
        r#"sum(rate(read_after_write_reads_total{target="primary", reason!~"write|critical"}[5m]))
           / x_read_after_write_not_ours + read_after_write_replica_up == 0"#,
    );
    let flat: Vec<_> = refs
        .iter()
        .map(|(name, m)| (name.as_str(), m.len()))
        .collect();
    assert_eq!(
        flat,
        [
            ("read_after_write_reads_total", 2),
            ("read_after_write_replica_up", 0)
        ]
    );
    assert_eq!(
        refs[0].1[1],
        ("reason".into(), "!~".into(), "write|critical".into())
    );
    let series = scraped_series(
        "# TYPE a summary\na{quantile=\"0.99\"} 1\na_sum 2\nb{x=\"p,q\",y=\"\\\"\"} 3\n",
    );
    assert_eq!(series["a"][0]["quantile"], "0.99");
    assert!(series["a_sum"][0].is_empty());
    assert_eq!(series["b"][0]["x"], "p,q");
    assert_eq!(series["b"][0]["y"], "\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_in_the_alerts_and_the_dashboard_is_exported() {
    let dashboard: serde_json::Value =
        serde_json::from_str(DASHBOARD).expect("grafana-dashboard.json is JSON");
    assert_eq!(dashboard["title"], "read-after-write");
    assert_eq!(dashboard["schemaVersion"], 39);
    let mut strings = Vec::new();
    json_strings(&dashboard, &mut strings);
    let dashboard_text = strings.join("\n");
    let alert_names: std::collections::BTreeSet<_> = metric_references(ALERTS)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let dashboard_names: std::collections::BTreeSet<_> = metric_references(&dashboard_text)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(alert_names.len() >= 4, "{alert_names:?}");
    // Every alerted-on metric has a panel to look at when the alert fires.
    let unplotted: Vec<_> = alert_names.difference(&dashboard_names).collect();
    assert!(
        unplotted.is_empty(),
        "alerted on but not on the dashboard: {unplotted:?}"
    );

    let cluster = cluster().await;
    // The app as deployed, and two instances on the same cluster tuned to
    // provoke the series that only appear after a fault. The recorder is
    // process-wide, so the first instance's /metrics shows all three.
    let base = format!("http://{}", serve(cluster, keys(11)).await);
    // A primary pool that takes 100 ms to hand out a connection, and a
    // capture timeout of 10 ms: the handler's write succeeds, every
    // write-position capture times out (read_after_write_capture_failures_total).
    let slow_primary = sqlx::postgres::PgPoolOptions::new()
        .after_connect(|_, _| {
            Box::pin(async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(())
            })
        })
        .before_acquire(|_, _| {
            Box::pin(async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(true)
            })
        })
        .connect_lazy(cluster.primary_url())
        .unwrap();
    let failing_capture = format!(
        "http://{}",
        serve_tuned(cluster, keys(11), |b| {
            b.primary_pool(slow_primary)
                .capture_timeout(Duration::from_millis(10))
        })
        .await
    );
    // A replica whose replay stands still for 1 ms while the primary writes
    // counts as stalled, which every lagging replica does after a write:
    // read_after_write_replica_diverged{replica} = 1.
    let stalling = format!(
        "http://{}",
        serve_tuned(cluster, keys(11), |b| {
            b.stall_timeout(Duration::from_millis(1))
        })
        .await
    );

    let user = 707;
    let with_cookie = browser();
    let without_cookie = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut round = 0;
    loop {
        round += 1;
        // A write (writes, capture queries, tokens issued), then session
        // reads with the token (reads that wait: read_wait_seconds; valid)
        // and without (absent), a critical read (target="primary") and the
        // feed (eventual).
        let (id, headers) = create(&with_cookie, &base, user, &format!("scraped {round}")).await;
        own_posts(&with_cookie, &base, user).await;
        own_posts(&without_cookie, &base, user).await;
        let response = with_cookie
            .get(format!("{base}/api/posts/{id}"))
            .header("x-user-id", user)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let response = without_cookie
            .get(format!("{base}/api/feed"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        // A tampered cookie (bad_signature), and more well-formed forgeries
        // naming the requester than the MAC budget allows
        // (token_mac_budget_exhausted_total).
        let token = headers["x-primary-affinity"].to_str().unwrap();
        let mut tampered = token.as_bytes().to_vec();
        let last = tampered.len() - 5;
        tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        for copies in [1, read_after_write::MAX_MACS_PER_REQUEST + 1] {
            let cookie = vec![format!("primary_affinity={tampered}"); copies].join("; ");
            let response = without_cookie
                .get(format!("{base}/api/posts"))
                .header("x-user-id", user)
                .header(COOKIE, cookie)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            assert!(
                route(&response).ends_with("token=bad_signature"),
                "{}",
                route(&response)
            );
        }
        // Writes on the tuned instances.
        create(&without_cookie, &failing_capture, user, "no capture").await;
        create(&without_cookie, &stalling, user, "stalls").await;

        let scrape = reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let mut missing = missing_from_scrape("alerts.yml", ALERTS, &scrape);
        missing.extend(missing_from_scrape(
            "grafana-dashboard.json",
            &dashboard_text,
            &scrape,
        ));
        if missing.is_empty() {
            let unplotted: Vec<_> = scraped_series(&scrape)
                .into_keys()
                .filter(|name| {
                    name.starts_with("read_after_write_") && !dashboard_text.contains(name.as_str())
                })
                .collect();
            eprintln!(
                "round {round}: all {} metrics named in alerts.yml and the dashboard are exported; \
                 exported but not on the dashboard: {unplotted:?}",
                alert_names.union(&dashboard_names).count()
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "named in the alerts or the dashboard but not exported after {round} rounds of \
             traffic:\n  {}\n/metrics:\n{scrape}",
            missing.join("\n  ")
        );
    }
}

/// A write that reaches a primary no longer taking writes (demoted in a
/// failover; here a role whose transactions are read-only, which
/// PostgreSQL refuses with the same `25006`) is a 503 that clients retry,
/// not a 500 that says the app is broken; reads still answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_a_demoted_primary_is_a_503_not_a_500() {
    let cluster = cluster().await;
    let url = visitor::demoted_primary_url(cluster).await;
    let address = serve_tuned(cluster, keys(14), |builder| builder.primary_url(url)).await;
    let base = format!("http://{address}");
    let client = browser();
    let response = client
        .post(format!("{base}/api/posts"))
        .header("x-user-id", 9_100)
        .json(&serde_json::json!({ "content": "on a demoted primary" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503, "{}", response.text().await.unwrap());
    let response = client
        .get(format!("{base}/api/posts"))
        .header("x-user-id", 9_100)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

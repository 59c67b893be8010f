//! The browser the driver apps' tests drive each app with
//! (`tests/sea_orm.rs`, `tests/diesel_async.rs`, `tests/tokio_postgres.rs`):
//! requests straight into the router, cookies kept between them; and the
//! requests every app must refuse.

use std::collections::BTreeMap;

use axum::body::{to_bytes, Body};
use axum::http::header::{CONTENT_TYPE, COOKIE, SET_COOKIE};
use axum::http::{HeaderValue, Request, StatusCode};
use axum::Router;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tower::ServiceExt;

/// A browser: keeps the cookies the app sets (the affinity token, the demo
/// identity) and sends them back, with `x-user-id` when it has a user.
pub struct Visitor {
    router: Router,
    user: Option<i64>,
    /// The cookies the app set, by name.
    pub cookies: BTreeMap<String, String>,
}

/// A response: its status, the layer's debug header, its body.
pub struct Answer {
    pub status: StatusCode,
    pub route: String,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!("{error}: {}", String::from_utf8_lossy(&self.body));
        })
    }
}

impl Visitor {
    pub fn new(router: &Router, user: Option<i64>) -> Self {
        Visitor {
            router: router.clone(),
            user,
            cookies: BTreeMap::new(),
        }
    }

    /// `GET path` until `node` serves it, every 50 ms for at most 5 s, and
    /// that answer (or, failing, the last). Right after a replica has
    /// replayed a write, the app's tracker learns it at its next poll, not
    /// the moment the test does: until then a read may still go to the
    /// primary, by design.
    pub async fn get_until_served_by(&mut self, path: &str, node: &str) -> Answer {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let answer = self.send("GET", path, None).await;
            let served = answer.route.contains(&format!("node={node};"))
                || answer.route.ends_with(&format!("node={node}"));
            if served || tokio::time::Instant::now() >= deadline {
                return answer;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub async fn send(&mut self, method: &str, path: &str, body: Option<Value>) -> Answer {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(user) = self.user {
            request = request.header("x-user-id", user.to_string());
        }
        if !self.cookies.is_empty() {
            let jar: Vec<String> = self
                .cookies
                .iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect();
            request = request.header(COOKIE, jar.join("; "));
        }
        let body = match body {
            Some(body) => {
                request = request.header(CONTENT_TYPE, "application/json");
                Body::from(body.to_string())
            }
            None => Body::empty(),
        };
        let response = self
            .router
            .clone()
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        for value in response.headers().get_all(SET_COOKIE) {
            let pair = value.to_str().unwrap().split(';').next().unwrap();
            if let Some((name, value)) = pair.split_once('=') {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
        }
        let status = response.status();
        let route = response
            .headers()
            .get("x-read-after-write")
            .map(|value| value.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap()
            .to_vec();
        Answer {
            status,
            route,
            body,
        }
    }
}

/// Whether `at` reads as the social app renders a timestamp:
/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`, in UTC.
#[allow(dead_code)] // not every app's test reads timestamps
pub fn is_rfc3339_utc_micros(at: &str) -> bool {
    let shape = "0000-00-00T00:00:00.000000Z";
    at.len() == shape.len()
        && at.chars().zip(shape.chars()).all(|(c, s)| match s {
            '0' => c.is_ascii_digit(),
            _ => c == s,
        })
}

/// Sends `router` every request the social API must refuse, as `user` and
/// anonymously, and asserts each gets its 4xx (401, 400, 404, 415, 413 or
/// 422), never a 5xx: no identity, refused content (NUL characters
/// included, which PostgreSQL text cannot store), JSON of the wrong shape,
/// ids that are not ids, garbage `x-user-id` values, bodies that are not
/// the JSON asked for, and one past axum's body limit. The caller checks
/// that none of it wrote.
#[allow(dead_code)] // the tokio-postgres test keeps its own, shorter list
pub async fn every_refusal_is_a_4xx(router: &Router, user: i64, max_post_chars: usize) {
    let mut anonymous = Visitor::new(router, None);
    let mut visitor = Visitor::new(router, Some(user));
    let long = "x".repeat(max_post_chars + 1);
    let long_name = "n".repeat(101);
    // No identity: 401, before any query.
    let post = Some(json!({ "content": "hi" }));
    let profile = Some(json!({ "name": "n" }));
    for (method, path, body) in [
        ("GET", "/api/posts", None),
        ("GET", "/api/dashboard", None),
        ("POST", "/api/posts", post),
        ("PUT", "/api/profile", profile),
    ] {
        let answer = anonymous.send(method, path, body.clone()).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{method} {path}");
    }
    // Content the app refuses, or JSON of the wrong shape: 422. A NUL
    // character, which PostgreSQL cannot store in text, is refused before
    // any query (the server would fail it, a 500).
    let unacceptable = [
        ("POST", "/api/posts", json!({ "content": "" })),
        ("POST", "/api/posts", json!({ "content": " \n " })),
        ("POST", "/api/posts", json!({ "content": long })),
        ("POST", "/api/posts", json!({ "content": "a\u{0}b" })),
        ("POST", "/api/posts", json!({ "text": "hi" })),
        ("POST", "/api/posts", json!({ "content": 7 })),
        ("PUT", "/api/profile", json!({ "name": "" })),
        ("PUT", "/api/profile", json!({ "name": long_name })),
        ("PUT", "/api/profile", json!({ "name": "n\u{0}" })),
        ("PUT", "/api/profile", json!({ "name": "n", "bio": long })),
        (
            "PUT",
            "/api/profile",
            json!({ "name": "n", "bio": "\u{0}" }),
        ),
        ("POST", "/api/signup", json!({ "name": long_name })),
        ("POST", "/api/signup", json!({ "name": "\u{0}" })),
        ("POST", "/api/login", json!({ "user_id": "x" })),
        ("POST", "/api/login", json!({ "user_id": 1.5 })),
    ];
    for (method, path, body) in unacceptable {
        let answer = visitor.send(method, path, Some(body.clone())).await;
        let status = answer.status;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{method} {path} {body}"
        );
    }
    // Ids that are not one (400) or match nothing (404).
    for (path, expected) in [
        ("/api/posts/not-a-number", 400),
        ("/api/posts/99999999999999999999", 400),
        ("/api/profile/x", 400),
        ("/api/posts/-1", 404),
        ("/api/profile/-1", 404),
    ] {
        let answer = visitor.send("GET", path, None).await;
        assert_eq!(answer.status.as_u16(), expected, "GET {path}");
    }

    // An x-user-id that is not an integer is no identity (not the
    // cookie's): 401, on reads and writes alike.
    let bad_ids: [&[u8]; 5] = [
        b"not a number",
        b"1.5",
        b"99999999999999999999",
        b"",
        b"\xff\xfe",
    ];
    for bad in bad_ids {
        for (method, body) in [
            ("GET", Body::empty()),
            ("POST", Body::from(r#"{"content":"hi"}"#)),
        ] {
            let request = Request::builder()
                .method(method)
                .uri("/api/posts")
                .header("x-user-id", HeaderValue::from_bytes(bad).unwrap())
                .header(COOKIE, format!("demo_user={user}"))
                .header(CONTENT_TYPE, "application/json")
                .body(body)
                .unwrap();
            let answer = router.clone().oneshot(request).await.unwrap();
            assert_eq!(
                answer.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {bad:?}"
            );
        }
    }

    // Bodies that are not the JSON asked for: broken (400), or not
    // declared JSON (415).
    let json_type = Some("application/json");
    let raw: [(Option<&str>, &[u8], u16); 5] = [
        (json_type, b"{", 400),
        (json_type, br#"{"content":"#, 400),
        (json_type, b"\xff\xfe", 400),
        (Some("text/plain"), br#"{"content":"hi"}"#, 415),
        (None, br#"{"content":"hi"}"#, 415),
    ];
    for (content_type, body, expected) in raw {
        let mut request = Request::post("/api/posts").header("x-user-id", user.to_string());
        if let Some(content_type) = content_type {
            request = request.header(CONTENT_TYPE, content_type);
        }
        let request = request.body(Body::from(body.to_vec())).unwrap();
        let answer = router.clone().oneshot(request).await.unwrap();
        let status = answer.status().as_u16();
        assert_eq!(status, expected, "{content_type:?} {body:?}");
    }
    // A body past axum's 2 MB default limit is refused unread.
    let huge = json!({ "content": "x".repeat(3 << 20) }).to_string();
    let request = Request::post("/api/posts")
        .header("x-user-id", user.to_string())
        .header(CONTENT_TYPE, "application/json")
        .body(Body::from(huge))
        .unwrap();
    let answer = router.clone().oneshot(request).await.unwrap();
    assert_eq!(answer.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

/// The URL of `cluster`'s primary for a role whose every transaction is
/// read-only: PostgreSQL refuses its writes with `25006`, as a primary
/// demoted in a failover refuses the writes still sent to it. Creates the
/// role once; call it after the app's schema is migrated.
pub async fn demoted_primary_url(cluster: &read_after_write_testkit::TestCluster) -> String {
    cluster
        .execute_on_primary(
            "do $$ begin \
               if not exists (select from pg_roles where rolname = 'demoted_app') then \
                 create role demoted_app login; \
               end if; \
             end $$; \
             grant pg_monitor to demoted_app; \
             grant select, insert, update, delete on all tables in schema public to demoted_app; \
             grant usage, select on all sequences in schema public to demoted_app; \
             alter role demoted_app set default_transaction_read_only = on",
        )
        .await
        .expect("the demoted role");
    cluster
        .wait_for_replicas_caught_up(std::time::Duration::from_secs(10))
        .await
        .expect("the role on the replicas");
    format!(
        "postgres://demoted_app@127.0.0.1:{}/postgres",
        cluster.primary_port()
    )
}

/// Through an app whose primary refuses writes ([`demoted_primary_url`]):
/// a post is a 503 that clients retry, never a 500, and a read still
/// answers.
pub async fn a_write_on_a_demoted_primary_is_a_503(router: &Router, user: i64) {
    let mut visitor = Visitor::new(router, Some(user));
    let answer = visitor
        .send(
            "POST",
            "/api/posts",
            Some(json!({ "content": "on a demoted primary" })),
        )
        .await;
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let answer = visitor.send("GET", "/api/posts", None).await;
    assert_eq!(answer.status, StatusCode::OK);
}

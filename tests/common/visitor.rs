//! The browser the driver apps' tests drive each app with
//! (`tests/sea_orm.rs`, `tests/diesel_async.rs`, `tests/tokio_postgres.rs`):
//! requests straight into the router, cookies kept between them.

use std::collections::BTreeMap;

use axum::body::{to_bytes, Body};
use axum::http::header::{CONTENT_TYPE, COOKIE, SET_COOKIE};
use axum::http::{Request, StatusCode};
use axum::Router;
use serde::de::DeserializeOwned;
use serde_json::Value;
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

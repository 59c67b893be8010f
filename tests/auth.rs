//! The auth example (axum-login, tower-sessions) driven over HTTP on
//! loopback, against a real primary with a replica lagging 200 ms: the page
//! after a sign-up, a note and a login on another device shows the user's
//! own rows every time, and the same page without the affinity cookie (the
//! session cookie alone: tokens off) comes back stale.

#[path = "../examples/auth/app.rs"]
mod app;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use app::{Created, LoggedIn, Profile};
use read_after_write::middleware::{DEFAULT_COOKIE_NAME, DEFAULT_TOKEN_HEADER};
use read_after_write::pg::PgReplicaSet;
use read_after_write::{KeySet, SigningKey};
use read_after_write_testkit::TestCluster;
use reqwest::header::{COOKIE, SET_COOKIE};
use reqwest::StatusCode;

const ROUNDS: usize = 30;

/// A browser's cookie jar, by hand, so that a request can leave out the
/// affinity cookie and keep the session's.
#[derive(Default)]
struct Browser {
    cookies: BTreeMap<String, String>,
}

impl Browser {
    fn remember(&mut self, response: &reqwest::Response) {
        for header in response.headers().get_all(SET_COOKIE) {
            let text = header.to_str().unwrap();
            let (pair, attributes) = text.split_once(';').unwrap_or((text, ""));
            let (name, value) = pair.split_once('=').unwrap();
            let expired = attributes
                .split(';')
                .any(|a| a.trim().eq_ignore_ascii_case("max-age=0"));
            if expired {
                self.cookies.remove(name.trim());
            } else {
                self.cookies
                    .insert(name.trim().to_owned(), value.trim().to_owned());
            }
        }
    }

    /// The `Cookie` header, with or without the affinity cookie.
    fn header(&self, affinity: bool) -> String {
        self.cookies
            .iter()
            .filter(|(name, _)| affinity || name.as_str() != DEFAULT_COOKIE_NAME)
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    async fn post(
        &self,
        browser: &mut Browser,
        path: &str,
        body: serde_json::Value,
    ) -> reqwest::Response {
        let response = self
            .http
            .post(format!("{}{path}", self.base))
            .header(COOKIE, browser.header(true))
            .json(&body)
            .send()
            .await
            .unwrap();
        browser.remember(&response);
        response
    }

    /// `GET /me`: `None` when the page missed the user (404), as a stale
    /// replica does right after the sign-up.
    async fn profile(&self, browser: &mut Browser, affinity: bool) -> Option<Profile> {
        let response = self
            .http
            .get(format!("{}/me", self.base))
            .header(COOKIE, browser.header(affinity))
            .send()
            .await
            .unwrap();
        if affinity {
            browser.remember(&response);
        }
        match response.status() {
            StatusCode::OK => Some(response.json().await.unwrap()),
            StatusCode::NOT_FOUND => None,
            status => panic!("GET /me answered {status}"),
        }
    }
}

async fn serve(cluster: &TestCluster) -> (SocketAddr, PgReplicaSet) {
    let replicas = PgReplicaSet::builder()
        .primary_url(cluster.primary_url())
        .replica_urls(cluster.replica_urls())
        .connect()
        .await
        .expect("connect the replica set");
    let keys = KeySet::new(SigningKey::from_bytes(&[5; 32]).unwrap());
    let router = app::router(replicas.clone(), keys, false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (address, replicas)
}

/// Stale reads, with and without the affinity cookie, of one step.
#[derive(Debug, Default)]
struct Stale {
    with_token: usize,
    without: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_after_sign_up_login_and_a_note_shows_them_and_is_stale_without_the_token() {
    let cluster = TestCluster::builder()
        .replica(Duration::from_millis(200))
        .start()
        .await
        .expect("start a primary with a replica lagging 200 ms");
    let primary = sqlx::PgPool::connect(cluster.primary_url()).await.unwrap();
    app::migrate(&primary).await.unwrap();
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();
    let (address, replicas) = serve(&cluster).await;
    let client = Client {
        http: reqwest::Client::new(),
        base: format!("http://{address}"),
    };

    let (mut sign_up, mut note, mut login) = (Stale::default(), Stale::default(), Stale::default());
    for round in 0..ROUNDS {
        let name = format!("ada-{round}");
        // Sign-up: the request has no identity; the handler binds the new
        // user, so the response carries their token.
        let mut laptop = Browser::default();
        let response = client
            .post(&mut laptop, "/signup", serde_json::json!({ "name": name }))
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        assert!(
            response.headers().contains_key(DEFAULT_TOKEN_HEADER),
            "the sign-up's response carries the new user's token"
        );
        let id = response.json::<Created>().await.unwrap().id;
        // The control first, the soonest after the write: the session
        // cookie alone, so the layer knows the user but holds no token.
        sign_up.without += usize::from(client.profile(&mut laptop, false).await.is_none());
        match client.profile(&mut laptop, true).await {
            Some(profile) => {
                assert_eq!((profile.id, profile.name.as_str()), (id, name.as_str()));
            }
            None => sign_up.with_token += 1,
        }

        // A note: an ordinary write by a logged-in user.
        let text = format!("note {round}");
        let response = client
            .post(&mut laptop, "/notes", serde_json::json!({ "text": text }))
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let note_id = response.json::<Created>().await.unwrap().id;
        let has_note = |profile: Option<Profile>| {
            profile.is_some_and(|p| p.notes.iter().any(|n| n.id == note_id && n.text == text))
        };
        note.without += usize::from(!has_note(client.profile(&mut laptop, false).await));
        note.with_token += usize::from(!has_note(client.profile(&mut laptop, true).await));

        // Log out: the session is gone, and with it the identity.
        let response = client
            .post(&mut laptop, "/logout", serde_json::json!({}))
            .await;
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        let response = client
            .http
            .get(format!("{}/me", client.base))
            .header(COOKIE, laptop.header(true))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

        // Log in on another device, with no cookie of the user's: the login
        // row is written while the request is anonymous, and bound.
        let mut phone = Browser::default();
        let response = client
            .post(&mut phone, "/login", serde_json::json!({ "name": name }))
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers().contains_key(DEFAULT_TOKEN_HEADER));
        let logged_in: LoggedIn = response.json().await.unwrap();
        assert_eq!(logged_in.id, id);
        let logged = |profile: Option<Profile>| profile.is_some_and(|p| p.logins == 1);
        login.without += usize::from(!logged(client.profile(&mut phone, false).await));
        login.with_token += usize::from(!logged(client.profile(&mut phone, true).await));
    }
    eprintln!(
        "{ROUNDS} rounds, stale pages with the token / without it: \
         sign-up {}/{}, note {}/{}, login {}/{}",
        sign_up.with_token,
        sign_up.without,
        note.with_token,
        note.without,
        login.with_token,
        login.without
    );
    assert_eq!(
        (sign_up.with_token, note.with_token, login.with_token),
        (0, 0, 0),
        "with the layer, the page after each step shows the user's rows"
    );
    for (step, stale) in [("sign-up", &sign_up), ("note", &note), ("login", &login)] {
        assert!(
            stale.without > 0,
            "without the token the page after the {step} was never stale: the lag is not real, \
             so this test proves nothing"
        );
    }
    replicas.shutdown().await;
}

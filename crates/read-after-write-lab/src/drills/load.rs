//! The load generator: writing and reading users, each a browser-like
//! `reqwest::Client` with its own cookie jar, at a fixed offered load (a
//! think time after every step), recording every operation.
//!
//! The users follow the app's current addresses through a
//! [`tokio::sync::watch`] channel, so an app restart moves them to the new
//! port while their cookie jars stay (cookies are not bound to a port).
//! With several app instances, each user alternates between them request by
//! request, as behind a load balancer.
//!
//! Besides writers and readers, a drill may add sign-up users: each signs
//! up (no identity before), reads its new profile, logs in and reads its
//! dashboard, then signs up again as another account.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::SET_COOKIE;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::de::{DeserializeOwned, IgnoredAny};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::history::{fingerprint, Op, OpKind, Outcome, Recorder};
use crate::social::{Created, Dashboard, LoggedIn, Post, Profile, USER_HEADER};

/// The affinity cookie's name (the layer's default).
const AFFINITY_COOKIE: &str = "primary_affinity";

/// What the users do.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Users that post, then read their own posts, in a loop.
    pub writers: usize,
    /// Users that mostly read their own posts and the feed, with an
    /// occasional post.
    pub readers: usize,
    /// Think time after every step, uniformly in this range.
    pub think: (Duration, Duration),
    /// A reader's step is a post with this probability.
    pub reader_write_ratio: f64,
    /// Users that sign up, read their profile, log in and read their
    /// dashboard, in a loop, each round as a new account.
    pub signers: usize,
    /// First user id; users are `first_user..first_user + writers + readers`.
    pub first_user: i64,
    /// The client gives up on a request after this (a bound on the history,
    /// above the app's own request timeout so that one shows).
    pub client_timeout: Duration,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            writers: 12,
            readers: 4,
            think: (Duration::from_millis(5), Duration::from_millis(20)),
            reader_write_ratio: 0.1,
            signers: 0,
            first_user: 1,
            client_timeout: Duration::from_secs(10),
        }
    }
}

/// Running users; [`Load::stop`] ends them.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    client_timeout: Duration,
}

/// Starts every user against the addresses in `bases`, recording into
/// `recorder`.
pub fn start(
    config: &LoadConfig,
    bases: watch::Receiver<Vec<String>>,
    recorder: Arc<Recorder>,
) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let users = config.writers + config.readers + config.signers;
    let tasks = (0..users)
        .map(|i| {
            let user = User {
                id: config.first_user + i as i64,
                kind: if i < config.writers {
                    UserKind::Writer
                } else if i < config.writers + config.readers {
                    UserKind::Reader
                } else {
                    UserKind::Signer
                },
                config: config.clone(),
                bases: bases.clone(),
                sent: AtomicUsize::new(i),
                recorder: Arc::clone(&recorder),
                stop: Arc::clone(&stop),
            };
            tokio::spawn(user.run())
        })
        .collect();
    Load {
        stop,
        tasks,
        client_timeout: config.client_timeout,
    }
}

impl Load {
    /// Asks every user to stop after its current request and waits for them
    /// (at most the client timeout plus a second; stragglers are aborted).
    pub async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + self.client_timeout + Duration::from_secs(1);
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum UserKind {
    Writer,
    Reader,
    Signer,
}

struct User {
    /// The `x-user-id` a writer or reader sends; a signer's virtual id,
    /// which the app never sees.
    id: i64,
    kind: UserKind,
    config: LoadConfig,
    bases: watch::Receiver<Vec<String>>,
    /// Requests sent so far: picks the instance of the next one.
    sent: AtomicUsize,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
}

impl User {
    async fn run(self) {
        let client = match reqwest::Client::builder()
            .cookie_store(true)
            .timeout(self.config.client_timeout)
            .connect_timeout(Duration::from_secs(1))
            .build()
        {
            Ok(client) => client,
            Err(error) => {
                tracing::error!(%error, "cannot build an HTTP client");
                return;
            }
        };
        let mut rng = SmallRng::seed_from_u64(self.id as u64);
        let mut posted = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            if self.kind == UserKind::Signer {
                posted += 1;
                self.sign_up_and_in(&client, posted).await;
            } else if self.kind == UserKind::Writer {
                posted += 1;
                self.write(&client, posted).await;
                self.own_read(&client).await;
            } else {
                let step: f64 = rng.random();
                if step < self.config.reader_write_ratio {
                    posted += 1;
                    self.write(&client, posted).await;
                    self.own_read(&client).await;
                } else if step < 0.55 {
                    self.own_read(&client).await;
                } else {
                    self.feed_read(&client).await;
                }
            }
            let (low, high) = self.config.think;
            let think = if high > low {
                rng.random_range(low..high)
            } else {
                low
            };
            tokio::time::sleep(think).await;
        }
    }

    /// `path` on the instance the next request goes to.
    fn url(&self, path: &str) -> String {
        let sent = self.sent.fetch_add(1, Ordering::Relaxed);
        let bases = self.bases.borrow();
        let base = bases
            .get(sent % bases.len().max(1))
            .map_or("http://127.0.0.1:9", String::as_str);
        format!("{base}{path}")
    }

    fn op(&self, kind: OpKind, start_ms: f64) -> Op {
        Op {
            user: self.id,
            kind,
            start_ms,
            end_ms: start_ms,
            outcome: Outcome::Transport(String::new()),
            content: None,
            post_id: None,
            read_posts: None,
            node: None,
            reason: None,
            token: None,
            token_issued: None,
        }
    }

    /// Sends `request` for `op`: its status (or transport error), the
    /// debug header's route, for a write whether a token was issued, and
    /// its end; the body of a 2xx answer, decoded.
    async fn exchange<T: DeserializeOwned>(
        &self,
        op: &mut Op,
        request: reqwest::RequestBuilder,
    ) -> Option<T> {
        let body = match request.send().await {
            Ok(response) => {
                op.outcome = Outcome::Status(response.status().as_u16());
                read_route(&response, op);
                if op.kind.is_write() {
                    op.token_issued = Some(issued_token(&response));
                }
                if response.status().is_success() {
                    match response.json::<T>().await {
                        Ok(body) => Some(body),
                        Err(error) => {
                            op.outcome = unreadable(&error);
                            None
                        }
                    }
                } else {
                    let _ = response.bytes().await;
                    None
                }
            }
            Err(error) => {
                op.outcome = transport(&error);
                None
            }
        };
        op.end_ms = self.recorder.now_ms();
        body
    }

    async fn write(&self, client: &reqwest::Client, n: u64) {
        let content = format!("drill post {n} by {}", self.id);
        let mut op = self.op(OpKind::Write, self.recorder.now_ms());
        let request = client
            .post(self.url("/api/posts"))
            .header(USER_HEADER, self.id)
            .json(&serde_json::json!({ "content": content }));
        op.content = Some(content);
        let created: Option<Created> = self.exchange(&mut op, request).await;
        op.post_id = created.map(|created| created.id);
        self.recorder.record(op);
    }

    async fn own_read(&self, client: &reqwest::Client) {
        let mut op = self.op(OpKind::OwnRead, self.recorder.now_ms());
        let request = client
            .get(self.url("/api/posts"))
            .header(USER_HEADER, self.id);
        let posts: Option<Vec<Post>> = self.exchange(&mut op, request).await;
        op.read_posts = posts.map(|posts| {
            posts
                .iter()
                .map(|p| (p.id, fingerprint(&p.content)))
                .collect()
        });
        self.recorder.record(op);
    }

    async fn feed_read(&self, client: &reqwest::Client) {
        let mut op = self.op(OpKind::FeedRead, self.recorder.now_ms());
        let request = client
            .get(self.url("/api/feed"))
            .header(USER_HEADER, self.id);
        let _: Option<IgnoredAny> = self.exchange(&mut op, request).await;
        self.recorder.record(op);
    }

    /// One round of a sign-up user: sign up as a new account, read its
    /// profile, log in, read the dashboard. The demo identity of the
    /// requests after the sign-up is the `demo_user` cookie it set; the
    /// affinity cookie it set is the new account's. A round whose sign-up
    /// failed ends there.
    async fn sign_up_and_in(&self, client: &reqwest::Client, round: u64) {
        let name = format!("drill sign-up {round} of {}", self.id);
        let mut op = self.op(OpKind::SignUp, self.recorder.now_ms());
        let request = client
            .post(self.url("/api/signup"))
            .json(&serde_json::json!({ "name": name }));
        op.content = Some(name);
        let created: Option<Created> = self.exchange(&mut op, request).await;
        let Some(account) = created.map(|created| created.id) else {
            self.recorder.record(op);
            return;
        };
        // From here the app knows the user as the new account.
        op.user = account;
        op.post_id = Some(account);
        self.recorder.record(op);

        let mut op = self.op(OpKind::ProfileRead, self.recorder.now_ms());
        op.user = account;
        let request = client.get(self.url(&format!("/api/profile/{account}")));
        let profile: Option<Profile> = self.exchange(&mut op, request).await;
        op.read_posts = match (&op.outcome, profile) {
            (_, Some(profile)) => Some(vec![(profile.user_id, fingerprint(&profile.name))]),
            // The node had no such profile.
            (Outcome::Status(404), None) => Some(Vec::new()),
            _ => None,
        };
        self.recorder.record(op);

        let mut op = self.op(OpKind::Login, self.recorder.now_ms());
        op.user = account;
        let request = client
            .post(self.url("/api/login"))
            .json(&serde_json::json!({ "user_id": account }));
        let login: Option<LoggedIn> = self.exchange(&mut op, request).await;
        op.post_id = login.map(|login| login.login_id);
        self.recorder.record(op);

        let mut op = self.op(OpKind::DashboardRead, self.recorder.now_ms());
        op.user = account;
        let request = client.get(self.url("/api/dashboard"));
        let dashboard: Option<Dashboard> = self.exchange(&mut op, request).await;
        op.read_posts = dashboard.map(|d| d.last_login.iter().map(|l| (l.id, 0)).collect());
        self.recorder.record(op);
    }
}

/// Copies `node`, `reason` and `token` from the debug header.
fn read_route(response: &reqwest::Response, op: &mut Op) {
    let Some(text) = response
        .headers()
        .get("x-read-after-write")
        .and_then(|value| value.to_str().ok())
    else {
        return;
    };
    let (node, reason, token) = parse_route(text);
    op.node = node;
    op.reason = reason;
    op.token = token;
}

/// Splits `node=<name>; reason=<r>; token=<outcome>` into its parts.
pub fn parse_route(text: &str) -> (Option<String>, Option<String>, Option<String>) {
    let (mut node, mut reason, mut token) = (None, None, None);
    for part in text.split(';') {
        match part.trim().split_once('=') {
            Some(("node", value)) => node = Some(value.to_owned()),
            Some(("reason", value)) => reason = Some(value.to_owned()),
            Some(("token", value)) => token = Some(value.to_owned()),
            _ => {}
        }
    }
    (node, reason, token)
}

/// Whether the response set a non-empty affinity cookie.
fn issued_token(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .filter_map(|cookie| cookie.strip_prefix(AFFINITY_COOKIE))
        .filter_map(|rest| rest.strip_prefix('='))
        .any(|value| !value.is_empty() && !value.starts_with(';'))
}

fn transport(error: &reqwest::Error) -> Outcome {
    let what = if error.is_timeout() {
        "client timeout"
    } else if error.is_connect() {
        "connect failed"
    } else {
        "request failed"
    };
    Outcome::Transport(format!("{what}: {error}"))
}

fn unreadable(error: &reqwest::Error) -> Outcome {
    Outcome::Transport(format!("unreadable body: {error}"))
}

#[cfg(test)]
mod tests {
    use super::parse_route;

    #[test]
    fn the_debug_header_splits_into_node_reason_and_token() {
        assert_eq!(
            parse_route("node=replica-1; reason=caught_up; token=valid"),
            (
                Some("replica-1".into()),
                Some("caught_up".into()),
                Some("valid".into())
            )
        );
        assert_eq!(
            parse_route("node=none; token=absent"),
            (Some("none".into()), None, Some("absent".into()))
        );
        assert_eq!(parse_route("garbage"), (None, None, None));
    }
}

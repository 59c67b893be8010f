//! Virtual users: each with its own cookie jar, writing, reading its own
//! posts, the feed and other users' profiles over real HTTP, and checking
//! every own read for its last write and every read for monotonic reads.
//!
//! A user is one session: it sends one request at a time, alternating
//! between the app instances, and awaits each response (body included)
//! before the next. So each of its reads ended before its next began, and
//! comparing a read with the session's earlier reads compares reads ordered
//! in real time, as the monotonic-read rule asks: a read that saw a smaller
//! [counter](crate::social::COUNTER_HEADER) than any earlier read of its
//! session is a violation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use http::header::SET_COOKIE;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use read_after_write::middleware::DEFAULT_COOKIE_NAME;

use crate::social::{Created, Post, COUNTER_HEADER};

/// What the users do.
#[derive(Clone, Debug)]
pub struct Workload {
    /// How many users run at once.
    pub users: usize,
    /// How long they run.
    pub duration: Duration,
    /// Probability that a step is a write (followed at once by an own read).
    pub write_ratio: f64,
    /// Think time between steps: uniformly in this range.
    pub think: (Duration, Duration),
    /// First user id; users are `first_user..first_user + users`.
    pub first_user: i64,
}

/// Live counters, for the progress bar.
#[derive(Debug, Default)]
pub struct Live {
    /// Requests completed.
    pub requests: AtomicU64,
    /// Own reads that missed the user's last write.
    pub stale: AtomicU64,
    /// Reads that saw an older counter than their session had seen.
    pub violations: AtomicU64,
}

/// What one run of the workload measured.
#[derive(Debug)]
pub struct Measured {
    /// Own-post reads checked for the user's last write.
    pub own_reads: u64,
    /// Of those, how many missed it.
    pub stale_own_reads: u64,
    /// Every read request (own posts, feed, profiles).
    pub reads: u64,
    /// Reads the server routed to the primary (from the debug header).
    pub primary_reads: u64,
    /// Post writes.
    pub writes: u64,
    /// Requests that failed or answered 5xx.
    pub errors: u64,
    /// Sessions (users) that made at least one counter read.
    pub sessions: u64,
    /// Sessions with at least one monotonic-read violation.
    pub sessions_with_violations: u64,
    /// Reads that answered the lab's counter, each checked against the
    /// session's earlier reads.
    pub counter_reads: u64,
    /// Of those, how many saw a smaller counter than an earlier read of the
    /// same session.
    pub monotonic_violations: u64,
    /// Read responses that set the affinity cookie (a new token).
    pub read_tokens: u64,
    /// Read latency in microseconds.
    pub read_latency: Histogram<u64>,
    /// Write latency in microseconds.
    pub write_latency: Histogram<u64>,
    /// Wall time the users ran.
    pub elapsed: Duration,
}

impl Measured {
    fn empty() -> Self {
        Measured {
            own_reads: 0,
            stale_own_reads: 0,
            reads: 0,
            primary_reads: 0,
            writes: 0,
            errors: 0,
            sessions: 0,
            sessions_with_violations: 0,
            counter_reads: 0,
            monotonic_violations: 0,
            read_tokens: 0,
            read_latency: histogram(),
            write_latency: histogram(),
            elapsed: Duration::ZERO,
        }
    }

    fn merge(&mut self, other: Measured) {
        self.own_reads += other.own_reads;
        self.stale_own_reads += other.stale_own_reads;
        self.reads += other.reads;
        self.primary_reads += other.primary_reads;
        self.writes += other.writes;
        self.errors += other.errors;
        self.sessions += other.sessions;
        self.sessions_with_violations += other.sessions_with_violations;
        self.counter_reads += other.counter_reads;
        self.monotonic_violations += other.monotonic_violations;
        self.read_tokens += other.read_tokens;
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.read_latency.add(&other.read_latency);
        let _ = self.write_latency.add(&other.write_latency);
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits; these bounds are valid.
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).expect("3 sigfigs is valid"))
}

/// Runs every user against the app instances at `bases` until the duration
/// is up; each user alternates its requests between them.
pub async fn run(bases: &[String], workload: &Workload, live: Arc<Live>) -> Measured {
    // Every user has a profile, so profile reads find something.
    let setup = reqwest::Client::new();
    let first_base = bases.first().map_or("", String::as_str);
    for user in workload.first_user..workload.first_user + workload.users as i64 {
        let _ = setup
            .put(format!("{first_base}/api/profile"))
            .header("x-user-id", user)
            .json(&serde_json::json!({"name": format!("user {user}"), "bio": "lab"}))
            .send()
            .await;
    }

    let started = Instant::now();
    let deadline = started + workload.duration;
    let mut tasks = Vec::with_capacity(workload.users);
    for i in 0..workload.users {
        let bases = bases.to_vec();
        let workload = workload.clone();
        let live = Arc::clone(&live);
        tasks.push(tokio::spawn(async move {
            one_user(
                bases,
                &workload,
                workload.first_user + i as i64,
                deadline,
                &live,
            )
            .await
        }));
    }
    let mut total = Measured::empty();
    for task in tasks {
        if let Ok(measured) = task.await {
            total.merge(measured);
        }
    }
    total.elapsed = started.elapsed();
    total
}

/// One virtual user's session: its cookie jar, the instances it alternates
/// between, and what its reads have seen so far.
struct Session {
    client: reqwest::Client,
    bases: Vec<String>,
    /// Requests sent so far; picks the instance of the next one.
    sent: usize,
    /// The largest counter any earlier read of this session saw. Every
    /// earlier read ended before the next began (one request at a time).
    seen: Option<i64>,
    measured: Measured,
}

impl Session {
    /// The base URL of the instance the next request goes to.
    fn next_base(&mut self) -> &str {
        let index = self.sent % self.bases.len().max(1);
        self.sent += 1;
        self.bases.get(index).map_or("", String::as_str)
    }

    /// Records a finished read's response headers: its route, whether it
    /// set a new token, and its counter against the session's earlier
    /// reads.
    fn read_finished(&mut self, headers: &http::HeaderMap, started: Instant, live: &Live) {
        let measured = &mut self.measured;
        measured.read_latency.saturating_record(micros(started));
        measured.reads += 1;
        measured.primary_reads += u64::from(routed_to_primary(headers));
        measured.read_tokens += u64::from(sets_token(headers));
        let Some(counter) = counter(headers) else {
            return;
        };
        measured.counter_reads += 1;
        if self.seen.is_some_and(|seen| counter < seen) {
            if measured.monotonic_violations == 0 {
                measured.sessions_with_violations = 1;
            }
            measured.monotonic_violations += 1;
            live.violations.fetch_add(1, Ordering::Relaxed);
        }
        self.seen = self.seen.max(Some(counter));
    }
}

async fn one_user(
    bases: Vec<String>,
    workload: &Workload,
    user: i64,
    deadline: Instant,
    live: &Live,
) -> Measured {
    let Ok(client) = reqwest::Client::builder().cookie_store(true).build() else {
        let mut measured = Measured::empty();
        measured.errors += 1;
        return measured;
    };
    // Cookies do not tell ports apart (RFC 6265 §8.5), so the jar sends
    // the affinity cookie to every instance on 127.0.0.1, as a browser does
    // to instances behind one load balancer.
    let mut session = Session {
        client,
        bases,
        sent: 0,
        seen: None,
        measured: Measured::empty(),
    };
    let mut rng = SmallRng::seed_from_u64(user as u64);
    let mut last_write: Option<i64> = None;
    let users = workload.users.max(1) as i64;
    while Instant::now() < deadline {
        if rng.random_bool(workload.write_ratio) {
            let started = Instant::now();
            let base = session.next_base().to_owned();
            let response = session
                .client
                .post(format!("{base}/api/posts"))
                .header("x-user-id", user)
                .json(&serde_json::json!({"content": format!("lab post by {user}")}))
                .send()
                .await;
            let measured = &mut session.measured;
            match response {
                Ok(response) if response.status().is_success() => {
                    if let Ok(created) = response.json::<Created>().await {
                        measured.write_latency.saturating_record(micros(started));
                        measured.writes += 1;
                        last_write = Some(created.id);
                    } else {
                        measured.errors += 1;
                    }
                }
                _ => measured.errors += 1,
            }
            live.requests.fetch_add(1, Ordering::Relaxed);
            own_read(&mut session, user, last_write, live).await;
        } else {
            match rng.random_range(0..10) {
                0..=3 => other_read(&mut session, "/api/feed", user, live).await,
                4..=6 => {
                    let other = workload.first_user + rng.random_range(0..users);
                    other_read(&mut session, &format!("/api/profile/{other}"), user, live).await;
                }
                _ => own_read(&mut session, user, last_write, live).await,
            }
            live.requests.fetch_add(1, Ordering::Relaxed);
        }
        let (low, high) = workload.think;
        let think = if high > low {
            rng.random_range(low..high)
        } else {
            low
        };
        tokio::time::sleep(think).await;
    }
    let mut measured = session.measured;
    measured.sessions = u64::from(measured.counter_reads > 0);
    measured
}

/// Reads the user's own posts and checks that the last write is there.
async fn own_read(session: &mut Session, user: i64, last_write: Option<i64>, live: &Live) {
    let started = Instant::now();
    let base = session.next_base().to_owned();
    let response = session
        .client
        .get(format!("{base}/api/posts"))
        .header("x-user-id", user)
        .send()
        .await;
    let Ok(response) = response else {
        session.measured.errors += 1;
        return;
    };
    if !response.status().is_success() {
        session.measured.errors += 1;
        return;
    }
    let headers = response.headers().clone();
    let Ok(posts) = response.json::<Vec<Post>>().await else {
        session.measured.errors += 1;
        return;
    };
    session.read_finished(&headers, started, live);
    if let Some(id) = last_write {
        session.measured.own_reads += 1;
        if !posts.iter().any(|post| post.id == id) {
            session.measured.stale_own_reads += 1;
            live.stale.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Reads something that is not the user's own (`path` on the next
/// instance): eventual by design for read-your-writes, and still checked
/// for monotonic reads.
async fn other_read(session: &mut Session, path: &str, user: i64, live: &Live) {
    let started = Instant::now();
    let base = session.next_base().to_owned();
    let url = format!("{base}{path}");
    match session
        .client
        .get(url)
        .header("x-user-id", user)
        .send()
        .await
    {
        Ok(response) if response.status().is_success() || response.status() == 404 => {
            let headers = response.headers().clone();
            let _ = response.bytes().await;
            session.read_finished(&headers, started, live);
        }
        _ => session.measured.errors += 1,
    }
}

fn routed_to_primary(headers: &http::HeaderMap) -> bool {
    headers
        .get("x-read-after-write")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|route| route.starts_with("node=primary"))
}

/// Whether the response sets the affinity cookie to a token (not clears it).
fn sets_token(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .filter_map(|cookie| cookie.strip_prefix(DEFAULT_COOKIE_NAME))
        .filter_map(|rest| rest.strip_prefix('='))
        .any(|rest| !rest.starts_with(';') && !rest.is_empty())
}

/// The lab's counter the read saw, from [`COUNTER_HEADER`].
fn counter(headers: &http::HeaderMap) -> Option<i64> {
    headers
        .get(COUNTER_HEADER)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse().ok())
}

fn micros(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().expect("a valid header value"));
        }
        map
    }

    fn session() -> Session {
        Session {
            client: reqwest::Client::new(),
            bases: vec!["http://a".to_owned(), "http://b".to_owned()],
            sent: 0,
            seen: None,
            measured: Measured::empty(),
        }
    }

    #[test]
    fn a_read_that_sees_a_smaller_counter_than_any_earlier_read_is_a_violation() {
        let mut session = session();
        let live = Live::default();
        for value in ["5", "9", "7", "9", "8", "12"] {
            session.read_finished(&headers(&[(COUNTER_HEADER, value)]), Instant::now(), &live);
        }
        // 7 and 8 are below the 9 seen before them; equal is not going back.
        assert_eq!(session.measured.monotonic_violations, 2);
        assert_eq!(session.measured.sessions_with_violations, 1);
        assert_eq!(session.measured.counter_reads, 6);
        assert_eq!(session.measured.reads, 6);
    }

    #[test]
    fn a_read_without_a_counter_is_counted_but_not_checked() {
        let mut session = session();
        let live = Live::default();
        session.read_finished(&headers(&[(COUNTER_HEADER, "5")]), Instant::now(), &live);
        session.read_finished(&headers(&[]), Instant::now(), &live);
        session.read_finished(&headers(&[(COUNTER_HEADER, "4")]), Instant::now(), &live);
        assert_eq!(session.measured.reads, 3);
        assert_eq!(session.measured.counter_reads, 2);
        assert_eq!(session.measured.monotonic_violations, 1);
    }

    #[test]
    fn requests_alternate_between_the_instances() {
        let mut session = session();
        let order: Vec<String> = (0..4).map(|_| session.next_base().to_owned()).collect();
        assert_eq!(order, ["http://a", "http://b", "http://a", "http://b"]);
    }

    #[test]
    fn only_a_set_affinity_cookie_with_a_value_is_a_new_token() {
        assert!(sets_token(&headers(&[(
            "set-cookie",
            "primary_affinity=v1.abc; Path=/; HttpOnly"
        )])));
        assert!(sets_token(&headers(&[
            ("set-cookie", "other=1"),
            ("set-cookie", "primary_affinity=v2.xyz")
        ])));
        assert!(!sets_token(&headers(&[(
            "set-cookie",
            "primary_affinity=; Max-Age=0; Path=/"
        )])));
        assert!(!sets_token(&headers(&[(
            "set-cookie",
            "primary_affinity_x=1"
        )])));
        assert!(!sets_token(&headers(&[])));
    }
}

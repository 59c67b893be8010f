//! One virtual user's session: its cookie jar, the instances it
//! alternates between, and the checks each of its reads goes through (its
//! own last write, monotonic reads, wasted waits, new tokens).

use std::sync::atomic::Ordering;
use std::time::Instant;

use http::header::SET_COOKIE;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use read_after_write::middleware::DEFAULT_COOKIE_NAME;

use super::measured::{Live, Measured, Workload, CLIENT_TIMEOUT};
use super::readings::{COUNTER_HEADER, WASTED_WAIT_HEADER};
use crate::social::{Created, Post};

/// One virtual user's session: its cookie jar, the instances it alternates
/// between, and what its reads have seen so far.
pub(super) struct Session {
    client: reqwest::Client,
    bases: Vec<String>,
    /// The user's id, sent in `x-user-id`.
    user: i64,
    /// Picks the user's actions; seeded by the workload's seed and the
    /// user's index, so every strategy's user `i` acts alike.
    pub(super) rng: SmallRng,
    /// The ids of the users, `first_user..first_user + users`, whose
    /// profiles it reads.
    users: (i64, i64),
    /// The id of the user's last post, which its own reads must show.
    last_write: Option<i64>,
    /// Requests sent so far; picks the instance of the next one.
    sent: usize,
    /// The largest counter any earlier read of this session saw. Every
    /// earlier read ended before the next began (one request at a time).
    seen: Option<i64>,
    pub(super) measured: Measured,
}

impl Session {
    pub(super) fn new(bases: Vec<String>, workload: &Workload, index: usize) -> Option<Self> {
        // Cookies do not tell ports apart (RFC 6265 §8.5), so the jar sends
        // the affinity cookie to every instance on 127.0.0.1, as a browser
        // does to instances behind one load balancer.
        let client = reqwest::Client::builder()
            .cookie_store(true)
            .timeout(CLIENT_TIMEOUT)
            .build()
            .ok()?;
        Some(Session {
            client,
            bases,
            user: workload.first_user + index as i64,
            rng: SmallRng::seed_from_u64(workload.seed ^ (index as u64).wrapping_mul(0x9e37_79b9)),
            users: (workload.first_user, workload.users.max(1) as i64),
            last_write: None,
            sent: 0,
            seen: None,
            measured: Measured::empty(),
        })
    }

    /// The session's measurements, once it is done.
    pub(super) fn finish(self) -> Measured {
        let mut measured = self.measured;
        measured.sessions = u64::from(measured.counter_reads > 0);
        measured
    }

    /// The base URL of the instance the next request goes to.
    fn next_base(&mut self) -> &str {
        let index = self.sent % self.bases.len().max(1);
        self.sent += 1;
        self.bases.get(index).map_or("", String::as_str)
    }

    /// One action: a write and its own read, or one read.
    pub(super) async fn act(&mut self, write_ratio: f64, live: &Live) {
        let errors = self.measured.errors;
        if self.rng.random_bool(write_ratio) {
            if self.write(live).await {
                self.own_read(true, live).await;
            }
        } else {
            match self.rng.random_range(0..10) {
                0..=3 => self.other_read("/api/feed".to_owned(), live).await,
                4..=6 => {
                    let (first, count) = self.users;
                    let other = first + self.rng.random_range(0..count);
                    self.other_read(format!("/api/profile/{other}"), live).await;
                }
                _ => self.own_read(false, live).await,
            }
        }
        if self.measured.errors == errors {
            self.measured.served += 1;
        }
    }

    /// Posts; whether it succeeded.
    async fn write(&mut self, live: &Live) -> bool {
        let started = Instant::now();
        let base = self.next_base().to_owned();
        let user = self.user;
        let response = self
            .client
            .post(format!("{base}/api/posts"))
            .header("x-user-id", user)
            .json(&serde_json::json!({"content": format!("lab post by {user}")}))
            .send()
            .await;
        live.requests.fetch_add(1, Ordering::Relaxed);
        let measured = &mut self.measured;
        match response {
            Ok(response) if response.status().is_success() => {
                if let Ok(created) = response.json::<Created>().await {
                    measured.write_latency.saturating_record(micros(started));
                    measured.writes += 1;
                    self.last_write = Some(created.id);
                    return true;
                }
                measured.errors += 1;
            }
            _ => measured.errors += 1,
        }
        false
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
        if let Some(waited) = header_number::<u64>(headers, WASTED_WAIT_HEADER) {
            measured.wasted_wait_reads += 1;
            measured.wasted_wait.saturating_record(waited.max(1));
        }
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

    /// Reads the user's own posts and checks that the last write is there;
    /// `after_write` when it is the read right after the user's write.
    async fn own_read(&mut self, after_write: bool, live: &Live) {
        let started = Instant::now();
        let base = self.next_base().to_owned();
        let response = self
            .client
            .get(format!("{base}/api/posts"))
            .header("x-user-id", self.user)
            .send()
            .await;
        live.requests.fetch_add(1, Ordering::Relaxed);
        let Ok(response) = response else {
            self.measured.errors += 1;
            return;
        };
        if !response.status().is_success() {
            self.measured.errors += 1;
            return;
        }
        let headers = response.headers().clone();
        let Ok(posts) = response.json::<Vec<Post>>().await else {
            self.measured.errors += 1;
            return;
        };
        self.read_finished(&headers, started, live);
        if after_write {
            self.measured
                .post_write_read_latency
                .saturating_record(micros(started));
        }
        if let Some(id) = self.last_write {
            self.measured.own_reads += 1;
            if !posts.iter().any(|post| post.id == id) {
                self.measured.stale_own_reads += 1;
                live.stale.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Reads something that is not the user's own (`path` on the next
    /// instance): eventual by design for read-your-writes, and still checked
    /// for monotonic reads.
    async fn other_read(&mut self, path: String, live: &Live) {
        let started = Instant::now();
        let base = self.next_base().to_owned();
        let response = self
            .client
            .get(format!("{base}{path}"))
            .header("x-user-id", self.user)
            .send()
            .await;
        live.requests.fetch_add(1, Ordering::Relaxed);
        match response {
            Ok(response) if response.status().is_success() || response.status() == 404 => {
                let headers = response.headers().clone();
                let _ = response.bytes().await;
                self.read_finished(&headers, started, live);
            }
            _ => self.measured.errors += 1,
        }
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
    header_number(headers, COUNTER_HEADER)
}

/// The number in header `name`, if there is one.
fn header_number<T: std::str::FromStr>(headers: &http::HeaderMap, name: &str) -> Option<T> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .and_then(|text| text.parse().ok())
}

fn micros(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::measured::Arrivals;
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().expect("a valid header value"));
        }
        map
    }

    fn session() -> Session {
        let workload = Workload {
            users: 1,
            duration: Duration::from_secs(1),
            write_ratio: 0.2,
            arrivals: Arrivals::Open { rate: 100.0 },
            first_user: 0,
            seed: 11,
        };
        let bases = vec!["http://a".to_owned(), "http://b".to_owned()];
        Session::new(bases, &workload, 0).expect("a client")
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
    fn only_reads_that_waited_in_vain_count_as_wasted_wait() {
        let mut session = session();
        let live = Live::default();
        session.read_finished(
            &headers(&[(WASTED_WAIT_HEADER, "20500")]),
            Instant::now(),
            &live,
        );
        session.read_finished(&headers(&[(COUNTER_HEADER, "3")]), Instant::now(), &live);
        assert_eq!(session.measured.wasted_wait_reads, 1);
        assert_eq!(session.measured.wasted_wait.len(), 1);
        assert!(session.measured.wasted_wait.max() >= 20_000);
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

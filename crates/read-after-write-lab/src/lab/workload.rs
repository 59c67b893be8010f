//! Virtual users: each with its own cookie jar, writing, reading its own
//! posts, the feed and other users' profiles over real HTTP, and checking
//! every own read for its last write.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::social::{Created, Post};

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

/// Runs every user against the app at `base` until the duration is up.
pub async fn run(base: &str, workload: &Workload, live: Arc<Live>) -> Measured {
    // Every user has a profile, so profile reads find something.
    let setup = reqwest::Client::new();
    for user in workload.first_user..workload.first_user + workload.users as i64 {
        let _ = setup
            .put(format!("{base}/api/profile"))
            .header("x-user-id", user)
            .json(&serde_json::json!({"name": format!("user {user}"), "bio": "lab"}))
            .send()
            .await;
    }

    let started = Instant::now();
    let deadline = started + workload.duration;
    let mut tasks = Vec::with_capacity(workload.users);
    for i in 0..workload.users {
        let base = base.to_owned();
        let workload = workload.clone();
        let live = Arc::clone(&live);
        tasks.push(tokio::spawn(async move {
            one_user(
                &base,
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

async fn one_user(
    base: &str,
    workload: &Workload,
    user: i64,
    deadline: Instant,
    live: &Live,
) -> Measured {
    let mut measured = Measured::empty();
    let Ok(client) = reqwest::Client::builder().cookie_store(true).build() else {
        measured.errors += 1;
        return measured;
    };
    let mut rng = SmallRng::seed_from_u64(user as u64);
    let mut last_write: Option<i64> = None;
    let users = workload.users.max(1) as i64;
    while Instant::now() < deadline {
        if rng.random_bool(workload.write_ratio) {
            let started = Instant::now();
            let response = client
                .post(format!("{base}/api/posts"))
                .header("x-user-id", user)
                .json(&serde_json::json!({"content": format!("lab post by {user}")}))
                .send()
                .await;
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
            own_read(&client, base, user, last_write, &mut measured, live).await;
        } else {
            match rng.random_range(0..10) {
                0..=3 => {
                    other_read(&client, &format!("{base}/api/feed"), user, &mut measured).await
                }
                4..=6 => {
                    let other = workload.first_user + rng.random_range(0..users);
                    other_read(
                        &client,
                        &format!("{base}/api/profile/{other}"),
                        user,
                        &mut measured,
                    )
                    .await;
                }
                _ => own_read(&client, base, user, last_write, &mut measured, live).await,
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
    measured
}

/// Reads the user's own posts and checks that the last write is there.
async fn own_read(
    client: &reqwest::Client,
    base: &str,
    user: i64,
    last_write: Option<i64>,
    measured: &mut Measured,
    live: &Live,
) {
    let started = Instant::now();
    let response = client
        .get(format!("{base}/api/posts"))
        .header("x-user-id", user)
        .send()
        .await;
    let Ok(response) = response else {
        measured.errors += 1;
        return;
    };
    if !response.status().is_success() {
        measured.errors += 1;
        return;
    }
    let on_primary = routed_to_primary(&response);
    let Ok(posts) = response.json::<Vec<Post>>().await else {
        measured.errors += 1;
        return;
    };
    measured.read_latency.saturating_record(micros(started));
    measured.reads += 1;
    measured.primary_reads += u64::from(on_primary);
    if let Some(id) = last_write {
        measured.own_reads += 1;
        if !posts.iter().any(|post| post.id == id) {
            measured.stale_own_reads += 1;
            live.stale.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Reads something that is not the user's own: eventual by design.
async fn other_read(client: &reqwest::Client, url: &str, user: i64, measured: &mut Measured) {
    let started = Instant::now();
    match client.get(url).header("x-user-id", user).send().await {
        Ok(response) if response.status().is_success() || response.status() == 404 => {
            let on_primary = routed_to_primary(&response);
            let _ = response.bytes().await;
            measured.read_latency.saturating_record(micros(started));
            measured.reads += 1;
            measured.primary_reads += u64::from(on_primary);
        }
        _ => measured.errors += 1,
    }
}

fn routed_to_primary(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get("x-read-after-write")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|route| route.starts_with("node=primary"))
}

fn micros(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX)
}

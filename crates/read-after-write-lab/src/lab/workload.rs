//! Virtual users: each with its own cookie jar, writing, reading its own
//! posts, the feed and other users' profiles over real HTTP, and checking
//! every own read for its last write and every read for monotonic reads.
//!
//! Two ways to load the app ([`Arrivals`]):
//!
//! - **Open loop** (the default): actions arrive at a fixed offered rate,
//!   Poisson (exponential gaps from a seeded generator, so every strategy
//!   gets the same arrival times). Each arrival is served by a free session;
//!   an arrival that finds none is dropped and counted, never queued. So a
//!   slow strategy shows as latency and drops at the same offered load, not
//!   as a lower request rate that hides its cost.
//! - **Closed loop**: every user sends its next action as soon as the last
//!   one ended (plus a short think time): the app runs flat out, for
//!   capacity runs.
//!
//! An action is a read (own posts, the feed or a profile), or a write and
//! then at once a read of the user's own posts (the page after the post's
//! redirect).
//!
//! A session is used by one action at a time, which awaits each response
//! (body included) before the next request, alternating between the app
//! instances. So each of its reads ended before its next began, and
//! comparing a read with the session's earlier reads compares reads ordered
//! in real time, as the monotonic-read rule asks: a read that saw a smaller
//! [counter](super::readings::COUNTER_HEADER) than any earlier read of its
//! session is a violation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::session::Session;

/// How actions arrive.
#[derive(Clone, Debug)]
pub enum Arrivals {
    /// A fixed offered rate, Poisson: `rate` actions per second on average,
    /// each served by a free session or dropped.
    Open {
        /// Actions offered per second.
        rate: f64,
    },
    /// Every user acts again as soon as its last action ended, after a
    /// think time drawn uniformly from this range.
    Closed {
        /// Think time between a user's actions.
        think: (Duration, Duration),
    },
}

/// What the users do.
#[derive(Clone, Debug)]
pub struct Workload {
    /// How many sessions (users) there are: in the open loop, how many
    /// actions can be in flight at once; in the closed loop, how many run.
    pub users: usize,
    /// How long actions arrive (open loop) or users run (closed loop).
    pub duration: Duration,
    /// Probability that an action is a write (followed at once by an own
    /// read).
    pub write_ratio: f64,
    /// Open or closed loop.
    pub arrivals: Arrivals,
    /// First user id; users are `first_user..first_user + users`.
    pub first_user: i64,
    /// Seeds the arrival times and every user's choices; the same seed
    /// gives every strategy the same arrivals and the same actions.
    pub seed: u64,
}

/// How long a request may take before the client gives up on it (the app's
/// own request timeout is shorter), so every action ends.
pub(super) const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the open loop waits, once arrivals have stopped, for the actions
/// still in flight; after it they are abandoned and counted.
const DRAIN_BOUND: Duration = Duration::from_secs(15);

/// Live counters, for the progress bar.
#[derive(Debug, Default)]
pub struct Live {
    /// Requests completed.
    pub requests: AtomicU64,
    /// Own reads that missed the user's last write.
    pub stale: AtomicU64,
    /// Reads that saw an older counter than their session had seen.
    pub violations: AtomicU64,
    /// Arrivals dropped because no session was free (open loop).
    pub dropped: AtomicU64,
}

/// What one run of the workload measured.
#[derive(Debug)]
pub struct Measured {
    /// Actions that arrived (open loop) or were started (closed loop).
    pub arrivals: u64,
    /// Actions that ended without an error.
    pub served: u64,
    /// Arrivals that found no free session and were dropped (open loop).
    pub dropped: u64,
    /// Actions still in flight 15 s after arrivals stopped,
    /// abandoned (their sessions' measurements are lost).
    pub abandoned: u64,
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
    /// Latency of the own read right after a write, microseconds.
    pub post_write_read_latency: Histogram<u64>,
    /// Write latency in microseconds.
    pub write_latency: Histogram<u64>,
    /// Session reads that waited for a replica and then went to the primary
    /// anyway (the app's [`WASTED_WAIT_HEADER`](super::readings::WASTED_WAIT_HEADER)).
    pub wasted_wait_reads: u64,
    /// How long each of those waited, microseconds.
    pub wasted_wait: Histogram<u64>,
    /// How long the load was offered: the arrival window (open loop) or the
    /// users' running time (closed loop).
    pub elapsed: Duration,
}

impl Measured {
    pub(super) fn empty() -> Self {
        Measured {
            arrivals: 0,
            served: 0,
            dropped: 0,
            abandoned: 0,
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
            post_write_read_latency: histogram(),
            write_latency: histogram(),
            wasted_wait_reads: 0,
            wasted_wait: histogram(),
            elapsed: Duration::ZERO,
        }
    }

    fn merge(&mut self, other: Measured) {
        self.arrivals += other.arrivals;
        self.served += other.served;
        self.dropped += other.dropped;
        self.abandoned += other.abandoned;
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
        // All histograms have the same bounds, so adding cannot fail.
        let _ = self.read_latency.add(&other.read_latency);
        let _ = self
            .post_write_read_latency
            .add(&other.post_write_read_latency);
        let _ = self.write_latency.add(&other.write_latency);
        self.wasted_wait_reads += other.wasted_wait_reads;
        let _ = self.wasted_wait.add(&other.wasted_wait);
    }
}

pub(super) fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits; these bounds are valid.
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).expect("3 sigfigs is valid"))
}

/// Gives every user of `workload` a profile, so profile reads find
/// something. Not measured: run it before the warm-up.
pub async fn prepare(bases: &[String], workload: &Workload) {
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
}

/// Runs the workload against the app instances at `bases` until its
/// duration is up, and until the actions in flight then have ended (within
/// 15 s). Call [`prepare`] first.
pub async fn run(bases: &[String], workload: &Workload, live: Arc<Live>) -> Measured {
    match workload.arrivals {
        Arrivals::Open { rate } => open_loop(bases, workload, rate, live).await,
        Arrivals::Closed { think } => closed_loop(bases, workload, think, live).await,
    }
}

/// The sessions of `workload`, each with its cookie jar; `None` if an HTTP
/// client cannot be built.
fn sessions(bases: &[String], workload: &Workload) -> Option<Vec<Session>> {
    (0..workload.users)
        .map(|i| Session::new(bases.to_vec(), workload, i))
        .collect()
}

async fn open_loop(bases: &[String], workload: &Workload, rate: f64, live: Arc<Live>) -> Measured {
    let Some(all) = sessions(bases, workload) else {
        let mut measured = Measured::empty();
        measured.errors += 1;
        return measured;
    };
    let free = Arc::new(std::sync::Mutex::new(all));
    // Two generators: the arrival times must not depend on which sessions
    // happened to be free.
    let mut gaps = SmallRng::seed_from_u64(workload.seed);
    let mut picks = SmallRng::seed_from_u64(workload.seed.wrapping_add(1));
    let mut in_flight = tokio::task::JoinSet::new();
    let (mut arrivals, mut dropped) = (0u64, 0u64);
    let started = tokio::time::Instant::now();
    let deadline = started + workload.duration;
    let mut next = started;
    loop {
        // Exponential gaps: a Poisson process of `rate` arrivals a second.
        let uniform: f64 = gaps.random();
        next += Duration::from_secs_f64(-(1.0 - uniform).ln() / rate.max(1e-3));
        if next >= deadline {
            break;
        }
        tokio::time::sleep_until(next).await;
        arrivals += 1;
        let session = {
            let mut free = free
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if free.is_empty() {
                None
            } else {
                let index = picks.random_range(0..free.len());
                Some(free.swap_remove(index))
            }
        };
        let Some(mut session) = session else {
            dropped += 1;
            live.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let free = Arc::clone(&free);
        let live = Arc::clone(&live);
        let write_ratio = workload.write_ratio;
        in_flight.spawn(async move {
            session.act(write_ratio, &live).await;
            free.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(session);
        });
        // Reap what has ended, so the set stays as small as what is in flight.
        while in_flight.try_join_next().is_some() {}
    }
    let drained = tokio::time::timeout(DRAIN_BOUND, async {
        while in_flight.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    let abandoned = if drained { 0 } else { in_flight.len() as u64 };
    in_flight.abort_all();
    let mut total = Measured::empty();
    let sessions = std::mem::take(
        &mut *free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    for session in sessions {
        total.merge(session.finish());
    }
    total.arrivals = arrivals;
    total.dropped = dropped;
    total.abandoned = abandoned;
    total.elapsed = workload.duration;
    total
}

async fn closed_loop(
    bases: &[String],
    workload: &Workload,
    think: (Duration, Duration),
    live: Arc<Live>,
) -> Measured {
    let Some(all) = sessions(bases, workload) else {
        let mut measured = Measured::empty();
        measured.errors += 1;
        return measured;
    };
    let started = Instant::now();
    let deadline = started + workload.duration;
    let mut tasks = Vec::with_capacity(workload.users);
    for mut session in all {
        let live = Arc::clone(&live);
        let write_ratio = workload.write_ratio;
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                session.measured.arrivals += 1;
                session.act(write_ratio, &live).await;
                let (low, high) = think;
                let pause = if high > low {
                    session.rng.random_range(low..high)
                } else {
                    low
                };
                tokio::time::sleep(pause).await;
            }
            session.finish()
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

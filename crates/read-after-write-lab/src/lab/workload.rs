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

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

pub use super::measured::{Arrivals, Live, Measured, Workload};
use super::session::Session;

/// How actions arrive.
/// How long the open loop waits, once arrivals have stopped, for the actions
/// still in flight; after it they are abandoned and counted.
const DRAIN_BOUND: Duration = Duration::from_secs(15);

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

//! How far `burst` pushes replay lag on this machine: the measurement
//! behind [`BALLAST_ROWS`]. Ignored by default (it starts a cluster and
//! loads it for about 10 s); run it with
//!
//! ```sh
//! cargo test -p read-after-write-lab --lib burst_lag -- --ignored --nocapture
//! # other sizes: ballast rows, smallest first (the table only grows), and
//! # writers at once; the assertion is on the last size
//! LAB_BALLAST_ROWS=16000,32000,64000 LAB_BURST_WRITERS=2 \
//!     cargo test -p read-after-write-lab --lib burst_lag -- --ignored --nocapture
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use read_after_write::middleware::DEFAULT_MAX_WAIT;
use read_after_write_testkit::TestCluster;

use super::*;
use crate::lab::counter::{self, CounterWriter};
use crate::lab::strategy::FIXED_WAITS_MS;

/// How often each replica's lag is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(10);

/// The largest latency budget the lab runs: the longest `lsn-wait`, or the
/// layer's default `max_wait` (`monotonic`, `adaptive`) if longer.
fn largest_budget() -> Duration {
    let fixed = FIXED_WAITS_MS.iter().copied().max().unwrap_or(0);
    Duration::from_millis(u64::from(fixed)).max(DEFAULT_MAX_WAIT)
}

/// One replica's lag samples: milliseconds since the window opened, and
/// how far behind the primary's commits its replay was, milliseconds.
type Samples = Vec<(f64, f64)>;

/// Samples the replica at `url`'s replay lag until `stop`: the age of the
/// last commit it replayed, while the counter writer commits every 5 ms.
async fn sample(url: String, stop: Arc<AtomicBool>) -> Samples {
    let mut connection = sqlx::PgConnection::connect(&url).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut samples = Vec::new();
    let mut ticks = tokio::time::interval(SAMPLE_EVERY);
    while !stop.load(Ordering::Relaxed) {
        ticks.tick().await;
        let lag: f64 = sqlx::query_scalar(
            "select coalesce(extract(epoch from clock_timestamp() \
             - pg_last_xact_replay_timestamp()) * 1000, 0)::float8",
        )
        .fetch_one(&mut connection)
        .await
        .unwrap();
        samples.push((started.elapsed().as_secs_f64() * 1000.0, lag));
    }
    samples
}

/// Per burst period of the window (`end` milliseconds long): the highest
/// lag, and how long it stayed above `budget`, milliseconds.
fn per_period(samples: &Samples, budget: f64, end: f64) -> Vec<(f64, f64)> {
    let offset = BURST_OFFSET.as_secs_f64() * 1000.0;
    let period = BURST_PERIOD.as_secs_f64() * 1000.0;
    let mut periods: Vec<(f64, f64)> = Vec::new();
    for pair in samples.windows(2) {
        let ((at, lag), (next, _)) = (pair[0], pair[1]);
        if at < offset || at >= end {
            continue;
        }
        let index = ((at - offset) / period) as usize;
        if periods.len() <= index {
            periods.resize(index + 1, (0.0, 0.0));
        }
        let entry = &mut periods[index];
        entry.0 = entry.0.max(lag);
        if lag > budget {
            entry.1 += next - at;
        }
    }
    periods
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a cluster and loads it for about 10 s: run it to size BALLAST_ROWS"]
async fn burst_lag_passes_the_largest_budget() {
    let mut builder = TestCluster::builder();
    for (name, value) in primary_load::SETTINGS {
        builder = builder.setting(name, value);
    }
    for delay in Profile::Burst.delays_for(2) {
        builder = builder.replica(delay);
    }
    let cluster = builder.start().await.unwrap();
    let primary = sqlx::PgPool::connect(cluster.primary_url()).await.unwrap();
    counter::create_counter(&primary).await.unwrap();
    create_ballast(&primary, &[]).await.unwrap();
    primary_load::install(cluster.primary_url(), &["lab_counter", BALLAST_TABLE])
        .await
        .unwrap();
    let counter = CounterWriter::start(cluster.primary_url(), Duration::from_millis(5))
        .await
        .unwrap();
    let sizes: Vec<i32> = std::env::var("LAB_BALLAST_ROWS")
        .ok()
        .map(|sizes| {
            sizes
                .split(',')
                .map(|s| s.trim().parse().unwrap())
                .collect()
        })
        .unwrap_or_else(|| vec![BALLAST_ROWS]);
    let writers: usize = std::env::var("LAB_BURST_WRITERS")
        .ok()
        .map(|writers| writers.parse().unwrap())
        .unwrap_or(BURST_WRITERS);
    let budget = largest_budget().as_secs_f64() * 1000.0;
    // Three bursts: the first on freshly written pages, the others as in
    // the lab's later windows.
    let window = BURST_OFFSET + BURST_PERIOD * 3 - Duration::from_millis(1);
    // The last size's (by default the lab's): the lowest peak of its
    // later bursts.
    let mut lowest_peak = f64::INFINITY;
    for rows in sizes {
        lowest_peak = f64::INFINITY;
        fill_ballast(&primary, rows).await.unwrap();
        Profile::Burst.apply(&cluster).await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let samplers: Vec<_> = cluster
            .replica_urls()
            .into_iter()
            .map(|url| tokio::spawn(sample(url, Arc::clone(&stop))))
            .collect();
        bursts_of(&cluster, window, BurstSize { rows, writers }).await;
        stop.store(true, Ordering::Relaxed);
        for (index, sampler) in samplers.into_iter().enumerate() {
            let samples = sampler.await.unwrap();
            let samples = &samples;
            let periods = per_period(samples, budget, window.as_secs_f64() * 1000.0);
            let text: Vec<String> = periods
                .iter()
                .map(|(peak, above)| format!("peak {peak:.0} ms, {above:.0} ms above"))
                .collect();
            println!(
                "{rows} rows by {writers} writers, replica-{}: {} (budget {budget:.0} ms)",
                index + 1,
                text.join("; ")
            );
            // The first burst may differ (fresh pages); the later ones are
            // what the lab's windows meet.
            for (peak, _) in periods.iter().skip(1) {
                lowest_peak = lowest_peak.min(*peak);
            }
        }
    }
    counter.stop().await;
    primary.close().await;
    assert!(
        lowest_peak > budget,
        "a burst's replay lag peaked at {lowest_peak:.0} ms, under the largest budget ({budget:.0} ms)"
    );
}

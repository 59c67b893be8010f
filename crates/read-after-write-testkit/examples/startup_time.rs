//! Measures how long starting a primary and two replicas takes.
//!
//! ```text
//! RUST_LOG=read_after_write_testkit=debug cargo run -p read-after-write-testkit --example startup_time [runs]
//! ```

use std::time::{Duration, Instant};

use read_after_write_testkit::{KitError, TestCluster};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), KitError> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(3);
    let mut times = Vec::with_capacity(runs);
    for run in 1..=runs {
        let started = Instant::now();
        let cluster = TestCluster::start_with_delays(&[
            Duration::from_millis(50),
            Duration::from_millis(200),
        ])
        .await?;
        let elapsed = started.elapsed();
        let dropped = Instant::now();
        drop(cluster);
        println!("run {run}: start {elapsed:?}, drop {:?}", dropped.elapsed());
        times.push(elapsed);
    }
    times.sort();
    println!("median start: {:?}", times[times.len() / 2]);
    Ok(())
}

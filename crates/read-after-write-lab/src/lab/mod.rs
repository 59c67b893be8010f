//! The lab: the social app on a real lagging cluster, served once per
//! routing strategy over real HTTP on loopback, under the same workload, so
//! the guarantee and its cost are measured side by side.
//!
//! # Layout
//!
//! - [`strategy`]: the strategies compared and the two baseline backends.
//! - [`workload`]: virtual users with cookie jars, and what they measure.
//! - [`report`]: the table, JSON, Markdown and SVG outputs.

pub mod report;
pub mod strategy;
pub mod workload;

use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use read_after_write::pg::{PgReplicaSet, Selection};
use read_after_write::{KeySet, SigningKey};
use read_after_write_testkit::TestCluster;
use serde::Serialize;

use self::strategy::{PrimaryOnly, RandomReplica, Strategy};
use self::workload::{Live, Workload};
use crate::social::{self, AppConfig};

/// How the lab runs.
#[derive(Clone, Debug)]
pub struct LabConfig {
    /// Each replica's apply delay; one replica per entry.
    pub lags: Vec<Duration>,
    /// The strategies to run, in order.
    pub strategies: Vec<Strategy>,
    /// The workload each strategy gets.
    pub workload: Workload,
    /// `max_wait` for `lsn-wait`.
    pub lsn_wait: Duration,
    /// How often replicas are polled while reads wait.
    pub wait_poll: Duration,
    /// Unmeasured load before each strategy's run, so pools, caches and
    /// plans are warm for every strategy alike, not just the later ones.
    pub warmup: Duration,
    /// Show a progress bar.
    pub progress: bool,
}

/// What one strategy achieved.
#[derive(Clone, Debug, Serialize)]
pub struct StrategyResult {
    /// The strategy.
    pub strategy: Strategy,
    /// `max_wait` the strategy ran with, in milliseconds (0 where unused).
    pub max_wait_ms: u64,
    /// Own-post reads checked for the user's last write.
    pub own_reads: u64,
    /// Of those, how many missed it.
    pub stale_own_reads: u64,
    /// Read requests of every kind.
    pub reads: u64,
    /// Share of reads served by the primary, 0 to 1.
    pub primary_read_share: f64,
    /// Read latency, median, milliseconds.
    pub read_p50_ms: f64,
    /// Read latency, 99th percentile, milliseconds.
    pub read_p99_ms: f64,
    /// Write latency, median, milliseconds (includes the capture query).
    pub write_p50_ms: f64,
    /// Writes.
    pub writes: u64,
    /// Requests per second over the run.
    pub requests_per_second: f64,
    /// Failed requests.
    pub errors: u64,
}

/// Everything one lab run produced.
#[derive(Clone, Debug, Serialize)]
pub struct LabReport {
    /// The replicas' apply delays, milliseconds.
    pub lags_ms: Vec<u64>,
    /// Virtual users.
    pub users: usize,
    /// Seconds per strategy.
    pub duration_s: f64,
    /// Write probability per step.
    pub write_ratio: f64,
    /// Seconds to start the cluster.
    pub cluster_start_s: f64,
    /// CPU cores of the machine.
    pub cores: usize,
    /// One row per strategy.
    pub results: Vec<StrategyResult>,
}

/// Starts a cluster, runs every strategy in turn, and reports.
pub async fn run(config: &LabConfig) -> Result<LabReport, Box<dyn std::error::Error>> {
    let started = std::time::Instant::now();
    let mut builder = TestCluster::builder();
    for lag in &config.lags {
        builder = builder.replica(*lag);
    }
    let cluster = builder.start().await?;
    let cluster_start_s = started.elapsed().as_secs_f64();
    {
        let primary = sqlx::PgPool::connect(cluster.primary_url()).await?;
        social::migrate(&primary).await?;
        primary.close().await;
    }
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(30))
        .await?;

    let keys = KeySet::new(SigningKey::generate()?);
    let mut results = Vec::with_capacity(config.strategies.len());
    for (index, strategy) in config.strategies.iter().copied().enumerate() {
        let workload = Workload {
            first_user: 1_000_000 * (index as i64 + 1),
            ..config.workload.clone()
        };
        results.push(run_strategy(&cluster, strategy, &keys, &workload, config).await?);
    }
    Ok(LabReport {
        lags_ms: config.lags.iter().map(|d| d.as_millis() as u64).collect(),
        users: config.workload.users,
        duration_s: config.workload.duration.as_secs_f64(),
        write_ratio: config.workload.write_ratio,
        cluster_start_s,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        results,
    })
}

async fn run_strategy(
    cluster: &TestCluster,
    strategy: Strategy,
    keys: &KeySet,
    workload: &Workload,
    config: &LabConfig,
) -> Result<StrategyResult, Box<dyn std::error::Error>> {
    let selection = match strategy {
        Strategy::Naive => Selection::Random,
        _ => Selection::RoundRobin,
    };
    let mut builder = PgReplicaSet::builder()
        .primary_url(cluster.primary_url())
        .selection(selection)
        .wait_poll_interval(config.wait_poll)
        .max_connections(workload.users.clamp(4, 32) as u32);
    for replica in cluster.replicas() {
        builder = builder.replica_url(replica.name(), replica.url());
    }
    let replicas = builder.connect().await?;
    let max_wait = match strategy {
        Strategy::LsnWait => config.lsn_wait,
        _ => Duration::ZERO,
    };
    let app_config = AppConfig {
        keys: keys.clone(),
        cookie_secure: false,
        max_wait,
        // The lab counts where reads went from this header.
        debug_header: true,
        time_window: (strategy == Strategy::TimeWindow).then_some(Duration::from_secs(5)),
        // The baselines route without tokens: no token is read or issued.
        tokens: !matches!(strategy, Strategy::Naive | Strategy::Primary),
        request_timeout: Some(Duration::from_secs(5)),
    };
    let router = match strategy {
        Strategy::Naive => social::router(
            RandomReplica::new(replicas.clone()),
            replicas.clone(),
            &app_config,
        ),
        Strategy::Primary => social::router(
            PrimaryOnly::new(replicas.clone()),
            replicas.clone(),
            &app_config,
        ),
        Strategy::TimeWindow | Strategy::Lsn | Strategy::LsnWait => {
            social::router(replicas.clone(), replicas.clone(), &app_config)
        }
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });

    if !config.warmup.is_zero() {
        let warmup = Workload {
            duration: config.warmup,
            first_user: workload.first_user + 500_000,
            ..workload.clone()
        };
        workload::run(&base, &warmup, Arc::new(Live::default())).await;
    }
    let live = Arc::new(Live::default());
    let bar = progress_bar(config.progress, strategy, workload.duration);
    let ticker = {
        let bar = bar.clone();
        let live = Arc::clone(&live);
        let total = workload.duration;
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let done = started.elapsed().min(total);
                bar.set_position(done.as_millis() as u64);
                bar.set_message(format!(
                    "{} requests, {} stale",
                    live.requests.load(std::sync::atomic::Ordering::Relaxed),
                    live.stale.load(std::sync::atomic::Ordering::Relaxed)
                ));
                if done >= total {
                    break;
                }
            }
        })
    };
    let measured = workload::run(&base, workload, Arc::clone(&live)).await;
    ticker.abort();
    bar.finish_and_clear();
    let _ = stop.send(());
    let _ = server.await;
    replicas.shutdown().await;

    let ms = |micros: u64| micros as f64 / 1000.0;
    let requests = measured.reads + measured.writes;
    Ok(StrategyResult {
        strategy,
        max_wait_ms: max_wait.as_millis() as u64,
        own_reads: measured.own_reads,
        stale_own_reads: measured.stale_own_reads,
        reads: measured.reads,
        primary_read_share: if measured.reads == 0 {
            0.0
        } else {
            measured.primary_reads as f64 / measured.reads as f64
        },
        read_p50_ms: ms(measured.read_latency.value_at_quantile(0.5)),
        read_p99_ms: ms(measured.read_latency.value_at_quantile(0.99)),
        write_p50_ms: ms(measured.write_latency.value_at_quantile(0.5)),
        writes: measured.writes,
        requests_per_second: requests as f64 / measured.elapsed.as_secs_f64().max(1e-9),
        errors: measured.errors,
    })
}

fn progress_bar(enabled: bool, strategy: Strategy, duration: Duration) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(duration.as_millis() as u64);
    if let Ok(style) = ProgressStyle::with_template("{prefix:>12} [{bar:30}] {elapsed:>3} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(strategy.name());
    bar
}

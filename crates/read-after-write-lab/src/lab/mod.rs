//! The lab: the social app on a real lagging cluster, served once per
//! routing strategy over real HTTP on loopback, under the same workload, so
//! the guarantee and its cost are measured side by side.
//!
//! Each strategy runs on [`INSTANCES`] app instances, each with its own
//! replica set (so its own tracker) and its own layer, sharing the signing
//! keys, as stateless web instances behind a load balancer do. Every user
//! alternates its requests between them. A strategy may run in several
//! [variants](instance::Variant): the app's database role (superuser, with
//! `pg_monitor`, plain) and how it reaches the replicas (one URL each, or
//! one reader endpoint over all of them).
//!
//! Meanwhile a writer advances `lab_counter` on the primary every
//! [`LabConfig::counter_interval`], and every read answers the counter its
//! node had (see [`readings`]): a session whose read sees a smaller counter
//! than an earlier read of its own has seen the database go back in time, a
//! monotonic-read violation.
//!
//! # Layout
//!
//! - [`strategy`]: the strategies compared and the two baseline backends.
//! - [`instance`]: one app instance per strategy and variant.
//! - [`readings`]: what the lab measures around the app (counter, wasted
//!   wait), so the example stays an example.
//! - [`counter`]: the counter the background writer advances.
//! - [`workload`]: virtual users with cookie jars, and what they measure.
//! - [`primary_load`]: what the primary ran, counted by `pg_stat_statements`.
//! - [`connections`]: connections per app instance on each node.
//! - [`profile`]: how the replicas lag, steady or changing, per run.
//! - [`report`]: the verdict, the tables, JSON, Markdown and SVG outputs.

pub mod connections;
pub mod counter;
pub mod instance;
pub mod measured;
pub mod primary_load;
pub mod profile;
pub mod readings;
pub mod report;
mod session;
pub mod strategy;
pub mod workload;

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use read_after_write::{KeySet, SigningKey};
use read_after_write_testkit::{TcpProxy, TestCluster};
use serde::Serialize;

use self::connections::{Meter, NodeConnections};
use self::counter::CounterWriter;
use self::instance::{Instance, ReplicaMode, Variant};
use self::primary_load::PrimaryStatements;
use self::profile::Profile;
pub use self::profile::ProfileInfo;
use self::strategy::Strategy;
use self::workload::{Arrivals, Live, Workload};
use crate::roles::Role;
use crate::social;

/// App instances per strategy, each with its own replica set and layer.
pub const INSTANCES: usize = 2;

/// How the lab runs.
#[derive(Clone, Debug)]
pub struct LabConfig {
    /// The lag profiles to run, in order; every strategy runs under each.
    pub profiles: Vec<Profile>,
    /// The strategies to run, in order.
    pub strategies: Vec<Strategy>,
    /// The database roles each strategy runs as, in order.
    pub roles: Vec<Role>,
    /// How the app reaches the replicas, each mode in turn for each role.
    pub replicas: Vec<ReplicaMode>,
    /// The workload each strategy gets.
    pub workload: Workload,
    /// How often replicas are polled while reads wait.
    pub wait_poll: Duration,
    /// Unmeasured load before each strategy's run, so pools, caches and
    /// plans are warm for every strategy alike, not just the later ones.
    pub warmup: Duration,
    /// How often the background writer advances `lab_counter`.
    pub counter_interval: Duration,
    /// Show a progress bar (on a terminal), or a line per finished run
    /// on stdout (elsewhere).
    pub progress: bool,
}

impl LabConfig {
    /// Every variant each strategy runs in: roles, then replica modes.
    pub fn variants(&self) -> Vec<Variant> {
        let roles = if self.roles.is_empty() {
            vec![Role::Superuser]
        } else {
            self.roles.clone()
        };
        let modes = if self.replicas.is_empty() {
            vec![ReplicaMode::Direct]
        } else {
            self.replicas.clone()
        };
        roles
            .iter()
            .flat_map(|&role| {
                modes
                    .iter()
                    .map(move |&replicas| Variant { role, replicas })
            })
            .collect()
    }
}

/// What one strategy achieved.
#[derive(Clone, Debug, Serialize)]
pub struct StrategyResult {
    /// The lag profile it ran under.
    pub profile: Profile,
    /// The strategy.
    pub strategy: Strategy,
    /// The app's database role.
    pub role: Role,
    /// How the app reached the replicas.
    pub replicas: ReplicaMode,
    /// Whether the run had other variants beside this one, so its name
    /// needs the variant ([`label`](Self::label)).
    #[serde(skip)]
    pub labelled: bool,
    /// `max_wait` the strategy ran with, in milliseconds (0 where unused),
    /// as the layer's self-check reported it.
    pub max_wait_ms: u64,
    /// The latency budget the library's predicted routing ran with,
    /// milliseconds: `adaptive` only (its default: the read's `max_wait`
    /// unless the default policy caps it), 0 for the others.
    pub latency_budget_ms: u64,
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
    /// HTTP requests per second over the run (a write action makes two).
    pub requests_per_second: f64,
    /// Actions offered per second: arrivals over the arrival window (open
    /// loop), or actions started per second (closed loop).
    pub offered_rps: f64,
    /// Actions that ended without an error, per second of the window.
    pub achieved_rps: f64,
    /// Arrivals dropped because every session was busy (open loop).
    pub dropped_arrivals: u64,
    /// Actions still in flight long after arrivals stopped, abandoned.
    pub abandoned_actions: u64,
    /// Reads right after the session's own write (one per successful
    /// write): the sample behind the post-write percentiles.
    pub post_write_reads: u64,
    /// Latency of a session's first read after its own write (the page
    /// after the post's redirect), median, milliseconds.
    pub post_write_read_p50_ms: f64,
    /// The same, 99th percentile, milliseconds.
    pub post_write_read_p99_ms: f64,
    /// Statements the primary ran during the measured window for the
    /// workload, counted by `pg_stat_statements` (see [`primary_load`]).
    pub primary_statements: u64,
    /// Of those, per 1,000 HTTP requests.
    pub primary_queries_per_1k_requests: f64,
    /// Session reads that waited for a replica and then went to the
    /// primary anyway (`wait_timed_out`).
    pub wasted_wait_reads: u64,
    /// How long those waited, 99th percentile, milliseconds (0 when none
    /// did).
    pub wasted_wait_ms_p99: f64,
    /// Failed requests.
    pub errors: u64,
    /// Sessions (virtual users) whose reads were checked for monotonic
    /// reads.
    pub sessions: u64,
    /// Of those, how many saw the database go back in time at least once.
    pub sessions_with_violations: u64,
    /// Reads that answered the counter, each checked against its session's
    /// earlier reads.
    pub counter_reads: u64,
    /// Reads that saw a smaller counter than an earlier read of the same
    /// session (reads of a session never overlap: each ended before the
    /// next began).
    pub monotonic_violations: u64,
    /// Share of read responses that set the affinity cookie (a new token),
    /// 0 to 1.
    pub read_token_share: f64,
    /// How many times the writer advanced the counter during the measured
    /// run (about duration / counter interval when it kept pace).
    pub counter_advances: u64,
    /// Connections per app instance on each node, at their peak over the
    /// measured window (see [`connections`]).
    pub connections: Vec<NodeConnections>,
}

impl StrategyResult {
    /// The strategy's name, with the variant when the run had several
    /// (`adaptive plain/endpoint`).
    pub fn label(&self) -> String {
        let variant = Variant {
            role: self.role,
            replicas: self.replicas,
        };
        label(self.strategy, variant, self.labelled)
    }
}

/// A run's name: the strategy, and the variant when `labelled`.
fn label(strategy: Strategy, variant: Variant, labelled: bool) -> String {
    if labelled {
        format!("{strategy} {}/{}", variant.role, variant.replicas)
    } else {
        strategy.name()
    }
}

/// Everything one lab run produced.
#[derive(Clone, Debug, Serialize)]
pub struct LabReport {
    /// Virtual users (sessions).
    pub users: usize,
    /// `open` (a fixed offered rate) or `closed` (users act flat out).
    pub load: &'static str,
    /// Offered actions per second in the open loop; 0 in the closed loop.
    pub rate: f64,
    /// Seconds per strategy.
    pub duration_s: f64,
    /// Write probability per step.
    pub write_ratio: f64,
    /// Seconds to start the cluster.
    pub cluster_start_s: f64,
    /// CPU cores of the machine.
    pub cores: usize,
    /// App instances per strategy.
    pub instances: usize,
    /// Replicas in the cluster (see [`Profile::cluster_replicas`]).
    pub replicas: usize,
    /// How often the writer advanced the counter, milliseconds.
    pub counter_interval_ms: f64,
    /// The layer's default `max_wait` (what `monotonic` and `adaptive` run
    /// with), milliseconds, read from the layer's self-check; `None` when
    /// no strategy run used it.
    pub layer_default_max_wait_ms: Option<u64>,
    /// The profiles run, in order.
    pub profiles: Vec<ProfileInfo>,
    /// One row per profile and strategy, profile by profile.
    pub results: Vec<StrategyResult>,
}

impl LabReport {
    /// The results of one profile, in the order they ran.
    pub fn results_of(&self, profile: &Profile) -> Vec<&StrategyResult> {
        self.results
            .iter()
            .filter(|result| &result.profile == profile)
            .collect()
    }
}

/// Starts a cluster, runs every strategy in turn, and reports.
pub async fn run(config: &LabConfig) -> Result<LabReport, Box<dyn std::error::Error>> {
    let started = std::time::Instant::now();
    let mut builder = TestCluster::builder();
    for (name, value) in primary_load::SETTINGS {
        builder = builder.setting(name, value);
    }
    // As many replicas as the profile listing the most needs; each
    // profile sets every replica's delay as it starts.
    let replicas = Profile::cluster_replicas(&config.profiles);
    let first = config.profiles.first().unwrap_or(&Profile::Skewed);
    for delay in first.delays_for(replicas) {
        builder = builder.replica(delay);
    }
    let cluster = builder.start().await?;
    let cluster_start_s = started.elapsed().as_secs_f64();
    {
        let primary = sqlx::PgPool::connect(cluster.primary_url()).await?;
        social::migrate(&primary).await?;
        counter::create_counter(&primary).await?;
        profile::create_ballast(&primary, &config.profiles).await?;
        primary.close().await;
    }
    // After every table is there, so the roles' grants reach the counter
    // that every read answers.
    crate::roles::create_roles(&cluster).await?;
    primary_load::install(
        cluster.primary_url(),
        &["lab_counter", profile::BALLAST_TABLE],
    )
    .await?;
    let mut statements = PrimaryStatements::connect(cluster.primary_url()).await?;
    // The replicas have the counter's table and row before any read asks.
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(30))
        .await?;
    let counter = CounterWriter::start(cluster.primary_url(), config.counter_interval).await?;

    // One reader endpoint for the whole run, as a deployment has one.
    let variants = config.variants();
    let endpoint = if variants.iter().any(|v| v.replicas == ReplicaMode::Endpoint) {
        Some(TcpProxy::start_balanced(&cluster.replica_ports()).await?)
    } else {
        None
    };

    let keys = KeySet::new(SigningKey::generate()?);
    let mut results = Vec::with_capacity(config.strategies.len() * config.profiles.len());
    let mut runs = 0i64;
    for profile in &config.profiles {
        if let Err(error) = profile.apply(&cluster).await {
            counter.stop().await;
            return Err(error);
        }
        for strategy in config.strategies.iter().copied() {
            for variant in variants.iter().copied() {
                runs += 1;
                // Users of every run are others, so each starts without posts.
                let workload = Workload {
                    first_user: 1_000_000 * runs,
                    ..config.workload.clone()
                };
                let run = Run {
                    cluster: &cluster,
                    endpoint: endpoint.as_ref(),
                    profile,
                    strategy,
                    variant,
                    labelled: variants.len() > 1,
                    keys: &keys,
                    workload: &workload,
                    config,
                    counter: &counter,
                };
                match run_strategy(run, &mut statements).await {
                    Ok(result) => {
                        if config.progress && !std::io::stdout().is_terminal() {
                            // Where no progress bar shows, a line per run.
                            println!("{}", report::line(&result));
                        }
                        results.push(result);
                    }
                    Err(error) => {
                        counter.stop().await;
                        return Err(error);
                    }
                }
            }
        }
    }
    counter.stop().await;
    let layer_default_max_wait_ms = results
        .iter()
        .find(|r| r.strategy.max_wait().is_none())
        .map(|r| r.max_wait_ms);
    let profiles = config
        .profiles
        .iter()
        .map(|profile| ProfileInfo::new(profile, replicas))
        .collect();
    Ok(LabReport {
        users: config.workload.users,
        load: match config.workload.arrivals {
            Arrivals::Open { .. } => "open",
            Arrivals::Closed { .. } => "closed",
        },
        rate: match config.workload.arrivals {
            Arrivals::Open { rate } => rate,
            Arrivals::Closed { .. } => 0.0,
        },
        duration_s: config.workload.duration.as_secs_f64(),
        write_ratio: config.workload.write_ratio,
        cluster_start_s,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        instances: INSTANCES,
        replicas,
        counter_interval_ms: config.counter_interval.as_secs_f64() * 1000.0,
        layer_default_max_wait_ms,
        profiles,
        results,
    })
}

/// One strategy's run under one profile.
struct Run<'a> {
    cluster: &'a TestCluster,
    /// The reader endpoint over the replicas, when a variant uses one.
    endpoint: Option<&'a TcpProxy>,
    profile: &'a Profile,
    strategy: Strategy,
    variant: Variant,
    /// Other variants run too: names carry the variant.
    labelled: bool,
    keys: &'a KeySet,
    workload: &'a Workload,
    config: &'a LabConfig,
    counter: &'a CounterWriter,
}

async fn run_strategy(
    run: Run<'_>,
    statements: &mut PrimaryStatements,
) -> Result<StrategyResult, Box<dyn std::error::Error>> {
    let Run {
        cluster,
        endpoint,
        profile,
        strategy,
        variant,
        labelled,
        keys,
        workload,
        config,
        counter,
    } = run;
    let mut instances = Vec::with_capacity(INSTANCES);
    for _ in 0..INSTANCES {
        let started =
            Instance::start(cluster, endpoint, strategy, variant, keys, workload, config).await;
        match started {
            Ok(instance) => instances.push(instance),
            Err(error) => {
                for instance in instances {
                    instance.stop().await;
                }
                return Err(error);
            }
        }
    }
    let bases: Vec<String> = instances.iter().map(|i| i.base.clone()).collect();
    let max_wait = instances
        .first()
        .and_then(|instance| instance.settings.max_wait())
        .or(strategy.max_wait())
        .unwrap_or_default();

    workload::prepare(&bases, workload).await;
    if !config.warmup.is_zero() {
        // The warm-up's users are others, with other choices, so the
        // measured users start with empty cookie jars.
        let warmup = Workload {
            duration: config.warmup,
            first_user: workload.first_user + 500_000,
            seed: workload.seed.wrapping_add(500_000),
            ..workload.clone()
        };
        workload::prepare(&bases, &warmup).await;
        workload::run(&bases, &warmup, Arc::new(Live::default())).await;
    }
    let live = Arc::new(Live::default());
    let bar = progress_bar(
        config.progress,
        profile,
        &label(strategy, variant, labelled),
        workload.duration,
    );
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
                    "{} requests, {} dropped, {} stale, {} went back in time",
                    live.requests.load(Ordering::Relaxed),
                    live.dropped.load(Ordering::Relaxed),
                    live.stale.load(Ordering::Relaxed),
                    live.violations.load(Ordering::Relaxed)
                ));
                if done >= total {
                    break;
                }
            }
        })
    };
    let advances_before = counter.advances();
    let reset = statements.reset().await;
    let meter = Meter::start(cluster, INSTANCES);
    // The profile's disturbance starts with the measured window, so every
    // strategy meets it at the same moments.
    let (measured, ()) = tokio::join!(
        workload::run(&bases, workload, Arc::clone(&live)),
        profile.disturb(cluster, workload.duration)
    );
    let primary_statements = match reset {
        Ok(()) => statements.count().await,
        Err(error) => Err(error),
    };
    let counter_advances = counter.advances() - advances_before;
    let connections = meter.stop().await;
    ticker.abort();
    bar.finish_and_clear();
    for instance in instances {
        instance.stop().await;
    }
    let primary_statements = primary_statements?;

    let ms = |micros: u64| micros as f64 / 1000.0;
    let requests = measured.reads + measured.writes;
    let seconds = measured.elapsed.as_secs_f64().max(1e-9);
    Ok(StrategyResult {
        profile: profile.clone(),
        strategy,
        role: variant.role,
        replicas: variant.replicas,
        labelled,
        max_wait_ms: max_wait.as_millis() as u64,
        latency_budget_ms: strategy.latency_budget(max_wait).as_millis() as u64,
        own_reads: measured.own_reads,
        stale_own_reads: measured.stale_own_reads,
        reads: measured.reads,
        primary_read_share: share(measured.primary_reads, measured.reads),
        read_p50_ms: ms(measured.read_latency.value_at_quantile(0.5)),
        read_p99_ms: ms(measured.read_latency.value_at_quantile(0.99)),
        write_p50_ms: ms(measured.write_latency.value_at_quantile(0.5)),
        writes: measured.writes,
        requests_per_second: requests as f64 / seconds,
        offered_rps: measured.arrivals as f64 / seconds,
        achieved_rps: measured.served as f64 / seconds,
        dropped_arrivals: measured.dropped,
        abandoned_actions: measured.abandoned,
        post_write_reads: measured.post_write_read_latency.len(),
        post_write_read_p50_ms: ms(measured.post_write_read_latency.value_at_quantile(0.5)),
        post_write_read_p99_ms: ms(measured.post_write_read_latency.value_at_quantile(0.99)),
        primary_statements,
        primary_queries_per_1k_requests: primary_statements as f64 * 1000.0
            / requests.max(1) as f64,
        wasted_wait_reads: measured.wasted_wait_reads,
        wasted_wait_ms_p99: ms(measured.wasted_wait.value_at_quantile(0.99)),
        errors: measured.errors,
        sessions: measured.sessions,
        sessions_with_violations: measured.sessions_with_violations,
        counter_reads: measured.counter_reads,
        monotonic_violations: measured.monotonic_violations,
        read_token_share: share(measured.read_tokens, measured.reads),
        counter_advances,
        connections,
    })
}

/// `part` of `whole`, 0 to 1 (0 when there is no whole).
fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn progress_bar(enabled: bool, profile: &Profile, label: &str, duration: Duration) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(duration.as_millis() as u64);
    if let Ok(style) = ProgressStyle::with_template("{prefix:>27} [{bar:30}] {elapsed:>3} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(format!("{profile} {label}"));
    bar
}

//! The lab: measures read-after-write consistency, monotonic reads and
//! their cost on a real lagging PostgreSQL cluster, strategy by strategy,
//! under five lag profiles, at a fixed offered load (open loop).
//!
//! ```sh
//! cargo run --release                       # defaults: 5 profiles x 12 strategies, about 4 minutes
//! cargo run --release -- --profile skewed,burst --strategies lsn,lsn-wait-40ms,adaptive
//! # your own steady lags, one apply delay per replica (here three replicas)
//! cargo run --release -- --profile steady:20ms,90ms,250ms,burst --strategies naive,adaptive
//! cargo run --release -- --closed-loop --users 64 --profile skewed   # capacity, flat out
//! cargo run -- --duration 3s --warmup 500ms --users 16 --check       # CI's short run (skewed)
//! cargo run --release -- --json > results.json
//! # where users deploy: each role, one URL per replica and a reader endpoint
//! cargo run --release -- --profile skewed --strategies adaptive \
//!     --role superuser,monitor,plain --replicas direct,endpoint
//! ```
//!
//! On a terminal it shows a progress bar per run and ends with a short
//! verdict; elsewhere (CI, a pipe) a line per finished run instead of the
//! bars. The full tables go to `results.md` (`--tables` prints them too).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use read_after_write_lab::lab::instance::ReplicaMode;
use read_after_write_lab::lab::profile::{Profile, ProfileList};
use read_after_write_lab::lab::strategy::Strategy;
use read_after_write_lab::lab::workload::{Arrivals, Workload};
use read_after_write_lab::lab::{self, report, LabConfig};
use read_after_write_lab::roles::Role;

/// Measure read-your-writes and monotonic reads on a throwaway primary with
/// lagging replicas (two, or as many as a `steady:<delays>` profile lists):
/// stale own reads, reads that went back in time, the
/// primary's share of reads and statements per 1,000 requests, post-write
/// read latency and time wasted waiting, for each routing strategy under
/// each lag profile, at a fixed offered rate, each served by two app
/// instances.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Lag profiles to run, in order (comma-separated): steady-low,
    /// steady-high, skewed, spiky, burst, or `steady:<delay>,...` with one
    /// apply delay per replica (steady:20ms,90ms,250ms: three replicas;
    /// 20ms, plain 20 or 1.5s; at most 8 replicas and 10 s). The cluster
    /// gets as many replicas as the profile listing the most; one listing
    /// fewer gives the others its last delay. Default: the five built-in
    /// profiles; with `--check`, skewed only (CI's short run).
    #[arg(long)]
    profile: Vec<ProfileList>,
    /// Offered load: actions per second, Poisson arrivals (a write action
    /// is a post and the read of the user's own posts after it, so HTTP
    /// requests per second are about rate × (1 + write ratio)).
    #[arg(long, default_value_t = 400.0)]
    rate: f64,
    /// Closed loop instead: every user acts again as soon as its last
    /// action ended (after a 1 to 10 ms think time), flat out. For capacity
    /// runs; latency then measures saturation as much as cost.
    #[arg(long)]
    closed_loop: bool,
    /// Seeds the arrival times and the users' choices (the same for every
    /// strategy).
    #[arg(long, default_value_t = 11)]
    seed: u64,
    /// Virtual users (sessions), each with its own cookie jar. In the open
    /// loop, how many actions can be in flight at once: an arrival that
    /// finds every session busy is dropped and counted.
    #[arg(long, default_value_t = 64)]
    users: usize,
    /// How long each strategy is measured under each profile (e.g. 3s,
    /// 500ms).
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    duration: Duration,
    /// Probability that a user's step is a write (then an immediate own read).
    #[arg(long, default_value_t = 0.2)]
    write_ratio: f64,
    /// The shortest gap between two polls of a replica reads wait for, and
    /// between two re-checks of a waiting read (the wait itself runs on the
    /// replica).
    #[arg(long, value_parser = parse_duration, default_value = "2ms")]
    wait_poll: Duration,
    /// Unmeasured load before each strategy, to warm pools and caches.
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    warmup: Duration,
    /// Strategies to run, in order (comma-separated): naive, primary,
    /// time-window, lsn, lsn-wait-Nms, monotonic, adaptive,
    /// adaptive-tokio-postgres (adaptive with the app on tokio-postgres).
    /// Default: naive, primary, time-window, lsn, lsn-wait-10ms to
    /// lsn-wait-160ms (doubling), monotonic, adaptive and
    /// adaptive-tokio-postgres; with `--check`, one lsn-wait (20 ms)
    /// instead of five, to keep CI's short run short.
    #[arg(long, value_delimiter = ',')]
    strategies: Option<Vec<Strategy>>,
    /// How often a background writer advances the counter that every read
    /// answers (for counting monotonic-read violations).
    #[arg(long, value_parser = parse_duration, default_value = "5ms")]
    counter_interval: Duration,
    /// The app's database role, or several (comma-separated), each a run
    /// of its own: superuser, monitor (a LOGIN role with pg_monitor) or
    /// plain (table privileges only; it proves replicas by the heartbeat
    /// table the lab creates).
    #[arg(long, value_delimiter = ',', default_value = "superuser")]
    role: Vec<Role>,
    /// How the app reaches the replicas, or both (comma-separated), each a
    /// run of its own: direct (one URL per replica) or endpoint (one URL,
    /// a round-robin proxy over every replica, as a reader endpoint is).
    #[arg(long, value_delimiter = ',', default_value = "direct")]
    replicas: Vec<ReplicaMode>,
    /// Print the full tables after the verdict (they are in results.md
    /// either way).
    #[arg(long)]
    tables: bool,
    /// Print the results as JSON on stdout instead of the verdict.
    #[arg(long)]
    json: bool,
    /// Where results.json, results.md and the frontier-PROFILE.svg charts go.
    #[arg(long, default_value_os_t = default_out_dir())]
    out: PathBuf,
    /// Exit non-zero unless, under every profile run, every strategy but
    /// naive had 0 stale own reads, monotonic and primary had 0 reads that
    /// went back in time, and naive went stale (and back in time where the
    /// replicas differ: skewed, spiky, a `steady:<delays>` whose delays are
    /// 100 ms apart or more), the negative control. The
    /// correctness columns only; speed is never asserted. Without
    /// --profile and --strategies it runs skewed only, with one lsn-wait.
    #[arg(long)]
    check: bool,
}

fn default_out_dir() -> PathBuf {
    // The workspace's target directory, wherever the lab is run from.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("lab")
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((text, "s"), |at| text.split_at(at));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("not a duration: {text:?} (try 30ms or 20s)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" | "min" => value * 60.0,
        _ => return Err(format!("unknown unit in {text:?}: use ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("not a duration: {text:?}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // Behind a reader endpoint (--replicas endpoint) sqlx logs
                // at error level every connection a server's pool refuses
                // because it reached another server, as the library
                // expects; and burst's large writes are slow statements
                // on purpose (sqlx warns past 1 s). RUST_LOG brings them
                // back.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(
                        "warn,sqlx_core::pool::inner=off,sqlx::query=error",
                    )
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let strategies = match &args.strategies {
        Some(strategies) if strategies.is_empty() => {
            eprintln!("--strategies needs at least one strategy");
            return ExitCode::from(2);
        }
        Some(strategies) => strategies.clone(),
        None if args.check => Strategy::all()
            .into_iter()
            .filter(|strategy| match strategy {
                Strategy::LsnWait { max_wait_ms } => *max_wait_ms == 20,
                _ => true,
            })
            .collect(),
        None => Strategy::all(),
    };
    // Each --profile's list, in order (an empty one does not parse).
    let profiles: Vec<Profile> = args
        .profile
        .iter()
        .flat_map(|list| list.0.iter().cloned())
        .collect();
    let profiles = match profiles {
        given if !given.is_empty() => given,
        _ if args.check => vec![Profile::Skewed],
        _ => Profile::ALL.to_vec(),
    };
    if args.counter_interval.is_zero() {
        eprintln!("--counter-interval must be above zero");
        return ExitCode::from(2);
    }
    let rate_ok = args.rate.is_finite() && args.rate > 0.0;
    if !args.closed_loop && !rate_ok {
        eprintln!("--rate must be above zero");
        return ExitCode::from(2);
    }
    if !(0.0..=1.0).contains(&args.write_ratio) {
        eprintln!("--write-ratio must be between 0 and 1");
        return ExitCode::from(2);
    }
    let config = LabConfig {
        profiles: profiles.clone(),
        wait_poll: args.wait_poll,
        warmup: args.warmup,
        strategies: strategies.clone(),
        roles: args.role.clone(),
        replicas: args.replicas.clone(),
        counter_interval: args.counter_interval,
        workload: Workload {
            users: args.users.max(1),
            duration: args.duration,
            write_ratio: args.write_ratio,
            arrivals: if args.closed_loop {
                Arrivals::Closed {
                    think: (Duration::from_millis(1), Duration::from_millis(10)),
                }
            } else {
                Arrivals::Open { rate: args.rate }
            },
            first_user: 0,
            seed: args.seed,
        },
        progress: !args.json,
    };
    if !args.json {
        let names: Vec<String> = profiles.iter().map(|p| p.name()).collect();
        let variants = config.variants().len();
        let replicas = Profile::cluster_replicas(&profiles);
        eprintln!(
            "starting a primary with {replicas} lagging replica{}; {} strategies{} under {} ...",
            if replicas == 1 { "" } else { "s" },
            strategies.len(),
            if variants > 1 {
                format!(" in {variants} variants (role, replicas)")
            } else {
                String::new()
            },
            names.join(", ")
        );
    }
    let report = match lab::run(&config).await {
        Ok(report) => report,
        Err(error) => {
            eprintln!("lab failed: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(error) = report::write_files(&report, &args.out) {
        eprintln!(
            "could not write results under {}: {error}",
            args.out.display()
        );
    }
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(json) => println!("{json}"),
            Err(error) => eprintln!("could not encode results: {error}"),
        }
    } else {
        let out = args.out.canonicalize().unwrap_or_else(|_| args.out.clone());
        if args.tables {
            println!("{}", report::table(&report));
        }
        println!("\n{}", report::verdict(&report, &out));
    }
    if args.check {
        let failures = check(&report);
        if failures.is_empty() {
            eprintln!(
                "check passed: 0 stale own reads for every consistent strategy, \
                 0 reads back in time for monotonic and primary; naive went stale and back in time"
            );
        } else {
            for failure in &failures {
                eprintln!("check failed: {failure}");
            }
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// What `--check` finds wrong with a report; empty when it passes.
/// Strategies that promise neither guarantee (lsn-wait's reads may go back
/// in time) are printed in the table, never failed on. Naive must go stale
/// under every profile, and back in time under those whose replicas
/// differ ([`Profile::replicas_differ`]).
fn check(report: &lab::LabReport) -> Vec<String> {
    let mut failures = Vec::new();
    for result in &report.results {
        let name = format!("{} under {}", result.strategy, result.profile);
        let stale = result.stale_own_reads;
        let back = result.monotonic_violations;
        let naive = result.strategy == Strategy::Naive;
        if result.strategy.promises_read_your_writes() && stale > 0 {
            failures.push(format!("{name}: {stale} stale own reads, expected 0"));
        }
        if result.strategy.promises_monotonic_reads() && back > 0 {
            failures.push(format!(
                "{name}: {back} reads went back in time (of {} checked, in {} of {} sessions), expected 0",
                result.counter_reads, result.sessions_with_violations, result.sessions
            ));
        }
        if naive && stale == 0 {
            failures.push(format!(
                "{name}: 0 stale own reads; the lag is not showing, so the check proves nothing"
            ));
        }
        if naive && back == 0 && result.profile.replicas_differ() {
            failures.push(format!(
                "{name}: no read went back in time; the replicas' different lags are not showing, \
                 so the monotonic check proves nothing"
            ));
        }
        if result.own_reads == 0 {
            failures.push(format!("{name}: no own reads were checked"));
        }
        if result.counter_reads == 0 {
            failures.push(format!("{name}: no read was checked for monotonic reads"));
        }
    }
    failures
}

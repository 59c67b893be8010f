//! The lab: measures read-after-write consistency and its cost on a real
//! lagging PostgreSQL cluster, strategy by strategy.
//!
//! ```sh
//! cargo run --release                       # defaults: about two minutes
//! cargo run --release -- --duration 5s --users 16 --check   # CI's short run
//! cargo run --release -- --json > results.json
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use read_after_write_lab::lab::strategy::Strategy;
use read_after_write_lab::lab::workload::Workload;
use read_after_write_lab::lab::{self, report, LabConfig};

/// Measure read-your-writes on a throwaway primary with lagging replicas:
/// stale own reads, primary read share, latency and throughput for each
/// routing strategy, side by side.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Replica apply delays, one replica each (comma-separated, e.g. 30ms,120ms).
    #[arg(long, value_delimiter = ',', value_parser = parse_duration, default_value = "30ms,120ms")]
    lag: Vec<Duration>,
    /// Virtual users, each with its own cookie jar.
    #[arg(long, default_value_t = 64)]
    users: usize,
    /// How long each strategy runs (e.g. 20s, 500ms).
    #[arg(long, value_parser = parse_duration, default_value = "20s")]
    duration: Duration,
    /// Probability that a user's step is a write (then an immediate own read).
    #[arg(long, default_value_t = 0.2)]
    write_ratio: f64,
    /// max_wait for lsn-wait; default: the smallest lag plus 10 ms.
    #[arg(long, value_parser = parse_duration)]
    max_wait: Option<Duration>,
    /// How often replicas are polled while a read waits for them (lsn-wait).
    #[arg(long, value_parser = parse_duration, default_value = "2ms")]
    wait_poll: Duration,
    /// Unmeasured load before each strategy, to warm pools and caches.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    warmup: Duration,
    /// Strategies to run, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "naive,primary,time-window,lsn,lsn-wait"
    )]
    strategies: Vec<Strategy>,
    /// Print the results as JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Where results.json, results.md and chart.svg go.
    #[arg(long, default_value_os_t = default_out_dir())]
    out: PathBuf,
    /// Exit non-zero unless lsn, lsn-wait, time-window and primary had 0
    /// stale own reads and naive had some (the correctness columns; speed is
    /// never asserted).
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
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.lag.is_empty() {
        eprintln!("--lag needs at least one replica delay");
        return ExitCode::from(2);
    }
    if !(0.0..=1.0).contains(&args.write_ratio) {
        eprintln!("--write-ratio must be between 0 and 1");
        return ExitCode::from(2);
    }
    let smallest = args.lag.iter().copied().min().unwrap_or_default();
    let config = LabConfig {
        lsn_wait: args
            .max_wait
            .unwrap_or(smallest + Duration::from_millis(10)),
        lags: args.lag.clone(),
        wait_poll: args.wait_poll,
        warmup: args.warmup,
        strategies: args.strategies.clone(),
        workload: Workload {
            users: args.users.max(1),
            duration: args.duration,
            write_ratio: args.write_ratio,
            think: (Duration::from_millis(1), Duration::from_millis(10)),
            first_user: 0,
        },
        progress: !args.json,
    };
    if !args.json {
        eprintln!(
            "starting a primary with {} lagging replicas ...",
            args.lag.len()
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
        println!("{}", report::table(&report));
        let out = args.out.canonicalize().unwrap_or_else(|_| args.out.clone());
        println!(
            "results: {} (results.json, results.md, chart.svg)",
            out.display()
        );
    }
    if args.check {
        let mut failures = Vec::new();
        for result in &report.results {
            let stale = result.stale_own_reads;
            if result.strategy.promises_read_your_writes() && stale > 0 {
                failures.push(format!(
                    "{}: {stale} stale own reads, expected 0",
                    result.strategy
                ));
            }
            if result.strategy == Strategy::Naive && stale == 0 {
                failures.push(
                    "naive: 0 stale own reads; the lag is not showing, so the check proves nothing"
                        .to_owned(),
                );
            }
            if result.own_reads == 0 {
                failures.push(format!("{}: no own reads were checked", result.strategy));
            }
        }
        if failures.is_empty() {
            eprintln!(
                "check passed: 0 stale own reads for every consistent strategy; naive went stale"
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

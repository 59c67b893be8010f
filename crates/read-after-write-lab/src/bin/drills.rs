//! The fault campaign: every drill (failovers, an orphaned replica, split
//! brain, a frozen primary, terminated backends, app restarts, a killed
//! replica, a reader endpoint, a frozen replica, a rolling key rotation,
//! sign-ups) against the social app on a real cluster, for each database
//! role, judged by a checker over the whole history; and first, a negative
//! control (`control-naive`: the same load with the app's tokens off and no
//! fault) that must go stale, or the check proves nothing.
//!
//! ```sh
//! cargo run -p read-after-write-lab --release --bin drills                 # about 30 minutes
//! cargo run -p read-after-write-lab --bin drills -- --short --check        # CI, about 4 minutes
//! cargo run -p read-after-write-lab --release --bin drills -- --drills split-brain,frozen-replica --runs 1
//! cargo run -p read-after-write-lab --bin drills -- --short --check --backend tokio-postgres
//! ```
//!
//! `--backend tokio-postgres` (or `diesel-async`, or `sea-orm`) serves the
//! same API over tokio-postgres (`examples/tokio_postgres`), diesel-async
//! (`examples/diesel_async`) or SeaORM (`examples/sea_orm`) instead of the
//! social app on sqlx; the load, drills and checks are the same.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use read_after_write_lab::drills::harness::{AppBackend, AppSettings, Role};
use read_after_write_lab::drills::load::LoadConfig;
use read_after_write_lab::drills::scenarios::{Drill, Timing};
use read_after_write_lab::drills::{self, report, CampaignConfig};

/// Run fault drills against the social app on a throwaway cluster and
/// count stale own reads, lost writes, hung requests and errors outside
/// each fault's window.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Runs per drill and role (default 3; 1 with --short).
    #[arg(long)]
    runs: Option<usize>,
    /// The short form for CI: one run per drill of about 6 s, the roles
    /// taken in turn so each appears.
    #[arg(long)]
    short: bool,
    /// Exit non-zero on any stale own read, any hung request or error
    /// outside a fault window, any canary violation, or any drill that
    /// could not be carried out or did not exercise what it is for (no read
    /// for an unknown key in rolling-key-rotation, none for a later token
    /// format in rolling-format-upgrade, none checked after a sign-up); or
    /// when the negative control (tokens off) shows no stale
    /// own read, its stale reads being expected.
    #[arg(long)]
    check: bool,
    /// Skip the negative control: the run with the app's tokens off that
    /// shows the checker can see staleness (about 10 s). Not with --check.
    #[arg(long, conflicts_with = "check")]
    no_control: bool,
    /// Print the results as JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Run the app with monotonic reads on: the same drills and checks,
    /// with sessions that must leave their replica through the primary.
    #[arg(long)]
    monotonic: bool,
    /// Drills to run, in order (default: all).
    #[arg(long, value_delimiter = ',')]
    drills: Vec<Drill>,
    /// The app to serve: `sqlx` (the social app), `tokio-postgres`,
    /// `diesel-async` or `sea-orm` (the same API over that driver).
    #[arg(long, default_value_t = AppBackend::Sqlx)]
    backend: AppBackend,
    /// Roles to run each drill with (default: superuser, monitor, plain).
    #[arg(long, value_delimiter = ',')]
    roles: Vec<Role>,
    /// Writing users.
    #[arg(long, default_value_t = 12)]
    writers: usize,
    /// Mostly reading users.
    #[arg(long, default_value_t = 4)]
    readers: usize,
    /// Keep every run's history under `<out>/histories`, not only those of
    /// runs that fail the check.
    #[arg(long)]
    keep_histories: bool,
    /// Where results.json, results.md and the histories of failing runs go.
    #[arg(long, default_value_os_t = default_out_dir())]
    out: PathBuf,
}

/// The negative control's load in the short form.
const CONTROL_SHORT: Duration = Duration::from_secs(3);
/// The same in the full form.
const CONTROL_FULL: Duration = Duration::from_secs(6);

fn default_out_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("drills")
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // The app logs every failed query; during a fault that is
                // thousands of expected lines. Behind a reader endpoint,
                // sqlx logs at error level every connection a server's pool
                // refuses because it reached another server, as the library
                // expects. RUST_LOG brings both back. The tokio-postgres,
                // diesel-async and SeaORM apps log their failed queries as
                // the social app does.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(
                        "error,read_after_write_lab::social=off,\
                         read_after_write_lab::tokio_social=off,\
                         read_after_write_lab::diesel_social=off,\
                         read_after_write_lab::sea_social=off,sqlx_core::pool::inner=off",
                    )
                }),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runs = args.runs.unwrap_or(if args.short { 1 } else { 3 });
    if runs == 0 {
        eprintln!("--runs must be at least 1");
        return ExitCode::from(2);
    }
    let config = CampaignConfig {
        drills: if args.drills.is_empty() {
            Drill::ALL.to_vec()
        } else {
            args.drills.clone()
        },
        roles: if args.roles.is_empty() {
            Role::ALL.to_vec()
        } else {
            args.roles.clone()
        },
        runs,
        rotate_roles: args.short,
        timing: if args.short {
            Timing::short()
        } else {
            Timing::full()
        },
        // Hundreds of stale reads show within a second at this load; the
        // length is for the count to be unmistakable, not to find them.
        control: (!args.no_control).then_some(if args.short {
            CONTROL_SHORT
        } else {
            CONTROL_FULL
        }),
        settings: AppSettings {
            monotonic: args.monotonic,
            backend: args.backend,
            ..AppSettings::default()
        },
        load: LoadConfig {
            writers: args.writers,
            readers: args.readers,
            think: (Duration::from_millis(5), Duration::from_millis(20)),
            ..LoadConfig::default()
        },
        out: args.out.clone(),
        keep_histories: args.keep_histories,
        progress: true,
        mode: match (args.short, args.backend) {
            (true, AppBackend::Sqlx) => "short".to_owned(),
            (false, AppBackend::Sqlx) => "full".to_owned(),
            (short, backend) => {
                format!("{}, {backend}", if short { "short" } else { "full" })
            }
        },
    };
    let report = drills::run(&config).await;
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
        println!("results: {} (results.json, results.md)", out.display());
    }
    if args.check {
        let failures = report::failures(&report);
        if failures.is_empty() {
            let control = report
                .rows
                .iter()
                .filter(|row| row.control)
                .map(|row| row.stale_own_reads)
                .sum::<u64>();
            eprintln!(
                "check passed: no stale own read, no hung request, no error outside a fault \
                 window and no canary violation; the control, tokens off, went stale {control} times"
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

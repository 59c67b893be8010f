//! The fault campaign: the social app on a real cluster under a fixed load,
//! one fault per drill, judged afterwards by a checker over the whole
//! history, the way Jepsen tests are.
//!
//! ```sh
//! cargo run -p read-after-write-lab --release --bin drills             # 12 drills × 3 roles × 3 runs
//! cargo run -p read-after-write-lab --bin drills -- --short --check    # CI: 12 runs, roles rotated, and the control
//! cargo run -p read-after-write-lab --release --bin drills -- --drills frozen-primary --roles plain --runs 1
//! ```
//!
//! # What a run is
//!
//! 1. A fresh cluster: a primary and two replicas lagging 30 ms and 150 ms
//!    (failovers destroy it, so every run gets its own). The social
//!    migrations run as `postgres`; then the heartbeat table and two LOGIN
//!    roles are created, one with `pg_monitor` and one without, both with
//!    the app's table privileges, the heartbeat table's included, so the
//!    plain role proves replicas by heartbeat ([`roles`](crate::roles)).
//! 2. The app, `social::router` (or with `--backend tokio-postgres` the
//!    same API over tokio-postgres, `tokio_social::router`), served on
//!    127.0.0.1 over real HTTP. Its primary URL goes through the kit's
//!    [`TcpProxy`]; the replicas' URLs go direct, or for `reader-endpoint`
//!    as one URL through a balanced proxy over both. `max_wait` 200 ms,
//!    request timeout 2 s, debug header on, the canary on one session read
//!    in ten, fixed signing keys shared by every app instance. An app
//!    restart stops serving, shuts the replica set down, drops it and
//!    serves a fresh one on a new port; users follow the new address and
//!    keep their cookies. `rolling-key-rotation` and
//!    `rolling-format-upgrade` serve two instances, and users alternate
//!    between them request by request; the latter's upgraded instances are
//!    a stand-in for a release with a newer token format
//!    ([`later_format`]).
//! 3. The load ([`load`]): 12 writers (post, then read their own posts) and
//!    4 readers (own posts, the feed, an occasional post), each with its
//!    own cookie jar, 5–20 ms think time; `sign-up` adds 4 users who sign
//!    up, read their profile, log in and read their dashboard. Every
//!    operation is recorded with its start, end, status, ids and the debug
//!    header's route ([`history`]).
//! 4. After a warm-up, the drill's fault and recovery ([`scenarios`]); the
//!    load goes on until the run's length, and at least until a short tail
//!    after the fault window.
//! 5. The ids of every post on the final primary (the node the proxy sends
//!    the app to at the end) are read, and [`checker::check`] judges the
//!    history: stale own reads where the data exists, monotonic-read
//!    violations, lost writes (counted apart), hung requests and errors
//!    outside the window. The canary's counts come from the app's replica
//!    sets; any violation fails `--check`.
//!
//! # The fault window
//!
//! From the fault's injection until its last recovery action completed
//! (promotion, proxy repoint, app restart, replica restart), plus a grace of
//! 2 s and the request timeout (4 s in all): the requests in flight at
//! recovery end within the request timeout, and pools, the tracker's probes
//! and its backoff settle within the next two seconds. Errors and slow
//! requests inside it are reported; outside it, they fail `--check`. Stale
//! own reads fail it wherever they happen. `frozen-replica` has no operator
//! step to wait for: its window closes 2 s after the freeze with no grace
//! (see [`Drill::FrozenReplica`]).
//!
//! # The negative control
//!
//! A checker that counts 0 stale own reads proves nothing unless it would
//! have counted some had the library not been there. So every campaign
//! starts with one more run, `control-naive` as `superuser`: the same
//! cluster (replicas lagging 30 and 150 ms), the same load with the
//! sign-up drill's users added (so a sign-up's stale read shows too), no
//! fault, and
//! the app's tokens off (its layer's identity function answers `None`, so
//! no token is issued or read): every own read goes to a lagging replica
//! whatever the user just wrote. Its stale own reads are expected and never fail
//! `--check`; counting none does, since then the campaign cannot tell a
//! broken library from a working one. Its errors and hung requests (there
//! is no fault window) fail it as anywhere else.
//!
//! # Layout
//!
//! - [`history`]: the operation log and the facts read after the run.
//! - [`checker`]: the pure function from history and facts to figures.
//! - [`load`]: the virtual users.
//! - [`harness`]: cluster, proxy, roles and the app's lifecycle.
//! - [`scenarios`]: the drills and one run.
//! - [`report`]: rows, table, JSON, Markdown, and the check's verdict.
//!
//! [`TcpProxy`]: read_after_write_testkit::TcpProxy

pub mod checker;
pub mod harness;
pub mod history;
pub mod later_format;
pub mod load;
pub mod report;
pub mod scenarios;
#[cfg(test)]
mod tests_checker;
#[cfg(test)]
mod tests_report;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use read_after_write_testkit::KitError;

use self::harness::{AppSettings, Role};
use self::load::LoadConfig;
use self::report::CampaignReport;
use self::scenarios::{Drill, Timing};

/// Why a run could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// The cluster, the proxy or a fault failed in the kit.
    #[error("test kit: {0}")]
    Kit(#[from] KitError),
    /// The app or the database could not be set up.
    #[error("setup: {0}")]
    Setup(String),
    /// The fault script failed.
    #[error("fault: {0}")]
    Fault(String),
    /// The facts could not be read after the run.
    #[error("reading the final primary: {0}")]
    Facts(String),
}

/// What a campaign runs.
#[derive(Clone, Debug)]
pub struct CampaignConfig {
    /// The drills, in order.
    pub drills: Vec<Drill>,
    /// The roles each drill runs with.
    pub roles: Vec<Role>,
    /// Runs per drill and role.
    pub runs: usize,
    /// One run per drill, the roles taken in turn (drill i gets role
    /// i mod roles), so a short campaign still exercises every role.
    pub rotate_roles: bool,
    /// How long each run lasts.
    pub timing: Timing,
    /// The negative control's length: it runs once, first, when set.
    pub control: Option<Duration>,
    /// The app's settings.
    pub settings: AppSettings,
    /// The users.
    pub load: LoadConfig,
    /// Where histories of runs that fail the check are written.
    pub out: PathBuf,
    /// Write every run's history, not only those of runs that fail.
    pub keep_histories: bool,
    /// Print a line per run on stderr.
    pub progress: bool,
    /// `full` or `short`, for the report.
    pub mode: String,
}

/// The (drill, role) pairs to run, in order.
pub fn plan(config: &CampaignConfig) -> Vec<(Drill, Role, usize)> {
    let mut plan = Vec::new();
    if config.roles.is_empty() {
        return plan;
    }
    for (index, drill) in config.drills.iter().copied().enumerate() {
        if config.rotate_roles {
            for run in 1..=config.runs {
                plan.push((drill, config.roles[index % config.roles.len()], run));
            }
        } else {
            for role in &config.roles {
                for run in 1..=config.runs {
                    plan.push((drill, *role, run));
                }
            }
        }
    }
    plan
}

/// The role the negative control runs with.
pub const CONTROL_ROLE: Role = Role::Superuser;

/// Runs the whole campaign, one run after another: the negative control
/// first (when configured), then the plan.
pub async fn run(config: &CampaignConfig) -> CampaignReport {
    let started = Instant::now();
    let plan = plan(config);
    let mut runs = Vec::with_capacity(plan.len() + 1);
    if let Some(length) = config.control {
        if config.progress {
            eprint!(
                "[control] {} as {CONTROL_ROLE}, tokens off, no fault, {:.0} s; must go stale ... ",
                Drill::ControlNaive,
                length.as_secs_f64()
            );
        }
        let timing = Timing::control(length);
        runs.push(run_and_keep(config, Drill::ControlNaive, CONTROL_ROLE, 1, &timing).await);
    }
    for (index, (drill, role, run)) in plan.iter().copied().enumerate() {
        if config.progress {
            eprint!(
                "[{}/{}] {drill} as {role}, run {run} ... ",
                index + 1,
                plan.len()
            );
        }
        runs.push(run_and_keep(config, drill, role, run, &config.timing).await);
    }
    let ms = |d: Duration| d.as_millis() as u64;
    CampaignReport {
        mode: config.mode.clone(),
        max_wait_ms: ms(config.settings.max_wait),
        request_timeout_ms: ms(config.settings.request_timeout),
        lags_ms: config.settings.lags.iter().map(|d| ms(*d)).collect(),
        writers: config.load.writers,
        readers: config.load.readers,
        grace_ms: ms(config.timing.grace_base + config.settings.request_timeout),
        elapsed_s: started.elapsed().as_secs_f64(),
        rows: report::rows(&runs),
        runs,
    }
}

/// One run, its history kept when asked or when it needs a second look,
/// and its progress line.
async fn run_and_keep(
    config: &CampaignConfig,
    drill: Drill,
    role: Role,
    run: usize,
    timing: &Timing,
) -> scenarios::RunRecord {
    let (mut record, kept) =
        scenarios::run_once(drill, role, run, &config.settings, timing, &config.load).await;
    let keep = config.keep_histories
        || record.error.is_some()
        || record.figures.as_ref().is_some_and(|f| {
            // The control's stale reads are expected; a control without
            // any is what needs a look.
            let stale = if drill.is_control() {
                f.stale_own_reads == 0
            } else {
                f.stale_own_reads > 0 || f.monotonic_violations > 0
            };
            stale || f.hung > 0 || f.errors_outside_window > 0
        });
    if let (true, Some(kept)) = (keep, kept) {
        let dir = config.out.join("histories");
        let file = dir.join(format!("{drill}-{role}-{run}.json"));
        let written = std::fs::create_dir_all(&dir).and_then(|()| {
            let json = serde_json::to_string(&kept).map_err(std::io::Error::other)?;
            std::fs::write(&file, json)
        });
        match written {
            Ok(()) => record.history_file = Some(file.display().to_string()),
            Err(error) => tracing::warn!(%error, "could not keep the history"),
        }
    }
    if config.progress {
        match (&record.figures, &record.error) {
            (Some(f), _) => eprintln!(
                "{} requests, {} stale{}, {} lost, {} hung, {} errors in / {} out, canary {}/{} ({:.1} s)",
                f.requests,
                f.stale_own_reads,
                if drill.is_control() {
                    " (expected)"
                } else {
                    ""
                },
                f.lost_writes,
                f.hung,
                f.errors_in_window,
                f.errors_outside_window,
                record.canary_violations,
                record.canary_checks,
                record.load_s
            ),
            (None, Some(error)) => eprintln!("could not run: {error}"),
            (None, None) => eprintln!("no figures"),
        }
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rotate: bool, runs: usize) -> CampaignConfig {
        CampaignConfig {
            drills: Drill::ALL.to_vec(),
            roles: Role::ALL.to_vec(),
            runs,
            rotate_roles: rotate,
            timing: Timing::short(),
            control: Some(Duration::from_secs(3)),
            settings: AppSettings::default(),
            load: LoadConfig::default(),
            out: PathBuf::from("target/drills"),
            keep_histories: false,
            progress: false,
            mode: "short".into(),
        }
    }

    #[test]
    fn the_short_plan_rotates_roles_so_each_appears() {
        let plan = plan(&config(true, 1));
        assert_eq!(plan.len(), Drill::ALL.len());
        for role in Role::ALL {
            assert!(plan.iter().any(|(_, r, _)| *r == role), "{role} missing");
        }
    }

    #[test]
    fn the_full_plan_runs_every_drill_for_every_role() {
        assert_eq!(plan(&config(false, 3)).len(), Drill::ALL.len() * 3 * 3);
    }

    #[test]
    fn the_control_is_not_a_drill_of_the_plan() {
        // `run` adds it once, whatever the runs and roles.
        assert!(!Drill::ALL.contains(&Drill::ControlNaive));
        for (rotate, runs) in [(true, 1), (false, 3)] {
            assert!(plan(&config(rotate, runs))
                .iter()
                .all(|(drill, _, _)| !drill.is_control()));
        }
    }
}

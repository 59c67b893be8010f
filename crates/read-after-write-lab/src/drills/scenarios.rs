//! The drills: what fault each injects, on what schedule, on which
//! topology (one app instance or two, one URL per replica or a reader
//! endpoint), and how one run goes (fresh cluster, warm-up load, fault,
//! recovery, load until after the window, facts, check); and the negative
//! control, the same load with the app's tokens off and no fault, which
//! must go stale.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::checker::{self, RunFigures};
use super::harness::{rotated_keys, AppSettings, Role, System, Topology};
use super::history::{Facts, FaultWindow, History, Recorder};
use super::load::{self, LoadConfig};
use super::DrillError;

/// A fault and its recovery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Drill {
    /// `planned_failover(0)`, then the proxy is repointed to the new
    /// primary.
    PlannedFailover,
    /// `unplanned_failover_with_orphan(0, 1)`, the proxy repointed, and the
    /// app restarted 3 s later while replica 1 is still in recovery on the
    /// abandoned timeline with WAL the new primary lacks.
    UnplannedFailoverOrphan,
    /// Replica 0 is promoted while the primary stays up and the proxy keeps
    /// pointing at the old primary.
    SplitBrain,
    /// The primary is frozen (SIGSTOP); replica 0 is promoted after 1 s and
    /// the proxy repointed 3 s after the freeze, open sessions left hanging.
    FrozenPrimary,
    /// Every backend on the primary is terminated every 0.5 s for 5 s.
    TerminatedBackends,
    /// The app restarts mid-load; the database is untouched.
    AppRestart,
    /// Replica 1 is killed and restarted 3 s later.
    ReplicaKill,
    /// The app's replicas are one URL, the kit's round-robin proxy over
    /// both (a reader endpoint: Aurora's `cluster-ro`, a read pool, DNS
    /// round robin); the slow replica behind it is killed and restarted 3 s
    /// later.
    ReaderEndpoint,
    /// The fast replica (the one serving most reads) is frozen (SIGSTOP)
    /// for 5 s with no operator step, then thawed. New reads must route
    /// around it within [`ROUTE_AROUND`]: the window closes that long after
    /// the freeze, with no grace. Requests sent before then may run into
    /// the app's request timeout on the frozen server (they overlap the
    /// window); a request sent after it that takes longer than `max_wait`
    /// + 1 s, or fails, fails the check, thaw included.
    FrozenReplica,
    /// Two app instances, requests alternating between them, both on the
    /// old key. The rollout done the careless way: instance A restarts on
    /// `new,old` (signing with the new key) while B still runs `old`; B
    /// restarts on `new,old` 3 s later. Meanwhile B meets A's tokens under
    /// a key id it does not know, and must read them from the primary
    /// (`unknown_key`), never eventually.
    RollingKeyRotation,
    /// Two app instances, requests alternating between them, both on
    /// this release. An upgrade to a release with a newer token format
    /// rolled out the same way: instance A restarts on the later release
    /// (this one behind [`later_format`](super::later_format)'s
    /// re-labelling) while B still runs this one; B follows 3 s later.
    /// Meanwhile B meets A's tokens in a format it cannot read, and must
    /// read them from the primary (`unknown_version`), never eventually;
    /// once both are upgraded, A's and B's tokens are read again.
    RollingFormatUpgrade,
    /// Four more users sign up (no identity before), read their new
    /// profile, log in and read their dashboard, in a loop, each round as a
    /// new account; the fault is an app restart mid-load, so some sign-ups
    /// meet a fresh tracker.
    SignUp,
    /// The negative control, not a drill: no fault, and the app's tokens
    /// off (its layer's identity function answers `None`), so every own
    /// read goes to a lagging replica whatever the user just wrote. Its checker must count stale own reads: if it
    /// counts none, the campaign could not tell a broken library from a
    /// working one. Not in [`Drill::ALL`]; the campaign runs it once.
    ControlNaive,
}

impl Drill {
    /// Every drill, in campaign order.
    pub const ALL: [Drill; 12] = [
        Drill::PlannedFailover,
        Drill::UnplannedFailoverOrphan,
        Drill::SplitBrain,
        Drill::FrozenPrimary,
        Drill::TerminatedBackends,
        Drill::AppRestart,
        Drill::ReplicaKill,
        Drill::ReaderEndpoint,
        Drill::FrozenReplica,
        Drill::RollingKeyRotation,
        Drill::RollingFormatUpgrade,
        Drill::SignUp,
    ];

    /// The name in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Drill::PlannedFailover => "planned-failover",
            Drill::UnplannedFailoverOrphan => "unplanned-failover-orphan",
            Drill::SplitBrain => "split-brain",
            Drill::FrozenPrimary => "frozen-primary",
            Drill::TerminatedBackends => "terminated-backends",
            Drill::AppRestart => "app-restart",
            Drill::ReplicaKill => "replica-kill",
            Drill::ReaderEndpoint => "reader-endpoint",
            Drill::FrozenReplica => "frozen-replica",
            Drill::RollingKeyRotation => "rolling-key-rotation",
            Drill::RollingFormatUpgrade => "rolling-format-upgrade",
            Drill::SignUp => "sign-up",
            Drill::ControlNaive => "control-naive",
        }
    }

    /// The app's instances and how it reaches the replicas.
    pub fn topology(self) -> Topology {
        match self {
            Drill::ReaderEndpoint => Topology {
                instances: 1,
                reader_endpoint: true,
            },
            Drill::RollingKeyRotation | Drill::RollingFormatUpgrade => Topology {
                instances: 2,
                reader_endpoint: false,
            },
            _ => Topology::single(),
        }
    }

    /// Sign-up users added to the load: in the sign-up drill, and in the
    /// negative control, to show the checker sees a sign-up's stale reads.
    pub fn signers(self) -> usize {
        match self {
            Drill::SignUp | Drill::ControlNaive => 4,
            _ => 0,
        }
    }

    /// Whether its checker must see reads routed for an unknown key, or
    /// the drill did not exercise what it is for.
    pub fn needs_unknown_key_reads(self) -> bool {
        self == Drill::RollingKeyRotation
    }

    /// Whether its checker must see reads routed for a token in a later
    /// release's format, or the drill did not exercise what it is for.
    pub fn needs_unknown_version_reads(self) -> bool {
        self == Drill::RollingFormatUpgrade
    }

    /// Whether this is the negative control rather than a fault drill.
    pub fn is_control(self) -> bool {
        self == Drill::ControlNaive
    }
}

impl fmt::Display for Drill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Drill {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Drill::ALL
            .into_iter()
            .find(|drill| drill.name() == text)
            .ok_or_else(|| {
                let names: Vec<_> = Drill::ALL.iter().map(|d| d.name()).collect();
                format!("unknown drill {text:?}: one of {}", names.join(", "))
            })
    }
}

/// How long a run lasts.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Load before the fault.
    pub warmup: Duration,
    /// The run's length, at least (load starts at 0).
    pub total: Duration,
    /// Load kept after the window (grace included) ends, at least.
    pub tail: Duration,
    /// Added to the request timeout to make the window's grace.
    pub grace_base: Duration,
}

impl Timing {
    /// The default: about 12 s per run.
    pub fn full() -> Self {
        Timing {
            warmup: Duration::from_secs(2),
            total: Duration::from_secs(12),
            tail: Duration::from_secs(2),
            grace_base: Duration::from_secs(2),
        }
    }

    /// `--short`: about 6 s per run (longer when the recovery is).
    pub fn short() -> Self {
        Timing {
            warmup: Duration::from_millis(1500),
            total: Duration::from_secs(6),
            tail: Duration::from_secs(1),
            grace_base: Duration::from_secs(2),
        }
    }

    /// The negative control's: `length` of load, no warm-up, no fault and
    /// so no window.
    pub fn control(length: Duration) -> Self {
        Timing {
            warmup: Duration::ZERO,
            total: length,
            tail: Duration::ZERO,
            grace_base: Duration::ZERO,
        }
    }
}

/// How soon new reads must have left a frozen replica: the tracker's
/// probe timeout (half a second by default) and its next poll, with room
/// for a loaded machine.
pub const ROUTE_AROUND: Duration = Duration::from_secs(2);

/// How long the frozen replica stays frozen.
const FREEZE: Duration = Duration::from_secs(5);

/// One run of one drill for one role.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    /// The drill.
    pub drill: Drill,
    /// The app's database role.
    pub role: Role,
    /// 1-based run number within the drill and role.
    pub run: usize,
    /// Seconds to start the cluster.
    pub cluster_start_s: f64,
    /// Seconds of load.
    pub load_s: f64,
    /// The fault window on the history's clock.
    pub window: FaultWindow,
    /// What the checker found; `None` when the run could not be carried out.
    pub figures: Option<RunFigures>,
    /// Why the run could not be carried out.
    pub error: Option<String>,
    /// Where the history of this run was written, when it was kept.
    pub history_file: Option<String>,
    /// Session reads the canary confirmed on the server that served them,
    /// over every app instance of the run.
    #[serde(default)]
    pub canary_checks: u64,
    /// Of those, reads that went to a server lacking their user's write:
    /// any fails `--check`.
    #[serde(default)]
    pub canary_violations: u64,
}

/// A run's history and facts, as written to `histories/` for a second look
/// (`checker::check` on them gives the run's figures again).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeptRun {
    /// What was read after the run; `None` if it could not be.
    pub facts: Option<Facts>,
    /// Every operation.
    pub history: History,
}

/// What a fault's script reports.
struct Injected {
    applied_ms: f64,
    recovered_ms: f64,
    /// The grace after `recovered_ms`, when the drill sets its own.
    grace: Option<Duration>,
    /// When the script returned.
    done_ms: f64,
}

/// Runs one drill once for one role on a fresh cluster. Returns the record,
/// and the whole history with its facts for the caller to keep.
///
/// For [`Drill::ControlNaive`] the app runs with its tokens off, whatever
/// `settings` says, and nothing is injected: the load runs for
/// `timing.total` and the fault window is empty (at 0, no grace), so every
/// error and slow request is outside it.
pub async fn run_once(
    drill: Drill,
    role: Role,
    run: usize,
    settings: &AppSettings,
    timing: &Timing,
    load_config: &LoadConfig,
) -> (RunRecord, Option<KeptRun>) {
    let mut record = RunRecord {
        drill,
        role,
        run,
        cluster_start_s: 0.0,
        load_s: 0.0,
        window: FaultWindow {
            injected_ms: 0.0,
            applied_ms: 0.0,
            recovered_ms: 0.0,
            grace_ms: 0.0,
        },
        figures: None,
        error: None,
        history_file: None,
        canary_checks: 0,
        canary_violations: 0,
    };
    let control = drill.is_control();
    let control_settings;
    let settings = if control {
        control_settings = AppSettings {
            tokens: false,
            ..settings.clone()
        };
        &control_settings
    } else {
        settings
    };
    let mut system = match System::start(role, settings, drill.topology()).await {
        Ok(system) => system,
        Err(error) => {
            record.error = Some(error.to_string());
            return (record, None);
        }
    };
    record.cluster_start_s = system.cluster_start_s;

    let load_config = LoadConfig {
        signers: load_config.signers + drill.signers(),
        ..load_config.clone()
    };
    system
        .warm_up(load_config.writers + load_config.readers + load_config.signers)
        .await;
    let recorder = Arc::new(Recorder::new());
    let users = load::start(&load_config, system.bases(), Arc::clone(&recorder));
    let (injected_ms, injected, grace) = if control {
        // No fault: an empty window at the start of the run.
        let none = Injected {
            applied_ms: 0.0,
            recovered_ms: 0.0,
            grace: Some(Duration::ZERO),
            done_ms: 0.0,
        };
        (0.0, Ok(none), Duration::ZERO)
    } else {
        tokio::time::sleep(timing.warmup).await;
        let injected_ms = recorder.now_ms();
        // Every fault script is bounded; a stuck kit call must not hold the
        // campaign.
        let injected = match tokio::time::timeout(
            Duration::from_secs(60),
            inject(drill, &mut system, &recorder),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(DrillError::Fault(format!(
                "{drill}: the fault script took longer than 60 s"
            ))),
        };
        let grace = timing.grace_base + settings.request_timeout;
        (injected_ms, injected, grace)
    };
    let outcome = match injected {
        Ok(injected) => {
            let grace = injected.grace.unwrap_or(grace);
            let window = FaultWindow {
                injected_ms,
                applied_ms: injected.applied_ms,
                recovered_ms: injected.recovered_ms,
                grace_ms: grace.as_secs_f64() * 1000.0,
            };
            // At least a tail after the window and after the script's last
            // step (a thaw may come after the window closed).
            let tail_ms = timing.tail.as_secs_f64() * 1000.0;
            let end_ms = (timing.total.as_secs_f64() * 1000.0)
                .max(window.end_ms() + tail_ms)
                .max(injected.done_ms + tail_ms);
            tokio::time::sleep_until(
                (recorder.started() + Duration::from_secs_f64(end_ms / 1000.0)).into(),
            )
            .await;
            Ok(window)
        }
        Err(error) => Err(error),
    };
    users.stop().await;
    record.load_s = recorder.now_ms() / 1000.0;

    let result = match outcome {
        Ok(window) => {
            record.window = window;
            // Whichever node the proxy sends the app to at the end is the
            // primary whose data counts.
            let final_primary = system.proxy.target_port();
            match super::history::posts_on(final_primary).await {
                Ok(posts) => super::history::accounts_on(final_primary)
                    .await
                    .map(|(accounts, logins)| (window, posts, accounts, logins)),
                Err(error) => Err(error),
            }
        }
        Err(error) => Err(error),
    };
    system.stop_app().await;
    (record.canary_checks, record.canary_violations) = system.canary;
    // Not needed for the figures; lets the kit stop a frozen node cleanly
    // when the cluster is dropped, also after a fault script that failed.
    match drill {
        Drill::FrozenPrimary => {
            let _ =
                tokio::time::timeout(Duration::from_secs(10), system.cluster.thaw_primary()).await;
        }
        Drill::FrozenReplica => {
            let _ =
                tokio::time::timeout(Duration::from_secs(10), system.cluster.thaw_replica(0)).await;
        }
        _ => {}
    }
    drop(system);

    let history = recorder.history();
    let facts = match result {
        Ok((window, final_posts, final_accounts, final_logins)) => {
            let facts = Facts {
                final_posts,
                final_accounts,
                final_logins,
                window,
                max_wait_ms: settings.max_wait.as_secs_f64() * 1000.0,
                request_timeout_ms: settings.request_timeout.as_secs_f64() * 1000.0,
            };
            let mut figures = checker::check(&history, &facts);
            if control {
                // Without a fault there is nothing to recover from.
                figures.fault_to_first_write_ms = None;
                figures.replicas_serve_again_ms = None;
            }
            record.figures = Some(figures);
            Some(facts)
        }
        Err(error) => {
            record.error = Some(error.to_string());
            None
        }
    };
    (record, Some(KeptRun { facts, history }))
}

/// Sleeps until `at_ms` on the recorder's clock.
async fn until(recorder: &Recorder, at_ms: f64) {
    let at = recorder.started() + Duration::from_secs_f64(at_ms.max(0.0) / 1000.0);
    tokio::time::sleep_until(at.into()).await;
}

/// Injects the drill's fault and carries out its recovery, returning when
/// the last recovery action has completed.
async fn inject(
    drill: Drill,
    system: &mut System,
    recorder: &Recorder,
) -> Result<Injected, DrillError> {
    let t0 = recorder.now_ms();
    if drill == Drill::FrozenReplica {
        system.cluster.freeze_replica(0).await?;
        let applied_ms = recorder.now_ms();
        // No operator step: the library alone must leave the frozen
        // server. Its recovery is done when new reads have had
        // ROUTE_AROUND to leave. No grace: a request sent after that is
        // judged as anywhere outside a fault, and reads already running on
        // the frozen server overlap the window whenever they end.
        until(recorder, t0 + FREEZE.as_secs_f64() * 1000.0).await;
        system.cluster.thaw_replica(0).await?;
        return Ok(Injected {
            applied_ms,
            recovered_ms: applied_ms + ROUTE_AROUND.as_secs_f64() * 1000.0,
            grace: Some(Duration::ZERO),
            done_ms: recorder.now_ms(),
        });
    }
    let applied_ms = match drill {
        Drill::PlannedFailover => {
            let failover = system.cluster.planned_failover(0).await?;
            let applied = recorder.now_ms();
            system.proxy.repoint(failover.port);
            applied
        }
        Drill::UnplannedFailoverOrphan => {
            let failover = system.cluster.unplanned_failover_with_orphan(0, 1).await?;
            let applied = recorder.now_ms();
            system.proxy.repoint(failover.port);
            tokio::time::sleep(Duration::from_secs(3)).await;
            system.restart_app().await?;
            applied
        }
        Drill::SplitBrain => {
            system.cluster.promote_replica(0).await?;
            recorder.now_ms()
        }
        Drill::FrozenPrimary => {
            system.cluster.freeze_primary().await?;
            let applied = recorder.now_ms();
            until(recorder, t0 + 1000.0).await;
            system.cluster.promote_replica(0).await?;
            until(recorder, t0 + 3000.0).await;
            // Open sessions are left hanging on the frozen primary, as a
            // load balancer without health-check-driven kills leaves them.
            system.proxy.repoint(system.cluster.replica(0).port());
            applied
        }
        Drill::TerminatedBackends => {
            let mut applied = None;
            for round in 0..10 {
                system.cluster.terminate_primary_connections().await?;
                applied.get_or_insert(recorder.now_ms());
                until(recorder, t0 + 500.0 * f64::from(round + 1)).await;
            }
            applied.unwrap_or(t0)
        }
        Drill::AppRestart => {
            system.restart_app().await?;
            recorder.now_ms()
        }
        Drill::ReplicaKill | Drill::ReaderEndpoint => {
            // Behind the endpoint, the proxy's connections to it are
            // refused while it is down.
            system.cluster.kill_replica(1).await?;
            let applied = recorder.now_ms();
            until(recorder, t0 + 3000.0).await;
            system.cluster.start_replica(1).await?;
            applied
        }
        Drill::RollingKeyRotation => {
            system.redeploy(0, rotated_keys()?).await?;
            let applied = recorder.now_ms();
            until(recorder, t0 + 3000.0).await;
            system.redeploy(1, rotated_keys()?).await?;
            applied
        }
        Drill::RollingFormatUpgrade => {
            system.upgrade(0).await?;
            let applied = recorder.now_ms();
            until(recorder, t0 + 3000.0).await;
            system.upgrade(1).await?;
            applied
        }
        Drill::SignUp => {
            system.restart_app().await?;
            recorder.now_ms()
        }
        // Injected above.
        Drill::FrozenReplica => t0,
        // `run_once` injects nothing for the control; were this reached,
        // there would be no fault either.
        Drill::ControlNaive => t0,
    };
    Ok(Injected {
        applied_ms,
        recovered_ms: recorder.now_ms(),
        grace: None,
        done_ms: recorder.now_ms(),
    })
}

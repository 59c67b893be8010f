//! The drills: what fault each injects, on what schedule, and how one run
//! goes (fresh cluster, warm-up load, fault, recovery, load until after the
//! window, facts, check); and the negative control, the same load with the
//! app's tokens off and no fault, which must go stale.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::checker::{self, RunFigures};
use super::harness::{AppSettings, Role, System};
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
    /// The negative control, not a drill: no fault, and the app's tokens
    /// off (`AppConfig { tokens: false, .. }`, as the lab's `naive`
    /// baseline), so every own read goes to a lagging replica whatever the
    /// user just wrote. Its checker must count stale own reads: if it
    /// counts none, the campaign could not tell a broken library from a
    /// working one. Not in [`Drill::ALL`]; the campaign runs it once.
    ControlNaive,
}

impl Drill {
    /// Every drill, in campaign order.
    pub const ALL: [Drill; 7] = [
        Drill::PlannedFailover,
        Drill::UnplannedFailoverOrphan,
        Drill::SplitBrain,
        Drill::FrozenPrimary,
        Drill::TerminatedBackends,
        Drill::AppRestart,
        Drill::ReplicaKill,
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
            Drill::ControlNaive => "control-naive",
        }
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
    let mut system = match System::start(role, settings).await {
        Ok(system) => system,
        Err(error) => {
            record.error = Some(error.to_string());
            return (record, None);
        }
    };
    record.cluster_start_s = system.cluster_start_s;

    let recorder = Arc::new(Recorder::new());
    let users = load::start(load_config, system.base(), Arc::clone(&recorder));
    let (injected_ms, injected, grace) = if control {
        // No fault: an empty window at the start of the run.
        let none = Injected {
            applied_ms: 0.0,
            recovered_ms: 0.0,
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
            let window = FaultWindow {
                injected_ms,
                applied_ms: injected.applied_ms,
                recovered_ms: injected.recovered_ms,
                grace_ms: grace.as_secs_f64() * 1000.0,
            };
            let end_ms = (timing.total.as_secs_f64() * 1000.0)
                .max(window.end_ms() + timing.tail.as_secs_f64() * 1000.0);
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
            system
                .posts_on(final_primary)
                .await
                .map(|posts| (window, posts))
        }
        Err(error) => Err(error),
    };
    system.stop_app().await;
    if drill == Drill::FrozenPrimary {
        // Not needed for the figures; lets the kit stop the old primary
        // cleanly when the cluster is dropped.
        let _ = tokio::time::timeout(Duration::from_secs(10), system.cluster.thaw_primary()).await;
    }
    drop(system);

    let history = recorder.history();
    let facts = match result {
        Ok((window, final_posts)) => {
            let facts = Facts {
                final_posts,
                window,
                max_wait_ms: settings.max_wait.as_secs_f64() * 1000.0,
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
        Drill::ReplicaKill => {
            system.cluster.kill_replica(1).await?;
            let applied = recorder.now_ms();
            until(recorder, t0 + 3000.0).await;
            system.cluster.start_replica(1).await?;
            applied
        }
        // `run_once` injects nothing for the control; were this reached,
        // there would be no fault either.
        Drill::ControlNaive => t0,
    };
    Ok(Injected {
        applied_ms,
        recovered_ms: recorder.now_ms(),
    })
}

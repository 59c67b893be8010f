//! The campaign's report: one row per drill and role summed over its runs,
//! the negative control's row last, as a table, JSON and Markdown, and the
//! `--check` verdict.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::checker::StaleRead;
use super::harness::Role;
use super::scenarios::{Drill, RunRecord};

/// Every run of a campaign and its summary.
#[derive(Clone, Debug, Serialize)]
pub struct CampaignReport {
    /// `full` or `short`.
    pub mode: String,
    /// The app's `max_wait`, milliseconds.
    pub max_wait_ms: u64,
    /// The app's request timeout, milliseconds.
    pub request_timeout_ms: u64,
    /// Replica apply delays, milliseconds.
    pub lags_ms: Vec<u64>,
    /// Writing users.
    pub writers: usize,
    /// Reading users.
    pub readers: usize,
    /// The window's grace after recovery, milliseconds.
    pub grace_ms: u64,
    /// Wall time of the whole campaign, seconds.
    pub elapsed_s: f64,
    /// One row per drill and role.
    pub rows: Vec<Row>,
    /// Every run.
    pub runs: Vec<RunRecord>,
}

/// One drill for one role, summed over its runs.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The drill.
    pub drill: Drill,
    /// The negative control (tokens off, no fault), not a drill: its stale
    /// own reads are expected, and `--check` fails when there are none.
    pub control: bool,
    /// The role.
    pub role: Role,
    /// Runs carried out and checked.
    pub runs: usize,
    /// Runs that could not be carried out (setup or fault script failed).
    pub failed_runs: usize,
    /// Why, for each.
    pub run_errors: Vec<String>,
    /// Requests.
    pub requests: u64,
    /// Acknowledged writes.
    pub acked_writes: u64,
    /// Own reads that had a write to check.
    pub own_reads_checked: u64,
    /// Stale own reads (data exists on the final primary).
    pub stale_own_reads: u64,
    /// Monotonic-read violations.
    pub monotonic_violations: u64,
    /// Acknowledged writes lost in the failover.
    pub lost_writes: u64,
    /// Acknowledged writes answered without a token.
    pub writes_without_token: u64,
    /// Hung requests outside the window.
    pub hung: u64,
    /// Requests longer than `max_wait + 1 s` inside the window.
    pub hung_in_window: u64,
    /// The longest request, milliseconds.
    pub longest_ms: f64,
    /// Errors overlapping the window.
    pub errors_in_window: u64,
    /// Errors outside it.
    pub errors_outside_window: u64,
    /// Median over runs of the fault-to-first-successful-write time.
    pub fault_to_first_write_ms: Option<f64>,
    /// Median over runs of the time until a replica served an own read
    /// again (sent after recovery).
    pub replicas_serve_again_ms: Option<f64>,
    /// Mean over runs of the primary's read share before the fault.
    pub primary_share_before: Option<f64>,
    /// The same during the window.
    pub primary_share_during: Option<f64>,
    /// The same after it.
    pub primary_share_after: Option<f64>,
    /// A few stale reads, for the eye.
    pub stale_examples: Vec<StaleRead>,
    /// Successful own reads by target and reason, summed over runs.
    pub own_read_routes: BTreeMap<String, u64>,
    /// Reads routed for a token under an unknown key id, summed over runs.
    pub unknown_key_reads: u64,
    /// Reads routed for a token in a later release's format, summed over
    /// runs.
    pub unknown_version_reads: u64,
    /// Of those, the ones sent after the window, summed over runs.
    pub unknown_version_reads_after: u64,
    /// Profile and dashboard reads checked for a sign-up or login.
    pub sign_up_reads_checked: u64,
    /// Of those, how many were stale.
    pub stale_sign_up_reads: u64,
    /// The latest, over runs, of the last start of a request that ran into
    /// the request timeout in the window, from the fault.
    pub last_stuck_start_ms: Option<f64>,
    /// Session reads the canary checked, summed over runs.
    pub canary_checks: u64,
    /// Of those, reads served by a server lacking their write.
    pub canary_violations: u64,
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

fn mean(values: Vec<f64>) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Sums runs into rows, in the order the pairs first appear, the control's
/// last.
pub fn rows(runs: &[RunRecord]) -> Vec<Row> {
    let mut keys: Vec<(Drill, Role)> = Vec::new();
    for run in runs {
        if !keys.contains(&(run.drill, run.role)) {
            keys.push((run.drill, run.role));
        }
    }
    // Stable: drills keep their order, then the control.
    keys.sort_by_key(|(drill, _)| drill.is_control());
    keys.into_iter()
        .map(|(drill, role)| {
            let group: Vec<&RunRecord> = runs
                .iter()
                .filter(|r| r.drill == drill && r.role == role)
                .collect();
            let figures: Vec<_> = group.iter().filter_map(|r| r.figures.as_ref()).collect();
            let sum = |f: &dyn Fn(&super::checker::RunFigures) -> u64| -> u64 {
                figures.iter().map(|x| f(x)).sum()
            };
            let each = |f: &dyn Fn(&super::checker::RunFigures) -> Option<f64>| -> Vec<f64> {
                figures.iter().filter_map(|x| f(x)).collect()
            };
            Row {
                drill,
                control: drill.is_control(),
                role,
                runs: figures.len(),
                failed_runs: group.len() - figures.len(),
                run_errors: group.iter().filter_map(|r| r.error.clone()).collect(),
                requests: sum(&|f| f.requests),
                acked_writes: sum(&|f| f.acked_writes),
                own_reads_checked: sum(&|f| f.own_reads_checked),
                stale_own_reads: sum(&|f| f.stale_own_reads),
                monotonic_violations: sum(&|f| f.monotonic_violations),
                lost_writes: sum(&|f| f.lost_writes),
                writes_without_token: sum(&|f| f.writes_without_token),
                hung: sum(&|f| f.hung),
                hung_in_window: sum(&|f| f.hung_in_window),
                longest_ms: figures.iter().map(|f| f.longest_ms).fold(0.0, f64::max),
                errors_in_window: sum(&|f| f.errors_in_window),
                errors_outside_window: sum(&|f| f.errors_outside_window),
                fault_to_first_write_ms: median(each(&|f| f.fault_to_first_write_ms)),
                replicas_serve_again_ms: median(each(&|f| f.replicas_serve_again_ms)),
                primary_share_before: mean(each(&|f| f.primary_share_before)),
                primary_share_during: mean(each(&|f| f.primary_share_during)),
                primary_share_after: mean(each(&|f| f.primary_share_after)),
                stale_examples: figures
                    .iter()
                    .flat_map(|f| f.stale_examples.iter().cloned())
                    .take(3)
                    .collect(),
                own_read_routes: figures.iter().flat_map(|f| f.own_read_routes.iter()).fold(
                    BTreeMap::new(),
                    |mut all, (route, count)| {
                        *all.entry(route.clone()).or_default() += count;
                        all
                    },
                ),
                unknown_key_reads: sum(&|f| f.unknown_key_reads),
                unknown_version_reads: sum(&|f| f.unknown_version_reads),
                unknown_version_reads_after: sum(&|f| f.unknown_version_reads_after),
                sign_up_reads_checked: sum(&|f| f.sign_up_reads_checked),
                stale_sign_up_reads: sum(&|f| f.stale_sign_up_reads),
                last_stuck_start_ms: each(&|f| f.last_stuck_start_ms)
                    .into_iter()
                    .reduce(f64::max),
                canary_checks: group.iter().map(|r| r.canary_checks).sum(),
                canary_violations: group.iter().map(|r| r.canary_violations).sum(),
            }
        })
        .collect()
}

const HEADERS: [&str; 20] = [
    "drill",
    "role",
    "runs",
    "requests",
    "stale",
    "mono",
    "lost",
    "no-token",
    "hung",
    "longest",
    "err in",
    "err out",
    "fault→write",
    "replicas again",
    "primary before",
    "during",
    "after",
    "unknown key/format",
    "stuck until",
    "canary",
];

fn cells(row: &Row) -> [String; 20] {
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0} ms"));
    let share = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:.1} %", v * 100.0));
    let runs = if row.failed_runs > 0 {
        format!("{} (+{} failed)", row.runs, row.failed_runs)
    } else {
        row.runs.to_string()
    };
    [
        row.drill.to_string(),
        row.role.to_string(),
        runs,
        row.requests.to_string(),
        row.stale_own_reads.to_string(),
        row.monotonic_violations.to_string(),
        row.lost_writes.to_string(),
        row.writes_without_token.to_string(),
        row.hung.to_string(),
        format!("{:.0} ms", row.longest_ms),
        row.errors_in_window.to_string(),
        row.errors_outside_window.to_string(),
        ms(row.fault_to_first_write_ms),
        ms(row.replicas_serve_again_ms),
        share(row.primary_share_before),
        share(row.primary_share_during),
        share(row.primary_share_after),
        format!("{}/{}", row.unknown_key_reads, row.unknown_version_reads),
        ms(row.last_stuck_start_ms),
        format!("{}/{}", row.canary_violations, row.canary_checks),
    ]
}

/// What the table says about the control under it.
fn control_note(row: &Row) -> String {
    format!(
        "{} ({}) is the negative control, not a drill: the same load, sign-up users included, \
         with the app's tokens off and no fault. Its stale own reads ({} of {} checked; {} of \
         {} profile and dashboard reads after a sign-up or login) are expected and do not fail \
         --check; a control with none fails it, as the checker then could not tell a broken \
         library from a working one.",
        row.drill,
        row.role,
        row.stale_own_reads,
        row.own_reads_checked,
        row.stale_sign_up_reads,
        row.sign_up_reads_checked
    )
}

/// The table for a terminal: text columns left-aligned, numbers right; a
/// rule sets the control's row apart, and a note under the table says what
/// it is.
pub fn table(report: &CampaignReport) -> String {
    let rows: Vec<[String; 20]> = report.rows.iter().map(cells).collect();
    let widths: Vec<usize> = (0..HEADERS.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([HEADERS[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: &[String]| {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                if i < 2 {
                    format!("{v:<w$}", w = widths[i])
                } else {
                    format!("{v:>w$}", w = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = String::new();
    let headers: Vec<String> = HEADERS.iter().map(|h| (*h).to_owned()).collect();
    let _ = writeln!(out, "{}", line(&headers));
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    let _ = writeln!(out, "{}", line(&rule));
    let mut drills_done = false;
    for (row, cells) in report.rows.iter().zip(&rows) {
        if row.control && !drills_done {
            drills_done = true;
            let _ = writeln!(out, "{}", line(&rule));
        }
        let _ = writeln!(out, "{}", line(cells));
    }
    for row in report.rows.iter().filter(|row| row.control) {
        let _ = writeln!(out, "\n{}", control_note(row));
    }
    out
}

/// The same table in Markdown, with the settings above it.
pub fn markdown(report: &CampaignReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Fault drills ({})\n", report.mode);
    let _ = writeln!(
        out,
        "max_wait {} ms, request timeout {} ms, replicas lagging {:?} ms, {} writing and {} reading users; \
         the fault window ends {} ms after recovery; {:.0} s in all.\n",
        report.max_wait_ms,
        report.request_timeout_ms,
        report.lags_ms,
        report.writers,
        report.readers,
        report.grace_ms,
        report.elapsed_s
    );
    let _ = writeln!(out, "| {} |", HEADERS.join(" | "));
    let align: Vec<&str> = (0..HEADERS.len())
        .map(|i| if i < 2 { "---" } else { "---:" })
        .collect();
    let _ = writeln!(out, "|{}|", align.join("|"));
    for row in &report.rows {
        let mut cells = cells(row);
        if row.control {
            cells[0] = format!("{} (control)", cells[0]);
        }
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    let _ = writeln!(
        out,
        "\nstale: own reads that missed an acknowledged write of the same user that exists on the \
         final primary; mono: own reads that lost a post an earlier own read showed; lost: \
         acknowledged writes absent from the final primary (asynchronous replication, counted \
         apart); no-token: acknowledged writes answered without an affinity token; hung: \
         requests outside the fault window longer than max_wait + 1 s; longest: the longest \
         request anywhere; err in / out: non-2xx or transport errors overlapping the window or \
         not; fault→write: from the fault to the first successful write sent after it took \
         effect (median of runs); replicas again: from the fault to the first own read a \
         replica served among those sent after recovery (median; - when none did); primary \
         before / during / after: the primary's share of reads (mean of runs); unknown \
         key/format: reads routed for a token signed with a key the instance did not know, and \
         for one in a later release's format (both to the primary); \
         stuck until: from the fault to the start of the last request in the window that ran \
         into the app's request timeout (latest of runs); canary: session reads the canary \
         found on a server lacking their write, of those it checked. A sign-up's profile read \
         and a login's dashboard read count as own reads."
    );
    for row in report.rows.iter().filter(|row| row.control) {
        let _ = writeln!(out, "\n**Control.** {}", control_note(row));
    }
    let _ = writeln!(out, "\n## Own reads by target and reason\n");
    for row in &report.rows {
        let total: u64 = row.own_read_routes.values().sum();
        let mut routes: Vec<_> = row.own_read_routes.iter().collect();
        routes.sort_by(|a, b| b.1.cmp(a.1));
        let routes: Vec<String> = routes
            .iter()
            .map(|(route, count)| {
                format!(
                    "{route} {:.1} %",
                    **count as f64 * 100.0 / total.max(1) as f64
                )
            })
            .collect();
        let _ = writeln!(out, "- {} ({}): {}", row.drill, row.role, routes.join(", "));
    }
    let failures = failures(report);
    if !failures.is_empty() {
        let _ = writeln!(out, "\n## What `--check` rejects\n");
        for failure in failures {
            let _ = writeln!(out, "- {failure}");
        }
    }
    out
}

/// Writes `results.json` and `results.md` under `dir`.
pub fn write_files(report: &CampaignReport, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_string_pretty(report).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("results.json"), json)?;
    std::fs::write(dir.join("results.md"), markdown(report))?;
    Ok(())
}

/// What `--check` rejects: any stale own read, any hung request or error
/// outside the fault window, and any run that could not be carried out;
/// and a negative control that is missing or saw no stale own read (its
/// stale own reads themselves are expected).
pub fn failures(report: &CampaignReport) -> Vec<String> {
    let mut failures = Vec::new();
    if !report.rows.iter().any(|row| row.control) {
        failures.push(
            "no negative control ran: nothing shows the checker would see a stale own read on \
             this cluster and load"
                .to_owned(),
        );
    }
    for row in &report.rows {
        let name = format!("{} ({})", row.drill, row.role);
        for error in &row.run_errors {
            failures.push(format!("{name}: a run could not be carried out: {error}"));
        }
        if row.control {
            if row.runs > 0 && row.stale_own_reads == 0 {
                failures.push(format!(
                    "{name}: the checker saw no staleness with tokens off ({} own reads checked): \
                     the campaign cannot tell a broken library from a working one",
                    row.own_reads_checked
                ));
            }
        } else if row.stale_own_reads > 0 {
            let example = row.stale_examples.first().map_or(String::new(), |s| {
                format!(
                    "; e.g. user {} at {:.0} ms missed post {} acknowledged at {:.0} ms ({})",
                    s.user, s.start_ms, s.missing_id, s.write_end_ms, s.route
                )
            });
            failures.push(format!(
                "{name}: {} stale own reads of {} checked{example}",
                row.stale_own_reads, row.own_reads_checked
            ));
        }
        if row.hung > 0 {
            failures.push(format!(
                "{name}: {} requests outside the fault window took longer than max_wait + 1 s (longest {:.0} ms)",
                row.hung, row.longest_ms
            ));
        }
        if row.errors_outside_window > 0 {
            failures.push(format!(
                "{name}: {} errors outside the fault window",
                row.errors_outside_window
            ));
        }
        if row.canary_violations > 0 {
            failures.push(format!(
                "{name}: the canary found {} of {} checked session reads on a server that lacked \
                 their write",
                row.canary_violations, row.canary_checks
            ));
        }
        if row.runs > 0 && row.drill.needs_unknown_key_reads() && row.unknown_key_reads == 0 {
            failures.push(format!(
                "{name}: no read was routed for an unknown key; the drill did not exercise the \
                 rotation"
            ));
        }
        if row.runs > 0 && row.drill.needs_unknown_version_reads() && row.unknown_version_reads == 0
        {
            failures.push(format!(
                "{name}: no read was routed for a token in a later release's format; the drill \
                 did not exercise the upgrade"
            ));
        }
        if row.drill.needs_unknown_version_reads() && row.unknown_version_reads_after > 0 {
            failures.push(format!(
                "{name}: {} reads were routed for a later format after every instance was \
                 upgraded; the upgraded instances do not read their own tokens",
                row.unknown_version_reads_after
            ));
        }
        if row.runs > 0 && row.drill == Drill::SignUp && row.sign_up_reads_checked == 0 {
            failures.push(format!(
                "{name}: no profile or dashboard read was checked after a sign-up or login"
            ));
        }
        if row.runs > 0 && row.own_reads_checked == 0 && !row.control {
            failures.push(format!(
                "{name}: no own read was checked; the drill proves nothing"
            ));
        }
    }
    failures
}

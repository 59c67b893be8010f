//! Lab output: a line per finished run, a short verdict for the terminal,
//! and the full tables, JSON, Markdown and an SVG chart per profile for the
//! files.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::{LabReport, ProfileInfo, StrategyResult};

const COLUMNS: [&str; 19] = [
    "strategy",
    "max_wait",
    "own reads",
    "stale own",
    "reads checked",
    "went back",
    "sessions back",
    "primary share",
    "primary q/1k",
    "token reads",
    "read p50",
    "read p99",
    "post-write p99",
    "wasted wait p99",
    "write p50",
    "offered/s",
    "served/s",
    "dropped",
    "errors",
];

fn cells(r: &StrategyResult) -> [String; 19] {
    [
        r.label(),
        if r.max_wait_ms == 0 {
            "-".to_owned()
        } else {
            format!("{} ms", r.max_wait_ms)
        },
        r.own_reads.to_string(),
        r.stale_own_reads.to_string(),
        r.counter_reads.to_string(),
        r.monotonic_violations.to_string(),
        format!("{}/{}", r.sessions_with_violations, r.sessions),
        format!("{:.1} %", r.primary_read_share * 100.0),
        format!("{:.0}", r.primary_queries_per_1k_requests),
        format!("{:.1} %", r.read_token_share * 100.0),
        format!("{:.2} ms", r.read_p50_ms),
        format!("{:.2} ms", r.read_p99_ms),
        format!("{:.2} ms", r.post_write_read_p99_ms),
        format!("{:.2} ms", r.wasted_wait_ms_p99),
        format!("{:.2} ms", r.write_p50_ms),
        format!("{:.0}", r.offered_rps),
        format!("{:.0}", r.achieved_rps),
        r.dropped_arrivals.to_string(),
        r.errors.to_string(),
    ]
}

fn describe(report: &LabReport) -> String {
    let load = if report.load == "open" {
        format!(
            "open loop: {:.0} actions/s offered (Poisson) to {} sessions",
            report.rate, report.users
        )
    } else {
        format!("closed loop: {} virtual users flat out", report.users)
    };
    format!(
        "{load}, {:.1} s measured per strategy and profile over {} app instances and {} \
         replica{}, write ratio {}, \
         a counter advanced every {} ms ({} cores)\n\
         went back: reads that saw an older counter than an earlier read of their session \
         (monotonic-read violations); token reads: read responses that set a new token; \
         primary q/1k: statements the primary ran per 1,000 requests (pg_stat_statements); \
         post-write: the own read right after a write; wasted wait: how long reads that then \
         went to the primary had waited; offered/served: actions per second \
         (a write action is a post and its own read); dropped: arrivals that found every session busy",
        report.duration_s,
        report.instances,
        report.replicas,
        if report.replicas == 1 { "" } else { "s" },
        report.write_ratio,
        report.counter_interval_ms,
        report.cores
    )
}

/// One profile's heading.
fn profile_heading(info: &ProfileInfo) -> String {
    format!("{}: {}", info.profile, info.description)
}

/// One table's lines, columns padded to their widest cell.
fn aligned(header: &[String], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(String::len).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: &[String]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i == 0 {
                let _ = write!(text, "{cell:<width$}");
            } else {
                let _ = write!(text, "  {cell:>width$}");
            }
        }
        text.push('\n');
        text
    };
    let mut out = line(header);
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out.push_str(&line(&rule));
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

/// The tables for a terminal, one per profile.
pub fn table(report: &LabReport) -> String {
    let header: Vec<String> = COLUMNS.iter().map(|c| (*c).to_owned()).collect();
    let mut out = format!("{}\n", describe(report));
    for info in &report.profiles {
        let rows: Vec<Vec<String>> = report
            .results_of(&info.profile)
            .into_iter()
            .map(|r| cells(r).to_vec())
            .collect();
        let _ = write!(
            out,
            "\n{}\n\n{}",
            profile_heading(info),
            aligned(&header, &rows)
        );
    }
    out
}

/// The same tables in Markdown.
pub fn markdown(report: &LabReport) -> String {
    let mut out = format!("{}\n", describe(report));
    for info in &report.profiles {
        let _ = write!(
            out,
            "\n### {}\n\n| {} |\n|",
            profile_heading(info),
            COLUMNS.join(" | ")
        );
        for i in 0..COLUMNS.len() {
            out.push_str(if i == 0 { "---|" } else { "---:|" });
        }
        out.push('\n');
        for result in report.results_of(&info.profile) {
            let _ = writeln!(out, "| {} |", cells(result).join(" | "));
        }
    }
    out
}

/// Whether each of `results` is on the frontier: consistent (0 stale own
/// reads), and no other consistent result has both a primary read share
/// and a post-write read p99 at most its own, one of them smaller.
pub fn frontier(results: &[&StrategyResult]) -> Vec<bool> {
    let consistent = |r: &StrategyResult| r.stale_own_reads == 0;
    results
        .iter()
        .map(|r| {
            consistent(r)
                && !results.iter().any(|other| {
                    consistent(other)
                        && other.primary_read_share <= r.primary_read_share
                        && other.post_write_read_p99_ms <= r.post_write_read_p99_ms
                        && (other.primary_read_share < r.primary_read_share
                            || other.post_write_read_p99_ms < r.post_write_read_p99_ms)
                })
        })
        .collect()
}

const FRONTIER_COLUMNS: [&str; 10] = [
    "strategy",
    "post-write reads",
    "primary share",
    "primary q/1k",
    "post-write p50",
    "post-write p99",
    "wasted wait p99",
    "stale own",
    "dropped",
    "frontier",
];

/// Each profile's strategies by primary read share, marking the frontier,
/// in Markdown.
pub fn frontier_tables(report: &LabReport) -> String {
    let mut out = String::from(
        "## The trade-off, profile by profile\n\n\
         Sorted by primary read share. On the frontier: no other strategy with 0 stale own \
         reads sent fewer reads to the primary without a slower post-write read p99 \
         (or the reverse). A p99 over a few hundred post-write reads is close to their \
         maximum: differences of a few milliseconds are noise.\n",
    );
    for info in &report.profiles {
        let mut results = report.results_of(&info.profile);
        results.sort_by(|a, b| {
            a.primary_read_share.total_cmp(&b.primary_read_share).then(
                a.post_write_read_p99_ms
                    .total_cmp(&b.post_write_read_p99_ms),
            )
        });
        let on = frontier(&results);
        let _ = write!(
            out,
            "\n### {}\n\n| {} |\n|",
            profile_heading(info),
            FRONTIER_COLUMNS.join(" | ")
        );
        for i in 0..FRONTIER_COLUMNS.len() {
            out.push_str(if i == 0 { "---|" } else { "---:|" });
        }
        out.push('\n');
        for (r, on) in results.iter().zip(on) {
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} % | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms | {} | {} | {} |",
                r.label(),
                r.post_write_reads,
                r.primary_read_share * 100.0,
                r.primary_queries_per_1k_requests,
                r.post_write_read_p50_ms,
                r.post_write_read_p99_ms,
                r.wasted_wait_ms_p99,
                r.stale_own_reads,
                r.dropped_arrivals,
                if on {
                    "yes"
                } else if r.stale_own_reads > 0 {
                    "stale"
                } else {
                    ""
                }
            );
        }
    }
    out
}

/// Each run's connections per app instance on each node, in Markdown.
pub fn connections_table(report: &LabReport) -> String {
    let mut out = String::from(
        "## Connections per app instance\n\n\
         At their peak over the measured window, counted on each node in `pg_stat_activity` \
         (client backends by `application_name`): pools (the app's reads and writes, the layer's \
         captures, the canary) and tracker (polls, probes, discovery), divided by the app \
         instances serving.\n\n",
    );
    let nodes: Vec<&str> = report
        .results
        .first()
        .map(|r| r.connections.iter().map(|c| c.node.as_str()).collect())
        .unwrap_or_default();
    let _ = write!(out, "| profile | strategy |");
    for node in &nodes {
        let _ = write!(out, " {node} pools | {node} tracker |");
    }
    out.push_str("\n|---|---|");
    for _ in &nodes {
        out.push_str("---:|---:|");
    }
    out.push('\n');
    for r in &report.results {
        let _ = write!(out, "| {} | {} |", r.profile, r.label());
        for node in &r.connections {
            let _ = write!(out, " {} | {} |", node.pools, node.tracker);
        }
        out.push('\n');
    }
    out
}

/// One finished run in a line, for output that is not a terminal (where
/// progress bars do not show).
pub fn line(r: &StrategyResult) -> String {
    format!(
        "{} {}: {} stale of {} own reads, {} reads back in time, primary {:.1} % of reads, \
         post-write p99 {:.1} ms, {} errors",
        r.profile,
        r.label(),
        r.stale_own_reads,
        r.own_reads,
        r.monotonic_violations,
        r.primary_read_share * 100.0,
        r.post_write_read_p99_ms,
        r.errors
    )
}

/// The short verdict that ends a run on the terminal: per strategy (and
/// variant), over every profile run, the stale own reads, the primary's
/// share of reads and the post-write read p99 (the range over profiles
/// when there are several), then where the charts and full tables are.
pub fn verdict(report: &LabReport, out: &Path) -> String {
    let mut labels: Vec<String> = Vec::new();
    for r in &report.results {
        if !labels.contains(&r.label()) {
            labels.push(r.label());
        }
    }
    let range = |values: Vec<f64>, unit: &str, decimals: usize| -> String {
        let low = values.iter().copied().fold(f64::INFINITY, f64::min);
        let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if values.is_empty() {
            "-".to_owned()
        } else if (high - low).abs() < 0.05 {
            format!("{low:.decimals$}{unit}")
        } else {
            format!("{low:.decimals$}–{high:.decimals$}{unit}")
        }
    };
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut consistent = true;
    for label in &labels {
        let of: Vec<&StrategyResult> = report
            .results
            .iter()
            .filter(|r| &r.label() == label)
            .collect();
        let stale: u64 = of.iter().map(|r| r.stale_own_reads).sum();
        let checked: u64 = of.iter().map(|r| r.own_reads).sum();
        let promises = of
            .first()
            .is_some_and(|r| r.strategy.promises_read_your_writes());
        if promises && stale > 0 {
            consistent = false;
        }
        let note = match (promises, stale) {
            (false, 0) => "no stale read seen: the lag did not show".to_owned(),
            (false, _) => "stale, as expected: reads ignore the user's writes".to_owned(),
            (true, 0) => String::new(),
            (true, _) => "STALE: this strategy promises read-your-writes".to_owned(),
        };
        rows.push(vec![
            label.clone(),
            format!("{stale} of {checked}"),
            range(
                of.iter().map(|r| r.primary_read_share * 100.0).collect(),
                " %",
                1,
            ),
            range(
                of.iter().map(|r| r.post_write_read_p99_ms).collect(),
                " ms",
                0,
            ),
        ]);
        notes.push(note);
    }
    let header: Vec<String> = [
        "strategy",
        "stale own reads",
        "primary share",
        "post-write p99",
    ]
    .iter()
    .map(|h| (*h).to_owned())
    .collect();
    let profiles: Vec<String> = report.profiles.iter().map(|p| p.profile.name()).collect();
    let mut text = format!(
        "Verdict: {} under {} ({} lag profile{}, {:.0} s each, {:.0} actions/s over {} app instances)\n\n",
        if consistent {
            "every strategy that promises read-your-writes kept it"
        } else {
            "a strategy that promises read-your-writes went stale"
        },
        profiles.join(", "),
        profiles.len(),
        if profiles.len() == 1 { "" } else { "s" },
        report.duration_s,
        report.rate,
        report.instances
    );
    // Header and rule, then each row with its note after it.
    let table = aligned(&header, &rows);
    let mut lines = table.lines();
    for line in lines.by_ref().take(2) {
        let _ = writeln!(text, "{line}");
    }
    for (line, note) in lines.zip(&notes) {
        let _ = writeln!(text, "{}", format!("{line}  {note}").trim_end());
    }
    let text_end = text.trim_end().len();
    text.truncate(text_end);
    let charts: Vec<String> = report
        .profiles
        .iter()
        .map(|p| chart_file(&p.profile))
        .collect();
    let _ = write!(
        text,
        "\n\nprimary share: reads the primary served; post-write p99: the own read right after a \
         write{}.\n\
         Charts (primary share against post-write p99, per profile): {} in {}\n\
         Every column, reads back in time, connections per node: {}",
        if profiles.len() > 1 {
            " (ranges are over profiles)"
        } else {
            ""
        },
        charts.join(", "),
        out.display(),
        out.join("results.md").display()
    );
    text
}

/// Writes `results.json`, `results.md` (every table, then the frontier
/// tables) and `frontier-<profile>.svg` for each profile into `dir`.
pub fn write_files(report: &LabReport, dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(
        dir.join("results.md"),
        format!(
            "{}\n{}\n{}",
            markdown(report),
            frontier_tables(report),
            connections_table(report)
        ),
    )?;
    for info in &report.profiles {
        frontier_chart(report, info, &dir.join(chart_file(&info.profile)))?;
    }
    Ok(())
}

/// The chart's file name: `frontier-skewed.svg`,
/// `frontier-steady-20ms-90ms.svg`.
fn chart_file(profile: &super::profile::Profile) -> String {
    format!("frontier-{}.svg", profile.slug())
}

/// A scatter of one profile's strategies: primary read share (x) against
/// post-write read p99 (y), each point labelled; the frontier joined by a
/// line, strategies that went stale in red.
fn frontier_chart(
    report: &LabReport,
    info: &ProfileInfo,
    path: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut results = report.results_of(&info.profile);
    results.sort_by(|a, b| a.primary_read_share.total_cmp(&b.primary_read_share));
    let on = frontier(&results);
    let y_max = results
        .iter()
        .map(|r| r.post_write_read_p99_ms)
        .fold(1.0, f64::max)
        * 1.2;
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{}: the cost of reading your writes", info.profile),
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(60)
        .build_cartesian_2d(-2.0..105.0, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("primary read share (%)")
        .y_desc("post-write read p99 (ms)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    let frontier_color = RGBColor(78, 154, 6);
    let line: Vec<(f64, f64)> = results
        .iter()
        .zip(&on)
        .filter(|(_, on)| **on)
        .map(|(r, _)| (r.primary_read_share * 100.0, r.post_write_read_p99_ms))
        .collect();
    chart.draw_series(LineSeries::new(line, frontier_color.stroke_width(2)))?;
    let label = ("sans-serif", 13).into_font();
    chart.draw_series(results.iter().zip(&on).enumerate().map(|(i, (r, on))| {
        let color = if r.stale_own_reads > 0 {
            RGBColor(204, 0, 0)
        } else if *on {
            frontier_color
        } else {
            RGBColor(52, 101, 164)
        };
        // Labels alternate sides, so points close together stay readable.
        let offset = if i % 2 == 0 { (7, -14) } else { (7, 2) };
        EmptyElement::at((r.primary_read_share * 100.0, r.post_write_read_p99_ms))
            + Circle::new((0, 0), 5, color.filled())
            + Text::new(r.label(), offset, label.clone())
    }))?;
    root.draw(&Text::new(
        info.description.clone(),
        (16, 580),
        ("sans-serif", 12).into_font(),
    ))?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::profile::Profile;
    use crate::lab::strategy::Strategy;

    fn result(strategy: Strategy, share: f64, p99: f64, stale: u64) -> StrategyResult {
        StrategyResult {
            profile: Profile::Skewed,
            strategy,
            role: crate::roles::Role::Superuser,
            replicas: crate::lab::instance::ReplicaMode::Direct,
            labelled: false,
            max_wait_ms: 0,
            latency_budget_ms: 0,
            own_reads: 100,
            stale_own_reads: stale,
            reads: 100,
            primary_read_share: share,
            read_p50_ms: 1.0,
            read_p99_ms: p99,
            write_p50_ms: 1.0,
            writes: 10,
            requests_per_second: 100.0,
            offered_rps: 100.0,
            achieved_rps: 100.0,
            dropped_arrivals: 0,
            abandoned_actions: 0,
            post_write_reads: 100,
            post_write_read_p50_ms: 1.0,
            post_write_read_p99_ms: p99,
            primary_statements: 0,
            primary_queries_per_1k_requests: 0.0,
            wasted_wait_reads: 0,
            wasted_wait_ms_p99: 0.0,
            errors: 0,
            sessions: 1,
            sessions_with_violations: 0,
            counter_reads: 100,
            monotonic_violations: 0,
            read_token_share: 0.0,
            counter_advances: 0,
            connections: Vec::new(),
        }
    }

    #[test]
    fn the_frontier_is_the_consistent_strategies_nothing_beats_on_both_counts() {
        let results = [
            result(Strategy::Naive, 0.0, 1.0, 50),
            result(Strategy::Primary, 1.0, 5.0, 0),
            result(Strategy::Lsn, 0.2, 5.0, 0),
            result(Strategy::LsnWait { max_wait_ms: 10 }, 0.1, 9.0, 0),
            result(Strategy::LsnWait { max_wait_ms: 80 }, 0.0, 40.0, 0),
            result(Strategy::LsnWait { max_wait_ms: 160 }, 0.0, 60.0, 0),
        ];
        let refs: Vec<&StrategyResult> = results.iter().collect();
        // Naive is fastest but stale; primary loses to lsn on share at the
        // same p99; lsn-wait-160ms loses to lsn-wait-80ms on p99.
        assert_eq!(frontier(&refs), [false, false, true, true, true, false]);
    }
}

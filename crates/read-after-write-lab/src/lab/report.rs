//! Lab output: a terminal table, JSON, Markdown and an SVG chart.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

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
        r.strategy.name(),
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
        "{load}, {:.1} s measured per strategy and profile over {} app instances, write ratio {}, \
         a counter advanced every {} ms ({} cores)\n\
         went back: reads that saw an older counter than an earlier read of their session \
         (monotonic-read violations); token reads: read responses that set a new token; \
         primary q/1k: statements the primary ran per 1,000 requests (pg_stat_statements); \
         post-write: the own read right after a write; wasted wait: how long reads that then \
         went to the primary had waited; offered/served: actions per second \
         (a write action is a post and its own read); dropped: arrivals that found every session busy",
        report.duration_s,
        report.instances,
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
            .results_of(info.profile)
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
        for result in report.results_of(info.profile) {
            let _ = writeln!(out, "| {} |", cells(result).join(" | "));
        }
    }
    out
}

/// Writes `results.json`, `results.md` and `chart.svg` into `dir`.
pub fn write_files(report: &LabReport, dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(dir.join("results.md"), markdown(report))?;
    chart(report, &dir.join("chart.svg"))?;
    Ok(())
}

/// Three bar charts side by side: primary read share, stale own reads and
/// monotonic-read violations per strategy.
fn chart(report: &LabReport, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1440, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, rest) = root.split_horizontally(480);
    let (middle, right) = rest.split_horizontally(480);
    let names: Vec<String> = report.results.iter().map(|r| r.strategy.name()).collect();
    let shares: Vec<f64> = report
        .results
        .iter()
        .map(|r| r.primary_read_share * 100.0)
        .collect();
    let stale: Vec<f64> = report
        .results
        .iter()
        .map(|r| r.stale_own_reads as f64)
        .collect();
    bars(
        &left,
        "Primary read share (%)",
        &names,
        &shares,
        100.0,
        &RGBColor(52, 101, 164),
    )?;
    let stale_max = stale.iter().copied().fold(1.0, f64::max) * 1.15;
    bars(
        &middle,
        "Stale own reads",
        &names,
        &stale,
        stale_max,
        &RGBColor(204, 0, 0),
    )?;
    let back: Vec<f64> = report
        .results
        .iter()
        .map(|r| r.monotonic_violations as f64)
        .collect();
    let back_max = back.iter().copied().fold(1.0, f64::max) * 1.15;
    bars(
        &right,
        "Reads that went back in time",
        &names,
        &back,
        back_max,
        &RGBColor(245, 121, 0),
    )?;
    root.present()?;
    Ok(())
}

fn bars<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    names: &[String],
    values: &[f64],
    max: f64,
    color: &RGBColor,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(
            (0..names.len().saturating_sub(1)).into_segmented(),
            0.0..max,
        )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_label_formatter(&|y| format!("{y:.0}"))
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;
    chart.draw_series(values.iter().enumerate().map(|(i, value)| {
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), *value),
            ],
            color.filled(),
        );
        bar.set_margin(0, 0, 8, 8);
        bar
    }))?;
    let label = ("sans-serif", 14)
        .into_font()
        .into_text_style(area)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(values.iter().enumerate().map(|(i, value)| {
        let text = if value.fract() == 0.0 {
            format!("{value:.0}")
        } else {
            format!("{value:.1}")
        };
        Text::new(
            text,
            (SegmentValue::CenterOf(i), *value + max * 0.01),
            label.clone(),
        )
    }))?;
    Ok(())
}

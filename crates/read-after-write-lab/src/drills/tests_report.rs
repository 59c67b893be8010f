//! Tests of [`report`](super::report).

use super::checker::RunFigures;
use super::harness::Role;
use super::history::FaultWindow;
use super::report::*;
use super::scenarios::{Drill, RunRecord};

fn run(drill: Drill, role: Role, stale: u64, checked: u64) -> RunRecord {
    RunRecord {
        drill,
        role,
        run: 1,
        cluster_start_s: 1.0,
        load_s: 3.0,
        window: FaultWindow {
            injected_ms: 0.0,
            applied_ms: 0.0,
            recovered_ms: 0.0,
            grace_ms: 0.0,
        },
        figures: Some(RunFigures {
            requests: 1000,
            acked_writes: 300,
            own_reads_checked: checked,
            stale_own_reads: stale,
            ..RunFigures::default()
        }),
        error: None,
        history_file: None,
        canary_checks: 0,
        canary_violations: 0,
    }
}

fn report(runs: Vec<RunRecord>) -> CampaignReport {
    CampaignReport {
        mode: "short".into(),
        max_wait_ms: 200,
        request_timeout_ms: 2000,
        lags_ms: vec![30, 150],
        writers: 12,
        readers: 4,
        grace_ms: 4000,
        elapsed_s: 10.0,
        rows: rows(&runs),
        runs,
    }
}

fn control(stale: u64) -> RunRecord {
    run(Drill::ControlNaive, Role::Superuser, stale, 300)
}

#[test]
fn a_stale_control_passes_and_its_stale_reads_do_not_fail() {
    let r = report(vec![
        control(250),
        run(Drill::AppRestart, Role::Plain, 0, 300),
    ]);
    assert_eq!(failures(&r), Vec::<String>::new());
}

#[test]
fn a_control_without_staleness_fails_the_check() {
    let r = report(vec![
        control(0),
        run(Drill::AppRestart, Role::Plain, 0, 300),
    ]);
    let failures = failures(&r);
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0]
        .starts_with("control-naive (superuser): the checker saw no staleness with tokens off"));
    assert!(failures[0].contains("cannot tell a broken library from a working one"));
}

#[test]
fn a_control_that_could_not_run_fails_the_check() {
    let mut broken = control(0);
    broken.figures = None;
    broken.error = Some("setup: no cluster".into());
    let failures = failures(&report(vec![broken]));
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].contains("could not be carried out: setup: no cluster"));
}

#[test]
fn a_campaign_without_a_control_fails_the_check() {
    let failures = failures(&report(vec![run(Drill::AppRestart, Role::Plain, 0, 300)]));
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].starts_with("no negative control ran"));
}

#[test]
fn a_drill_still_fails_on_stale_reads_next_to_the_control() {
    let r = report(vec![
        control(250),
        run(Drill::SplitBrain, Role::Monitor, 2, 300),
    ]);
    let failures = failures(&r);
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].starts_with("split-brain (monitor): 2 stale own reads"));
}

#[test]
fn a_canary_violation_fails_the_check() {
    let mut misrouted = run(Drill::ReaderEndpoint, Role::Plain, 0, 300);
    misrouted.canary_checks = 40;
    misrouted.canary_violations = 1;
    let failures = failures(&report(vec![control(250), misrouted]));
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].starts_with("reader-endpoint (plain): the canary found 1 of 40"));
}

#[test]
fn a_rotation_drill_that_met_no_unknown_key_proves_nothing() {
    let mut rotation = run(Drill::RollingKeyRotation, Role::Monitor, 0, 300);
    let failures_without = failures(&report(vec![control(250), rotation.clone()]));
    assert_eq!(failures_without.len(), 1, "{failures_without:?}");
    assert!(failures_without[0].contains("no read was routed for an unknown key"));
    if let Some(figures) = rotation.figures.as_mut() {
        figures.unknown_key_reads = 12;
    }
    assert_eq!(
        failures(&report(vec![control(250), rotation])),
        Vec::<String>::new()
    );
}

#[test]
fn an_upgrade_drill_that_met_no_later_format_proves_nothing() {
    let mut upgrade = run(Drill::RollingFormatUpgrade, Role::Plain, 0, 300);
    let failures_without = failures(&report(vec![control(250), upgrade.clone()]));
    assert_eq!(failures_without.len(), 1, "{failures_without:?}");
    assert!(failures_without[0].contains("in a later release's format"));
    if let Some(figures) = upgrade.figures.as_mut() {
        // Reads for an unknown key do not stand in for them.
        figures.unknown_key_reads = 12;
    }
    assert_eq!(
        failures(&report(vec![control(250), upgrade.clone()])).len(),
        1
    );
    if let Some(figures) = upgrade.figures.as_mut() {
        figures.unknown_version_reads = 12;
    }
    assert_eq!(
        failures(&report(vec![control(250), upgrade.clone()])),
        Vec::<String>::new()
    );
    // Still routed so once both instances run the later release: the
    // stand-in does not read its own tokens.
    if let Some(figures) = upgrade.figures.as_mut() {
        figures.unknown_version_reads_after = 2;
    }
    let failures = failures(&report(vec![control(250), upgrade]));
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].contains("after every instance was upgraded"));
}

#[test]
fn the_control_row_comes_last_set_apart_and_explained() {
    let r = report(vec![
        control(250),
        run(Drill::PlannedFailover, Role::Superuser, 0, 300),
        run(Drill::AppRestart, Role::Plain, 0, 300),
    ]);
    let order: Vec<_> = r.rows.iter().map(|row| (row.drill, row.control)).collect();
    assert_eq!(
        order,
        [
            (Drill::PlannedFailover, false),
            (Drill::AppRestart, false),
            (Drill::ControlNaive, true)
        ]
    );
    let text = table(&r);
    let lines: Vec<&str> = text.lines().collect();
    // Header, rule, two drills, rule, the control.
    assert!(lines[4].starts_with("---"), "{text}");
    assert!(lines[5].starts_with("control-naive "), "{text}");
    assert!(lines[5].contains(" superuser "), "{text}");
    assert!(text.contains("is the negative control, not a drill"));
    assert!(text.contains("(250 of 300 checked; 0 of 0 profile and dashboard reads"));
    let md = markdown(&r);
    assert!(md.contains("| control-naive (control) | superuser | 1 | 1000 | 250 |"));
    assert!(md.contains("**Control.** control-naive (superuser) is the negative control"));
    let json = serde_json::to_value(&r).expect("the report encodes");
    assert_eq!(json["rows"][2]["drill"], "control-naive");
    assert_eq!(json["rows"][2]["control"], true);
    assert_eq!(json["rows"][0]["control"], false);
}

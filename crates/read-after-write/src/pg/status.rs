//! What a replica set reports about itself: [`ReplicaStatus`] per replica
//! server, and the findings of its self-check.

use std::time::Duration;

use crate::backend::{Finding, LayerSettings};
use crate::position::Lsn;

/// A snapshot of one replica as the tracker sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplicaStatus {
    /// The replica's name.
    pub name: String,
    /// Whether reads may go to it.
    pub healthy: bool,
    /// Last replay position seen.
    pub replayed: Lsn,
    /// Timeline this process last saw its WAL receiver on; 0 when unknown
    /// (an unknown timeline never qualifies the replica for a token).
    pub timeline: u32,
    /// On a timeline other than the primary's, its replay stalled while the
    /// primary wrote, or it replayed past a heartbeat of the current primary
    /// without showing it: it serves no reads.
    pub diverged: bool,
    /// Bytes of WAL the primary had written beyond `replayed` at its last
    /// poll (meaningless when `timeline` differs from the primary's).
    pub lag_bytes: u64,
    /// How long ago the primary first had WAL this replica has not replayed
    /// (to within a poll interval); zero when it is caught up.
    pub lag: Duration,
    /// Whether the tracker's role can see this replica's timeline (is a
    /// member of `pg_read_all_stats`, e.g. through `pg_monitor`), as asked
    /// when the tracker connected; `None` before it first connected. Without
    /// it, and without a heartbeat table, no read with a token can go to
    /// this replica.
    pub sees_timelines: Option<bool>,
    /// A replay pause was requested or is in effect
    /// (`pg_wal_replay_pause()`): reads are never made to wait for it.
    pub paused: bool,
    /// How long after the primary wrote WAL this replica replays it,
    /// smoothed (rises fast, falls slowly); `None` until measured. What
    /// predictions are made from.
    pub replay_delay: Option<Duration>,
    /// Bytes of WAL replayed per second, smoothed over about a second.
    pub replay_rate: u64,
    /// The name of the replica URL (or pool) this server was found behind;
    /// equal to `name` for the first server found behind it.
    pub url: String,
    /// The server's own address (`inet_server_addr():inet_server_port()`),
    /// once the tracker reached it; `local` over a Unix socket.
    pub server: Option<String>,
    /// A heartbeat of the current primary proves this replica follows it
    /// (the way a role without `pg_monitor` proves what replicas hold).
    pub heartbeat_proven: bool,
    /// The replica's pool reaches more than one server and cannot be tied
    /// to one: it serves only unbounded eventual reads.
    pub indistinct: bool,
}

/// What a replica set knows about itself beyond its replicas, for
/// [`diagnose`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SetFacts {
    pub(crate) primary_healthy: bool,
    /// Replicas are proven by a heartbeat table.
    pub(crate) heartbeat: bool,
    /// The cluster is Aurora PostgreSQL.
    pub(crate) aurora: bool,
    /// Session reads the canary found on a replica that lacked their
    /// position.
    pub(crate) canary_violations: u64,
}

/// The findings for [`PgReplicaSet`](super::PgReplicaSet)'s `diagnose`,
/// from a snapshot.
pub(crate) fn diagnose(
    facts: SetFacts,
    replicas: &[ReplicaStatus],
    settings: &LayerSettings,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    let primary_healthy = facts.primary_healthy;
    if facts.canary_violations > 0 {
        findings.push(Finding::error(
            "canary_violations",
            format!(
                "the canary found {} session reads served by a replica that had not replayed the \
                 position they required: reads are going to servers the tracker does not see (a \
                 pool or monitoring URL that reaches other servers than the tracker's); check \
                 read_after_write_canary_violations_total by replica and the replica URLs",
                facts.canary_violations
            ),
        ));
    }
    if facts.aurora {
        findings.push(Finding::error(
            "aurora_replicas_unverifiable",
            "Aurora PostgreSQL: its replicas replay no WAL, so none can be proven to hold a write; \
             reads with a token go to the writer and replicas serve eventual reads only",
        ));
    }
    if !primary_healthy {
        findings.push(Finding::error(
            "primary_unhealthy",
            "the primary did not answer the tracker's last probe within probe_timeout: writes \
             fail until it does; check the primary and the primary URL",
        ));
    }
    if replicas.is_empty() {
        findings.push(Finding::info(
            "no_replicas",
            "no replicas are configured: every read goes to the primary; add them with \
             replica_url or replica_pool",
        ));
        return findings;
    }
    for replica in replicas {
        let name = &replica.name;
        if replica.indistinct {
            findings.push(Finding::error(
                "replica_indistinct",
                format!(
                    "replica {name}: the pool you brought reaches more than one server (a reader \
                     endpoint, DNS round robin, a pooler with several hosts), so its reads cannot \
                     be tied to a server it serves only unbounded eventual reads; give it as a URL \
                     (replica_url), and the library follows each server behind it"
                ),
            ));
        }
        if replica.diverged {
            findings.push(Finding::warning(
                "replica_diverged",
                format!(
                    "replica {name} is on another timeline than the primary, or its replay stalled \
                     while the primary wrote: it serves no reads; re-point it at the primary \
                     (pg_rewind or a fresh base backup)"
                ),
            ));
        } else if !replica.healthy {
            let since = if replica.sees_timelines.is_none() {
                " and has not answered since startup"
            } else {
                ""
            };
            findings.push(Finding::warning(
                "replica_unhealthy",
                format!(
                    "replica {name} serves no reads{since}: down, not answering within \
                     probe_timeout, or not in recovery; check it and its URL"
                ),
            ));
        }
        if replica.sees_timelines == Some(false) && !facts.heartbeat && !facts.aurora {
            findings.push(Finding::warning(
                "replica_role_cannot_see_timelines",
                format!(
                    "replica {name}: the tracker's role is not a member of pg_read_all_stats and no \
                     heartbeat table is in use, so nothing proves what the replica holds and no read \
                     with a token goes to it (they all go to the primary); create the heartbeat table \
                     (read_after_write::pg::HEARTBEAT_DDL), or run `GRANT pg_monitor TO <that role>` \
                     on the primary"
                ),
            ));
        }
    }
    for (url, count) in servers_per_url(replicas) {
        if count > 1 {
            findings.push(Finding::info(
                "reader_endpoint",
                format!(
                    "replica URL {url} reaches {count} servers; each is followed and read on its own"
                ),
            ));
        }
    }
    let serving = || replicas.iter().filter(|r| r.healthy && !r.diverged);
    let Some(least_lag) = serving().map(|r| r.lag).min() else {
        findings.push(Finding::warning(
            "no_healthy_replica",
            "no replica is healthy: every read goes to the primary until one answers",
        ));
        return findings;
    };
    if settings.uses_positions && least_lag > settings.max_wait {
        findings.push(Finding::warning(
            "lag_exceeds_max_wait",
            format!(
                "every replica lags at least {least_lag:?}, more than max_wait ({:?}): a user's \
                 reads right after their write go to the primary (at once when routed by \
                 prediction, the default; after waiting max_wait with WaitPolicy::Fixed); raise \
                 max_wait above the lag, or accept those primary reads",
                settings.max_wait
            ),
        ));
    }
    for replica in serving().filter(|r| r.lag > settings.ttl) {
        findings.push(Finding::warning(
            "lag_exceeds_ttl",
            format!(
                "replica {} lags {:?}, more than the token TTL ({:?}): once a token expires its \
                 user's reads may go to this replica without their write; raise the layer's ttl \
                 above the worst lag",
                replica.name, replica.lag, settings.ttl
            ),
        ));
    }
    findings
}

/// How many servers were found behind each URL, in order.
fn servers_per_url(replicas: &[ReplicaStatus]) -> Vec<(&str, usize)> {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for replica in replicas {
        match counts.iter_mut().find(|(url, _)| *url == replica.url) {
            Some((_, count)) => *count += 1,
            None => counts.push((&replica.url, 1)),
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(name: &str, lag_ms: u64) -> ReplicaStatus {
        ReplicaStatus {
            name: name.to_owned(),
            healthy: true,
            replayed: Lsn::new(0x1000),
            timeline: 1,
            diverged: false,
            lag_bytes: 0,
            lag: Duration::from_millis(lag_ms),
            sees_timelines: Some(true),
            paused: false,
            replay_delay: None,
            replay_rate: 0,
            url: name.to_owned(),
            server: Some("127.0.0.1:5432".to_owned()),
            heartbeat_proven: false,
            indistinct: false,
        }
    }

    fn facts(primary_healthy: bool) -> SetFacts {
        SetFacts {
            primary_healthy,
            ..SetFacts::default()
        }
    }

    fn codes(findings: &[Finding]) -> Vec<&'static str> {
        findings.iter().map(Finding::code).collect()
    }

    fn settings() -> LayerSettings {
        LayerSettings::new(Duration::from_millis(20), Duration::from_secs(30))
    }

    #[test]
    fn a_healthy_set_finds_nothing() {
        let replicas = [replica("a", 0), replica("b", 5)];
        assert!(diagnose(facts(true), &replicas, &settings()).is_empty());
    }

    #[test]
    fn a_role_without_pg_monitor_is_named_with_the_grant() {
        let mut blind = replica("replica-2", 0);
        blind.sees_timelines = Some(false);
        let findings = diagnose(facts(true), &[replica("replica-1", 0), blind], &settings());
        assert_eq!(codes(&findings), ["replica_role_cannot_see_timelines"]);
        assert!(findings[0].message().contains("replica-2"));
        assert!(findings[0].message().contains("GRANT pg_monitor"));
    }

    #[test]
    fn lag_beyond_max_wait_warns_only_when_every_replica_lags() {
        let findings = diagnose(
            facts(true),
            &[replica("a", 5), replica("b", 120)],
            &settings(),
        );
        assert!(findings.is_empty(), "{findings:?}");
        let findings = diagnose(
            facts(true),
            &[replica("a", 50), replica("b", 120)],
            &settings(),
        );
        assert_eq!(codes(&findings), ["lag_exceeds_max_wait"]);
        let mut window = settings();
        window.uses_positions = false;
        assert!(diagnose(facts(true), &[replica("a", 50)], &window).is_empty());
    }

    #[test]
    fn lag_beyond_the_ttl_warns_per_replica() {
        let findings = diagnose(
            facts(true),
            &[replica("a", 0), replica("b", 40_000)],
            &settings(),
        );
        assert_eq!(codes(&findings), ["lag_exceeds_ttl"]);
        assert!(findings[0].message().contains("replica b"));
    }

    #[test]
    fn no_serving_replica_and_a_silent_primary_are_reported() {
        let mut down = replica("a", 0);
        down.healthy = false;
        down.sees_timelines = None;
        let mut orphan = replica("b", 0);
        orphan.diverged = true;
        let findings = diagnose(facts(false), &[down, orphan], &settings());
        assert_eq!(
            codes(&findings),
            [
                "primary_unhealthy",
                "replica_unhealthy",
                "replica_diverged",
                "no_healthy_replica"
            ]
        );
        assert!(findings[1].message().contains("since startup"));
        assert_eq!(
            codes(&diagnose(facts(true), &[], &settings())),
            ["no_replicas"]
        );
    }

    #[test]
    fn a_heartbeat_table_answers_the_missing_privilege() {
        let mut blind = replica("replica-1", 0);
        blind.sees_timelines = Some(false);
        let with_heartbeat = SetFacts {
            heartbeat: true,
            ..facts(true)
        };
        assert!(diagnose(with_heartbeat, &[blind.clone()], &settings()).is_empty());
        let findings = diagnose(facts(true), &[blind], &settings());
        assert!(findings[0].message().contains("HEARTBEAT_DDL"));
    }

    #[test]
    fn reader_endpoints_indistinct_pools_aurora_and_the_canary_are_reported() {
        let mut second = replica("readers#2", 0);
        second.url = "readers".into();
        let first = replica("readers", 0);
        let findings = diagnose(facts(true), &[first.clone(), second], &settings());
        assert_eq!(codes(&findings), ["reader_endpoint"]);
        assert!(findings[0].message().contains("2 servers"));

        let mut mixed = first;
        mixed.indistinct = true;
        let loud = SetFacts {
            aurora: true,
            canary_violations: 3,
            ..facts(true)
        };
        let findings = diagnose(loud, &[mixed], &settings());
        assert_eq!(
            codes(&findings),
            [
                "canary_violations",
                "aurora_replicas_unverifiable",
                "replica_indistinct"
            ]
        );
        assert!(findings
            .iter()
            .all(|f| f.severity() == crate::Severity::Error));
    }
}

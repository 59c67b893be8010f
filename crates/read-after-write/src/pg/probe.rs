//! The few queries the tracker and the pools' admission run, and how their
//! answers are read.
//!
//! Every query here is sent with the simple query protocol (no bound
//! parameters, no prepared statement), so it passes through a pooler in
//! transaction mode, PgBouncer 1.18 included, whose server connection may
//! change between two protocol messages. The values formatted into the SQL
//! are integers this library produced or identifiers it checked.

use super::fingerprint::Fingerprint;
use super::heartbeat::{Heartbeat, EPOCH_EXPRESSION};
use super::probe_conn::{ProbeConnection, ProbeError};
use crate::position::Lsn;

/// The columns of a [`Fingerprint`], as text: the system identifier, the
/// server's address and port, and its postmaster's start time in
/// microseconds. Public functions, readable by any role.
macro_rules! fingerprint_columns {
    () => {
        "(select system_identifier::text from pg_control_system()), \
         host(inet_server_addr()), inet_server_port()::text, \
         ((extract(epoch from pg_postmaster_start_time()) * 1000000)::int8)::text"
    };
}
const FINGERPRINT_COLUMNS: &str = fingerprint_columns!();

/// The query whose one row of four text columns is a [`Fingerprint`]
/// ([`fingerprint_from_text`]): what any driver's pool runs on a new
/// connection to tell which server it reached.
pub(crate) const FINGERPRINT_SQL: &str = concat!("select ", fingerprint_columns!());

/// Reads the fingerprint of the server a tracker connection reached, and
/// whether its role may see replica timelines (`pg_stat_wal_receiver` is
/// shown only to members of `pg_read_all_stats`, e.g. through `pg_monitor`).
pub(crate) async fn identify(
    conn: &mut dyn ProbeConnection,
) -> Result<(Fingerprint, bool), ProbeError> {
    let sql =
        format!("select {FINGERPRINT_COLUMNS}, pg_has_role('pg_read_all_stats', 'USAGE')::text");
    let rows = conn.query(&sql).await?;
    let row = first(&rows)?;
    let sees = column(row, 4).map_err(ProbeError::unreachable)?;
    let found = fingerprint_of(row, 0).map_err(ProbeError::unreachable)?;
    Ok((found, sees == Some("true")))
}

/// The first row of an answer; none is an error.
fn first(rows: &[Vec<Option<String>>]) -> Result<&[Option<String>], ProbeError> {
    rows.first().map(Vec::as_slice).ok_or_else(|| {
        ProbeError::unreachable(
            "no rows returned by a query that expected to return at least one row",
        )
    })
}

/// Column `index` of a text row; missing is an error.
fn column(row: &[Option<String>], index: usize) -> Result<Option<&str>, String> {
    row.get(index).map(Option::as_deref).ok_or_else(|| {
        format!(
            "the server's answer has no column {index} (it has {})",
            row.len()
        )
    })
}

/// The [`Fingerprint`] in the four text columns of `row` from `first` on.
pub(crate) fn fingerprint_of(row: &[Option<String>], first: usize) -> Result<Fingerprint, String> {
    fingerprint_from_text([
        column(row, first)?,
        column(row, first + 1)?,
        column(row, first + 2)?,
        column(row, first + 3)?,
    ])
}

/// A [`Fingerprint`] from the text columns of [`FINGERPRINT_SQL`]'s row, in
/// order; the complaint when one is unreadable.
pub(crate) fn fingerprint_from_text(columns: [Option<&str>; 4]) -> Result<Fingerprint, String> {
    let [system, addr, port, started] = columns;
    Ok(Fingerprint {
        system_id: parse(system, "system identifier")?,
        addr: addr.map(str::to_owned),
        port: port.and_then(|p| p.parse().ok()),
        started_micros: parse(started, "postmaster start time")?,
    })
}

fn parse<T: std::str::FromStr>(text: Option<&str>, what: &str) -> Result<T, String> {
    text.and_then(|t| t.parse().ok())
        .ok_or_else(|| format!("the server reported an unreadable {what}: {text:?}"))
}

/// What a replica poll learned.
#[derive(Clone, Debug)]
pub(crate) struct ReplicaProbe {
    pub(crate) replayed: Option<Lsn>,
    pub(crate) in_recovery: bool,
    /// `pg_stat_wal_receiver.received_tli`, when the role may see it.
    pub(crate) timeline: Option<u32>,
    /// A replay pause is requested or in effect.
    pub(crate) paused: bool,
    /// Which server answered: a pooler in transaction mode may switch a
    /// connection's server between two polls.
    pub(crate) fingerprint: Fingerprint,
    /// The heartbeats visible on the replica (epoch, position), read after
    /// the replay position (see [`replica_probe_sql`]); empty without a
    /// heartbeat table.
    pub(crate) heartbeats: Vec<(u64, u64)>,
}

/// How a replica is polled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ProbeKind {
    /// A streaming replica: replay position, timeline, pause, fingerprint,
    /// and the heartbeat table's rows when one is in use.
    Streaming { heartbeat: Option<String> },
    /// Aurora PostgreSQL: its replicas share storage and replay no WAL, so
    /// only health and the fingerprint are polled.
    Aurora,
}

/// The SQL of one replica poll. With a heartbeat table it is two
/// statements in one round trip: the heartbeat rows are read by the second,
/// whose snapshot is taken after the first read the replay position, so a
/// replica that replayed past a heartbeat's record shows it.
pub(crate) fn replica_probe_sql(kind: &ProbeKind) -> String {
    match kind {
        ProbeKind::Aurora => format!(
            "select null::text, pg_is_in_recovery()::text, null::text, 'false', {FINGERPRINT_COLUMNS}"
        ),
        ProbeKind::Streaming { heartbeat } => {
            // pg_is_wal_replay_paused() raises an error outside recovery;
            // since PostgreSQL 14 it is true as soon as a pause is requested.
            let first = format!(
                "select pg_last_wal_replay_lsn()::text, pg_is_in_recovery()::text, \
                        (select received_tli::text from pg_stat_wal_receiver), \
                        (case when pg_is_in_recovery() then pg_is_wal_replay_paused() else false end)::text, \
                        {FINGERPRINT_COLUMNS}"
            );
            match heartbeat {
                None => first,
                Some(table) => format!(
                    "{first}; select coalesce(string_agg(epoch::text || '/' || (position - '0/0')::text, ','), '') from {table}"
                ),
            }
        }
    }
}

/// The SQL of a poll that first waits on the server, for at most `wait`,
/// until the replica proves `lsn`: its replay position reaches it (a role
/// that sees its WAL receiver), or a heartbeat of `epoch` at or past it is
/// visible (`heartbeat`, the table, for a role that does not). A DO block
/// loops on the server and the poll's own statements follow in the same
/// round trip, so the answer arrives as soon as the replay is seen. Between
/// checks it sleeps a millisecond (the finest sleep PostgreSQL has), except
/// from `spin_after` (shortly before the predicted replay) for at most
/// [`SPIN_FOR`], when it checks back to back. Each check takes a fresh
/// snapshot, so the loop holds back neither replay nor cleanup.
pub(crate) fn wait_then_probe_sql(
    probe: &str,
    lsn: Lsn,
    wait: std::time::Duration,
    spin_after: Option<std::time::Duration>,
    heartbeat: Option<(&str, u64)>,
) -> String {
    let not_yet = match heartbeat {
        Some((table, epoch)) => format!(
            "not exists (select 1 from {table} where epoch = {epoch} and position >= '{lsn}'::pg_lsn)",
            epoch = epoch as i64,
        ),
        None => format!("coalesce(pg_last_wal_replay_lsn() < '{lsn}'::pg_lsn, false)"),
    };
    // Without a prediction, never spin: the spin window lies past the end.
    let spin_from = spin_after.unwrap_or(wait).min(wait);
    format!(
        "do $wait$ declare \
             started timestamptz := clock_timestamp(); \
             stop_at timestamptz := started + interval '{wait} microseconds'; \
             spin_from timestamptz := started + interval '{spin_from} microseconds'; \
             spin_to timestamptz := spin_from + interval '{spin_for} microseconds'; \
             checked_at timestamptz; \
         begin loop \
             exit when not ({not_yet}); \
             checked_at := clock_timestamp(); \
             exit when checked_at >= stop_at; \
             if checked_at < spin_from or checked_at >= spin_to then perform pg_sleep(0.0005); end if; \
         end loop; end $wait$; {probe}",
        wait = wait.as_micros().max(1),
        spin_from = spin_from.as_micros(),
        spin_for = SPIN_FOR.as_micros(),
    )
}

/// How long a wait checks back to back around the predicted replay.
pub(crate) const SPIN_FOR: std::time::Duration = std::time::Duration::from_millis(5);

/// Polls a replica on `conn`.
pub(crate) async fn replica(
    conn: &mut dyn ProbeConnection,
    sql: &str,
) -> Result<ReplicaProbe, ProbeError> {
    let rows = conn.query(sql).await?;
    // A DO block before the poll returns no row: the poll's come after.
    let first = first(&rows)?;
    replica_of(first, rows.get(1).map(Vec::as_slice)).map_err(ProbeError::unreachable)
}

/// What a replica poll's rows say: the poll's own row, and the heartbeat
/// row when the poll read the heartbeat table.
fn replica_of(
    first: &[Option<String>],
    heartbeat: Option<&[Option<String>]>,
) -> Result<ReplicaProbe, String> {
    let replayed = column(first, 0)?;
    let in_recovery = column(first, 1)?;
    let timeline = column(first, 2)?;
    let paused = column(first, 3)?;
    let heartbeats = match heartbeat {
        Some(row) => parse_heartbeats(column(row, 0)?.unwrap_or_default()),
        None => Vec::new(),
    };
    Ok(ReplicaProbe {
        replayed: replayed.and_then(|text| text.parse().ok()),
        in_recovery: in_recovery == Some("true"),
        timeline: timeline.and_then(|t| t.parse().ok()),
        paused: paused == Some("true"),
        fingerprint: fingerprint_of(first, 4)?,
        heartbeats,
    })
}

/// `epoch/position,epoch/position,...` as the probe aggregates them.
fn parse_heartbeats(text: &str) -> Vec<(u64, u64)> {
    text.split(',')
        .filter_map(|pair| {
            let (epoch, position) = pair.split_once('/')?;
            // Epochs are int8 on the server; negative ones (a timeline past
            // 2^31) keep their bits.
            let epoch = epoch.parse::<i64>().ok()? as u64;
            let position = position.split('.').next()?.parse::<u64>().ok()?;
            Some((epoch, position))
        })
        .collect()
}

/// The highest position among `heartbeats` of `epoch`; 0 for none.
pub(crate) fn proven_position(heartbeats: &[(u64, u64)], epoch: u64) -> u64 {
    if epoch == 0 {
        return 0;
    }
    heartbeats
        .iter()
        .filter(|&&(e, _)| e == epoch)
        .map(|&(_, position)| position)
        .max()
        .unwrap_or(0)
}

/// What one primary poll or capture reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PrimaryProbe {
    pub(crate) lsn: Lsn,
    pub(crate) timeline: u32,
    pub(crate) epoch: u64,
    /// Whether this poll wrote a heartbeat at `lsn`.
    pub(crate) heartbeat: bool,
}

/// The SQL of a position query on the primary, writing a heartbeat when
/// `heartbeat` is given.
///
/// `pg_current_wal_insert_lsn()`, not `pg_current_wal_lsn()`: the latter can
/// be behind a commit under `synchronous_commit = off`. The timeline is the
/// first 8 hex digits of the WAL file name for that position.
pub(crate) fn primary_position_sql(heartbeat: Option<&Heartbeat>) -> String {
    match heartbeat {
        None => format!(
            "select pg_current_wal_insert_lsn()::text, \
                    substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8), \
                    {EPOCH_EXPRESSION}::text"
        ),
        Some(heartbeat) => heartbeat.write_sql(),
    }
}

/// Runs a position query (see [`primary_position_sql`]) on a tracker
/// connection.
pub(crate) async fn primary(
    conn: &mut dyn ProbeConnection,
    sql: &str,
    heartbeat: bool,
) -> Result<PrimaryProbe, ProbeError> {
    let rows = conn.query(sql).await?;
    primary_of(first(&rows)?, heartbeat).map_err(ProbeError::unreachable)
}

/// What a position query's row says.
pub(crate) fn primary_of(row: &[Option<String>], heartbeat: bool) -> Result<PrimaryProbe, String> {
    let lsn_text = column(row, 0)?.unwrap_or_default();
    let timeline_text = column(row, 1)?.unwrap_or_default();
    let epoch = column(row, 2)?;
    Ok(PrimaryProbe {
        lsn: lsn_text
            .parse()
            .map_err(|_| format!("unreadable WAL position {lsn_text:?}"))?,
        timeline: u32::from_str_radix(timeline_text, 16)
            .map_err(|_| format!("unreadable timeline {timeline_text:?}"))?,
        epoch: epoch.and_then(|e| e.parse::<i64>().ok()).unwrap_or(0) as u64,
        heartbeat,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_rows_parse_and_the_current_epochs_highest_proves() {
        let rows = parse_heartbeats("4294967297/100,4294967297/250,8589934593/900,junk,1/x");
        assert_eq!(
            rows,
            vec![
                (4_294_967_297, 100),
                (4_294_967_297, 250),
                (8_589_934_593, 900)
            ]
        );
        assert_eq!(proven_position(&rows, 4_294_967_297), 250);
        assert_eq!(proven_position(&rows, 8_589_934_593), 900);
        assert_eq!(proven_position(&rows, 7), 0);
        assert_eq!(proven_position(&rows, 0), 0);
        assert!(parse_heartbeats("").is_empty());
        // A negative int8 epoch keeps its bits.
        assert_eq!(parse_heartbeats("-1/5"), vec![(u64::MAX, 5)]);
    }

    fn row(columns: &[Option<&str>]) -> Vec<Option<String>> {
        columns.iter().map(|c| c.map(str::to_owned)).collect()
    }

    #[test]
    fn text_rows_read_as_probes_and_a_short_row_is_an_error() {
        let fingerprint = [Some("7"), Some("10.0.0.2"), Some("5432"), Some("1000")];
        let mut poll = vec![Some("0/3000060"), Some("true"), Some("1"), Some("false")];
        poll.extend(fingerprint);
        let beats = row(&[Some("4294967297/100")]);
        let probe = replica_of(&row(&poll), Some(&beats)).unwrap();
        assert_eq!(probe.replayed, Some("0/3000060".parse().unwrap()));
        assert!(probe.in_recovery && !probe.paused);
        assert_eq!(probe.timeline, Some(1));
        assert_eq!(probe.fingerprint.system_id, 7);
        assert_eq!(probe.heartbeats, vec![(4_294_967_297, 100)]);
        assert!(replica_of(&row(&poll[..6]), None).is_err());

        let position = primary_of(&row(&[Some("0/16B3748"), Some("0000000A"), None]), true);
        let position = position.unwrap();
        assert_eq!(position.timeline, 10);
        assert_eq!(position.epoch, 0);
        assert!(position.heartbeat);
        assert!(primary_of(&row(&[Some("junk"), Some("1"), None]), false).is_err());
        assert!(primary_of(&row(&[Some("0/1")]), false).is_err());
    }

    #[test]
    fn the_heartbeat_poll_reads_rows_in_a_second_statement() {
        let sql = replica_probe_sql(&ProbeKind::Streaming {
            heartbeat: Some("read_after_write_heartbeat".into()),
        });
        let (first, second) = sql.split_once("; ").unwrap();
        assert!(first.contains("pg_last_wal_replay_lsn()"));
        assert!(second.contains("from read_after_write_heartbeat"));
        let plain = replica_probe_sql(&ProbeKind::Streaming { heartbeat: None });
        assert!(!plain.contains(';'));
    }
}

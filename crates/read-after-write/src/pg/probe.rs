//! The few queries the tracker and the pools' admission run, and how their
//! answers are read.
//!
//! Every query here is sent with the simple query protocol (no bound
//! parameters, no prepared statement), so it passes through a pooler in
//! transaction mode, PgBouncer 1.18 included, whose server connection may
//! change between two protocol messages. The values formatted into the SQL
//! are integers this library produced or identifiers it checked.

use sqlx::postgres::{PgConnection, PgRow};
use sqlx::{AssertSqlSafe, Row};

use super::fingerprint::Fingerprint;
use super::heartbeat::{Heartbeat, EPOCH_EXPRESSION};
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

/// Reads the fingerprint of the server `conn` reached.
pub(crate) async fn fingerprint(conn: &mut PgConnection) -> Result<Fingerprint, sqlx::Error> {
    let row = sqlx::raw_sql(AssertSqlSafe(FINGERPRINT_SQL))
        .fetch_one(&mut *conn)
        .await?;
    read_fingerprint(&row, 0)
}

/// Reads the fingerprint of the server a tracker connection reached, and
/// whether its role may see replica timelines (`pg_stat_wal_receiver` is
/// shown only to members of `pg_read_all_stats`, e.g. through `pg_monitor`).
pub(crate) async fn identify(conn: &mut PgConnection) -> Result<(Fingerprint, bool), sqlx::Error> {
    let row = sqlx::raw_sql(AssertSqlSafe(format!(
        "select {FINGERPRINT_COLUMNS}, pg_has_role('pg_read_all_stats', 'USAGE')::text"
    )))
    .fetch_one(&mut *conn)
    .await?;
    let sees: Option<String> = row.try_get(4)?;
    Ok((read_fingerprint(&row, 0)?, sees.as_deref() == Some("true")))
}

fn read_fingerprint(row: &PgRow, first: usize) -> Result<Fingerprint, sqlx::Error> {
    let system: Option<String> = row.try_get(first)?;
    let addr: Option<String> = row.try_get(first + 1)?;
    let port: Option<String> = row.try_get(first + 2)?;
    let started: Option<String> = row.try_get(first + 3)?;
    fingerprint_from_text([
        system.as_deref(),
        addr.as_deref(),
        port.as_deref(),
        started.as_deref(),
    ])
    .map_err(sqlx::Error::Protocol)
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
    conn: &mut PgConnection,
    sql: &str,
) -> Result<ReplicaProbe, sqlx::Error> {
    let rows = sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
        .fetch_all(&mut *conn)
        .await?;
    // A DO block before the poll returns no row: the poll's come after.
    let Some(first) = rows.first() else {
        return Err(sqlx::Error::RowNotFound);
    };
    let replayed: Option<String> = first.try_get(0)?;
    let in_recovery: Option<String> = first.try_get(1)?;
    let timeline: Option<String> = first.try_get(2)?;
    let paused: Option<String> = first.try_get(3)?;
    let heartbeats = match rows.get(1) {
        Some(row) => parse_heartbeats(&row.try_get::<Option<String>, _>(0)?.unwrap_or_default()),
        None => Vec::new(),
    };
    Ok(ReplicaProbe {
        replayed: replayed.and_then(|text| text.parse().ok()),
        in_recovery: in_recovery.as_deref() == Some("true"),
        timeline: timeline.and_then(|t| t.parse().ok()),
        paused: paused.as_deref() == Some("true"),
        fingerprint: read_fingerprint(first, 4)?,
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

/// Runs a position query (see [`primary_position_sql`]).
pub(crate) async fn primary<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    sql: &str,
    heartbeat: bool,
) -> Result<PrimaryProbe, sqlx::Error> {
    let row = sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
        .fetch_one(executor)
        .await?;
    let lsn: Option<String> = row.try_get(0)?;
    let timeline: Option<String> = row.try_get(1)?;
    let epoch: Option<String> = row.try_get(2)?;
    let lsn_text = lsn.unwrap_or_default();
    let timeline_text = timeline.unwrap_or_default();
    Ok(PrimaryProbe {
        lsn: lsn_text
            .parse()
            .map_err(|_| sqlx::Error::Protocol(format!("unreadable WAL position {lsn_text:?}")))?,
        timeline: u32::from_str_radix(&timeline_text, 16)
            .map_err(|_| sqlx::Error::Protocol(format!("unreadable timeline {timeline_text:?}")))?,
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

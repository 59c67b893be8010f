//! The heartbeat table: how a role without monitoring privileges proves that
//! a replica follows the current primary's history.
//!
//! # Why
//!
//! A replica at or past a token's LSN holds the write only if its WAL is the
//! primary's WAL up to there: after a failover an orphaned replica can sit
//! past a new-timeline position without the write. PostgreSQL shows a
//! replica's timeline (`pg_stat_wal_receiver`) only to superusers and
//! members of `pg_read_all_stats` (e.g. through `pg_monitor`), so a
//! least-privilege role cannot see it, and without a proof every read with a
//! token would go to the primary.
//!
//! # The rule
//!
//! The library writes a row into a small table on the primary: its
//! **epoch** (the primary's timeline, and a hash of which server it is: the
//! system identifier, its address, port and start time, so a promoted
//! replica or a restarted primary has another) and `pg_current_wal_insert_lsn()`
//! as the statement saw it. The row's WAL record comes after that position,
//! so **a replica on which a row of the current primary's epoch at position
//! `P` is visible has replayed that primary's own WAL up to `P`**, and holds
//! every write committed before it. Any role can read a table.
//!
//! The row is written by the write-position capture itself (the query that
//! already follows every writing request, now an upsert returning the same
//! position: no extra round trip), so a replica proves a write as soon as it
//! replays the capture that followed it; and by the tracker about once a
//! second while positions are in use. Each instance writes its own row of
//! 16 (picked at random), with `synchronous_commit` off for that
//! transaction: a heartbeat that a crash loses was never sent to a replica,
//! since a primary sends only WAL it has flushed.
//!
//! A replica that has replayed past a heartbeat of the current epoch but
//! shows none follows another history (it re-followed a promoted replica,
//! say): it is counted as diverged and serves no reads.
//!
//! # Setting it up
//!
//! Run [`HEARTBEAT_DDL`](super::HEARTBEAT_DDL) once on the primary, as the
//! application's role or with grants to it (`SELECT, INSERT, UPDATE`); the
//! replica set finds the table at `connect()` when its role cannot see
//! replica timelines, and uses it. With `pg_monitor` it is not needed and not
//! written.

use std::sync::atomic::{AtomicBool, Ordering};

/// The epoch of the primary a statement runs on, as text: its timeline in
/// the high 32 bits, a hash of which server it is (system identifier,
/// address, port, start time) in the low 32. Every instance computes the
/// same value on the same primary; a promoted replica or a restarted
/// primary has another. See [`heartbeat`](super::heartbeat).
pub(crate) const EPOCH_EXPRESSION: &str = "(((('x' || lpad(substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8), 16, '0'))::bit(64)::int8) << 32) \
     | (hashtext(concat_ws('/', (select system_identifier from pg_control_system()), \
        host(inet_server_addr()), inet_server_port(), \
        extract(epoch from pg_postmaster_start_time())))::int8 & 4294967295))";

/// How many rows instances spread their heartbeats over, so that captures
/// on many instances seldom wait on one row's lock.
pub(crate) const SLOTS: u8 = 16;

/// The default heartbeat table name, in the role's `search_path`.
pub(crate) const DEFAULT_TABLE: &str = super::defaults::HEARTBEAT_TABLE;

/// The heartbeat this replica set writes.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    /// The table, as checked by [`valid_table_name`].
    pub(crate) table: String,
    /// This instance's row.
    pub(crate) slot: u8,
    /// Cleared when a write fails for a reason that will not go away (no
    /// table, no privilege, a read-only primary): captures then stop
    /// writing it.
    pub(crate) enabled: AtomicBool,
}

impl Heartbeat {
    pub(crate) fn new(table: String) -> Self {
        let mut byte = [0u8; 1];
        let slot = match getrandom::fill(&mut byte) {
            Ok(()) => byte[0] % SLOTS,
            Err(_) => (std::process::id() % u32::from(SLOTS)) as u8,
        };
        Heartbeat {
            table,
            slot,
            enabled: AtomicBool::new(true),
        }
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// The upsert that writes this instance's heartbeat and returns what a
    /// position query returns: the insert position (before the row's own
    /// record), the timeline and the epoch. `synchronous_commit` is off for
    /// that transaction only.
    pub(crate) fn write_sql(&self) -> String {
        format!(
            "insert into {table} as h (slot, epoch, position, written_at) \
             select {slot}, {EPOCH_EXPRESSION}, pg_current_wal_insert_lsn(), clock_timestamp() \
             from (select set_config('synchronous_commit', 'off', true)) as local_settings \
             on conflict (slot) do update set epoch = excluded.epoch, position = excluded.position, \
                 written_at = excluded.written_at \
             returning position::text, substr(pg_walfile_name(position), 1, 8), epoch::text",
            table = self.table,
            slot = self.slot,
        )
    }

    /// Whether an error with SQLSTATE `code` (the one the server raised, if
    /// any) means the heartbeat cannot be written at all: no table (42P01),
    /// no privilege (42501), a read-only transaction (25006), or a table of
    /// another shape (42703 undefined column, 42P10 no unique constraint for
    /// `on conflict`, 42804 a column of another type).
    pub(crate) fn is_permanent(code: Option<&str>) -> bool {
        matches!(
            code,
            Some("42P01" | "42501" | "25006" | "42703" | "42P10" | "42804")
        )
    }

    /// Stops writing the heartbeat after a permanent failure, once, loudly.
    pub(crate) fn disable(&self, error: &dyn std::fmt::Display) {
        if self.enabled.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                table = %self.table,
                %error,
                "cannot write the heartbeat table; without it (or pg_monitor) no replica can be \
                 proven to hold a write, so reads with a token go to the primary. Create it with \
                 read_after_write::pg::HEARTBEAT_DDL and grant SELECT, INSERT, UPDATE on it to the \
                 application's role"
            );
        }
    }
}

/// Whether `name` is a plain identifier, optionally schema-qualified:
/// letters, digits and underscores, not starting with a digit, at most 63
/// bytes per part. Such a name needs no quoting in SQL.
pub(crate) fn valid_table_name(name: &str) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && !p.as_bytes()[0].is_ascii_digit()
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    match name.split_once('.') {
        Some((schema, table)) => part(schema) && part(table),
        None => part(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        assert!(valid_table_name("read_after_write_heartbeat"));
        assert!(valid_table_name("ops.raw_heartbeat"));
        for bad in [
            "",
            "1table",
            "a.b.c",
            "t; drop table users",
            "t\"",
            "ops.",
            &"x".repeat(64),
        ] {
            assert!(!valid_table_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn slots_stay_in_range_and_the_upsert_names_them() {
        let heartbeat = Heartbeat::new(DEFAULT_TABLE.into());
        assert!(heartbeat.slot < SLOTS);
        let sql = heartbeat.write_sql();
        assert!(sql.starts_with("insert into read_after_write_heartbeat"));
        assert!(sql.contains(&format!("select {}, ", heartbeat.slot)));
        assert!(sql.contains("set_config('synchronous_commit', 'off', true)"));
    }
}

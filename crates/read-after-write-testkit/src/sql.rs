//! The kit's own SQL to a node: connecting, errors that name the node and
//! its log, waiting until it is ready, and LSNs as PostgreSQL prints them.

use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

use crate::node::Node;
use crate::wait::POLL_INTERVAL;
use crate::KitError;

/// Connects to `node` as `postgres`; `quiet` keeps the kit's polling
/// queries out of the statement log.
pub(crate) async fn connect(node: &Node, quiet: bool) -> Result<PgConnection, KitError> {
    let options = if quiet {
        node.quiet_connect_options()
    } else {
        node.connect_options()
    };
    PgConnection::connect_with(&options)
        .await
        .map_err(|e| sql_error(node, &format!("connecting to {}", node.url()), e))
}

/// A [`KitError::Sql`] for `node`, naming it and its log file.
pub(crate) fn sql_error(node: &Node, context: &str, source: sqlx::Error) -> KitError {
    KitError::Sql {
        context: format!("{context} ({})", node.name),
        log_file: node.log.display().to_string(),
        source,
    }
}

/// Waits until `node` accepts connections and, if `in_recovery` is given,
/// `pg_is_in_recovery()` says so.
pub(crate) async fn wait_ready(
    node: &Node,
    in_recovery: Option<bool>,
    timeout: Duration,
) -> Result<(), KitError> {
    let deadline = Instant::now() + timeout;
    let mut last_error;
    loop {
        match connect(node, true).await {
            Ok(mut conn) => {
                let result: Result<bool, _> = sqlx::query_scalar("select pg_is_in_recovery()")
                    .fetch_one(&mut conn)
                    .await;
                let _ = conn.close().await;
                match (result, in_recovery) {
                    (Ok(_), None) => return Ok(()),
                    (Ok(actual), Some(expected)) if actual == expected => return Ok(()),
                    (Ok(actual), Some(_)) => {
                        last_error = format!("pg_is_in_recovery() is {actual}");
                    }
                    (Err(e), _) => last_error = e.to_string(),
                }
            }
            Err(e) => last_error = e.to_string(),
        }
        if Instant::now() > deadline {
            return Err(KitError::NotReady {
                node: node.name.clone(),
                timeout,
                last_error,
                log_tail: node.log_tail(),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Formats an LSN the way PostgreSQL does (`16/B374D848`).
pub(crate) fn format_lsn(lsn: i64) -> String {
    let lsn = lsn as u64;
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses an LSN as PostgreSQL prints it (`16/B374D848`).
pub(crate) fn parse_lsn(text: &str) -> Option<i64> {
    let (high, low) = text.split_once('/')?;
    let high = u64::from_str_radix(high, 16).ok()?;
    let low = u64::from_str_radix(low, 16).ok()?;
    if high > u64::from(u32::MAX) || low > u64::from(u32::MAX) {
        return None;
    }
    i64::try_from(high << 32 | low).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_format_and_parse_like_postgres_prints_them() {
        assert_eq!(format_lsn(0x3000028), "0/3000028");
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("0/3000028"), Some(0x3000028));
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(parse_lsn("16/B374D848").unwrap()), "16/B374D848");
        assert_eq!(parse_lsn("3000028"), None);
        assert_eq!(parse_lsn("1/100000000"), None);
    }
}

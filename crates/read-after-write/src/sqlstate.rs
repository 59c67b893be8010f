//! Which PostgreSQL errors mean "not now" rather than "not this": the
//! SQLSTATE codes an application answers with 503, so that clients retry.
//!
//! During a failover, the server a handler's connection reached goes away
//! or stops taking writes, and PostgreSQL says so with an error code, not
//! always with a broken connection: `57P01` (`admin_shutdown`, the
//! connection was terminated by a shutdown or `pg_terminate_backend`),
//! `25006` (`read_only_sql_transaction`, a write reached a primary that was
//! demoted, or a standby), class `08` (connection exceptions). These are no
//! fault of the request: retried a moment later, it reaches the new
//! primary. An application that answers them with 500 tells clients and
//! alerting that its code is broken; [`is_unavailable`] sorts them out,
//! whatever the driver:
//!
//! ```
//! use read_after_write::sqlstate;
//!
//! // sqlx:           error.as_database_error().and_then(|e| e.code())
//! // tokio-postgres: error.code().map(|state| state.code())
//! let code = "57P01";
//! let status = if sqlstate::is_unavailable(code) { 503 } else { 500 };
//! assert_eq!(status, 503);
//! ```

/// Whether the SQLSTATE `code` says the server could not serve the
/// statement now, rather than that the statement is wrong:
///
/// - class `08`, connection exceptions (`08006` `connection_failure`,
///   `08001` `sqlclient_unable_to_establish_sqlconnection`, ...);
/// - `57P01` `admin_shutdown`, `57P02` `crash_shutdown`, `57P03`
///   `cannot_connect_now` (a server shutting down, crashed, or starting);
/// - `53300` `too_many_connections`;
/// - `25006` `read_only_sql_transaction`: a write on a server that does
///   not take writes, which behind this crate's routing (writes go to the
///   primary) means the primary was demoted.
///
/// Conflicts such as `40001` (`serialization_failure`, also what a standby
/// raises when replay cancels a query) and `40P01` (`deadlock_detected`)
/// are left out: they are worth retrying, but by the application, in a new
/// transaction, not by answering 503.
///
/// ```
/// use read_after_write::sqlstate::is_unavailable;
///
/// assert!(is_unavailable("57P01"));
/// assert!(is_unavailable("08006"));
/// assert!(is_unavailable("25006"));
/// assert!(!is_unavailable("23505")); // unique_violation: the request's fault
/// assert!(!is_unavailable("40001"));
/// ```
pub fn is_unavailable(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "25006")
}

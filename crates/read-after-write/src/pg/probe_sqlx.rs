//! sqlx's implementation of the probe interface
//! ([`probe_conn`](super::probe_conn)): the default connector, and the
//! text-row reading the sqlx pools share with it (setup runs on the
//! primary's sqlx pool, the admission check on each sqlx replica pool's new
//! connections).

use std::future::Future;
use std::pin::Pin;

use sqlx::postgres::{PgConnection, PgRow};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, Row};

use super::fingerprint::Fingerprint;
use super::probe::{self, PrimaryProbe};
use super::probe_conn::{
    ProbeConn, ProbeConnection, ProbeConnector, ProbeError, ProbeFuture, ProbeTarget, Rows,
};

/// Opens the tracker's connections with sqlx, from the target's connect
/// options (the node's, through `tracker_connect_options`, as rotated
/// credentials left them), and the capture's, from the primary pool's.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SqlxConnector;

impl ProbeConnector for SqlxConnector {
    fn connect<'a>(&'a self, target: &'a ProbeTarget) -> ProbeFuture<'a, ProbeConn> {
        Box::pin(async move {
            let mut options = target.options.clone();
            if let Some(name) = target.application_name() {
                options = options.application_name(name);
            }
            let conn = options.connect().await.map_err(probe_error)?;
            Ok(Box::new(SqlxProbe(conn)) as ProbeConn)
        })
    }
}

/// A tracker connection opened by sqlx.
struct SqlxProbe(PgConnection);

impl ProbeConnection for SqlxProbe {
    fn query<'a>(&'a mut self, sql: &'a str) -> ProbeFuture<'a, Rows> {
        Box::pin(async move { text_rows(&mut self.0, sql).await.map_err(probe_error) })
    }

    fn close(self: Box<Self>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            let _ = self.0.close().await;
        })
    }
}

/// What the routing engine needs of a sqlx error: a configuration error is
/// a refusal (the server answered), a database error carries its SQLSTATE.
pub(crate) fn probe_error(error: sqlx::Error) -> ProbeError {
    let message = error.to_string();
    match &error {
        sqlx::Error::Configuration(_) => ProbeError::refused(message),
        sqlx::Error::Database(db) => {
            ProbeError::server(db.code().map(|code| code.into_owned()), message)
        }
        _ => ProbeError::unreachable(message),
    }
}

/// Runs `sql` with the simple query protocol and reads every row as text.
pub(crate) async fn text_rows<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    sql: &str,
) -> Result<Rows, sqlx::Error> {
    let rows = sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
        .fetch_all(executor)
        .await?;
    rows.iter().map(text_row).collect()
}

/// A row's columns as text: the simple query protocol answers in text
/// whatever the column's type.
fn text_row(row: &PgRow) -> Result<Vec<Option<String>>, sqlx::Error> {
    (0..row.len())
        .map(|i| row.try_get_unchecked::<Option<String>, _>(i))
        .collect()
}

/// Runs `sql` and returns its first row; none is an error.
async fn first_row<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    sql: &str,
) -> Result<Vec<Option<String>>, sqlx::Error> {
    let row = sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
        .fetch_one(executor)
        .await?;
    text_row(&row)
}

/// Reads the fingerprint of the server a sqlx pool's new connection reached.
pub(crate) async fn fingerprint(conn: &mut PgConnection) -> Result<Fingerprint, sqlx::Error> {
    let row = first_row(conn, probe::FINGERPRINT_SQL).await?;
    probe::fingerprint_of(&row, 0).map_err(sqlx::Error::Protocol)
}

/// Runs a position query (see [`probe::primary_position_sql`]) on a sqlx
/// pool or connection: setup's.
pub(crate) async fn primary<'c>(
    executor: impl sqlx::PgExecutor<'c>,
    sql: &str,
    heartbeat: bool,
) -> Result<PrimaryProbe, sqlx::Error> {
    let row = first_row(executor, sql).await?;
    probe::primary_of(&row, heartbeat).map_err(sqlx::Error::Protocol)
}

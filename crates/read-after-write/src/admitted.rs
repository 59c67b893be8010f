//! Opening a tokio-postgres connection that a [`Node`] admits: what the
//! `tokio-postgres` and `diesel-async` drivers share.
//!
//! Behind a reader endpoint a new connection may reach any server behind
//! the URL; the pool of one server must keep only connections that reached
//! it. So each new connection runs [`Node::FINGERPRINT_SQL`] and, if
//! refused, is closed and another opened, up to [`ATTEMPTS`] (the caller
//! bounds them by the node's acquire timeout): the same as the sqlx pools
//! do (sqlx retries a refused connection on its own).

use ::tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use ::tokio_postgres::{Client, Config, Connection, SimpleQueryMessage, Socket};

use crate::pg::driver::{Node, Refused};

/// The most connections opened for one admitted connection.
pub(crate) const ATTEMPTS: u32 = 16;

/// Why no admitted connection was opened.
pub(crate) enum Failure {
    /// The server could not be reached, or did not answer.
    Postgres(::tokio_postgres::Error),
    /// Every connection reached another server (or an unreadable one): why
    /// the last was refused, and its client, already closed.
    Refused(Refused, Client),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Postgres(error) => write!(f, "{error}"),
            Failure::Refused(refused, _) => write!(f, "{refused}"),
        }
    }
}

/// A connection to `node` that `node` admits, with its connection future
/// for the caller to drive. Unbounded in time: the caller bounds it by the
/// node's acquire timeout.
pub(crate) async fn connect<T>(
    config: &Config,
    tls: T,
    node: &Node,
) -> Result<(Client, Connection<Socket, T::Stream>), Failure>
where
    T: MakeTlsConnect<Socket> + Clone,
    T::Stream: Unpin,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let mut attempt = 1;
    loop {
        let (client, mut connection) = config
            .connect(tls.clone())
            .await
            .map_err(Failure::Postgres)?;
        if node.is_primary() {
            return Ok((client, connection));
        }
        let answer = tokio::select! {
            answer = client.simple_query(Node::FINGERPRINT_SQL) => answer,
            // The connection ended before the answer: its error, if any, is
            // the query's too.
            ended = &mut connection => match ended {
                Err(error) => return Err(Failure::Postgres(error)),
                Ok(()) => client.simple_query(Node::FINGERPRINT_SQL).await,
            },
        };
        let messages = answer.map_err(Failure::Postgres)?;
        match admit(node, &messages) {
            Ok(()) => return Ok((client, connection)),
            Err(why) if attempt >= ATTEMPTS => {
                // Dropping the connection closes the client.
                drop(connection);
                return Err(Failure::Refused(why, client));
            }
            Err(why) => {
                tracing::debug!(node = node.name(), %why, "connection refused; opening another");
                attempt += 1;
            }
        }
    }
}

/// [`Node::admit`] on the first row of a simple-protocol answer.
fn admit(node: &Node, messages: &[SimpleQueryMessage]) -> Result<(), Refused> {
    let row = messages.iter().find_map(|message| match message {
        SimpleQueryMessage::Row(row) => Some(row),
        _ => None,
    });
    let Some(row) = row else {
        return Err(Refused::new(format!(
            "replica {}: the fingerprint query returned no row",
            node.name()
        )));
    };
    let column = |index| row.try_get(index).ok().flatten();
    node.admit([column(0), column(1), column(2), column(3)])
}

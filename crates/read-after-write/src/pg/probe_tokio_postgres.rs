//! tokio-postgres's implementation of the probe interface
//! ([`probe_conn`](super::probe_conn)): the tracker's own connections and
//! the write-position capture's of a replica set routing over the
//! `tokio-postgres` or `diesel-async` driver, opened through each node's URL (as rotated credentials leave it) with
//! the driver's TLS connector.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;

use ::tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use ::tokio_postgres::{Client, Config, SimpleQueryMessage, Socket};
use tokio::task::JoinHandle;

use super::node_urls::NodeUrls;
use super::probe_conn::{
    ProbeConn, ProbeConnection, ProbeConnector, ProbeError, ProbeFuture, ProbeTarget, Rows,
};

/// Opens the tracker's connections with tokio-postgres, through the node's
/// URL and the TLS connector `T`.
pub(crate) struct TokioPgConnector<T> {
    tls: T,
    urls: NodeUrls,
}

impl<T> TokioPgConnector<T> {
    pub(crate) fn new(tls: T, urls: NodeUrls) -> Self {
        TokioPgConnector { tls, urls }
    }
}

impl<T> ProbeConnector for TokioPgConnector<T>
where
    T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
    T::Stream: Send + Sync + Unpin + 'static,
    T::TlsConnect: Send + Sync,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    fn connect<'a>(&'a self, target: &'a ProbeTarget) -> ProbeFuture<'a, ProbeConn> {
        Box::pin(async move {
            let node = target.node();
            let url = self
                .urls
                .url(node)
                .ok_or_else(|| ProbeError::refused(format!("no URL is configured for {node}")))?;
            let mut config = Config::from_str(&url).map_err(|error| {
                ProbeError::refused(format!("invalid PostgreSQL URL for {node}: {error}"))
            })?;
            if let Some(name) = target.application_name() {
                config.application_name(name);
            }
            let (client, connection) = config
                .connect(self.tls.clone())
                .await
                .map_err(probe_error)?;
            let task = tokio::spawn(async move {
                // Its error, if any, is the next query's too.
                let _ = connection.await;
            });
            Ok(Box::new(TokioPgProbe {
                client: Some(client),
                task: Some(task),
            }) as ProbeConn)
        })
    }
}

/// A tracker connection opened by tokio-postgres: the client, and the task
/// driving its connection.
struct TokioPgProbe {
    client: Option<Client>,
    task: Option<JoinHandle<()>>,
}

impl ProbeConnection for TokioPgProbe {
    fn query<'a>(&'a mut self, sql: &'a str) -> ProbeFuture<'a, Rows> {
        Box::pin(async move {
            let Some(client) = &self.client else {
                return Err(ProbeError::unreachable("the connection is closed"));
            };
            let messages = client.simple_query(sql).await.map_err(probe_error)?;
            Ok(messages
                .iter()
                .filter_map(|message| match message {
                    SimpleQueryMessage::Row(row) => Some(
                        (0..row.len())
                            .map(|index| row.get(index).map(str::to_owned))
                            .collect(),
                    ),
                    _ => None,
                })
                .collect())
        })
    }

    fn close(mut self: Box<Self>) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        // Dropping the last client makes the connection say goodbye and end.
        drop(self.client.take());
        let task = self.task.take();
        Box::pin(async move {
            if let Some(task) = task {
                let _ = task.await;
            }
        })
    }
}

impl Drop for TokioPgProbe {
    fn drop(&mut self) {
        // Dropped without `close` (timed out, or found on another server):
        // close the socket now, as dropping a sqlx connection does, rather
        // than leave a task waiting on a server that may never answer.
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// What the routing engine needs of a tokio-postgres error: the SQLSTATE
/// the server raised, if it raised one.
fn probe_error(error: ::tokio_postgres::Error) -> ProbeError {
    let code = error.code().map(|code| code.code().to_owned());
    let message = match error.as_db_error() {
        Some(db) => format!("error returned from database: {}", db.message()),
        None => error.to_string(),
    };
    match code {
        Some(code) => ProbeError::server(Some(code), message),
        None => ProbeError::unreachable(message),
    }
}

//! How many connections each app instance holds on each node while a
//! strategy is measured, counted by the database itself.
//!
//! Every half second of the measured window, `pg_stat_activity` is read on
//! the primary and on each replica (as `postgres`, on a connection of the
//! meter's own): client backends whose `application_name` is the app
//! instances' pools' ([`POOL_APPLICATION_NAME`]: the pools, the layer's
//! captures and the canary run on them) or the tracker's
//! ([`TRACKER_APPLICATION_NAME`]: its polls, probes and discovery). The
//! peak of each, divided by the instances serving, is the figure: a
//! reader endpoint shows here as connections on the node it happens to
//! reach, since they are counted where they arrive.

use std::time::Duration;

use read_after_write::pg::TRACKER_APPLICATION_NAME;
use read_after_write_testkit::TestCluster;
use serde::Serialize;
use sqlx::{Connection, PgConnection};

use super::instance::POOL_APPLICATION_NAME;

/// How often the meter samples.
const EVERY: Duration = Duration::from_millis(500);

/// One node's connections per app instance, at their peak over the
/// measured window.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NodeConnections {
    /// The node (`primary`, `replica-1`, ...), as the cluster names it.
    pub node: String,
    /// The instance's pool connections.
    pub pools: f64,
    /// The instance's tracker connections.
    pub tracker: f64,
}

/// The meter, sampling in a task of its own so the workload's arrivals
/// never wait on it.
pub struct Meter {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<NodeConnections>>,
}

impl Meter {
    /// Starts sampling every node of `cluster`; `instances` app instances
    /// are serving.
    pub fn start(cluster: &TestCluster, instances: usize) -> Meter {
        let mut nodes: Vec<(String, u16)> = vec![("primary".to_owned(), cluster.primary_port())];
        nodes.extend(
            cluster
                .replicas()
                .iter()
                .map(|replica| (replica.name().to_owned(), replica.port())),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(sample(nodes, instances, stopped));
        Meter { stop, task }
    }

    /// Stops sampling; each node's peaks per instance. A node that could
    /// not be read shows 0.
    pub async fn stop(self) -> Vec<NodeConnections> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

async fn sample(
    nodes: Vec<(String, u16)>,
    instances: usize,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) -> Vec<NodeConnections> {
    let mut meters = Vec::with_capacity(nodes.len());
    for (_, port) in &nodes {
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        meters.push(PgConnection::connect(&url).await.ok());
    }
    let mut peaks = vec![(0i64, 0i64); nodes.len()];
    let mut ticks = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            _ = ticks.tick() => {}
        }
        for (meter, peak) in meters.iter_mut().zip(peaks.iter_mut()) {
            let Some(connection) = meter else { continue };
            let counted: Result<(i64, i64), sqlx::Error> = sqlx::query_as(
                "select count(*) filter (where application_name = $1), \
                        count(*) filter (where application_name = $2) \
                 from pg_stat_activity where backend_type = 'client backend'",
            )
            .bind(POOL_APPLICATION_NAME)
            .bind(TRACKER_APPLICATION_NAME)
            .fetch_one(&mut *connection)
            .await;
            if let Ok((pools, tracker)) = counted {
                peak.0 = peak.0.max(pools);
                peak.1 = peak.1.max(tracker);
            }
        }
    }
    for connection in meters.into_iter().flatten() {
        let _ = connection.close().await;
    }
    let per = instances.max(1) as f64;
    nodes
        .into_iter()
        .zip(peaks)
        .map(|((node, _), (pools, tracker))| NodeConnections {
            node,
            pools: pools as f64 / per,
            tracker: tracker as f64 / per,
        })
        .collect()
}

//! [`PgReplicaSetBuilder::connect`]: checks the primary, decides how
//! replicas prove what they hold, builds the pools and starts the tracker,
//! one step per function.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, PgPool, Row};

use super::budget::PrimaryShare;
use super::builder::{HeartbeatSetting, PgReplicaSetBuilder, Source};
use super::canary::Canary;
use super::capture::Capture;
use super::endpoint::{Endpoint, EndpointSource};
use super::error::PgSetupError;
use super::heartbeat::{self, Heartbeat};
use super::outages::Outages;
use super::pools::{PrimaryPools, Rebuild};
use super::primary::PrimaryState;
use super::probe::{self, PrimaryProbe, ProbeKind};
use super::probe_conn::{ProbeConn, ProbeConnector, ProbeTarget};
use super::probe_sqlx::{self, SqlxConnector};
use super::tracker::{describe, ReplicaTracker, TrackerConfig};
use super::{Inner, PgReplicaSet};
use crate::position::WalGeometry;

/// What the setup query learns about the primary.
struct Cluster {
    system_id: u64,
    geometry: WalGeometry,
    aurora: bool,
    /// The heartbeat table asked about exists with the privileges
    /// heartbeats need.
    table_usable: bool,
}

/// How setup talks about the primary it failed to reach.
struct PrimaryErrors {
    node: String,
    bound: Duration,
}

impl PrimaryErrors {
    fn timed_out(&self) -> PgSetupError {
        PgSetupError::PrimaryTimedOut {
            node: self.node.clone(),
            timeout: self.bound,
        }
    }

    fn failed(&self, source: sqlx::Error) -> PgSetupError {
        PgSetupError::Primary {
            node: self.node.clone(),
            source,
        }
    }
}

impl PgReplicaSetBuilder {
    /// Connects to the primary, reads the cluster's identity, decides how
    /// replicas prove what they hold (their WAL receiver's timeline, a
    /// heartbeat table, or nothing), polls every replica once, looks
    /// behind each URL for more servers, and starts the tracker.
    ///
    /// Fails if the primary cannot be queried, or a heartbeat table named
    /// with [`heartbeat_table`](Self::heartbeat_table) cannot be used.
    /// Replicas that are down are not an error: they are excluded until
    /// they answer.
    pub async fn connect(mut self) -> Result<PgReplicaSet, PgSetupError> {
        let outages = Outages::new();
        let (primary, rebuild) = match self.primary.take().ok_or(PgSetupError::NoPrimary)? {
            Source::Url(url) => {
                let options = Self::options("primary", &url)?;
                let factory = self.primary_pool_factory(&outages);
                (factory(options), Some(factory))
            }
            Source::Pool(pool) => (pool, None),
        };
        let errors = PrimaryErrors {
            node: describe(&primary.connect_options()),
            bound: self.acquire_timeout + self.probe_timeout,
        };

        let connector = self
            .probe_connector
            .take()
            .unwrap_or_else(|| Arc::new(SqlxConnector));
        let table = self.table_to_ask_about()?;
        let cluster = cluster_facts(&primary, table.as_deref(), &errors).await?;
        let (tracker_conn, tracker_sees) = self
            .tracker_connection(&*connector, &primary, errors.bound)
            .await;
        let heartbeat = self.heartbeat(table, &cluster, tracker_sees)?;
        if cluster.aurora {
            tracing::error!(
                "Aurora PostgreSQL detected (aurora_version() exists): its replicas share storage \
                 and replay no WAL, so no replica can be proven to hold a write. Reads with a token \
                 go to the primary (the writer) for the token's life; replicas serve eventual reads \
                 only. See the platforms guide"
            );
        }
        // The first position; with heartbeats, written as one, so that
        // replicas are proven to follow this primary as soon as they replay
        // it, before the first write.
        let first_sql = probe::primary_position_sql(heartbeat.as_deref());
        let first = tokio::time::timeout(
            errors.bound,
            probe_sqlx::primary(&primary, &first_sql, heartbeat.is_some()),
        )
        .await
        .map_err(|_| errors.timed_out())?
        .map_err(|source| errors.failed(source))?;
        let probe_kind = if cluster.aurora {
            ProbeKind::Aurora
        } else {
            ProbeKind::Streaming {
                heartbeat: heartbeat.as_ref().map(|h| h.table.clone()),
            }
        };

        let endpoints = self.endpoints()?;
        let pools = Arc::new(PrimaryPools::new(primary, rebuild));
        let primary_state = Arc::new(PrimaryState::new(
            Arc::clone(&pools),
            Arc::clone(&self.tracker_options),
            cluster.geometry,
            cluster.system_id,
            Arc::clone(&outages),
        ));
        let tracker = ReplicaTracker::new(
            endpoints,
            primary_state,
            self.tracker_config(),
            probe_kind,
            heartbeat.clone(),
            Arc::clone(&connector),
        );
        tracker.note_primary_position(PrimaryProbe {
            lsn: first.lsn.round_down_page_header(cluster.geometry),
            ..first
        });
        tracker.start(tracker_conn).await;
        metrics::counter!("read_after_write_capture_failures_total").increment(0);
        metrics::counter!("read_after_write_capture_queries_total").increment(0);
        metrics::counter!("read_after_write_canary_violations_total").increment(0);
        metrics::counter!("read_after_write_canary_checks_total").increment(0);
        for endpoint in &tracker.endpoints {
            metrics::gauge!("read_after_write_replica_indistinct", "replica" => endpoint.name.clone())
                .set(0.0);
        }
        tracing::info!(
            replicas = tracker.servers.len(),
            system_id = cluster.system_id,
            timeline = first.timeline,
            heartbeat = heartbeat.as_ref().map(|h| h.table.as_str()),
            "replica set connected"
        );
        Ok(PgReplicaSet {
            inner: Arc::new(Inner {
                capture: Capture::new(
                    pools,
                    connector,
                    outages,
                    heartbeat,
                    cluster.geometry,
                    self.capture_timeout,
                ),
                tracker,
                selection: self.selection,
                wait_poll_interval: self.wait_poll_interval.max(Duration::from_micros(100)),
                poll_interval: self.poll_interval,
                next: AtomicUsize::new(0),
                wait_policy: self.wait_policy,
                primary_share: self.primary_budget.map(PrimaryShare::new),
                canary: Canary::new(self.canary_rate),
            }),
        })
    }

    /// Builds the primary's pools from a URL; the primary's set keeps the
    /// factory to build a fresh pool when the primary freezes.
    fn primary_pool_factory(&self, outages: &Arc<Outages>) -> Rebuild {
        let outages = Arc::clone(outages);
        let settings = self.pool_settings();
        Box::new(move |options: PgConnectOptions| {
            settings.options(&outages).connect_lazy_with(options)
        })
    }

    /// The heartbeat table to ask the primary about, refused before any
    /// connection when it is not a plain identifier.
    fn table_to_ask_about(&self) -> Result<Option<String>, PgSetupError> {
        match &self.heartbeat {
            HeartbeatSetting::Table(table) if !heartbeat::valid_table_name(table) => {
                Err(PgSetupError::Heartbeat {
                    table: table.clone(),
                    why: "not a plain identifier (letters, digits and underscores, optionally schema.table)",
                })
            }
            HeartbeatSetting::Table(table) => Ok(Some(table.clone())),
            HeartbeatSetting::Auto => Ok(Some(heartbeat::DEFAULT_TABLE.to_owned())),
            HeartbeatSetting::Off => Ok(None),
        }
    }

    /// The tracker's own connection to the primary, and whether the
    /// tracker's role sees replica timelines (roles are cluster-wide). The
    /// primary's task keeps the connection; without one it retries.
    async fn tracker_connection(
        &self,
        connector: &dyn ProbeConnector,
        primary: &PgPool,
        bound: Duration,
    ) -> (Option<ProbeConn>, bool) {
        let target = ProbeTarget::primary((self.tracker_options)(
            primary.connect_options().as_ref().clone(),
        ));
        let connected = tokio::time::timeout(bound, async {
            let mut conn = connector.connect(&target).await?;
            let (_, sees) = probe::identify(&mut *conn).await?;
            Ok::<_, super::probe_conn::ProbeError>((conn, sees))
        })
        .await;
        match connected {
            Ok(Ok((conn, sees))) => (Some(conn), sees),
            Ok(Err(error)) => {
                tracing::warn!(%error, "the tracker could not connect to the primary; it retries");
                (None, false)
            }
            Err(_) => (None, false),
        }
    }

    /// Whether replicas are proven by heartbeats: a table named by the app
    /// must be usable; the default table is used when it is and the
    /// tracker cannot see timelines. Never on Aurora.
    fn heartbeat(
        &self,
        table: Option<String>,
        cluster: &Cluster,
        tracker_sees: bool,
    ) -> Result<Option<Arc<Heartbeat>>, PgSetupError> {
        let table = match (&self.heartbeat, table) {
            (HeartbeatSetting::Table(_), Some(table)) if !cluster.table_usable => {
                return Err(PgSetupError::Heartbeat {
                    table,
                    why: "it does not exist, or the application's role may not SELECT, INSERT and UPDATE it",
                });
            }
            (HeartbeatSetting::Table(_), Some(table)) => Some(table),
            (HeartbeatSetting::Auto, Some(table)) if cluster.table_usable && !tracker_sees => {
                Some(table)
            }
            _ => None,
        };
        Ok(table
            .filter(|_| !cluster.aurora)
            .map(|table| Arc::new(Heartbeat::new(table))))
    }

    /// One endpoint per replica URL or pool, names unique.
    fn endpoints(&mut self) -> Result<Vec<Arc<Endpoint>>, PgSetupError> {
        let settings = self.pool_settings();
        let mut endpoints: Vec<Arc<Endpoint>> = Vec::with_capacity(self.replicas.len());
        for (name, source) in std::mem::take(&mut self.replicas) {
            if endpoints.iter().any(|e| e.name == name) {
                return Err(PgSetupError::DuplicateName(name));
            }
            let source = match source {
                Source::Url(url) => EndpointSource::Options(std::sync::Mutex::new(Arc::new(
                    Self::options(&name, &url)?,
                ))),
                Source::Pool(pool) => EndpointSource::Pool(pool),
            };
            endpoints.push(Arc::new(Endpoint::new(
                name,
                source,
                settings,
                Arc::clone(&self.tracker_options),
            )));
        }
        Ok(endpoints)
    }

    fn tracker_config(&self) -> TrackerConfig {
        TrackerConfig {
            poll_interval: self.poll_interval,
            probe_timeout: self.probe_timeout,
            max_backoff: self.max_backoff,
            min_refresh_gap: self.wait_poll_interval,
            idle_poll_interval: self.idle_poll_interval,
            stall_timeout: self.stall_timeout,
            heartbeat_interval: self.heartbeat_interval,
            discovery_interval: self.discovery_interval,
        }
    }
}

/// Runs the setup query on the primary: refuses a standby, and reads the
/// system identifier, the WAL geometry, whether this is Aurora and whether
/// `table` is usable for heartbeats.
async fn cluster_facts(
    primary: &PgPool,
    table: Option<&str>,
    errors: &PrimaryErrors,
) -> Result<Cluster, PgSetupError> {
    let row = tokio::time::timeout(
        errors.bound,
        sqlx::raw_sql(AssertSqlSafe(setup_sql(table))).fetch_one(primary),
    )
    .await
    .map_err(|_| errors.timed_out())?
    .map_err(|source| errors.failed(source))?;
    let text = |i: usize| -> Result<String, PgSetupError> {
        row.try_get::<Option<String>, _>(i)
            .map_err(|source| errors.failed(source))
            .map(Option::unwrap_or_default)
    };
    if text(0)? == "true" {
        return Err(PgSetupError::PrimaryIsStandby);
    }
    Ok(Cluster {
        system_id: text(1)?.parse::<u64>().unwrap_or(0),
        geometry: WalGeometry {
            block_size: text(2)?.parse().unwrap_or(8192),
            segment_size: text(3)?.parse().unwrap_or(16 << 20),
        },
        aurora: text(4)? == "true",
        table_usable: text(5)? == "true",
    })
}

/// The setup query, sent as simple-protocol text: whether the primary is in
/// recovery, the system identifier, the WAL geometry, whether this is
/// Aurora, and whether `table` exists with the privileges heartbeats need.
fn setup_sql(table: Option<&str>) -> String {
    let usable = match table {
        Some(table) => format!(
            "(to_regclass('{table}') is not null and \
              has_table_privilege(to_regclass('{table}'), 'SELECT, INSERT, UPDATE'))::text"
        ),
        None => "'false'".to_owned(),
    };
    format!(
        "select pg_is_in_recovery()::text, \
                (select system_identifier::text from pg_control_system()), \
                current_setting('wal_block_size'), \
                (select setting from pg_settings where name = 'wal_segment_size'), \
                exists(select 1 from pg_proc where proname = 'aurora_version')::text, \
                {usable}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setup_query_names_the_heartbeat_table_only_when_given() {
        let with = setup_sql(Some("ops.raw_heartbeat"));
        assert!(with.contains("to_regclass('ops.raw_heartbeat')"));
        assert!(!setup_sql(None).contains("to_regclass"));
    }

    #[tokio::test]
    async fn a_heartbeat_table_that_is_not_an_identifier_is_refused_before_connecting() {
        let result = PgReplicaSetBuilder::new()
            .primary_url("postgres://nobody@127.0.0.1:1/none")
            .heartbeat_table("t; drop table users")
            .connect()
            .await;
        assert!(
            matches!(result, Err(PgSetupError::Heartbeat { .. })),
            "{result:?}"
        );
    }
}

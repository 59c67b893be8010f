//! One app instance of the lab: the social app (or, for
//! `adaptive-tokio-postgres`, the same API over tokio-postgres) over its
//! own replica set (so its own tracker) and layer, set up as the strategy and the variant
//! (database role, how replicas are reached) say, measured by
//! [`readings`], served over HTTP on loopback.

use std::fmt;
use std::time::Duration;

use read_after_write::pg::{PgReplicaSet, PgSetupError, Selection, WaitPolicy};
use read_after_write::tokio_postgres::deadpool_postgres;
use read_after_write::{Backend, CheckContext, Consistency, KeySet, ReadAfterWriteLayer};
use read_after_write_testkit::{TcpProxy, TestCluster};
use serde::Serialize;
use sqlx::PgPool;

use super::readings::{self, Instrumented, SettingsSeen};
use super::strategy::{PrimaryOnly, RandomReplica, Strategy};
use super::workload::Workload;
use super::LabConfig;
use crate::roles::Role;
use crate::social::{self, AppConfig};
use crate::tokio_social;

/// `application_name` of the app instances' pools, so the lab can count
/// their connections on each node apart from the tracker's
/// ([`TRACKER_APPLICATION_NAME`](read_after_write::pg::TRACKER_APPLICATION_NAME))
/// and its own.
pub const POOL_APPLICATION_NAME: &str = "lab_app";

/// How the app reaches the replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaMode {
    /// One URL per replica: the lab's topology until now.
    Direct,
    /// One URL for every replica, the kit's round-robin proxy (a reader endpoint:
    /// Aurora's `cluster-ro`, a read pool, DNS round robin), which the
    /// library looks behind server by server.
    Endpoint,
}

impl ReplicaMode {
    /// Both, in table order.
    pub const ALL: [ReplicaMode; 2] = [ReplicaMode::Direct, ReplicaMode::Endpoint];

    /// The name in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ReplicaMode::Direct => "direct",
            ReplicaMode::Endpoint => "endpoint",
        }
    }
}

impl fmt::Display for ReplicaMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ReplicaMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        ReplicaMode::ALL
            .into_iter()
            .find(|mode| mode.name() == text)
            .ok_or_else(|| format!("unknown replica mode {text:?}: direct or endpoint"))
    }
}

/// What the app runs as and how it reaches the replicas, beside the
/// strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Variant {
    /// The database role.
    pub role: Role,
    /// One URL per replica, or one reader endpoint.
    pub replicas: ReplicaMode,
}

impl Default for Variant {
    fn default() -> Self {
        Variant {
            role: Role::Superuser,
            replicas: ReplicaMode::Direct,
        }
    }
}

/// `url` with the instances' pool `application_name`.
fn tagged(url: String) -> String {
    format!("{url}?application_name={POOL_APPLICATION_NAME}")
}

/// One app instance being served.
pub(crate) struct Instance {
    pub(crate) base: String,
    /// The settings the instance's layer runs with, from its self-check.
    pub(crate) settings: SettingsSeen,
    replicas: PgReplicaSet,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// How many times an instance tries to connect its replica set.
const CONNECT_ATTEMPTS: u32 = 3;

impl Instance {
    /// Starts an instance for `strategy` and `variant`; `endpoint` is the
    /// reader endpoint over the cluster's replicas (needed for
    /// [`ReplicaMode::Endpoint`]).
    pub(crate) async fn start(
        cluster: &TestCluster,
        endpoint: Option<&TcpProxy>,
        strategy: Strategy,
        variant: Variant,
        keys: &KeySet,
        workload: &Workload,
        config: &LabConfig,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let role = variant.role;
        if variant.replicas == ReplicaMode::Endpoint && endpoint.is_none() {
            return Err("the reader endpoint mode needs the lab's endpoint proxy".into());
        }
        let builder = || {
            let mut builder = PgReplicaSet::builder()
                .primary_url(tagged(role.url(cluster.primary_port())))
                // Pool sizes are capacity, not routing: the same for every
                // strategy, adaptive included.
                .max_connections(workload.users.clamp(4, 32) as u32);
            builder = match strategy {
                Strategy::Naive => builder.selection(Selection::Random),
                // The library's defaults, whatever they are in this version.
                Strategy::Adaptive | Strategy::AdaptiveTokioPostgres => builder,
                // A fixed max_wait, waited in full: the policy before predictions.
                Strategy::LsnWait { .. } => builder
                    .selection(Selection::RoundRobin)
                    .wait_poll_interval(config.wait_poll)
                    .wait_policy(WaitPolicy::Fixed),
                _ => builder
                    .selection(Selection::RoundRobin)
                    .wait_poll_interval(config.wait_poll),
            };
            match (variant.replicas, endpoint) {
                (ReplicaMode::Endpoint, Some(endpoint)) => {
                    builder = builder.replica_url("readers", tagged(role.url(endpoint.port())));
                }
                (ReplicaMode::Endpoint, None) => {}
                (ReplicaMode::Direct, _) => {
                    for replica in cluster.replicas() {
                        builder =
                            builder.replica_url(replica.name(), tagged(role.url(replica.port())));
                    }
                }
            }
            builder
        };
        let app_config = AppConfig {
            keys: keys.clone(),
            cookie_secure: false,
            max_wait: strategy.max_wait(),
            // The lab counts where reads went from this header.
            debug_header: true,
            request_timeout: Some(Duration::from_secs(5)),
        };
        if strategy.is_tokio_postgres() {
            let pools = connect(|| read_after_write::tokio_postgres::connect(builder())).await?;
            let replicas = pools.set().clone();
            let (router, settings) =
                serve_tokio_postgres(Instrumented::new(pools), &replicas, &app_config).await;
            return Instance::serve(router, settings, replicas).await;
        }
        let replicas = connect(|| builder().connect()).await?;
        let (router, settings) = match strategy {
            // The baselines route whatever the token says; they get tokens
            // like every strategy (a request that writes without one is
            // what the layer warns about), and ignore them.
            Strategy::Naive => {
                serve(
                    Instrumented::new(RandomReplica::new(replicas.clone())),
                    &replicas,
                    &app_config,
                    |layer| layer,
                )
                .await
            }
            Strategy::Primary => {
                serve(
                    Instrumented::new(PrimaryOnly::new(replicas.clone())),
                    &replicas,
                    &app_config,
                    |layer| layer,
                )
                .await
            }
            Strategy::TimeWindow => {
                serve(
                    Instrumented::new(replicas.clone()),
                    &replicas,
                    &app_config,
                    |layer| {
                        layer
                            .consistency(Consistency::TimeWindow)
                            .ttl(Duration::from_secs(5))
                    },
                )
                .await
            }
            Strategy::Monotonic => {
                serve(
                    Instrumented::new(replicas.clone()),
                    &replicas,
                    &app_config,
                    |layer| layer.consistency(Consistency::Monotonic),
                )
                .await
            }
            Strategy::Lsn
            | Strategy::LsnWait { .. }
            | Strategy::Adaptive
            | Strategy::AdaptiveTokioPostgres => {
                serve(
                    Instrumented::new(replicas.clone()),
                    &replicas,
                    &app_config,
                    |layer| layer,
                )
                .await
            }
        };
        Instance::serve(router, settings, replicas).await
    }

    /// Serves `router` on a new loopback port.
    async fn serve(
        router: axum::Router,
        settings: SettingsSeen,
        replicas: PgReplicaSet,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Instance {
            base,
            settings,
            replicas,
            stop,
            server,
        })
    }

    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.server.await;
        self.replicas.shutdown().await;
    }
}

/// Connects with `connect`, up to [`CONNECT_ATTEMPTS`] times: the profile
/// before may have left the primary busy (the `burst` profile's
/// checkpoints, on a loaded machine), and a setup query that misses the
/// library's production bound gets two more tries before the run fails.
async fn connect<T, F>(mut connect: impl FnMut() -> F) -> Result<T, PgSetupError>
where
    F: std::future::Future<Output = Result<T, PgSetupError>>,
{
    let mut attempt = 1;
    loop {
        match connect().await {
            Ok(connected) => return Ok(connected),
            Err(error) if attempt < CONNECT_ATTEMPTS => {
                tracing::warn!(%error, attempt, "lab: connecting the replica set failed; trying again");
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// The app over `backend`, its layer adjusted by `adjust`, measured by
/// [`readings::record_readings`]; and what the layer's self-check handed
/// the backend.
async fn serve<B>(
    backend: Instrumented<B>,
    replicas: &PgReplicaSet,
    config: &AppConfig,
    adjust: impl FnOnce(ReadAfterWriteLayer<Instrumented<B>>) -> ReadAfterWriteLayer<Instrumented<B>>,
) -> (axum::Router, SettingsSeen)
where
    B: Backend<Pool = PgPool>,
{
    let settings = backend.settings();
    let layer = adjust(social::layer(backend, config));
    // What a deployment runs at startup; here it also hands the backend
    // the settings the layer runs with, its default max_wait included.
    let _ = layer.check(CheckContext::new()).await;
    let router = social::router_with_layer(layer, replicas.clone(), config)
        .layer(axum::middleware::from_fn(readings::record_readings));
    (router, settings)
}

/// The tokio-postgres app (`examples/tokio_postgres`) over `backend`, with
/// the settings of `config`, measured as [`serve`] measures the social app.
async fn serve_tokio_postgres<B>(
    backend: Instrumented<B>,
    replicas: &PgReplicaSet,
    config: &AppConfig,
) -> (axum::Router, SettingsSeen)
where
    B: Backend<Pool = deadpool_postgres::Pool>,
{
    let settings = backend.settings();
    let config = tokio_social::AppConfig {
        keys: config.keys.clone(),
        cookie_secure: config.cookie_secure,
        max_wait: config.max_wait,
        debug_header: config.debug_header,
        request_timeout: config.request_timeout,
    };
    let layer = tokio_social::layer(backend, &config);
    let _ = layer.check(CheckContext::new()).await;
    let router = tokio_social::router_with_layer(layer, replicas.clone(), &config)
        .layer(axum::middleware::from_fn(readings::record_readings));
    (router, settings)
}

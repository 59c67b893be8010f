//! The system under test: a fresh cluster, the TCP proxy in front of its
//! primary (and, for a reader endpoint, a balanced one in front of both
//! replicas), the database roles, and one or two instances of the social
//! app served over HTTP on loopback, which a drill can restart one by one.
//! The app is the sqlx one (`examples/social`), or the same API over
//! tokio-postgres ([`AppBackend::TokioPostgres`], `examples/tokio_postgres`),
//! diesel-async ([`AppBackend::DieselAsync`], `examples/diesel_async`) or
//! SeaORM ([`AppBackend::SeaOrm`], `examples/sea_orm`).

use std::fmt;
use std::future::Future;
use std::time::Duration;

use read_after_write::pg::{PgReplicaSet, PgReplicaSetBuilder, PgSetupError};
use read_after_write::{Backend, Consistency, KeySet, ReadAfterWriteLayer, SigningKey};
use read_after_write_testkit::{TcpProxy, TestCluster};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::DrillError;
pub use crate::roles::Role;
use crate::social;
use crate::{diesel_social, sea_social, tokio_social};

/// Which app the drills serve: the same API, over one driver or the other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AppBackend {
    /// The social app (`examples/social`), on sqlx.
    #[default]
    Sqlx,
    /// The same API over tokio-postgres (`examples/tokio_postgres`), on
    /// deadpool-postgres pools.
    TokioPostgres,
    /// The same API over diesel-async (`examples/diesel_async`), on its
    /// deadpool pools.
    DieselAsync,
    /// The same API over SeaORM 2 (`examples/sea_orm`), on the sqlx pools
    /// of the replica set itself.
    SeaOrm,
}

impl AppBackend {
    /// Every one, in the order `--backend` lists them.
    pub const ALL: [AppBackend; 4] = [
        AppBackend::Sqlx,
        AppBackend::TokioPostgres,
        AppBackend::DieselAsync,
        AppBackend::SeaOrm,
    ];

    /// The name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            AppBackend::Sqlx => "sqlx",
            AppBackend::TokioPostgres => "tokio-postgres",
            AppBackend::DieselAsync => "diesel-async",
            AppBackend::SeaOrm => "sea-orm",
        }
    }
}

impl fmt::Display for AppBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for AppBackend {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        AppBackend::ALL
            .into_iter()
            .find(|backend| backend.name() == text)
            .ok_or_else(|| {
                format!("unknown backend {text:?}: sqlx, tokio-postgres, diesel-async or sea-orm")
            })
    }
}

/// How the app is configured in every drill.
#[derive(Clone, Debug)]
pub struct AppSettings {
    /// How long a session read waits for a replica.
    pub max_wait: Duration,
    /// The app answers 503 after this.
    pub request_timeout: Duration,
    /// Replica apply delays, one replica each.
    pub lags: Vec<Duration>,
    /// The app reads and issues affinity tokens. Off only for the negative
    /// control, whose layer then finds no identity on any request (its
    /// identity function answers `None`), so its reads go to a replica
    /// whatever the user wrote.
    pub tokens: bool,
    /// Monotonic reads on the app's layer
    /// ([`Consistency::Monotonic`]):
    /// the drills then also exercise sessions leaving a replica that went
    /// down, restarted or diverged.
    pub monotonic: bool,
    /// The share of session reads the canary confirms on the server that
    /// served them
    /// ([`canary_rate`](read_after_write::pg::PgReplicaSetBuilder::canary_rate)):
    /// higher than the library's default, so a run of a few thousand reads
    /// checks hundreds.
    pub canary_rate: f64,
    /// The app served: the social app on sqlx, or the same API over
    /// another driver.
    pub backend: AppBackend,
}

impl Default for AppSettings {
    fn default() -> Self {
        AppSettings {
            max_wait: Duration::from_millis(200),
            request_timeout: Duration::from_secs(2),
            lags: vec![Duration::from_millis(30), Duration::from_millis(150)],
            tokens: true,
            monotonic: false,
            canary_rate: 0.1,
            backend: AppBackend::Sqlx,
        }
    }
}

/// How the app reaches the cluster, and how many instances serve it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// App instances on the one cluster; users alternate between them
    /// request by request, as behind a load balancer.
    pub instances: usize,
    /// The app's replicas are one URL, a round-robin proxy over every
    /// replica (a reader endpoint), instead of one URL each.
    pub reader_endpoint: bool,
}

impl Topology {
    /// One instance, one URL per replica: the drills' usual topology.
    pub fn single() -> Self {
        Topology {
            instances: 1,
            reader_endpoint: false,
        }
    }
}

/// The signing key every instance starts with, and the one a rotation
/// introduces.
fn key(which: &[u8]) -> Result<SigningKey, DrillError> {
    SigningKey::from_bytes(which)
        .map_err(|error| DrillError::Setup(format!("signing key: {error}")))
}

/// Fixed signing keys: every app instance of every run shares them, as a
/// fleet does across deploys, so cookies survive an app restart.
pub fn old_keys() -> Result<KeySet, DrillError> {
    Ok(KeySet::new(key(b"read-after-write drills, fixed key")?))
}

/// The key list after a rotation: the new key signs, the old one still
/// verifies (`AFFINITY_KEY=new,old`).
pub fn rotated_keys() -> Result<KeySet, DrillError> {
    Ok(
        KeySet::new(key(b"read-after-write drills, the rotated key")?)
            .with_previous(key(b"read-after-write drills, fixed key")?),
    )
}

/// One app instance being served.
struct Served {
    replicas: PgReplicaSet,
    stop: oneshot::Sender<()>,
    server: JoinHandle<()>,
    base: String,
    keys: KeySet,
    release: Release,
}

/// Which release an app instance runs, as far as tokens go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// This one.
    This,
    /// A later release with a newer token format: this one behind
    /// [`later_format`](super::later_format)'s re-labelling.
    LaterFormat,
}

/// The cluster, the proxies, the app instances and the addresses clients
/// use.
pub struct System {
    /// The cluster; drills fault it directly.
    pub cluster: TestCluster,
    /// In front of the primary; the app's primary URL points here.
    pub proxy: TcpProxy,
    /// In front of every replica, round robin, when the app's replicas are
    /// one reader endpoint.
    pub endpoint: Option<TcpProxy>,
    role: Role,
    settings: AppSettings,
    apps: Vec<Option<Served>>,
    bases: watch::Sender<Vec<String>>,
    /// Seconds the cluster took to start.
    pub cluster_start_s: f64,
    /// App restarts so far (one per instance restarted).
    pub restarts: u32,
    /// The canary's checks and violations, summed over every replica set
    /// stopped so far.
    pub canary: (u64, u64),
}

impl System {
    /// Starts a fresh cluster, creates the schema and roles, puts the proxy
    /// in front of the primary (and the endpoint in front of the replicas)
    /// and serves the app's instances, every one on [`old_keys`].
    pub async fn start(
        role: Role,
        settings: &AppSettings,
        topology: Topology,
    ) -> Result<System, DrillError> {
        let started = std::time::Instant::now();
        let mut builder = TestCluster::builder();
        for lag in &settings.lags {
            builder = builder.replica(*lag);
        }
        let cluster = builder.start().await?;
        let cluster_start_s = started.elapsed().as_secs_f64();
        prepare_database(&cluster).await?;
        cluster
            .wait_for_replicas_caught_up(Duration::from_secs(30))
            .await?;
        let proxy = TcpProxy::start(cluster.primary_port()).await?;
        let endpoint = if topology.reader_endpoint {
            Some(TcpProxy::start_balanced(&cluster.replica_ports()).await?)
        } else {
            None
        };
        let mut system = System {
            cluster,
            proxy,
            endpoint,
            role,
            settings: settings.clone(),
            apps: Vec::new(),
            bases: watch::Sender::new(Vec::new()),
            cluster_start_s,
            restarts: 0,
            canary: (0, 0),
        };
        for _ in 0..topology.instances.max(1) {
            let served = system.serve(old_keys()?, Release::This).await?;
            system.apps.push(Some(served));
        }
        system.publish();
        Ok(system)
    }

    /// Readies every instance for the load, as a readiness probe and a
    /// warmed deploy would: `concurrency` feed reads at once per instance,
    /// each bounded, their outcomes ignored. A cold pool opens (and, behind
    /// a reader endpoint, identifies) one connection per concurrent read;
    /// on a busy 2-core machine a burst of those can outlast the pool's
    /// acquire timeout, which would show as errors before any fault.
    pub async fn warm_up(&self, concurrency: usize) {
        let Ok(client) = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
        else {
            return;
        };
        let mut reads = tokio::task::JoinSet::new();
        for base in self.bases.borrow().iter() {
            for _ in 0..concurrency {
                let request = client.get(format!("{base}/api/feed")).send();
                reads.spawn(async move {
                    let _ = request.await;
                });
            }
        }
        while reads.join_next().await.is_some() {}
    }

    /// The addresses clients follow, one per instance.
    pub fn bases(&self) -> watch::Receiver<Vec<String>> {
        self.bases.subscribe()
    }

    /// Tells clients where the instances being served are, as a load
    /// balancer that health-checks them would: an instance that stops
    /// leaves the list. With none left, clients keep the last addresses
    /// and meet refused connections until one serves again.
    fn publish(&self) {
        let bases: Vec<String> = self
            .apps
            .iter()
            .flatten()
            .map(|app| app.base.clone())
            .collect();
        if !bases.is_empty() {
            self.bases.send_replace(bases);
        }
    }

    /// The drill's settings on an app's layer: monotonic reads, and for
    /// the negative control no identity (so no token is ever used).
    fn adjust<B: Backend>(&self, mut layer: ReadAfterWriteLayer<B>) -> ReadAfterWriteLayer<B> {
        if self.settings.monotonic {
            layer = layer.consistency(Consistency::Monotonic);
        }
        if !self.settings.tokens {
            layer = layer.identity(|_| None);
        }
        layer
    }

    /// Builds a replica set (primary through the proxy, replicas direct or
    /// through the endpoint) and serves a fresh router on a new port.
    async fn serve(&self, keys: KeySet, release: Release) -> Result<Served, DrillError> {
        // The apps share their configuration's shape, not its type.
        macro_rules! config {
            ($app:ident) => {
                $app::AppConfig {
                    keys: keys.clone(),
                    cookie_secure: false,
                    max_wait: Some(self.settings.max_wait),
                    debug_header: true,
                    request_timeout: Some(self.settings.request_timeout),
                }
            };
        }
        let (router, replicas) = match self.settings.backend {
            AppBackend::Sqlx => {
                let replicas = self.connect_replica_set(|b| b.connect()).await?;
                let config = config!(social);
                let layer = self.adjust(social::layer(replicas.clone(), &config));
                let router = social::router_with_layer(layer, replicas.clone(), &config);
                (router, replicas)
            }
            AppBackend::TokioPostgres => {
                let pools = self
                    .connect_replica_set(read_after_write::tokio_postgres::connect)
                    .await?;
                let config = config!(tokio_social);
                let replicas = pools.set().clone();
                let layer = self.adjust(tokio_social::layer(pools, &config));
                let router = tokio_social::router_with_layer(layer, replicas.clone(), &config);
                (router, replicas)
            }
            AppBackend::DieselAsync => {
                let pools = self
                    .connect_replica_set(read_after_write::diesel_async::connect)
                    .await?;
                let config = config!(diesel_social);
                let replicas = pools.set().clone();
                let layer = self.adjust(diesel_social::layer(pools, &config));
                let router = diesel_social::router_with_layer(layer, replicas.clone(), &config);
                (router, replicas)
            }
            AppBackend::SeaOrm => {
                let replicas = self.connect_replica_set(|b| b.connect()).await?;
                let config = config!(sea_social);
                let layer = self.adjust(sea_social::layer(replicas.clone(), &config));
                let router = sea_social::router_with_layer(layer, replicas.clone(), &config);
                (router, replicas)
            }
        };
        let router = match release {
            Release::This => router,
            Release::LaterFormat => router.layer(axum::middleware::from_fn(
                super::later_format::later_release,
            )),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|error| DrillError::Setup(format!("binding the app's port: {error}")))?;
        let address = listener
            .local_addr()
            .map_err(|error| DrillError::Setup(format!("the app's port: {error}")))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                tracing::warn!(%error, "the app's server ended with an error");
            }
        });
        Ok(Served {
            replicas,
            stop,
            server,
            base: format!("http://{address}"),
            keys,
            release,
        })
    }

    /// Connects a replica set with `connect` (the set itself, or the
    /// tokio-postgres pools over one), retrying for up to ten seconds (right
    /// after a failover the new primary may still be finishing its
    /// promotion).
    async fn connect_replica_set<T, F>(
        &self,
        connect: impl Fn(PgReplicaSetBuilder) -> F,
    ) -> Result<T, DrillError>
    where
        F: Future<Output = Result<T, PgSetupError>>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut builder = PgReplicaSet::builder()
                .primary_url(self.role.url(self.proxy.port()))
                .canary_rate(self.settings.canary_rate);
            match &self.endpoint {
                Some(endpoint) => {
                    builder = builder.replica_url("readers", self.role.url(endpoint.port()));
                }
                None => {
                    for replica in self.cluster.replicas() {
                        builder =
                            builder.replica_url(replica.name(), self.role.url(replica.port()));
                    }
                }
            }
            let attempt = tokio::time::timeout(Duration::from_secs(5), connect(builder)).await;
            let error = match attempt {
                Ok(Ok(replicas)) => return Ok(replicas),
                Ok(Err(error)) => error.to_string(),
                Err(_) => "connect took longer than 5 s".to_owned(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(DrillError::Setup(format!(
                    "the app could not connect its replica set: {error}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops serving instance `index`, shuts its replica set's tracker down
    /// and drops it, keeping what its canary found. Every wait is bounded:
    /// a frozen node must not hold the drill.
    async fn stop_instance(&mut self, index: usize) -> Option<(KeySet, Release)> {
        let app = self.apps.get_mut(index)?.take()?;
        self.publish();
        let _ = app.stop.send(());
        let abort = app.server.abort_handle();
        // In-flight requests end within the request timeout.
        let grace = self.settings.request_timeout + Duration::from_secs(1);
        if tokio::time::timeout(grace, app.server).await.is_err() {
            tracing::warn!("the app did not stop within {grace:?}; aborting its server");
            abort.abort();
        }
        let (checks, violations) = app.replicas.canary_counts();
        self.canary.0 += checks;
        self.canary.1 += violations;
        if tokio::time::timeout(Duration::from_secs(5), app.replicas.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("the replica set's shutdown took longer than 5 s");
        }
        drop(app.replicas);
        Some((app.keys, app.release))
    }

    /// Stops every instance, each with its in-flight requests bounded by
    /// the request timeout, keeping what its canary found.
    pub async fn stop_app(&mut self) {
        for index in 0..self.apps.len() {
            self.stop_instance(index).await;
        }
    }

    /// An app restart: every instance stops, then serves again on a fresh
    /// replica set and router on a new port with the keys it had; clients
    /// follow the new addresses and keep their cookies.
    pub async fn restart_app(&mut self) -> Result<(), DrillError> {
        for index in 0..self.apps.len() {
            let (keys, release) = match self.stop_instance(index).await {
                Some(stopped) => stopped,
                None => (old_keys()?, Release::This),
            };
            self.restart_instance(index, keys, release).await?;
        }
        Ok(())
    }

    /// Instance `index` stops and serves again, now with `keys`: one step
    /// of a rolling deploy.
    pub async fn redeploy(&mut self, index: usize, keys: KeySet) -> Result<(), DrillError> {
        let release = self
            .stop_instance(index)
            .await
            .map_or(Release::This, |(_, release)| release);
        self.restart_instance(index, keys, release).await
    }

    /// Instance `index` stops and serves again on a later release with a
    /// newer token format, with the keys it had: one step of a rolling
    /// upgrade.
    pub async fn upgrade(&mut self, index: usize) -> Result<(), DrillError> {
        let keys = match self.stop_instance(index).await {
            Some((keys, _)) => keys,
            None => old_keys()?,
        };
        self.restart_instance(index, keys, Release::LaterFormat)
            .await
    }

    async fn restart_instance(
        &mut self,
        index: usize,
        keys: KeySet,
        release: Release,
    ) -> Result<(), DrillError> {
        self.restarts += 1;
        let served = self.serve(keys, release).await?;
        if let Some(slot) = self.apps.get_mut(index) {
            *slot = Some(served);
        }
        self.publish();
        Ok(())
    }
}

/// Runs the social migrations as `postgres`, then creates the heartbeat
/// table and the two LOGIN roles with the app's privileges
/// ([`create_roles`](crate::roles::create_roles)).
async fn prepare_database(cluster: &TestCluster) -> Result<(), DrillError> {
    let primary = sqlx::PgPool::connect(cluster.primary_url())
        .await
        .map_err(|error| DrillError::Setup(format!("connecting to the primary: {error}")))?;
    social::migrate(&primary)
        .await
        .map_err(|error| DrillError::Setup(format!("migrating: {error}")))?;
    primary.close().await;
    crate::roles::create_roles(cluster).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rotated_key_has_another_id_than_the_old_one() {
        // Else the rolling rotation drill would not meet an unknown key.
        let old = old_keys().expect("the old key");
        let rotated = rotated_keys().expect("the rotated keys");
        assert_ne!(old.current().id(), rotated.current().id());
        assert_eq!(rotated.len(), 2);
    }

    #[test]
    fn every_backend_parses_back_from_its_name() {
        for backend in AppBackend::ALL {
            assert_eq!(backend.name().parse::<AppBackend>(), Ok(backend));
        }
        assert_eq!(AppSettings::default().backend, AppBackend::Sqlx);
        assert!("diesel".parse::<AppBackend>().is_err());
    }
}

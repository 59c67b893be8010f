//! The system under test: a fresh cluster, the TCP proxy in front of its
//! primary, the database roles, and the social app served over HTTP on
//! loopback, which a drill can restart.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use read_after_write::pg::PgReplicaSet;
use read_after_write::{KeySet, SigningKey};
use read_after_write_testkit::{TcpProxy, TestCluster};
use serde::{Deserialize, Serialize};
use sqlx::Connection;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::history::StoredPost;
use super::DrillError;
use crate::social::{self, AppConfig};

/// The database role the app connects as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// `postgres`: sees every replica's timeline.
    Superuser,
    /// A LOGIN role with `pg_monitor` and the app's table privileges: what
    /// the README recommends.
    Monitor,
    /// A LOGIN role with table privileges only: replicas' timelines are
    /// hidden from it.
    Plain,
}

impl Role {
    /// Every role, in table order.
    pub const ALL: [Role; 3] = [Role::Superuser, Role::Monitor, Role::Plain];

    /// The name in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Role::Superuser => "superuser",
            Role::Monitor => "monitor",
            Role::Plain => "plain",
        }
    }

    /// The PostgreSQL user the app logs in as.
    pub fn user(self) -> &'static str {
        match self {
            Role::Superuser => "postgres",
            Role::Monitor => "drill_monitor",
            Role::Plain => "drill_plain",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.name() == text)
            .ok_or_else(|| format!("unknown role {text:?}: superuser, monitor or plain"))
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
    /// The app reads and issues affinity tokens ([`AppConfig::tokens`]).
    /// Off only for the negative control, whose reads then go to a replica
    /// whatever the user wrote, as the lab's `naive` baseline's do.
    pub tokens: bool,
    /// Monotonic reads on the app's layer
    /// ([`ReadAfterWriteLayer::monotonic_reads`](read_after_write::ReadAfterWriteLayer::monotonic_reads)):
    /// the drills then also exercise sessions leaving a replica that went
    /// down, restarted or diverged.
    pub monotonic: bool,
}

impl Default for AppSettings {
    fn default() -> Self {
        AppSettings {
            max_wait: Duration::from_millis(200),
            request_timeout: Duration::from_secs(2),
            lags: vec![Duration::from_millis(30), Duration::from_millis(150)],
            tokens: true,
            monotonic: false,
        }
    }
}

/// Fixed signing keys: every app instance of every run shares them, as a
/// fleet does across deploys, so cookies survive an app restart.
fn keys() -> Result<KeySet, DrillError> {
    let key = SigningKey::from_bytes(b"read-after-write drills, fixed key")
        .map_err(|error| DrillError::Setup(format!("signing key: {error}")))?;
    Ok(KeySet::new(key))
}

/// One app instance being served.
struct Served {
    replicas: PgReplicaSet,
    stop: oneshot::Sender<()>,
    server: JoinHandle<()>,
}

/// The cluster, the proxy, the app and the address clients use.
pub struct System {
    /// The cluster; drills fault it directly.
    pub cluster: TestCluster,
    /// In front of the primary; the app's primary URL points here.
    pub proxy: TcpProxy,
    role: Role,
    settings: AppSettings,
    keys: KeySet,
    app: Option<Served>,
    base: watch::Sender<String>,
    /// Seconds the cluster took to start.
    pub cluster_start_s: f64,
    /// App restarts so far.
    pub restarts: u32,
}

impl System {
    /// Starts a fresh cluster, creates the schema and roles, puts the proxy
    /// in front of the primary and serves the app.
    pub async fn start(role: Role, settings: &AppSettings) -> Result<System, DrillError> {
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
        let mut system = System {
            cluster,
            proxy,
            role,
            settings: settings.clone(),
            keys: keys()?,
            app: None,
            base: watch::Sender::new(String::new()),
            cluster_start_s,
            restarts: 0,
        };
        system.serve().await?;
        Ok(system)
    }

    /// The address clients follow.
    pub fn base(&self) -> watch::Receiver<String> {
        self.base.subscribe()
    }

    fn url(&self, port: u16) -> String {
        format!("postgres://{}@127.0.0.1:{port}/postgres", self.role.user())
    }

    /// Builds a replica set (primary through the proxy, replicas direct)
    /// and serves a fresh router on a new port.
    async fn serve(&mut self) -> Result<(), DrillError> {
        let replicas = self.connect_replica_set().await?;
        let config = AppConfig {
            keys: self.keys.clone(),
            cookie_secure: false,
            max_wait: self.settings.max_wait,
            debug_header: true,
            time_window: None,
            tokens: self.settings.tokens,
            request_timeout: Some(self.settings.request_timeout),
        };
        let lab = social::LabOptions {
            monotonic_reads: self.settings.monotonic,
            ..social::LabOptions::default()
        };
        let router = social::router_with(replicas.clone(), replicas.clone(), &config, lab);
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
        self.base.send_replace(format!("http://{address}"));
        self.app = Some(Served {
            replicas,
            stop,
            server,
        });
        Ok(())
    }

    /// Connects a replica set, retrying for up to ten seconds (right after
    /// a failover the new primary may still be finishing its promotion).
    async fn connect_replica_set(&self) -> Result<PgReplicaSet, DrillError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let mut builder = PgReplicaSet::builder().primary_url(self.url(self.proxy.port()));
            for replica in self.cluster.replicas() {
                builder = builder.replica_url(replica.name(), self.url(replica.port()));
            }
            let attempt = tokio::time::timeout(Duration::from_secs(5), builder.connect()).await;
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

    /// Stops serving, shuts the replica set's tracker down and drops it.
    /// Every wait is bounded: a frozen primary must not hold the drill.
    pub async fn stop_app(&mut self) {
        let Some(app) = self.app.take() else {
            return;
        };
        let _ = app.stop.send(());
        let abort = app.server.abort_handle();
        // In-flight requests end within the request timeout.
        let grace = self.settings.request_timeout + Duration::from_secs(1);
        if tokio::time::timeout(grace, app.server).await.is_err() {
            tracing::warn!("the app did not stop within {grace:?}; aborting its server");
            abort.abort();
        }
        if tokio::time::timeout(Duration::from_secs(5), app.replicas.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("the replica set's shutdown took longer than 5 s");
        }
        drop(app.replicas);
    }

    /// An app restart: stop, then a fresh replica set and router on a new
    /// port; clients follow the new address and keep their cookies.
    pub async fn restart_app(&mut self) -> Result<(), DrillError> {
        self.stop_app().await;
        self.restarts += 1;
        self.serve().await
    }

    /// Every post on the node at `port`, read as `postgres` directly (not
    /// through the proxy).
    pub async fn posts_on(&self, port: u16) -> Result<HashMap<i64, StoredPost>, DrillError> {
        let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let read = async {
            let mut conn = sqlx::PgConnection::connect(&url).await?;
            let rows: Vec<(i64, i64, String)> =
                sqlx::query_as("select id, user_id, content from posts")
                    .fetch_all(&mut conn)
                    .await?;
            let _ = conn.close().await;
            Ok::<_, sqlx::Error>(rows)
        };
        match tokio::time::timeout(Duration::from_secs(10), read).await {
            Ok(Ok(rows)) => Ok(rows
                .into_iter()
                .map(|(id, user, content)| (id, StoredPost { user, content }))
                .collect()),
            Ok(Err(error)) => Err(DrillError::Facts(format!(
                "reading the posts on port {port}: {error}"
            ))),
            Err(_) => Err(DrillError::Facts(format!(
                "reading the posts on port {port} took longer than 10 s"
            ))),
        }
    }
}

/// Runs the social migrations as `postgres`, then creates the two LOGIN
/// roles with the app's privileges (trust auth: no passwords).
async fn prepare_database(cluster: &TestCluster) -> Result<(), DrillError> {
    let primary = sqlx::PgPool::connect(cluster.primary_url())
        .await
        .map_err(|error| DrillError::Setup(format!("connecting to the primary: {error}")))?;
    social::migrate(&primary)
        .await
        .map_err(|error| DrillError::Setup(format!("migrating: {error}")))?;
    primary.close().await;
    let monitor = Role::Monitor.user();
    let plain = Role::Plain.user();
    cluster
        .execute_on_primary(&format!(
            "create role {monitor} login; grant pg_monitor to {monitor};
             create role {plain} login;
             grant select, insert, update, delete on all tables in schema public to {monitor}, {plain};
             grant usage, select on all sequences in schema public to {monitor}, {plain};"
        ))
        .await?;
    Ok(())
}

//! Routing over another driver's pools: the [`Driver`] interface and
//! [`ReplicaPools`].
//!
//! Everything that makes a read correct stays in one place, the
//! [`PgReplicaSet`]: the tracker and its probes, the timeline, heartbeat
//! and divergence rules, prediction, the primary budget, bookmarks and
//! monotonic sessions, the canary, the write-position capture and
//! `check()`. All of that runs on the set's own connections (a handful per
//! instance: the tracker's, and the write-position capture's one
//! connection to the primary; the set's sqlx primary pool serves only
//! setup's first queries, and its sqlx replica pools stay empty, since they
//! open connections lazily and nothing reads through them). What a driver
//! adds is where handlers run their queries: one pool per node the set
//! routes to, built by [`Driver::pool`] from a [`Node`]; and, if it
//! wants, how the routing engine opens its own connections (below).
//!
//! The tracker and the capture know their own connections only through a
//! small interface, so the rules are written once whatever the driver: a
//! [`ProbeConnector`] opens a [`ProbeConnection`] to a node
//! ([`ProbeTarget`]), which runs the few probe and capture queries (simple
//! query protocol) and answers in text rows;
//! failures are [`ProbeError`]s. sqlx's is the default connector; a driver
//! may give its own ([`Driver::probe_connector`]), as the crate's
//! tokio-postgres and diesel-async drivers do.
//!
//! A [`Node`] carries the two checks a pool must make for routing to stay
//! true, whatever the driver:
//! - **Admission** ([`Node::admit`]): a new connection reached the server
//!   it was routed to, in the incarnation the tracker follows. Behind a
//!   reader endpoint each connection may land on another server, so the
//!   pool runs [`Node::FINGERPRINT_SQL`] on every new connection and
//!   keeps it only if admitted (and tries another otherwise).
//! - **Outages** ([`Node::predates_outage`]): a connection opened before
//!   the node was last seen down is dropped when next checked out, rather
//!   than a test query on every checkout.
//!
//! The crate's own drivers: the module `tokio_postgres` (feature
//! `tokio-postgres`, deadpool-postgres pools) and the module `diesel_async`
//! (feature `diesel-async`, its deadpool pools). A driver for another pool library is a type
//! implementing [`Driver`]:
//!
//! ```
//! use read_after_write::pg::driver::{Driver, DriverError, Node};
//!
//! /// A "pool" that remembers where it points, standing in for a real one.
//! struct Urls;
//!
//! impl Driver for Urls {
//!     type Pool = String;
//!     fn pool(&self, node: &Node) -> Result<String, DriverError> {
//!         // A real driver builds a lazy pool on `node.url()` whose new
//!         // connections run `Node::FINGERPRINT_SQL` and pass the row to
//!         // `node.admit(..)`, and whose checkouts drop connections for
//!         // which `node.predates_outage(age)` holds.
//!         Ok(format!("{} -> {}", node.name(), node.url()))
//!     }
//! }
//! # let _ = Urls;
//! ```

use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock, PoisonError};
use std::time::Duration;

use sqlx::PgPool;

use super::builder::{PgReplicaSetBuilder, Source};
use super::canary::{first_answer, CANARY_SQL};
use super::endpoint::{Admission, PoolSettings};
pub use super::error::DriverError;
use super::error::PgSetupError;
pub use super::node_urls::NodeUrls;
use super::node_urls::{read_url, url_cell, UrlCell};
use super::outages::Outages;
use super::probe;
pub use super::probe_conn::{
    ProbeConnection, ProbeConnector, ProbeError, ProbeFuture, ProbeTarget, Rows,
};
#[cfg(any(feature = "tokio-postgres", feature = "diesel-async"))]
pub(crate) use super::probe_tokio_postgres::TokioPgConnector;
use super::server::ReplicaState;
use super::tracker::MAX_SERVERS;
use super::{PgReplicaSet, ReplicaStatus};
use crate::backend::{Backend, Finding, LayerSettings, Routed, Target};
use crate::bookmark::Bookmark;
use crate::position::WritePosition;

/// A connection pool library the [`PgReplicaSet`] routes over: builds the
/// pool for one node. See the [module docs](self).
pub trait Driver: Send + Sync + 'static {
    /// What handlers run queries on, e.g. `deadpool_postgres::Pool`.
    type Pool: Send + Sync + 'static;

    /// A pool for `node`, opening its connections to [`Node::url`] lazily
    /// (this may run while a request is being routed: it must not block or
    /// connect), keeping only connections [`Node::admit`] accepts, and
    /// dropping those that [`Node::predates_outage`]. An error (a URL the
    /// driver cannot read) fails [`ReplicaPools::connect`]; for a server
    /// found later behind a URL, that server serves no reads.
    fn pool(&self, node: &Node) -> Result<Self::Pool, DriverError>;

    /// For the [canary](super#the-canary): runs `sql` (no parameters, one
    /// row of five nullable text columns) on a connection of `pool` that is
    /// idle now, and returns the row; `None` when no connection is idle (a
    /// check must never open a connection nor take one a read is waiting
    /// for) or the query failed. The caller bounds it in time and, on
    /// `None`, tries again for a few milliseconds (the read it checks may
    /// hold the pool's only connection). The default checks
    /// nothing: a driver that does not implement it leaves its reads
    /// unconfirmed.
    fn canary(
        &self,
        pool: &Self::Pool,
        sql: &'static str,
    ) -> impl Future<Output = Option<[Option<String>; 5]>> + Send {
        let _ = (pool, sql);
        std::future::ready(None)
    }

    /// Opens the routing engine's own connections (the tracker's polls,
    /// discovery, setup) through this driver, connecting through the nodes'
    /// `urls`. `None`, the default: sqlx opens them. Not used when the
    /// builder maps the tracker's connect options
    /// ([`tracker_connect_options`](PgReplicaSetBuilder::tracker_connect_options)),
    /// a mapping of sqlx options that only sqlx can apply.
    fn probe_connector(&self, urls: NodeUrls) -> Option<Arc<dyn ProbeConnector>> {
        let _ = urls;
        None
    }
}

/// One node a [`Driver`] builds a pool for: the primary, or one replica
/// server (one of possibly several behind a replica URL).
#[derive(Clone)]
pub struct Node {
    name: String,
    url: UrlCell,
    /// `None` for the primary: whatever answers at its URL takes writes.
    admission: Option<Arc<Admission>>,
    outages: Arc<Outages>,
    settings: PoolSettings,
}

/// Why [`Node::admit`] refused a connection: it reached another server, or
/// its fingerprint was unreadable.
#[derive(Clone, Debug)]
pub struct Refused(String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

impl Refused {
    #[cfg(any(feature = "tokio-postgres", feature = "diesel-async"))]
    pub(crate) fn new(why: String) -> Self {
        Refused(why)
    }
}

impl Node {
    /// The query a pool runs on each new connection (simple protocol: no
    /// parameters, one row of four text columns), to hand the row to
    /// [`admit`](Self::admit). Readable by any role.
    ///
    /// ```
    /// use read_after_write::pg::driver::Node;
    /// assert!(Node::FINGERPRINT_SQL.starts_with("select "));
    /// ```
    pub const FINGERPRINT_SQL: &'static str = probe::FINGERPRINT_SQL;

    /// The node's name as routes report it: `primary`, `replica-1`, or
    /// `readers#2` for the second server found behind the URL `readers`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL connections are opened through now (for a server behind a
    /// reader endpoint, the endpoint's): read it for each new connection,
    /// since [`ReplicaPools::update_urls`] may change it (rotated
    /// credentials).
    pub fn url(&self) -> Arc<str> {
        read_url(&self.url)
    }

    /// Whether this is the primary (which admits every connection).
    pub fn is_primary(&self) -> bool {
        self.admission.is_none()
    }

    /// The most connections the pool should hold
    /// ([`max_connections`](PgReplicaSetBuilder::max_connections)).
    pub fn max_connections(&self) -> u32 {
        self.settings.max_connections
    }

    /// How long a checkout (and a connection attempt) may wait
    /// ([`acquire_timeout`](PgReplicaSetBuilder::acquire_timeout)).
    pub fn acquire_timeout(&self) -> Duration {
        self.settings.acquire_timeout
    }

    /// Whether a new connection may serve this node, from the text columns
    /// of [`FINGERPRINT_SQL`](Self::FINGERPRINT_SQL)'s row: it must have
    /// reached the very server (and incarnation) the tracker follows under
    /// this name. Always `Ok` for the primary. A refused connection must be
    /// closed, never used.
    pub fn admit(&self, row: [Option<&str>; 4]) -> Result<(), Refused> {
        let Some(admission) = &self.admission else {
            return Ok(());
        };
        let found = probe::fingerprint_from_text(row).map_err(Refused)?;
        admission.check(found).map_err(Refused)
    }

    /// Whether a connection opened `age` ago predates the node's last
    /// outage: the pool should drop it instead of handing it out.
    pub fn predates_outage(&self, age: Duration) -> bool {
        self.outages.predates_last_outage(age)
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("primary", &self.is_primary())
            .finish_non_exhaustive()
    }
}

/// A [`PgReplicaSet`] routing over a [`Driver`]'s pools: a [`Backend`]
/// whose `Pool` is the driver's, with the same rules, tracker and settings
/// (configure it with the same [`PgReplicaSetBuilder`]). Cheap to clone.
///
/// The driver's pools are built the first time a read is routed to their
/// node (the primary's at once), from the URLs given to the builder.
pub struct ReplicaPools<D: Driver> {
    inner: Arc<PoolsInner<D>>,
}

struct PoolsInner<D: Driver> {
    set: PgReplicaSet,
    driver: D,
    /// The primary's URL.
    primary_url: UrlCell,
    /// Each configured replica URL, in configuration order (the set's
    /// endpoint indices).
    urls: Vec<UrlCell>,
    primary: D::Pool,
    /// The pool of the set's `i`th replica server, once routed to.
    servers: Box<[OnceLock<D::Pool>]>,
}

impl<D: Driver> Clone for ReplicaPools<D> {
    fn clone(&self) -> Self {
        ReplicaPools {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<D: Driver> ReplicaPools<D> {
    /// Connects the set as [`PgReplicaSetBuilder::connect`] does, and builds
    /// `driver`'s pool for the primary. Every node must be given by URL
    /// (`primary_url`, `replica_url`, `replica_urls`, `from_env`): the
    /// driver's pools are built from them.
    pub async fn connect(
        mut builder: PgReplicaSetBuilder,
        driver: D,
    ) -> Result<Self, PgSetupError> {
        let primary_url = match &builder.primary {
            None => return Err(PgSetupError::NoPrimary),
            Some(Source::Url(url)) => url_cell(url),
            Some(Source::Pool(_)) => return Err(given_pool("primary")),
        };
        let urls = builder
            .replicas
            .iter()
            .map(|(name, source)| match source {
                Source::Url(url) => Ok(url_cell(url)),
                Source::Pool(_) => Err(given_pool(name)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let settings = builder.pool_settings();
        if !builder.tracker_options_set {
            let names = builder.replicas.iter().map(|(name, _)| name.clone());
            builder.probe_connector = driver.probe_connector(NodeUrls::new(
                Arc::clone(&primary_url),
                names.zip(urls.iter().map(Arc::clone)).collect(),
            ));
        }
        let set = builder.connect().await?;
        let primary = driver
            .pool(&Node {
                name: "primary".to_owned(),
                url: Arc::clone(&primary_url),
                admission: None,
                outages: Arc::clone(&set.inner.tracker.primary.outages),
                settings,
            })
            .map_err(|source| PgSetupError::Driver {
                node: "primary".to_owned(),
                source,
            })?;
        let pools = ReplicaPools {
            inner: Arc::new(PoolsInner {
                set,
                driver,
                primary_url,
                urls,
                primary,
                servers: (0..MAX_SERVERS).map(|_| OnceLock::new()).collect(),
            }),
        };
        // Reads run on the driver's pools: the canary confirms them there.
        let weak = Arc::downgrade(&pools.inner);
        let _ = pools
            .inner
            .set
            .inner
            .canary
            .runner
            .set(Box::new(move |state, check| {
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let servers = &inner.set.inner.tracker.servers;
                let Some(index) = (0..servers.len())
                    .find(|&index| servers.get(index).is_some_and(|s| std::ptr::eq(s, state)))
                else {
                    return;
                };
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                runtime.spawn(async move {
                    let Some(pool) = inner.servers[index].get() else {
                        return;
                    };
                    if let Some(row) = first_answer(|| inner.driver.canary(pool, CANARY_SQL)).await
                    {
                        check.judge(row);
                    }
                });
            }));
        // The servers found at start: a URL the driver cannot read fails
        // here, not on the first read routed there.
        let servers = &pools.inner.set.inner.tracker.servers;
        for (index, state) in servers.iter().enumerate() {
            pools
                .server(index, state)
                .map_err(|source| PgSetupError::Driver {
                    node: state.name.clone(),
                    source,
                })?;
        }
        Ok(pools)
    }

    /// The routing engine: its tracker's view
    /// ([`replicas`](PgReplicaSet::replicas)), counters and
    /// [`shutdown`](PgReplicaSet::shutdown).
    pub fn set(&self) -> &PgReplicaSet {
        &self.inner.set
    }

    /// The driver's pool on the primary.
    pub fn primary_pool(&self) -> &D::Pool {
        &self.inner.primary
    }

    /// A replica server's pool by name, bypassing every check: for tools
    /// and tests that must read one node on purpose. `None` for a name the
    /// tracker does not follow.
    pub fn replica_pool(&self, name: &str) -> Option<&D::Pool> {
        let servers = &self.inner.set.inner.tracker.servers;
        let index = servers.iter().position(|s| s.name == name)?;
        self.server(index, servers.get(index)?).ok()
    }

    /// Replaces the URL of every node (by name: `primary`, or a replica
    /// URL's name) for every connection opened from now on, by the
    /// driver's pools and by the routing engine alike: for credentials that
    /// rotate (RDS and Cloud SQL IAM tokens, Vault leases). `update` gets
    /// each node's name and current URL and returns its new URL. Open
    /// connections keep theirs. Fails, changing nothing, if a new URL
    /// cannot be read.
    ///
    /// ```no_run
    /// # fn rotate(pools: read_after_write::tokio_postgres::TokioPgReplicaSet, token: &str)
    /// # -> Result<(), read_after_write::pg::PgSetupError> {
    /// pools.update_urls(|_node, url| url.replacen("old-token", token, 1))?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn update_urls(&self, update: impl Fn(&str, &str) -> String) -> Result<(), PgSetupError> {
        let inner = &*self.inner;
        let endpoints = &inner.set.inner.tracker.endpoints;
        let primary = update("primary", &read_url(&inner.primary_url));
        let primary_options = PgReplicaSetBuilder::options("primary", &primary)?;
        let mut replicas = Vec::with_capacity(inner.urls.len());
        for (cell, endpoint) in inner.urls.iter().zip(endpoints.iter()) {
            let url = update(&endpoint.name, &read_url(cell));
            let options = PgReplicaSetBuilder::options(&endpoint.name, &url)?;
            replicas.push((endpoint.name.as_str(), url, options));
        }
        inner.set.update_connect_options(|node, old| {
            if node == "primary" {
                return primary_options.clone();
            }
            replicas
                .iter()
                .find(|(name, _, _)| *name == node)
                .map_or(old, |(_, _, options)| options.clone())
        });
        *inner
            .primary_url
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::from(primary);
        for ((_, url, _), cell) in replicas.into_iter().zip(&inner.urls) {
            *cell.write().unwrap_or_else(PoisonError::into_inner) = Arc::from(url);
        }
        Ok(())
    }

    /// What the tracker knows about each replica server.
    pub fn replicas(&self) -> Vec<ReplicaStatus> {
        self.inner.set.replicas()
    }

    /// The driver's pool of the set's `index`th server, built on first use.
    fn server(&self, index: usize, state: &ReplicaState) -> Result<&D::Pool, DriverError> {
        let inner = &*self.inner;
        let slot = &inner.servers[index];
        if let Some(pool) = slot.get() {
            return Ok(pool);
        }
        let pool = inner.driver.pool(&Node {
            name: state.name.clone(),
            url: Arc::clone(&inner.urls[state.endpoint]),
            admission: Some(Arc::clone(&state.admission)),
            outages: Arc::clone(&state.outages),
            settings: inner.set.inner.tracker.endpoints[state.endpoint].settings,
        })?;
        // Two reads racing here both build one; the first is kept.
        Ok(slot.get_or_init(|| pool))
    }

    /// The same route, on the driver's pool of the node the set chose.
    fn map<'a>(&'a self, routed: Routed<'a, PgPool>) -> Routed<'a, D::Pool> {
        let pool = match routed.target {
            Target::Primary => &self.inner.primary,
            Target::Replica => {
                let servers = &self.inner.set.inner.tracker.servers;
                let found = (0..servers.len()).find_map(|index| {
                    let state = servers.get(index)?;
                    std::ptr::eq(&state.pool, routed.pool).then(|| self.server(index, state))
                });
                match found {
                    Some(Ok(pool)) => pool,
                    Some(Err(error)) => {
                        tracing::error!(
                            replica = routed.node,
                            %error,
                            "the driver could not build this server's pool; reading from the primary"
                        );
                        return Routed::primary(&self.inner.primary, routed.reason);
                    }
                    // Every replica route is to a server of the set; were
                    // one not, the primary is always safe.
                    None => return Routed::primary(&self.inner.primary, routed.reason),
                }
            }
        };
        Routed {
            pool,
            target: routed.target,
            node: routed.node,
            reason: routed.reason,
            bookmark: routed.bookmark,
        }
    }
}

fn given_pool(node: &str) -> PgSetupError {
    PgSetupError::PoolGiven {
        node: node.to_owned(),
    }
}

impl<D: Driver> fmt::Debug for ReplicaPools<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicaPools")
            .field("set", &self.inner.set)
            .finish_non_exhaustive()
    }
}

impl<D: Driver> Backend for ReplicaPools<D> {
    type Pool = D::Pool;
    type Error = <PgReplicaSet as Backend>::Error;

    fn primary(&self) -> &D::Pool {
        &self.inner.primary
    }

    fn cluster_id(&self) -> Option<u64> {
        self.inner.set.cluster_id()
    }

    fn eventual(&self) -> Routed<'_, D::Pool> {
        self.map(self.inner.set.eventual())
    }

    fn eventual_within(&self, max_staleness: Duration) -> Routed<'_, D::Pool> {
        self.map(self.inner.set.eventual_within(max_staleness))
    }

    async fn session(&self, required: WritePosition, max_wait: Duration) -> Routed<'_, D::Pool> {
        self.map(self.inner.set.session(required, max_wait).await)
    }

    async fn monotonic(
        &self,
        bookmark: Option<Bookmark>,
        max_wait: Option<Duration>,
        max_staleness: Option<Duration>,
    ) -> Routed<'_, D::Pool> {
        self.map(
            self.inner
                .set
                .monotonic(bookmark, max_wait, max_staleness)
                .await,
        )
    }

    async fn write_position(&self) -> Result<WritePosition, Self::Error> {
        self.inner.set.write_position().await
    }

    async fn diagnose(&self, settings: &LayerSettings) -> Vec<Finding> {
        self.inner.set.diagnose(settings).await
    }
}

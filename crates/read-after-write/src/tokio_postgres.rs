//! tokio-postgres over deadpool-postgres pools (feature `tokio-postgres`).
//!
//! [`TokioPgReplicaSet`] is the [`PgReplicaSet`](crate::pg::PgReplicaSet)'s
//! routing over one `deadpool_postgres::Pool` per node: the same rules,
//! tracker, settings and [failure table](crate::guide::failures), written
//! once (see [`driver`](crate::pg::driver)). Handlers take a [`TokioPgDb`]
//! and get the pool each access is routed to:
//!
//! | sqlx | tokio-postgres |
//! |---|---|
//! | `db.read().await` (`&PgPool`) | `db.read().await.get().await?` (a pooled `Client`) |
//! | `db.eventual()`, `db.primary()`, `db.write()` | the same, then `.get().await?` |
//! | sessions, jobs, services | the same `Db` methods: `requirement()`, `forward_header()`, `bind_user()` |
//!
//! Each pool opens connections lazily through the node's URL, keeps only
//! those that reached the server it was routed to (one fingerprint query
//! per new replica connection; behind a reader endpoint it opens another,
//! up to 16 within the acquire timeout), drops connections opened before
//! the node's last outage when next checked out, recycles without a test
//! query, and bounds every checkout and connection attempt by
//! [`acquire_timeout`](crate::pg::PgReplicaSetBuilder::acquire_timeout).
//!
//! ```no_run
//! use read_after_write::pg::PgReplicaSet;
//! use read_after_write::tokio_postgres::{self as raw, TokioPgDb};
//! use read_after_write::{KeySet, ReadAfterWriteLayer};
//!
//! // A handler: the user's own rows, from a replica that has their writes.
//! async fn my_post_count(db: &TokioPgDb, user: i64) -> Result<i64, Box<dyn std::error::Error>> {
//!     let client = db.read().await.get().await?;
//!     let row = client
//!         .query_one("select count(*) from posts where author = $1", &[&user])
//!         .await?;
//!     Ok(row.get(0))
//! }
//!
//! // A write marks the request, so its response carries a fresh token.
//! async fn create_post(db: &TokioPgDb, user: i64, body: &str) -> Result<(), Box<dyn std::error::Error>> {
//!     let client = db.write().get().await?;
//!     client
//!         .execute("insert into posts (author, body) values ($1, $2)", &[&user, &body])
//!         .await?;
//!     Ok(())
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let replicas = raw::connect(
//!     PgReplicaSet::builder()
//!         .primary_url("postgres://app@db-primary/app")
//!         .replica_url("replica-1", "postgres://app@db-replica-1/app"),
//! )
//! .await?;
//! let layer = ReadAfterWriteLayer::new(replicas, KeySet::from_env("AFFINITY_KEY")?);
//! # let _ = (layer, my_post_count, create_post);
//! # Ok(())
//! # }
//! ```
//!
//! TLS: give a connector ([`Deadpool::with_tls`]) and connect with
//! [`ReplicaPools::connect`]. The routing engine's own connections (the
//! tracker's, and the write-position capture's to the primary) are
//! tokio-postgres connections too, through the same connector; with
//! [`tracker_connect_options`](crate::pg::PgReplicaSetBuilder::tracker_connect_options)
//! set they are sqlx's (TLS by sqlx's feature `tls-rustls`). Setup's
//! first queries on the primary are sqlx's whatever the connector.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use ::deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime,
};
use ::tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use ::tokio_postgres::{Client, Config, NoTls, SimpleQueryMessage, Socket};

use crate::admitted::{self, Failure};
use crate::handle::Db;
use crate::pg::driver::{
    Driver, DriverError, Node, NodeUrls, ProbeConnector, ReplicaPools, TokioPgConnector,
};
use crate::pg::{PgReplicaSetBuilder, PgSetupError};

/// The deadpool-postgres this backend builds pools with (0.14), and the
/// tokio-postgres under it: use these, or the same majors, so the pools
/// handed out are the types your code names.
///
/// ```
/// use read_after_write::tokio_postgres::deadpool_postgres::Pool;
/// # let _ = std::marker::PhantomData::<Pool>;
/// ```
pub use ::deadpool_postgres;

/// The [`Driver`] building a `deadpool_postgres::Pool` per node, with the
/// TLS connector `T` (default: none).
#[derive(Clone, Debug, Default)]
pub struct Deadpool<T = NoTls> {
    tls: T,
}

impl Deadpool {
    /// Connections without TLS.
    ///
    /// ```
    /// let driver = read_after_write::tokio_postgres::Deadpool::new();
    /// # let _ = driver;
    /// ```
    pub fn new() -> Self {
        Deadpool { tls: NoTls }
    }
}

impl<T> Deadpool<T> {
    /// Connections through `tls` (e.g. `tokio-postgres-rustls`'s
    /// `MakeRustlsConnect`).
    ///
    /// ```
    /// use read_after_write::tokio_postgres::Deadpool;
    /// let driver = Deadpool::with_tls(tokio_postgres::NoTls);
    /// # let _ = driver;
    /// ```
    pub fn with_tls(tls: T) -> Self {
        Deadpool { tls }
    }
}

/// A [`PgReplicaSet`](crate::pg::PgReplicaSet) routing over
/// deadpool-postgres pools.
pub type TokioPgReplicaSet<T = NoTls> = ReplicaPools<Deadpool<T>>;

/// The [`Db`] handle for a [`TokioPgReplicaSet`], as handlers take it.
pub type TokioPgDb<T = NoTls> = Db<TokioPgReplicaSet<T>>;

/// Connects `builder`'s cluster ([`PgReplicaSetBuilder::connect`]) with a
/// deadpool-postgres pool per node, without TLS. Nodes must be given as
/// URLs.
///
/// ```no_run
/// # async fn run() -> Result<(), read_after_write::pg::PgSetupError> {
/// use read_after_write::pg::PgReplicaSetBuilder;
/// let replicas = read_after_write::tokio_postgres::connect(PgReplicaSetBuilder::from_env()?).await?;
/// # let _ = replicas;
/// # Ok(())
/// # }
/// ```
pub async fn connect(builder: PgReplicaSetBuilder) -> Result<TokioPgReplicaSet, PgSetupError> {
    ReplicaPools::connect(builder, Deadpool::new()).await
}

impl<T> Driver for Deadpool<T>
where
    T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
    T::Stream: Send + Sync + Unpin,
    T::TlsConnect: Send + Sync,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    type Pool = Pool;

    fn pool(&self, node: &Node) -> Result<Pool, DriverError> {
        let config = Config::from_str(&node.url())?;
        let connect = Admitting {
            tls: self.tls.clone(),
            node: node.clone(),
        };
        let manager = Manager::from_connect(
            config,
            connect,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let outages = node.clone();
        let bound = Some(node.acquire_timeout());
        let pool = Pool::builder(manager)
            .max_size(usize::try_from(node.max_connections()).unwrap_or(usize::MAX))
            .runtime(Runtime::Tokio1)
            .wait_timeout(bound)
            .create_timeout(bound)
            .recycle_timeout(bound)
            // A refused connection comes back closed (see `Admitting`).
            .post_create(Hook::sync_fn(|client, _| {
                if client.is_closed() {
                    Err(HookError::message(
                        "no connection reached the server this pool reads from",
                    ))
                } else {
                    Ok(())
                }
            }))
            .pre_recycle(Hook::sync_fn(move |_, metrics| {
                if outages.predates_outage(metrics.age()) {
                    Err(HookError::message("opened before the node's last outage"))
                } else {
                    Ok(())
                }
            }))
            .build()?;
        Ok(pool)
    }

    /// The tracker's own connections go through tokio-postgres too, with
    /// this driver's TLS connector.
    fn probe_connector(&self, urls: NodeUrls) -> Option<Arc<dyn ProbeConnector>> {
        Some(Arc::new(TokioPgConnector::new(self.tls.clone(), urls)))
    }

    async fn canary(&self, pool: &Pool, sql: &'static str) -> Option<[Option<String>; 5]> {
        if pool.status().available == 0 {
            return None;
        }
        let client = pool.get().await.ok()?;
        let messages = client.simple_query(sql).await.ok()?;
        let row = messages.iter().find_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })?;
        Some(std::array::from_fn(|index| {
            row.try_get(index).ok().flatten().map(str::to_owned)
        }))
    }
}

/// Opens connections the node admits ([`admitted::connect`]). deadpool's
/// `Connect` can only fail with a `tokio_postgres::Error`, which nothing
/// outside tokio-postgres can make: when every attempt is refused, it
/// returns a closed client, which the pool's `post_create` hook refuses.
struct Admitting<T> {
    tls: T,
    node: Node,
}

impl<T> ::deadpool_postgres::Connect for Admitting<T>
where
    T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
    T::Stream: Send + Sync + Unpin,
    T::TlsConnect: Send + Sync,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    fn connect(
        &self,
        config: &Config,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<(Client, tokio::task::JoinHandle<()>), ::tokio_postgres::Error>,
                > + Send
                + '_,
        >,
    > {
        // The node's URL now (credentials may have rotated), else the
        // manager's (the URL the pool was built with).
        let config = Config::from_str(&self.node.url()).unwrap_or_else(|_| config.clone());
        Box::pin(async move {
            match admitted::connect(&config, self.tls.clone(), &self.node).await {
                Ok((client, connection)) => {
                    let node = self.node.name().to_owned();
                    let task = tokio::spawn(async move {
                        if let Err(error) = connection.await {
                            tracing::debug!(node, %error, "connection ended");
                        }
                    });
                    Ok((client, task))
                }
                Err(Failure::Postgres(error)) => Err(error),
                Err(Failure::Refused(why, closed)) => {
                    tracing::warn!(node = self.node.name(), %why, "no connection reached this server");
                    Ok((closed, tokio::spawn(async {})))
                }
            }
        })
    }
}

impl<T> fmt::Debug for Admitting<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admitting")
            .field("node", &self.node)
            .finish()
    }
}

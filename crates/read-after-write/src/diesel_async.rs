//! diesel-async over its deadpool pools (feature `diesel-async`).
//!
//! [`DieselReplicaSet`] is the [`PgReplicaSet`](crate::pg::PgReplicaSet)'s
//! routing over one `diesel_async` deadpool `Pool<AsyncPgConnection>` per
//! node: the same rules, tracker, settings and
//! [failure table](crate::guide::failures), written once (see
//! [`driver`](crate::pg::driver)). Handlers take a [`DieselDb`] and check a
//! connection out of the pool each access is routed to:
//!
//! | sqlx | diesel-async |
//! |---|---|
//! | `db.read().await` (`&PgPool`) | `db.read().await.get().await?` (a pooled `AsyncPgConnection`) |
//! | `db.eventual()`, `db.primary()`, `db.write()` | the same, then `.get().await?` |
//! | sessions, jobs, services | the same `Db` methods: `requirement()`, `forward_header()`, `bind_user()` |
//!
//! Each pool opens connections lazily through the node's URL (over
//! tokio-postgres, as diesel-async does), keeps only those that reached
//! the server it was routed to (one fingerprint query per new replica
//! connection; behind a reader endpoint it opens another, up to 16 within
//! the acquire timeout), drops connections opened before the node's last
//! outage when next checked out, recycles without a test query, and bounds
//! every checkout by
//! [`acquire_timeout`](crate::pg::PgReplicaSetBuilder::acquire_timeout).
//!
//! ```no_run
//! use diesel::prelude::*;
//! use diesel_async::RunQueryDsl;
//! use read_after_write::diesel_async::{self as routed, DieselDb};
//! use read_after_write::pg::PgReplicaSet;
//! use read_after_write::{KeySet, ReadAfterWriteLayer};
//!
//! diesel::table! {
//!     posts (id) {
//!         id -> Int8,
//!         author -> Int8,
//!         body -> Text,
//!     }
//! }
//!
//! // A handler: the user's own rows, from a replica that has their writes.
//! async fn my_post_count(db: &DieselDb, user: i64) -> Result<i64, Box<dyn std::error::Error>> {
//!     let mut conn = db.read().await.get().await?;
//!     let count = posts::table
//!         .filter(posts::author.eq(user))
//!         .count()
//!         .get_result(&mut conn)
//!         .await?;
//!     Ok(count)
//! }
//!
//! // A write marks the request, so its response carries a fresh token.
//! async fn create_post(db: &DieselDb, user: i64, body: &str) -> Result<(), Box<dyn std::error::Error>> {
//!     let mut conn = db.write().get().await?;
//!     diesel::insert_into(posts::table)
//!         .values((posts::author.eq(user), posts::body.eq(body)))
//!         .execute(&mut conn)
//!         .await?;
//!     Ok(())
//! }
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let replicas = routed::connect(
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

use std::str::FromStr;
use std::sync::Arc;

use ::diesel::ConnectionError;
use ::diesel_async::pooled_connection::deadpool::{Hook, HookError, Pool};
use ::diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, RecyclingMethod,
};
use ::diesel_async::AsyncPgConnection;
use ::tokio_postgres::{Config, NoTls};

use crate::admitted::{self, Failure};
use crate::handle::Db;
use crate::pg::driver::{
    Driver, DriverError, Node, NodeUrls, ProbeConnector, ReplicaPools, TokioPgConnector,
};
use crate::pg::{PgReplicaSetBuilder, PgSetupError};

/// The diesel-async this backend builds pools with (0.10): use it, or the
/// same major, so the pools handed out are the types your code names.
///
/// ```
/// use read_after_write::diesel_async::diesel_async::AsyncPgConnection;
/// # let _ = std::marker::PhantomData::<AsyncPgConnection>;
/// ```
pub use ::diesel_async;

/// The [`Driver`] building a diesel-async deadpool
/// `Pool<AsyncPgConnection>` per node (without TLS).
#[derive(Clone, Copy, Debug, Default)]
pub struct DieselDeadpool;

/// A [`PgReplicaSet`](crate::pg::PgReplicaSet) routing over diesel-async
/// deadpool pools.
pub type DieselReplicaSet = ReplicaPools<DieselDeadpool>;

/// The [`Db`] handle for a [`DieselReplicaSet`], as handlers take it.
pub type DieselDb = Db<DieselReplicaSet>;

/// Connects `builder`'s cluster ([`PgReplicaSetBuilder::connect`]) with a
/// diesel-async deadpool pool per node. Nodes must be given as URLs.
///
/// ```no_run
/// # async fn run() -> Result<(), read_after_write::pg::PgSetupError> {
/// use read_after_write::pg::PgReplicaSetBuilder;
/// let replicas = read_after_write::diesel_async::connect(PgReplicaSetBuilder::from_env()?).await?;
/// # let _ = replicas;
/// # Ok(())
/// # }
/// ```
pub async fn connect(builder: PgReplicaSetBuilder) -> Result<DieselReplicaSet, PgSetupError> {
    ReplicaPools::connect(builder, DieselDeadpool).await
}

impl Driver for DieselDeadpool {
    type Pool = Pool<AsyncPgConnection>;

    fn pool(&self, node: &Node) -> Result<Self::Pool, DriverError> {
        // Checked now, so a URL tokio-postgres cannot read fails at connect.
        Config::from_str(&node.url())?;
        let setup_node = node.clone();
        let mut manager_config = ManagerConfig::<AsyncPgConnection>::default();
        manager_config.recycling_method = RecyclingMethod::Fast;
        manager_config.custom_setup = Box::new(move |_url| {
            let node = setup_node.clone();
            Box::pin(async move { establish(&node).await })
        });
        let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(
            node.url().as_ref(),
            manager_config,
        );
        let outages = node.clone();
        let bound = Some(node.acquire_timeout());
        let pool = Pool::builder(manager)
            .max_size(usize::try_from(node.max_connections()).unwrap_or(usize::MAX))
            .runtime(::deadpool::Runtime::Tokio1)
            .wait_timeout(bound)
            .create_timeout(bound)
            .recycle_timeout(bound)
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

    /// The tracker's own connections go through tokio-postgres too (as
    /// diesel-async's do), without TLS.
    fn probe_connector(&self, urls: NodeUrls) -> Option<Arc<dyn ProbeConnector>> {
        Some(Arc::new(TokioPgConnector::new(NoTls, urls)))
    }

    async fn canary(&self, pool: &Self::Pool, sql: &'static str) -> Option<[Option<String>; 5]> {
        use ::diesel::sql_types::{Nullable, Text};
        use ::diesel_async::RunQueryDsl;

        /// The canary's row, by the column names its query gives.
        #[derive(::diesel::QueryableByName)]
        struct CanaryRow {
            #[diesel(sql_type = Nullable<Text>)]
            replayed: Option<String>,
            #[diesel(sql_type = Nullable<Text>)]
            system_id: Option<String>,
            #[diesel(sql_type = Nullable<Text>)]
            addr: Option<String>,
            #[diesel(sql_type = Nullable<Text>)]
            port: Option<String>,
            #[diesel(sql_type = Nullable<Text>)]
            started: Option<String>,
        }

        if pool.status().available == 0 {
            return None;
        }
        let mut conn = pool.get().await.ok()?;
        let row: CanaryRow = ::diesel::sql_query(sql).get_result(&mut conn).await.ok()?;
        Some([row.replayed, row.system_id, row.addr, row.port, row.started])
    }
}

/// A diesel-async connection the node admits ([`admitted::connect`]), on
/// the node's URL now (credentials may have rotated).
async fn establish(node: &Node) -> Result<AsyncPgConnection, ConnectionError> {
    let config = Config::from_str(&node.url())
        .map_err(|error| ConnectionError::InvalidConnectionUrl(error.to_string()))?;
    match admitted::connect(&config, NoTls, node).await {
        Ok((client, connection)) => {
            AsyncPgConnection::try_from_client_and_connection(client, connection).await
        }
        Err(Failure::Postgres(error)) => Err(ConnectionError::BadConnection(error.to_string())),
        Err(Failure::Refused(why, _closed)) => Err(ConnectionError::BadConnection(why.to_string())),
    }
}

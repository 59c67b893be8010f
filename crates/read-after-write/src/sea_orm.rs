//! SeaORM 2 over the sqlx backend (feature `sea-orm`).
//!
//! SeaORM 2 runs on sqlx 0.9, the sqlx this crate is built on, so it needs
//! no routing of its own: [`SeaDb`] wraps the request's [`Db`] handle and
//! turns the pool each access is routed to into a
//! [`DatabaseConnection`] over that same pool
//! (no new connection, no extra round trip: a reference count and a small
//! value). Every rule of [how routing decides](crate::guide::routing), the
//! [failure table](crate::guide::failures) and the tracker apply unchanged,
//! since they are the [`PgReplicaSet`]'s.
//!
//! | instead of | with SeaORM |
//! |---|---|
//! | `db.read().await` (`&PgPool`) | `db.read().await` ([`DatabaseConnection`]) |
//! | `db.eventual()`, `db.primary()`, `db.write()` | the same names on [`SeaDb`] |
//! | sessions, jobs, services | [`SeaDb::db`]: `requirement()`, `forward_header()`, `bind_user()` |
//!
//! # Wiring
//!
//! Build the [`PgReplicaSet`] as for sqlx: from URLs, or from the pool an
//! existing SeaORM connection already holds
//! (`DatabaseConnection::get_postgres_connection_pool`), and add the layer
//! as usual. Handlers take a [`SeaDb`] (an axum extractor with the `axum`
//! feature) and hand the connection to SeaORM, which takes any
//! `&impl ConnectionTrait`:
//!
//! ```no_run
//! use read_after_write::pg::PgReplicaSet;
//! use read_after_write::sea_orm::SeaDb;
//! use read_after_write::{KeySet, ReadAfterWriteLayer};
//! use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};
//!
//! // A handler: the user's own rows, from a replica that has their writes.
//! async fn my_post_count(db: SeaDb, user: i64) -> Result<i64, DbErr> {
//!     let conn = db.read().await;
//!     let row = conn
//!         .query_one_raw(Statement::from_sql_and_values(
//!             DbBackend::Postgres,
//!             "select count(*) as n from posts where author = $1",
//!             [user.into()],
//!         ))
//!         .await?
//!         .expect("count returns a row");
//!     row.try_get("", "n")
//! }
//!
//! // A write marks the request, so its response carries a fresh token.
//! async fn create_post(db: SeaDb, user: i64, body: String) -> Result<(), DbErr> {
//!     db.write()
//!         .execute_raw(Statement::from_sql_and_values(
//!             DbBackend::Postgres,
//!             "insert into posts (author, body) values ($1, $2)",
//!             [user.into(), body.into()],
//!         ))
//!         .await?;
//!     Ok(())
//! }
//!
//! # async fn run(existing: sea_orm::DatabaseConnection) -> Result<(), Box<dyn std::error::Error>> {
//! // An app that already has a SeaORM connection to the primary.
//! let replicas = PgReplicaSet::builder()
//!     .primary_pool(existing.get_postgres_connection_pool().clone())
//!     .replica_url("replica-1", "postgres://app@db-replica-1/app")
//!     .connect()
//!     .await?;
//! let layer = ReadAfterWriteLayer::new(replicas, KeySet::from_env("AFFINITY_KEY")?);
//! # let _ = (layer, my_post_count, create_post);
//! # Ok(())
//! # }
//! ```
//!
//! Entities work the same way: `Post::find().all(&db.read().await)`,
//! `post.insert(&db.write())`, `db.write().begin().await` for a
//! transaction. The `sea_orm` example (`examples/sea_orm/`) is the social
//! app's whole JSON API on entities and partial models, which the fault
//! drills also serve (`--backend sea-orm`); `tests/pg_sea_orm.rs` proves
//! this handle on a lagging cluster.

use std::fmt;
use std::time::Duration;

use ::sea_orm::DatabaseConnection;
use sqlx::PgPool;

use crate::backend::Backend;
use crate::handle::Db;
use crate::pg::PgReplicaSet;

/// The request's database handle for SeaORM: [`Db`]'s routing, with a
/// [`DatabaseConnection`] for the node each access goes to. Cheap to clone
/// (two reference counts).
///
/// ```
/// use read_after_write::sea_orm::SeaDb;
///
/// // Handlers take it like `Db`: an axum extractor (feature `axum`), or
/// // from the request extensions.
/// async fn feed(db: SeaDb) {
///     let conn = db.eventual(); // any replica: other users' posts
///     # let _ = conn;
/// }
/// ```
pub struct SeaDb<B: Backend<Pool = PgPool> = PgReplicaSet> {
    db: Db<B>,
}

impl<B: Backend<Pool = PgPool>> SeaDb<B> {
    /// Wraps the request's [`Db`] handle.
    ///
    /// ```
    /// use read_after_write::pg::PgDb;
    /// use read_after_write::sea_orm::SeaDb;
    ///
    /// fn from_extensions(req: &http::Request<()>) -> Option<SeaDb> {
    ///     req.extensions().get::<PgDb>().cloned().map(SeaDb::new)
    /// }
    /// # let _ = from_extensions;
    /// ```
    pub fn new(db: Db<B>) -> Self {
        SeaDb { db }
    }

    /// A connection for a session read: a replica that has replayed the
    /// user's last write, else the primary ([`Db::read`]). Async like
    /// `Db::read`: `.await` it.
    ///
    /// ```
    /// use read_after_write::sea_orm::SeaDb;
    ///
    /// async fn profile(db: &SeaDb) {
    ///     let conn = db.read().await; // sees this user's own last write
    ///     // Profile::find_by_id(id).one(&conn).await ...
    ///     # let _ = conn;
    /// }
    /// ```
    #[must_use = "`read()` returns (a future of) the connection to query: `.all(&db.read().await)`"]
    pub async fn read(&self) -> DatabaseConnection {
        connection(self.db.read().await)
    }

    /// [`read`](Self::read) with its own bound on the wait
    /// ([`Db::read_within`]).
    ///
    /// ```
    /// use read_after_write::sea_orm::SeaDb;
    /// use std::time::Duration;
    ///
    /// async fn checkout(db: &SeaDb) {
    ///     let conn = db.read_within(Duration::from_millis(200)).await;
    ///     # let _ = conn;
    /// }
    /// ```
    #[must_use = "`read_within()` returns (a future of) the connection to query"]
    pub async fn read_within(&self, max_wait: Duration) -> DatabaseConnection {
        connection(self.db.read_within(max_wait).await)
    }

    /// A connection for an eventually consistent read: any healthy replica
    /// ([`Db::eventual`]).
    ///
    /// ```
    /// use read_after_write::sea_orm::SeaDb;
    ///
    /// fn feed(db: &SeaDb) {
    ///     let conn = db.eventual(); // Post::find().all(&conn) for everyone's posts
    ///     # let _ = conn;
    /// }
    /// ```
    pub fn eventual(&self) -> DatabaseConnection {
        connection(self.db.eventual())
    }

    /// [`eventual`](Self::eventual) from a replica at most `max_staleness`
    /// behind ([`Db::eventual_within`]).
    ///
    /// ```
    /// use read_after_write::sea_orm::SeaDb;
    /// use std::time::Duration;
    ///
    /// fn feed(db: &SeaDb) {
    ///     let conn = db.eventual_within(Duration::from_secs(2));
    ///     # let _ = conn;
    /// }
    /// ```
    pub fn eventual_within(&self, max_staleness: Duration) -> DatabaseConnection {
        connection(self.db.eventual_within(max_staleness))
    }

    /// A connection to the primary for a critical read; it does not count
    /// as a write ([`Db::primary`]).
    ///
    /// ```
    /// use read_after_write::sea_orm::SeaDb;
    ///
    /// fn balance(db: &SeaDb) {
    ///     let conn = db.primary(); // Account::find_by_id(id).one(&conn)
    ///     # let _ = conn;
    /// }
    /// ```
    pub fn primary(&self) -> DatabaseConnection {
        connection(self.db.primary())
    }

    /// A connection to the primary for writing; marks the request as
    /// writing, so its response carries a fresh token ([`Db::write`]).
    /// Transactions start from it: `db.write().begin().await`.
    ///
    /// ```
    /// use read_after_write::sea_orm::SeaDb;
    ///
    /// fn create(db: &SeaDb) {
    ///     let conn = db.write(); // post.insert(&conn).await
    ///     # let _ = conn;
    /// }
    /// ```
    pub fn write(&self) -> DatabaseConnection {
        connection(self.db.write())
    }

    /// The [`Db`] handle underneath, for everything that is not a
    /// connection: [`bind_user`](Db::bind_user) after a sign-up or login,
    /// [`requirement`](Db::requirement) for a job,
    /// [`forward_header`](Db::forward_header) for a call to another service,
    /// [`cluster`](Db::cluster), [`last_route`](Db::last_route).
    ///
    /// ```
    /// use read_after_write::sea_orm::SeaDb;
    /// use read_after_write::UserId;
    ///
    /// fn signed_up(db: &SeaDb, new_user: i64) {
    ///     db.db().bind_user(UserId::from(new_user));
    /// }
    /// ```
    pub fn db(&self) -> &Db<B> {
        &self.db
    }

    /// Unwraps the [`Db`] handle.
    ///
    /// ```
    /// use read_after_write::pg::PgDb;
    /// use read_after_write::sea_orm::SeaDb;
    ///
    /// fn back(db: SeaDb) -> PgDb {
    ///     db.into_db()
    /// }
    /// # let _ = back;
    /// ```
    pub fn into_db(self) -> Db<B> {
        self.db
    }
}

/// A SeaORM connection over `pool`: the pool's handle cloned, no new
/// connection.
fn connection(pool: &PgPool) -> DatabaseConnection {
    DatabaseConnection::from(pool.clone())
}

impl<B: Backend<Pool = PgPool>> From<Db<B>> for SeaDb<B> {
    fn from(db: Db<B>) -> Self {
        SeaDb::new(db)
    }
}

impl<B: Backend<Pool = PgPool>> Clone for SeaDb<B> {
    fn clone(&self) -> Self {
        SeaDb {
            db: self.db.clone(),
        }
    }
}

impl<B: Backend<Pool = PgPool>> fmt::Debug for SeaDb<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeaDb").field("db", &self.db).finish()
    }
}

#[cfg(feature = "axum")]
mod extract {
    use axum::extract::FromRequestParts;
    use http::request::Parts;
    use sqlx::PgPool;

    use super::SeaDb;
    use crate::backend::Backend;
    use crate::extract::MissingReadAfterWriteLayer;
    use crate::handle::Db;

    /// Like [`Db`]'s extractor: a 500 naming the fix on a route the layer
    /// does not wrap.
    impl<S, B> FromRequestParts<S> for SeaDb<B>
    where
        B: Backend<Pool = PgPool>,
        S: Send + Sync,
    {
        type Rejection = MissingReadAfterWriteLayer;

        async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
            Db::<B>::from_request_parts(parts, state)
                .await
                .map(SeaDb::new)
        }
    }
}

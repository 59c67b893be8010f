//! The SeaORM app: an entity, two handlers and the router. `main.rs` serves
//! it; `tests/sea_orm.rs` drives it on a lagging cluster.

use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use read_after_write::pg::PgReplicaSet;
use read_after_write::sea_orm::SeaDb;
use read_after_write::{KeySet, ReadAfterWriteLayer, UserId};
use sea_orm::entity::prelude::*;
use sea_orm::{ActiveValue, ConnectionTrait, DatabaseConnection, QueryOrder, QuerySelect};

/// The `posts` table, as a SeaORM entity.
pub mod post {
    use sea_orm::entity::prelude::*;

    /// One post.
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, serde::Serialize)]
    #[sea_orm(table_name = "posts")]
    pub struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub user_id: i64,
        pub content: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `POST /posts`: an insert on the primary through `db.write()`; the
/// response carries a fresh token.
async fn create_post(
    db: SeaDb,
    user: CurrentUser,
    content: String,
) -> Result<Json<post::Model>, StatusCode> {
    let created = post::ActiveModel {
        user_id: ActiveValue::Set(user.id),
        content: ActiveValue::Set(content),
        ..Default::default()
    }
    .insert(&db.write()) // write(): the primary, and marks the request as writing
    .await
    .map_err(unavailable)?;
    Ok(Json(created))
}

/// `GET /posts`: the user's own posts, from a replica that has their last
/// write.
async fn my_posts(db: SeaDb, user: CurrentUser) -> Result<Json<Vec<post::Model>>, StatusCode> {
    let posts = post::Entity::find()
        .filter(post::Column::UserId.eq(user.id))
        .order_by_asc(post::Column::Id)
        .all(&db.read().await) // read() may wait for a replica: .await it
        .await
        .map_err(unavailable)?;
    Ok(Json(posts))
}

/// `GET /feed`: everyone's latest posts, eventually consistent.
async fn feed(db: SeaDb) -> Result<Json<Vec<post::Model>>, StatusCode> {
    let posts = post::Entity::find()
        .order_by_desc(post::Column::Id)
        .limit(20)
        .all(&db.eventual())
        .await
        .map_err(unavailable)?;
    Ok(Json(posts))
}

/// The layer: tokens bound to the user authentication found.
pub fn layer(replicas: PgReplicaSet, keys: KeySet) -> ReadAfterWriteLayer<PgReplicaSet> {
    ReadAfterWriteLayer::new(replicas, keys)
        .identity(|parts| Some(UserId::from(parts.extensions.get::<CurrentUser>()?.id)))
        // The cookie is `Secure` (HTTPS only) by default; this demo serves HTTP.
        .secure(false)
}

/// The app: SeaORM handlers behind the layer, authentication outside it.
pub fn router(layer: ReadAfterWriteLayer<PgReplicaSet>) -> Router {
    Router::new()
        .route("/posts", get(my_posts).post(create_post))
        .route("/feed", get(feed))
        .layer(layer) // inner: sees the user authentication inserted
        .layer(middleware::from_fn(authenticate)) // outer: runs first
}

/// Creates the table on the primary, through SeaORM.
pub async fn create_table(primary: &DatabaseConnection) -> Result<(), DbErr> {
    primary
        .execute_unprepared(
            "create table if not exists posts \
             (id bigserial primary key, user_id bigint not null, content text not null)",
        )
        .await?;
    Ok(())
}

/// Who is asking, as your authentication layer puts it into the request's
/// extensions.
#[derive(Clone, Copy, Debug)]
pub struct CurrentUser {
    pub id: i64,
}

/// Stand-in authentication: trusts an `x-user-id` header. Use your own.
async fn authenticate(mut request: Request, next: Next) -> Result<Response, StatusCode> {
    let id = request
        .headers()
        .get("x-user-id")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
        .ok_or(StatusCode::UNAUTHORIZED)?;
    request.extensions_mut().insert(CurrentUser { id });
    Ok(next.run(request).await)
}

impl<S: Send + Sync> FromRequestParts<S> for CurrentUser {
    type Rejection = StatusCode;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, StatusCode> {
        parts
            .extensions
            .get::<CurrentUser>()
            .copied()
            .ok_or(StatusCode::UNAUTHORIZED)
    }
}

fn unavailable(error: DbErr) -> StatusCode {
    eprintln!("database error: {error}");
    StatusCode::SERVICE_UNAVAILABLE
}

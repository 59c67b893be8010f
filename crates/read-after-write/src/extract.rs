//! The axum extractor for [`Db`] (feature `axum`).
//!
//! # Layer order
//!
//! The layer reads the requester's identity from the request, so anything
//! that sets it (an authentication layer putting the user into extensions)
//! must run *before* it, which in axum means it is added *after* it:
//!
//! ```ignore
//! let app = Router::new()
//!     .route("/posts", get(my_posts).post(create_post))
//!     .layer(read_after_write_layer) // inner: sees what auth inserted
//!     .layer(auth_layer);            // outer: runs first
//! // The same with ServiceBuilder, which lists layers outermost first:
//! let app = Router::new()
//!     .route("/posts", get(my_posts).post(create_post))
//!     .layer(ServiceBuilder::new().layer(auth_layer).layer(read_after_write_layer));
//! ```
//!
//! `Router::layer` also wraps the fallback; `Router::route_layer` wraps only
//! matched routes, which is enough when only routes touch the database. A
//! handler that extracts [`Db`] on a router without the layer gets a 500
//! response saying so: a wiring mistake, reported loudly and never hidden as
//! a stale read.
//!
//! # Example
//!
//! ```
//! use axum::{routing::get, Router};
//! use read_after_write::pg::PgDb;
//!
//! async fn my_posts(db: PgDb) -> String {
//!     let pool = db.read().await; // a replica that has this user's writes
//!     # let _ = pool;
//!     "...".to_owned()
//! }
//!
//! let app: Router = Router::new().route("/posts", get(my_posts));
//! // .layer(ReadAfterWriteLayer::new(replica_set, keys))
//! ```

use axum::extract::FromRequestParts;
use axum::response::{IntoResponse, Response};
use http::request::Parts;
use http::StatusCode;

use crate::backend::Backend;
use crate::handle::Db;

impl<S, B> FromRequestParts<S> for Db<B>
where
    B: Backend,
    S: Send + Sync,
{
    type Rejection = MissingReadAfterWriteLayer;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Db<B>>()
            .cloned()
            .ok_or(MissingReadAfterWriteLayer {
                backend: std::any::type_name::<B>(),
            })
    }
}

/// Rejection when a handler asks for a [`Db`] on a route that
/// `ReadAfterWriteLayer` does not wrap (or wraps with another backend type).
/// Responds 500 with a message naming the fix.
///
/// ```
/// use axum::response::IntoResponse;
/// use read_after_write::extract::MissingReadAfterWriteLayer;
///
/// # #[cfg(feature = "postgres")] {
/// let response = MissingReadAfterWriteLayer::for_backend::<read_after_write::pg::PgReplicaSet>().into_response();
/// assert_eq!(response.status(), 500);
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingReadAfterWriteLayer {
    backend: &'static str,
}

impl MissingReadAfterWriteLayer {
    /// The rejection for a missing `Db<B>`.
    pub fn for_backend<B: Backend>() -> Self {
        MissingReadAfterWriteLayer {
            backend: std::any::type_name::<B>(),
        }
    }
}

impl std::fmt::Display for MissingReadAfterWriteLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no read_after_write::Db<{}> in the request extensions: wrap this route with \
             ReadAfterWriteLayer over that backend (Router::layer or route_layer)",
            self.backend
        )
    }
}

impl std::error::Error for MissingReadAfterWriteLayer {}

impl IntoResponse for MissingReadAfterWriteLayer {
    fn into_response(self) -> Response {
        tracing::error!("{self}");
        (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::routing::post;
    use axum::Router;
    use http::header::SET_COOKIE;
    use http::Request;
    use tower::ServiceExt;

    use crate::middleware::tests::keys;
    use crate::testing::FakeBackend;
    use crate::{Db, ReadAfterWriteLayer};

    async fn create(db: Db<FakeBackend>) -> &'static str {
        db.write()
    }

    #[tokio::test]
    async fn the_extractor_hands_out_the_layers_db() {
        let app = Router::new()
            .route("/posts", post(create))
            .layer(ReadAfterWriteLayer::new(FakeBackend::new(), keys(1)));
        let response = app
            .oneshot(Request::post("/posts").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.headers().get(SET_COOKIE).is_some(),
            "db.write() marked the request"
        );
    }

    #[tokio::test]
    async fn without_the_layer_the_rejection_says_what_is_missing() {
        let app = Router::new().route("/posts", post(create));
        let response = app
            .oneshot(Request::post("/posts").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), 500);
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(text.contains("ReadAfterWriteLayer"), "{text}");
    }
}

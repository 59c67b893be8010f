//! The `Posts` gRPC service behind the read-after-write layer, its server,
//! and a client that carries the affinity token like a browser carries a
//! cookie.
//!
//! Shared by `examples/tonic/main.rs` and `tests/tonic.rs` (which includes
//! this file with `#[path]`).
//!
//! How the token travels: after a call that wrote (`CreatePost` uses
//! `db.write()`), the layer adds the `x-primary-affinity` response header,
//! which a tonic client sees as response metadata. The client sends it back
//! as request metadata on its next calls; the layer reads it from the HTTP/2
//! request headers, checks it belongs to the caller (`x-user-id`) and routes
//! `db.read()` to a replica that has the write. gRPC clients keep no cookie
//! jar, so the header is the transport here; the layer also sets a
//! `Set-Cookie`, which a gRPC client ignores.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use read_after_write::middleware::{DEBUG_HEADER, DEFAULT_TOKEN_HEADER};
use read_after_write::pg::{PgDb, PgReplicaSet};
use read_after_write::{KeySet, ReadAfterWriteLayer, UserId};
use tokio::net::TcpListener;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};

/// The code generated from `posts.proto` by the lab crate's `build.rs`.
#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
pub mod pb {
    tonic::include_proto!("posts.v1");
}

use pb::posts_client::PostsClient;
use pb::posts_server::{Posts, PostsServer};
use pb::{CreatePostReply, CreatePostRequest, ListMyPostsReply, ListMyPostsRequest, Post};

/// The metadata key that identifies the caller. A real service would take
/// the user from an authentication interceptor or layer instead.
pub const USER_METADATA: &str = "x-user-id";
/// The metadata key the affinity token travels in, both ways.
pub const TOKEN_METADATA: &str = DEFAULT_TOKEN_HEADER;

/// The table this example uses (its own name, so it can share a database
/// with the other examples).
pub const SCHEMA: &str = "create table if not exists grpc_posts (\
     id bigserial primary key, \
     user_id bigint not null, \
     content text not null)";

/// Creates the table on the primary if it is missing, then waits (up to
/// 10 s) until every replica has replayed it, so that no read fails on a
/// replica that has not seen the table yet.
pub async fn create_schema(set: &PgReplicaSet) -> Result<(), sqlx::Error> {
    sqlx::query(SCHEMA).execute(set.primary_pool()).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for replica in set.replicas() {
        let Some(pool) = set.replica_pool(&replica.name) else {
            continue;
        };
        loop {
            let found: Result<(bool,), _> =
                sqlx::query_as("select to_regclass('grpc_posts') is not null")
                    .fetch_one(pool)
                    .await;
            match found {
                Ok((true,)) => break,
                _ if tokio::time::Instant::now() >= deadline => {
                    tracing::warn!(replica = %replica.name, "replica does not have the table yet");
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
    Ok(())
}

/// The caller's user id from the `x-user-id` header (gRPC metadata is HTTP/2
/// headers, so the layer sees it in `parts.headers`).
fn user_from_headers(headers: &http::HeaderMap) -> Option<i64> {
    headers
        .get(USER_METADATA)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The read-after-write layer as this service uses it: tokens bound to the
/// `x-user-id` caller, carried in the `x-primary-affinity` header (the
/// default), and a debug header naming the node each read went to.
pub fn layer(set: PgReplicaSet, keys: KeySet) -> ReadAfterWriteLayer<PgReplicaSet> {
    ReadAfterWriteLayer::new(set, keys)
        .identity(|parts| user_from_headers(&parts.headers).map(UserId::from))
        // Wait up to 50 ms for a replica to catch up before using the
        // primary: enough for the faster replica of the demo cluster.
        .max_wait(Duration::from_millis(50))
        // Tells clients about the topology; for the demo only.
        .debug_header(true)
}

/// The service: `CreatePost` writes through `db.write()`, `ListMyPosts`
/// reads through `db.read()`.
#[derive(Clone, Copy, Debug, Default)]
pub struct PostsService;

/// The request's database handle and caller. tonic copies the HTTP request
/// extensions, where the layer put the handle, into the `tonic::Request`.
fn db_and_user<T>(request: &Request<T>) -> Result<(PgDb, i64), Status> {
    let db = request
        .extensions()
        .get::<PgDb>()
        .cloned()
        .ok_or_else(|| Status::internal("the read-after-write layer is not installed"))?;
    let user = request
        .metadata()
        .get(USER_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Status::unauthenticated("send the x-user-id metadata"))?;
    Ok((db, user))
}

fn database_error(error: sqlx::Error) -> Status {
    tracing::warn!(%error, "database error");
    Status::unavailable("database unavailable")
}

#[tonic::async_trait]
impl Posts for PostsService {
    async fn create_post(
        &self,
        request: Request<CreatePostRequest>,
    ) -> Result<Response<CreatePostReply>, Status> {
        let (db, user) = db_and_user(&request)?;
        let content = request.into_inner().content;
        let (id,): (i64,) = sqlx::query_as(
            "insert into grpc_posts (user_id, content) values ($1, $2) returning id",
        )
        .bind(user)
        .bind(content)
        // `write` marks the call as writing: the layer attaches a
        // fresh token to the response once this handler returns.
        .fetch_one(db.write())
        .await
        .map_err(database_error)?;
        Ok(Response::new(CreatePostReply { id }))
    }

    async fn list_my_posts(
        &self,
        request: Request<ListMyPostsRequest>,
    ) -> Result<Response<ListMyPostsReply>, Status> {
        let (db, user) = db_and_user(&request)?;
        let limit = match request.into_inner().limit {
            0 => 100,
            n => i64::from(n.min(1000)),
        };
        let rows: Vec<(i64, String)> = sqlx::query_as(
            "select id, content from grpc_posts where user_id = $1 order by id desc limit $2",
        )
        .bind(user)
        .bind(limit)
        // A session read: a replica that has this caller's last write (per
        // the token), else the primary after `max_wait`.
        .fetch_all(db.read().await)
        .await
        .map_err(database_error)?;
        let posts = rows
            .into_iter()
            .map(|(id, content)| Post { id, content })
            .collect();
        Ok(Response::new(ListMyPostsReply { posts }))
    }
}

/// Serves the `Posts` service behind the read-after-write layer on
/// `listener` until `shutdown` completes.
///
/// The layer wraps tonic's router: it sees every call as an
/// `http::Request<tonic::body::Body>` before tonic decodes it, and the
/// `http::Response` (headers not yet sent) after the handler returned.
pub async fn serve(
    listener: TcpListener,
    layer: ReadAfterWriteLayer<PgReplicaSet>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    Server::builder()
        .layer(layer)
        .add_service(PostsServer::new(PostsService))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await
}

/// A client for one user that keeps the last affinity token it was given
/// and sends it back, the way a browser keeps a cookie.
#[derive(Clone, Debug)]
pub struct Session {
    client: PostsClient<Channel>,
    user: AsciiMetadataValue,
    /// The last `x-primary-affinity` value received.
    pub token: Option<AsciiMetadataValue>,
}

/// A `ListMyPosts` answer and where the server says it read from.
#[derive(Clone, Debug)]
pub struct Listing {
    /// The caller's posts, newest first.
    pub posts: Vec<Post>,
    /// The `x-read-after-write` debug metadata: node, reason, token outcome.
    pub route: String,
}

impl Listing {
    /// Whether post `id` is in the list.
    pub fn contains(&self, id: i64) -> bool {
        self.posts.iter().any(|post| post.id == id)
    }
}

impl Session {
    /// A session for `user` over `channel`.
    pub fn new(channel: Channel, user: i64) -> Self {
        Session {
            client: PostsClient::new(channel),
            user: AsciiMetadataValue::from(user),
            token: None,
        }
    }

    /// Connects to `http://{addr}` and starts a session for `user`.
    pub async fn connect(
        addr: std::net::SocketAddr,
        user: i64,
    ) -> Result<Self, tonic::transport::Error> {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("a valid URI")
            .connect()
            .await?;
        Ok(Session::new(channel, user))
    }

    fn request<T>(&self, message: T, token: Option<&AsciiMetadataValue>) -> Request<T> {
        let mut request = Request::new(message);
        let metadata = request.metadata_mut();
        metadata.insert(USER_METADATA, self.user.clone());
        if let Some(token) = token {
            metadata.insert(TOKEN_METADATA, token.clone());
        }
        request
    }

    /// Keeps the token of a response, if it carries one.
    fn remember(&mut self, metadata: &MetadataMap) {
        if let Some(token) = metadata.get(TOKEN_METADATA) {
            self.token = Some(token.clone());
        }
    }

    /// `CreatePost`, sending the current token (so the new one covers both
    /// writes) and keeping the one that comes back. Returns the new post's
    /// id.
    pub async fn create_post(&mut self, content: impl Into<String>) -> Result<i64, Status> {
        let message = CreatePostRequest {
            content: content.into(),
        };
        let request = self.request(message, self.token.as_ref());
        let response = self.client.create_post(request).await?;
        self.remember(response.metadata());
        Ok(response.into_inner().id)
    }

    /// `ListMyPosts` with the session's token: read-your-writes.
    pub async fn list_my_posts(&mut self) -> Result<Listing, Status> {
        let token = self.token.clone();
        self.list_my_posts_with(token.as_ref()).await
    }

    /// `ListMyPosts` without any token: an eventual read, like a client that
    /// drops the metadata.
    pub async fn list_my_posts_naive(&mut self) -> Result<Listing, Status> {
        self.list_my_posts_with(None).await
    }

    /// `ListMyPosts` sending `token` as the affinity metadata, whatever it is.
    pub async fn list_my_posts_with(
        &mut self,
        token: Option<&AsciiMetadataValue>,
    ) -> Result<Listing, Status> {
        let request = self.request(ListMyPostsRequest { limit: 20 }, token);
        let response = self.client.list_my_posts(request).await?;
        let route = response
            .metadata()
            .get(DEBUG_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        Ok(Listing {
            posts: response.into_inner().posts,
            route,
        })
    }
}

/// What one write-then-read round trip saw.
#[derive(Clone, Debug)]
pub struct RoundTrip {
    /// The post created.
    pub id: i64,
    /// The read sent with the token returned by `CreatePost`.
    pub with_token: Listing,
    /// The read sent right after it without a token.
    pub without_token: Listing,
}

/// Creates a post, then lists the caller's posts at once with the token
/// from the reply, then again without it.
pub async fn round_trip(session: &mut Session, content: &str) -> Result<RoundTrip, Status> {
    let id = session.create_post(content).await?;
    let with_token = session.list_my_posts().await?;
    let without_token = session.list_my_posts_naive().await?;
    Ok(RoundTrip {
        id,
        with_token,
        without_token,
    })
}

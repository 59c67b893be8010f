//! Read-your-writes on a plain hyper 1.x server over lagging PostgreSQL
//! replicas.
//!
//! `ReadAfterWriteLayer` wraps a `service_fn` with `tower::ServiceBuilder`;
//! `hyper_util::service::TowerToHyperService` turns the result into a hyper
//! service, served per connection with `hyper::server::conn::http1`.
//! `POST /notes` writes through `db.write()`, so its response sets the
//! `primary_affinity` cookie (and the `x-primary-affinity` header). `GET
//! /notes` reads through `db.read()`: with the cookie, from a replica that
//! already has the note, else from the primary; without it, from any replica,
//! which may not have the note yet. The `x-read-after-write` response header
//! says where each read went.
//!
//! ```sh
//! cargo run -p read-after-write-lab --example hyper
//! # (starts a throwaway primary with replicas lagging 50 ms and 200 ms)
//!
//! # Write, keeping the cookie; read it back with the cookie: always there.
//! curl -i -c jar -b jar -H 'x-user-id: 1' --data 'buy milk' http://127.0.0.1:3001/notes
//! curl -i -c jar -b jar -H 'x-user-id: 1' http://127.0.0.1:3001/notes
//!
//! # Write, then read without the cookie straight away: may miss the note.
//! curl -s -H 'x-user-id: 1' --data 'call mum' http://127.0.0.1:3001/notes; \
//!   curl -i -H 'x-user-id: 1' http://127.0.0.1:3001/notes
//! ```
//!
//! Configuration (all optional): `DATABASE_URL` (the primary) and
//! `REPLICA_URLS` (comma-separated) to use your own servers instead of the
//! throwaway cluster; `AFFINITY_KEY` (base64, 32 bytes or more; a random key
//! otherwise); `BIND` (default `127.0.0.1:3001`); `RUST_LOG`. Ctrl-C stops
//! the server and removes the throwaway cluster.

#[path = "support.rs"]
mod support;

use std::convert::Infallible;
use std::error::Error;

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use read_after_write::pg::PgDb;
use read_after_write::{ReadAfterWriteLayer, UserId};
use tokio::net::TcpListener;

const SCHEMA: &str = "create table if not exists notes (\
     id bigserial primary key, \
     user_id bigint not null, \
     body text not null)";

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();

    // Keep the cluster (if any) alive until the end of main: dropping it
    // stops the servers and removes their files.
    let (set, _cluster) = support::replica_set().await?;
    sqlx::query(SCHEMA).execute(set.primary_pool()).await?;

    let layer = ReadAfterWriteLayer::new(set, support::keys()?)
        .identity(|parts| user_id(&parts.headers).map(UserId::from))
        // Plain-HTTP development only: a `Secure` cookie would not come back.
        .secure(false)
        .debug_header(true);
    let service = tower::ServiceBuilder::new()
        .layer(layer)
        .service_fn(handler);
    let service = TowerToHyperService::new(service);

    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:3001".to_owned());
    let listener = TcpListener::bind(&bind).await?;
    let address = listener.local_addr()?;
    println!("listening on http://{address}; Ctrl-C to stop");
    println!("  write, keeping the cookie, then read it back (always there):");
    println!(
        "    curl -i -c jar -b jar -H 'x-user-id: 1' --data 'buy milk' http://{address}/notes"
    );
    println!("    curl -i -c jar -b jar -H 'x-user-id: 1' http://{address}/notes");
    println!("  write, then read without the cookie at once (may miss it):");
    println!("    curl -s -H 'x-user-id: 1' --data 'call mum' http://{address}/notes; curl -i -H 'x-user-id: 1' http://{address}/notes");
    println!("  the x-read-after-write response header says where each read went");
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = tokio::signal::ctrl_c() => break,
        };
        let service = service.clone();
        tokio::spawn(async move {
            let served = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(error) = served {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    println!("stopping");
    Ok(())
}

type Body = Full<Bytes>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        "text/plain; charset=utf-8".parse().unwrap(),
    );
    response
}

fn user_id(headers: &http::HeaderMap) -> Option<i64> {
    headers.get("x-user-id")?.to_str().ok()?.trim().parse().ok()
}

async fn handler(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    Ok(match route(req).await {
        Ok(response) => response,
        Err(error) => {
            tracing::warn!(%error, "request failed");
            text(StatusCode::SERVICE_UNAVAILABLE, "database unavailable\n")
        }
    })
}

async fn route(req: Request<Incoming>) -> Result<Response<Body>, Box<dyn Error + Send + Sync>> {
    // The layer put the handle in the extensions; take it before the body.
    let db = req
        .extensions()
        .get::<PgDb>()
        .cloned()
        .expect("the read-after-write layer is installed");
    let Some(user) = user_id(req.headers()) else {
        return Ok(text(StatusCode::UNAUTHORIZED, "send an x-user-id header\n"));
    };
    if req.uri().path() != "/notes" {
        return Ok(text(StatusCode::NOT_FOUND, "try /notes\n"));
    }
    match *req.method() {
        Method::POST => {
            let body = req.into_body().collect().await?.to_bytes();
            let body = String::from_utf8_lossy(&body).trim().to_owned();
            let (id,): (i64,) =
                sqlx::query_as("insert into notes (user_id, body) values ($1, $2) returning id")
                    .bind(user)
                    .bind(body)
                    // Marks the request as writing: the response gets a token.
                    .fetch_one(db.write())
                    .await?;
            Ok(text(StatusCode::CREATED, format!("{id}\n")))
        }
        Method::GET => {
            let notes: Vec<(i64, String)> =
                sqlx::query_as("select id, body from notes where user_id = $1 order by id")
                    .bind(user)
                    // Sees this user's last write when the cookie came back.
                    .fetch_all(db.read().await)
                    .await?;
            let lines: String = notes
                .iter()
                .map(|(id, body)| format!("{id}\t{body}\n"))
                .collect();
            Ok(text(StatusCode::OK, lines))
        }
        _ => Ok(text(StatusCode::METHOD_NOT_ALLOWED, "GET or POST\n")),
    }
}

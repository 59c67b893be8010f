//! The social app's JSON API over tokio-postgres: handlers take a
//! [`Db`](read_after_write::Db) over a
//! [`TokioPgReplicaSet`](read_after_write::tokio_postgres::TokioPgReplicaSet)
//! and check a `deadpool_postgres` client out of the pool each access is
//! routed to. A user reads their own posts back at once, although reads go
//! to lagging replicas.
//!
//! ```sh
//! DATABASE_URL=postgres://app@localhost:5432/app \
//! REPLICA_URLS=postgres://app@localhost:5433/app,postgres://app@localhost:5434/app \
//! AFFINITY_KEY=$(openssl rand -base64 32) \
//! cargo run --example tokio_postgres
//!
//! curl -si -c jar -b jar -H 'x-user-id: 1' -H 'content-type: application/json' \
//!      -d '{"content":"hello"}' http://127.0.0.1:3000/api/posts
//! curl -s  -c jar -b jar -H 'x-user-id: 1' http://127.0.0.1:3000/api/posts
//! curl -si -c jar -b jar -H 'content-type: application/json' -d '{"name":"Ada"}' \
//!      http://127.0.0.1:3000/api/signup
//! curl -s  -c jar -b jar http://127.0.0.1:3000/api/dashboard
//! ```
//!
//! It runs the social app's migrations on the primary. No cluster at hand?
//! `cargo run --example social` starts a throwaway one and prints its URLs;
//! `tests/tokio_postgres.rs` runs this app on one.

// `router` (no self-check first) is for callers other than this one.
#[allow(dead_code)]
mod app;

use std::time::Duration;

use read_after_write::pg::PgReplicaSetBuilder;
use read_after_write::{CheckContext, KeySet};

#[tokio::main]
async fn main() {
    if let Err(error) = serve().await {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    // DATABASE_URL, REPLICA_URLS: a deadpool-postgres pool per node, the
    // routing engine on its own connections.
    let pools = read_after_write::tokio_postgres::connect(PgReplicaSetBuilder::from_env()?).await?;
    app::migrate(pools.set()).await?;
    let config = app::AppConfig {
        keys: KeySet::from_env("AFFINITY_KEY")?,
        // The cookie is `Secure` (HTTPS only) by default; this demo serves HTTP.
        cookie_secure: false,
        max_wait: None,
        debug_header: true,
        // A query on a frozen server never returns on its own: bound requests.
        request_timeout: Some(Duration::from_secs(5)),
    };
    let layer = app::layer(pools.clone(), &config);
    // Whatever would quietly cost consistency or primary capacity, if anything.
    eprint!(
        "{}",
        layer
            .check(CheckContext::new().served_over_https(false))
            .await
    );
    let router = app::router_with_layer(layer, pools.set().clone(), &config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("serving on http://{}", listener.local_addr()?);
    axum::serve(listener, router)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    pools.set().shutdown().await;
    Ok(())
}

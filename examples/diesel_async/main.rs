//! The minimal example with diesel-async: diesel's DSL run on pooled
//! `AsyncPgConnection`s through
//! [`DieselDb`](read_after_write::diesel_async::DieselDb), whose methods give
//! the deadpool pool of the node each access is routed to. A user reads
//! their own posts back at once, although reads go to lagging replicas.
//!
//! ```sh
//! DATABASE_URL=postgres://app@localhost:5432/app \
//! REPLICA_URLS=postgres://app@localhost:5433/app,postgres://app@localhost:5434/app \
//! AFFINITY_KEY=$(openssl rand -base64 32) \
//! cargo run --example diesel_async
//!
//! curl -si -c jar -b jar -H 'x-user-id: 1' -d 'hello' http://127.0.0.1:3000/posts
//! curl -s  -c jar -b jar -H 'x-user-id: 1' http://127.0.0.1:3000/posts
//! curl -s  -H 'x-user-id: 1' http://127.0.0.1:3000/feed
//! ```
//!
//! No cluster at hand? `cargo run --example social` starts a throwaway one
//! and prints its URLs; `tests/diesel_async.rs` runs this app on one. No
//! libpq needed: diesel-async talks to PostgreSQL over tokio-postgres.

mod app;

use std::time::Duration;

use axum::http::StatusCode;
use read_after_write::pg::PgReplicaSetBuilder;
use read_after_write::{CheckContext, KeySet};
use tower_http::timeout::TimeoutLayer;

#[tokio::main]
async fn main() {
    if let Err(error) = serve().await {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

async fn serve() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // DATABASE_URL, REPLICA_URLS: a diesel-async pool per node, built from them.
    let replicas =
        read_after_write::diesel_async::connect(PgReplicaSetBuilder::from_env()?).await?;
    app::create_table(replicas.primary_pool()).await?;
    let layer = app::layer(replicas, KeySet::from_env("AFFINITY_KEY")?);
    // Whatever would quietly cost consistency or primary capacity, if anything.
    eprint!(
        "{}",
        layer
            .check(CheckContext::new().served_over_https(false))
            .await
    );
    let app = app::router(layer)
        // A query on a frozen server never returns on its own: bound requests.
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            Duration::from_secs(5),
        ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("serving on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}

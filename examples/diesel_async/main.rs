//! The social app's JSON API over diesel-async: handlers take a
//! [`Db`](read_after_write::Db) over a
//! [`DieselReplicaSet`](read_after_write::diesel_async::DieselReplicaSet),
//! check an `AsyncPgConnection` out of the deadpool pool each access is
//! routed to, and query it with diesel's DSL. A user reads their own posts,
//! profile and dashboard back at once, although reads go to lagging
//! replicas.
//!
//! ```sh
//! DATABASE_URL=postgres://app@localhost:5432/app \
//! REPLICA_URLS=postgres://app@localhost:5433/app,postgres://app@localhost:5434/app \
//! AFFINITY_KEY=$(openssl rand -base64 32) \
//! cargo run --example diesel_async
//!
//! # Post, then read your own posts (session-consistent), one post
//! # (from the primary) and the feed (eventual).
//! curl -si -c jar -b jar -H 'x-user-id: 1' -H 'content-type: application/json' \
//!      -d '{"content":"hello"}' http://127.0.0.1:3000/api/posts
//! curl -s  -c jar -b jar -H 'x-user-id: 1' http://127.0.0.1:3000/api/posts
//! curl -s  -H 'x-user-id: 1' http://127.0.0.1:3000/api/posts/1
//! curl -s  http://127.0.0.1:3000/api/feed
//!
//! # Edit your profile and read it back.
//! curl -s  -c jar -b jar -H 'x-user-id: 1' -H 'content-type: application/json' \
//!      -X PUT -d '{"name":"Ada","bio":"hi"}' http://127.0.0.1:3000/api/profile
//! curl -s  -c jar -b jar -H 'x-user-id: 1' http://127.0.0.1:3000/api/profile/1
//!
//! # Sign up (or log in as an id) and see the next page: the cookie jar
//! # carries the new identity (demo_user) and its token.
//! curl -si -c jar2 -b jar2 -H 'content-type: application/json' \
//!      -d '{"name":"Grace"}' http://127.0.0.1:3000/api/signup
//! curl -si -c jar2 -b jar2 -H 'content-type: application/json' \
//!      -d '{"user_id":1000000}' http://127.0.0.1:3000/api/login
//! curl -s  -c jar2 -b jar2 http://127.0.0.1:3000/api/dashboard
//!
//! curl -s  http://127.0.0.1:3000/healthz
//! ```
//!
//! It runs the social app's migrations on the primary, so it can share a
//! database with the social and tokio-postgres examples. No cluster at
//! hand? `cargo run --example social` starts a throwaway one and prints its
//! URLs; `tests/diesel_async.rs` runs this app on one. No libpq needed:
//! diesel-async talks to PostgreSQL over tokio-postgres.

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
    // DATABASE_URL, REPLICA_URLS: a diesel-async pool per node; the tracker
    // polls through tokio-postgres, the write-position capture through a
    // small sqlx pool to the primary.
    let pools = read_after_write::diesel_async::connect(PgReplicaSetBuilder::from_env()?).await?;
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

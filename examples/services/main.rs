//! Two services, one session: A writes and calls B, which reads the user's
//! writes from its own replicas because the token came along.
//!
//! ```sh
//! cargo run --example services
//! ```
//!
//! Starts a throwaway primary with replicas lagging 50 ms and 200 ms (or
//! uses `DATABASE_URL` and `REPLICA_URLS`), serves service B (`GET /posts`,
//! reads with `db.read()`) and service A (`POST /posts`: writes, then asks B
//! for the user's posts, once through a client wrapped in
//! `ForwardTokenLayer`, once through a plain client), posts 30 times through
//! A and prints how often B saw the new post each way.

mod services;
#[path = "../support.rs"]
mod support;

use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .init();
    let (replicas, _cluster) = support::replica_set()
        .await
        .map_err(|error| error.to_string())?;
    let keys = support::keys()?;
    // Separate services have separate pools and trackers; here they share
    // one (cheap-to-clone) replica set.
    let report = services::demo(replicas.clone(), replicas.clone(), keys, 30).await?;
    println!(
        "B listed A's new post {} of {} times with the forwarded token, {} of {} without",
        report.forwarded_saw, report.posts, report.plain_saw, report.posts
    );
    replicas.shutdown().await;
    Ok(())
}

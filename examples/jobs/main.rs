//! Background jobs that read their user's writes from replicas.
//!
//! ```sh
//! cargo run --example jobs
//! ```
//!
//! Starts a throwaway primary with replicas lagging 50 ms and 200 ms (or
//! uses `DATABASE_URL` and `REPLICA_URLS`), serves an app whose `POST /posts`
//! writes a post and enqueues two jobs for it in a PostgreSQL table, and runs
//! two workers that take jobs with `FOR UPDATE SKIP LOCKED`: one reads the
//! post with the requirement the handler put into the job
//! (`Db::requirement`, then `Requirement::route`), the other from any
//! replica. It writes 50 posts and prints how many each worker found.

#[path = "../support.rs"]
mod support;

use std::time::Duration;

use read_after_write_lab::jobs;
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
    let posts = 50;
    println!("writing {posts} posts, each with a job per worker...");
    let report = jobs::demo(replicas.clone(), keys, posts, Duration::from_millis(500)).await?;
    println!(
        "  worker with the requirement: {} of {} posts found",
        report.consistent_found, report.posts
    );
    println!(
        "  naive worker (any replica):  {} of {} posts found",
        report.naive_found, report.posts
    );
    replicas.shutdown().await;
    Ok(())
}

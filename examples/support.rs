//! Setup shared by the examples: the cluster to serve (an existing one from
//! `DATABASE_URL` and `REPLICA_URLS`, or a throwaway one with two lagging
//! replicas) and the signing keys (`AFFINITY_KEY`, or a random key).
//!
//! Each example includes this file with `#[path]`; copy it along with the
//! example you start from.

use std::error::Error;
use std::time::Duration;

use read_after_write::pg::{PgReplicaSet, PgReplicaSetBuilder};
use read_after_write::{KeyError, KeySet, SigningKey};
use read_after_write_testkit::TestCluster;

/// The replica set from `DATABASE_URL` and `REPLICA_URLS`, or from a
/// throwaway cluster (returned too, so the caller keeps it alive) when
/// neither is set.
pub async fn replica_set() -> Result<(PgReplicaSet, Option<TestCluster>), Box<dyn Error>> {
    let configured = std::env::var_os("DATABASE_URL").is_some();
    if !configured && std::env::var_os("REPLICA_URLS").is_some() {
        return Err("REPLICA_URLS is set but DATABASE_URL is not".into());
    }
    if configured {
        return Ok((PgReplicaSetBuilder::from_env()?.connect().await?, None));
    }
    println!("DATABASE_URL is not set: starting a throwaway cluster...");
    let cluster = TestCluster::builder()
        .replica(Duration::from_millis(50))
        .replica(Duration::from_millis(200))
        .start()
        .await?;
    println!("  primary:   {}", cluster.primary_url());
    for replica in cluster.replicas() {
        println!(
            "  {}: {} (lags {} ms)",
            replica.name(),
            replica.url(),
            replica.apply_delay().as_millis()
        );
    }
    let replicas = PgReplicaSet::builder()
        .primary_url(cluster.primary_url())
        .replica_urls(cluster.replica_urls())
        .connect()
        .await?;
    Ok((replicas, Some(cluster)))
}

/// Signing keys from `AFFINITY_KEY`, or a random key with a warning.
pub fn keys() -> Result<KeySet, KeyError> {
    match KeySet::from_env("AFFINITY_KEY") {
        Err(KeyError::MissingEnv { .. }) => {
            tracing::warn!(
                "AFFINITY_KEY is not set: using a random signing key; tokens will not \
                 survive a restart or work across instances"
            );
            Ok(KeySet::from(SigningKey::generate()?))
        }
        keys => keys,
    }
}

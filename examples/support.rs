//! Setup shared by the examples: the cluster to serve (an existing one from
//! `DATABASE_URL` and `REPLICA_URLS`, or a throwaway one with two lagging
//! replicas) and the signing keys (`AFFINITY_KEY`, or a random key).
//!
//! Each example includes this file with `#[path]`; copy it along with the
//! example you start from.

use std::error::Error;
use std::time::Duration;

use read_after_write::pg::PgReplicaSet;
use read_after_write::{KeyError, KeySet, SigningKey};
use read_after_write_testkit::TestCluster;

/// The replica set from `DATABASE_URL` and `REPLICA_URLS`, or from a
/// throwaway cluster (returned too, so the caller keeps it alive) when
/// neither is set.
pub async fn replica_set() -> Result<(PgReplicaSet, Option<TestCluster>), Box<dyn Error>> {
    let primary = std::env::var("DATABASE_URL").ok();
    let replicas = std::env::var("REPLICA_URLS").ok();
    let (cluster, primary, replicas) = match (primary, replicas) {
        (Some(primary), replicas) => {
            let replicas: Vec<String> = replicas
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|url| !url.is_empty())
                .map(str::to_owned)
                .collect();
            if replicas.is_empty() {
                tracing::warn!("REPLICA_URLS is not set: every read goes to the primary");
            }
            (None, primary, replicas)
        }
        (None, Some(_)) => return Err("REPLICA_URLS is set but DATABASE_URL is not".into()),
        (None, None) => {
            println!("DATABASE_URL is not set: starting a throwaway cluster...");
            let cluster = TestCluster::builder()
                .replica(Duration::from_millis(50))
                .replica(Duration::from_millis(200))
                .start()
                .await?;
            let primary = cluster.primary_url();
            let replicas = cluster.replica_urls();
            println!("  primary:   {primary}");
            for (replica, url) in cluster.replicas().iter().zip(&replicas) {
                println!(
                    "  {}: {url} (lags {} ms)",
                    replica.name(),
                    replica.apply_delay().as_millis()
                );
            }
            (Some(cluster), primary, replicas)
        }
    };
    let mut builder = PgReplicaSet::builder().primary_url(primary);
    for (i, url) in replicas.into_iter().enumerate() {
        builder = builder.replica_url(format!("replica-{}", i + 1), url);
    }
    Ok((builder.connect().await?, cluster))
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

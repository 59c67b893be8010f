//! Waiting for a schema change to reach the replicas, before anything
//! reads it there.

use std::time::Duration;

use read_after_write::pg::PgReplicaSet;

/// Waits until every replica of `replicas` has the relation `name` (a
/// table just created on the primary), polling each for at most `bound`.
/// A replica still without it after that is left to the reads that follow.
pub async fn wait_for_relation(
    replicas: &PgReplicaSet,
    name: &str,
    bound: Duration,
) -> Result<(), sqlx::Error> {
    for replica in replicas.replicas() {
        let Some(pool) = replicas.replica_pool(&replica.name) else {
            continue;
        };
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let (ready,): (bool,) = sqlx::query_as("select to_regclass($1) is not null")
                .bind(name)
                .fetch_one(pool)
                .await?;
            if ready || tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

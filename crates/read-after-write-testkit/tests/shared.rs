//! One cluster shared by the tests of this binary through a `static`. Rust
//! never drops it: the kit's watchdog stops its servers and removes its
//! files when the test process exits.

use std::time::Duration;

use read_after_write_testkit::TestCluster;
use tokio::sync::OnceCell;

static CLUSTER: OnceCell<TestCluster> = OnceCell::const_new();

async fn cluster() -> &'static TestCluster {
    CLUSTER
        .get_or_init(|| async {
            let cluster = TestCluster::start_with_delays(&[Duration::from_millis(100)])
                .await
                .expect("start the shared cluster");
            cluster
                .execute_on_primary("create table shared (id int)")
                .await
                .expect("create the table");
            cluster
        })
        .await
}

// Each #[tokio::test] has its own runtime; the cluster outlives the one that
// started it.
#[tokio::test]
async fn first_user() {
    let cluster = cluster().await;
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();
    let mut conn = cluster.connect_replica(0).await.unwrap();
    sqlx::query("select * from shared")
        .execute(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn second_user() {
    let cluster = cluster().await;
    let mut conn = cluster.connect_primary().await.unwrap();
    sqlx::query("select * from shared")
        .execute(&mut conn)
        .await
        .unwrap();
}

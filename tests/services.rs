//! A downstream service reads the caller's writes from lagging replicas when
//! the token is forwarded, and misses them, in the same run, when it is not.

#[path = "../examples/services/services.rs"]
mod services;

use std::time::Duration;

use read_after_write::pg::PgReplicaSet;
use read_after_write::{KeySet, SigningKey};
use read_after_write_testkit::TestCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_b_sees_service_as_write_only_with_the_forwarded_token() {
    let cluster = TestCluster::builder()
        .replica(Duration::from_millis(50))
        .replica(Duration::from_millis(200))
        .start()
        .await
        .expect("start a primary with two lagging replicas");
    let connect = || {
        PgReplicaSet::builder()
            .primary_url(cluster.primary_url())
            .replica_urls(cluster.replica_urls())
            .connect()
    };
    // Two services, two replica sets (pools and trackers) of one cluster.
    let (a, b) = (connect().await.unwrap(), connect().await.unwrap());
    let keys = KeySet::new(SigningKey::from_bytes(&[11; 32]).unwrap());
    let report = services::demo(a.clone(), b.clone(), keys, 30)
        .await
        .unwrap();
    eprintln!("{report:?}");
    assert_eq!(
        report.forwarded_saw, report.posts,
        "B sees every write when the token is forwarded"
    );
    assert!(
        report.plain_saw < report.posts,
        "without the token B must miss some writes on lagging replicas, or this test proves nothing: {report:?}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

//! Jobs that carry their user's requirement read the user's writes from
//! lagging replicas; jobs that do not, in the same run, miss them.

use std::time::Duration;

use read_after_write::pg::PgReplicaSet;
use read_after_write::{KeySet, SigningKey};
use read_after_write_lab::jobs;
use read_after_write_testkit::TestCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_with_the_requirement_see_the_write_and_naive_ones_miss_it() {
    let cluster = TestCluster::builder()
        .replica(Duration::from_millis(50))
        .replica(Duration::from_millis(200))
        .start()
        .await
        .expect("start a primary with two lagging replicas");
    let replicas = PgReplicaSet::builder()
        .primary_url(cluster.primary_url())
        .replica_urls(cluster.replica_urls())
        .connect()
        .await
        .unwrap();
    let keys = KeySet::new(SigningKey::from_bytes(&[9; 32]).unwrap());
    let report = jobs::demo(replicas.clone(), keys, 40, Duration::from_millis(500))
        .await
        .unwrap();
    eprintln!("{report:?}");
    assert_eq!(report.posts, 40);
    assert_eq!(
        report.consistent_found, report.posts,
        "every job with the requirement read its post"
    );
    assert!(
        report.naive_found < report.posts,
        "the naive worker must miss posts on lagging replicas, or this test proves nothing: {report:?}"
    );
    replicas.shutdown().await;
}

//! The tonic example's `Posts` service behind the read-after-write layer, on
//! a real primary with two replicas lagging 50 ms and 200 ms, called by a
//! real tonic client over HTTP/2 on 127.0.0.1.
//!
//! - Reads that send back the `x-primary-affinity` metadata from the last
//!   `CreatePost` see that post, every time.
//! - The lag is real: a read right after the write, straight from the
//!   200 ms replica, misses the post; so do layer reads without the token.
//! - A tampered or foreign token is ignored (an eventual read), never an
//!   error status.

#[path = "../examples/tonic/service.rs"]
mod service;

use std::time::{Duration, Instant};

use read_after_write::pg::PgReplicaSet;
use read_after_write::{KeySet, SigningKey};
use read_after_write_testkit::TestCluster;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::metadata::AsciiMetadataValue;

use service::{round_trip, Session};

const ROUND_TRIPS: usize = 100;

/// Whether post `id` is on `replica`, read straight from its pool.
async fn on_replica(set: &PgReplicaSet, replica: &str, id: i64) -> bool {
    let pool = set.replica_pool(replica).expect("replica exists");
    let (found,): (bool,) = sqlx::query_as("select exists(select 1 from grpc_posts where id = $1)")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("naive read from the replica");
    found
}

/// `token` with one character in the middle changed: still base64url of the
/// right length, but the MAC no longer matches.
fn tampered(token: &AsciiMetadataValue) -> AsciiMetadataValue {
    let mut text = token.to_str().expect("ASCII token").to_owned().into_bytes();
    let middle = text.len() / 2;
    text[middle] = if text[middle] == b'A' { b'B' } else { b'A' };
    AsciiMetadataValue::try_from(text).expect("still a valid metadata value")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_reads_with_the_token_metadata_see_the_callers_writes() {
    let cluster = TestCluster::builder()
        .replica(Duration::from_millis(50))
        .replica(Duration::from_millis(200))
        .start()
        .await
        .expect("start a primary with two lagging replicas");
    let set = PgReplicaSet::builder()
        .primary_url(cluster.primary_url())
        .replica_url(cluster.replica(0).name(), cluster.replica(0).url())
        .replica_url(cluster.replica(1).name(), cluster.replica(1).url())
        .poll_interval(Duration::from_millis(10))
        .connect()
        .await
        .expect("connect the replica set");
    assert_eq!(cluster.replica(1).name(), "replica-2");
    service::create_schema(&set)
        .await
        .expect("create the table");

    let keys = KeySet::from(SigningKey::from_bytes(&[42; 32]).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(service::serve(
        listener,
        service::layer(set.clone(), keys),
        async {
            let _ = stopped.await;
        },
    ));

    let started = Instant::now();
    let checks = async {
        let mut session = Session::connect(addr, 7).await.expect("connect");

        let (mut stale_with_token, mut layer_misses, mut direct_misses) = (0, 0, 0);
        for i in 0..ROUND_TRIPS {
            let trip = round_trip(&mut session, &format!("post {i}"))
                .await
                .expect("CreatePost and ListMyPosts succeed");
            assert!(
                session.token.is_some(),
                "CreatePost returned x-primary-affinity"
            );
            assert!(
                trip.with_token.route.contains("token=valid"),
                "the token verified: {}",
                trip.with_token.route
            );
            if !trip.with_token.contains(trip.id) {
                stale_with_token += 1;
                eprintln!(
                    "post {} missing with the token: {}",
                    trip.id, trip.with_token.route
                );
            }
            if !trip.without_token.contains(trip.id) {
                layer_misses += 1;
            }
            if !on_replica(&set, "replica-2", trip.id).await {
                direct_misses += 1;
            }
        }
        eprintln!(
            "{ROUND_TRIPS} round trips: stale with the token {stale_with_token}, \
             missed without it (layer) {layer_misses}, missed on replica-2 (direct) {direct_misses}"
        );
        assert_eq!(
            stale_with_token, 0,
            "every read with the token saw its post"
        );
        assert!(
            direct_misses > 0,
            "the 200 ms replica must miss a post read right after its write"
        );
        assert!(
            layer_misses > 0,
            "an eventual read right after the write must miss the post at least once"
        );

        // A tampered token: the call succeeds, as an eventual read.
        let token = session.token.clone().expect("a token");
        let listing = session
            .list_my_posts_with(Some(&tampered(&token)))
            .await
            .expect("a tampered token is not an error");
        assert!(
            listing.route.contains("token=bad_signature"),
            "{}",
            listing.route
        );
        // Garbage: same.
        let garbage = AsciiMetadataValue::from_static("not-a-token");
        let listing = session
            .list_my_posts_with(Some(&garbage))
            .await
            .expect("a malformed token is not an error");
        assert!(!listing.route.contains("token=valid"), "{}", listing.route);
        // User 7's token sent by user 8: ignored.
        let mut other = Session::connect(addr, 8).await.expect("connect");
        let listing = other
            .list_my_posts_with(Some(&token))
            .await
            .expect("another user's token is not an error");
        assert!(
            listing.route.contains("token=other_user"),
            "{}",
            listing.route
        );
        assert!(listing.posts.is_empty(), "user 8 has no posts");
        // A write with a tampered token still succeeds and gets a good token.
        session.token = Some(tampered(&token));
        let id = session
            .create_post("after tampering")
            .await
            .expect("a write with a tampered token succeeds");
        let listing = session.list_my_posts().await.expect("read");
        assert!(listing.contains(id), "{}", listing.route);
        assert!(listing.route.contains("token=valid"), "{}", listing.route);
    };
    tokio::time::timeout(Duration::from_secs(30), checks)
        .await
        .expect("the checks finish within 30 s");
    eprintln!("checks took {:?}", started.elapsed());

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server stops")
        .unwrap()
        .expect("the server ran without error");
}

//! Through a pooler: Debian's PgBouncer (1.18) in transaction mode in front
//! of the primary and of each replica, on a real cluster whose replicas lag
//! 50 ms and 200 ms. Every query the library sends uses the simple query
//! protocol, so it passes through; the handlers here do too (PgBouncer 1.18
//! keeps no prepared statement across transactions). The naive read of
//! the slow replica, through its bouncer, is shown stale in the same test.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use http::{Request, Response};
use read_after_write::pg::{PgDb, PgReplicaSet};
use read_after_write::{ReadAfterWriteLayer, UserId};
use read_after_write_testkit::{PgBouncer, PoolMode};
use sqlx::{AssertSqlSafe, Row};
use tower::{service_fn, Layer, ServiceExt};

/// A PgBouncer in transaction mode in front of `port`.
async fn bouncer(port: u16) -> PgBouncer {
    PgBouncer::builder(port)
        .pool_mode(PoolMode::Transaction)
        .users(["postgres"])
        .start()
        .await
        .expect("start PgBouncer (bash .ci/ensure-pgbouncer installs it)")
}

/// `POST /<user>` inserts a post and returns its id; `GET /<user>/<id>`
/// says whether the post is visible to a session read. Literals only: no
/// bound parameter, so no prepared statement.
fn app(
    set: PgReplicaSet,
) -> impl tower::Service<Request<()>, Response = Response<Option<i64>>, Error = Infallible> + Clone
{
    let layer = ReadAfterWriteLayer::new(set, common::keys())
        .identity(|parts| {
            let user = parts.uri.path().trim_start_matches('/').split('/').next()?;
            Some(UserId::from(user.parse::<i64>().ok()?))
        })
        .max_wait(Duration::from_millis(400))
        .secure(false)
        .debug_header(true);
    layer.layer(service_fn(|req: Request<()>| async move {
        let db = req.extensions().get::<PgDb>().cloned().expect("layer installed");
        let mut parts = req.uri().path().trim_start_matches('/').split('/');
        let user: i64 = parts.next().unwrap().parse().unwrap();
        let answer = match parts.next() {
            None => {
                let sql = format!(
                    "insert into posts (user_id, body) values ({user}, 'via pgbouncer') returning id"
                );
                let row = sqlx::raw_sql(AssertSqlSafe(sql)).fetch_one(db.write()).await.unwrap();
                Some(row.get::<i64, _>(0))
            }
            Some(id) => {
                let id: i64 = id.parse().unwrap();
                let sql = format!(
                    "select count(*) from posts where id = {id} and user_id = {user}"
                );
                let row = sqlx::raw_sql(AssertSqlSafe(sql)).fetch_one(db.read().await).await.unwrap();
                Some(row.get::<i64, _>(0))
            }
        };
        Ok::<_, Infallible>(Response::new(answer))
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_writes_are_read_back_through_pgbouncer_in_transaction_mode() {
    let cluster = common::start_cluster().await;
    common::create_schema(&cluster).await;
    let primary = bouncer(cluster.primary_port()).await;
    let mut replicas = Vec::new();
    for replica in cluster.replicas() {
        replicas.push(bouncer(replica.port()).await);
    }
    let mut builder = PgReplicaSet::builder()
        .primary_url(primary.url("postgres", "postgres"))
        .poll_interval(Duration::from_millis(10));
    for (index, bouncer) in replicas.iter().enumerate() {
        builder = builder.replica_url(
            format!("replica-{}", index + 1),
            bouncer.url("postgres", "postgres"),
        );
    }
    let set = builder.connect().await.expect("connect through PgBouncer");
    // The tracker sees the servers behind the bouncers, not the bouncers.
    let servers: Vec<_> = set.replicas().into_iter().map(|r| r.server).collect();
    for (replica, server) in cluster.replicas().iter().zip(&servers) {
        assert_eq!(
            server.as_deref(),
            Some(format!("127.0.0.1:{}", replica.port()).as_str()),
            "{servers:?}"
        );
    }
    let slow = sqlx::PgPool::connect(&replicas[1].url("postgres", "postgres"))
        .await
        .unwrap();

    let service = app(set.clone());
    let (mut stale, mut naive_stale, mut on_replica) = (0, 0, 0);
    let rounds = 20;
    for round in 0..rounds {
        let user = 7_000 + round;
        let write = service
            .clone()
            .oneshot(Request::post(format!("/{user}")).body(()).unwrap())
            .await
            .unwrap();
        let cookie = write.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        let id = write.into_body().unwrap();
        let naive = sqlx::raw_sql(AssertSqlSafe(format!(
            "select count(*) from posts where id = {id}"
        )))
        .fetch_one(&slow)
        .await
        .unwrap()
        .get::<i64, _>(0);
        if naive == 0 {
            naive_stale += 1;
        }
        let read = service
            .clone()
            .oneshot(
                Request::get(format!("/{user}/{id}"))
                    .header("cookie", &cookie)
                    .body(())
                    .unwrap(),
            )
            .await
            .unwrap();
        let route = read.headers()["x-read-after-write"]
            .to_str()
            .unwrap()
            .to_owned();
        if route.starts_with("node=replica") {
            on_replica += 1;
        }
        if read.into_body() != Some(1) {
            stale += 1;
        }
    }
    assert_eq!(stale, 0);
    assert!(naive_stale > 0, "the slow replica never lagged");
    assert!(
        on_replica * 10 >= rounds * 8,
        "{on_replica} of {rounds} reads on a replica"
    );
    set.shutdown().await;
}

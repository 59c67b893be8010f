//! SeaORM 2 through [`SeaDb`] on a real primary with two streaming replicas
//! that lag by 50 ms and 200 ms: the user's own reads see their writes
//! (plain inserts and transactions), eventual reads stay on replicas, and
//! a replica that stops replaying sends session reads to the primary. Each
//! test also reads the naive way, a SeaORM connection straight to the
//! lagging replica, and shows it stale, so it could fail.
//!
//! One cluster serves the whole binary; the tests take turns.
#![cfg(feature = "sea-orm")]

mod common;

use std::convert::Infallible;
use std::time::Duration;

use common::*;
use http::{Method, Request, Response};
use read_after_write::pg::{PgDb, PgReplicaSet};
use read_after_write::sea_orm::SeaDb;
use read_after_write::ReadAfterWriteLayer;
use read_after_write_testkit::TestCluster;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait, Value};
use tokio::sync::{Mutex, OnceCell};
use tower::{service_fn, Layer, Service};

static CLUSTER: OnceCell<TestCluster> = OnceCell::const_new();
/// The paused-replay test stops replication for everyone: one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

async fn cluster() -> &'static TestCluster {
    CLUSTER
        .get_or_init(|| async {
            let cluster = start_cluster().await;
            create_schema(&cluster).await;
            cluster
        })
        .await
}

fn statement(sql: &str, values: impl IntoIterator<Item = Value>) -> Statement {
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

/// Whether post `id` by `user` is visible on `conn`.
async fn finds(conn: &impl ConnectionTrait, id: i64, user: i64) -> bool {
    let row = conn
        .query_one_raw(statement(
            "select exists(select 1 from posts where id = $1 and user_id = $2) as found",
            [id.into(), user.into()],
        ))
        .await
        .expect("read")
        .expect("exists returns a row");
    row.try_get("", "found").expect("a boolean")
}

/// The app over `set`, through SeaORM only, as `common::app` is through
/// sqlx: `POST /posts/<body>` inserts with `db.write()`,
/// `POST /tx/<body>` inserts in a transaction begun on `db.write()`,
/// `GET /posts/<id>` checks with `db.read()` whether the user's post is
/// visible, and `GET /feed` reads with `db.eventual()`.
fn app(
    set: PgReplicaSet,
) -> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send> + Clone + Send
{
    let layer = ReadAfterWriteLayer::new(set, keys())
        .identity(identify)
        .max_wait(Duration::from_millis(100))
        .secure(false)
        .debug_header(true);
    layer.layer(service_fn(|req: Request<()>| async move {
        let db = SeaDb::new(
            req.extensions()
                .get::<PgDb>()
                .cloned()
                .expect("layer installed"),
        );
        let user: i64 = req.headers()["x-user-id"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let path = req.uri().path().to_owned();
        let mut response = Response::new(());
        let insert = "insert into posts (user_id, body) values ($1, $2) returning id";
        let outcome = if let Some(body) = path
            .strip_prefix("/posts/")
            .filter(|_| req.method() == Method::POST)
        {
            let row = db
                .write()
                .query_one_raw(statement(insert, [user.into(), body.into()]))
                .await;
            Outcome {
                post_id: row
                    .ok()
                    .flatten()
                    .and_then(|row| row.try_get("", "id").ok()),
                found: None,
            }
        } else if let Some(body) = path.strip_prefix("/tx/") {
            let tx = db.write().begin().await.expect("begin");
            let row = tx
                .query_one_raw(statement(insert, [user.into(), body.into()]))
                .await
                .expect("insert")
                .expect("returning");
            tx.commit().await.expect("commit");
            Outcome {
                post_id: row.try_get("", "id").ok(),
                found: None,
            }
        } else if path == "/feed" {
            let rows = db
                .eventual()
                .query_all_raw(statement(
                    "select id from posts order by id desc limit 5",
                    [],
                ))
                .await;
            Outcome {
                post_id: None,
                found: Some(rows.is_ok()),
            }
        } else {
            let id: i64 = path.trim_start_matches("/posts/").parse().unwrap();
            Outcome {
                post_id: None,
                found: Some(finds(&db.read().await, id, user).await),
            }
        };
        if outcome.post_id.is_none() && outcome.found.is_none() {
            *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        }
        response.extensions_mut().insert(outcome);
        Ok::<_, Infallible>(response)
    }))
}

/// The route the debug header reports.
fn route(response: &Response<()>) -> String {
    response
        .headers()
        .get("x-read-after-write")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sea_orm_reads_see_the_users_writes_and_the_naive_read_is_stale() {
    let _serial = SERIAL.lock().await;
    let cluster = cluster().await;
    let set = replica_set(cluster).await;
    let naive = DatabaseConnection::from(set.replica_pool("replica-2").unwrap().clone());
    let mut browser = Browser::new(app(set.clone()), 7_001);

    const PAIRS: usize = 40;
    let (mut stale_naive, mut on_replicas) = (0, 0);
    for i in 0..PAIRS {
        // Every other write in a transaction begun on `db.write()`.
        let id = if i % 2 == 0 {
            browser.post(&format!("sea-{i}")).await
        } else {
            let response = browser.send(Method::POST, &format!("/tx/sea-{i}")).await;
            response
                .extensions()
                .get::<Outcome>()
                .unwrap()
                .post_id
                .expect("committed")
        };
        // The naive read, right after the write: a SeaORM connection to the
        // 200 ms replica.
        stale_naive += usize::from(!finds(&naive, id, browser.user).await);
        let (found, route) = browser.sees(id).await;
        assert!(found, "write {i} not seen by the session read ({route})");
        on_replicas += usize::from(route.contains("node=replica"));
    }
    eprintln!(
        "SeaORM: {PAIRS} writes, each read back through SeaDb::read ({on_replicas} from a replica); \
         the naive read of the 200 ms replica was stale {stale_naive} times"
    );
    assert!(
        stale_naive > 0,
        "the naive read never went stale, so this test proves nothing"
    );

    // Other users' posts: eventual, from a replica.
    let response = browser.send(Method::GET, "/feed").await;
    assert_eq!(
        response.extensions().get::<Outcome>().unwrap().found,
        Some(true)
    );
    assert!(
        route(&response).contains("node=replica"),
        "{}",
        route(&response)
    );
    set.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replay_paused_sea_orm_session_reads_go_to_the_primary() {
    let _serial = SERIAL.lock().await;
    let cluster = cluster().await;
    let set = replica_set(cluster).await;
    let mut browser = Browser::new(app(set.clone()), 7_002);
    cluster.pause_replay(0).await.unwrap();
    cluster.pause_replay(1).await.unwrap();

    let id = browser.post("paused").await;
    for replica in ["replica-1", "replica-2"] {
        let naive = DatabaseConnection::from(set.replica_pool(replica).unwrap().clone());
        assert!(
            !finds(&naive, id, browser.user).await,
            "a naive read of a paused replica is stale"
        );
    }
    for _ in 0..5 {
        let (found, route) = browser.sees(id).await;
        assert!(found, "{route}");
        assert!(route.contains("node=primary"), "{route}");
    }

    cluster.resume_replay(0).await.unwrap();
    cluster.resume_replay(1).await.unwrap();
    cluster
        .wait_for_replicas_caught_up(Duration::from_secs(10))
        .await
        .unwrap();
    set.shutdown().await;
}

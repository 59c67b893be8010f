//! Fault drills on real clusters: the TCP proxy (freeze, cut, repoint) and
//! the cluster's fault building blocks. Each test has its own cluster.

use std::time::{Duration, Instant};

use read_after_write_testkit::{TcpProxy, TestCluster};
use sqlx::{Connection, PgConnection};
use tokio::time::timeout;

async fn connect(port: u16) -> PgConnection {
    PgConnection::connect(&format!("postgres://postgres@127.0.0.1:{port}/postgres"))
        .await
        .unwrap()
}

async fn server_port(conn: &mut PgConnection) -> u16 {
    let port: i32 = sqlx::query_scalar("select inet_server_port()")
        .fetch_one(conn)
        .await
        .unwrap();
    u16::try_from(port).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_freezes_cuts_and_repoints() {
    let started = Instant::now();
    let cluster = TestCluster::start_with_delays(&[Duration::ZERO])
        .await
        .unwrap();
    let primary = cluster.primary_port();
    let replica = cluster.replica(0).port();
    let proxy = TcpProxy::start(primary).await.unwrap();
    assert_eq!(proxy.target_port(), primary);

    // Queries go through.
    let mut conn = connect(proxy.port()).await;
    assert_eq!(server_port(&mut conn).await, primary);
    assert_eq!(proxy.open_sessions(), 1);

    // Frozen: the query hangs, the connection stays open, and the very same
    // query finishes after the thaw.
    proxy.freeze();
    {
        let query = sqlx::query_scalar::<_, i32>("select 42").fetch_one(&mut conn);
        tokio::pin!(query);
        assert!(
            timeout(Duration::from_secs(1), &mut query).await.is_err(),
            "a query finished through a frozen proxy"
        );
        assert_eq!(proxy.open_sessions(), 1, "freezing closed the session");
        proxy.thaw();
        assert_eq!(
            timeout(Duration::from_secs(5), query)
                .await
                .unwrap()
                .unwrap(),
            42
        );
    }

    // Cut: the open connection's next query fails at once.
    assert_eq!(proxy.cut_all(), 1);
    let t0 = Instant::now();
    let failed = timeout(
        Duration::from_secs(1),
        sqlx::query("select 1").execute(&mut conn),
    )
    .await
    .expect("a query on a cut connection hung instead of failing");
    assert!(failed.is_err());
    eprintln!("query on a cut connection failed in {:?}", t0.elapsed());
    drop(conn);

    // Repoint: new connections land on the new target, old ones stay put.
    let mut old = connect(proxy.port()).await;
    proxy.repoint(replica);
    assert_eq!(proxy.target_port(), replica);
    let mut new = connect(proxy.port()).await;
    assert_eq!(server_port(&mut new).await, replica);
    assert_eq!(server_port(&mut old).await, primary);
    assert_eq!(proxy.open_sessions(), 2);
    eprintln!("proxy test took {:?}", started.elapsed());
}

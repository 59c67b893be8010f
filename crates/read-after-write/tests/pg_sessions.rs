//! Session guarantees beyond read-your-writes, on real clusters: monotonic
//! reads across two web instances and replicas of different lag, and one
//! layer over two clusters.
//!
//! Every test also sends the same reads without the guarantee and shows
//! them going wrong, so a pass means something.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::keys;
use http::header::{COOKIE, SET_COOKIE};
use http::{Method, Request, Response};
use read_after_write::pg::{PgDb, PgReplicaSet};
use read_after_write::{AffinityToken, Consistency, ReadAfterWriteLayer, RouteReason, UserId};
use read_after_write_testkit::TestCluster;
use tokio::sync::OnceCell;
use tower::{service_fn, Layer, ServiceExt};

/// One replica close behind, one far behind: a session hopping between them
/// sees time go backwards.
const NEAR: Duration = Duration::from_millis(20);
const FAR: Duration = Duration::from_millis(300);

static CLUSTER: OnceCell<TestCluster> = OnceCell::const_new();

/// The tests share the cluster, and one restarts its replicas: one at a
/// time, so the negative controls are not disturbed.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn cluster() -> &'static TestCluster {
    CLUSTER
        .get_or_init(|| async {
            let cluster = TestCluster::builder()
                .replica(NEAR)
                .replica(FAR)
                .start()
                .await
                .expect("start a primary with two lagging replicas");
            cluster
                .execute_on_primary(
                    "create table counter (id int primary key, value bigint not null); \
                     create table posts (id bigserial primary key, user_id bigint not null); \
                     create table orders (id bigserial primary key, user_id bigint not null)",
                )
                .await
                .expect("create the schema");
            cluster
                .wait_for_replicas_caught_up(Duration::from_secs(10))
                .await
                .expect("replicas replay the schema");
            cluster
        })
        .await
}

async fn replica_set(cluster: &TestCluster) -> PgReplicaSet {
    common::replica_set(cluster).await
}

/// Advances the counter row `row` on the primary every 3 ms until dropped.
struct CounterWriter {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl CounterWriter {
    async fn start(cluster: &TestCluster, row: i32) -> Self {
        let mut conn = cluster.connect_primary().await.expect("connect");
        sqlx::query("insert into counter values ($1, 0) on conflict (id) do update set value = 0")
            .bind(row)
            .execute(&mut conn)
            .await
            .expect("counter row");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            while !flag.load(Ordering::Relaxed) {
                sqlx::query("update counter set value = value + 1 where id = $1")
                    .bind(row)
                    .execute(&mut conn)
                    .await
                    .expect("advance the counter");
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        });
        // Let the replicas fall behind the counter.
        tokio::time::sleep(FAR + Duration::from_millis(100)).await;
        CounterWriter { stop, task }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("writer");
    }
}

/// What one request saw.
#[derive(Clone, Debug, Default)]
struct Seen {
    counter: Option<i64>,
    reason: Option<RouteReason>,
    /// Every post of the user the read found (own-write check).
    posts: Vec<i64>,
    written: Option<i64>,
}

/// An app instance: `GET /read/{row}` and `GET /eventual/{row}` read the
/// counter (and the user's posts) through `db.read()` or `db.eventual()`;
/// `POST /write` adds a post.
fn instance(
    set: PgReplicaSet,
    monotonic: bool,
) -> impl tower::Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send>
       + Clone
       + Send {
    let layer = ReadAfterWriteLayer::new(set, keys())
        .identity(|parts| {
            let id: u64 = parts
                .headers
                .get("x-user-id")?
                .to_str()
                .ok()?
                .parse()
                .ok()?;
            Some(UserId::from(id))
        })
        .max_wait(Duration::from_millis(100))
        .consistency(if monotonic {
            Consistency::Monotonic
        } else {
            Consistency::ReadYourWrites
        })
        .secure(false);
    layer.layer(service_fn(|req: Request<()>| async move {
        let db = req.extensions().get::<PgDb>().cloned().expect("layer");
        let user: i64 = req.headers()["x-user-id"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let mut seen = Seen::default();
        let path = req.uri().path().to_owned();
        if req.method() == Method::POST {
            let (id,): (i64,) =
                sqlx::query_as("insert into posts (user_id) values ($1) returning id")
                    .bind(user)
                    .fetch_one(db.write())
                    .await
                    .expect("insert");
            seen.written = Some(id);
        } else {
            let (how, row) = path.trim_start_matches('/').split_once('/').unwrap();
            let row: i32 = row.parse().unwrap();
            let pool = if how == "read" {
                db.read().await
            } else {
                db.eventual()
            };
            // One statement: the counter and the posts come from one snapshot
            // of the node the read was routed to.
            let (counter, posts): (i64, Vec<i64>) = sqlx::query_as(
                "select (select value from counter where id = $1), \
                        coalesce((select array_agg(id) from posts where user_id = $2), '{}')",
            )
            .bind(row)
            .bind(user)
            .fetch_one(pool)
            .await
            .expect("read");
            seen.counter = Some(counter);
            seen.posts = posts;
            seen.reason = db.last_route().map(|r| r.reason);
        }
        let mut response = Response::new(());
        response.extensions_mut().insert(seen);
        Ok::<_, Infallible>(response)
    }))
}

/// A browser whose requests alternate between app instances, keeping the
/// affinity cookie as a browser does.
struct Session<S> {
    instances: Vec<S>,
    next: usize,
    user: i64,
    cookie: Option<String>,
    /// Read responses that carried a new token.
    read_tokens: usize,
}

impl<S> Session<S>
where
    S: tower::Service<Request<()>, Response = Response<()>, Error = Infallible> + Clone,
{
    fn new(instances: Vec<S>, user: i64) -> Self {
        Session {
            instances,
            next: 0,
            user,
            cookie: None,
            read_tokens: 0,
        }
    }

    async fn send(&mut self, method: Method, path: &str) -> Seen {
        let mut request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("x-user-id", self.user.to_string());
        if let Some(cookie) = &self.cookie {
            request = request.header(COOKIE, cookie);
        }
        let service = self.instances[self.next % self.instances.len()].clone();
        self.next += 1;
        let response = service.oneshot(request.body(()).unwrap()).await.unwrap();
        for value in response.headers().get_all(SET_COOKIE) {
            if let Some(pair) = value
                .to_str()
                .unwrap()
                .split(';')
                .next()
                .filter(|p| p.starts_with("primary_affinity="))
            {
                self.cookie = Some(pair.to_owned());
                if method == Method::GET {
                    self.read_tokens += 1;
                }
            }
        }
        response.extensions().get::<Seen>().cloned().unwrap()
    }

    fn token(&self) -> Option<AffinityToken> {
        let text = self.cookie.as_ref()?.strip_prefix("primary_affinity=")?;
        AffinityToken::verify(
            text,
            "primary_affinity",
            &keys(),
            now(),
            &UserId::from(self.user),
        )
        .ok()
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// What a run of sessions observed.
#[derive(Debug, Default)]
struct History {
    reads: usize,
    /// A later read saw a smaller counter than an earlier one.
    violations: usize,
    /// A read missed a post the session wrote before it.
    stale_own_reads: usize,
    read_tokens: usize,
    primary_reads: usize,
}

/// Runs `sessions` sequential sessions of `requests` each against the two
/// instances, every `write_every`-th request a write; judges the whole
/// history afterwards.
async fn run<S>(
    instances: Vec<S>,
    row: i32,
    first_user: i64,
    sessions: i64,
    requests: usize,
    write_every: usize,
    how: &str,
) -> History
where
    S: tower::Service<Request<()>, Response = Response<()>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let mut tasks = Vec::new();
    for user in first_user..first_user + sessions {
        let mut session = Session::new(instances.clone(), user);
        let path = format!("/{how}/{row}");
        tasks.push(tokio::spawn(async move {
            let mut history = History::default();
            let mut highest = i64::MIN;
            let mut written = Vec::new();
            for i in 0..requests {
                if write_every > 0 && i % write_every == write_every - 1 {
                    written.extend(session.send(Method::POST, "/write").await.written);
                    continue;
                }
                let seen = session.send(Method::GET, &path).await;
                let counter = seen.counter.expect("a read saw the counter");
                history.reads += 1;
                if counter < highest {
                    history.violations += 1;
                }
                highest = highest.max(counter);
                if written.iter().any(|id| !seen.posts.contains(id)) {
                    history.stale_own_reads += 1;
                }
                if matches!(
                    seen.reason,
                    Some(
                        RouteReason::LeftReplica
                            | RouteReason::WaitTimedOut
                            | RouteReason::Lagging
                            | RouteReason::ReadPrimaryThisRequest
                    )
                ) {
                    history.primary_reads += 1;
                }
            }
            history.read_tokens = session.read_tokens;
            history
        }));
    }
    let mut total = History::default();
    for task in tasks {
        let history = task.await.expect("session");
        total.reads += history.reads;
        total.violations += history.violations;
        total.stale_own_reads += history.stale_own_reads;
        total.read_tokens += history.read_tokens;
        total.primary_reads += history.primary_reads;
    }
    total
}

async fn two_instances(
    cluster: &TestCluster,
    monotonic: bool,
) -> Vec<
    impl tower::Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send>
        + Clone
        + Send
        + 'static,
> {
    vec![
        instance(replica_set(cluster).await, monotonic),
        instance(replica_set(cluster).await, monotonic),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monotonic_sessions_never_go_back_in_time_across_instances_and_naive_ones_do() {
    let _serial = SERIAL.lock().await;
    let cluster = cluster().await;
    let writer = CounterWriter::start(cluster, 1).await;

    // Without the guarantee: reads without a token spread over both replicas
    // (round robin), so a session sees the counter jump back by about 280 ms.
    let naive = run(
        two_instances(cluster, false).await,
        1,
        100,
        8,
        60,
        0,
        "read",
    )
    .await;
    // With writes in between, read-your-writes alone (`lsn-wait`) still
    // lets a session hop from the near replica to the far one.
    let lsn_wait = run(
        two_instances(cluster, false).await,
        1,
        200,
        16,
        60,
        6,
        "read",
    )
    .await;
    let monotonic = run(two_instances(cluster, true).await, 1, 300, 8, 60, 0, "read").await;
    let with_writes = run(two_instances(cluster, true).await, 1, 400, 8, 60, 6, "read").await;
    let eventual = run(
        two_instances(cluster, true).await,
        1,
        500,
        8,
        60,
        6,
        "eventual",
    )
    .await;
    writer.stop().await;

    eprintln!("naive:      {naive:?}");
    eprintln!("lsn-wait:   {lsn_wait:?}");
    eprintln!("monotonic:  {monotonic:?}");
    eprintln!("+ writes:   {with_writes:?}");
    eprintln!("eventual(): {eventual:?}");
    assert!(
        naive.violations > 0,
        "the naive sessions must go back in time"
    );
    assert!(
        lsn_wait.violations > 0,
        "read-your-writes alone must go back in time"
    );
    assert_eq!(lsn_wait.stale_own_reads, 0);
    for history in [&monotonic, &with_writes] {
        assert_eq!(history.violations, 0, "{history:?}");
        assert_eq!(history.stale_own_reads, 0, "{history:?}");
    }
    // `eventual()` promises no own writes, only never going back in time,
    // and it stays on the session's replica after a write instead of
    // going to the primary.
    assert_eq!(eventual.violations, 0, "{eventual:?}");
    assert_eq!(eventual.primary_reads, 0, "{eventual:?}");
    // Without writes a session gets one token, on its first read, and stays
    // on that replica: no read goes to the primary.
    assert_eq!(monotonic.read_tokens, 8, "{monotonic:?}");
    assert_eq!(monotonic.primary_reads, 0, "{monotonic:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_replica_restarts_reads_the_primary_once_and_never_goes_back() {
    let _serial = SERIAL.lock().await;
    let cluster = cluster().await;
    let writer = CounterWriter::start(cluster, 2).await;
    let set = replica_set(cluster).await;
    let instances = vec![instance(set.clone(), true)];
    let mut session = Session::new(instances.clone(), 900);
    // The first read picks a replica, and the session stays there.
    let mut highest = i64::MIN;
    for _ in 0..5 {
        let seen = session.send(Method::GET, "/read/2").await;
        highest = highest.max(seen.counter.unwrap());
    }
    let sticky = session
        .token()
        .and_then(|t| t.bookmarks().as_slice()[0].replica);
    assert!(sticky.is_some(), "the session is tied to a replica");

    // Restart every replica: the session's replica is another incarnation.
    for index in 0..cluster.replica_count() {
        cluster.stop_replica(index).await.expect("stop");
        cluster.start_replica(index).await.expect("start");
    }
    let mut reasons = Vec::new();
    let mut violations = 0;
    for _ in 0..40 {
        let seen = session.send(Method::GET, "/read/2").await;
        let counter = seen.counter.unwrap();
        if counter < highest {
            violations += 1;
        }
        highest = highest.max(counter);
        reasons.push(seen.reason.unwrap());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    writer.stop().await;
    eprintln!("after the restart: {reasons:?}");
    assert_eq!(violations, 0);
    assert!(
        reasons.contains(&RouteReason::LeftReplica),
        "the session left its restarted replica through the primary: {reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .rev()
            .take(5)
            .all(|r| *r != RouteReason::LeftReplica),
        "and came back to replicas once the primary's position was captured: {reasons:?}"
    );
}

/// What the two-cluster app found.
#[derive(Clone, Debug, Default)]
struct Found {
    post: Option<i64>,
    order: Option<i64>,
    post_reason: Option<RouteReason>,
    order_reason: Option<RouteReason>,
}

/// One request as `user`, with `cookie`; what it found and the affinity
/// cookie it set.
async fn call<S>(
    service: &S,
    user: i64,
    cookie: Option<&str>,
    method: Method,
    path: &str,
) -> (Found, Option<String>)
where
    S: tower::Service<Request<()>, Response = Response<()>, Error = Infallible> + Clone,
{
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("x-user-id", user.to_string());
    if let Some(cookie) = cookie {
        request = request.header(COOKIE, cookie);
    }
    let response = service
        .clone()
        .oneshot(request.body(()).unwrap())
        .await
        .unwrap();
    let cookie = response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(';').next().map(str::to_owned))
        .find(|p| p.starts_with("primary_affinity="));
    (
        response.extensions().get::<Found>().cloned().unwrap(),
        cookie,
    )
}

fn verify(cookie: &str, user: i64) -> AffinityToken {
    let text = cookie.strip_prefix("primary_affinity=").unwrap();
    AffinityToken::verify(
        text,
        "primary_affinity",
        &keys(),
        now(),
        &UserId::from(user),
    )
    .unwrap()
}

/// A second cluster, `orders`, with one far-behind replica.
static ORDERS: OnceCell<TestCluster> = OnceCell::const_new();

async fn orders_cluster() -> &'static TestCluster {
    ORDERS
        .get_or_init(|| async {
            let cluster = TestCluster::builder()
                .replica(FAR)
                .start()
                .await
                .expect("start the orders cluster");
            cluster
                .execute_on_primary(
                    "create table orders (id bigserial primary key, user_id bigint not null)",
                )
                .await
                .expect("orders schema");
            cluster
                .wait_for_replicas_caught_up(Duration::from_secs(10))
                .await
                .expect("replica replays the schema");
            cluster
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_covers_writes_to_two_clusters_and_never_crosses_them() {
    let _serial = SERIAL.lock().await;
    let users = cluster().await;
    let orders = orders_cluster().await;
    let users_set = replica_set(users).await;
    let orders_set = replica_set(orders).await;
    assert_ne!(users_set.system_id(), orders_set.system_id());
    let layer = ReadAfterWriteLayer::new(users_set.clone(), keys())
        .identity(|parts| {
            let id: u64 = parts
                .headers
                .get("x-user-id")?
                .to_str()
                .ok()?
                .parse()
                .ok()?;
            Some(UserId::from(id))
        })
        .max_wait(Duration::from_millis(500))
        .secure(false)
        .cluster("orders", orders_set.clone())
        .expect("a second cluster");
    // The same cluster twice is refused.
    assert!(ReadAfterWriteLayer::new(users_set.clone(), keys())
        .cluster("again", users_set.clone())
        .is_err());

    let service = layer.layer(service_fn(|req: Request<()>| async move {
        let db = req.extensions().get::<PgDb>().cloned().expect("layer");
        let orders = db.cluster("orders").expect("the orders cluster");
        let user: i64 = req.headers()["x-user-id"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let mut found = Found::default();
        match (req.method().clone(), req.uri().path()) {
            (Method::POST, "/both") => {
                let (post,): (i64,) =
                    sqlx::query_as("insert into posts (user_id) values ($1) returning id")
                        .bind(user)
                        .fetch_one(db.write())
                        .await
                        .unwrap();
                let (order,): (i64,) =
                    sqlx::query_as("insert into orders (user_id) values ($1) returning id")
                        .bind(user)
                        .fetch_one(orders.write())
                        .await
                        .unwrap();
                found.post = Some(post);
                found.order = Some(order);
            }
            (Method::POST, "/post") => {
                let (post,): (i64,) =
                    sqlx::query_as("insert into posts (user_id) values ($1) returning id")
                        .bind(user)
                        .fetch_one(db.write())
                        .await
                        .unwrap();
                found.post = Some(post);
            }
            _ => {
                let (post,): (Option<i64>,) =
                    sqlx::query_as("select max(id) from posts where user_id = $1")
                        .bind(user)
                        .fetch_one(db.read().await)
                        .await
                        .unwrap();
                found.post_reason = db.last_route().map(|r| r.reason);
                let (order,): (Option<i64>,) =
                    sqlx::query_as("select max(id) from orders where user_id = $1")
                        .bind(user)
                        .fetch_one(orders.read().await)
                        .await
                        .unwrap();
                found.order_reason = orders.last_route().map(|r| r.reason);
                found.post = post;
                found.order = order;
            }
        }
        let mut response = Response::new(());
        response.extensions_mut().insert(found);
        Ok::<_, Infallible>(response)
    }));

    let mut stale = 0;
    let mut naive_stale = 0;
    let mut longest_cookie = 0;
    for round in 0..20 {
        let user = 7_000 + round;
        let (wrote, cookie) = call(&service, user, None, Method::POST, "/both").await;
        let cookie = cookie.expect("a token after writing");
        longest_cookie = longest_cookie.max(cookie.len());
        let token = verify(&cookie, user);
        assert_eq!(token.bookmarks().len(), 2, "one bookmark per cluster");
        assert!(token.bookmark(users_set.system_id()).is_some());
        assert!(token.bookmark(orders_set.system_id()).is_some());

        // The naive reads: each cluster's far-behind replica.
        let naive_post: (Option<i64>,) =
            sqlx::query_as("select max(id) from posts where user_id = $1")
                .bind(user)
                .fetch_one(users_set.replica_pool("replica-2").unwrap())
                .await
                .unwrap();
        let naive_order: (Option<i64>,) =
            sqlx::query_as("select max(id) from orders where user_id = $1")
                .bind(user)
                .fetch_one(orders_set.replica_pool("replica-1").unwrap())
                .await
                .unwrap();
        naive_stale += usize::from(naive_post.0 != wrote.post);
        naive_stale += usize::from(naive_order.0 != wrote.order);

        let (read, _) = call(&service, user, Some(&cookie), Method::GET, "/read").await;
        stale += usize::from(read.post != wrote.post);
        stale += usize::from(read.order != wrote.order);
        assert_ne!(read.order_reason, Some(RouteReason::NoToken));
        assert_ne!(read.order_reason, Some(RouteReason::ForeignCluster));

        // A write to users alone: the orders bookmark is carried unchanged,
        // and the users bookmark moves on.
        let (_, after) = call(&service, user, Some(&cookie), Method::POST, "/post").await;
        let after = verify(&after.expect("a token"), user);
        assert_eq!(
            after.bookmark(orders_set.system_id()),
            token.bookmark(orders_set.system_id()),
            "the orders bookmark travels unchanged"
        );
        assert!(
            after.bookmark(users_set.system_id()).unwrap().position.lsn
                > token.bookmark(users_set.system_id()).unwrap().position.lsn
        );
    }
    eprintln!(
        "two clusters: stale {stale}, naive stale {naive_stale}, cookie {longest_cookie} bytes"
    );
    assert_eq!(stale, 0);
    assert!(naive_stale > 0, "the far replicas must miss the writes");
    assert!(longest_cookie <= "primary_affinity=".len() + read_after_write::token::MAX_ENCODED_LEN);

    // A token of the users cluster only: orders reads are eventual, whatever
    // position it promises; users reads honour it.
    let (_, cookie) = call(&service, 7_500, None, Method::POST, "/post").await;
    let cookie = cookie.expect("a token");
    assert_eq!(verify(&cookie, 7_500).bookmarks().len(), 1);
    let (read, _) = call(&service, 7_500, Some(&cookie), Method::GET, "/read").await;
    assert_eq!(read.order_reason, Some(RouteReason::NoToken));
    assert!(matches!(
        read.post_reason,
        Some(RouteReason::CaughtUp | RouteReason::CaughtUpAfterWait)
    ));
}

//! Production deploys on a real primary with two streaming replicas that lag
//! by 50 ms and 200 ms: a key rotation or an upgrade that changes the token
//! format rolled out to some instances only, and identities a handler
//! establishes (sign-up, login). Each test also
//! runs the naive way on the same cluster and shows it going stale, so it
//! could fail.
//!
//! One cluster serves the whole binary.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use common::*;
use http::header::{COOKIE, SET_COOKIE};
use http::{Method, Request, Response};
use read_after_write::pg::{PgDb, PgReplicaSet};
use read_after_write::{
    AffinityToken, KeySet, ReadAfterWriteLayer, RouteReason, SigningKey, TokenError, TokenOutcome,
    UserId,
};
use read_after_write_testkit::TestCluster;
use tokio::sync::OnceCell;
use tower::{service_fn, Layer, Service, ServiceExt};

static CLUSTER: OnceCell<TestCluster> = OnceCell::const_new();

async fn cluster() -> &'static TestCluster {
    CLUSTER
        .get_or_init(|| async {
            let cluster = start_cluster().await;
            create_schema(&cluster).await;
            cluster
                .execute_on_primary(
                    "create table if not exists accounts (id bigserial primary key, name text not null); \
                     create table if not exists logins (id bigserial primary key, user_id bigint not null)",
                )
                .await
                .expect("create the accounts and logins tables");
            cluster
                .wait_for_replicas_caught_up(Duration::from_secs(10))
                .await
                .expect("replicas replay the schema");
            cluster
        })
        .await
}

fn key(byte: u8) -> SigningKey {
    SigningKey::from_bytes(&[byte; 32]).unwrap()
}

/// What a request did, in the response's extensions.
#[derive(Clone, Debug, Default)]
struct Done {
    /// The row a write created.
    id: Option<i64>,
    /// Whether a read found the row it looked for.
    found: Option<bool>,
    /// Why the last access went where it did.
    reason: Option<RouteReason>,
    outcome: Option<TokenOutcome>,
}

/// The identity a request carries: `x-user-id`.
fn identify(parts: &http::request::Parts) -> Option<UserId> {
    let id = parts
        .headers
        .get("x-user-id")?
        .to_str()
        .ok()?
        .parse::<i64>()
        .ok()?;
    Some(UserId::from(id))
}

/// Looks a row up in `table` by id on `pool`.
async fn exists(pool: &sqlx::PgPool, table: &str, id: i64) -> bool {
    let sql = match table {
        "posts" => "select exists(select 1 from posts where id = $1)",
        "accounts" => "select exists(select 1 from accounts where id = $1)",
        _ => "select exists(select 1 from logins where id = $1)",
    };
    let (found,): (bool,) = sqlx::query_as(sql)
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("read");
    found
}

/// The app, over `set` with `keys`:
///
/// - `POST /posts/<user>`: a post by the requester, through `db.write()`;
/// - `POST /signup/<bind|naive>`: an account, created by a request with no
///   identity, bound to the request with `bind`;
/// - `POST /login/<bind|naive>/<user>`: a login row for `user`, written by
///   a request with no identity (the handler checks the password), bound
///   with `bind`;
/// - `GET /read/<table>/<id>`: whether a session read (`db.read()`) finds
///   the row; `GET /eventual/<table>/<id>`: the same, read eventually.
fn app(
    set: PgReplicaSet,
    keys: KeySet,
) -> impl Service<Request<()>, Response = Response<()>, Error = Infallible, Future: Send> + Clone + Send
{
    let layer = ReadAfterWriteLayer::new(set, keys)
        .identity(identify)
        .max_wait(Duration::from_millis(120))
        .secure(false);
    layer.layer(service_fn(|req: Request<()>| async move {
        let db = req
            .extensions()
            .get::<PgDb>()
            .cloned()
            .expect("layer installed");
        let path: Vec<String> = req
            .uri()
            .path()
            .split('/')
            .skip(1)
            .map(str::to_owned)
            .collect();
        let mut done = Done::default();
        let insert = |sql: &'static str, value: Option<i64>| {
            let db = db.clone();
            async move {
                let query = sqlx::query_as::<_, (i64,)>(sql);
                let query = match value {
                    Some(value) => query.bind(value),
                    None => query,
                };
                query.fetch_one(db.write()).await.expect("insert").0
            }
        };
        match (req.method().clone(), path[0].as_str()) {
            (Method::POST, "posts") => {
                let user: i64 = path[1].parse().unwrap();
                let sql = "insert into posts (user_id, body) values ($1, 'rotation') returning id";
                done.id = Some(insert(sql, Some(user)).await);
            }
            (Method::POST, "signup") => {
                let sql = "insert into accounts (name) values ('new') returning id";
                let id = insert(sql, None).await;
                if path[1] == "bind" {
                    db.bind_user(UserId::from(id));
                }
                done.id = Some(id);
            }
            (Method::POST, "login") => {
                let user: i64 = path[2].parse().unwrap();
                // Signed in: the handler has just checked the password.
                if path[1] == "bind" {
                    db.bind_user(UserId::from(user));
                }
                let sql = "insert into logins (user_id) values ($1) returning id";
                done.id = Some(insert(sql, Some(user)).await);
            }
            (Method::GET, how) => {
                let id: i64 = path[2].parse().unwrap();
                let pool = match how {
                    "read" => db.read().await,
                    _ => db.eventual(),
                };
                done.found = Some(exists(pool, &path[1], id).await);
            }
            _ => unreachable!("no such route"),
        }
        done.reason = db.last_route().map(|route| route.reason);
        done.outcome = Some(db.token_outcome());
        let mut response = Response::new(());
        response.extensions_mut().insert(done);
        Ok::<_, Infallible>(response)
    }))
}

/// Sends a request as `user` (none: no identity) with `cookie`; what the
/// handler did and the affinity cookie the response set, if any.
async fn send<S>(
    service: &S,
    method: Method,
    path: &str,
    user: Option<i64>,
    cookie: Option<&str>,
) -> (Done, Option<String>)
where
    S: Service<Request<()>, Response = Response<()>, Error = Infallible> + Clone,
{
    let mut request = Request::builder().method(method).uri(path);
    if let Some(user) = user {
        request = request.header("x-user-id", user.to_string());
    }
    if let Some(cookie) = cookie {
        request = request.header(COOKIE, cookie);
    }
    let response = service
        .clone()
        .oneshot(request.body(()).unwrap())
        .await
        .unwrap();
    let cookie = response.headers().get_all(SET_COOKIE).iter().find_map(|v| {
        let pair = v.to_str().ok()?.split(';').next()?;
        pair.starts_with("primary_affinity=")
            .then(|| pair.to_owned())
    });
    let done = response.extensions().get::<Done>().cloned().unwrap();
    (done, cookie)
}

/// Reads post `id` back on `service` as `user` with `cookie`: first the
/// naive control, an eventual read (what treating the token as absent
/// does), whether it found the post; then the session read.
async fn read_back<S>(service: &S, user: i64, id: i64, cookie: &str) -> (bool, Done)
where
    S: Service<Request<()>, Response = Response<()>, Error = Infallible> + Clone,
{
    let (naive, _) = send(
        service,
        Method::GET,
        &format!("/eventual/posts/{id}"),
        Some(user),
        Some(cookie),
    )
    .await;
    let (read, _) = send(
        service,
        Method::GET,
        &format!("/read/posts/{id}"),
        Some(user),
        Some(cookie),
    )
    .await;
    (naive.found.unwrap(), read)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_rolled_out_to_one_instance_never_serves_a_stale_own_read() {
    let cluster = cluster().await;
    let (old, new) = (key(1), key(2));
    // Instance A has rolled out `new,old` (skipping the verify-only phase);
    // instance B still runs `old`.
    let a = app(
        replica_set(cluster).await,
        KeySet::new(new.clone()).with_previous(old.clone()),
    );
    let b = app(replica_set(cluster).await, KeySet::new(old));

    const USERS: i64 = 5;
    const ROUNDS: usize = 12;
    let (mut stale, mut naive_stale, mut reads) = (0, 0, 0);
    for user in 7_000..7_000 + USERS {
        let mut cookie: Option<String> = None;
        for _ in 0..ROUNDS {
            let (wrote, issued) = send(
                &a,
                Method::POST,
                &format!("/posts/{user}"),
                Some(user),
                cookie.as_deref(),
            )
            .await;
            cookie = issued.or(cookie);
            let id = wrote.id.unwrap();
            // The token A issued is signed with the key B does not know.
            let text = cookie
                .as_deref()
                .unwrap()
                .trim_start_matches("primary_affinity=");
            let token = AffinityToken::verify(
                text,
                "primary_affinity",
                &KeySet::new(new.clone()),
                0,
                &UserId::from(user),
            );
            assert_eq!(token.map(|t| t.key_id()), Ok(new.id()));
            let (naive, read) = read_back(&b, user, id, cookie.as_deref().unwrap()).await;
            naive_stale += usize::from(!naive);
            reads += 1;
            stale += usize::from(!read.found.unwrap());
            assert_eq!(read.reason, Some(RouteReason::UnknownKey));
            assert_eq!(
                read.outcome,
                Some(TokenOutcome::Rejected(TokenError::UnknownKey))
            );
        }
    }
    eprintln!(
        "{reads} own reads through the instance without the new key: {stale} stale; \
         the same reads made eventual: {naive_stale} stale"
    );
    assert_eq!(stale, 0, "an own read through B was stale");
    assert!(
        naive_stale > 0,
        "the eventual reads were never stale: the lag is not real"
    );
}

/// The cookie `issued` as a release with a later token format would have
/// written it: every format from version 3 on begins with the same head
/// (version, key id, user tag, expiry), the rest is the later release's
/// own. The stand-in keeps the head, raises the version and appends a
/// field; this release can read no more of a real one.
fn in_a_later_format(issued: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    let text = issued.trim_start_matches("primary_affinity=");
    let mut raw = URL_SAFE_NO_PAD
        .decode(text)
        .expect("a token of this release");
    raw[0] = read_after_write::token::TOKEN_VERSION + 1;
    raw.push(0xA5);
    format!("primary_affinity={}", URL_SAFE_NO_PAD.encode(raw))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_that_changes_the_token_format_never_serves_a_stale_own_read() {
    let cluster = cluster().await;
    let keys = KeySet::new(key(4));
    // Instance A runs a release with a later token format (its tokens are
    // re-labelled below); instance B still runs this one.
    let a = app(replica_set(cluster).await, keys.clone());
    let b = app(replica_set(cluster).await, keys);

    const USERS: i64 = 5;
    const ROUNDS: usize = 12;
    let (mut stale, mut naive_stale, mut reads) = (0, 0, 0);
    for user in 8_000..8_000 + USERS {
        let mut cookie: Option<String> = None;
        for _ in 0..ROUNDS {
            let (wrote, issued) = send(
                &a,
                Method::POST,
                &format!("/posts/{user}"),
                Some(user),
                cookie.as_deref(),
            )
            .await;
            cookie = issued.or(cookie);
            let id = wrote.id.unwrap();
            let later = in_a_later_format(cookie.as_deref().unwrap());
            let (naive, read) = read_back(&b, user, id, &later).await;
            naive_stale += usize::from(!naive);
            reads += 1;
            stale += usize::from(!read.found.unwrap());
            assert_eq!(read.reason, Some(RouteReason::UnknownVersion));
            assert_eq!(
                read.outcome,
                Some(TokenOutcome::Rejected(TokenError::WrongVersion))
            );
        }
    }
    eprintln!(
        "{reads} own reads through the instance on the older release: {stale} stale; \
         the same reads made eventual: {naive_stale} stale"
    );
    assert_eq!(stale, 0, "an own read through B was stale");
    assert!(
        naive_stale > 0,
        "the eventual reads were never stale: the lag is not real"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_up_and_a_login_are_read_back_on_the_next_page() {
    let cluster = cluster().await;
    let service = app(replica_set(cluster).await, KeySet::new(key(3)));

    const ROUNDS: usize = 12;
    // Sign-up, then the profile page as the new user with the cookie.
    let (mut missed, mut naive_missed) = (0, 0);
    for how in ["bind", "naive"] {
        for _ in 0..ROUNDS {
            let (signed_up, cookie) = send(
                &service,
                Method::POST,
                &format!("/signup/{how}"),
                None,
                None,
            )
            .await;
            let id = signed_up.id.unwrap();
            let (profile, _) = send(
                &service,
                Method::GET,
                &format!("/read/accounts/{id}"),
                Some(id),
                cookie.as_deref(),
            )
            .await;
            let found = profile.found.unwrap();
            if how == "bind" {
                let cookie = cookie.expect("a token for the new user");
                let text = cookie.trim_start_matches("primary_affinity=");
                let token = AffinityToken::verify(
                    text,
                    "primary_affinity",
                    &KeySet::new(key(3)),
                    0,
                    &UserId::from(id),
                )
                .unwrap();
                assert_eq!(token.user(), &UserId::from(id));
                assert_eq!(profile.outcome, Some(TokenOutcome::Valid));
                missed += usize::from(!found);
            } else {
                assert_eq!(cookie, None, "no identity, no binding: no token");
                naive_missed += usize::from(!found);
            }
        }
    }
    eprintln!(
        "sign-up then profile, {ROUNDS} each: {missed} missed with bind_user, \
         {naive_missed} without"
    );
    assert_eq!(missed, 0, "a new user's profile was missing");
    assert!(
        naive_missed > 0,
        "without bind_user the profile was never missing: the lag is not real"
    );

    // Login (a request with no identity writes a login row), then the
    // dashboard as that user with the cookie.
    let (mut missed, mut naive_missed) = (0, 0);
    for how in ["bind", "naive"] {
        for round in 0..ROUNDS as i64 {
            let user = 8_000 + round;
            let (logged_in, cookie) = send(
                &service,
                Method::POST,
                &format!("/login/{how}/{user}"),
                None,
                None,
            )
            .await;
            let login = logged_in.id.unwrap();
            let (dashboard, _) = send(
                &service,
                Method::GET,
                &format!("/read/logins/{login}"),
                Some(user),
                cookie.as_deref(),
            )
            .await;
            let found = dashboard.found.unwrap();
            if how == "bind" {
                assert!(cookie.is_some(), "a token for the user who logged in");
                assert_ne!(dashboard.reason, Some(RouteReason::NoToken));
                missed += usize::from(!found);
            } else {
                assert_eq!(cookie, None);
                naive_missed += usize::from(!found);
            }
        }
    }
    eprintln!(
        "login then dashboard, {ROUNDS} each: {missed} missed with bind_user, \
         {naive_missed} without"
    );
    assert_eq!(missed, 0, "a login row was missing from the dashboard");
    assert!(
        naive_missed > 0,
        "without bind_user the login row was never missing: the lag is not real"
    );
}

//! The history: one record per HTTP operation, with its start and end, as
//! Jepsen logs them, and the facts read from the cluster after the run.
//!
//! The load generator appends to a [`Recorder`]; the checker reads the
//! finished [`History`] and never talks to anything.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::Connection;

use serde::{Deserialize, Serialize};

use super::DrillError;

/// What an operation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// `POST /api/posts`: creates a post, answers its id.
    Write,
    /// `GET /api/posts`: the user's own 100 newest posts, session-consistent.
    OwnRead,
    /// `GET /api/feed`: everyone's newest posts, eventual.
    FeedRead,
    /// `POST /api/signup` with no identity: creates an account, answers
    /// its id; the op's `user` is that id.
    SignUp,
    /// `GET /api/profile/{id}` of the user's own account, right after its
    /// sign-up: session-consistent, so it must find the account's profile.
    ProfileRead,
    /// `POST /api/login`: a login row for the user, answers its id.
    Login,
    /// `GET /api/dashboard`: must show the user's latest login.
    DashboardRead,
}

impl OpKind {
    /// A write the checker looks for on the final primary.
    pub fn is_write(self) -> bool {
        matches!(self, OpKind::Write | OpKind::SignUp | OpKind::Login)
    }

    /// A read (the primary's share counts these).
    pub fn is_read(self) -> bool {
        !self.is_write()
    }
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// An HTTP status arrived (any status, success or not).
    Status(u16),
    /// No status: connection refused or reset, client timeout, unreadable
    /// body.
    Transport(String),
}

impl Outcome {
    /// A 2xx status.
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Status(status) if (200..300).contains(status))
    }
}

/// One operation, from the client's side.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Op {
    /// The virtual user (the `x-user-id` it sent).
    pub user: i64,
    /// What it did.
    pub kind: OpKind,
    /// When the request was sent, milliseconds since the run's start.
    pub start_ms: f64,
    /// When the whole answer (or the failure) arrived, same clock.
    pub end_ms: f64,
    /// Status or transport error.
    pub outcome: Outcome,
    /// For a write, the content sent (unique per write, so a post can be
    /// told apart from another that got the same id on another timeline);
    /// for a sign-up, the account's name.
    pub content: Option<String>,
    /// For a successful write, the id of the new post (of the new account
    /// for a sign-up, of the login row for a login).
    pub post_id: Option<i64>,
    /// For a successful own read, the posts returned, newest first, as
    /// `(id, fingerprint of the content)`; for a profile read, the profile
    /// found (`(user id, fingerprint of the name)`, none on a 404); for a
    /// dashboard read, the latest login (`(login id, 0)`, none without).
    pub read_posts: Option<Vec<(i64, u64)>>,
    /// The debug header's `node=` (`primary` or a replica's name).
    pub node: Option<String>,
    /// The debug header's `reason=`.
    pub reason: Option<String>,
    /// The debug header's `token=` (the outcome of the request's token).
    pub token: Option<String>,
    /// For a write, whether the response set an affinity token.
    pub token_issued: Option<bool>,
}

impl Op {
    /// How long the operation took, milliseconds.
    pub fn duration_ms(&self) -> f64 {
        self.end_ms - self.start_ms
    }

    /// Whether `[start, end]` overlaps `[from, to]`.
    pub fn overlaps(&self, from: f64, to: f64) -> bool {
        self.start_ms <= to && self.end_ms >= from
    }

    /// Whether the operation got the answer it asked for: a 2xx, or for a
    /// profile read a 404 (no such profile, which the checker judges).
    pub fn succeeded(&self) -> bool {
        self.outcome.is_success()
            || (self.kind == OpKind::ProfileRead && self.outcome == Outcome::Status(404))
    }

    /// A read of the user's own data, which must show their writes.
    pub fn is_session_read(&self) -> bool {
        matches!(
            self.kind,
            OpKind::OwnRead | OpKind::ProfileRead | OpKind::DashboardRead
        )
    }

    /// Where the server says it read, as `node=..; reason=..; token=..`.
    pub fn route(&self) -> String {
        format!(
            "node={}; reason={}; token={}",
            self.node.as_deref().unwrap_or("?"),
            self.reason.as_deref().unwrap_or("?"),
            self.token.as_deref().unwrap_or("?")
        )
    }

    /// A read that the server says it routed to the primary.
    pub fn on_primary(&self) -> bool {
        self.node.as_deref() == Some("primary")
    }

    /// A read that the server says it routed to a replica.
    pub fn on_replica(&self) -> bool {
        matches!(self.node.as_deref(), Some(node) if node != "primary" && node != "none")
    }
}

/// A post's content as a 64-bit FNV-1a hash: with the id, it tells a post
/// apart from another that got the same id on another timeline, without
/// keeping every read's text.
pub fn fingerprint(content: &str) -> u64 {
    content.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Every operation of one run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct History {
    /// In the order they finished.
    pub ops: Vec<Op>,
}

/// When the fault was injected and when the recovery action finished, on
/// the history's clock.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaultWindow {
    /// The fault's injection, milliseconds since the run's start.
    pub injected_ms: f64,
    /// When the call that injected it returned (the primary is frozen,
    /// promoted away or killed by then): writes sent after this had to get
    /// through the fault.
    pub applied_ms: f64,
    /// When the last recovery action (promotion, proxy repoint, app restart,
    /// replica restart) completed.
    pub recovered_ms: f64,
    /// Added after `recovered_ms`: requests in flight at recovery, pools
    /// that drop connections, the tracker's next poll.
    pub grace_ms: f64,
}

impl FaultWindow {
    /// The window's end, grace included.
    pub fn end_ms(&self) -> f64 {
        self.recovered_ms + self.grace_ms
    }
}

/// An account as the final primary has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredAccount {
    /// The name it signed up with (unique per sign-up in the drills).
    pub name: String,
}

/// A post as the final primary has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPost {
    /// Its author.
    pub user: i64,
    /// What was posted.
    pub content: String,
}

/// What is known once the run is over.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Facts {
    /// The posts on the final primary (the node that is primary for the app
    /// at the end), by id. Ids are not enough to know a write survived: after
    /// a failover that lost WAL, the new primary's sequence hands out again
    /// ids the old timeline had used, for other posts.
    pub final_posts: HashMap<i64, StoredPost>,
    /// The accounts on the final primary, by id.
    #[serde(default)]
    pub final_accounts: HashMap<i64, StoredAccount>,
    /// The logins on the final primary: login id to user id.
    #[serde(default)]
    pub final_logins: HashMap<i64, i64>,
    /// The fault's window.
    pub window: FaultWindow,
    /// The app's `max_wait`, milliseconds; a request longer than this plus
    /// one second is hung.
    pub max_wait_ms: f64,
    /// The app's request timeout, milliseconds: a request that ran into it
    /// was stuck (on a frozen server, say).
    #[serde(default)]
    pub request_timeout_ms: f64,
}

impl Facts {
    /// Whether the final primary has this write: the same id, author and
    /// content.
    pub fn has_write(&self, op: &Op) -> bool {
        let Some(id) = op.post_id else {
            return false;
        };
        match op.kind {
            OpKind::SignUp => self
                .final_accounts
                .get(&id)
                .is_some_and(|account| op.content.as_ref().is_none_or(|c| *c == account.name)),
            OpKind::Login => self.final_logins.get(&id) == Some(&op.user),
            _ => self.final_posts.get(&id).is_some_and(|post| {
                post.user == op.user && op.content.as_ref().is_none_or(|c| *c == post.content)
            }),
        }
    }

    /// Whether the final primary has this post (`(id, fingerprint)`) by
    /// `user`.
    pub fn has_post(&self, (id, print): (i64, u64), user: i64) -> bool {
        self.final_posts
            .get(&id)
            .is_some_and(|post| post.user == user && fingerprint(&post.content) == print)
    }
}

/// Collects operations from every virtual user; the clock starts at
/// [`Recorder::new`].
#[derive(Debug)]
pub struct Recorder {
    started: Instant,
    ops: Mutex<Vec<Op>>,
}

impl Recorder {
    /// A recorder whose clock starts now.
    pub fn new() -> Self {
        Recorder {
            started: Instant::now(),
            ops: Mutex::new(Vec::new()),
        }
    }

    /// Milliseconds since the recorder was made.
    pub fn now_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }

    /// When the run started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Appends one operation.
    pub fn record(&self, op: Op) {
        // A user task that panicked while holding the lock left a complete
        // vector behind; keep recording into it.
        let mut ops = self.ops.lock().unwrap_or_else(|poison| poison.into_inner());
        ops.push(op);
    }

    /// How many operations so far.
    pub fn len(&self) -> usize {
        self.ops.lock().map_or(0, |ops| ops.len())
    }

    /// Whether nothing was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The history recorded so far.
    pub fn history(&self) -> History {
        let ops = self.ops.lock().unwrap_or_else(|poison| poison.into_inner());
        History { ops: ops.clone() }
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

/// Reads the rows of the node at `port` as `postgres` directly (not
/// through a proxy), bounded by 10 s.
async fn read_node<T, F>(port: u16, what: &str, read: F) -> Result<T, DrillError>
where
    F: AsyncFnOnce(&mut sqlx::PgConnection) -> Result<T, sqlx::Error>,
{
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let attempt = async {
        let mut conn = sqlx::PgConnection::connect(&url).await?;
        let rows = read(&mut conn).await?;
        let _ = conn.close().await;
        Ok::<_, sqlx::Error>(rows)
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(error)) => Err(DrillError::Facts(format!(
            "reading the {what} on port {port}: {error}"
        ))),
        Err(_) => Err(DrillError::Facts(format!(
            "reading the {what} on port {port} took longer than 10 s"
        ))),
    }
}

/// Every post on the node at `port`, read directly as `postgres`.
pub async fn posts_on(port: u16) -> Result<HashMap<i64, StoredPost>, DrillError> {
    let rows: Vec<(i64, i64, String)> = read_node(port, "posts", async |conn| {
        sqlx::query_as("select id, user_id, content from posts")
            .fetch_all(conn)
            .await
    })
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, user, content)| (id, StoredPost { user, content }))
        .collect())
}

/// Every account, and every login, on the node at `port`.
pub async fn accounts_on(
    port: u16,
) -> Result<(HashMap<i64, StoredAccount>, HashMap<i64, i64>), DrillError> {
    let accounts: Vec<(i64, String)> = read_node(port, "accounts", async |conn| {
        sqlx::query_as("select id, name from accounts")
            .fetch_all(conn)
            .await
    })
    .await?;
    let logins: Vec<(i64, i64)> = read_node(port, "logins", async |conn| {
        sqlx::query_as("select id, user_id from logins")
            .fetch_all(conn)
            .await
    })
    .await?;
    Ok((
        accounts
            .into_iter()
            .map(|(id, name)| (id, StoredAccount { name }))
            .collect(),
        logins.into_iter().collect(),
    ))
}

//! [`ReplicaTracker`]: one background task per replica server keeps its
//! replay position, timeline, heartbeat proof and health in atomics, so
//! routing a read costs a few atomic loads and no database round trip; one
//! task polls the primary; one task per replica URL looks for the servers
//! behind it ([`discovery`](super::discovery)).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use tokio::time::Instant;

use sqlx::postgres::PgConnectOptions;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::endpoint::{Admission, Endpoint};
use super::fingerprint::Fingerprint;
use super::heartbeat::Heartbeat;
use super::outages::Outages;
use super::primary::PrimaryState;
use super::probe::{self, ProbeKind};
use super::probe_conn::{ProbeConn, ProbeConnector};
use super::server::ReplicaState;

/// The most replica servers one replica set follows, over all its URLs.
pub(crate) const MAX_SERVERS: usize = 64;

/// How long a server state must have been down before it may follow
/// another server found behind its URL (a repointed address): shorter
/// outages are restarts and failovers it should come back from.
pub(crate) const REKEY_AFTER: Duration = Duration::from_secs(10);

/// Tuning for the tracker.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TrackerConfig {
    pub(crate) poll_interval: Duration,
    pub(crate) probe_timeout: Duration,
    pub(crate) max_backoff: Duration,
    /// Shortest gap between two polls of one replica when reads are waiting.
    pub(crate) min_refresh_gap: Duration,
    /// Poll interval once nothing has needed positions for [`IDLE_AFTER`].
    pub(crate) idle_poll_interval: Duration,
    /// How long a replica's replay may stand still while the primary moves
    /// before the replica counts as diverged and leaves eventual reads.
    pub(crate) stall_timeout: Duration,
    /// How often the tracker writes a heartbeat while positions are in use
    /// and none was written otherwise.
    pub(crate) heartbeat_interval: Duration,
    /// How often each replica URL is checked for servers not seen yet.
    pub(crate) discovery_interval: Duration,
}

/// How long after the last session read with a token, or the last capture,
/// the tracker slows to its idle interval.
pub(crate) const IDLE_AFTER: Duration = Duration::from_secs(5);

/// The replica servers followed, in the order they were found: append
/// only, so routing can hold `&ReplicaState` for as long as the set lives.
pub(crate) struct Servers {
    slots: Box<[OnceLock<Arc<ReplicaState>>]>,
    len: AtomicUsize,
    grow: Mutex<()>,
}

impl Servers {
    pub(crate) fn new() -> Self {
        Servers {
            slots: (0..MAX_SERVERS).map(|_| OnceLock::new()).collect(),
            len: AtomicUsize::new(0),
            grow: Mutex::new(()),
        }
    }

    /// How many servers are followed.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// The `index`th server found.
    #[inline]
    pub(crate) fn get(&self, index: usize) -> Option<&ReplicaState> {
        self.slots.get(index)?.get().map(|s| &**s)
    }

    /// Every server, in the order found.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &ReplicaState> + '_ {
        self.slots[..self.len()]
            .iter()
            .filter_map(|slot| slot.get().map(|s| &**s))
    }

    pub(crate) fn arcs(&self) -> impl Iterator<Item = &Arc<ReplicaState>> + '_ {
        self.slots[..self.len()].iter().filter_map(OnceLock::get)
    }

    pub(crate) fn push(&self, server: Arc<ReplicaState>) -> Option<Arc<ReplicaState>> {
        let _grow = self.grow.lock().unwrap_or_else(PoisonError::into_inner);
        let index = self.len.load(Ordering::Acquire);
        let slot = self.slots.get(index)?;
        slot.set(Arc::clone(&server)).ok()?;
        self.len.store(index + 1, Ordering::Release);
        Some(server)
    }
}

/// The background tracker of one replica set.
///
/// Owned by [`PgReplicaSet`](super::PgReplicaSet); it stops when the replica
/// set is shut down or its last clone is dropped.
pub struct ReplicaTracker {
    pub(crate) endpoints: Vec<Arc<Endpoint>>,
    pub(crate) servers: Servers,
    pub(crate) primary: Arc<PrimaryState>,
    /// Bumped after every poll that changed a replica's state; waiting reads
    /// re-check on each change.
    pub(crate) changed: watch::Sender<u64>,
    pub(crate) polls: AtomicU64,
    /// Reads in a wait loop now. While none is, no server waits for a
    /// position: a wait outlives no read.
    pub(crate) waiting_reads: AtomicUsize,
    /// When positions were last needed, in nanoseconds after `origin`.
    pub(crate) last_needed: AtomicU64,
    pub(crate) origin: Instant,
    /// Wakes the primary's task when the tracker leaves idle.
    pub(crate) wake_primary: Notify,
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) tasks: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) config: TrackerConfig,
    pub(crate) probe_kind: ProbeKind,
    pub(crate) probe_sql: String,
    /// The heartbeat, when replicas are proven by it.
    pub(crate) heartbeat: Option<Arc<Heartbeat>>,
    /// The tracker's own heartbeats stopped after a permanent failure
    /// (captures may still write them).
    pub(crate) periodic_heartbeat_failed: std::sync::atomic::AtomicBool,
    /// When a heartbeat was last written, by a capture or a poll.
    pub(crate) last_heartbeat: AtomicU64,
    /// Opens the tracker's own connections (sqlx's unless a driver gave
    /// its own).
    pub(crate) connector: Arc<dyn ProbeConnector>,
    /// For the tasks and pools that need the tracker back.
    pub(crate) me: Weak<ReplicaTracker>,
}

impl ReplicaTracker {
    pub(crate) fn new(
        endpoints: Vec<Arc<Endpoint>>,
        primary: Arc<PrimaryState>,
        config: TrackerConfig,
        probe_kind: ProbeKind,
        heartbeat: Option<Arc<Heartbeat>>,
        connector: Arc<dyn ProbeConnector>,
    ) -> Arc<Self> {
        let probe_sql = probe::replica_probe_sql(&probe_kind);
        let tracker = Arc::new_cyclic(|me| ReplicaTracker {
            endpoints,
            servers: Servers::new(),
            primary,
            changed: watch::channel(0).0,
            polls: AtomicU64::new(0),
            waiting_reads: AtomicUsize::new(0),
            last_needed: AtomicU64::new(0),
            origin: Instant::now(),
            wake_primary: Notify::new(),
            shutdown: watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
            config,
            probe_kind,
            probe_sql,
            heartbeat,
            periodic_heartbeat_failed: false.into(),
            last_heartbeat: AtomicU64::new(0),
            connector,
            me: me.clone(),
        });
        // Every URL gets its first server state now, named after it, so
        // status and metrics list every configured replica from the start.
        for index in 0..tracker.endpoints.len() {
            tracker.add_server(index, None);
        }
        tracker
    }

    /// Polls every replica once, looks behind every URL for more servers,
    /// then starts the background tasks.
    pub(crate) async fn start(self: &Arc<Self>, primary_conn: Option<ProbeConn>) {
        let first_polls = self.servers.arcs().cloned().map(|server| {
            let tracker = Arc::clone(self);
            async move {
                let mut conn = None;
                tracker.poll_server(&server, &mut conn).await;
                (server, conn)
            }
        });
        let polled = join_all(first_polls).await;
        for (server, conn) in polled {
            self.spawn_server(server, conn);
        }
        for index in 0..self.endpoints.len() {
            self.discover(index, 2).await;
        }
        let mut tasks = Vec::new();
        for index in 0..self.endpoints.len() {
            let tracker = Arc::clone(self);
            tasks.push(tokio::spawn(
                async move { tracker.run_discovery(index).await },
            ));
        }
        let tracker = Arc::clone(self);
        tasks.push(tokio::spawn(async move {
            tracker.run_primary(primary_conn).await
        }));
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(tasks);
    }

    /// Adds a server state behind endpoint `index`, following `found` if
    /// given (with its connection), and starts its task unless it is one of
    /// the first states [`start`](Self::start) polls itself. `None` past
    /// [`MAX_SERVERS`].
    pub(crate) fn add_server(
        &self,
        index: usize,
        found: Option<(ProbeConn, Fingerprint)>,
    ) -> Option<Arc<ReplicaState>> {
        let endpoint = &self.endpoints[index];
        let siblings = self.servers.iter().filter(|s| s.endpoint == index).count();
        let name = if siblings == 0 {
            endpoint.name.clone()
        } else {
            format!("{}#{}", endpoint.name, siblings + 1)
        };
        let me = self.me.clone();
        let known = Arc::new(move |found: &Fingerprint| {
            me.upgrade()
                .is_some_and(|tracker| tracker.server_of(index, found).is_some())
        });
        let admission = Admission::new(Arc::clone(endpoint), name.clone(), known);
        let outages = Outages::new();
        let pool = match &endpoint.source {
            super::endpoint::EndpointSource::Pool(pool) => pool.clone(),
            super::endpoint::EndpointSource::Options(_) => {
                endpoint.server_pool(Arc::clone(&admission), &outages)
            }
        };
        let server = Arc::new(ReplicaState::new(name, index, pool, admission, outages));
        let Some(server) = self.servers.push(server) else {
            tracing::error!(
                replica = %endpoint.name,
                max = MAX_SERVERS,
                "too many replica servers to follow; the new one serves no reads"
            );
            return None;
        };
        metrics::gauge!("read_after_write_replica_up", "replica" => server.name.clone()).set(0.0);
        metrics::gauge!("read_after_write_replica_diverged", "replica" => server.name.clone())
            .set(0.0);
        if let Some((conn, found)) = found {
            tracing::info!(
                replica = %server.name,
                url = %endpoint.name,
                server = %found,
                "found another server behind the replica URL; following it"
            );
            server.set_identity(found);
            self.spawn_server(Arc::clone(&server), Some(conn));
        }
        Some(server)
    }

    pub(crate) fn spawn_server(&self, server: Arc<ReplicaState>, conn: Option<ProbeConn>) {
        let Some(tracker) = self.me.upgrade() else {
            return;
        };
        let task = tokio::spawn(async move { tracker.run_server(server, conn).await });
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(task);
    }

    /// The state following `found`'s server behind endpoint `index`.
    pub(crate) fn server_of(&self, index: usize, found: &Fingerprint) -> Option<&ReplicaState> {
        self.servers
            .iter()
            .find(|s| s.endpoint == index && s.is_server(found))
    }

    pub(crate) fn server_arc_of(
        &self,
        index: usize,
        found: &Fingerprint,
    ) -> Option<&Arc<ReplicaState>> {
        self.servers
            .arcs()
            .find(|s| s.endpoint == index && s.is_server(found))
    }

    /// Records that positions are needed (a session read with a token, or a
    /// write). Leaving idle polls every node at once, so the first read after
    /// a quiet spell routes on fresh positions.
    #[inline]
    pub(crate) fn note_needed(&self) {
        let now = self.nanos();
        let before = self.last_needed.swap(now, Ordering::Relaxed);
        if now.saturating_sub(before) > IDLE_AFTER.as_nanos() as u64 {
            self.request_refresh();
            self.wake_primary.notify_one();
        }
    }

    /// The wait asked of `server`'s task, if one is due now and some read
    /// still waits (a wait left by reads that went elsewhere is dropped).
    pub(crate) fn pending_wait(
        &self,
        server: &ReplicaState,
    ) -> Option<(u64, Duration, Option<Duration>)> {
        if self.waiting_reads.load(Ordering::Acquire) == 0 {
            server.drop_wait();
            return None;
        }
        server.pending_wait(self.nanos())
    }

    /// Nanoseconds since the tracker's origin.
    pub(crate) fn nanos(&self) -> u64 {
        self.nanos_at(Instant::now())
    }

    pub(crate) fn nanos_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    pub(crate) fn idle(&self) -> bool {
        let since = self
            .nanos()
            .saturating_sub(self.last_needed.load(Ordering::Relaxed));
        since > IDLE_AFTER.as_nanos() as u64
    }

    /// The poll interval right now: fast while positions are needed, slow
    /// when idle.
    pub(crate) fn interval(&self) -> Duration {
        if self.idle() {
            self.config
                .idle_poll_interval
                .max(self.config.poll_interval)
        } else {
            self.config.poll_interval
        }
    }

    /// Asks every replica's task for an immediate poll. Requests made while a
    /// poll is running coalesce into one more poll.
    pub(crate) fn request_refresh(&self) {
        for server in self.servers.iter() {
            server.request_refresh();
        }
    }

    /// Stops every task and closes the tracker's connections; waits for them.
    pub(crate) async fn shutdown(&self) {
        self.shutdown.send_replace(true);
        loop {
            let tasks =
                std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
            if tasks.is_empty() {
                break;
            }
            for task in tasks {
                let _ = task.await;
            }
        }
    }

    /// Signals shutdown without waiting, for `Drop`.
    pub(crate) fn stop(&self) {
        self.shutdown.send_replace(true);
    }

    pub(crate) fn is_shut_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    pub(crate) fn subscribe_shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Number of replica polls made so far.
    pub(crate) fn polls(&self) -> u64 {
        self.polls.load(Ordering::Relaxed)
    }

    /// Adds a state built by hand, for tests of the rules.
    #[cfg(test)]
    pub(crate) fn servers_push_for_test(&self, state: ReplicaState) {
        self.servers.push(Arc::new(state));
    }

    pub(crate) fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// `host:port` of a node, for logs and errors.
pub(crate) fn describe(connect: &PgConnectOptions) -> String {
    format!("{}:{}", connect.get_host(), connect.get_port())
}

/// Waits for every future, in order. The tracker starts a handful of nodes,
/// so a plain sequential join of spawned tasks is enough.
async fn join_all<F, T>(futures: impl IntoIterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        if let Ok(value) = handle.await {
            out.push(value);
        }
    }
    out
}

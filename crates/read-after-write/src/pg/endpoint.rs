//! A configured replica URL ([`Endpoint`]) and the pools of the servers
//! found behind it.
//!
//! A URL may name one server or many: Aurora's `cluster-ro`, Cloud SQL and
//! AlloyDB read pools, the RDS Multi-AZ reader endpoint, DNS round robin,
//! HAProxy, a pooler with several hosts. Each new connection may land on a
//! different server, and then stays there. So the pool of each server found
//! behind a URL opens its connections through the URL and keeps only those
//! whose [`Fingerprint`] is that very server in the very incarnation the
//! tracker follows: sqlx closes a refused connection and opens another, so a
//! read routed to a server runs on that server, and a server the tracker has
//! never polled serves no read. A refused connection that reached a server
//! no state follows is a hint for discovery.
//!
//! A pool the application brought (`replica_pool`) cannot be filtered that
//! way: it is used as it is, and if the tracker finds more than one server
//! behind its address the endpoint is *indistinct*: its reads can no longer
//! be tied to a server, so it serves no session, monotonic or bounded read
//! (loudly, at once and in `check()`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::PgPool;
use tokio::sync::Notify;

use super::fingerprint::Fingerprint;
use super::outages::Outages;
use super::probe_conn::ProbeTarget;
use super::probe_sqlx;

/// Maps a node's connect options to the tracker's own (a monitoring role,
/// another URL); the identity unless one was set.
pub(crate) type TrackerOptions = Arc<dyn Fn(PgConnectOptions) -> PgConnectOptions + Send + Sync>;

/// A future the pool's admission check returns.
type AdmitFuture<'c> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), sqlx::Error>> + Send + 'c>>;

/// Settings for the pools built from URLs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PoolSettings {
    pub(crate) max_connections: u32,
    pub(crate) acquire_timeout: Duration,
}

impl PoolSettings {
    /// Pool options for one node: no test query per checkout (a round trip
    /// on every read and write); connections opened before the node's last
    /// outage are dropped on checkout and on release instead, since sqlx
    /// pings a released connection without a time bound and on a frozen
    /// node that ping never returns and the slot is lost.
    pub(crate) fn options(&self, outages: &Arc<Outages>) -> PgPoolOptions {
        let on_acquire = Arc::clone(outages);
        let on_release = Arc::clone(outages);
        PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            .test_before_acquire(false)
            .before_acquire(move |_conn, meta| {
                let keep = !on_acquire.predates_last_outage(meta.age);
                Box::pin(async move { Ok(keep) })
            })
            .after_release(move |_conn, meta| {
                let keep = !on_release.predates_last_outage(meta.age);
                Box::pin(async move { Ok(keep) })
            })
    }
}

/// Where an endpoint's connections come from.
pub(crate) enum EndpointSource {
    /// Options from a URL: the library builds one pool per server found.
    Options(Mutex<Arc<PgConnectOptions>>),
    /// A pool the application brought, used as it is for the one server it
    /// is expected to reach.
    Pool(PgPool),
}

/// One configured replica URL or pool.
pub(crate) struct Endpoint {
    pub(crate) name: String,
    pub(crate) source: EndpointSource,
    pub(crate) settings: PoolSettings,
    /// Maps the endpoint's options to the tracker's own.
    pub(crate) tracker_options: TrackerOptions,
    /// More than one server answered behind a pool the application brought:
    /// reads through it cannot be tied to a server.
    pub(crate) indistinct: AtomicBool,
    /// Fingerprints a pool met that no server state follows yet.
    hints: Mutex<Vec<Fingerprint>>,
    /// Wakes this endpoint's discovery.
    pub(crate) discover: Notify,
}

/// Whether some server state behind the endpoint follows a server.
pub(crate) type Known = Arc<dyn Fn(&Fingerprint) -> bool + Send + Sync>;

/// What the pool of one server checks each new connection against,
/// whichever driver opened it.
pub(crate) struct Admission {
    /// The incarnation the tracker follows; `None` admits nothing.
    pub(crate) identity: Mutex<Option<Fingerprint>>,
    pub(crate) endpoint: Arc<Endpoint>,
    /// The server's name, for the refusal's message.
    pub(crate) server: String,
    /// Whether any state follows a server a refused connection reached
    /// (if none does, it is a hint for discovery).
    known: Known,
}

impl Admission {
    pub(crate) fn new(endpoint: Arc<Endpoint>, server: String, known: Known) -> Arc<Self> {
        Arc::new(Admission {
            identity: Mutex::new(None),
            endpoint,
            server,
            known,
        })
    }

    /// The admission check of a new connection that reached `found`: `Ok`
    /// for the server this pool reads from, else why not. A refused
    /// connection that reached a server nobody follows is a hint for
    /// discovery.
    pub(crate) fn check(&self, found: Fingerprint) -> Result<(), String> {
        if self.admits(&found) {
            return Ok(());
        }
        let address = found.address();
        if !(self.known)(&found) {
            self.endpoint.hint(found);
        }
        Err(format!(
            "replica {}: this connection reached {address} behind the replica URL, not the server \
             this pool reads from (expected behind a reader endpoint: the pool opens another)",
            self.server
        ))
    }

    /// Whether a connection that reached `found` may serve this server:
    /// the very incarnation the tracker follows.
    pub(crate) fn admits(&self, found: &Fingerprint) -> bool {
        self.identity
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|known| known == found)
    }

    /// The server followed, if one was found.
    pub(crate) fn identity(&self) -> Option<Fingerprint> {
        self.identity
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Follows `found` from now on; returns the previous identity.
    pub(crate) fn set_identity(&self, found: Fingerprint) -> Option<Fingerprint> {
        self.identity
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(found)
    }
}

impl Endpoint {
    pub(crate) fn new(
        name: String,
        source: EndpointSource,
        settings: PoolSettings,
        tracker_options: TrackerOptions,
    ) -> Self {
        Endpoint {
            name,
            source,
            settings,
            tracker_options,
            indistinct: AtomicBool::new(false),
            hints: Mutex::new(Vec::new()),
            discover: Notify::new(),
        }
    }

    /// The options connections are opened with now (rotated credentials
    /// included).
    pub(crate) fn options(&self) -> Arc<PgConnectOptions> {
        match &self.source {
            EndpointSource::Options(options) => {
                Arc::clone(&options.lock().unwrap_or_else(PoisonError::into_inner))
            }
            EndpointSource::Pool(pool) => pool.connect_options(),
        }
    }

    /// Replaces the options new connections use (pools built here are
    /// updated by the caller).
    pub(crate) fn set_options(&self, options: PgConnectOptions) {
        match &self.source {
            EndpointSource::Options(current) => {
                *current.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(options);
            }
            EndpointSource::Pool(pool) => pool.set_connect_options(options),
        }
    }

    /// Where the tracker connects through this endpoint now: its options
    /// through the tracker's own mapping.
    pub(crate) fn probe_target(&self) -> ProbeTarget {
        ProbeTarget::replica(
            &self.name,
            (self.tracker_options)(self.options().as_ref().clone()),
        )
    }

    /// Whether the library builds a pool per server (a URL), rather than
    /// using one the application brought.
    pub(crate) fn builds_pools(&self) -> bool {
        matches!(self.source, EndpointSource::Options(_))
    }

    pub(crate) fn is_indistinct(&self) -> bool {
        self.indistinct.load(Ordering::Relaxed)
    }

    /// Marks the endpoint as reaching several servers that its pool cannot
    /// tell apart; warns once.
    pub(crate) fn mark_indistinct(&self, seen: &Fingerprint, other: &Fingerprint) {
        if !self.indistinct.swap(true, Ordering::Relaxed) {
            tracing::error!(
                replica = %self.name,
                first = %other,
                second = %seen,
                "this replica pool reaches more than one server (a reader endpoint, DNS round robin \
                 or a pooler with several hosts), and a pool you bring cannot be tied to one: it now \
                 serves only unbounded eventual reads, never a read that needs a position. Give the \
                 replica as a URL (replica_url) so the library builds a pool per server, or point the \
                 pool at one server"
            );
            metrics::gauge!("read_after_write_replica_indistinct", "replica" => self.name.clone())
                .set(1.0);
        }
    }

    /// Records a server a pool met that no state follows, and wakes
    /// discovery.
    pub(crate) fn hint(&self, found: Fingerprint) {
        let mut hints = self.hints.lock().unwrap_or_else(PoisonError::into_inner);
        if !hints.contains(&found) && hints.len() < 16 {
            hints.push(found);
        }
        drop(hints);
        self.discover.notify_one();
    }

    /// Takes the pending hints.
    pub(crate) fn take_hints(&self) -> Vec<Fingerprint> {
        std::mem::take(&mut *self.hints.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// A pool for one server behind this endpoint: lazy, opening its
    /// connections through the endpoint and keeping those `admission`
    /// admits; connections opened before the server's last outage are
    /// dropped on checkout and release instead of a test query per checkout.
    pub(crate) fn server_pool(&self, admission: Arc<Admission>, outages: &Arc<Outages>) -> PgPool {
        self.settings
            .options(outages)
            .after_connect(move |conn, _meta| admit(conn, Arc::clone(&admission)))
            .connect_lazy_with(self.options().as_ref().clone())
    }
}

/// The admission check of a new sqlx pool connection ([`Admission::check`]).
/// A refusal closes it, and sqlx opens another (so behind a reader
/// endpoint a pool takes a few tries to reach its server).
fn admit(conn: &mut PgConnection, admission: Arc<Admission>) -> AdmitFuture<'_> {
    Box::pin(async move {
        let found = probe_sqlx::fingerprint(conn).await?;
        admission
            .check(found)
            .map_err(|refusal| sqlx::Error::Configuration(refusal.into()))
    })
}

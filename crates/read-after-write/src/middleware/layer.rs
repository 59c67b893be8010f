//! [`ReadAfterWriteLayer`]: the policy settings (one setter each, and
//! [`settings`](ReadAfterWriteLayer::settings) to read them back), the
//! clusters it serves, and the startup self-check.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use tower_layer::Layer;

use super::{check, CheckContext, ReadAfterWrite, SelfCheck};
use crate::backend::{Backend, LayerSettings};
use crate::clock::Clock;
use crate::config::{
    check_cookie_name, check_domain, Cluster, ConfigError, Consistency, IdentityFn, Shared,
    DEBUG_HEADER,
};
use crate::token::{KeySet, UserId};

/// Layer that applies [`ReadAfterWrite`]: verifies affinity tokens, gives
/// handlers a [`Db`](crate::Db) handle and issues a fresh token after a
/// request writes.
///
/// Cheap to clone; every clone shares one configuration. See the
/// [module docs](crate::middleware) for an example.
pub struct ReadAfterWriteLayer<B: Backend> {
    shared: Arc<Shared<B>>,
}

impl<B: Backend> ReadAfterWriteLayer<B> {
    /// A layer over `backend`, signing and verifying with `keys`.
    ///
    /// Defaults: read-your-writes, the cookie
    /// [`DEFAULT_COOKIE_NAME`](crate::middleware::DEFAULT_COOKIE_NAME) and
    /// the header [`DEFAULT_TOKEN_HEADER`](crate::middleware::DEFAULT_TOKEN_HEADER),
    /// `ttl` [`DEFAULT_TTL`](crate::middleware::DEFAULT_TTL), `max_wait`
    /// [`DEFAULT_MAX_WAIT`](crate::middleware::DEFAULT_MAX_WAIT), cookie
    /// `Secure`, tokens bound to no user until [`identity`](Self::identity)
    /// is set.
    /// Every setting, its home and its default: the
    /// [configuration reference](crate::guide::configuration).
    pub fn new(backend: B, keys: impl Into<KeySet>) -> Self {
        Self::from_arc(Arc::new(backend), keys)
    }

    /// Like [`new`](Self::new) for a backend that is already shared, e.g.
    /// with a background task or a second layer.
    pub fn from_arc(backend: Arc<B>, keys: impl Into<KeySet>) -> Self {
        // The counters that only move on trouble exist from the start, so
        // alerts and rate() see them before the first incident.
        for name in [
            "read_after_write_writes_total",
            "read_after_write_tokens_issued_total",
            "read_after_write_writes_without_identity_total",
            "read_after_write_token_mac_budget_exhausted_total",
        ] {
            metrics::counter!(name).increment(0);
        }
        ReadAfterWriteLayer {
            shared: Arc::new(Shared::new(backend, keys.into())),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Shared<B>)) -> Self {
        let shared = Arc::make_mut(&mut self.shared);
        f(shared);
        shared.refresh();
        self
    }

    /// Binds tokens to the requester's identity, read from the request parts
    /// (headers, or extensions set by an authentication layer that runs
    /// before this one).
    ///
    /// A token whose user differs from the requester's is ignored. A request
    /// for which `identify` returns `None` gets no token and has its token
    /// ignored, unless [`allow_anonymous`](Self::allow_anonymous) is set.
    ///
    /// It runs before the handler. A handler that establishes the identity
    /// itself (sign-up, login) binds the request to the new user with
    /// [`Db::bind_user`](crate::Db::bind_user), so the response's token is
    /// theirs.
    pub fn identity<F>(self, identify: F) -> Self
    where
        F: Fn(&http::request::Parts) -> Option<UserId> + Send + Sync + 'static,
    {
        let identify: IdentityFn = Arc::new(identify);
        self.edit(|s| s.identity = Some(identify))
    }

    /// Whether requests without an identity read and receive tokens bound to
    /// the anonymous user. On by default until an identity function is set;
    /// the cookie jar itself is then what ties a token to a browser.
    pub fn allow_anonymous(self, allow: bool) -> Self {
        self.edit(|s| s.allow_anonymous = Some(allow))
    }

    /// The cookie's name, also mixed into every token's MAC (default
    /// [`DEFAULT_COOKIE_NAME`](crate::middleware::DEFAULT_COOKIE_NAME)).
    ///
    /// Consider the `__Host-` prefix (`__Host-primary_affinity`): browsers
    /// then refuse the cookie from any other subdomain, which closes the
    /// cookie-planting risk described under
    /// [`MAX_MACS_PER_REQUEST`](crate::middleware::MAX_MACS_PER_REQUEST). It
    /// needs the default `Secure` and no [`domain`](Self::domain).
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidCookieName`] when `name` is not an RFC 6265
    /// token (empty, or holding a space, a control character, non-ASCII or
    /// one of `()<>@,;:\"/[]?={}`): such a name would smuggle attributes
    /// into the `Set-Cookie` header.
    ///
    /// ```
    /// use read_after_write::middleware::ConfigError;
    /// use read_after_write::{Backend, ReadAfterWriteLayer};
    ///
    /// fn configure<B: Backend>(layer: ReadAfterWriteLayer<B>) -> Result<ReadAfterWriteLayer<B>, ConfigError> {
    ///     assert!(layer.clone().cookie_name("a=b; Domain=evil.example").is_err());
    ///     assert!(layer.clone().domain("example.com; SameSite=None").is_err());
    ///     layer.cookie_name("__Host-affinity")?.domain("app.example.com")
    /// }
    /// ```
    pub fn cookie_name(self, name: impl Into<String>) -> Result<Self, ConfigError> {
        let name = name.into();
        check_cookie_name(&name)?;
        Ok(self.edit(|s| s.cookie_name = name))
    }

    /// The request and response header that carries the token for API and
    /// gRPC clients, which send back what they were given.
    pub fn token_header(self, name: HeaderName) -> Self {
        self.edit(|s| s.token_header = Some(name))
    }

    /// Use the cookie only: no token header is read or set.
    pub fn without_token_header(self) -> Self {
        self.edit(|s| s.token_header = None)
    }

    /// How long a token stays valid, and the cookie's `Max-Age` (default
    /// [`DEFAULT_TTL`](crate::middleware::DEFAULT_TTL)).
    ///
    /// This bounds how long a user stays sticky, not how long reads go to
    /// the primary: routing is by position, so a replica that has caught up
    /// serves the user straight away. Make it longer than the worst replica
    /// lag you want to cover. With [`Consistency::TimeWindow`] it is the
    /// window: how long after a write the user's reads go to the primary.
    /// At most [`MAX_TTL`](crate::middleware::MAX_TTL) (400 days, what
    /// browsers allow a cookie): a longer one lives that long, and
    /// [`check`](Self::check) says so.
    pub fn ttl(self, ttl: Duration) -> Self {
        self.edit(|s| s.ttl = ttl)
    }

    /// The longest any session read waits for a replica to catch up before
    /// it goes to the primary (default
    /// [`DEFAULT_MAX_WAIT`](crate::middleware::DEFAULT_MAX_WAIT)). Zero
    /// means never wait. [`Db::read_within`](crate::Db::read_within) sets it
    /// per read.
    ///
    /// It is a bound, not a wait, and nothing waits longer (the one
    /// exception: a [`PrimaryBudget`](crate::pg::PrimaryBudget) over its cap
    /// lets reads wait up to its `hard_max_wait`). A backend that predicts
    /// catch-up (the default of
    /// [`PgReplicaSet`](crate::pg::PgReplicaSet)) waits only when a replica
    /// is predicted to replay the write within it, and otherwise reads from
    /// the primary at once, so a generous bound costs latency only on reads
    /// a replica then serves. See [how routing decides](crate::guide::routing)
    /// and, for choosing it, [operations](crate::guide::operations).
    pub fn max_wait(self, max_wait: Duration) -> Self {
        self.edit(|s| s.max_wait = max_wait)
    }

    /// Whether the cookie is `Secure` (default true). Turn off only for
    /// plain-HTTP development.
    pub fn secure(self, secure: bool) -> Self {
        self.edit(|s| s.secure = secure)
    }

    /// Sets the cookie's `Domain`, to share it across subdomains (default:
    /// none, the host only).
    ///
    /// # Errors
    ///
    /// [`ConfigError::InvalidDomain`] when `domain` is not a host name
    /// (letters, digits, `-` and `.`, an optional leading `.`, labels of 1 to
    /// 63 characters, at most 253 in all): a value such as
    /// `"example.com; SameSite=None"` would otherwise add attributes to the
    /// cookie.
    pub fn domain(self, domain: impl Into<String>) -> Result<Self, ConfigError> {
        let domain = domain.into();
        check_domain(&domain)?;
        Ok(self.edit(|s| s.domain = Some(domain)))
    }

    /// Adds an `x-read-after-write` response header naming the node of the
    /// last routed read, its reason and the token outcome. Off by default:
    /// it tells clients about your topology.
    pub fn debug_header(self, enabled: bool) -> Self {
        self.edit(|s| s.debug_header = enabled.then(|| HeaderName::from_static(DEBUG_HEADER)))
    }

    /// Whether requests with an unsafe method (POST, PUT, PATCH, DELETE) count
    /// as writing even if the handler never asks for
    /// [`Db::write`](crate::Db::write). Off by default.
    pub fn writes_on_unsafe_methods(self, enabled: bool) -> Self {
        self.edit(|s| s.writes_on_unsafe_methods = enabled)
    }

    /// Which consistency the layer keeps for a user's own reads (default
    /// [`Consistency::ReadYourWrites`]); see [`Consistency`] for each.
    ///
    /// ```
    /// # use read_after_write::{Backend, Consistency, KeySet, ReadAfterWriteLayer, SigningKey};
    /// # fn build<B: Backend>(backend: B) -> Result<(), read_after_write::KeyError> {
    /// let layer = ReadAfterWriteLayer::new(backend, KeySet::new(SigningKey::generate()?))
    ///     .consistency(Consistency::Monotonic);
    /// assert_eq!(layer.settings().consistency, Consistency::Monotonic);
    /// # Ok(())
    /// # }
    /// ```
    pub fn consistency(self, consistency: Consistency) -> Self {
        self.edit(|s| s.consistency = consistency)
    }

    /// The clock token expiry is checked against (default: the system clock).
    pub fn clock(self, clock: impl Clock) -> Self {
        let clock: Arc<dyn Clock> = Arc::new(clock);
        self.edit(|s| s.clock = clock)
    }

    /// Lets outgoing clients wrapped in
    /// [`ForwardTokenLayer`](crate::forward::ForwardTokenLayer) send the
    /// handled request's token downstream (off by default: it costs a
    /// reference count and a thread-local swap per poll of the handler).
    /// See [`forward`](crate::forward).
    ///
    /// ```
    /// # use read_after_write::{Backend, KeySet, ReadAfterWriteLayer, SigningKey};
    /// # fn build<B: Backend>(backend: B) -> Result<(), read_after_write::KeyError> {
    /// let layer = ReadAfterWriteLayer::new(backend, KeySet::new(SigningKey::generate()?))
    ///     .forward_tokens(true);
    /// # let _ = layer;
    /// # Ok(())
    /// # }
    /// ```
    pub fn forward_tokens(self, enabled: bool) -> Self {
        self.edit(|s| s.forward_tokens = enabled)
    }

    /// Adds another cluster (another primary with its replicas, e.g.
    /// `orders` beside `users`): handlers reach it with
    /// [`Db::cluster`](crate::Db::cluster), and one token covers every
    /// cluster the user wrote to, a bookmark each (at most
    /// [`MAX_CLUSTERS`](crate::bookmark::MAX_CLUSTERS), so the cookie stays
    /// under [`MAX_ENCODED_LEN`](crate::token::MAX_ENCODED_LEN) characters).
    /// A bookmark applies only to the cluster whose id it names.
    ///
    /// Every cluster's backend, the first one's included, must report a
    /// distinct [`cluster_id`](Backend::cluster_id) (a `PgReplicaSet` reports
    /// its system identifier).
    ///
    /// ```no_run
    /// # use read_after_write::{KeySet, ReadAfterWriteLayer, SigningKey};
    /// # use read_after_write::pg::PgReplicaSet;
    /// # async fn build(users: PgReplicaSet, orders: PgReplicaSet) -> Result<(), Box<dyn std::error::Error>> {
    /// let layer = ReadAfterWriteLayer::new(users, KeySet::new(SigningKey::generate()?))
    ///     .cluster("orders", orders)?;
    /// // In a handler: db.write() writes users; db.cluster("orders") the orders cluster.
    /// # let _ = layer;
    /// # Ok(())
    /// # }
    /// ```
    pub fn cluster(self, name: impl Into<String>, backend: B) -> Result<Self, ConfigError> {
        let name = name.into();
        let backend = Arc::new(backend);
        let id = backend.cluster_id();
        let refuse = |why| ConfigError::InvalidCluster {
            name: name.clone(),
            why,
        };
        if self.shared.clusters.len() == crate::bookmark::MAX_CLUSTERS {
            return Err(refuse("the layer has the most clusters a token covers"));
        }
        if self.shared.clusters.iter().any(|c| c.name == name) {
            return Err(refuse("another cluster has that name"));
        }
        let Some(id) = id else {
            return Err(refuse("its backend reports no cluster id"));
        };
        if self.shared.clusters[0].id.is_none() {
            return Err(refuse("the first cluster's backend reports no cluster id"));
        }
        if self.shared.clusters.iter().any(|c| c.id == Some(id)) {
            return Err(refuse(
                "another cluster has the same id (the same database?)",
            ));
        }
        Ok(self.edit(|s| {
            s.clusters.push(Cluster {
                name,
                backend,
                id: Some(id),
            })
        }))
    }

    /// The most a replica may lag for [`Db::eventual`](crate::Db::eventual)
    /// reads (none by default): beyond it a replica leaves eventual reads,
    /// and when every replica is beyond it the primary serves them
    /// (`reason="too_stale"`). It holds with monotonic reads too (a session
    /// leaves a replica that fell further behind, through the primary).
    /// Passed to [`Backend::eventual_within`] and [`Backend::monotonic`];
    /// [`Db::eventual_within`](crate::Db::eventual_within) sets it per call.
    ///
    /// There is no default bound because it moves every eventual read to
    /// the primary exactly when replicas fall behind, which is often when the
    /// primary is busiest: choose it knowing the primary can take that load.
    /// A bound at or below the token's `ttl` keeps a user whose token has
    /// expired from reading a replica that lacks their write.
    ///
    /// ```
    /// # use read_after_write::{Backend, KeySet, ReadAfterWriteLayer, SigningKey};
    /// # use std::time::Duration;
    /// # fn build<B: Backend>(backend: B) -> Result<(), read_after_write::KeyError> {
    /// let layer = ReadAfterWriteLayer::new(backend, KeySet::new(SigningKey::generate()?))
    ///     .max_staleness(Duration::from_secs(5));
    /// # let _ = layer;
    /// # Ok(())
    /// # }
    /// ```
    pub fn max_staleness(self, max_staleness: Duration) -> Self {
        self.edit(|s| s.max_staleness = Some(max_staleness))
    }

    /// The backend this layer routes over.
    pub fn backend(&self) -> &Arc<B> {
        &self.shared.backend
    }

    /// The settings in effect: `max_wait`, `ttl` (as tokens get it),
    /// `consistency` and `max_staleness`.
    ///
    /// ```
    /// # use read_after_write::{Backend, KeySet, ReadAfterWriteLayer, SigningKey};
    /// use read_after_write::middleware::{DEFAULT_MAX_WAIT, DEFAULT_TTL};
    /// # fn build<B: Backend>(backend: B) -> Result<(), read_after_write::KeyError> {
    /// let layer = ReadAfterWriteLayer::new(backend, KeySet::new(SigningKey::generate()?));
    /// assert_eq!(layer.settings().max_wait, DEFAULT_MAX_WAIT);
    /// assert_eq!(layer.settings().ttl, DEFAULT_TTL);
    /// # Ok(())
    /// # }
    /// ```
    pub fn settings(&self) -> LayerSettings {
        check::settings(&self.shared)
    }

    /// A startup self-check: what in this configuration, and in the
    /// backend's present state, would quietly cost consistency or send reads
    /// to the primary, each [finding](crate::backend::Finding) with a
    /// severity and a message that says what to do.
    ///
    /// The layer's own findings: a `Secure` cookie for an app served over
    /// plain HTTP (say how it is served with
    /// [`CheckContext::served_over_https`]; unsaid, `Secure` is reported as
    /// information), a `__Host-`/`__Secure-` cookie name browsers would
    /// refuse, no identity function while anonymous tokens are off (no one
    /// ever gets a token), the debug header, time-window mode and a zero
    /// `max_wait`. Then the backend's, from
    /// [`Backend::diagnose`]: for [`PgReplicaSet`](crate::pg::PgReplicaSet),
    /// the primary's and each replica's health, a replica role that cannot
    /// see timelines (no `pg_monitor`) while no heartbeat table is in use
    /// (nothing proves what a replica holds, so every read with a token
    /// goes to the primary), and replica lag beyond `max_wait` or the token
    /// TTL. Lag is a snapshot: run the check after the backend has
    /// connected, and again from an operator endpoint if you like.
    ///
    /// What no startup check can see is the order of layers: whether the
    /// authentication layer runs before this one, so that the identity
    /// function finds the user. That shows at runtime: a request that writes
    /// while the identity function returns `None` logs a warning (at most
    /// once a minute per layer) and counts in
    /// `read_after_write_writes_without_identity_total`.
    ///
    /// Sends no request through the service and changes nothing.
    ///
    /// # Example
    ///
    /// ```
    /// use read_after_write::backend::Severity;
    /// use read_after_write::middleware::CheckContext;
    /// use read_after_write::{KeySet, ReadAfterWriteLayer, SigningKey};
    /// # use read_after_write::{Backend, Lsn, RouteReason, Routed, WritePosition};
    /// # use std::time::Duration;
    /// # #[derive(Default)]
    /// # struct MyBackend { pool: () }
    /// # impl Backend for MyBackend {
    /// #     type Pool = ();
    /// #     type Error = std::io::Error;
    /// #     fn primary(&self) -> &() { &self.pool }
    /// #     fn eventual(&self) -> Routed<'_, ()> { Routed::replica(&self.pool, "replica-1", RouteReason::Eventual) }
    /// #     async fn session(&self, _: WritePosition, _: Duration) -> Routed<'_, ()> {
    /// #         Routed::replica(&self.pool, "replica-1", RouteReason::CaughtUp)
    /// #     }
    /// #     async fn write_position(&self) -> Result<WritePosition, std::io::Error> {
    /// #         Ok(WritePosition::new(Lsn::new(0x1000), 1, 7))
    /// #     }
    /// # }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let keys = KeySet::from(SigningKey::from_bytes(&[7; 32])?);
    /// let layer = ReadAfterWriteLayer::new(MyBackend::default(), keys)
    ///     .identity(|parts| parts.extensions.get::<read_after_write::UserId>().cloned());
    ///
    /// // Served over plain HTTP, but the cookie is `Secure` (the default).
    /// let check = layer.check(CheckContext::new().served_over_https(false)).await;
    /// check.log(); // or print it: one line per finding, worst first
    /// assert!(!check.is_ok());
    /// assert_eq!(check.worst(), Some(Severity::Warning));
    /// assert_eq!(check.findings()[0].code(), "secure_cookie_over_http");
    ///
    /// let check = layer.check(CheckContext::new().served_over_https(true)).await;
    /// assert!(check.is_ok(), "{check}");
    /// # Ok(())
    /// # }
    /// ```
    pub async fn check(&self, context: CheckContext) -> SelfCheck {
        check::run(&self.shared, context).await
    }
}

impl<B: Backend> Clone for ReadAfterWriteLayer<B> {
    fn clone(&self) -> Self {
        ReadAfterWriteLayer {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<B: Backend> fmt::Debug for ReadAfterWriteLayer<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadAfterWriteLayer")
            .field("config", &self.shared)
            .finish()
    }
}

impl<S, B: Backend> Layer<S> for ReadAfterWriteLayer<B> {
    type Service = ReadAfterWrite<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        ReadAfterWrite::from_shared(inner, Arc::clone(&self.shared))
    }
}

//! The layer's configuration, shared by the layer, every service it builds
//! and every request's handle: the settings, their defaults, and what is
//! derived from them (the `Set-Cookie` template).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cookie::{Cookie, SameSite};
use http::header::HeaderName;

use crate::clock::{Clock, SystemClock};
use crate::token::{KeySet, UserId};

/// The longest token lifetime honoured: 400 days, the cap RFC 6265bis
/// (§5.5) tells browsers to apply to `Max-Age` and `Expires`. Longer TTLs,
/// `Duration::MAX` included, are clamped to it.
pub(crate) const MAX_TTL_SECONDS: u64 = 400 * 24 * 60 * 60;

/// Name of the affinity cookie unless configured otherwise.
pub const DEFAULT_COOKIE_NAME: &str = "primary_affinity";
/// Name of the token header for API and gRPC clients unless configured
/// otherwise. Lower case, so it is also valid gRPC metadata.
pub const DEFAULT_TOKEN_HEADER: &str = "x-primary-affinity";
/// Name of the optional debug response header.
pub const DEBUG_HEADER: &str = "x-read-after-write";

/// The most token MACs one request can cost, whatever it carries and
/// whatever the key list.
///
/// Every MAC computed counts: a token's key id is one byte, so when several
/// keys of the [`KeySet`] share an id a token is tried under each of them,
/// a MAC apiece. Only candidates that pass every cheap check and name the
/// requester get that far (see the [module docs](crate::middleware#hostile-requests)). A
/// legitimate request carries a handful: a host-only cookie, domain cookies
/// for a parent domain or two, one per `Path`, and the header. 16 leaves
/// room for all of them while capping the work at about 4 µs (16 × ~240 ns
/// per MAC), less than parsing the headers.
///
/// Residual risk: whoever can set cookies for this site (a sibling
/// subdomain, for a cookie without the `__Host-` prefix) can plant well
/// formed tokens naming a victim's user id (ids are often guessable) with a
/// far expiry, and:
///
/// - with a known key id (visible in any token), 16 of them sent ahead of
///   the real cookie (a longer `Path` is sent first) use up the budget
///   before the real token is checked;
/// - with a key id the layer does not know, one of them looks like a token
///   from an instance that rotated keys first.
///
/// Neither verifies, and neither hides what the real token promised: the
/// clusters an unread token names are read from the primary (unknown means
/// unsafe) and pinned in the tokens the victim's responses issue (see
/// [what an issued token keeps](crate::middleware#what-an-issued-token-keeps)). Planted
/// tokens naming more clusters than a token holds make those tokens pin
/// every cluster, so all the victim's session reads go to the primary until
/// a write of theirs captures a position. The cost is primary reads for as
/// long as the planted cookies live, counted by
/// `read_after_write_token_mac_budget_exhausted_total` and
/// `read_after_write_tokens_total{outcome="unknown_key"}`, never a stale
/// read or a forged one. To shut all of this out, name the cookie with the
/// `__Host-` prefix (`__Host-primary_affinity`, with `Secure`, `Path=/` and
/// no `Domain`, which the layer's defaults give), which no other subdomain
/// can set.
pub const MAX_MACS_PER_REQUEST: usize = 16;

/// The longest token lifetime and cookie `Max-Age` honoured: 400 days, the
/// cap RFC 6265bis tells browsers to apply. Longer settings of
/// [`ttl`](crate::ReadAfterWriteLayer::ttl) are capped at it.
pub const MAX_TTL: Duration = Duration::from_secs(MAX_TTL_SECONDS);

/// A configuration value the layer refuses, so that a misconfiguration fails
/// at startup instead of silently on every response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The cookie name is not an RFC 6265 token.
    #[error(
        "cookie name {name:?} is not valid: use one or more visible ASCII characters \
         other than spaces and ( ) < > @ , ; : \\ \" / [ ] ? = {{ }}, for example `primary_affinity`"
    )]
    InvalidCookieName {
        /// The rejected name.
        name: String,
    },
    /// The cookie domain is not a host name.
    #[error(
        "cookie domain {domain:?} is not a host name: use letters, digits, '-' and '.' only \
         (an optional leading '.', labels of 1 to 63 characters, at most 253 in all, \
         punycode for international names), for example `example.com`"
    )]
    InvalidDomain {
        /// The rejected domain.
        domain: String,
    },
    /// A cluster added to a layer over several clusters cannot be told
    /// apart from the others.
    #[error(
        "cluster {name:?} cannot join this layer: {why}. Each cluster of one layer needs a \
         distinct name and a backend that reports its cluster id (PgReplicaSet does: its \
         system identifier), and one token covers at most {max} clusters",
        max = crate::bookmark::MAX_CLUSTERS
    )]
    InvalidCluster {
        /// The cluster's name.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
}

pub(crate) type IdentityFn = Arc<dyn Fn(&http::request::Parts) -> Option<UserId> + Send + Sync>;

/// How long a token lives unless [`ttl`](crate::ReadAfterWriteLayer::ttl)
/// says otherwise: 30 s. It bounds how long a user stays sticky, not how
/// long reads go to the primary (routing is by position).
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// The longest a session read waits for a replica unless
/// [`max_wait`](crate::ReadAfterWriteLayer::max_wait) says otherwise: 50 ms.
/// A bound, not a wait: with predicted routing (the default of
/// [`PgReplicaSet`](crate::pg::PgReplicaSet)) it is spent only on reads a
/// replica is expected to serve within it.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_millis(50);

/// Which consistency the layer keeps for a user's own reads; set with
/// [`ReadAfterWriteLayer::consistency`](crate::ReadAfterWriteLayer::consistency).
///
/// ```
/// use read_after_write::Consistency;
///
/// assert_eq!(Consistency::default(), Consistency::ReadYourWrites);
/// assert_eq!(Consistency::Monotonic.as_str(), "monotonic");
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Consistency {
    /// A user sees their own writes: tokens carry the position of the
    /// user's last write, and session reads go to a replica that provably
    /// replayed it (waiting at most `max_wait`), else the primary. The
    /// default.
    #[default]
    ReadYourWrites,
    /// Read-your-writes, and a session never sees the database go back in
    /// time, across requests, tabs and web instances: tokens also name the
    /// replica the session read, and it stays there (see
    /// [monotonic reads](crate::middleware#monotonic-reads) for the rule and
    /// its cost).
    Monotonic,
    /// For backends that cannot report write positions: for the token's
    /// [`ttl`](crate::ReadAfterWriteLayer::ttl) after a write, the user's
    /// session reads go to the primary. No position is captured; it costs
    /// far more primary reads than the other two.
    TimeWindow,
}

impl Consistency {
    /// `read_your_writes`, `monotonic` or `time_window`.
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::ReadYourWrites => "read_your_writes",
            Consistency::Monotonic => "monotonic",
            Consistency::TimeWindow => "time_window",
        }
    }
}

/// Configuration shared by the layer, every service it builds and every
/// request's handle.
pub(crate) struct Shared<B> {
    /// The first cluster's backend, `clusters[0]`.
    pub(crate) backend: Arc<B>,
    /// Every cluster, the first one (named [`DEFAULT_CLUSTER`]) included.
    pub(crate) clusters: Vec<Cluster<B>>,
    pub(crate) keys: KeySet,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) identity: Option<IdentityFn>,
    /// `None`: allowed exactly when no identity function is set.
    pub(crate) allow_anonymous: Option<bool>,
    pub(crate) cookie_name: String,
    pub(crate) token_header: Option<HeaderName>,
    pub(crate) ttl: Duration,
    pub(crate) max_wait: Duration,
    pub(crate) secure: bool,
    pub(crate) domain: Option<String>,
    pub(crate) debug_header: Option<HeaderName>,
    pub(crate) writes_on_unsafe_methods: bool,
    pub(crate) consistency: Consistency,
    /// `Set-Cookie` text before and after the token, derived from the fields
    /// above by [`Shared::refresh`].
    pub(crate) set_cookie: (String, String),
    /// Finds `cookie_name` in `Cookie` headers, derived by
    /// [`Shared::refresh`]: built once, not per request.
    pub(crate) cookie_finder: memchr::memmem::Finder<'static>,
    /// Rate limit of the "wrote without an identity" warning: one per layer
    /// per [`Throttle::INTERVAL_SECONDS`], however many requests hit it.
    pub(crate) no_identity_warning: Throttle,
    /// Outgoing clients with [`ForwardTokenLayer`](crate::forward::ForwardTokenLayer)
    /// see the request being handled.
    pub(crate) forward_tokens: bool,
    /// The staleness bound of [`Db::eventual`](crate::Db::eventual), if any,
    /// with monotonic reads too.
    pub(crate) max_staleness: Option<Duration>,
}

/// The name of a layer's first cluster, the one [`Db`](crate::Db)'s
/// methods use unless [`Db::cluster`](crate::Db::cluster) picks another.
pub const DEFAULT_CLUSTER: &str = "default";

/// One cluster of a layer.
pub(crate) struct Cluster<B> {
    pub(crate) name: String,
    pub(crate) backend: Arc<B>,
    /// The backend's cluster id, asked once.
    pub(crate) id: Option<u64>,
}

impl<B> Clone for Cluster<B> {
    fn clone(&self) -> Self {
        Cluster {
            name: self.name.clone(),
            backend: Arc::clone(&self.backend),
            id: self.id,
        }
    }
}

/// Lets an event through at most once per [`INTERVAL_SECONDS`] of the
/// layer's clock, so a misconfiguration that every request hits is loud once
/// a minute, not a flood.
///
/// [`INTERVAL_SECONDS`]: Self::INTERVAL_SECONDS
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    /// Unix second from which the next event may pass; 0: never passed.
    next: AtomicU64,
}

impl Throttle {
    pub(crate) const INTERVAL_SECONDS: u64 = 60;

    /// Whether an event at `now` (Unix seconds) may pass. Of callers racing
    /// for one slot, exactly one wins. A clock set back by more than an
    /// interval reopens the slot instead of silencing events until it
    /// catches up.
    pub(crate) fn allow(&self, now: u64) -> bool {
        let next = self.next.load(Ordering::Relaxed);
        let open = now >= next || next > now.saturating_add(Self::INTERVAL_SECONDS);
        open && self
            .next
            .compare_exchange(
                next,
                now.saturating_add(Self::INTERVAL_SECONDS),
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
    }
}

impl<B: crate::Backend> Shared<B> {
    pub(crate) fn new(backend: Arc<B>, keys: KeySet) -> Self {
        let mut shared = Shared {
            clusters: vec![Cluster {
                name: DEFAULT_CLUSTER.to_owned(),
                id: backend.cluster_id(),
                backend: Arc::clone(&backend),
            }],
            backend,
            keys,
            clock: Arc::new(SystemClock),
            identity: None,
            allow_anonymous: None,
            cookie_name: DEFAULT_COOKIE_NAME.to_owned(),
            token_header: Some(HeaderName::from_static(DEFAULT_TOKEN_HEADER)),
            ttl: DEFAULT_TTL,
            max_wait: DEFAULT_MAX_WAIT,
            secure: true,
            domain: None,
            debug_header: None,
            writes_on_unsafe_methods: false,
            consistency: Consistency::ReadYourWrites,
            set_cookie: (String::new(), String::new()),
            cookie_finder: memchr::memmem::Finder::new(DEFAULT_COOKIE_NAME).into_owned(),
            no_identity_warning: Throttle::default(),
            forward_tokens: false,
            max_staleness: None,
        };
        shared.refresh();
        shared
    }
}

impl<B> Shared<B> {
    /// With monotonic reads.
    #[inline]
    pub(crate) fn monotonic(&self) -> bool {
        self.consistency == Consistency::Monotonic
    }

    /// In time-window mode: tokens carry no position.
    #[inline]
    pub(crate) fn time_window(&self) -> bool {
        self.consistency == Consistency::TimeWindow
    }

    /// Recomputes what is derived from the configuration.
    pub(crate) fn refresh(&mut self) {
        self.set_cookie = set_cookie_template(self);
        self.cookie_finder = memchr::memmem::Finder::new(&self.cookie_name).into_owned();
    }

    /// The requester's identity; `None` means no token may be read or issued.
    ///
    /// An identity function that answers with the empty (anonymous) id has
    /// found no one: that request is anonymous, and gets the anonymous id
    /// only when anonymous tokens are allowed.
    pub(crate) fn identify(&self, parts: &http::request::Parts) -> Option<UserId> {
        self.admit(self.identity.as_ref().and_then(|identify| identify(parts)))
    }

    /// `user` as a request's identity: the empty (anonymous) id, like no id,
    /// is the anonymous id where anonymous tokens are allowed and no one
    /// otherwise. Shared by the identity function and
    /// [`Db::bind_user`](crate::Db::bind_user).
    pub(crate) fn admit(&self, user: Option<UserId>) -> Option<UserId> {
        let anonymous_ok = self.allow_anonymous.unwrap_or(self.identity.is_none());
        let found = user.filter(|user| !user.is_anonymous());
        found.or_else(|| anonymous_ok.then(UserId::anonymous))
    }
}

impl<B> Clone for Shared<B> {
    fn clone(&self) -> Self {
        Shared {
            backend: Arc::clone(&self.backend),
            clusters: self.clusters.clone(),
            keys: self.keys.clone(),
            clock: Arc::clone(&self.clock),
            identity: self.identity.clone(),
            allow_anonymous: self.allow_anonymous,
            cookie_name: self.cookie_name.clone(),
            token_header: self.token_header.clone(),
            ttl: self.ttl,
            max_wait: self.max_wait,
            secure: self.secure,
            domain: self.domain.clone(),
            debug_header: self.debug_header.clone(),
            writes_on_unsafe_methods: self.writes_on_unsafe_methods,
            consistency: self.consistency,
            set_cookie: self.set_cookie.clone(),
            cookie_finder: self.cookie_finder.clone(),
            no_identity_warning: Throttle::default(),
            forward_tokens: self.forward_tokens,
            max_staleness: self.max_staleness,
        }
    }
}

impl<B> fmt::Debug for Shared<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("keys", &self.keys)
            .field("identity", &self.identity.as_ref().map(|_| "<fn>"))
            .field("allow_anonymous", &self.allow_anonymous)
            .field("cookie_name", &self.cookie_name)
            .field("token_header", &self.token_header)
            .field("ttl", &self.ttl)
            .field("max_wait", &self.max_wait)
            .field("secure", &self.secure)
            .field("domain", &self.domain)
            .field("debug_header", &self.debug_header.is_some())
            .field("writes_on_unsafe_methods", &self.writes_on_unsafe_methods)
            .field("consistency", &self.consistency)
            .field("max_staleness", &self.max_staleness)
            .finish_non_exhaustive()
    }
}

/// The `Set-Cookie` text around the token, `("name=", "; HttpOnly; ...")`,
/// rendered once per configuration by the `cookie` crate so the per-write
/// path only concatenates.
pub(crate) fn set_cookie_template<B>(shared: &Shared<B>) -> (String, String) {
    const PLACEHOLDER: &str = "TOKEN";
    let mut cookie = Cookie::build((shared.cookie_name.as_str(), PLACEHOLDER))
        .http_only(true)
        .secure(shared.secure)
        .same_site(SameSite::Lax)
        .path("/")
        .max_age(cookie::time::Duration::seconds(ttl_seconds(shared)));
    if let Some(domain) = &shared.domain {
        cookie = cookie.domain(domain.as_str());
    }
    let rendered = cookie.build().to_string();
    let prefix = format!("{}=", shared.cookie_name);
    match rendered
        .strip_prefix(&prefix)
        .and_then(|rest| rest.strip_prefix(PLACEHOLDER))
    {
        Some(suffix) => (prefix, suffix.to_owned()),
        // The cookie crate quoted or escaped the name: fall back to its
        // rendering with the placeholder kept out of the value.
        None => (
            prefix,
            rendered
                .split_once(';')
                .map_or(String::new(), |(_, rest)| format!(";{rest}")),
        ),
    }
}

/// The token lifetime in whole seconds, rounded up, as `Max-Age` uses it:
/// at least 1, at most [`MAX_TTL_SECONDS`], whatever was configured.
pub(crate) fn ttl_seconds<B>(shared: &Shared<B>) -> i64 {
    let ttl = shared.ttl;
    let seconds = ttl
        .as_secs()
        .saturating_add(u64::from(ttl.subsec_nanos() > 0))
        .clamp(1, MAX_TTL_SECONDS);
    // 400 days fits an i64 many times over; the fallback is never taken.
    i64::try_from(seconds).unwrap_or(1)
}

/// Checks a configured cookie name: an RFC 6265 `token` (RFC 9110 §5.6.2),
/// one or more visible ASCII characters other than the separators.
pub(crate) fn check_cookie_name(name: &str) -> Result<(), ConfigError> {
    const SEPARATORS: &[u8] = b"()<>@,;:\\\"/[]?={} \t";
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !SEPARATORS.contains(&b));
    if valid {
        Ok(())
    } else {
        Err(ConfigError::InvalidCookieName {
            name: name.to_owned(),
        })
    }
}

/// Checks a configured cookie domain: a host name of letters, digits, `-`
/// and `.`, with an optional leading `.`, labels of 1 to 63 characters that
/// neither start nor end with `-`, at most 253 characters in all.
pub(crate) fn check_domain(domain: &str) -> Result<(), ConfigError> {
    let host = domain.strip_prefix('.').unwrap_or(domain);
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if valid {
        Ok(())
    } else {
        Err(ConfigError::InvalidDomain {
            domain: domain.to_owned(),
        })
    }
}

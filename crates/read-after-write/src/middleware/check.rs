//! The startup self-check: what in the layer's configuration and the
//! backend's state would quietly cost consistency or primary load.
//!
//! Run by [`ReadAfterWriteLayer::check`](super::ReadAfterWriteLayer::check).

use std::fmt;
use std::time::Duration;

use crate::backend::{Backend, Finding, LayerSettings, Severity};
use crate::config::{ttl_seconds, Shared};

/// What the layer cannot know about how the app is served, for
/// [`ReadAfterWriteLayer::check`](super::ReadAfterWriteLayer::check).
///
/// ```
/// use read_after_write::middleware::CheckContext;
///
/// let context = CheckContext::new().served_over_https(true);
/// # let _ = context;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckContext {
    /// `None` until the caller says: findings about `Secure` are then
    /// informational.
    https: Option<bool>,
}

impl CheckContext {
    /// A context that knows nothing about how the app is served.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether browsers reach the app over HTTPS (at the TLS terminator, if
    /// a proxy in front of the app terminates it). Decides whether the
    /// cookie's `Secure` setting is a warning.
    pub fn served_over_https(mut self, https: bool) -> Self {
        self.https = Some(https);
        self
    }
}

/// The findings of a self-check, worst first.
///
/// [`is_ok`](Self::is_ok) when nothing is a warning or an error. `Display`
/// writes one line per finding (nothing at all when there is none), ready
/// for a log or a terminal; [`log`](Self::log) sends each through `tracing`
/// at its severity.
///
/// ```
/// use read_after_write::backend::{Finding, Severity};
/// use read_after_write::middleware::SelfCheck;
///
/// let check = SelfCheck::from(vec![
///     Finding::info("debug_header_on", "turn the debug header off in production"),
///     Finding::warning("no_healthy_replica", "no replica is healthy"),
/// ]);
/// assert!(!check.is_ok());
/// assert_eq!(check.worst(), Some(Severity::Warning));
/// assert_eq!(
///     check.to_string(),
///     "warning: no replica is healthy [no_healthy_replica]\n\
///      info: turn the debug header off in production [debug_header_on]\n"
/// );
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SelfCheck {
    /// Sorted by severity, worst first; otherwise in the order found.
    findings: Vec<Finding>,
}

impl SelfCheck {
    /// Every finding, worst first.
    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    /// Whether no finding is a [warning](Severity::Warning) or an
    /// [error](Severity::Error).
    pub fn is_ok(&self) -> bool {
        self.worst().is_none_or(|worst| worst < Severity::Warning)
    }

    /// The most severe finding's severity; `None` without findings.
    pub fn worst(&self) -> Option<Severity> {
        self.findings.first().map(Finding::severity)
    }

    /// Logs every finding through `tracing`: errors at `ERROR`, warnings at
    /// `WARN`, the rest at `INFO`, each with its `code` as a field.
    pub fn log(&self) {
        for finding in &self.findings {
            let (code, message) = (finding.code(), finding.message());
            match finding.severity() {
                Severity::Error => tracing::error!(code, "{message}"),
                Severity::Warning => tracing::warn!(code, "{message}"),
                _ => tracing::info!(code, "{message}"),
            }
        }
    }

    /// The findings, worst first.
    pub fn into_findings(self) -> Vec<Finding> {
        self.findings
    }
}

impl From<Vec<Finding>> for SelfCheck {
    fn from(mut findings: Vec<Finding>) -> Self {
        // Stable: equal severities keep the order they were found in.
        findings.sort_by_key(|finding| std::cmp::Reverse(finding.severity()));
        SelfCheck { findings }
    }
}

impl fmt::Display for SelfCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for finding in &self.findings {
            writeln!(f, "{finding}")?;
        }
        Ok(())
    }
}

impl IntoIterator for SelfCheck {
    type Item = Finding;
    type IntoIter = std::vec::IntoIter<Finding>;

    fn into_iter(self) -> Self::IntoIter {
        self.findings.into_iter()
    }
}

impl<'a> IntoIterator for &'a SelfCheck {
    type Item = &'a Finding;
    type IntoIter = std::slice::Iter<'a, Finding>;

    fn into_iter(self) -> Self::IntoIter {
        self.findings.iter()
    }
}

/// The layer's findings, then the backend's.
pub(crate) async fn run<B: Backend>(shared: &Shared<B>, context: CheckContext) -> SelfCheck {
    let mut findings = configuration(shared, context);
    let settings = settings(shared);
    // Every cluster's backend, each finding naming its cluster when there
    // are several.
    let several = shared.clusters.len() > 1;
    for cluster in &shared.clusters {
        for finding in cluster.backend.diagnose(&settings).await {
            findings.push(if several {
                Finding::new(
                    finding.severity(),
                    finding.code(),
                    format!("cluster {}: {}", cluster.name, finding.message()),
                )
            } else {
                finding
            });
        }
    }
    SelfCheck::from(findings)
}

/// The layer's settings as backends weigh their state against them.
pub(crate) fn settings<B>(shared: &Shared<B>) -> LayerSettings {
    let mut settings = LayerSettings::new(
        shared.max_wait,
        Duration::from_secs(ttl_seconds(shared).unsigned_abs()),
    );
    settings.uses_positions = !shared.time_window();
    settings.consistency = shared.consistency;
    settings.max_staleness = shared.max_staleness;
    settings
}

/// What the configuration alone shows.
fn configuration<B>(shared: &Shared<B>, context: CheckContext) -> Vec<Finding> {
    let mut findings = Vec::new();
    let name = &shared.cookie_name;
    match (shared.secure, context.https) {
        (true, Some(false)) => findings.push(Finding::warning(
            "secure_cookie_over_http",
            format!(
                "the {name} cookie is Secure, and browsers send a Secure cookie back only over \
                 HTTPS: served over plain HTTP, no browser request carries its token, so users may \
                 not see their own writes; serve over HTTPS, or set .secure(false) for plain-HTTP \
                 development"
            ),
        )),
        (true, None) => findings.push(Finding::info(
            "secure_cookie",
            format!(
                "the {name} cookie is Secure: browsers send it back only over HTTPS; for \
                 plain-HTTP development set .secure(false) (tell the check how the app is served \
                 with CheckContext::served_over_https)"
            ),
        )),
        (false, Some(true)) => findings.push(Finding::warning(
            "insecure_cookie_over_https",
            format!(
                "the {name} cookie is not Secure although the app is served over HTTPS: browsers \
                 also send it over plain HTTP, where it can be read or planted; remove \
                 .secure(false)"
            ),
        )),
        (false, None) => findings.push(Finding::info(
            "insecure_cookie",
            format!(
                "the {name} cookie is not Secure: right for plain-HTTP development only; remove \
                 .secure(false) where the app is served over HTTPS"
            ),
        )),
        (true, Some(true)) | (false, Some(false)) => {}
    }
    if let Some(refused) = prefix_rule_broken(shared) {
        findings.push(Finding::error(
            "cookie_prefix_refused",
            format!("browsers refuse the {name} cookie: {refused}"),
        ));
    }
    match (&shared.identity, shared.allow_anonymous) {
        (None, Some(false)) => findings.push(Finding::error(
            "no_identity_no_anonymous",
            "no identity function is set and anonymous tokens are disabled \
             (allow_anonymous(false)): no request can ever get a token; set .identity(..) to \
             bind tokens to your users, or allow anonymous tokens",
        )),
        (None, _) => findings.push(Finding::info(
            "anonymous_tokens",
            "no identity function is set: tokens are bound to no user, so a browser's token \
             serves whoever uses that browser; set .identity(..) to bind them to your \
             authenticated users",
        )),
        (Some(_), _) => findings.push(Finding::info(
            "layer_order_unchecked",
            "an identity function is set: the authentication layer must run before this one \
             (outside it: added after it with Router::layer), which no startup check can see; \
             a request that writes without an identity logs a warning (at most once a minute) \
             and counts in read_after_write_writes_without_identity_total",
        )),
    }
    if shared.debug_header.is_some() {
        findings.push(Finding::info(
            "debug_header_on",
            "the x-read-after-write debug header is on: it tells clients your node names and \
             routing; turn it off in production",
        ));
    }
    if shared.time_window() {
        findings.push(Finding::info(
            "time_window_mode",
            format!(
                "time-window mode: each user's session reads go to the primary for the token's \
                 ttl ({:?}) after their write, whatever the replicas have replayed; \
                 read-your-writes (the default) sends far fewer reads to the primary",
                shared.ttl
            ),
        ));
    } else if shared.max_wait.is_zero() {
        findings.push(Finding::info(
            "no_wait",
            "max_wait is zero: a session read whose replicas have not caught up goes to the \
             primary at once; a few milliseconds of wait usually keep it on a replica",
        ));
    }
    if shared.ttl > crate::config::MAX_TTL {
        findings.push(Finding::info(
            "ttl_capped",
            format!(
                "ttl {:?} is longer than browsers keep a cookie; tokens and cookies live {:?} \
                 (MAX_TTL)",
                shared.ttl,
                crate::config::MAX_TTL
            ),
        ));
    }
    findings
}

/// Why browsers would refuse the cookie under its `__Host-` or `__Secure-`
/// name prefix (RFC 6265bis §4.1.3, matched without regard to case), if
/// they would. The layer always sets `Path=/`.
fn prefix_rule_broken<B>(shared: &Shared<B>) -> Option<&'static str> {
    let name = shared.cookie_name.as_bytes();
    let has_prefix = |prefix: &str| {
        name.len() >= prefix.len() && name[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
    };
    if has_prefix("__Host-") {
        if !shared.secure {
            return Some("a __Host- cookie must be Secure; remove .secure(false) or the prefix");
        }
        if shared.domain.is_some() {
            return Some("a __Host- cookie must have no Domain; remove .domain(..) or the prefix");
        }
    } else if has_prefix("__Secure-") && !shared.secure {
        return Some("a __Secure- cookie must be Secure; remove .secure(false) or the prefix");
    }
    None
}

//! The URLs a driver's pools and probe connections open through, which
//! [`ReplicaPools::update_urls`](super::driver::ReplicaPools::update_urls)
//! may replace while they run (rotating credentials).

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};

/// The URL of each node of a [`ReplicaPools`](super::driver::ReplicaPools), as
/// [`ReplicaPools::update_urls`](super::driver::ReplicaPools::update_urls) leaves it: what a driver's
/// [`ProbeConnector`](super::probe_conn::ProbeConnector) connects through ([`Driver::probe_connector`](super::driver::Driver::probe_connector)).
///
/// ```
/// use read_after_write::pg::driver::{NodeUrls, ProbeTarget};
/// fn url_of(urls: &NodeUrls, target: &ProbeTarget) -> Option<String> {
///     urls.url(target.node()).map(|url| url.to_string())
/// }
/// # let _ = url_of;
/// ```
#[derive(Clone)]
pub struct NodeUrls {
    primary: UrlCell,
    /// Each replica URL's name and URL, in configuration order.
    replicas: Vec<(String, UrlCell)>,
}

impl NodeUrls {
    pub(crate) fn new(primary: UrlCell, replicas: Vec<(String, UrlCell)>) -> Self {
        NodeUrls { primary, replicas }
    }

    /// The URL connections to `node` open through now: `primary`, or a
    /// replica URL's name ([`ProbeTarget::node`](super::probe_conn::ProbeTarget::node)). `None` for a name that
    /// is neither.
    pub fn url(&self, node: &str) -> Option<Arc<str>> {
        if node == "primary" {
            return Some(read_url(&self.primary));
        }
        self.replicas
            .iter()
            .find(|(name, _)| name == node)
            .map(|(_, cell)| read_url(cell))
    }
}

impl fmt::Debug for NodeUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // URLs may carry passwords: names only.
        f.debug_struct("NodeUrls")
            .field(
                "replicas",
                &self
                    .replicas
                    .iter()
                    .map(|(name, _)| name)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// A configured URL, which [`ReplicaPools::update_urls`](super::driver::ReplicaPools::update_urls) may replace
/// (rotating credentials) while pools built on it run.
pub(crate) type UrlCell = Arc<RwLock<Arc<str>>>;

pub(crate) fn url_cell(url: &str) -> UrlCell {
    Arc::new(RwLock::new(Arc::from(url)))
}

pub(crate) fn read_url(cell: &UrlCell) -> Arc<str> {
    Arc::clone(&cell.read().unwrap_or_else(PoisonError::into_inner))
}

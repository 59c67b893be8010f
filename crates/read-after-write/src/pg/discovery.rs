//! Looking behind each replica URL for servers the tracker does not follow
//! yet: at start, when a pool met one (a hint from its admission check),
//! and every discovery interval, so replicas added behind a reader endpoint
//! are found and used.
//!
//! A round opens a few connections through the URL and fingerprints each:
//! a server nobody follows gets a state of its own (for a URL; for a pool
//! the application brought, the endpoint is marked indistinct); a known
//! server whose state lost its connection gets this one. Rounds are
//! bounded in connections, and every connection in time.

use std::sync::Arc;
use std::time::Duration;

use super::tracker::ReplicaTracker;

impl ReplicaTracker {
    /// Runs discovery rounds for endpoint `index` until shutdown.
    pub(crate) async fn run_discovery(self: Arc<Self>, index: usize) {
        let mut shutdown = self.subscribe_shutdown();
        let endpoint = Arc::clone(&self.endpoints[index]);
        let interval = self
            .config
            .discovery_interval
            .max(Duration::from_millis(100));
        while !*shutdown.borrow() {
            let hinted = tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                _ = endpoint.discover.notified() => true,
                _ = tokio::time::sleep(interval) => false,
            };
            let known = self.servers_behind(index);
            // A hint names a server a pool reached: look until it is found.
            // Otherwise one connection is enough to notice a new server
            // over time.
            let attempts = if hinted { 2 + 2 * known } else { 1 };
            self.discover(index, attempts).await;
        }
    }

    /// One discovery round of up to `attempts` connections through
    /// endpoint `index`; a round that was hinted stops once every hinted
    /// server is followed.
    pub(crate) async fn discover(&self, index: usize, attempts: usize) {
        let mut hints = self.endpoints[index].take_hints();
        let hinted = !hints.is_empty();
        for _ in 0..attempts {
            if self.is_shut_down() {
                return;
            }
            let opened = tokio::time::timeout(self.config.probe_timeout, self.open(index)).await;
            let Ok(Ok((conn, found, _sees))) = opened else {
                // Down or refused: the servers' own tasks report it.
                return;
            };
            // A connection to a server followed in that very incarnation
            // goes to its state if it lost its own; any other connection is
            // placed by `give_away` (a new state, a restarted server's
            // state, or an indistinct endpoint).
            match self.server_arc_of(index, &found).cloned() {
                Some(state) if state.admission.admits(&found) => {
                    let lost = !state.is_healthy();
                    let spare = if lost {
                        state.hand_over(conn, found).err().map(|(conn, _)| conn)
                    } else {
                        Some(conn)
                    };
                    if let Some(conn) = spare {
                        let _ = tokio::time::timeout(self.config.probe_timeout, conn.close()).await;
                    }
                }
                _ => self.give_away(index, conn, &found),
            }
            hints.retain(|hint| self.server_of(index, hint).is_none());
            if hinted && hints.is_empty() {
                return;
            }
        }
    }

    /// How many servers are followed behind endpoint `index`.
    pub(crate) fn servers_behind(&self, index: usize) -> usize {
        self.servers.iter().filter(|s| s.endpoint == index).count()
    }
}

//! Which server a tracker connection belongs to: a connection opened
//! through a replica URL reaches one of the servers behind it, and goes to
//! the state that follows that server, to a new state, or is closed.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::fingerprint::Fingerprint;
use super::probe;
use super::probe_conn::{ProbeConn, ProbeError};
use super::server::{ReplicaState, SEES_TIMELINES_NO, SEES_TIMELINES_YES};
use super::tracker::{ReplicaTracker, REKEY_AFTER};

impl ReplicaTracker {
    /// Opens a tracker connection through endpoint `index` and says which
    /// server it reached and whether its role sees timelines.
    pub(crate) async fn open(
        &self,
        index: usize,
    ) -> Result<(ProbeConn, Fingerprint, bool), ProbeError> {
        let target = self.endpoints[index].probe_target();
        let mut conn = self.connector.connect(&target).await?;
        let (found, sees) = probe::identify(&mut *conn).await?;
        // A replica of another cluster (a wrong URL, another environment)
        // has replay positions that mean nothing here: never admit it.
        if found.system_id != self.primary.system_id {
            conn.close().await;
            return Err(ProbeError::refused(format!(
                "this node belongs to another cluster (system identifier {}, the primary's is {}); \
                 check the replica URL",
                found.system_id, self.primary.system_id
            )));
        }
        Ok((conn, found, sees))
    }

    /// A tracker connection to `server`'s server, opening connections
    /// through its URL until one lands there. One that lands on another
    /// server goes to that server's state, or starts following it.
    pub(crate) async fn connect_to(&self, server: &ReplicaState) -> Result<ProbeConn, ProbeError> {
        let index = server.endpoint;
        let attempts = 2 + 2 * self.servers_behind(index);
        let mut last = None;
        for _ in 0..attempts {
            let (conn, found, sees) = self.open(index).await?;
            self.note_privilege(server, sees);
            match self.place(server, conn, &found) {
                Ok(conn) => return Ok(conn),
                Err(elsewhere) => last = Some(elsewhere),
            }
        }
        Err(ProbeError::refused(format!(
            "{attempts} connections through the replica URL reached other servers ({}), not {}",
            last.map_or_else(String::new, |f: Fingerprint| f.address()),
            server
                .identity()
                .map_or_else(|| "a new one".to_owned(), |f| f.address())
        )))
    }

    /// Decides what a fresh tracker connection that reached `found` is for:
    /// `server`'s own (kept, returned), or another server's (handed over,
    /// or a new state started for it, and `Err(found)` returned).
    pub(crate) fn place(
        &self,
        server: &ReplicaState,
        conn: ProbeConn,
        found: &Fingerprint,
    ) -> Result<ProbeConn, Fingerprint> {
        let index = server.endpoint;
        let endpoint = &self.endpoints[index];
        match server.identity() {
            Some(known) if known == *found => return Ok(conn),
            Some(known) if known.same_server(found) => {
                // Restarted: a new incarnation, which may briefly hold less
                // than the old one did. Nothing proven about the old one
                // carries over.
                self.follow(server, found.clone(), Some(&known));
                return Ok(conn);
            }
            None if self.server_of(index, found).is_none() => {
                self.follow(server, found.clone(), None);
                return Ok(conn);
            }
            Some(known) => {
                if !endpoint.builds_pools() {
                    endpoint.mark_indistinct(found, &known);
                }
                let down_long = !server.is_healthy() && self.down_for(server) >= REKEY_AFTER;
                if down_long && self.server_of(index, found).is_none() {
                    // The URL now leads elsewhere: follow the new server
                    // under the same name.
                    self.follow(server, found.clone(), Some(&known));
                    return Ok(conn);
                }
            }
            None => {}
        }
        self.give_away(index, conn, found);
        Err(found.clone())
    }

    /// Hands a connection that reached `found` to the state following that
    /// server, or starts one for it (a URL only), or closes it.
    pub(crate) fn give_away(&self, index: usize, conn: ProbeConn, found: &Fingerprint) {
        let endpoint = &self.endpoints[index];
        if let Some(other) = self.server_arc_of(index, found) {
            if !other.is_healthy() {
                // A full inbox already holds a way back to it.
                let _ = other.hand_over(conn, found.clone());
            }
            return;
        }
        if endpoint.builds_pools() {
            self.add_server(index, Some((conn, found.clone())));
        } else if let Some(first) = self
            .servers
            .iter()
            .find(|s| s.endpoint == index)
            .and_then(ReplicaState::identity)
        {
            endpoint.mark_indistinct(found, &first);
        }
    }

    /// Makes `server` follow `found` from now on, forgetting what was known
    /// about `previous`.
    pub(crate) fn follow(
        &self,
        server: &ReplicaState,
        found: Fingerprint,
        previous: Option<&Fingerprint>,
    ) {
        if let Some(previous) = previous {
            tracing::info!(
                replica = %server.name,
                from = %previous,
                to = %found,
                "the replica URL now reaches another server or incarnation; following it"
            );
        }
        server.forget_proofs();
        server.tag.store(0, Ordering::Relaxed);
        server.set_identity(found);
    }

    /// How long `server` has been down.
    pub(crate) fn down_for(&self, server: &ReplicaState) -> Duration {
        match server.down_since.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => Duration::from_nanos(self.nanos().saturating_sub(since)),
        }
    }

    pub(crate) fn note_privilege(&self, server: &ReplicaState, sees: bool) {
        server.sees_timelines.store(
            if sees {
                SEES_TIMELINES_YES
            } else {
                SEES_TIMELINES_NO
            },
            Ordering::Relaxed,
        );
        if !sees && !server.warned_privilege.swap(true, Ordering::Relaxed) {
            if self.heartbeat.is_some() {
                tracing::info!(
                    replica = %server.name,
                    "the tracker's role cannot see replica timelines; replicas prove they follow the \
                     primary by the heartbeat table instead"
                );
            } else {
                tracing::warn!(
                    replica = %server.name,
                    "the tracker's role cannot see replica timelines (pg_stat_wal_receiver) and no \
                     heartbeat table is in use; without either no replica can be proven to hold a \
                     token's write, so every read with a token goes to the primary. Create the \
                     heartbeat table (read_after_write::pg::HEARTBEAT_DDL) or grant pg_monitor to \
                     this role"
                );
            }
        }
    }
}

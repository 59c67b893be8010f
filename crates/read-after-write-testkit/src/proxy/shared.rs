//! What a [`TcpProxy`](super::TcpProxy)'s handle and its thread share:
//! whose turn it is among the targets, whether it is frozen, and the open
//! sessions' sockets, which [`Shared::cut_all`] shuts down from any thread.

use std::collections::HashMap;
use std::io;
use std::net::Shutdown;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::net::TcpStream;
use tokio::sync::watch;

/// What the proxy's handle and its thread share.
pub(super) struct Shared {
    /// Where new sessions connect.
    targets: Mutex<Targets>,
    /// `true` while frozen. Sessions look at it before every read and every
    /// write, and stop waiting on a read or write when it turns `true`.
    pub(super) frozen: watch::Sender<bool>,
    sessions: Mutex<Sessions>,
}

/// The target ports and whose turn it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Targets {
    pub(super) ports: Vec<u16>,
    /// Index into `ports` of the target for the next session; kept below
    /// `ports.len()` (or 0).
    next: usize,
}

impl Targets {
    pub(super) fn new(ports: &[u16]) -> Self {
        Self {
            ports: ports.to_vec(),
            next: 0,
        }
    }

    /// The next session's target, turning the wheel; `None` without targets.
    pub(super) fn pick(&mut self) -> Option<u16> {
        let port = *self.ports.get(self.next)?;
        self.next = (self.next + 1) % self.ports.len();
        Some(port)
    }
}

#[derive(Default)]
pub(super) struct Sessions {
    next_id: u64,
    /// Duplicates (`dup(2)`) of each open session's sockets, so that
    /// [`TcpProxy::cut_all`] can shut them down at once from any thread. A
    /// duplicate keeps its socket alive, so a shutdown never hits a reused
    /// descriptor; a session leaves this map (and its sockets are shut down)
    /// when it ends.
    pub(super) open: HashMap<u64, SessionSockets>,
}

pub(super) struct SessionSockets {
    client: std::net::TcpStream,
    /// `None` until the session has connected to its target.
    upstream: Option<std::net::TcpStream>,
}

impl SessionSockets {
    /// Sends FIN both ways and wakes the session's task, whose reads then
    /// end; `shutdown` acts on the socket, so the task's own descriptors see
    /// it too.
    fn shut_down(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        if let Some(upstream) = &self.upstream {
            let _ = upstream.shutdown(Shutdown::Both);
        }
    }
}

impl Shared {
    /// A proxy's shared state: not frozen, no session, `target_ports`.
    pub(super) fn new(target_ports: &[u16]) -> Self {
        Self {
            targets: Mutex::new(Targets::new(target_ports)),
            frozen: watch::Sender::new(false),
            sessions: Mutex::new(Sessions::default()),
        }
    }

    pub(super) fn sessions(&self) -> MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn targets(&self) -> MutexGuard<'_, Targets> {
        self.targets.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new session; `None` if its socket cannot be duplicated.
    pub(super) fn register(&self, client: TcpStream) -> Option<(u64, TcpStream)> {
        let (client, copy) = duplicate(client)
            .map_err(|e| tracing::debug!(error = %e, "proxy: dropping a client connection"))
            .ok()?;
        let mut sessions = self.sessions();
        let id = sessions.next_id;
        sessions.next_id += 1;
        sessions.open.insert(
            id,
            SessionSockets {
                client: copy,
                upstream: None,
            },
        );
        Some((id, client))
    }

    /// Records the session's upstream socket; `None` if the session was cut
    /// meanwhile (or the socket cannot be duplicated).
    pub(super) fn attach_upstream(&self, id: u64, upstream: TcpStream) -> Option<TcpStream> {
        let (upstream, copy) = duplicate(upstream)
            .map_err(|e| tracing::debug!(error = %e, "proxy: dropping an upstream connection"))
            .ok()?;
        self.sessions().open.get_mut(&id)?.upstream = Some(copy);
        Some(upstream)
    }

    /// Shuts down and forgets every open session; returns how many.
    pub(super) fn cut_all(&self) -> usize {
        let cut: Vec<SessionSockets> = self.sessions().open.drain().map(|(_, s)| s).collect();
        for session in &cut {
            session.shut_down();
        }
        cut.len()
    }
}

/// Removes a session from [`Sessions::open`] and shuts its sockets down when
/// the session's task ends, however it ends (including when the proxy's
/// runtime drops the task).
pub(super) struct Registration {
    pub(super) id: u64,
    pub(super) shared: Arc<Shared>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let removed = self.shared.sessions().open.remove(&self.id);
        if let Some(session) = removed {
            session.shut_down();
        }
    }
}

/// The stream back, plus a blocking duplicate of its socket for
/// [`SessionSockets`].
pub(super) fn duplicate(stream: TcpStream) -> io::Result<(TcpStream, std::net::TcpStream)> {
    let stream = stream.into_std()?;
    let copy = stream.try_clone()?;
    Ok((TcpStream::from_std(stream)?, copy))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_take_turns_and_restart_when_replaced() {
        let mut targets = Targets::new(&[1, 2, 3]);
        let picks: Vec<_> = (0..7).filter_map(|_| targets.pick()).collect();
        assert_eq!(picks, [1, 2, 3, 1, 2, 3, 1]);
        assert_eq!(Targets::new(&[]).pick(), None);
        assert_eq!(Targets::new(&[9]).pick(), Some(9));
    }
}

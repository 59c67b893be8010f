//! [`Fingerprint`]: which server a connection reached, as any role can
//! read it.

use std::fmt;

use crate::bookmark::ReplicaTag;

/// What identifies the server a connection reached, as any role can read
/// it: the cluster's system identifier, the server's own address and port
/// (`inet_server_addr()`, `inet_server_port()`: the server's view, so the
/// same through a proxy or a pooler), and its postmaster's start time, which
/// names the incarnation (a restart is a new one).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Fingerprint {
    pub(crate) system_id: u64,
    /// `host(inet_server_addr())`; `None` over a Unix socket.
    pub(crate) addr: Option<String>,
    /// `inet_server_port()`; `None` over a Unix socket.
    pub(crate) port: Option<u16>,
    /// `pg_postmaster_start_time()` in Unix microseconds.
    pub(crate) started_micros: i64,
}

impl Fingerprint {
    /// Whether both name the same server, in any incarnation.
    pub(crate) fn same_server(&self, other: &Fingerprint) -> bool {
        self.system_id == other.system_id && self.addr == other.addr && self.port == other.port
    }

    /// `addr:port`, or `local` over a Unix socket.
    pub(crate) fn address(&self) -> String {
        match (&self.addr, self.port) {
            (Some(addr), Some(port)) if addr.contains(':') => format!("[{addr}]:{port}"),
            (Some(addr), Some(port)) => format!("{addr}:{port}"),
            _ => "local".to_owned(),
        }
    }

    /// The tag a monotonic session that reads this incarnation carries:
    /// from the server's own address when it has one, so that every
    /// instance names the server alike whatever it called the URL.
    pub(crate) fn tag(&self, name: &str) -> ReplicaTag {
        match (&self.addr, self.port) {
            (Some(_), Some(_)) => ReplicaTag::of(&self.address(), self.started_micros),
            _ => ReplicaTag::of(name, self.started_micros),
        }
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (system {}, started {})",
            self.address(),
            self.system_id,
            self.started_micros
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_tell_servers_and_incarnations_apart() {
        let a = Fingerprint {
            system_id: 7,
            addr: Some("10.0.0.1".into()),
            port: Some(5432),
            started_micros: 1,
        };
        let restarted = Fingerprint {
            started_micros: 2,
            ..a.clone()
        };
        let b = Fingerprint {
            addr: Some("10.0.0.2".into()),
            ..a.clone()
        };
        assert!(a.same_server(&restarted));
        assert_ne!(a, restarted);
        assert!(!a.same_server(&b));
        assert_ne!(a.tag("replica-1"), restarted.tag("replica-1"));
        // Every instance tags the server alike, whatever it named the URL.
        assert_eq!(a.tag("replica-1"), a.tag("readers"));
        assert_eq!(a.address(), "10.0.0.1:5432");
        let v6 = Fingerprint {
            addr: Some("::1".into()),
            ..a.clone()
        };
        assert_eq!(v6.address(), "[::1]:5432");
    }
}

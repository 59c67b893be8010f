//! Ports on 127.0.0.1: picking a free one, and seeing whether something
//! listens on one.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::KitError;

/// How long [`accepts_tcp`] waits for a connection to be accepted.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

/// Ports handed out by this process, so two nodes never get the same one.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A port on 127.0.0.1 that was free a moment ago: the kernel picks it for
/// a listener on port 0, which is then closed. Someone may take it before
/// the server binds it; the server (or PgBouncer) is then started again on
/// another port.
pub(crate) fn free_port() -> Result<u16, KitError> {
    for _ in 0..100 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| KitError::io("binding a free port on 127.0.0.1", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| KitError::io("reading a free port on 127.0.0.1", e))?
            .port();
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
        if handed_out.get_or_insert_with(HashSet::new).insert(port) {
            return Ok(port);
        }
    }
    Err(KitError::io(
        "finding a free port on 127.0.0.1",
        std::io::Error::from(std::io::ErrorKind::AddrInUse),
    ))
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub(crate) fn accepts_tcp(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_and_closed() {
        let a = free_port().unwrap();
        let b = free_port().unwrap();
        assert_ne!(a, b);
        assert!(!accepts_tcp(a));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        assert!(accepts_tcp(listener.local_addr().unwrap().port()));
    }
}

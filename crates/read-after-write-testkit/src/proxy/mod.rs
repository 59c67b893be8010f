//! [`TcpProxy`]: a TCP forwarder on 127.0.0.1 that fault drills repoint,
//! freeze and cut, standing in for a load balancer or virtual IP in front of
//! the primary, or, balancing new connections over several servers, for a
//! reader endpoint in front of replicas.
//!
//! # Example
//!
//! ```no_run
//! use read_after_write_testkit::{TcpProxy, TestCluster};
//!
//! # async fn example() -> Result<(), read_after_write_testkit::KitError> {
//! let cluster = TestCluster::start_with_delays(&[std::time::Duration::ZERO]).await?;
//! let proxy = TcpProxy::start(cluster.primary_port()).await?;
//! // The application under test only ever knows the proxy's address.
//! let url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port());
//! let pool = sqlx::PgPool::connect(&url).await.unwrap();
//!
//! proxy.freeze(); // a partition: queries hang, nothing is closed
//! proxy.thaw();
//! cluster.promote_replica(0).await?;
//! proxy.repoint(cluster.replica(0).port()); // new connections reach the new primary
//! proxy.cut_all(); // and the old ones are closed
//! # Ok(())
//! # }
//! ```
//!
//! A reader endpoint (Aurora's `cluster-ro`, a Cloud SQL read pool, HAProxy
//! or DNS round robin) over two replicas:
//!
//! ```no_run
//! use std::time::Duration;
//! use read_after_write_testkit::{TcpProxy, TestCluster};
//!
//! # async fn example() -> Result<(), read_after_write_testkit::KitError> {
//! let cluster = TestCluster::start_with_delays(&[Duration::ZERO, Duration::from_secs(1)]).await?;
//! let reader = TcpProxy::start_balanced(&cluster.replica_ports()).await?;
//! // Each new connection lands on the next replica; a connection stays on its own.
//! let url = format!("postgres://postgres@127.0.0.1:{}/postgres", reader.port());
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::KitError;

mod session;
mod shared;

use session::accept_loop;
use shared::{Shared, Targets};

/// A TCP proxy on 127.0.0.1 that forwards every connection to a target port,
/// and that a test can repoint, freeze and cut: the faults a client sees
/// when the primary behind a load balancer or virtual IP fails over, hangs
/// or is partitioned away.
///
/// With several targets ([`start_balanced`](Self::start_balanced),
/// [`set_targets`](Self::set_targets)) it hands each new connection to the
/// next target in turn, round robin, and a connection stays on the server
/// it reached first: a reader endpoint such as Aurora's `cluster-ro`, a
/// Cloud SQL or AlloyDB read pool, HAProxy or DNS round robin. It checks no
/// health: a connection handed to a target that is down is closed at once,
/// as with DNS round robin; take such a target out with
/// [`set_targets`](Self::set_targets).
///
/// It runs on its own thread with its own tokio runtime, so it keeps working
/// after the runtime that called [`start`](Self::start) ends (a proxy shared
/// by several `#[tokio::test]`s). Dropping it closes the listener and every
/// session. Each session copies through two fixed 16 KiB buffers.
///
/// # Examples
///
/// ```no_run
/// use read_after_write_testkit::{TcpProxy, TestCluster};
///
/// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
/// let cluster = TestCluster::start_with_delays(&[]).await?;
/// let proxy = TcpProxy::start(cluster.primary_port()).await?;
/// let url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port());
/// let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await.unwrap();
/// let port: i32 = sqlx::query_scalar("select inet_server_port()")
///     .fetch_one(&mut conn)
///     .await
///     .unwrap();
/// assert_eq!(port, i32::from(cluster.primary_port()));
/// # Ok(())
/// # }
/// ```
pub struct TcpProxy {
    port: u16,
    shared: Arc<Shared>,
    /// Dropping (or sending on) it ends the proxy thread's event loop.
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TcpProxy {
    /// Listens on 127.0.0.1 on a free port and forwards every connection to
    /// 127.0.0.1:`target_port`.
    ///
    /// # Errors
    ///
    /// [`KitError::Io`] if no port can be bound or the proxy thread cannot
    /// start.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::{TcpProxy, TestCluster};
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[]).await?;
    /// let proxy = TcpProxy::start(cluster.primary_port()).await?;
    /// assert_eq!(proxy.target_port(), cluster.primary_port());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start(target_port: u16) -> Result<TcpProxy, KitError> {
        Self::start_balanced(&[target_port]).await
    }

    /// Listens on 127.0.0.1 on a free port and hands each new connection to
    /// the next of `target_ports` (on 127.0.0.1) in turn, starting with the
    /// first: a reader endpoint over several replicas. A connection stays
    /// on the server it was handed to. With one port this is
    /// [`start`](Self::start); with none, every connection is closed at
    /// once until [`set_targets`](Self::set_targets) gives it some.
    ///
    /// # Errors
    ///
    /// [`KitError::Io`] if no port can be bound or the proxy thread cannot
    /// start.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::{TcpProxy, TestCluster};
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let cluster = TestCluster::start_with_delays(&[Duration::ZERO, Duration::ZERO]).await?;
    /// let reader = TcpProxy::start_balanced(&cluster.replica_ports()).await?;
    /// let url = format!("postgres://postgres@127.0.0.1:{}/postgres", reader.port());
    /// for expected in [cluster.replica(0).port(), cluster.replica(1).port()] {
    ///     let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await.unwrap();
    ///     let port: i32 = sqlx::query_scalar("select inet_server_port()")
    ///         .fetch_one(&mut conn)
    ///         .await
    ///         .unwrap();
    ///     assert_eq!(port, i32::from(expected));
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start_balanced(target_ports: &[u16]) -> Result<TcpProxy, KitError> {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| KitError::io("binding a port on 127.0.0.1 for the TCP proxy", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| KitError::io("reading the TCP proxy's port", e))?
            .port();
        listener
            .set_nonblocking(true)
            .map_err(|e| KitError::io("making the TCP proxy's listener non-blocking", e))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| KitError::io("building the TCP proxy's tokio runtime", e))?;
        // Registers the listener with the proxy's own runtime, not the caller's.
        let listener = {
            let _context = runtime.enter();
            TcpListener::from_std(listener)
                .map_err(|e| KitError::io("registering the TCP proxy's listener", e))?
        };
        let shared = Arc::new(Shared::new(target_ports));
        let (shutdown, stop) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("tcp-proxy-{port}"))
            .spawn({
                let shared = Arc::clone(&shared);
                move || {
                    runtime.block_on(async {
                        tokio::select! {
                            () = accept_loop(listener, shared) => {}
                            _ = stop => {}
                        }
                    });
                    // Dropping the runtime drops every session task, whose
                    // registrations shut their sockets down.
                    drop(runtime);
                }
            })
            .map_err(|e| KitError::io("starting the TCP proxy's thread", e))?;
        tracing::debug!(port, ?target_ports, "TCP proxy started");
        Ok(TcpProxy {
            port,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The port clients connect to, on 127.0.0.1.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::TcpProxy;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let proxy = TcpProxy::start(5432).await?;
    /// let url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port());
    /// # Ok(())
    /// # }
    /// ```
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Where new sessions connect now: the first of
    /// [`targets`](Self::targets), which is the only one after
    /// [`start`](Self::start) or [`repoint`](Self::repoint); 0 when the
    /// proxy has no target.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::TcpProxy;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let proxy = TcpProxy::start(5432).await?;
    /// proxy.repoint(5433);
    /// assert_eq!(proxy.target_port(), 5433);
    /// # Ok(())
    /// # }
    /// ```
    pub fn target_port(&self) -> u16 {
        self.shared.targets().ports.first().copied().unwrap_or(0)
    }

    /// The ports new connections are handed to, in turn.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::TcpProxy;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let proxy = TcpProxy::start_balanced(&[5433, 5434]).await?;
    /// assert_eq!(proxy.targets(), [5433, 5434]);
    /// proxy.repoint(5432);
    /// assert_eq!(proxy.targets(), [5432]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn targets(&self) -> Vec<u16> {
        self.shared.targets().ports.clone()
    }

    /// Hands new connections to `target_ports` in turn from now on,
    /// starting with the first (an empty list closes each new connection at
    /// once: a load balancer with no server behind it). Open sessions keep
    /// their upstream; end them with [`cut_all`](Self::cut_all).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::{TcpProxy, TestCluster};
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[Duration::ZERO, Duration::ZERO]).await?;
    /// let reader = TcpProxy::start_balanced(&cluster.replica_ports()).await?;
    /// cluster.freeze_replica(1).await?;
    /// // The endpoint's health check takes the frozen replica out.
    /// reader.set_targets(&[cluster.replica(0).port()]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn set_targets(&self, target_ports: &[u16]) {
        *self.shared.targets() = Targets::new(target_ports);
    }

    /// Sends new connections to 127.0.0.1:`target_port`, and to it alone
    /// (`set_targets(&[target_port])`). Open sessions keep their upstream
    /// (what HAProxy does by default); end them with
    /// [`cut_all`](Self::cut_all).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::{TcpProxy, TestCluster};
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[std::time::Duration::ZERO]).await?;
    /// let proxy = TcpProxy::start(cluster.primary_port()).await?;
    /// cluster.promote_replica(0).await?;
    /// proxy.repoint(cluster.replica(0).port());
    /// # Ok(())
    /// # }
    /// ```
    pub fn repoint(&self, target_port: u16) {
        self.set_targets(&[target_port]);
    }

    /// Stops moving bytes, in both directions, on every open session and on
    /// every new one, closing nothing: what a client sees of a frozen
    /// (`SIGSTOP`) or partitioned upstream. No FIN, no RST; queries just
    /// hang. New connections are accepted but not forwarded (they connect to
    /// the target only after [`thaw`](Self::thaw)). It takes effect on
    /// sessions in the middle of a transfer too: no byte read from either
    /// side after `freeze` returns is passed on before `thaw`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::{TcpProxy, TestCluster};
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[]).await?;
    /// let proxy = TcpProxy::start(cluster.primary_port()).await?;
    /// let url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port());
    /// let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await.unwrap();
    /// proxy.freeze();
    /// let query = sqlx::query("select 1").execute(&mut conn);
    /// assert!(tokio::time::timeout(Duration::from_secs(1), query).await.is_err());
    /// proxy.thaw();
    /// # Ok(())
    /// # }
    /// ```
    pub fn freeze(&self) {
        self.shared.frozen.send_replace(true);
    }

    /// Lets bytes flow again after [`freeze`](Self::freeze): held requests
    /// go through and their answers come back.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::TcpProxy;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let proxy = TcpProxy::start(5432).await?;
    /// proxy.freeze();
    /// proxy.thaw();
    /// # Ok(())
    /// # }
    /// ```
    pub fn thaw(&self) {
        self.shared.frozen.send_replace(false);
    }

    /// Closes every open session at once, on both sides: clients see
    /// end-of-file (or a reset) on their next read or write, and the
    /// upstream server sees the client go away. Returns how many sessions
    /// were closed. The proxy keeps accepting new connections.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::{TcpProxy, TestCluster};
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[]).await?;
    /// let proxy = TcpProxy::start(cluster.primary_port()).await?;
    /// let url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port());
    /// let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await.unwrap();
    /// assert_eq!(proxy.cut_all(), 1);
    /// assert!(sqlx::query("select 1").execute(&mut conn).await.is_err());
    /// # Ok(())
    /// # }
    /// ```
    pub fn cut_all(&self) -> usize {
        let cut = self.shared.cut_all();
        tracing::debug!(
            port = self.port,
            sessions = cut,
            "TCP proxy cut every session"
        );
        cut
    }

    /// How many sessions are open: accepted and not yet ended by either
    /// side or by [`cut_all`](Self::cut_all).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::TcpProxy;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let proxy = TcpProxy::start(5432).await?;
    /// assert_eq!(proxy.open_sessions(), 0);
    /// # Ok(())
    /// # }
    /// ```
    pub fn open_sessions(&self) -> usize {
        self.shared.sessions().open.len()
    }
}

impl fmt::Debug for TcpProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpProxy")
            .field("port", &self.port)
            .field("targets", &self.targets())
            .field("frozen", &*self.shared.frozen.borrow())
            .field("open_sessions", &self.open_sessions())
            .finish()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.cut_all();
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        // The thread only awaits sockets, so it ends promptly once told to.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        tracing::debug!(port = self.port, "TCP proxy stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// An echo server on 127.0.0.1; returns its port.
    async fn echo_server() -> u16 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        port
    }

    async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> io::Result<Vec<u8>> {
        stream.write_all(message).await?;
        let mut answer = vec![0; message.len()];
        stream.read_exact(&mut answer).await?;
        Ok(answer)
    }

    #[test]
    fn proxy_outlives_the_runtime_that_started_it() {
        let proxy = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(TcpProxy::start(1))
            .unwrap();
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let echo = echo_server().await;
            proxy.repoint(echo);
            let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy.port()))
                .await
                .unwrap();
            assert_eq!(round_trip(&mut stream, b"ping").await.unwrap(), b"ping");
        });
    }

    #[tokio::test]
    async fn freeze_holds_bytes_and_cut_closes() {
        let echo = echo_server().await;
        let proxy = TcpProxy::start(echo).await.unwrap();
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy.port()))
            .await
            .unwrap();
        assert_eq!(round_trip(&mut stream, b"one").await.unwrap(), b"one");
        assert_eq!(proxy.open_sessions(), 1);

        proxy.freeze();
        stream.write_all(b"two").await.unwrap();
        let mut answer = [0; 3];
        let held =
            tokio::time::timeout(Duration::from_millis(200), stream.read_exact(&mut answer)).await;
        assert!(held.is_err(), "bytes moved while frozen");
        proxy.thaw();
        stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"two");

        assert_eq!(proxy.cut_all(), 1);
        assert_eq!(proxy.open_sessions(), 0);
        let mut rest = Vec::new();
        // End-of-file (or a reset), not a hang.
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut rest))
            .await
            .expect("a cut session ends at once");
        assert!(rest.is_empty());
    }

    /// A server on 127.0.0.1 that greets each connection with its own port
    /// and then echoes; returns that port.
    async fn greeting_server() -> u16 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    stream.write_all(&port.to_be_bytes()).await.unwrap();
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        port
    }

    /// Connects through the proxy; returns the stream and the port of the
    /// server it reached.
    async fn reach(proxy: &TcpProxy) -> (TcpStream, u16) {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy.port()))
            .await
            .unwrap();
        let mut greeting = [0; 2];
        stream.read_exact(&mut greeting).await.unwrap();
        (stream, u16::from_be_bytes(greeting))
    }

    #[tokio::test]
    async fn balanced_proxy_hands_new_connections_round_robin() {
        let (a, b) = (greeting_server().await, greeting_server().await);
        let proxy = TcpProxy::start_balanced(&[a, b]).await.unwrap();
        assert_eq!(proxy.targets(), [a, b]);
        assert_eq!(proxy.target_port(), a);
        let mut reached = Vec::new();
        let mut streams = Vec::new();
        for _ in 0..4 {
            let (stream, port) = reach(&proxy).await;
            reached.push(port);
            streams.push(stream);
        }
        assert_eq!(reached, [a, b, a, b]);
        // A session stays where it landed.
        assert_eq!(
            round_trip(&mut streams[1], b"again").await.unwrap(),
            b"again"
        );

        proxy.repoint(b);
        assert_eq!(proxy.targets(), [b]);
        assert_eq!(reach(&proxy).await.1, b);
        assert_eq!(reach(&proxy).await.1, b);

        proxy.set_targets(&[]);
        assert_eq!(proxy.target_port(), 0);
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy.port()))
            .await
            .unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut rest))
            .await
            .expect("a connection without a target is closed at once")
            .unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn drop_closes_sessions() {
        let echo = echo_server().await;
        let proxy = TcpProxy::start(echo).await.unwrap();
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy.port()))
            .await
            .unwrap();
        assert_eq!(round_trip(&mut stream, b"x").await.unwrap(), b"x");
        proxy.freeze();
        drop(proxy);
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.read_to_end(&mut rest))
            .await
            .expect("a dropped proxy closes its sessions");
    }
}

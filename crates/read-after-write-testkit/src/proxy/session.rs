//! The proxy thread's work: accepting connections, and each session's two
//! copy loops, which hold still while the proxy is frozen.

use std::io;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::shared::{Registration, Shared};

/// The size of each direction's copy buffer: a session holds two, whatever
/// the traffic.
const BUFFER_SIZE: usize = 16 * 1024;

/// How long the listener rests after a failed `accept` (out of file
/// descriptors, say) before trying again, so that it does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

pub(super) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tokio::spawn(session(client, Arc::clone(&shared)));
            }
            Err(e) => {
                tracing::debug!(error = %e, "TCP proxy: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// One client connection: waits until thawed, connects to the target whose
/// turn it is then, then copies both ways until either side ends or the
/// session is cut.
async fn session(client: TcpStream, shared: Arc<Shared>) {
    let Some((id, mut client)) = shared.register(client) else {
        return;
    };
    let _registration = Registration {
        id,
        shared: Arc::clone(&shared),
    };
    let mut frozen = shared.frozen.subscribe();
    if until_thawed(&mut frozen).await.is_err() {
        return;
    }
    let Some(target_port) = shared.targets().pick() else {
        tracing::debug!("TCP proxy: no target, closing a new connection");
        return;
    };
    let upstream = match TcpStream::connect((Ipv4Addr::LOCALHOST, target_port)).await {
        Ok(upstream) => upstream,
        Err(e) => {
            tracing::debug!(target_port, error = %e, "TCP proxy: cannot reach the target");
            return;
        }
    };
    let Some(mut upstream) = shared.attach_upstream(id, upstream) else {
        return;
    };
    // PostgreSQL's messages are small; do not let Nagle delay them.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let mut frozen_down = shared.frozen.subscribe();
    tokio::select! {
        _ = pump(&mut client_read, &mut upstream_write, &mut frozen) => {}
        _ = pump(&mut upstream_read, &mut client_write, &mut frozen_down) => {}
    }
}

/// Copies `from` to `to` through one fixed buffer until `from` ends or
/// either fails, holding still whenever the proxy is frozen.
async fn pump<R, W>(from: &mut R, to: &mut W, frozen: &mut watch::Receiver<bool>) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0_u8; BUFFER_SIZE];
    loop {
        until_thawed(frozen).await?;
        // Both `read` and `write` on a TCP stream are cancel-safe: when the
        // freeze wins the race, no byte was moved.
        let read = tokio::select! {
            biased;
            frozen_now = until_frozen(frozen) => {
                frozen_now?;
                continue;
            }
            read = from.read(&mut buffer) => read?,
        };
        if read == 0 {
            return Ok(());
        }
        let mut written = 0;
        while written < read {
            until_thawed(frozen).await?;
            tokio::select! {
                biased;
                frozen_now = until_frozen(frozen) => frozen_now?,
                n = to.write(&buffer[written..read]) => match n? {
                    0 => return Err(io::ErrorKind::WriteZero.into()),
                    n => written += n,
                },
            }
        }
    }
}

/// Returns once the proxy is not frozen (at once if it is not).
async fn until_thawed(frozen: &mut watch::Receiver<bool>) -> io::Result<()> {
    frozen
        .wait_for(|frozen| !*frozen)
        .await
        .map(drop)
        .map_err(|_| io::ErrorKind::BrokenPipe.into())
}

/// Returns once the proxy is frozen (at once if it is).
async fn until_frozen(frozen: &mut watch::Receiver<bool>) -> io::Result<()> {
    frozen
        .wait_for(|frozen| *frozen)
        .await
        .map(drop)
        .map_err(|_| io::ErrorKind::BrokenPipe.into())
}

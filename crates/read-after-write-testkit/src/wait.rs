//! How the kit waits: blocking work (processes, files) on tokio's blocking
//! pool, and polling for a state at a fixed interval within a timeout.

use std::time::Duration;

use crate::KitError;

/// How long to wait for a server (or PgBouncer) to start, stop or reach a
/// state, unless a builder's `startup_timeout` says otherwise.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often to poll a server while waiting for it.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Runs blocking work (processes, files) on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KitError> + Send + 'static,
) -> Result<T, KitError> {
    tokio::task::spawn_blocking(f).await.map_err(join_error)?
}

pub(crate) fn join_error(e: tokio::task::JoinError) -> KitError {
    KitError::io(
        "running a blocking test-kit task",
        std::io::Error::other(e.to_string()),
    )
}

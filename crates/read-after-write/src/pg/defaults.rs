//! The defaults of [`PgReplicaSetBuilder`](super::PgReplicaSetBuilder), as
//! constants the docs quote, so that a changed default cannot drift from
//! its description (the [configuration reference](crate::guide::configuration)
//! checks them in a doc test).
//!
//! ```
//! use read_after_write::pg::defaults;
//! use std::time::Duration;
//!
//! assert_eq!(defaults::POLL_INTERVAL, Duration::from_millis(50));
//! ```

use std::time::Duration;

/// How often each replica is polled while positions are in use. A read
/// never waits on this: one that finds no replica known to hold its
/// position asks the replica predicted to get there, which answers the
/// moment it has it (see [`WAIT_POLL_INTERVAL`]).
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// The shortest gap between two polls of a replica that reads are waiting
/// for, and between two re-checks of a waiting read; the wait itself runs
/// on the server.
pub const WAIT_POLL_INTERVAL: Duration = Duration::from_millis(2);
/// How often every node is polled once nothing needed positions for 5 s.
pub const IDLE_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long a poll may take before the node counts as down.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// The longest pause between re-probes of a down replica.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long the write-position capture may take.
pub const CAPTURE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a replica's replay may stand still while the primary writes
/// before it counts as diverged.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections per pool built from a URL (per server behind a URL).
pub const MAX_CONNECTIONS: u32 = 10;
/// How long a checkout from a pool built from a URL waits.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the tracker writes its heartbeat while positions are in use.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How often each replica URL is checked for servers not followed yet.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(60);
/// The share of session reads routed to a replica that the canary checks.
pub const CANARY_RATE: f64 = 0.01;
/// The heartbeat table looked for at `connect()`.
pub const HEARTBEAT_TABLE: &str = "read_after_write_heartbeat";

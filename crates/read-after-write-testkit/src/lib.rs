//! Throwaway PostgreSQL clusters for testing read-after-write consistency:
//! a primary plus streaming replicas on 127.0.0.1, each replica lagging by a
//! delay that the server itself enforces (`recovery_min_apply_delay`), so
//! tests see real replication lag rather than a simulation.
//!
//! # Layout
//!
//! - [`TestCluster`]: a running cluster. Accessors for URLs and ports
//!   ([`TestCluster::replica_ports`]), SQL on any node
//!   ([`TestCluster::execute_on_replica`]), controls for replay (pause,
//!   resume, apply delay), node lifecycle (stop, kill, start, promote) and
//!   [`TestCluster::wait_for_replicas_caught_up`]. Dropping it stops the
//!   servers and deletes their files.
//! - [`ClusterBuilder`]: replicas, extra settings, `pg_hba.conf` lines for
//!   roles that log in with a password ([`ClusterBuilder::hba_line`]),
//!   binaries and timeouts; [`ClusterBuilder::start`] creates the cluster.
//! - [`ReplicaInfo`] and [`ReplicaState`]: one replica and what it is doing.
//! - Fault drills, more [`TestCluster`] methods: freeze and thaw the
//!   primary or a replica ([`TestCluster::freeze_replica`]), terminate the
//!   primary's connections, detach a replica or make it follow another
//!   server, and failovers (planned, or losing WAL and leaving an orphan
//!   replica) that report a [`Failover`].
//! - [`TcpProxy`]: a repointable TCP address in front of a server, which a
//!   test can freeze (a partition) and cut (every session closed); with
//!   several targets ([`TcpProxy::start_balanced`]) a reader endpoint that
//!   hands each new connection to the next replica.
//! - [`PgBouncer`], [`PgBouncerBuilder`] and [`PoolMode`]: a throwaway
//!   PgBouncer in front of one server, in session or transaction mode.
//! - [`PgBinaries`]: finds `initdb`, `pg_ctl` and `postgres` (`PG_BIN`,
//!   then `PATH`, then the usual install directories).
//! - [`KitError`]: every failure, with a message that says what to do.
//!
//! Inside, one module per concern, each using only those before it
//! (`error` is used by all):
//!
//! 1. `error`: [`KitError`].
//! 2. `process`: running programs as the server user, signals and
//!    `/proc`.
//! 3. `binaries`: finding the PostgreSQL programs and building their
//!    commands (on `process`).
//! 4. `ports`: free ports on 127.0.0.1, and whether one listens.
//! 5. `node`: one server's files, configuration, `pg_ctl`, kill, freeze
//!    and thaw (on `binaries`, `ports`, `process`).
//! 6. `wait`: the blocking pool, the poll interval, the default timeout.
//! 7. `sql`: the kit's own SQL to a node: connecting, errors, readiness,
//!    LSNs (on `node`, `wait`).
//! 8. `workdir`: the temporary directory, its watchdog and the sweep of
//!    leftovers (on `node`, `process`).
//! 9. `cluster`: [`TestCluster`] and its drop, with `builder`,
//!    `connections`, `replay` controls, `nodes` (lifecycle, freezing) and
//!    `replica` inside (on everything above).
//! 10. `faults`: drills built on the cluster's controls, with `failover`
//!     inside (on `cluster`, `sql`, `node`, `wait`).
//! 11. `pgbouncer`: [`PgBouncer`], with `builder`, `config`, `program` and
//!     `runner` inside (on `workdir`, `process`, `ports`, `wait`; not on
//!     the cluster).
//! 12. `proxy`: [`TcpProxy`], with `shared` state and `session` loops
//!     inside (on `error` only).
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use read_after_write_testkit::TestCluster;
//!
//! # async fn example() -> Result<(), read_after_write_testkit::KitError> {
//! let cluster = TestCluster::builder()
//!     .replica(Duration::from_millis(50))
//!     .replica(Duration::from_millis(200))
//!     .start()
//!     .await?;
//!
//! cluster.execute_on_primary("create table t (id int); insert into t values (1)").await?;
//! // For about 200 ms the second replica does not have the table yet...
//! let mut lagging = cluster.connect_replica(1).await?;
//! assert!(sqlx::query("select * from t").execute(&mut lagging).await.is_err());
//! // ...and then it has.
//! cluster.wait_for_replicas_caught_up(Duration::from_secs(5)).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Requirements
//!
//! PostgreSQL 13 or newer server programs (tested with 15, 16, 17 and 18), found as
//! described in [`PgBinaries::discover`]. On Debian or Ubuntu:
//! `apt-get install postgresql`.
//!
//! [`PgBouncer`] needs the `pgbouncer` program (`apt-get install pgbouncer`,
//! or `bash .ci/ensure-pgbouncer` in this repository); nothing else does.
//!
//! `initdb` and `postgres` refuse to run as root. When the tests run as root
//! (containers, CI), the kit runs every server program as the `postgres` OS
//! user and gives it the cluster's files; the temporary directory must be
//! reachable by that user (the default `/tmp` is).
//!
//! # Files and cleanup
//!
//! Each cluster lives in
//! `$TMPDIR/read-after-write-testkit/<pid>-<counter>-<random>/`, with one
//! subdirectory per node (`primary`, `replica-1`, ...) holding `data/` and
//! the server log `postgres.log`. Ports are picked free on 127.0.0.1 and no
//! Unix sockets are created, so clusters in parallel tests and processes do
//! not collide.
//!
//! Dropping a [`TestCluster`] stops its servers and removes the directory,
//! including while a panicking test unwinds. A cluster that is never dropped
//! (a `static`, or a process that exits early or is killed) is cleaned up by
//! a watchdog process once the test process is gone, and any directory whose
//! owning process no longer exists is removed by the next cluster start. Set
//! `KEEP_TEST_CLUSTER=1` to stop the servers but keep the files for
//! debugging; such directories are never removed automatically (delete them
//! yourself).
//!
//! # Speed
//!
//! Servers run with `fsync = off` and `full_page_writes = off` (commits are
//! still synchronous), small shared buffers and fast WAL-receiver retries.
//! Startup of a primary and two replicas takes about 1.2 s on an idle 2-core
//! machine (median of 3; `initdb` is half of it, the replicas are copies of
//! the primary's data directory made in parallel before its first start), and 3 to 5 s while other work keeps the cores
//! busy. Dropping a cluster takes about 0.2 s. Measure yours with
//! `cargo run -p read-after-write-testkit --example startup_time`.
//!
//! A cluster can be shared by the tests of one test binary with a
//! `static CLUSTER: tokio::sync::OnceCell<TestCluster>`: the kit keeps no
//! connection or task across calls, so the cluster outlives the runtime of
//! the test that started it, and the watchdog removes it at exit. Tests
//! that stop, kill or promote nodes are better off with their own cluster.

#![deny(missing_docs, unreachable_pub, unsafe_code)]
#![warn(rust_2018_idioms)]

mod binaries;
mod cluster;
mod error;
mod faults;
mod node;
mod pgbouncer;
mod ports;
mod process;
mod proxy;
mod sql;
mod wait;
mod workdir;

pub use binaries::PgBinaries;
pub use cluster::{ClusterBuilder, ReplicaInfo, ReplicaState, TestCluster};
pub use error::KitError;
pub use faults::Failover;
pub use pgbouncer::{PgBouncer, PgBouncerBuilder, PoolMode};
pub use proxy::TcpProxy;

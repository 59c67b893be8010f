//! [`PgBouncer`]: a throwaway PgBouncer on 127.0.0.1 in front of one server,
//! the connection pooler many deployments put between the app and each
//! PostgreSQL node.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use read_after_write_testkit::{PgBouncer, PoolMode, TestCluster};
//! use sqlx::{Connection, Row};
//!
//! # async fn example() -> Result<(), read_after_write_testkit::KitError> {
//! let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
//! let bouncer = PgBouncer::builder(cluster.replica(0).port())
//!     .pool_mode(PoolMode::Transaction)
//!     .users(["postgres", "app"])
//!     .start()
//!     .await?;
//! let mut conn = sqlx::PgConnection::connect(&bouncer.url("postgres", "postgres"))
//!     .await
//!     .unwrap();
//! // The simple query protocol: PgBouncer 1.18 pools transactions only so.
//! let row = sqlx::raw_sql("select inet_server_port()")
//!     .fetch_one(&mut conn)
//!     .await
//!     .unwrap();
//! assert_eq!(row.get::<i32, _>(0), i32::from(cluster.replica(0).port()));
//! # Ok(())
//! # }
//! ```
//!
//! What it runs, and what PgBouncer 1.18 cannot do in transaction mode, is
//! documented on [`PgBouncer`] itself, where rustdoc shows it.

use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::ports::free_port;
use crate::process::{self, RunAs};
use crate::wait::{blocking, DEFAULT_TIMEOUT, POLL_INTERVAL};
use crate::workdir::{self, KEEP_MARKER};
use crate::KitError;

/// Where Debian and Fedora install the program, often not on a normal
/// user's `PATH`.
const SYSTEM_PROGRAM: &str = "/usr/sbin/pgbouncer";

/// The environment variable naming the program, ahead of any search.
const PROGRAM_VAR: &str = "PGBOUNCER";

/// How often to try another port when the one picked was taken meanwhile.
const PORT_ATTEMPTS: usize = 5;

/// How long a drop waits for PgBouncer to exit after `SIGTERM` (it exits at
/// once) before killing it.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs PgBouncer (`$1`, with config `$2`, in directory `$3`) until its
/// standard input, a pipe whose only writer is the test process, ends:
/// then stops it and removes `$3`, or, when `$4` is not empty, keeps it and
/// creates the marker file `$4` in it (which the sweep of leftovers spares).
/// Being PgBouncer's parent, it can never signal a reused pid.
const RUNNER_SCRIPT: &str = r#"
"$1" "$2" >/dev/null 2>>"$3/pgbouncer.stderr" &
echo "$!"
cat >/dev/null
kill -TERM "$!" 2>/dev/null
wait
if [ -n "$4" ]; then touch "$3/$4"; else rm -rf "$3"; fi
"#;

/// How PgBouncer hands server connections to clients (`pool_mode`).
///
/// # Examples
///
/// ```
/// use read_after_write_testkit::PoolMode;
///
/// assert_eq!(PoolMode::default(), PoolMode::Session);
/// assert_eq!(PoolMode::Transaction.as_str(), "transaction");
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PoolMode {
    /// A client keeps one server connection until it disconnects
    /// (PgBouncer's default). Prepared statements and session state work.
    #[default]
    Session,
    /// A client holds a server connection for one transaction only; see
    /// [`PgBouncer`] on prepared statements.
    Transaction,
}

impl PoolMode {
    /// The value of `pool_mode` in `pgbouncer.ini`.
    ///
    /// # Examples
    ///
    /// ```
    /// # use read_after_write_testkit::PoolMode;
    /// assert_eq!(PoolMode::Session.as_str(), "session");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Transaction => "transaction",
        }
    }
}

impl fmt::Display for PoolMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Configures and starts a [`PgBouncer`].
///
/// # Examples
///
/// ```no_run
/// use read_after_write_testkit::{PgBouncer, PoolMode, TestCluster};
///
/// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
/// let cluster = TestCluster::start_with_delays(&[]).await?;
/// let bouncer = PgBouncer::builder(cluster.primary_port())
///     .pool_mode(PoolMode::Transaction)
///     .users(["postgres", "app"])
///     .start()
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until .start().await"]
pub struct PgBouncerBuilder {
    target_port: u16,
    pool_mode: PoolMode,
    users: Vec<String>,
    program: Option<PathBuf>,
    timeout: Option<Duration>,
}

impl PgBouncerBuilder {
    /// The pool mode (default [`PoolMode::Session`], as in PgBouncer).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::{PgBouncer, PoolMode};
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let bouncer = PgBouncer::builder(5432)
    ///     .pool_mode(PoolMode::Transaction)
    ///     .start()
    ///     .await?;
    /// assert_eq!(bouncer.pool_mode(), PoolMode::Transaction);
    /// # Ok(())
    /// # }
    /// ```
    pub fn pool_mode(mut self, mode: PoolMode) -> Self {
        self.pool_mode = mode;
        self
    }

    /// The roles clients may log in as (default `postgres` alone); they
    /// replace the list. PgBouncer checks no password (`auth_type =
    /// trust`) and logs in to the target as the same role, with no
    /// password: the roles must exist there.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::PgBouncer;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let bouncer = PgBouncer::builder(5432).users(["postgres", "app"]).start().await?;
    /// let url = bouncer.url("app", "postgres");
    /// # Ok(())
    /// # }
    /// ```
    pub fn users<I>(mut self, users: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.users = users.into_iter().map(Into::into).collect();
        self
    }

    /// Runs this program instead of the one [`PgBouncer::find_program`]
    /// finds.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::PgBouncer;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let bouncer = PgBouncer::builder(5432)
    ///     .program("/opt/pgbouncer/bin/pgbouncer")
    ///     .start()
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn program(mut self, path: impl Into<PathBuf>) -> Self {
        self.program = Some(path.into());
        self
    }

    /// How long to wait for PgBouncer to accept connections (default 30 s,
    /// as for a cluster).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use read_after_write_testkit::PgBouncer;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let bouncer = PgBouncer::builder(5432)
    ///     .startup_timeout(Duration::from_secs(60))
    ///     .start()
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Writes the configuration, starts PgBouncer and waits until it
    /// accepts TCP connections. It does not connect to the target yet:
    /// PgBouncer does that for its first client.
    ///
    /// # Errors
    ///
    /// [`KitError::PgBouncerNotFound`], [`KitError::InvalidArgument`] for a
    /// user name PgBouncer cannot take, [`KitError::NoServerUser`] as root
    /// without a `postgres` OS user, [`KitError::Io`], or
    /// [`KitError::NotReady`] (with PgBouncer's error output) if it exits
    /// or does not listen in time.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::{PgBouncer, TestCluster};
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[]).await?;
    /// let bouncer = PgBouncer::builder(cluster.primary_port()).start().await?;
    /// println!("PgBouncer listens on {}", bouncer.port());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start(self) -> Result<PgBouncer, KitError> {
        if let Some(user) = self.users.iter().find(|user| !valid_user(user)) {
            return Err(KitError::InvalidArgument {
                what: format!("PgBouncerBuilder::users(.., {user:?}, ..)"),
                fix: "pass non-empty role names without control characters".to_owned(),
            });
        }
        blocking(move || self.start_blocking()).await
    }

    fn start_blocking(self) -> Result<PgBouncer, KitError> {
        let program = match self.program {
            Some(path) => path,
            None => PgBouncer::find_program()?,
        };
        let run_as = RunAs::detect()?;
        let root = workdir::temp_root()?;
        let timeout = self.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let keep = workdir::keep_requested();
        let mut attempt = 1;
        loop {
            let dir = workdir::create_unique_dir(&run_as, &root, "-pgbouncer")?;
            let port = free_port()?;
            let config = Config {
                target_port: self.target_port,
                port,
                pool_mode: self.pool_mode,
                dir: &dir,
            };
            let started = write_files(&run_as, &config, &self.users)
                .and_then(|()| PgBouncer::spawn(&run_as, &program, &config, keep, timeout));
            match started {
                Ok(bouncer) => {
                    tracing::debug!(
                        port,
                        target_port = self.target_port,
                        pool_mode = %self.pool_mode,
                        "PgBouncer started"
                    );
                    return Ok(bouncer);
                }
                Err(err) => {
                    let stderr = fs::read_to_string(dir.join("pgbouncer.stderr"));
                    let port_taken = stderr.is_ok_and(|s| s.contains("Address already in use"));
                    if !keep {
                        let _ = fs::remove_dir_all(&dir);
                    }
                    if !port_taken || attempt >= PORT_ATTEMPTS {
                        return Err(err);
                    }
                    tracing::debug!(port, "PgBouncer's port was taken, retrying");
                    attempt += 1;
                }
            }
        }
    }
}

/// A PgBouncer on 127.0.0.1 in front of one server, for tests of what
/// connection pooling does to a client.
///
/// Dropping it stops PgBouncer (`SIGTERM`: every client connection is
/// closed) and removes its files, blocking for a few milliseconds. It
/// holds no connection or task of the test's runtime, so a `static` one
/// may be shared by several tests; it stops when the process ends.
///
/// # PgBouncer 1.18 and prepared statements
///
/// Debian 12 ships PgBouncer 1.18. In transaction mode it hands each
/// transaction (and each statement outside one) to whichever server
/// connection is free, and before 1.21 (`max_prepared_statements`) it knows
/// nothing of protocol-level prepared statements: a statement prepared on
/// one server connection is missing on the next. A client that prepares
/// statements fails there, at random and more often under concurrency,
/// with `prepared statement "…" does not exist` (or "already exists").
///
/// So through 1.18 in transaction mode, use the simple query protocol, or
/// use [`PoolMode::Session`]. With sqlx, `sqlx::raw_sql(..)` and a plain
/// `&str` passed to an executor method (`conn.execute("…")`) use the simple
/// protocol; `sqlx::query(..)` does not, even without bound parameters: it
/// prepares and caches a named statement (`persistent(false)` only makes it
/// unnamed, which still spans protocol messages a pooler may split).
///
/// # How it runs
///
/// The program is found as [`PgBouncer::find_program`] says, and runs in
/// the foreground under a small `/bin/sh` that outlives the test process
/// only long enough to stop it: dropping the [`PgBouncer`], or the test
/// process ending in any way, stops PgBouncer and removes its directory
/// (`$TMPDIR/read-after-write-testkit/<pid>-<n>-<random>-pgbouncer/`, with
/// `pgbouncer.ini`, `userlist.txt`, the log `pgbouncer.log`, the pid file
/// and PgBouncer's standard error). `KEEP_TEST_CLUSTER=1` keeps the
/// directory. PgBouncer refuses to run as root: when the tests run as root,
/// it runs as the `postgres` OS user, like the servers.
///
/// Settings: `listen_addr = 127.0.0.1` on a free port and no Unix socket;
/// one wildcard database, `* = host=127.0.0.1 port=<target>`, so any
/// database name reaches the same name on the target; `auth_type = trust`
/// with an `auth_file` that lists the users (PgBouncer wants a user listed
/// even with trust), and the target's own authentication behind it (the
/// kit's clusters trust 127.0.0.1); `ignore_startup_parameters =
/// extra_float_digits`, which sqlx sends; PgBouncer's defaults otherwise
/// (`server_reset_query = DISCARD ALL`, used in session mode; pools of 20
/// server connections per user and database).
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use read_after_write_testkit::{PgBouncer, PoolMode, TestCluster};
///
/// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
/// let cluster = TestCluster::start_with_delays(&[Duration::ZERO]).await?;
/// let primary = PgBouncer::builder(cluster.primary_port())
///     .pool_mode(PoolMode::Transaction)
///     .start()
///     .await?;
/// let replica = PgBouncer::builder(cluster.replica(0).port())
///     .pool_mode(PoolMode::Transaction)
///     .start()
///     .await?;
/// // The app under test knows only the two PgBouncer addresses.
/// let primary_url = primary.url("postgres", "postgres");
/// let replica_url = replica.url("postgres", "postgres");
/// # Ok(())
/// # }
/// ```
pub struct PgBouncer {
    port: u16,
    target_port: u16,
    pool_mode: PoolMode,
    dir: PathBuf,
    keep: bool,
    /// PgBouncer's own pid, a child of `runner`.
    pid: i32,
    /// The `/bin/sh` running [`RUNNER_SCRIPT`].
    runner: Child,
    /// The runner's standard input: closing it stops PgBouncer.
    stdin: Option<ChildStdin>,
}

impl PgBouncer {
    /// A builder for a PgBouncer in front of the server on
    /// 127.0.0.1:`target_port`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::{PgBouncer, PoolMode, TestCluster};
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// # let cluster = TestCluster::start_with_delays(&[]).await?;
    /// let bouncer = PgBouncer::builder(cluster.primary_port())
    ///     .pool_mode(PoolMode::Transaction)
    ///     .users(["postgres", "app"])
    ///     .start()
    ///     .await?;
    /// assert_eq!(bouncer.target_port(), cluster.primary_port());
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder(target_port: u16) -> PgBouncerBuilder {
        PgBouncerBuilder {
            target_port,
            pool_mode: PoolMode::default(),
            users: vec!["postgres".to_owned()],
            program: None,
            timeout: None,
        }
    }

    /// Finds the `pgbouncer` program: the file named by the `PGBOUNCER`
    /// environment variable if it is set, else the first `pgbouncer` on
    /// `PATH`, else `/usr/sbin/pgbouncer` (Debian's and Fedora's place).
    ///
    /// # Errors
    ///
    /// [`KitError::PgBouncerNotFound`], whose message says how to install
    /// it (in this repository: `bash .ci/ensure-pgbouncer`).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use read_after_write_testkit::PgBouncer;
    ///
    /// let program = PgBouncer::find_program()?;
    /// println!("using {}", program.display());
    /// # Ok::<(), read_after_write_testkit::KitError>(())
    /// ```
    pub fn find_program() -> Result<PathBuf, KitError> {
        find_program_in(
            std::env::var_os(PROGRAM_VAR).filter(|v| !v.is_empty()),
            std::env::var_os("PATH"),
            Path::new(SYSTEM_PROGRAM),
        )
    }

    /// The port clients connect to, on 127.0.0.1.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::PgBouncer;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let bouncer = PgBouncer::builder(5432).start().await?;
    /// let url = format!("postgres://postgres@127.0.0.1:{}/postgres", bouncer.port());
    /// # Ok(())
    /// # }
    /// ```
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port of the server behind it, on 127.0.0.1.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::PgBouncer;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let bouncer = PgBouncer::builder(5432).start().await?;
    /// assert_eq!(bouncer.target_port(), 5432);
    /// # Ok(())
    /// # }
    /// ```
    pub fn target_port(&self) -> u16 {
        self.target_port
    }

    /// Its pool mode.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::{PgBouncer, PoolMode};
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let bouncer = PgBouncer::builder(5432).start().await?;
    /// assert_eq!(bouncer.pool_mode(), PoolMode::Session);
    /// # Ok(())
    /// # }
    /// ```
    pub fn pool_mode(&self) -> PoolMode {
        self.pool_mode
    }

    /// A connection URL through PgBouncer,
    /// `postgres://<user>@127.0.0.1:<port>/<database>`, with `user` and
    /// `database` percent-encoded. The user must be one of
    /// [`PgBouncerBuilder::users`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::PgBouncer;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let bouncer = PgBouncer::builder(5432).users(["app"]).start().await?;
    /// assert_eq!(
    ///     bouncer.url("app", "shop"),
    ///     format!("postgres://app@127.0.0.1:{}/shop", bouncer.port())
    /// );
    /// # Ok(())
    /// # }
    /// ```
    pub fn url(&self, user: &str, database: &str) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{}",
            percent_encode(user),
            self.port,
            percent_encode(database)
        )
    }

    /// PgBouncer's log file (`pgbouncer.log` in its directory).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::PgBouncer;
    /// # async fn example() -> Result<(), read_after_write_testkit::KitError> {
    /// let bouncer = PgBouncer::builder(5432).start().await?;
    /// let log = std::fs::read_to_string(bouncer.log_file()).unwrap();
    /// assert!(log.contains("listening on 127.0.0.1"));
    /// # Ok(())
    /// # }
    /// ```
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("pgbouncer.log")
    }

    /// Starts the runner script and waits until PgBouncer listens.
    fn spawn(
        run_as: &RunAs,
        program: &Path,
        config: &Config<'_>,
        keep: bool,
        timeout: Duration,
    ) -> Result<Self, KitError> {
        let dir = config.dir;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(RUNNER_SCRIPT)
            .arg("read-after-write-testkit-pgbouncer")
            .arg(program)
            .arg(dir.join("pgbouncer.ini"))
            .arg(dir)
            .arg(if keep { KEEP_MARKER } else { "" })
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            // Ctrl-C in a terminal must not stop it before the tests do.
            .process_group(0);
        if let RunAs::User { uid, gid } = run_as {
            cmd.uid(*uid).gid(*gid);
        }
        let mut runner = cmd
            .spawn()
            .map_err(|e| KitError::io("starting PgBouncer (through /bin/sh)", e))?;
        let stdin = runner.stdin.take();
        let mut line = String::new();
        let read = match runner.stdout.take() {
            Some(stdout) => BufReader::new(stdout).read_line(&mut line),
            None => Ok(0),
        };
        let pid = read.ok().and_then(|_| line.trim().parse::<i32>().ok());
        let Some(pid) = pid.filter(|&pid| pid > 0) else {
            let _ = runner.kill();
            let _ = runner.wait();
            return Err(KitError::io(
                "starting PgBouncer (through /bin/sh)",
                std::io::Error::other(format!("the runner printed no pid: {line:?}")),
            ));
        };
        let bouncer = Self {
            port: config.port,
            target_port: config.target_port,
            pool_mode: config.pool_mode,
            dir: dir.to_path_buf(),
            keep,
            pid,
            runner,
            stdin,
        };
        bouncer.wait_listening(program, timeout)?;
        Ok(bouncer)
    }

    /// Polls until PgBouncer accepts TCP connections; fails if it exits or
    /// the time is up (dropping `self` then cleans up).
    fn wait_listening(&self, program: &Path, timeout: Duration) -> Result<(), KitError> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + timeout;
        loop {
            let last_error = match TcpStream::connect_timeout(&addr, POLL_INTERVAL * 20) {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            };
            let exited = process::process_is_gone(self.pid);
            if exited || Instant::now() > deadline {
                return Err(KitError::NotReady {
                    node: format!("PgBouncer ({}) on port {}", program.display(), self.port),
                    timeout,
                    last_error: if exited {
                        "it exited".to_owned()
                    } else {
                        last_error
                    },
                    log_tail: process::log_tail(&self.dir.join("pgbouncer.stderr")),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }
}

impl fmt::Debug for PgBouncer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgBouncer")
            .field("port", &self.port)
            .field("target_port", &self.target_port)
            .field("pool_mode", &self.pool_mode)
            .field("dir", &self.dir)
            .field("pid", &self.pid)
            .finish()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // End of file on the runner's stdin: it stops PgBouncer, waits for
        // it, and removes the directory.
        drop(self.stdin.take());
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.runner.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(2)),
                _ => {
                    tracing::warn!(pid = self.pid, "PgBouncer did not stop in time; killing it");
                    let _ = process::sigkill(self.pid);
                    let _ = self.runner.kill();
                    let _ = self.runner.wait();
                    break;
                }
            }
        }
        if !self.keep && self.dir.exists() {
            let _ = fs::remove_dir_all(&self.dir);
        }
        tracing::debug!(port = self.port, "PgBouncer stopped");
    }
}

/// What `pgbouncer.ini` says.
struct Config<'a> {
    target_port: u16,
    port: u16,
    pool_mode: PoolMode,
    dir: &'a Path,
}

impl Config<'_> {
    fn text(&self) -> String {
        let dir = self.dir.display();
        format!(
            "; read-after-write-testkit\n\
             [databases]\n\
             * = host=127.0.0.1 port={target}\n\
             \n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {dir}/userlist.txt\n\
             pool_mode = {mode}\n\
             ignore_startup_parameters = extra_float_digits\n\
             logfile = {dir}/pgbouncer.log\n\
             pidfile = {dir}/pgbouncer.pid\n",
            target = self.target_port,
            port = self.port,
            mode = self.pool_mode,
        )
    }
}

/// `userlist.txt`: one `"user" ""` line per user (a `"` doubled), no
/// password.
fn userlist(users: &[String]) -> String {
    users
        .iter()
        .map(|user| format!("\"{}\" \"\"\n", user.replace('"', "\"\"")))
        .collect()
}

/// Writes `pgbouncer.ini` and `userlist.txt`, readable by the server user.
fn write_files(run_as: &RunAs, config: &Config<'_>, users: &[String]) -> Result<(), KitError> {
    for (name, text) in [
        ("pgbouncer.ini", config.text()),
        ("userlist.txt", userlist(users)),
    ] {
        let path = config.dir.join(name);
        fs::write(&path, text)
            .map_err(|e| KitError::io(format!("writing {}", path.display()), e))?;
        run_as.chown(&path)?;
    }
    Ok(())
}

/// Whether PgBouncer's user list can hold `user` on one line.
fn valid_user(user: &str) -> bool {
    !user.is_empty() && !user.chars().any(char::is_control)
}

/// [`PgBouncer::find_program`] with its inputs given.
fn find_program_in(
    named: Option<std::ffi::OsString>,
    path: Option<std::ffi::OsString>,
    system: &Path,
) -> Result<PathBuf, KitError> {
    if let Some(named) = named {
        let named = PathBuf::from(named);
        return if is_executable(&named) {
            Ok(named)
        } else {
            Err(KitError::PgBouncerNotFound {
                searched: format!("{PROGRAM_VAR}={} (not an executable file)", named.display()),
            })
        };
    }
    let on_path = path
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("pgbouncer"))
        .find(|candidate| is_executable(candidate));
    if let Some(found) = on_path {
        return Ok(found);
    }
    if is_executable(system) {
        return Ok(system.to_path_buf());
    }
    Err(KitError::PgBouncerNotFound {
        searched: format!("PATH, {}", system.display()),
    })
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_what_the_kit_relies_on() {
        let dir = Path::new("/tmp/x-pgbouncer");
        let text = Config {
            target_port: 5433,
            port: 6000,
            pool_mode: PoolMode::Transaction,
            dir,
        }
        .text();
        for line in [
            "* = host=127.0.0.1 port=5433",
            "listen_addr = 127.0.0.1",
            "listen_port = 6000",
            "unix_socket_dir =",
            "auth_type = trust",
            "auth_file = /tmp/x-pgbouncer/userlist.txt",
            "pool_mode = transaction",
            "ignore_startup_parameters = extra_float_digits",
            "logfile = /tmp/x-pgbouncer/pgbouncer.log",
            "pidfile = /tmp/x-pgbouncer/pgbouncer.pid",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing:\n{text}");
        }
        assert!(!text.contains("server_reset_query"));
    }

    #[test]
    fn user_list_quotes_names() {
        let users = ["postgres".to_owned(), "odd\"name".to_owned()];
        assert_eq!(
            userlist(&users),
            "\"postgres\" \"\"\n\"odd\"\"name\" \"\"\n"
        );
        assert!(valid_user("app"));
        assert!(!valid_user(""));
        assert!(!valid_user("app\n\"admin\" \"\""));
    }

    #[test]
    fn urls_are_percent_encoded() {
        assert_eq!(percent_encode("postgres"), "postgres");
        assert_eq!(percent_encode("a b@c/d"), "a%20b%40c%2Fd");
    }

    #[test]
    fn program_lookup_order_and_message() {
        let base = std::env::temp_dir().join(format!("testkit-pgbouncer-{}", std::process::id()));
        let (named, on_path, system) = (base.join("named"), base.join("bin"), base.join("sbin"));
        for dir in [&named, &on_path, &system] {
            fs::create_dir_all(dir).unwrap();
            let program = dir.join("pgbouncer");
            fs::write(&program, "#!/bin/sh\n").unwrap();
            fs::set_permissions(&program, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let path = std::env::join_paths([base.join("empty"), on_path.clone()]).ok();
        let system_program = system.join("pgbouncer");
        let found = |named_var: Option<&Path>, path: Option<std::ffi::OsString>| {
            find_program_in(named_var.map(Into::into), path, &system_program)
        };
        let named_program = named.join("pgbouncer");
        assert_eq!(
            found(Some(&named_program), path.clone()).unwrap(),
            named_program
        );
        assert_eq!(
            found(None, path.clone()).unwrap(),
            on_path.join("pgbouncer")
        );
        assert_eq!(found(None, None).unwrap(), system_program);
        let missing = found(Some(&base.join("nothing")), path).unwrap_err();
        fs::remove_dir_all(&base).unwrap();
        let msg = missing.to_string();
        assert!(msg.contains("PGBOUNCER="), "{msg}");
        assert!(msg.contains("apt-get install pgbouncer"), "{msg}");
        let nowhere = find_program_in(None, None, &base.join("gone")).unwrap_err();
        assert!(matches!(nowhere, KitError::PgBouncerNotFound { .. }));
    }
}

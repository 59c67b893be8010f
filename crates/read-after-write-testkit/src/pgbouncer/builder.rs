//! [`PgBouncerBuilder`]: what a PgBouncer is told, and how it starts.

use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use super::config::{valid_user, write_files, Config, PoolMode};
use super::runner::Runner;
use super::PgBouncer;
use crate::ports::free_port;
use crate::process::RunAs;
use crate::wait::{blocking, DEFAULT_TIMEOUT};
use crate::workdir;
use crate::KitError;

/// How often to try another port when the one picked was taken meanwhile.
const PORT_ATTEMPTS: usize = 5;

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
            let runner = write_files(&run_as, &config, &self.users)
                .and_then(|()| Runner::spawn(&run_as, &program, &dir, keep));
            let runner = match runner {
                Ok(runner) => runner,
                Err(err) => {
                    if !keep {
                        let _ = fs::remove_dir_all(&dir);
                    }
                    return Err(err);
                }
            };
            let name = format!("PgBouncer ({}) on port {port}", program.display());
            match runner.wait_listening(&name, port, timeout) {
                Ok(()) => {
                    tracing::debug!(
                        port,
                        target_port = self.target_port,
                        pool_mode = %self.pool_mode,
                        "PgBouncer started"
                    );
                    return Ok(PgBouncer {
                        port,
                        target_port: self.target_port,
                        pool_mode: self.pool_mode,
                        runner,
                    });
                }
                Err(err) => {
                    // Read before the runner's drop removes the directory.
                    let port_taken = fs::read_to_string(runner.stderr_file())
                        .is_ok_and(|s| s.contains("Address already in use"));
                    drop(runner);
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
}

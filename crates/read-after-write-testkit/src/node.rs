//! One PostgreSQL server of a cluster: its directories, configuration and
//! `pg_ctl` operations. Everything here blocks; the cluster runs it on
//! tokio's blocking pool.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use sqlx::postgres::PgConnectOptions;
use sqlx::ConnectOptions;

use crate::ports::{self, free_port};
use crate::process::{self, RunAs};
use crate::{KitError, PgBinaries};

/// How often to retry starting a server whose port was taken meanwhile.
const PORT_ATTEMPTS: usize = 5;

/// The oldest supported major version (for `wal_keep_size`,
/// `standby.signal` and `recovery_min_apply_delay` in
/// `postgresql.auto.conf`).
const MIN_MAJOR_VERSION: u32 = 13;

/// Settings written to every node's `postgresql.conf`, tuned for fast,
/// disposable servers that stream WAL to each other over 127.0.0.1.
const BASE_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "127.0.0.1"),
    ("unix_socket_directories", ""),
    ("max_connections", "100"),
    ("shared_buffers", "32MB"),
    ("fsync", "off"),
    ("full_page_writes", "off"),
    ("wal_level", "replica"),
    ("max_wal_senders", "10"),
    ("max_replication_slots", "10"),
    // Lets a replica that was stopped for a while catch up without slots.
    ("wal_keep_size", "256MB"),
    ("wal_sender_timeout", "10s"),
    ("hot_standby", "on"),
    ("hot_standby_feedback", "on"),
    ("wal_receiver_status_interval", "1s"),
    ("wal_receiver_timeout", "10s"),
    // Reconnect quickly after the primary restarts.
    ("wal_retrieve_retry_interval", "100ms"),
    ("logging_collector", "off"),
    ("log_min_messages", "warning"),
    ("log_line_prefix", "%m [%p] "),
];

/// Settings that differ per node; they live in `postgresql.auto.conf`.
const NODE_KEYS: &[&str] = &["port", "primary_conninfo", "recovery_min_apply_delay"];

/// What every blocking operation needs to run the server programs.
#[derive(Debug, Clone)]
pub(crate) struct Env {
    pub(crate) bins: PgBinaries,
    pub(crate) run_as: RunAs,
    pub(crate) timeout: Duration,
}

impl Env {
    /// Creates a directory (mode 0700 or 0755) owned by the server user.
    pub(crate) fn create_dir(&self, path: &Path, mode: u32) -> Result<(), KitError> {
        self.run_as.create_dir(path, mode)
    }

    fn timeout_secs(&self) -> String {
        self.timeout.as_secs().max(1).to_string()
    }
}

/// A server's place on disk and on the network.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    /// `primary`, `replica-1`, ...
    pub(crate) name: String,
    pub(crate) port: u16,
    /// `<cluster dir>/<name>`: holds `data/` and `postgres.log`.
    pub(crate) dir: PathBuf,
    pub(crate) data: PathBuf,
    pub(crate) log: PathBuf,
}

impl Node {
    /// Creates the node's directories under `cluster_dir`, with a fresh port.
    pub(crate) fn create(env: &Env, cluster_dir: &Path, name: &str) -> Result<Self, KitError> {
        let dir = cluster_dir.join(name);
        env.create_dir(&dir, 0o755)?;
        let data = dir.join("data");
        env.create_dir(&data, 0o700)?;
        Ok(Self {
            name: name.to_owned(),
            port: free_port()?,
            log: dir.join("postgres.log"),
            dir,
            data,
        })
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`
    pub(crate) fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub(crate) fn connect_options(&self) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.port)
            .username("postgres")
            .database("postgres")
            .application_name("read-after-write-testkit")
    }

    /// Connect options for the kit's own polling queries, which would
    /// otherwise flood the statement log.
    pub(crate) fn quiet_connect_options(&self) -> PgConnectOptions {
        self.connect_options().disable_statement_logging()
    }

    pub(crate) fn log_tail(&self) -> String {
        process::log_tail(&self.log)
    }

    /// Runs `initdb` and configures the node as a primary.
    pub(crate) fn init_primary(
        &self,
        env: &Env,
        settings: &[(String, String)],
        hba_lines: &[String],
    ) -> Result<(), KitError> {
        let mut cmd = env.bins.command(&env.run_as, "initdb", &self.dir);
        cmd.arg("-D")
            .arg(&self.data)
            .args(["--auth=trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .arg("--locale=C");
        process::run(cmd, None)?;
        check_version(&self.data)?;

        let mut conf = String::from("\n# read-after-write-testkit\n");
        for (name, value) in BASE_SETTINGS {
            conf.push_str(&setting_line(name, value));
        }
        if !settings.is_empty() {
            conf.push_str("# ClusterBuilder::setting\n");
            for (name, value) in settings {
                conf.push_str(&setting_line(name, value));
            }
        }
        append(&self.data.join("postgresql.conf"), &conf)?;

        let hba_path = self.data.join("pg_hba.conf");
        let mut hba = read(&hba_path)?;
        if !allows_local_replication(&hba) {
            hba.push_str("host replication all 127.0.0.1/32 trust\n");
        }
        // Written in place: initdb made the file with the server user's
        // owner and mode.
        fs::write(&hba_path, with_extra_hba_lines(&hba, hba_lines))
            .map_err(|e| KitError::io(format!("writing {}", hba_path.display()), e))?;
        self.write_node_settings(env, &[("port", self.port.to_string())])
    }

    /// Clones the primary by copying its data directory, which is
    /// consistent on disk only while the primary is cleanly stopped (or not
    /// yet started), and marks the copy as a standby (`standby.signal`).
    /// The copy starts from the primary's shutdown checkpoint and streams
    /// everything after it. It shares the primary's system identifier and
    /// timeline, like a replica made by `pg_basebackup`.
    pub(crate) fn clone_by_copy(&self, env: &Env, primary: &Node) -> Result<(), KitError> {
        copy_tree(env, &primary.data, &self.data)?;
        let signal = self.data.join("standby.signal");
        fs::write(&signal, "")
            .map_err(|e| KitError::io(format!("writing {}", signal.display()), e))?;
        env.run_as.chown(&signal)
    }

    /// Configures a cloned node as a replica of the primary on
    /// `primary_port`, with its own port and apply delay.
    pub(crate) fn configure_replica(
        &self,
        env: &Env,
        primary_port: u16,
        apply_delay: Duration,
    ) -> Result<(), KitError> {
        self.write_node_settings(
            env,
            &[
                ("port", self.port.to_string()),
                (
                    "primary_conninfo",
                    format!(
                        "host=127.0.0.1 port={primary_port} user=postgres application_name={}",
                        self.name
                    ),
                ),
                ("recovery_min_apply_delay", millis(apply_delay)),
            ],
        )
    }

    /// Rewrites `postgresql.auto.conf`, replacing the per-node settings
    /// (`port`, `primary_conninfo`, `recovery_min_apply_delay`) and keeping
    /// everything else. Only call this while the node is stopped (or for
    /// settings that a reload picks up).
    pub(crate) fn write_node_settings(
        &self,
        env: &Env,
        values: &[(&str, String)],
    ) -> Result<(), KitError> {
        let path = self.data.join("postgresql.auto.conf");
        let old = read(&path).unwrap_or_default();
        let replaced: HashSet<&str> = values.iter().map(|(k, _)| *k).collect();
        let mut text: String = old
            .lines()
            .filter(|line| {
                let key = line.split('=').next().unwrap_or("").trim();
                !(NODE_KEYS.contains(&key) && replaced.contains(key))
            })
            .map(|line| format!("{line}\n"))
            .collect();
        for (name, value) in values {
            text.push_str(&setting_line(name, value));
        }
        fs::write(&path, text)
            .map_err(|e| KitError::io(format!("writing {}", path.display()), e))?;
        env.run_as.chown(&path)
    }

    /// `pg_ctl start`, waiting until the server accepts connections. If the
    /// port was taken since it was picked and `may_change_port`, picks
    /// another port and tries again.
    pub(crate) fn start(&mut self, env: &Env, may_change_port: bool) -> Result<(), KitError> {
        let mut attempt = 1;
        loop {
            self.remove_stale_pid_file();
            let log_len = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
            let mut cmd = env.bins.command(&env.run_as, "pg_ctl", &self.dir);
            cmd.args(["start", "-w", "-t", &env.timeout_secs(), "-D"])
                .arg(&self.data)
                .arg("-l")
                .arg(&self.log);
            match process::run(cmd, Some(&self.log)) {
                Ok(_) => return Ok(()),
                Err(err) if may_change_port && attempt < PORT_ATTEMPTS => {
                    let new_log = read(&self.log).unwrap_or_default();
                    let new_log = new_log.get(log_len as usize..).unwrap_or("");
                    if !new_log.contains("could not bind") {
                        return Err(err);
                    }
                    let port = free_port()?;
                    tracing::debug!(node = %self.name, old = self.port, new = port, "port taken, retrying");
                    self.port = port;
                    self.write_node_settings(env, &[("port", port.to_string())])?;
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// `pg_ctl stop -m <mode>`, waiting until the server is down.
    pub(crate) fn stop(&self, env: &Env, mode: &str) -> Result<(), KitError> {
        let mut cmd = env.bins.command(&env.run_as, "pg_ctl", &self.dir);
        cmd.args(["stop", "-w", "-t", &env.timeout_secs(), "-m", mode, "-D"])
            .arg(&self.data);
        process::run(cmd, Some(&self.log)).map(drop)
    }

    /// SIGKILLs the postmaster and all its children, like a machine crash,
    /// and waits until they are gone and the port is closed.
    pub(crate) fn kill(&self, env: &Env) -> Result<(), KitError> {
        let Some(pid) = process::postmaster_pid(&self.data) else {
            return Ok(());
        };
        let mut pids = process::children_of(pid);
        pids.push(pid);
        process::sigkill(pid)?;
        for &child in &pids {
            process::sigkill(child)?;
        }
        let deadline = Instant::now() + env.timeout;
        while pids.iter().any(|&p| !process::process_is_gone(p)) || ports::accepts_tcp(self.port) {
            if Instant::now() > deadline {
                return Err(KitError::NotReady {
                    node: self.name.clone(),
                    timeout: env.timeout,
                    last_error: format!("processes {pids:?} survived SIGKILL"),
                    log_tail: self.log_tail(),
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Freezes the server: `SIGSTOP` to the postmaster (so it forks nothing
    /// new), then to each child, until every one of them is stopped.
    /// `start_hint` names the method that starts the node, for when it is
    /// not running.
    pub(crate) fn freeze(
        &self,
        timeout: Duration,
        start_hint: &'static str,
    ) -> Result<(), KitError> {
        let Some(postmaster) =
            process::postmaster_pid(&self.data).filter(|&pid| !process::process_is_gone(pid))
        else {
            return Err(KitError::NodeStopped {
                node: self.name.clone(),
                hint: start_hint,
            });
        };
        process::signal(postmaster, Signal::SIGSTOP)?;
        let deadline = Instant::now() + timeout;
        loop {
            let mut pids = process::children_of(postmaster);
            pids.push(postmaster);
            // A zombie is a child that exited; the frozen postmaster cannot
            // reap it, and it has nothing left to do.
            let running: Vec<i32> = pids
                .into_iter()
                .filter(|&pid| !matches!(process::process_state(pid), None | Some('T' | 'Z' | 'X')))
                .collect();
            if running.is_empty() {
                tracing::debug!(node = %self.name, postmaster, "frozen");
                return Ok(());
            }
            for &pid in &running {
                process::signal(pid, Signal::SIGSTOP)?;
            }
            if Instant::now() > deadline {
                return Err(KitError::NotReady {
                    node: self.name.clone(),
                    timeout,
                    last_error: format!("processes {running:?} did not stop after SIGSTOP"),
                    log_tail: self.log_tail(),
                });
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Thaws the server after [`freeze`](Self::freeze): `SIGCONT` to every
    /// child of the postmaster, then to the postmaster. Does nothing if it
    /// is not running.
    pub(crate) fn thaw(&self) -> Result<(), KitError> {
        let Some(postmaster) = process::postmaster_pid(&self.data) else {
            return Ok(());
        };
        if process::process_is_gone(postmaster) {
            return Ok(());
        }
        for child in process::children_of(postmaster) {
            process::signal(child, Signal::SIGCONT)?;
        }
        process::signal(postmaster, Signal::SIGCONT)
    }

    /// Whether the postmaster is stopped (`SIGSTOP`): the node was frozen
    /// and not thawed.
    pub(crate) fn is_frozen(&self) -> bool {
        process::postmaster_pid(&self.data)
            .is_some_and(|pid| process::process_state(pid) == Some('T'))
    }

    /// Removes `postmaster.pid` if the process it names is gone. Postgres
    /// does this itself, except when the old postmaster is an unreaped
    /// zombie (containers whose init does not reap orphans): `kill(pid, 0)`
    /// succeeds on a zombie, so postgres would refuse to start.
    fn remove_stale_pid_file(&self) {
        if let Some(pid) = process::postmaster_pid(&self.data) {
            if process::process_is_gone(pid) {
                tracing::debug!(node = %self.name, pid, "removing stale postmaster.pid");
                let _ = fs::remove_file(self.data.join("postmaster.pid"));
            }
        }
    }
}

/// A `name = 'value'` line for a configuration file.
pub(crate) fn setting_line(name: &str, value: &str) -> String {
    format!("{name} = '{}'\n", value.replace('\'', "''"))
}

/// Whether `name` is a plausible parameter name (so it cannot inject lines).
pub(crate) fn valid_setting_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

/// A duration in PostgreSQL's millisecond syntax (`"250ms"`).
pub(crate) fn millis(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// Whether `line` is one `pg_hba.conf` line (no line break or other control
/// character but tabs), so it cannot add lines of its own.
pub(crate) fn valid_hba_line(line: &str) -> bool {
    !line.trim().is_empty() && !line.chars().any(|c| c.is_control() && c != '\t')
}

/// `hba` (initdb's `pg_hba.conf`) with `extra` lines first, behind the
/// kit's own lines that keep `postgres` over 127.0.0.1 passwordless, since
/// the first matching line decides. Unchanged without extra lines.
fn with_extra_hba_lines(hba: &str, extra: &[String]) -> String {
    if extra.is_empty() {
        return hba.to_owned();
    }
    let mut text = String::from(
        "# read-after-write-testkit: the kit connects as postgres without a password\n\
         host all postgres 127.0.0.1/32 trust\n\
         host replication postgres 127.0.0.1/32 trust\n\
         # ClusterBuilder::hba_line\n",
    );
    for line in extra {
        text.push_str(line.trim());
        text.push('\n');
    }
    text.push('\n');
    text.push_str(hba);
    text
}

fn allows_local_replication(hba: &str) -> bool {
    hba.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        matches!(
            fields.as_slice(),
            ["host", "replication", "all", "127.0.0.1/32", "trust", ..]
        )
    })
}

fn check_version(data: &Path) -> Result<(), KitError> {
    let found = read(&data.join("PG_VERSION"))?.trim().to_owned();
    let major: u32 = found.split('.').next().unwrap_or("").parse().unwrap_or(0);
    if major < MIN_MAJOR_VERSION {
        return Err(KitError::UnsupportedVersion { found });
    }
    Ok(())
}

/// Copies the contents of the directory `from` into the existing directory
/// `to`, keeping permissions and giving everything to the server user. A
/// data directory made by `initdb` holds only directories and files.
fn copy_tree(env: &Env, from: &Path, to: &Path) -> Result<(), KitError> {
    let entries =
        fs::read_dir(from).map_err(|e| KitError::io(format!("reading {}", from.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| KitError::io(format!("reading {}", from.display()), e))?;
        let source = entry.path();
        let target = to.join(entry.file_name());
        let meta = fs::symlink_metadata(&source)
            .map_err(|e| KitError::io(format!("reading {}", source.display()), e))?;
        if meta.is_dir() {
            env.create_dir(&target, meta.permissions().mode() & 0o7777)?;
            copy_tree(env, &source, &target)?;
        } else if meta.is_file() {
            fs::copy(&source, &target).map_err(|e| {
                KitError::io(
                    format!("copying {} to {}", source.display(), target.display()),
                    e,
                )
            })?;
            env.run_as.chown(&target)?;
        } else {
            return Err(KitError::io(
                format!("copying {}", source.display()),
                std::io::Error::other(
                    "not a file or directory; the kit clones only plain data directories",
                ),
            ));
        }
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, KitError> {
    fs::read_to_string(path).map_err(|e| KitError::io(format!("reading {}", path.display()), e))
}

fn append(path: &Path, text: &str) -> Result<(), KitError> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| KitError::io(format!("appending to {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setting_lines_are_quoted() {
        assert_eq!(setting_line("work_mem", "4MB"), "work_mem = '4MB'\n");
        assert_eq!(
            setting_line("application_name", "it's"),
            "application_name = 'it''s'\n"
        );
    }

    #[test]
    fn setting_names_are_checked() {
        assert!(valid_setting_name("work_mem"));
        assert!(valid_setting_name("auto_explain.log_min_duration"));
        assert!(!valid_setting_name(""));
        assert!(!valid_setting_name("a = 1\nb"));
    }

    #[test]
    fn millis_format() {
        assert_eq!(millis(Duration::from_millis(250)), "250ms");
        assert_eq!(millis(Duration::from_secs(2)), "2000ms");
    }

    #[test]
    fn extra_hba_lines_come_first_behind_the_kits_own() {
        let initdb = "local all all trust\nhost all all 127.0.0.1/32 trust\n";
        assert_eq!(with_extra_hba_lines(initdb, &[]), initdb);
        let text = with_extra_hba_lines(
            initdb,
            &["host all app 127.0.0.1/32 scram-sha-256".to_owned()],
        );
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        assert_eq!(
            lines,
            [
                "host all postgres 127.0.0.1/32 trust",
                "host replication postgres 127.0.0.1/32 trust",
                "host all app 127.0.0.1/32 scram-sha-256",
                "local all all trust",
                "host all all 127.0.0.1/32 trust",
            ]
        );
        assert!(valid_hba_line("host\tall app 127.0.0.1/32 md5"));
        assert!(!valid_hba_line(
            "host all app 127.0.0.1/32 md5\nhost all all 0.0.0.0/0 trust"
        ));
        assert!(!valid_hba_line("  "));
    }

    #[test]
    fn hba_detection() {
        assert!(allows_local_replication(
            "host    replication     all             127.0.0.1/32            trust\n"
        ));
        assert!(!allows_local_replication(
            "# host replication all 127.0.0.1/32 trust\n"
        ));
    }
}

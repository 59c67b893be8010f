//! What PgBouncer is told: the pool mode, `pgbouncer.ini` and the user
//! list.

use std::fmt;
use std::fs;
use std::path::Path;

use crate::process::RunAs;
use crate::KitError;

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
    /// [`PgBouncer`](crate::PgBouncer) on prepared statements.
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

/// What `pgbouncer.ini` says.
pub(super) struct Config<'a> {
    pub(super) target_port: u16,
    pub(super) port: u16,
    pub(super) pool_mode: PoolMode,
    pub(super) dir: &'a Path,
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
pub(super) fn write_files(
    run_as: &RunAs,
    config: &Config<'_>,
    users: &[String],
) -> Result<(), KitError> {
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
pub(super) fn valid_user(user: &str) -> bool {
    !user.is_empty() && !user.chars().any(char::is_control)
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
}

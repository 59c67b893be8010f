//! Running the server programs (as the `postgres` OS user when we are root)
//! and signalling server processes.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{chown, DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{geteuid, Pid, User};

use crate::KitError;

/// The OS user the servers run as when the test process is root.
const SERVER_USER: &str = "postgres";

/// Who runs the server programs.
#[derive(Debug, Clone)]
pub(crate) enum RunAs {
    /// The current (non-root) user.
    Current,
    /// Another user: we are root, and initdb/postgres refuse to run as root.
    User { uid: u32, gid: u32 },
}

impl RunAs {
    /// Picks [`RunAs::Current`] unless the effective uid is 0, then the
    /// `postgres` OS user.
    pub(crate) fn detect() -> Result<Self, KitError> {
        if !geteuid().is_root() {
            return Ok(Self::Current);
        }
        match User::from_name(SERVER_USER) {
            Ok(Some(user)) => Ok(Self::User {
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
            }),
            Ok(None) | Err(_) => Err(KitError::NoServerUser {
                user: SERVER_USER.to_owned(),
            }),
        }
    }

    /// Gives `path` to the server user (no-op when running as ourselves).
    pub(crate) fn chown(&self, path: &Path) -> Result<(), KitError> {
        match self {
            Self::Current => Ok(()),
            Self::User { uid, gid } => chown(path, Some(*uid), Some(*gid)).map_err(|e| {
                KitError::io(
                    format!("giving {} to the `{SERVER_USER}` user", path.display()),
                    e,
                )
            }),
        }
    }

    /// Creates a directory with `mode` (0700, 0755) owned by the server
    /// user.
    pub(crate) fn create_dir(&self, path: &Path, mode: u32) -> Result<(), KitError> {
        fs::DirBuilder::new()
            .mode(mode)
            .create(path)
            .map_err(|e| KitError::io(format!("creating {}", path.display()), e))?;
        // The umask may have cleared bits we need.
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|e| KitError::io(format!("setting the mode of {}", path.display()), e))?;
        self.chown(path)
    }

    /// A command for a server program (or PgBouncer), run as the server
    /// user, in `cwd` (which must be accessible to that user), with no
    /// stdin and without `PG*` environment variables that could redirect
    /// it.
    ///
    /// The user is switched by `setuid` in the child just before `exec`, so
    /// the environment set here reaches the program unchanged (the programs
    /// are not set-uid, so the loader honours `LD_LIBRARY_PATH`, which
    /// `PgBinaries::command` sets).
    pub(crate) fn command(&self, program: &Path, cwd: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(cwd).stdin(Stdio::null());
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|k| k.starts_with("PG")) {
                cmd.env_remove(key);
            }
        }
        if let Self::User { uid, gid } = self {
            cmd.uid(*uid).gid(*gid).env("HOME", cwd);
        }
        cmd
    }
}

/// Runs `cmd` to completion and fails with its output when it exits
/// non-zero. `log` is a server log whose tail is added to the error.
pub(crate) fn run(mut cmd: Command, log: Option<&Path>) -> Result<Output, KitError> {
    let line = command_line(&cmd);
    tracing::debug!(command = %line, "running");
    let output = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| KitError::io(format!("running `{line}`"), e))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(KitError::Command {
            command: line,
            status: output.status.to_string(),
            output: combined_output(&output),
            log_tail: log.map(log_tail).unwrap_or_default(),
        })
    }
}

/// The command line, for messages.
pub(crate) fn command_line(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    let mut line = program
        .file_name()
        .unwrap_or(OsStr::new(""))
        .to_string_lossy()
        .into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

fn combined_output(output: &Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    text.trim_end().to_owned()
}

/// The last lines of a server log, formatted to end an error message; empty
/// if the log cannot be read.
pub(crate) fn log_tail(log: &Path) -> String {
    const LINES: usize = 20;
    let Ok(text) = std::fs::read_to_string(log) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LINES)..].join("\n");
    if tail.is_empty() {
        String::new()
    } else {
        format!("\nlast lines of {}:\n{tail}", log.display())
    }
}

/// Whether a process is gone: it does not exist, or it is a zombie (which
/// happens when the init process of a container does not reap orphans).
pub(crate) fn process_is_gone(pid: i32) -> bool {
    if pid <= 0 {
        return true;
    }
    match kill(Pid::from_raw(pid), None) {
        Err(Errno::ESRCH) => true,
        // EPERM: it exists but belongs to someone else.
        Ok(()) | Err(_) => is_zombie(pid),
    }
}

fn is_zombie(pid: i32) -> bool {
    // Linux only; elsewhere zombies are reaped by init promptly enough.
    matches!(process_state(pid), Some('Z' | 'X'))
}

/// A process's state letter (`R`, `S`, `D`, `T` for stopped, `Z`...), from
/// `/proc/<pid>/stat`; `None` if it is gone (or not on Linux).
pub(crate) fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the parenthesised command name, which may itself
    // contain spaces and parentheses.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.trim_start().chars().next()
}

/// The pids of the direct children of `parent` (Linux only; empty elsewhere).
pub(crate) fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// Sends `signal` to `pid`, ignoring a process that is already gone.
pub(crate) fn signal(pid: i32, signal: Signal) -> Result<(), KitError> {
    match kill(Pid::from_raw(pid), signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(KitError::io(
            format!("sending {signal} to process {pid}"),
            e.into(),
        )),
    }
}

/// Sends SIGKILL to `pid`, ignoring a process that is already gone.
pub(crate) fn sigkill(pid: i32) -> Result<(), KitError> {
    signal(pid, Signal::SIGKILL)
}

/// The postmaster pid recorded in a data directory, if the server is (or
/// was left) running.
pub(crate) fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_bogus_pid_is_gone() {
        assert!(!process_is_gone(std::process::id() as i32));
        assert!(process_is_gone(i32::MAX));
        assert!(process_is_gone(0));
    }

    #[test]
    fn own_process_is_running_not_stopped() {
        let state = process_state(std::process::id() as i32);
        assert!(matches!(state, Some('R' | 'S')), "{state:?}");
        assert_eq!(process_state(i32::MAX), None);
    }

    #[test]
    fn command_line_names_program_and_args() {
        let mut cmd = Command::new("/usr/bin/pg_ctl");
        cmd.args(["-D", "/x", "start"]);
        assert_eq!(command_line(&cmd), "pg_ctl -D /x start");
    }
}

//! The running PgBouncer: a `/bin/sh` that starts it, stops it when the
//! test process closes the shell's standard input (a drop, or the process
//! ending in any way), and removes its directory.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::ports;
use crate::process::{self, RunAs};
use crate::wait::POLL_INTERVAL;
use crate::workdir::KEEP_MARKER;
use crate::KitError;

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

/// PgBouncer running in `dir` under [`RUNNER_SCRIPT`]; dropping it stops
/// PgBouncer and removes `dir` (unless kept).
#[derive(Debug)]
pub(super) struct Runner {
    dir: PathBuf,
    keep: bool,
    /// PgBouncer's own pid, a child of `shell`.
    pid: i32,
    shell: Child,
    /// The shell's standard input: closing it stops PgBouncer.
    stdin: Option<ChildStdin>,
}

impl Runner {
    /// Starts `program` with `dir/pgbouncer.ini`, as `run_as`.
    pub(super) fn spawn(
        run_as: &RunAs,
        program: &Path,
        dir: &Path,
        keep: bool,
    ) -> Result<Self, KitError> {
        let mut cmd = run_as.command(Path::new("/bin/sh"), dir);
        cmd.arg("-c")
            .arg(RUNNER_SCRIPT)
            .arg("read-after-write-testkit-pgbouncer")
            .arg(program)
            .arg(dir.join("pgbouncer.ini"))
            .arg(dir)
            .arg(if keep { KEEP_MARKER } else { "" })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // Ctrl-C in a terminal must not stop it before the tests do.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut shell = cmd
            .spawn()
            .map_err(|e| KitError::io("starting PgBouncer (through /bin/sh)", e))?;
        let stdin = shell.stdin.take();
        let mut line = String::new();
        let read = match shell.stdout.take() {
            Some(stdout) => BufReader::new(stdout).read_line(&mut line),
            None => Ok(0),
        };
        let pid = read.ok().and_then(|_| line.trim().parse::<i32>().ok());
        let Some(pid) = pid.filter(|&pid| pid > 0) else {
            let _ = shell.kill();
            let _ = shell.wait();
            return Err(KitError::io(
                "starting PgBouncer (through /bin/sh)",
                std::io::Error::other(format!("the runner printed no pid: {line:?}")),
            ));
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            keep,
            pid,
            shell,
            stdin,
        })
    }

    /// Polls until PgBouncer accepts TCP connections on `port`; fails if it
    /// exits or the time is up. `name` names it in the error.
    pub(super) fn wait_listening(
        &self,
        name: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<(), KitError> {
        let deadline = Instant::now() + timeout;
        loop {
            if ports::accepts_tcp(port) {
                return Ok(());
            }
            let exited = process::process_is_gone(self.pid);
            if exited || Instant::now() > deadline {
                return Err(KitError::NotReady {
                    node: name.to_owned(),
                    timeout,
                    last_error: if exited {
                        "it exited".to_owned()
                    } else {
                        format!("nothing listens on 127.0.0.1:{port}")
                    },
                    log_tail: process::log_tail(&self.stderr_file()),
                });
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Where PgBouncer's files are.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// PgBouncer's own pid.
    pub(super) fn pid(&self) -> i32 {
        self.pid
    }

    /// PgBouncer's standard error, which holds what it says before it
    /// opens its log file.
    pub(super) fn stderr_file(&self) -> PathBuf {
        self.dir.join("pgbouncer.stderr")
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        // End of file on the shell's stdin: it stops PgBouncer, waits for
        // it, and removes the directory.
        drop(self.stdin.take());
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.shell.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(2)),
                _ => {
                    tracing::warn!(pid = self.pid, "PgBouncer did not stop in time; killing it");
                    let _ = process::sigkill(self.pid);
                    let _ = self.shell.kill();
                    let _ = self.shell.wait();
                    break;
                }
            }
        }
        if !self.keep && self.dir.exists() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

//! The cluster's temporary directory and everything that makes sure no
//! server outlives its test process: the teardown on drop, a watchdog
//! process for exits that skip destructors, and a sweep of leftovers.

use std::collections::hash_map::RandomState;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::unistd::geteuid;

use crate::node::Env;
use crate::process::{self, RunAs};
use crate::KitError;

/// The directory under the system temporary directory that holds all
/// clusters of all processes.
const ROOT_NAME: &str = "read-after-write-testkit";

/// A file marking a cluster directory that `KEEP_TEST_CLUSTER` kept.
pub(crate) const KEEP_MARKER: &str = "KEPT";

/// The environment variable that keeps cluster directories for debugging.
pub(crate) const KEEP_VAR: &str = "KEEP_TEST_CLUSTER";

/// Whether `KEEP_TEST_CLUSTER` asks to keep the directories.
pub(crate) fn keep_requested() -> bool {
    std::env::var(KEEP_VAR).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `$TMPDIR/read-after-write-testkit`, created world-writable and sticky
/// (like `/tmp`) so that root and other users can share it.
pub(crate) fn temp_root() -> Result<PathBuf, KitError> {
    let root = std::env::temp_dir().join(ROOT_NAME);
    fs::create_dir_all(&root)
        .map_err(|e| KitError::io(format!("creating {}", root.display()), e))?;
    if let Ok(meta) = fs::metadata(&root) {
        if meta.uid() == geteuid().as_raw() && meta.mode() & 0o7777 != 0o1777 {
            let _ = fs::set_permissions(&root, fs::Permissions::from_mode(0o1777));
        }
    }
    Ok(root)
}

/// A fresh, unique directory `<root>/<pid>-<counter>-<random><suffix>`
/// (a cluster's, or a PgBouncer's with suffix `-pgbouncer`), owned by the
/// server user. The pid lets [`sweep`] find directories of processes that
/// died without cleaning up.
pub(crate) fn create_unique_dir(
    run_as: &RunAs,
    root: &Path,
    suffix: &str,
) -> Result<PathBuf, KitError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random = RandomState::new().build_hasher().finish() as u32;
    let dir = root.join(format!(
        "{}-{counter}-{random:08x}{suffix}",
        std::process::id()
    ));
    run_as.create_dir(&dir, 0o755)?;
    Ok(dir)
}

/// Removes cluster directories whose owning process no longer exists,
/// stopping any server still running in them. Best effort: failures are
/// logged and skipped.
pub(crate) fn sweep(env: &Env, root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(owner) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        if !process::process_is_gone(owner) || path.join(KEEP_MARKER).exists() {
            continue;
        }
        tracing::info!(dir = %path.display(), owner, "removing a test cluster left by a dead process");
        stop_all_servers(env, &path);
        if let Err(e) = fs::remove_dir_all(&path) {
            tracing::warn!(dir = %path.display(), error = %e, "could not remove a leftover test cluster");
        }
    }
}

/// `pg_ctl stop -m immediate` for every live server under `cluster_dir`,
/// in parallel. Best effort.
fn stop_all_servers(env: &Env, cluster_dir: &Path) {
    let Ok(entries) = fs::read_dir(cluster_dir) else {
        return;
    };
    let mut children = Vec::new();
    for entry in entries.flatten() {
        let data = entry.path().join("data");
        let Some(pid) = process::postmaster_pid(&data) else {
            continue;
        };
        if process::process_is_gone(pid) {
            continue;
        }
        let mut cmd = env.bins.command(&env.run_as, "pg_ctl", cluster_dir);
        cmd.args(["stop", "-w", "-t", "10", "-m", "immediate", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match cmd.spawn() {
            Ok(child) => children.push(child),
            Err(e) => {
                tracing::warn!(data = %data.display(), error = %e, "could not run pg_ctl stop")
            }
        }
    }
    for mut child in children {
        let _ = child.wait();
    }
}

/// A process that outlives us and cleans up the cluster directory when we
/// exit without dropping the [`ClusterDir`] (a `static` cluster, which Rust
/// never drops, `std::process::exit`, a SIGKILL...).
///
/// It reads its stdin, a pipe whose only writer is this process, so it sees
/// end-of-file exactly when this process is gone. It runs in its own
/// process group so that Ctrl-C in a terminal does not kill it.
#[derive(Debug)]
struct Watchdog {
    child: Child,
    /// Held open until drop; closing it is what wakes the watchdog.
    _stdin: ChildStdin,
}

const WATCHDOG_SCRIPT: &str = r#"
cat >/dev/null
for data in "$1"/*/data; do
    if [ -f "$data/postmaster.pid" ]; then
        "$2" stop -w -t 10 -m immediate -D "$data" >/dev/null 2>&1
    fi
done
if [ "$3" = keep ]; then touch "$1/KEPT"; else rm -rf "$1"; fi
"#;

impl Watchdog {
    fn spawn(env: &Env, dir: &Path, keep: bool) -> Result<Self, KitError> {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("read-after-write-testkit-watchdog")
            .arg(dir)
            .arg(env.bins.program("pg_ctl"))
            .arg(if keep { "keep" } else { "remove" })
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        if let RunAs::User { uid, gid } = env.run_as {
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| KitError::io("starting the cleanup watchdog (/bin/sh)", e))?;
        let Some(stdin) = child.stdin.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(KitError::io(
                "starting the cleanup watchdog (/bin/sh)",
                std::io::Error::other("no stdin pipe"),
            ));
        };
        Ok(Self {
            child,
            _stdin: stdin,
        })
    }

    /// Ends the watchdog without letting it clean up.
    fn disarm(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Owns a cluster's directory: dropping it stops every server in it
/// (`pg_ctl stop -m immediate`) and removes it, unless `KEEP_TEST_CLUSTER`
/// is set.
#[derive(Debug)]
pub(crate) struct ClusterDir {
    env: Env,
    path: PathBuf,
    keep: bool,
    watchdog: Option<Watchdog>,
}

impl ClusterDir {
    /// Sweeps leftovers, then creates a fresh cluster directory guarded by a
    /// watchdog.
    pub(crate) fn create(env: &Env) -> Result<Self, KitError> {
        let root = temp_root()?;
        sweep(env, &root);
        let path = create_unique_dir(&env.run_as, &root, "")?;
        let keep = keep_requested();
        let mut dir = Self {
            env: env.clone(),
            path,
            keep,
            watchdog: None,
        };
        dir.watchdog = Some(Watchdog::spawn(env, &dir.path, keep)?);
        Ok(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ClusterDir {
    fn drop(&mut self) {
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.disarm();
        }
        tracing::debug!(dir = %self.path.display(), "stopping servers");
        stop_all_servers(&self.env, &self.path);
        tracing::debug!(dir = %self.path.display(), "servers stopped");
        if self.keep {
            let marker = self.path.join(KEEP_MARKER);
            let _ = fs::File::create(&marker).and_then(|mut f| f.write_all(b"kept\n"));
            tracing::info!(dir = %self.path.display(), "{KEEP_VAR} is set: keeping the test cluster's files");
        } else if let Err(e) = fs::remove_dir_all(&self.path) {
            tracing::warn!(dir = %self.path.display(), error = %e, "could not remove the test cluster's files");
        } else {
            tracing::debug!(dir = %self.path.display(), "files removed");
        }
    }
}

//! Finding the PostgreSQL server programs.

use std::env;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::{self, RunAs};
use crate::KitError;

/// The programs a cluster needs; all of them must live in one directory.
const PROGRAMS: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

/// A library that marks `<bin>/../lib` as the home of the programs' shared
/// libraries (a relocatable build such as the `@embedded-postgres` npm
/// packages), rather than one of server plugins only (Debian's
/// `/usr/lib/postgresql/<major>/lib`).
const LIBPQ: &str = "libpq.so.5";

/// The directory holding the PostgreSQL server programs (`initdb`, `pg_ctl`
/// and `postgres`; `pg_basebackup` is not needed).
///
/// # Examples
///
/// ```no_run
/// use read_after_write_testkit::PgBinaries;
///
/// let bins = PgBinaries::discover()?;
/// println!("using {}", bins.bin_dir().display());
/// # Ok::<(), read_after_write_testkit::KitError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBinaries {
    dir: PathBuf,
}

impl PgBinaries {
    /// Finds the server programs.
    ///
    /// Looks, in order, in:
    ///
    /// 1. the directory named by the `PG_BIN` environment variable (if it is
    ///    set, it must hold all three programs);
    /// 2. the directories on `PATH`: the first one with an `initdb`, after
    ///    resolving symbolic links, so that a `/usr/local/bin/initdb` linking
    ///    to `/usr/lib/postgresql/15/bin/initdb` selects the latter directory;
    /// 3. `/usr/lib/postgresql/<version>/bin` (Debian, Ubuntu) and
    ///    `/usr/pgsql-<version>/bin` (RHEL), highest version first, then
    ///    `/usr/local/pgsql/bin`.
    ///
    /// # Errors
    ///
    /// [`KitError::BinariesNotFound`], whose message says how to install them.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use read_after_write_testkit::PgBinaries;
    ///
    /// let bins = PgBinaries::discover()?;
    /// assert!(bins.program("initdb").exists());
    /// # Ok::<(), read_after_write_testkit::KitError>(())
    /// ```
    pub fn discover() -> Result<Self, KitError> {
        if let Some(dir) = env::var_os("PG_BIN").filter(|d| !d.is_empty()) {
            return Self::from_dir(&dir).map_err(|err| match err {
                KitError::BinariesNotFound { searched } => KitError::BinariesNotFound {
                    searched: format!("PG_BIN={searched}"),
                },
                other => other,
            });
        }
        let mut searched = Vec::new();
        if let Some(path) = env::var_os("PATH") {
            for dir in env::split_paths(&path) {
                if let Some(found) = from_path_entry(&dir) {
                    return Ok(found);
                }
            }
            searched.push("PATH".to_owned());
        }
        for dir in well_known_dirs() {
            if let Ok(found) = Self::from_dir(&dir) {
                return Ok(found);
            }
        }
        searched.push("/usr/lib/postgresql/*/bin, /usr/pgsql-*/bin, /usr/local/pgsql/bin".into());
        Err(KitError::BinariesNotFound {
            searched: searched.join(", "),
        })
    }

    /// Uses the server programs in `dir`.
    ///
    /// # Errors
    ///
    /// [`KitError::BinariesNotFound`] if one of the three programs is missing
    /// from `dir`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use read_after_write_testkit::PgBinaries;
    ///
    /// let bins = PgBinaries::from_dir("/usr/lib/postgresql/16/bin")?;
    /// # Ok::<(), read_after_write_testkit::KitError>(())
    /// ```
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, KitError> {
        let dir = dir.as_ref();
        let missing: Vec<&str> = PROGRAMS
            .iter()
            .copied()
            .filter(|p| !is_executable(&dir.join(p)))
            .collect();
        if missing.is_empty() {
            Ok(Self {
                dir: dir.to_path_buf(),
            })
        } else {
            Err(KitError::BinariesNotFound {
                searched: format!("{} (missing {})", dir.display(), missing.join(", ")),
            })
        }
    }

    /// The directory holding the programs.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::PgBinaries;
    /// let bins = PgBinaries::discover()?;
    /// assert!(bins.bin_dir().is_dir());
    /// # Ok::<(), read_after_write_testkit::KitError>(())
    /// ```
    pub fn bin_dir(&self) -> &Path {
        &self.dir
    }

    /// The full path of the program `name` (e.g. `"pg_ctl"`) in
    /// [`bin_dir`](Self::bin_dir).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::PgBinaries;
    /// let pg_ctl = PgBinaries::discover()?.program("pg_ctl");
    /// assert!(pg_ctl.ends_with("pg_ctl"));
    /// # Ok::<(), read_after_write_testkit::KitError>(())
    /// ```
    pub fn program(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A command for the program `name`, run as `run_as` in `cwd` (see
    /// [`RunAs::command`]), with `LD_LIBRARY_PATH` leading to the
    /// installation's own libraries if it ships them (see
    /// [`library_path`]).
    pub(crate) fn command(&self, run_as: &RunAs, name: &str, cwd: &Path) -> Command {
        let program = self.program(name);
        let mut cmd = run_as.command(&program, cwd);
        if let Some(path) = library_path(&program) {
            cmd.env("LD_LIBRARY_PATH", path);
        }
        cmd
    }

    /// The major version of the programs (`15`, `18`, ...), from
    /// `postgres --version`.
    ///
    /// # Errors
    ///
    /// [`KitError::Command`] if `postgres --version` fails (for instance,
    /// when its shared libraries cannot be loaded), [`KitError::Io`] if it
    /// cannot be run or prints something unexpected.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use read_after_write_testkit::PgBinaries;
    /// let major = PgBinaries::discover()?.major()?;
    /// assert!(major >= 13);
    /// # Ok::<(), read_after_write_testkit::KitError>(())
    /// ```
    pub fn major(&self) -> Result<u32, KitError> {
        let program = self.program("postgres");
        let mut cmd = Command::new(&program);
        cmd.arg("--version");
        if let Some(path) = library_path(&program) {
            cmd.env("LD_LIBRARY_PATH", path);
        }
        let output = process::run(cmd, None)?;
        let text = String::from_utf8_lossy(&output.stdout);
        parse_major(&text).ok_or_else(|| {
            KitError::io(
                format!("reading the version of {}", program.display()),
                std::io::Error::other(format!(
                    "unexpected `postgres --version` output: {}",
                    text.trim()
                )),
            )
        })
    }
}

/// The `LD_LIBRARY_PATH` to run `program` with: its sibling `lib` directory
/// (when that holds PostgreSQL's shared libraries) before the inherited
/// value, or `None` when nothing needs adding.
///
/// The relocatable builds find their libraries through `$ORIGIN/../lib`
/// already; this also covers builds without that run path, and keeps
/// `postgres` and the libraries it loads later (`libpqwalreceiver`) from
/// picking up a system `libpq` of another version.
fn library_path(program: &Path) -> Option<OsString> {
    let lib = program.parent()?.parent()?.join("lib");
    if !lib.join(LIBPQ).exists() {
        return None;
    }
    let mut dirs = vec![lib];
    if let Some(inherited) = env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(env::split_paths(&inherited));
    }
    env::join_paths(dirs).ok()
}

/// The major version in `postgres --version` output:
/// `postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)` gives 15,
/// `postgres (PostgreSQL) 18.4` gives 18, and `9.6.24` gives 9.
fn parse_major(version_output: &str) -> Option<u32> {
    let version = version_output
        .split_whitespace()
        .find(|word| word.starts_with(|c: char| c.is_ascii_digit()))?;
    let major = version
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some(major)
}

/// Checks one `PATH` entry: an `initdb` there selects the directory of the
/// real (symlink-resolved) `initdb`, if all programs are there.
fn from_path_entry(dir: &Path) -> Option<PgBinaries> {
    let initdb = dir.join("initdb");
    if !is_executable(&initdb) {
        return None;
    }
    let real = initdb.canonicalize().ok()?;
    PgBinaries::from_dir(real.parent()?).ok()
}

/// Versioned install directories, highest version first.
fn well_known_dirs() -> Vec<PathBuf> {
    let mut versioned: Vec<(Vec<u64>, PathBuf)> = Vec::new();
    let mut scan = |parent: &str, prefix: &str, suffix: &str| {
        let Ok(entries) = std::fs::read_dir(parent) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(version) = name
                .to_str()
                .and_then(|n| n.strip_prefix(prefix))
                .and_then(parse_version)
            else {
                continue;
            };
            versioned.push((version, entry.path().join(suffix)));
        }
    };
    scan("/usr/lib/postgresql", "", "bin");
    scan("/usr", "pgsql-", "bin");
    sort_highest_first(&mut versioned);
    let mut dirs: Vec<PathBuf> = versioned.into_iter().map(|(_, dir)| dir).collect();
    dirs.push(PathBuf::from("/usr/local/pgsql/bin"));
    dirs
}

/// Parses `"15"` or `"9.6"` into its numeric components.
fn parse_version(s: &str) -> Option<Vec<u64>> {
    s.split('.').map(|part| part.parse().ok()).collect()
}

fn sort_highest_first(versioned: &mut [(Vec<u64>, PathBuf)]) {
    versioned.sort_by(|a, b| b.0.cmp(&a.0));
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically() {
        let mut v: Vec<(Vec<u64>, PathBuf)> = ["9.6", "10", "16", "15"]
            .iter()
            .map(|s| (parse_version(s).unwrap(), PathBuf::from(s)))
            .collect();
        sort_highest_first(&mut v);
        let order: Vec<_> = v.iter().map(|(_, p)| p.to_str().unwrap()).collect();
        assert_eq!(order, ["16", "15", "10", "9.6"]);
        assert_eq!(parse_version("main"), None);
    }

    #[test]
    fn path_entry_resolves_symlinks_to_the_real_directory() {
        use std::os::unix::fs::symlink;

        let base = std::env::temp_dir().join(format!("testkit-bins-{}", std::process::id()));
        let real = base.join("real");
        let links = base.join("links");
        std::fs::create_dir_all(&real).unwrap();
        std::fs::create_dir_all(&links).unwrap();
        for program in PROGRAMS {
            let path = real.join(program);
            std::fs::write(&path, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        // Like /usr/local/bin: links to some of the programs only.
        symlink(real.join("initdb"), links.join("initdb")).unwrap();
        symlink(real.join("pg_ctl"), links.join("pg_ctl")).unwrap();

        let found = from_path_entry(&links).map(|b| b.bin_dir().to_path_buf());
        let expected = real.canonicalize().unwrap();
        std::fs::remove_dir_all(&base).unwrap();
        assert_eq!(found, Some(expected));
        assert!(from_path_entry(&base.join("nowhere")).is_none());
    }

    #[test]
    fn major_versions_are_parsed() {
        assert_eq!(
            parse_major("postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(parse_major("postgres (PostgreSQL) 18.4\n"), Some(18));
        assert_eq!(parse_major("postgres (PostgreSQL) 19devel"), Some(19));
        assert_eq!(parse_major("postgres (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(parse_major("no version here"), None);
    }

    #[test]
    fn library_path_only_for_a_lib_dir_with_libpq() {
        let base = std::env::temp_dir().join(format!("testkit-libs-{}", std::process::id()));
        let bin = base.join("bin");
        let lib = base.join("lib");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&lib).unwrap();
        let without = library_path(&bin.join("postgres"));
        std::fs::write(lib.join(LIBPQ), "").unwrap();
        let with = library_path(&bin.join("postgres"));
        std::fs::remove_dir_all(&base).unwrap();
        assert_eq!(without, None);
        let with = with.expect("a library path");
        assert_eq!(env::split_paths(&with).next(), Some(lib));
    }

    #[test]
    fn missing_programs_are_named() {
        let err = PgBinaries::from_dir("/nonexistent/bin").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("missing initdb, pg_ctl, postgres)"), "{msg}");
        assert!(msg.contains("apt-get install postgresql"), "{msg}");
    }
}

//! Finding the `pgbouncer` program.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::PgBouncer;
use crate::KitError;

/// Where Debian and Fedora install the program, often not on a normal
/// user's `PATH`.
const SYSTEM_PROGRAM: &str = "/usr/sbin/pgbouncer";

/// The environment variable naming the program, ahead of any search.
const PROGRAM_VAR: &str = "PGBOUNCER";

impl PgBouncer {
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
}

/// [`PgBouncer::find_program`] with its inputs given.
fn find_program_in(
    named: Option<OsString>,
    path: Option<OsString>,
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

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

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
        let found = |named_var: Option<&Path>, path: Option<OsString>| {
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

//! Where the workspace, its build output and per-run logs live.

use std::{
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};

/// The workspace root: xtask lives one level below it.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("xtask's manifest directory always has the workspace root as parent")
        .to_path_buf()
}

/// The cargo target directory, honouring `CARGO_TARGET_DIR` like cargo does.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        // Cargo resolves a relative CARGO_TARGET_DIR against its working
        // directory, which is also ours under `cargo run`.
        Some(dir) => std::env::current_dir()
            .map(|cwd| cwd.join(&dir))
            .unwrap_or_else(|_| PathBuf::from(dir)),
        None => workspace_root().join("target"),
    }
}

/// A `cargo` command: the cargo that runs us (set by cargo for `cargo run`),
/// so that nested builds use the same toolchain, without the variables
/// `cargo run` sets for xtask itself.
///
/// Those variables (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...) describe xtask,
/// not the crates a nested build compiles; build scripts that read them
/// (ring's does) see another value than under a plain `cargo build` and are
/// run again, so every `cargo xtask` used to rebuild ring, rustls and tonic
/// after a plain build and the other way round.
pub fn cargo() -> std::process::Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = std::process::Command::new(program);
    for (name, _) in std::env::vars_os() {
        if is_set_by_cargo_run(&name) {
            command.env_remove(&name);
        }
    }
    command
}

/// Whether `name` is one of the variables `cargo run` sets for the binary it
/// runs (and not one a user sets to configure cargo, like `CARGO_HOME` or
/// `CARGO_TARGET_DIR`).
fn is_set_by_cargo_run(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    name.starts_with("CARGO_PKG_")
        || matches!(
            name,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "OUT_DIR"
        )
}

/// Creates a fresh directory for one run's logs under
/// `target/xtask/logs/<command>-<unix seconds>-<pid>`.
///
/// Logs live outside the services' temporary directories so that they survive
/// teardown and can be read after a failed run.
pub fn new_logs_dir(command: &str) -> Result<PathBuf> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let dir = target_dir()
        .join("xtask")
        .join("logs")
        .join(format!("{command}-{secs}-{}", std::process::id()));
    fs::create_dir_all(&dir)
        .with_context(|| format!("failed to create logs directory {}", dir.display()))?;
    Ok(dir)
}

/// The last `lines` lines of a log file, or a note saying why there are none.
pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

/// Prints the tail of a log file under a header naming it.
pub fn print_tail(name: &str, path: &Path, lines: usize) {
    eprintln!(
        "---- last {lines} lines of the {name} log ({}) ----",
        path.display()
    );
    eprintln!("{}", tail(path, lines));
    eprintln!("---- end of the {name} log ----");
}

/// Finds an executable named `name` on `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// Whether `path` is a regular file with an execute bit set.
pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_cargo_does_not_inherit_what_cargo_run_set_for_xtask() {
        for name in [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "OUT_DIR",
        ] {
            assert!(is_set_by_cargo_run(OsStr::new(name)), "{name}");
        }
        for name in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_TERM_COLOR",
            "PATH",
        ] {
            assert!(!is_set_by_cargo_run(OsStr::new(name)), "{name}");
        }
    }

    #[test]
    fn nested_cargo_removes_the_variables_present_here() {
        // `cargo test` sets CARGO_MANIFEST_DIR and CARGO_PKG_NAME for this
        // test binary, as `cargo run` does for xtask.
        let command = cargo();
        let removed: Vec<_> = command
            .get_envs()
            .filter(|(_, value)| value.is_none())
            .map(|(name, _)| name.to_owned())
            .collect();
        assert!(
            removed.iter().any(|n| n == "CARGO_MANIFEST_DIR"),
            "{removed:?}"
        );
        assert!(removed.iter().any(|n| n == "CARGO_PKG_NAME"), "{removed:?}");
    }
}

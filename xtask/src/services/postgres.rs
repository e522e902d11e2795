//! A throw-away PostgreSQL cluster: `initdb` into a temporary directory,
//! started with `pg_ctl` on a free port, stopped with `pg_ctl stop -m
//! immediate` when the guard drops.
//!
//! PostgreSQL refuses to run as root. When xtask runs as root (CI does), every
//! PostgreSQL command runs as the `postgres` user through `runuser`, and the
//! temporary directory is handed to that user.

use std::{
    fs::{self, OpenOptions},
    io::Write,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use nix::unistd::{Uid, User, chown};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use crate::{paths, readiness::free_port};

/// The OS user PostgreSQL runs as when xtask runs as root.
const PG_OS_USER: &str = "postgres";

/// How many free ports to try before giving up; another process can grab a
/// port between our probe and PostgreSQL's bind.
const START_ATTEMPTS: usize = 3;

/// Seconds `pg_ctl start -w` waits for the server to accept connections.
const START_TIMEOUT_SECS: &str = "60";

/// A running throw-away PostgreSQL cluster.
#[derive(Debug)]
pub struct PgCluster {
    bindir: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    /// Where the log is copied on teardown, so that it outlives `root`.
    log_copy: PathBuf,
    port: u16,
    run_as: Option<User>,
    /// Set once `pg_ctl start` has been attempted: from then on a postmaster
    /// may be running (it detaches from pg_ctl), so `Drop` must stop it.
    started: bool,
    // Dropped last (fields drop in declaration order): removes the data
    // directory after the server has been stopped.
    root: TempDir,
}

impl PgCluster {
    /// Creates and starts a cluster with `max_prepared_transactions > 0`,
    /// listening on 127.0.0.1 only, with trust authentication for the
    /// `postgres` role. The log is copied to `logs_dir/postgres.log` on
    /// teardown.
    ///
    /// Blocks for a few seconds (`initdb`, `pg_ctl start -w`): call it from
    /// a blocking task.
    pub fn start(logs_dir: &Path, cancel: &CancellationToken) -> Result<Self> {
        let bindir = find_bindir()?;
        let run_as = if Uid::effective().is_root() {
            Some(
                User::from_name(PG_OS_USER)
                    .context("failed to look up the postgres OS user")?
                    .with_context(|| {
                        format!("running as root, but there is no `{PG_OS_USER}` OS user to run PostgreSQL as")
                    })?,
            )
        } else {
            None
        };
        let root = tempfile::Builder::new()
            .prefix("ringcache-pg-")
            .tempdir()
            .context("failed to create a temporary directory for PostgreSQL")?;
        if let Some(user) = &run_as {
            // The server writes its data, socket and log here.
            chown(root.path(), Some(user.uid), Some(user.gid)).with_context(|| {
                format!(
                    "failed to hand {} to the postgres user",
                    root.path().display()
                )
            })?;
        }
        let mut cluster = Self {
            bindir,
            data_dir: root.path().join("data"),
            log: root.path().join("postgres.log"),
            log_copy: logs_dir.join("postgres.log"),
            port: 0,
            run_as,
            started: false,
            root,
        };

        let mut initdb = cluster.pg_command("initdb");
        initdb.arg("-D").arg(&cluster.data_dir).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]);
        cluster.run("initdb", &mut initdb, cancel)?;

        for attempt in 1..=START_ATTEMPTS {
            // Checked before `started` is set, so that an interrupted run
            // does not try to stop a server that was never started.
            if cancel.is_cancelled() {
                bail!("interrupted before starting PostgreSQL");
            }
            cluster.port = free_port()?;
            cluster.append_settings()?;
            cluster.started = true;
            let mut start = cluster.pg_command("pg_ctl");
            start
                .arg("-D")
                .arg(&cluster.data_dir)
                .arg("-l")
                .arg(&cluster.log)
                .args(["-w", "-t", START_TIMEOUT_SECS, "start"]);
            match cluster.run("pg_ctl start", &mut start, cancel) {
                Ok(()) => return Ok(cluster),
                Err(err) if cancel.is_cancelled() => return Err(err),
                Err(err) if attempt < START_ATTEMPTS => {
                    eprintln!(
                        "xtask: PostgreSQL did not start on port {} ({err:#}); retrying on another port",
                        cluster.port
                    );
                }
                Err(err) => {
                    return Err(err).with_context(|| {
                        format!(
                            "PostgreSQL did not start; last log lines:\n{}",
                            paths::tail(&cluster.log, 30)
                        )
                    });
                }
            }
        }
        unreachable!("the last attempt returns");
    }

    /// The connection URL, e.g. `postgres://postgres@127.0.0.1:5433/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The directory holding `pg_ctl`, `postgres` and friends.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// Stops the server (fast shutdown: connections are cut, committed data
    /// stays) and waits until it is down; [`start_again`](Self::start_again)
    /// brings it back on the same port with the same data. Blocks.
    pub fn stop(&self, cancel: &CancellationToken) -> Result<()> {
        let mut stop = self.pg_command("pg_ctl");
        stop.arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "fast", "-w", "stop"]);
        self.run("pg_ctl stop", &mut stop, cancel)
    }

    /// Starts the server stopped by [`stop`](Self::stop) again and waits
    /// until it accepts connections. Blocks.
    pub fn start_again(&self, cancel: &CancellationToken) -> Result<()> {
        let mut start = self.pg_command("pg_ctl");
        start
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", START_TIMEOUT_SECS, "start"]);
        self.run("pg_ctl start", &mut start, cancel)
    }

    /// The live server log (inside the temporary directory).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Appends our settings to `postgresql.conf`; for repeated settings the
    /// last line wins, so a retry on another port simply appends again.
    ///
    /// The settings live in the file rather than on the command line so that
    /// a plain `pg_ctl start` (a chaos test restarting the server) brings the
    /// same server back.
    fn append_settings(&self) -> Result<()> {
        let conf = self.data_dir.join("postgresql.conf");
        let mut file = OpenOptions::new()
            .append(true)
            .open(&conf)
            .with_context(|| format!("failed to open {}", conf.display()))?;
        writeln!(
            file,
            "\n# Added by cargo xtask.\n\
             max_prepared_transactions = 64\n\
             port = {}\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off",
            self.port,
            self.root.path().display()
        )
        .with_context(|| format!("failed to write {}", conf.display()))
    }

    /// A command for the PostgreSQL tool `tool`, run as the postgres user
    /// when we are root.
    fn pg_command(&self, tool: &str) -> Command {
        let program = self.bindir.join(tool);
        let mut command = match &self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", &user.name, "--"]).arg(program);
                command
            }
            None => Command::new(program),
        };
        // Its own process group: a Ctrl-C must not kill pg_ctl halfway, we
        // finish the step and then unwind.
        command.process_group(0).stdin(Stdio::null());
        command
    }

    /// Runs a short PostgreSQL command to completion, failing with its output.
    fn run(&self, what: &str, command: &mut Command, cancel: &CancellationToken) -> Result<()> {
        if cancel.is_cancelled() {
            bail!("interrupted before {what}");
        }
        let output = command
            .output()
            .with_context(|| format!("failed to run {what} ({:?})", command.get_program()))?;
        if !output.status.success() {
            bail!(
                "{what} failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.started {
            // Immediate: the data is thrown away, there is nothing to flush.
            let mut stop = self.pg_command("pg_ctl");
            stop.arg("-D")
                .arg(&self.data_dir)
                .args(["-m", "immediate", "-w", "stop"]);
            match stop.output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "xtask: pg_ctl stop failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(err) => eprintln!("xtask: failed to run pg_ctl stop: {err}"),
            }
        }
        if self.log.exists()
            && let Err(err) = fs::copy(&self.log, &self.log_copy)
        {
            eprintln!(
                "xtask: failed to keep the PostgreSQL log at {}: {err}",
                self.log_copy.display()
            );
        }
    }
}

/// Finds PostgreSQL's server binaries.
///
/// Order: `RINGCACHE_PG_BINDIR`; the real directory of an `initdb` on `PATH`
/// (often a symlink into the versioned directory, which also holds
/// `postgres`); `pg_config --bindir`; the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> Result<PathBuf> {
    let has_tools = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|t| paths::is_executable(&dir.join(t)))
    };

    if let Some(dir) = std::env::var_os("RINGCACHE_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if has_tools(&dir) {
            return Ok(dir);
        }
        bail!(
            "RINGCACHE_PG_BINDIR={} does not contain initdb, pg_ctl and postgres",
            dir.display()
        );
    }
    if let Some(initdb) = paths::find_on_path("initdb")
        && let Ok(real) = fs::canonicalize(&initdb)
        && let Some(dir) = real.parent()
        && has_tools(dir)
    {
        return Ok(dir.to_path_buf());
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_tools(&dir) {
            return Ok(dir);
        }
    }
    let mut versioned: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_tools(dir))
        .collect();
    versioned.sort();
    match versioned.pop() {
        Some((_, dir)) => Ok(dir),
        None => bail!(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install PostgreSQL \
             or set RINGCACHE_PG_BINDIR"
        ),
    }
}

//! A private PostgreSQL server for a test that stops and starts it: `initdb`
//! into a temporary directory, `pg_ctl` with the binaries from
//! [`pg_bindir`](crate::pg_bindir), stopped (`-m immediate`) on drop.
//!
//! PostgreSQL refuses to run as root: when the test runs as root, every
//! PostgreSQL command runs as the `postgres` OS user through `runuser`, and
//! the temporary directory is handed to that user (the recipe of xtask's
//! `services/postgres.rs`).

use std::{
    fs::OpenOptions,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use nix::unistd::{Uid, User, chown};
use tempfile::TempDir;

/// The OS user PostgreSQL runs as when the test runs as root.
const PG_OS_USER: &str = "postgres";
/// Seconds `pg_ctl -w` waits for a start or stop.
const PG_CTL_TIMEOUT_SECS: &str = "120";

/// A PostgreSQL server of the test's own.
#[derive(Debug)]
pub struct PrivatePostgres {
    bindir: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    port: u16,
    run_as: Option<User>,
    /// Whether a postmaster may be running, so `Drop` must stop it.
    started: bool,
    // Dropped last: removes the data directory after the server stopped.
    root: TempDir,
}

impl PrivatePostgres {
    /// Creates a cluster (trust authentication for the `postgres` role,
    /// listening on 127.0.0.1 only, on a port from
    /// [`free_addr`](crate::free_addr)) and starts it.
    ///
    /// Blocks for seconds: call it from a blocking task.
    ///
    /// # Errors
    ///
    /// Fails when `initdb` or `pg_ctl start` fails.
    pub fn start() -> Result<Self> {
        let bindir = crate::pg_bindir()?;
        let run_as = if Uid::effective().is_root() {
            Some(
                User::from_name(PG_OS_USER)
                    .context("failed to look up the postgres OS user")?
                    .with_context(|| {
                        format!("running as root, but there is no `{PG_OS_USER}` OS user")
                    })?,
            )
        } else {
            None
        };
        let root = tempfile::Builder::new()
            .prefix("ringcache-private-pg-")
            .tempdir()
            .context("failed to create a temporary directory for PostgreSQL")?;
        if let Some(user) = &run_as {
            chown(root.path(), Some(user.uid), Some(user.gid)).with_context(|| {
                format!(
                    "failed to hand {} to the postgres user",
                    root.path().display()
                )
            })?;
        }
        let mut server = Self {
            bindir,
            data_dir: root.path().join("data"),
            log: root.path().join("postgres.log"),
            port: crate::free_addr()?.port(),
            run_as,
            started: false,
            root,
        };
        let mut initdb = server.pg_command("initdb");
        initdb
            .arg("-D")
            .arg(&server.data_dir)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"]);
        run("initdb", &mut initdb)?;
        server.append_settings()?;
        server.start_again()?;
        Ok(server)
    }

    /// The connection URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        match std::fs::read(&self.log) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(err) => format!("(cannot read {}: {err})", self.log.display()),
        }
    }

    /// `pg_ctl stop -m fast`, waiting until the server is down. Blocks.
    ///
    /// # Errors
    ///
    /// Fails when `pg_ctl` fails.
    pub fn stop_fast(&mut self) -> Result<()> {
        let mut stop = self.pg_command("pg_ctl");
        stop.arg("-D").arg(&self.data_dir).args([
            "-m",
            "fast",
            "-w",
            "-t",
            PG_CTL_TIMEOUT_SECS,
            "stop",
        ]);
        run("pg_ctl stop", &mut stop)?;
        self.started = false;
        Ok(())
    }

    /// `pg_ctl start`, waiting until the server accepts connections. Blocks.
    ///
    /// # Errors
    ///
    /// Fails, with the log's tail, when `pg_ctl` fails.
    pub fn start_again(&mut self) -> Result<()> {
        self.started = true;
        let mut start = self.pg_command("pg_ctl");
        start
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "start"]);
        run("pg_ctl start", &mut start)
            .with_context(|| format!("PostgreSQL did not start; log tail:\n{}", self.log_tail(30)))
    }

    /// Stops (`SIGSTOP`) or continues (`SIGCONT`) the postmaster and every
    /// backend: the server stalls as a whole, with its connections open, as
    /// a frozen VM or a long I/O stall looks to its clients.
    ///
    /// # Errors
    ///
    /// Fails when the server's processes cannot be found or signalled.
    pub fn signal_all(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        let pid_file = self.data_dir.join("postmaster.pid");
        let text = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("failed to read {}", pid_file.display()))?;
        let postmaster: i32 = text
            .lines()
            .next()
            .and_then(|line| line.trim().parse().ok())
            .with_context(|| format!("no pid in {}", pid_file.display()))?;
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").context("failed to list /proc")? {
            let Ok(entry) = entry else { continue };
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            // `pid (comm) state ppid ...`; comm may hold spaces, so split
            // after its closing parenthesis.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let parent = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|ppid| ppid.parse::<i32>().ok());
            if parent == Some(postmaster) {
                pids.push(pid);
            }
        }
        for pid in pids {
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal) {
                // A backend that exited meanwhile.
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(err) => bail!("cannot send {signal} to PostgreSQL process {pid}: {err}"),
            }
        }
        Ok(())
    }

    fn append_settings(&self) -> Result<()> {
        let conf = self.data_dir.join("postgresql.conf");
        let mut file = OpenOptions::new()
            .append(true)
            .open(&conf)
            .with_context(|| format!("failed to open {}", conf.display()))?;
        writeln!(
            file,
            "\n# Added by ringcache_tests::PrivatePostgres.\n\
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
        command.stdin(Stdio::null());
        command
    }

    /// The directory holding the data directory and the log.
    pub fn dir(&self) -> &Path {
        self.root.path()
    }
}

fn run(what: &str, command: &mut Command) -> Result<()> {
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

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.started {
            if std::thread::panicking() {
                eprintln!("private PostgreSQL log tail:\n{}", self.log_tail(30));
            }
            let mut stop = self.pg_command("pg_ctl");
            stop.arg("-D")
                .arg(&self.data_dir)
                .args(["-m", "immediate", "-w", "stop"]);
            match stop.output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "pg_ctl stop failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(err) => eprintln!("failed to run pg_ctl stop: {err}"),
            }
        }
    }
}

//! The real `write-back-worker` binary as a child process of a test.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use nix::{sys::signal::Signal, unistd::Pid};
use tempfile::TempDir;

use crate::process::Guarded;
use tokio::time::Instant;

/// How often exit is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How many log lines error messages include.
const LOG_TAIL_LINES: usize = 60;

/// What a test worker runs with; each field becomes the flag of the same
/// name.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// `--brokers`: Kafka bootstrap servers.
    pub brokers: String,
    /// `--database-url`: the PostgreSQL store.
    pub database_url: String,
    /// `--group`: the consumer group, also the key of its stored offsets.
    pub group: String,
    /// `--keyspaces`: the keyspaces to drain.
    pub keyspaces: Vec<String>,
    /// `--cache-seeds`: the nodes told what is stored; none when empty.
    pub cache_seeds: Vec<String>,
}

/// Flags and environment variables a worker gets beyond its
/// [`WorkerConfig`]: `--dirty-repair-interval 3s`, or a test-only fault
/// point (`RINGCACHE_WORKER_FAULT`).
#[derive(Clone, Debug, Default)]
pub struct WorkerExtra {
    /// Extra command-line arguments.
    pub args: Vec<String>,
    /// Extra environment variables (set after the `RINGCACHE_*` ones of the
    /// test's own environment were cleared).
    pub env: Vec<(String, String)>,
}

impl WorkerConfig {
    /// The worker's dead-letter topic ([`dead_letter_topic`] of its group).
    pub fn dead_letter_topic(&self) -> String {
        dead_letter_topic(&self.group)
    }
}

/// The dead-letter topic test workers of `group` use: one per group, so
/// that tests do not see each other's dead letters.
pub fn dead_letter_topic(group: &str) -> String {
    format!("{group}-dlq")
}

/// The path of the built `write-back-worker` binary, found next to the
/// running test executable as [`node_binary`](crate::node_binary) finds
/// `cache-node` (Cargo only exposes `CARGO_BIN_EXE_*` to the owning crate's
/// tests).
///
/// # Errors
///
/// Fails, saying how to build it, when the binary is not there.
pub fn worker_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("failed to locate the running test executable")?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("write-back-worker"))
        .collect();
    candidates
        .iter()
        .find(|candidate| candidate.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "the write-back-worker binary is not at {}: build it with `cargo build --bins` \
                 (`cargo xtask test` does)",
                candidates
                    .iter()
                    .map(|c| c.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            )
        })
}

/// A running `write-back-worker` process.
///
/// Its log lives in a temporary directory that is removed on drop; every
/// incarnation started by [`WorkerProcess::restart`] appends to the same log,
/// after a marker line, so that one file tells the whole story. Dropping the
/// guard SIGKILLs the process if it is still running. If the test is
/// panicking, the log's tail is printed first.
///
/// The worker has no health endpoint: tests see it work through what it
/// writes to PostgreSQL.
#[derive(Debug)]
pub struct WorkerProcess {
    config: WorkerConfig,
    /// Extra flags and variables, beyond `config` (see
    /// [`WorkerProcess::start_with`]).
    extra: WorkerExtra,
    process: Guarded,
    incarnation: u32,
    // Dropped after the process is killed (see `Drop`).
    dir: TempDir,
}

impl WorkerProcess {
    /// Spawns a worker with `config`.
    ///
    /// # Errors
    ///
    /// Fails when the binary is missing (see [`worker_binary`]) or cannot be
    /// started.
    pub fn start(config: WorkerConfig) -> Result<Self> {
        Self::start_with(config, WorkerExtra::default())
    }

    /// Spawns a worker with `config` and `extra` flags and environment
    /// variables (kept for [`WorkerProcess::restart`]).
    ///
    /// # Errors
    ///
    /// As [`WorkerProcess::start`].
    pub fn start_with(config: WorkerConfig, extra: WorkerExtra) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("ringcache-worker-{}-", config.group))
            .tempdir()
            .context("failed to create the worker's temporary directory")?;
        let log = dir.path().join("worker.log");
        File::create(&log).with_context(|| format!("failed to create {}", log.display()))?;
        let child = spawn(&config, &extra, &log, 1)?;
        Ok(Self {
            extra,
            process: Guarded::new(
                format!("worker {}", config.group),
                log,
                LOG_TAIL_LINES,
                child,
            ),
            config,
            incarnation: 1,
            dir,
        })
    }

    /// Starts the worker again, with the same config, once the previous
    /// process has exited (kill it first).
    ///
    /// # Errors
    ///
    /// Fails when the previous process is still running after `timeout`, or
    /// when the new one cannot be started.
    pub async fn restart(&mut self, timeout: Duration) -> Result<()> {
        self.wait_exit(timeout).await?;
        self.incarnation += 1;
        let child = spawn(
            &self.config,
            &self.extra,
            self.process.log_path(),
            self.incarnation,
        )?;
        self.process.replace(child);
        Ok(())
    }

    /// The config the worker runs with.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// The process id of the current incarnation.
    pub fn pid(&self) -> Pid {
        self.process.pid()
    }

    /// The worker's log file (stdout and stderr of every incarnation).
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// The temporary directory holding the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last `lines` lines of the worker's log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// The log of the current incarnation only (since its marker line).
    ///
    /// # Errors
    ///
    /// Fails when the log cannot be read.
    pub fn current_log(&self) -> Result<String> {
        let log = self.process.log_path();
        let bytes = fs::read(log).with_context(|| format!("failed to read {}", log.display()))?;
        let text = String::from_utf8_lossy(&bytes);
        let marker = incarnation_marker(self.incarnation);
        Ok(text
            .rfind(&marker)
            .map_or(&text[..], |at| &text[at + marker.len()..])
            .to_owned())
    }

    /// The address of the current incarnation's metrics endpoint, read from
    /// its log once it serves.
    ///
    /// # Errors
    ///
    /// Fails when the worker exits first or does not serve within `timeout`.
    pub async fn metrics_addr(&mut self, timeout: Duration) -> Result<std::net::SocketAddr> {
        const LINE: &str = "serving metrics addr=";
        self.wait_log(LINE, timeout).await?;
        let log = self.current_log()?;
        let rest = log
            .rsplit_once(LINE)
            .map(|(_, rest)| rest)
            .context("the metrics line vanished")?;
        let addr: String = rest
            .chars()
            .take_while(|c| !c.is_whitespace())
            .filter(|c| !matches!(c, '"' | '\u{1b}'))
            .collect();
        addr.parse()
            .with_context(|| format!("cannot parse the metrics address {addr:?}"))
    }

    /// Polls the current incarnation's log until it contains `needle`.
    ///
    /// # Errors
    ///
    /// Fails, with the log's tail, when the worker exits first or `timeout`
    /// passes.
    pub async fn wait_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.current_log()?.contains(needle) {
                return Ok(());
            }
            self.ensure_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "worker {} did not log {needle:?} within {timeout:?}; log tail:\n{}",
                    self.config.group,
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// How many times `needle` occurs in the current incarnation's log.
    ///
    /// # Errors
    ///
    /// Fails when the log cannot be read.
    pub fn log_count(&self, needle: &str) -> Result<usize> {
        Ok(self.current_log()?.matches(needle).count())
    }

    /// Polls the current incarnation's log until `needle` occurs in it at
    /// least `at_least` times: for events that happen again and again, such
    /// as the partition assignments of successive rebalances.
    ///
    /// # Errors
    ///
    /// Fails, with the log's tail, when the worker exits first or `timeout`
    /// passes.
    pub async fn wait_log_count(
        &mut self,
        needle: &str,
        at_least: usize,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let count = self.log_count(needle)?;
            if count >= at_least {
                return Ok(());
            }
            self.ensure_running()?;
            if Instant::now() >= deadline {
                bail!(
                    "worker {} logged {needle:?} {count} times, not {at_least}, \
                     within {timeout:?}; log tail:\n{}",
                    self.config.group,
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Asks the worker to finish its batch and exit.
    ///
    /// # Errors
    ///
    /// Fails when the signal cannot be sent (the process was reaped).
    pub fn sigterm(&mut self) -> Result<()> {
        self.signal(Signal::SIGTERM)
    }

    /// Asks the worker to load its configuration again (SIGHUP).
    ///
    /// # Errors
    ///
    /// Fails when the signal cannot be sent (the process was reaped).
    pub fn sighup(&mut self) -> Result<()> {
        self.signal(Signal::SIGHUP)
    }

    /// Kills the worker without giving it a chance to clean up.
    ///
    /// # Errors
    ///
    /// Fails when the signal cannot be sent (the process was reaped).
    pub fn sigkill(&mut self) -> Result<()> {
        self.signal(Signal::SIGKILL)
    }

    /// Freezes the worker (it keeps its connections, consumes and stores
    /// nothing); returns once every thread has stopped.
    ///
    /// # Errors
    ///
    /// Fails when the signal cannot be sent (the process was reaped).
    pub fn sigstop(&mut self) -> Result<()> {
        self.process.stop()
    }

    /// Lets a frozen worker go on.
    ///
    /// # Errors
    ///
    /// Fails when the signal cannot be sent (the process was reaped).
    pub fn sigcont(&mut self) -> Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// Interrupts the worker as Ctrl-C would.
    ///
    /// # Errors
    ///
    /// Fails when the signal cannot be sent (the process was reaped).
    pub fn sigint(&mut self) -> Result<()> {
        self.signal(Signal::SIGINT)
    }

    fn signal(&mut self, signal: Signal) -> Result<()> {
        self.process.signal(signal)
    }

    /// The exit status if the current incarnation has exited, without
    /// blocking.
    ///
    /// # Errors
    ///
    /// Fails when the status cannot be read.
    pub fn try_exit_status(&mut self) -> Result<Option<ExitStatus>> {
        self.process.try_exit_status()
    }

    /// Fails, with the log's tail, when the current incarnation has exited:
    /// for tests that wait on PostgreSQL, so that a worker that died is
    /// reported as such instead of as a timeout.
    ///
    /// # Errors
    ///
    /// Fails when the worker is no longer running.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.try_exit_status()? {
            bail!(
                "worker {} exited unexpectedly ({status}); log tail:\n{}",
                self.config.group,
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        Ok(())
    }

    /// Waits up to `timeout` for the worker to exit and returns its status.
    ///
    /// # Errors
    ///
    /// Fails, with the log's tail, when the worker is still running at the
    /// deadline.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.process.wait_exit(timeout).await
    }
}

/// The line written to the log before incarnation `incarnation` starts.
fn incarnation_marker(incarnation: u32) -> String {
    format!("==== incarnation {incarnation} ====")
}

/// Starts incarnation `incarnation` of the worker, appending to `log`.
fn spawn(
    config: &WorkerConfig,
    extra: &WorkerExtra,
    log: &Path,
    incarnation: u32,
) -> Result<Child> {
    let binary = worker_binary()?;
    let mut out = OpenOptions::new()
        .append(true)
        .open(log)
        .with_context(|| format!("failed to open {}", log.display()))?;
    writeln!(out, "{}", incarnation_marker(incarnation))
        .with_context(|| format!("failed to write {}", log.display()))?;
    let err = out
        .try_clone()
        .context("failed to duplicate the log handle")?;
    let mut command = Command::new(&binary);
    // Settings come only from what the test passes: clear what a developer's
    // shell may have exported (clap reads `RINGCACHE_*` as flag values).
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("RINGCACHE_") {
            command.env_remove(name);
        }
    }
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "info");
    }
    command
        .arg("--brokers")
        .arg(&config.brokers)
        .arg("--database-url")
        .arg(&config.database_url)
        .arg("--group")
        .arg(&config.group)
        .arg("--keyspaces")
        .arg(config.keyspaces.join(","))
        .arg("--dead-letter-topic")
        .arg(config.dead_letter_topic())
        // A free port: tests read it from the log (`metrics_addr`).
        .arg("--metrics-listen")
        .arg("127.0.0.1:0");
    if !config.cache_seeds.is_empty() {
        command
            .arg("--cache-seeds")
            .arg(config.cache_seeds.join(","));
    }
    command.args(&extra.args);
    command.envs(extra.env.iter().map(|(k, v)| (k, v)));
    command.stdin(Stdio::null()).stdout(out).stderr(err);
    command
        .spawn()
        .with_context(|| format!("failed to start {}", binary.display()))
}

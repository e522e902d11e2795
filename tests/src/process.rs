//! The part every process guard of the tests shares: a child with a log
//! file, its exit status, signals, waiting with a deadline, and the log's
//! tail in every error; killed (and reaped) when dropped.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, ExitStatus},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tokio::time::Instant;

/// How often waits poll the process.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A running (or exited) child process and its log.
#[derive(Debug)]
pub(crate) struct Guarded {
    /// Names the process in messages (`node-1`, `worker g1`).
    name: String,
    log: PathBuf,
    tail_lines: usize,
    child: Child,
    status: Option<ExitStatus>,
}

impl Guarded {
    pub(crate) fn new(name: String, log: PathBuf, tail_lines: usize, child: Child) -> Self {
        Guarded {
            name,
            log,
            tail_lines,
            child,
            status: None,
        }
    }

    /// Replaces an exited child with a new one (a restart).
    pub(crate) fn replace(&mut self, child: Child) {
        debug_assert!(self.status.is_some(), "only an exited child is replaced");
        self.child = child;
        self.status = None;
    }

    pub(crate) fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the log.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        match fs::read(&self.log) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(err) => format!("(cannot read {}: {err})", self.log.display()),
        }
    }

    /// The tail used in error messages.
    pub(crate) fn tail(&self) -> String {
        self.log_tail(self.tail_lines)
    }

    pub(crate) fn try_exit_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("failed to check whether {} exited", self.name))?;
        }
        Ok(self.status)
    }

    pub(crate) fn signal(&mut self, signal: Signal) -> Result<()> {
        // Once reaped, the pid may belong to an unrelated process.
        if let Some(status) = self.try_exit_status()? {
            bail!(
                "cannot send {signal} to {}: it already exited ({status}); log tail:\n{}",
                self.name,
                self.tail()
            );
        }
        kill(self.pid(), signal)
            .with_context(|| format!("failed to send {signal} to {}", self.name))
    }

    /// Sends SIGSTOP and returns once every thread of the process has
    /// stopped. `kill` returns when the signal is queued, not when the
    /// group stop is complete: until then a thread that is already running
    /// may still answer a request, so a caller that acts right after
    /// `kill` would race the stop.
    pub(crate) fn stop(&mut self) -> Result<()> {
        self.signal(Signal::SIGSTOP)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !self.all_threads_stopped()? {
            if std::time::Instant::now() >= deadline {
                bail!("{} did not stop within 10 s of SIGSTOP", self.name);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Whether every thread in /proc/PID/task is in the stopped state.
    fn all_threads_stopped(&self) -> Result<bool> {
        let tasks = format!("/proc/{}/task", self.pid());
        for entry in fs::read_dir(&tasks).with_context(|| format!("failed to list {tasks}"))? {
            let stat = match fs::read_to_string(entry?.path().join("stat")) {
                Ok(stat) => stat,
                // The thread exited between the listing and the read.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).context("failed to read a thread's stat"),
            };
            // The state follows the command name, which is in parentheses
            // and may itself contain spaces or parentheses.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            if !matches!(state, Some('T' | 't')) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    pub(crate) async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} still running {timeout:?} later; log tail:\n{}",
                    self.name,
                    self.tail()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- {} log tail ({}) ----\n{}\n----",
                self.name,
                self.log.display(),
                self.tail()
            );
        }
        if self.status.is_none() {
            // SIGKILL also ends a SIGSTOPped process and cannot be ignored,
            // so the blocking wait below is short.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

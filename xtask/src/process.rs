//! A guard for child processes: whatever happens, a started child does not
//! outlive the guard.

use std::{
    fs::File,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use nix::{
    errno::Errno,
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use tokio::time::Instant;

/// How often [`ChildGuard::wait`] checks whether the child has exited.
///
/// Polling keeps the guard a plain `std::process::Child`, which can be reaped
/// synchronously in `Drop`; a few checks per second cost nothing next to the
/// processes we supervise.
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(25);

/// A child process started in its own process group.
///
/// The own group does two things: a Ctrl-C in the terminal reaches only
/// xtask, which then stops children in order instead of having them die
/// under it; and signals sent by the guard reach the child's descendants too
/// (cargo's test binaries and the cache nodes they spawn).
///
/// Dropping the guard SIGKILLs the whole group and reaps the child.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    log: Option<PathBuf>,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `command` in a new process group.
    ///
    /// `log`, if given, receives the child's stdout and stderr (the file is
    /// created or truncated); otherwise the child inherits ours.
    pub fn spawn(
        name: impl Into<String>,
        command: &mut Command,
        log: Option<&Path>,
    ) -> Result<Self> {
        let name = name.into();
        if let Some(log) = log {
            let file = File::create(log)
                .with_context(|| format!("failed to create {name} log {}", log.display()))?;
            let stderr = file
                .try_clone()
                .with_context(|| format!("failed to duplicate {name} log handle"))?;
            command
                .stdout(stderr.try_clone()?)
                .stderr(stderr)
                .stdin(Stdio::null());
            drop(file);
        }
        command.process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("failed to start {name} ({:?})", command.get_program()))?;
        Ok(Self {
            name,
            child,
            log: log.map(Path::to_path_buf),
            status: None,
        })
    }

    /// The child's piped stdout, if it was spawned with one and it was not
    /// taken yet.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// The child's process id (the bench suites read its CPU time from
    /// `/proc`).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The name used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The log file, if the child's output goes to one.
    pub fn log(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// The child's exit status if it has exited, without blocking.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("failed to check whether {} exited", self.name))?;
        }
        Ok(self.status)
    }

    /// Sends `signal` to the child's process group.
    ///
    /// Does nothing once the child has been reaped: its process id may then
    /// belong to someone else.
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        if self.try_status()?.is_some() {
            return Ok(());
        }
        match killpg(self.pgid(), signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(err) => {
                Err(err).with_context(|| format!("failed to send {signal} to {}", self.name))
            }
        }
    }

    /// Waits for the child to exit.
    pub async fn wait(&mut self) -> Result<ExitStatus> {
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(status);
            }
            tokio::time::sleep(EXIT_POLL_INTERVAL).await;
        }
    }

    /// Waits at most `timeout` for the child to exit.
    pub async fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(EXIT_POLL_INTERVAL).await;
        }
    }

    /// Asks the child to stop with `signal` and waits up to `grace` for it;
    /// SIGKILLs it if it is still running then.
    ///
    /// Returns the exit status, which says whether the child stopped on its
    /// own (exit code) or had to be killed (signal).
    pub async fn stop(&mut self, signal: Signal, grace: Duration) -> Result<ExitStatus> {
        self.signal(signal)?;
        if let Some(status) = self.wait_timeout(grace).await? {
            return Ok(status);
        }
        eprintln!(
            "xtask: {} did not stop within {grace:?} of {signal}, killing it",
            self.name
        );
        self.signal(Signal::SIGKILL)?;
        self.wait().await
    }

    fn pgid(&self) -> Pid {
        // The child leads the group it was started in (`process_group(0)`).
        Pid::from_raw(self.child.id() as i32)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Kill the whole group even when the leader has already exited:
        // descendants (a test's cache nodes, say) may still be running in it.
        // The group id cannot be reused while any member is alive, and once
        // none is, `killpg` fails harmlessly with ESRCH.
        let _ = killpg(self.pgid(), Signal::SIGKILL);
        if self.status.is_none() {
            // SIGKILL cannot be ignored, so this returns promptly; reaping
            // here keeps zombies from piling up in long demo sessions.
            let _ = self.child.wait();
        }
    }
}

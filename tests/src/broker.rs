//! A private tansu broker for a test that kills and restarts it, with its
//! SQLite log in a temporary directory so that the log survives a restart.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer as _},
};
use tempfile::TempDir;
use tokio::time::Instant;

/// How often readiness and exit are polled.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long one connect or metadata probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A tansu broker of the test's own, killed (SIGKILL) on drop.
///
/// Every incarnation listens on the same address and keeps its log in the
/// same `tansu.db`, so that a restart brings the same topics and records
/// back. Its output goes to `tansu.log` in the same directory.
#[derive(Debug)]
pub struct PrivateBroker {
    addr: SocketAddr,
    /// The address the broker tells clients to connect to (its metadata):
    /// `addr`, or a proxy in front of it.
    advertised: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
    incarnation: u32,
    // Dropped after the process is killed (see `Drop`).
    dir: TempDir,
}

impl PrivateBroker {
    /// Starts a broker on a free port and waits until it answers a metadata
    /// request.
    ///
    /// # Errors
    ///
    /// Fails when tansu cannot be found or started, or is not ready within
    /// `timeout`.
    pub async fn start(timeout: Duration) -> Result<Self> {
        let addr = crate::free_addr()?;
        Self::start_advertising(addr, addr, timeout).await
    }

    /// Starts a broker listening on `addr` that tells clients to connect to
    /// `advertised` (a proxy in front of it: after bootstrapping, clients
    /// reach the broker through the advertised address only), and waits
    /// until it answers a metadata request on `addr`.
    ///
    /// # Errors
    ///
    /// As [`PrivateBroker::start`].
    pub async fn start_advertising(
        addr: SocketAddr,
        advertised: SocketAddr,
        timeout: Duration,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("ringcache-private-tansu-")
            .tempdir()
            .context("failed to create the broker's temporary directory")?;
        let log = dir.path().join("tansu.log");
        File::create(&log).with_context(|| format!("failed to create {}", log.display()))?;
        let mut broker = Self {
            addr,
            advertised,
            log,
            child: None,
            incarnation: 0,
            dir,
        };
        broker.spawn()?;
        broker.wait_ready(timeout).await?;
        Ok(broker)
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        self.addr.to_string()
    }

    /// The directory holding `tansu.db` and `tansu.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last `lines` lines of the broker's log (all incarnations).
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

    /// SIGKILLs the broker and reaps it.
    ///
    /// # Errors
    ///
    /// Fails when it is not running or cannot be killed.
    pub fn sigkill(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("the broker is not running")?;
        if let Some(status) = child.try_wait()? {
            bail!(
                "the broker had already exited ({status}); log tail:\n{}",
                self.log_tail(40)
            );
        }
        child.kill().context("failed to SIGKILL the broker")?;
        child.wait().context("failed to reap the broker")
    }

    /// SIGTERMs the broker (a clean shutdown) and waits until it exits.
    ///
    /// # Errors
    ///
    /// Fails when it is not running or cannot be signalled.
    pub fn sigterm(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("the broker is not running")?;
        let pid = nix::unistd::Pid::from_raw(
            i32::try_from(child.id()).context("the broker's pid does not fit a pid_t")?,
        );
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .context("failed to SIGTERM the broker")?;
        child.wait().context("failed to reap the broker")
    }

    /// Starts the broker again on the same address and storage (kill it
    /// first), and waits until it is ready.
    ///
    /// # Errors
    ///
    /// Fails when it is still running, cannot be started, or is not ready
    /// within `timeout`.
    pub async fn restart(&mut self, timeout: Duration) -> Result<()> {
        if self.child.is_some() {
            bail!("restart: the broker is still running");
        }
        self.spawn()?;
        self.wait_ready(timeout).await
    }

    fn spawn(&mut self) -> Result<()> {
        let binary = crate::tansu_bin()?;
        self.incarnation += 1;
        let mut out = OpenOptions::new()
            .append(true)
            .open(&self.log)
            .with_context(|| format!("failed to open {}", self.log.display()))?;
        writeln!(out, "==== incarnation {} ====", self.incarnation)?;
        let err = out.try_clone()?;
        let url = format!("tcp://{}", self.addr);
        let advertised = format!("tcp://{}", self.advertised);
        let child = Command::new(&binary)
            .arg("broker")
            .args([
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            // Relative to the working directory: the log lives in `dir`.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("failed to start {}", binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Polls until the broker accepts a TCP connection and answers a
    /// metadata request.
    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!(
                    "the broker exited ({status}) before it was ready; log tail:\n{}",
                    self.log_tail(40)
                );
            }
            let addr = self.addr;
            let ready = tokio::task::spawn_blocking(move || probe(addr)).await?;
            match ready {
                Ok(()) => return Ok(()),
                Err(err) if Instant::now() >= deadline => {
                    return Err(err).with_context(|| {
                        format!(
                            "the broker at {addr} was not ready within {timeout:?}; log tail:\n{}",
                            self.log_tail(40)
                        )
                    });
                }
                Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }
}

/// One readiness probe: a TCP connect, then a metadata fetch.
fn probe(addr: SocketAddr) -> Result<()> {
    TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", addr.to_string())
        .create()
        .context("failed to create a metadata client")?;
    let metadata = consumer
        .fetch_metadata(None, PROBE_TIMEOUT)
        .context("metadata request failed")?;
    if metadata.brokers().is_empty() {
        bail!("the metadata lists no broker");
    }
    Ok(())
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if std::thread::panicking() {
                eprintln!("private broker log tail:\n{}", self.log_tail(40));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

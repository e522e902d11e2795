//! The example HTTP service (`cache-client/examples/kv-service.rs`) as a
//! child process of a test, and a small HTTP client to drive it.

use std::{
    fs::{self, File},
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;
use tokio::time::Instant;

use crate::process::Guarded;

/// How long [`ServiceProcess::start`] waits for `/healthz` to answer 200.
pub const SERVICE_TIMEOUT: Duration = Duration::from_secs(60);

/// How often readiness is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// How many log lines error messages include.
const LOG_TAIL_LINES: usize = 40;

/// What the service runs with.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// Cache nodes to learn the pool from.
    pub seeds: Vec<String>,
    /// The keyspace file's text.
    pub keyspaces: String,
    /// PostgreSQL URL of the stores.
    pub database_url: String,
    /// Kafka bootstrap servers, for write-back keyspaces.
    pub brokers: Option<String>,
    /// Extra environment, e.g. `RUST_LOG`.
    pub env: Vec<(String, String)>,
}

/// Where cargo put the example: `target/<profile>/examples/kv-service`,
/// beside the running test executable's `deps/`. Built by `cargo build
/// --examples` (which `cargo xtask test` runs).
///
/// # Errors
///
/// Fails, saying how to build it, when the binary is not there.
pub fn service_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("failed to locate the running test executable")?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("examples").join("kv-service"))
        .collect();
    candidates
        .iter()
        .find(|candidate| candidate.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "the kv-service example is not at {}: build it with \
                 `cargo build -p cache-client --examples` (`cargo xtask test` does)",
                candidates
                    .iter()
                    .map(|c| c.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            )
        })
}

/// A running example service; killed on drop.
#[derive(Debug)]
pub struct ServiceProcess {
    addr: SocketAddr,
    http: reqwest::Client,
    process: Guarded,
    // Dropped after the process is killed (see `Drop` of `Guarded`).
    _dir: TempDir,
}

impl ServiceProcess {
    /// Spawns the service and waits until `/healthz` answers 200.
    ///
    /// # Errors
    ///
    /// Fails when the binary is missing, when the service exits first, or
    /// when it is not healthy within [`SERVICE_TIMEOUT`].
    pub async fn start(config: ServiceConfig) -> Result<Self> {
        let binary = service_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("ringcache-kv-service-")
            .tempdir()
            .context("failed to create the service's temporary directory")?;
        let keyspaces = dir.path().join("keyspaces.toml");
        fs::write(&keyspaces, &config.keyspaces)
            .with_context(|| format!("failed to write {}", keyspaces.display()))?;
        let log = dir.path().join("service.log");
        let out =
            File::create(&log).with_context(|| format!("failed to create {}", log.display()))?;
        let err = out
            .try_clone()
            .context("failed to duplicate the log handle")?;
        let addr = crate::free_addr()?;
        let mut command = Command::new(&binary);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("RINGCACHE_") {
                command.env_remove(name);
            }
        }
        command
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--seeds")
            .arg(config.seeds.join(","))
            .arg("--keyspaces")
            .arg(&keyspaces)
            .arg("--database-url")
            .arg(&config.database_url)
            .env("NO_COLOR", "1")
            .envs(config.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if let Some(brokers) = &config.brokers {
            command.arg("--brokers").arg(brokers);
        }
        let child = command
            .spawn()
            .with_context(|| format!("failed to start {}", binary.display()))?;
        let mut service = ServiceProcess {
            addr,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .context("failed to build the HTTP client")?,
            process: Guarded::new("kv-service".into(), log, LOG_TAIL_LINES, child),
            _dir: dir,
        };
        service.wait_healthy(SERVICE_TIMEOUT).await?;
        Ok(service)
    }

    async fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.try_exit_status()? {
                bail!(
                    "kv-service exited ({status}) before becoming healthy; log tail:\n{}",
                    self.process.tail()
                );
            }
            let last = match self.request(reqwest::Method::GET, "/healthz", None).await {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => format!("{status} {body}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "kv-service at {} not healthy after {timeout:?} ({last}); log tail:\n{}",
                    self.addr,
                    self.process.tail()
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Where it serves HTTP.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// One request: the status and the body as text.
    ///
    /// # Errors
    ///
    /// Fails when the request gets no answer.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String)> {
        let url = format!("http://{}{path}", self.addr);
        let mut request = self.http.request(method.clone(), &url);
        if let Some(body) = body {
            request = request.body(body.to_owned());
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {url}"))?;
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .with_context(|| format!("the body of {method} {url}"))?;
        Ok((status, text))
    }

    /// Sends SIGTERM and waits for the exit status.
    ///
    /// # Errors
    ///
    /// Fails when the process does not exit within `timeout`.
    pub async fn stop(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        self.process.signal(nix::sys::signal::Signal::SIGTERM)?;
        self.process.wait_exit(timeout).await
    }
}

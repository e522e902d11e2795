//! A throw-away Kafka-compatible broker: tansu with SQLite storage in a
//! temporary directory, on a free port.
//!
//! Apache Kafka needs a JVM we do not have; tansu speaks the Kafka protocol
//! well enough for rdkafka's idempotent producer and consumer groups.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use crate::{
    paths,
    process::ChildGuard,
    readiness::{free_port, wait_for_tcp},
};

/// How long a fresh broker may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How many free ports to try; see [`crate::readiness::free_port`].
const START_ATTEMPTS: usize = 3;

/// The exact install command: `libsql` is the feature behind `sqlite://`.
const INSTALL_ARGS: [&str; 5] = ["install", "tansu", "--locked", "--features", "libsql"];

/// A running tansu broker.
#[derive(Debug)]
pub struct TansuBroker {
    binary: PathBuf,
    addr: SocketAddr,
    log: PathBuf,
    // Held for their `Drop`s. `process` is declared before `dir` so that the
    // broker is killed before its storage directory is removed.
    #[expect(dead_code, reason = "held to kill the broker on drop")]
    process: ChildGuard,
    #[expect(dead_code, reason = "held to remove the storage on drop")]
    dir: TempDir,
}

impl TansuBroker {
    /// Starts a broker whose output goes to `logs_dir/tansu.log`.
    pub async fn start(logs_dir: &Path, cancel: &CancellationToken) -> Result<Self> {
        let binary = ensure_installed(cancel).await?;
        let dir = tempfile::Builder::new()
            .prefix("ringcache-tansu-")
            .tempdir()
            .context("failed to create a temporary directory for the broker")?;
        let log = logs_dir.join("tansu.log");
        for attempt in 1..=START_ATTEMPTS {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let url = format!("tcp://{addr}");
            let mut command = Command::new(&binary);
            command
                .arg("broker")
                .args(["--listener-url", &url, "--advertised-listener-url", &url])
                // Relative to the working directory below, so the whole log
                // lives (and dies) in the temporary directory.
                .args(["--storage-engine", "sqlite://tansu.db"])
                .current_dir(dir.path());
            let mut process = ChildGuard::spawn("tansu broker", &mut command, Some(&log))?;
            match wait_for_tcp(addr, READY_TIMEOUT, cancel, Some(&mut process)).await {
                Ok(()) => {
                    return Ok(Self {
                        binary,
                        addr,
                        log,
                        process,
                        dir,
                    });
                }
                Err(err) if attempt < START_ATTEMPTS && !cancel.is_cancelled() => {
                    eprintln!(
                        "xtask: broker did not start on {addr} ({err:#}); retrying on another port"
                    );
                    // Make sure the failed attempt is gone before the next
                    // one opens the same SQLite file.
                    process
                        .stop(Signal::SIGKILL, Duration::from_secs(5))
                        .await?;
                }
                Err(err) => return Err(err).context("the tansu broker did not start"),
            }
        }
        unreachable!("the last attempt returns");
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        self.addr.to_string()
    }

    /// The tansu executable, for tests that restart a broker.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The broker's log file.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

/// Finds tansu on `PATH` or in cargo's bin directory, installing it with
/// `cargo install tansu --locked --features libsql` when it is in neither.
pub async fn ensure_installed(cancel: &CancellationToken) -> Result<PathBuf> {
    if let Some(found) = find() {
        return Ok(found);
    }
    cargo_install(
        "tansu (the Kafka-compatible test broker)",
        &INSTALL_ARGS,
        cancel,
    )
    .await?;
    find().context("`cargo install tansu` succeeded but no tansu executable was found on PATH or in cargo's bin directory")
}

/// Runs `cargo <args>` (an install of `what`), saying so first: it takes
/// 10-30 minutes, once.
pub async fn cargo_install(what: &str, args: &[&str], cancel: &CancellationToken) -> Result<()> {
    let shown = args.join(" ");
    eprintln!(
        "xtask: {what} is not installed; running `cargo {shown}` (this takes 10-30 minutes, once)"
    );
    let mut install = tokio::process::Command::from(paths::cargo());
    install.args(args).kill_on_drop(true);
    let mut child = install
        .spawn()
        .with_context(|| format!("failed to run cargo {shown}"))?;
    let status = tokio::select! {
        status = child.wait() => status.with_context(|| format!("failed to wait for cargo {shown}"))?,
        _ = cancel.cancelled() => bail!("interrupted while installing {what}"),
    };
    if !status.success() {
        bail!("`cargo {shown}` failed ({status})");
    }
    Ok(())
}

/// `tansu` on `PATH`, else in `$CARGO_HOME/bin` (default `~/.cargo/bin`).
fn find() -> Option<PathBuf> {
    if let Some(found) = paths::find_on_path("tansu") {
        return Some(found);
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))?;
    let candidate = cargo_home.join("bin").join("tansu");
    paths::is_executable(&candidate).then_some(candidate)
}

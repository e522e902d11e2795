//! The write-back benchmark's Kafka-compatible broker: tansu with its
//! in-memory storage (`memory://`), on a free port.
//!
//! Only `cargo xtask bench --suite write-back` uses it; the tests keep
//! tansu with SQLite storage ([`super::tansu`]), whose records survive a
//! broker restart, which the loss tests rely on. SQLite storage scans its
//! tables on every fetch and cannot carry the benchmark's rates. The
//! in-memory engine is the same tansu 0.6 built with its `dynostore`
//! feature, installed beside the build (`target/xtask/tools`) so that it
//! never replaces the tests' binary. tansu's successor Nisshi 0.8.1 offers
//! the same engines but needs rustc 1.96 (a nightly here), and drains a
//! backlog at a third of tansu 0.6's rate (docs/benchmarks.md); name it
//! with `RINGCACHE_BENCH_BROKER_BIN` to measure with it.
//!
//! Environment (each optional):
//! - `RINGCACHE_BENCH_BROKERS`: use this running broker (`host:port,...`,
//!   e.g. an Apache Kafka) instead of starting one.
//! - `RINGCACHE_BENCH_BROKER_BIN`: the broker executable (a tansu or Nisshi
//!   with the engine asked for); else the one installed with
//!   [`INSTALL_ARGS`], installed when missing.
//! - `RINGCACHE_BENCH_BROKER_STORAGE`: its storage engine: `memory` (the
//!   default), `postgres` (the benchmark's PostgreSQL server, database
//!   `postgres`; needs a broker built with its `postgres` feature), or any URL the
//!   broker takes (`memory://tansu/`, `postgres://...`).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio_util::sync::CancellationToken;

use crate::{
    paths,
    process::ChildGuard,
    readiness::{free_port, wait_for_tcp},
};

/// How long a fresh broker may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The install command, less its `--root`: `dynostore` is the feature
/// behind `memory://` (a broker for `postgres://` needs `postgres` too:
/// name one with `RINGCACHE_BENCH_BROKER_BIN`).
pub const INSTALL_ARGS: [&str; 7] = [
    "install",
    "tansu",
    "--version",
    "0.6.0",
    "--locked",
    "--features",
    "libsql,dynostore",
];

/// Where the benchmark's broker is.
#[derive(Debug)]
pub enum BenchBroker {
    /// One the caller runs (`RINGCACHE_BENCH_BROKERS`).
    External(String),
    /// A broker process of this run.
    Started {
        addr: SocketAddr,
        /// What `BINARY --version` printed (`tansu 0.6.0`, `nisshi 0.8.1`).
        version: String,
        storage: String,
        log: PathBuf,
        #[expect(dead_code, reason = "held to kill the broker on drop")]
        process: ChildGuard,
    },
}

/// The storage engine URL for a `RINGCACHE_BENCH_BROKER_STORAGE` value;
/// `pg_url` is the benchmark's PostgreSQL server.
pub fn storage_url(setting: Option<&str>, pg_url: &str) -> String {
    match setting.map(str::trim) {
        None | Some("" | "memory") => "memory://tansu/".to_owned(),
        Some("postgres") => pg_url.to_owned(),
        Some(url) => url.to_owned(),
    }
}

impl BenchBroker {
    /// Starts the broker (or takes `RINGCACHE_BENCH_BROKERS`), its output
    /// in `logs_dir/bench-broker.log`; `pg_url` serves the `postgres`
    /// storage.
    pub async fn start(logs_dir: &Path, pg_url: &str, cancel: &CancellationToken) -> Result<Self> {
        if let Ok(brokers) = std::env::var("RINGCACHE_BENCH_BROKERS")
            && !brokers.trim().is_empty()
        {
            return Ok(BenchBroker::External(brokers));
        }
        let binary = ensure_installed(cancel).await?;
        let version = version_of(&binary).await;
        let storage = storage_url(
            std::env::var("RINGCACHE_BENCH_BROKER_STORAGE")
                .ok()
                .as_deref(),
            pg_url,
        );
        let log = logs_dir.join("bench-broker.log");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let url = format!("tcp://{addr}");
        let mut command = Command::new(&binary);
        command
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", &storage])
            // Its own environment only: a developer's LISTENER_URL or
            // STORAGE_ENGINE must not redirect it.
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .env_remove("STORAGE_ENGINE")
            .env_remove("CLUSTER_ID");
        let mut process = ChildGuard::spawn("bench broker", &mut command, Some(&log))?;
        wait_for_tcp(addr, READY_TIMEOUT, cancel, Some(&mut process))
            .await
            .context("the benchmark's broker did not start")?;
        Ok(BenchBroker::Started {
            addr,
            version,
            storage,
            log,
            process,
        })
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        match self {
            BenchBroker::External(brokers) => brokers.clone(),
            BenchBroker::Started { addr, .. } => addr.to_string(),
        }
    }

    /// What the benchmark ran against, for the tables.
    pub fn describe(&self) -> String {
        match self {
            BenchBroker::External(brokers) => {
                format!("the broker at `{brokers}` (`RINGCACHE_BENCH_BROKERS`)")
            }
            BenchBroker::Started {
                version, storage, ..
            } => {
                let storage = if storage.starts_with("postgres") {
                    "postgres://"
                } else {
                    storage.as_str()
                };
                format!("{version} with storage `{storage}`")
            }
        }
    }

    /// The broker's log file, when this run started it.
    pub fn log(&self) -> Option<&Path> {
        match self {
            BenchBroker::External(_) => None,
            BenchBroker::Started { log, .. } => Some(log),
        }
    }
}

/// The first line `binary --version` prints, else the binary's file name:
/// the broker's name and version for the document.
async fn version_of(binary: &Path) -> String {
    tokio::process::Command::new(binary)
        .arg("--version")
        .kill_on_drop(true)
        .output()
        .await
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .map(|line| line.trim().to_owned())
        })
        .filter(|line| !line.is_empty())
        .unwrap_or_else(|| {
            binary.file_name().map_or_else(
                || binary.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            )
        })
}

/// `RINGCACHE_BENCH_BROKER_BIN`, else the broker installed under
/// `target/xtask/tools`, installing it there when missing.
pub async fn ensure_installed(cancel: &CancellationToken) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("RINGCACHE_BENCH_BROKER_BIN") {
        let path = PathBuf::from(path);
        if !paths::is_executable(&path) {
            bail!(
                "RINGCACHE_BENCH_BROKER_BIN names {}, which is not an executable",
                path.display()
            );
        }
        return Ok(path);
    }
    let root = paths::target_dir()
        .join("xtask")
        .join("tools")
        .join("tansu-dynostore");
    let binary = root.join("bin").join("tansu");
    if paths::is_executable(&binary) {
        return Ok(binary);
    }
    let root_arg = root.to_string_lossy().into_owned();
    let mut args: Vec<&str> = INSTALL_ARGS.to_vec();
    args.extend(["--root", &root_arg]);
    super::tansu::cargo_install(
        "tansu with in-memory storage (the benchmark's broker)",
        &args,
        cancel,
    )
    .await?;
    if !paths::is_executable(&binary) {
        bail!("`cargo install` succeeded but left no {}", binary.display());
    }
    Ok(binary)
}

#[cfg(test)]
mod tests {
    use super::storage_url;

    #[test]
    fn the_storage_setting_names_memory_postgres_or_a_url() {
        let pg = "postgres://postgres@127.0.0.1:5433/postgres";
        assert_eq!(storage_url(None, pg), "memory://tansu/");
        assert_eq!(storage_url(Some("memory"), pg), "memory://tansu/");
        assert_eq!(storage_url(Some("postgres"), pg), pg);
        assert_eq!(storage_url(Some("s3://b/"), pg), "s3://b/");
    }
}

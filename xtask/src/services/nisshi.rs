//! The write-back benchmark's Kafka-compatible broker: Nisshi (tansu's new
//! name), on a free port, with its in-memory storage by default.
//!
//! Only `cargo xtask bench --suite write-back` uses it; the tests keep
//! tansu with SQLite storage ([`super::tansu`]), whose records survive a
//! broker restart, which the loss tests rely on. tansu 0.6 on SQLite scans
//! its tables on every fetch and cannot carry the benchmark's rates.
//!
//! Environment (each optional):
//! - `RINGCACHE_BENCH_BROKERS`: use this running broker (`host:port,...`,
//!   e.g. an Apache Kafka) instead of starting one.
//! - `RINGCACHE_BENCH_NISSHI`: the `nisshi` executable; else `nisshi` on
//!   `PATH` or in cargo's bin directory, installed with [`INSTALL_ARGS`]
//!   when missing.
//! - `RINGCACHE_BENCH_BROKER_STORAGE`: Nisshi's storage engine: `memory`
//!   (the default), `postgres` (the benchmark's PostgreSQL server, database
//!   `postgres`), or any URL Nisshi takes (`memory://nisshi/`,
//!   `postgres://...`).

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

/// The exact install command: Nisshi 0.7 needs a nightly toolchain;
/// `dynostore` is the feature behind `memory://`, `postgres` behind
/// `postgres://`.
pub const INSTALL_ARGS: [&str; 8] = [
    "+nightly",
    "install",
    "nisshi",
    "--version",
    "0.7.0",
    "--locked",
    "--features",
    "dynostore,postgres",
];

/// Where the benchmark's broker is.
#[derive(Debug)]
pub enum BenchBroker {
    /// One the caller runs (`RINGCACHE_BENCH_BROKERS`).
    External(String),
    /// A Nisshi process of this run.
    Nisshi {
        addr: SocketAddr,
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
        None | Some("" | "memory") => "memory://nisshi/".to_owned(),
        Some("postgres") => pg_url.to_owned(),
        Some(url) => url.to_owned(),
    }
}

impl BenchBroker {
    /// Starts Nisshi (or takes `RINGCACHE_BENCH_BROKERS`), its output in
    /// `logs_dir/nisshi.log`; `pg_url` serves the `postgres` storage.
    pub async fn start(logs_dir: &Path, pg_url: &str, cancel: &CancellationToken) -> Result<Self> {
        if let Ok(brokers) = std::env::var("RINGCACHE_BENCH_BROKERS")
            && !brokers.trim().is_empty()
        {
            return Ok(BenchBroker::External(brokers));
        }
        let binary = ensure_installed(cancel).await?;
        let storage = storage_url(
            std::env::var("RINGCACHE_BENCH_BROKER_STORAGE")
                .ok()
                .as_deref(),
            pg_url,
        );
        let log = logs_dir.join("nisshi.log");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let url = format!("tcp://{addr}");
        let mut command = Command::new(&binary);
        command
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", &storage])
            // The benchmark's groups are made of the workers it starts at
            // once; Kafka's default wait for more members (3 s) would only
            // delay the start.
            .args(["--group-initial-rebalance-delay", "100ms"])
            // Its own environment only: a developer's LISTENER_URL or
            // STORAGE_ENGINE must not redirect it.
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .env_remove("STORAGE_ENGINE")
            .env_remove("CLUSTER_ID");
        let mut process = ChildGuard::spawn("nisshi broker", &mut command, Some(&log))?;
        wait_for_tcp(addr, READY_TIMEOUT, cancel, Some(&mut process))
            .await
            .context("the nisshi broker did not start")?;
        Ok(BenchBroker::Nisshi {
            addr,
            storage,
            log,
            process,
        })
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        match self {
            BenchBroker::External(brokers) => brokers.clone(),
            BenchBroker::Nisshi { addr, .. } => addr.to_string(),
        }
    }

    /// What the benchmark ran against, for the tables.
    pub fn describe(&self) -> String {
        match self {
            BenchBroker::External(brokers) => {
                format!("the broker at `{brokers}` (`RINGCACHE_BENCH_BROKERS`)")
            }
            BenchBroker::Nisshi { storage, .. } => {
                let storage = if storage.starts_with("postgres") {
                    "postgres://"
                } else {
                    storage.as_str()
                };
                format!("Nisshi 0.7 with storage `{storage}`")
            }
        }
    }

    /// The broker's log file, when this run started it.
    pub fn log(&self) -> Option<&Path> {
        match self {
            BenchBroker::External(_) => None,
            BenchBroker::Nisshi { log, .. } => Some(log),
        }
    }
}

/// `RINGCACHE_BENCH_NISSHI`, else Nisshi on `PATH` or in cargo's bin
/// directory, installing it with `cargo +nightly install nisshi ...` when
/// it is in neither.
pub async fn ensure_installed(cancel: &CancellationToken) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("RINGCACHE_BENCH_NISSHI") {
        let path = PathBuf::from(path);
        if !paths::is_executable(&path) {
            bail!(
                "RINGCACHE_BENCH_NISSHI names {}, which is not an executable",
                path.display()
            );
        }
        return Ok(path);
    }
    if let Some(found) = find() {
        return Ok(found);
    }
    eprintln!(
        "xtask: nisshi (the benchmark's Kafka-compatible broker) is not installed; running \
         `cargo {}` (this takes 15-30 minutes, once)",
        INSTALL_ARGS.join(" ")
    );
    // `cargo` through rustup, so that `+nightly` selects the toolchain.
    let mut install = tokio::process::Command::new("cargo");
    install.args(INSTALL_ARGS).kill_on_drop(true);
    let mut child = install
        .spawn()
        .context("failed to run cargo install nisshi")?;
    let status = tokio::select! {
        status = child.wait() => status.context("failed to wait for cargo install nisshi")?,
        _ = cancel.cancelled() => bail!("interrupted while installing nisshi"),
    };
    if !status.success() {
        bail!("`cargo {}` failed ({status})", INSTALL_ARGS.join(" "));
    }
    find().context(
        "`cargo install nisshi` succeeded but no nisshi executable was found on PATH or in \
         cargo's bin directory",
    )
}

/// `nisshi` on `PATH`, else in `$CARGO_HOME/bin` (default `~/.cargo/bin`).
fn find() -> Option<PathBuf> {
    if let Some(found) = paths::find_on_path("nisshi") {
        return Some(found);
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))?;
    let candidate = cargo_home.join("bin").join("nisshi");
    paths::is_executable(&candidate).then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::storage_url;

    #[test]
    fn the_storage_setting_names_memory_postgres_or_a_url() {
        let pg = "postgres://postgres@127.0.0.1:5433/postgres";
        assert_eq!(storage_url(None, pg), "memory://nisshi/");
        assert_eq!(storage_url(Some("memory"), pg), "memory://nisshi/");
        assert_eq!(storage_url(Some("postgres"), pg), pg);
        assert_eq!(storage_url(Some("s3://b/"), pg), "s3://b/");
    }
}

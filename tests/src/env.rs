//! The services `cargo xtask test` provides, found through the environment.

use std::{
    net::{SocketAddr, TcpStream, ToSocketAddrs},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result, bail};

/// How long a reachability check waits for a TCP connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The hint every missing-service error ends with.
const HOW_TO_RUN: &str =
    "run the suite with `cargo xtask test`, which starts PostgreSQL and the broker";

/// The URL of the test PostgreSQL server (`RINGCACHE_TEST_PG_URL`), e.g.
/// `postgres://postgres@127.0.0.1:5433/postgres`, checked to accept TCP
/// connections.
///
/// The server allows prepared transactions (`max_prepared_transactions >
/// 0`) and trusts the `postgres` role.
///
/// # Errors
///
/// Fails, saying how to run the suite, when the variable is unset or the
/// server does not accept connections.
pub fn pg_url() -> Result<String> {
    let url = var("RINGCACHE_TEST_PG_URL", "PostgreSQL")?;
    let host_port = pg_host_port(&url).with_context(|| {
        format!("RINGCACHE_TEST_PG_URL={url} is not a postgres:// URL with a host and port")
    })?;
    check_reachable("PostgreSQL", "RINGCACHE_TEST_PG_URL", host_port)?;
    Ok(url)
}

/// The Kafka bootstrap servers (`RINGCACHE_TEST_KAFKA_BROKERS`, e.g.
/// `127.0.0.1:9092`), checked to accept TCP connections.
///
/// Topics are not created automatically: create them with rdkafka's
/// `AdminClient`.
///
/// # Errors
///
/// Fails, saying how to run the suite, when the variable is unset or a broker
/// does not accept connections.
pub fn kafka_brokers() -> Result<String> {
    let brokers = var("RINGCACHE_TEST_KAFKA_BROKERS", "the Kafka broker")?;
    for broker in brokers.split(',').map(str::trim).filter(|b| !b.is_empty()) {
        check_reachable("the Kafka broker", "RINGCACHE_TEST_KAFKA_BROKERS", broker)?;
    }
    Ok(brokers)
}

/// The directory with PostgreSQL's server binaries (`pg_ctl`, `postgres`),
/// from `RINGCACHE_TEST_PG_BINDIR`.
///
/// # Errors
///
/// Fails, saying how to run the suite, when the variable is unset.
pub fn pg_bindir() -> Result<PathBuf> {
    var("RINGCACHE_TEST_PG_BINDIR", "PostgreSQL's binaries").map(PathBuf::from)
}

/// The tansu broker executable, from `RINGCACHE_TEST_TANSU_BIN`.
///
/// # Errors
///
/// Fails, saying how to run the suite, when the variable is unset.
pub fn tansu_bin() -> Result<PathBuf> {
    var("RINGCACHE_TEST_TANSU_BIN", "the tansu broker executable").map(PathBuf::from)
}

fn var(name: &str, what: &str) -> Result<String> {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => Ok(value),
        _ => bail!("{name} is not set, so this test cannot find {what}: {HOW_TO_RUN}"),
    }
}

/// `host:port` of a `postgres://user@host:port/db?params` URL.
fn pg_host_port(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))?;
    let authority = rest.split(['/', '?']).next()?;
    let host_port = authority.rsplit('@').next()?;
    host_port.contains(':').then_some(host_port)
}

fn check_reachable(what: &str, var: &str, host_port: &str) -> Result<()> {
    let addrs: Vec<SocketAddr> = host_port
        .to_socket_addrs()
        .with_context(|| format!("{var}: cannot resolve {host_port}"))?
        .collect();
    let mut last_err = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(_) => return Ok(()),
            Err(err) => last_err = Some(err),
        }
    }
    let why = last_err.map_or_else(|| "no address".to_owned(), |e| e.to_string());
    bail!("{what} at {host_port} (from {var}) is unreachable ({why}): {HOW_TO_RUN}")
}

#[cfg(test)]
mod tests {
    use super::pg_host_port;

    #[test]
    fn pg_host_port_handles_user_database_and_parameters() {
        assert_eq!(
            pg_host_port("postgres://postgres@127.0.0.1:5433/postgres"),
            Some("127.0.0.1:5433")
        );
        assert_eq!(
            pg_host_port("postgresql://u:p@localhost:1/db?sslmode=disable"),
            Some("localhost:1")
        );
        assert_eq!(
            pg_host_port("postgres://127.0.0.1:7/x"),
            Some("127.0.0.1:7")
        );
        assert_eq!(pg_host_port("postgres://localhost/db"), None);
        assert_eq!(pg_host_port("mysql://localhost:1/db"), None);
    }
}

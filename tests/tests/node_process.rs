//! The real `cache-node` binary as a process: configuration from a file,
//! from environment variables, and from nothing at all; refusal of a bad
//! config; clean exit on SIGTERM and SIGINT.
//!
//! Needs `target/debug/cache-node`: run with `cargo xtask test`, or build it
//! with `cargo build --bins` first.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ringcache_proto::v1::{self, cache_node_client::CacheNodeClient};
use ringcache_tests::{NodeConfig, NodeProcess, free_addr};

/// How long a node with no in-flight requests may take to exit after a
/// signal.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn node_exits_zero_after_sigterm() -> Result<()> {
    let mut node = NodeProcess::start(NodeConfig::single("node-1")?).await?;

    node.sigterm()?;
    let status = node.wait_exit(EXIT_TIMEOUT).await?;

    ensure!(
        status.success(),
        "cache-node exited with {status} after SIGTERM, expected success; log tail:\n{}",
        node.log_tail(40)
    );
    Ok(())
}

/// The node catches SIGTERM and SIGINT before its port accepts a
/// connection: a signal sent as soon as a client can reach it (a
/// supervisor stopping a node that just came up) drains it instead of
/// killing it. The catching is read from `/proc` the moment a connect
/// first succeeds.
#[tokio::test]
async fn signals_are_caught_before_the_port_accepts() -> Result<()> {
    let config = NodeConfig::single("node-1")?;
    let addr = config.listen;
    let mut node = NodeProcess::spawn(config)?;
    let deadline = tokio::time::Instant::now() + ringcache_tests::HEALTH_TIMEOUT;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the node never accepted on {addr}"
        );
        tokio::task::yield_now().await;
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid()))?;
    let caught = status
        .lines()
        .find_map(|line| line.strip_prefix("SigCgt:"))
        .context("no SigCgt line")?;
    let caught = u64::from_str_radix(caught.trim(), 16)?;
    for (signal, name) in [(15, "SIGTERM"), (2, "SIGINT")] {
        ensure!(
            caught & (1 << (signal - 1)) != 0,
            "{name} is not caught yet when the port accepts (SigCgt {caught:016x})"
        );
    }
    node.sigterm()?;
    let status = node.wait_exit(EXIT_TIMEOUT).await?;
    ensure!(
        status.success(),
        "exit {status} after SIGTERM; log:\n{}",
        node.log_tail(40)
    );
    Ok(())
}

#[tokio::test]
async fn node_exits_zero_after_sigint() -> Result<()> {
    let mut node = NodeProcess::start(NodeConfig::single("node-1")?).await?;
    node.sigint()?;
    let status = node.wait_exit(EXIT_TIMEOUT).await?;
    ensure!(
        status.success(),
        "exit {status} after SIGINT; log:\n{}",
        node.log_tail(40)
    );
    Ok(())
}

/// With no arguments at all the node serves one keyspace, `default`, on the
/// documented default ports (127.0.0.1:7700 for gRPC, 9700 for metrics).
#[tokio::test]
async fn with_no_arguments_the_node_starts_on_its_documented_defaults() -> Result<()> {
    let mut config = NodeConfig::single("node-1")?;
    config.listen = cache_node::config::DEFAULT_LISTEN.parse()?;
    // Alone, the node reports itself at the address it bound.
    config.members = vec![(config.node_id.clone(), config.listen)];
    let mut node = NodeProcess::spawn_with(config, |_command, _config| {})?;
    node.wait_healthy(ringcache_tests::HEALTH_TIMEOUT)
        .await
        .context("is something else listening on 127.0.0.1:7700 or :9700?")?;
    let mut client = CacheNodeClient::connect("http://127.0.0.1:7700").await?;
    let stats = client
        .stats(v1::StatsRequest::default())
        .await?
        .into_inner();
    assert_eq!(stats.node_id, cache_node::config::DEFAULT_NODE_ID);
    let names: Vec<_> = stats.keyspaces.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["default"]);
    let metrics = tokio::net::TcpStream::connect(cache_node::config::DEFAULT_METRICS_LISTEN).await;
    ensure!(metrics.is_ok(), "metrics port not open: {metrics:?}");
    node.sigterm()?;
    ensure!(node.wait_exit(EXIT_TIMEOUT).await?.success());
    Ok(())
}

/// Environment variables configure a node without a file, and JSON logs are
/// one JSON object per line.
#[tokio::test]
async fn environment_variables_configure_the_node() -> Result<()> {
    let mut config = NodeConfig::single("from-env")?;
    let listen = config.listen;
    let metrics = free_addr()?;
    config.metrics_listen = metrics;
    let mut node = NodeProcess::spawn_with(config, |command, _config| {
        command
            .env("RINGCACHE_LISTEN", listen.to_string())
            .env("RINGCACHE_METRICS_LISTEN", metrics.to_string())
            .env("RINGCACHE_NODE_ID", "from-env")
            .env("RINGCACHE_UNKNOWN_KEYSPACES", "create")
            .env("RINGCACHE_LOG_FORMAT", "json");
    })?;
    node.wait_healthy(ringcache_tests::HEALTH_TIMEOUT).await?;
    let mut client = CacheNodeClient::connect(node.endpoint()).await?;
    let topology = client.topology(v1::TopologyRequest {}).await?.into_inner();
    assert_eq!(topology.self_id, "from-env");
    // `create` took effect: an unconfigured keyspace works.
    client
        .get(v1::GetRequest {
            keyspace: "made-up".into(),
            key: "k".into(),
        })
        .await?;
    node.sigterm()?;
    let status = node.wait_exit(EXIT_TIMEOUT).await?;
    ensure!(
        status.success(),
        "exit {status} after SIGTERM; log:\n{}",
        node.log_tail(40)
    );
    let log = std::fs::read_to_string(node.log_path())?;
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(!lines.is_empty(), "the node logged nothing");
    for line in lines {
        serde_json::from_str::<serde_json::Value>(line)
            .with_context(|| format!("log line is not JSON: {line}"))?;
    }
    Ok(())
}

/// A config with a misspelt field is refused at start-up: the node exits
/// non-zero and names the field.
#[tokio::test]
async fn a_bad_config_is_refused_with_the_field_named() -> Result<()> {
    let mut config = NodeConfig::single("node-1")?;
    config.extra_top_level = "shutdown_grce = \"1s\"\n".into();
    let mut node = NodeProcess::spawn(config)?;
    let status = node.wait_exit(EXIT_TIMEOUT).await?;
    ensure!(!status.success(), "a bad config must not start a node");
    let log = std::fs::read_to_string(node.log_path())?;
    ensure!(
        log.contains("shutdown_grce"),
        "the error names the field: {log}"
    );

    let mut config = NodeConfig::single("node-1")?;
    config.extra_tables = "[limits]\nmax_key_bytes = 0\n".into();
    let mut node = NodeProcess::spawn(config)?;
    let status = node.wait_exit(EXIT_TIMEOUT).await?;
    ensure!(!status.success());
    let log = std::fs::read_to_string(node.log_path())?;
    ensure!(
        log.contains("limits.max_key_bytes"),
        "the error names the field: {log}"
    );
    Ok(())
}

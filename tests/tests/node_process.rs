//! The real `cache-node` binary as a process: starts from a config file,
//! becomes healthy, and shuts down cleanly on SIGTERM.
//!
//! Needs `target/debug/cache-node`: run with `cargo xtask test`, or build it
//! with `cargo build --bins` first.

use std::time::Duration;

use anyhow::{Result, ensure};
use ringcache_tests::{NodeConfig, NodeProcess};

/// How long a node with no in-flight requests may take to exit after SIGTERM.
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

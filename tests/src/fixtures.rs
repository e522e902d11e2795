//! Fixtures shared by the tests that need a cluster and a database.

use anyhow::{Context, Result};
use cache_client::store::PgStore;
use sqlx::Connection;

use crate::{NodeConfig, NodeProcess};

/// A name no other test run uses: `<prefix>_<pid>_<nanoseconds>`.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}_{}_{nanos}", std::process::id())
}

/// `n` cache-node processes forming one cluster, creating keyspaces on
/// demand (each test names its own).
///
/// # Errors
///
/// Fails when a node does not start.
pub async fn cluster(n: usize) -> Result<Vec<NodeProcess>> {
    let mut nodes = Vec::new();
    for mut config in NodeConfig::cluster(n)? {
        config.extra_top_level = "unknown_keyspaces = \"create\"\n".into();
        nodes.push(NodeProcess::start(config).await?);
    }
    Ok(nodes)
}

/// A migrated PostgreSQL database of the test's own (see [`unique`]), so
/// that prepared transactions and offsets of other tests, which PostgreSQL
/// lists per database, stay apart: its URL, and a store on it.
///
/// # Errors
///
/// Fails when PostgreSQL is unreachable (run the suite with `cargo xtask
/// test`) or the database cannot be created.
pub async fn own_database(prefix: &str) -> Result<(String, PgStore)> {
    let base = crate::pg_url()?;
    let name = unique(prefix);
    let mut admin = sqlx::PgConnection::connect(&base).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut admin)
        .await
        .with_context(|| format!("failed to create database {name}"))?;
    let (server, _) = base.rsplit_once('/').context("a database URL")?;
    let url = format!("{server}/{name}");
    let store = PgStore::connect(&url)
        .await
        .with_context(|| format!("failed to connect to {url}"))?;
    store.migrate().await?;
    Ok((url, store))
}

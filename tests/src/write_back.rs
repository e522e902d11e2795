//! Helpers of the write-back tests: what PostgreSQL holds, waiting for it,
//! and durable puts retried until acknowledged.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cache_client::Client;
use sqlx::PgPool;
use tokio::time::Instant;

use crate::WorkerProcess;

/// How often the helpers poll.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// key → (value, version).
pub type Expected = BTreeMap<Vec<u8>, (Option<Vec<u8>>, i64)>;

/// The keyspace's rows: key → (value, version).
pub async fn rows(pool: &PgPool, keyspace: &str) -> Result<Expected> {
    let rows: Vec<(Vec<u8>, Option<Vec<u8>>, i64)> =
        sqlx::query_as("SELECT key, value, version FROM ringcache_entries WHERE keyspace = $1")
            .bind(keyspace)
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(key, value, version)| (key, (value, version)))
        .collect())
}

/// Waits until the keyspace's rows are exactly `expected`, failing early if
/// the worker died; the error shows the keys that differ.
pub async fn wait_stored(
    pool: &PgPool,
    worker: &mut WorkerProcess,
    keyspace: &str,
    expected: &Expected,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        worker.ensure_running()?;
        let actual = rows(pool, keyspace).await?;
        if &actual == expected {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let differ: Vec<String> = expected
                .keys()
                .chain(actual.keys())
                .filter(|key| expected.get(*key) != actual.get(*key))
                .take(10)
                .map(|key| {
                    format!(
                        "{}: expected {:?}, stored {:?}",
                        String::from_utf8_lossy(key),
                        expected.get(key),
                        actual.get(key)
                    )
                })
                .collect();
            bail!(
                "PostgreSQL does not hold the acknowledged writes after {timeout:?}:\n{}\nworker log tail:\n{}",
                differ.join("\n"),
                worker.log_tail(40)
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Puts `value` until the broker acknowledges it, and returns the version.
///
/// A failed durable write may still be applied, and its version is not
/// reported; retrying until a write of the key is acknowledged keeps the
/// expectation exact, since the retry's version is newer than the failed
/// attempt's (one client's clock only moves forward).
pub async fn put_acknowledged(
    client: &Client,
    keyspace: &str,
    key: &str,
    value: &str,
    timeout: Duration,
) -> Result<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        match client.keyspace(keyspace).put(key, value.to_owned()).await {
            Ok(written) => return Ok(written.version),
            Err(err) if Instant::now() < deadline => {
                eprintln!("put {key} failed, retrying: {err}");
            }
            Err(err) => return Err(err).with_context(|| format!("put {key} never acknowledged")),
        }
    }
}

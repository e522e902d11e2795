//! The write-through contention benchmark's load generator (`wt-bench`,
//! run by `cargo xtask bench --suite write-through`; `docs/benchmarks.md`).
//!
//! [`contention`] starts a cluster of real nodes and a database of its own,
//! defines one write-through keyspace, and runs N writer tasks in closed
//! loop for a fixed time, all on one key or each on a key of its own. It
//! reports the writes per second, their latency, the errors by kind (a
//! `conflict` is a writer that met another writer's pending change and did
//! not get its turn), and a final audit: every key's cached value against
//! its row.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use cache_client::{
    Client, ClientConfig,
    store::{Loaded, PgStore, Store as _},
    strategy::{KeyspaceSettings, Strategy},
};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

use crate::{
    cluster, own_database,
    wb_bench::{LatencyMs, histogram},
};

/// The keyspace every run writes.
const KEYSPACE: &str = "wt_bench";
/// How long the final audit waits for the last writes' cache commits.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`contention`] runs with.
#[derive(Debug, Clone)]
pub struct ContentionOptions {
    /// Writer tasks (closed loop: each waits for its write's answer).
    pub writers: usize,
    /// All writers on one key, or each on its own.
    pub same_key: bool,
    /// The measured time.
    pub duration: Duration,
    /// Writing before the measured time starts (connections, first
    /// prepared statements).
    pub warmup: Duration,
    /// Bytes per value.
    pub value_size: usize,
    /// Nodes in the cluster.
    pub nodes: usize,
    /// Replicas of each key.
    pub replicas: usize,
}

/// What [`contention`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct ContentionResult {
    pub writers: usize,
    pub same_key: bool,
    pub nodes: usize,
    pub replicas: usize,
    pub seconds: f64,
    /// Acknowledged writes per second in the measured time.
    pub writes_per_s: f64,
    /// Latency of the acknowledged writes.
    pub latency: LatencyMs,
    /// Failed writes in the measured time, by error kind.
    pub errors: BTreeMap<String, u64>,
    /// Failed writes over all attempted, in the measured time.
    pub error_ratio: f64,
    /// One message per error kind, for the log.
    pub error_samples: BTreeMap<String, String>,
    /// Keys whose cached value differed from their row when the audit
    /// gave up (0 when every key agreed).
    pub inconsistent_keys: usize,
}

/// One writer's tally.
struct Tally {
    latency: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    samples: BTreeMap<String, String>,
}

/// Runs one measurement (see the module's documentation).
///
/// # Errors
/// Fails when the cluster or the database cannot be set up, or a writer
/// task panics; failed writes are counted, not errors.
pub async fn contention(options: &ContentionOptions) -> Result<ContentionResult> {
    ensure!(options.writers > 0, "at least one writer");
    let nodes = cluster(options.nodes).await?;
    let (_url, store) = own_database("wt_bench").await?;
    let store = Arc::new(store);
    let client = Client::connect(ClientConfig::new(
        nodes.iter().map(|n| n.addr().to_string()),
    ))
    .await
    .context("failed to connect to the cluster")?;
    let mut settings = KeyspaceSettings::new(Strategy::WriteThrough);
    if options.replicas > 1 {
        settings = settings.with_replication(options.replicas, options.replicas);
    }
    client.define_keyspace(KEYSPACE, settings, Some(store.clone()))?;
    let keyspace = client.keyspace(KEYSPACE);

    let keys: Vec<String> = (0..options.writers)
        .map(|w| {
            if options.same_key {
                "hot".to_owned()
            } else {
                format!("key-{w:04}")
            }
        })
        .collect();
    let start = Instant::now() + options.warmup;
    let end = start + options.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (writer, key) in keys.iter().cloned().enumerate() {
        let keyspace = keyspace.clone();
        let size = options.value_size;
        tasks.spawn(async move {
            let mut tally = Tally {
                latency: histogram(),
                errors: BTreeMap::new(),
                samples: BTreeMap::new(),
            };
            let mut i = 0u64;
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let written = keyspace.put(&key, value(writer, i, size)).await;
                i += 1;
                if began < start {
                    continue;
                }
                match written {
                    Ok(_) => {
                        let us = began.elapsed().as_micros() as u64;
                        tally.latency.saturating_record(us.max(1));
                    }
                    Err(err) => {
                        let kind = err.kind().to_owned();
                        *tally.errors.entry(kind.clone()).or_default() += 1;
                        tally.samples.entry(kind).or_insert_with(|| err.to_string());
                    }
                }
            }
            tally
        });
    }
    let mut latency = histogram();
    let mut errors = BTreeMap::new();
    let mut error_samples = BTreeMap::new();
    while let Some(tally) = tasks.join_next().await {
        let tally = tally.context("a writer task panicked")?;
        latency.add(&tally.latency).context("merging histograms")?;
        for (kind, n) in tally.errors {
            *errors.entry(kind).or_default() += n;
        }
        error_samples.extend(tally.samples);
    }
    let seconds = options.duration.as_secs_f64();
    let failed: u64 = errors.values().sum();
    let attempted = latency.len() + failed;

    let mut distinct = keys.clone();
    distinct.dedup();
    let inconsistent_keys = audit(&client, &store, &distinct).await?;
    drop(nodes);
    Ok(ContentionResult {
        writers: options.writers,
        same_key: options.same_key,
        nodes: options.nodes,
        replicas: options.replicas,
        seconds,
        writes_per_s: latency.len() as f64 / seconds,
        latency: LatencyMs::of(&latency),
        errors,
        error_ratio: if attempted == 0 {
            0.0
        } else {
            failed as f64 / attempted as f64
        },
        error_samples,
        inconsistent_keys,
    })
}

/// A `size`-byte value naming its writer and write.
fn value(writer: usize, i: u64, size: usize) -> Bytes {
    let mut value = format!("{writer:04}-{i:010}").into_bytes();
    value.resize(size.max(value.len()), b'v');
    Bytes::from(value)
}

/// Waits (at most [`AUDIT_TIMEOUT`]) until every key's cached value is
/// absent or equal to its row; returns how many still differ.
async fn audit(client: &Client, store: &PgStore, keys: &[String]) -> Result<usize> {
    let give_up = Instant::now() + AUDIT_TIMEOUT;
    loop {
        let mut differ = 0;
        for key in keys {
            let cached = client.get(KEYSPACE, key).await?.map(|e| e.version);
            let stored = match store.load(KEYSPACE, key.as_bytes()).await? {
                Loaded::Present(row) => Some(row.version),
                Loaded::Absent { .. } => None,
            };
            if cached.is_some() && cached != stored {
                differ += 1;
            }
        }
        if differ == 0 || Instant::now() >= give_up {
            return Ok(differ);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

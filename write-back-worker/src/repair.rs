//! The safety net for dirty entries whose `MarkClean` was lost: the worker
//! crashed between a batch's commit and telling the nodes, or a node was
//! unreachable then. Such an entry would stay dirty (unevictable, counted
//! against `max_dirty_bytes`) until its key is written again.
//!
//! Every `dirty_repair_interval`, the worker lists each node's dirty
//! entries of its keyspaces that are at least that old, looks their keys up
//! in the store, and marks clean those whose version the store holds (or a
//! newer one). An entry the store does not have yet stays dirty: that is a
//! write still on its way, which this never touches.

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;
use cache_client::store::{Loaded, PgStore, Store};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics as m;

/// Most store lookups per keyspace and round, so that a long backlog (many
/// old dirty entries, legitimately unstored) does not flood the database.
const MAX_LOOKUPS_PER_ROUND: usize = 10_000;

/// Runs repair rounds every `interval` until `stop` is cancelled.
pub(crate) async fn run(
    cache: crate::worker::CacheSlot,
    store: PgStore,
    keyspaces: Vec<String>,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let Some(cache) = cache.get() else {
            continue;
        };
        for keyspace in &keyspaces {
            if stop.is_cancelled() {
                return;
            }
            let repaired = round(cache, &store, keyspace, interval).await;
            if repaired > 0 {
                info!(
                    keyspace,
                    repaired, "marked clean dirty entries whose MarkClean was lost"
                );
            }
        }
    }
}

/// One round over one keyspace; returns how many entries became clean.
async fn round(
    cache: &cache_client::Client,
    store: &PgStore,
    keyspace: &str,
    min_age: Duration,
) -> usize {
    // The newest dirty version per key over all nodes (replicas may hold
    // different ones).
    let mut dirty: HashMap<Bytes, u64> = HashMap::new();
    for (key, version) in cache.dirty_entries(keyspace, min_age).await {
        let slot = dirty.entry(key).or_default();
        *slot = (*slot).max(version);
    }
    let mut stored = Vec::new();
    for (key, version) in dirty.into_iter().take(MAX_LOOKUPS_PER_ROUND) {
        let held = match store.load(keyspace, &key).await {
            Ok(Loaded::Present(row)) => row.version,
            Ok(Loaded::Absent { version }) => version,
            Err(err) => {
                debug!(keyspace, error = %err, "dirty repair: store lookup failed; next round");
                break;
            }
        };
        if held >= version {
            stored.push((key, version));
        }
    }
    if stored.is_empty() {
        return 0;
    }
    let cleaned = cache.mark_clean(keyspace, &stored).await;
    if cleaned < stored.len() {
        warn!(
            keyspace,
            stored = stored.len(),
            cleaned,
            "dirty repair: some nodes did not mark their entries clean"
        );
    }
    metrics::counter!(m::DIRTY_REPAIRED_TOTAL).increment(cleaned as u64);
    cleaned
}

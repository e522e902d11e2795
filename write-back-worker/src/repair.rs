//! The safety net for dirty entries whose `MarkClean` was lost: the worker
//! crashed between a batch's commit and telling the nodes, or a node was
//! unreachable then. Such an entry would stay dirty (unevictable, counted
//! against `max_dirty_bytes`) until its key is written again.
//!
//! Every `dirty_repair_interval`, the worker lists each node's dirty
//! entries of its keyspaces that are at least that old, looks their keys up
//! in the store, and tells the node the version the store holds when it is
//! the entry's or a newer one (`MarkClean`: the entry becomes clean, or is
//! dropped when the store has moved past it). An entry the store does not
//! have yet is a write still on its way, which this never touches, unless
//! the worker dead-lettered that very version (`ringcache_wb_discarded`):
//! the store will never hold it, so the entry is discarded, instead of
//! staying dirty, unevictable and served, forever.

use std::{collections::HashMap, time::Duration};

use bytes::Bytes;
use cache_client::store::{Loaded, PgStore, Store};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

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
    // Each node is told about its own entries: a dirty entry may sit on a
    // node that is no longer among the key's owners (a write that fell back
    // further along the ring), where `mark_clean` by key would not look.
    let mut cleaned = 0;
    let mut lookups = 0;
    let mut known: HashMap<Bytes, u64> = HashMap::new();
    'nodes: for (node, entries) in cache.dirty_entries(keyspace, min_age).await {
        let mut stored = Vec::new();
        let mut unstored = Vec::new();
        for (key, version) in entries {
            let held = match known.get(&key) {
                Some(held) => *held,
                None if lookups >= MAX_LOOKUPS_PER_ROUND => break,
                None => {
                    lookups += 1;
                    let held = match store.load(keyspace, &key).await {
                        Ok(Loaded::Present(row)) => row.version,
                        Ok(Loaded::Absent { version }) => version,
                        Err(err) => {
                            debug!(keyspace, error = %err, "dirty repair: store lookup failed; next round");
                            break 'nodes;
                        }
                    };
                    known.insert(key.clone(), held);
                    held
                }
            };
            if held >= version {
                // The held version: an older entry is dropped, not made
                // clean with a value the store has superseded.
                stored.push((key, held));
                continue;
            }
            if lookups >= MAX_LOOKUPS_PER_ROUND {
                break;
            }
            lookups += 1;
            match store.is_discarded_write(keyspace, &key, version).await {
                Ok(true) => unstored.push((key, version)),
                Ok(false) => {}
                Err(err) => {
                    debug!(keyspace, error = %err, "dirty repair: discarded-write lookup failed; next round");
                    break 'nodes;
                }
            }
        }
        if !unstored.is_empty() {
            let done = cache.discard_on(&node, keyspace, &unstored).await;
            debug!(
                keyspace,
                node,
                discarded = done,
                "dirty repair: dead-lettered writes discarded"
            );
            cleaned += done;
        }
        if stored.is_empty() {
            continue;
        }
        let done = cache.mark_clean_on(&node, keyspace, &stored).await;
        if done < stored.len() {
            // A newer dirty write replaced the entry meanwhile, or the node
            // did not answer; the next round looks again.
            debug!(
                keyspace,
                node,
                stored = stored.len(),
                cleaned = done,
                "dirty repair: not every stored entry became clean"
            );
        }
        cleaned += done;
    }
    metrics::counter!(m::DIRTY_REPAIRED_TOTAL).increment(cleaned as u64);
    cleaned
}

//! The node's domain core: keyspaces of versioned entries, each in a
//! byte-bounded compact table ([`crate::table`]). Nothing here knows about
//! gRPC; the transport converts its messages to these types and back.
//!
//! A key has at most one entry in its keyspace's table: clean (evictable,
//! expiring) or dirty (a write-back value not yet in the store: never
//! evicted, never expiring, within `max_dirty_bytes`). Beside the table,
//! each keyspace keeps a small table of *records*: per-key coordination
//! state for leases (the memcache paper's fix for thundering herds and stale
//! sets), for 2PC pending changes (write-through), for changes in doubt and
//! for recently deleted "stale" values. A key has a record only while it has
//! a lease, a pending change, a fence or a stale value; see `KeyState`.
//!
//! One file per mechanism: `records.rs` (the records table and what a
//! record holds), `tokens.rs` (lease tokens), `entries.rs` (a keyspace's
//! operations on its table entries: conditions, version fences, dirty
//! entries), `keyspace.rs` (a keyspace's operations: leases, 2PC, stale
//! values, flush, stats, over the two), and this facade (the types, the
//! keyspaces, validation).
//!
//! # Invariants
//! - **A version-fenced write never replaces an entry of an equal or newer
//!   version.** The check and the store happen in one `Table::compute` call,
//!   under the key's shard lock, so two racing writes cannot both pass the
//!   check.
//! - **An expired entry is never returned**: the table compares an entry's
//!   expiry with the caller's clock under the shard lock.
//! - **A keyspace's clean entries and its index stay within its capacity**,
//!   counted as glibc's malloc charges their allocations (the table's
//!   accounting), when every call returns.
//! - **A fill never lands after a write that invalidated its lease.** The
//!   lease check and the store happen under the key's record lock (the
//!   records table's shard lock, via `Records::update`); every write of a
//!   keyspace that has records takes the same lock, drops the lease and does
//!   its own table operation before releasing it. See `Keyspace::set` for
//!   why a keyspace with no records may skip the lock.
//! - **A pending change is never visible to readers**; it lives in the
//!   record, not in the table, until it is committed.
//! - **A pending change that timed out stays in doubt** (`Fence`) for
//!   `limits.in_doubt_ttl`: its writer's database may still commit it, so
//!   no fill, `IF_NEWER_VERSION` clean write or prepare of an older version
//!   lands meanwhile, and a late commit of it still applies.
//! - **A dirty (write-back) entry is never evicted** and does not expire
//!   while dirty (the table's promise), within `max_dirty_bytes`, until
//!   `mark_clean` makes it clean (its exact version stored: evictable, its
//!   TTL counted from then) or drops it (a newer version stored), or
//!   `discard` removes its exact version (dead-lettered, never stored). A
//!   clean write of an equal or older version never replaces a dirty entry.
//! - **Lock order: records shard, then table shard.** Nothing takes a
//!   records lock while holding a table shard lock (closures passed to the
//!   table only read their arguments and bump counters), and the table
//!   never holds two of its shard locks at once, so they cannot deadlock.

mod entries;
mod keyspace;
mod records;
#[cfg(test)]
mod tests;
mod tokens;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;

use crate::config::{Config, KeyspaceConfig, Limits, UnknownKeyspaces, validate_keyspace_name};
use crate::error::{Error, Result};

pub use keyspace::Keyspace;
use tokens::Tokens;

/// What one small entry costs beyond its key and value, as the table
/// accounts it (`capacity_bytes` counts it, and the allocator charges it):
/// the entry's 20-byte header and malloc's chunk header and rounding, plus
/// its index slot (a 16-byte pointer and a control byte at hashbrown's load
/// factor). Averaged over 11-byte keys and 100-byte values at the table's
/// mean load (`entry_overhead_is_what_the_table_charges` measures it); for
/// planning only: capacity is enforced by the table's exact accounting.
pub const ENTRY_OVERHEAD_BYTES: u64 = 56;

/// Stale values (kept by `keep_stale_for`) live outside the byte-bounded
/// table; a keyspace keeps at most `capacity_bytes / STALE_BUDGET_DIVISOR`
/// bytes of them and simply keeps no more beyond that.
pub const STALE_BUDGET_DIVISOR: u64 = 8;

/// Dirty (write-back) entries are bounded apart from clean ones; unless
/// `max_dirty_bytes` says otherwise, a keyspace holds at most
/// `capacity_bytes / DIRTY_BUDGET_DIVISOR` bytes of them.
pub const DIRTY_BUDGET_DIVISOR: u64 = 4;

/// Longest transaction id a `Prepare` may carry.
pub const MAX_TXN_ID_BYTES: usize = 256;

/// What a read returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    /// The value, copied out of the keyspace's table (which keeps key,
    /// header and value in one allocation, so a read cannot share it).
    pub value: Bytes,
    /// The writer's version.
    pub version: u64,
    /// Time left until expiry; `None` when the entry never expires.
    pub ttl_remaining: Option<Duration>,
}

/// When a write stores its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WriteCondition {
    /// Always.
    #[default]
    Unconditional,
    /// Only if no live entry exists.
    IfAbsent,
    /// Only if no live entry exists or the new version is strictly greater.
    IfNewerVersion,
    /// Only if a live entry exists (RESP's `SET ... XX`; gRPC has no such
    /// condition).
    IfPresent,
}

/// One write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetItem {
    /// The key.
    pub key: Bytes,
    /// The value.
    pub value: Bytes,
    /// The writer's version.
    pub version: u64,
    /// The TTL; `None` takes the keyspace default.
    pub ttl: Option<Duration>,
    /// When to store.
    pub condition: WriteCondition,
    /// Write-back: the value is not yet in the keyspace's store, so the
    /// node keeps it as a dirty entry until [`Store::mark_clean`] names its
    /// version. Ignored by fills and prepares.
    pub dirty: bool,
}

/// What a write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetOutcome {
    /// Stored; `current_version` is the new version.
    Stored,
    /// Refused: a live entry exists (`IfAbsent`).
    Exists,
    /// Refused: the stored version is equal or newer (`IfNewerVersion`).
    StaleVersion,
    /// Refused: no live entry exists (`IfPresent`).
    Missing,
}

/// The result of one write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetResult {
    /// What happened.
    pub outcome: SetOutcome,
    /// The version stored for the key afterwards.
    pub current_version: u64,
}

/// Counters and sizes of one keyspace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyspaceStats {
    /// Keyspace name.
    pub name: String,
    /// Reads that found a live entry.
    pub hits: u64,
    /// Reads that found nothing.
    pub misses: u64,
    /// Writes that stored.
    pub sets: u64,
    /// Writes refused by their condition.
    pub sets_refused: u64,
    /// Deletes that removed a live entry.
    pub deletes: u64,
    /// Entries evicted for space.
    pub evictions: u64,
    /// Entries removed by TTL.
    pub expirations: u64,
    /// Clean entries held now (dirty ones are `dirty_items`).
    pub items: u64,
    /// Heap bytes of the clean entries and the index now.
    pub bytes: u64,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// Default TTL.
    pub default_ttl: Option<Duration>,
    /// `LeaseGet` misses handed a lease.
    pub leases_granted: u64,
    /// `LeaseGet` misses told to wait.
    pub lease_waits: u64,
    /// Fills that stored.
    pub fills_stored: u64,
    /// Fills refused (invalid lease or stale version).
    pub fills_refused: u64,
    /// Prepares that recorded a pending change.
    pub prepares: u64,
    /// Commits that applied a pending change.
    pub commits: u64,
    /// Aborts that dropped a pending change.
    pub aborts: u64,
    /// Pending changes that timed out (each deleted the live entry).
    pub pending_timeouts: u64,
    /// Dirty (write-back) entries held now.
    pub dirty_items: u64,
    /// Heap bytes of the dirty entries held now.
    pub dirty_bytes: u64,
    /// The bound on `dirty_bytes`.
    pub max_dirty_bytes: u64,
    /// Dirty writes refused for `max_dirty_bytes`.
    pub dirty_refused: u64,
}

/// What `LeaseGet` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseRead {
    /// A live entry.
    Hit(Hit),
    /// A miss; the caller now holds the key's lease and should load the value
    /// and [`Store::fill`] it with this token (never 0).
    Granted {
        /// The lease token.
        token: u64,
    },
    /// A miss while another caller holds the lease or a change is pending.
    Wait {
        /// How long the caller should wait before asking again.
        retry_after: Duration,
        /// The value most recently deleted, if the keyspace keeps stale
        /// values and it is still within its window.
        stale: Option<Hit>,
    },
}

/// What a fill did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillOutcome {
    /// Stored, and the lease released.
    Stored,
    /// Refused: the token is not the key's current, unexpired lease, or a
    /// change is pending.
    LeaseInvalid,
    /// Refused: a live entry of an equal or newer version exists; the lease
    /// is released.
    StaleVersion,
}

/// The result of one fill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FillResult {
    /// What happened.
    pub outcome: FillOutcome,
    /// The live version afterwards; 0 when no entry is live.
    pub current_version: u64,
}

/// A 2PC change to record as pending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepare {
    /// Key, value, version and TTL; the condition is ignored (a commit is
    /// always fenced against the live version). The TTL counts from the
    /// commit.
    pub item: SetItem,
    /// The change is a deletion; `item.value` and `item.ttl` are ignored.
    pub delete: bool,
    /// The writer's transaction id.
    pub txn_id: String,
    /// How long the change may stay pending; `None` means
    /// `limits.max_pending_timeout`, and more than that is refused.
    pub timeout: Option<Duration>,
}

/// The result of a prepare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareResult {
    /// Recorded (or already recorded by the same transaction).
    pub prepared: bool,
    /// The live version; 0 when absent.
    pub current_version: u64,
    /// Refused because another transaction's change is pending on the key
    /// (or, for a prepare that queued, other prepares are ahead of it).
    pub busy: bool,
    /// The transaction of a change of the key that timed out here and is
    /// still in doubt (`PrepareResponse.in_doubt_txn_id`), whatever the
    /// prepare's outcome.
    pub in_doubt: Option<String>,
}

/// One step of a prepare that may wait its turn
/// ([`Store::prepare_in_turn`]).
#[derive(Debug)]
pub enum PrepareStep {
    /// Prepared or refused; the prepare is over.
    Done(PrepareResult),
    /// Another change is pending or others are ahead: wait, then take the
    /// step again with the same ticket.
    Wait {
        /// Told when the ticket's turn comes; `None` when the ticket was
        /// already waiting (the receiver it got then stays valid).
        woken: Option<tokio::sync::oneshot::Receiver<()>>,
        /// When the pending change times out, if one is pending: take the
        /// step again then, whether woken or not.
        pending_until: Option<Instant>,
    },
}

/// The result of a commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommitResult {
    /// The transaction's pending change existed and was applied (subject to
    /// the version fence).
    pub committed: bool,
    /// The live version afterwards; 0 when absent.
    pub current_version: u64,
}

/// A keyspace's counters; evictions and expirations are the table's.
#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    sets: AtomicU64,
    sets_refused: AtomicU64,
    deletes: AtomicU64,
    leases_granted: AtomicU64,
    lease_waits: AtomicU64,
    fills_stored: AtomicU64,
    fills_refused: AtomicU64,
    prepares: AtomicU64,
    commits: AtomicU64,
    aborts: AtomicU64,
    pending_timeouts: AtomicU64,
    dirty_refused: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    // Counters are statistics, not synchronisation: relaxed is enough.
    counter.fetch_add(by, Ordering::Relaxed);
}

/// All keyspaces of a node, with the request limits.
pub struct Store {
    keyspaces: DashMap<String, Arc<Keyspace>>,
    limits: Limits,
    unknown: UnknownKeyspaces,
    created: KeyspaceConfig,
    tokens: Tokens,
    /// Tickets of prepares that wait their turn.
    tickets: AtomicU64,
}

impl Store {
    /// Builds the store with the configured keyspaces.
    pub fn new(config: &Config) -> Self {
        let keyspaces = DashMap::new();
        for (name, keyspace) in &config.keyspaces {
            keyspaces.insert(
                name.clone(),
                Arc::new(Keyspace::new(
                    name,
                    keyspace.clone(),
                    config.limits.in_doubt_ttl,
                )),
            );
        }
        Store {
            keyspaces,
            limits: config.limits.clone(),
            unknown: config.unknown_keyspaces,
            created: config.created_keyspaces.clone(),
            tokens: Tokens::new(),
            tickets: AtomicU64::new(1),
        }
    }

    /// The request limits this store enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Finds a keyspace, creating it when the policy says so.
    ///
    /// # Errors
    /// [`Error::UnknownKeyspace`] under the `reject` policy,
    /// [`Error::InvalidKeyspaceName`] and [`Error::TooManyKeyspaces`] when
    /// creating.
    pub fn keyspace(&self, name: &str) -> Result<Arc<Keyspace>> {
        // Fast path: clone the Arc and drop the shard guard at once.
        if let Some(keyspace) = self.keyspaces.get(name) {
            return Ok(Arc::clone(&keyspace));
        }
        match self.unknown {
            UnknownKeyspaces::Reject => Err(Error::UnknownKeyspace {
                name: name.to_owned(),
            }),
            UnknownKeyspaces::Create => {
                validate_keyspace_name(name).map_err(|reason| Error::InvalidKeyspaceName {
                    name: name.to_owned(),
                    reason,
                })?;
                // The count check and the insert are not one atomic step, so
                // racing creations may overshoot the limit by the number of
                // racers; the limit guards memory, not an exact count.
                if self.keyspaces.len() >= self.limits.max_keyspaces {
                    return Err(Error::TooManyKeyspaces {
                        name: name.to_owned(),
                        max: self.limits.max_keyspaces,
                    });
                }
                let keyspace = self
                    .keyspaces
                    .entry(name.to_owned())
                    .or_insert_with(|| {
                        tracing::info!(keyspace = name, "creating keyspace on demand");
                        Arc::new(Keyspace::new(
                            name,
                            self.created.clone(),
                            self.limits.in_doubt_ttl,
                        ))
                    })
                    .clone();
                Ok(keyspace)
            }
        }
    }

    /// True when the keyspace exists now (never creates it).
    pub fn has_keyspace(&self, name: &str) -> bool {
        self.keyspaces.contains_key(name)
    }

    /// The keyspace if it exists now (never creates it). Keyspaces are
    /// never removed, so a transport may keep the handle.
    pub fn existing_keyspace(&self, name: &str) -> Option<Arc<Keyspace>> {
        self.keyspaces
            .get(name)
            .map(|keyspace| Arc::clone(&keyspace))
    }

    /// Checks a key against the limits, as every operation does.
    ///
    /// # Errors
    /// [`Error::EmptyKey`], [`Error::KeyTooLarge`].
    pub fn check_key(&self, key: &[u8]) -> Result<()> {
        if key.is_empty() {
            return Err(Error::EmptyKey);
        }
        if key.len() > self.limits.max_key_bytes {
            return Err(Error::KeyTooLarge {
                len: key.len(),
                max: self.limits.max_key_bytes,
            });
        }
        Ok(())
    }

    /// Checks a write against the limits, as [`Store::set`] does, so that a
    /// transport can refuse a batch spanning keyspaces before writing any.
    ///
    /// # Errors
    /// Invalid key, value or TTL.
    pub fn check_item(&self, item: &SetItem) -> Result<()> {
        self.check_key(&item.key)?;
        if item.value.len() > self.limits.max_value_bytes {
            return Err(Error::ValueTooLarge {
                len: item.value.len(),
                max: self.limits.max_value_bytes,
            });
        }
        if let Some(ttl) = item.ttl {
            self.check_ttl(ttl)?;
        }
        Ok(())
    }

    fn check_ttl(&self, ttl: Duration) -> Result<()> {
        if ttl > self.limits.max_ttl {
            return Err(Error::TtlOutOfRange {
                ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
                max_ms: u64::try_from(self.limits.max_ttl.as_millis()).unwrap_or(u64::MAX),
            });
        }
        Ok(())
    }

    fn check_txn_id(txn_id: &str) -> Result<()> {
        if txn_id.is_empty() {
            return Err(Error::EmptyTxnId);
        }
        if txn_id.len() > MAX_TXN_ID_BYTES {
            return Err(Error::TxnIdTooLong {
                len: txn_id.len(),
                max: MAX_TXN_ID_BYTES,
            });
        }
        Ok(())
    }

    fn check_batch(&self, len: usize) -> Result<()> {
        if len > self.limits.max_batch_keys {
            return Err(Error::BatchTooLarge {
                len,
                max: self.limits.max_batch_keys,
            });
        }
        Ok(())
    }

    /// Reads one key.
    ///
    /// # Errors
    /// Invalid key or unknown keyspace.
    pub fn get(&self, keyspace: &str, key: &[u8]) -> Result<Option<Hit>> {
        self.check_key(key)?;
        Ok(self.keyspace(keyspace)?.get(key, Instant::now()))
    }

    /// [`Store::get`] in a keyspace the caller has resolved (with
    /// [`Store::keyspace`] or [`Store::existing_keyspace`]), at `now`: the
    /// RESP path resolves once per key and reads its clock once per
    /// command.
    ///
    /// # Errors
    /// Invalid key.
    pub fn get_in(&self, keyspace: &Keyspace, key: &[u8], now: Instant) -> Result<Option<Hit>> {
        self.check_key(key)?;
        Ok(keyspace.get(key, now))
    }

    /// [`Store::set`] in a keyspace the caller has resolved, at `now`.
    ///
    /// # Errors
    /// As [`Store::set`].
    pub fn set_in(&self, keyspace: &Keyspace, item: SetItem, now: Instant) -> Result<SetResult> {
        self.check_item(&item)?;
        keyspace.set(item, now)
    }

    /// Writes one key under its condition.
    ///
    /// A dirty item ([`SetItem::dirty`]) is kept, not cached: it is never
    /// evicted and does not expire until [`Store::mark_clean`] names its
    /// version, and it fences clean writes of equal or older versions.
    ///
    /// # Errors
    /// Invalid key, value or TTL, or unknown keyspace; nothing is written.
    /// [`Error::DirtyBytesExhausted`] when a dirty item would take the
    /// keyspace beyond `max_dirty_bytes`; nothing is written.
    pub fn set(&self, keyspace: &str, item: SetItem) -> Result<SetResult> {
        self.check_item(&item)?;
        self.keyspace(keyspace)?.set(item, Instant::now())
    }

    /// Sets the TTL of the key's live entry to `ttl` from now, keeping its
    /// value and version; false when no entry is live. See
    /// [`Keyspace::expire`] for dirty entries.
    ///
    /// # Errors
    /// Invalid key, a TTL above `max_ttl`, or unknown keyspace.
    pub fn expire(&self, keyspace: &str, key: &[u8], ttl: Duration) -> Result<bool> {
        self.check_key(key)?;
        self.check_ttl(ttl)?;
        Ok(self.keyspace(keyspace)?.expire(key, ttl, Instant::now()))
    }

    /// Adds `delta` to the key's integer value (absent counts as 0), in one
    /// atomic step per key; returns the new value. The entry keeps its
    /// version and expiry.
    ///
    /// # Errors
    /// Invalid key or unknown keyspace; [`Error::NotAnInteger`],
    /// [`Error::IncrementOverflow`] or [`Error::DirtyEntry`] (nothing
    /// changes).
    pub fn incr(&self, keyspace: &str, key: &[u8], delta: i64) -> Result<i64> {
        self.check_key(key)?;
        self.keyspace(keyspace)?.incr(key, delta, Instant::now())
    }

    /// Deletes one key; true when a live entry was removed.
    ///
    /// # Errors
    /// Invalid key or unknown keyspace.
    pub fn delete(&self, keyspace: &str, key: &[u8]) -> Result<bool> {
        self.check_key(key)?;
        Ok(self.keyspace(keyspace)?.delete(key, Instant::now()))
    }

    /// Deletes one key's live entry if it is older than `version`, and drops
    /// its lease in any case; true when an entry was removed.
    ///
    /// # Errors
    /// Invalid key or unknown keyspace.
    pub fn delete_below(&self, keyspace: &str, key: &[u8], version: u64) -> Result<bool> {
        self.check_key(key)?;
        Ok(self
            .keyspace(keyspace)?
            .delete_below(key, version, Instant::now()))
    }

    /// Deletes the key's entry only if it is of exactly `version` (dirty or
    /// cached); true when one was removed. See `DeleteRequest.only_version`.
    ///
    /// # Errors
    /// Invalid key or unknown keyspace.
    pub fn discard(&self, keyspace: &str, key: &[u8], version: u64) -> Result<bool> {
        self.check_key(key)?;
        Ok(self
            .keyspace(keyspace)?
            .discard(key, version, Instant::now()))
    }

    /// Reads many keys; results in request order.
    ///
    /// # Errors
    /// Too many keys, any invalid key, or unknown keyspace; nothing is read.
    pub fn multi_get(&self, keyspace: &str, keys: &[Bytes]) -> Result<Vec<Option<Hit>>> {
        self.check_batch(keys.len())?;
        keys.iter().try_for_each(|key| self.check_key(key))?;
        let keyspace = self.keyspace(keyspace)?;
        let now = Instant::now();
        Ok(keys.iter().map(|key| keyspace.get(key, now)).collect())
    }

    /// Writes many keys, each under its own condition; results in request
    /// order. Validation covers the whole batch before anything is written.
    ///
    /// # Errors
    /// Too many items, any invalid item, or unknown keyspace; nothing is
    /// written. [`Error::DirtyBytesExhausted`] when the batch's dirty items
    /// would take the keyspace beyond `max_dirty_bytes`: checked for the
    /// whole batch before anything is written, so nothing is; only racing
    /// dirty writes can make a later item fail after earlier ones were
    /// stored (the batch is not atomic; retrying it is safe, writes are
    /// versioned).
    pub fn multi_set(&self, keyspace: &str, items: Vec<SetItem>) -> Result<Vec<SetResult>> {
        self.check_batch(items.len())?;
        items.iter().try_for_each(|item| self.check_item(item))?;
        let keyspace = self.keyspace(keyspace)?;
        let after = keyspace.dirty_bytes_after(&items);
        if after > keyspace.max_dirty_bytes {
            bump(&keyspace.counters.dirty_refused, 1);
            return Err(Error::DirtyBytesExhausted {
                keyspace: keyspace.name.clone(),
                bytes: after,
                max: keyspace.max_dirty_bytes,
            });
        }
        let now = Instant::now();
        items
            .into_iter()
            .map(|item| keyspace.set(item, now))
            .collect()
    }

    /// `MarkClean`: the write-back worker stored `version` of each key. A
    /// dirty entry of exactly that version becomes a clean cached entry
    /// (evictable, its TTL counted from now); a dirty or cached entry of an
    /// older version is dropped (the store holds a newer value); newer
    /// entries stay as they are. The key's lease is invalidated. Returns how
    /// many entries became clean or were dropped.
    ///
    /// # Errors
    /// Too many keys, any invalid key, or unknown keyspace; nothing changes.
    pub fn mark_clean(&self, keyspace: &str, keys: &[(Bytes, u64)]) -> Result<usize> {
        self.check_batch(keys.len())?;
        keys.iter().try_for_each(|(key, _)| self.check_key(key))?;
        let keyspace = self.keyspace(keyspace)?;
        let now = Instant::now();
        Ok(keys
            .iter()
            .filter(|(key, version)| keyspace.mark_clean(key, *version, now))
            .count())
    }

    /// The keyspace's dirty entries written at least `min_age` ago, in key
    /// order after `after` (empty: from the start), at most `limit` (capped
    /// by `max_batch_keys`); and whether more follow. The write-back worker
    /// repairs with it the entries whose `MarkClean` was lost.
    ///
    /// # Errors
    /// Unknown keyspace.
    pub fn list_dirty(
        &self,
        keyspace: &str,
        min_age: Duration,
        after: &[u8],
        limit: usize,
    ) -> Result<(Vec<(Bytes, u64)>, bool)> {
        let limit = limit.clamp(1, self.limits.max_batch_keys);
        Ok(self
            .keyspace(keyspace)?
            .list_dirty(min_age, after, limit, Instant::now()))
    }

    /// Reads one key; on a miss, hands out the key's lease or says to wait.
    /// See [`LeaseRead`].
    ///
    /// # Errors
    /// Invalid key or unknown keyspace.
    pub fn lease_get(&self, keyspace: &str, key: &[u8]) -> Result<LeaseRead> {
        self.check_key(key)?;
        Ok(self
            .keyspace(keyspace)?
            .lease_get(key, Instant::now(), &self.tokens))
    }

    /// Stores a value loaded under the lease `token`, if that lease is still
    /// the key's current one and the value is newer than any live entry.
    /// `item.condition` is ignored.
    ///
    /// # Consistency
    /// A fill never lands after a `Set`, `Delete`, `Prepare` or `Flush` that
    /// touched the key after the lease was granted: those invalidate the
    /// lease atomically with respect to the fill's check and store.
    ///
    /// # Errors
    /// Invalid key, value or TTL, or unknown keyspace; nothing is written.
    pub fn fill(&self, keyspace: &str, item: SetItem, token: u64) -> Result<FillResult> {
        self.check_item(&item)?;
        Ok(self.keyspace(keyspace)?.fill(item, token, Instant::now()))
    }

    /// Hands the lease `token` on `key` back unused (its holder's load
    /// failed), so that the next `LeaseGet` is granted it at once; false
    /// when `token` is not the key's current lease.
    ///
    /// # Errors
    /// Invalid key, or unknown keyspace.
    pub fn release_lease(&self, keyspace: &str, key: &[u8], token: u64) -> Result<bool> {
        self.check_key(key)?;
        Ok(self
            .keyspace(keyspace)?
            .release_lease(key, token, Instant::now()))
    }

    /// Records a pending 2PC change; see [`Prepare`]. No timeout means
    /// `limits.max_pending_timeout`.
    ///
    /// # Consistency
    /// Readers keep seeing the committed entry (or a miss) until `commit`. A
    /// change neither committed nor aborted by its deadline is dropped and
    /// the key's live entry deleted, by the next access or the sweeper
    /// ([`Store::expire_pending`]), whichever comes first.
    ///
    /// # Errors
    /// Invalid key, value, TTL or transaction id, a timeout above
    /// `limits.max_pending_timeout`, or unknown keyspace.
    pub fn prepare(&self, keyspace: &str, prepare: Prepare) -> Result<PrepareResult> {
        let timeout = self.check_prepare(&prepare)?;
        Ok(self
            .keyspace(keyspace)?
            .prepare(&prepare, timeout, Instant::now()))
    }

    /// Validates a prepare; its pending timeout.
    fn check_prepare(&self, prepare: &Prepare) -> Result<Duration> {
        if prepare.delete {
            self.check_key(&prepare.item.key)?;
        } else {
            self.check_item(&prepare.item)?;
        }
        Self::check_txn_id(&prepare.txn_id)?;
        let cap = self.limits.max_pending_timeout;
        let timeout = prepare.timeout.unwrap_or(cap);
        if timeout > cap {
            return Err(Error::PendingTimeoutOutOfRange {
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                max_ms: u64::try_from(cap.as_millis()).unwrap_or(u64::MAX),
            });
        }
        Ok(timeout)
    }

    /// The longest a `Prepare` may wait its turn (`limits.max_prepare_wait`).
    pub fn max_prepare_wait(&self) -> Duration {
        self.limits.max_prepare_wait
    }

    /// A fresh ticket for [`Store::prepare_in_turn`].
    pub fn ticket(&self) -> u64 {
        self.tickets.fetch_add(1, Ordering::Relaxed)
    }

    /// One step of a prepare that waits its turn behind another pending
    /// change of the key, in arrival order, instead of being refused at
    /// once: [`PrepareStep::Wait`] while `may_wait` and the key is busy;
    /// the caller waits (outside every lock) until woken or until the
    /// pending change's deadline, then takes the step again with the same
    /// `ticket`. Once `may_wait` is false, a prepare that still cannot run
    /// is refused as busy. A caller that gives up between steps calls
    /// [`Store::leave_queue`], so that its place (or its turn) passes on.
    ///
    /// # Errors
    /// As [`Store::prepare`].
    pub fn prepare_in_turn(
        &self,
        keyspace: &str,
        prepare: &Prepare,
        ticket: u64,
        may_wait: bool,
    ) -> Result<PrepareStep> {
        let timeout = self.check_prepare(prepare)?;
        Ok(self.keyspace(keyspace)?.prepare_step(
            prepare,
            timeout,
            Some((ticket, may_wait)),
            Instant::now(),
        ))
    }

    /// The prepare holding `ticket` stops waiting for `key`'s turn.
    pub fn leave_queue(&self, keyspace: &str, key: &[u8], ticket: u64) {
        if let Ok(keyspace) = self.existing(Some(keyspace))
            && let Some(keyspace) = keyspace.first()
        {
            keyspace.leave_queue(key, ticket);
        }
    }

    /// Applies the pending change `txn_id` prepared on `key`, fenced against
    /// the live version. `committed` is false when no such change is pending.
    ///
    /// # Errors
    /// Invalid key or transaction id, or unknown keyspace.
    pub fn commit(&self, keyspace: &str, key: &[u8], txn_id: &str) -> Result<CommitResult> {
        self.check_key(key)?;
        Self::check_txn_id(txn_id)?;
        Ok(self.keyspace(keyspace)?.commit(key, txn_id, Instant::now()))
    }

    /// Drops the pending change `txn_id` prepared on `key`, leaving the live
    /// entry alone; false when no such change is pending.
    ///
    /// # Errors
    /// Invalid key or transaction id, or unknown keyspace.
    pub fn abort(&self, keyspace: &str, key: &[u8], txn_id: &str) -> Result<bool> {
        self.check_key(key)?;
        Self::check_txn_id(txn_id)?;
        Ok(self.keyspace(keyspace)?.abort(key, txn_id, Instant::now()))
    }

    /// Times out every pending change whose deadline is at or before `now`
    /// (deleting the key's live entry), and drops expired leases and stale
    /// values, in every keyspace. Returns the number of changes timed out.
    /// Synchronous and cheap for keyspaces without records; the node's
    /// sweeper task calls it periodically so that expiry happens even for
    /// keys nobody touches again.
    pub fn expire_pending(&self, now: Instant) -> usize {
        let keyspaces = self
            .existing(None)
            .expect("listing all keyspaces names none, so it cannot fail");
        keyspaces.iter().map(|k| k.sweep(now)).sum()
    }

    /// Active expiry: removes expired entries nobody reads, sampling each
    /// keyspace's table (a bounded walk per call that goes on while a
    /// quarter of the entries it meets have expired). Returns the number
    /// removed. The node's sweeper calls it with [`Store::expire_pending`],
    /// so that memory held by expired entries comes back without reads.
    pub fn expire_entries(&self, now: Instant) -> usize {
        let keyspaces = self
            .existing(None)
            .expect("listing all keyspaces names none, so it cannot fail");
        keyspaces.iter().map(|k| k.expire_entries(now)).sum()
    }

    /// Drops every entry of one keyspace, or of all.
    ///
    /// # Errors
    /// [`Error::UnknownKeyspace`] when a named keyspace does not exist.
    pub fn flush(&self, keyspace: Option<&str>) -> Result<()> {
        for keyspace in self.existing(keyspace)? {
            keyspace.flush();
        }
        Ok(())
    }

    /// One existing keyspace, or all of them; never creates one.
    fn existing(&self, keyspace: Option<&str>) -> Result<Vec<Arc<Keyspace>>> {
        match keyspace {
            Some(name) => {
                let keyspace = self
                    .keyspaces
                    .get(name)
                    .map(|k| Arc::clone(&k))
                    .ok_or_else(|| Error::UnknownKeyspace {
                        name: name.to_owned(),
                    })?;
                Ok(vec![keyspace])
            }
            // Collect the Arcs first so that no shard lock is held while the
            // caller works on them.
            None => Ok(self
                .keyspaces
                .iter()
                .map(|k| Arc::clone(k.value()))
                .collect()),
        }
    }

    /// Stats of one keyspace, or of all sorted by name.
    ///
    /// # Errors
    /// [`Error::UnknownKeyspace`] when a named keyspace does not exist (stats
    /// never create keyspaces).
    pub fn stats(&self, keyspace: Option<&str>) -> Result<Vec<KeyspaceStats>> {
        let mut stats: Vec<KeyspaceStats> =
            self.existing(keyspace)?.iter().map(|k| k.stats()).collect();
        stats.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(stats)
    }
}

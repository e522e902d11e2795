//! The node's domain core: keyspaces of versioned entries in byte-bounded
//! moka caches. Nothing here knows about gRPC; the transport converts its
//! messages to these types and back.
//!
//! # Invariants
//! - **A version-fenced write never replaces an entry of an equal or newer
//!   version.** The check and the store happen in one `and_compute_with` call,
//!   which moka runs under the key's lock, so two racing writes cannot both
//!   pass the check.
//! - **An expired entry is never returned**, even before moka has removed it:
//!   reads compare `expires_at` with the clock themselves.
//! - **A keyspace never holds more than its capacity** (after moka's pending
//!   maintenance has run), counting key + value + [`ENTRY_OVERHEAD_BYTES`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use moka::Expiry;
use moka::notification::RemovalCause;
use moka::ops::compute::{CompResult, Op};
use moka::sync::Cache;

use crate::config::{Config, KeyspaceConfig, Limits, UnknownKeyspaces, validate_keyspace_name};
use crate::error::{Error, Result};

/// Bytes the weigher adds to every entry for what moka and the node keep
/// beside the key and value (hash-table slot, deque nodes, version, expiry,
/// `Bytes` headers). Measured roughly; it keeps many tiny entries from
/// looking free.
pub const ENTRY_OVERHEAD_BYTES: u64 = 128;

/// What a read returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    /// The value; a cheap reference-counted handle, never a copy.
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
    /// Entries held now.
    pub items: u64,
    /// Weighted bytes held now.
    pub bytes: u64,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// Default TTL.
    pub default_ttl: Option<Duration>,
}

/// An entry as the cache holds it.
#[derive(Clone, Debug)]
struct Stored {
    value: Bytes,
    version: u64,
    /// When the entry stops being readable. moka's expiry policy is derived
    /// from this one field, so the two cannot disagree.
    expires_at: Option<Instant>,
}

impl Stored {
    fn is_live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }

    fn hit(&self, now: Instant) -> Hit {
        Hit {
            value: self.value.clone(),
            version: self.version,
            ttl_remaining: self.expires_at.map(|at| at.saturating_duration_since(now)),
        }
    }
}

/// moka expiry policy: each entry lives until its own `expires_at`.
struct PerEntryExpiry;

impl Expiry<Bytes, Stored> for PerEntryExpiry {
    fn expire_after_create(&self, _key: &Bytes, value: &Stored, now: Instant) -> Option<Duration> {
        value.expires_at.map(|at| at.saturating_duration_since(now))
    }

    fn expire_after_update(
        &self,
        _key: &Bytes,
        value: &Stored,
        now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        value.expires_at.map(|at| at.saturating_duration_since(now))
    }
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    sets: AtomicU64,
    sets_refused: AtomicU64,
    deletes: AtomicU64,
    evictions: AtomicU64,
    expirations: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    // Counters are statistics, not synchronisation: relaxed is enough.
    counter.fetch_add(by, Ordering::Relaxed);
}

/// One keyspace: a byte-bounded cache of versioned entries.
pub struct Keyspace {
    name: String,
    cache: Cache<Bytes, Stored>,
    config: KeyspaceConfig,
    counters: Arc<Counters>,
}

impl Keyspace {
    fn new(name: &str, config: KeyspaceConfig) -> Self {
        let counters = Arc::new(Counters::default());
        let listener_counters = Arc::clone(&counters);
        let cache = Cache::builder()
            .name(name)
            .max_capacity(config.capacity_bytes)
            .weigher(|key: &Bytes, value: &Stored| -> u32 {
                let weight = key.len() as u64 + value.value.len() as u64 + ENTRY_OVERHEAD_BYTES;
                // Config validation caps keys and values far below u32::MAX.
                u32::try_from(weight).unwrap_or(u32::MAX)
            })
            .expire_after(PerEntryExpiry)
            .eviction_listener(move |_key, _value, cause| match cause {
                RemovalCause::Size => bump(&listener_counters.evictions, 1),
                RemovalCause::Expired => bump(&listener_counters.expirations, 1),
                RemovalCause::Explicit | RemovalCause::Replaced => {}
            })
            .build();
        Keyspace {
            name: name.to_owned(),
            cache,
            config,
            counters,
        }
    }

    /// The keyspace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn get(&self, key: &[u8], now: Instant) -> Option<Hit> {
        let hit = self
            .cache
            .get(key)
            .filter(|stored| stored.is_live(now))
            .map(|stored| stored.hit(now));
        bump(
            if hit.is_some() {
                &self.counters.hits
            } else {
                &self.counters.misses
            },
            1,
        );
        hit
    }

    fn set(&self, item: SetItem, now: Instant) -> SetResult {
        let ttl = item.ttl.or(self.config.default_ttl);
        // Copy key and value out of the request buffer: a `Bytes` decoded by
        // prost may be a slice of a much larger request (a whole MultiSet),
        // and keeping it would pin that buffer while the weigher counts only
        // the slice. The copy is on the write path; reads share the stored
        // `Bytes` without copying.
        let new = Stored {
            value: Bytes::copy_from_slice(&item.value),
            version: item.version,
            expires_at: ttl.map(|ttl| now + ttl),
        };
        let key = Bytes::copy_from_slice(&item.key);
        let mut refused: Option<SetResult> = None;
        let result = self.cache.entry(key).and_compute_with(|current| {
            let live = current.map(|e| e.into_value()).filter(|s| s.is_live(now));
            match (item.condition, live) {
                (WriteCondition::IfAbsent, Some(existing)) => {
                    refused = Some(SetResult {
                        outcome: SetOutcome::Exists,
                        current_version: existing.version,
                    });
                    Op::Nop
                }
                (WriteCondition::IfNewerVersion, Some(existing))
                    if existing.version >= new.version =>
                {
                    refused = Some(SetResult {
                        outcome: SetOutcome::StaleVersion,
                        current_version: existing.version,
                    });
                    Op::Nop
                }
                _ => Op::Put(new),
            }
        });
        if let Some(refused) = refused {
            bump(&self.counters.sets_refused, 1);
            return refused;
        }
        let version = match result {
            CompResult::Inserted(entry) | CompResult::ReplacedWith(entry) => entry.value().version,
            // The closure returned `Put` whenever it did not record a refusal,
            // and `Put` always yields `Inserted` or `ReplacedWith`.
            other => unreachable!("compute returned Put but moka reported {other:?}"),
        };
        bump(&self.counters.sets, 1);
        SetResult {
            outcome: SetOutcome::Stored,
            current_version: version,
        }
    }

    fn delete(&self, key: &[u8], now: Instant) -> bool {
        let deleted = self.cache.remove(key).is_some_and(|s| s.is_live(now));
        if deleted {
            bump(&self.counters.deletes, 1);
        }
        deleted
    }

    /// Drops every entry. moka marks all current entries invalid at once, so
    /// no read after this call returns an entry written before it.
    fn flush(&self) {
        self.cache.invalidate_all();
    }

    /// Counters and sizes; runs moka's pending maintenance first so that
    /// sizes and eviction counts are settled.
    pub fn stats(&self) -> KeyspaceStats {
        self.cache.run_pending_tasks();
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        KeyspaceStats {
            name: self.name.clone(),
            hits: load(&c.hits),
            misses: load(&c.misses),
            sets: load(&c.sets),
            sets_refused: load(&c.sets_refused),
            deletes: load(&c.deletes),
            evictions: load(&c.evictions),
            expirations: load(&c.expirations),
            items: self.cache.entry_count(),
            bytes: self.cache.weighted_size(),
            capacity_bytes: self.config.capacity_bytes,
            default_ttl: self.config.default_ttl,
        }
    }
}

/// All keyspaces of a node, with the request limits.
pub struct Store {
    keyspaces: DashMap<String, Arc<Keyspace>>,
    limits: Limits,
    unknown: UnknownKeyspaces,
    created: KeyspaceConfig,
}

impl Store {
    /// Builds the store with the configured keyspaces.
    pub fn new(config: &Config) -> Self {
        let keyspaces = DashMap::new();
        for (name, keyspace) in &config.keyspaces {
            keyspaces.insert(
                name.clone(),
                Arc::new(Keyspace::new(name, keyspace.clone())),
            );
        }
        Store {
            keyspaces,
            limits: config.limits.clone(),
            unknown: config.unknown_keyspaces,
            created: config.created_keyspaces.clone(),
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
                        Arc::new(Keyspace::new(name, self.created.clone()))
                    })
                    .clone();
                Ok(keyspace)
            }
        }
    }

    fn check_key(&self, key: &[u8]) -> Result<()> {
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

    fn check_item(&self, item: &SetItem) -> Result<()> {
        self.check_key(&item.key)?;
        if item.value.len() > self.limits.max_value_bytes {
            return Err(Error::ValueTooLarge {
                len: item.value.len(),
                max: self.limits.max_value_bytes,
            });
        }
        if let Some(ttl) = item.ttl
            && ttl > self.limits.max_ttl
        {
            return Err(Error::TtlOutOfRange {
                ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
                max_ms: u64::try_from(self.limits.max_ttl.as_millis()).unwrap_or(u64::MAX),
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

    /// Writes one key under its condition.
    ///
    /// # Errors
    /// Invalid key, value or TTL, or unknown keyspace; nothing is written.
    pub fn set(&self, keyspace: &str, item: SetItem) -> Result<SetResult> {
        self.check_item(&item)?;
        Ok(self.keyspace(keyspace)?.set(item, Instant::now()))
    }

    /// Deletes one key; true when a live entry was removed.
    ///
    /// # Errors
    /// Invalid key or unknown keyspace.
    pub fn delete(&self, keyspace: &str, key: &[u8]) -> Result<bool> {
        self.check_key(key)?;
        Ok(self.keyspace(keyspace)?.delete(key, Instant::now()))
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
    /// written.
    pub fn multi_set(&self, keyspace: &str, items: Vec<SetItem>) -> Result<Vec<SetResult>> {
        self.check_batch(items.len())?;
        items.iter().try_for_each(|item| self.check_item(item))?;
        let keyspace = self.keyspace(keyspace)?;
        let now = Instant::now();
        Ok(items
            .into_iter()
            .map(|item| keyspace.set(item, now))
            .collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn store(extra: &str) -> Store {
        let mut config = Config::from_toml(extra).unwrap();
        config.validate().unwrap();
        Store::new(&config)
    }

    fn item(key: &str, value: &str, version: u64, condition: WriteCondition) -> SetItem {
        SetItem {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::copy_from_slice(value.as_bytes()),
            version,
            ttl: None,
            condition,
        }
    }

    #[test]
    fn fenced_write_refuses_equal_and_older_versions() {
        let s = store("");
        let set = |v, c| s.set("default", item("k", &format!("v{v}"), v, c)).unwrap();
        assert_eq!(
            set(5, WriteCondition::IfNewerVersion).outcome,
            SetOutcome::Stored
        );
        for old in [5, 4, 0] {
            let r = set(old, WriteCondition::IfNewerVersion);
            assert_eq!(r.outcome, SetOutcome::StaleVersion);
            assert_eq!(r.current_version, 5);
        }
        assert_eq!(s.get("default", b"k").unwrap().unwrap().value, "v5");
        assert_eq!(
            set(6, WriteCondition::IfNewerVersion).outcome,
            SetOutcome::Stored
        );
        assert_eq!(s.get("default", b"k").unwrap().unwrap().version, 6);
    }

    #[test]
    fn racing_fenced_writes_keep_the_highest_version() {
        let s = Arc::new(store(""));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    for v in (t..2000).step_by(4) {
                        s.set(
                            "default",
                            item("k", &v.to_string(), v, WriteCondition::IfNewerVersion),
                        )
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let hit = s.get("default", b"k").unwrap().unwrap();
        assert_eq!(hit.version, 1999);
        assert_eq!(hit.value, "1999");
    }

    #[test]
    fn if_absent_stores_once() {
        let s = store("");
        let first = s
            .set("default", item("k", "a", 1, WriteCondition::IfAbsent))
            .unwrap();
        assert_eq!(first.outcome, SetOutcome::Stored);
        let second = s
            .set("default", item("k", "b", 2, WriteCondition::IfAbsent))
            .unwrap();
        assert_eq!(second.outcome, SetOutcome::Exists);
        assert_eq!(second.current_version, 1);
        assert_eq!(s.get("default", b"k").unwrap().unwrap().value, "a");
    }

    #[test]
    fn expired_entries_are_not_read_even_before_moka_removes_them() {
        let s = store("");
        let ks = s.keyspace("default").unwrap();
        let t0 = Instant::now();
        let mut it = item("k", "v", 1, WriteCondition::Unconditional);
        it.ttl = Some(Duration::from_secs(10));
        ks.set(it, t0);
        assert!(ks.get(b"k", t0 + Duration::from_secs(9)).is_some());
        assert_eq!(
            ks.get(b"k", t0 + Duration::from_secs(9))
                .unwrap()
                .ttl_remaining,
            Some(Duration::from_secs(1))
        );
        assert!(ks.get(b"k", t0 + Duration::from_secs(10)).is_none());
        // An expired entry counts as absent for if-absent and fenced writes.
        let r = ks.set(
            item("k", "w", 0, WriteCondition::IfAbsent),
            t0 + Duration::from_secs(11),
        );
        assert_eq!(r.outcome, SetOutcome::Stored);
    }

    #[test]
    fn default_ttl_applies_when_the_write_gives_none() {
        let s = store("[keyspaces.short]\ndefault_ttl = \"2s\"");
        s.set("short", item("k", "v", 1, WriteCondition::Unconditional))
            .unwrap();
        let ttl = s
            .get("short", b"k")
            .unwrap()
            .unwrap()
            .ttl_remaining
            .unwrap();
        assert!(
            ttl <= Duration::from_secs(2) && ttl > Duration::ZERO,
            "{ttl:?}"
        );
        s.set("default", item("k", "v", 1, WriteCondition::Unconditional))
            .unwrap();
        assert_eq!(s.get("default", b"k").unwrap().unwrap().ttl_remaining, None);
    }

    #[test]
    fn capacity_is_bounded_in_bytes() {
        let s =
            store("[limits]\nmax_value_bytes = 1000\n[keyspaces.small]\ncapacity_bytes = 100000");
        let value = "x".repeat(1000);
        for i in 0..1000 {
            s.set(
                "small",
                item(
                    &format!("key-{i}"),
                    &value,
                    1,
                    WriteCondition::Unconditional,
                ),
            )
            .unwrap();
        }
        let stats = s.stats(Some("small")).unwrap().remove(0);
        assert!(stats.bytes <= 100_000, "{stats:?}");
        assert!(stats.evictions > 0, "{stats:?}");
        let per_entry = 1000 + 9 + ENTRY_OVERHEAD_BYTES;
        assert!(stats.items <= 100_000 / per_entry + 1, "{stats:?}");
    }

    #[test]
    fn bad_input_names_the_limit_and_writes_nothing() {
        let s = store(
            "[limits]\nmax_key_bytes = 4\nmax_value_bytes = 8\nmax_ttl = \"1m\"\nmax_batch_keys = 2",
        );
        let err = |r: Result<SetResult>| r.unwrap_err().to_string();
        assert_eq!(
            err(s.set("default", item("", "v", 1, WriteCondition::Unconditional))),
            "key is empty"
        );
        assert_eq!(
            err(s.set(
                "default",
                item("12345", "v", 1, WriteCondition::Unconditional)
            )),
            "key of 5 bytes exceeds max_key_bytes (4)"
        );
        assert_eq!(
            err(s.set(
                "default",
                item("k", "123456789", 1, WriteCondition::Unconditional)
            )),
            "value of 9 bytes exceeds max_value_bytes (8)"
        );
        let mut long = item("k", "v", 1, WriteCondition::Unconditional);
        long.ttl = Some(Duration::from_secs(61));
        assert_eq!(
            err(s.set("default", long)),
            "ttl of 61000 ms exceeds max_ttl (60000 ms)"
        );
        assert_eq!(
            err(s.set("nope", item("k", "v", 1, WriteCondition::Unconditional))),
            "unknown keyspace \"nope\" (unknown_keyspaces = \"reject\")"
        );
        let batch = vec![
            item("a", "v", 1, WriteCondition::Unconditional),
            item("b", "v", 1, WriteCondition::Unconditional),
            item("c", "v", 1, WriteCondition::Unconditional),
        ];
        assert_eq!(
            s.multi_set("default", batch).unwrap_err().to_string(),
            "batch of 3 keys exceeds max_batch_keys (2)"
        );
        // One bad item rejects the whole batch before anything is written.
        let batch = vec![
            item("a", "v", 1, WriteCondition::Unconditional),
            item("toolong", "v", 1, WriteCondition::Unconditional),
        ];
        assert!(s.multi_set("default", batch).is_err());
        assert_eq!(s.get("default", b"a").unwrap(), None);
        assert!(s.stats(None).unwrap().iter().all(|k| k.sets == 0));
    }

    #[test]
    fn unknown_keyspaces_can_be_created_on_demand_up_to_the_limit() {
        let s = store("unknown_keyspaces = \"create\"\n[limits]\nmax_keyspaces = 2");
        s.set("fresh", item("k", "v", 1, WriteCondition::Unconditional))
            .unwrap();
        assert_eq!(s.get("fresh", b"k").unwrap().unwrap().value, "v");
        let err = s.get("third", b"k").unwrap_err();
        assert!(matches!(err, Error::TooManyKeyspaces { .. }), "{err}");
        let err = s.get("bad name", b"k").unwrap_err();
        assert!(matches!(err, Error::InvalidKeyspaceName { .. }), "{err}");
    }

    #[test]
    fn flush_drops_every_entry_of_the_named_keyspaces() {
        let s = store("[keyspaces.other]");
        for ks in ["default", "other"] {
            s.set(ks, item("k", "v", 1, WriteCondition::Unconditional))
                .unwrap();
        }
        s.flush(Some("other")).unwrap();
        assert!(s.get("other", b"k").unwrap().is_none());
        assert!(s.get("default", b"k").unwrap().is_some());
        s.flush(None).unwrap();
        assert!(s.get("default", b"k").unwrap().is_none());
        assert!(s.flush(Some("nope")).is_err());
    }

    #[test]
    fn delete_reports_whether_a_live_entry_went() {
        let s = store("");
        assert!(!s.delete("default", b"k").unwrap());
        s.set("default", item("k", "v", 1, WriteCondition::Unconditional))
            .unwrap();
        assert!(s.delete("default", b"k").unwrap());
        assert_eq!(s.get("default", b"k").unwrap(), None);
        let stats = s.stats(Some("default")).unwrap().remove(0);
        assert_eq!(
            (stats.sets, stats.deletes, stats.hits, stats.misses),
            (1, 1, 0, 1)
        );
    }
}

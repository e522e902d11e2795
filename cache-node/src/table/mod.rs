//! A compact, sharded, byte-bounded table of versioned entries: where each
//! keyspace of the store (`crate::store`) keeps its entries (issue 14).
//!
//! Each entry is one heap allocation: a 20-byte header (version, expiry,
//! key length, flags), the key and the value ([`entry`]). The index is a
//! hashbrown `HashTable` of those allocations per shard ([`shard`]), each
//! shard behind its own mutex. Room is made by a small probation queue in
//! front of CLOCK with a 2-bit counter ([`eviction`]), with a Bloom-filter
//! memory of keys evicted from probation ([`ghost`]); dirty (write-back) entries are never evicted and never
//! expire. Expired entries leave lazily, when an operation or the eviction
//! hand meets them, and actively, by sampling ([`expiry`]). Every entry and
//! index allocation is charged what glibc's malloc really takes for it
//! ([`accounting`]), so the byte bound is a bound on the heap.
//!
//! # Promises
//! - **An expired entry is never returned**: every operation compares the
//!   entry's expiry with its `now` under the shard lock.
//! - **A dirty entry is never evicted and never expires**; dirty bytes are
//!   bounded by `max_dirty_bytes` by refusing the write
//!   ([`DirtyBytesExhausted`]), never by dropping an entry.
//! - **Clean bytes stay within `capacity_bytes`** when every call returns:
//!   clean entries plus the index allocations, charged as glibc charges
//!   them. Only when everything evictable has gone (all else is dirty, or
//!   the one entry just written is larger than the capacity) may they
//!   exceed it.
//! - **[`Table::compute`] is atomic per key**: the closure sees the key's
//!   live entry and its decision is applied before any other operation on
//!   the key; the closure runs before anything changes, so a panic in it
//!   leaves the table as it was.
//!
//! # Locks
//! One mutex per shard, never two at once: eviction that cannot find room
//! in the writer's shard goes on to the others after releasing it. A
//! closure passed to [`Table::compute`] or [`Table::read`] runs under the
//! key's shard lock, so it must not call the table.

pub mod accounting;
pub mod entry;
pub mod eviction;
pub mod expiry;
pub mod ghost;
pub mod shard;

use std::borrow::Cow;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;

use accounting::{Pool, Tally, malloc_footprint};
use entry::{Entry, RawMeta};
use eviction::Cause;
use expiry::{Clock, ROUND_BUCKETS, Round, is_expired};
use shard::Shard;

/// How a table is sized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableConfig {
    /// Bound on clean entries plus the index, in bytes of heap.
    pub capacity_bytes: u64,
    /// Bound on dirty entries, in bytes of heap.
    pub max_dirty_bytes: u64,
    /// Number of shards, rounded up to a power of two; 0 picks one from the
    /// number of CPUs.
    pub shards: usize,
}

impl TableConfig {
    /// A table of `capacity_bytes` with as many dirty bytes, and the default
    /// number of shards.
    pub fn new(capacity_bytes: u64) -> TableConfig {
        TableConfig {
            capacity_bytes,
            max_dirty_bytes: capacity_bytes,
            shards: 0,
        }
    }
}

/// Shards per CPU when the config leaves the choice to the table: enough
/// that two threads rarely want the same shard.
const SHARDS_PER_CPU: usize = 8;
const MAX_SHARDS: usize = 1024;

/// What the table knows of a dirty entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyMeta {
    /// When it was written.
    pub since: Instant,
    /// The TTL it gets when it becomes clean, counted from then.
    pub ttl: Option<Duration>,
}

/// An entry's header as callers see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    /// The writer's version.
    pub version: u64,
    /// When a clean entry stops being readable; ignored (and `None` when
    /// read back) for a dirty entry.
    pub expires_at: Option<Instant>,
    /// `Some` for a dirty entry.
    pub dirty: Option<DirtyMeta>,
}

impl Meta {
    /// A clean entry's header.
    pub fn clean(version: u64, expires_at: Option<Instant>) -> Meta {
        Meta {
            version,
            expires_at,
            dirty: None,
        }
    }
}

/// A live entry, borrowed under its shard lock.
#[derive(Clone, Copy, Debug)]
pub struct EntryRef<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
    pub meta: Meta,
}

/// A live entry, copied out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub value: Bytes,
    pub meta: Meta,
}

/// What [`Table::compute`] does with the key.
#[derive(Clone, Debug)]
pub enum Op<'v> {
    /// Nothing.
    Keep,
    /// Stores this value and header, replacing the live entry if any.
    Put { value: Cow<'v, [u8]>, meta: Meta },
    /// Changes the live entry's header, keeping its value (nothing if
    /// there is no live entry). The way to change a TTL or to make a dirty
    /// entry clean.
    SetMeta(Meta),
    /// Removes the live entry, if any.
    Remove,
}

/// A dirty write refused because dirty entries would take more than
/// `max_dirty_bytes`; nothing changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyBytesExhausted {
    /// Dirty bytes the write would have left.
    pub bytes: u64,
    /// The bound.
    pub max: u64,
}

/// Sizes and counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Entries, dirty ones included.
    pub items: u64,
    pub dirty_items: u64,
    /// Heap bytes of clean entries and of the index.
    pub bytes: u64,
    /// Heap bytes of dirty entries.
    pub dirty_bytes: u64,
    /// Entries evicted to make room.
    pub evictions: u64,
    /// Entries removed because they had expired.
    pub expirations: u64,
}

/// Why an entry leaves the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Removal {
    Explicit,
    Evicted,
    Expired,
}

impl From<Cause> for Removal {
    fn from(cause: Cause) -> Removal {
        match cause {
            Cause::Evicted => Removal::Evicted,
            Cause::Expired => Removal::Expired,
        }
    }
}

/// The table; see the module docs.
#[derive(Debug)]
pub struct Table {
    shards: Box<[Mutex<Shard>]>,
    seed: u64,
    clock: Clock,
    capacity_bytes: u64,
    max_dirty_bytes: u64,
    tally: Tally,
    evictions: AtomicU64,
    expirations: AtomicU64,
}

impl Table {
    /// An empty table; `now` is its clock's epoch.
    pub fn new(config: TableConfig, now: Instant) -> Table {
        let shards = if config.shards == 0 {
            std::thread::available_parallelism().map_or(4, |n| n.get()) * SHARDS_PER_CPU
        } else {
            config.shards
        }
        .clamp(1, MAX_SHARDS)
        .next_power_of_two();
        // std's RandomState is seeded from the OS: keys an attacker chooses
        // cannot be aimed at one probe sequence.
        let mut seed = std::collections::hash_map::RandomState::new().build_hasher();
        seed.write_u64(0);
        Table {
            shards: (0..shards).map(|_| Mutex::new(Shard::default())).collect(),
            seed: seed.finish(),
            clock: Clock::new(now),
            capacity_bytes: config.capacity_bytes,
            max_dirty_bytes: config.max_dirty_bytes,
            tally: Tally::default(),
            evictions: AtomicU64::new(0),
            expirations: AtomicU64::new(0),
        }
    }

    fn hash(&self, key: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64_with_seed(key, self.seed)
    }

    /// The shard of a hash: bits 40.. of it, apart from those hashbrown
    /// uses (the low bits for the bucket, the top 7 for the tag), so that
    /// the entries of one shard still spread over its buckets and tags.
    fn shard_of(&self, hash: u64) -> usize {
        (hash >> 40) as usize & (self.shards.len() - 1)
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        // Closures run before anything changes and the table's own code
        // does not panic between a change and its accounting, so a
        // poisoned shard is consistent.
        self.shards[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn raw_meta(&self, meta: &Meta) -> RawMeta {
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX - 1);
        match meta.dirty {
            Some(dirty) => RawMeta {
                version: meta.version,
                time: self.clock.encode(dirty.since),
                // Shifted by one: 0 is "no TTL".
                dirty_ttl: Some(dirty.ttl.map_or(0, |ttl| nanos(ttl) + 1)),
            },
            None => RawMeta {
                version: meta.version,
                time: self.clock.encode_expiry(meta.expires_at),
                dirty_ttl: None,
            },
        }
    }

    fn meta(&self, entry: &Entry) -> Meta {
        match entry.dirty_ttl() {
            Some(ttl) => Meta {
                version: entry.version(),
                expires_at: None,
                dirty: Some(DirtyMeta {
                    since: self.clock.decode(entry.time()),
                    ttl: (ttl != 0).then(|| Duration::from_nanos(ttl - 1)),
                }),
            },
            None => Meta::clean(entry.version(), self.clock.decode_expiry(entry.time())),
        }
    }

    fn view<'a>(&self, entry: &'a Entry) -> EntryRef<'a> {
        EntryRef {
            key: entry.key(),
            value: entry.value(),
            meta: self.meta(entry),
        }
    }

    /// The key's live entry under its shard lock, as the table found it.
    fn locate(&self, shard: &mut Shard, hash: u64, key: &[u8], now: u64) -> Option<usize> {
        let index = shard.find(hash, key)?;
        if is_expired(shard.at(index), now) {
            self.remove_at(shard, index, Removal::Expired);
            return None;
        }
        Some(index)
    }

    /// Runs `f` on the key's live entry, counting a use of it for eviction;
    /// `None` when there is none.
    pub fn read<R>(
        &self,
        key: &[u8],
        now: Instant,
        f: impl FnOnce(EntryRef<'_>) -> R,
    ) -> Option<R> {
        let hash = self.hash(key);
        let mut shard = self.lock(self.shard_of(hash));
        let index = self.locate(&mut shard, hash, key, self.clock.encode(now))?;
        let entry = shard.at_mut(index);
        eviction::touch(entry);
        Some(f(self.view(entry)))
    }

    /// The key's live entry, its value copied out.
    pub fn get(&self, key: &[u8], now: Instant) -> Option<Found> {
        self.read(key, now, |entry| Found {
            value: Bytes::copy_from_slice(entry.value),
            meta: entry.meta,
        })
    }

    /// Stores a value unconditionally.
    ///
    /// # Errors
    /// [`DirtyBytesExhausted`] for a dirty entry beyond `max_dirty_bytes`.
    pub fn insert(
        &self,
        key: &[u8],
        value: &[u8],
        meta: Meta,
        now: Instant,
    ) -> Result<(), DirtyBytesExhausted> {
        self.compute(key, now, |_| {
            let value = Cow::Borrowed(value);
            (Op::Put { value, meta }, ())
        })
    }

    /// Removes the key's entry; true when a live one went.
    pub fn remove(&self, key: &[u8], now: Instant) -> bool {
        self.compute(key, now, |current| (Op::Remove, current.is_some()))
            .unwrap_or_else(|_| unreachable!("a removal reserves no dirty bytes"))
    }

    /// Shows `f` the key's live entry and applies what it returns, under
    /// the key's shard lock; returns `f`'s result.
    ///
    /// # Errors
    /// [`DirtyBytesExhausted`] when `f` stores a dirty entry beyond
    /// `max_dirty_bytes`; the key's entry is then left as it was (`f`'s
    /// result is dropped).
    pub fn compute<'v, R>(
        &self,
        key: &[u8],
        now: Instant,
        f: impl FnOnce(Option<EntryRef<'_>>) -> (Op<'v>, R),
    ) -> Result<R, DirtyBytesExhausted> {
        let hash = self.hash(key);
        let shard_index = self.shard_of(hash);
        let now_raw = self.clock.encode(now);
        let mut shard = self.lock(shard_index);
        let found = self.locate(&mut shard, hash, key, now_raw);
        let (op, result) = f(found.map(|index| self.view(shard.at(index))));
        let written = match (op, found) {
            (Op::Keep, _) | (Op::SetMeta(_) | Op::Remove, None) => None,
            (Op::Remove, Some(index)) => {
                self.remove_at(&mut shard, index, Removal::Explicit);
                None
            }
            (Op::SetMeta(meta), Some(index)) => {
                let new = shard.at(index).with_meta(self.raw_meta(&meta));
                Some(self.store(&mut shard, hash, Some(index), new)?)
            }
            (Op::Put { value, meta }, found) => {
                let new = Entry::new(key, &value, self.raw_meta(&meta));
                Some(self.store(&mut shard, hash, found, new)?)
            }
        };
        if let Some(written) = written
            && self.tally.clean_bytes() > self.capacity_bytes
            && !self.make_room(&mut shard, Some(written), now_raw)
        {
            drop(shard);
            self.make_room_elsewhere(shard_index, now_raw);
        }
        Ok(result)
    }

    /// Puts `new` into the shard, in place of the entry in `found` if any;
    /// returns its bucket.
    fn store(
        &self,
        shard: &mut Shard,
        hash: u64,
        found: Option<usize>,
        mut new: Entry,
    ) -> Result<usize, DirtyBytesExhausted> {
        let pool = pool_of(&new);
        let footprint = malloc_footprint(new.alloc_len());
        let old = found.map(|index| {
            let old = shard.at(index);
            (pool_of(old), malloc_footprint(old.alloc_len()))
        });
        if pool == Pool::Dirty {
            let replaced = match old {
                Some((Pool::Dirty, old_footprint)) => old_footprint,
                _ => 0,
            };
            self.tally
                .reserve_dirty(replaced, footprint, self.max_dirty_bytes)
                .map_err(|bytes| DirtyBytesExhausted {
                    bytes,
                    max: self.max_dirty_bytes,
                })?;
        } else {
            self.tally.add(pool, footprint);
        }
        match (found, old) {
            (Some(index), Some((old_pool, old_footprint))) => {
                // An overwrite is a use of the key.
                new.take_eviction_state(shard.at(index));
                eviction::touch(&mut new);
                if pool == Pool::Dirty {
                    // Dirty entries are never on probation.
                    new.set_probation(false);
                }
                let _old = shard.replace(index, new);
                // The reservation above already took a dirty old entry out.
                if !(old_pool == Pool::Dirty && pool == Pool::Dirty) {
                    self.tally.sub(old_pool, old_footprint);
                }
                if old_pool != pool {
                    self.tally.count(old_pool, false);
                    self.tally.count(pool, true);
                    shard.dirty = if pool == Pool::Dirty {
                        shard.dirty + 1
                    } else {
                        shard.dirty - 1
                    };
                }
                Ok(index)
            }
            _ => {
                // A new clean entry starts on probation, unless it was
                // evicted from probation lately (see `eviction`).
                new.set_probation(pool == Pool::Clean && !shard.ghost.contains(hash));
                let rehash = |entry: &Entry| self.hash(entry.key());
                let index = shard.insert(hash, new, rehash);
                eviction::age_probation(shard, &rehash);
                self.account_index(shard);
                self.tally.count(pool, true);
                if pool == Pool::Dirty {
                    shard.dirty += 1;
                }
                Ok(index)
            }
        }
    }

    fn account_index(&self, shard: &mut Shard) {
        let delta = shard.index_delta();
        if delta >= 0 {
            self.tally.add(Pool::Clean, delta.unsigned_abs());
        } else {
            self.tally.sub(Pool::Clean, delta.unsigned_abs());
        }
    }

    fn remove_at(&self, shard: &mut Shard, index: usize, why: Removal) -> Entry {
        let entry = shard.remove(index);
        let pool = pool_of(&entry);
        self.tally.sub(pool, malloc_footprint(entry.alloc_len()));
        self.tally.count(pool, false);
        if pool == Pool::Dirty {
            shard.dirty -= 1;
        }
        match why {
            Removal::Explicit => {}
            Removal::Evicted => {
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
            Removal::Expired => {
                self.expirations.fetch_add(1, Ordering::Relaxed);
            }
        }
        entry
    }

    /// Evicts from this shard until the clean bytes fit, sparing `skip`;
    /// false when the shard ran out of victims first.
    fn make_room(&self, shard: &mut Shard, skip: Option<usize>, now: u64) -> bool {
        while self.tally.clean_bytes() > self.capacity_bytes {
            match eviction::next_victim(shard, now, skip, &|entry: &Entry| self.hash(entry.key())) {
                Some((index, cause)) => {
                    self.remove_at(shard, index, cause.into());
                }
                None => return false,
            }
        }
        true
    }

    /// Evicts from the other shards, one lock at a time, until the clean
    /// bytes fit or nothing evictable is left.
    fn make_room_elsewhere(&self, from: usize, now: u64) {
        for step in 1..self.shards.len() {
            let mut shard = self.lock((from + step) % self.shards.len());
            if self.make_room(&mut shard, None, now) {
                return;
            }
        }
    }

    /// Active expiry: walks each shard's expiry hand over rounds of
    /// [`ROUND_BUCKETS`] buckets, removing expired entries, going on while a
    /// quarter of the entries met had expired and at most `max_buckets`
    /// buckets per shard; shrinks indices left sparse. Returns the number
    /// of entries removed. Meant to be called periodically (the node's
    /// sweeper runs every 100 ms).
    pub fn expire_some(&self, now: Instant, max_buckets: usize) -> usize {
        let now = self.clock.encode(now);
        let mut removed = 0;
        for index in 0..self.shards.len() {
            let mut shard = self.lock(index);
            let buckets = shard.num_buckets();
            if shard.is_empty() || buckets == 0 {
                continue;
            }
            let limit = max_buckets.min(buckets);
            let mut walked = 0;
            while walked < limit {
                let mut round = Round::default();
                for _ in 0..ROUND_BUCKETS.min(limit - walked) {
                    let bucket = shard.expiry_hand % buckets;
                    shard.expiry_hand = bucket + 1;
                    walked += 1;
                    let Some(entry) = shard.bucket_mut(bucket) else {
                        continue;
                    };
                    round.met += 1;
                    if is_expired(entry, now) {
                        self.remove_at(&mut shard, bucket, Removal::Expired);
                        round.expired += 1;
                    }
                }
                removed += round.expired;
                if !round.go_on() {
                    break;
                }
            }
            shard.shrink_if_sparse(|entry| self.hash(entry.key()));
            self.account_index(&mut shard);
        }
        removed
    }

    /// Calls `f` on every dirty entry, one shard lock at a time (entries
    /// written meanwhile may or may not be seen).
    pub fn for_each_dirty(&self, mut f: impl FnMut(EntryRef<'_>)) {
        for index in 0..self.shards.len() {
            let mut shard = self.lock(index);
            if shard.dirty == 0 {
                continue;
            }
            for bucket in 0..shard.num_buckets() {
                if let Some(entry) = shard.bucket_mut(bucket)
                    && entry.is_dirty()
                {
                    f(self.view(entry));
                }
            }
        }
    }

    /// Removes every entry, dirty ones included, and gives the index memory
    /// back.
    pub fn clear(&self) {
        for index in 0..self.shards.len() {
            let mut shard = self.lock(index);
            for entry in shard.drain() {
                let pool = pool_of(&entry);
                self.tally.sub(pool, malloc_footprint(entry.alloc_len()));
                self.tally.count(pool, false);
            }
            shard.dirty = 0;
            shard.shrink_if_sparse(|entry| self.hash(entry.key()));
            self.account_index(&mut shard);
        }
    }

    pub fn stats(&self) -> TableStats {
        TableStats {
            items: self.tally.items(),
            dirty_items: self.tally.dirty_items(),
            bytes: self.tally.clean_bytes(),
            dirty_bytes: self.tally.dirty_bytes(),
            evictions: self.evictions.load(Ordering::Relaxed),
            expirations: self.expirations.load(Ordering::Relaxed),
        }
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Heap bytes a clean entry of this key and value is charged (not
    /// counting its index slot).
    pub fn entry_footprint(key: &[u8], value: &[u8]) -> u64 {
        malloc_footprint(Entry::alloc_len_for(key.len(), value.len(), false))
    }

    /// Heap bytes a dirty entry of this key and value is charged against
    /// `max_dirty_bytes`.
    pub fn dirty_entry_footprint(key: &[u8], value: &[u8]) -> u64 {
        malloc_footprint(Entry::alloc_len_for(key.len(), value.len(), true))
    }
}

fn pool_of(entry: &Entry) -> Pool {
    if entry.is_dirty() {
        Pool::Dirty
    } else {
        Pool::Clean
    }
}

#[cfg(test)]
mod tests;

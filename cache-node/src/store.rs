//! The node's domain core: keyspaces of versioned entries in byte-bounded
//! moka caches. Nothing here knows about gRPC; the transport converts its
//! messages to these types and back.
//!
//! Beside the cache, each keyspace keeps a small table of *records*: per-key
//! coordination state for leases (the memcache paper's fix for thundering
//! herds and stale sets), for 2PC pending changes (write-through), and for
//! recently deleted "stale" values. A key has a record only while it has a
//! lease, a pending change or a stale value; see `KeyState`. Beside both, a
//! table of *dirty* entries holds write-back values not yet in the store
//! (see `DirtyTable`).
//!
//! # Invariants
//! - **A version-fenced write never replaces an entry of an equal or newer
//!   version.** The check and the store happen in one `Keyspace::compute`
//!   call, under the key's lock (one of the keyspace's striped key locks),
//!   so two racing writes cannot both pass the check.
//! - **An expired entry is never returned**, even before moka has removed it:
//!   reads compare `expires_at` with the clock themselves.
//! - **A keyspace never holds more than its capacity** (after moka's pending
//!   maintenance has run), counting key + value + [`ENTRY_OVERHEAD_BYTES`].
//! - **A fill never lands after a write that invalidated its lease.** The
//!   lease check and the store happen under the key's record lock (the
//!   records table's shard lock, via `Records::update`); every write of a
//!   keyspace that has records takes the same lock, drops the lease and does
//!   its own cache operation before releasing it. See `Keyspace::set` for
//!   why a keyspace with no records may skip the lock.
//! - **A pending change is never visible to readers**; it lives in the
//!   record, not in the cache, until it is committed.
//! - **A pending change that timed out stays in doubt** (`Fence`) for
//!   `limits.in_doubt_ttl`: its writer's database may still commit it, so
//!   no fill, `IF_NEWER_VERSION` clean write or prepare of an older version
//!   lands meanwhile, and a late commit of it still applies.
//! - **A dirty (write-back) entry is never evicted** and does not expire
//!   while dirty: it lives in the keyspace's dirty table, outside moka,
//!   within `max_dirty_bytes`, until `mark_clean` moves it into the cache
//!   (its exact version stored) or drops it (a newer version stored), or
//!   `discard` removes its exact version (dead-lettered, never stored).
//!   Reads see the newer of the dirty and the cached entry; a clean write of
//!   an equal or older version never replaces a dirty entry.
//! - **Lock order: records shard, then dirty-table shard, then the key
//!   lock.** Nothing takes a records lock while holding a dirty or key lock,
//!   nor a dirty lock while holding a key lock (moka's listeners, which may
//!   run under it, only bump counters), so they cannot deadlock.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use moka::Expiry;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use moka::sync::Cache;

use crate::config::{Config, KeyspaceConfig, Limits, UnknownKeyspaces, validate_keyspace_name};
use crate::error::{Error, Result};
use crate::prepare_queue::{Admission, PrepareQueue, Ticket};

/// Bytes the weigher adds to every entry for what moka and the node keep
/// beside the key and value (hash-table slot, deque nodes, version, expiry,
/// `Bytes` headers). Measured roughly; it keeps many tiny entries from
/// looking free.
pub const ENTRY_OVERHEAD_BYTES: u64 = 128;

/// What [`Keyspace::compute`] did.
#[derive(Debug)]
enum Computed {
    /// Nothing (`Op::Nop`).
    Unchanged,
    /// Stored the entry (`Op::Put`).
    Put,
    /// Removed the entry, returning what was cached (`Op::Remove`).
    Removed(Option<Stored>),
}

/// Stale values (kept by `keep_stale_for`) live outside the byte-bounded
/// cache; a keyspace keeps at most `capacity_bytes / STALE_BUDGET_DIVISOR`
/// bytes of them and simply keeps no more beyond that.
pub const STALE_BUDGET_DIVISOR: u64 = 8;

/// Dirty (write-back) entries live outside the byte-bounded cache; unless
/// `max_dirty_bytes` says otherwise, a keyspace holds at most
/// `capacity_bytes / DIRTY_BUDGET_DIVISOR` bytes of them.
pub const DIRTY_BUDGET_DIVISOR: u64 = 4;

/// Key locks per keyspace (see [`Keyspace::compute`]): enough that
/// writers on different keys rarely share one.
const KEY_LOCK_STRIPES: usize = 256;

/// Longest transaction id a `Prepare` may carry.
pub const MAX_TXN_ID_BYTES: usize = 256;

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
    /// Entries held now.
    pub items: u64,
    /// Weighted bytes held now.
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
    /// Weighted bytes of the dirty entries held now.
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

/// A lease on a key: the one caller allowed to fill it.
#[derive(Clone, Debug)]
struct Lease {
    token: u64,
    expires_at: Instant,
}

/// The change a pending transaction will apply on commit.
#[derive(Clone, Debug)]
enum Change {
    Put { value: Bytes, ttl: Option<Duration> },
    Delete,
}

/// A prepared, not yet committed, change.
#[derive(Clone, Debug)]
struct Pending {
    txn_id: String,
    version: u64,
    change: Change,
    deadline: Instant,
}

/// What a pending change leaves when it times out: its writer may have
/// stalled between its database prepare and commit (a pool or lock wait, a
/// paused process, a stalled database) and still commit the database, so
/// the change is *in doubt*. Until `until`, the old value a reader loads
/// meanwhile (the prepared row is invisible to it) must not be cached: the
/// fence refuses fills, `IF_NEWER_VERSION` clean writes and prepares older
/// than `version`. A late `Commit` of `txn_id` applies `change`; its
/// `Abort`, a stored entry of `version` or newer, a flush, or `until`
/// clear it. Past `until`, a writer's late commit is answered
/// `committed = false`, and the writer invalidates the key itself.
#[derive(Clone, Debug)]
struct Fence {
    txn_id: String,
    version: u64,
    change: Change,
    until: Instant,
}

/// Coordination state of one key. A record exists only while one of the
/// fields is set; [`Records::update`] removes it when all are empty.
#[derive(Debug, Default)]
struct KeyState {
    lease: Option<Lease>,
    pending: Option<Pending>,
    /// The newest timed-out change still in doubt.
    fence: Option<Fence>,
    /// The last deleted value, with `expires_at` set to the end of its stale
    /// window. Never served as a hit.
    stale: Option<Stored>,
    /// Prepares waiting for the pending change to settle.
    queue: PrepareQueue,
}

/// What a record contributes to the table-wide tallies.
#[derive(Clone, Copy, Default)]
struct Footprint {
    pending: bool,
    stale_bytes: u64,
}

impl KeyState {
    fn is_empty(&self) -> bool {
        self.lease.is_none()
            && self.pending.is_none()
            && self.fence.is_none()
            && self.stale.is_none()
            && self.queue.is_empty()
    }

    /// The version of the in-doubt fence if it refuses `version`.
    fn fenced(&self, version: u64) -> Option<u64> {
        self.fence
            .as_ref()
            .map(|f| f.version)
            .filter(|&fenced| version < fenced)
    }

    /// Drops the fence once an entry of its version or newer is stored: the
    /// change in doubt is superseded whatever its outcome.
    fn superseded(&mut self, stored: u64) {
        if self.fence.as_ref().is_some_and(|f| stored >= f.version) {
            self.fence = None;
        }
    }

    /// Wakes the first waiting prepare once no change is pending (see
    /// [`PrepareQueue::kick`]); run after every change of a record.
    fn kick(&mut self) {
        self.queue.kick(self.pending.is_some());
    }

    fn footprint(&self) -> Footprint {
        Footprint {
            pending: self.pending.is_some(),
            stale_bytes: self.stale.as_ref().map_or(0, stale_weight),
        }
    }
}

fn stale_weight(stored: &Stored) -> u64 {
    stored.value.len() as u64 + ENTRY_OVERHEAD_BYTES
}

/// The records of one keyspace, with tallies kept in step with the table.
#[derive(Default)]
struct Records {
    table: DashMap<Bytes, KeyState>,
    /// Number of records, never below the true number: incremented before a
    /// record is inserted and decremented after one is removed, both under
    /// the record's shard lock. Writers read it to skip the lock when the
    /// keyspace has no records at all (see [`Keyspace::set`]).
    count: AtomicUsize,
    /// Records with a pending change; lets `Get` skip the table when 0.
    pending: AtomicUsize,
    /// Weight of the stale values held, for [`STALE_BUDGET_DIVISOR`].
    stale_bytes: AtomicU64,
}

impl Records {
    /// Runs `f` on the key's record (an empty one if there is none) under the
    /// record's shard lock, then stores the record back, or removes it if
    /// `f` left it empty. `f` runs synchronously and is the critical section
    /// that makes lease checks, grants and invalidations atomic with the
    /// cache operation it performs.
    fn update<R>(&self, key: Bytes, f: impl FnOnce(&mut KeyState) -> R) -> R {
        match self.table.entry(key) {
            Entry::Occupied(mut occupied) => {
                let before = occupied.get().footprint();
                let result = f(occupied.get_mut());
                occupied.get_mut().kick();
                self.account(before, occupied.get().footprint());
                if occupied.get().is_empty() {
                    occupied.remove();
                    self.count.fetch_sub(1, Ordering::SeqCst);
                }
                result
            }
            Entry::Vacant(vacant) => {
                let mut state = KeyState::default();
                let result = f(&mut state);
                state.kick();
                if !state.is_empty() {
                    self.account(Footprint::default(), state.footprint());
                    // Counted before the insert, and before `update` returns
                    // (so before any lease token leaves this call).
                    self.count.fetch_add(1, Ordering::SeqCst);
                    vacant.insert(state);
                }
                result
            }
        }
    }

    /// Runs `f` on every record, shard by shard under the shard's lock, and
    /// removes the records it leaves empty.
    fn sweep(&self, mut f: impl FnMut(&Bytes, &mut KeyState)) {
        self.table.retain(|key, state| {
            let before = state.footprint();
            f(key, state);
            state.kick();
            self.account(before, state.footprint());
            let keep = !state.is_empty();
            if !keep {
                self.count.fetch_sub(1, Ordering::SeqCst);
            }
            keep
        });
    }

    fn account(&self, before: Footprint, after: Footprint) {
        match (before.pending, after.pending) {
            (false, true) => {
                self.pending.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                self.pending.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        if after.stale_bytes != before.stale_bytes {
            self.stale_bytes
                .fetch_add(after.stale_bytes, Ordering::Relaxed);
            self.stale_bytes
                .fetch_sub(before.stale_bytes, Ordering::Relaxed);
        }
    }

    /// True when the keyspace may have records. `SeqCst` pairs with the
    /// increment in [`Records::update`]; see [`Keyspace::set`].
    fn any(&self) -> bool {
        self.count.load(Ordering::SeqCst) > 0
    }
}

/// A dirty (write-back) entry: written by a client, not yet stored in the
/// keyspace's store by the write-back worker.
#[derive(Clone, Debug)]
struct DirtyEntry {
    value: Bytes,
    version: u64,
    /// The TTL the entry gets when it becomes clean, counted from then: a
    /// dirty entry does not expire, because dropping it before the store
    /// has the value would lose read-your-writes.
    ttl: Option<Duration>,
    /// When it was written, for [`Store::list_dirty`].
    since: Instant,
}

impl DirtyEntry {
    /// The entry as a reader sees it: its whole TTL still ahead.
    fn as_stored(&self, now: Instant) -> Stored {
        Stored {
            value: self.value.clone(),
            version: self.version,
            expires_at: self.ttl.map(|ttl| now + ttl),
        }
    }
}

fn dirty_weight(key: &[u8], entry: &DirtyEntry) -> u64 {
    key.len() as u64 + entry.value.len() as u64 + ENTRY_OVERHEAD_BYTES
}

/// The newer of two entries; the first on a tie (dirty entries are passed
/// first, and a dirty and a clean entry of one version hold the same value).
fn newest(first: Option<Stored>, second: Option<Stored>) -> Option<Stored> {
    match (first, second) {
        (Some(a), Some(b)) => Some(if b.version > a.version { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// The dirty entries of one keyspace. They live outside moka so that no
/// eviction policy can drop them: moka may evict any entry, whatever its
/// weight. A key may have a dirty entry and a clean (cached) one; readers
/// see the newer.
#[derive(Default)]
struct DirtyTable {
    table: DashMap<Bytes, DirtyEntry>,
    /// Number of dirty entries, never below the true number: incremented
    /// before a dirty write looks at the cache and decremented after an
    /// entry is removed (or a write stored none). Reads skip the table when
    /// it is 0; clean writes check it inside their per-key compute (see
    /// [`Keyspace::put_clean`]).
    count: AtomicUsize,
    /// Weight of the dirty entries held, changed under the key's shard lock;
    /// a compare-and-swap reserves room, so `max_dirty_bytes` is exact.
    bytes: AtomicU64,
}

impl DirtyTable {
    fn any(&self) -> bool {
        self.count.load(Ordering::SeqCst) > 0
    }

    /// Accounts for an entry just removed from the table.
    fn forget(&self, key: &[u8], entry: &DirtyEntry) {
        self.bytes
            .fetch_sub(dirty_weight(key, entry), Ordering::SeqCst);
        self.count.fetch_sub(1, Ordering::SeqCst);
    }

    /// The key's dirty entry, if any; one atomic load when there is none.
    fn get(&self, key: &[u8]) -> Option<DirtyEntry> {
        if !self.any() {
            return None;
        }
        self.table.get(key).map(|entry| entry.value().clone())
    }
}

/// Lease tokens: unique per node process. A counter multiplied by an odd
/// constant is a bijection on u64, so tokens do not repeat before 2^64 of
/// them; the random start keeps a restarted node from handing out the
/// tokens of its previous life, which a slow client might still present.
struct Tokens {
    base: u64,
    next: AtomicU64,
}

impl Tokens {
    fn new() -> Self {
        // std's RandomState is seeded from the OS; no extra dependency.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        Tokens {
            base: hasher.finish(),
            next: AtomicU64::new(0),
        }
    }

    fn next(&self) -> u64 {
        loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let token = self
                .base
                .wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            // 0 means "no token" on the wire.
            if token != 0 {
                return token;
            }
        }
    }
}

fn bump(counter: &AtomicU64, by: u64) {
    // Counters are statistics, not synchronisation: relaxed is enough.
    counter.fetch_add(by, Ordering::Relaxed);
}

/// One keyspace: a byte-bounded cache of versioned entries, and the records
/// (leases, pending changes, stale values) of its keys.
pub struct Keyspace {
    name: String,
    cache: Cache<Bytes, Stored>,
    /// Striped per-key locks: every change of a key's cached entry happens
    /// under its stripe, in [`Keyspace::compute`] (or a removal).
    key_locks: Box<[Mutex<()>]>,
    records: Records,
    dirty: DirtyTable,
    max_dirty_bytes: u64,
    config: KeyspaceConfig,
    /// How long a timed-out pending change stays in doubt (`Fence`).
    in_doubt_ttl: Duration,
    counters: Arc<Counters>,
}

impl Keyspace {
    fn new(name: &str, config: KeyspaceConfig, in_doubt_ttl: Duration) -> Self {
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
            key_locks: (0..KEY_LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            records: Records::default(),
            dirty: DirtyTable::default(),
            max_dirty_bytes: config.max_dirty_bytes(),
            config,
            in_doubt_ttl,
            counters,
        }
    }

    /// The keyspace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The lock of `key`'s stripe.
    fn key_lock(&self, key: &[u8]) -> MutexGuard<'_, ()> {
        // FNV-1a: cheap for short keys. Adversarial keys could only crowd
        // one stripe (contention), never break the locking.
        let hash = key.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        // The modulo keeps the index in range, so the cast cannot truncate
        // a meaningful bit.
        let stripe = (hash % self.key_locks.len() as u64) as usize;
        // The lock guards no data (`()`), so a panic of another holder
        // leaves nothing inconsistent behind: ignore poisoning.
        self.key_locks[stripe]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the key's cached entry, lets `f` decide, and applies its
    /// decision, all under the key's lock: no other change of the key's
    /// entry can come in between.
    ///
    /// This replaces moka's `and_compute_with`, which gives the same
    /// atomicity but costs several times a plain insert (a waiter and a key
    /// lock inserted into and removed from two concurrent maps per call); on
    /// a single thread that was most of the time of a RESP `SET`.
    fn compute(&self, key: Bytes, f: impl FnOnce(Option<Stored>) -> Op<Stored>) -> Computed {
        let _key_lock = self.key_lock(&key);
        match f(self.cache.get(&key)) {
            Op::Nop => Computed::Unchanged,
            Op::Put(stored) => {
                self.cache.insert(key, stored);
                Computed::Put
            }
            Op::Remove => Computed::Removed(self.cache.remove(&key)),
        }
    }

    /// Removes the key's cached entry under its lock.
    fn remove_cached(&self, key: &[u8]) -> Option<Stored> {
        let _key_lock = self.key_lock(key);
        self.cache.remove(key)
    }

    /// The live entry, the newer of the dirty and the cached one, without
    /// counting the read.
    fn lookup(&self, key: &[u8], now: Instant) -> Option<Stored> {
        // Dirty first: `mark_clean` puts the entry into the cache before it
        // removes the dirty one (and readers of the table wait for its shard
        // lock), so a read racing with it finds one or the other.
        let dirty = self.dirty.get(key).map(|entry| entry.as_stored(now));
        let clean = self.cache.get(key).filter(|stored| stored.is_live(now));
        newest(dirty, clean)
    }

    fn live_version(&self, key: &[u8], now: Instant) -> u64 {
        self.lookup(key, now).map_or(0, |stored| stored.version)
    }

    fn count_read(&self, hit: bool) {
        bump(
            if hit {
                &self.counters.hits
            } else {
                &self.counters.misses
            },
            1,
        );
    }

    fn get(&self, key: &[u8], now: Instant) -> Option<Hit> {
        self.time_out_pending(key, now);
        let hit = self.lookup(key, now).map(|stored| stored.hit(now));
        self.count_read(hit.is_some());
        hit
    }

    /// Lazy pending timeout for reads: if the key's pending change is past
    /// its deadline, time it out now (deleting the live entry) instead of
    /// serving the live entry until the sweeper comes by. Costs one relaxed
    /// load while nothing is pending in the keyspace, so the read path of
    /// keyspaces without 2PC takes no lock.
    fn time_out_pending(&self, key: &[u8], now: Instant) {
        if self.records.pending.load(Ordering::Relaxed) == 0 {
            return;
        }
        // The read guard is a temporary of this statement, dropped before
        // `update` takes the same shard's write lock.
        let expired = self.records.table.get(key).is_some_and(|state| {
            state
                .pending
                .as_ref()
                .is_some_and(|pending| pending.deadline <= now)
        });
        if expired {
            self.records.update(Bytes::copy_from_slice(key), |state| {
                self.settle(key, state, now)
            });
        }
    }

    /// Brings a record up to date at `now`: drops an expired lease, stale
    /// value and in-doubt fence, and times out an expired pending change. A
    /// timed-out change also deletes the key's live entry: its writer may
    /// have committed the database and died before committing here, so the
    /// cached value may be stale, and absent is always safe. It stays in
    /// doubt (`Fence`) for `in_doubt_ttl`, so that the old value is not
    /// filled back while its writer may still commit. True when a change
    /// timed out. Called with the record's lock held.
    fn settle(&self, key: &[u8], state: &mut KeyState, now: Instant) -> bool {
        if state.lease.as_ref().is_some_and(|l| l.expires_at <= now) {
            state.lease = None;
        }
        if state.stale.as_ref().is_some_and(|s| !s.is_live(now)) {
            state.stale = None;
        }
        if state.fence.as_ref().is_some_and(|f| f.until <= now) {
            state.fence = None;
        }
        let timed_out = state.pending.as_ref().is_some_and(|p| p.deadline <= now);
        if timed_out {
            let pending = state.pending.take();
            if let Some(pending) = &pending
                && state
                    .fence
                    .as_ref()
                    .is_none_or(|f| f.version < pending.version)
            {
                state.fence = Some(Fence {
                    txn_id: pending.txn_id.clone(),
                    version: pending.version,
                    change: pending.change.clone(),
                    until: now + self.in_doubt_ttl,
                });
            }
            self.remove_cached(key);
            // A dirty entry older than the change is superseded too; a newer
            // one was written after the prepare and stays.
            if let Some(pending) = &pending
                && self.dirty.any()
                && let Some((key, entry)) = self
                    .dirty
                    .table
                    .remove_if(key, |_, entry| entry.version < pending.version)
            {
                self.dirty.forget(&key, &entry);
            }
            bump(&self.counters.pending_timeouts, 1);
            tracing::debug!(
                keyspace = %self.name,
                txn_id = pending.as_ref().map(|p| p.txn_id.as_str()),
                "pending change timed out; live entry deleted"
            );
        }
        timed_out
    }

    /// Stores a clean `new` under `condition`, fenced by the key's dirty
    /// entry; no counting.
    ///
    /// A dirty entry is the newest value the system has (the store does not
    /// have it yet), so a clean write of an equal or older version, whatever
    /// its condition, is refused (`StaleVersion`; `Exists` for `IfAbsent`),
    /// and a stored newer one replaces it: the store already has something
    /// newer.
    ///
    /// # Why the fast path is safe
    /// While the keyspace has no dirty entries the write skips the table. It
    /// re-checks the count inside its per-key compute, and a dirty write
    /// increments the count before its own compute on the key: the two
    /// computes are serialised by the key lock, so either this one runs
    /// first (and the dirty write then sees its value) or it sees the count
    /// and retries under the table's lock.
    fn put_clean(
        &self,
        key: Bytes,
        new: Stored,
        condition: WriteCondition,
        now: Instant,
    ) -> SetResult {
        if !self.dirty.any()
            && let Some(result) = self.put(key.clone(), new.clone(), condition, now, true)
        {
            return result;
        }
        match self.dirty.table.entry(key.clone()) {
            Entry::Occupied(dirty) => {
                let version = dirty.get().version;
                if condition == WriteCondition::IfAbsent {
                    return SetResult {
                        outcome: SetOutcome::Exists,
                        current_version: version,
                    };
                }
                if new.version <= version {
                    return SetResult {
                        outcome: SetOutcome::StaleVersion,
                        current_version: version,
                    };
                }
                // The dirty entry is live, so `IfPresent` holds whatever the
                // cache has.
                let condition = match condition {
                    WriteCondition::IfPresent => WriteCondition::Unconditional,
                    other => other,
                };
                let result = self
                    .put(key, new, condition, now, false)
                    .expect("put without bail always decides");
                if result.outcome == SetOutcome::Stored {
                    let (key, entry) = dirty.remove_entry();
                    self.dirty.forget(&key, &entry);
                }
                result
            }
            // The vacant slot holds the shard lock: no dirty write can come
            // in on this key until the put is done.
            Entry::Vacant(_) => self
                .put(key, new, condition, now, false)
                .expect("put without bail always decides"),
        }
    }

    /// Stores a dirty entry under `condition`, against the newer of the
    /// key's dirty and cached entries, within `max_dirty_bytes`. A stored
    /// dirty entry replaces both. No counting.
    fn put_dirty(
        &self,
        key: Bytes,
        new: DirtyEntry,
        condition: WriteCondition,
        now: Instant,
    ) -> Result<SetResult> {
        let weight = dirty_weight(&key, &new);
        // Before the compute below; see `put_clean`.
        self.dirty.count.fetch_add(1, Ordering::SeqCst);
        let slot = self.dirty.table.entry(key.clone());
        let old = match &slot {
            Entry::Occupied(occupied) => Some(occupied.get().clone()),
            Entry::Vacant(_) => None,
        };
        let old_weight = old.as_ref().map_or(0, |entry| dirty_weight(&key, entry));
        let mut refused: Option<Result<SetResult>> = None;
        self.compute(key.clone(), |current| {
            let clean = current.filter(|s| s.is_live(now));
            let had_clean = clean.is_some();
            let live = newest(old.as_ref().map(|entry| entry.as_stored(now)), clean);
            match (condition, live) {
                (WriteCondition::IfAbsent, Some(existing)) => {
                    refused = Some(Ok(SetResult {
                        outcome: SetOutcome::Exists,
                        current_version: existing.version,
                    }));
                    return Op::Nop;
                }
                (WriteCondition::IfNewerVersion, Some(existing))
                    if existing.version >= new.version =>
                {
                    refused = Some(Ok(SetResult {
                        outcome: SetOutcome::StaleVersion,
                        current_version: existing.version,
                    }));
                    return Op::Nop;
                }
                (WriteCondition::IfPresent, None) => {
                    refused = Some(Ok(SetResult {
                        outcome: SetOutcome::Missing,
                        current_version: 0,
                    }));
                    return Op::Nop;
                }
                _ => {}
            }
            let reserved =
                self.dirty
                    .bytes
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                        let next = held.saturating_sub(old_weight) + weight;
                        (next <= self.max_dirty_bytes).then_some(next)
                    });
            if let Err(held) = reserved {
                refused = Some(Err(Error::DirtyBytesExhausted {
                    keyspace: self.name.clone(),
                    bytes: held.saturating_sub(old_weight) + weight,
                    max: self.max_dirty_bytes,
                }));
                return Op::Nop;
            }
            // The dirty entry supersedes the cached one.
            if had_clean { Op::Remove } else { Op::Nop }
        });
        if let Some(refused) = refused {
            drop(slot);
            self.dirty.count.fetch_sub(1, Ordering::SeqCst);
            return refused;
        }
        let version = new.version;
        match slot {
            Entry::Occupied(mut occupied) => {
                occupied.insert(new);
                // Replaced, not added.
                self.dirty.count.fetch_sub(1, Ordering::SeqCst);
            }
            Entry::Vacant(vacant) => {
                vacant.insert(new);
            }
        }
        Ok(SetResult {
            outcome: SetOutcome::Stored,
            current_version: version,
        })
    }

    /// `MarkClean` of one key: the store holds `version` of it. A dirty
    /// entry of exactly that version becomes a clean cached entry
    /// (evictable, TTL counted from now); a dirty or cached entry of an
    /// older version is dropped, because the store holds a newer value
    /// (absent is always correct: readers load the stored one); a newer
    /// entry is left alone. The key's lease goes too, like a write's: a
    /// reader that loaded the row before the store had `version` must not
    /// fill it afterwards. True when an entry became clean or was dropped.
    ///
    /// Dropping rather than cleaning an older entry is what lets the cache
    /// recover from a write-back write whose cache write failed (issue 13,
    /// defect 4): the cache keeps the older value until the record is
    /// stored, and this is the moment it stops being the newest.
    fn mark_clean(&self, key: &[u8], version: u64, now: Instant) -> bool {
        if self.records.any() {
            self.records.update(Bytes::copy_from_slice(key), |state| {
                self.settle(key, state, now);
                state.lease = None;
                self.settle_stored(key, version, now)
            })
        } else {
            self.settle_stored(key, version, now)
        }
    }

    /// The cache part of [`Keyspace::mark_clean`].
    fn settle_stored(&self, key: &[u8], version: u64, now: Instant) -> bool {
        let key = Bytes::copy_from_slice(key);
        // A cached entry older than the stored version is superseded.
        let drop_older = |current: Option<Stored>| match current {
            Some(existing) if existing.version < version => Op::Remove,
            _ => Op::Nop,
        };
        if !self.dirty.any() {
            return matches!(self.compute(key, drop_older), Computed::Removed(Some(_)));
        }
        // The dirty shard stays locked through the compute (the lock order),
        // so no dirty write of the key comes in between.
        match self.dirty.table.entry(key.clone()) {
            Entry::Occupied(dirty) => {
                let dirty_version = dirty.get().version;
                if dirty_version > version {
                    return false;
                }
                if dirty_version == version {
                    let clean = dirty.get().as_stored(now);
                    // Into the cache first, then out of the table (see
                    // `lookup`); fenced in case a newer clean entry is
                    // cached.
                    self.compute(key, |current| match current.filter(|s| s.is_live(now)) {
                        Some(existing) if existing.version >= clean.version => Op::Nop,
                        _ => Op::Put(clean),
                    });
                } else {
                    self.compute(key, drop_older);
                }
                let (key, entry) = dirty.remove_entry();
                self.dirty.forget(&key, &entry);
                true
            }
            Entry::Vacant(_vacant) => {
                matches!(self.compute(key, drop_older), Computed::Removed(Some(_)))
            }
        }
    }

    /// Removes the key's dirty and cached entries of exactly `version`,
    /// leaving any other version: a write-back write the store will never
    /// hold (a `fast` write the broker refused, a dead-lettered record).
    /// Invalidates the lease like [`Keyspace::delete`]; true when an entry
    /// went.
    fn discard(&self, key: &[u8], version: u64, now: Instant) -> bool {
        let remove = || {
            let mut gone = false;
            if self.dirty.any()
                && let Some((key, entry)) = self
                    .dirty
                    .table
                    .remove_if(key, |_, entry| entry.version == version)
            {
                self.dirty.forget(&key, &entry);
                gone = true;
            }
            let removed = self.compute(Bytes::copy_from_slice(key), |current| match current {
                Some(existing) if existing.version == version => Op::Remove,
                _ => Op::Nop,
            });
            gone || matches!(removed, Computed::Removed(Some(_)))
        };
        let gone = if self.records.any() {
            self.records.update(Bytes::copy_from_slice(key), |state| {
                self.settle(key, state, now);
                state.lease = None;
                remove()
            })
        } else {
            remove()
        };
        if gone {
            bump(&self.counters.deletes, 1);
        }
        gone
    }

    /// The dirty entries written at least `min_age` before `now`, in key
    /// order after `after`, at most `limit`; and whether more follow.
    fn list_dirty(
        &self,
        min_age: Duration,
        after: &[u8],
        limit: usize,
        now: Instant,
    ) -> (Vec<(Bytes, u64)>, bool) {
        if !self.dirty.any() {
            return (Vec::new(), false);
        }
        // One shard read lock at a time; nothing else is locked meanwhile.
        let mut old: Vec<(Bytes, u64)> = self
            .dirty
            .table
            .iter()
            .filter(|e| e.key().as_ref() > after && now.duration_since(e.since) >= min_age)
            .map(|e| (e.key().clone(), e.version))
            .collect();
        old.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let more = old.len() > limit;
        old.truncate(limit);
        (old, more)
    }

    /// Removes the key's dirty and cached entries; returns the newer live
    /// one.
    fn remove_entries(&self, key: &[u8], now: Instant) -> Option<Stored> {
        let dirty = if self.dirty.any() {
            self.dirty.table.remove(key).map(|(key, entry)| {
                self.dirty.forget(&key, &entry);
                entry.as_stored(now)
            })
        } else {
            None
        };
        let clean = self.remove_cached(key).filter(|s| s.is_live(now));
        newest(dirty, clean)
    }

    /// Stores `new` under `condition` in one per-key compute; no counting. With
    /// `bail_if_dirty`, does nothing and returns `None` if the keyspace has
    /// dirty entries (see [`Keyspace::put_clean`]).
    fn put(
        &self,
        key: Bytes,
        new: Stored,
        condition: WriteCondition,
        now: Instant,
        bail_if_dirty: bool,
    ) -> Option<SetResult> {
        let mut refused: Option<SetResult> = None;
        let mut bailed = false;
        let version = new.version;
        let result = self.compute(key, |current| {
            if bail_if_dirty && self.dirty.any() {
                bailed = true;
                return Op::Nop;
            }
            let live = current.filter(|s| s.is_live(now));
            match (condition, live) {
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
                (WriteCondition::IfPresent, None) => {
                    refused = Some(SetResult {
                        outcome: SetOutcome::Missing,
                        current_version: 0,
                    });
                    Op::Nop
                }
                _ => Op::Put(new),
            }
        });
        if bailed {
            return None;
        }
        if let Some(refused) = refused {
            return Some(refused);
        }
        // The closure returned `Put` whenever it did not record a refusal.
        debug_assert!(matches!(result, Computed::Put));
        Some(SetResult {
            outcome: SetOutcome::Stored,
            current_version: version,
        })
    }

    /// The entry a write stores: key and value copied out of the request.
    fn stored(&self, value: &Bytes, version: u64, ttl: Option<Duration>, now: Instant) -> Stored {
        // Copy the value out of the request buffer: a `Bytes` decoded by
        // prost may be a slice of a much larger request (a whole MultiSet),
        // and keeping it would pin that buffer while the weigher counts only
        // the slice. The copy is on the write path; reads share the stored
        // `Bytes` without copying.
        Stored {
            value: Bytes::copy_from_slice(value),
            version,
            expires_at: ttl.or(self.config.default_ttl).map(|ttl| now + ttl),
        }
    }

    /// Writes one key.
    ///
    /// # Consistency with leases
    /// A write must invalidate the key's lease, atomically with its own cache
    /// operation, so that a fill loaded before the write cannot land after
    /// it. When the keyspace has records, the write does both under the
    /// record's lock ([`Records::update`]), which a fill also holds while it
    /// checks its lease and stores: the fill is entirely before the write
    /// (and the write then overwrites or deletes its value) or entirely after
    /// (and finds its lease gone).
    ///
    /// When the keyspace has no records at all (`Records::count` reads 0),
    /// the write skips the lock: no lease exists to invalidate. A lease
    /// granted concurrently is counted (`SeqCst`) before its token leaves the
    /// node, so in the `SeqCst` order it comes after this write's check, and
    /// that check comes after the writer's database change (the writer
    /// touches the cache after its database). The lease holder loads only
    /// after it receives the token, so it reads the new row, and a fill of
    /// the new row is correct; a `Set` racing with the grant is covered by
    /// the fill's version fence.
    ///
    /// # Errors
    /// [`Error::DirtyBytesExhausted`] for a dirty write beyond
    /// `max_dirty_bytes`; nothing is stored (the lease is still dropped).
    fn set(&self, item: SetItem, now: Instant) -> Result<SetResult> {
        let key = Bytes::copy_from_slice(&item.key);
        let write = |key: Bytes| {
            if item.dirty {
                let new = DirtyEntry {
                    // Copied out of the request buffer, as in `stored`.
                    value: Bytes::copy_from_slice(&item.value),
                    version: item.version,
                    ttl: item.ttl.or(self.config.default_ttl),
                    since: now,
                };
                self.put_dirty(key, new, item.condition, now)
            } else {
                let new = self.stored(&item.value, item.version, item.ttl, now);
                Ok(self.put_clean(key, new, item.condition, now))
            }
        };
        let result = if self.records.any() {
            self.records.update(key.clone(), |state| {
                self.settle(&key, state, now);
                state.lease = None;
                // A versioned clean write older than a change in doubt may
                // be the old row its writer is replacing (see `Fence`).
                if !item.dirty
                    && item.condition == WriteCondition::IfNewerVersion
                    && let Some(fenced) = state.fenced(item.version)
                {
                    return Ok(SetResult {
                        outcome: SetOutcome::StaleVersion,
                        current_version: fenced,
                    });
                }
                let result = write(key.clone());
                if result
                    .as_ref()
                    .is_ok_and(|r| r.outcome == SetOutcome::Stored)
                {
                    // A newer value is live; the old deleted one is no use.
                    state.stale = None;
                    state.superseded(item.version);
                }
                result
            })
        } else {
            write(key)
        };
        match &result {
            Ok(r) if r.outcome == SetOutcome::Stored => bump(&self.counters.sets, 1),
            Ok(_) => bump(&self.counters.sets_refused, 1),
            Err(_) => bump(&self.counters.dirty_refused, 1),
        }
        result
    }

    /// Sets the TTL of the key's live entry to `ttl` from `now`, keeping its
    /// value and version; false when no entry is live. A dirty entry keeps
    /// not expiring while dirty and gets `ttl` counted from when it becomes
    /// clean, like a dirty write's own TTL.
    fn expire(&self, key: &[u8], ttl: Duration, now: Instant) -> bool {
        self.time_out_pending(key, now);
        let key = Bytes::copy_from_slice(key);
        // The dirty shard first, then the key lock (the lock order); the
        // shard stays locked through the compute so that no dirty write can
        // come in between.
        let _dirty_shard = match self.dirty.table.entry(key.clone()) {
            Entry::Occupied(mut dirty) => {
                dirty.get_mut().ttl = Some(ttl);
                return true;
            }
            Entry::Vacant(vacant) => vacant,
        };
        let mut changed = false;
        self.compute(key, |current| match current.filter(|s| s.is_live(now)) {
            Some(mut live) => {
                live.expires_at = Some(now + ttl);
                changed = true;
                Op::Put(live)
            }
            None => Op::Nop,
        });
        changed
    }

    /// Adds `delta` to the key's value read as a decimal `i64` (absent
    /// reads as 0) and stores the result, keeping the entry's version and
    /// expiry (a new entry gets version 0 and the keyspace's default TTL).
    /// The read and the write are one compute under the key's lock, so
    /// concurrent increments never lose an update. Invalidates the key's
    /// lease like [`Keyspace::set`].
    ///
    /// # Errors
    /// [`Error::NotAnInteger`], [`Error::IncrementOverflow`], or
    /// [`Error::DirtyEntry`] when the key has a dirty entry (only a
    /// versioned write may replace it); nothing changes.
    fn incr(&self, key: &[u8], delta: i64, now: Instant) -> Result<i64> {
        let apply = |key: Bytes| -> Result<i64> {
            // Held through the compute, as in `expire`.
            let Entry::Vacant(_dirty_shard) = self.dirty.table.entry(key.clone()) else {
                return Err(Error::DirtyEntry);
            };
            let mut outcome = Err(Error::NotAnInteger);
            self.compute(key, |current| {
                let live = current.filter(|s| s.is_live(now));
                let (old, version, expires_at) = match live {
                    None => (Some(0), 0, self.config.default_ttl.map(|ttl| now + ttl)),
                    Some(stored) => (parse_i64(&stored.value), stored.version, stored.expires_at),
                };
                let Some(old) = old else {
                    outcome = Err(Error::NotAnInteger);
                    return Op::Nop;
                };
                let Some(new) = old.checked_add(delta) else {
                    outcome = Err(Error::IncrementOverflow);
                    return Op::Nop;
                };
                outcome = Ok(new);
                Op::Put(Stored {
                    value: Bytes::from(new.to_string()),
                    version,
                    expires_at,
                })
            });
            outcome
        };
        let key = Bytes::copy_from_slice(key);
        let result = if self.records.any() {
            self.records.update(key.clone(), |state| {
                self.settle(&key, state, now);
                state.lease = None;
                let result = apply(key.clone());
                if result.is_ok() {
                    state.stale = None;
                }
                result
            })
        } else {
            apply(key)
        };
        match &result {
            Ok(_) => bump(&self.counters.sets, 1),
            Err(_) => bump(&self.counters.sets_refused, 1),
        }
        result
    }

    /// Dirty bytes the keyspace would hold after storing the dirty ones of
    /// `items`, as far as can be told now (racing writes may change it).
    fn dirty_bytes_after(&self, items: &[SetItem]) -> u64 {
        items.iter().filter(|item| item.dirty).fold(
            self.dirty.bytes.load(Ordering::SeqCst),
            |held, item| {
                let replaced = self
                    .dirty
                    .get(&item.key)
                    .map_or(0, |old| dirty_weight(&item.key, &old));
                (held + item.key.len() as u64 + item.value.len() as u64 + ENTRY_OVERHEAD_BYTES)
                    .saturating_sub(replaced)
            },
        )
    }

    /// Deletes one key; true when a live entry went. Invalidates the lease
    /// like [`Keyspace::set`] (same argument for the lock-free path), and
    /// keeps the deleted value as stale if the keyspace keeps stale values.
    fn delete(&self, key: &[u8], now: Instant) -> bool {
        let deleted = if self.records.any() || self.config.keep_stale_for.is_some() {
            self.records.update(Bytes::copy_from_slice(key), |state| {
                self.settle(key, state, now);
                state.lease = None;
                let removed = self.remove_entries(key, now);
                if let Some(removed) = &removed {
                    self.keep_stale(state, removed, now);
                }
                removed.is_some()
            })
        } else {
            self.remove_entries(key, now).is_some()
        };
        if deleted {
            bump(&self.counters.deletes, 1);
        }
        deleted
    }

    /// A version-fenced invalidation: removes the key's live entry (clean or
    /// dirty) if it is older than `version`, and drops its lease whatever
    /// it holds; true when an entry went. A write-through writer sends it to
    /// a node that did not commit its change although the database did: the
    /// node may hold, or be about to fill, the value the change replaced.
    /// An entry of `version` or newer is correct (or newer) and stays.
    fn delete_below(&self, key: &[u8], version: u64, now: Instant) -> bool {
        let remove = |state: Option<&mut KeyState>| {
            let removed = self.remove_older(&Bytes::copy_from_slice(key), version, now);
            match (removed, state) {
                (Ok(Some(removed)), Some(state)) => {
                    self.keep_stale(state, &removed, now);
                    true
                }
                (Ok(removed), _) => removed.is_some(),
                (Err(_), _) => false,
            }
        };
        let deleted = if self.records.any() || self.config.keep_stale_for.is_some() {
            self.records.update(Bytes::copy_from_slice(key), |state| {
                self.settle(key, state, now);
                state.lease = None;
                remove(Some(state))
            })
        } else {
            // No record, so no lease to drop; see `Keyspace::set`.
            remove(None)
        };
        if deleted {
            bump(&self.counters.deletes, 1);
        }
        deleted
    }

    /// Keeps `removed` as the key's stale value, if the keyspace keeps stale
    /// values and the stale budget has room. Called under the record's lock.
    fn keep_stale(&self, state: &mut KeyState, removed: &Stored, now: Instant) {
        let Some(keep) = self.config.keep_stale_for else {
            return;
        };
        let budget = self.config.capacity_bytes / STALE_BUDGET_DIVISOR;
        // Racing deletes may each see room and overshoot the budget by a few
        // values; the budget guards memory, not an exact figure.
        let held = self
            .records
            .stale_bytes
            .load(Ordering::Relaxed)
            .saturating_sub(state.stale.as_ref().map_or(0, stale_weight));
        if held + stale_weight(removed) > budget {
            // The previous stale value is older than the one that would not
            // fit: drop it too rather than serve something staler.
            state.stale = None;
            return;
        }
        let until = now + keep;
        state.stale = Some(Stored {
            value: removed.value.clone(),
            version: removed.version,
            expires_at: Some(removed.expires_at.map_or(until, |at| at.min(until))),
        });
    }

    /// Drops every entry and every record. Records go first: once a lease is
    /// gone no fill can store under it, so a fill either stored before (and
    /// `invalidate_all` then drops its value) or is refused. moka marks all
    /// current entries invalid at once, so no read after this call returns
    /// an entry written before it. Pending changes and in-doubt fences are
    /// dropped too: their commits answer `committed = false`, after which a
    /// writer whose database committed invalidates the key here
    /// (`delete_below`).
    ///
    /// Dirty entries are dropped too: a client flushes a node only before
    /// routing to it again, and the write-back records are in Kafka, so
    /// only read-your-writes through this node is lost, never data.
    fn flush(&self) {
        // Waiting prepares keep their places; the next one is woken.
        self.records.sweep(|_, state| {
            *state = KeyState {
                queue: std::mem::take(&mut state.queue),
                ..KeyState::default()
            }
        });
        self.dirty.table.retain(|key, entry| {
            self.dirty.forget(key, entry);
            false
        });
        self.cache.invalidate_all();
    }

    /// `LeaseGet`: a hit, or on a miss the key's lease, or a wait.
    fn lease_get(&self, key: &[u8], now: Instant, tokens: &Tokens) -> LeaseRead {
        if let Some(hit) = self.get(key, now) {
            return LeaseRead::Hit(hit);
        }
        // The miss is decided under the record's lock, so two racing misses
        // cannot both be granted.
        self.records.update(Bytes::copy_from_slice(key), |state| {
            self.settle(key, state, now);
            // A fill or a write may have stored a value since the unlocked
            // read above; granting a lease then would only cause a wasted
            // load.
            if let Some(stored) = self.lookup(key, now) {
                return LeaseRead::Hit(stored.hit(now));
            }
            if state.pending.is_none() && state.lease.is_none() {
                let token = tokens.next();
                state.lease = Some(Lease {
                    token,
                    expires_at: now + self.config.lease_ttl,
                });
                bump(&self.counters.leases_granted, 1);
                return LeaseRead::Granted { token };
            }
            bump(&self.counters.lease_waits, 1);
            LeaseRead::Wait {
                retry_after: self.config.lease_retry_after,
                stale: state.stale.as_ref().map(|s| s.hit(now)),
            }
        })
    }

    /// `Fill`: stores `item` if `token` is the key's current, unexpired
    /// lease and no change is pending; always fenced (`IfNewerVersion`)
    /// against the live entry. The check and the store are one critical
    /// section under the record's lock (see [`Keyspace::set`]).
    fn fill(&self, item: SetItem, token: u64, now: Instant) -> FillResult {
        let refused = |current_version| {
            bump(&self.counters.fills_refused, 1);
            FillResult {
                outcome: FillOutcome::LeaseInvalid,
                current_version,
            }
        };
        if token == 0 || !self.records.any() {
            // No record, so no lease: nothing to lock for.
            return refused(self.live_version(&item.key, now));
        }
        let key = Bytes::copy_from_slice(&item.key);
        self.records.update(key.clone(), |state| {
            self.settle(&key, state, now);
            let holds =
                state.pending.is_none() && state.lease.as_ref().is_some_and(|l| l.token == token);
            if !holds {
                return refused(self.live_version(&key, now));
            }
            // Stored or fenced off, the holder is done with the lease.
            state.lease = None;
            // The loaded row may be the one a change in doubt replaces.
            if let Some(fenced) = state.fenced(item.version) {
                bump(&self.counters.fills_refused, 1);
                return FillResult {
                    outcome: FillOutcome::StaleVersion,
                    current_version: fenced,
                };
            }
            let new = self.stored(&item.value, item.version, item.ttl, now);
            let result = self.put_clean(key.clone(), new, WriteCondition::IfNewerVersion, now);
            if result.outcome == SetOutcome::Stored {
                state.stale = None;
                state.superseded(item.version);
                bump(&self.counters.fills_stored, 1);
                FillResult {
                    outcome: FillOutcome::Stored,
                    current_version: result.current_version,
                }
            } else {
                bump(&self.counters.fills_refused, 1);
                FillResult {
                    outcome: FillOutcome::StaleVersion,
                    current_version: result.current_version,
                }
            }
        })
    }

    /// `ReleaseLease`: drops the key's lease if `token` is the current one;
    /// true when it was.
    fn release_lease(&self, key: &[u8], token: u64, now: Instant) -> bool {
        if token == 0 || !self.records.any() {
            return false;
        }
        self.records.update(Bytes::copy_from_slice(key), |state| {
            self.settle(key, state, now);
            state.lease.take_if(|l| l.token == token).is_some()
        })
    }

    /// `Prepare`: records `prepare` as the key's pending change, unless
    /// another transaction is pending or the live version is equal or newer.
    /// Invalidates the key's lease: a fill loaded before the writer's
    /// database change must not land.
    fn prepare(&self, prepare: &Prepare, timeout: Duration, now: Instant) -> PrepareResult {
        match self.prepare_step(prepare, timeout, None, now) {
            PrepareStep::Done(result) => result,
            PrepareStep::Wait { .. } => unreachable!("a prepare without a ticket never waits"),
        }
    }

    /// A prepare that may wait its turn: with `turn = Some((ticket,
    /// may_wait))`, it runs only when no other change is pending and no
    /// prepare that queued before it is still waiting (see
    /// [`PrepareQueue`]); otherwise, while `may_wait`, it joins the key's
    /// queue and answers [`PrepareStep::Wait`], and once it may not, it is
    /// refused as busy and leaves the queue. Without a ticket, it is
    /// [`Keyspace::prepare`], which never queues (and may overtake
    /// waiters: clients that do not wait keep their old behaviour).
    fn prepare_step(
        &self,
        prepare: &Prepare,
        timeout: Duration,
        turn: Option<(Ticket, bool)>,
        now: Instant,
    ) -> PrepareStep {
        let key = Bytes::copy_from_slice(&prepare.item.key);
        self.records.update(key.clone(), |state| {
            let mut step = self.prepare_in_record(&key, state, prepare, timeout, turn, now);
            if let PrepareStep::Done(result) = &mut step {
                result.in_doubt = state.fence.as_ref().map(|f| f.txn_id.clone());
            }
            step
        })
    }

    /// [`Keyspace::prepare_step`] on the key's record, under its lock.
    fn prepare_in_record(
        &self,
        key: &Bytes,
        state: &mut KeyState,
        prepare: &Prepare,
        timeout: Duration,
        turn: Option<(Ticket, bool)>,
        now: Instant,
    ) -> PrepareStep {
        {
            self.settle(key, state, now);
            let live = self.lookup(key, now);
            let current_version = live.as_ref().map_or(0, |stored| stored.version);
            let busy = PrepareResult {
                prepared: false,
                current_version,
                busy: true,
                in_doubt: None,
            };
            let other_pending = match &state.pending {
                // The writer retried its prepare: idempotent.
                Some(pending) if pending.txn_id == prepare.txn_id => {
                    if let Some((ticket, _)) = turn {
                        state.queue.leave(ticket);
                    }
                    return PrepareStep::Done(PrepareResult {
                        prepared: true,
                        current_version,
                        busy: false,
                        in_doubt: None,
                    });
                }
                Some(_) => true,
                None => false,
            };
            if let Some((ticket, may_wait)) = turn {
                let pending_until = state.pending.as_ref().map(|p| p.deadline);
                match state.queue.admit(ticket, other_pending) {
                    // It had the turn, but a prepare that does not queue
                    // took the key meanwhile: first in line again.
                    Admission::Go if other_pending && may_wait => {
                        let woken = state.queue.join(ticket, true);
                        return PrepareStep::Wait {
                            woken,
                            pending_until,
                        };
                    }
                    Admission::Go => {}
                    Admission::Wait if may_wait => {
                        let woken = state.queue.join(ticket, false);
                        return PrepareStep::Wait {
                            woken,
                            pending_until,
                        };
                    }
                    Admission::Wait => {
                        state.queue.leave(ticket);
                        return PrepareStep::Done(busy);
                    }
                }
            }
            if other_pending {
                return PrepareStep::Done(busy);
            }
            let refused = PrepareResult {
                busy: false,
                ..busy
            };
            if live.is_some_and(|live| live.version >= prepare.item.version) {
                return PrepareStep::Done(refused);
            }
            // Its commit would be refused by the fence, or (if the change in
            // doubt is rolled back) it may be retried then.
            if let Some(fenced) = state.fenced(prepare.item.version) {
                return PrepareStep::Done(PrepareResult {
                    current_version: current_version.max(fenced),
                    ..refused
                });
            }
            let change = if prepare.delete {
                Change::Delete
            } else {
                Change::Put {
                    value: Bytes::copy_from_slice(&prepare.item.value),
                    ttl: prepare.item.ttl,
                }
            };
            state.lease = None;
            state.pending = Some(Pending {
                txn_id: prepare.txn_id.clone(),
                version: prepare.item.version,
                change,
                deadline: now + timeout,
            });
            bump(&self.counters.prepares, 1);
            PrepareStep::Done(PrepareResult {
                prepared: true,
                current_version,
                busy: false,
                in_doubt: None,
            })
        }
    }

    /// A prepare holding `ticket` gives up waiting; see
    /// [`PrepareQueue::leave`].
    fn leave_queue(&self, key: &[u8], ticket: Ticket) {
        if !self.records.any() {
            return;
        }
        self.records.update(Bytes::copy_from_slice(key), |state| {
            state.queue.leave(ticket)
        });
    }

    /// `Commit`: applies the transaction's pending change, or its change in
    /// doubt (`Fence`) if it timed out, fenced against the live entry, and
    /// drops the record of it.
    fn commit(&self, key: &[u8], txn_id: &str, now: Instant) -> CommitResult {
        if !self.records.any() {
            return CommitResult {
                committed: false,
                current_version: self.live_version(key, now),
            };
        }
        let key = Bytes::copy_from_slice(key);
        self.records.update(key.clone(), |state| {
            self.settle(&key, state, now);
            let (version, change) =
                if let Some(pending) = state.pending.take_if(|p| p.txn_id == txn_id) {
                    // No lease can exist while a change is pending (prepare drops
                    // it, LeaseGet grants none), so there is none to invalidate.
                    debug_assert!(state.lease.is_none(), "lease granted while pending");
                    (pending.version, pending.change)
                } else if let Some(fence) = state.fence.take_if(|f| f.txn_id == txn_id) {
                    // A late commit: a lease granted since the timeout was for a
                    // load that may predate the database commit.
                    state.lease = None;
                    (fence.version, fence.change)
                } else {
                    return CommitResult {
                        committed: false,
                        current_version: self.live_version(&key, now),
                    };
                };
            bump(&self.counters.commits, 1);
            let current_version = match change {
                Change::Put { value, ttl } => {
                    let new = Stored {
                        value,
                        version,
                        expires_at: ttl.or(self.config.default_ttl).map(|ttl| now + ttl),
                    };
                    let result =
                        self.put_clean(key.clone(), new, WriteCondition::IfNewerVersion, now);
                    if result.outcome == SetOutcome::Stored {
                        state.stale = None;
                        state.superseded(version);
                    }
                    result.current_version
                }
                Change::Delete => match self.remove_older(&key, version, now) {
                    Ok(removed) => {
                        if let Some(removed) = &removed {
                            self.keep_stale(state, removed, now);
                        }
                        state.superseded(version);
                        0
                    }
                    Err(winner) => winner,
                },
            };
            CommitResult {
                committed: true,
                current_version,
            }
        })
    }

    /// Removes the key's entry unless a live entry of `version` or newer
    /// exists (then `Err` with that version). `Ok` carries the removed live
    /// entry, if there was one.
    fn remove_older(&self, key: &Bytes, version: u64, now: Instant) -> Result<Option<Stored>, u64> {
        let mut removed_dirty = None;
        if self.dirty.any()
            && let Entry::Occupied(dirty) = self.dirty.table.entry(key.clone())
        {
            if dirty.get().version >= version {
                return Err(dirty.get().version);
            }
            let (key, entry) = dirty.remove_entry();
            self.dirty.forget(&key, &entry);
            removed_dirty = Some(entry.as_stored(now));
        }
        let mut winner = None;
        let result = self.compute(key.clone(), |current| {
            match current.filter(|s| s.is_live(now)) {
                Some(live) if live.version >= version => {
                    winner = Some(live.version);
                    Op::Nop
                }
                _ => Op::Remove,
            }
        });
        if let Some(winner) = winner {
            return Err(winner);
        }
        let removed_clean = match result {
            Computed::Removed(removed) => removed.filter(|s| s.is_live(now)),
            _ => None,
        };
        Ok(newest(removed_dirty, removed_clean))
    }

    /// `Abort`: drops the transaction's pending change, or its change in
    /// doubt (its database side was rolled back, so the fence is no longer
    /// needed); true when it existed.
    fn abort(&self, key: &[u8], txn_id: &str, now: Instant) -> bool {
        if !self.records.any() {
            return false;
        }
        self.records.update(Bytes::copy_from_slice(key), |state| {
            self.settle(key, state, now);
            let aborted = state.pending.take_if(|p| p.txn_id == txn_id).is_some()
                || state.fence.take_if(|f| f.txn_id == txn_id).is_some();
            if aborted {
                bump(&self.counters.aborts, 1);
            }
            aborted
        })
    }

    /// Times out expired pending changes and drops expired leases and stale
    /// values; returns the number of pending changes timed out.
    fn sweep(&self, now: Instant) -> usize {
        if !self.records.any() {
            return 0;
        }
        let mut timed_out = 0;
        self.records.sweep(|key, state| {
            if self.settle(key, state, now) {
                timed_out += 1;
            }
        });
        timed_out
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
            leases_granted: load(&c.leases_granted),
            lease_waits: load(&c.lease_waits),
            fills_stored: load(&c.fills_stored),
            fills_refused: load(&c.fills_refused),
            prepares: load(&c.prepares),
            commits: load(&c.commits),
            aborts: load(&c.aborts),
            pending_timeouts: load(&c.pending_timeouts),
            dirty_items: self.dirty.table.len() as u64,
            dirty_bytes: self.dirty.bytes.load(Ordering::Relaxed),
            max_dirty_bytes: self.max_dirty_bytes,
            dirty_refused: load(&c.dirty_refused),
        }
    }
}

/// A value read as Redis reads an integer: decimal, optional sign, within
/// `i64`.
fn parse_i64(value: &[u8]) -> Option<i64> {
    if value.is_empty() || value.len() > 20 {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
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
            dirty: false,
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
    fn if_present_stores_only_over_a_live_entry() {
        let s = store("");
        let missing = s
            .set("default", item("k", "a", 0, WriteCondition::IfPresent))
            .unwrap();
        assert_eq!(missing.outcome, SetOutcome::Missing);
        assert_eq!(s.get("default", b"k").unwrap(), None);
        s.set("default", item("k", "a", 0, WriteCondition::Unconditional))
            .unwrap();
        let stored = s
            .set("default", item("k", "b", 0, WriteCondition::IfPresent))
            .unwrap();
        assert_eq!(stored.outcome, SetOutcome::Stored);
        assert_eq!(s.get("default", b"k").unwrap().unwrap().value, "b");
    }

    #[test]
    fn incr_is_atomic_and_keeps_version_and_expiry() {
        let s = Arc::new(store(""));
        assert_eq!(s.incr("default", b"n", 5).unwrap(), 5);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = Arc::clone(&s);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        s.incr("default", b"n", 1).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(s.incr("default", b"n", -5).unwrap(), 4000);
        let mut with_ttl = item("t", "41", 9, WriteCondition::Unconditional);
        with_ttl.ttl = Some(Duration::from_secs(60));
        s.set("default", with_ttl).unwrap();
        assert_eq!(s.incr("default", b"t", 1).unwrap(), 42);
        let hit = s.get("default", b"t").unwrap().unwrap();
        assert_eq!((hit.value.as_ref(), hit.version), (&b"42"[..], 9));
        assert!(hit.ttl_remaining.is_some());
        s.set(
            "default",
            item("x", "abc", 0, WriteCondition::Unconditional),
        )
        .unwrap();
        assert!(matches!(
            s.incr("default", b"x", 1),
            Err(Error::NotAnInteger)
        ));
        s.set(
            "default",
            item("m", &i64::MAX.to_string(), 0, WriteCondition::Unconditional),
        )
        .unwrap();
        assert!(matches!(
            s.incr("default", b"m", 1),
            Err(Error::IncrementOverflow)
        ));
        let mut dirty = item("d", "1", 3, WriteCondition::Unconditional);
        dirty.dirty = true;
        s.set("default", dirty).unwrap();
        assert!(matches!(s.incr("default", b"d", 1), Err(Error::DirtyEntry)));
    }

    #[test]
    fn expire_changes_only_the_ttl_of_a_live_entry() {
        let s = store("");
        assert!(!s.expire("default", b"k", Duration::from_secs(5)).unwrap());
        s.set("default", item("k", "v", 7, WriteCondition::Unconditional))
            .unwrap();
        assert_eq!(s.get("default", b"k").unwrap().unwrap().ttl_remaining, None);
        assert!(s.expire("default", b"k", Duration::from_secs(5)).unwrap());
        let hit = s.get("default", b"k").unwrap().unwrap();
        assert_eq!((hit.value.as_ref(), hit.version), (&b"v"[..], 7));
        assert!(hit.ttl_remaining.unwrap() <= Duration::from_secs(5));
        assert!(s.expire("default", b"k", Duration::from_millis(1)).unwrap());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(s.get("default", b"k").unwrap(), None);
        assert!(matches!(
            s.expire("default", b"k", Duration::from_secs(400 * 24 * 3600)),
            Err(Error::TtlOutOfRange { .. })
        ));
    }

    #[test]
    fn expired_entries_are_not_read_even_before_moka_removes_them() {
        let s = store("");
        let ks = s.keyspace("default").unwrap();
        let t0 = Instant::now();
        let mut it = item("k", "v", 1, WriteCondition::Unconditional);
        it.ttl = Some(Duration::from_secs(10));
        ks.set(it, t0).unwrap();
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
        assert_eq!(r.unwrap().outcome, SetOutcome::Stored);
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

    // ---- leases ----

    fn keyspace(toml_keyspace: &str) -> Keyspace {
        let mut config = Config::from_toml(&format!("[keyspaces.t]\n{toml_keyspace}")).unwrap();
        config.validate().unwrap();
        Keyspace::new(
            "t",
            config.keyspaces["t"].clone(),
            config.limits.in_doubt_ttl,
        )
    }

    fn token(read: LeaseRead) -> u64 {
        match read {
            LeaseRead::Granted { token } => token,
            other => panic!("expected a lease, got {other:?}"),
        }
    }

    fn fill_item(key: &str, value: &str, version: u64) -> SetItem {
        // The condition is ignored by fills; Unconditional proves it.
        item(key, value, version, WriteCondition::Unconditional)
    }

    #[test]
    fn a_cold_key_gets_one_lease_and_the_others_wait() {
        let ks = keyspace("");
        let tokens = Tokens::new();
        let now = Instant::now();
        let t = token(ks.lease_get(b"k", now, &tokens));
        assert_ne!(t, 0);
        for _ in 0..3 {
            assert_eq!(
                ks.lease_get(b"k", now, &tokens),
                LeaseRead::Wait {
                    retry_after: crate::config::DEFAULT_LEASE_RETRY_AFTER,
                    stale: None
                }
            );
        }
        let r = ks.fill(fill_item("k", "v", 3), t, now);
        assert_eq!(
            r,
            FillResult {
                outcome: FillOutcome::Stored,
                current_version: 3
            }
        );
        let LeaseRead::Hit(hit) = ks.lease_get(b"k", now, &tokens) else {
            panic!("filled key must hit");
        };
        assert_eq!((hit.value.as_ref(), hit.version), (&b"v"[..], 3));
        // The lease was released by the fill: the record is gone.
        assert_eq!(ks.records.count.load(Ordering::SeqCst), 0);
        let stats = ks.stats();
        assert_eq!(
            (
                stats.leases_granted,
                stats.lease_waits,
                stats.fills_stored,
                stats.fills_refused
            ),
            (1, 3, 1, 0)
        );
        assert_eq!((stats.hits, stats.misses), (1, 4));
    }

    #[test]
    fn fills_without_the_current_lease_are_refused() {
        let ks = keyspace("");
        let tokens = Tokens::new();
        let now = Instant::now();
        // Never granted.
        assert_eq!(
            ks.fill(fill_item("k", "v", 1), 0, now).outcome,
            FillOutcome::LeaseInvalid
        );
        assert_eq!(
            ks.fill(fill_item("k", "v", 1), 12345, now).outcome,
            FillOutcome::LeaseInvalid
        );
        let t = token(ks.lease_get(b"k", now, &tokens));
        // Wrong token for this key, and a token of another key.
        let other = token(ks.lease_get(b"other", now, &tokens));
        assert_eq!(
            ks.fill(fill_item("k", "v", 1), other, now).outcome,
            FillOutcome::LeaseInvalid
        );
        assert_eq!(
            ks.fill(fill_item("k", "v", 1), t.wrapping_add(1), now)
                .outcome,
            FillOutcome::LeaseInvalid
        );
        assert_eq!(
            ks.fill(fill_item("k", "v", 1), t, now).outcome,
            FillOutcome::Stored
        );
        // Used once: the lease is released.
        ks.delete(b"k", now);
        assert_eq!(
            ks.fill(fill_item("k", "v", 2), t, now).outcome,
            FillOutcome::LeaseInvalid
        );
        assert!(ks.get(b"k", now).is_none());
        assert_eq!(ks.stats().fills_refused, 5);
    }

    #[test]
    fn expired_leases_free_the_key() {
        let ks = keyspace("lease_ttl = \"2s\"");
        let tokens = Tokens::new();
        let t0 = Instant::now();
        let first = token(ks.lease_get(b"k", t0, &tokens));
        assert!(matches!(
            ks.lease_get(b"k", t0 + Duration::from_millis(1999), &tokens),
            LeaseRead::Wait { .. }
        ));
        let later = t0 + Duration::from_secs(2);
        let second = token(ks.lease_get(b"k", later, &tokens));
        assert_ne!(first, second);
        assert_eq!(
            ks.fill(fill_item("k", "v", 1), first, later).outcome,
            FillOutcome::LeaseInvalid
        );
        // The new holder's lease expires too, and then its fill is refused.
        assert_eq!(
            ks.fill(
                fill_item("k", "v", 1),
                second,
                later + Duration::from_secs(2)
            )
            .outcome,
            FillOutcome::LeaseInvalid
        );
    }

    #[test]
    fn every_write_touching_the_key_invalidates_its_lease() {
        let s = store("[keyspaces.other]");
        let lease = |key: &str| token(s.lease_get("default", key.as_bytes()).unwrap());
        let fill = |key: &str, t| {
            s.fill("default", fill_item(key, "loaded-before", 1), t)
                .unwrap()
                .outcome
        };

        let t = lease("deleted");
        s.delete("default", b"deleted").unwrap();
        assert_eq!(fill("deleted", t), FillOutcome::LeaseInvalid);
        assert_eq!(s.get("default", b"deleted").unwrap(), None);

        let t = lease("set");
        s.set(
            "default",
            item("set", "written", 0, WriteCondition::Unconditional),
        )
        .unwrap();
        assert_eq!(fill("set", t), FillOutcome::LeaseInvalid);
        assert_eq!(s.get("default", b"set").unwrap().unwrap().value, "written");

        let t = lease("multi");
        s.multi_set(
            "default",
            vec![
                item("unrelated", "x", 1, WriteCondition::Unconditional),
                item("multi", "written", 9, WriteCondition::IfNewerVersion),
            ],
        )
        .unwrap();
        assert_eq!(fill("multi", t), FillOutcome::LeaseInvalid);

        // A refused write still touched the key.
        s.set(
            "default",
            item("refused", "v", 5, WriteCondition::Unconditional),
        )
        .unwrap();
        s.delete("default", b"refused").unwrap();
        let t = lease("refused");
        s.set("default", item("refused", "w", 0, WriteCondition::IfAbsent))
            .unwrap();
        assert_eq!(fill("refused", t), FillOutcome::LeaseInvalid);

        let t = lease("flushed");
        s.flush(Some("default")).unwrap();
        assert_eq!(fill("flushed", t), FillOutcome::LeaseInvalid);

        // A flush of another keyspace leaves this keyspace's leases alone.
        let t = lease("kept");
        s.flush(Some("other")).unwrap();
        assert_eq!(fill("kept", t), FillOutcome::Stored);
    }

    #[test]
    fn a_fill_is_fenced_against_a_live_entry() {
        let ks = keyspace("");
        let tokens = Tokens::new();
        let now = Instant::now();
        let t = token(ks.lease_get(b"k", now, &tokens));
        // A write that raced past the lease (the lock-free path of a keyspace
        // with no records) is modelled by storing without touching records.
        let racing = ks.stored(&Bytes::from_static(b"new"), 7, None, now);
        ks.put(
            Bytes::from_static(b"k"),
            racing,
            WriteCondition::Unconditional,
            now,
            false,
        );
        assert_eq!(
            ks.fill(fill_item("k", "old", 7), t, now),
            FillResult {
                outcome: FillOutcome::StaleVersion,
                current_version: 7
            }
        );
        assert_eq!(ks.get(b"k", now).unwrap().value, "new");
        // The lease was released all the same.
        assert_eq!(ks.records.count.load(Ordering::SeqCst), 0);
        assert_eq!(ks.stats().fills_refused, 1);
    }

    #[test]
    fn deleted_values_are_kept_as_stale_only_when_configured() {
        let ks = keyspace("keep_stale_for = \"5s\"");
        let tokens = Tokens::new();
        let t0 = Instant::now();
        ks.set(item("k", "old", 4, WriteCondition::Unconditional), t0)
            .unwrap();
        assert!(ks.delete(b"k", t0));
        // Never a hit.
        assert_eq!(ks.get(b"k", t0), None);
        // The lease holder gets no stale value; the waiters do.
        let t = token(ks.lease_get(b"k", t0, &tokens));
        let LeaseRead::Wait {
            stale: Some(stale), ..
        } = ks.lease_get(b"k", t0 + Duration::from_secs(1), &tokens)
        else {
            panic!("a waiter must get the stale value");
        };
        assert_eq!((stale.value.as_ref(), stale.version), (&b"old"[..], 4));
        assert_eq!(stale.ttl_remaining, Some(Duration::from_secs(4)));
        // After the window, no stale value.
        assert_eq!(
            ks.lease_get(b"k", t0 + Duration::from_secs(5), &tokens),
            LeaseRead::Wait {
                retry_after: crate::config::DEFAULT_LEASE_RETRY_AFTER,
                stale: None
            }
        );
        // A fill drops the stale value with the lease.
        ks.fill(fill_item("k", "new", 5), t, t0 + Duration::from_secs(1));
        assert_eq!(ks.records.count.load(Ordering::SeqCst), 0);
        assert_eq!(ks.records.stale_bytes.load(Ordering::Relaxed), 0);

        // Without keep_stale_for, nothing is kept and no record is made.
        let plain = keyspace("");
        plain
            .set(item("k", "old", 4, WriteCondition::Unconditional), t0)
            .unwrap();
        plain.delete(b"k", t0);
        assert_eq!(plain.records.count.load(Ordering::SeqCst), 0);
        token(plain.lease_get(b"k", t0, &tokens));
        assert_eq!(
            plain.lease_get(b"k", t0, &tokens),
            LeaseRead::Wait {
                retry_after: crate::config::DEFAULT_LEASE_RETRY_AFTER,
                stale: None
            }
        );
    }

    #[test]
    fn stale_values_stay_within_their_budget() {
        // Budget: capacity / 8 = 16 KiB, so at most a few 4 KiB values.
        let ks = keyspace("capacity_bytes = 1200000\nkeep_stale_for = \"1m\"");
        let now = Instant::now();
        let value = "x".repeat(100_000);
        for i in 0..20 {
            let key = format!("k{i}");
            ks.set(item(&key, &value, 1, WriteCondition::Unconditional), now)
                .unwrap();
            ks.delete(key.as_bytes(), now);
        }
        let held = ks.records.stale_bytes.load(Ordering::Relaxed);
        assert!(held <= 1_200_000 / STALE_BUDGET_DIVISOR, "{held}");
        assert!(held > 0);
    }

    #[test]
    fn tokens_are_unique_and_never_zero() {
        let tokens = Tokens::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100_000 {
            let t = tokens.next();
            assert_ne!(t, 0);
            assert!(seen.insert(t), "token {t} repeated");
        }
        // Another process (here: another source) starts elsewhere.
        assert_ne!(Tokens::new().base, tokens.base);
    }

    #[test]
    fn the_record_table_is_swept_of_expired_leases() {
        let ks = keyspace("lease_ttl = \"1s\"\nkeep_stale_for = \"2s\"");
        let tokens = Tokens::new();
        let t0 = Instant::now();
        for i in 0..1000 {
            token(ks.lease_get(format!("k{i}").as_bytes(), t0, &tokens));
        }
        ks.set(item("s", "v", 1, WriteCondition::Unconditional), t0)
            .unwrap();
        ks.delete(b"s", t0);
        assert_eq!(ks.records.count.load(Ordering::SeqCst), 1001);
        assert_eq!(ks.sweep(t0 + Duration::from_millis(999)), 0);
        assert_eq!(ks.records.table.len(), 1001);
        ks.sweep(t0 + Duration::from_secs(1));
        assert_eq!(ks.records.table.len(), 1, "only the stale value is left");
        ks.sweep(t0 + Duration::from_secs(2));
        assert_eq!(ks.records.table.len(), 0);
        assert_eq!(ks.records.count.load(Ordering::SeqCst), 0);
        assert_eq!(ks.records.stale_bytes.load(Ordering::Relaxed), 0);
    }

    /// The stale-set race, hammered. Each round, a writer bumps the
    /// "database" version and then deletes the key, while readers miss, take
    /// the lease, read the database and fill. A fill of a version read before
    /// the bump held a lease granted before the delete, which the delete
    /// invalidated; so once a delete has returned, no read sees an older
    /// version, and at the end of each round the live entry (if any) holds
    /// the latest version.
    #[test]
    fn no_fill_survives_a_later_delete() {
        const ROUNDS: usize = 3000;
        const READERS: usize = 2;
        for keep_stale in ["", "keep_stale_for = \"1s\""] {
            let ks = Arc::new(keyspace(keep_stale));
            let tokens = Arc::new(Tokens::new());
            let database = Arc::new(AtomicU64::new(1));
            // The database version whose delete has returned.
            let deleted_upto = Arc::new(AtomicU64::new(0));
            let barrier = Arc::new(std::sync::Barrier::new(READERS + 1));
            // Readers record what they saw instead of panicking, which would
            // leave the others waiting at the barrier forever.
            let stale_reads = Arc::new(AtomicU64::new(0));
            let readers: Vec<_> = (0..READERS)
                .map(|_| {
                    let (ks, tokens, database, deleted_upto, barrier, stale_reads) = (
                        Arc::clone(&ks),
                        Arc::clone(&tokens),
                        Arc::clone(&database),
                        Arc::clone(&deleted_upto),
                        Arc::clone(&barrier),
                        Arc::clone(&stale_reads),
                    );
                    std::thread::spawn(move || {
                        for _ in 0..ROUNDS {
                            barrier.wait();
                            for _ in 0..4 {
                                let floor = deleted_upto.load(Ordering::SeqCst);
                                match ks.lease_get(b"k", Instant::now(), &tokens) {
                                    LeaseRead::Hit(hit) => {
                                        if hit.version < floor {
                                            stale_reads.fetch_add(1, Ordering::SeqCst);
                                        }
                                    }
                                    LeaseRead::Granted { token } => {
                                        let version = database.load(Ordering::SeqCst);
                                        let loaded = SetItem {
                                            key: Bytes::from_static(b"k"),
                                            value: Bytes::from(version.to_string()),
                                            version,
                                            ttl: None,
                                            condition: WriteCondition::Unconditional,
                                            dirty: false,
                                        };
                                        ks.fill(loaded, token, Instant::now());
                                    }
                                    LeaseRead::Wait { .. } => std::thread::yield_now(),
                                }
                            }
                            barrier.wait();
                        }
                    })
                })
                .collect();
            let mut survivors = 0;
            for _ in 0..ROUNDS {
                barrier.wait();
                let version = database.fetch_add(1, Ordering::SeqCst) + 1;
                ks.delete(b"k", Instant::now());
                deleted_upto.store(version, Ordering::SeqCst);
                barrier.wait();
                // The readers are parked at the next round's start.
                if ks
                    .get(b"k", Instant::now())
                    .is_some_and(|hit| hit.version != version)
                {
                    survivors += 1;
                }
            }
            for reader in readers {
                reader.join().unwrap();
            }
            let stats = ks.stats();
            assert_eq!(
                survivors, 0,
                "fills from before a delete survived it; {stats:?}"
            );
            assert_eq!(
                stale_reads.load(Ordering::SeqCst),
                0,
                "reads saw versions older than a returned delete; {stats:?}"
            );
            assert!(stats.fills_stored > 0, "{stats:?}");
        }
    }

    // ---- 2PC pending changes ----

    fn prepare(key: &str, value: &str, version: u64, txn: &str) -> Prepare {
        Prepare {
            item: item(key, value, version, WriteCondition::Unconditional),
            delete: false,
            txn_id: txn.to_owned(),
            timeout: None,
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[test]
    fn a_pending_change_is_invisible_until_committed() {
        let ks = keyspace("");
        let tokens = Tokens::new();
        let now = Instant::now();
        ks.set(
            item("k", "committed", 1, WriteCondition::Unconditional),
            now,
        )
        .unwrap();
        let r = ks.prepare(&prepare("k", "pending", 2, "tx"), TIMEOUT, now);
        assert_eq!(
            r,
            PrepareResult {
                prepared: true,
                current_version: 1,
                busy: false,
                in_doubt: None,
            }
        );
        assert_eq!(ks.get(b"k", now).unwrap().value, "committed");
        let LeaseRead::Hit(hit) = ks.lease_get(b"k", now, &tokens) else {
            panic!("the committed entry is a hit");
        };
        assert_eq!(hit.value, "committed");
        // A pending change on an absent key: misses wait, get no lease.
        ks.prepare(&prepare("new", "pending", 1, "tx2"), TIMEOUT, now);
        assert_eq!(ks.get(b"new", now), None);
        assert!(matches!(
            ks.lease_get(b"new", now, &tokens),
            LeaseRead::Wait { .. }
        ));

        let r = ks.commit(b"k", "tx", now);
        assert_eq!(
            r,
            CommitResult {
                committed: true,
                current_version: 2
            }
        );
        assert_eq!(ks.get(b"k", now).unwrap().value, "pending");
        // Committed once: the second commit finds nothing.
        assert!(!ks.commit(b"k", "tx", now).committed);
    }

    #[test]
    fn prepare_invalidates_the_lease_and_refuses_fills_while_pending() {
        let ks = keyspace("");
        let tokens = Tokens::new();
        let now = Instant::now();
        let t = token(ks.lease_get(b"k", now, &tokens));
        ks.prepare(&prepare("k", "pending", 5, "tx"), TIMEOUT, now);
        assert_eq!(
            ks.fill(fill_item("k", "loaded", 4), t, now).outcome,
            FillOutcome::LeaseInvalid
        );
        assert!(ks.abort(b"k", "tx", now));
        // After the abort the key is free again.
        let t = token(ks.lease_get(b"k", now, &tokens));
        assert_eq!(
            ks.fill(fill_item("k", "loaded", 4), t, now).outcome,
            FillOutcome::Stored
        );
    }

    #[test]
    fn one_transaction_per_key_and_prepare_is_idempotent() {
        let ks = keyspace("");
        let now = Instant::now();
        assert!(
            ks.prepare(&prepare("k", "a", 2, "tx1"), TIMEOUT, now)
                .prepared
        );
        assert!(
            ks.prepare(&prepare("k", "a", 2, "tx1"), TIMEOUT, now)
                .prepared
        );
        assert!(
            !ks.prepare(&prepare("k", "b", 3, "tx2"), TIMEOUT, now)
                .prepared
        );
        // Commit and abort of another transaction do nothing.
        assert!(!ks.commit(b"k", "tx2", now).committed);
        assert!(!ks.abort(b"k", "tx2", now));
        assert!(ks.commit(b"k", "tx1", now).committed);
        assert_eq!(ks.get(b"k", now).unwrap().value, "a");
        // A change not newer than the live entry is refused.
        let r = ks.prepare(&prepare("k", "old", 2, "tx3"), TIMEOUT, now);
        assert_eq!(
            r,
            PrepareResult {
                prepared: false,
                current_version: 2,
                busy: false,
                in_doubt: None,
            }
        );
        assert!(
            ks.prepare(&prepare("k", "c", 3, "tx3"), TIMEOUT, now)
                .prepared
        );
        let stats = ks.stats();
        assert_eq!((stats.prepares, stats.commits, stats.aborts), (2, 1, 0));
    }

    #[test]
    fn commit_is_fenced_and_applies_ttl_from_the_commit() {
        let ks = keyspace("");
        let t0 = Instant::now();
        let mut p = prepare("k", "pending", 5, "tx");
        p.item.ttl = Some(Duration::from_secs(60));
        ks.prepare(&p, TIMEOUT, t0);
        let t1 = t0 + Duration::from_secs(5);
        ks.commit(b"k", "tx", t1);
        assert_eq!(
            ks.get(b"k", t1).unwrap().ttl_remaining,
            Some(Duration::from_secs(60))
        );

        // A newer write landed while the change was pending: it wins.
        ks.prepare(&prepare("k", "pending", 6, "tx2"), TIMEOUT, t1);
        ks.set(item("k", "newer", 9, WriteCondition::Unconditional), t1)
            .unwrap();
        assert_eq!(
            ks.commit(b"k", "tx2", t1),
            CommitResult {
                committed: true,
                current_version: 9
            }
        );
        assert_eq!(ks.get(b"k", t1).unwrap().value, "newer");
    }

    #[test]
    fn a_pending_deletion_removes_the_live_entry_on_commit() {
        let ks = keyspace("");
        let now = Instant::now();
        ks.set(item("k", "v", 1, WriteCondition::Unconditional), now)
            .unwrap();
        let mut p = prepare("k", "ignored", 2, "tx");
        p.delete = true;
        assert!(ks.prepare(&p, TIMEOUT, now).prepared);
        assert_eq!(ks.get(b"k", now).unwrap().value, "v");
        assert_eq!(
            ks.commit(b"k", "tx", now),
            CommitResult {
                committed: true,
                current_version: 0
            }
        );
        assert_eq!(ks.get(b"k", now), None);

        // Fenced: a deletion of version 2 does not remove version 3.
        ks.set(item("k", "v3", 1, WriteCondition::Unconditional), now)
            .unwrap();
        p.txn_id = "tx2".into();
        assert!(ks.prepare(&p, TIMEOUT, now).prepared);
        ks.set(item("k", "v3", 3, WriteCondition::Unconditional), now)
            .unwrap();
        assert_eq!(ks.commit(b"k", "tx2", now).current_version, 3);
        assert_eq!(ks.get(b"k", now).unwrap().value, "v3");
    }

    #[test]
    fn abort_leaves_the_live_entry_alone() {
        let ks = keyspace("");
        let now = Instant::now();
        ks.set(item("k", "v", 1, WriteCondition::Unconditional), now)
            .unwrap();
        ks.prepare(&prepare("k", "pending", 2, "tx"), TIMEOUT, now);
        assert!(ks.abort(b"k", "tx", now));
        assert!(!ks.abort(b"k", "tx", now));
        assert!(!ks.commit(b"k", "tx", now).committed);
        assert_eq!(ks.get(b"k", now).unwrap().version, 1);
        assert_eq!(ks.records.count.load(Ordering::SeqCst), 0);
        assert_eq!(ks.records.pending.load(Ordering::Relaxed), 0);
    }

    /// One step of a prepare of `k` that waits its turn; its receiver when
    /// it queued.
    fn step(ks: &Keyspace, version: u64, txn: &str, ticket: u64, now: Instant) -> PrepareStep {
        ks.prepare_step(
            &prepare("k", txn, version, txn),
            TIMEOUT,
            Some((ticket, true)),
            now,
        )
    }

    fn queued(step: PrepareStep) -> tokio::sync::oneshot::Receiver<()> {
        match step {
            PrepareStep::Wait {
                woken: Some(rx), ..
            } => rx,
            other => panic!("expected to queue, got {other:?}"),
        }
    }

    fn done(step: PrepareStep) -> PrepareResult {
        match step {
            PrepareStep::Done(result) => result,
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    #[test]
    fn waiting_prepares_are_served_in_arrival_order() {
        let ks = keyspace("");
        let now = Instant::now();
        assert!(done(step(&ks, 1, "a", 1, now)).prepared);
        let mut b = queued(step(&ks, 2, "b", 2, now));
        let mut c = queued(step(&ks, 3, "c", 3, now));
        // A prepare that does not wait is refused as busy, as before.
        let refused = ks.prepare(&prepare("k", "x", 9, "x"), TIMEOUT, now);
        assert!(!refused.prepared && refused.busy);
        assert!(b.try_recv().is_err() && c.try_recv().is_err());
        assert!(ks.commit(b"k", "a", now).committed);
        // The first waiter gets the turn; a later one cannot take it.
        assert!(b.try_recv().is_ok());
        assert!(c.try_recv().is_err());
        assert!(matches!(
            step(&ks, 3, "c", 3, now),
            PrepareStep::Wait { woken: None, .. }
        ));
        let mut d = queued(step(&ks, 4, "d", 4, now));
        assert!(done(step(&ks, 2, "b", 2, now)).prepared);
        assert!(ks.commit(b"k", "b", now).committed);
        assert!(c.try_recv().is_ok());
        assert!(d.try_recv().is_err());
        assert!(done(step(&ks, 3, "c", 3, now)).prepared);
        assert!(ks.commit(b"k", "c", now).committed);
        assert!(d.try_recv().is_ok());
        assert!(done(step(&ks, 4, "d", 4, now)).prepared);
        assert!(ks.commit(b"k", "d", now).committed);
        assert_eq!(ks.get(b"k", now).unwrap().version, 4);
        assert_eq!(ks.records.count.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_waiting_prepare_is_woken_by_an_abort_and_by_a_timeout() {
        let ks = keyspace("");
        let t0 = Instant::now();
        assert!(done(step(&ks, 1, "a", 1, t0)).prepared);
        let mut b = queued(step(&ks, 2, "b", 2, t0));
        assert!(ks.abort(b"k", "a", t0));
        assert!(b.try_recv().is_ok());
        assert!(done(step(&ks, 2, "b", 2, t0)).prepared);
        // b's change times out: the sweeper wakes the next waiter.
        let mut c = match step(&ks, 3, "c", 3, t0) {
            PrepareStep::Wait {
                woken: Some(rx),
                pending_until,
            } => {
                assert_eq!(pending_until, Some(t0 + TIMEOUT));
                rx
            }
            other => panic!("expected to queue, got {other:?}"),
        };
        assert_eq!(ks.sweep(t0 + TIMEOUT), 1);
        assert!(c.try_recv().is_ok());
        assert!(done(step(&ks, 3, "c", 3, t0 + TIMEOUT)).prepared);
        // Timed out on the waiter's own retry at the change's deadline.
        let t1 = t0 + TIMEOUT * 2;
        let _d = queued(step(&ks, 4, "d", 4, t0 + TIMEOUT));
        assert!(done(step(&ks, 4, "d", 4, t1)).prepared);
    }

    #[test]
    fn a_waiter_refused_by_version_or_gone_passes_the_turn_on() {
        let ks = keyspace("");
        let now = Instant::now();
        assert!(done(step(&ks, 5, "a", 1, now)).prepared);
        let mut old = queued(step(&ks, 2, "old", 2, now));
        let mut gone = queued(step(&ks, 6, "gone", 3, now));
        let mut next = queued(step(&ks, 7, "next", 4, now));
        let mut last = queued(step(&ks, 8, "last", 5, now));
        assert!(ks.commit(b"k", "a", now).committed);
        assert!(old.try_recv().is_ok());
        // Version 2 is older than the live 5: refused, and the next is woken.
        let refused = done(step(&ks, 2, "old", 2, now));
        assert!(!refused.prepared && !refused.busy);
        assert_eq!(refused.current_version, 5);
        assert!(gone.try_recv().is_ok());
        // That one gave up with the turn in hand.
        ks.leave_queue(b"k", 3);
        assert!(next.try_recv().is_ok());
        // A waiter that may wait no longer is refused as busy and leaves.
        let busy = ks.prepare_step(
            &prepare("k", "last", 8, "last"),
            TIMEOUT,
            Some((5, false)),
            now,
        );
        assert!(matches!(busy, PrepareStep::Done(r) if r.busy && !r.prepared));
        assert!(done(step(&ks, 7, "next", 4, now)).prepared);
        assert!(ks.commit(b"k", "next", now).committed);
        assert!(last.try_recv().is_err(), "it left the queue");
        assert_eq!(ks.records.count.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_flush_keeps_the_waiters_and_wakes_the_first() {
        let ks = keyspace("");
        let now = Instant::now();
        assert!(done(step(&ks, 1, "a", 1, now)).prepared);
        let mut b = queued(step(&ks, 2, "b", 2, now));
        let mut c = queued(step(&ks, 3, "c", 3, now));
        ks.flush();
        assert!(b.try_recv().is_ok());
        assert!(c.try_recv().is_err());
    }

    #[test]
    fn a_timed_out_change_is_dropped_and_deletes_the_live_entry() {
        let ks = keyspace("");
        let t0 = Instant::now();
        ks.set(item("k", "old", 1, WriteCondition::Unconditional), t0)
            .unwrap();
        ks.prepare(&prepare("k", "pending", 2, "tx"), TIMEOUT, t0);
        assert_eq!(ks.sweep(t0 + TIMEOUT - Duration::from_millis(1)), 0);
        assert!(ks.get(b"k", t0).is_some());
        assert_eq!(ks.sweep(t0 + TIMEOUT), 1);
        assert_eq!(ks.get(b"k", t0 + TIMEOUT), None);
        assert_eq!(ks.stats().pending_timeouts, 1);
        assert_eq!(ks.records.pending.load(Ordering::Relaxed), 0);
        // The change stays in doubt until `in_doubt_ttl`, then goes too.
        assert_eq!(ks.records.count.load(Ordering::SeqCst), 1);
        ks.sweep(t0 + TIMEOUT + ks.in_doubt_ttl);
        assert_eq!(ks.records.count.load(Ordering::SeqCst), 0);
        assert!(
            !ks.commit(b"k", "tx", t0 + TIMEOUT + ks.in_doubt_ttl)
                .committed
        );
    }

    #[test]
    fn a_timed_out_change_is_noticed_by_the_next_access() {
        let at = |ks: &Keyspace, t: Instant| {
            ks.set(item("k", "old", 1, WriteCondition::Unconditional), t)
                .unwrap();
            ks.prepare(&prepare("k", "pending", 2, "tx"), TIMEOUT, t);
        };
        let t0 = Instant::now();
        let late = t0 + TIMEOUT;
        // A plain read.
        let ks = keyspace("");
        at(&ks, t0);
        assert_eq!(ks.get(b"k", late), None);
        assert_eq!(ks.stats().pending_timeouts, 1);
        // A commit that comes late, while the change is in doubt, applies.
        let ks = keyspace("");
        at(&ks, t0);
        assert!(ks.commit(b"k", "tx", late).committed);
        assert_eq!(ks.get(b"k", late).unwrap().value, "pending");
        // An abort that comes late still deletes: the writer's database
        // state was unknown to the node until then.
        let ks = keyspace("");
        at(&ks, t0);
        assert!(ks.abort(b"k", "tx", late));
        assert_eq!(ks.get(b"k", late), None);
        // A new prepare takes over the key.
        let ks = keyspace("");
        at(&ks, t0);
        assert!(
            ks.prepare(&prepare("k", "next", 3, "tx2"), TIMEOUT, late)
                .prepared
        );
        assert_eq!(ks.get(b"k", late), None);
    }

    #[test]
    fn prepare_timeouts_above_the_cap_are_refused_and_none_means_the_cap() {
        let s = store("[limits]\nmax_pending_timeout = \"1s\"");
        let mut p = prepare("k", "v", 1, "tx");
        p.timeout = Some(Duration::from_secs(3600));
        let err = s.prepare("default", p.clone()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pending timeout of 3600000 ms exceeds max_pending_timeout (1000 ms)"
        );
        p.timeout = Some(Duration::from_secs(1));
        let before = Instant::now();
        s.prepare("default", p).unwrap();
        assert_eq!(s.expire_pending(before), 0);
        assert_eq!(s.expire_pending(Instant::now() + Duration::from_secs(1)), 1);
        // None means the cap.
        s.prepare("default", prepare("k2", "v", 1, "tx2")).unwrap();
        assert_eq!(s.expire_pending(Instant::now() + Duration::from_secs(1)), 1);
    }

    #[test]
    fn a_timed_out_change_stays_in_doubt_and_fences_older_values() {
        let ks = keyspace("");
        let tokens = Tokens::new();
        let t0 = Instant::now();
        let late = t0 + TIMEOUT;
        ks.set(item("k", "old", 1, WriteCondition::Unconditional), t0)
            .unwrap();
        ks.prepare(&prepare("k", "new", 5, "tx"), TIMEOUT, t0);
        // The writer stalls; the node gives up: the old value goes, and a
        // reader who loads the old row (the writer's database change is not
        // visible yet) cannot fill it.
        assert_eq!(ks.get(b"k", late), None);
        let lease = token(ks.lease_get(b"k", late, &tokens));
        let filled = ks.fill(fill_item("k", "old", 1), lease, late);
        assert_eq!(
            (filled.outcome, filled.current_version),
            (FillOutcome::StaleVersion, 5)
        );
        // Nor can a versioned clean write or a prepare older than the fence.
        let set = ks
            .set(item("k", "old", 4, WriteCondition::IfNewerVersion), late)
            .unwrap();
        assert_eq!(set.outcome, SetOutcome::StaleVersion);
        let refused = ks.prepare(&prepare("k", "older", 4, "tx2"), TIMEOUT, late);
        assert!(!refused.prepared);
        // Each prepare of the key names the change in doubt, so that its
        // writer may roll the stalled transaction back in the database.
        assert_eq!(refused.in_doubt.as_deref(), Some("tx"));
        assert_eq!(ks.get(b"k", late), None);
        // The writer's late commit applies its change.
        assert!(ks.commit(b"k", "tx", late).committed);
        assert_eq!(ks.get(b"k", late).unwrap().value, "new");
        assert_eq!(ks.records.count.load(Ordering::SeqCst), 0);
        // Settled: no change of the key is in doubt any more.
        let next = ks.prepare(&prepare("k", "newer", 6, "tx3"), TIMEOUT, late);
        assert!(next.prepared);
        assert_eq!(next.in_doubt, None);
        assert!(ks.abort(b"k", "tx3", late));

        // Rolled back instead: the abort clears the fence, and the old row
        // (which the database kept) may be filled again.
        let ks = keyspace("");
        ks.prepare(&prepare("k", "new", 5, "tx"), TIMEOUT, t0);
        assert_eq!(ks.get(b"k", late), None);
        assert!(ks.abort(b"k", "tx", late));
        let lease = token(ks.lease_get(b"k", late, &tokens));
        assert_eq!(
            ks.fill(fill_item("k", "old", 1), lease, late).outcome,
            FillOutcome::Stored
        );

        // A newer entry supersedes the change in doubt, whatever its fate.
        let ks = keyspace("");
        ks.prepare(&prepare("k", "new", 5, "tx"), TIMEOUT, t0);
        assert_eq!(ks.get(b"k", late), None);
        let lease = token(ks.lease_get(b"k", late, &tokens));
        assert_eq!(
            ks.fill(fill_item("k", "newer", 6), lease, late).outcome,
            FillOutcome::Stored
        );
        assert!(!ks.commit(b"k", "tx", late).committed);
        assert_eq!(ks.get(b"k", late).unwrap().value, "newer");

        // A flush, or the end of `in_doubt_ttl`, forgets it.
        for flush in [true, false] {
            let ks = keyspace("");
            ks.prepare(&prepare("k", "new", 5, "tx"), TIMEOUT, t0);
            assert_eq!(ks.get(b"k", late), None);
            if flush {
                ks.flush();
            } else {
                ks.sweep(late + ks.in_doubt_ttl);
            }
            let later = late + ks.in_doubt_ttl;
            assert!(!ks.commit(b"k", "tx", later).committed);
            let lease = token(ks.lease_get(b"k", later, &tokens));
            assert_eq!(
                ks.fill(fill_item("k", "old", 1), lease, later).outcome,
                FillOutcome::Stored
            );
        }
    }

    #[test]
    fn a_version_fenced_delete_removes_only_older_entries_and_drops_the_lease() {
        let ks = keyspace("");
        let tokens = Tokens::new();
        let now = Instant::now();
        ks.set(item("k", "v5", 5, WriteCondition::Unconditional), now)
            .unwrap();
        assert!(!ks.delete_below(b"k", 5, now));
        assert_eq!(ks.get(b"k", now).unwrap().value, "v5");
        assert!(ks.delete_below(b"k", 6, now));
        assert_eq!(ks.get(b"k", now), None);
        // A reader's lease from before the invalidation cannot fill.
        let lease = token(ks.lease_get(b"k", now, &tokens));
        assert!(!ks.delete_below(b"k", 7, now));
        assert_eq!(
            ks.fill(fill_item("k", "v5", 5), lease, now).outcome,
            FillOutcome::LeaseInvalid
        );
        // Dirty entries are fenced the same way.
        let mut d = item("d", "dirty", 3, WriteCondition::IfNewerVersion);
        d.dirty = true;
        ks.set(d, now).unwrap();
        assert!(!ks.delete_below(b"d", 3, now));
        assert!(ks.delete_below(b"d", 4, now));
        assert_eq!(ks.get(b"d", now), None);
        assert_eq!(ks.stats().dirty_items, 0);
    }

    #[test]
    fn flush_drops_pending_changes_and_leases() {
        let s = store("");
        s.prepare("default", prepare("k", "v", 1, "tx")).unwrap();
        token(s.lease_get("default", b"other").unwrap());
        s.flush(None).unwrap();
        assert!(!s.commit("default", b"k", "tx").unwrap().committed);
        token(s.lease_get("default", b"other").unwrap());
    }

    #[test]
    fn transaction_ids_are_validated() {
        let s = store("");
        let err = s.prepare("default", prepare("k", "v", 1, "")).unwrap_err();
        assert_eq!(err.to_string(), "txn_id is empty");
        let long = "x".repeat(MAX_TXN_ID_BYTES + 1);
        let err = s.commit("default", b"k", &long).unwrap_err();
        assert_eq!(err.to_string(), "txn_id of 257 bytes exceeds 256 bytes");
        // A deletion's value is ignored, so it is not checked either.
        let s = store("[limits]\nmax_value_bytes = 4");
        let mut p = prepare("k", "too long", 1, "tx");
        assert!(s.prepare("default", p.clone()).is_err());
        p.delete = true;
        assert!(s.prepare("default", p).unwrap().prepared);
    }

    // ---- write-back: dirty entries -------------------------------------

    const SMALL: &str = "[limits]\nmax_key_bytes = 16\nmax_value_bytes = 64\n\
        [keyspaces.small]\ncapacity_bytes = 4096\nmax_dirty_bytes = 2048\n";

    fn dirty(key: &str, value: &str, version: u64, condition: WriteCondition) -> SetItem {
        SetItem {
            dirty: true,
            ..item(key, value, version, condition)
        }
    }

    fn read(s: &Store, keyspace: &str, key: &str) -> Option<(String, u64)> {
        s.get(keyspace, key.as_bytes())
            .unwrap()
            .map(|hit| (String::from_utf8(hit.value.to_vec()).unwrap(), hit.version))
    }

    fn one_stats(s: &Store, keyspace: &str) -> KeyspaceStats {
        s.stats(Some(keyspace)).unwrap().remove(0)
    }

    #[test]
    fn dirty_entries_survive_heavy_eviction_pressure() {
        let s = store(SMALL);
        for i in 0..8 {
            let r = s
                .set(
                    "small",
                    dirty(
                        &format!("d{i}"),
                        &format!("dirty{i}"),
                        10 + i,
                        WriteCondition::Unconditional,
                    ),
                )
                .unwrap();
            assert_eq!(r.outcome, SetOutcome::Stored);
        }
        // About 200 weighted bytes each: 100 times the keyspace's capacity.
        let filler = "x".repeat(64);
        for round in 0..4 {
            for i in 0..500 {
                s.set(
                    "small",
                    item(
                        &format!("c{i}"),
                        &filler,
                        round + 1,
                        WriteCondition::Unconditional,
                    ),
                )
                .unwrap();
                // Reads make the clean entries look popular to TinyLFU.
                s.get("small", format!("c{i}").as_bytes()).unwrap();
            }
        }
        let stats = one_stats(&s, "small");
        assert!(stats.evictions > 1000, "{stats:?}");
        assert!(stats.bytes <= stats.capacity_bytes, "{stats:?}");
        for i in 0..8 {
            assert_eq!(
                read(&s, "small", &format!("d{i}")),
                Some((format!("dirty{i}"), 10 + i)),
                "dirty entry d{i} lost"
            );
        }
        assert_eq!(stats.dirty_items, 8);
        // Key "dN" and value "dirtyN": 2 + 6 bytes plus the overhead each.
        assert_eq!(stats.dirty_bytes, 8 * (2 + 6 + ENTRY_OVERHEAD_BYTES));
        assert_eq!(stats.max_dirty_bytes, 2048);
    }

    #[test]
    fn dirty_bytes_are_bounded_and_a_refused_write_stores_nothing() {
        let s = store(SMALL);
        let value = "v".repeat(64);
        // 3 + 64 + 128 = 195 bytes each: ten fit in 2048, the eleventh not.
        for i in 0..10 {
            s.set(
                "small",
                dirty(
                    &format!("k{i:02}"),
                    &value,
                    1,
                    WriteCondition::Unconditional,
                ),
            )
            .unwrap();
        }
        let err = s
            .set(
                "small",
                dirty("kxx", &value, 1, WriteCondition::Unconditional),
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::DirtyBytesExhausted {
                    bytes: 2145,
                    max: 2048,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "dirty bytes of keyspace \"small\" would exceed max_dirty_bytes (2048)"
        );
        assert_eq!(read(&s, "small", "kxx"), None);
        // Replacing a dirty entry counts only the difference.
        s.set(
            "small",
            dirty("k00", &value, 2, WriteCondition::Unconditional),
        )
        .unwrap();
        // A batch that cannot fit is refused before anything is written.
        let batch = vec![
            item("clean", "c", 1, WriteCondition::Unconditional),
            dirty("kyy", &value, 1, WriteCondition::Unconditional),
        ];
        assert!(matches!(
            s.multi_set("small", batch),
            Err(Error::DirtyBytesExhausted { .. })
        ));
        assert_eq!(read(&s, "small", "clean"), None);
        // Clean writes are not bounded by it.
        s.set(
            "small",
            item("kxx", &value, 1, WriteCondition::Unconditional),
        )
        .unwrap();
        let stats = one_stats(&s, "small");
        assert_eq!(stats.dirty_items, 10);
        assert_eq!(stats.dirty_bytes, 1950);
        assert_eq!(stats.dirty_refused, 2);
    }

    #[test]
    fn mark_clean_cleans_the_stored_version_and_leaves_newer_ones_dirty() {
        let s = store("");
        s.set(
            "default",
            dirty("k", "v5", 5, WriteCondition::Unconditional),
        )
        .unwrap();
        let key = || vec![(Bytes::from_static(b"k"), 4)];
        // The worker stored an older version: the entry stays dirty.
        assert_eq!(s.mark_clean("default", &key()).unwrap(), 0);
        assert_eq!(one_stats(&s, "default").dirty_items, 1);
        // Unknown keys are ignored.
        assert_eq!(
            s.mark_clean("default", &[(Bytes::from_static(b"nope"), 9)])
                .unwrap(),
            0
        );
        assert_eq!(
            s.mark_clean("default", &[(Bytes::from_static(b"k"), 5)])
                .unwrap(),
            1
        );
        let stats = one_stats(&s, "default");
        assert_eq!((stats.dirty_items, stats.dirty_bytes), (0, 0));
        // Now a clean cached entry, still readable.
        assert_eq!(read(&s, "default", "k"), Some(("v5".into(), 5)));
        assert_eq!(stats.items, 1);
        // Idempotent.
        assert_eq!(
            s.mark_clean("default", &[(Bytes::from_static(b"k"), 5)])
                .unwrap(),
            0
        );
        // A newer stored version drops the entry: the store has moved on.
        s.set(
            "default",
            dirty("k", "v6", 6, WriteCondition::Unconditional),
        )
        .unwrap();
        assert_eq!(
            s.mark_clean("default", &[(Bytes::from_static(b"k"), 9)])
                .unwrap(),
            1
        );
        assert_eq!(read(&s, "default", "k"), None);
    }

    /// Issue 13, defect 4: `MarkClean(V)` means the store holds `V` of the
    /// key. A dirty or clean entry older than `V` is a value the store has
    /// superseded: it is dropped (readers load `V`), never kept, and never
    /// made clean with its old value. A newer entry is left alone.
    #[test]
    fn mark_clean_of_a_newer_version_drops_older_entries_dirty_or_clean() {
        let s = store("");
        s.set(
            "default",
            dirty("d", "d3", 3, WriteCondition::Unconditional),
        )
        .unwrap();
        s.set("default", item("c", "c3", 3, WriteCondition::Unconditional))
            .unwrap();
        s.set(
            "default",
            dirty("n", "n9", 9, WriteCondition::Unconditional),
        )
        .unwrap();
        let stored = [
            (Bytes::from_static(b"d"), 5),
            (Bytes::from_static(b"c"), 5),
            (Bytes::from_static(b"n"), 5),
        ];
        assert_eq!(s.mark_clean("default", &stored).unwrap(), 2);
        assert_eq!(read(&s, "default", "d"), None, "older dirty entry dropped");
        assert_eq!(read(&s, "default", "c"), None, "older clean entry dropped");
        assert_eq!(
            read(&s, "default", "n"),
            Some(("n9".into(), 9)),
            "newer dirty entry untouched"
        );
        assert_eq!(one_stats(&s, "default").dirty_items, 1);
    }

    /// A reader that took a lease before the worker stored a newer version
    /// may have loaded the older row: its fill must not land after the
    /// `MarkClean` that says the store moved on.
    #[test]
    fn mark_clean_invalidates_a_lease_granted_before_it() {
        let ks = keyspace("");
        let tokens = Tokens::new();
        let now = Instant::now();
        let t = token(ks.lease_get(b"k", now, &tokens));
        ks.mark_clean(b"k", 5, now);
        let r = ks.fill(fill_item("k", "old", 3), t, now);
        assert_eq!(r.outcome, FillOutcome::LeaseInvalid);
        assert!(ks.get(b"k", now).is_none());
    }

    /// A write the store will never hold is discarded by its exact version
    /// (`Delete` with `only_version`): other versions of the key stay.
    #[test]
    fn discard_removes_only_the_named_version() {
        let s = store("");
        s.set(
            "default",
            dirty("k", "v7", 7, WriteCondition::Unconditional),
        )
        .unwrap();
        assert!(!s.discard("default", b"k", 6).unwrap());
        assert_eq!(read(&s, "default", "k"), Some(("v7".into(), 7)));
        assert!(s.discard("default", b"k", 7).unwrap());
        assert_eq!(read(&s, "default", "k"), None);
        assert_eq!(one_stats(&s, "default").dirty_items, 0);
        s.set("default", item("c", "c2", 2, WriteCondition::Unconditional))
            .unwrap();
        assert!(!s.discard("default", b"c", 3).unwrap());
        assert!(s.discard("default", b"c", 2).unwrap());
        assert_eq!(read(&s, "default", "c"), None);
    }

    #[test]
    fn a_dirty_entry_does_not_expire_and_gets_its_ttl_when_clean() {
        let ks = keyspace("default_ttl = \"1s\"");
        let t0 = Instant::now();
        ks.set(dirty("k", "v", 1, WriteCondition::Unconditional), t0)
            .unwrap();
        let later = t0 + Duration::from_secs(60);
        let hit = ks.get(b"k", later).unwrap();
        // The whole TTL is still ahead: it counts from when it is clean.
        assert_eq!(hit.ttl_remaining, Some(Duration::from_secs(1)));
        assert!(ks.mark_clean(b"k", 1, later));
        assert!(ks.get(b"k", later + Duration::from_millis(500)).is_some());
        assert!(ks.get(b"k", later + Duration::from_millis(1500)).is_none());
    }

    #[test]
    fn delete_and_flush_remove_dirty_entries() {
        let s = store("");
        s.set("default", dirty("k", "v", 1, WriteCondition::Unconditional))
            .unwrap();
        assert!(s.delete("default", b"k").unwrap());
        assert_eq!(read(&s, "default", "k"), None);
        let stats = one_stats(&s, "default");
        assert_eq!((stats.dirty_items, stats.dirty_bytes), (0, 0));
        // Nothing left to clean.
        assert_eq!(
            s.mark_clean("default", &[(Bytes::from_static(b"k"), 1)])
                .unwrap(),
            0
        );
        s.set("default", dirty("f", "v", 1, WriteCondition::Unconditional))
            .unwrap();
        s.flush(None).unwrap();
        assert_eq!(read(&s, "default", "f"), None);
        let stats = one_stats(&s, "default");
        assert_eq!((stats.dirty_items, stats.dirty_bytes), (0, 0));
    }

    #[test]
    fn reads_see_the_newest_of_dirty_and_clean() {
        let s = store("");
        let set = |it| s.set("default", it).unwrap();
        set(item("k", "c3", 3, WriteCondition::Unconditional));
        assert_eq!(
            set(dirty("k", "d5", 5, WriteCondition::IfNewerVersion)).outcome,
            SetOutcome::Stored
        );
        assert_eq!(read(&s, "default", "k"), Some(("d5".into(), 5)));
        assert_eq!(
            s.lease_get("default", b"k").unwrap(),
            LeaseRead::Hit(s.get("default", b"k").unwrap().unwrap())
        );
        // The dirty entry fences clean writes of equal or older versions,
        // unconditional ones too.
        for (condition, outcome) in [
            (WriteCondition::IfNewerVersion, SetOutcome::StaleVersion),
            (WriteCondition::Unconditional, SetOutcome::StaleVersion),
            (WriteCondition::IfAbsent, SetOutcome::Exists),
        ] {
            let r = set(item("k", "c5", 5, condition));
            assert_eq!((r.outcome, r.current_version), (outcome, 5));
        }
        // Dirty writes are judged against it too.
        let r = set(dirty("k", "d4", 4, WriteCondition::IfNewerVersion));
        assert_eq!(
            (r.outcome, r.current_version),
            (SetOutcome::StaleVersion, 5)
        );
        assert_eq!(read(&s, "default", "k"), Some(("d5".into(), 5)));
        // A newer clean write replaces it: the store has something newer.
        assert_eq!(
            set(item("k", "c6", 6, WriteCondition::IfNewerVersion)).outcome,
            SetOutcome::Stored
        );
        assert_eq!(read(&s, "default", "k"), Some(("c6".into(), 6)));
        assert_eq!(one_stats(&s, "default").dirty_items, 0);
        // A clean entry newer than a dirty one (a racing write) wins the read.
        let ks = s.keyspace("default").unwrap();
        let now = Instant::now();
        set(dirty("j", "d7", 7, WriteCondition::Unconditional));
        ks.put(
            Bytes::from_static(b"j"),
            ks.stored(&Bytes::from_static(b"c9"), 9, None, now),
            WriteCondition::Unconditional,
            now,
            false,
        );
        assert_eq!(read(&s, "default", "j"), Some(("c9".into(), 9)));
        // Cleaning the older dirty entry keeps the newer clean one.
        assert!(ks.mark_clean(b"j", 7, now));
        assert_eq!(read(&s, "default", "j"), Some(("c9".into(), 9)));
    }

    #[test]
    fn fills_and_commits_are_fenced_by_dirty_entries() {
        let ks = keyspace("");
        let tokens = Tokens::new();
        let now = Instant::now();
        let t = token(ks.lease_get(b"k", now, &tokens));
        ks.set(dirty("k", "d5", 5, WriteCondition::Unconditional), now)
            .unwrap();
        // The write dropped the lease.
        assert_eq!(
            ks.fill(fill_item("k", "old", 4), t, now).outcome,
            FillOutcome::LeaseInvalid
        );
        let prepare = |version, delete| Prepare {
            item: item("k", "p", version, WriteCondition::Unconditional),
            delete,
            txn_id: format!("t{version}"),
            timeout: None,
        };
        let timeout = Duration::from_secs(5);
        assert!(!ks.prepare(&prepare(5, false), timeout, now).prepared);
        assert!(ks.prepare(&prepare(6, true), timeout, now).prepared);
        assert_eq!(ks.commit(b"k", "t6", now).current_version, 0);
        assert!(ks.get(b"k", now).is_none());
        assert_eq!(ks.stats().dirty_items, 0);
    }

    #[test]
    fn racing_dirty_and_clean_writes_keep_the_tallies_exact() {
        let ks = keyspace("capacity_bytes = 2000000");
        let version = AtomicU64::new(1);
        std::thread::scope(|scope| {
            for thread in 0..4u64 {
                let (ks, version) = (&ks, &version);
                scope.spawn(move || {
                    for i in 0..2000u64 {
                        let key = format!("k{}", (i * 7 + thread) % 5);
                        let v = version.fetch_add(1, Ordering::SeqCst);
                        let now = Instant::now();
                        match (i + thread) % 5 {
                            0 | 1 => {
                                let it = dirty(
                                    &key,
                                    &"d".repeat((i % 50) as usize),
                                    v,
                                    WriteCondition::IfNewerVersion,
                                );
                                ks.set(it, now).unwrap();
                            }
                            2 => {
                                let it = item(&key, "c", v, WriteCondition::Unconditional);
                                ks.set(it, now).unwrap();
                            }
                            3 => {
                                ks.mark_clean(key.as_bytes(), v, now);
                            }
                            _ => {
                                ks.delete(key.as_bytes(), now);
                            }
                        }
                    }
                });
            }
        });
        let held: u64 = ks
            .dirty
            .table
            .iter()
            .map(|entry| dirty_weight(entry.key(), entry.value()))
            .sum();
        assert_eq!(ks.dirty.count.load(Ordering::SeqCst), ks.dirty.table.len());
        assert_eq!(ks.dirty.bytes.load(Ordering::SeqCst), held);
        // No key has a dirty entry older than its cached one.
        for entry in ks.dirty.table.iter() {
            if let Some(clean) = ks.cache.get(entry.key()) {
                assert!(clean.version < entry.value().version, "{:?}", entry.key());
            }
        }
    }
}

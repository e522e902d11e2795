//! One keyspace: its table of entries and the records (leases, pending
//! changes, changes in doubt, stale values) of its keys. The operations
//! here take the key's record lock when they must (see [`Keyspace::set`])
//! and do their table part through `entries.rs` under it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::KeyspaceConfig;
use crate::error::Result;
use crate::prepare_queue::{Admission, Ticket};
use crate::table::{Table, TableConfig};

use super::records::{Change, Fence, KeyState, Lease, Pending, Records, Stored, stale_weight};
use super::tokens::Tokens;
use super::{
    CommitResult, Counters, FillOutcome, FillResult, KeyspaceStats, LeaseRead, Prepare,
    PrepareResult, PrepareStep, STALE_BUDGET_DIVISOR, SetItem, SetOutcome, SetResult,
    WriteCondition, bump,
};

/// Capacity per table shard: a small keyspace gets few shards, so that the
/// shards' fixed allocations (index, ghost filters) stay a small part of
/// its capacity.
const BYTES_PER_SHARD: u64 = 1 << 20;
/// Shards per CPU for a large keyspace (as the table picks by default).
const SHARDS_PER_CPU: usize = 8;

/// Buckets of each shard the active expiry looks at per sweep at most
/// ([`Table::expire_some`]); the sweeper runs every 100 ms, so a shard of a
/// million buckets is walked in under 10 s when most of it has expired.
pub(super) const EXPIRY_BUCKETS_PER_SWEEP: usize = 16 * 1024;

/// One keyspace: a byte-bounded table of versioned entries, and the records
/// (leases, pending changes, stale values) of its keys.
pub struct Keyspace {
    pub(super) name: String,
    pub(super) table: Table,
    pub(super) records: Records,
    pub(super) max_dirty_bytes: u64,
    pub(super) config: KeyspaceConfig,
    /// How long a timed-out pending change stays in doubt (`Fence`).
    pub(super) in_doubt_ttl: Duration,
    pub(super) counters: Counters,
}

impl Keyspace {
    pub(super) fn new(name: &str, config: KeyspaceConfig, in_doubt_ttl: Duration) -> Self {
        let max_shards =
            std::thread::available_parallelism().map_or(4, |n| n.get()) * SHARDS_PER_CPU;
        let shards = usize::try_from(config.capacity_bytes / BYTES_PER_SHARD)
            .unwrap_or(usize::MAX)
            .clamp(1, max_shards);
        let max_dirty_bytes = config.max_dirty_bytes();
        let table = Table::new(
            TableConfig {
                capacity_bytes: config.capacity_bytes,
                max_dirty_bytes,
                shards,
            },
            Instant::now(),
        );
        Keyspace {
            name: name.to_owned(),
            table,
            records: Records::default(),
            max_dirty_bytes,
            config,
            in_doubt_ttl,
            counters: Counters::default(),
        }
    }

    /// The keyspace's name.
    pub fn name(&self) -> &str {
        &self.name
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

    pub(super) fn get(&self, key: &[u8], now: Instant) -> Option<super::Hit> {
        self.time_out_pending(key, now);
        let hit = self.lookup(key, now);
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
    pub(super) fn settle(&self, key: &[u8], state: &mut KeyState, now: Instant) -> bool {
        if state.lease.as_ref().is_some_and(|l| l.expires_at <= now) {
            state.lease = None;
        }
        if state.stale.as_ref().is_some_and(|s| !s.is_live(now)) {
            state.stale = None;
        }
        if state.fence.as_ref().is_some_and(|f| f.until <= now) {
            state.fence = None;
        }
        let Some(pending) = state.pending.take_if(|p| p.deadline <= now) else {
            return false;
        };
        if state
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
        self.remove_for_timeout(key, pending.version, now);
        bump(&self.counters.pending_timeouts, 1);
        tracing::debug!(
            keyspace = %self.name,
            txn_id = pending.txn_id.as_str(),
            "pending change timed out; live entry deleted"
        );
        true
    }

    /// `MarkClean` of one key: the store holds `version` of it. A dirty
    /// entry of exactly that version becomes clean (evictable, TTL counted
    /// from now); a dirty or clean entry of an older version is dropped,
    /// because the store holds a newer value (absent is always correct:
    /// readers load the stored one); a newer entry is left alone. The key's
    /// lease goes too, like a write's: a reader that loaded the row before
    /// the store had `version` must not fill it afterwards. True when an
    /// entry became clean or was dropped.
    ///
    /// Dropping rather than cleaning an older entry is what lets the cache
    /// recover from a write-back write whose cache write failed (issue 13,
    /// defect 4): the cache keeps the older value until the record is
    /// stored, and this is the moment it stops being the newest.
    pub(super) fn mark_clean(&self, key: &[u8], version: u64, now: Instant) -> bool {
        self.with_lease_dropped(key, now, || self.settle_stored(key, version, now))
    }

    /// Runs `change` under the key's record lock, with its record settled
    /// and its lease invalidated, when the keyspace has records; else
    /// alone (no record can hold a lease).
    fn with_lease_dropped<T>(&self, key: &[u8], now: Instant, change: impl FnOnce() -> T) -> T {
        if self.records.any() {
            self.records.update(Bytes::copy_from_slice(key), |state| {
                self.settle(key, state, now);
                state.lease = None;
                change()
            })
        } else {
            change()
        }
    }

    /// Removes the key's entry of exactly `version`, dirty or clean,
    /// leaving any other version: a write-back write the store will never
    /// hold (a `fast` write the broker refused, a dead-lettered record).
    /// Invalidates the lease like [`Keyspace::delete`]; true when an entry
    /// went.
    pub(super) fn discard(&self, key: &[u8], version: u64, now: Instant) -> bool {
        let gone = self.with_lease_dropped(key, now, || self.remove_version(key, version, now));
        if gone {
            bump(&self.counters.deletes, 1);
        }
        gone
    }

    /// Writes one key.
    ///
    /// # Consistency with leases
    /// A write must invalidate the key's lease, atomically with its own table
    /// operation, so that a fill loaded before the write cannot land after
    /// it. When the keyspace has records, the write does both under the
    /// record's lock (`Records::update`), which a fill also holds while it
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
    /// [`crate::error::Error::DirtyBytesExhausted`] for a dirty write beyond
    /// `max_dirty_bytes`; nothing is stored (the lease is still dropped).
    pub(super) fn set(&self, item: SetItem, now: Instant) -> Result<SetResult> {
        let write = || {
            if item.dirty {
                let ttl = item.ttl.or(self.config.default_ttl);
                self.put_dirty(
                    &item.key,
                    &item.value,
                    item.version,
                    ttl,
                    item.condition,
                    now,
                )
            } else {
                Ok(self.put_clean(
                    &item.key,
                    &item.value,
                    item.version,
                    self.expiry(item.ttl, now),
                    item.condition,
                    now,
                ))
            }
        };
        let result = if self.records.any() {
            self.records
                .update(Bytes::copy_from_slice(&item.key), |state| {
                    self.settle(&item.key, state, now);
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
                    let result = write();
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
            write()
        };
        match &result {
            Ok(r) if r.outcome == SetOutcome::Stored => bump(&self.counters.sets, 1),
            Ok(_) => bump(&self.counters.sets_refused, 1),
            Err(_) => bump(&self.counters.dirty_refused, 1),
        }
        result
    }

    /// When a clean write of `ttl` (`None`: the keyspace default) made at
    /// `now` expires.
    pub(super) fn expiry(&self, ttl: Option<Duration>, now: Instant) -> Option<Instant> {
        ttl.or(self.config.default_ttl).map(|ttl| now + ttl)
    }

    /// Sets the TTL of the key's live entry to `ttl` from `now`, keeping its
    /// value and version; false when no entry is live. A dirty entry keeps
    /// not expiring while dirty and gets `ttl` counted from when it becomes
    /// clean, like a dirty write's own TTL.
    pub(super) fn expire(&self, key: &[u8], ttl: Duration, now: Instant) -> bool {
        self.time_out_pending(key, now);
        self.expire_entry(key, ttl, now)
    }

    /// Adds `delta` to the key's value read as a decimal `i64` (absent
    /// reads as 0) and stores the result, keeping the entry's version and
    /// expiry (a new entry gets version 0 and the keyspace's default TTL).
    /// The read and the write are one compute under the key's lock, so
    /// concurrent increments never lose an update. Invalidates the key's
    /// lease like [`Keyspace::set`].
    ///
    /// # Errors
    /// [`crate::error::Error::NotAnInteger`],
    /// [`crate::error::Error::IncrementOverflow`], or
    /// [`crate::error::Error::DirtyEntry`] when the key has a dirty entry
    /// (only a versioned write may replace it); nothing changes.
    pub(super) fn incr(&self, key: &[u8], delta: i64, now: Instant) -> Result<i64> {
        let result = if self.records.any() {
            self.records.update(Bytes::copy_from_slice(key), |state| {
                self.settle(key, state, now);
                state.lease = None;
                let result = self.incr_entry(key, delta, now);
                if result.is_ok() {
                    state.stale = None;
                }
                result
            })
        } else {
            self.incr_entry(key, delta, now)
        };
        match &result {
            Ok(_) => bump(&self.counters.sets, 1),
            Err(_) => bump(&self.counters.sets_refused, 1),
        }
        result
    }

    /// Deletes one key; true when a live entry went. Invalidates the lease
    /// like [`Keyspace::set`] (same argument for the lock-free path), and
    /// keeps the deleted value as stale if the keyspace keeps stale values.
    /// A change pending or in doubt then commits as a deletion
    /// ([`KeyState::invalidated`]).
    pub(super) fn delete(&self, key: &[u8], now: Instant) -> bool {
        let deleted = if self.records.any() || self.config.keep_stale_for.is_some() {
            self.records.update(Bytes::copy_from_slice(key), |state| {
                self.settle(key, state, now);
                state.lease = None;
                state.invalidated(None);
                let removed = self.remove_entry(key, now);
                if let Some(removed) = &removed {
                    self.keep_stale(state, removed, now);
                }
                removed.is_some()
            })
        } else {
            self.remove_entry(key, now).is_some()
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
    /// An entry of `version` or newer is correct (or newer) and stays; a
    /// change pending or in doubt older than `version` commits as a
    /// deletion ([`KeyState::invalidated`]).
    pub(super) fn delete_below(&self, key: &[u8], version: u64, now: Instant) -> bool {
        let remove = |state: Option<&mut KeyState>| {
            let removed = self.remove_older(key, version, now);
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
                state.invalidated(Some(version));
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
    /// the table's `clear` then drops its value) or is refused. When this
    /// returns, no entry written before it is left. Pending changes and
    /// in-doubt fences are dropped too: their commits answer `committed =
    /// false`, after which a writer whose database committed invalidates the
    /// key here (`delete_below`).
    ///
    /// Dirty entries are dropped too: a client flushes a node only before
    /// routing to it again, and the write-back records are in Kafka, so
    /// only read-your-writes through this node is lost, never data.
    pub(super) fn flush(&self) {
        // Waiting prepares keep their places; the next one is woken.
        self.records.sweep(|_, state| {
            *state = KeyState {
                queue: std::mem::take(&mut state.queue),
                ..KeyState::default()
            }
        });
        self.table.clear();
    }

    /// `LeaseGet`: a hit, or on a miss the key's lease, or a wait.
    pub(super) fn lease_get(&self, key: &[u8], now: Instant, tokens: &Tokens) -> LeaseRead {
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
            if let Some(hit) = self.lookup(key, now) {
                return LeaseRead::Hit(hit);
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
    pub(super) fn fill(&self, item: SetItem, token: u64, now: Instant) -> FillResult {
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
        self.records
            .update(Bytes::copy_from_slice(&item.key), |state| {
                self.settle(&item.key, state, now);
                let holds = state.pending.is_none()
                    && state.lease.as_ref().is_some_and(|l| l.token == token);
                if !holds {
                    return refused(self.live_version(&item.key, now));
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
                let result = self.put_clean(
                    &item.key,
                    &item.value,
                    item.version,
                    self.expiry(item.ttl, now),
                    WriteCondition::IfNewerVersion,
                    now,
                );
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
    pub(super) fn release_lease(&self, key: &[u8], token: u64, now: Instant) -> bool {
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
    pub(super) fn prepare(
        &self,
        prepare: &Prepare,
        timeout: Duration,
        now: Instant,
    ) -> PrepareResult {
        match self.prepare_step(prepare, timeout, None, now) {
            PrepareStep::Done(result) => result,
            PrepareStep::Wait { .. } => unreachable!("a prepare without a ticket never waits"),
        }
    }

    /// A prepare that may wait its turn: with `turn = Some((ticket,
    /// may_wait))`, it runs only when no other change is pending and no
    /// prepare that queued before it is still waiting (see
    /// [`PrepareQueue`](crate::prepare_queue::PrepareQueue)); otherwise,
    /// while `may_wait`, it joins the key's queue and answers
    /// [`PrepareStep::Wait`], and once it may not, it is refused as busy and
    /// leaves the queue. Without a ticket, it is [`Keyspace::prepare`],
    /// which never queues (and may overtake waiters: clients that do not
    /// wait keep their old behaviour).
    pub(super) fn prepare_step(
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
            let live = self.table.read(key, now, |entry| entry.meta.version);
            let current_version = live.unwrap_or(0);
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
            if live.is_some_and(|live| live >= prepare.item.version) {
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
    /// [`PrepareQueue::leave`](crate::prepare_queue::PrepareQueue::leave).
    pub(super) fn leave_queue(&self, key: &[u8], ticket: Ticket) {
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
    pub(super) fn commit(&self, key: &[u8], txn_id: &str, now: Instant) -> CommitResult {
        if !self.records.any() {
            return CommitResult {
                committed: false,
                current_version: self.live_version(key, now),
            };
        }
        self.records.update(Bytes::copy_from_slice(key), |state| {
            self.settle(key, state, now);
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
                        current_version: self.live_version(key, now),
                    };
                };
            bump(&self.counters.commits, 1);
            let current_version = match change {
                Change::Put { value, ttl } => {
                    let result = self.put_clean(
                        key,
                        &value,
                        version,
                        self.expiry(ttl, now),
                        WriteCondition::IfNewerVersion,
                        now,
                    );
                    if result.outcome == SetOutcome::Stored {
                        state.stale = None;
                        state.superseded(version);
                    }
                    result.current_version
                }
                Change::Delete => match self.remove_older(key, version, now) {
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

    /// `Abort`: drops the transaction's pending change, or its change in
    /// doubt (its database side was rolled back, so the fence is no longer
    /// needed); true when it existed.
    pub(super) fn abort(&self, key: &[u8], txn_id: &str, now: Instant) -> bool {
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
    pub(super) fn sweep(&self, now: Instant) -> usize {
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

    /// Active expiry: removes some of the table's expired entries (see
    /// [`Table::expire_some`]); returns how many.
    pub(super) fn expire_entries(&self, now: Instant) -> usize {
        self.table.expire_some(now, EXPIRY_BUCKETS_PER_SWEEP)
    }

    /// Counters and sizes.
    pub fn stats(&self) -> KeyspaceStats {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let table = self.table.stats();
        KeyspaceStats {
            name: self.name.clone(),
            hits: load(&c.hits),
            misses: load(&c.misses),
            sets: load(&c.sets),
            sets_refused: load(&c.sets_refused),
            deletes: load(&c.deletes),
            evictions: table.evictions,
            expirations: table.expirations,
            items: table.items.saturating_sub(table.dirty_items),
            bytes: table.bytes,
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
            dirty_items: table.dirty_items,
            dirty_bytes: table.dirty_bytes,
            max_dirty_bytes: self.max_dirty_bytes,
            dirty_refused: load(&c.dirty_refused),
        }
    }
}

//! Records: per-key coordination state beside a keyspace's table (leases,
//! pending 2PC changes, changes in doubt, stale values), in a sharded map
//! whose shard lock is the key's record lock (see the store's lock order).
//! A record exists only while it holds something.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use super::Hit;
use crate::prepare_queue::PrepareQueue;
use crate::table::accounting::malloc_footprint;

/// An entry copied out of the table: a value removed (kept as stale), or
/// one a reader saw.
#[derive(Clone, Debug)]
pub(super) struct Stored {
    pub(super) value: Bytes,
    pub(super) version: u64,
    /// When the entry stops being readable.
    pub(super) expires_at: Option<Instant>,
}

impl Stored {
    pub(super) fn is_live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }

    pub(super) fn hit(&self, now: Instant) -> Hit {
        Hit {
            value: self.value.clone(),
            version: self.version,
            ttl_remaining: self.expires_at.map(|at| at.saturating_duration_since(now)),
        }
    }
}
/// A lease on a key: the one caller allowed to fill it.
#[derive(Clone, Debug)]
pub(super) struct Lease {
    pub(super) token: u64,
    pub(super) expires_at: Instant,
}

/// The change a pending transaction will apply on commit.
#[derive(Clone, Debug)]
pub(super) enum Change {
    Put { value: Bytes, ttl: Option<Duration> },
    Delete,
}

/// A prepared, not yet committed, change.
#[derive(Clone, Debug)]
pub(super) struct Pending {
    pub(super) txn_id: String,
    pub(super) version: u64,
    pub(super) change: Change,
    pub(super) deadline: Instant,
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
pub(super) struct Fence {
    pub(super) txn_id: String,
    pub(super) version: u64,
    pub(super) change: Change,
    pub(super) until: Instant,
}

/// Coordination state of one key. A record exists only while one of the
/// fields is set; [`Records::update`] removes it when all are empty.
#[derive(Debug, Default)]
pub(super) struct KeyState {
    pub(super) lease: Option<Lease>,
    pub(super) pending: Option<Pending>,
    /// The newest timed-out change still in doubt.
    pub(super) fence: Option<Fence>,
    /// The last deleted value, with `expires_at` set to the end of its stale
    /// window. Never served as a hit.
    pub(super) stale: Option<Stored>,
    /// Prepares waiting for the pending change to settle.
    pub(super) queue: PrepareQueue,
}

/// What a record contributes to the table-wide tallies.
#[derive(Clone, Copy, Default)]
pub(super) struct Footprint {
    pub(super) pending: bool,
    pub(super) stale_bytes: u64,
}

impl KeyState {
    pub(super) fn is_empty(&self) -> bool {
        self.lease.is_none()
            && self.pending.is_none()
            && self.fence.is_none()
            && self.stale.is_none()
            && self.queue.is_empty()
    }

    /// The version of the in-doubt fence if it refuses `version`.
    pub(super) fn fenced(&self, version: u64) -> Option<u64> {
        self.fence
            .as_ref()
            .map(|f| f.version)
            .filter(|&fenced| version < fenced)
    }

    /// Drops the fence once an entry of its version or newer is stored: the
    /// change in doubt is superseded whatever its outcome.
    pub(super) fn superseded(&mut self, stored: u64) {
        if self.fence.as_ref().is_some_and(|f| stored >= f.version) {
            self.fence = None;
        }
    }

    /// An invalidation reached the key (`Delete`, or `DeleteBelow` of
    /// `below`): the database held something newer than what the key may
    /// hold, possibly newer than the change pending or in doubt, whose
    /// database commit it may have waited for (the prepared row is locked)
    /// and whose `Commit` it may overtake. So that change, if older than
    /// `below` (`None`: whatever its version), commits as a deletion of its
    /// version instead of caching its value: absent is always correct.
    pub(super) fn invalidated(&mut self, below: Option<u64>) {
        let older = |version: u64| below.is_none_or(|below| version < below);
        if let Some(pending) = self.pending.as_mut().filter(|p| older(p.version)) {
            pending.change = Change::Delete;
        }
        if let Some(fence) = self.fence.as_mut().filter(|f| older(f.version)) {
            fence.change = Change::Delete;
        }
    }

    /// Wakes the first waiting prepare once no change is pending (see
    /// [`PrepareQueue::kick`]); run after every change of a record.
    pub(super) fn kick(&mut self) {
        self.queue.kick(self.pending.is_some());
    }

    pub(super) fn footprint(&self) -> Footprint {
        Footprint {
            pending: self.pending.is_some(),
            stale_bytes: self.stale.as_ref().map_or(0, stale_weight),
        }
    }
}

/// What a stale value costs: its allocation as malloc charges it, and its
/// record's slot.
pub(super) fn stale_weight(stored: &Stored) -> u64 {
    malloc_footprint(stored.value.len()) + std::mem::size_of::<(Bytes, KeyState)>() as u64
}

/// The records of one keyspace, with tallies kept in step with the table.
#[derive(Default)]
pub(super) struct Records {
    pub(super) table: DashMap<Bytes, KeyState>,
    /// Number of records, never below the true number: incremented before a
    /// record is inserted and decremented after one is removed, both under
    /// the record's shard lock. Writers read it to skip the lock when the
    /// keyspace has no records at all (see `Keyspace::set`).
    pub(super) count: AtomicUsize,
    /// Records with a pending change; lets `Get` skip the table when 0.
    pub(super) pending: AtomicUsize,
    /// Weight of the stale values held, for [`super::STALE_BUDGET_DIVISOR`].
    pub(super) stale_bytes: AtomicU64,
}

impl Records {
    /// Runs `f` on the key's record (an empty one if there is none) under the
    /// record's shard lock, then stores the record back, or removes it if
    /// `f` left it empty. `f` runs synchronously and is the critical section
    /// that makes lease checks, grants and invalidations atomic with the
    /// cache operation it performs.
    pub(super) fn update<R>(&self, key: Bytes, f: impl FnOnce(&mut KeyState) -> R) -> R {
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
    pub(super) fn sweep(&self, mut f: impl FnMut(&Bytes, &mut KeyState)) {
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

    pub(super) fn account(&self, before: Footprint, after: Footprint) {
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
    /// increment in [`Records::update`]; see `Keyspace::set`.
    pub(super) fn any(&self) -> bool {
        self.count.load(Ordering::SeqCst) > 0
    }
}

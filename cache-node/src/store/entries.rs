//! A keyspace's operations on its table entries: one entry per key, clean
//! or dirty, each operation one [`Table::compute`] (or read) under the
//! key's shard lock. Write conditions and version fences are decided here;
//! leases, pending changes and stale values are the caller's (see
//! `keyspace.rs`), which calls these under the key's record lock when the
//! keyspace has records.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::table::{DirtyBytesExhausted, DirtyMeta, EntryRef, Meta, Op, Table};

use super::records::Stored;
use super::{Hit, Keyspace, SetItem, SetOutcome, SetResult, WriteCondition};

/// When an entry stops being readable, as a reader sees it: a dirty entry
/// does not expire, and its TTL (counted from when it becomes clean) is
/// still all ahead.
fn expires_at(meta: &Meta, now: Instant) -> Option<Instant> {
    match meta.dirty {
        Some(dirty) => dirty.ttl.map(|ttl| now + ttl),
        None => meta.expires_at,
    }
}

/// A read of the entry: its value copied out.
pub(super) fn hit(entry: &EntryRef<'_>, now: Instant) -> Hit {
    Hit {
        value: Bytes::copy_from_slice(entry.value),
        version: entry.meta.version,
        ttl_remaining: expires_at(&entry.meta, now).map(|at| at.saturating_duration_since(now)),
    }
}

/// The entry copied out; its value only when `with_value` (a removed entry
/// is kept only by keyspaces that keep stale values).
fn copied(entry: &EntryRef<'_>, now: Instant, with_value: bool) -> Stored {
    Stored {
        value: if with_value {
            Bytes::copy_from_slice(entry.value)
        } else {
            Bytes::new()
        },
        version: entry.meta.version,
        expires_at: expires_at(&entry.meta, now),
    }
}

/// Why a write of `version` under `condition` is refused by the key's live
/// entry, if it is. A clean write is also refused by a dirty entry of an
/// equal or newer version whatever its condition: the dirty entry is the
/// newest value the system has (the store does not have it yet).
fn refusal(
    condition: WriteCondition,
    live: Option<&Meta>,
    version: u64,
    clean_write: bool,
) -> Option<SetResult> {
    let refused = |outcome, current_version| {
        Some(SetResult {
            outcome,
            current_version,
        })
    };
    match live {
        Some(live) => {
            if condition == WriteCondition::IfAbsent {
                return refused(SetOutcome::Exists, live.version);
            }
            let fenced = condition == WriteCondition::IfNewerVersion
                || (clean_write && live.dirty.is_some());
            if fenced && live.version >= version {
                return refused(SetOutcome::StaleVersion, live.version);
            }
            None
        }
        None if condition == WriteCondition::IfPresent => refused(SetOutcome::Missing, 0),
        None => None,
    }
}

impl Keyspace {
    fn dirty_bytes_exhausted(&self, refused: DirtyBytesExhausted) -> Error {
        Error::DirtyBytesExhausted {
            keyspace: self.name.clone(),
            bytes: refused.bytes,
            max: refused.max,
        }
    }

    /// The key's live entry, dirty or clean, as a read; no counting.
    pub(super) fn lookup(&self, key: &[u8], now: Instant) -> Option<Hit> {
        self.table.read(key, now, |entry| hit(&entry, now))
    }

    /// The live entry's version; 0 when there is none.
    pub(super) fn live_version(&self, key: &[u8], now: Instant) -> u64 {
        self.table
            .read(key, now, |entry| entry.meta.version)
            .unwrap_or(0)
    }

    /// Stores a clean entry under `condition`, fenced by a dirty entry of
    /// the key (see [`refusal`]); a stored one replaces whatever the key
    /// had. No counting.
    pub(super) fn put_clean(
        &self,
        key: &[u8],
        value: &[u8],
        version: u64,
        expires_at: Option<Instant>,
        condition: WriteCondition,
        now: Instant,
    ) -> SetResult {
        let result = self.table.compute(key, now, |current| {
            if let Some(refused) =
                refusal(condition, current.map(|e| e.meta).as_ref(), version, true)
            {
                return (Op::Keep, refused);
            }
            let stored = SetResult {
                outcome: SetOutcome::Stored,
                current_version: version,
            };
            let meta = Meta::clean(version, expires_at);
            (
                Op::Put {
                    value: Cow::Borrowed(value),
                    meta,
                },
                stored,
            )
        });
        result.unwrap_or_else(|_| unreachable!("a clean write reserves no dirty bytes"))
    }

    /// Stores a dirty entry under `condition`, within `max_dirty_bytes`; a
    /// stored one replaces whatever the key had. No counting.
    ///
    /// # Errors
    /// [`Error::DirtyBytesExhausted`]; nothing changes.
    pub(super) fn put_dirty(
        &self,
        key: &[u8],
        value: &[u8],
        version: u64,
        ttl: Option<Duration>,
        condition: WriteCondition,
        now: Instant,
    ) -> Result<SetResult> {
        self.table
            .compute(key, now, |current| {
                if let Some(refused) =
                    refusal(condition, current.map(|e| e.meta).as_ref(), version, false)
                {
                    return (Op::Keep, refused);
                }
                let meta = Meta {
                    version,
                    expires_at: None,
                    dirty: Some(DirtyMeta { since: now, ttl }),
                };
                let stored = SetResult {
                    outcome: SetOutcome::Stored,
                    current_version: version,
                };
                (
                    Op::Put {
                        value: Cow::Borrowed(value),
                        meta,
                    },
                    stored,
                )
            })
            .map_err(|refused| self.dirty_bytes_exhausted(refused))
    }

    /// The table part of `MarkClean`: a dirty entry of exactly `version`
    /// becomes clean (its TTL counted from `now`); a dirty or clean entry
    /// older than `version` is removed; a newer one stays. True when an
    /// entry became clean or went.
    pub(super) fn settle_stored(&self, key: &[u8], version: u64, now: Instant) -> bool {
        self.table
            .compute(key, now, |current| match current.map(|e| e.meta) {
                Some(meta) if meta.version < version => (Op::Remove, true),
                Some(Meta {
                    dirty: Some(dirty),
                    version: dirty_version,
                    ..
                }) if dirty_version == version => {
                    let clean = Meta::clean(version, dirty.ttl.map(|ttl| now + ttl));
                    (Op::SetMeta(clean), true)
                }
                _ => (Op::Keep, false),
            })
            .unwrap_or_else(|_| unreachable!("cleaning reserves no dirty bytes"))
    }

    /// Removes the key's entry if it is of exactly `version`; true when it
    /// went.
    pub(super) fn remove_version(&self, key: &[u8], version: u64, now: Instant) -> bool {
        self.table
            .compute(key, now, |current| match current {
                Some(entry) if entry.meta.version == version => (Op::Remove, true),
                _ => (Op::Keep, false),
            })
            .unwrap_or_else(|_| unreachable!("a removal reserves no dirty bytes"))
    }

    /// Removes the key's live entry, returning it (its value only if the
    /// keyspace keeps stale values).
    pub(super) fn remove_entry(&self, key: &[u8], now: Instant) -> Option<Stored> {
        let keep_value = self.config.keep_stale_for.is_some();
        self.table
            .compute(key, now, |current| {
                (Op::Remove, current.map(|e| copied(&e, now, keep_value)))
            })
            .unwrap_or_else(|_| unreachable!("a removal reserves no dirty bytes"))
    }

    /// Removes the key's entry unless a live entry of `version` or newer
    /// exists (then `Err` with that version). `Ok` carries the removed live
    /// entry, if there was one (its value only if the keyspace keeps stale
    /// values).
    pub(super) fn remove_older(
        &self,
        key: &[u8],
        version: u64,
        now: Instant,
    ) -> std::result::Result<Option<Stored>, u64> {
        let keep_value = self.config.keep_stale_for.is_some();
        self.table
            .compute(key, now, |current| match current {
                Some(entry) if entry.meta.version >= version => (Op::Keep, Err(entry.meta.version)),
                Some(entry) => (Op::Remove, Ok(Some(copied(&entry, now, keep_value)))),
                None => (Op::Keep, Ok(None)),
            })
            .unwrap_or_else(|_| unreachable!("a removal reserves no dirty bytes"))
    }

    /// What a timed-out pending change of `version` does to the key's
    /// entry: a clean one goes (its writer may have committed the database,
    /// so it may be stale; absent is always safe), and so does a dirty one
    /// older than the change; a newer dirty one was written after the
    /// prepare and stays.
    pub(super) fn remove_for_timeout(&self, key: &[u8], version: u64, now: Instant) {
        self.table
            .compute(key, now, |current| match current.map(|e| e.meta) {
                Some(meta) if meta.dirty.is_none() || meta.version < version => (Op::Remove, ()),
                _ => (Op::Keep, ()),
            })
            .unwrap_or_else(|_| unreachable!("a removal reserves no dirty bytes"));
    }

    /// Sets the TTL of the key's live entry to `ttl` from `now`, keeping its
    /// value and version; a dirty entry gets it counted from when it becomes
    /// clean. False when no entry is live.
    pub(super) fn expire_entry(&self, key: &[u8], ttl: Duration, now: Instant) -> bool {
        self.table
            .compute(key, now, |current| match current.map(|e| e.meta) {
                Some(Meta {
                    version,
                    dirty: Some(dirty),
                    ..
                }) => {
                    let meta = Meta {
                        version,
                        expires_at: None,
                        dirty: Some(DirtyMeta {
                            since: dirty.since,
                            ttl: Some(ttl),
                        }),
                    };
                    (Op::SetMeta(meta), true)
                }
                Some(meta) => (
                    Op::SetMeta(Meta::clean(meta.version, Some(now + ttl))),
                    true,
                ),
                None => (Op::Keep, false),
            })
            // The same footprint as before: the reservation cannot fail.
            .unwrap_or(false)
    }

    /// Adds `delta` to the key's value read as a decimal `i64` (absent reads
    /// as 0) in one compute, keeping the entry's version and expiry (a new
    /// entry gets version 0 and the keyspace's default TTL).
    ///
    /// # Errors
    /// [`Error::NotAnInteger`], [`Error::IncrementOverflow`],
    /// [`Error::DirtyEntry`]; nothing changes.
    pub(super) fn incr_entry(&self, key: &[u8], delta: i64, now: Instant) -> Result<i64> {
        let default_expiry = self.config.default_ttl.map(|ttl| now + ttl);
        self.table
            .compute(key, now, |current| {
                let (old, version, expires_at) = match current {
                    None => (Some(0), 0, default_expiry),
                    Some(entry) if entry.meta.dirty.is_some() => {
                        return (Op::Keep, Err(Error::DirtyEntry));
                    }
                    Some(entry) => (
                        parse_i64(entry.value),
                        entry.meta.version,
                        entry.meta.expires_at,
                    ),
                };
                let Some(old) = old else {
                    return (Op::Keep, Err(Error::NotAnInteger));
                };
                let Some(new) = old.checked_add(delta) else {
                    return (Op::Keep, Err(Error::IncrementOverflow));
                };
                let op = Op::Put {
                    value: Cow::Owned(new.to_string().into_bytes()),
                    meta: Meta::clean(version, expires_at),
                };
                (op, Ok(new))
            })
            .unwrap_or_else(|_| unreachable!("a clean write reserves no dirty bytes"))
    }

    /// The dirty entries written at least `min_age` before `now`, in key
    /// order after `after`, at most `limit`; and whether more follow.
    pub(super) fn list_dirty(
        &self,
        min_age: Duration,
        after: &[u8],
        limit: usize,
        now: Instant,
    ) -> (Vec<(Bytes, u64)>, bool) {
        if self.table.stats().dirty_items == 0 {
            return (Vec::new(), false);
        }
        let mut old = Vec::new();
        self.table.for_each_dirty(|entry| {
            if let Some(dirty) = entry.meta.dirty
                && entry.key > after
                && now.saturating_duration_since(dirty.since) >= min_age
            {
                old.push((Bytes::copy_from_slice(entry.key), entry.meta.version));
            }
        });
        old.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let more = old.len() > limit;
        old.truncate(limit);
        (old, more)
    }

    /// Dirty bytes the keyspace would hold after storing the dirty ones of
    /// `items`, as far as can be told now (racing writes may change it).
    pub(super) fn dirty_bytes_after(&self, items: &[SetItem]) -> u64 {
        let now = Instant::now();
        items
            .iter()
            .filter(|item| item.dirty)
            .fold(self.table.stats().dirty_bytes, |held, item| {
                let replaced = self
                    .table
                    .read(&item.key, now, |entry| {
                        entry
                            .meta
                            .dirty
                            .map_or(0, |_| Table::dirty_entry_footprint(entry.key, entry.value))
                    })
                    .unwrap_or(0);
                (held + Table::dirty_entry_footprint(&item.key, &item.value))
                    .saturating_sub(replaced)
            })
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

//! One shard of the index: a hashbrown `HashTable` of entries, found by a
//! hash computed once per operation, and addressed by bucket index so that
//! the eviction and expiry hands can walk it.
//!
//! A slot is the entry's boxed slice (16 bytes) plus hashbrown's control
//! byte; the hash is not kept (resizing rehashes the keys). Beside it, the
//! probation queue: the hashes of new entries in insertion order (8 bytes
//! per entry on probation, about a tenth of them; see [`super::eviction`]).
//!
//! Bucket indices stay valid while the table does not grow: removals only
//! mark a control byte. Code that holds an index across an insert must look
//! the key up again.

use std::collections::VecDeque;

use hashbrown::HashTable;

use super::accounting::malloc_footprint;
use super::entry::Entry;
use super::ghost::Ghost;

/// A shard's index and the hands that walk it.
#[derive(Debug, Default)]
pub struct Shard {
    map: HashTable<Entry>,
    /// Next bucket the eviction hand looks at.
    pub hand: usize,
    /// Next bucket the active expiry looks at.
    pub expiry_hand: usize,
    /// What the index allocations were last charged.
    charged: u64,
    /// Dirty entries in the shard (kept by the table), so that walks for
    /// them can skip shards without any.
    pub dirty: usize,
    /// Hashes of entries put on probation, oldest first. May hold hashes of
    /// entries since removed or promoted; those are skipped when popped.
    pub small: VecDeque<u64>,
    /// Entries with the probation flag now.
    pub on_probation: usize,
    /// Hashes of entries lately evicted from probation.
    pub ghost: Ghost,
}

impl Shard {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn num_buckets(&self) -> usize {
        self.map.num_buckets()
    }

    /// The bucket of `key`'s entry.
    pub fn find(&self, hash: u64, key: &[u8]) -> Option<usize> {
        self.map.find_bucket_index(hash, |entry| entry.key() == key)
    }

    /// The entry in an occupied bucket.
    ///
    /// # Panics
    /// If the bucket is empty: indices come from [`Shard::find`] or
    /// [`Shard::insert`] under the same lock, with no insert in between.
    pub fn at(&self, index: usize) -> &Entry {
        self.map
            .get_bucket(index)
            .expect("bucket index of a live entry")
    }

    /// See [`Shard::at`].
    pub fn at_mut(&mut self, index: usize) -> &mut Entry {
        self.map
            .get_bucket_mut(index)
            .expect("bucket index of a live entry")
    }

    /// The entry in a bucket, if the bucket is occupied (for the hands).
    pub fn bucket_mut(&mut self, index: usize) -> Option<&mut Entry> {
        self.map.get_bucket_mut(index)
    }

    /// The bucket of the entry on probation with this hash.
    pub fn find_on_probation(&self, hash: u64, rehash: impl Fn(&Entry) -> u64) -> Option<usize> {
        self.map
            .find_bucket_index(hash, |entry| entry.is_probation() && rehash(entry) == hash)
    }

    /// Puts `new` in place of the entry in `index`, returning the old one.
    /// `new` keeps its own probation flag; the queue is not changed (a
    /// new flag without a queued hash would never be popped, so callers
    /// only carry the old entry's flag over or clear it).
    pub fn replace(&mut self, index: usize, new: Entry) -> Entry {
        let on = new.is_probation();
        let old = std::mem::replace(self.at_mut(index), new);
        debug_assert!(!on || old.is_probation(), "probation without a queued hash");
        if old.is_probation() && !on {
            self.on_probation -= 1;
        }
        old
    }

    /// Inserts an entry whose key is absent; returns its bucket. May grow
    /// the index (see [`Shard::index_delta`]). An entry on probation is
    /// queued.
    pub fn insert(&mut self, hash: u64, entry: Entry, rehash: impl Fn(&Entry) -> u64) -> usize {
        debug_assert!(self.find(hash, entry.key()).is_none(), "key inserted twice");
        self.rehash_if_worn(&rehash);
        if entry.is_probation() {
            self.on_probation += 1;
            self.small.push_back(hash);
        }
        self.map.insert_unique(hash, entry, rehash).bucket_index()
    }

    /// Rebuilds the index at its size when removals, not entries, used up
    /// its room.
    ///
    /// A hashbrown removal may leave a tombstone, which counts against the
    /// room left until the next rehash; and when the room is gone with more
    /// than half the buckets' capacity in use, hashbrown doubles the index.
    /// Under steady eviction (one removal per insert, the size flat), that
    /// doubled a full table's index for nothing: measured, 52 instead of 26
    /// bytes of index per entry. So when the room is gone while at least a
    /// sixteenth of the capacity is free, the entries move into a fresh
    /// index of the same size (O(entries), rare: the tombstones must build
    /// up again first).
    fn rehash_if_worn(&mut self, rehash: &impl Fn(&Entry) -> u64) {
        if self.map.len() < self.map.capacity() {
            return;
        }
        let full = bucket_capacity(self.map.num_buckets());
        if self.map.len() + 1 + full / 16 > full {
            // Really full: let it grow.
            return;
        }
        let mut fresh = HashTable::with_capacity(self.map.len() + 1);
        for entry in self.map.drain() {
            fresh.insert_unique(rehash(&entry), entry, rehash);
        }
        self.map = fresh;
        self.hand = 0;
        self.expiry_hand = 0;
    }

    /// Ends the probation of the entry in `index`.
    pub fn promote(&mut self, index: usize) {
        let entry = self.at_mut(index);
        if entry.is_probation() {
            entry.set_probation(false);
            self.on_probation -= 1;
        }
    }

    /// Removes the entry in an occupied bucket.
    pub fn remove(&mut self, index: usize) -> Entry {
        let entry = match self.map.get_bucket_entry(index) {
            Ok(occupied) => occupied.remove().0,
            Err(_) => panic!("bucket index of a live entry"),
        };
        if entry.is_probation() {
            self.on_probation -= 1;
        }
        entry
    }

    /// Takes every entry out, keeping the index allocation (the ghosts'
    /// memory is given back).
    pub fn drain(&mut self) -> Vec<Entry> {
        self.small.clear();
        self.ghost.clear();
        self.on_probation = 0;
        self.map.drain().collect()
    }

    /// Shrinks the index when it is at most a quarter full, so that memory
    /// freed by expiry or a flush goes back; the hands start over.
    pub fn shrink_if_sparse(&mut self, rehash: impl Fn(&Entry) -> u64) {
        if self.map.len() * 4 <= self.map.capacity() && self.map.capacity() > 64 {
            self.map.shrink_to(self.map.len() * 2, &rehash);
            self.hand = 0;
            self.expiry_hand = 0;
        }
        if self.small.len() > 2 * self.on_probation + 64 {
            // Mostly hashes of entries gone or promoted since: drop them.
            let mut small = std::mem::take(&mut self.small);
            small.retain(|&hash| self.find_on_probation(hash, &rehash).is_some());
            self.small = small;
        }
        if self.small.len() * 4 <= self.small.capacity() {
            self.small.shrink_to(self.small.len() * 2);
        }
    }

    /// What the index and the probation queue are charged now.
    pub fn index_footprint(&self) -> u64 {
        let footprint = |bytes: usize| {
            if bytes == 0 {
                0
            } else {
                malloc_footprint(bytes)
            }
        };
        let [first, second] = self.ghost.allocations();
        footprint(self.map.allocation_size())
            + footprint(self.small.capacity() * 8)
            + footprint(first)
            + footprint(second)
    }

    /// The change of the index allocation's footprint since the last call
    /// (positive when it grew).
    pub fn index_delta(&mut self) -> i64 {
        let now = self.index_footprint();
        let delta = now as i64 - self.charged as i64;
        self.charged = now;
        delta
    }
}

/// Entries hashbrown holds in `buckets` buckets before it must rehash.
fn bucket_capacity(buckets: usize) -> usize {
    if buckets < 8 {
        buckets.saturating_sub(1)
    } else {
        buckets / 8 * 7
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::entry::RawMeta;

    fn hash(key: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64(key)
    }

    fn entry(key: &str) -> Entry {
        Entry::new(
            key.as_bytes(),
            b"value",
            RawMeta {
                version: 1,
                time: 0,
                dirty_ttl: None,
            },
        )
    }

    fn insert(shard: &mut Shard, key: &str) -> usize {
        shard.insert(hash(key.as_bytes()), entry(key), |e| hash(e.key()))
    }

    #[test]
    fn entries_are_found_by_key_and_bucket() {
        let mut shard = Shard::default();
        for i in 0..1000 {
            insert(&mut shard, &format!("key:{i}"));
        }
        assert_eq!(shard.len(), 1000);
        let index = shard.find(hash(b"key:500"), b"key:500").unwrap();
        assert_eq!(shard.at(index).key(), b"key:500");
        assert!(shard.find(hash(b"key:1000"), b"key:1000").is_none());
        let old = shard.replace(index, entry("key:500"));
        assert_eq!(old.key(), b"key:500");
        assert_eq!(shard.remove(index).key(), b"key:500");
        assert!(shard.find(hash(b"key:500"), b"key:500").is_none());
        assert_eq!(shard.len(), 999);
    }

    #[test]
    fn removals_keep_other_bucket_indices() {
        let mut shard = Shard::default();
        for i in 0..100 {
            insert(&mut shard, &format!("k{i}"));
        }
        // Taken after the inserts: growing the index moves entries.
        let indices: Vec<usize> = (0..100)
            .map(|i| {
                let key = format!("k{i}");
                shard.find(hash(key.as_bytes()), key.as_bytes()).unwrap()
            })
            .collect();
        for (i, &index) in indices.iter().enumerate().step_by(2) {
            assert_eq!(shard.remove(index).key(), format!("k{i}").as_bytes());
        }
        for (i, &index) in indices.iter().enumerate().skip(1).step_by(2) {
            assert_eq!(shard.at(index).key(), format!("k{i}").as_bytes());
        }
    }

    #[test]
    fn every_entry_sits_in_exactly_one_bucket_the_hands_can_reach() {
        let mut shard = Shard::default();
        for i in 0..500 {
            insert(&mut shard, &format!("k{i}"));
        }
        let buckets = shard.num_buckets();
        let seen = (0..buckets)
            .filter(|&b| shard.bucket_mut(b).is_some())
            .count();
        assert_eq!(seen, 500);
        assert!(shard.bucket_mut(buckets).is_none());
    }

    #[test]
    fn the_index_footprint_follows_growth_and_shrinking() {
        let mut shard = Shard::default();
        assert_eq!(shard.index_delta(), 0);
        let mut total = 0;
        for i in 0..10_000 {
            insert(&mut shard, &format!("k{i}"));
            total += shard.index_delta();
        }
        // 16-byte slots and a control byte each, at most 8/7 spare.
        let buckets = shard.num_buckets() as i64;
        assert!(total >= buckets * 17, "{total} < {buckets} * 17");
        assert!(total <= buckets * 17 + 4096 + 64, "{total}");
        let drained = shard.drain();
        assert_eq!(drained.len(), 10_000);
        shard.shrink_if_sparse(|e| hash(e.key()));
        total += shard.index_delta();
        assert_eq!(total, 0, "an empty shrunk index is charged nothing");
    }

    #[test]
    fn steady_churn_does_not_double_the_index() {
        let mut shard = Shard::default();
        for i in 0..5_000 {
            insert(&mut shard, &format!("k{i}"));
        }
        let buckets = shard.num_buckets();
        // One removal per insert, as under eviction, for many turns.
        for i in 5_000..200_000 {
            let old = format!("k{}", i - 5_000);
            let index = shard.find(hash(old.as_bytes()), old.as_bytes()).unwrap();
            shard.remove(index);
            insert(&mut shard, &format!("k{i}"));
        }
        assert_eq!(shard.len(), 5_000);
        assert_eq!(
            shard.num_buckets(),
            buckets,
            "the index grew under steady churn"
        );
        for i in 195_000..200_000 {
            let key = format!("k{i}");
            assert!(shard.find(hash(key.as_bytes()), key.as_bytes()).is_some());
        }
    }

    #[test]
    fn entries_on_probation_are_queued_counted_and_found_by_hash() {
        let mut shard = Shard::default();
        let mut on = entry("new");
        on.set_probation(true);
        let index = shard.insert(hash(b"new"), on, |e| hash(e.key()));
        insert(&mut shard, "old");
        assert_eq!((shard.on_probation, shard.small.len()), (1, 1));
        assert_eq!(
            shard.find_on_probation(hash(b"new"), |e| hash(e.key())),
            Some(index)
        );
        assert_eq!(
            shard.find_on_probation(hash(b"old"), |e| hash(e.key())),
            None
        );
        shard.promote(index);
        assert_eq!(shard.on_probation, 0);
        assert_eq!(
            shard.find_on_probation(hash(b"new"), |e| hash(e.key())),
            None
        );
        let mut again = entry("again");
        again.set_probation(true);
        let index = shard.insert(hash(b"again"), again, |e| hash(e.key()));
        shard.remove(index);
        assert_eq!(
            (shard.on_probation, shard.small.len()),
            (0, 2),
            "stale hashes stay queued"
        );
    }
}

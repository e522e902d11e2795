//! Byte accounting: what an allocation really costs, and the table-wide
//! tallies the byte bounds are checked against.
//!
//! The node runs on glibc's malloc (the Rust `System` allocator; no global
//! allocator is set). An allocation of `n` bytes takes a chunk of
//! `max(32, round_up(n + 8, 16))` bytes of the heap (an 8-byte size word,
//! 16-byte alignment, a 32-byte minimum), and from the mmap threshold on
//! (128 KiB by default) an mmapped region of `round_up(n + 16, 4096)`. The
//! tallies charge every entry and every index allocation that way, so that
//! a byte bound on the tallies is a bound on the heap the table really
//! uses, to within fragmentation. Measured against RSS growth by
//! `examples/store-compare.rs` (figures in `docs/benchmarks.md` once phase 2
//! lands; the branch notes until then).

use std::sync::atomic::{AtomicU64, Ordering};

/// glibc's default `M_MMAP_THRESHOLD`: allocations from this size on are
/// mmapped (the threshold can rise at run time; the page rounding charged
/// below is then slightly generous).
const MMAP_THRESHOLD: usize = 128 * 1024;
const PAGE: usize = 4096;
/// The smallest chunk glibc hands out on 64-bit targets.
const MIN_CHUNK: usize = 32;

/// Bytes of memory an allocation of `n` bytes takes from glibc's malloc.
pub fn malloc_footprint(n: usize) -> u64 {
    let bytes = if n >= MMAP_THRESHOLD {
        (n + 16).div_ceil(PAGE) * PAGE
    } else {
        ((n + 8).div_ceil(16) * 16).max(MIN_CHUNK)
    };
    bytes as u64
}

/// Which byte bound an allocation counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// Clean entries and the index: bounded by the capacity, by eviction.
    Clean,
    /// Dirty entries: bounded by the dirty budget, by refusing writes.
    Dirty,
}

/// Table-wide tallies, changed under the shard lock of the entry that
/// changes, read without locks.
#[derive(Debug, Default)]
pub struct Tally {
    clean_bytes: AtomicU64,
    dirty_bytes: AtomicU64,
    items: AtomicU64,
    dirty_items: AtomicU64,
}

impl Tally {
    /// Bytes of clean entries and of the index.
    pub fn clean_bytes(&self) -> u64 {
        self.clean_bytes.load(Ordering::Relaxed)
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes.load(Ordering::Relaxed)
    }

    /// Entries, dirty ones included.
    pub fn items(&self) -> u64 {
        self.items.load(Ordering::Relaxed)
    }

    pub fn dirty_items(&self) -> u64 {
        self.dirty_items.load(Ordering::Relaxed)
    }

    fn bytes(&self, pool: Pool) -> &AtomicU64 {
        match pool {
            Pool::Clean => &self.clean_bytes,
            Pool::Dirty => &self.dirty_bytes,
        }
    }

    /// Counts an allocation of `footprint` bytes into `pool`.
    pub fn add(&self, pool: Pool, footprint: u64) {
        self.bytes(pool).fetch_add(footprint, Ordering::Relaxed);
    }

    /// Counts a freed allocation out of `pool`.
    pub fn sub(&self, pool: Pool, footprint: u64) {
        let before = self.bytes(pool).fetch_sub(footprint, Ordering::Relaxed);
        debug_assert!(before >= footprint, "tally of {pool:?} went below zero");
    }

    /// Counts an entry in or out.
    pub fn count(&self, pool: Pool, added: bool) {
        let one = |counter: &AtomicU64| {
            if added {
                counter.fetch_add(1, Ordering::Relaxed);
            } else {
                counter.fetch_sub(1, Ordering::Relaxed);
            }
        };
        one(&self.items);
        if pool == Pool::Dirty {
            one(&self.dirty_items);
        }
    }

    /// Reserves room for a dirty entry of `footprint` bytes replacing
    /// `replaced` dirty bytes, if the dirty bytes stay within `max`; on
    /// refusal returns what they would have been. A compare-and-swap, so
    /// writers on different shards cannot both take the last room.
    pub fn reserve_dirty(&self, replaced: u64, footprint: u64, max: u64) -> Result<(), u64> {
        self.dirty_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                let next = held.saturating_sub(replaced) + footprint;
                (next <= max).then_some(next)
            })
            .map(drop)
            .map_err(|held| held.saturating_sub(replaced) + footprint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_allocations_follow_glibc_chunk_sizes() {
        // 64-bit glibc: usable sizes 24, 40, 56, ... in 32, 48, 64 chunks.
        assert_eq!(malloc_footprint(1), 32);
        assert_eq!(malloc_footprint(24), 32);
        assert_eq!(malloc_footprint(25), 48);
        assert_eq!(malloc_footprint(40), 48);
        assert_eq!(malloc_footprint(41), 64);
        // A 100-byte value, a 10-byte key and the 20-byte header.
        assert_eq!(malloc_footprint(130), 144);
    }

    #[test]
    fn large_allocations_are_charged_whole_pages() {
        assert_eq!(malloc_footprint(MMAP_THRESHOLD), 33 * 4096);
        assert_eq!(malloc_footprint(1 << 20), (1 << 20) + 4096);
    }

    #[test]
    fn the_footprint_is_never_less_than_the_request_and_grows_with_it() {
        let mut last = 0;
        for n in 0..300_000 {
            let f = malloc_footprint(n);
            assert!(f >= n as u64 + 8 || n >= MMAP_THRESHOLD);
            assert!(f >= last, "footprint shrank at {n}");
            last = f;
        }
    }

    #[test]
    fn dirty_reservations_stop_exactly_at_the_budget() {
        let tally = Tally::default();
        assert_eq!(tally.reserve_dirty(0, 60, 100), Ok(()));
        assert_eq!(tally.reserve_dirty(0, 50, 100), Err(110));
        // Replacing 60 bytes by 100 fits exactly.
        assert_eq!(tally.reserve_dirty(60, 100, 100), Ok(()));
        assert_eq!(tally.dirty_bytes(), 100);
    }

    #[test]
    fn counts_follow_the_pool() {
        let tally = Tally::default();
        tally.count(Pool::Clean, true);
        tally.count(Pool::Dirty, true);
        tally.add(Pool::Clean, 32);
        tally.add(Pool::Dirty, 48);
        assert_eq!((tally.items(), tally.dirty_items()), (2, 1));
        tally.count(Pool::Dirty, false);
        tally.sub(Pool::Dirty, 48);
        assert_eq!(
            (tally.items(), tally.dirty_items(), tally.dirty_bytes()),
            (1, 0, 0)
        );
        assert_eq!(tally.clean_bytes(), 32);
    }
}

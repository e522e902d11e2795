//! Ghosts: the shard's memory of keys recently evicted from probation,
//! kept as hashes in two Bloom filters used in turn (S3-FIFO's ghost
//! queue, in about one byte per entry of the shard instead of a queue of
//! hashes).
//!
//! A key that comes back while its ghost is remembered skips probation
//! (see [`super::eviction`]): it was evicted too early, before its second
//! use. The filter being written takes up to half the shard's entry count
//! of hashes; then the other one is cleared (resized to the shard) and
//! takes over, so a ghost is remembered for between one and two such
//! rounds. False positives (about 3% at 8 bits per hash and 3 probes) only
//! let a new key skip probation.

/// Bits per remembered hash.
const BITS_PER_HASH: usize = 8;
/// Bits set and tested per hash.
const PROBES: u64 = 3;
/// Fewest hashes a filter is sized for.
const MIN_HASHES: usize = 256;

#[derive(Debug, Default)]
pub struct Ghost {
    filters: [Vec<u64>; 2],
    /// The filter being written.
    current: usize,
    /// Hashes written to it.
    added: usize,
    /// Hashes it takes before the turn passes.
    capacity: usize,
}

impl Ghost {
    /// Remembers an evicted entry's hash; `shard_len` sizes the next filter.
    pub fn remember(&mut self, hash: u64, shard_len: usize) {
        if self.added >= self.capacity {
            self.turn(shard_len);
        }
        let filter = &mut self.filters[self.current];
        for bit in probes(hash, filter.len()) {
            filter[bit / 64] |= 1 << (bit % 64);
        }
        self.added += 1;
    }

    fn turn(&mut self, shard_len: usize) {
        self.current ^= 1;
        self.capacity = (shard_len / 2).max(MIN_HASHES);
        let words = (self.capacity * BITS_PER_HASH)
            .div_ceil(64)
            .next_power_of_two();
        let filter = &mut self.filters[self.current];
        filter.clear();
        if filter.capacity() != words {
            *filter = Vec::with_capacity(words);
        }
        filter.resize(words, 0);
        self.added = 0;
    }

    /// Whether `hash` is (probably) remembered.
    pub fn contains(&self, hash: u64) -> bool {
        self.filters.iter().any(|filter| {
            !filter.is_empty()
                && probes(hash, filter.len()).all(|bit| filter[bit / 64] & (1 << (bit % 64)) != 0)
        })
    }

    /// Forgets everything and gives the memory back.
    pub fn clear(&mut self) {
        *self = Ghost::default();
    }

    /// Bytes of the two filters' allocations.
    pub fn allocations(&self) -> [usize; 2] {
        [
            self.filters[0].capacity() * 8,
            self.filters[1].capacity() * 8,
        ]
    }
}

/// Bit positions of a hash in a filter of `words` 64-bit words (a power of
/// two): double hashing over a remix, since the shard's hashes share the
/// bits that chose the shard.
fn probes(hash: u64, words: usize) -> impl Iterator<Item = usize> {
    let mixed = hash.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let (first, step) = (mixed >> 32, (hash & 0xFFFF_FFFF) | 1);
    let mask = (words as u64 * 64).wrapping_sub(1);
    (0..PROBES).map(move |i| (first.wrapping_add(i.wrapping_mul(step)) & mask) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(i: u64) -> u64 {
        xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes())
    }

    #[test]
    fn an_empty_ghost_remembers_nothing() {
        let ghost = Ghost::default();
        assert!(!ghost.contains(hash(1)));
        assert_eq!(ghost.allocations(), [0, 0]);
    }

    #[test]
    fn recent_ghosts_are_remembered_and_old_ones_forgotten() {
        let mut ghost = Ghost::default();
        let shard_len = 10_000;
        for i in 0..5_000 {
            ghost.remember(hash(i), shard_len);
        }
        assert!(
            (0..5_000).all(|i| ghost.contains(hash(i))),
            "no false negatives"
        );
        // Two more turns push the first hashes out.
        for i in 5_000..15_001 {
            ghost.remember(hash(i), shard_len);
        }
        assert!((10_001..15_001).all(|i| ghost.contains(hash(i))));
        let remembered_old = (0..5_000).filter(|&i| ghost.contains(hash(i))).count();
        assert!(
            remembered_old < 500,
            "{remembered_old} of 5000 old ghosts still seen"
        );
    }

    #[test]
    fn false_positives_stay_rare() {
        let mut ghost = Ghost::default();
        for i in 0..5_000 {
            ghost.remember(hash(i), 10_000);
        }
        let false_positives = (1_000_000..1_100_000)
            .filter(|&i| ghost.contains(hash(i)))
            .count();
        assert!(false_positives < 6_000, "{false_positives} of 100000");
    }

    #[test]
    fn about_one_byte_per_shard_entry() {
        let mut ghost = Ghost::default();
        for i in 0..20_000 {
            ghost.remember(hash(i), 100_000);
        }
        let bytes: usize = ghost.allocations().iter().sum();
        assert!(bytes <= 2 * 65_536, "{bytes} bytes for a shard of 100000");
        ghost.clear();
        assert_eq!(ghost.allocations(), [0, 0]);
    }
}

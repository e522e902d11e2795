//! The entry layout: one heap allocation per entry, a fixed header, then the
//! key, then the value.
//!
//! ```text
//! 0        8          16        19     20            28
//! | version | time     | key len | flags | [ttl, dirty] | key | value |
//! ```
//!
//! - `version`: the writer's version, little-endian `u64`.
//! - `time`: for a clean entry its expiry (see [`super::expiry::Clock`];
//!   0 = never); for a dirty entry the time it was written (`since`).
//! - `key len`: little-endian 24 bits, so keys up to 16 MiB - 1 (the node
//!   caps keys at 64 KiB).
//! - `flags`: the eviction counter (2 bits, [`CLOCK_MASK`]), [`DIRTY`] and
//!   [`PROBATION`].
//! - Dirty entries only: 8 more bytes, the TTL (nanoseconds, 0 = none) the
//!   entry gets when it becomes clean, counted from then.
//!
//! The value's length is what is left of the allocation, so it is not
//! stored. Everything is read with `from_le_bytes`: no alignment, no
//! `unsafe`.

/// Bytes of the header every entry carries.
pub const HEADER_BYTES: usize = 20;
/// Bytes a dirty entry carries beyond [`HEADER_BYTES`].
pub const DIRTY_EXTRA_BYTES: usize = 8;
/// Longest key the layout can hold.
pub const MAX_KEY_BYTES: usize = (1 << 24) - 1;

/// The eviction counter's bits in the flags byte.
pub const CLOCK_MASK: u8 = 0b0000_0011;
/// Set on a dirty (write-back) entry: never evicted, never expires.
pub const DIRTY: u8 = 0b0000_0100;
/// Set while a new entry is on probation (see [`super::eviction`]).
pub const PROBATION: u8 = 0b0000_1000;

const VERSION: std::ops::Range<usize> = 0..8;
const TIME: std::ops::Range<usize> = 8..16;
const KEY_LEN: std::ops::Range<usize> = 16..19;
const FLAGS: usize = 19;
const DIRTY_TTL: std::ops::Range<usize> = 20..28;

/// The header fields of an entry, with times in the table's clock units
/// (nanoseconds since its epoch; see [`super::expiry::Clock`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawMeta {
    /// The writer's version.
    pub version: u64,
    /// Clean: expiry (0 = never). Dirty: when written.
    pub time: u64,
    /// Dirty entries only: the TTL in nanoseconds once clean (0 = none).
    /// `None` for a clean entry.
    pub dirty_ttl: Option<u64>,
}

/// One entry: a single boxed byte slice.
#[derive(Debug)]
pub struct Entry(Box<[u8]>);

impl Entry {
    /// Lays out a new entry; its eviction counter starts at 0.
    ///
    /// # Panics
    /// If `key` is longer than [`MAX_KEY_BYTES`]; the node's limits keep
    /// keys far below that.
    pub fn new(key: &[u8], value: &[u8], meta: RawMeta) -> Entry {
        assert!(key.len() <= MAX_KEY_BYTES, "key longer than MAX_KEY_BYTES");
        let header = header_len(meta.dirty_ttl.is_some());
        let mut bytes = Vec::with_capacity(header + key.len() + value.len());
        bytes.extend_from_slice(&meta.version.to_le_bytes());
        bytes.extend_from_slice(&meta.time.to_le_bytes());
        // The assert above keeps the length within 24 bits.
        bytes.extend_from_slice(&(key.len() as u32).to_le_bytes()[..3]);
        let mut flags = 0;
        if let Some(ttl) = meta.dirty_ttl {
            flags |= DIRTY;
            bytes.push(flags);
            bytes.extend_from_slice(&ttl.to_le_bytes());
        } else {
            bytes.push(flags);
        }
        bytes.extend_from_slice(key);
        bytes.extend_from_slice(value);
        debug_assert_eq!(bytes.len(), bytes.capacity());
        Entry(bytes.into_boxed_slice())
    }

    /// A copy of this entry with other header fields (and possibly a
    /// different dirty state, which changes the layout); the eviction
    /// state (counter, probation) is kept.
    pub fn with_meta(&self, meta: RawMeta) -> Entry {
        let mut entry = Entry::new(self.key(), self.value(), meta);
        entry.take_eviction_state(self);
        entry
    }

    /// Takes `other`'s eviction counter and probation.
    pub fn take_eviction_state(&mut self, other: &Entry) {
        self.set_clock(other.clock());
        self.set_probation(other.is_probation());
    }

    /// Bytes allocated for the entry (what the allocator was asked for).
    pub fn alloc_len(&self) -> usize {
        self.0.len()
    }

    /// Bytes an entry of this shape asks the allocator for.
    pub fn alloc_len_for(key: usize, value: usize, dirty: bool) -> usize {
        header_len(dirty) + key + value
    }

    pub fn version(&self) -> u64 {
        u64::from_le_bytes(self.0[VERSION].try_into().expect("8 bytes"))
    }

    /// Clean: expiry (0 = never); dirty: when written.
    pub fn time(&self) -> u64 {
        u64::from_le_bytes(self.0[TIME].try_into().expect("8 bytes"))
    }

    pub fn set_time(&mut self, time: u64) {
        self.0[TIME].copy_from_slice(&time.to_le_bytes());
    }

    pub fn flags(&self) -> u8 {
        self.0[FLAGS]
    }

    pub fn is_dirty(&self) -> bool {
        self.flags() & DIRTY != 0
    }

    pub fn is_probation(&self) -> bool {
        self.flags() & PROBATION != 0
    }

    pub fn set_probation(&mut self, on: bool) {
        if on {
            self.0[FLAGS] |= PROBATION;
        } else {
            self.0[FLAGS] &= !PROBATION;
        }
    }

    /// The eviction counter, 0..=3.
    pub fn clock(&self) -> u8 {
        self.flags() & CLOCK_MASK
    }

    pub fn set_clock(&mut self, clock: u8) {
        self.0[FLAGS] = (self.0[FLAGS] & !CLOCK_MASK) | (clock & CLOCK_MASK);
    }

    /// Dirty entries: the TTL (ns, 0 = none) once clean.
    pub fn dirty_ttl(&self) -> Option<u64> {
        self.is_dirty()
            .then(|| u64::from_le_bytes(self.0[DIRTY_TTL].try_into().expect("8 bytes")))
    }

    pub fn meta(&self) -> RawMeta {
        RawMeta {
            version: self.version(),
            time: self.time(),
            dirty_ttl: self.dirty_ttl(),
        }
    }

    fn key_len(&self) -> usize {
        let mut len = [0u8; 4];
        len[..3].copy_from_slice(&self.0[KEY_LEN]);
        u32::from_le_bytes(len) as usize
    }

    pub fn key(&self) -> &[u8] {
        let start = header_len(self.is_dirty());
        &self.0[start..start + self.key_len()]
    }

    pub fn value(&self) -> &[u8] {
        &self.0[header_len(self.is_dirty()) + self.key_len()..]
    }
}

fn header_len(dirty: bool) -> usize {
    if dirty {
        HEADER_BYTES + DIRTY_EXTRA_BYTES
    } else {
        HEADER_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean(version: u64, time: u64) -> RawMeta {
        RawMeta {
            version,
            time,
            dirty_ttl: None,
        }
    }

    #[test]
    fn a_clean_entry_reads_back_what_it_was_given_in_one_tight_allocation() {
        let entry = Entry::new(b"key:1", b"some value", clean(u64::MAX - 1, 12345));
        assert_eq!(entry.key(), b"key:1");
        assert_eq!(entry.value(), b"some value");
        assert_eq!(entry.meta(), clean(u64::MAX - 1, 12345));
        assert!(!entry.is_dirty());
        assert_eq!(entry.clock(), 0);
        assert_eq!(entry.alloc_len(), HEADER_BYTES + 5 + 10);
        assert_eq!(entry.alloc_len(), Entry::alloc_len_for(5, 10, false));
    }

    #[test]
    fn a_dirty_entry_carries_its_ttl_and_eight_more_bytes() {
        let meta = RawMeta {
            version: 7,
            time: 99,
            dirty_ttl: Some(5_000),
        };
        let entry = Entry::new(b"k", b"", meta);
        assert!(entry.is_dirty());
        assert_eq!(entry.meta(), meta);
        assert_eq!(entry.key(), b"k");
        assert_eq!(entry.value(), b"");
        assert_eq!(entry.alloc_len(), HEADER_BYTES + DIRTY_EXTRA_BYTES + 1);
    }

    #[test]
    fn the_clock_counter_changes_only_its_own_bits() {
        let mut entry = Entry::new(
            b"k",
            b"v",
            RawMeta {
                version: 1,
                time: 0,
                dirty_ttl: Some(0),
            },
        );
        for clock in 0..=3 {
            entry.set_clock(clock);
            assert_eq!(entry.clock(), clock);
            assert!(entry.is_dirty());
        }
        entry.set_probation(true);
        assert!(entry.is_probation() && entry.is_dirty() && entry.clock() == 3);
        entry.set_probation(false);
        assert!(!entry.is_probation() && entry.is_dirty() && entry.clock() == 3);
        entry.set_time(42);
        assert_eq!(entry.time(), 42);
        assert_eq!(entry.clock(), 3);
    }

    #[test]
    fn with_meta_moves_between_dirty_and_clean_keeping_key_value_and_clock() {
        let mut dirty = Entry::new(
            b"key",
            b"value",
            RawMeta {
                version: 3,
                time: 10,
                dirty_ttl: Some(0),
            },
        );
        dirty.set_clock(2);
        dirty.set_probation(true);
        let clean_entry = dirty.with_meta(clean(3, 77));
        assert!(!clean_entry.is_dirty());
        assert_eq!(
            (clean_entry.key(), clean_entry.value()),
            (&b"key"[..], &b"value"[..])
        );
        assert_eq!(clean_entry.clock(), 2);
        assert!(clean_entry.is_probation());
        assert_eq!(
            clean_entry.alloc_len() + DIRTY_EXTRA_BYTES,
            dirty.alloc_len()
        );
    }

    #[test]
    fn long_keys_use_all_24_bits_of_the_length() {
        let key = vec![b'x'; 70_000];
        let entry = Entry::new(&key, b"v", clean(1, 0));
        assert_eq!(entry.key().len(), 70_000);
        assert_eq!(entry.value(), b"v");
    }
}

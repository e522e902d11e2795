//! Versions: a hybrid logical clock with a writer id.
//!
//! Every strategy of a key draws its versions from one space, so that a
//! switch of strategy can never let an older write win. A version is a
//! `u64` compared as a plain integer, laid out from the high bits down:
//!
//! | bits | field |
//! |---|---|
//! | 63 | always 0, so that versions fit PostgreSQL's `BIGINT` |
//! | 62..21 (42 bits) | physical time, milliseconds since the Unix epoch (until the year 2109) |
//! | 20..12 (9 bits) | logical counter: 512 versions per millisecond before the clock runs ahead of the wall clock |
//! | 11..0 (12 bits) | the writer id of the clock that made it |
//!
//! A clock never goes backwards and never repeats: each [`Hlc::now`] is
//! greater than every version it returned or [`Hlc::observe`]d before, even
//! if the wall clock steps back. Observing the versions a process reads or is
//! refused with keeps its clock ahead of what it has seen, so a write made
//! after seeing version `v` gets a version greater than `v`, whatever the
//! skew between the machines' clocks. Two processes that have not seen each
//! other's versions are ordered by their wall clocks (the usual last-writer-
//! wins caveat of clock skew), and within one millisecond by counter and
//! writer id: **two clocks with different writer ids never make the same
//! version**, so every store and every node breaks no tie, because there is
//! none. Writer ids are the user's to keep distinct
//! (`ClientConfig::with_writer_id`); without one a client draws a random id,
//! which two processes share with probability 1/4096 per pair.
//!
//! Versions of the earlier layout (48 bits of milliseconds, 16 of counter,
//! no writer id) compare as 32 times smaller: every one made before the
//! year 3700 is smaller than every version of this layout made today, so a
//! store or cache holding them never refuses a new write for being older.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Bits of the writer id.
pub const WRITER_BITS: u32 = 12;
/// Bits of the logical counter.
pub const COUNTER_BITS: u32 = 9;
/// Bits below the physical milliseconds: the counter and the writer id.
pub const LOGICAL_BITS: u32 = COUNTER_BITS + WRITER_BITS;
/// Bits of the physical milliseconds.
pub const PHYSICAL_BITS: u32 = 42;
/// The largest writer id.
pub const MAX_WRITER_ID: u16 = (1 << WRITER_BITS) - 1;

/// The physical milliseconds of a version.
pub fn physical_ms(version: u64) -> u64 {
    version >> LOGICAL_BITS
}

/// The smallest version at or after `ms` milliseconds since the epoch.
pub fn from_physical_ms(ms: u64) -> u64 {
    ms.min((1 << PHYSICAL_BITS) - 1) << LOGICAL_BITS
}

/// The writer id of a version.
pub fn writer_id(version: u64) -> u16 {
    // Masked to 12 bits: the cast cannot truncate.
    (version & u64::from(MAX_WRITER_ID)) as u16
}

/// A hybrid logical clock, shared by all tasks of a process (it is a single
/// atomic word).
#[derive(Debug)]
pub struct Hlc {
    last: AtomicU64,
    wall: fn() -> u64,
    writer: u16,
}

/// Milliseconds since the Unix epoch by the system clock.
pub fn wall_ms() -> u64 {
    // A clock before 1970 is a broken machine; such a clock reads as 0 and
    // the logical counter carries the order.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Default for Hlc {
    fn default() -> Self {
        Hlc::new()
    }
}

impl Hlc {
    /// A clock reading the system's wall clock, with a random writer id.
    pub fn new() -> Self {
        Hlc::with_wall_clock(wall_ms)
    }

    /// A clock reading `wall` (milliseconds since the epoch), for tests,
    /// with a random writer id.
    pub fn with_wall_clock(wall: fn() -> u64) -> Self {
        Hlc {
            last: AtomicU64::new(0),
            wall,
            writer: rand::random::<u16>() & MAX_WRITER_ID,
        }
    }

    /// Sets the writer id that every version of this clock carries (only
    /// its low 12 bits count; see [`MAX_WRITER_ID`]).
    pub fn with_writer_id(mut self, writer: u16) -> Self {
        self.writer = writer & MAX_WRITER_ID;
        self
    }

    /// The writer id of this clock's versions.
    pub fn writer(&self) -> u16 {
        self.writer
    }

    /// A new version, greater than every version this clock returned or
    /// observed before, carrying this clock's writer id.
    pub fn now(&self) -> u64 {
        // Work in ticks (the version without its writer id): the next tick
        // is after the last one seen, and at least the wall clock's.
        let physical = from_physical_ms((self.wall)()) >> WRITER_BITS;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let tick = physical.max((last >> WRITER_BITS) + 1);
            let next = (tick << WRITER_BITS) | u64::from(self.writer);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Moves the clock to at least `version`, so that later versions are
    /// greater than it.
    pub fn observe(&self, version: u64) {
        self.last.fetch_max(version, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_strictly_increase_even_when_the_wall_clock_stands_still() {
        let clock = Hlc::with_wall_clock(|| 1_000);
        let a = clock.now();
        let b = clock.now();
        assert!(b > a);
        assert_eq!(physical_ms(a), 1_000);
        assert_eq!(
            b - a,
            1 << WRITER_BITS,
            "the logical counter carries the order"
        );
        assert_eq!(writer_id(a), clock.writer());
        assert_eq!(writer_id(b), clock.writer());
    }

    #[test]
    fn an_observed_version_from_a_clock_ahead_is_overtaken() {
        let clock = Hlc::with_wall_clock(|| 1_000);
        let remote = from_physical_ms(5_000) + 7;
        clock.observe(remote);
        let next = clock.now();
        assert!(next > remote);
        assert_eq!(writer_id(next), clock.writer());
    }

    #[test]
    fn versions_are_unique_across_threads() {
        let clock = std::sync::Arc::new(Hlc::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let clock = std::sync::Arc::clone(&clock);
                std::thread::spawn(move || (0..10_000).map(|_| clock.now()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
    }

    #[test]
    fn two_writers_in_the_same_millisecond_never_share_a_version() {
        let a = Hlc::with_wall_clock(|| 1_000).with_writer_id(1);
        let b = Hlc::with_wall_clock(|| 1_000).with_writer_id(2);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1_000 {
            let (va, vb) = (a.now(), b.now());
            assert_ne!(va, vb, "two writers made the same version");
            assert!(seen.insert(va) && seen.insert(vb), "a version repeated");
        }
        // Observing each other keeps them distinct and ordered.
        let last = a.now();
        b.observe(last);
        assert!(b.now() > last);
    }

    #[test]
    fn the_wall_clock_lands_in_the_high_bits() {
        let before = wall_ms();
        let version = Hlc::new().now();
        assert!(physical_ms(version) >= before);
        assert!(version < i64::MAX as u64, "versions fit PostgreSQL BIGINT");
    }

    #[test]
    fn versions_of_the_earlier_layout_are_older_than_every_new_one() {
        // The earlier layout: 48 bits of milliseconds, 16 of counter.
        let old_now = (wall_ms() << 16) | 0xffff;
        let old_far = (wall_ms() * 4) << 16; // a clock a century and more ahead
        let new = Hlc::new().now();
        assert!(new > old_now && new > old_far);
    }
}

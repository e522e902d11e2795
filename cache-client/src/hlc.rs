//! Versions: a hybrid logical clock.
//!
//! Every strategy of a key draws its versions from one space, so that a
//! switch of strategy can never let an older write win. A version is a
//! `u64`: the physical time in milliseconds since the Unix epoch in the high
//! 48 bits and a logical counter in the low 16. Versions compare as plain
//! integers.
//!
//! A clock never goes backwards and never repeats: each [`Hlc::now`] is
//! greater than every version it returned or [`Hlc::observe`]d before, even
//! if the wall clock steps back. Observing the versions a process reads or is
//! refused with keeps its clock ahead of what it has seen, so a write made
//! after seeing version `v` gets a version greater than `v`, whatever the
//! skew between the machines' clocks. Two processes that have not seen each
//! other's versions are ordered by their wall clocks (the usual last-writer-
//! wins caveat of clock skew).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Bits of the logical counter.
pub const LOGICAL_BITS: u32 = 16;

/// The physical milliseconds of a version.
pub fn physical_ms(version: u64) -> u64 {
    version >> LOGICAL_BITS
}

/// The smallest version at or after `ms` milliseconds since the epoch.
pub fn from_physical_ms(ms: u64) -> u64 {
    ms << LOGICAL_BITS
}

/// A hybrid logical clock, shared by all tasks of a process (it is a single
/// atomic word).
#[derive(Debug)]
pub struct Hlc {
    last: AtomicU64,
    wall: fn() -> u64,
}

fn wall_ms() -> u64 {
    // A clock before 1970 is a broken machine; such a clock reads as 0 and
    // the logical counter carries the order.
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX >> LOGICAL_BITS)
    })
}

impl Default for Hlc {
    fn default() -> Self {
        Hlc::new()
    }
}

impl Hlc {
    /// A clock reading the system's wall clock.
    pub fn new() -> Self {
        Hlc::with_wall_clock(wall_ms)
    }

    /// A clock reading `wall` (milliseconds since the epoch), for tests.
    pub fn with_wall_clock(wall: fn() -> u64) -> Self {
        Hlc {
            last: AtomicU64::new(0),
            wall,
        }
    }

    /// Sets the writer id (stub, to be implemented).
    pub fn with_writer_id(self, _writer: u16) -> Self {
        self
    }

    /// A new version, greater than every version this clock returned or
    /// observed before.
    pub fn now(&self) -> u64 {
        let physical = from_physical_ms((self.wall)());
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = physical.max(last + 1);
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
        assert_eq!(b - a, 1, "the logical counter carries the order");
    }

    #[test]
    fn an_observed_version_from_a_clock_ahead_is_overtaken() {
        let clock = Hlc::with_wall_clock(|| 1_000);
        let remote = from_physical_ms(5_000) + 7;
        clock.observe(remote);
        assert!(clock.now() > remote);
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
}

//! Time in the entry header, and active expiry.
//!
//! Entries carry times as nanoseconds since the table's epoch (an
//! `Instant` taken when the table is made), shifted by one so that 0 can
//! mean "never": 8 bytes instead of the 16 of an `Option<Instant>`, and
//! 584 years of range.
//!
//! Expiry is lazy and active. Lazy: a read, a compute or the eviction hand
//! that meets an expired entry removes it. Active (as Redis does it): the
//! owner calls [`super::Table::expire_some`] periodically; each call walks
//! each shard's expiry hand over a slice of its buckets, removes what has
//! expired, and goes on with the next slice while at least a quarter of
//! the entries it met had expired, within a budget. So entries that
//! nobody reads still leave, and memory comes back, without a per-entry
//! timer structure.

use std::time::{Duration, Instant};

use super::entry::Entry;

/// The table's time base.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    pub fn new(epoch: Instant) -> Clock {
        Clock { epoch }
    }

    /// `at` in header units: never 0; instants before the epoch read as
    /// the epoch.
    pub fn encode(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(nanos)
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// An optional expiry in header units (0 = never).
    pub fn encode_expiry(&self, at: Option<Instant>) -> u64 {
        at.map_or(0, |at| self.encode(at))
    }

    pub fn decode(&self, time: u64) -> Instant {
        self.epoch + Duration::from_nanos(time.saturating_sub(1))
    }

    pub fn decode_expiry(&self, time: u64) -> Option<Instant> {
        (time != 0).then(|| self.decode(time))
    }
}

/// True when `entry` must no longer be served at `now` (header units).
/// Dirty entries never expire.
pub fn is_expired(entry: &Entry, now: u64) -> bool {
    !entry.is_dirty() && entry.time() != 0 && entry.time() <= now
}

/// Buckets one round of active expiry looks at in a shard.
pub const ROUND_BUCKETS: usize = 256;

/// One round's finding: occupied buckets met and how many had expired.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Round {
    pub met: usize,
    pub expired: usize,
}

impl Round {
    /// Whether another round is worth it: at least a quarter of the entries
    /// met had expired, or it met none (empty buckets cost little, and
    /// stopping on them would leave the hand in a stretch it has already
    /// cleared).
    pub fn go_on(&self) -> bool {
        self.expired * 4 >= self.met
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::entry::RawMeta;

    #[test]
    fn times_round_trip_and_zero_means_never() {
        let epoch = Instant::now();
        let clock = Clock::new(epoch);
        let later = epoch + Duration::from_millis(1500);
        assert_eq!(clock.decode(clock.encode(later)), later);
        assert_eq!(clock.encode_expiry(None), 0);
        assert_eq!(clock.decode_expiry(0), None);
        assert_eq!(clock.decode_expiry(clock.encode(later)), Some(later));
        assert_eq!(clock.encode(epoch), 1);
        // An instant before the epoch cannot be told apart from the epoch.
        if let Some(before) = epoch.checked_sub(Duration::from_secs(1)) {
            assert_eq!(clock.encode(before), 1);
        }
    }

    #[test]
    fn an_entry_expires_at_its_time_and_a_dirty_one_never() {
        let clean = Entry::new(
            b"k",
            b"v",
            RawMeta {
                version: 1,
                time: 100,
                dirty_ttl: None,
            },
        );
        assert!(!is_expired(&clean, 99));
        assert!(is_expired(&clean, 100));
        let forever = Entry::new(
            b"k",
            b"v",
            RawMeta {
                version: 1,
                time: 0,
                dirty_ttl: None,
            },
        );
        assert!(!is_expired(&forever, u64::MAX));
        let dirty = Entry::new(
            b"k",
            b"v",
            RawMeta {
                version: 1,
                time: 100,
                dirty_ttl: Some(1),
            },
        );
        assert!(!is_expired(&dirty, u64::MAX));
    }

    #[test]
    fn rounds_go_on_while_a_quarter_has_expired() {
        assert!(
            Round {
                met: 20,
                expired: 5
            }
            .go_on()
        );
        assert!(
            !Round {
                met: 20,
                expired: 4
            }
            .go_on()
        );
        assert!(Round { met: 0, expired: 0 }.go_on());
    }
}

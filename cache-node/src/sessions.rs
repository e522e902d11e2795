//! Client sessions and their flush generations: a node never applies a write
//! that a client sent before the `Flush` with which it re-admitted the node.
//!
//! A client routes around a node it cannot reach, and flushes the node
//! before it routes to it again (`docs/failover.md`). A write it sent before
//! giving the node up may still be on its way: held by the network and
//! retransmitted on the old connection after the partition healed, while
//! the flush went over a new one. Arriving after the flush, it would store a
//! value that was overwritten elsewhere meanwhile, and nothing would remove
//! it.
//!
//! So every request of a client carries its session (a random id drawn when
//! the client connects) and its generation (how many re-admission flushes
//! the client has started; `ringcache-session: <session hex>-<generation>`).
//! A flush records the generation it carries; a write of the same session
//! with an older generation is refused. Clocks play no part.
//!
//! The check and the write are atomic with respect to a flush: writes that
//! carry a session hold the read side of the fence while they check and
//! apply, a flush holds the write side while it records and flushes. A stale
//! write is therefore either flushed or refused.
//!
//! Memory: one entry per session that flushed this node, forgotten
//! [`SESSION_MEMORY`] after its last flush, and at most [`MAX_SESSIONS`]
//! entries (the oldest go first). A write delayed longer than that is not
//! recognised.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// How long a session's flush generation is remembered after its last flush.
pub const SESSION_MEMORY: Duration = Duration::from_secs(3600);
/// Sessions remembered at most.
pub const MAX_SESSIONS: usize = 65_536;
/// The metadata key that carries a request's session and generation.
pub const SESSION_HEADER: &str = "ringcache-session";

/// A client session and the generation a request was sent under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// The client's session id.
    pub session: u64,
    /// The client's flush generation when it sent the request.
    pub generation: u64,
}

impl Stamp {
    /// Parses `<session hex>-<generation decimal>`; `None` for anything else
    /// (such a request is not fenced).
    pub fn parse(value: &[u8]) -> Option<Stamp> {
        let text = std::str::from_utf8(value).ok()?;
        let (session, generation) = text.split_once('-')?;
        Some(Stamp {
            session: u64::from_str_radix(session, 16).ok()?,
            generation: generation.parse().ok()?,
        })
    }
}

/// The flush generation of each session that flushed this node, and the
/// fence between writes and flushes.
#[derive(Debug, Default)]
pub struct Sessions {
    fence: RwLock<()>,
    // Read on every stamped write, written only by flushes: a read lock
    // keeps writes on different cores from queueing behind one another.
    flushed: RwLock<HashMap<u64, (u64, Instant)>>,
}

impl Sessions {
    /// Takes the read side of the fence for a write: hold the guard while
    /// checking [`Sessions::is_stale`] and applying the write.
    pub fn write_guard(&self) -> RwLockReadGuard<'_, ()> {
        self.fence.read()
    }

    /// Takes the write side of the fence for a flush: hold the guard while
    /// calling [`Sessions::record_flush`] and flushing.
    pub fn flush_guard(&self) -> RwLockWriteGuard<'_, ()> {
        self.fence.write()
    }

    /// If a request stamped `stamp` was sent before the last flush of its
    /// session (it must not write), that flush's generation.
    pub fn is_stale(&self, stamp: Stamp) -> Option<u64> {
        let flushed = self.flushed.read();
        flushed
            .get(&stamp.session)
            .map(|&(generation, _)| generation)
            .filter(|&generation| stamp.generation < generation)
    }

    /// Records a flush stamped `stamp` at `now`.
    pub fn record_flush(&self, stamp: Stamp, now: Instant) {
        let mut flushed = self.flushed.write();
        if flushed.len() >= MAX_SESSIONS && !flushed.contains_key(&stamp.session) {
            flushed.retain(|_, (_, at)| now.duration_since(*at) < SESSION_MEMORY);
            if flushed.len() >= MAX_SESSIONS {
                let oldest = flushed
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(&session, _)| session);
                if let Some(oldest) = oldest {
                    flushed.remove(&oldest);
                }
            }
        }
        let entry = flushed.entry(stamp.session).or_insert((0, now));
        entry.0 = entry.0.max(stamp.generation);
        entry.1 = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(session: u64, generation: u64) -> Stamp {
        Stamp {
            session,
            generation,
        }
    }

    #[test]
    fn a_write_sent_before_its_sessions_flush_is_stale_and_later_ones_are_not() {
        let sessions = Sessions::default();
        let now = Instant::now();
        assert_eq!(sessions.is_stale(stamp(7, 0)), None, "never flushed");
        sessions.record_flush(stamp(7, 3), now);
        assert_eq!(sessions.is_stale(stamp(7, 2)), Some(3));
        assert_eq!(sessions.is_stale(stamp(7, 3)), None);
        assert_eq!(sessions.is_stale(stamp(7, 4)), None);
        assert_eq!(sessions.is_stale(stamp(8, 0)), None, "other sessions");
        // A flush that arrives late never lowers the generation.
        sessions.record_flush(stamp(7, 1), now);
        assert_eq!(sessions.is_stale(stamp(7, 2)), Some(3));
    }

    #[test]
    fn stamps_parse_from_the_header_and_nothing_else_does() {
        assert_eq!(Stamp::parse(b"00ff-12"), Some(stamp(255, 12)));
        assert_eq!(Stamp::parse(b"ff"), None);
        assert_eq!(Stamp::parse(b"zz-1"), None);
        assert_eq!(Stamp::parse(b"1-x"), None);
    }

    #[test]
    fn the_table_stays_bounded() {
        let sessions = Sessions::default();
        let start = Instant::now();
        for i in 0..(MAX_SESSIONS as u64 + 10) {
            sessions.record_flush(stamp(i, 1), start + Duration::from_millis(i));
        }
        assert!(sessions.flushed.read().len() <= MAX_SESSIONS);
        // The newest are kept.
        let newest = MAX_SESSIONS as u64 + 9;
        assert_eq!(sessions.is_stale(stamp(newest, 0)), Some(1));
    }
}

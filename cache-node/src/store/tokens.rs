//! Lease tokens.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

/// Lease tokens: unique per node process. A counter multiplied by an odd
/// constant is a bijection on u64, so tokens do not repeat before 2^64 of
/// them; the random start keeps a restarted node from handing out the
/// tokens of its previous life, which a slow client might still present.
pub(super) struct Tokens {
    pub(super) base: u64,
    pub(super) next: AtomicU64,
}

impl Tokens {
    pub(super) fn new() -> Self {
        // std's RandomState is seeded from the OS; no extra dependency.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        Tokens {
            base: hasher.finish(),
            next: AtomicU64::new(0),
        }
    }

    pub(super) fn next(&self) -> u64 {
        loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let token = self
                .base
                .wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            // 0 means "no token" on the wire.
            if token != 0 {
                return token;
            }
        }
    }
}

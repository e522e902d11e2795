//! The ring's balance and key movement, measured the way
//! `cache-client`'s ring property tests check them (`docs/ring.md`): keys
//! `key-0` ... in keyspace `default`, equal nodes `node-0` ... at the
//! default virtual points per node.
//!
//! For each node count N: the most and least loaded nodes' share of the
//! keys over the mean; the fraction of keys that move when `node-N` is
//! added, against the ideal `1/(N+1)`, and when `node-⌊N/2⌋` is removed,
//! against the ideal `1/N`, with the count of keys that moved anywhere but
//! onto the added node (or off the removed one), which consistent hashing
//! keeps at zero; and the time of one owner lookup (hashing included).

use std::{collections::HashMap, hint::black_box, time::Instant};

use cache_client::ring::{DEFAULT_VNODES, Ring, RingNode};
use serde::Serialize;

/// The keyspace the keys are hashed in.
const KEYSPACE: &str = "default";

/// The figures for one node count.
#[derive(Clone, Debug, Serialize)]
pub struct RingFigures {
    /// Nodes in the ring.
    pub nodes: usize,
    /// The most loaded node's keys over the mean.
    pub max_over_mean: f64,
    /// The least loaded node's keys over the mean.
    pub min_over_mean: f64,
    /// Adding `node-N`.
    pub add: Movement,
    /// Removing `node-⌊N/2⌋`.
    pub remove: Movement,
    /// Mean time of one `Ring::owner` call over the keys, in nanoseconds.
    pub owner_lookup_ns: f64,
}

/// What a membership change moved.
#[derive(Clone, Debug, Serialize)]
pub struct Movement {
    /// The node added or removed.
    pub node: String,
    /// Fraction of the keys whose owner changed.
    pub moved_fraction: f64,
    /// The fraction a perfectly even ring would move: 1/(N+1) when adding,
    /// 1/N when removing.
    pub ideal_fraction: f64,
    /// Keys that moved but not onto the added node (or not off the removed
    /// one); 0 for a consistent-hash ring.
    pub moved_elsewhere: u64,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct RingReport {
    /// Keys placed (`key-0` ...).
    pub keys: usize,
    /// Virtual points per node.
    pub vnodes: u32,
    /// One entry per node count.
    pub rings: Vec<RingFigures>,
}

fn equal_ring(ids: impl IntoIterator<Item = usize>) -> Ring {
    Ring::new(
        ids.into_iter()
            .map(|i| RingNode::new(format!("node-{i}"), 1)),
    )
}

fn owners<'r>(ring: &'r Ring, keys: &[String]) -> Vec<&'r str> {
    keys.iter()
        .map(|k| {
            ring.owner(KEYSPACE, k.as_bytes())
                .expect("a ring of nodes of weight 1 owns every key")
        })
        .collect()
}

/// Measures rings of each of `node_counts` nodes over `keys` keys.
pub fn report(node_counts: &[usize], keys: usize) -> RingReport {
    let names: Vec<String> = (0..keys).map(|i| format!("key-{i}")).collect();
    let rings = node_counts.iter().map(|&n| figures(n, &names)).collect();
    RingReport {
        keys,
        vnodes: DEFAULT_VNODES,
        rings,
    }
}

#[allow(clippy::cast_precision_loss)] // Counts stay far below 2^53.
fn figures(n: usize, keys: &[String]) -> RingFigures {
    let ring = equal_ring(0..n);
    let before = owners(&ring, keys);
    let mut counts: HashMap<&str, usize> = ring.nodes().iter().map(|m| (&*m.id, 0)).collect();
    for owner in &before {
        *counts.get_mut(owner).expect("owners are members") += 1;
    }
    let mean = keys.len() as f64 / n as f64;
    let max = counts.values().copied().max().unwrap_or(0) as f64;
    let min = counts.values().copied().min().unwrap_or(0) as f64;

    let added = format!("node-{n}");
    let grown = equal_ring(0..=n);
    let after = owners(&grown, keys);
    let (mut moved, mut elsewhere) = (0u64, 0u64);
    for (b, a) in before.iter().zip(&after) {
        if b != a {
            moved += 1;
            elsewhere += u64::from(*a != added);
        }
    }
    let add = Movement {
        node: added,
        moved_fraction: moved as f64 / keys.len() as f64,
        ideal_fraction: 1.0 / (n + 1) as f64,
        moved_elsewhere: elsewhere,
    };

    let gone = n / 2;
    let removed = format!("node-{gone}");
    let shrunk = equal_ring((0..n).filter(|&i| i != gone));
    let after = owners(&shrunk, keys);
    let (mut moved, mut elsewhere) = (0u64, 0u64);
    for (b, a) in before.iter().zip(&after) {
        if b != a {
            moved += 1;
            elsewhere += u64::from(*b != removed);
        }
    }
    let remove = Movement {
        node: removed,
        moved_fraction: moved as f64 / keys.len() as f64,
        ideal_fraction: 1.0 / n as f64,
        moved_elsewhere: elsewhere,
    };

    RingFigures {
        nodes: n,
        max_over_mean: max / mean,
        min_over_mean: min / mean,
        add,
        remove,
        owner_lookup_ns: lookup_ns(&ring, keys),
    }
}

/// The mean time of `Ring::owner` over `keys`, the best of three passes
/// (the others were disturbed by something else on the machine).
#[allow(clippy::cast_precision_loss)]
fn lookup_ns(ring: &Ring, keys: &[String]) -> f64 {
    (0..3)
        .map(|_| {
            let start = Instant::now();
            for key in keys {
                black_box(ring.owner(KEYSPACE, black_box(key.as_bytes())));
            }
            start.elapsed().as_nanos() as f64 / keys.len().max(1) as f64
        })
        .fold(f64::INFINITY, f64::min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_report_is_consistent() {
        let report = report(&[3, 10], 20_000);
        assert_eq!(report.rings.len(), 2);
        for ring in &report.rings {
            assert!(
                ring.max_over_mean >= 1.0 && ring.max_over_mean < 1.3,
                "{ring:?}"
            );
            assert!(
                ring.min_over_mean <= 1.0 && ring.min_over_mean > 0.7,
                "{ring:?}"
            );
            // Consistent hashing: only keys onto the new node, or off the
            // removed one, move.
            assert_eq!(ring.add.moved_elsewhere, 0);
            assert_eq!(ring.remove.moved_elsewhere, 0);
            assert!((ring.add.moved_fraction - ring.add.ideal_fraction).abs() < 0.05);
            assert!((ring.remove.moved_fraction - ring.remove.ideal_fraction).abs() < 0.05);
            assert!(ring.owner_lookup_ns > 0.0);
        }
    }
}

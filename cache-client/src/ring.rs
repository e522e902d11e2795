//! The consistent-hash ring that maps `(keyspace, key)` to cache nodes.
//!
//! The ring is pure: no I/O, no clocks, no async, no transport types. It is
//! built once from a node list and then only read, so the client can share it
//! behind an `Arc` and swap in a new one when membership changes.
//!
//! Placement is specified byte for byte in `docs/ring.md` so that clients in
//! other languages route exactly like this one; in short:
//!
//! - a key hashes to `xxh3_64(keyspace ++ 0x00 ++ key)` (seed 0), see
//!   [`Ring::key_hash`];
//! - a node of weight `w` gets `vnodes_per_weight * w` virtual points, point
//!   `i` at `xxh3_64("{node_id}#{i}")`, see [`Ring::point_hash`];
//! - points are ordered by `(hash, node id bytewise)`; a key belongs to the
//!   first point whose hash is `>=` the key hash, wrapping past the largest
//!   point to the smallest;
//! - replicas are the distinct nodes met walking on from that point.

use xxhash_rust::xxh3::{Xxh3Default, xxh3_64};

/// Virtual points per unit of weight when a ring is built with [`Ring::new`].
///
/// Chosen by measurement (the figures are in `docs/ring.md`): with 3 to 10
/// equal nodes named `node-0`, `node-1`, … the most loaded node holds at most
/// 1.064 times the mean over a million keys, inside the required 1.10. The
/// load spread shrinks roughly like `1/sqrt(points per node)`, and at 256 or
/// 768 points the bound was broken or nearly so, while each doubling costs a
/// lookup only one more binary-search step.
pub const DEFAULT_VNODES: u32 = 1024;

/// Keys up to this many hashed bytes are hashed from a stack buffer with the
/// one-shot `xxh3_64`; longer ones go through the streaming hasher, which
/// gives the same value but costs more for short inputs.
const STACK_KEY_BYTES: usize = 256;

/// A cache node as the ring sees it: an identity and a relative weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingNode {
    /// Stable node identity; it names the node's virtual points, so renaming
    /// a node moves its keys. Any string, compared bytewise.
    pub id: String,
    /// Relative capacity. A node of weight 2 gets twice the virtual points,
    /// and so about twice the keys, of a node of weight 1; weight 0 means the
    /// node is listed but owns nothing.
    pub weight: u32,
}

impl RingNode {
    /// A node with the given id and weight.
    pub fn new(id: impl Into<String>, weight: u32) -> RingNode {
        RingNode {
            id: id.into(),
            weight,
        }
    }
}

/// An immutable consistent-hash ring with virtual nodes and weights.
///
/// A lookup is one key hash and a binary search over a sorted array of point
/// hashes; [`Ring::owner`] does not allocate.
#[derive(Clone, Debug)]
pub struct Ring {
    /// Deduplicated nodes sorted by id, so that a node's index orders like its
    /// id and the point sort can break ties on the index.
    nodes: Vec<RingNode>,
    /// Hashes of all virtual points, ascending. Kept apart from `owners` so the
    /// binary search touches only the hashes.
    hashes: Vec<u64>,
    /// `owners[p]` is the index in `nodes` of the node owning point `p`.
    owners: Vec<u32>,
    /// Number of nodes with at least one point: how many distinct nodes a
    /// walk round the ring can meet.
    owning: usize,
    /// Virtual points per unit of weight this ring was built with.
    vnodes_per_weight: u32,
}

impl Ring {
    /// Builds a ring with [`DEFAULT_VNODES`] points per unit of weight.
    ///
    /// If several nodes share an id, the last one wins.
    pub fn new(nodes: impl IntoIterator<Item = RingNode>) -> Ring {
        Ring::with_vnodes(nodes, DEFAULT_VNODES)
    }

    /// Builds a ring with `vnodes_per_weight` points per unit of weight.
    ///
    /// If several nodes share an id, the last one wins. The ring holds
    /// `vnodes_per_weight * sum(weight)` points (12 bytes each, 16 while
    /// building), so weights are meant to be small integers; with
    /// `vnodes_per_weight == 0` the ring owns nothing.
    ///
    /// # Panics
    ///
    /// If there are more than `u32::MAX` distinct nodes, or the point count
    /// does not fit in `usize`; both are far beyond any real cluster, and the
    /// allocation would fail first.
    pub fn with_vnodes(nodes: impl IntoIterator<Item = RingNode>, vnodes_per_weight: u32) -> Ring {
        // Last one wins: a stable sort keeps equal ids in input order, so
        // reversing first and then keeping the first of each run keeps the
        // last occurrence.
        let mut nodes: Vec<RingNode> = nodes.into_iter().collect();
        nodes.reverse();
        nodes.sort_by(|a, b| a.id.as_bytes().cmp(b.id.as_bytes()));
        nodes.dedup_by(|later, earlier| later.id == earlier.id);
        assert!(
            u32::try_from(nodes.len()).is_ok(),
            "ring of {} nodes exceeds u32::MAX",
            nodes.len()
        );

        let total: u64 = nodes
            .iter()
            .map(|n| u64::from(n.weight) * u64::from(vnodes_per_weight))
            .sum();
        let total = usize::try_from(total).expect("point count exceeds the address space");
        let mut points: Vec<(u64, u32)> = Vec::with_capacity(total);
        // One buffer for all point names; it is reused to avoid an allocation
        // per point.
        let mut name = String::new();
        for (index, node) in nodes.iter().enumerate() {
            let index = index as u32; // Fits: checked against u32::MAX above.
            let count = u64::from(node.weight) * u64::from(vnodes_per_weight);
            for i in 0..count {
                points.push((point_hash_into(&mut name, &node.id, i), index));
            }
        }
        // Node indices order like node ids, so this is the documented
        // (hash, node id) order. Equal pairs are points of the same node,
        // which route identically whatever their order.
        points.sort_unstable();

        let owning = if vnodes_per_weight == 0 {
            0
        } else {
            nodes.iter().filter(|n| n.weight > 0).count()
        };
        let (hashes, owners) = points.into_iter().unzip();
        Ring {
            nodes,
            hashes,
            owners,
            owning,
            vnodes_per_weight,
        }
    }

    /// The hash that places `key` of `keyspace` on the ring:
    /// `xxh3_64(keyspace ++ [0x00] ++ key)` with seed 0.
    ///
    /// The NUL separator keeps `("ab", "c")` and `("a", "bc")` apart; it is
    /// unambiguous because keyspace names never contain NUL.
    ///
    /// # Panics
    ///
    /// In debug builds, if `keyspace` contains NUL: the client validates
    /// keyspace names before they get here.
    pub fn key_hash(keyspace: &str, key: &[u8]) -> u64 {
        debug_assert!(
            !keyspace.as_bytes().contains(&0),
            "keyspace names cannot contain NUL"
        );
        let len = keyspace.len() + 1 + key.len();
        if len <= STACK_KEY_BYTES {
            // Avoids both a heap allocation and the streaming hasher's setup
            // cost on the per-request path; most keys are short.
            let mut buf = [0u8; STACK_KEY_BYTES];
            buf[..keyspace.len()].copy_from_slice(keyspace.as_bytes());
            buf[keyspace.len() + 1..len].copy_from_slice(key);
            xxh3_64(&buf[..len])
        } else {
            let mut hasher = Xxh3Default::new();
            hasher.update(keyspace.as_bytes());
            hasher.update(&[0]);
            hasher.update(key);
            hasher.digest()
        }
    }

    /// The hash of virtual point `i` of node `node_id`:
    /// `xxh3_64` (seed 0) of the UTF-8 string `"{node_id}#{i}"`, `i` in
    /// decimal without leading zeros.
    pub fn point_hash(node_id: &str, i: u64) -> u64 {
        point_hash_into(&mut String::new(), node_id, i)
    }

    /// The id of the node that owns `key`, or `None` if no node has points
    /// (no nodes, every weight 0, or 0 virtual points per weight).
    pub fn owner(&self, keyspace: &str, key: &[u8]) -> Option<&str> {
        let point = self.first_point(Ring::key_hash(keyspace, key))?;
        Some(self.node_id(point))
    }

    /// The first `n` distinct nodes in ring order from `key`, the owner first;
    /// fewer if fewer nodes have points. Never names a node twice.
    pub fn replicas(&self, keyspace: &str, key: &[u8], n: usize) -> Vec<&str> {
        let mut out = Vec::with_capacity(n.min(self.owning));
        out.extend(self.successors(keyspace, key).take(n));
        out
    }

    /// All nodes with points, each once, in ring order from `key`, the owner
    /// first.
    ///
    /// Routing around a down node takes the next item; `replicas(.., n)` is
    /// the first `n` items.
    pub fn successors(&self, keyspace: &str, key: &[u8]) -> Successors<'_> {
        // With no points `owning` is 0, so the start index is never used.
        let start = self.first_point(Ring::key_hash(keyspace, key));
        Successors {
            ring: self,
            next_point: start.unwrap_or(0),
            remaining: self.owning,
            seen_low: 0,
            seen_high: Vec::new(),
        }
    }

    /// The nodes, deduplicated (last wins) and sorted by id bytewise,
    /// including those of weight 0.
    pub fn nodes(&self) -> &[RingNode] {
        &self.nodes
    }

    /// Number of nodes, including those of weight 0.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the ring has no nodes at all. A ring whose nodes all have
    /// weight 0 is not empty but still owns nothing.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Virtual points per unit of weight this ring was built with.
    pub fn vnodes_per_weight(&self) -> u32 {
        self.vnodes_per_weight
    }

    /// Index of the first point with hash `>= hash`, wrapping to the first
    /// point; `None` if there are no points.
    fn first_point(&self, hash: u64) -> Option<usize> {
        if self.hashes.is_empty() {
            return None;
        }
        let p = self.hashes.partition_point(|&h| h < hash);
        Some(if p == self.hashes.len() { 0 } else { p })
    }

    fn node_id(&self, point: usize) -> &str {
        &self.nodes[self.owners[point] as usize].id
    }
}

/// Writes `"{node_id}#{i}"` into `buf` and hashes it.
fn point_hash_into(buf: &mut String, node_id: &str, i: u64) -> u64 {
    use std::fmt::Write as _;
    buf.clear();
    buf.push_str(node_id);
    buf.push('#');
    write!(buf, "{i}").expect("writing to a String cannot fail");
    xxh3_64(buf.as_bytes())
}

/// Iterator over distinct nodes in ring order, returned by
/// [`Ring::successors`].
#[derive(Clone, Debug)]
pub struct Successors<'a> {
    ring: &'a Ring,
    /// Next point to look at.
    next_point: usize,
    /// Nodes with points not yet yielded. Every one of them has a point
    /// before the walk completes its turn, so this is also the exact number
    /// of items left, and the walk stops as soon as it reaches 0.
    remaining: usize,
    /// Node indices below 128 already yielded, as a bitset: covers real
    /// clusters without allocating per request.
    seen_low: u128,
    /// Node indices from 128 up already yielded; allocated only if needed.
    seen_high: Vec<u64>,
}

impl Successors<'_> {
    /// Marks node `index` as yielded; returns whether it was new.
    fn insert(&mut self, index: usize) -> bool {
        if index < 128 {
            let bit = 1u128 << index;
            let new = self.seen_low & bit == 0;
            self.seen_low |= bit;
            return new;
        }
        let index = index - 128;
        if self.seen_high.is_empty() {
            self.seen_high = vec![0; (self.ring.nodes.len() - 128).div_ceil(64)];
        }
        let (word, bit) = (index / 64, 1u64 << (index % 64));
        let new = self.seen_high[word] & bit == 0;
        self.seen_high[word] |= bit;
        new
    }
}

impl<'a> Iterator for Successors<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let ring = self.ring;
        // Terminates within one turn: `remaining` counts nodes that all have a
        // point ahead of us in this turn.
        while self.remaining > 0 {
            let point = self.next_point;
            self.next_point = if point + 1 == ring.hashes.len() {
                0
            } else {
                point + 1
            };
            let owner = ring.owners[point] as usize;
            if self.insert(owner) {
                self.remaining -= 1;
                return Some(&ring.nodes[owner].id);
            }
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Successors<'_> {}

impl std::iter::FusedIterator for Successors<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};
    use std::sync::OnceLock;

    fn node(id: &str, weight: u32) -> RingNode {
        RingNode::new(id, weight)
    }

    /// `node-{i}` of weight 1 for each `i`, at the default vnode count.
    fn equal_ring(ids: impl IntoIterator<Item = usize>) -> Ring {
        Ring::new(ids.into_iter().map(|i| node(&format!("node-{i}"), 1)))
    }

    #[test]
    fn empty_ring_owns_nothing() {
        let ring = Ring::new([]);
        assert!(ring.is_empty());
        assert_eq!(ring.len(), 0);
        assert_eq!(ring.owner("default", b"k"), None);
        assert!(ring.replicas("default", b"k", 3).is_empty());
        assert_eq!(ring.successors("default", b"k").count(), 0);
    }

    #[test]
    fn weight_zero_owns_nothing() {
        let ring = Ring::new([node("a", 0), node("b", 0)]);
        assert!(!ring.is_empty());
        assert_eq!(ring.len(), 2);
        assert_eq!(ring.owner("default", b"k"), None);
        assert!(ring.replicas("default", b"k", 2).is_empty());

        let ring = Ring::new([node("a", 1), node("zero", 0), node("c", 1)]);
        for i in 0..1000 {
            let key = format!("k{i}");
            let all: Vec<_> = ring.successors("default", key.as_bytes()).collect();
            assert_eq!(all.len(), 2);
            assert!(!all.contains(&"zero"));
        }
        assert_eq!(ring.nodes().len(), 3);
    }

    #[test]
    fn vnodes_zero_owns_nothing() {
        let ring = Ring::with_vnodes([node("a", 1)], 0);
        assert_eq!(ring.owner("default", b"k"), None);
    }

    #[test]
    fn replicas_are_distinct_and_start_at_the_owner() {
        let ring = Ring::new([node("a", 1), node("b", 2), node("c", 1), node("d", 1)]);
        for i in 0..2000 {
            let key = format!("key-{i}");
            let owner = ring.owner("default", key.as_bytes()).unwrap();
            for n in 0..=6 {
                let replicas = ring.replicas("default", key.as_bytes(), n);
                assert_eq!(replicas.len(), n.min(4));
                let distinct: HashSet<_> = replicas.iter().collect();
                assert_eq!(distinct.len(), replicas.len(), "{replicas:?}");
                if n > 0 {
                    assert_eq!(replicas[0], owner);
                }
            }
            let mut successors = ring.successors("default", key.as_bytes());
            assert_eq!(successors.len(), 4);
            successors.next();
            assert_eq!(successors.len(), 3);
        }
    }

    #[test]
    fn successors_handle_more_than_128_nodes() {
        // Node indices from 128 up use the heap bitset.
        let ring = Ring::with_vnodes((0..300).map(|i| node(&format!("n{i}"), 1)), 4);
        let all: Vec<_> = ring.successors("default", b"k").collect();
        let distinct: HashSet<_> = all.iter().collect();
        assert_eq!(all.len(), 300);
        assert_eq!(distinct.len(), 300);
    }

    #[test]
    fn key_at_or_below_a_point_maps_to_it_and_beyond_the_last_wraps() {
        let ring = Ring::with_vnodes([node("a", 1), node("b", 1), node("c", 1)], 1);
        let h = &ring.hashes;
        assert_eq!(ring.first_point(h[1]), Some(1));
        assert_eq!(ring.first_point(h[1] - 1), Some(1));
        assert_eq!(ring.first_point(h[1] + 1), Some(2));
        assert_eq!(ring.first_point(h[2] + 1), Some(0));
        assert_eq!(ring.first_point(u64::MAX), Some(0));
        assert_eq!(ring.first_point(0), Some(0));

        // The same through the public API: a real key beyond the last point.
        let key = (0..)
            .map(|i| format!("k{i}"))
            .find(|k| Ring::key_hash("default", k.as_bytes()) > h[2])
            .unwrap();
        assert_eq!(ring.owner("default", key.as_bytes()), Some(ring.node_id(0)));
    }

    #[test]
    fn points_are_ordered_by_hash_then_node_id() {
        let ring = Ring::with_vnodes([node("b", 2), node("a", 1), node("c", 3)], 64);
        for p in 1..ring.hashes.len() {
            let prev = (ring.hashes[p - 1], ring.node_id(p - 1).as_bytes());
            let this = (ring.hashes[p], ring.node_id(p).as_bytes());
            assert!(prev <= this);
        }
        assert_eq!(ring.hashes.len(), 64 * 6);
    }

    #[test]
    fn input_order_does_not_matter_and_last_duplicate_wins() {
        let a = Ring::new([node("x", 1), node("y", 2), node("z", 1)]);
        let b = Ring::new([node("z", 1), node("y", 1), node("x", 1), node("y", 2)]);
        assert_eq!(a.nodes(), b.nodes());
        assert_eq!(a.nodes()[1], node("y", 2));
        assert_eq!(a.hashes, b.hashes);
        assert_eq!(a.owners, b.owners);
    }

    #[test]
    fn key_hash_is_xxh3_of_keyspace_nul_key_on_both_paths() {
        for len in [0, 1, 200, 254, 255, 256, 257, 1000] {
            let key = vec![b'k'; len];
            let mut bytes = b"default\0".to_vec();
            bytes.extend_from_slice(&key);
            assert_eq!(
                Ring::key_hash("default", &key),
                xxh3_64(&bytes),
                "len {len}"
            );
        }
        assert_ne!(Ring::key_hash("ab", b"c"), Ring::key_hash("a", b"bc"));
        assert_eq!(Ring::point_hash("node-a", 7), xxh3_64(b"node-a#7"));
    }

    #[test]
    fn load_follows_weight() {
        let ring = Ring::new([node("a", 1), node("b", 2), node("c", 1)]);
        let mut counts: HashMap<&str, f64> = HashMap::new();
        let keys = 200_000;
        for i in 0..keys {
            let key = format!("key-{i}");
            *counts
                .entry(ring.owner("default", key.as_bytes()).unwrap())
                .or_default() += 1.0;
        }
        for (id, expected) in [("a", 0.25), ("b", 0.5), ("c", 0.25)] {
            let share = counts[id] / f64::from(keys);
            assert!((share - expected).abs() < 0.03, "{id}: {share}");
        }
    }

    // Property tests over a million keys, for 3 to 10 equal nodes at the
    // default settings. They print their figures (run with --nocapture);
    // docs/ring.md quotes them.

    const PROPERTY_KEYS: usize = 1_000_000;

    /// Hashes of `key-0` .. `key-999999` in keyspace `default`, computed once
    /// and shared by the property tests.
    fn property_hashes() -> &'static [u64] {
        static HASHES: OnceLock<Vec<u64>> = OnceLock::new();
        HASHES.get_or_init(|| {
            (0..PROPERTY_KEYS)
                .map(|i| Ring::key_hash("default", format!("key-{i}").as_bytes()))
                .collect()
        })
    }

    /// The owner of each hash, as an index into `ring.nodes()`. Goes through
    /// `first_point` so the key hashes are computed only once, and returns
    /// indices rather than ids so that a million comparisons stay cheap in the
    /// unoptimised test build.
    fn owners(ring: &Ring, hashes: &[u64]) -> Vec<u32> {
        hashes
            .iter()
            .map(|&h| ring.owners[ring.first_point(h).unwrap()])
            .collect()
    }

    /// For each node of `from`, its index in `to` (`u32::MAX` if absent), to
    /// compare owner indices across rings.
    fn translate(from: &Ring, to: &Ring) -> Vec<u32> {
        from.nodes()
            .iter()
            .map(|n| match to.nodes().iter().position(|m| m.id == n.id) {
                Some(i) => i as u32,
                None => u32::MAX,
            })
            .collect()
    }

    #[test]
    fn property_owners_match_the_public_api() {
        let ring = equal_ring(0..5);
        let hashes = property_hashes();
        let owners = owners(&ring, hashes);
        for i in (0..PROPERTY_KEYS).step_by(997) {
            let key = format!("key-{i}");
            let expected = &ring.nodes()[owners[i] as usize].id;
            assert_eq!(
                ring.owner("default", key.as_bytes()),
                Some(expected.as_str())
            );
        }
    }

    #[test]
    fn property_balance() {
        let hashes = property_hashes();
        for n in 3..=10 {
            let ring = equal_ring(0..n);
            let mut counts = vec![0usize; n];
            for owner in owners(&ring, hashes) {
                counts[owner as usize] += 1;
            }
            let mean = PROPERTY_KEYS as f64 / n as f64;
            let max = *counts.iter().max().unwrap() as f64;
            let min = *counts.iter().min().unwrap() as f64;
            println!(
                "balance: N={n:2} max/mean={:.4} min/mean={:.4}",
                max / mean,
                min / mean
            );
            assert!(max / mean <= 1.10, "N={n}: max/mean {}", max / mean);
        }
    }

    #[test]
    fn property_adding_a_node_moves_only_onto_it() {
        let hashes = property_hashes();
        for n in 3..=10 {
            let (ring_before, ring_after) = (equal_ring(0..n), equal_ring(0..=n));
            let to_after = translate(&ring_before, &ring_after);
            let new_id = format!("node-{n}");
            let new = translate(&Ring::new([node(&new_id, 1)]), &ring_after)[0];
            let after = owners(&ring_after, hashes);
            let mut moved = 0;
            for (b, &a) in owners(&ring_before, hashes).into_iter().zip(&after) {
                if to_after[b as usize] != a {
                    assert_eq!(a, new, "a key moved, but not onto the new node");
                    moved += 1;
                }
            }
            let fraction = moved as f64 / PROPERTY_KEYS as f64;
            let bound = 1.1 / (n + 1) as f64;
            println!(
                "add: N={n:2} -> {:2} moved={fraction:.4} (x(N+1)={:.4}, bound {bound:.4})",
                n + 1,
                fraction * (n + 1) as f64
            );
            assert!(fraction <= bound, "N={n}: moved {fraction} > {bound}");
        }
    }

    #[test]
    fn property_removing_a_node_moves_only_its_keys() {
        let hashes = property_hashes();
        for n in 3..=10 {
            // Remove a node from the middle of the list, not the newest.
            let gone_id = format!("node-{}", n / 2);
            let ring_before = equal_ring(0..n);
            let ring_after = equal_ring((0..n).filter(|&i| i != n / 2));
            let to_after = translate(&ring_before, &ring_after);
            let after = owners(&ring_after, hashes);
            let mut moved = 0;
            for (b, &a) in owners(&ring_before, hashes).into_iter().zip(&after) {
                // The removed node translates to u32::MAX, so its keys all
                // count as moved; any other key must stay put.
                if to_after[b as usize] != a {
                    assert_eq!(
                        ring_before.nodes()[b as usize].id,
                        gone_id,
                        "a key moved off a node that stayed"
                    );
                    moved += 1;
                }
            }
            println!(
                "remove: N={n:2} -> {:2} (removed {gone_id}) moved={:.4} (x N={:.4})",
                n - 1,
                moved as f64 / PROPERTY_KEYS as f64,
                moved as f64 / PROPERTY_KEYS as f64 * n as f64
            );
        }
    }
}

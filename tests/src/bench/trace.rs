//! The hit-ratio traces of `hit-ratio` (issue 14): the same requests, from
//! a seed, for every cache they are replayed against. Pure.
//!
//! - **zipf**: Zipf 0.99 over `keys` ranks.
//! - **scan**: the same, with a one-pass scan of keys never seen before
//!   (`scan_len` of them) at every tenth of the trace: a cache that admits
//!   every new key loses its hot set to each scan.
//! - **shift**: the same Zipf, whose hot set moves to other keys
//!   `shifts` times over the trace.
//!
//! Each request is a read; on a miss the replayer writes the key
//! (cache-aside). Only the Zipf requests count towards the hit ratio:
//! scan keys are never read twice.

use rand::{SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Zipf};

/// Which trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Zipf,
    Scan,
    Shift,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Zipf, Kind::Scan, Kind::Shift];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Zipf => "zipf",
            Kind::Scan => "scan",
            Kind::Shift => "shift",
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// The shape of a trace.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shape {
    pub kind: Kind,
    /// Distinct keys of the Zipf part.
    pub keys: u64,
    /// Zipf requests (the counted ones).
    pub requests: u64,
    /// Zipf exponent.
    pub exponent: f64,
    /// Keys of each scan (`Kind::Scan`).
    pub scan_len: u64,
    /// Times the hot set moves (`Kind::Shift`).
    pub shifts: u64,
    pub seed: u64,
}

/// One request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Request {
    /// A key of the workload: its hit counts.
    Hot(u64),
    /// A scan key, read once.
    Scan(u64),
}

impl Request {
    /// The key's name on the wire.
    pub fn key(self) -> String {
        match self {
            Request::Hot(i) => format!("k:{i}"),
            Request::Scan(i) => format!("scan:{i}"),
        }
    }

    pub fn counted(self) -> bool {
        matches!(self, Request::Hot(_))
    }
}

/// The requests of `shape`, in order.
///
/// # Errors
/// When the Zipf parameters are invalid (no keys, a negative exponent).
pub fn generate(shape: Shape) -> Result<impl Iterator<Item = Request>, String> {
    if shape.keys == 0 || shape.requests == 0 {
        return Err("a trace needs keys and requests".into());
    }
    let zipf = Zipf::new(shape.keys as f64, shape.exponent).map_err(|e| format!("zipf: {e}"))?;
    let mut rng = StdRng::seed_from_u64(shape.seed);
    let tenth = (shape.requests / 10).max(1);
    let phase_len = shape.requests.div_ceil(shape.shifts + 1).max(1);
    let mut scanned = 0u64;
    Ok((0..shape.requests).flat_map(move |i| {
        // Zipf ranks are 1..=keys, the hottest 1.
        let rank = (zipf.sample(&mut rng) as u64).clamp(1, shape.keys) - 1;
        let hot = match shape.kind {
            Kind::Shift => {
                let phase = i / phase_len;
                // Each phase moves the ranks by a large odd stride, so the
                // new hot set is keys the previous phases kept cold.
                (rank + phase * ((shape.keys / (shape.shifts + 1)) | 1)) % shape.keys
            }
            Kind::Zipf | Kind::Scan => rank,
        };
        let scan = if shape.kind == Kind::Scan && i % tenth == tenth / 2 {
            let start = scanned;
            scanned += shape.scan_len;
            start..scanned
        } else {
            0..0
        };
        scan.map(Request::Scan)
            .chain(std::iter::once(Request::Hot(hot)))
    }))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn shape(kind: Kind) -> Shape {
        Shape {
            kind,
            keys: 10_000,
            requests: 100_000,
            exponent: 0.99,
            scan_len: 500,
            shifts: 4,
            seed: 7,
        }
    }

    #[test]
    fn the_same_shape_gives_the_same_trace() {
        let a: Vec<_> = generate(shape(Kind::Scan)).unwrap().collect();
        let b: Vec<_> = generate(shape(Kind::Scan)).unwrap().collect();
        assert_eq!(a, b);
    }

    #[test]
    fn a_scan_trace_is_the_zipf_trace_with_ten_scans_of_fresh_keys() {
        let zipf: Vec<_> = generate(shape(Kind::Zipf)).unwrap().collect();
        let scan: Vec<_> = generate(shape(Kind::Scan)).unwrap().collect();
        let hot: Vec<_> = scan.iter().copied().filter(|r| r.counted()).collect();
        assert_eq!(hot, zipf, "the counted requests are the plain trace");
        let scans: Vec<_> = scan.iter().filter(|r| !r.counted()).collect();
        assert_eq!(scans.len(), 10 * 500);
        let distinct: HashSet<_> = scans.iter().collect();
        assert_eq!(distinct.len(), scans.len(), "each scan key is read once");
    }

    #[test]
    fn zipf_requests_concentrate_on_the_low_ranks() {
        let trace: Vec<_> = generate(shape(Kind::Zipf)).unwrap().collect();
        let top = trace
            .iter()
            .filter(|r| matches!(r, Request::Hot(i) if *i < 100))
            .count();
        // Zipf 0.99 over 10,000 keys: the top 1% take about half the
        // requests.
        assert!(top > trace.len() * 2 / 5, "top 100 keys: {top} requests");
        assert!(
            trace
                .iter()
                .all(|r| matches!(r, Request::Hot(i) if *i < 10_000))
        );
    }

    #[test]
    fn a_shifting_trace_moves_its_hottest_key_every_phase() {
        let trace: Vec<_> = generate(shape(Kind::Shift)).unwrap().collect();
        let hottest = |phase: usize| {
            let mut counts = std::collections::HashMap::new();
            for r in &trace[phase * 20_000..(phase + 1) * 20_000] {
                *counts.entry(*r).or_insert(0) += 1;
            }
            counts.into_iter().max_by_key(|(_, n)| *n).unwrap().0
        };
        let hot: HashSet<_> = (0..5).map(hottest).collect();
        assert_eq!(hot.len(), 5, "five phases, five hottest keys: {hot:?}");
    }
}

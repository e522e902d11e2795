//! Which key an operation touches.

use anyhow::{Result, bail};
use rand::Rng;
use rand_distr::{Distribution, Zipf};

/// How keys are drawn from the key space.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KeyDistribution {
    /// Every key equally likely.
    Uniform,
    /// Key of rank `k` (1-based) drawn with probability ∝ `1 / k^exponent`:
    /// a few hot keys, a long tail.
    Zipf {
        /// The skew; YCSB's default is 0.99.
        exponent: f64,
    },
}

/// Draws key indices in `0..keys`; index 0 is the hottest under Zipf.
#[derive(Clone, Debug)]
pub struct KeyChooser {
    keys: u64,
    zipf: Option<Zipf<f64>>,
}

impl KeyChooser {
    /// A chooser over `keys` keys.
    ///
    /// # Errors
    ///
    /// Fails when `keys` is 0 or the Zipf exponent is negative or not finite.
    pub fn new(keys: u64, distribution: KeyDistribution) -> Result<Self> {
        if keys == 0 {
            bail!("the key space must hold at least one key");
        }
        let zipf = match distribution {
            KeyDistribution::Uniform => None,
            KeyDistribution::Zipf { exponent } => {
                if !exponent.is_finite() || exponent < 0.0 {
                    bail!("zipf exponent {exponent} must be finite and not negative");
                }
                // `keys` as f64 is exact up to 2^53 keys, far beyond a benchmark.
                #[allow(clippy::cast_precision_loss)]
                let n = keys as f64;
                Some(Zipf::new(n, exponent).map_err(|e| anyhow::anyhow!("zipf: {e}"))?)
            }
        };
        Ok(Self { keys, zipf })
    }

    /// The number of keys.
    pub fn keys(&self) -> u64 {
        self.keys
    }

    /// The next key index.
    pub fn next_index(&self, rng: &mut impl Rng) -> u64 {
        match &self.zipf {
            None => rng.random_range(0..self.keys),
            // Zipf samples an integral rank in [1, n] as a float.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Some(zipf) => (zipf.sample(rng) as u64).clamp(1, self.keys) - 1,
        }
    }

    /// `n` distinct keys drawn one after the other (a draw that repeats an
    /// earlier one is drawn again), for a batched read: a batch never names
    /// a key twice. After `64 * n` draws (a key space too skewed to give
    /// `n` distinct keys soon) the rest are the lowest indices not drawn.
    ///
    /// # Panics
    ///
    /// If `n` exceeds the number of keys (the options are validated first).
    pub fn distinct_keys(&self, rng: &mut impl Rng, n: usize) -> Vec<String> {
        assert!(
            n as u64 <= self.keys,
            "batch {n} exceeds {} keys",
            self.keys
        );
        let mut indices: Vec<u64> = Vec::with_capacity(n);
        let mut draws = 0;
        while indices.len() < n && draws < 64 * n {
            let index = self.next_index(rng);
            if !indices.contains(&index) {
                indices.push(index);
            }
            draws += 1;
        }
        let mut next = 0;
        while indices.len() < n {
            if !indices.contains(&next) {
                indices.push(next);
            }
            next += 1;
        }
        indices.into_iter().map(Self::key).collect()
    }

    /// The key (bytes on the wire) of index `index`.
    pub fn key(index: u64) -> String {
        format!("bench-{index:010}")
    }
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng};

    use super::*;

    #[test]
    fn distinct_keys_never_repeat_a_key() {
        let mut rng = StdRng::seed_from_u64(3);
        for distribution in [
            KeyDistribution::Uniform,
            KeyDistribution::Zipf { exponent: 3.0 },
        ] {
            let chooser = KeyChooser::new(20, distribution).unwrap();
            for n in [1, 16, 20] {
                let mut keys = chooser.distinct_keys(&mut rng, n);
                assert_eq!(keys.len(), n);
                keys.sort();
                keys.dedup();
                assert_eq!(keys.len(), n, "{distribution:?}");
            }
        }
    }

    fn counts(chooser: &KeyChooser, draws: usize) -> Vec<u64> {
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = vec![0u64; usize::try_from(chooser.keys()).unwrap()];
        for _ in 0..draws {
            let i = chooser.next_index(&mut rng);
            counts[usize::try_from(i).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn zipf_skews_to_low_ranks() {
        let chooser = KeyChooser::new(1000, KeyDistribution::Zipf { exponent: 0.99 }).unwrap();
        let counts = counts(&chooser, 100_000);
        let first_ten: u64 = counts[..10].iter().sum();
        let last_hundred: u64 = counts[900..].iter().sum();
        // With s = 0.99 over 1000 keys the first 10 ranks carry about 39% of
        // the draws and the last 100 about 1.4%; the bounds leave room.
        assert!(first_ten > 30_000, "first ten ranks drew {first_ten}");
        assert!(
            last_hundred < 3_000,
            "last hundred ranks drew {last_hundred}"
        );
        assert!(counts[0] > counts[1] && counts[1] > counts[9]);
    }

    #[test]
    fn uniform_covers_every_key_evenly() {
        let chooser = KeyChooser::new(100, KeyDistribution::Uniform).unwrap();
        let counts = counts(&chooser, 100_000);
        assert!(
            counts.iter().all(|&c| (700..1300).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn indices_stay_in_range() {
        for distribution in [
            KeyDistribution::Uniform,
            KeyDistribution::Zipf { exponent: 2.0 },
        ] {
            let chooser = KeyChooser::new(3, distribution).unwrap();
            let counts = counts(&chooser, 10_000);
            assert_eq!(counts.iter().sum::<u64>(), 10_000);
        }
    }

    #[test]
    fn refuses_an_empty_key_space_and_bad_exponents() {
        assert!(KeyChooser::new(0, KeyDistribution::Uniform).is_err());
        assert!(KeyChooser::new(10, KeyDistribution::Zipf { exponent: -1.0 }).is_err());
        assert!(KeyChooser::new(10, KeyDistribution::Zipf { exponent: f64::NAN }).is_err());
    }
}

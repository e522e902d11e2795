//! The open-loop schedule: requests are due at fixed intervals whatever the
//! server does, and latency is measured from when a request was due, not
//! from when a worker got round to sending it. A stalled server thus shows
//! as the latency every request due during the stall saw (no coordinated
//! omission).

use std::time::Duration;

use anyhow::{Result, bail};

/// Slot `n` is due `n / rate` seconds after the start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    rate: f64,
}

impl Schedule {
    /// A schedule of `rate` requests per second.
    ///
    /// # Errors
    ///
    /// Fails when the rate is not a positive finite number.
    pub fn new(rate: f64) -> Result<Self> {
        if !rate.is_finite() || rate <= 0.0 {
            bail!("rate {rate} must be a positive number of operations per second");
        }
        Ok(Self { rate })
    }

    /// The offered rate, per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// When slot `n` is due, from the start. Computed from `n`, not by
    /// adding intervals, so that rounding does not drift.
    pub fn due(&self, n: u64) -> Duration {
        // Slot numbers stay far below 2^53.
        #[allow(clippy::cast_precision_loss)]
        Duration::from_secs_f64(n as f64 / self.rate)
    }

    /// The number of slots due before `elapsed`: the first `n` with
    /// `due(n) >= elapsed`. Found from [`Schedule::due`] itself, so that
    /// floating-point rounding cannot make the two disagree.
    pub fn slots_before(&self, elapsed: Duration) -> u64 {
        // An estimate within a slot or two: non-negative and far below 2^64
        // for any benchmark length.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let mut n = (elapsed.as_secs_f64() * self.rate) as u64;
        while n > 0 && self.due(n - 1) >= elapsed {
            n -= 1;
        }
        while self.due(n) < elapsed {
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_evenly_spaced_from_the_start() {
        let schedule = Schedule::new(1000.0).unwrap();
        assert_eq!(schedule.due(0), Duration::ZERO);
        assert_eq!(schedule.due(1), Duration::from_millis(1));
        assert_eq!(schedule.due(1000), Duration::from_secs(1));
        assert_eq!(schedule.due(2500), Duration::from_millis(2500));
    }

    #[test]
    fn no_drift_over_many_slots() {
        let schedule = Schedule::new(3.0).unwrap();
        let due = schedule.due(3_000_000);
        assert!(due.abs_diff(Duration::from_secs(1_000_000)) < Duration::from_micros(1));
    }

    #[test]
    fn slots_before_counts_due_slots() {
        let schedule = Schedule::new(100.0).unwrap();
        assert_eq!(schedule.slots_before(Duration::ZERO), 0);
        // Slot 0 is due at 0, slot 1 at 10 ms.
        assert_eq!(schedule.slots_before(Duration::from_millis(5)), 1);
        assert_eq!(schedule.slots_before(Duration::from_millis(10)), 1);
        assert_eq!(schedule.slots_before(Duration::from_secs(2)), 200);
        for n in 0..500 {
            let before = schedule.slots_before(schedule.due(n));
            assert_eq!(before, n, "slot {n}");
            let just_after = schedule.slots_before(schedule.due(n) + Duration::from_nanos(1));
            assert_eq!(just_after, n + 1, "slot {n}");
        }
    }

    #[test]
    fn refuses_rates_that_are_not_positive() {
        for rate in [0.0, -5.0, f64::NAN, f64::INFINITY] {
            assert!(Schedule::new(rate).is_err(), "{rate}");
        }
    }
}

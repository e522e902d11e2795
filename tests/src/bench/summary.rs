//! What a run measured: per-worker [`Recorder`]s merged into a [`Summary`].

use std::{fmt, time::Duration};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency a histogram holds, in microseconds (one minute); longer
/// ones are recorded as this.
const MAX_LATENCY_US: u64 = 60_000_000;
/// Significant digits the histograms keep.
const SIGFIG: u8 = 3;
/// How many error messages a summary keeps.
pub const ERROR_SAMPLES: usize = 5;

/// One worker's measurements.
#[derive(Clone, Debug)]
pub struct Recorder {
    latency_us: Histogram<u64>,
    /// Reads done (hits and misses).
    pub reads: u64,
    /// Keys read (a batched read reads several).
    pub keys_read: u64,
    /// Keys read that were found.
    pub hits: u64,
    /// Writes done.
    pub writes: u64,
    /// Operations that failed.
    pub errors: u64,
    /// The first [`ERROR_SAMPLES`] error messages.
    pub error_samples: Vec<String>,
    /// Operations done in the warm-up (counted only: they are not
    /// measured).
    pub warmup_ops: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self {
            latency_us: Histogram::new_with_bounds(1, MAX_LATENCY_US, SIGFIG)
                .expect("constant bounds are valid: 1 <= low, high >= 2 * low, sigfig <= 5"),
            reads: 0,
            keys_read: 0,
            hits: 0,
            writes: 0,
            errors: 0,
            error_samples: Vec::new(),
            warmup_ops: 0,
        }
    }

    /// Records a successful operation's latency.
    fn latency(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(MAX_LATENCY_US)
            .clamp(1, MAX_LATENCY_US);
        self.latency_us
            .record(us)
            .expect("the value was clamped into the histogram's bounds");
    }

    /// Records a read of one key.
    pub fn read(&mut self, latency: Duration, hit: bool) {
        self.read_batch(latency, 1, u64::from(hit));
    }

    /// Records a read of `keys` keys of which `hits` were found.
    pub fn read_batch(&mut self, latency: Duration, keys: u64, hits: u64) {
        self.reads += 1;
        self.keys_read += keys;
        self.hits += hits;
        self.latency(latency);
    }

    /// Records a write.
    pub fn write(&mut self, latency: Duration) {
        self.writes += 1;
        self.latency(latency);
    }

    /// Records a failed operation (its latency is not recorded).
    pub fn error(&mut self, message: impl fmt::Display) {
        self.errors += 1;
        if self.error_samples.len() < ERROR_SAMPLES {
            self.error_samples.push(message.to_string());
        }
    }

    /// Adds `other`'s measurements to these.
    pub fn merge(&mut self, other: &Recorder) {
        self.latency_us
            .add(&other.latency_us)
            .expect("histograms of the same bounds always add");
        self.reads += other.reads;
        self.keys_read += other.keys_read;
        self.hits += other.hits;
        self.writes += other.writes;
        self.errors += other.errors;
        self.warmup_ops += other.warmup_ops;
        let room = ERROR_SAMPLES.saturating_sub(self.error_samples.len());
        self.error_samples
            .extend(other.error_samples.iter().take(room).cloned());
    }

    /// The summary of these measurements over `elapsed` of measured time.
    pub fn summary(&self, elapsed: Duration, unsent: u64) -> Summary {
        let ops = self.reads + self.writes;
        let secs = elapsed.as_secs_f64();
        // Counts stay far below 2^53.
        #[allow(clippy::cast_precision_loss)]
        let ops_per_sec = if secs > 0.0 { ops as f64 / secs } else { 0.0 };
        // Every write writes one key.
        let keys = self.keys_read + self.writes;
        #[allow(clippy::cast_precision_loss)]
        let keys_per_sec = if secs > 0.0 { keys as f64 / secs } else { 0.0 };
        let h = &self.latency_us;
        let q = |quantile| {
            if h.is_empty() {
                0
            } else {
                h.value_at_quantile(quantile)
            }
        };
        Summary {
            elapsed_secs: secs,
            ops,
            ops_per_sec,
            keys,
            keys_per_sec,
            reads: self.reads,
            keys_read: self.keys_read,
            hits: self.hits,
            writes: self.writes,
            errors: self.errors,
            error_samples: self.error_samples.clone(),
            warmup_ops: self.warmup_ops,
            unsent,
            latency_us: Latencies {
                p50: q(0.5),
                p90: q(0.9),
                p99: q(0.99),
                p999: q(0.999),
                max: if h.is_empty() { 0 } else { h.max() },
                mean: if h.is_empty() { 0.0 } else { h.mean() },
            },
        }
    }
}

/// Latency percentiles of successful operations, in microseconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Latencies {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Highest.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

/// A run's results (the measured phase only: warm-up is discarded).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// Length of the measured phase.
    pub elapsed_secs: f64,
    /// Successful operations.
    pub ops: u64,
    /// Successful operations per second.
    pub ops_per_sec: f64,
    /// Keys the successful operations read or wrote (a batched read counts
    /// each of its keys).
    pub keys: u64,
    /// Keys read or written per second.
    pub keys_per_sec: f64,
    /// Successful reads.
    pub reads: u64,
    /// Keys the successful reads asked for.
    pub keys_read: u64,
    /// Keys read that were found.
    pub hits: u64,
    /// Successful writes.
    pub writes: u64,
    /// Failed operations.
    pub errors: u64,
    /// The first error messages.
    pub error_samples: Vec<String>,
    /// Operations done in the warm-up, not measured (with the preload's
    /// writes, what else the server answered during the run).
    pub warmup_ops: u64,
    /// Open loop: slots due in the run that no worker started
    /// before the run gave up on them (the workers could not keep up).
    pub unsent: u64,
    /// Latencies of successful operations.
    pub latency_us: Latencies,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = |us: u64| Duration::from_micros(us).as_secs_f64() * 1000.0;
        let l = &self.latency_us;
        writeln!(
            f,
            "ops        {} in {:.2} s: {:.0} ops/s ({} reads, {} hits, {} writes)",
            self.ops, self.elapsed_secs, self.ops_per_sec, self.reads, self.hits, self.writes
        )?;
        if self.keys_read != self.reads {
            writeln!(
                f,
                "keys       {} in {:.2} s: {:.0} keys/s ({} read in batches, {} hits)",
                self.keys, self.elapsed_secs, self.keys_per_sec, self.keys_read, self.hits
            )?;
        }
        writeln!(
            f,
            "latency ms p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  mean {:.3}",
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p999),
            ms(l.max),
            l.mean / 1000.0
        )?;
        write!(f, "errors     {}", self.errors)?;
        if self.unsent > 0 {
            write!(
                f,
                "\nunsent     {} (the workers fell behind the rate)",
                self.unsent
            )?;
        }
        for message in &self.error_samples {
            write!(f, "\n  {message}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_latencies() {
        let mut recorder = Recorder::new();
        for ms in 1..=1000 {
            recorder.read(Duration::from_micros(ms * 10), ms % 2 == 0);
        }
        let summary = recorder.summary(Duration::from_secs(2), 0);
        assert_eq!(summary.ops, 1000);
        assert_eq!(summary.hits, 500);
        assert!((summary.ops_per_sec - 500.0).abs() < 1e-9);
        let l = &summary.latency_us;
        // Three significant digits: within 0.1%.
        assert!(l.p50.abs_diff(5000) <= 5, "{l:?}");
        assert!(l.p90.abs_diff(9000) <= 9, "{l:?}");
        assert!(l.p99.abs_diff(9900) <= 10, "{l:?}");
        assert!(l.p999.abs_diff(9990) <= 10, "{l:?}");
        assert!(l.max.abs_diff(10_000) <= 10, "{l:?}");
    }

    #[test]
    fn merge_adds_counts_and_keeps_the_first_errors() {
        let mut a = Recorder::new();
        a.write(Duration::from_micros(100));
        for i in 0..3 {
            a.error(format!("a{i}"));
        }
        let mut b = Recorder::new();
        b.read(Duration::from_micros(300), true);
        for i in 0..4 {
            b.error(format!("b{i}"));
        }
        a.merge(&b);
        let summary = a.summary(Duration::from_secs(1), 7);
        assert_eq!((summary.reads, summary.writes, summary.errors), (1, 1, 7));
        assert_eq!(summary.error_samples, ["a0", "a1", "a2", "b0", "b1"]);
        assert_eq!(summary.unsent, 7);
        assert!(summary.latency_us.max.abs_diff(300) <= 1);
    }

    #[test]
    fn an_empty_run_summarises_to_zeros() {
        let summary = Recorder::new().summary(Duration::ZERO, 0);
        assert_eq!(summary.ops, 0);
        assert_eq!(summary.ops_per_sec, 0.0);
        assert_eq!(summary.latency_us.max, 0);
        assert!(summary.to_string().contains("errors     0"));
    }

    #[test]
    fn json_has_the_printed_figures() {
        let mut recorder = Recorder::new();
        recorder.write(Duration::from_millis(2));
        recorder.error("boom");
        let json = serde_json::to_value(recorder.summary(Duration::from_secs(1), 0)).unwrap();
        assert_eq!(json["ops"], 1);
        assert_eq!(json["errors"], 1);
        assert_eq!(json["error_samples"][0], "boom");
        assert!(json["latency_us"]["p99"].as_u64().unwrap().abs_diff(2000) <= 2);
    }
}

//! The end-of-run report: one row per strategy and fault (operations,
//! errors, availability, violations, worst staleness), as a plain-text
//! table ([`Report::table`], also its `Display`) and as JSON
//! ([`Report::to_json`]), with every violation beside it.

use std::fmt;
use std::time::Duration;

use anyhow::{Context, Result};
use cache_client::strategy::Strategy;
use serde::Serialize;

use super::checker::{CheckResult, STRATEGIES, Violation};
use super::history::{nanos, strategy_name};

/// One strategy under one fault.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReportRow {
    /// The strategy.
    #[serde(with = "strategy_name")]
    pub strategy: Strategy,
    /// The fault injected (`none`, `sigkill-node`, `partition`, ...).
    pub fault: String,
    /// Operations started.
    pub operations: usize,
    /// Operations that returned success.
    pub ok: usize,
    /// Operations that returned an error.
    pub errors: usize,
    /// Poison writes refused by the store, by design; not counted in
    /// `availability`.
    pub refused: usize,
    /// Operations whose answer was never seen.
    pub unknown: usize,
    /// `ok / (operations - refused)`; `None` without such operations.
    pub availability: Option<f64>,
    /// Violations found.
    pub violations: usize,
    /// The stalest successful read.
    #[serde(with = "nanos", rename = "worst_staleness_ns")]
    pub worst_staleness: Duration,
}

/// A violation and the fault of the run that found it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultViolation {
    /// The fault.
    pub fault: String,
    /// The violation.
    #[serde(flatten)]
    pub violation: Violation,
}

/// Rows per strategy and fault, and the violations behind them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Report {
    /// By strategy (in [`STRATEGIES`] order), then faults in the order they
    /// were added.
    pub rows: Vec<ReportRow>,
    /// Every violation, in the order found.
    pub violations: Vec<FaultViolation>,
}

fn rank(strategy: Strategy) -> usize {
    STRATEGIES
        .iter()
        .position(|s| *s == strategy)
        .unwrap_or(STRATEGIES.len())
}

impl Report {
    /// An empty report.
    pub fn new() -> Report {
        Report::default()
    }

    /// Adds the rows of a run under `fault`.
    pub fn add(&mut self, fault: &str, result: &CheckResult) {
        for summary in &result.summaries {
            self.rows.push(ReportRow {
                strategy: summary.strategy,
                fault: fault.to_owned(),
                operations: summary.operations,
                ok: summary.ok,
                errors: summary.errors,
                refused: summary.refused,
                unknown: summary.unknown,
                availability: summary.availability(),
                violations: summary.violations,
                worst_staleness: summary.worst_staleness,
            });
        }
        // Stable: faults keep the order they were added in.
        self.rows.sort_by_key(|row| rank(row.strategy));
        self.violations
            .extend(result.violations.iter().map(|violation| FaultViolation {
                fault: fault.to_owned(),
                violation: violation.clone(),
            }));
    }

    /// Violations found in all runs.
    pub fn violations_found(&self) -> usize {
        self.rows.iter().map(|row| row.violations).sum()
    }

    /// The rows as an aligned plain-text table.
    pub fn table(&self) -> String {
        const HEADER: [&str; 10] = [
            "strategy",
            "fault",
            "ops",
            "ok",
            "errors",
            "refused",
            "unknown",
            "availability",
            "violations",
            "worst staleness",
        ];
        let cells: Vec<[String; 10]> = self
            .rows
            .iter()
            .map(|row| {
                [
                    row.strategy.to_string(),
                    row.fault.clone(),
                    row.operations.to_string(),
                    row.ok.to_string(),
                    row.errors.to_string(),
                    row.refused.to_string(),
                    row.unknown.to_string(),
                    row.availability
                        .map_or_else(|| "-".to_owned(), |a| format!("{:.2}%", a * 100.0)),
                    row.violations.to_string(),
                    format!("{:.3}ms", row.worst_staleness.as_secs_f64() * 1000.0),
                ]
            })
            .collect();
        let mut widths = HEADER.map(str::len);
        for row in &cells {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.len());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &[&str]| {
            let mut text = String::new();
            for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
                if i > 0 {
                    text.push_str("  ");
                }
                // Names left-aligned, figures right-aligned.
                if i < 2 {
                    text.push_str(&format!("{cell:<width$}"));
                } else {
                    text.push_str(&format!("{cell:>width$}"));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&HEADER);
        for row in &cells {
            line(&row.each_ref().map(String::as_str));
        }
        out
    }

    /// The report (rows and violations) as pretty-printed JSON.
    ///
    /// # Errors
    /// Serialisation failed (it does not for these types; the error is
    /// passed on rather than assumed away).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).context("failed to serialise the chaos report")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.table())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::chaos::{CheckConfig, Digest, FinalState, History, Op, OpKind, Outcome, check};

    fn op(id: u64, strategy: Strategy, kind: OpKind, value: &str, at: (u64, u64)) -> Op {
        Op {
            id,
            client: 0,
            task: 0,
            keyspace: "ks".into(),
            strategy,
            ack: None,
            key: "k".into(),
            kind,
            value: Some(Digest::of(value.as_bytes())),
            version: (kind == OpKind::Write).then_some(id),
            superseded_by: None,
            poison: false,
            start: Duration::from_millis(at.0),
            end: Duration::from_millis(at.1),
            outcome: Outcome::Ok,
        }
    }

    /// A run on `strategy`: two writes, a read 10 ms stale, a failed read.
    fn run(strategy: Strategy) -> CheckResult {
        let mut failed = op(4, strategy, OpKind::Read, "a", (40, 50));
        failed.outcome = Outcome::Err("no node available".into());
        let history = History::from_ops(vec![
            op(1, strategy, OpKind::Write, "a", (0, 10)),
            op(2, strategy, OpKind::Write, "b", (20, 30)),
            op(3, strategy, OpKind::Read, "a", (40, 50)),
            failed,
        ]);
        // The read is stale, not a read-your-writes violation (one client).
        let config = CheckConfig::new().with_read_your_writes_bound(Duration::from_secs(1));
        check(&history, &FinalState::default(), &config)
    }

    #[test]
    fn rows_per_strategy_and_fault_render_as_a_table_and_json() {
        let mut report = Report::new();
        report.add("none", &run(Strategy::WriteBack));
        report.add("partition", &run(Strategy::CacheAside));
        report.add("sigkill-node", &run(Strategy::WriteBack));

        let faults: Vec<(Strategy, &str)> = report
            .rows
            .iter()
            .map(|row| (row.strategy, row.fault.as_str()))
            .collect();
        assert_eq!(
            faults,
            [
                (Strategy::CacheAside, "partition"),
                (Strategy::WriteBack, "none"),
                (Strategy::WriteBack, "sigkill-node"),
            ]
        );
        let row = &report.rows[0];
        assert_eq!(
            (row.operations, row.ok, row.errors, row.unknown),
            (4, 3, 1, 0)
        );
        assert_eq!(row.availability, Some(0.75));
        assert_eq!(row.violations, 1);
        assert_eq!(row.worst_staleness, Duration::from_millis(10));
        assert_eq!(report.violations_found(), 3);
        assert_eq!(report.violations.len(), 3);

        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].starts_with("strategy     fault"), "{table}");
        assert!(lines[0].ends_with("worst staleness"), "{table}");
        assert!(lines[1].starts_with("cache-aside  partition"), "{table}");
        assert!(lines[1].contains("75.00%"), "{table}");
        assert!(lines[1].ends_with("10.000ms"), "{table}");
        assert_eq!(report.to_string(), table);

        let json: serde_json::Value =
            serde_json::from_str(&report.to_json().expect("the report serialises"))
                .expect("the report is JSON");
        assert_eq!(json["rows"][0]["strategy"], "cache-aside");
        assert_eq!(json["rows"][0]["fault"], "partition");
        assert_eq!(json["rows"][0]["operations"], 4);
        assert_eq!(json["rows"][0]["availability"], 0.75);
        assert_eq!(json["rows"][0]["worst_staleness_ns"], 10_000_000);
        assert_eq!(json["violations"][0]["fault"], "none");
        assert_eq!(json["violations"][1]["fault"], "partition");
        assert_eq!(json["violations"][0]["kind"], "stale-read");
        assert_eq!(json["violations"][0]["ops"][0]["kind"], "write");
    }

    #[test]
    fn a_refused_poison_write_is_not_counted_against_availability() {
        let strategy = Strategy::WriteThrough;
        let mut poison = op(2, strategy, OpKind::Write, "poison-1", (20, 30));
        poison.poison = true;
        poison.outcome = Outcome::Err("violates check constraint".into());
        let mut failed = op(3, strategy, OpKind::Write, "c", (40, 50));
        failed.outcome = Outcome::Err("no node available".into());
        let history = History::from_ops(vec![
            op(1, strategy, OpKind::Write, "a", (0, 10)),
            poison,
            failed,
        ]);
        let mut report = Report::new();
        report.add(
            "poison",
            &check(&history, &FinalState::default(), &CheckConfig::new()),
        );
        let row = &report.rows[0];
        assert_eq!(
            (row.operations, row.ok, row.errors, row.refused),
            (3, 1, 1, 1)
        );
        assert_eq!(row.availability, Some(0.5));
        assert!(report.table().lines().next().unwrap().contains("refused"));
    }

    #[test]
    fn a_strategy_without_operations_has_no_availability() {
        let mut report = Report::new();
        report.add("none", &CheckResult::default());
        assert!(report.rows.is_empty());
        let table = report.table();
        assert_eq!(table.lines().count(), 1, "only the header: {table}");
        let summary = crate::chaos::StrategySummary {
            strategy: Strategy::ReadThrough,
            operations: 0,
            ok: 0,
            errors: 0,
            refused: 0,
            unknown: 0,
            violations: 0,
            worst_staleness: Duration::ZERO,
            worst_staleness_read: None,
        };
        assert_eq!(summary.availability(), None);
    }
}

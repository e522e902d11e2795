//! The `write-through` suite: write-through writes with 1, 8 and 64
//! writers on one key, beside the same numbers of writers each on a key of
//! its own.
//!
//! PostgreSQL and the broker are started once for the suite; each
//! measurement is one `wt-bench` process (a binary of the tests crate),
//! which starts its own three nodes and database and prints JSON. The
//! configurations alternate within each round; the table shows medians.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde_json::Value;

use super::{Ctx, json_bench, median};
use crate::services::Services;

/// Writers per measurement.
const WRITERS: [usize; 3] = [1, 8, 64];

/// One configuration: how many writers, on which keys.
#[derive(Clone, Copy)]
struct Config {
    writers: usize,
    same_key: bool,
}

impl Config {
    fn all() -> Vec<Config> {
        [true, false]
            .into_iter()
            .flat_map(|same_key| WRITERS.map(|writers| Config { writers, same_key }))
            .collect()
    }

    fn name(self) -> String {
        let keys = if self.same_key { "same" } else { "distinct" };
        format!("{}-{keys}", self.writers)
    }
}

pub async fn run(ctx: &Ctx) -> Result<String> {
    let logs = ctx.logs.join("write-through");
    std::fs::create_dir_all(&logs)
        .with_context(|| format!("failed to create {}", logs.display()))?;
    let duration = if ctx.quick { "2s" } else { "10s" };
    let services = Services::start(&logs, &ctx.cancel).await?;
    let outcome = measure(ctx, &services, duration).await;
    if outcome.is_err() && !ctx.cancel.is_cancelled() {
        services.print_log_tails(20);
    }
    Ok(render(&outcome?, ctx.runs(), duration))
}

async fn measure(
    ctx: &Ctx,
    services: &Services,
    duration: &str,
) -> Result<Vec<(Config, Vec<Value>)>> {
    let mut results: Vec<(Config, Vec<Value>)> =
        Config::all().into_iter().map(|c| (c, Vec::new())).collect();
    for round in 0..ctx.runs() {
        for (config, runs) in &mut results {
            let writers = config.writers.to_string();
            let keys = if config.same_key { "same" } else { "distinct" };
            let name = format!("{}-{round}", config.name());
            let value = json_bench(
                ctx,
                &services.env(),
                "wt-bench",
                &name,
                &[
                    "--writers",
                    &writers,
                    "--keys",
                    keys,
                    "--duration",
                    duration,
                ],
            )
            .await?;
            eprintln!(
                "xtask: write-through {name}: {:.0} writes/s, {:.2}% failed",
                num(&value, "writes_per_s"),
                100.0 * num(&value, "error_ratio")
            );
            runs.push(value);
        }
    }
    Ok(results)
}

/// The number at `path` (`a.b`) of a result.
fn num(value: &Value, path: &str) -> f64 {
    path.split('.')
        .fold(value, |v, part| &v[part])
        .as_f64()
        .unwrap_or(f64::NAN)
}

fn render(results: &[(Config, Vec<Value>)], rounds: usize, duration: &str) -> String {
    let med =
        |runs: &[Value], path: &str| median(&runs.iter().map(|r| num(r, path)).collect::<Vec<_>>());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Three nodes, one write-through keyspace (one replica), 100-byte values; each \
         writer writes in closed loop for {duration}. {rounds} alternating round(s), medians."
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| writers | keys | writes/s | p50 ms | p99 ms | failed | failures by kind | cache ≠ row after |"
    );
    let _ = writeln!(out, "|---:|---|---:|---:|---:|---:|---|---:|");
    for (config, runs) in results {
        let mut kinds = std::collections::BTreeMap::<String, f64>::new();
        for run in runs {
            if let Some(errors) = run["errors"].as_object() {
                for (kind, n) in errors {
                    *kinds.entry(kind.clone()).or_default() += n.as_f64().unwrap_or(0.0);
                }
            }
        }
        let kinds = if kinds.is_empty() {
            "none".to_owned()
        } else {
            kinds
                .iter()
                .map(|(kind, n)| format!("{kind} {n:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let inconsistent: f64 = runs.iter().map(|r| num(r, "inconsistent_keys")).sum();
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.1} | {:.1} | {:.2}% | {kinds} (all rounds) | {inconsistent:.0} |",
            config.writers,
            if config.same_key {
                "one key"
            } else {
                "one each"
            },
            med(runs, "writes_per_s"),
            med(runs, "latency.p50"),
            med(runs, "latency.p99"),
            100.0 * med(runs, "error_ratio"),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_writer_count_is_measured_on_one_key_and_on_keys_of_their_own() {
        let names: Vec<String> = Config::all().into_iter().map(Config::name).collect();
        assert_eq!(
            names,
            [
                "1-same",
                "8-same",
                "64-same",
                "1-distinct",
                "8-distinct",
                "64-distinct"
            ]
        );
    }

    #[test]
    fn the_table_shows_medians_and_every_failure_kind() {
        let run = |wps: f64, conflicts: u64| {
            serde_json::json!({
                "writes_per_s": wps,
                "latency": { "p50": 1.0, "p99": 4.0 },
                "error_ratio": 0.5,
                "errors": if conflicts > 0 { serde_json::json!({ "conflict": conflicts }) } else { serde_json::json!({}) },
                "inconsistent_keys": 0,
            })
        };
        let results = vec![(
            Config {
                writers: 8,
                same_key: true,
            },
            vec![run(100.0, 3), run(300.0, 0), run(200.0, 1)],
        )];
        let table = render(&results, 3, "10s");
        assert!(
            table.contains(
                "| 8 | one key | 200 | 1.0 | 4.0 | 50.00% | conflict 4 (all rounds) | 0 |"
            ),
            "{table}"
        );
    }
}

//! The `ring` suite: the consistent-hash ring's balance, key movement and
//! lookup cost, from the `ring-report` binary (the measures of
//! `cache-client`'s ring property tests, for 3, 10 and 100 nodes).

use std::{fmt::Write as _, process::Command};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{Ctx, require};
use crate::process::ChildGuard;

pub(super) async fn run(ctx: &Ctx) -> Result<String> {
    let keys: u64 = if ctx.quick { 100_000 } else { 1_000_000 };
    let out = ctx.logs.join("ring-report.json");
    let log = ctx.logs.join("ring-report.log");
    let mut command = Command::new(require(&ctx.bin("ring-report"))?);
    command
        .args(["--nodes", "3,10,100", "--keys", &keys.to_string()])
        .stdout(std::fs::File::create(&out).context("failed to create the ring report")?)
        .stderr(std::fs::File::create(&log).context("failed to create the ring log")?);
    let mut child = ChildGuard::spawn("ring-report", &mut command, None)?;
    let status = tokio::select! {
        status = child.wait() => status?,
        _ = ctx.cancel.cancelled() => bail!("interrupted during ring-report"),
    };
    if !status.success() {
        bail!(
            "ring-report failed ({status}):\n{}",
            crate::paths::tail(&log, 20)
        );
    }
    let text = std::fs::read_to_string(&out).context("failed to read the ring report")?;
    let report: Value = serde_json::from_str(&text).context("the ring report is not JSON")?;
    render(&report)
}

fn render(report: &Value) -> Result<String> {
    let f = |v: &Value| -> Result<f64> { v.as_f64().with_context(|| format!("not a number: {v}")) };
    let mut out = String::new();
    writeln!(
        out,
        "Keys `key-0` … `key-{}` in keyspace `default`, equal nodes `node-0` …, {} virtual points per node (the default). Adding a node adds `node-N`; removing one removes `node-⌊N/2⌋`. \"Elsewhere\" counts keys that moved but not onto the added node (or not off the removed one).",
        f(&report["keys"])? as u64 - 1,
        report["vnodes"]
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| N | max/mean | min/mean | add: moved | ideal 1/(N+1) | elsewhere | remove: moved | ideal 1/N | elsewhere | `owner` ns |"
    )?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    for ring in report["rings"]
        .as_array()
        .context("the ring report has no rings")?
    {
        let (add, remove) = (&ring["add"], &ring["remove"]);
        writeln!(
            out,
            "| {} | {:.4} | {:.4} | {:.4} | {:.4} | {} | {:.4} | {:.4} | {} | {:.0} |",
            ring["nodes"],
            f(&ring["max_over_mean"])?,
            f(&ring["min_over_mean"])?,
            f(&add["moved_fraction"])?,
            f(&add["ideal_fraction"])?,
            add["moved_elsewhere"],
            f(&remove["moved_fraction"])?,
            f(&remove["ideal_fraction"])?,
            remove["moved_elsewhere"],
            f(&ring["owner_lookup_ns"])?,
        )?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_one_row_per_ring() {
        let report = serde_json::json!({
            "keys": 1000, "vnodes": 1024,
            "rings": [{
                "nodes": 3, "max_over_mean": 1.01, "min_over_mean": 0.99,
                "add": {"node": "node-3", "moved_fraction": 0.25, "ideal_fraction": 0.25, "moved_elsewhere": 0},
                "remove": {"node": "node-1", "moved_fraction": 0.33, "ideal_fraction": 0.3333, "moved_elsewhere": 0},
                "owner_lookup_ns": 75.4
            }]
        });
        let table = render(&report).unwrap();
        assert!(table.contains("`key-999`"), "{table}");
        assert!(
            table.contains(
                "| 3 | 1.0100 | 0.9900 | 0.2500 | 0.2500 | 0 | 0.3300 | 0.3333 | 0 | 75 |"
            ),
            "{table}"
        );
    }
}

//! The `write-back` suite: a backlog drained by the worker, its rows/s into
//! PostgreSQL vs `COPY` of the same rows into the same table; and the lag
//! from a durable write's acknowledgement to its row at the target rate
//! (10,000 writes/s over 3 partitions and two workers); with the broker
//! alone at the same rate for reference.
//!
//! PostgreSQL is started as for the tests; the broker is tansu with its
//! in-memory storage (`services::bench_broker`, overridable by environment
//! variables), not the tests' tansu on SQLite, which cannot carry these
//! rates. The measuring is done by `wb-bench` (a binary of the tests crate,
//! which links cache-client), one process per measurement, each printing
//! JSON. It starts the workers (and, for the lag, a cache node) from the
//! same build.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde_json::Value;

use super::Ctx;
use crate::{
    paths,
    services::{bench_broker::BenchBroker, postgres::PgCluster},
};

/// The sizes of one run.
struct Plan {
    /// The backlog the worker drains.
    records: u64,
    value_size: u64,
    rate: u64,
    duration: &'static str,
    partitions: u32,
    workers: u32,
}

/// The backlog of the full run, unless `RINGCACHE_BENCH_WB_RECORDS` says
/// otherwise (to scale it down on a slower machine).
const BACKLOG_RECORDS: u64 = 1_000_000;

/// The targets of the issue.
const TARGET_RATIO: f64 = 0.5;
const TARGET_LAG_P99_MS: f64 = 500.0;
const TARGET_RATE: &str = "10,000";

pub async fn run(ctx: &Ctx) -> Result<String> {
    let plan = if ctx.quick {
        Plan {
            records: 20_000,
            value_size: 100,
            rate: 1_000,
            duration: "5s",
            partitions: 3,
            workers: 2,
        }
    } else {
        let records = match std::env::var("RINGCACHE_BENCH_WB_RECORDS") {
            Ok(value) => value
                .parse()
                .with_context(|| format!("RINGCACHE_BENCH_WB_RECORDS={value:?} is not a count"))?,
            Err(_) => BACKLOG_RECORDS,
        };
        Plan {
            records,
            value_size: 100,
            rate: 10_000,
            duration: "60s",
            partitions: 3,
            workers: 2,
        }
    };
    let (runs, broker) = measure(ctx, &plan).await?;
    render(&plan, &runs, &broker)
}

/// One repetition's three JSON results.
struct Run {
    throughput: Value,
    lag: Value,
    broker: Value,
}

/// How many times the suite's measurements are repeated: once for figures
/// (a 60 s lag phase and a backlog of a million records take minutes
/// each), unless `RINGCACHE_BENCH_WB_RUNS` says otherwise.
fn run_count(ctx: &Ctx) -> Result<usize> {
    if ctx.quick {
        return Ok(1);
    }
    match std::env::var("RINGCACHE_BENCH_WB_RUNS") {
        Ok(value) => value
            .parse()
            .with_context(|| format!("RINGCACHE_BENCH_WB_RUNS={value:?} is not a count")),
        Err(_) => Ok(1),
    }
}

/// The runs' results, and which broker they ran against.
async fn measure(ctx: &Ctx, plan: &Plan) -> Result<(Vec<Run>, String)> {
    let size = plan.value_size.to_string();
    let records = plan.records.to_string();
    let rate = plan.rate.to_string();
    let partitions = plan.partitions.to_string();
    let workers = plan.workers.to_string();
    let mut runs = Vec::new();
    let mut broker_name = String::new();
    let n = run_count(ctx)?;
    for run in 1..=n {
        eprintln!("xtask: write-back run {run} of {n}");
        let (throughput, name) = wb_bench(
            ctx,
            &format!("throughput-{run}"),
            &[
                "throughput",
                "--records",
                &records,
                "--value-size",
                &size,
                "--partitions",
                &partitions,
            ],
        )
        .await?;
        broker_name = name;
        let load = [
            "--rate",
            &rate,
            "--duration",
            plan.duration,
            "--value-size",
            &size,
            "--partitions",
            &partitions,
        ];
        let (lag, _) = wb_bench(
            ctx,
            &format!("lag-{run}"),
            &[&["lag", "--workers", &workers][..], &load].concat(),
        )
        .await?;
        let (broker, _) = wb_bench(
            ctx,
            &format!("broker-{run}"),
            &[&["broker"][..], &load].concat(),
        )
        .await?;
        runs.push(Run {
            throughput,
            lag,
            broker,
        });
    }
    Ok((runs, broker_name))
}

/// Runs `wb-bench ARGS` against fresh services and parses what it prints;
/// with the broker's description.
///
/// Each measurement gets a PostgreSQL and a broker of its own, so that
/// none inherits the records or tables of the one before.
async fn wb_bench(ctx: &Ctx, name: &str, args: &[&str]) -> Result<(Value, String)> {
    let logs = ctx.logs.join(name);
    std::fs::create_dir_all(&logs)
        .with_context(|| format!("failed to create {}", logs.display()))?;
    let pg_logs = logs.clone();
    let pg_cancel = ctx.cancel.clone();
    // initdb and `pg_ctl start -w` block; keep them off the runtime.
    let postgres = tokio::task::spawn_blocking(move || PgCluster::start(&pg_logs, &pg_cancel))
        .await
        .context("the PostgreSQL start-up task panicked")?
        .context("failed to start PostgreSQL")?;
    let broker = BenchBroker::start(&logs, &postgres.url(), &ctx.cancel)
        .await
        .context("failed to start the benchmark's broker")?;
    let env = [
        ("RINGCACHE_TEST_PG_URL", postgres.url()),
        ("RINGCACHE_TEST_KAFKA_BROKERS", broker.brokers()),
    ];
    let mut args = args.to_vec();
    // `RINGCACHE_BENCH_WB_FETCH_WAIT_MAX`: the consumers' `fetch_wait_max`
    // instead of the worker's default. tansu 0.6 holds every fetch that
    // long even when it has records (see docs/benchmarks.md), but a short
    // wait there costs more than it gains on this machine.
    let wait = std::env::var("RINGCACHE_BENCH_WB_FETCH_WAIT_MAX").ok();
    if let Some(wait) = &wait {
        args.extend(["--fetch-wait-max", wait.as_str()]);
    }
    // `RINGCACHE_BENCH_WB_MAX_BATCHES_IN_FLIGHT`: the worker's
    // `max_batches_in_flight` instead of its default.
    let batches = std::env::var("RINGCACHE_BENCH_WB_MAX_BATCHES_IN_FLIGHT").ok();
    if let Some(batches) = &batches {
        args.extend(["--max-batches-in-flight", batches.as_str()]);
    }
    let outcome = wb_bench_on(ctx, &env, name, &args).await;
    if outcome.is_err() && !ctx.cancel.is_cancelled() {
        paths::print_tail("PostgreSQL", postgres.log(), 20);
        if let Some(log) = broker.log() {
            paths::print_tail("broker", log, 20);
        }
    }
    // The broker goes before the database it may store into.
    let mut described = broker.describe();
    if let Some(wait) = &wait {
        described.push_str(&format!(", consumed with `fetch_wait_max = \"{wait}\"`"));
    }
    if let Some(batches) = &batches {
        described.push_str(&format!(
            ", the worker with `max_batches_in_flight = {batches}`"
        ));
    }
    drop(broker);
    drop(postgres);
    Ok((outcome?, described))
}

async fn wb_bench_on(
    ctx: &Ctx,
    env: &[(&str, String)],
    name: &str,
    args: &[&str],
) -> Result<Value> {
    super::json_bench(ctx, env, "wb-bench", name, args).await
}

/// The number at `path` (`a.b`) of a result.
fn num(value: &Value, path: &str) -> f64 {
    path.split('.')
        .fold(value, |v, part| &v[part])
        .as_f64()
        .unwrap_or(f64::NAN)
}

/// The median of `path` over the runs' `pick`ed results.
fn median(runs: &[Run], pick: fn(&Run) -> &Value, path: &str) -> f64 {
    let mut values: Vec<f64> = runs.iter().map(|r| num(pick(r), path)).collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// `min–max` of `path` over the runs.
fn range(runs: &[Run], pick: fn(&Run) -> &Value, path: &str, digits: usize) -> String {
    let values: Vec<f64> = runs.iter().map(|r| num(pick(r), path)).collect();
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.digits$}–{max:.digits$}")
}

fn render(plan: &Plan, runs: &[Run], broker_name: &str) -> Result<String> {
    let tp: fn(&Run) -> &Value = |r| &r.throughput;
    let lag: fn(&Run) -> &Value = |r| &r.lag;
    let broker: fn(&Run) -> &Value = |r| &r.broker;
    let n = runs.len();
    let mut out = String::new();
    let scaled = if plan.records < BACKLOG_RECORDS {
        format!(" (scaled down from the target's {BACKLOG_RECORDS})")
    } else {
        String::new()
    };
    writeln!(
        out,
        "Broker: {broker_name}. Medians of {n} run(s), min–max in brackets; each measurement \
         on a fresh PostgreSQL and broker. A backlog of {records} records{scaled} of distinct \
         keys with {size}-byte values on a {partitions}-partition topic, drained by one \
         worker; lag at {rate} writes/s for {duration} over {partitions} partitions and \
         {workers} workers.",
        records = plan.records,
        size = plan.value_size,
        rate = plan.rate,
        duration = plan.duration,
        partitions = plan.partitions,
        workers = plan.workers,
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| backlog of {} records into `ringcache_entries` | rows/s | seconds |",
        plan.records
    )?;
    writeln!(out, "|---|---:|---:|")?;
    writeln!(
        out,
        "| **write-back-worker drains the backlog** (topic → table, from its first batch) | {:.0} ({}) | {:.2} ({}) |",
        median(runs, tp, "worker_rows_per_s"),
        range(runs, tp, "worker_rows_per_s", 0),
        median(runs, tp, "worker_seconds"),
        range(runs, tp, "worker_seconds", 2),
    )?;
    writeln!(
        out,
        "| `COPY` of the same rows (text format, encoding included) | {:.0} ({}) | {:.2} ({}) |",
        median(runs, tp, "copy_rows_per_s"),
        range(runs, tp, "copy_rows_per_s", 0),
        median(runs, tp, "copy_seconds"),
        range(runs, tp, "copy_seconds", 2),
    )?;
    let ratio = median(runs, tp, "ratio");
    writeln!(
        out,
        "| **worker / `COPY`** | **{ratio:.2}×** ({}) | |",
        range(runs, tp, "ratio", 2)
    )?;
    writeln!(
        out,
        "| write-back-worker's database time alone (its batches' write time, summed over the partitions' batches written side by side) | {:.0} ({}) | {:.2} ({}) |",
        median(runs, tp, "worker_db_rows_per_s"),
        range(runs, tp, "worker_db_rows_per_s", 0),
        median(runs, tp, "worker_db_seconds"),
        range(runs, tp, "worker_db_seconds", 2),
    )?;
    let db_ratio = median(runs, tp, "db_ratio");
    writeln!(
        out,
        "| worker's database time / `COPY` (per connection) | {db_ratio:.2}× ({}) | |",
        range(runs, tp, "db_ratio", 2)
    )?;
    writeln!(
        out,
        "| worker's batches: count, mean records per batch | {:.0} | {:.0} rec. |",
        median(runs, tp, "worker_batches"),
        plan.records as f64 / median(runs, tp, "worker_batches"),
    )?;
    writeln!(
        out,
        "| producing the records beforehand (acks=all, idempotent) | {:.0} | {:.2} |",
        plan.records as f64 / median(runs, tp, "produce_seconds"),
        median(runs, tp, "produce_seconds"),
    )?;
    writeln!(
        out,
        "| worker start to its first batch (not counted above) | | {:.2} |",
        median(runs, tp, "worker_startup_seconds"),
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| at {} writes/s | achieved/s | acknowledged | failed | p50 ms | p90 ms | p99 ms | max ms |",
        plan.rate
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    let row = |out: &mut String,
               what: &str,
               pick: fn(&Run) -> &Value,
               rate: &str,
               acked: &str,
               failed: &str,
               hist: &str|
     -> Result<()> {
        let rate = if rate.is_empty() {
            String::new()
        } else {
            format!("{:.0}", median(runs, pick, rate))
        };
        writeln!(
            out,
            "| {what} | {rate} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} ({}) | {:.1} |",
            median(runs, pick, acked),
            median(runs, pick, failed),
            median(runs, pick, &format!("{hist}.p50")),
            median(runs, pick, &format!("{hist}.p90")),
            median(runs, pick, &format!("{hist}.p99")),
            range(runs, pick, &format!("{hist}.p99"), 1),
            median(runs, pick, &format!("{hist}.max")),
        )?;
        Ok(())
    };
    row(
        &mut out,
        "**write-back lag**: durable write acknowledged → row committed",
        lag,
        "achieved_rate",
        "acknowledged",
        "failed",
        "lag",
    )?;
    row(
        &mut out,
        "durable write: due → acknowledged",
        lag,
        "",
        "acknowledged",
        "failed",
        "write_latency",
    )?;
    row(
        &mut out,
        "broker alone: record acknowledged → consumed",
        broker,
        "achieved_rate",
        "acknowledged",
        "failed",
        "ack_to_consume",
    )?;
    row(
        &mut out,
        "broker alone: record due → acknowledged",
        broker,
        "",
        "acknowledged",
        "failed",
        "produce_latency",
    )?;
    writeln!(out)?;
    let batches = median(runs, lag, "worker_batches");
    writeln!(
        out,
        "The {} workers during the lag run: {batches:.0} batches of {:.1} records on average; \
         their write paths were busy {:.0}% of the time (database time per second, summed \
         over the workers and over the batches each writes side by side).",
        plan.workers,
        median(runs, lag, "worker_records") / batches,
        median(runs, lag, "worker_db_busy") * 100.0,
    )?;
    writeln!(out)?;
    let lag_p99 = median(runs, lag, "lag.p99");
    let achieved = median(runs, lag, "achieved_rate");
    let verdict = |met: bool| if met { "met" } else { "**missed**" };
    writeln!(
        out,
        "Targets: worker at least {TARGET_RATIO}× `COPY` end to end: {} ({ratio:.2}×; its \
         database time alone {db_ratio:.2}×); lag p99 under {TARGET_LAG_P99_MS:.0} ms at \
         {TARGET_RATE} writes/s: {} ({lag_p99:.0} ms at {achieved:.0} writes/s achieved of \
         {} offered); backlog of {} records drained at {:.0} rows/s.",
        verdict(ratio >= TARGET_RATIO),
        verdict(lag_p99 < TARGET_LAG_P99_MS && achieved >= plan.rate as f64 * 0.95),
        plan.rate,
        plan.records,
        median(runs, tp, "worker_rows_per_s"),
    )?;
    let failed: f64 = runs.iter().map(|r| num(&r.lag, "failed")).sum();
    if failed > 0.0 {
        let errors = &runs
            .iter()
            .find(|r| num(&r.lag, "failed") > 0.0)
            .map(|r| r.lag["first_errors"].to_string())
            .unwrap_or_default();
        writeln!(out)?;
        writeln!(out, "Failed writes, first errors: {errors}")?;
    }
    Ok(out)
}

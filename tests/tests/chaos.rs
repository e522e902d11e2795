//! The short consistency chaos run of the suite: every strategy, one phase
//! per fault (a node SIGKILLed and restarted, paused, cut off by a
//! partition, slowed by latency; the broker restarted; PostgreSQL stopped
//! and started; the worker SIGKILLed and restarted), a fixed seed, about
//! two minutes of workload. It must find no violation of the strategies'
//! promises. The same run, longer, is `cargo xtask chaos` (`docs/chaos.md`).

use std::time::Duration;

use anyhow::{Result, ensure};
use ringcache_tests::chaos::run::{FaultKind, Options, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_strategy_keeps_its_promise_through_every_fault() -> Result<()> {
    let options = Options {
        faults: FaultKind::ALL.to_vec(),
        phase: Duration::from_secs(14),
        seed: 42,
        ..Options::default()
    };
    let outcome = run(&options).await?;
    println!("{}", outcome.report.table());
    for ((fault, strategy, message), count) in &outcome.errors {
        println!("  {fault:<16} {strategy:<13} {count:>6} x {message}");
    }
    let shown: Vec<String> = outcome
        .violations
        .iter()
        .take(5)
        .map(|(fault, violation)| format!("during {fault}:\n{violation}"))
        .collect();
    ensure!(
        outcome.violations.is_empty(),
        "{} violations; the first ones:\n{}",
        outcome.violations.len(),
        shown.join("\n\n")
    );
    // Every phase did work on every strategy.
    for row in &outcome.report.rows {
        ensure!(row.operations > 0, "no operations in {row:?}");
    }
    Ok(())
}

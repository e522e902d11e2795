//! The short consistency chaos run of the suite: three client processes
//! (each its own clock, health view and connections) on every strategy,
//! with the replicated keyspaces, one phase per fault: a node SIGKILLed and
//! restarted, cut off by a partition; PostgreSQL stopped and started, and
//! stalled (SIGSTOP); the worker SIGKILLed and restarted; poison records
//! the table refuses; a client paused; racing writers. A fixed seed, about
//! three minutes in all. It must find no violation of the strategies'
//! promises. The same run, longer and with every fault, is `cargo xtask
//! chaos` (`docs/chaos.md`).

use std::time::Duration;

use anyhow::{Result, ensure};
use ringcache_tests::chaos::run::{FaultKind, Options, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_strategy_keeps_its_promise_with_three_writers_through_the_faults() -> Result<()> {
    let options = Options {
        faults: vec![
            FaultKind::NodeKill,
            FaultKind::Partition,
            FaultKind::PostgresRestart,
            FaultKind::WorkerKill,
            FaultKind::DbStall,
            FaultKind::Poison,
            FaultKind::ClientPause,
            FaultKind::RacingWriters,
        ],
        clients: 3,
        phase: Duration::from_secs(12),
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

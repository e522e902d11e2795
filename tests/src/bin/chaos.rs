//! `chaos`: a consistency chaos run against a local cluster of real
//! processes. Run it through `cargo xtask chaos`, which builds the binaries
//! and finds PostgreSQL and the broker; see `docs/chaos.md`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use cache_client::strategy::Strategy;
use clap::Parser;
use ringcache_tests::chaos::run::{FaultKind, Options, run};

#[derive(Parser)]
#[command(
    name = "chaos",
    about = "Consistency chaos run: a local ringcache cluster, client processes, injected faults, a checker",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    /// Strategies to test, comma-separated (one keyspace each).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "cache-aside,read-through,write-around,write-through,write-back",
        value_parser = parse_strategy
    )]
    strategies: Vec<Strategy>,
    /// Fault schedule: one phase per fault, in order, comma-separated
    /// (node-kill, node-pause, partition, latency, broker-restart,
    /// postgres-restart, worker-kill, db-stall, client-pause,
    /// asymmetric-partition, poison, dirty-budget, strategy-switch,
    /// worker-kill-after-commit, racing-writers, none). Repeat faults for
    /// longer runs. Default: every fault once (with --single-writer, the
    /// first seven).
    #[arg(long, value_delimiter = ',')]
    faults: Option<Vec<FaultKind>>,
    /// Client processes, each with its own clock, health view and
    /// connections (through proxies of its own).
    #[arg(long)]
    clients: Option<usize>,
    /// The suite as it was with one writer: one client, two tasks per
    /// keyspace, no replicated keyspaces, the single-writer faults.
    #[arg(long)]
    single_writer: bool,
    /// Total workload time, split evenly over the phases (e.g. `2m`, `15m`).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Workload tasks per keyspace and client (default 1; 2 with
    /// --single-writer).
    #[arg(long)]
    tasks: Option<usize>,
    /// Keys per keyspace and phase.
    #[arg(long, default_value_t = 16)]
    keys: usize,
    /// Bytes per written value.
    #[arg(long, default_value_t = 64)]
    value_size: usize,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Cache nodes (at least 3).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Also write the report, with every violation, as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// A client process of a run (started by the run itself).
    #[command(hide = true)]
    Client,
}

fn parse_strategy(s: &str) -> Result<Strategy, String> {
    ringcache_tests::chaos::STRATEGIES
        .into_iter()
        .find(|strategy| strategy.to_string() == s)
        .ok_or_else(|| format!("unknown strategy {s:?}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    match main_inner().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("chaos: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

async fn main_inner() -> Result<bool> {
    let cli = Cli::parse();
    if let Some(Sub::Client) = cli.command {
        // A client's warnings (nodes marked down, recoveries) go to its
        // log, which a failed run prints the end of.
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .init();
        ringcache_tests::chaos::client::serve().await?;
        return Ok(true);
    }
    let base = if cli.single_writer {
        Options::single_writer()
    } else {
        Options::default()
    };
    let faults = cli.faults.unwrap_or(base.faults.clone());
    let phases = u32::try_from(faults.len()).context("too many phases")?;
    let options = Options {
        strategies: cli.strategies,
        phase: cli.duration / phases.max(1),
        faults,
        clients: cli.clients.unwrap_or(base.clients),
        tasks: cli.tasks.unwrap_or(base.tasks),
        keys: cli.keys,
        value_size: cli.value_size,
        seed: cli.seed,
        nodes: cli.nodes,
        progress: true,
        ..base
    };
    eprintln!(
        "chaos: {} phases of {:?}, seed {}, {} clients, {} tasks per keyspace and client, {} keyspaces, {} keys per phase",
        options.faults.len(),
        options.phase,
        options.seed,
        options.clients,
        options.tasks,
        options.keyspaces().len(),
        options.keys
    );
    let outcome = run(&options).await?;
    for (fault, violation) in &outcome.violations {
        println!("\nVIOLATION during {fault}:\n{violation}");
    }
    println!("\n{}", outcome.report.table());
    if !outcome.violations.is_empty() {
        let mut counts: std::collections::BTreeMap<(String, String, String), usize> =
            std::collections::BTreeMap::new();
        for (fault, violation) in &outcome.violations {
            *counts
                .entry((
                    format!("{:?}", violation.kind),
                    fault.to_string(),
                    violation.keyspace.clone(),
                ))
                .or_default() += 1;
        }
        println!("violations by check, fault and keyspace:");
        for ((kind, fault, keyspace), count) in &counts {
            println!("  {count:>6} x {kind:<20} {fault:<26} {keyspace}");
        }
    }
    if !outcome.errors.is_empty() {
        println!("errors seen (fault, strategy: count x message):");
        for ((fault, strategy, message), count) in &outcome.errors {
            println!("  {fault:<16} {strategy:<13} {count:>6} x {message}");
        }
    }
    if outcome.unchecked > 0 {
        println!(
            "{} keys were left out of the final-state checks (not observed or not quiescent)",
            outcome.unchecked
        );
    }
    if let Some(path) = &cli.json {
        std::fs::write(path, outcome.report.to_json()?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("JSON report: {}", path.display());
    }
    let clean = outcome.violations.is_empty();
    println!(
        "{}",
        if clean {
            "no violations: every strategy kept its promise"
        } else {
            "VIOLATIONS FOUND: a promise was broken"
        }
    );
    Ok(clean)
}

//! `wt-bench`: the write-through contention benchmark's load generator, run
//! by `cargo xtask bench --suite write-through` (`docs/benchmarks.md`).
//! Prints one JSON object on stdout; PostgreSQL comes from
//! `RINGCACHE_TEST_PG_URL`, the node binary from beside this one.

use std::{process::ExitCode, time::Duration};

use anyhow::Result;
use clap::{Parser, ValueEnum};
use ringcache_tests::wt_bench::{self, ContentionOptions};

#[derive(Parser)]
#[command(
    name = "wt-bench",
    about = "Write-through under contention: N writers on one key or on keys of their own"
)]
struct Cli {
    /// Writer tasks (closed loop).
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Which keys the writers write.
    #[arg(long, value_enum, default_value_t = Keys::Same)]
    keys: Keys,
    /// Length of the measured time.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Writing before the measured time.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Bytes per value.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Replicas of each key (written with a quorum of all of them).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Keys {
    /// Every writer on the same key.
    Same,
    /// Each writer on a key of its own.
    Distinct,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("wt-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<String> {
    let result = wt_bench::contention(&ContentionOptions {
        writers: cli.writers,
        same_key: cli.keys == Keys::Same,
        duration: cli.duration,
        warmup: cli.warmup,
        value_size: cli.value_size,
        nodes: cli.nodes,
        replicas: cli.replicas,
    })
    .await?;
    Ok(serde_json::to_string(&result)?)
}

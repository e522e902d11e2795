//! `wb-bench`: the write-back benchmark's load generator, run by `cargo
//! xtask bench --suite write-back` (`docs/benchmarks.md`). Each subcommand
//! prints one JSON object on stdout; the services come from
//! `RINGCACHE_TEST_PG_URL` and `RINGCACHE_TEST_KAFKA_BROKERS`, the node and
//! worker binaries from beside this one.

use std::{process::ExitCode, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand};
use ringcache_tests::wb_bench::{self, LagOptions, ThroughputOptions, Tuning};

#[derive(Parser)]
#[command(
    name = "wb-bench",
    about = "Write-back benchmark: worker vs COPY, and the write-to-row lag"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The worker's `fetch_wait_max` (and the broker-alone consumer's
    /// `fetch.wait.max.ms`), instead of the worker's default: for a broker
    /// that holds every fetch that long (tansu 0.6).
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    fetch_wait_max: Option<Duration>,
    /// The worker's `max_batches_in_flight`, instead of its default.
    #[arg(long, global = true)]
    max_batches_in_flight: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Records on a topic drained by the worker, then the same rows by COPY.
    Throughput {
        /// Records (distinct keys).
        #[arg(long, default_value_t = 200_000)]
        records: u64,
        /// Bytes per value.
        #[arg(long, default_value_t = 100)]
        value_size: usize,
        /// Partitions of the topic.
        #[arg(long, default_value_t = wb_bench::PARTITIONS)]
        partitions: i32,
    },
    /// Durable write-back writes at a fixed rate: acknowledgement to row.
    Lag(Load),
    /// The broker alone at a fixed rate: acknowledgement to consumption.
    Broker(Load),
}

#[derive(clap::Args)]
struct Load {
    /// Writes per second (open loop).
    #[arg(long, default_value_t = 10_000.0)]
    rate: f64,
    /// Length of the measured phase.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Bytes per value.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Writes in flight at most.
    #[arg(long, default_value_t = 4096)]
    max_in_flight: usize,
    /// Partitions of the topic.
    #[arg(long, default_value_t = wb_bench::PARTITIONS)]
    partitions: i32,
    /// Workers draining it, in one consumer group (`lag` only).
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

impl Load {
    fn options(&self, brokers: String, tuning: Tuning) -> LagOptions {
        LagOptions {
            brokers,
            rate: self.rate,
            duration: self.duration,
            value_size: self.value_size,
            max_in_flight: self.max_in_flight,
            partitions: self.partitions,
            workers: self.workers,
            tuning,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("wb-bench: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<String> {
    let brokers = ringcache_tests::kafka_brokers()?;
    let tuning = Tuning {
        fetch_wait_max: cli.fetch_wait_max,
        max_batches_in_flight: cli.max_batches_in_flight,
    };
    Ok(match cli.command {
        Command::Throughput {
            records,
            value_size,
            partitions,
        } => serde_json::to_string(
            &wb_bench::throughput(&ThroughputOptions {
                brokers,
                records,
                value_size,
                partitions,
                tuning,
            })
            .await?,
        )?,
        Command::Lag(load) => {
            serde_json::to_string(&wb_bench::lag(&load.options(brokers, tuning)).await?)?
        }
        Command::Broker(load) => {
            serde_json::to_string(&wb_bench::broker(&load.options(brokers, tuning)).await?)?
        }
    })
}

//! `cache-bench`: load against a ringcache cluster over gRPC (through
//! `cache_client::Client`) or any RESP server, closed or open loop; prints
//! throughput, latency percentiles and errors, and optionally JSON. See
//! `docs/benchmarks.md`.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use ringcache_tests::bench::{KeyDistribution, Mode, Options, Target, run};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Distribution {
    Uniform,
    Zipf,
}

#[derive(Parser)]
#[command(
    name = "cache-bench",
    about = "Benchmark a ringcache cluster (gRPC) or any RESP server: closed or open loop"
)]
struct Cli {
    /// `grpc://host:port[,host:port...]` (cluster seeds; `grpc-unary://`
    /// turns the client's command stream off), `resp://host:port`, or
    /// `resp-ring://[id=]host:port,...` (RESP servers, each key sent to the
    /// one the client's ring names, one connection per client per server;
    /// `resp-ring-mux://` shares one multiplexed connection per server).
    #[arg(long)]
    target: String,
    /// Keyspace of the keys (gRPC; for resp-ring, the keyspace keys are
    /// hashed in; RESP keys go to the server's default).
    #[arg(long, default_value = "default")]
    keyspace: String,
    /// Concurrent clients (closed loop), or workers sending the scheduled
    /// requests (open loop, with --rate).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Open loop: offered operations per second, due at fixed intervals;
    /// latency counts from when each was due. Without it: closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Length of the measured phase (e.g. `10s`, `1m`).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Warm-up before it, whose results are discarded.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// How keys are drawn.
    #[arg(long, value_enum, default_value_t = Distribution::Zipf)]
    distribution: Distribution,
    /// Skew of the Zipf distribution.
    #[arg(long, default_value_t = 0.99)]
    zipf_exponent: f64,
    /// Bytes per written value.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Fraction of reads, 0.0 to 1.0 (the rest are writes).
    #[arg(long, default_value_t = 0.9)]
    read_ratio: f64,
    /// Keys per read: more than 1 reads that many distinct keys in one
    /// operation (MultiGet, MGET); writes stay single-key.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// gRPC: the client's per-request timeout (deadline: four times it);
    /// default: the client's own.
    #[arg(long, value_parser = humantime::parse_duration)]
    request_timeout: Option<Duration>,
    /// Write every key once before the run, so that reads hit.
    #[arg(long)]
    preload: bool,
    /// Seed of the random key and operation choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

impl Cli {
    fn options(&self) -> Result<Options> {
        let mut options = Options::new(Target::parse(&self.target, &self.keyspace)?);
        options.mode = match self.rate {
            None => Mode::Closed,
            Some(rate) => Mode::Open { rate },
        };
        options.clients = self.clients;
        options.duration = self.duration;
        options.warmup = self.warmup;
        options.keys = self.keys;
        options.distribution = match self.distribution {
            Distribution::Uniform => KeyDistribution::Uniform,
            Distribution::Zipf => KeyDistribution::Zipf {
                exponent: self.zipf_exponent,
            },
        };
        options.value_size = self.value_size;
        options.read_ratio = self.read_ratio;
        options.batch = self.batch;
        options.request_timeout = self.request_timeout;
        options.preload = self.preload;
        options.seed = self.seed;
        Ok(options)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match bench(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cache-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(cli: Cli) -> Result<()> {
    let options = cli.options()?;
    let mode = match options.mode {
        Mode::Closed => format!("closed loop, {} clients", options.clients),
        Mode::Open { rate } => format!("open loop, {rate} ops/s, {} workers", options.clients),
    };
    let batch = if options.batch > 1 {
        format!(" of {} keys", options.batch)
    } else {
        String::new()
    };
    println!(
        "cache-bench: {} ({mode}), {} keys {:?}, {} B values, {:.0}% reads{batch}, warm-up {}, measured {}",
        cli.target,
        options.keys,
        options.distribution,
        options.value_size,
        options.read_ratio * 100.0,
        humantime::format_duration(options.warmup),
        humantime::format_duration(options.duration)
    );
    let summary = run(&options).await?;
    println!("{summary}");
    if let Some(path) = &cli.json {
        let json = serde_json::json!({
            "target": cli.target,
            "keyspace": cli.keyspace,
            "mode": match options.mode { Mode::Closed => "closed", Mode::Open { .. } => "open" },
            "rate": cli.rate,
            "clients": options.clients,
            "duration_secs": options.duration.as_secs_f64(),
            "warmup_secs": options.warmup.as_secs_f64(),
            "keys": options.keys,
            "distribution": format!("{:?}", cli.distribution).to_lowercase(),
            "zipf_exponent": cli.zipf_exponent,
            "value_size": options.value_size,
            "read_ratio": options.read_ratio,
            "batch": options.batch,
            "preload": options.preload,
            "summary": summary,
        });
        let text = serde_json::to_string_pretty(&json).context("failed to render the JSON")?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(())
}

//! `hit-ratio`: replays a trace of `ringcache_tests::bench::trace` against
//! a RESP server (a node's `resp_listen`, `redis-server`) or against moka
//! set up as the node's store was before the compact table (in this
//! process), cache-aside: every request is a `GET`, every miss is followed
//! by a `SET` of the key. Prints the hit ratio of the counted requests as
//! JSON on its last line. Run by `cargo xtask bench --suite hit-ratio`.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use ringcache_tests::bench::trace::{self, Kind, Request, Shape};

#[derive(Parser)]
#[command(name = "hit-ratio", about = "Replay a hit-ratio trace, cache-aside")]
struct Cli {
    /// `resp://host:port`, or `moka` (in this process, with
    /// `--moka-capacity`).
    #[arg(long)]
    target: String,
    /// `zipf`, `scan` or `shift`.
    #[arg(long)]
    trace: String,
    /// Distinct keys of the Zipf part.
    #[arg(long, default_value_t = 10_000_000)]
    keys: u64,
    /// Counted (Zipf) requests.
    #[arg(long, default_value_t = 5_000_000)]
    requests: u64,
    #[arg(long, default_value_t = 0.99)]
    exponent: f64,
    /// Keys of each of the ten scans of the `scan` trace.
    #[arg(long, default_value_t = 500_000)]
    scan_len: u64,
    /// Times the `shift` trace's hot set moves.
    #[arg(long, default_value_t = 4)]
    shifts: u64,
    #[arg(long, default_value_t = 20_261_207)]
    seed: u64,
    /// Bytes of each written value.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Reads sent at once (RESP pipeline depth); the misses of a batch are
    /// written as the next batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// moka's `max_capacity`, in the weigher's unit (key + value +
    /// `--moka-overhead`).
    #[arg(long)]
    moka_capacity: Option<u64>,
    /// What the weigher adds per entry (the store's `ENTRY_OVERHEAD_BYTES`
    /// was 128).
    #[arg(long, default_value_t = 128)]
    moka_overhead: u64,
}

/// The counted requests and their hits.
#[derive(Default)]
struct Tally {
    requests: u64,
    hits: u64,
    sent: u64,
}

impl Tally {
    fn add(&mut self, request: Request, hit: bool) {
        self.sent += 1;
        if request.counted() {
            self.requests += 1;
            self.hits += u64::from(hit);
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let kind = Kind::parse(&cli.trace).with_context(|| format!("unknown trace {}", cli.trace))?;
    let shape = Shape {
        kind,
        keys: cli.keys,
        requests: cli.requests,
        exponent: cli.exponent,
        scan_len: cli.scan_len,
        shifts: cli.shifts,
        seed: cli.seed,
    };
    let requests = trace::generate(shape).map_err(anyhow::Error::msg)?;
    let value = Bytes::from(vec![b'v'; cli.value_size]);
    let started = Instant::now();
    let tally = if cli.target == "moka" {
        let capacity = cli
            .moka_capacity
            .context("--target moka needs --moka-capacity")?;
        replay_moka(requests, capacity, cli.moka_overhead, &value)
    } else if let Some(addr) = cli.target.strip_prefix("resp://") {
        replay_resp(addr, requests, cli.batch.max(1), &value).await?
    } else {
        bail!("unknown target {}", cli.target);
    };
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "trace": kind.name(),
            "requests": tally.requests,
            "hits": tally.hits,
            "hit_ratio": tally.hits as f64 / tally.requests.max(1) as f64,
            "sent": tally.sent,
            "seconds": seconds,
        })
    );
    Ok(())
}

/// moka as the node's store set it up before the compact table: weighed
/// by key + value + `overhead`, TinyLFU admission, no TTL.
fn replay_moka(
    requests: impl Iterator<Item = Request>,
    capacity: u64,
    overhead: u64,
    value: &Bytes,
) -> Tally {
    let cache: moka::sync::Cache<String, Bytes> = moka::sync::Cache::builder()
        .max_capacity(capacity)
        .weigher(move |key: &String, value: &Bytes| {
            u32::try_from(key.len() as u64 + value.len() as u64 + overhead).unwrap_or(u32::MAX)
        })
        .build();
    let mut tally = Tally::default();
    for request in requests {
        let key = request.key();
        let hit = cache.get(&key).is_some();
        if !hit {
            cache.insert(key, value.clone());
        }
        tally.add(request, hit);
    }
    tally
}

/// Pipelined batches of `GET`s, each followed by a pipeline of `SET`s of
/// its misses. A key repeated within one batch misses each time, on every
/// server alike.
async fn replay_resp(
    addr: &str,
    requests: impl Iterator<Item = Request>,
    batch: usize,
    value: &Bytes,
) -> Result<Tally> {
    let client = redis::Client::open(format!("redis://{addr}/"))?;
    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let mut tally = Tally::default();
    let mut pending: Vec<Request> = Vec::with_capacity(batch);
    let mut requests = requests.peekable();
    while requests.peek().is_some() {
        pending.clear();
        pending.extend(requests.by_ref().take(batch));
        let keys: Vec<String> = pending.iter().map(|r| r.key()).collect();
        let mut gets = redis::pipe();
        for key in &keys {
            gets.get(key);
        }
        let replies: Vec<Option<Vec<u8>>> = gets
            .query_async(&mut connection)
            .await
            .context("GET pipeline")?;
        let mut sets = redis::pipe();
        let mut misses = 0;
        for ((request, key), reply) in pending.iter().zip(&keys).zip(&replies) {
            let hit = reply.is_some();
            tally.add(*request, hit);
            if !hit {
                sets.set(key, value.as_ref()).ignore();
                misses += 1;
            }
        }
        if misses > 0 {
            let () = sets
                .query_async(&mut connection)
                .await
                .context("SET pipeline")?;
        }
    }
    Ok(tally)
}

//! The `hit-ratio` suite (issue 14): hits per byte of memory. Every cache
//! gets the same memory and replays the same traces, cache-aside (a read;
//! on a miss, a write of the key), through `hit-ratio`:
//!
//! - redis-server with `maxmemory` (the budget plus what the empty server
//!   uses) under `allkeys-lru`, then `allkeys-lfu`;
//! - the node, its default keyspace's `capacity_bytes` the budget (the
//!   compact table charges entries and index as glibc's malloc does); then
//!   again with `capacity_bytes` scaled so that its RSS grows as much as
//!   redis-server's did (eviction's churn leaves glibc's free chunks
//!   behind, which the table does not charge): the row the target is
//!   judged on;
//! - moka set up as the node's store was before the compact table (weigher
//!   key + value + 128), in the replaying process: once given the same
//!   memory (the budget scaled by what that store's RSS grew per byte it
//!   charged, 595 bytes of RSS per 239 charged for 100-byte values, the
//!   last memory run on moka), and once the same `capacity_bytes`.
//!
//! The traces (`ringcache_tests::bench::trace`): Zipf 0.99 over 10,000,000
//! keys; the same with a one-pass scan of fresh keys at every tenth; the
//! same with a hot set that moves four times. Only the Zipf reads count.
//! The traces are the same from run to run (a fixed seed), so one run of
//! each is shown; redis's sampled eviction and LFU decay, and moka's
//! sampling, move their figures by up to about 0.005 between runs.

use std::fmt::Write as _;

use anyhow::{Context, Result};

use super::{
    Ctx, json_bench,
    memory::{field, info, keys_held, redis_cli, rss_bytes},
    resp::{Kind, Server},
};

/// The memory every cache gets, in bytes.
fn budget(ctx: &Ctx) -> u64 {
    if ctx.quick { 4 << 20 } else { 64 << 20 }
}

/// The traces' sizes: keys, counted requests, keys per scan.
fn sizes(ctx: &Ctx) -> (u64, u64, u64) {
    if ctx.quick {
        (1_000_000, 300_000, 40_000)
    } else {
        (10_000_000, 5_000_000, 500_000)
    }
}

const TRACES: [(&str, &str); 3] = [
    ("zipf", "Zipf 0.99"),
    ("scan", "Zipf 0.99 + one-pass scans"),
    ("shift", "Zipf 0.99, hot set moving 4 times"),
];

/// RSS of the moka store per byte its weigher charged: 595 B per item of
/// RSS growth for 239 B charged (100-byte values, docs/benchmarks.md's last
/// memory run on moka, 2026-11-30 at c92cf24).
const MOKA_RSS_PER_CHARGED: f64 = 595.0 / 239.0;

/// One cache of the comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contender {
    RedisLru,
    RedisLfu,
    MokaSameRss,
    MokaSameCapacity,
    Ringcache,
    /// The node again, its `capacity_bytes` scaled so that its RSS grows
    /// as much as redis-server's did on the same trace.
    RingcacheSameRss,
}

impl Contender {
    /// The contenders run first, in an order that alternates trace by
    /// trace; [`Contender::RingcacheSameRss`] runs after them, as it needs
    /// their RSS.
    const FIRST: [Contender; 5] = [
        Contender::RedisLru,
        Contender::RedisLfu,
        Contender::MokaSameRss,
        Contender::MokaSameCapacity,
        Contender::Ringcache,
    ];
    const ALL: [Contender; 6] = [
        Contender::RedisLru,
        Contender::RedisLfu,
        Contender::MokaSameRss,
        Contender::MokaSameCapacity,
        Contender::Ringcache,
        Contender::RingcacheSameRss,
    ];

    fn label(self) -> &'static str {
        match self {
            Contender::RedisLru => "redis-server allkeys-lru",
            Contender::RedisLfu => "redis-server allkeys-lfu",
            Contender::MokaSameRss => "moka store, same memory",
            Contender::MokaSameCapacity => "moka store, same capacity_bytes",
            Contender::Ringcache => "ringcache, capacity_bytes = maxmemory",
            Contender::RingcacheSameRss => "ringcache, same RSS as redis-server",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Contender::RedisLru => "redis-lru",
            Contender::RedisLfu => "redis-lfu",
            Contender::MokaSameRss => "moka-rss",
            Contender::MokaSameCapacity => "moka-cap",
            Contender::Ringcache => "ringcache",
            Contender::RingcacheSameRss => "ringcache-rss",
        }
    }
}

/// One replay's outcome.
#[derive(Clone, Copy, Debug, Default)]
struct Outcome {
    hit_ratio: f64,
    /// Keys held at the end, and the server's RSS growth (servers only).
    keys: Option<u64>,
    rss_growth: Option<u64>,
    seconds: f64,
}

fn trace_args(ctx: &Ctx, trace: &str) -> Vec<String> {
    let (keys, requests, scan_len) = sizes(ctx);
    vec![
        "--trace".into(),
        trace.into(),
        "--keys".into(),
        keys.to_string(),
        "--requests".into(),
        requests.to_string(),
        "--scan-len".into(),
        scan_len.to_string(),
    ]
}

/// Replays `trace` against `contender`; `node_capacity` is the node's
/// `capacity_bytes` (the budget unless scaled to an RSS).
async fn replay(
    ctx: &Ctx,
    trace: &str,
    contender: Contender,
    node_capacity: u64,
) -> Result<Outcome> {
    let budget = budget(ctx);
    let name = format!("{trace}-{}", contender.short());
    let mut args = trace_args(ctx, trace);
    let moka = match contender {
        Contender::MokaSameRss => Some((budget as f64 / MOKA_RSS_PER_CHARGED) as u64),
        Contender::MokaSameCapacity => Some(budget),
        _ => None,
    };
    if let Some(capacity) = moka {
        args.extend([
            "--target".into(),
            "moka".into(),
            "--moka-capacity".into(),
            capacity.to_string(),
        ]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let json = json_bench(ctx, &[], "hit-ratio", &name, &refs).await?;
        return parse(&json, None, None);
    }
    let (server_cpu, _) = ctx.cpus();
    let (kind, capacity) = match contender {
        Contender::Ringcache | Contender::RingcacheSameRss => {
            (Kind::Ringcache, Some(node_capacity))
        }
        _ => (Kind::Redis, None),
    };
    let label = format!("hit-ratio-{name}");
    let mut server = Server::start_sized(ctx, kind, server_cpu, &label, capacity).await?;
    if kind == Kind::Redis {
        let empty: u64 = field(&info(server.addr).await?, "used_memory")?
            .parse()
            .context("used_memory is not a number")?;
        let policy = if contender == Contender::RedisLru {
            "allkeys-lru"
        } else {
            "allkeys-lfu"
        };
        redis_config(
            server.addr,
            &[
                ("maxmemory", (budget + empty).to_string()),
                ("maxmemory-policy", policy.to_owned()),
            ],
        )
        .await?;
    }
    let rss_empty = rss_bytes(server.pid())?;
    args.extend(["--target".into(), format!("resp://{}", server.addr)]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let json = json_bench(ctx, &[], "hit-ratio", &name, &refs).await;
    server.check_alive()?;
    let json = json?;
    let keys = keys_held(kind, &info(server.addr).await?)?;
    let rss = rss_bytes(server.pid())?.saturating_sub(rss_empty);
    server.stop().await?;
    parse(&json, Some(keys), Some(rss))
}

fn parse(json: &serde_json::Value, keys: Option<u64>, rss: Option<u64>) -> Result<Outcome> {
    Ok(Outcome {
        hit_ratio: json["hit_ratio"]
            .as_f64()
            .with_context(|| format!("no hit_ratio in {json}"))?,
        keys,
        rss_growth: rss,
        seconds: json["seconds"].as_f64().unwrap_or(f64::NAN),
    })
}

/// `redis-cli CONFIG SET name value` for each pair.
async fn redis_config(addr: std::net::SocketAddr, settings: &[(&str, String)]) -> Result<()> {
    for (name, value) in settings {
        let reply = redis_cli(addr, &["CONFIG", "SET", name, value]).await?;
        anyhow::ensure!(reply.trim() == "OK", "CONFIG SET {name} {value}: {reply}");
    }
    Ok(())
}

pub async fn run(ctx: &Ctx) -> Result<String> {
    let mut rows = Vec::new();
    for (index, (trace, _)) in TRACES.iter().enumerate() {
        let mut order = Contender::FIRST.to_vec();
        // Alternate the order trace by trace, as the other suites do run
        // by run.
        if index % 2 == 1 {
            order.reverse();
        }
        let mut outcomes = Vec::new();
        for contender in order {
            eprintln!("xtask: hit-ratio {trace}: {}", contender.label());
            let outcome = replay(ctx, trace, contender, budget(ctx))
                .await
                .with_context(|| format!("{trace} against {}", contender.label()))?;
            outcomes.push((contender, outcome));
        }
        let capacity = same_rss_capacity(budget(ctx), &outcomes)?;
        let contender = Contender::RingcacheSameRss;
        eprintln!(
            "xtask: hit-ratio {trace}: {} ({capacity} bytes)",
            contender.label()
        );
        let outcome = replay(ctx, trace, contender, capacity)
            .await
            .with_context(|| format!("{trace} against {}", contender.label()))?;
        outcomes.push((contender, outcome));
        rows.push((*trace, outcomes));
    }
    Ok(render(ctx, &rows))
}

/// The node's `capacity_bytes` that should make its RSS grow as much as
/// redis-server's did: the budget scaled by redis's mean RSS growth over
/// the node's.
fn same_rss_capacity(budget: u64, outcomes: &[(Contender, Outcome)]) -> Result<u64> {
    let rss = |wanted: &[Contender]| -> Vec<f64> {
        outcomes
            .iter()
            .filter(|(c, _)| wanted.contains(c))
            .filter_map(|(_, o)| o.rss_growth)
            .map(|b| b as f64)
            .collect()
    };
    let redis = rss(&[Contender::RedisLru, Contender::RedisLfu]);
    let node = rss(&[Contender::Ringcache]);
    anyhow::ensure!(
        !redis.is_empty() && node.first().is_some_and(|n| *n > 0.0),
        "no RSS growth to scale by"
    );
    let redis = redis.iter().sum::<f64>() / redis.len() as f64;
    Ok((budget as f64 * redis / node[0]) as u64)
}

fn render(ctx: &Ctx, rows: &[(&str, Vec<(Contender, Outcome)>)]) -> String {
    let (keys, requests, scan_len) = sizes(ctx);
    let budget = budget(ctx);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Hit ratio per memory: each cache gets {} MiB and replays the same traces, \
         cache-aside (a GET; on a miss, a SET of a 100-byte value; RESP pipelines of 64 GETs, \
         then the batch's misses): Zipf 0.99 over {keys} keys, {requests} counted reads; the \
         scan trace adds a one-pass scan of {scan_len} fresh keys at every tenth; the shifting \
         trace moves the hot set 4 times. Only the Zipf reads count.\n",
        budget >> 20
    );
    let _ = write!(out, "| trace |");
    for contender in Contender::ALL {
        let _ = write!(out, " {} |", contender.label());
    }
    let _ = writeln!(out, " target met |");
    let _ = write!(out, "|---|");
    for _ in Contender::ALL {
        let _ = write!(out, "---:|");
    }
    let _ = writeln!(out, "---|");
    for (trace, outcomes) in rows {
        let title = TRACES
            .iter()
            .find(|(t, _)| t == trace)
            .map_or(*trace, |(_, title)| title);
        let _ = write!(out, "| {title} |");
        let get = |c: Contender| {
            outcomes
                .iter()
                .find(|(o, _)| *o == c)
                .map(|(_, outcome)| *outcome)
                .unwrap_or_default()
        };
        for contender in Contender::ALL {
            let _ = write!(out, " {:.4} |", get(contender).hit_ratio);
        }
        let ours = get(Contender::RingcacheSameRss).hit_ratio;
        let best_redis = get(Contender::RedisLru)
            .hit_ratio
            .max(get(Contender::RedisLfu).hit_ratio);
        let met = ours >= best_redis && ours >= get(Contender::MokaSameRss).hit_ratio;
        let _ = writeln!(out, " {} |", if met { "yes" } else { "**no**" });
    }
    let _ = writeln!(
        out,
        "\nWhat the servers held at the end (keys; RSS growth over the empty server, MiB; replay seconds):\n"
    );
    let _ = writeln!(out, "| trace | cache | keys | RSS growth | seconds |");
    let _ = writeln!(out, "|---|---|---:|---:|---:|");
    for (trace, outcomes) in rows {
        for (contender, outcome) in outcomes {
            let keys = outcome.keys.map_or("—".to_owned(), |k| k.to_string());
            let rss = outcome.rss_growth.map_or("—".to_owned(), |b| {
                format!("{:.1}", b as f64 / f64::from(1 << 20))
            });
            let _ = writeln!(
                out,
                "| {trace} | {} | {keys} | {rss} | {:.1} |",
                contender.label(),
                outcome.seconds
            );
        }
    }
    let _ = writeln!(
        out,
        "\n`target met`: the node's hit ratio at the same RSS as redis-server is at least \
         redis-server's best and at least the moka store's given the same memory. The node \
         is run twice: with `capacity_bytes` equal to redis's `maxmemory` (less what the empty \
         redis uses), then with `capacity_bytes` scaled by redis's RSS growth over the node's \
         on the trace, so that both hold the same resident memory. The moka store replays in the replaying \
         process (no network); its capacity for the same memory is {:.0} bytes of its weigher \
         ({budget} / {MOKA_RSS_PER_CHARGED:.2}).",
        budget as f64 / MOKA_RSS_PER_CHARGED
    );
    out
}

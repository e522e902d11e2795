//! `cachectl`: inspect and poke a ringcache pool from the shell.
//!
//! Human-readable output by default, `--json` for scripts; on error a
//! one-line reason on stderr and exit status 1.
//!
//! `dlq.rs` holds the dead-letter commands (`dlq list`, `dlq replay`).

mod dlq;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use cache_client::plan;
use cache_client::ring::Ring;
use cache_client::{Client, ClientConfig, SetOptions, SetOutcome};
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
#[command(name = "cachectl", version, about = "Inspect and use a ringcache pool")]
struct Cli {
    /// Nodes to ask for the topology, comma-separated host:port.
    #[arg(
        long,
        env = "RINGCACHE_SEEDS",
        default_value = "127.0.0.1:7700",
        value_delimiter = ','
    )]
    seeds: Vec<String>,
    /// Keyspace of keyed commands.
    #[arg(
        long,
        short = 'k',
        env = "RINGCACHE_KEYSPACE",
        default_value = "default"
    )]
    keyspace: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Keyspace file (strategies and stores), for `kv` commands.
    #[arg(long, env = "RINGCACHE_KEYSPACES")]
    keyspaces: Option<std::path::PathBuf>,
    /// PostgreSQL URL of the keyspaces' stores, for `kv` commands.
    #[arg(long, env = "RINGCACHE_DATABASE_URL")]
    database: Option<String>,
    /// Kafka bootstrap servers, for `kv` commands on write-back keyspaces
    /// (their writes are queued there for the write-back worker).
    #[arg(long, env = "RINGCACHE_KAFKA_BROKERS")]
    brokers: Option<String>,
    /// Overall deadline of one call.
    #[arg(long, default_value = "2s", value_parser = humantime_duration)]
    deadline: Duration,
    /// Bearer token for nodes that require one (prefer the variable or
    /// --token-file: flags show in `ps`).
    #[arg(
        long,
        env = "RINGCACHE_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// File holding the bearer token.
    #[arg(long, env = "RINGCACHE_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
    /// CA (PEM) of the nodes' certificates: turns TLS on.
    #[arg(long, env = "RINGCACHE_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for nodes that require mutual TLS.
    #[arg(long, env = "RINGCACHE_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<std::path::PathBuf>,
    /// Key (PEM) of --tls-cert.
    #[arg(long, env = "RINGCACHE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Name the nodes' certificates carry, when it is not the host dialled.
    #[arg(long, env = "RINGCACHE_TLS_DOMAIN", requires = "tls_ca")]
    tls_domain: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Read a key.
    Get {
        /// The key.
        key: String,
    },
    /// Write a key.
    Set {
        /// The key.
        key: String,
        /// The value (UTF-8 text).
        value: String,
        /// Version to store with the value.
        #[arg(long, default_value_t = 0)]
        version: u64,
        /// Time to live, for example 30s or 5m.
        #[arg(long, value_parser = humantime_duration)]
        ttl: Option<Duration>,
        /// Store only if the key is absent.
        #[arg(long, conflicts_with = "if_newer")]
        if_absent: bool,
        /// Store only if the version is newer than the stored one.
        #[arg(long)]
        if_newer: bool,
    },
    /// Delete a key.
    Del {
        /// The key.
        key: String,
    },
    /// Read many keys.
    Mget {
        /// The keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Per-node, per-keyspace counters and sizes.
    Stats,
    /// The members and epoch the seeds report, each member probed (its
    /// `grpc.health.v1` status, within --deadline); exits 0 even when
    /// members are unreachable.
    Topology,
    /// Empty a keyspace, or every keyspace, on one node or on every member
    /// (cached values, leases, pending changes and write-back dirty
    /// entries).
    Flush(FlushArgs),
    /// The write-back worker's dead-letter topic: list dead letters, or
    /// replay them through the worker's version guard (needs --brokers).
    Dlq {
        #[command(subcommand)]
        op: dlq::DlqOp,
    },
    /// Ask each seed's `grpc.health.v1` service whether it serves; exits 1
    /// unless every seed answers SERVING (a container health check).
    Health,
    /// Read and write through the keyspace's strategy (needs --keyspaces and
    /// --database).
    Kv {
        #[command(subcommand)]
        op: KvOp,
    },
    /// Which nodes own a key, or how N sample keys spread across the pool.
    Ring {
        /// The key to place.
        key: Option<String>,
        /// Instead of one key, place this many sample keys and show the
        /// balance.
        #[arg(long, conflicts_with = "key")]
        sample: Option<usize>,
    },
    /// Size a pool: nodes, memory per node, Kafka partitions and storage,
    /// workers (arithmetic only; contacts nothing). See docs/capacity.md.
    Plan(PlanArgs),
}

/// Inputs of `cachectl plan`; defaults and their sources are in
/// `docs/capacity.md` and `cache_client::plan`.
#[derive(clap::Args)]
struct PlanArgs {
    /// Distinct keys cached.
    #[arg(long)]
    keys: u64,
    /// Average value size (bytes, or with a unit: 1KiB).
    #[arg(long)]
    value_bytes: bytesize::ByteSize,
    /// Average key size.
    #[arg(long, default_value_t = bytesize::ByteSize(plan::DEFAULT_KEY_BYTES))]
    key_bytes: bytesize::ByteSize,
    /// Copies of each key (the keyspace's `replicas`).
    #[arg(long, default_value_t = 1)]
    replicas: u64,
    /// Reads per second, all clients together.
    #[arg(long, default_value_t = 0.0)]
    reads: f64,
    /// Writes (sets and deletes) per second, all clients together.
    #[arg(long, default_value_t = 0.0)]
    writes: f64,
    /// Of those writes, write-back writes per second (queued on Kafka).
    #[arg(long, default_value_t = 0.0)]
    write_back_writes: f64,
    /// Memory one node may give the cache.
    #[arg(long, default_value_t = bytesize::ByteSize(plan::DEFAULT_NODE_MEMORY_BYTES))]
    node_memory: bytesize::ByteSize,
    /// Requests per second one node serves (measure yours: docs/benchmarks.md).
    #[arg(long, default_value_t = plan::DEFAULT_NODE_OPS_PER_SEC)]
    node_ops: f64,
    /// Memory per entry beyond key and value (measure yours: docs/benchmarks.md).
    #[arg(long, default_value_t = bytesize::ByteSize(plan::DEFAULT_ITEM_OVERHEAD_BYTES))]
    item_overhead: bytesize::ByteSize,
    /// Fraction of each node's (and worker's) memory and throughput kept free.
    #[arg(long, default_value_t = plan::DEFAULT_HEADROOM)]
    headroom: f64,
    /// Nodes that may be down while the rest carry everything.
    #[arg(long, default_value_t = plan::DEFAULT_SPARE_NODES)]
    spare_nodes: u64,
    /// Kafka retention of the write-back topics.
    #[arg(long, default_value = "7days", value_parser = humantime_duration)]
    retention: Duration,
    /// PostgreSQL outage write-back should ride out.
    #[arg(long, default_value = "1h", value_parser = humantime_duration)]
    outage: Duration,
    /// Replication factor of the write-back topics.
    #[arg(long, default_value_t = plan::DEFAULT_KAFKA_REPLICATION)]
    kafka_replication: u64,
    /// Rows per second one write-back worker stores (measure yours).
    #[arg(long, default_value_t = plan::DEFAULT_WORKER_ROWS_PER_SEC)]
    worker_rows: f64,
}

/// What `cachectl flush` empties, and where.
#[derive(clap::Args)]
#[command(group(
    clap::ArgGroup::new("which")
        .required(true)
        .args(["keyspace", "all_keyspaces"])
))]
struct FlushArgs {
    /// Confirm the flush: readers miss every flushed key once, and
    /// write-back writes not yet stored are served from PostgreSQL's older
    /// value until the worker stores them.
    #[arg(long)]
    yes: bool,
    /// Only this node (its address or id); every member when absent.
    #[arg(long)]
    node: Option<String>,
    /// The keyspace to empty.
    #[arg(long)]
    keyspace: Option<String>,
    /// Empty every keyspace.
    #[arg(long)]
    all_keyspaces: bool,
}

#[derive(Subcommand)]
enum KvOp {
    /// Read a key; a miss loads it from the store (cache-aside: cache only).
    Get {
        /// The key.
        key: String,
    },
    /// Write a key through the strategy.
    Put {
        /// The key.
        key: String,
        /// The value (UTF-8 text).
        value: String,
    },
    /// Delete a key through the strategy.
    Del {
        /// The key.
        key: String,
    },
    /// Show what the cache holds for the key, without loading.
    Peek {
        /// The key.
        key: String,
    },
    /// Show what the store holds for the key.
    Stored {
        /// The key.
        key: String,
    },
}

fn humantime_duration(text: &str) -> Result<Duration, String> {
    text.parse::<humantime::Duration>()
        .map(Into::into)
        .map_err(|e| e.to_string())
}

/// The `grpc.health.v1` status of the node at `address` (the whole server,
/// service `""`), or `UNREACHABLE (why)` when it does not answer within
/// `deadline`.
async fn probe(config: &ClientConfig, address: &str, deadline: Duration) -> String {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let probe = async {
        // Health is open to callers without a token (probes hold none), but
        // a TLS node answers only over TLS.
        let channel = config.endpoint(address)?.connect().await?;
        let reply = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        anyhow::Ok(reply.into_inner().status().as_str_name().to_owned())
    };
    match tokio::time::timeout(deadline, probe).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => format!("UNREACHABLE ({e:#})"),
        Err(_) => format!(
            "UNREACHABLE (no answer within {})",
            humantime::format_duration(deadline)
        ),
    }
}

/// Probes every seed; fails unless all of them answer SERVING.
async fn health(config: &ClientConfig, deadline: Duration, json: bool) -> anyhow::Result<()> {
    let mut unhealthy = Vec::new();
    for seed in &config.seeds {
        let status = probe(config, seed, deadline).await;
        if json {
            println!("{}", json!({"node": seed, "status": status}));
        } else {
            println!("{seed}: {status}");
        }
        if status != "SERVING" {
            unhealthy.push(seed.as_str());
        }
    }
    if unhealthy.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("not serving: {}", unhealthy.join(","))
    }
}

/// `cachectl topology`: the members, each probed at once.
async fn topology(client: &Client, deadline: Duration, json: bool) {
    let topology = client.topology();
    let config = client.config();
    let states = futures::future::join_all(
        topology
            .members
            .iter()
            .map(|m| probe(config, &m.address, deadline)),
    )
    .await;
    if json {
        let members: Vec<_> = topology
            .members
            .iter()
            .zip(&states)
            .map(|(m, status)| {
                let state = match status.as_str() {
                    "SERVING" => "serving".to_owned(),
                    "NOT_SERVING" => "not serving".to_owned(),
                    other => other.to_lowercase(),
                };
                json!({"id": m.id, "address": m.address, "weight": m.weight,
                       "up": status == "SERVING", "state": state})
            })
            .collect();
        println!("{}", json!({"epoch": topology.epoch, "members": members}));
    } else {
        println!("epoch {}", topology.epoch);
        for (m, status) in topology.members.iter().zip(&states) {
            println!(
                "{:<12} {:<24} weight {:<3} {status}",
                m.id, m.address, m.weight
            );
        }
    }
}

/// `cachectl flush`.
async fn flush(client: &Client, args: &FlushArgs, json: bool) -> anyhow::Result<()> {
    let keyspace = args.keyspace.as_deref();
    let flushed = client.flush_members(args.node.as_deref(), keyspace).await;
    if flushed.is_empty() {
        anyhow::bail!(
            "{} is not a member of the pool (cachectl topology lists them)",
            args.node.as_deref().unwrap_or_default()
        );
    }
    let what = keyspace.map_or("every keyspace".to_owned(), |k| format!("keyspace {k:?}"));
    let mut failed = Vec::new();
    for f in &flushed {
        if json {
            println!(
                "{}",
                json!({"node": f.node, "address": f.address, "keyspace": keyspace,
                       "flushed": f.result.is_ok(),
                       "error": f.result.as_ref().err().map(ToString::to_string)})
            );
        } else {
            match &f.result {
                Ok(()) => println!("{} ({}): flushed {what}", f.node, f.address),
                Err(e) => println!("{} ({}): NOT flushed: {e}", f.node, f.address),
            }
        }
        if f.result.is_err() {
            failed.push(f.node.as_str());
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("not flushed on {}", failed.join(","))
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes joined, no backtrace.
            eprintln!("cachectl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Arithmetic only: no pool to reach.
    if let Command::Plan(args) = &cli.command {
        return print_plan(args, cli.json);
    }
    if let Command::Flush(args) = &cli.command
        && !args.yes
    {
        anyhow::bail!("a flush empties the cache of every key it covers: say --yes to do it");
    }
    // The dead-letter topic is Kafka's: no pool to reach.
    if let Command::Dlq { op } = cli.command {
        return dlq::run(op, cli.brokers.as_deref(), cli.json).await;
    }
    let mut config = ClientConfig::new(cli.seeds.clone()).with_deadline(cli.deadline);
    let token = match (&cli.token, &cli.token_file) {
        (Some(token), _) => Some(token.trim().to_owned()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    if let Some(token) = token {
        config = config.with_token(cache_client::Token::new(token));
    }
    if let Some(ca) = &cli.tls_ca {
        let identity = cli.tls_cert.as_deref().zip(cli.tls_key.as_deref());
        let mut tls = cache_client::ClientTls::from_files(ca, identity)?;
        if let Some(name) = &cli.tls_domain {
            tls = tls.with_domain_name(name.clone());
        }
        config = config.with_tls(tls);
    }
    // Health asks each seed on its own, without the topology a client
    // fetches first: a node that is up but not serving must still answer.
    if matches!(cli.command, Command::Health) {
        return health(&config, cli.deadline, cli.json).await;
    }
    let client = Client::connect(config)
        .await
        .with_context(|| format!("cannot reach the pool at {}", cli.seeds.join(",")))?;
    let ks = cli.keyspace.as_str();
    match cli.command {
        Command::Kv { op } => {
            let (Some(file), Some(url)) = (&cli.keyspaces, &cli.database) else {
                anyhow::bail!("kv commands need --keyspaces FILE and --database URL");
            };
            let file = cache_client::keyspaces::KeyspacesFile::read(file)?;
            // Lazy: write-back writes and reads of the cache work while
            // PostgreSQL is down.
            let pg = cache_client::store::PgStore::connect_lazy(url)?;
            let pool = pg.clone();
            if let Some(brokers) = &cli.brokers {
                client.enable_write_back(cache_client::producer::WriteBackConfig::new(brokers))?;
            }
            client.apply_keyspaces(&file, &|name, layout| {
                Ok(Some(
                    std::sync::Arc::new(pool.clone().with_layout(name, layout)?)
                        as std::sync::Arc<dyn cache_client::store::Store>,
                ))
            })?;
            if cli.brokers.is_some() {
                client.ensure_write_back_topics().await?;
            }
            // The tables are needed unless only the cache and the broker
            // are (write-back keyspaces' tables are the worker's to create).
            let write_back = client
                .keyspace_settings(ks)
                .is_some_and(|s| s.strategy == cache_client::strategy::Strategy::WriteBack);
            if !write_back && !matches!(op, KvOp::Peek { .. }) {
                pg.migrate().await?;
            }
            let keyspace = client.keyspace(ks);
            let strategy = client
                .keyspace_settings(ks)
                .map(|s| s.strategy.to_string())
                .with_context(|| format!("keyspace {ks:?} is not in the keyspace file"))?;
            let (what, value, version): (&str, Option<String>, Option<u64>) = match op {
                KvOp::Get { key } => ("get", keyspace.get(&key).await?.map(|v| text(&v)), None),
                KvOp::Put { key, value } => {
                    let written = keyspace.put(&key, value.clone()).await?;
                    ("put", Some(value), Some(written.version))
                }
                KvOp::Del { key } => {
                    let written = keyspace.remove(&key).await?;
                    ("del", None, Some(written.version))
                }
                KvOp::Peek { key } => match client.get(ks, &key).await? {
                    Some(entry) => {
                        let value = cache_client::strategy::decode_cached(ks, &entry.value)?;
                        (
                            "cached",
                            Some(value.map_or("(absent: negative entry)".to_owned(), |v| text(&v))),
                            Some(entry.version),
                        )
                    }
                    None => ("cached", None, None),
                },
                KvOp::Stored { key } => {
                    match cache_client::store::Store::load(&pg, ks, key.as_bytes()).await? {
                        cache_client::store::Loaded::Present(row) => {
                            ("stored", Some(text(&row.value)), Some(row.version))
                        }
                        cache_client::store::Loaded::Absent { version } => {
                            ("stored", None, (version > 0).then_some(version))
                        }
                    }
                }
            };
            if cli.json {
                println!(
                    "{}",
                    json!({"op": what, "keyspace": ks, "strategy": strategy, "value": value, "version": version})
                );
            } else {
                let shown = value.unwrap_or_else(|| "(none)".to_owned());
                match version {
                    Some(v) => println!("{what} [{strategy}]: {shown}  (version {v})"),
                    None => println!("{what} [{strategy}]: {shown}"),
                }
            }
        }
        Command::Get { key } => {
            let entry = client.get(ks, &key).await?;
            let owner = client
                .owners(ks, key.as_bytes())
                .first()
                .cloned()
                .unwrap_or_default();
            match (entry, cli.json) {
                (Some(e), true) => println!(
                    "{}",
                    json!({"key": key, "found": true, "value": text(&e.value), "version": e.version,
                           "ttl_ms": e.ttl_remaining.map(|d| d.as_millis() as u64), "owner": owner})
                ),
                (None, true) => println!("{}", json!({"key": key, "found": false, "owner": owner})),
                (Some(e), false) => {
                    let ttl = e.ttl_remaining.map_or("never expires".to_owned(), |d| {
                        // Whole seconds read better; below one, milliseconds.
                        let shown = if d >= Duration::from_secs(1) {
                            Duration::from_secs(d.as_secs())
                        } else {
                            Duration::from_millis(d.as_millis() as u64)
                        };
                        format!("expires in {}", humantime::format_duration(shown))
                    });
                    println!("{}  (version {}, {ttl})", text(&e.value), e.version);
                }
                (None, false) => anyhow::bail!("{key:?} not found in keyspace {ks:?}"),
            }
        }
        Command::Set {
            key,
            value,
            version,
            ttl,
            if_absent,
            if_newer,
        } => {
            let mut options = SetOptions::new().version(version);
            if let Some(ttl) = ttl {
                options = options.ttl(ttl);
            }
            if if_absent {
                options = options.if_absent();
            }
            if if_newer {
                options = options.if_newer_version();
            }
            let outcome = client.set(ks, &key, Bytes::from(value), options).await?;
            let (word, current) = match outcome {
                SetOutcome::Stored => ("stored", version),
                SetOutcome::Exists { current_version } => ("exists", current_version),
                SetOutcome::StaleVersion { current_version } => ("stale_version", current_version),
            };
            if cli.json {
                println!(
                    "{}",
                    json!({"key": key, "outcome": word, "current_version": current})
                );
            } else {
                println!("{word} (current version {current})");
            }
            if !outcome.is_stored() && !cli.json {
                anyhow::bail!("not stored: {word}");
            }
        }
        Command::Del { key } => {
            let deleted = client.delete(ks, &key).await?;
            if cli.json {
                println!("{}", json!({"key": key, "deleted": deleted}));
            } else {
                println!("{}", if deleted { "deleted" } else { "not found" });
            }
        }
        Command::Mget { keys } => {
            let raw: Vec<Bytes> = keys.iter().map(|k| Bytes::from(k.clone())).collect();
            let entries = client.multi_get(ks, &raw).await?;
            if cli.json {
                let rows: Vec<_> = keys
                    .iter()
                    .zip(&entries)
                    .map(|(k, e)| match e {
                        Some(e) => json!({"key": k, "found": true, "value": text(&e.value), "version": e.version}),
                        None => json!({"key": k, "found": false}),
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                for (k, e) in keys.iter().zip(entries) {
                    match e {
                        Some(e) => println!("{k}\t{}\t(version {})", text(&e.value), e.version),
                        None => println!("{k}\t(miss)"),
                    }
                }
            }
        }
        Command::Stats => {
            let mut rows = Vec::new();
            let mut failures = Vec::new();
            for node in client.stats().await {
                match node.stats {
                    Ok(stats) => {
                        for k in stats.keyspaces {
                            rows.push(json!({"node": node.node, "keyspace": k.name, "hits": k.hits, "misses": k.misses,
                                "sets": k.sets, "sets_refused": k.sets_refused, "deletes": k.deletes, "evictions": k.evictions,
                                "expirations": k.expirations, "items": k.items, "bytes": k.bytes, "capacity_bytes": k.capacity_bytes}));
                        }
                    }
                    Err(e) => failures.push(json!({"node": node.node, "error": e.to_string()})),
                }
            }
            if cli.json {
                println!("{}", json!({"keyspaces": rows, "unreachable": failures}));
            } else {
                println!(
                    "{:<10} {:<12} {:>10} {:>10} {:>10} {:>10} {:>12}",
                    "NODE", "KEYSPACE", "ITEMS", "HITS", "MISSES", "EVICTIONS", "BYTES"
                );
                for r in &rows {
                    let n = |field: &str| r[field].as_u64().unwrap_or(0);
                    println!(
                        "{:<10} {:<12} {:>10} {:>10} {:>10} {:>10} {:>12}",
                        r["node"].as_str().unwrap_or(""),
                        r["keyspace"].as_str().unwrap_or(""),
                        n("items"),
                        n("hits"),
                        n("misses"),
                        n("evictions"),
                        n("bytes")
                    );
                }
                for f in &failures {
                    println!(
                        "{:<10} unreachable: {}",
                        f["node"].as_str().unwrap_or(""),
                        f["error"].as_str().unwrap_or("")
                    );
                }
            }
            if !failures.is_empty() && rows.is_empty() {
                anyhow::bail!("no node answered");
            }
        }
        Command::Health => unreachable!("`run` answers health before connecting"),
        Command::Topology => topology(&client, cli.deadline, cli.json).await,
        Command::Flush(args) => flush(&client, &args, cli.json).await?,
        Command::Dlq { .. } => unreachable!("dlq returned before connecting"),
        Command::Ring { key, sample } => {
            let topology = client.topology();
            let ring = Ring::with_vnodes(
                topology
                    .members
                    .iter()
                    .map(|m| cache_client::ring::RingNode::new(m.id.clone(), m.weight)),
                client.config().vnodes,
            );
            match (key, sample) {
                (Some(key), _) => {
                    let owners = client.owners(ks, key.as_bytes());
                    let order: Vec<&str> = ring.successors(ks, key.as_bytes()).collect();
                    if cli.json {
                        println!(
                            "{}",
                            json!({"key": key, "keyspace": ks, "hash": format!("{:016x}", Ring::key_hash(ks, key.as_bytes())), "owners": owners, "ring_order": order})
                        );
                    } else {
                        println!(
                            "{key:?} in {ks:?} hashes to {:016x}",
                            Ring::key_hash(ks, key.as_bytes())
                        );
                        println!("owners: {}", owners.join(", "));
                        println!("ring order: {}", order.join(" → "));
                    }
                }
                (None, n) => {
                    let n = n.unwrap_or(100_000);
                    let mut counts: BTreeMap<String, usize> =
                        topology.members.iter().map(|m| (m.id.clone(), 0)).collect();
                    for i in 0..n {
                        if let Some(owner) = ring.owner(ks, format!("key-{i}").as_bytes()) {
                            *counts.entry(owner.to_owned()).or_default() += 1;
                        }
                    }
                    let mean = n as f64 / counts.len().max(1) as f64;
                    if cli.json {
                        println!(
                            "{}",
                            json!({"sample": n, "keyspace": ks, "counts": counts,
                            "max_over_mean": counts.values().copied().max().unwrap_or(0) as f64 / mean})
                        );
                    } else {
                        println!(
                            "{n} sample keys in {ks:?} over {} nodes (mean {mean:.0}):",
                            counts.len()
                        );
                        for (node, count) in &counts {
                            println!(
                                "{node:<12} {count:>8}  {:>6.3} × mean",
                                *count as f64 / mean
                            );
                        }
                    }
                }
            }
        }
        Command::Plan(_) => unreachable!("plan returned before connecting"),
    }
    Ok(())
}

fn print_plan(args: &PlanArgs, json: bool) -> anyhow::Result<()> {
    let mut input = plan::Input::new(args.keys, args.value_bytes.as_u64());
    input.key_bytes = args.key_bytes.as_u64();
    input.replicas = args.replicas;
    input.reads_per_sec = args.reads;
    input.writes_per_sec = args.writes;
    input.write_back_per_sec = args.write_back_writes;
    input.node_memory_bytes = args.node_memory.as_u64();
    input.node_ops_per_sec = args.node_ops;
    input.item_overhead_bytes = args.item_overhead.as_u64();
    input.headroom = args.headroom;
    input.spare_nodes = args.spare_nodes;
    input.retention = args.retention;
    input.outage = args.outage;
    input.kafka_replication = args.kafka_replication;
    input.worker_rows_per_sec = args.worker_rows;
    let p = plan::plan(&input)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(());
    }
    let size = |bytes: u64| bytesize::ByteSize(bytes).display().iec().to_string();
    let dur =
        |d: Duration| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string();
    println!(
        "{} keys of {} + {} B, {} cop{}; {:.0} reads/s, {:.0} writes/s ({:.0} write-back)",
        input.keys,
        input.key_bytes,
        input.value_bytes,
        input.replicas,
        if input.replicas == 1 { "y" } else { "ies" },
        input.reads_per_sec,
        input.writes_per_sec,
        input.write_back_per_sec
    );
    println!(
        "nodes           {}  (set by {}: memory needs {}, throughput {}, replicas {}; plus {} spare)",
        p.nodes,
        p.limited_by,
        p.nodes_for_memory,
        p.nodes_for_throughput,
        input.replicas,
        input.spare_nodes
    );
    println!(
        "per entry       {} B of memory (key + value + {} B), charged {} B against capacity_bytes",
        p.item_bytes, input.item_overhead_bytes, p.item_charge_bytes
    );
    let dirty = if p.write_back.is_some() {
        ", with the outage's dirty entries"
    } else {
        ""
    };
    println!(
        "data            {} in all copies{dirty}",
        size(p.total_bytes)
    );
    println!(
        "requests        {:.0}/s to the nodes (reads + writes x copies)",
        p.node_requests_per_sec
    );
    println!(
        "capacity_bytes  {} per node, summed over its keyspaces",
        size(p.capacity_bytes)
    );
    for (label, load) in [("all up", &p.all_up), ("spares down", &p.degraded)] {
        println!(
            "fullest node    {:<11} ({:>3} up): {} entries, {}, {:.0} requests/s",
            label,
            load.nodes_up,
            load.items,
            size(load.memory_bytes),
            load.ops_per_sec
        );
    }
    if let Some(wb) = &p.write_back {
        println!(
            "kafka           {}/s; {} records and {} on disk at {} retention x {} replicas",
            size(wb.kafka_bytes_per_sec.ceil() as u64),
            wb.kafka_records,
            size(wb.kafka_storage_bytes),
            dur(input.retention),
            input.kafka_replication
        );
        println!(
            "partitions      {} per write-back topic (in total for several); workers {}",
            wb.partitions, wb.workers
        );
        println!(
            "outage {:<8} {} records queued; stored {} after PostgreSQL returns",
            dur(input.outage),
            wb.outage_backlog_records,
            wb.catch_up.map_or(
                "never (no spare worker throughput)".to_owned(),
                |d| format!("in {}", dur(d))
            )
        );
        println!(
            "max_dirty_bytes {} per node for that outage (the default, capacity_bytes / 4, lasts {})",
            size(wb.max_dirty_bytes),
            dur(wb.default_budget_covers)
        );
    }
    for w in &p.warnings {
        println!("warning: {w}");
    }
    Ok(())
}

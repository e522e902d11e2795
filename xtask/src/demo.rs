//! `cargo xtask demo`: a three-node ringcache cluster on this machine.
//!
//! [`run`] does the plumbing (build, configs, processes, health, teardown);
//! [`walkthrough`] is the part that shows the cluster off.

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;

use crate::{
    paths,
    process::ChildGuard,
    readiness::{Probe, free_port, wait_for_grpc_health, wait_for_tcp, wait_until},
    services::Services,
};

/// How many cache nodes the demo runs.
const NODE_COUNT: usize = 3;

/// The health service name a cache node registers for its cache service.
const NODE_HEALTH_SERVICE: &str = "ringcache.v1.CacheNode";

/// How long a node may take to report SERVING.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a node gets to drain and exit after SIGTERM before it is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Tear the cluster down right after the walkthrough instead of waiting
    /// for Ctrl-C.
    #[arg(long)]
    pub no_wait: bool,
}

/// One running cache node of the demo cluster.
#[derive(Debug)]
pub struct DemoNode {
    /// The node's `node_id`.
    pub id: String,
    /// Where it serves gRPC.
    pub addr: SocketAddr,
    /// Where it serves Prometheus metrics.
    pub metrics_addr: SocketAddr,
    /// Its TOML config.
    pub config: PathBuf,
    /// Its stdout and stderr.
    pub log: PathBuf,
    process: ChildGuard,
}

/// The demo cluster, as [`walkthrough`] sees it.
#[derive(Debug)]
pub struct DemoCluster {
    /// The nodes, in `node_id` order (`node-1`, `node-2`, ...).
    pub nodes: Vec<DemoNode>,
    /// The cluster epoch written into every node's config.
    pub epoch: u64,
    /// Where the configs and logs are.
    pub dir: PathBuf,
    /// The `cache-node` binary, to restart a node.
    pub node_binary: PathBuf,
    /// The `cachectl` binary the walkthrough drives the cluster with.
    pub cachectl: PathBuf,
    /// The write-back worker, once the walkthrough started it.
    pub worker: Option<ChildGuard>,
    /// The example HTTP service, once the walkthrough started it.
    pub service: Option<ChildGuard>,
}

/// Builds `cache-node`, starts the cluster, runs the walkthrough, then waits
/// for Ctrl-C (unless `--no-wait`) and stops the nodes.
pub async fn run(args: Args, cancel: &CancellationToken) -> Result<ExitCode> {
    let dir = paths::new_logs_dir("demo")?;
    eprintln!("xtask: demo configs and logs go to {}", dir.display());
    // PostgreSQL (and the broker) for the strategies; their `Drop` tears
    // them down with the demo.
    let services = crate::services::Services::start(&dir, cancel).await?;
    run_with(args, &services, &dir, cancel).await
}

/// The demo against services that are already running (`cargo xtask test`
/// reuses its own).
pub async fn run_with(
    args: Args,
    services: &crate::services::Services,
    dir: &Path,
    cancel: &CancellationToken,
) -> Result<ExitCode> {
    let binary = build_node(cancel).await?;
    let mut cluster = start_cluster(&binary, dir, cancel).await?;

    let walked = walkthrough(&mut cluster, services, cancel).await;
    if walked.is_ok() && !args.no_wait && !cancel.is_cancelled() {
        eprintln!("xtask: the cluster is running; press Ctrl-C to stop it");
        cancel.cancelled().await;
    }
    let stopped = stop_cluster(&mut cluster).await;
    walked.context("the walkthrough failed")?;
    stopped?;
    Ok(ExitCode::SUCCESS)
}

/// `cargo build` of `cache-node`, `cachectl`, the worker and the example
/// service, returning the node binary's path (cachectl and the worker lie
/// beside it, the example in `examples/`).
async fn build_node(cancel: &CancellationToken) -> Result<PathBuf> {
    let mut build = paths::cargo();
    build
        .args([
            "build",
            "--bin",
            "cache-node",
            "--bin",
            "cachectl",
            "--bin",
            "write-back-worker",
            "--example",
            "kv-service",
            "--features",
            "cache-client/cli",
        ])
        .current_dir(paths::workspace_root());
    let mut child = ChildGuard::spawn("cargo build", &mut build, None)?;
    let status = tokio::select! {
        status = child.wait() => status?,
        _ = cancel.cancelled() => bail!("interrupted while building cache-node"),
    };
    if !status.success() {
        bail!("cargo build of cache-node and cachectl failed ({status})");
    }
    Ok(paths::target_dir().join("debug").join("cache-node"))
}

/// Writes the configs, spawns the nodes and waits until each is healthy.
async fn start_cluster(
    binary: &Path,
    dir: &Path,
    cancel: &CancellationToken,
) -> Result<DemoCluster> {
    let epoch = 1;
    let mut members = Vec::with_capacity(NODE_COUNT);
    for i in 1..=NODE_COUNT {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        members.push((format!("node-{i}"), addr, metrics_addr));
    }

    let mut nodes = Vec::with_capacity(NODE_COUNT);
    for (id, addr, metrics_addr) in &members {
        let config = dir.join(format!("{id}.toml"));
        fs::write(
            &config,
            node_config(id, *addr, *metrics_addr, epoch, &members),
        )
        .with_context(|| format!("failed to write {}", config.display()))?;
        let log = dir.join(format!("{id}.log"));
        let process = spawn_node(binary, id, &config, &log)?;
        nodes.push(DemoNode {
            id: id.clone(),
            addr: *addr,
            metrics_addr: *metrics_addr,
            config,
            log,
            process,
        });
    }
    // All nodes start before any is waited for, so their start-ups overlap.
    for node in &mut nodes {
        wait_healthy(node, cancel).await?;
    }
    Ok(DemoCluster {
        nodes,
        epoch,
        dir: dir.to_path_buf(),
        node_binary: binary.to_path_buf(),
        cachectl: binary.with_file_name("cachectl"),
        worker: None,
        service: None,
    })
}

fn spawn_node(binary: &Path, id: &str, config: &Path, log: &Path) -> Result<ChildGuard> {
    let mut command = Command::new(binary);
    command.arg("--config").arg(config).env("NO_COLOR", "1");
    ChildGuard::spawn(id.to_owned(), &mut command, Some(log))
}

async fn wait_healthy(node: &mut DemoNode, cancel: &CancellationToken) -> Result<()> {
    wait_for_grpc_health(
        node.addr,
        NODE_HEALTH_SERVICE,
        HEALTH_TIMEOUT,
        cancel,
        Some(&mut node.process),
    )
    .await
    .with_context(|| format!("{} did not become healthy", node.id))?;
    eprintln!("xtask: {} is serving on {}", node.id, node.addr);
    Ok(())
}

/// Runs `cachectl` against the demo cluster, echoing the command line and
/// its output the way a user would see them.
struct Ctl<'a> {
    binary: &'a Path,
    seeds: String,
    keyspaces: String,
    database: String,
    brokers: String,
}

impl Ctl<'_> {
    fn output(&self, args: &[&str]) -> Result<(bool, String)> {
        let output = Command::new(self.binary)
            .arg("--seeds")
            .arg(&self.seeds)
            .env("RINGCACHE_KEYSPACES", &self.keyspaces)
            .env("RINGCACHE_DATABASE_URL", &self.database)
            .env("RINGCACHE_KAFKA_BROKERS", &self.brokers)
            .args(args)
            .output()
            .with_context(|| format!("failed to run {}", self.binary.display()))?;
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        Ok((output.status.success(), text.trim_end().to_owned()))
    }

    /// Runs and shows a command; it must succeed.
    fn show(&self, args: &[&str]) -> Result<String> {
        println!("  $ cachectl {}", args.join(" "));
        let (ok, text) = self.output(args)?;
        for line in text.lines() {
            println!("    {line}");
        }
        if !ok {
            bail!("cachectl {} failed: {text}", args.join(" "));
        }
        Ok(text)
    }

    /// Runs a command with `--json` without showing it, and parses the
    /// reply: the walkthrough checks what it narrates.
    fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let (ok, text) = self.output(&all)?;
        if !ok {
            bail!("cachectl {} failed: {text}", all.join(" "));
        }
        serde_json::from_str(&text).with_context(|| format!("cachectl printed no JSON: {text}"))
    }
}

fn step(title: &str) {
    println!("\n== {title}");
}

/// The walkthrough: what the demo shows once all nodes are healthy. Every
/// claim it prints is checked, so the suite (which runs `demo --no-wait`)
/// fails when the demo stops telling the truth.
pub async fn walkthrough(
    cluster: &mut DemoCluster,
    services: &Services,
    cancel: &CancellationToken,
) -> Result<()> {
    let database = services.postgres.url();
    let brokers = services.broker.brokers();
    let seeds: Vec<String> = cluster.nodes.iter().map(|n| n.addr.to_string()).collect();
    let keyspaces = cluster.dir.join("keyspaces.toml");
    fs::write(&keyspaces, KEYSPACES)
        .with_context(|| format!("failed to write {}", keyspaces.display()))?;
    let cachectl = cluster.cachectl.clone();
    let ctl = Ctl {
        binary: &cachectl,
        seeds: seeds.join(","),
        keyspaces: keyspaces.display().to_string(),
        database: database.clone(),
        brokers: brokers.clone(),
    };
    println!(
        "ringcache demo: {} cache nodes (epoch {})",
        cluster.nodes.len(),
        cluster.epoch
    );
    for node in &cluster.nodes {
        println!(
            "  {:<8} grpc {}  metrics http://{}/metrics  log {}",
            node.id,
            node.addr,
            node.metrics_addr,
            node.log.display()
        );
    }

    step("1. The client learns the pool from any node");
    ctl.show(&["topology"])?;

    step("2. Keys land on different nodes, placed by the consistent-hash ring");
    let keys: Vec<String> = (1..=6).map(|i| format!("user:{i}")).collect();
    let mut owners = std::collections::BTreeMap::new();
    for key in &keys {
        ctl.show(&["set", key, &format!("profile of {key}"), "--version", "1"])?;
        let placed = ctl.json(&["ring", key])?;
        let owner = placed["owners"][0]
            .as_str()
            .context("cachectl ring names an owner")?
            .to_owned();
        owners.insert(key.clone(), owner);
    }
    for (key, owner) in &owners {
        println!("  {key} lives on {owner}");
    }
    let distinct: std::collections::BTreeSet<_> = owners.values().collect();
    if distinct.len() < 2 {
        bail!("six keys all landed on one node: {owners:?}");
    }
    ctl.show(&["stats"])?;
    let stats = ctl.json(&["stats"])?;
    let items: u64 = stats["keyspaces"]
        .as_array()
        .context("stats lists keyspaces")?
        .iter()
        .filter_map(|k| k["items"].as_u64())
        .sum();
    if items != keys.len() as u64 {
        bail!("the nodes hold {items} items, not {}", keys.len());
    }

    step("3. Entries expire with their TTL");
    ctl.show(&["set", "session:42", "token-abc", "--ttl", "2s"])?;
    ctl.show(&["get", "session:42"])?;
    let written = std::time::Instant::now();
    println!("  (waiting for the TTL to run out)");
    loop {
        let reply = ctl.json(&["get", "session:42"])?;
        if reply["found"] == serde_json::Value::Bool(false) {
            break;
        }
        if written.elapsed() > Duration::from_secs(20) || cancel.is_cancelled() {
            bail!("session:42 outlived its 2 s TTL");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("  gone after {:.1} s:", written.elapsed().as_secs_f64());
    let (_, miss) = ctl.output(&["get", "session:42"])?;
    println!("  $ cachectl get session:42\n    {miss}");

    step("4. A version-fenced write older than the stored version is refused");
    ctl.show(&["set", "price:widget", "100", "--version", "5"])?;
    println!("  a late writer tries to store version 4:");
    ctl.show(&[
        "--json",
        "set",
        "price:widget",
        "90",
        "--version",
        "4",
        "--if-newer",
    ])?;
    let refused = ctl.json(&["set", "price:widget", "90", "--version", "4", "--if-newer"])?;
    if refused["outcome"] != "stale_version" || refused["current_version"] != 5 {
        bail!("the fenced write was not refused: {refused}");
    }
    ctl.show(&["get", "price:widget"])?;

    step("5. A node dies; traffic continues on the others");
    let victim_id = owners["user:1"].clone();
    let victim = cluster
        .nodes
        .iter_mut()
        .find(|n| n.id == victim_id)
        .context("the owner of user:1 is a demo node")?;
    println!("  kill -9 {} (it owns user:1)", victim.id);
    victim.process.signal(Signal::SIGKILL)?;
    victim.process.wait().await?;
    for key in &keys {
        ctl.show(&["get", key]).or_else(|e| {
            // A miss is fine (the dead node held the key); an error is not.
            if e.to_string().contains("not found") {
                Ok(String::new())
            } else {
                Err(e)
            }
        })?;
    }
    println!("  keys of the dead node miss; writes to them go to the next node on the ring,");
    println!("  capped at the client's fallback TTL (10 s) so the copy cannot outlive the outage:");
    ctl.show(&[
        "set",
        "user:1",
        "written while its owner is down",
        "--version",
        "2",
    ])?;
    ctl.show(&["get", "user:1"])?;
    println!("  restarting {}", victim.id);
    victim.process = spawn_node(
        &cluster.node_binary,
        &victim.id,
        &victim.config,
        &victim.log,
    )?;
    wait_healthy(victim, cancel).await?;
    ctl.show(&["topology"])?;

    strategies(&ctl)?;
    write_back(cluster, &ctl, services, cancel).await?;
    service(cluster, services, &keyspaces, cancel).await?;
    println!("\nlogs and configs: {}", cluster.dir.display());
    Ok(())
}

/// The keyspace file of the demo: one keyspace per strategy.
const KEYSPACES: &str = r#"# One keyspace per caching strategy, shared by cachectl and the services.
[keyspaces.profiles]
strategy = "cache-aside"
ttl = "10m"

[keyspaces.catalog]
strategy = "read-through"
ttl = "10m"
ttl_jitter = 0.1
negative_ttl = "1m"

[keyspaces.docs]
strategy = "write-around"
ttl = "10m"

[keyspaces.accounts]
strategy = "write-through"
ttl = "10m"

[keyspaces.orders]
strategy = "write-back"
ttl = "10m"
"#;

/// Step 6: each strategy against PostgreSQL, with `cachectl kv` (through the
/// strategy), `kv peek` (what the cache holds) and `kv stored` (what the
/// database holds).
fn strategies(ctl: &Ctl<'_>) -> Result<()> {
    let value = |args: &[&str]| -> Result<Option<String>> {
        let reply = ctl.json(args)?;
        Ok(reply["value"].as_str().map(str::to_owned))
    };
    let expect = |what: &str, got: Option<String>, want: Option<&str>| -> Result<()> {
        if got.as_deref() != want {
            bail!("{what}: expected {want:?}, got {got:?}");
        }
        Ok(())
    };

    step("6a. write-through: the cache and PostgreSQL are updated together (two-phase commit)");
    ctl.show(&["-k", "accounts", "kv", "put", "alice", "balance=100"])?;
    ctl.show(&["-k", "accounts", "kv", "peek", "alice"])?;
    ctl.show(&["-k", "accounts", "kv", "stored", "alice"])?;
    expect(
        "cached after write-through",
        value(&["-k", "accounts", "kv", "peek", "alice"])?,
        Some("balance=100"),
    )?;
    expect(
        "stored after write-through",
        value(&["-k", "accounts", "kv", "stored", "alice"])?,
        Some("balance=100"),
    )?;

    step("6b. write-around: the write goes to PostgreSQL and deletes the cached copy");
    ctl.show(&["-k", "docs", "kv", "put", "readme", "v1"])?;
    ctl.show(&["-k", "docs", "kv", "get", "readme"])?;
    println!("  the read loaded it from PostgreSQL and filled the cache under a lease:");
    ctl.show(&["-k", "docs", "kv", "peek", "readme"])?;
    expect(
        "filled after the read",
        value(&["-k", "docs", "kv", "peek", "readme"])?,
        Some("v1"),
    )?;
    ctl.show(&["-k", "docs", "kv", "put", "readme", "v2"])?;
    println!("  the write invalidated the cached v1:");
    ctl.show(&["-k", "docs", "kv", "peek", "readme"])?;
    expect(
        "invalidated after the write",
        value(&["-k", "docs", "kv", "peek", "readme"])?,
        None,
    )?;
    ctl.show(&["-k", "docs", "kv", "get", "readme"])?;
    expect(
        "read after the write",
        value(&["-k", "docs", "kv", "get", "readme"])?,
        Some("v2"),
    )?;

    step("6c. read-through: a miss loads from PostgreSQL; a missing row is cached as absent");
    ctl.show(&["-k", "catalog", "kv", "get", "widget"])?;
    ctl.show(&["-k", "catalog", "kv", "peek", "widget"])?;
    expect(
        "negative entry",
        value(&["-k", "catalog", "kv", "peek", "widget"])?,
        Some("(absent: negative entry)"),
    )?;
    ctl.show(&["-k", "catalog", "kv", "put", "widget", "price=7"])?;
    ctl.show(&["-k", "catalog", "kv", "get", "widget"])?;
    expect(
        "read-through after the write",
        value(&["-k", "catalog", "kv", "get", "widget"])?,
        Some("price=7"),
    )?;

    step(
        "6d. cache-aside: the application writes its database, then invalidates; reads fill under a lease",
    );
    ctl.show(&["-k", "profiles", "kv", "put", "ada", "Ada Lovelace"])?;
    ctl.show(&["-k", "profiles", "kv", "peek", "ada"])?;
    ctl.show(&["-k", "profiles", "kv", "get", "ada"])?;
    ctl.show(&["-k", "profiles", "kv", "peek", "ada"])?;
    expect(
        "cache-aside fill",
        value(&["-k", "profiles", "kv", "peek", "ada"])?,
        Some("Ada Lovelace"),
    )?;
    Ok(())
}

/// How long the write-back worker may take to store a write (its group join
/// included) before the demo gives up.
const WRITE_BACK_TIMEOUT: Duration = Duration::from_secs(60);

/// Steps 7 to 9: write-back through the broker and the worker, with
/// PostgreSQL stopped for a while.
async fn write_back(
    cluster: &mut DemoCluster,
    ctl: &Ctl<'_>,
    services: &Services,
    cancel: &CancellationToken,
) -> Result<()> {
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let seeds: Vec<String> = cluster.nodes.iter().map(|n| n.addr.to_string()).collect();
    let log = cluster.dir.join("write-back-worker.log");
    let mut command = Command::new(cluster.node_binary.with_file_name("write-back-worker"));
    command
        .arg("--brokers")
        .arg(services.broker.brokers())
        .arg("--database-url")
        .arg(services.postgres.url())
        .args(["--group", "ringcache-demo", "--keyspaces", "orders"])
        .arg("--cache-seeds")
        .arg(seeds.join(","))
        .arg("--metrics-listen")
        .arg(metrics.to_string())
        .env("NO_COLOR", "1");
    let worker = cluster.worker.insert(ChildGuard::spawn(
        "write-back-worker",
        &mut command,
        Some(&log),
    )?);
    wait_for_tcp(metrics, HEALTH_TIMEOUT, cancel, Some(worker)).await?;
    println!(
        "\n  write-back-worker: metrics http://{metrics}/metrics  log {}",
        log.display()
    );

    step("7. write-back: the write lands in the cache and on Kafka; the worker stores it later");
    ctl.show(&["-k", "orders", "kv", "put", "order:1", "2 books"])?;
    ctl.show(&["-k", "orders", "kv", "peek", "order:1"])?;
    wait_stored(ctl, "order:1", "2 books", cancel, cluster.worker.as_mut()).await?;
    println!("  the worker stored it in PostgreSQL:");
    ctl.show(&["-k", "orders", "kv", "stored", "order:1"])?;

    step("8. PostgreSQL stops; write-back writes and reads go on");
    tokio::task::block_in_place(|| services.postgres.stop(cancel))?;
    println!("  (PostgreSQL is stopped)");
    ctl.show(&["-k", "orders", "kv", "put", "order:2", "1 lamp"])?;
    ctl.show(&["-k", "orders", "kv", "get", "order:2"])?;
    let read = ctl.json(&["-k", "orders", "kv", "get", "order:2"])?;
    if read["value"].as_str() != Some("1 lamp") {
        bail!("read-your-writes while PostgreSQL is down: got {read}");
    }
    println!("  $ cachectl -k orders kv stored order:2");
    let (ok, text) = ctl.output(&["-k", "orders", "kv", "stored", "order:2"])?;
    for line in text.lines() {
        println!("    {line}");
    }
    if ok {
        bail!("reading PostgreSQL succeeded while it was stopped: {text}");
    }
    // The worker holds the write and retries; its metrics say how old the
    // oldest write it could not store yet is.
    wait_until(
        "the worker to report an unstored write",
        WRITE_BACK_TIMEOUT,
        cancel,
        cluster.worker.as_mut(),
        || async {
            let text = scrape(metrics).await?;
            let oldest = metric(&text, "ringcache_wb_oldest_unstored_seconds");
            let retries = metric(&text, "ringcache_wb_retries_total");
            Ok(match (oldest, retries) {
                (Some(oldest), Some(retries)) if oldest > 0.0 && retries > 0.0 => Probe::Ready,
                _ => Probe::NotYet(format!("oldest {oldest:?}, retries {retries:?}")),
            })
        },
    )
    .await?;
    let text = scrape(metrics).await?;
    println!(
        "  the worker holds it and retries: ringcache_wb_oldest_unstored_seconds {:.1}, ringcache_wb_retries_total {}",
        metric(&text, "ringcache_wb_oldest_unstored_seconds").unwrap_or_default(),
        metric(&text, "ringcache_wb_retries_total").unwrap_or_default()
    );

    step("9. PostgreSQL is back; the worker catches up");
    tokio::task::block_in_place(|| services.postgres.start_again(cancel))?;
    println!("  (PostgreSQL is running again)");
    wait_stored(ctl, "order:2", "1 lamp", cancel, cluster.worker.as_mut()).await?;
    ctl.show(&["-k", "orders", "kv", "stored", "order:2"])?;
    wait_until(
        "the worker to report nothing unstored",
        WRITE_BACK_TIMEOUT,
        cancel,
        cluster.worker.as_mut(),
        || async {
            let text = scrape(metrics).await?;
            Ok(
                match metric(&text, "ringcache_wb_oldest_unstored_seconds") {
                    Some(0.0) => Probe::Ready,
                    other => Probe::NotYet(format!("oldest unstored {other:?}")),
                },
            )
        },
    )
    .await?;
    println!("  caught up: ringcache_wb_oldest_unstored_seconds 0");
    Ok(())
}

/// Step 10: the example HTTP service (`cache-client/examples/kv-service.rs`),
/// a service that links the client, started beside the cluster with the
/// same keyspace file; it keeps running while the demo waits for Ctrl-C.
async fn service(
    cluster: &mut DemoCluster,
    services: &Services,
    keyspaces: &Path,
    cancel: &CancellationToken,
) -> Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let seeds: Vec<String> = cluster.nodes.iter().map(|n| n.addr.to_string()).collect();
    let log = cluster.dir.join("kv-service.log");
    let binary = paths::target_dir()
        .join("debug")
        .join("examples")
        .join("kv-service");
    let mut command = Command::new(binary);
    command
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--seeds")
        .arg(seeds.join(","))
        .arg("--keyspaces")
        .arg(keyspaces)
        .arg("--database-url")
        .arg(services.postgres.url())
        .arg("--brokers")
        .arg(services.broker.brokers())
        .env("NO_COLOR", "1");
    let service =
        cluster
            .service
            .insert(ChildGuard::spawn("kv-service", &mut command, Some(&log))?);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let base = format!("http://{addr}");
    wait_until(
        "kv-service to answer /healthz",
        HEALTH_TIMEOUT,
        cancel,
        Some(service),
        || async {
            Ok(match http.get(format!("{base}/healthz")).send().await {
                Ok(reply) if reply.status().is_success() => Probe::Ready,
                Ok(reply) => Probe::NotYet(format!("/healthz answered {}", reply.status())),
                Err(e) => Probe::NotYet(e.to_string()),
            })
        },
    )
    .await?;

    step("10. A service links the client: kv-service, an HTTP API over the same keyspaces");
    println!("  kv-service: http://{addr}  log {}", log.display());
    let request = |method: reqwest::Method, path: &str, body: Option<&str>| {
        let mut shown = format!("curl -X {method} {base}{path}");
        let mut request = http.request(method, format!("{base}{path}"));
        if let Some(body) = body {
            let _ = write!(shown, " -d '{body}'");
            request = request.body(body.to_owned());
        }
        async move {
            println!("  $ {shown}");
            let reply = request.send().await.with_context(|| shown.clone())?;
            let status = reply.status();
            let text = reply.text().await?;
            for line in text.trim_end().lines() {
                println!("    {line}");
            }
            Ok::<_, anyhow::Error>((status.as_u16(), text))
        }
    };
    let (status, text) = request(
        reqwest::Method::PUT,
        "/kv/accounts/bob",
        Some("balance=250"),
    )
    .await?;
    if status != 200 || !text.contains("\"applied\":true") {
        bail!("PUT /kv/accounts/bob answered {status} {text}");
    }
    let (status, text) = request(reqwest::Method::GET, "/kv/accounts/bob", None).await?;
    if status != 200 || text != "balance=250" {
        bail!("GET /kv/accounts/bob answered {status} {text:?}");
    }
    println!("  what cachectl wrote in step 6c, read through the service's client:");
    let (status, text) = request(reqwest::Method::GET, "/kv/catalog/widget", None).await?;
    if status != 200 || text != "price=7" {
        bail!("GET /kv/catalog/widget answered {status} {text:?}");
    }
    println!("  the client's metrics, in the service's own registry (a few lines):");
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    println!("  $ curl {base}/metrics | grep ...");
    let shown: Vec<&str> = metrics
        .lines()
        .filter(|line| {
            line.starts_with("ringcache_client_operations_total{")
                || line.starts_with("ringcache_client_hits_total{")
                || line.starts_with("ringcache_client_twopc_commits_total{")
        })
        .collect();
    for line in &shown {
        println!("    {line}");
    }
    if !shown
        .iter()
        .any(|l| l.contains("keyspace=\"accounts\"") && l.contains("op=\"put\""))
    {
        bail!("the service's /metrics lacks the client's put on accounts:\n{metrics}");
    }
    Ok(())
}

/// Waits until PostgreSQL holds `value` for `key` of `orders`.
async fn wait_stored(
    ctl: &Ctl<'_>,
    key: &str,
    value: &str,
    cancel: &CancellationToken,
    worker: Option<&mut ChildGuard>,
) -> Result<()> {
    let started = std::time::Instant::now();
    wait_until(
        &format!("the worker to store {key}"),
        WRITE_BACK_TIMEOUT,
        cancel,
        worker,
        || async {
            let (ok, text) = ctl.output(&["--json", "-k", "orders", "kv", "stored", key])?;
            let stored = ok
                .then(|| serde_json::from_str::<serde_json::Value>(&text).ok())
                .flatten()
                .and_then(|v| v["value"].as_str().map(str::to_owned));
            Ok(if stored.as_deref() == Some(value) {
                Probe::Ready
            } else {
                Probe::NotYet(format!("stored {stored:?}"))
            })
        },
    )
    .await?;
    println!("  (stored after {:.1} s)", started.elapsed().as_secs_f64());
    Ok(())
}

/// The body of `GET /metrics` at `addr`.
async fn scrape(addr: SocketAddr) -> Result<String> {
    let url = format!("http://{addr}/metrics");
    let reply = reqwest::get(&url)
        .await
        .with_context(|| format!("cannot scrape {url}"))?;
    Ok(reply.text().await?)
}

/// The value of an unlabelled sample `name` in a Prometheus exposition.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .find_map(|value| value.trim().parse().ok())
}

/// SIGTERMs every node, then waits for each; a node that does not exit 0
/// (or has to be killed) is reported as an error.
async fn stop_cluster(cluster: &mut DemoCluster) -> Result<()> {
    let mut failures = Vec::new();
    if let Some(service) = &mut cluster.service {
        // First: it is a client of everything else.
        let status = service.stop(Signal::SIGTERM, SHUTDOWN_GRACE).await?;
        if !status.success() {
            failures.push(format!("kv-service exited with {status}"));
        }
    }
    if let Some(worker) = &mut cluster.worker {
        // First, so that it drains while the nodes it tells are up.
        let status = worker.stop(Signal::SIGTERM, SHUTDOWN_GRACE).await?;
        if !status.success() {
            failures.push(format!("the write-back worker exited with {status}"));
        }
    }
    for node in &mut cluster.nodes {
        node.process.signal(Signal::SIGTERM)?;
    }
    // One SIGTERM each, sent to all nodes first so that they drain in
    // parallel; a second SIGTERM could read as "hurry up" to a node.
    for node in &mut cluster.nodes {
        let status = match node.process.wait_timeout(SHUTDOWN_GRACE).await? {
            Some(status) => status,
            None => {
                eprintln!(
                    "xtask: {} still running {SHUTDOWN_GRACE:?} after SIGTERM, killing it",
                    node.id
                );
                node.process.signal(Signal::SIGKILL)?;
                node.process.wait().await?
            }
        };
        if !status.success() {
            failures.push(format!(
                "{} exited with {status} (log: {})",
                node.id,
                node.log.display()
            ));
        }
    }
    if failures.is_empty() {
        eprintln!("xtask: all nodes stopped");
        Ok(())
    } else {
        bail!("not all nodes shut down cleanly: {}", failures.join("; "))
    }
}

/// The TOML config of one node; see `cache-node`'s `Config`.
fn node_config(
    id: &str,
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    epoch: u64,
    members: &[(String, SocketAddr, SocketAddr)],
) -> String {
    let mut toml = format!(
        "node_id = \"{id}\"\n\
         listen = \"{addr}\"\n\
         metrics_listen = \"{metrics_addr}\"\n\
         \n\
         unknown_keyspaces = \"create\"\n\
         \n\
         [keyspaces.default]\n\
         capacity_bytes = 67108864\n\
         default_ttl = \"1h\"\n\
         \n\
         [cluster]\n\
         epoch = {epoch}\n\
         members = [\n"
    );
    for (member, member_addr, _) in members {
        // Writing to a String cannot fail.
        let _ = writeln!(
            toml,
            "  {{ id = \"{member}\", address = \"{member_addr}\" }},"
        );
    }
    toml.push_str("]\n");
    toml
}

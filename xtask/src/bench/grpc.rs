//! The `grpc` suite: what the cache costs over its transport.
//!
//! A cache node and `grpc-baseline` (the same `ringcache.v1.CacheNode`
//! service answering a fixed 100-byte entry without touching a cache) run
//! side by side, pinned to the server CPU; `cache-bench`, pinned to the
//! other, drives both the same way: through `cache_client::Client` (the
//! path a service takes: ring routing, the routing engine, one HTTP/2
//! channel), read-only, with the same keys and clients. Runs alternate
//! between the two servers and the tables show medians. The same pair is
//! measured with `MultiGet` of 16 keys, to compare keys/s with single
//! `Get`s.
//!
//! Beside throughput, each row shows the server's CPU time per request
//! (user + system from `/proc`, over every request of the run: preload,
//! warm-up and measured phase), which says what the handler costs even when
//! the load generator, not the server, limits the throughput.
//!
//! The helpers that start servers pinned to a CPU and run `cache-bench` are
//! shared with the `cluster` suite.

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use serde_json::Value;

use super::{Ctx, require};
use crate::{
    paths,
    process::ChildGuard,
    readiness::{free_port, wait_for_grpc_health, wait_for_tcp},
};

/// The health service name of the `CacheNode` service (node and baseline).
const CACHE_NODE_SERVICE: &str = "ringcache.v1.CacheNode";
/// How long a server may take to start serving.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server gets to drain and exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// The kernel's clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`,
/// 100 on every Linux architecture the project runs on).
const USER_HZ: f64 = 100.0;

/// Keys per `MultiGet` in this suite.
const BATCH: usize = 16;

/// A server under test, pinned to a CPU; killed on drop.
pub(super) struct Server {
    pub name: String,
    pub addr: SocketAddr,
    process: ChildGuard,
}

impl Server {
    /// Starts `program args` pinned to `cpu` (`taskset -c`), its output in
    /// `<logs>/<name>.log`.
    fn spawn(
        ctx: &Ctx,
        name: &str,
        addr: SocketAddr,
        program: &Path,
        args: &[String],
    ) -> Result<Self> {
        let (cpu, _) = ctx.cpus();
        let mut command = pinned(cpu, program)?;
        command.args(args).env("NO_COLOR", "1");
        let log = ctx.logs.join(format!("{name}.log"));
        let process = ChildGuard::spawn(name, &mut command, Some(&log))?;
        Ok(Self {
            name: name.to_owned(),
            addr,
            process,
        })
    }

    /// User + system CPU time the server has used so far (all its threads).
    pub fn cpu_time(&self) -> Result<Duration> {
        let path = format!("/proc/{}/stat", self.process.id());
        let stat = fs::read_to_string(&path).with_context(|| format!("failed to read {path}"))?;
        // Fields after the command name (which may hold spaces, so split at
        // the last parenthesis): state is field 3, utime 14, stime 15.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .with_context(|| format!("unexpected {path}: {stat}"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> Result<f64> {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .with_context(|| format!("unexpected {path}: {stat}"))
        };
        let seconds = (ticks(11)? + ticks(12)?) / USER_HZ;
        Ok(Duration::from_secs_f64(seconds))
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn stop(mut self) -> Result<()> {
        let status = self.process.stop(Signal::SIGTERM, STOP_GRACE).await?;
        if !status.success() {
            bail!(
                "{} exited with {status} (log: {})",
                self.name,
                self.process
                    .log()
                    .map_or_else(String::new, |l| l.display().to_string())
            );
        }
        Ok(())
    }
}

/// `taskset -c CPU program`.
fn pinned(cpu: usize, program: &Path) -> Result<Command> {
    let taskset = paths::find_on_path("taskset")
        .context("taskset (util-linux) is needed to pin the benchmarks to CPUs")?;
    let mut command = Command::new(taskset);
    command
        .arg("-c")
        .arg(cpu.to_string())
        .arg(require(program)?);
    Ok(command)
}

fn loopback() -> Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

/// A cache node's listeners.
pub(super) struct NodeAddrs {
    pub id: String,
    pub grpc: SocketAddr,
    pub resp: Option<SocketAddr>,
}

impl NodeAddrs {
    /// Free loopback addresses for node `id`, with a RESP listener if
    /// `resp`.
    pub fn new(id: &str, resp: bool) -> Result<Self> {
        Ok(Self {
            id: id.to_owned(),
            grpc: loopback()?,
            resp: if resp { Some(loopback()?) } else { None },
        })
    }
}

/// Starts cache nodes (a cluster of `nodes`, each reporting all of them
/// in its topology) and waits until each serves.
pub(super) async fn start_nodes(ctx: &Ctx, nodes: &[NodeAddrs]) -> Result<Vec<Server>> {
    let mut servers = Vec::with_capacity(nodes.len());
    for node in nodes {
        let config = ctx.logs.join(format!("{}.toml", node.id));
        fs::write(&config, node_config(node, nodes)?)
            .with_context(|| format!("failed to write {}", config.display()))?;
        let args = vec!["--config".to_owned(), config.display().to_string()];
        servers.push(Server::spawn(
            ctx,
            &node.id,
            node.grpc,
            &ctx.bin("cache-node"),
            &args,
        )?);
    }
    // All start before any is waited for, so their start-ups overlap.
    for server in &mut servers {
        wait_for_grpc_health(
            server.addr,
            CACHE_NODE_SERVICE,
            START_TIMEOUT,
            &ctx.cancel,
            Some(&mut server.process),
        )
        .await
        .with_context(|| format!("{} did not start", server.name))?;
    }
    Ok(servers)
}

/// A node's TOML config: the `default` keyspace large enough for every key
/// of the suites, without TTL.
fn node_config(node: &NodeAddrs, members: &[NodeAddrs]) -> Result<String> {
    let mut toml = String::new();
    writeln!(toml, "node_id = \"{}\"", node.id)?;
    writeln!(toml, "listen = \"{}\"", node.grpc)?;
    writeln!(toml, "metrics_listen = \"{}\"", loopback()?)?;
    if let Some(resp) = node.resp {
        writeln!(toml, "resp_listen = \"{resp}\"")?;
    }
    writeln!(toml, "\n[keyspaces.default]\ncapacity_bytes = 268435456")?;
    writeln!(toml, "\n[cluster]\nepoch = 1\nmembers = [")?;
    for member in members {
        writeln!(
            toml,
            "  {{ id = \"{}\", address = \"{}\" }},",
            member.id, member.grpc
        )?;
    }
    writeln!(toml, "]")?;
    Ok(toml)
}

/// Starts `grpc-baseline` and waits until it serves.
async fn start_baseline(ctx: &Ctx, value_size: usize) -> Result<Server> {
    let addr = loopback()?;
    let args = vec![
        "--listen".to_owned(),
        addr.to_string(),
        "--value-size".to_owned(),
        value_size.to_string(),
    ];
    let mut server = Server::spawn(ctx, "grpc-baseline", addr, &ctx.bin("grpc-baseline"), &args)?;
    wait_for_grpc_health(
        addr,
        CACHE_NODE_SERVICE,
        START_TIMEOUT,
        &ctx.cancel,
        Some(&mut server.process),
    )
    .await
    .context("grpc-baseline did not start")?;
    Ok(server)
}

/// Starts a `redis-server` (Debian's) without persistence and waits until
/// it accepts connections.
pub(super) async fn start_redis(ctx: &Ctx, name: &str) -> Result<Server> {
    let addr = loopback()?;
    let redis = paths::find_on_path("redis-server").context("redis-server is not installed")?;
    let args: Vec<String> = [
        "--port",
        &addr.port().to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let mut server = Server::spawn(ctx, name, addr, &redis, &args)?;
    wait_for_tcp(addr, START_TIMEOUT, &ctx.cancel, Some(&mut server.process))
        .await
        .with_context(|| format!("{name} did not start"))?;
    Ok(server)
}

/// Stops every server; the first failure is returned after all were
/// stopped.
pub(super) async fn stop_all(servers: Vec<Server>) -> Result<()> {
    let mut first = Ok(());
    for server in servers {
        let result = server.stop().await;
        if first.is_ok() {
            first = result;
        }
    }
    first
}

/// The load `cache-bench` offers (closed loop, preloaded keys).
#[derive(Clone, Debug)]
pub(super) struct Load {
    pub clients: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub keys: u64,
    pub value_size: usize,
    pub read_ratio: f64,
    pub batch: usize,
}

impl Load {
    /// The suites' common load: 16 clients, 10,000 keys (Zipf 0.99), 100-byte
    /// values, 10 s measured after 2 s of warm-up (2 s after 1 s with
    /// `--quick`).
    pub fn standard(ctx: &Ctx, read_ratio: f64) -> Self {
        Self {
            clients: 16,
            duration: Duration::from_secs(if ctx.quick { 2 } else { 10 }),
            warmup: Duration::from_secs(if ctx.quick { 1 } else { 2 }),
            keys: 10_000,
            value_size: 100,
            read_ratio,
            batch: 1,
        }
    }

    /// A description for the tables' captions.
    pub fn describe(&self) -> String {
        format!(
            "{} clients (closed loop), {} keys (Zipf 0.99, preloaded), {}-byte values, {:.0}% reads, {} s measured after {} s of warm-up",
            self.clients,
            self.keys,
            self.value_size,
            self.read_ratio * 100.0,
            self.duration.as_secs(),
            self.warmup.as_secs()
        )
    }
}

/// One `cache-bench` run's figures.
#[derive(Clone, Debug)]
pub(super) struct Measured {
    pub ops_per_sec: f64,
    pub keys_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Server CPU time per request, in microseconds.
    pub cpu_us_per_request: f64,
    /// Server CPU time over the run's wall time, in cores.
    pub cpu_cores: f64,
}

/// Runs `cache-bench` against `target`, pinned to the load CPU, and reads
/// its JSON; `servers` are the processes whose CPU time is charged to the
/// run.
pub(super) async fn cache_bench(
    ctx: &Ctx,
    name: &str,
    target: &str,
    load: &Load,
    servers: &[&Server],
) -> Result<Measured> {
    let (_, cpu) = ctx.cpus();
    let json = ctx.logs.join(format!("{name}.json"));
    let mut command = pinned(cpu, &ctx.bin("cache-bench"))?;
    command
        .arg("--target")
        .arg(target)
        .args(["--clients", &load.clients.to_string()])
        .args(["--duration", &format!("{}ms", load.duration.as_millis())])
        .args(["--warmup", &format!("{}ms", load.warmup.as_millis())])
        .args(["--keys", &load.keys.to_string()])
        .args(["--value-size", &load.value_size.to_string()])
        .args(["--read-ratio", &load.read_ratio.to_string()])
        .args(["--batch", &load.batch.to_string()])
        // The client's default (500 ms) is for services; on a shared
        // machine a server can stall longer, and a node marked down turns
        // the rest of the run into errors.
        .args(["--request-timeout", "5s"])
        .arg("--preload")
        .arg("--json")
        .arg(&json);
    let log = ctx.logs.join(format!("{name}.log"));
    let cpu_before = cpu_of(servers)?;
    let started = std::time::Instant::now();
    let mut child = ChildGuard::spawn(format!("cache-bench {name}"), &mut command, Some(&log))?;
    let status = tokio::select! {
        status = child.wait() => status?,
        _ = ctx.cancel.cancelled() => bail!("interrupted during {name}"),
    };
    let wall = started.elapsed();
    let cpu = cpu_of(servers)? - cpu_before;
    if !status.success() {
        bail!(
            "cache-bench {name} failed ({status}):\n{}",
            paths::tail(&log, 20)
        );
    }
    let report = read_json(&json)?;
    let summary = &report["summary"];
    let number = |v: &Value, what: &str| -> Result<f64> {
        v.as_f64()
            .with_context(|| format!("{} has no {what}", json.display()))
    };
    let errors = number(&summary["errors"], "errors")?;
    if errors > 0.0 {
        bail!(
            "cache-bench {name} counted {errors} errors, first: {}",
            summary["error_samples"]
        );
    }
    let requests = load.keys as f64
        + number(&summary["warmup_ops"], "warmup_ops")?
        + number(&summary["ops"], "ops")?;
    let latency = &summary["latency_us"];
    Ok(Measured {
        ops_per_sec: number(&summary["ops_per_sec"], "ops_per_sec")?,
        keys_per_sec: number(&summary["keys_per_sec"], "keys_per_sec")?,
        p50_us: number(&latency["p50"], "p50")?,
        p99_us: number(&latency["p99"], "p99")?,
        p999_us: number(&latency["p999"], "p999")?,
        cpu_us_per_request: cpu.as_secs_f64() * 1e6 / requests.max(1.0),
        cpu_cores: cpu.as_secs_f64() / wall.as_secs_f64(),
    })
}

fn cpu_of(servers: &[&Server]) -> Result<Duration> {
    servers.iter().map(|s| s.cpu_time()).sum()
}

fn read_json(path: &PathBuf) -> Result<Value> {
    let text =
        fs::read_to_string(path).with_context(|| format!("failed to read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// The median of `values` (the mean of the middle two for an even count).
pub(super) fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.into_iter().collect();
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// The medians of a configuration's runs, field by field.
pub(super) fn medians(runs: &[Measured]) -> Measured {
    let m = |f: fn(&Measured) -> f64| median(runs.iter().map(f));
    Measured {
        ops_per_sec: m(|r| r.ops_per_sec),
        keys_per_sec: m(|r| r.keys_per_sec),
        p50_us: m(|r| r.p50_us),
        p99_us: m(|r| r.p99_us),
        p999_us: m(|r| r.p999_us),
        cpu_us_per_request: m(|r| r.cpu_us_per_request),
        cpu_cores: m(|r| r.cpu_cores),
    }
}

/// `12345.6` as `12,346`.
pub(super) fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Microseconds as milliseconds with 3 decimals.
pub(super) fn ms(us: f64) -> String {
    format!("{:.3}", us / 1000.0)
}

/// The four configurations, in the order each round runs them.
const CONFIGS: [(&str, bool, usize); 4] = [
    ("node `Get`", false, 1),
    ("baseline `Get`", true, 1),
    ("node `MultiGet` ×16", false, BATCH),
    ("baseline `MultiGet` ×16", true, BATCH),
];

pub(super) async fn run(ctx: &Ctx) -> Result<String> {
    let base = Load::standard(ctx, 1.0);
    let node_addrs = [NodeAddrs::new("bench-node", false)?];
    let mut servers = start_nodes(ctx, &node_addrs).await?;
    servers.push(start_baseline(ctx, base.value_size).await?);
    let result = measure(ctx, &servers, &base).await;
    let stopped = stop_all(servers).await;
    let markdown = result?;
    stopped?;
    Ok(markdown)
}

async fn measure(ctx: &Ctx, servers: &[Server], base: &Load) -> Result<String> {
    let (node, baseline) = (&servers[0], &servers[1]);
    let mut runs: Vec<Vec<Measured>> = vec![Vec::new(); CONFIGS.len()];
    for round in 0..ctx.runs() {
        for (i, (label, is_baseline, batch)) in CONFIGS.iter().enumerate() {
            let server = if *is_baseline { baseline } else { node };
            let load = Load {
                batch: *batch,
                ..base.clone()
            };
            let name = format!(
                "grpc-{}-{}-{round}",
                if *is_baseline { "baseline" } else { "node" },
                if *batch > 1 { "multiget" } else { "get" }
            );
            let measured = cache_bench(
                ctx,
                &name,
                // Unary calls on both sides: this suite weighs the cache
                // against an empty handler of the same call, which the
                // baseline does not serve over the command stream.
                &format!("grpc-unary://{}", server.addr),
                &load,
                &[server],
            )
            .await?;
            eprintln!(
                "xtask: {label} round {round}: {:.0} ops/s, {:.0} keys/s",
                measured.ops_per_sec, measured.keys_per_sec
            );
            runs[i].push(measured);
        }
    }
    let medians: Vec<Measured> = runs.iter().map(|r| medians(r)).collect();
    let get_ratio = medians[0].ops_per_sec / medians[1].ops_per_sec;
    let multi_ratio = medians[2].keys_per_sec / medians[0].keys_per_sec;
    let cpu_ratio = medians[0].cpu_us_per_request / medians[1].cpu_us_per_request;

    let mut out = String::new();
    writeln!(
        out,
        "Through `cache_client::Client`, read-only: {}; {} alternating round(s), medians.",
        base.describe(),
        ctx.runs()
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| server, call | ops/s | keys/s | p50 ms | p99 ms | p99.9 ms | server CPU µs/request | server CPU (cores) |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    for ((label, _, _), m) in CONFIGS.iter().zip(&medians) {
        writeln!(
            out,
            "| {label} | {} | {} | {} | {} | {} | {:.1} | {:.2} |",
            thousands(m.ops_per_sec),
            thousands(m.keys_per_sec),
            ms(m.p50_us),
            ms(m.p99_us),
            ms(m.p999_us),
            m.cpu_us_per_request,
            m.cpu_cores
        )?;
    }
    writeln!(out)?;
    writeln!(out, "| target | measured | met |")?;
    writeln!(out, "|---|---:|---|")?;
    writeln!(
        out,
        "| node `Get` throughput ≥ 0.9 × baseline | {get_ratio:.2} × | {} |",
        verdict(get_ratio >= 0.9)
    )?;
    writeln!(
        out,
        "| `MultiGet` ×16 keys/s ≥ 8 × single `Get` keys/s (node) | {multi_ratio:.1} × | {} |",
        verdict(multi_ratio >= 8.0)
    )?;
    writeln!(
        out,
        "| (for reference) node CPU per `Get` over baseline's | {cpu_ratio:.2} × | |"
    )?;
    Ok(out)
}

fn verdict(met: bool) -> &'static str {
    if met { "yes" } else { "**no**" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_number_formats() {
        assert_eq!(median([3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median([]).is_nan());
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(ms(1234.0), "1.234");
    }
}

//! The `resp` suite: one core each, the node's RESP listener against
//! `redis-server` under `redis-benchmark`.
//!
//! Both servers run on one thread pinned to the server CPU (the node with
//! `--worker-threads 1`, redis-server as it always runs its commands), and
//! `redis-benchmark` pinned to the other CPU. Each run measures both
//! servers, in an order that alternates run by run so that a disturbance
//! of the machine hits both; the table shows medians over the runs.
//!
//! The servers are started here too for the `memory` suite.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use super::{Ctx, median, pinned, require};
use crate::{
    paths,
    process::ChildGuard,
    readiness::{free_port, wait_for_tcp},
};

/// Connections redis-benchmark opens.
const CLIENTS: usize = 50;
/// Value size of the SET test, in bytes.
const VALUE_BYTES: usize = 100;
/// Keys the tests pick from at random (`-r`).
const KEYSPACE: usize = 100_000;
/// Pipeline depths measured.
const PIPELINES: [usize; 2] = [1, 16];
/// How long a server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one redis-benchmark invocation may take before the suite gives
/// up (a stalled server must fail the suite, not hang it).
const BENCHMARK_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a server gets to stop on SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The two servers compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Redis,
    Ringcache,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Redis => "redis-server",
            Kind::Ringcache => "ringcache",
        }
    }
}

/// A running server, pinned to one CPU, killed when dropped.
pub struct Server {
    pub kind: Kind,
    pub addr: SocketAddr,
    /// The command line, for the document.
    pub command_line: String,
    guard: ChildGuard,
}

impl Server {
    /// Starts `kind` pinned to `cpu`, with its log and (for the node) its
    /// config in `ctx.logs` under `label`, and waits until it accepts
    /// connections.
    pub async fn start(ctx: &Ctx, kind: Kind, cpu: usize, label: &str) -> Result<Server> {
        Server::start_sized(ctx, kind, cpu, label, None).await
    }

    /// As [`Server::start`]; the node's default keyspace gets
    /// `capacity_bytes` when one is given (redis-server's `maxmemory` is
    /// set by the caller once it knows what the empty server uses).
    pub async fn start_sized(
        ctx: &Ctx,
        kind: Kind,
        cpu: usize,
        label: &str,
        capacity_bytes: Option<u64>,
    ) -> Result<Server> {
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = ctx.logs.join(format!("{label}-{}.log", kind.name()));
        let (mut command, command_line) = match kind {
            Kind::Redis => {
                let dir = ctx.logs.join(format!("{label}-redis-dir"));
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("failed to create {}", dir.display()))?;
                let args = [
                    "--port".to_owned(),
                    port.to_string(),
                    "--bind".to_owned(),
                    "127.0.0.1".to_owned(),
                    "--save".to_owned(),
                    String::new(),
                    "--appendonly".to_owned(),
                    "no".to_owned(),
                    "--dir".to_owned(),
                    dir.display().to_string(),
                ];
                let mut command = pinned(cpu, "redis-server");
                command.args(&args);
                (
                    command,
                    format!(
                        "taskset -c {cpu} redis-server --port PORT --bind 127.0.0.1 --save \"\" --appendonly no"
                    ),
                )
            }
            Kind::Ringcache => {
                let config = write_node_config(ctx, label, addr, capacity_bytes)?;
                let mut command = pinned(cpu, require(&ctx.bin("cache-node"))?);
                command
                    .arg("--config")
                    .arg(&config)
                    .arg("--no-metrics")
                    .env("RUST_LOG", "warn");
                (
                    command,
                    format!("taskset -c {cpu} cache-node --config node.toml --no-metrics"),
                )
            }
        };
        let mut guard = ChildGuard::spawn(kind.name(), &mut command, Some(&log))?;
        wait_for_tcp(addr, START_TIMEOUT, &ctx.cancel, Some(&mut guard)).await?;
        Ok(Server {
            kind,
            addr,
            command_line,
            guard,
        })
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.guard.id()
    }

    /// Fails (with the log's tail) if the server has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.guard.try_status()? {
            let log = self
                .guard
                .log()
                .map(|log| paths::tail(log, 30))
                .unwrap_or_default();
            bail!(
                "{} exited ({status}) during the benchmark; last log lines:\n{log}",
                self.kind.name()
            );
        }
        Ok(())
    }

    /// Stops the server with SIGTERM (SIGKILL after a grace period).
    pub async fn stop(mut self) -> Result<()> {
        self.guard.stop(Signal::SIGTERM, STOP_GRACE).await?;
        Ok(())
    }
}

/// The node's config, with `GRPC` and `RESP` for its addresses: one worker
/// thread, and a default keyspace large enough that nothing the suites load
/// is evicted (the memory suite's million entries weigh about 180 MB
/// with 100-byte values, 1.1 GB with 1 KiB values).
pub const NODE_CONFIG: &str = "\
node_id = \"bench\"
listen = \"GRPC\"
resp_listen = \"RESP\"
worker_threads = 1
shutdown_grace = \"5s\"

[keyspaces.default]
capacity_bytes = 4294967296
";

/// [`NODE_CONFIG`] as the document shows it.
pub fn node_config_shown() -> String {
    NODE_CONFIG
        .replace("\"GRPC\"", "\"127.0.0.1:PORT\"")
        .replace("\"RESP\"", "\"127.0.0.1:PORT\"")
}

/// Writes [`NODE_CONFIG`] for RESP on `resp` and gRPC on a free port.
fn write_node_config(
    ctx: &Ctx,
    label: &str,
    resp: SocketAddr,
    capacity_bytes: Option<u64>,
) -> Result<PathBuf> {
    let grpc = free_port()?;
    let path = ctx.logs.join(format!("{label}-node.toml"));
    let mut text = NODE_CONFIG
        .replace("GRPC", &format!("127.0.0.1:{grpc}"))
        .replace("RESP", &resp.to_string());
    if let Some(bytes) = capacity_bytes {
        text = text.replace(
            "capacity_bytes = 4294967296",
            &format!("capacity_bytes = {bytes}"),
        );
    }
    std::fs::write(&path, text).with_context(|| format!("failed to write {}", path.display()))?;
    Ok(path)
}

/// One row of `redis-benchmark --csv`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Row {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Reads the rows of `redis-benchmark --csv` output by test name (`SET`,
/// `GET`), finding the columns by the header's names.
pub fn parse_csv(text: &str) -> Result<Vec<(String, Row)>> {
    let fields = |line: &str| -> Vec<String> {
        line.split(',')
            .map(|f| f.trim().trim_matches('"').to_owned())
            .collect()
    };
    let mut lines = text.lines().map(str::trim);
    let header = lines
        .by_ref()
        .find(|l| l.starts_with("\"test\""))
        .context("no CSV header (\"test\",...) in redis-benchmark's output")?;
    let header = fields(header);
    let column = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("no {name} column in redis-benchmark's CSV header"))
    };
    let (rps, p50, p99) = (
        column("rps")?,
        column("p50_latency_ms")?,
        column("p99_latency_ms")?,
    );
    let mut rows = Vec::new();
    for line in lines.filter(|l| l.starts_with('"')) {
        let f = fields(line);
        let number = |i: usize| -> Result<f64> {
            f.get(i)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("bad CSV line from redis-benchmark: {line}"))
        };
        rows.push((
            f[0].clone(),
            Row {
                rps: number(rps)?,
                p50_ms: number(p50)?,
                p99_ms: number(p99)?,
            },
        ));
    }
    Ok(rows)
}

/// The redis-benchmark arguments of one measurement.
fn benchmark_args(host: &str, port: &str, pipeline: usize, requests: usize) -> Vec<String> {
    [
        "-h",
        host,
        "-p",
        port,
        "-t",
        "set,get",
        "-c",
        &CLIENTS.to_string(),
        "-P",
        &pipeline.to_string(),
        "-d",
        &VALUE_BYTES.to_string(),
        "-r",
        &KEYSPACE.to_string(),
        "-n",
        &requests.to_string(),
        "--csv",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Runs redis-benchmark pinned to `cpu` against `server`; returns the SET
/// and GET rows.
async fn benchmark(
    ctx: &Ctx,
    server: &mut Server,
    cpu: usize,
    pipeline: usize,
    requests: usize,
    log: &Path,
) -> Result<Vec<(String, Row)>> {
    let mut command = pinned(cpu, "redis-benchmark");
    command.args(benchmark_args(
        &server.addr.ip().to_string(),
        &server.addr.port().to_string(),
        pipeline,
        requests,
    ));
    let mut child = ChildGuard::spawn("redis-benchmark", &mut command, Some(log))?;
    let status = tokio::select! {
        status = child.wait_timeout(BENCHMARK_TIMEOUT) => status?,
        () = ctx.cancel.cancelled() => bail!("interrupted during redis-benchmark"),
    };
    server.check_alive()?;
    let output = std::fs::read_to_string(log)
        .with_context(|| format!("failed to read {}", log.display()))?;
    match status {
        None => bail!(
            "redis-benchmark against {} took more than {BENCHMARK_TIMEOUT:?}",
            server.kind.name()
        ),
        Some(status) if !status.success() => bail!(
            "redis-benchmark against {} failed ({status}):\n{}",
            server.kind.name(),
            paths::tail(log, 20)
        ),
        Some(_) => {}
    }
    let rows = parse_csv(&output)
        .with_context(|| format!("redis-benchmark's output is in {}", log.display()))?;
    for test in ["SET", "GET"] {
        if !rows.iter().any(|(name, _)| name == test) {
            bail!(
                "redis-benchmark printed no {test} row (see {})",
                log.display()
            );
        }
    }
    Ok(rows)
}

/// Requests per redis-benchmark test: a few seconds each on one core.
fn requests(ctx: &Ctx, pipeline: usize) -> usize {
    match (ctx.quick, pipeline) {
        (true, 1) => 20_000,
        (true, _) => 100_000,
        (false, 1) => 300_000,
        (false, _) => 2_000_000,
    }
}

/// `ours[i] / theirs[i]` for each run measured on both.
fn paired_ratios(ours: &[f64], theirs: &[f64]) -> Vec<f64> {
    ours.iter().zip(theirs).map(|(o, t)| o / t).collect()
}

/// The figures of one (server, test, pipeline) over the runs.
#[derive(Default)]
struct Samples {
    rps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
}

impl Samples {
    fn push(&mut self, row: Row) {
        self.rps.push(row.rps);
        self.p50.push(row.p50_ms);
        self.p99.push(row.p99_ms);
    }
}

pub async fn run(ctx: &Ctx) -> Result<String> {
    let (server_cpu, load_cpu) = ctx.cpus();
    let mut redis = Server::start(ctx, Kind::Redis, server_cpu, "resp").await?;
    let mut node = Server::start(ctx, Kind::Ringcache, server_cpu, "resp").await?;
    let tests = ["SET", "GET"];
    // samples[server][test][pipeline]
    let mut samples: [[[Samples; 2]; 2]; 2] = Default::default();
    let mut raw = String::from("run,server,pipeline,test,rps,p50_ms,p99_ms\n");
    for run in 0..ctx.runs() {
        let order = if run % 2 == 0 {
            [Kind::Redis, Kind::Ringcache]
        } else {
            [Kind::Ringcache, Kind::Redis]
        };
        for kind in order {
            let server = match kind {
                Kind::Redis => &mut redis,
                Kind::Ringcache => &mut node,
            };
            for (p, &pipeline) in PIPELINES.iter().enumerate() {
                eprintln!(
                    "xtask: bench resp: run {}/{}, {}, pipeline {pipeline}",
                    run + 1,
                    ctx.runs(),
                    kind.name()
                );
                let log = ctx
                    .logs
                    .join(format!("resp-run{run}-{}-P{pipeline}.log", kind.name()));
                let rows = benchmark(
                    ctx,
                    server,
                    load_cpu,
                    pipeline,
                    requests(ctx, pipeline),
                    &log,
                )
                .await?;
                for (t, test) in tests.iter().enumerate() {
                    let Some((_, row)) = rows.iter().find(|(name, _)| name == test) else {
                        continue;
                    };
                    samples[kind as usize][t][p].push(*row);
                    writeln!(
                        raw,
                        "{run},{},{pipeline},{test},{},{},{}",
                        kind.name(),
                        row.rps,
                        row.p50_ms,
                        row.p99_ms
                    )?;
                }
            }
        }
    }
    let raw_path = ctx.logs.join("resp-runs.csv");
    std::fs::write(&raw_path, &raw)
        .with_context(|| format!("failed to write {}", raw_path.display()))?;
    eprintln!(
        "xtask: bench resp: every run's figures are in {}",
        raw_path.display()
    );

    let mut out = String::new();
    writeln!(
        out,
        "{} run(s) per row, medians; ops/s from `redis-benchmark --csv`, \
         latencies in ms. Each run measures both servers one after the other; \
         `per-run ratio` is the median (min–max) of those pairs' ratios, steadier \
         than the ratio of the medians when the machine's speed moves between runs.",
        ctx.runs()
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| test | pipeline | redis-server ops/s | ringcache ops/s | ringcache / redis | \
         per-run ratio | redis p50 / p99 | ringcache p50 / p99 |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    for (t, test) in tests.iter().enumerate() {
        for (p, pipeline) in PIPELINES.iter().enumerate() {
            let r = &samples[Kind::Redis as usize][t][p];
            let n = &samples[Kind::Ringcache as usize][t][p];
            let (r_rps, n_rps) = (median(&r.rps), median(&n.rps));
            let pairs = paired_ratios(&n.rps, &r.rps);
            let (low, high) = pairs
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
                    (lo.min(*x), hi.max(*x))
                });
            writeln!(
                out,
                "| {test} | {pipeline} | {r_rps:.0} | {n_rps:.0} | {:.2}x | {:.2}x ({low:.2}–{high:.2}) | {:.3} / {:.3} | {:.3} / {:.3} |",
                n_rps / r_rps,
                median(&pairs),
                median(&r.p50),
                median(&r.p99),
                median(&n.p50),
                median(&n.p99),
            )?;
        }
    }
    writeln!(out)?;
    writeln!(
        out,
        "Commands (server on CPU {server_cpu}, load on CPU {load_cpu}):"
    )?;
    writeln!(out)?;
    writeln!(out, "```sh")?;
    writeln!(out, "{}", redis.command_line)?;
    writeln!(out, "{}", node.command_line)?;
    for pipeline in PIPELINES {
        let args = benchmark_args("127.0.0.1", "PORT", pipeline, requests(ctx, pipeline)).join(" ");
        writeln!(out, "taskset -c {load_cpu} redis-benchmark {args}")?;
    }
    writeln!(out, "```")?;
    writeln!(out)?;
    writeln!(out, "with `node.toml`:")?;
    writeln!(out)?;
    writeln!(out, "```toml\n{}```", node_config_shown())?;
    redis.stop().await?;
    node.stop().await?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_are_read_by_header_name() {
        let text = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                    \"SET\",\"266666.66\",\"2.549\",\"0.336\",\"1.623\",\"5.751\",\"6.039\",\"6.159\"\n\
                    \"GET\",\"285714.28\",\"2.258\",\"0.264\",\"1.247\",\"6.823\",\"8.263\",\"8.407\"\n";
        let rows = parse_csv(text).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].0, "SET");
        assert_eq!(
            rows[1].1,
            Row {
                rps: 285714.28,
                p50_ms: 1.247,
                p99_ms: 8.263
            }
        );
        assert!(parse_csv("no header here\n").is_err());
    }

    #[test]
    fn paired_ratios_divide_run_by_run() {
        // The machine slows down in the second run: the pairs stay at 1.0.
        let ratios = paired_ratios(&[50.0, 25.0, 40.0], &[50.0, 25.0, 50.0]);
        assert_eq!(ratios, vec![1.0, 1.0, 0.8]);
        assert_eq!(crate::bench::median(&ratios), 1.0);
    }
}

//! `cargo xtask bench`: ringcache side by side with redis-server and with
//! the limits of its transport and its database, on this machine.
//!
//! Each suite measures one comparison and returns a markdown section; the
//! sections replace their regions of `docs/benchmarks.md`
//! (`<!-- bench:NAME:begin -->` ... `<!-- bench:NAME:end -->`), so that the
//! tables there are always the output of this command, and a suite can be
//! re-run alone (`--suite resp`) without touching the others. The `machine`
//! region (CPU, kernel, versions, commit, date) is rewritten on every run.
//!
//! Everything runs from release builds (`cargo build --release`), which
//! this command makes first. `redis-server`, `redis-benchmark` and
//! `redis-cli` are installed from Debian's packages when missing (as root);
//! PostgreSQL and the broker are started as for the tests.

mod cluster;
mod doc;
mod grpc;
mod hit_ratio;
mod machine;
mod memory;
mod resp;
mod ring;
mod write_back;
mod write_through;

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use nix::sys::signal::Signal;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::{paths, process::ChildGuard};

/// How long a benchmark binary gets to stop after an interrupt before its
/// process group (the nodes and workers it started included) is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(5);

/// The document the suites write their tables into.
pub const DOC: &str = "docs/benchmarks.md";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Suites to run (repeat the flag; default: all of them, in the order
    /// listed here).
    #[arg(long = "suite", value_enum)]
    suites: Vec<Suite>,
    /// Short runs and a single repetition: checks that every suite works,
    /// the figures mean nothing. Implies --no-write.
    #[arg(long)]
    quick: bool,
    /// Print the sections instead of writing them into docs/benchmarks.md.
    #[arg(long)]
    no_write: bool,
    /// Use the dev build (`target/debug`) instead of a release build: for
    /// working on the suites, not for figures. Implies --no-write.
    #[arg(long)]
    debug: bool,
}

/// One comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// One core each: the node's RESP listener vs redis-server under
    /// redis-benchmark (GET and SET, pipeline 1 and 16).
    Resp,
    /// gRPC `Get` vs an empty tonic handler; `MultiGet` of 16 vs 16 `Get`s.
    Grpc,
    /// A three-node cluster through cache-client vs three redis-servers
    /// routed by the same ring.
    Cluster,
    /// The write-back worker's rows/s vs `COPY`; write-to-row lag at a
    /// fixed write rate.
    WriteBack,
    /// Write-through writes with 1, 8 and 64 writers on one key, beside
    /// the same on keys of their own.
    WriteThrough,
    /// The ring's balance and key movement.
    Ring,
    /// Bytes per item for 1,000,000 values of 100 bytes and of 1 KiB vs
    /// redis-server; memory given back by expiry without reads.
    Memory,
    /// Hit ratio for the same memory: the node, redis-server (LRU, LFU)
    /// and the moka store it replaced, on Zipf, scan and shifting traces.
    HitRatio,
}

impl Suite {
    /// The region name in the document.
    pub fn region(self) -> &'static str {
        match self {
            Suite::Resp => "resp",
            Suite::Grpc => "grpc",
            Suite::Cluster => "cluster",
            Suite::WriteBack => "write-back",
            Suite::WriteThrough => "write-through",
            Suite::Ring => "ring",
            Suite::Memory => "memory",
            Suite::HitRatio => "hit-ratio",
        }
    }
}

/// What every suite gets.
#[derive(Debug)]
pub struct Ctx {
    /// `target/release` (or `target/debug` with `--debug`), holding every
    /// binary of the workspace.
    pub bin_dir: PathBuf,
    /// Where this run's logs go.
    pub logs: PathBuf,
    /// Short runs, one repetition.
    pub quick: bool,
    pub cancel: CancellationToken,
}

impl Ctx {
    /// The path of a binary of the workspace.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// How many times each measurement is repeated (the tables show
    /// medians).
    pub fn runs(&self) -> usize {
        if self.quick { 1 } else { 5 }
    }

    /// The CPU the server under test is pinned to, and the one the load
    /// generator is pinned to (`taskset -c`); the same CPU for both on a
    /// one-CPU machine.
    pub fn cpus(&self) -> (usize, usize) {
        let n = std::thread::available_parallelism().map_or(1, usize::from);
        (0, if n > 1 { 1 } else { 0 })
    }
}

/// A suite's output: markdown for its region.
#[derive(Debug)]
pub struct Section {
    pub suite: Suite,
    pub markdown: String,
}

pub async fn run(args: Args, cancel: &CancellationToken) -> Result<ExitCode> {
    let suites = if args.suites.is_empty() {
        Suite::value_variants().to_vec()
    } else {
        args.suites.clone()
    };
    let logs = paths::new_logs_dir("bench")?;
    eprintln!("xtask: bench logs go to {}", logs.display());
    for (binary, package) in [
        ("redis-server", "redis-server"),
        ("redis-benchmark", "redis-tools"),
        ("redis-cli", "redis-tools"),
    ] {
        crate::services::debian::ensure_installed(binary, package, true, cancel).await?;
    }
    build(args.debug, cancel).await?;
    let ctx = Ctx {
        bin_dir: paths::target_dir().join(if args.debug { "debug" } else { "release" }),
        logs,
        quick: args.quick,
        cancel: cancel.clone(),
    };
    let mut sections = Vec::new();
    for suite in suites {
        eprintln!("xtask: bench suite {}", suite.region());
        let markdown = run_suite(suite, &ctx)
            .await
            .with_context(|| format!("the {} suite failed", suite.region()))?;
        println!("{markdown}");
        sections.push(Section { suite, markdown });
    }
    if args.quick || args.no_write || args.debug {
        return Ok(ExitCode::SUCCESS);
    }
    let machine = machine::describe(&ctx).await?;
    let path = paths::workspace_root().join(DOC);
    doc::write_regions(&path, &machine, &sections)?;
    eprintln!(
        "xtask: wrote {} section(s) into {}",
        sections.len(),
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn run_suite(suite: Suite, ctx: &Ctx) -> Result<String> {
    match suite {
        Suite::Resp => resp::run(ctx).await,
        Suite::Memory => memory::run(ctx).await,
        Suite::HitRatio => hit_ratio::run(ctx).await,
        Suite::WriteBack => write_back::run(ctx).await,
        Suite::WriteThrough => write_through::run(ctx).await,
        Suite::Grpc => grpc::run(ctx).await,
        Suite::Cluster => cluster::run(ctx).await,
        Suite::Ring => ring::run(ctx).await,
    }
}

/// `cargo build --release` (or a dev build) of every binary the suites
/// run.
async fn build(debug: bool, cancel: &CancellationToken) -> Result<()> {
    let mut build = paths::cargo();
    build.arg("build");
    if !debug {
        build.arg("--release");
    }
    build
        .args([
            "-p",
            "cache-node",
            "-p",
            "write-back-worker",
            "-p",
            "ringcache-tests",
            "--bins",
            "--features",
            "cache-client/cli",
        ])
        .current_dir(paths::workspace_root());
    let mut child = ChildGuard::spawn("cargo build", &mut build, None)?;
    let status = tokio::select! {
        status = child.wait() => status?,
        _ = cancel.cancelled() => bail!("interrupted while building"),
    };
    if !status.success() {
        bail!("cargo build failed ({status})");
    }
    Ok(())
}

/// `program` run pinned to `cpu` (`taskset -c CPU PROGRAM`); taskset execs
/// the program, so the child's process id is the program's.
pub fn pinned(cpu: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new("taskset");
    command.arg("-c").arg(cpu.to_string()).arg(program);
    command
}

/// The median of `values` (the mean of the middle two for an even count);
/// NaN for none.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Runs the benchmark binary `program ARGS` of the workspace with `env`
/// (where the services are), its stderr in the run's logs, and parses the
/// JSON object it prints last on stdout.
pub async fn json_bench(
    ctx: &Ctx,
    env: &[(&str, String)],
    program: &str,
    name: &str,
    args: &[&str],
) -> Result<Value> {
    let binary = require(&ctx.bin(program))?.to_path_buf();
    let log_path = ctx.logs.join(format!("{program}-{name}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("failed to create {}", log_path.display()))?;
    let mut command = Command::new(&binary);
    command
        .args(args)
        .envs(env.iter().map(|(name, value)| (name, value)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    let mut child = ChildGuard::spawn(format!("{program} {name}"), &mut command, None)?;
    let mut stdout = child
        .take_stdout()
        .with_context(|| format!("{program}'s stdout is piped"))?;
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        stdout.read_to_string(&mut out).map(|_| out)
    });
    let status = tokio::select! {
        status = child.wait() => status?,
        () = ctx.cancel.cancelled() => {
            child.stop(Signal::SIGTERM, INTERRUPT_GRACE).await?;
            bail!("interrupted during {program} {name}");
        }
    };
    let out = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the output reader panicked"))?
        .with_context(|| format!("failed to read {program}'s output"))?;
    if !status.success() {
        paths::print_tail(&format!("{program} {name}"), &log_path, 30);
        bail!("{program} {name} failed ({status})");
    }
    let json = out.lines().last().unwrap_or_default();
    serde_json::from_str(json).with_context(|| format!("{program} {name} printed {out:?}"))
}

/// Whether `path` exists, for messages that name a missing binary.
pub fn require(path: &Path) -> Result<&Path> {
    if !path.exists() {
        bail!(
            "{} is missing (the build should have made it)",
            path.display()
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}

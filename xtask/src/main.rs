//! `cargo xtask`: the one entry point for project automation.
//!
//! - [`test`]: `cargo xtask test [-- ARGS]` provisions PostgreSQL and a Kafka
//!   broker, builds every binary and runs the workspace tests against them.
//! - [`demo`]: `cargo xtask demo [--no-wait]` starts a three-node cluster.
//! - [`chaos`]: `cargo xtask chaos [-- ARGS]` runs a consistency chaos run.
//! - [`bench`]: `cargo xtask bench [--suite NAME]` runs the side-by-side
//!   benchmarks and writes their tables into docs/benchmarks.md.
//!
//! Reusable pieces:
//! - [`services`]: throw-away PostgreSQL ([`services::postgres`]) and tansu
//!   broker ([`services::tansu`]) instances, started together by
//!   [`services::Services`]; the write-back benchmark's broker, tansu with
//!   in-memory storage ([`services::bench_broker`]).
//! - [`process`]: a child-process guard that kills its process group on drop.
//! - [`readiness`]: free ports and polling with a deadline (TCP, gRPC health).
//! - [`paths`]: where the workspace, its target directory and run logs live.
//!
//! Interrupts: SIGINT and SIGTERM do not kill xtask; they cancel a token that
//! every long wait watches, so that each command returns normally and the
//! guards' `Drop` implementations tear down what was started.

mod bench;
mod chaos;
mod demo;
mod paths;
mod process;
mod readiness;
mod services;
mod test;

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "ringcache project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start PostgreSQL and a Kafka broker, build all binaries, run the
    /// workspace tests against them, then tear everything down.
    Test(test::Args),
    /// Start a three-node ringcache cluster and walk through it.
    Demo(demo::Args),
    /// Run a consistency chaos run: a local cluster, a workload per
    /// strategy, injected faults, a checker and a report.
    Chaos(chaos::Args),
    /// Benchmark ringcache side by side with redis-server and with the
    /// limits of its transport and database; writes docs/benchmarks.md.
    Bench(bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the tokio runtime")
    {
        Ok(runtime) => runtime,
        Err(err) => return report(Err(err)),
    };
    // Installed before anything is started: from here on an interrupt only
    // cancels the token, and everything started so far is torn down by
    // unwinding normally instead of being leaked by a dying xtask.
    let cancel = match runtime.block_on(async { watch_signals() }) {
        Ok(cancel) => cancel,
        Err(err) => return report(Err(err)),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Test(args) => test::run(args, &cancel).await,
            Command::Demo(args) => demo::run(args, &cancel).await,
            Command::Chaos(args) => chaos::run(args, &cancel).await,
            Command::Bench(args) => bench::run(args, &cancel).await,
        }
    });
    if result.is_err() && cancel.is_cancelled() {
        // The error is a consequence of the interrupt (a step cut short),
        // not a failure worth a non-interrupt exit code.
        if let Err(err) = &result {
            eprintln!("xtask: stopped: {err:#}");
        }
        return ExitCode::from(INTERRUPTED);
    }
    report(result)
}

/// Exit code after SIGINT/SIGTERM: 128 + SIGINT, as a shell reports a command
/// killed by Ctrl-C.
pub const INTERRUPTED: u8 = 130;

/// Prints a failed command's error chain and picks the process exit code.
fn report(result: Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Turns SIGINT and SIGTERM into a cancelled token.
fn watch_signals() -> Result<CancellationToken> {
    let cancel = CancellationToken::new();
    let mut interrupt = signal(SignalKind::interrupt()).context("failed to watch SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("failed to watch SIGTERM")?;
    let token = cancel.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        eprintln!("xtask: interrupted, tearing down");
        token.cancel();
    });
    Ok(cancel)
}

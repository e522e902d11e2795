//! `cargo xtask chaos [ARGS]`: a consistency chaos run on this machine.
//!
//! Builds the binaries (the same `cargo build` as `cargo xtask test`, so
//! that one reuses the other's build), finds PostgreSQL's server binaries and the tansu
//! broker (installing it when missing), and runs the `chaos` binary of the
//! integration-test crate with `ARGS` (`cargo xtask chaos -- --help` lists
//! them). The run starts its own PostgreSQL, broker, cache nodes and worker,
//! so nothing else needs to be running. Exit status: 0 when every promise
//! held, 1 when a violation was found, 2 when the run itself failed.

use std::{
    ffi::OsString,
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};
use tokio_util::sync::CancellationToken;

use crate::{paths, process::ChildGuard};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Passed on to the chaos run, e.g. `--clients 3 --duration 15m --json
    /// report.json` (`cargo xtask chaos --help` lists them).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    chaos_args: Vec<OsString>,
}

pub async fn run(args: Args, cancel: &CancellationToken) -> Result<ExitCode> {
    let mut build = paths::cargo();
    build
        .args(["build", "--workspace", "--bins", "--examples"])
        .current_dir(paths::workspace_root());
    let mut child = ChildGuard::spawn("cargo build", &mut build, None)?;
    let status = tokio::select! {
        status = child.wait() => status?,
        () = cancel.cancelled() => bail!("interrupted while building"),
    };
    if !status.success() {
        bail!("cargo build failed ({status})");
    }
    let pg_bindir = crate::services::postgres::find_bindir()?;
    let tansu = crate::services::tansu::ensure_installed(cancel).await?;

    let binary = paths::target_dir().join("debug").join("chaos");
    let mut command = Command::new(&binary);
    command
        .args(&args.chaos_args)
        .env("RINGCACHE_TEST_PG_BINDIR", &pg_bindir)
        .env("RINGCACHE_TEST_TANSU_BIN", &tansu);
    let mut child = ChildGuard::spawn("chaos", &mut command, None)
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let status = tokio::select! {
        status = child.wait() => status?,
        () = cancel.cancelled() => {
            child.signal(nix::sys::signal::Signal::SIGTERM)?;
            child.wait().await?;
            return Ok(ExitCode::from(crate::INTERRUPTED));
        }
    };
    Ok(ExitCode::from(
        status
            .code()
            .and_then(|c| u8::try_from(c).ok())
            .unwrap_or(2),
    ))
}

//! `grpc-baseline`: the `ringcache.v1.CacheNode` service answering fixed
//! replies without a cache (`ringcache_tests::bench::baseline`), the
//! transport's baseline in `cargo xtask bench --suite grpc`. Serves until
//! SIGINT or SIGTERM, then drains.

use std::{net::SocketAddr, process::ExitCode};

use anyhow::{Context, Result};
use clap::Parser;
use ringcache_tests::bench::baseline::{self, Config};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "grpc-baseline",
    about = "The CacheNode gRPC service with fixed replies and no cache"
)]
struct Cli {
    /// Address to serve gRPC on.
    #[arg(long)]
    listen: SocketAddr,
    /// Bytes of the value every read returns.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    match serve(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("grpc-baseline: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(cli: Cli) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot bind {}", cli.listen))?;
    let mut interrupt = signal(SignalKind::interrupt()).context("failed to watch SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("failed to watch SIGTERM")?;
    let shutdown = async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    };
    eprintln!("grpc-baseline: serving on {}", cli.listen);
    baseline::run(
        Config {
            value_size: cli.value_size,
        },
        listener,
        shutdown,
    )
    .await
}

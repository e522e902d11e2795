//! `cache-bench`'s library against a real one-node cluster, over gRPC and
//! over the node's RESP listener. Only that operations happened without
//! errors is checked: timings on a shared machine say nothing.

use std::time::Duration;

use anyhow::{Result, ensure};
use ringcache_tests::{
    NodeConfig, NodeProcess,
    bench::{KeyDistribution, Mode, Options, Summary, Target, run},
    free_addr,
};

fn options(target: Target, mode: Mode, distribution: KeyDistribution) -> Options {
    let mut options = Options::new(target);
    options.mode = mode;
    options.clients = 2;
    options.warmup = Duration::from_millis(300);
    options.duration = Duration::from_millis(1700);
    options.keys = 200;
    options.distribution = distribution;
    options.value_size = 64;
    options.read_ratio = 0.8;
    options.preload = true;
    options
}

fn check(what: &str, summary: &Summary) -> Result<()> {
    ensure!(summary.ops > 0, "{what}: no operation completed: {summary}");
    ensure!(
        summary.reads > 0 && summary.writes > 0,
        "{what}: expected reads and writes: {summary}"
    );
    ensure!(summary.errors == 0, "{what}: errors: {summary}");
    // Every key was preloaded, so every read hits.
    ensure!(summary.hits == summary.reads, "{what}: misses: {summary}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_against_grpc_and_resp() -> Result<()> {
    let resp = free_addr()?;
    let mut config = NodeConfig::single("bench-1")?;
    config.extra_top_level = format!("resp_listen = \"{resp}\"\n");
    let node = NodeProcess::start(config).await?;

    let grpc = Target::parse(&format!("grpc://{}", node.addr()), "default")?;
    let closed = run(&options(
        grpc.clone(),
        Mode::Closed,
        KeyDistribution::Zipf { exponent: 0.99 },
    ))
    .await?;
    check("gRPC closed loop", &closed)?;
    let open = run(&options(
        grpc,
        Mode::Open { rate: 200.0 },
        KeyDistribution::Uniform,
    ))
    .await?;
    check("gRPC open loop", &open)?;

    let resp = Target::parse(&format!("resp://{resp}"), "default")?;
    let closed = run(&options(
        resp.clone(),
        Mode::Closed,
        KeyDistribution::Uniform,
    ))
    .await?;
    check("RESP closed loop", &closed)?;
    let open = run(&options(
        resp,
        Mode::Open { rate: 200.0 },
        KeyDistribution::Zipf { exponent: 0.99 },
    ))
    .await?;
    check("RESP open loop", &open)?;
    Ok(())
}

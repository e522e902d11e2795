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
    // Every key was preloaded, so every key read hits.
    ensure!(
        summary.hits == summary.keys_read,
        "{what}: misses: {summary}"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_reads_and_the_resp_ring_reach_every_key() -> Result<()> {
    let resp = [free_addr()?, free_addr()?];
    let mut nodes = Vec::new();
    for (i, addr) in resp.iter().enumerate() {
        let mut config = NodeConfig::single(&format!("bench-ring-{i}"))?;
        config.extra_top_level = format!("resp_listen = \"{addr}\"\n");
        nodes.push(NodeProcess::start(config).await?);
    }

    // Batched reads over gRPC and one RESP server: every key of every batch
    // was preloaded, so every key read hits.
    let grpc = Target::parse(&format!("grpc://{}", nodes[0].addr()), "default")?;
    let single = Target::parse(&format!("resp://{}", resp[0]), "default")?;
    let ring = Target::parse(
        &format!("resp-ring://a={},b={}", resp[0], resp[1]),
        "default",
    )?;
    for (what, target) in [
        ("gRPC", grpc),
        ("RESP", single),
        ("RESP ring", ring.clone()),
    ] {
        let mut options = options(target, Mode::Closed, KeyDistribution::Uniform);
        options.batch = 16;
        let summary = run(&options).await?;
        check(what, &summary)?;
        ensure!(
            summary.keys_read == 16 * summary.reads,
            "{what}: batches of 16 should read 16 keys each: {summary}"
        );
        ensure!(summary.keys == summary.keys_read + summary.writes);
    }

    // Single-key operations routed by the ring: each server holds only
    // the keys the ring gives it, so reads that all hit show every key was
    // sent to its owner, both for the preload and for the run.
    let summary = run(&options(ring, Mode::Closed, KeyDistribution::Uniform)).await?;
    check("RESP ring", &summary)?;
    let route = cache_client::ring::Ring::new([
        cache_client::ring::RingNode::new("a", 1),
        cache_client::ring::RingNode::new("b", 1),
    ]);
    for (id, addr) in [("a", resp[0]), ("b", resp[1])] {
        let mut con = redis::Client::open(format!("redis://{addr}/"))?
            .get_multiplexed_async_connection()
            .await?;
        for index in 0..200 {
            let key = ringcache_tests::bench::KeyChooser::key(index);
            let held: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query_async(&mut con).await?;
            let owned = route.owner("default", key.as_bytes()) == Some(id);
            // Server `a` also holds what the single-server RESP run wrote.
            if id == "b" || owned {
                ensure!(
                    held.is_some() == owned,
                    "{key} on {id}: held {}, owned {owned}",
                    held.is_some()
                );
            }
        }
    }
    Ok(())
}

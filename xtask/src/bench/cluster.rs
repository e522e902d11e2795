//! The `cluster` suite: a three-node cluster through `cache-client` vs
//! three `redis-server`s routed by the same ring.
//!
//! Three cache nodes (one cluster, each with a RESP listener) and three
//! `redis-server`s run pinned to the server CPU; `cache-bench`, pinned to
//! the other, drives the same load three ways: the nodes over gRPC through
//! `cache_client::Client` (one HTTP/2 channel per node shared by all
//! clients), the nodes' RESP listeners through `resp-ring://`, and the
//! redis-servers through `resp-ring://` (one connection per client per
//! server, each key sent to the server `cache_client::ring::Ring` names,
//! with the servers given the nodes' ids so that the placement is the
//! cluster's). Runs alternate between the three; the table shows medians.

use std::fmt::Write as _;

use anyhow::Result;

use super::{
    Ctx,
    grpc::{
        Load, Measured, NodeAddrs, Server, cache_bench, medians, ms, start_nodes, start_redis,
        stop_all, thousands,
    },
};

/// Nodes in the cluster (and redis-servers beside it).
const NODES: usize = 3;

pub(super) async fn run(ctx: &Ctx) -> Result<String> {
    let addrs: Vec<NodeAddrs> = (1..=NODES)
        .map(|i| NodeAddrs::new(&format!("node-{i}"), true))
        .collect::<Result<_>>()?;
    let mut servers = start_nodes(ctx, &addrs).await?;
    let mut redis = Vec::with_capacity(NODES);
    for i in 1..=NODES {
        match start_redis(ctx, &format!("redis-{i}")).await {
            Ok(server) => redis.push(server),
            Err(e) => {
                servers.extend(redis);
                let _ = stop_all(servers).await;
                return Err(e);
            }
        }
    }
    let result = measure(ctx, &addrs, &servers, &redis).await;
    servers.extend(redis);
    let stopped = stop_all(servers).await;
    let markdown = result?;
    stopped?;
    Ok(markdown)
}

async fn measure(
    ctx: &Ctx,
    addrs: &[NodeAddrs],
    nodes: &[Server],
    redis: &[Server],
) -> Result<String> {
    let load = Load::standard(ctx, 0.9);
    let grpc = format!(
        "grpc://{}",
        addrs
            .iter()
            .map(|a| a.grpc.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let node_resp = format!(
        "resp-ring://{}",
        addrs
            .iter()
            .map(|a| format!(
                "{}={}",
                a.id,
                a.resp.expect("the cluster's nodes are started with RESP")
            ))
            .collect::<Vec<_>>()
            .join(",")
    );
    let redis_ring = format!(
        "resp-ring://{}",
        addrs
            .iter()
            .zip(redis)
            .map(|(a, r)| format!("{}={}", a.id, r.addr))
            .collect::<Vec<_>>()
            .join(",")
    );
    let node_refs: Vec<&Server> = nodes.iter().collect();
    let redis_refs: Vec<&Server> = redis.iter().collect();
    let configs: [(&str, &str, String, &[&Server]); 3] = [
        (
            "3 nodes, gRPC through cache-client",
            "grpc",
            grpc,
            &node_refs,
        ),
        (
            "3 nodes' RESP listeners, resp-ring",
            "node-resp",
            node_resp,
            &node_refs,
        ),
        (
            "3 redis-servers, resp-ring",
            "redis",
            redis_ring,
            &redis_refs,
        ),
    ];
    let mut runs: Vec<Vec<Measured>> = vec![Vec::new(); configs.len()];
    for round in 0..ctx.runs() {
        for (i, (label, name, target, charged)) in configs.iter().enumerate() {
            let measured = cache_bench(
                ctx,
                &format!("cluster-{name}-{round}"),
                target,
                &load,
                charged,
            )
            .await?;
            eprintln!(
                "xtask: {label} round {round}: {:.0} ops/s",
                measured.ops_per_sec
            );
            runs[i].push(measured);
        }
    }
    let medians: Vec<Measured> = runs.iter().map(|r| medians(r)).collect();

    let mut out = String::new();
    writeln!(
        out,
        "{}; the three servers of each kind share one CPU. {} alternating round(s), medians.",
        load.describe(),
        ctx.runs()
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| target | ops/s | p50 ms | p99 ms | p99.9 ms | servers' CPU µs/request | servers' CPU (cores) |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|")?;
    for ((label, ..), m) in configs.iter().zip(&medians) {
        writeln!(
            out,
            "| {label} | {} | {} | {} | {} | {:.1} | {:.2} |",
            thousands(m.ops_per_sec),
            ms(m.p50_us),
            ms(m.p99_us),
            ms(m.p999_us),
            m.cpu_us_per_request,
            m.cpu_cores
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "gRPC through cache-client: {:.2} × the redis-servers' ops/s; the nodes' RESP listeners: {:.2} ×.",
        medians[0].ops_per_sec / medians[2].ops_per_sec,
        medians[1].ops_per_sec / medians[2].ops_per_sec
    )?;
    Ok(out)
}

//! The `cluster` suite: a three-node cluster through `cache-client` vs
//! three `redis-server`s routed by the same ring.
//!
//! Three cache nodes (one cluster, each with a RESP listener) and three
//! `redis-server`s run pinned to the server CPU; `cache-bench`, pinned to
//! the other, drives the same load, 64 callers, five ways: the nodes over
//! gRPC through `cache_client::Client` (one HTTP/2 channel per node shared
//! by all callers) with its command stream and with unary calls, the nodes'
//! RESP listeners through `resp-ring://`, and the redis-servers through
//! `resp-ring://` (one connection per caller per server) and
//! `resp-ring-mux://` (one multiplexed connection per server shared by
//! every caller, which pipelines their commands), each key sent to the
//! server `cache_client::ring::Ring` names, with the servers given the
//! nodes' ids so that the placement is the cluster's. Then one caller,
//! reads only, through the client with and without the stream. Runs
//! alternate; the tables show medians.

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
    let load = Load {
        clients: CALLERS,
        ..Load::standard(ctx, 0.9)
    };
    let seeds = addrs
        .iter()
        .map(|a| a.grpc.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let node_resp = addrs
        .iter()
        .map(|a| {
            format!(
                "{}={}",
                a.id,
                a.resp.expect("the cluster's nodes are started with RESP")
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    let redis_ring = addrs
        .iter()
        .zip(redis)
        .map(|(a, r)| format!("{}={}", a.id, r.addr))
        .collect::<Vec<_>>()
        .join(",");
    let node_refs: Vec<&Server> = nodes.iter().collect();
    let redis_refs: Vec<&Server> = redis.iter().collect();
    let configs: [(&str, &str, String, &[&Server]); 5] = [
        (
            "3 nodes, gRPC through cache-client (command stream)",
            "grpc",
            format!("grpc://{seeds}"),
            &node_refs,
        ),
        (
            "3 nodes, gRPC through cache-client, unary calls",
            "grpc-unary",
            format!("grpc-unary://{seeds}"),
            &node_refs,
        ),
        (
            "3 nodes' RESP listeners, resp-ring",
            "node-resp",
            format!("resp-ring://{node_resp}"),
            &node_refs,
        ),
        (
            "3 redis-servers, resp-ring (a connection per caller per server)",
            "redis",
            format!("resp-ring://{redis_ring}"),
            &redis_refs,
        ),
        (
            "3 redis-servers, resp-ring-mux (one multiplexed connection per server)",
            "redis-mux",
            format!("resp-ring-mux://{redis_ring}"),
            &redis_refs,
        ),
    ];
    let runs = rounds(ctx, &configs, &load).await?;
    let many: Vec<Measured> = runs.iter().map(|r| medians(r)).collect();

    // One caller, reads only: what the stream costs an idle client.
    let single = Load {
        clients: 1,
        ..Load::standard(ctx, 1.0)
    };
    let single_configs = [configs[0].clone(), configs[1].clone()];
    let single_runs = rounds(ctx, &single_configs, &single).await?;
    let single_medians: Vec<Measured> = single_runs.iter().map(|r| medians(r)).collect();

    let mut out = String::new();
    writeln!(
        out,
        "{}; the three servers of each kind share one CPU. {} alternating round(s), medians.",
        load.describe(),
        ctx.runs()
    )?;
    writeln!(out)?;
    table(&mut out, &configs, &many)?;
    writeln!(out)?;
    let best_redis = many[3].ops_per_sec.max(many[4].ops_per_sec);
    writeln!(
        out,
        "gRPC through cache-client: {:.2} × the better redis-server row's ops/s (unary calls: {:.2} ×); the nodes' RESP listeners: {:.2} ×. Target: at least 1.00 ×: **{}**.",
        many[0].ops_per_sec / best_redis,
        many[1].ops_per_sec / best_redis,
        many[2].ops_per_sec / best_redis,
        if many[0].ops_per_sec >= best_redis {
            "met"
        } else {
            "missed"
        }
    )?;
    writeln!(out)?;
    writeln!(out, "One caller: {}.", single.describe())?;
    writeln!(out)?;
    table(&mut out, &single_configs, &single_medians)?;
    writeln!(out)?;
    writeln!(
        out,
        "`Get` p50 with one caller: {} ms over the command stream against {} ms unary. Target: no worse: **{}**.",
        ms(single_medians[0].p50_us),
        ms(single_medians[1].p50_us),
        if single_medians[0].p50_us <= single_medians[1].p50_us {
            "met"
        } else {
            "missed"
        }
    )?;
    Ok(out)
}

/// Concurrent callers in the main table (the target load).
const CALLERS: usize = 64;

/// `ctx.runs()` rounds of every configuration, alternating.
async fn rounds(
    ctx: &Ctx,
    configs: &[(&str, &str, String, &[&Server])],
    load: &Load,
) -> Result<Vec<Vec<Measured>>> {
    let mut runs: Vec<Vec<Measured>> = vec![Vec::new(); configs.len()];
    for round in 0..ctx.runs() {
        for (i, (label, name, target, charged)) in configs.iter().enumerate() {
            let measured = cache_bench(
                ctx,
                &format!("cluster-{name}-{}c-{round}", load.clients),
                target,
                load,
                charged,
            )
            .await?;
            eprintln!(
                "xtask: {label}, {} caller(s), round {round}: {:.0} ops/s",
                load.clients, measured.ops_per_sec
            );
            runs[i].push(measured);
        }
    }
    Ok(runs)
}

fn table(
    out: &mut String,
    configs: &[(&str, &str, String, &[&Server])],
    medians: &[Measured],
) -> Result<()> {
    writeln!(
        out,
        "| target | ops/s | p50 ms | p99 ms | p99.9 ms | servers' CPU µs/request | servers' CPU (cores) |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|")?;
    for ((label, ..), m) in configs.iter().zip(medians) {
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
    Ok(())
}

//! Edges of the consistency contracts that need real nodes: a loader that
//! fails under a lease (the lease must go back at once), and a write that
//! the network delivers to a node after the client gave it up and flushed
//! the node (it must not land).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use cache_client::strategy::{KeyspaceSettings, Lookup, Strategy};
use cache_client::{Client, ClientConfig, SetOptions};
use ringcache_tests::chaos::{Fault, FaultProxy};
use ringcache_tests::write_back::scrape;
use ringcache_tests::{NodeConfig, NodeProcess, cluster};

/// Generous bound on waits for conditions that must come true; a working
/// system meets them in well under a second.
const WAIT: Duration = Duration::from_secs(60);

/// Polls until `check` holds, at most [`WAIT`].
async fn eventually<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    while !check().await? {
        ensure!(
            start.elapsed() < WAIT,
            "{what} did not happen within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // polling a condition
    }
    Ok(())
}

#[tokio::test]
async fn a_failing_loader_hands_the_lease_back_so_the_next_reader_loads_at_once() -> Result<()> {
    let nodes = cluster(1).await?;
    let client = Client::connect(
        ClientConfig::new(nodes.iter().map(|n| n.addr().to_string()))
            .with_request_timeout(Duration::from_secs(5)),
    )
    .await?;
    // A long lease wait: a reader that found the lease held would wait for
    // it rather than load, which is what this test must not see.
    client.define_keyspace(
        "flaky",
        KeyspaceSettings::new(Strategy::CacheAside).with_lease_wait(Duration::from_secs(60)),
        None,
    )?;
    let flaky = client.keyspace("flaky");

    let failed = flaky
        .get_or_load("k", || async {
            Err::<Option<(Bytes, u64)>, _>("injected: the database is down")
        })
        .await;
    ensure!(
        failed.is_err(),
        "the loader's error is returned: {failed:?}"
    );
    match flaky.lookup("k").await? {
        Lookup::Miss(lease) => {
            // Cache-aside callers hand a lease back themselves when their
            // load fails.
            flaky.release(lease).await?;
        }
        other => bail!(
            "after the loader failed, the next reader should get the lease at once, got {other:?}"
        ),
    }
    ensure!(
        matches!(flaky.lookup("k").await?, Lookup::Miss(_)),
        "a released cache-aside lease goes to the next reader"
    );
    Ok(())
}

/// The number of `Set` requests the node behind `metrics` has answered.
async fn sets_answered(metrics: std::net::SocketAddr) -> Result<f64> {
    let text = scrape(metrics).await?;
    let prefix = "ringcache_node_request_duration_seconds_count{rpc=\"Set\"}";
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix(prefix))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or(0.0))
}

/// A node the client gave up on is flushed and re-admitted over a new
/// connection, while a `Set` sent on the old connection is still on its way
/// (held by the network: a kernel retransmitting the closed connection's
/// last segments after a partition). When it arrives after the flush, it
/// must not land: the value it carries was overwritten on another node
/// meanwhile.
#[tokio::test]
async fn a_write_the_network_delivers_after_the_readmission_flush_does_not_land() -> Result<()> {
    let mut configs = NodeConfig::cluster(2)?;
    let proxy = FaultProxy::start(configs[0].listen).await?;
    let members = vec![
        (configs[0].node_id.clone(), proxy.addr()),
        (configs[1].node_id.clone(), configs[1].listen),
    ];
    for config in &mut configs {
        config.members.clone_from(&members);
        config.extra_top_level = "unknown_keyspaces = \"create\"\n".into();
    }
    let mut nodes = Vec::new();
    for config in &configs {
        nodes.push(NodeProcess::start(config.clone()).await?);
    }
    let behind_proxy = configs[0].node_id.clone();
    let client = Client::connect(
        ClientConfig::new([proxy.addr().to_string(), configs[1].listen.to_string()])
            .with_request_timeout(Duration::from_millis(300))
            .with_deadline(Duration::from_secs(5))
            .with_failure_threshold(2)
            .with_probe_interval(Duration::from_millis(50)),
    )
    .await?;
    let key = (0..1000)
        .map(|i| format!("k{i}"))
        .find(|k| client.owners("late", k.as_bytes())[0] == behind_proxy)
        .context("a key owned by the node behind the proxy")?;
    let fenced = |version| SetOptions::new().version(version).if_newer_version();
    client.set("late", &key, "v0", fenced(1)).await?;

    // The network holds what the client sends to the node: the write of v1
    // times out there, the node is marked down, and the write goes to the
    // other node; so does the newer v2.
    proxy.set(Fault::blackhole()).await?;
    client.set("late", &key, "v1", fenced(2)).await?;
    client.set("late", &key, "v2", fenced(3)).await?;
    ensure!(
        client
            .topology()
            .members
            .iter()
            .any(|m| m.id == behind_proxy && !m.up),
        "the write that timed out marked the node down"
    );
    let sets_before = sets_answered(configs[0].metrics_listen).await?;

    // The client gives the old connection up and reaches the node over a new
    // one: it flushes the node and routes to it again. The old connection's
    // bytes, the write of v1 among them, are still held.
    proxy.set(Fault::Strand).await?;
    eventually("the node's re-admission", || {
        let up = client
            .topology()
            .members
            .iter()
            .any(|m| m.id == behind_proxy && m.up);
        async move { Ok(up) }
    })
    .await?;

    // Now the network delivers the held write, and its cancellation as a
    // separate arrival after it (see the proxy's strand).
    proxy.heal().await?;
    tokio::time::timeout(WAIT, proxy.handle().stranded_delivered(1))
        .await
        .context("the held bytes were not delivered")??;
    let sets_after = sets_answered(configs[0].metrics_listen).await?;
    let read = client
        .get("late", &key)
        .await?
        .map(|e| (e.value, e.version));
    ensure!(
        read.is_none() || read == Some((Bytes::from_static(b"v2"), 3)),
        "after re-admission the node serves {read:?}: the write of v1, sent before the \
         flush and delivered after it, landed over the newer v2 \
         (Set requests answered: {sets_before} before the delivery, {sets_after} after)"
    );
    drop(nodes);
    Ok(())
}

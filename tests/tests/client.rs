//! The client against real `cache-node` processes: routing, batching,
//! failover on SIGKILL, no stale values after SIGSTOP/SIGCONT, replication.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use cache_client::codec::Json;
use cache_client::ring::{Ring, RingNode};
use cache_client::{Client, ClientConfig, Replication, SetOptions};
use ringcache_proto::v1::{self, cache_node_client::CacheNodeClient};
use ringcache_tests::{NodeConfig, NodeProcess};

/// Failure detection settings of these tests: a node is marked down after
/// two consecutive failures, each attempt times out after 250 ms, and down
/// nodes are probed every 100 ms.
fn client_config(nodes: &[NodeProcess]) -> ClientConfig {
    ClientConfig::new(nodes.iter().map(|n| n.addr().to_string()))
        .with_request_timeout(Duration::from_millis(250))
        .with_deadline(Duration::from_secs(3))
        .with_failure_threshold(2)
        .with_probe_interval(Duration::from_millis(100))
}

async fn cluster(n: usize) -> Result<Vec<NodeProcess>> {
    let mut nodes = Vec::new();
    for config in NodeConfig::cluster(n)? {
        nodes.push(NodeProcess::start(config).await?);
    }
    Ok(nodes)
}

/// Polls `check` every 20 ms until it holds or `timeout` passes.
async fn eventually(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    while !check() {
        ensure!(
            start.elapsed() < timeout,
            "{what} did not happen within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(start.elapsed())
}

fn is_up(client: &Client, id: &str) -> bool {
    client.topology().members.iter().any(|m| m.id == id && m.up)
}

#[tokio::test]
async fn every_key_lands_on_the_node_the_ring_says() -> Result<()> {
    let nodes = cluster(3).await?;
    let client = Client::connect(client_config(&nodes)).await?;
    let topology = client.topology();
    assert_eq!(topology.members.len(), 3);
    // An independent ring built from the documented rules must agree.
    let ring = Ring::new(
        nodes
            .iter()
            .map(|n| RingNode::new(n.config().node_id.clone(), 1)),
    );
    let keys: Vec<String> = (0..300).map(|i| format!("user:{i}")).collect();
    for key in &keys {
        client
            .set(
                "default",
                key,
                Bytes::from(key.clone()),
                SetOptions::new().version(1),
            )
            .await?;
    }
    let mut per_node = Vec::new();
    for node in &nodes {
        let mut direct = CacheNodeClient::connect(node.endpoint()).await?;
        let mut held = 0;
        for key in &keys {
            let found = direct
                .get(v1::GetRequest {
                    keyspace: "default".into(),
                    key: key.clone().into_bytes().into(),
                })
                .await?
                .into_inner()
                .entry
                .is_some();
            let owner = ring
                .owner("default", key.as_bytes())
                .context("ring has nodes")?;
            assert_eq!(
                found,
                owner == node.config().node_id,
                "{key} on {}",
                node.config().node_id
            );
            assert_eq!(client.owners("default", key.as_bytes()), [owner]);
            held += usize::from(found);
        }
        per_node.push(held);
    }
    assert_eq!(per_node.iter().sum::<usize>(), keys.len());
    assert!(
        per_node.iter().all(|&n| n > 50),
        "keys spread over all nodes: {per_node:?}"
    );
    Ok(())
}

#[tokio::test]
async fn batches_fan_out_and_keep_request_order() -> Result<()> {
    let nodes = cluster(3).await?;
    let client = Client::connect(client_config(&nodes)).await?;
    let items: Vec<_> = (0..50)
        .map(|i| {
            (
                Bytes::from(format!("k{i}")),
                Bytes::from(format!("v{i}")),
                SetOptions::new().version(i),
            )
        })
        .collect();
    let outcomes = client.multi_set("default", items).await?;
    assert!(outcomes.iter().all(|o| o.is_stored()));
    let mut keys: Vec<Bytes> = (0..60)
        .rev()
        .map(|i| Bytes::from(format!("k{i}")))
        .collect();
    keys.push(Bytes::from_static(b"k7"));
    let entries = client.multi_get("default", &keys).await?;
    for (key, entry) in keys.iter().zip(&entries) {
        let i: u64 = std::str::from_utf8(&key[1..])?.parse()?;
        match entry {
            Some(e) => {
                assert!(i < 50);
                assert_eq!(e.value, format!("v{i}"));
                assert_eq!(e.version, i);
            }
            None => assert!(i >= 50, "k{i} missing"),
        }
    }
    // Typed values through the JSON codec.
    let typed = client.typed::<Vec<String>, _>("default", Json);
    typed
        .set(
            "list",
            &vec!["a".to_owned(), "b".to_owned()],
            SetOptions::new().version(3),
        )
        .await?;
    assert_eq!(
        typed.get("list").await?,
        Some((vec!["a".to_owned(), "b".to_owned()], 3))
    );
    // A fenced write through the client is refused, and says so.
    let outcome = client
        .set(
            "default",
            "k1",
            "old",
            SetOptions::new().version(0).if_newer_version(),
        )
        .await?;
    assert_eq!(
        outcome,
        cache_client::SetOutcome::StaleVersion { current_version: 1 }
    );
    // A bad request is refused, not retried into an availability error.
    let err = client.get("nope", "k").await.unwrap_err();
    assert!(matches!(err, cache_client::Error::Refused { .. }), "{err}");
    Ok(())
}

/// SIGKILL one node of three under a steady load. Detection figure: with
/// `failure_threshold = 2` and a refused connection failing at once, the
/// client marks the node down well within 2 s; every operation that starts
/// after that succeeds. Restarted, the node is re-admitted.
#[tokio::test]
async fn killing_a_node_under_load_keeps_operations_succeeding() -> Result<()> {
    const DETECTION: Duration = Duration::from_secs(2);
    let mut nodes = cluster(3).await?;
    let client = Client::connect(client_config(&nodes)).await?;
    let victim = nodes[1].config().node_id.clone();

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..4u64 {
        let client = client.clone();
        let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
        workers.push(tokio::spawn(async move {
            let mut log: Vec<(Instant, bool)> = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && i < 100_000 {
                let key = format!("load:{}", (w * 1000 + i) % 500);
                let started = Instant::now();
                let ok = if i.is_multiple_of(2) {
                    client
                        .set("default", &key, "v", SetOptions::new().version(i))
                        .await
                        .is_ok()
                } else {
                    client.get("default", &key).await.is_ok()
                };
                log.push((started, ok));
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            log
        }));
    }
    let ops = Arc::clone(&done);
    eventually(
        Duration::from_secs(30),
        "200 operations before the fault",
        || ops.load(Ordering::Relaxed) >= 200,
    )
    .await?;
    let killed_at = Instant::now();
    nodes[1].sigkill()?;
    let detected = eventually(DETECTION, "marking the killed node down", || {
        !is_up(&client, &victim)
    })
    .await?;
    println!("killed node marked down after {detected:?}");
    // Keep the load going past the detection time, and for 500 more
    // operations at least.
    let floor = done.load(Ordering::Relaxed) + 500;
    eventually(
        Duration::from_secs(60),
        "500 operations after detection",
        || killed_at.elapsed() > DETECTION && ops.load(Ordering::Relaxed) >= floor,
    )
    .await?;
    stop.store(true, Ordering::Relaxed);
    let mut after = 0;
    for worker in workers {
        for (started, ok) in worker.await? {
            if started >= killed_at + DETECTION {
                after += 1;
                assert!(
                    ok,
                    "an operation started {:?} after the kill failed",
                    started - killed_at
                );
            }
        }
    }
    ensure!(after > 0, "the load kept running after the detection time");

    // Restart it on the same address: the prober re-admits it.
    let config = nodes[1].config().clone();
    nodes[1] = NodeProcess::start(config).await?;
    let readmitted = eventually(Duration::from_secs(10), "re-admission", || {
        is_up(&client, &victim)
    })
    .await?;
    println!("restarted node re-admitted after {readmitted:?}");
    Ok(())
}

/// SIGSTOP the owner of some keys, overwrite them (the writes go elsewhere),
/// SIGCONT it, and read: the client flushes a node it routed around before
/// it routes to it again, so the old values must never come back.
#[tokio::test]
async fn a_resumed_node_does_not_serve_values_that_went_stale() -> Result<()> {
    let mut nodes = cluster(3).await?;
    let client = Client::connect(client_config(&nodes)).await?;
    let victim = nodes[0].config().node_id.clone();
    let keys: Vec<String> = (0..400)
        .map(|i| format!("paused:{i}"))
        .filter(|k| client.owners("default", k.as_bytes())[0] == victim)
        .take(20)
        .collect();
    ensure!(keys.len() == 20, "found keys owned by the victim");
    for key in &keys {
        client
            .set("default", key, "old", SetOptions::new().version(1))
            .await?;
    }

    nodes[0].sigstop()?;
    for key in &keys {
        client
            .set("default", key, "new", SetOptions::new().version(2))
            .await?;
    }
    assert!(
        !is_up(&client, &victim),
        "writes to the paused node failed over"
    );
    nodes[0].sigcont()?;
    eventually(
        Duration::from_secs(10),
        "re-admission of the resumed node",
        || is_up(&client, &victim),
    )
    .await?;

    for key in &keys {
        assert_eq!(
            client.owners("default", key.as_bytes())[0],
            victim,
            "read goes to the resumed owner"
        );
        let entry = client.get("default", key).await?;
        assert!(
            entry
                .as_ref()
                .is_none_or(|e| e.value == "new" && e.version == 2),
            "{key} read {entry:?}: a stale value came back"
        );
    }
    Ok(())
}

#[tokio::test]
async fn with_two_replicas_killing_a_node_loses_no_cached_key() -> Result<()> {
    let mut nodes = cluster(3).await?;
    let config = client_config(&nodes).with_keyspace_replication("default", Replication::new(2));
    let client = Client::connect(config).await?;
    let keys: Vec<String> = (0..300).map(|i| format!("replicated:{i}")).collect();
    for key in &keys {
        client
            .set(
                "default",
                key,
                Bytes::from(key.clone()),
                SetOptions::new().version(1),
            )
            .await?;
    }
    nodes[2].sigkill()?;
    let mut misses = Vec::new();
    for key in &keys {
        match client.get("default", key).await? {
            Some(e) => assert_eq!(e.value, key.as_str()),
            None => misses.push(key.clone()),
        }
    }
    assert!(misses.is_empty(), "lost {} keys: {misses:?}", misses.len());
    Ok(())
}

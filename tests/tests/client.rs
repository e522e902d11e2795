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
    // Keep the load going past the detection time, then for 500 more
    // operations (counted from there, so that at least 496 of them, all
    // but the 4 in flight, started after it).
    eventually(
        Duration::from_secs(10),
        "the detection time passing",
        || killed_at.elapsed() > DETECTION,
    )
    .await?;
    let floor = done.load(Ordering::Relaxed) + 500;
    eventually(
        Duration::from_secs(60),
        "500 operations after the detection time",
        || ops.load(Ordering::Relaxed) >= floor,
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

/// A member list with a greater epoch replaces the one in use; the client
/// learns it from the periodic refresh, without restarting.
#[tokio::test]
async fn a_newer_epoch_replaces_the_member_list() -> Result<()> {
    let mut configs = NodeConfig::cluster(3)?;
    let all = configs[0].members.clone();
    for config in &mut configs[..2] {
        config.members.truncate(2);
    }
    configs[2].epoch = 2;
    let mut nodes = Vec::new();
    for config in configs {
        nodes.push(NodeProcess::start(config).await?);
    }
    let client = Client::connect(
        ClientConfig::new([nodes[0].addr().to_string()])
            .with_refresh_interval(Duration::from_millis(100)),
    )
    .await?;
    assert_eq!(client.topology().epoch, 1);
    assert_eq!(client.topology().members.len(), 2);

    // Reconfigure node-2 with the three-member list at epoch 2.
    nodes[1].sigterm()?;
    nodes[1].wait_exit(Duration::from_secs(10)).await?;
    let mut config = nodes[1].config().clone();
    config.members = all;
    config.epoch = 2;
    nodes[1] = NodeProcess::start(config).await?;

    eventually(Duration::from_secs(10), "adopting epoch 2", || {
        client.topology().epoch == 2
    })
    .await?;
    let ids: Vec<String> = client
        .topology()
        .members
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, ["node-1", "node-2", "node-3"]);
    // node-3 now owns keys and holds them.
    let key = (0..1000)
        .map(|i| format!("epoch:{i}"))
        .find(|k| client.owners("default", k.as_bytes())[0] == "node-3")
        .context("some key belongs to node-3")?;
    client.set("default", &key, "v", SetOptions::new()).await?;
    let mut direct = CacheNodeClient::connect(nodes[2].endpoint()).await?;
    let held = direct
        .get(v1::GetRequest {
            keyspace: "default".into(),
            key: key.into_bytes().into(),
        })
        .await?
        .into_inner();
    assert!(held.entry.is_some());
    Ok(())
}

#[tokio::test]
async fn a_write_quorum_is_enforced() -> Result<()> {
    let mut nodes = cluster(2).await?;
    let strict = Client::connect(
        client_config(&nodes).with_keyspace_replication("default", Replication::new(2)),
    )
    .await?;
    let lenient = Client::connect(
        client_config(&nodes)
            .with_keyspace_replication("default", Replication::new(2).with_write_quorum(1)),
    )
    .await?;
    strict
        .set("default", "q", "both", SetOptions::new().version(1))
        .await?;
    nodes[1].sigkill()?;
    let err = strict
        .set("default", "q", "one", SetOptions::new().version(2))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            cache_client::Error::QuorumNotReached {
                acked: 1,
                needed: 2,
                ..
            }
        ),
        "{err}"
    );
    lenient
        .set("default", "q", "one", SetOptions::new().version(3))
        .await?;
    Ok(())
}

/// Only idempotent calls are retried: an `IfAbsent` write to a paused owner
/// fails after one attempt, while an unconditional write fails over.
#[tokio::test]
async fn only_idempotent_writes_are_retried() -> Result<()> {
    let mut nodes = cluster(3).await?;
    let client = Client::connect(client_config(&nodes)).await?;
    let victim = nodes[0].config().node_id.clone();
    let owned: Vec<String> = (0..400)
        .map(|i| format!("retry:{i}"))
        .filter(|k| client.owners("default", k.as_bytes())[0] == victim)
        .take(2)
        .collect();
    nodes[0].sigstop()?;
    let err = client
        .set("default", &owned[0], "v", SetOptions::new().if_absent())
        .await
        .unwrap_err();
    assert!(
        err.is_retryable() && matches!(err, cache_client::Error::Unavailable { .. }),
        "{err}"
    );
    client
        .set("default", &owned[1], "v", SetOptions::new())
        .await?;
    nodes[0].sigcont()?;
    Ok(())
}

/// Established server-side TCP connections to `port`, from /proc/net/tcp.
fn established_to(port: u16) -> Result<usize> {
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    Ok(table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1).and_then(|a| a.rsplit(':').next());
            local_port.and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
                && fields.get(3) == Some(&"01")
        })
        .count())
}

/// One HTTP/2 channel per node: hundreds of calls from many tasks open no
/// more connections (the seed connection made at start-up may linger).
#[tokio::test]
async fn calls_reuse_one_connection_per_node() -> Result<()> {
    let nodes = cluster(3).await?;
    let client = Client::connect(client_config(&nodes)).await?;
    let mut tasks = Vec::new();
    for t in 0..10 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..30 {
                let key = format!("conn:{t}:{i}");
                client.set("default", &key, "v", SetOptions::new()).await?;
                client.get("default", &key).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    for node in &nodes {
        let connections = established_to(node.addr().port())?;
        assert!(
            (1..=2).contains(&connections),
            "{} has {connections} connections after 600 calls",
            node.config().node_id
        );
    }
    Ok(())
}

fn cachectl(nodes: &[NodeProcess], args: &[&str]) -> Result<std::process::Output> {
    let binary = ringcache_tests::node_binary()?.with_file_name("cachectl");
    let seeds: Vec<String> = nodes.iter().map(|n| n.addr().to_string()).collect();
    std::process::Command::new(&binary)
        .arg("--seeds")
        .arg(seeds.join(","))
        .args(args)
        .output()
        .with_context(|| {
            format!(
                "cannot run {} (built by cargo build --bins)",
                binary.display()
            )
        })
}

#[tokio::test]
async fn cachectl_commands_and_exit_status() -> Result<()> {
    let nodes = cluster(3).await?;
    let run = |args: &[&str]| -> Result<(bool, String, String)> {
        let out = cachectl(&nodes, args)?;
        Ok((
            out.status.success(),
            String::from_utf8(out.stdout)?,
            String::from_utf8(out.stderr)?,
        ))
    };
    assert!(run(&["set", "a", "1", "--version", "3"])?.0);
    assert!(run(&["set", "b", "2"])?.0);
    let (ok, out, _) = run(&["--json", "mget", "a", "missing", "b"])?;
    assert!(ok);
    let rows: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(rows[0]["value"], "1");
    assert_eq!(rows[0]["version"], 3);
    assert_eq!(rows[1]["found"], false);
    assert_eq!(rows[2]["value"], "2");
    let (ok, out, _) = run(&["del", "a"])?;
    assert!(ok && out.trim() == "deleted", "{out}");
    let (ok, _, err) = run(&["get", "a"])?;
    assert!(!ok, "a miss in text mode exits non-zero");
    assert_eq!(err.trim().lines().count(), 1, "one-line reason: {err}");
    let (ok, out, _) = run(&["--json", "topology"])?;
    assert!(ok);
    let topology: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(topology["members"].as_array().map(Vec::len), Some(3));
    let (ok, out, _) = run(&["--json", "ring", "--sample", "30000"])?;
    assert!(ok);
    let balance: serde_json::Value = serde_json::from_str(&out)?;
    assert!(
        balance["max_over_mean"].as_f64().is_some_and(|r| r < 1.2),
        "{balance}"
    );
    // An unreachable pool: exit 1 with one line naming the seeds.
    let out =
        std::process::Command::new(ringcache_tests::node_binary()?.with_file_name("cachectl"))
            .args(["--seeds", "127.0.0.1:1", "--deadline", "1s", "get", "x"])
            .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr)?;
    assert!(
        err.starts_with("cachectl: cannot reach the pool at 127.0.0.1:1"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    Ok(())
}

/// `cachectl plan` is arithmetic only: it answers with no pool to reach,
/// its JSON carries the sizing, a bad input exits 1 with one line naming
/// it, and the entry charge it sizes `capacity_bytes` with is the node's.
#[test]
fn cachectl_plan_sizes_a_pool_without_one() -> Result<()> {
    assert_eq!(
        cache_client::plan::NODE_ENTRY_CHARGE_BYTES,
        cache_node::store::ENTRY_OVERHEAD_BYTES,
        "plan must charge entries as the node does"
    );
    let binary = ringcache_tests::node_binary()?.with_file_name("cachectl");
    let run = |args: &[&str]| -> Result<std::process::Output> {
        std::process::Command::new(&binary)
            // Unreachable: plan must not try it.
            .args(["--seeds", "127.0.0.1:1"])
            .args(args)
            .output()
            .with_context(|| format!("cannot run {}", binary.display()))
    };
    let out = run(&[
        "--json",
        "plan",
        "--keys",
        "100000000",
        "--value-bytes",
        "1KiB",
        "--replicas",
        "2",
        "--reads",
        "200000",
        "--writes",
        "20000",
        "--write-back-writes",
        "5000",
        "--node-memory",
        "16GiB",
        "--node-ops",
        "50000",
    ])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    // 1e8 keys × (32 + 1024 + 73) B × 2 copies, plus the dirty copies of
    // the 18 M keys an hour's outage leaves at 5000 write-back writes/s:
    // 266.4 GB; × 1.1 over 16 GiB × 0.7 = 24.37 → 25 nodes, one spare.
    assert_eq!(plan["total_bytes"], 266_444_000_000u64);
    assert_eq!(plan["nodes_for_memory"], 25);
    assert_eq!(plan["limited_by"], "memory");
    assert_eq!(plan["nodes"], 26);
    // 200k reads + 20k writes × 2 copies.
    assert_eq!(plan["node_requests_per_sec"], 240_000.0);
    let wb = &plan["write_back"];
    assert_eq!(wb["workers"], 4);
    assert_eq!(wb["partitions"], 8);
    // 7 days of 5000 records/s of 32 + 1024 + 80 bytes, 3 replicas.
    assert_eq!(wb["kafka_storage_bytes"], 5000u64 * 1136 * 7 * 86_400 * 3);

    let out = run(&["plan", "--keys", "1000000", "--value-bytes", "200"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    assert!(text.contains("nodes           2  (set by memory"), "{text}");
    assert!(text.contains("capacity_bytes"), "{text}");
    assert!(!text.contains("kafka"), "no write-back, no Kafka: {text}");

    let out = run(&[
        "plan",
        "--keys",
        "10",
        "--value-bytes",
        "10",
        "--headroom",
        "1.5",
    ])?;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr)?;
    assert_eq!(
        err.trim(),
        "cachectl: invalid plan input: headroom: must be in [0, 1)"
    );
    Ok(())
}

//! The write-back strategy end to end: the client writes the cache (dirty)
//! and the Kafka topic, the worker stores the records in PostgreSQL.
//! Against real nodes, the broker and PostgreSQL from `cargo xtask test`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use bytes::Bytes;
use cache_client::producer::WriteBackConfig;
use cache_client::store::{Loaded, PgStore, Store};
use cache_client::strategy::{Ack, KeyspaceSettings, Strategy};
use cache_client::{Client, ClientConfig};
use ringcache_tests::{NodeProcess, cluster};

async fn own_database(prefix: &str) -> Result<(String, Arc<PgStore>)> {
    let (url, store) = ringcache_tests::own_database(prefix).await?;
    Ok((url, Arc::new(store)))
}

async fn client(nodes: &[NodeProcess], brokers: &str, delivery: Duration) -> Result<Client> {
    let client = Client::connect(
        ClientConfig::new(nodes.iter().map(|n| n.addr().to_string()))
            .with_request_timeout(Duration::from_millis(300)),
    )
    .await?;
    let mut config = WriteBackConfig::new(brokers);
    config.delivery_timeout = delivery;
    client.enable_write_back(config)?;
    Ok(client)
}

#[tokio::test]
async fn writes_are_read_back_at_once_and_stored_by_the_worker() -> Result<()> {
    let nodes = cluster(3).await?;
    let (url, pg) = own_database("rc_wb_e2e").await?;
    let brokers = ringcache_tests::kafka_brokers()?;
    let client = client(&nodes, &brokers, Duration::from_secs(10)).await?;
    client.define_keyspace(
        "wbe2e",
        KeyspaceSettings::new(Strategy::WriteBack),
        Some(pg.clone()),
    )?;
    client.ensure_write_back_topics().await?;
    let ks = client.keyspace("wbe2e");

    let mut expected = Vec::new();
    for i in 0..40 {
        let key = format!("k{}", i % 20);
        let value = format!("v{i}");
        let written = ks.put(&key, value.clone()).await?;
        // Read-your-writes: the cache has it before PostgreSQL does.
        assert_eq!(ks.get(&key).await?, Some(Bytes::from(value.clone())));
        expected.retain(|(k, _, _): &(String, String, u64)| *k != key);
        expected.push((key, value, written.version));
    }
    ks.remove("k0").await?;
    assert_eq!(ks.get("k0").await?, None, "a queued delete reads as absent");

    let worker_config = write_back_worker::Config {
        brokers: brokers.clone(),
        database_url: url,
        group: "rc_wb_e2e".into(),
        keyspaces: vec!["wbe2e".into()],
        cache_seeds: nodes.iter().map(|n| n.addr().to_string()).collect(),
        metrics_listen: None,
        ..write_back_worker::Config::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(write_back_worker::run(worker_config, async {
        let _ = stopped.await;
    }));

    let deadline = Instant::now() + Duration::from_secs(60);
    for (key, value, version) in &expected {
        loop {
            let row = pg.load("wbe2e", key.as_bytes()).await?;
            let done = match (&row, key.as_str()) {
                (Loaded::Absent { version: v }, "k0") => *v > *version,
                (Loaded::Present(r), _) => r.version == *version && r.value == value.as_str(),
                _ => false,
            };
            if done {
                break;
            }
            ensure!(Instant::now() < deadline, "{key} not stored: {row:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The worker told the nodes: no entry stays dirty.
    let dirty = || async {
        let mut total = 0;
        for node in client.stats().await {
            let stats = node.stats?;
            total += stats
                .keyspaces
                .iter()
                .filter(|k| k.name == "wbe2e")
                .map(|k| k.dirty_items)
                .sum::<u64>();
        }
        anyhow::Ok(total)
    };
    while dirty().await? > 0 {
        ensure!(
            Instant::now() < deadline,
            "dirty entries left: {}",
            dirty().await?
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Clean entries still read back, from the cache.
    assert_eq!(ks.get("k1").await?, Some(Bytes::from_static(b"v21")));
    let _ = stop.send(());
    worker.await??;
    Ok(())
}

/// A durable write the broker refuses fails and is not served; one the
/// broker does not answer (its outcome unknown) fails too, but is served
/// (a dirty entry) and sent again until the broker takes it.
#[tokio::test]
async fn a_durable_write_the_broker_refuses_is_not_served_one_it_does_not_answer_is() -> Result<()>
{
    let nodes = cluster(1).await?;
    let (_url, pg) = own_database("rc_wb_down").await?;
    // Nothing listens on port 1: the broker never answers.
    let client = client(&nodes, "127.0.0.1:1", Duration::from_millis(500)).await?;
    client.define_keyspace(
        "wbdown",
        KeyspaceSettings::new(Strategy::WriteBack),
        Some(pg.clone()),
    )?;
    let ks = client.keyspace("wbdown");
    // Above the producer's `message.max.bytes`: refused before it is sent.
    let err = ks.put("big", vec![b'x'; 2 << 20]).await.unwrap_err();
    assert!(err.to_string().contains("did not take the record"), "{err}");
    assert_eq!(
        ks.get("big").await?,
        None,
        "a write the broker refused is not served"
    );
    let err = ks.put("k", "unanswered").await.unwrap_err();
    assert!(err.to_string().contains("outcome unknown"), "{err}");
    assert_eq!(
        ks.get("k").await?,
        Some(Bytes::from_static(b"unanswered")),
        "a write whose outcome is unknown is served: the client sends it until the broker takes it"
    );

    // A fast write returns at once; its failure reaches the callback.
    let failures = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&failures);
    client.on_write_back_failure(Box::new(move |record, _error| {
        assert_eq!(&record.key[..], b"f");
        seen.fetch_add(1, Ordering::SeqCst);
    }));
    client.define_keyspace(
        "wbdown",
        KeyspaceSettings::new(Strategy::WriteBack).with_ack(Ack::Fast),
        Some(pg.clone()),
    )?;
    ks.put("f", "fast").await?;
    let start = Instant::now();
    while failures.load(Ordering::SeqCst) == 0 {
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "the failure callback ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Dirty entries (items) of `keyspace` over all nodes.
async fn dirty_items(client: &Client, keyspace: &str) -> Result<u64> {
    let mut total = 0;
    for node in client.stats().await {
        let stats = node.stats?;
        total += stats
            .keyspaces
            .iter()
            .filter(|k| k.name == keyspace)
            .map(|k| k.dirty_items)
            .sum::<u64>();
    }
    Ok(total)
}

/// A worker that stored writes without telling the nodes (as if it had
/// crashed between its commit and `MarkClean`) leaves them dirty; the next
/// worker's repair round finds them, sees the store holds their versions,
/// and marks them clean, while a dirty entry the store does not hold yet
/// (a write still on its way) stays dirty.
#[tokio::test]
async fn lost_mark_cleans_are_repaired_and_unstored_entries_left_dirty() -> Result<()> {
    let nodes = cluster(2).await?;
    let (url, pg) = own_database("rc_wb_repair").await?;
    let brokers = ringcache_tests::kafka_brokers()?;
    let client = client(&nodes, &brokers, Duration::from_secs(10)).await?;
    let keyspace = ringcache_tests::unique("wbrepair");
    client.define_keyspace(
        &keyspace,
        KeyspaceSettings::new(Strategy::WriteBack),
        Some(pg.clone()),
    )?;
    client.ensure_write_back_topics().await?;
    let ks = client.keyspace(&keyspace);
    let mut last = 0;
    for i in 0..20 {
        last = ks.put(format!("k{i}"), format!("v{i}")).await?.version;
    }

    let group = format!("{keyspace}_group");
    let config = write_back_worker::Config {
        brokers: brokers.clone(),
        database_url: url,
        group: group.clone(),
        keyspaces: vec![keyspace.clone()],
        metrics_listen: None,
        dead_letter_topic: ringcache_tests::dead_letter_topic(&group),
        dirty_repair_interval: Duration::from_millis(500),
        ..write_back_worker::Config::default()
    };
    // First worker: no cache seeds, so it tells nobody what it stored.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let first = tokio::spawn(write_back_worker::run(config.clone(), async {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stored = pg.load(&keyspace, b"k19").await?;
        if matches!(&stored, Loaded::Present(row) if row.version == last) {
            break;
        }
        ensure!(Instant::now() < deadline, "k19 never stored: {stored:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    first.await??;
    ensure!(
        dirty_items(&client, &keyspace).await? >= 20,
        "the stored writes are still dirty on the nodes"
    );

    // A dirty entry written straight to a node, never queued: the store
    // does not hold it, so no repair may clean it.
    let mut node = ringcache_proto::v1::cache_node_client::CacheNodeClient::connect(format!(
        "http://{}",
        nodes[0].addr()
    ))
    .await?;
    node.set(ringcache_proto::v1::SetRequest {
        keyspace: keyspace.clone(),
        item: Some(ringcache_proto::v1::SetItem {
            key: Bytes::from_static(b"in-flight"),
            value: Bytes::from_static(b"\0x"),
            version: 7,
            dirty: true,
            ..Default::default()
        }),
    })
    .await?;
    let before = dirty_items(&client, &keyspace).await?;

    // Second worker, same group: it resumes after the stored offsets, so
    // only its repair round can clean the entries.
    let config = write_back_worker::Config {
        cache_seeds: nodes.iter().map(|n| n.addr().to_string()).collect(),
        ..config
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let second = tokio::spawn(write_back_worker::run(config, async {
        let _ = stopped.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let dirty = dirty_items(&client, &keyspace).await?;
        if dirty == 1 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{dirty} dirty entries left of {before}, expected only the unstored one"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    second.await??;
    ensure!(
        dirty_items(&client, &keyspace).await? == 1,
        "the unstored entry stays dirty"
    );
    Ok(())
}

/// A worker started before its cache nodes are reachable keeps trying in
/// the background and, once it reaches them, marks what it stores clean.
#[tokio::test]
async fn a_worker_started_before_its_cache_nodes_marks_clean_once_they_are_up() -> Result<()> {
    let (url, pg) = own_database("rc_wb_late_nodes").await?;
    let brokers = ringcache_tests::kafka_brokers()?;
    let mut config = ringcache_tests::NodeConfig::single("late-node")?;
    config.extra_top_level = "unknown_keyspaces = \"create\"\n".into();
    let keyspace = ringcache_tests::unique("wblate");
    let group = format!("{keyspace}_group");

    // The worker first: nothing listens on the node's address yet.
    let worker_config = write_back_worker::Config {
        brokers: brokers.clone(),
        database_url: url,
        group: group.clone(),
        keyspaces: vec![keyspace.clone()],
        cache_seeds: vec![config.listen.to_string()],
        metrics_listen: None,
        dead_letter_topic: ringcache_tests::dead_letter_topic(&group),
        // Out of the way: only the worker's own MarkClean may clean them.
        dirty_repair_interval: Duration::from_secs(3600),
        ..write_back_worker::Config::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(write_back_worker::run(worker_config, async {
        let _ = stopped.await;
    }));

    let node = NodeProcess::start(config).await?;
    let nodes = [node];
    let client = client(&nodes, &brokers, Duration::from_secs(10)).await?;
    client.define_keyspace(
        &keyspace,
        KeyspaceSettings::new(Strategy::WriteBack),
        Some(pg.clone()),
    )?;
    client.ensure_write_back_topics().await?;
    let ks = client.keyspace(&keyspace);
    for i in 0..10 {
        ks.put(format!("k{i}"), format!("v{i}")).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let dirty = dirty_items(&client, &keyspace).await?;
        let stored = matches!(pg.load(&keyspace, b"k9").await?, Loaded::Present(_));
        if stored && dirty == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{dirty} entries still dirty (k9 stored: {stored})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    worker.await??;
    Ok(())
}

/// A worker subscribed to a keyspace whose topic does not exist yet (the
/// worker was deployed before the first client created it) takes the topic
/// up soon after it is created, not at librdkafka's default metadata
/// refresh five minutes later.
#[tokio::test]
async fn a_worker_takes_up_a_topic_created_after_it_subscribed() -> Result<()> {
    let (url, pg) = own_database("rc_wb_late_topic").await?;
    let brokers = ringcache_tests::kafka_brokers()?;
    let nodes = cluster(1).await?;
    let early = ringcache_tests::unique("wbearly");
    let late = ringcache_tests::unique("wblate_topic");
    let client = client(&nodes, &brokers, Duration::from_secs(10)).await?;
    client.define_keyspace(
        &early,
        KeyspaceSettings::new(Strategy::WriteBack),
        Some(pg.clone()),
    )?;
    client.ensure_write_back_topics().await?;

    let group = format!("{late}_group");
    let worker_config = write_back_worker::Config {
        brokers: brokers.clone(),
        database_url: url,
        group: group.clone(),
        keyspaces: vec![early.clone(), late.clone()],
        cache_seeds: nodes.iter().map(|n| n.addr().to_string()).collect(),
        metrics_listen: None,
        dead_letter_topic: ringcache_tests::dead_letter_topic(&group),
        ..write_back_worker::Config::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(write_back_worker::run(worker_config, async {
        let _ = stopped.await;
    }));

    // Once the early keyspace's record is stored, the worker has joined its
    // group and fetched its metadata: the late topic was missing then.
    client.keyspace(&early).put("e", "v").await?;
    wait_until("the early keyspace's record to be stored", || async {
        Ok(matches!(pg.load(&early, b"e").await?, Loaded::Present(_)))
    })
    .await?;

    client.define_keyspace(
        &late,
        KeyspaceSettings::new(Strategy::WriteBack),
        Some(pg.clone()),
    )?;
    client.ensure_write_back_topics().await?;
    client.keyspace(&late).put("l", "v").await?;
    wait_until("the late keyspace's record to be stored", || async {
        Ok(matches!(pg.load(&late, b"l").await?, Loaded::Present(_)))
    })
    .await?;
    let _ = stop.send(());
    worker.await??;
    Ok(())
}

/// Polls `check` every 100 ms until it holds, failing with `what` after a
/// minute.
async fn wait_until<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if check().await? {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 13, defect 4: a dirty write the node refuses (here because the
/// keyspace's `max_dirty_bytes` is full, as with a stalled worker) must not
/// erase the key's earlier acknowledged write from the cache: readers keep
/// seeing it, instead of loading a store that does not have it yet.
#[tokio::test]
async fn a_refused_dirty_write_keeps_the_earlier_acknowledged_one_readable() -> Result<()> {
    let keyspace = ringcache_tests::unique("wbfull");
    let mut config = ringcache_tests::NodeConfig::single("full-node")?;
    config.extra_tables =
        format!("[keyspaces.{keyspace}]\ncapacity_bytes = 8388608\nmax_dirty_bytes = 4096\n");
    let nodes = [NodeProcess::start(config).await?];
    let (_url, pg) = own_database("rc_wb_full").await?;
    let brokers = ringcache_tests::kafka_brokers()?;
    let client = client(&nodes, &brokers, Duration::from_secs(10)).await?;
    client.define_keyspace(
        &keyspace,
        KeyspaceSettings::new(Strategy::WriteBack),
        Some(pg.clone()),
    )?;
    client.ensure_write_back_topics().await?;
    let ks = client.keyspace(&keyspace);
    ks.put("k", "small").await?;
    // No worker runs: the store does not have it.
    ensure!(
        matches!(pg.load(&keyspace, b"k").await?, Loaded::Absent { .. }),
        "the store lags behind the cache"
    );
    let big = vec![b'x'; 8192];
    let err = ks.put("k", big).await.unwrap_err();
    ensure!(
        err.to_string().contains("max_dirty_bytes"),
        "refused for the dirty budget: {err}"
    );
    assert_eq!(
        ks.get("k").await?,
        Some(Bytes::from_static(b"small")),
        "the earlier acknowledged write is still served"
    );
    Ok(())
}

/// Issue 13, defect 6: a write-back write the database refuses is
/// dead-lettered; if the `MarkClean` that should settle its dirty entry is
/// lost (here: the worker that dead-lettered it knew no cache node), the
/// repair round must still discard the entry, which the store will never
/// hold, instead of leaving it dirty (unevictable, never expiring, served)
/// forever.
#[tokio::test]
async fn a_dead_lettered_write_left_dirty_is_discarded_by_the_repair_round() -> Result<()> {
    let nodes = cluster(1).await?;
    let (url, pg) = own_database("rc_wb_dlq_repair").await?;
    let pool = sqlx::PgPool::connect(&url).await?;
    sqlx::query(
        "ALTER TABLE ringcache_entries ADD CONSTRAINT no_poison \
         CHECK (value IS NULL OR value <> 'poison'::bytea)",
    )
    .execute(&pool)
    .await?;
    let brokers = ringcache_tests::kafka_brokers()?;
    let client = client(&nodes, &brokers, Duration::from_secs(10)).await?;
    let keyspace = ringcache_tests::unique("wbdlqrepair");
    client.define_keyspace(
        &keyspace,
        KeyspaceSettings::new(Strategy::WriteBack),
        Some(pg.clone()),
    )?;
    client.ensure_write_back_topics().await?;
    let ks = client.keyspace(&keyspace);
    let good = ks.put("ok", "good").await?.version;
    ks.put("bad", "poison").await?;

    let group = format!("{keyspace}_group");
    let config = write_back_worker::Config {
        brokers: brokers.clone(),
        database_url: url,
        group: group.clone(),
        keyspaces: vec![keyspace.clone()],
        metrics_listen: None,
        dead_letter_topic: ringcache_tests::dead_letter_topic(&group),
        dead_letter_after_attempts: 1,
        dirty_repair_interval: Duration::from_millis(300),
        ..write_back_worker::Config::default()
    };
    // First worker: no cache seeds, so every MarkClean it owes is lost.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let first = tokio::spawn(write_back_worker::run(config.clone(), async {
        let _ = stopped.await;
    }));
    wait_until(
        "the good write stored and the poison one dead-lettered",
        || async {
            let stored = matches!(
                pg.load(&keyspace, b"ok").await?,
                Loaded::Present(row) if row.version == good
            );
            let letters = ringcache_tests::write_back::dead_letters(&brokers, &group).await?;
            Ok(stored && letters >= 1)
        },
    )
    .await?;
    let _ = stop.send(());
    first.await??;
    ensure!(
        dirty_items(&client, &keyspace).await? == 2,
        "both entries are still dirty on the node"
    );

    // Second worker, same group: nothing left to consume, so only its
    // repair round can settle the two entries.
    let config = write_back_worker::Config {
        cache_seeds: nodes.iter().map(|n| n.addr().to_string()).collect(),
        ..config
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let second = tokio::spawn(write_back_worker::run(config, async {
        let _ = stopped.await;
    }));
    let waited = wait_until("no dirty entry left", || async {
        Ok(dirty_items(&client, &keyspace).await? == 0)
    })
    .await;
    let _ = stop.send(());
    second.await??;
    waited?;
    assert_eq!(
        ks.get("bad").await?,
        None,
        "the value the database never took is not served"
    );
    assert_eq!(ks.get("ok").await?, Some(Bytes::from_static(b"good")));
    Ok(())
}

/// Issue 13, defect 8: the worker must tell every replica that holds a
/// key's dirty entry that it is stored, whatever replication its own
/// client was configured with: the writer's replica count travels with
/// the record.
#[tokio::test]
async fn mark_clean_reaches_every_replica_the_writer_wrote() -> Result<()> {
    let nodes = cluster(3).await?;
    let (url, pg) = own_database("rc_wb_replicas").await?;
    let brokers = ringcache_tests::kafka_brokers()?;
    let client = client(&nodes, &brokers, Duration::from_secs(10)).await?;
    let keyspace = ringcache_tests::unique("wbreplicas");
    client.define_keyspace(
        &keyspace,
        KeyspaceSettings::new(Strategy::WriteBack).with_replication(3, 3),
        Some(pg.clone()),
    )?;
    client.ensure_write_back_topics().await?;
    let ks = client.keyspace(&keyspace);
    let mut last = 0;
    for i in 0..10 {
        last = ks.put(format!("k{i}"), format!("v{i}")).await?.version;
    }
    ensure!(
        dirty_items(&client, &keyspace).await? == 30,
        "every write is dirty on its three replicas"
    );

    let group = format!("{keyspace}_group");
    // No keyspace file: the worker's client knows nothing of the
    // keyspace's replication.
    let config = write_back_worker::Config {
        brokers: brokers.clone(),
        database_url: url,
        group: group.clone(),
        keyspaces: vec![keyspace.clone()],
        cache_seeds: nodes.iter().map(|n| n.addr().to_string()).collect(),
        metrics_listen: None,
        dead_letter_topic: ringcache_tests::dead_letter_topic(&group),
        // Out of the way: only the worker's own MarkClean may clean them.
        dirty_repair_interval: Duration::from_secs(3600),
        ..write_back_worker::Config::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(write_back_worker::run(config, async {
        let _ = stopped.await;
    }));
    wait_until("k9 stored", || async {
        Ok(matches!(
            pg.load(&keyspace, b"k9").await?,
            Loaded::Present(row) if row.version == last
        ))
    })
    .await?;
    let waited = wait_until("no dirty entry left on any replica", || async {
        Ok(dirty_items(&client, &keyspace).await? == 0)
    })
    .await;
    let left = dirty_items(&client, &keyspace).await?;
    let _ = stop.send(());
    worker.await??;
    waited.map_err(|e| e.context(format!("{left} of 30 entries still dirty")))?;
    Ok(())
}

/// Issue 13, defect 3 (second half): a durable write whose record the
/// broker appended but whose acknowledgement was lost fails with an
/// unknown outcome; the worker will store it all the same. The cache must
/// not stay on the older value meanwhile: readers see the newer write (a
/// dirty entry), and at quiescence the cache holds what the database holds.
///
/// The seam: a broker that advertises a proxy in front of it, so that every
/// request of the producer crosses the proxy; the proxy passes the produce
/// request to the broker and holds its answer, until the send times out.
#[tokio::test]
async fn a_durable_write_whose_acknowledgement_is_lost_is_not_left_behind_the_worker() -> Result<()>
{
    use ringcache_tests::chaos::proxy::{Fault, FaultProxy};

    let nodes = cluster(1).await?;
    let (url, pg) = own_database("rc_wb_lostack").await?;
    let keyspace = ringcache_tests::unique("wblostack");
    let broker_addr = ringcache_tests::free_addr()?;
    let proxy = FaultProxy::start(broker_addr).await?;
    let broker = ringcache_tests::PrivateBroker::start_advertising(
        broker_addr,
        proxy.addr(),
        Duration::from_secs(60),
    )
    .await?;
    let client = Client::connect(
        ClientConfig::new(nodes.iter().map(|n| n.addr().to_string()))
            .with_request_timeout(Duration::from_millis(300)),
    )
    .await?;
    let mut config = WriteBackConfig::new(proxy.addr().to_string());
    config.delivery_timeout = Duration::from_secs(2);
    // tansu 0.6 fails (its storage task panics) on the idempotent
    // producer's retry of a record whose answer it sent but the producer
    // never read; the re-send does not rely on idempotence.
    config.idempotent = false;
    client.enable_write_back(config)?;
    client.define_keyspace(
        &keyspace,
        KeyspaceSettings::new(Strategy::WriteBack),
        Some(pg.clone()),
    )?;
    client.ensure_write_back_topics().await?;
    let ks = client.keyspace(&keyspace);
    ks.put("k", "old").await?;

    proxy.set(Fault::HoldReplies).await?;
    let err = ks.put("k", "new").await.unwrap_err();
    ensure!(
        err.to_string().contains("write-back queue"),
        "the durable send failed: {err}"
    );
    proxy.heal().await?;
    // The broker did take the record: the worker will store it.
    let topic = cache_client::writeback::topic_for(&keyspace);
    wait_until("the broker to hold the unacknowledged record", || async {
        let records = ringcache_tests::write_back::read_topic(&broker.brokers(), &topic).await?;
        Ok(records
            .iter()
            .any(|r| r.value.as_deref() == Some(&b"new"[..])))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e:#}\nbroker log:\n{}", broker.log_tail(60)))?;
    assert_eq!(
        ks.get("k").await?,
        Some(Bytes::from_static(b"new")),
        "the cache serves the write the broker took and the worker will store, not the older one"
    );

    let worker_config = write_back_worker::Config {
        brokers: broker.brokers(),
        database_url: url,
        group: ringcache_tests::unique("rc_wb_lostack"),
        keyspaces: vec![keyspace.clone()],
        cache_seeds: nodes.iter().map(|n| n.addr().to_string()).collect(),
        metrics_listen: None,
        ..write_back_worker::Config::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(write_back_worker::run(worker_config, async {
        let _ = stopped.await;
    }));
    wait_until("the worker to store the newer write", || async {
        Ok(matches!(pg.load(&keyspace, b"k").await?,
            Loaded::Present(row) if row.value == "new"))
    })
    .await?;
    wait_until("no dirty entry left", || async {
        Ok(dirty_items(&client, &keyspace).await? == 0)
    })
    .await?;
    // Quiescence: the cache holds what the database holds.
    assert_eq!(ks.get("k").await?, Some(Bytes::from_static(b"new")));
    let _ = stop.send(());
    worker.await??;
    Ok(())
}

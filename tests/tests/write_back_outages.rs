//! Write-back through outages of the services behind it: the Kafka broker
//! is SIGKILLed and restarted while a client keeps writing, and every
//! acknowledged write must still reach PostgreSQL; PostgreSQL is stopped,
//! and writes (and reads of them) must keep working, to be stored once it
//! is back. Against real cache nodes and the real `write-back-worker`; the
//! service that goes down is one of the test's own (so that stopping it
//! does not disturb other tests), the other one is `cargo xtask test`'s.
//!
//! Waits poll PostgreSQL against generous deadlines; nothing is timed.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use cache_client::{
    Client, ClientConfig,
    producer::WriteBackConfig,
    store::PgStore,
    strategy::{KeyspaceSettings, Strategy},
};
use ringcache_tests::write_back::{
    Expected, metric_sum, put_acknowledged, rows, scrape, wait_stored,
};
use ringcache_tests::{
    NodeProcess, PrivateBroker, PrivatePostgres, WorkerConfig, WorkerProcess, cluster,
    kafka_brokers, own_database, unique,
};
use sqlx::PgPool;
use tokio::{sync::watch, time::Instant};

/// Upper bound for one wait: a broker (re)start, the worker rejoining its
/// group and catching up, a write being acknowledged. Generous: the machine
/// may be slow and busy with other tests.
const TIMEOUT: Duration = Duration::from_secs(180);
/// How often a wait looks again.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// A client whose keyspace `keyspace` is write-back (durable
/// acknowledgements) through `brokers` into `pool`'s database, with its
/// topic created.
async fn client(
    nodes: &[NodeProcess],
    brokers: &str,
    keyspace: &str,
    pool: &PgPool,
) -> Result<Client> {
    let client = Client::connect(
        ClientConfig::new(nodes.iter().map(|n| n.addr().to_string()))
            .with_request_timeout(Duration::from_secs(5)),
    )
    .await?;
    let mut config = WriteBackConfig::new(brokers);
    config.delivery_timeout = Duration::from_secs(30);
    client.enable_write_back(config)?;
    client.define_keyspace(
        keyspace,
        KeyspaceSettings::new(Strategy::WriteBack),
        Some(Arc::new(PgStore::from_pool(pool.clone()))),
    )?;
    client.ensure_write_back_topics().await?;
    Ok(client)
}

fn worker_config(brokers: &str, url: &str, keyspace: &str, nodes: &[NodeProcess]) -> WorkerConfig {
    WorkerConfig {
        brokers: brokers.to_owned(),
        database_url: url.to_owned(),
        group: format!("{keyspace}_group"),
        keyspaces: vec![keyspace.to_owned()],
        cache_seeds: nodes.iter().map(|n| n.addr().to_string()).collect(),
    }
}

/// The expectation from key → (version, value) of its last acknowledged
/// write.
fn expected(acknowledged: BTreeMap<String, (u64, String)>) -> Result<Expected> {
    acknowledged
        .into_iter()
        .map(|(key, (version, value))| {
            let version = i64::try_from(version).context("a version fits BIGINT")?;
            Ok((key.into_bytes(), (Some(value.into_bytes()), version)))
        })
        .collect()
}

/// Puts per round of writes.
const ROUND: usize = 100;
/// Rounds: before the kill, during it (the broker is killed partway through
/// this round), after the restart.
const ROUNDS: usize = 3;
/// Keys the writes of rounds 0 and 2 spread over (each round its own).
const KEYS: usize = 40;
/// Acknowledged puts of the second round before the broker is killed.
const KILL_AFTER: usize = 20;

/// The key of put `i`, in round `round`. Rounds 0 and 2 overwrite their
/// keys (so replays and retries meet newer versions); every put of round 1,
/// the one the broker dies in, has a key of its own, so that a write
/// acknowledged just before the kill and lost with the broker's state could
/// not be hidden by a later write of the same key.
fn key(round: usize, i: usize) -> String {
    if round == 1 {
        format!("r1k{i}")
    } else {
        format!("r{round}k{}", i % KEYS)
    }
}

#[tokio::test]
async fn acknowledged_writes_survive_a_broker_restart() -> Result<()> {
    let mut broker = PrivateBroker::start(TIMEOUT).await?;
    let brokers = broker.brokers();
    let nodes = cluster(1).await?;
    let keyspace = unique("wbout_broker");
    let (url, store) = own_database("rc_wbout_broker").await?;
    let pool = store.pool().clone();
    let client = client(&nodes, &brokers, &keyspace, &pool).await?;
    let mut worker = WorkerProcess::start(worker_config(&brokers, &url, &keyspace, &nodes))?;

    // The writer runs round `r` once `rounds` is above `r`, and counts its
    // acknowledged puts in `done`.
    let (rounds, mut open) = watch::channel(1_usize);
    let done = Arc::new(AtomicUsize::new(0));
    let writer = tokio::spawn({
        let client = client.clone();
        let keyspace = keyspace.clone();
        let done = Arc::clone(&done);
        async move {
            let mut acknowledged: BTreeMap<String, (u64, String)> = BTreeMap::new();
            for round in 0..ROUNDS {
                open.wait_for(|open| *open > round)
                    .await
                    .context("the test stopped opening rounds")?;
                for i in round * ROUND..(round + 1) * ROUND {
                    let key = key(round, i);
                    let value = format!("v{i}");
                    let version =
                        put_acknowledged(&client, &keyspace, &key, &value, TIMEOUT).await?;
                    acknowledged.insert(key, (version, value));
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }
            anyhow::Ok(acknowledged)
        }
    });

    // Round 0 is written and stored: the worker is up and consuming.
    let deadline = Instant::now() + TIMEOUT;
    while done.load(Ordering::SeqCst) < ROUND {
        ensure!(
            !writer.is_finished(),
            "the writer stopped: {:?}",
            writer.await
        );
        ensure!(
            Instant::now() < deadline,
            "round 0 was not written within {TIMEOUT:?}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
    let deadline = Instant::now() + TIMEOUT;
    loop {
        worker.ensure_running()?;
        if rows(&pool, &keyspace).await?.len() == KEYS {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "round 0 was not stored within {TIMEOUT:?}; worker log tail:\n{}",
            worker.log_tail(40)
        );
        tokio::time::sleep(POLL_EVERY).await;
    }

    // Round 1 runs while the broker is killed and restarted.
    rounds.send_replace(2);
    let deadline = Instant::now() + TIMEOUT;
    while done.load(Ordering::SeqCst) < ROUND + KILL_AFTER {
        ensure!(
            !writer.is_finished(),
            "the writer stopped: {:?}",
            writer.await
        );
        ensure!(
            Instant::now() < deadline,
            "round 1 did not start within {TIMEOUT:?}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
    broker.sigkill()?;
    eprintln!(
        "killed the broker after {} acknowledged puts",
        done.load(Ordering::SeqCst)
    );
    broker.restart(TIMEOUT).await?;
    eprintln!(
        "restarted the broker after {} acknowledged puts",
        done.load(Ordering::SeqCst)
    );
    rounds.send_replace(3);

    let acknowledged = tokio::time::timeout(TIMEOUT * 2, writer)
        .await
        .context("the writer did not finish")???;
    ensure!(
        acknowledged.len() == 2 * KEYS + ROUND,
        "every key was written"
    );
    let expected = expected(acknowledged)?;
    wait_stored(&pool, &mut worker, &keyspace, &expected, TIMEOUT)
        .await
        .with_context(|| format!("broker log tail:\n{}", broker.log_tail(40)))?;

    let dead = ringcache_tests::write_back::read_topic(
        &worker.config().brokers,
        &worker.config().dead_letter_topic(),
    )
    .await?;
    ensure!(dead.is_empty(), "records were dead-lettered: {dead:?}");
    Ok(())
}

/// Keys written while PostgreSQL is down.
const DOWN_KEYS: usize = 50;
/// Puts while PostgreSQL is down (each key twice).
const DOWN_PUTS: usize = 2 * DOWN_KEYS;

// Multi-threaded for `block_in_place`: starting and stopping PostgreSQL
// blocks for seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_keep_working_while_postgresql_is_down() -> Result<()> {
    let mut pg = tokio::task::block_in_place(PrivatePostgres::start)?;
    let url = pg.url();
    let store = PgStore::connect(&url)
        .await
        .with_context(|| format!("failed to connect to {url}"))?;
    store.migrate().await?;
    let pool = store.pool().clone();
    let brokers = kafka_brokers()?;
    let nodes = cluster(1).await?;
    let keyspace = unique("wbout_pg");
    let client = client(&nodes, &brokers, &keyspace, &pool).await?;
    let mut worker = WorkerProcess::start(worker_config(&brokers, &url, &keyspace, &nodes))?;

    // Before the outage: the worker is up and storing.
    let mut acknowledged: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for i in 0..10 {
        let key = format!("before{i}");
        let value = format!("b{i}");
        let version = put_acknowledged(&client, &keyspace, &key, &value, TIMEOUT).await?;
        acknowledged.insert(key, (version, value));
    }
    wait_stored(
        &pool,
        &mut worker,
        &keyspace,
        &expected(acknowledged.clone())?,
        TIMEOUT,
    )
    .await?;

    tokio::task::block_in_place(|| pg.stop_fast())?;
    eprintln!("stopped PostgreSQL");

    // Durable writes succeed without PostgreSQL: the cache and the broker
    // take them. No retries: every one must be acknowledged at once.
    let ks = client.keyspace(&keyspace);
    for i in 0..DOWN_PUTS {
        let key = format!("down{}", i % DOWN_KEYS);
        let value = format!("d{i}");
        let written = ks
            .put(&key, value.clone())
            .await
            .with_context(|| format!("put {key} failed while PostgreSQL was down"))?;
        acknowledged.insert(key, (written.version, value));
    }
    // Read-your-writes: the dirty entries answer, PostgreSQL is not asked.
    for (key, (_, value)) in &acknowledged {
        let read = ks
            .get(key)
            .await
            .with_context(|| format!("get {key} failed while PostgreSQL was down"))?;
        ensure!(
            read.as_deref() == Some(value.as_bytes()),
            "get {key} returned {read:?} while PostgreSQL was down, not the acknowledged {value:?}"
        );
    }
    // The worker is still running, holding its batch until it can store it,
    // and says so in its metrics: it retries, and the oldest write it holds
    // ages.
    worker.ensure_running()?;
    let metrics = worker.metrics_addr(TIMEOUT).await?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = scrape(metrics).await?;
        let retries = metric_sum(&text, "ringcache_wb_retries_total").unwrap_or(0.0);
        let oldest = metric_sum(&text, "ringcache_wb_oldest_unstored_seconds").unwrap_or(0.0);
        if retries > 0.0 && oldest > 0.0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the worker's metrics show no retries or unstored writes while PostgreSQL is down:\n{text}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }

    tokio::task::block_in_place(|| pg.start_again())?;
    eprintln!("started PostgreSQL again");
    ensure!(
        acknowledged.len() == 10 + DOWN_KEYS,
        "every key was written"
    );
    wait_stored(
        &pool,
        &mut worker,
        &keyspace,
        &expected(acknowledged)?,
        TIMEOUT,
    )
    .await
    .with_context(|| format!("PostgreSQL log tail:\n{}", pg.log_tail(20)))?;

    let dead = ringcache_tests::write_back::read_topic(
        &worker.config().brokers,
        &worker.config().dead_letter_topic(),
    )
    .await?;
    ensure!(dead.is_empty(), "records were dead-lettered: {dead:?}");
    // Caught up: nothing unstored, and every partition it holds has no lag
    // (the gauges follow the broker's statistics, every 2 s).
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = scrape(metrics).await?;
        let oldest = metric_sum(&text, "ringcache_wb_oldest_unstored_seconds");
        let lag = metric_sum(&text, "ringcache_wb_consumer_lag_records");
        if oldest == Some(0.0) && lag == Some(0.0) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the worker caught up but its metrics say otherwise:\n{text}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
    Ok(())
}

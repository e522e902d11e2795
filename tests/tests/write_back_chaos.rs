//! Write-back under process-level faults: the real `write-back-worker`
//! binary is SIGKILLed while a client keeps writing, and must still store
//! every acknowledged write; SIGTERM drains it and it exits 0. Against real
//! cache nodes, the broker and PostgreSQL from `cargo xtask test`.
//!
//! Every test uses its own keyspace (hence topic), consumer group and
//! database, since the broker and the PostgreSQL server are shared by tests
//! running in parallel, and waits by polling PostgreSQL against a deadline.

use std::{
    collections::BTreeMap, os::unix::process::ExitStatusExt as _, sync::Arc, time::Duration,
};

use anyhow::{Context, Result, ensure};
use cache_client::{
    Client, ClientConfig,
    producer::WriteBackConfig,
    store::PgStore,
    strategy::{KeyspaceSettings, Strategy},
    writeback::topic_for,
};
use nix::sys::signal::Signal;
use ringcache_tests::write_back::{Expected, put_acknowledged, wait_stored};
use ringcache_tests::{NodeProcess, WorkerConfig, WorkerProcess, cluster, unique};
use sqlx::PgPool;
use tokio::{sync::watch, time::Instant};

/// Upper bound for the worker to (re)join its group and catch up, and for
/// one process to exit. Generous: a group join alone takes seconds (the dead
/// member's session must time out first), and the machine may be slow.
const TIMEOUT: Duration = Duration::from_secs(120);
/// How often a wait looks at PostgreSQL again.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// A name no other test (or earlier run against the same services) uses;
/// valid as a keyspace, a topic, a group and a database.
/// A migrated database of this test's own: its URL, and a pool on it.
async fn own_database(prefix: &str) -> Result<(String, PgPool)> {
    let (url, store) = ringcache_tests::own_database(prefix).await?;
    Ok((url, store.pool().clone()))
}

/// A client whose keyspace `keyspace` is write-back into `pool`'s database,
/// with its topic created.
async fn client(nodes: &[NodeProcess], keyspace: &str, pool: &PgPool) -> Result<Client> {
    let client = Client::connect(
        // Generous: a slow answer on a loaded machine must not turn into a
        // failed write (which the writer would have to retry).
        ClientConfig::new(nodes.iter().map(|n| n.addr().to_string()))
            .with_request_timeout(Duration::from_secs(5)),
    )
    .await?;
    let mut config = WriteBackConfig::new(ringcache_tests::kafka_brokers()?);
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

fn worker_config(
    url: &str,
    group: &str,
    keyspace: &str,
    nodes: &[NodeProcess],
) -> Result<WorkerConfig> {
    Ok(WorkerConfig {
        brokers: ringcache_tests::kafka_brokers()?,
        database_url: url.to_owned(),
        group: group.to_owned(),
        keyspaces: vec![keyspace.to_owned()],
        cache_seeds: nodes.iter().map(|n| n.addr().to_string()).collect(),
    })
}

/// The number of records `group` has stored as consumed from `keyspace`'s
/// topic: the sum of its next offsets, since the topic is new.
async fn consumed(pool: &PgPool, group: &str, keyspace: &str) -> Result<i64> {
    let sum: Option<i64> = sqlx::query_scalar(
        "SELECT sum(next_offset)::bigint FROM ringcache_wb_offsets \
         WHERE consumer_group = $1 AND topic = $2",
    )
    .bind(group)
    .bind(topic_for(keyspace))
    .fetch_one(pool)
    .await?;
    Ok(sum.unwrap_or(0))
}

/// Waits until `group` has consumed at least `records` records, failing
/// early if the worker died.
async fn wait_consumed(
    pool: &PgPool,
    worker: &mut WorkerProcess,
    keyspace: &str,
    records: i64,
) -> Result<i64> {
    let group = worker.config().group.clone();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        worker.ensure_running()?;
        let now = consumed(pool, &group, keyspace).await?;
        if now >= records {
            return Ok(now);
        }
        ensure!(
            Instant::now() < deadline,
            "worker consumed {now} records, not {records}, within {TIMEOUT:?}; log tail:\n{}",
            worker.log_tail(40)
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Writes in `ROUNDS` rounds of this many puts.
const ROUND: usize = 150;
/// Rounds of writes; the worker is killed during all but the first.
const ROUNDS: usize = 4;
/// Keys the writes spread over.
const KEYS: usize = 60;

/// When to SIGKILL the worker.
#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// Once it has stored at least this many records as consumed.
    Consumed(i64),
    /// As soon as the incarnation has been assigned a partition: while it
    /// seeks to the stored offsets and catches up on the writes made while
    /// it was down.
    Assigned,
}

/// The kills, in order: partway through round 0 while it is being written,
/// during the catch-up on round 1, and once round 2 is partly stored.
/// Before each kill the next round of writes starts, so every kill lands
/// while writes are being produced.
const KILL_POINTS: [KillAt; 3] = [
    KillAt::Consumed(100),
    KillAt::Assigned,
    KillAt::Consumed(2 * ROUND as i64 + 60),
];

#[tokio::test]
async fn acknowledged_writes_survive_worker_sigkills() -> Result<()> {
    let nodes = cluster(3).await?;
    let keyspace = unique("wbchaos_kill");
    let group = format!("{keyspace}_group");
    let (url, pool) = own_database("rc_wbchaos_kill").await?;
    let client = client(&nodes, &keyspace, &pool).await?;

    // The writer runs round `r` once `rounds` is above `r`; the test opens a
    // round just before each kill, so that every kill lands while writes
    // are being produced.
    let (rounds, mut open) = watch::channel(1_usize);
    let writer = tokio::spawn({
        let client = client.clone();
        let keyspace = keyspace.clone();
        async move {
            // key → (version, value) of its last (hence highest)
            // acknowledged write.
            let mut acknowledged: BTreeMap<String, (u64, String)> = BTreeMap::new();
            for round in 0..ROUNDS {
                open.wait_for(|open| *open > round)
                    .await
                    .context("the test stopped opening rounds")?;
                for i in round * ROUND..(round + 1) * ROUND {
                    let key = format!("k{}", i % KEYS);
                    let value = format!("v{i}");
                    let version =
                        put_acknowledged(&client, &keyspace, &key, &value, TIMEOUT).await?;
                    acknowledged.insert(key, (version, value));
                }
            }
            anyhow::Ok(acknowledged)
        }
    });

    let mut worker = WorkerProcess::start(worker_config(&url, &group, &keyspace, &nodes)?)?;
    for (kill, at) in KILL_POINTS.into_iter().enumerate() {
        let point = match at {
            KillAt::Consumed(records) => {
                let seen = wait_consumed(&pool, &mut worker, &keyspace, records).await?;
                format!("after {seen} records were stored")
            }
            KillAt::Assigned => {
                worker.wait_log("partition assigned", TIMEOUT).await?;
                let seen = consumed(&pool, &group, &keyspace).await?;
                format!("on partition assignment, {seen} records stored")
            }
        };
        rounds.send_replace(kill + 2);
        worker.sigkill()?;
        let status = worker.wait_exit(TIMEOUT).await?;
        ensure!(
            status.signal() == Some(Signal::SIGKILL as i32),
            "worker exited with {status} instead of being killed"
        );
        eprintln!("killed the worker ({}) {point}", kill + 1);
        worker.restart(TIMEOUT).await?;
    }

    let acknowledged = tokio::time::timeout(TIMEOUT * 2, writer)
        .await
        .context("the writer did not finish")???;
    ensure!(acknowledged.len() == KEYS, "every key was written");
    let expected: Expected = acknowledged
        .into_iter()
        .map(|(key, (version, value))| {
            let version = i64::try_from(version).context("a version fits BIGINT")?;
            Ok((key.into_bytes(), (Some(value.into_bytes()), version)))
        })
        .collect::<Result<_>>()?;
    wait_stored(&pool, &mut worker, &keyspace, &expected, TIMEOUT).await?;

    // The position lives in PostgreSQL, with the rows: at least every
    // acknowledged record was consumed (failed attempts may add more).
    let partitions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ringcache_wb_offsets WHERE consumer_group = $1 AND topic = $2",
    )
    .bind(&group)
    .bind(topic_for(&keyspace))
    .fetch_one(&pool)
    .await?;
    ensure!(partitions > 0, "no offsets stored for group {group}");
    let total = consumed(&pool, &group, &keyspace).await?;
    ensure!(
        total >= i64::try_from(ROUND * ROUNDS)?,
        "only {total} records consumed"
    );
    let dead = ringcache_tests::write_back::read_topic(
        &worker.config().brokers,
        &worker.config().dead_letter_topic(),
    )
    .await?;
    ensure!(dead.is_empty(), "records were dead-lettered: {dead:?}");
    Ok(())
}

#[tokio::test]
async fn the_worker_exits_zero_on_sigterm() -> Result<()> {
    let nodes = cluster(1).await?;
    let keyspace = unique("wbchaos_term");
    let group = format!("{keyspace}_group");
    let (url, pool) = own_database("rc_wbchaos_term").await?;
    let client = client(&nodes, &keyspace, &pool).await?;
    let mut worker = WorkerProcess::start(worker_config(&url, &group, &keyspace, &nodes)?)?;

    let mut expected = Expected::new();
    for i in 0..10 {
        let key = format!("k{i}");
        let value = format!("v{i}");
        let version = put_acknowledged(&client, &keyspace, &key, &value, TIMEOUT).await?;
        expected.insert(
            key.into_bytes(),
            (Some(value.into_bytes()), i64::try_from(version)?),
        );
    }
    wait_stored(&pool, &mut worker, &keyspace, &expected, TIMEOUT).await?;

    worker.sigterm()?;
    let status = worker.wait_exit(TIMEOUT).await?;
    ensure!(
        status.success(),
        "worker exited with {status} on SIGTERM; log tail:\n{}",
        worker.log_tail(40)
    );
    Ok(())
}

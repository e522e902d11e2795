//! Write-back across the life of the whole cluster: two workers of one
//! consumer group joining, leaving and dying while clients write
//! (rebalances); every node and the worker shut down with writes in flight,
//! then started again; read-your-writes while a node evicts for space, with
//! the worker not running; and records duplicated or reordered on the topic.
//! Against real `cache-node` and `write-back-worker` processes (the last
//! test runs the worker in-process, for its small batches), the broker and
//! PostgreSQL from `cargo xtask test`.
//!
//! Every test has its own keyspace (hence topic), consumer group and
//! database, and waits by polling against deadlines; nothing is timed. Only
//! acknowledged writes are promised: a write that failed may or may not be
//! stored, and the checks allow both.

use std::{
    collections::BTreeMap,
    os::unix::process::ExitStatusExt as _,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use cache_client::{
    Client, ClientConfig, SetOptions,
    producer::WriteBackConfig,
    store::PgStore,
    strategy::{KeyspaceSettings, Strategy, decode_cached},
    writeback::WriteBackRecord,
};
use nix::sys::signal::Signal;
use ringcache_tests::write_back::{
    Expected, RecordProducer, dead_letters, row_changes, rows, rows_moved_backwards,
    stored_offsets, wait_stored, watch_row_changes,
};
use ringcache_tests::{
    NodeConfig, NodeProcess, WorkerConfig, WorkerProcess, cluster, kafka_brokers, own_database,
    unique,
};
use sqlx::PgPool;
use tokio::{sync::watch, task::JoinHandle, time::Instant};

/// Upper bound for one wait: a worker (re)joining its group (a dead
/// member's session must time out first) and catching up, a process
/// exiting, a write being acknowledged. Generous: the machine may be slow
/// and busy with other tests.
const TIMEOUT: Duration = Duration::from_secs(120);
/// How often a wait looks again.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// Partitions of the write-back topics: several, so that a rebalance splits
/// them between the workers.
const PARTITIONS: i32 = 4;
/// A writer's pause after an acknowledged put: it only paces the load on a
/// small machine, it synchronises nothing.
const WRITE_PACE: Duration = Duration::from_millis(10);
/// A writer's pause after a failed put, so that it does not spin while the
/// cluster is down.
const RETRY_PACE: Duration = Duration::from_millis(50);
/// What the worker logs once per partition it is assigned.
const ASSIGNED: &str = "partition assigned";

/// A client whose keyspace `keyspace` is write-back (with `settings`) into
/// `pool`'s database, with its topic of [`PARTITIONS`] partitions created.
async fn client(
    nodes: &[NodeProcess],
    keyspace: &str,
    pool: &PgPool,
    settings: KeyspaceSettings,
) -> Result<Client> {
    let client = Client::connect(
        // Generous: a slow answer on a loaded machine must not turn into a
        // failed write.
        ClientConfig::new(nodes.iter().map(|n| n.addr().to_string()))
            .with_request_timeout(Duration::from_secs(5)),
    )
    .await?;
    let mut config = WriteBackConfig::new(kafka_brokers()?);
    config.partitions = PARTITIONS;
    config.delivery_timeout = Duration::from_secs(30);
    client.enable_write_back(config)?;
    client.define_keyspace(
        keyspace,
        settings,
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
        brokers: kafka_brokers()?,
        database_url: url.to_owned(),
        group: group.to_owned(),
        keyspaces: vec![keyspace.to_owned()],
        cache_seeds: nodes.iter().map(|n| n.addr().to_string()).collect(),
    })
}

/// One put as its writer saw it.
#[derive(Clone, Debug)]
struct Attempt {
    /// The value, unique to this put.
    value: String,
    /// The version of an acknowledged put; `None` for a put that failed,
    /// which may still have been stored (at a version newer than the
    /// writer's earlier puts of the key, since its clock only moves
    /// forward).
    version: Option<u64>,
}

/// Every put of every key, in the order its (only) writer made them.
type History = BTreeMap<String, Vec<Attempt>>;

/// Tasks that put durable write-back writes until stopped, each to keys of
/// its own, one put at a time, round robin over its keys.
struct Writers {
    stop: watch::Sender<bool>,
    acked: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<History>>,
}

impl Writers {
    fn start(client: &Client, keyspace: &str, writers: usize, keys_each: usize) -> Self {
        let (stop, stopped) = watch::channel(false);
        let acked = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let tasks = (0..writers)
            .map(|w| {
                let keyspace = client.keyspace(keyspace);
                let mut stopped = stopped.clone();
                let (acked, failed) = (Arc::clone(&acked), Arc::clone(&failed));
                tokio::spawn(async move {
                    let mut history = History::new();
                    let mut errors = 0;
                    for n in 0.. {
                        if *stopped.borrow() {
                            break;
                        }
                        let key = format!("w{w}k{}", n % keys_each);
                        let value = format!("w{w}v{n}");
                        // Never cancelled: a put stopped halfway would have
                        // an unknown outcome.
                        let version = match keyspace.put(&key, value.clone()).await {
                            Ok(written) => {
                                acked.fetch_add(1, Ordering::SeqCst);
                                Some(written.version)
                            }
                            Err(err) => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                errors += 1;
                                if errors <= 3 {
                                    eprintln!("writer {w}: put {key} failed: {err}");
                                }
                                None
                            }
                        };
                        history
                            .entry(key)
                            .or_default()
                            .push(Attempt { value, version });
                        let pace = if version.is_some() {
                            WRITE_PACE
                        } else {
                            RETRY_PACE
                        };
                        tokio::select! {
                            changed = stopped.changed() => if changed.is_err() { break },
                            () = tokio::time::sleep(pace) => {}
                        }
                    }
                    history
                })
            })
            .collect();
        Writers {
            stop,
            acked,
            failed,
            tasks,
        }
    }

    /// Acknowledged puts so far.
    fn acked(&self) -> usize {
        self.acked.load(Ordering::SeqCst)
    }

    /// Failed puts so far.
    fn failed(&self) -> usize {
        self.failed.load(Ordering::SeqCst)
    }

    /// Waits until `counter` of the writers reaches `at_least`.
    async fn wait(&self, what: &str, counter: &AtomicUsize, at_least: usize) -> Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let now = counter.load(Ordering::SeqCst);
            if now >= at_least {
                return Ok(());
            }
            ensure!(
                self.tasks.iter().all(|task| !task.is_finished()),
                "a writer stopped before it was told to"
            );
            ensure!(
                Instant::now() < deadline,
                "{now} puts {what}, not {at_least}, within {TIMEOUT:?}"
            );
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    async fn wait_acked(&self, at_least: usize) -> Result<()> {
        self.wait("acknowledged", &self.acked, at_least).await
    }

    async fn wait_failed(&self, at_least: usize) -> Result<()> {
        self.wait("failed", &self.failed, at_least).await
    }

    /// Stops the writers after their current put and returns what they did.
    async fn stop(self) -> Result<History> {
        self.stop.send_replace(true);
        let mut all = History::new();
        for task in self.tasks {
            let history = tokio::time::timeout(TIMEOUT, task)
                .await
                .context("a writer did not stop")?
                .context("a writer panicked")?;
            all.extend(history);
        }
        Ok(all)
    }
}

/// Why `rows` are not what `history` allows, one line per key; empty when
/// they are. Each key must hold its newest acknowledged put (value and
/// version), or a put that failed after it at a newer version; a key with
/// no acknowledged put may hold nothing, or one of its failed puts.
fn problems(history: &History, rows: &Expected) -> Vec<String> {
    let mut problems = Vec::new();
    for (key, attempts) in history {
        let last_acked = attempts.iter().rposition(|a| a.version.is_some());
        let later_failed: Vec<&str> = attempts[last_acked.map_or(0, |i| i + 1)..]
            .iter()
            .map(|a| a.value.as_str())
            .collect();
        let row = rows.get(key.as_bytes());
        let stored = row.map(|(value, version)| {
            (
                value.as_deref().map(String::from_utf8_lossy),
                u64::try_from(*version).unwrap_or_default(),
            )
        });
        let fine = match (last_acked.map(|i| &attempts[i]), &stored) {
            (None, None) => true,
            (Some(_), None) => false,
            (acked, Some((Some(value), version))) => match acked {
                Some(Attempt {
                    value: acked_value,
                    version: Some(acked_version),
                }) if version == acked_version => value == acked_value,
                Some(Attempt {
                    version: Some(acked_version),
                    ..
                }) if version < acked_version => false,
                _ => later_failed.contains(&&**value),
            },
            // No test writes deletes.
            (_, Some((None, _))) => false,
        };
        if !fine {
            problems.push(format!(
                "{key}: stored {stored:?}; newest acknowledged put {:?}, \
                 failed puts after it {later_failed:?}",
                last_acked.map(|i| &attempts[i]),
            ));
        }
    }
    for key in rows.keys() {
        let key = String::from_utf8_lossy(key);
        if !history.contains_key(key.as_ref()) {
            problems.push(format!("{key}: stored but never written"));
        }
    }
    problems
}

/// Waits until PostgreSQL holds what `history` allows for every key (see
/// [`problems`]), failing early if a worker died.
async fn wait_consistent(
    pool: &PgPool,
    keyspace: &str,
    history: &History,
    workers: &mut [&mut WorkerProcess],
) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        for worker in workers.iter_mut() {
            worker.ensure_running()?;
        }
        let problems = problems(history, &rows(pool, keyspace).await?);
        if problems.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = workers.iter().map(|w| w.log_tail(30)).collect();
            bail!(
                "PostgreSQL does not hold the acknowledged writes after {TIMEOUT:?} \
                 ({} keys differ):\n{}\nworker log tails:\n{}",
                problems.len(),
                problems[..problems.len().min(10)].join("\n"),
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Waits until the stored offset of every partition in `from` is beyond
/// the one in `from`, failing early if one of `workers` died: the group
/// consumes every partition, so each of its members has taken its part of
/// the assignment.
async fn wait_every_partition_advances(
    pool: &PgPool,
    group: &str,
    keyspace: &str,
    workers: &mut [&mut WorkerProcess],
) -> Result<()> {
    let from = stored_offsets(pool, group, keyspace).await?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        for worker in workers.iter_mut() {
            worker.ensure_running()?;
        }
        let now = stored_offsets(pool, group, keyspace).await?;
        let behind: Vec<(i32, i64)> = from
            .iter()
            .filter(|(partition, offset)| now.get(partition).is_none_or(|now| now <= offset))
            .map(|(partition, offset)| (*partition, *offset))
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let logs: Vec<String> = workers.iter().map(|w| w.log_tail(30)).collect();
            bail!(
                "partitions {behind:?} (partition, offset) did not advance within {TIMEOUT:?}; \
                 worker log tails:\n{}",
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Writers of the rebalance test, and keys each: enough keys that every
/// partition gets some.
const REBALANCE_WRITERS: usize = 4;
const REBALANCE_KEYS_EACH: usize = 16;

/// Writers keep putting durable writes (several keys, many versions each)
/// on a topic of four partitions while the worker group changes: a second
/// worker joins, the first leaves (SIGTERM), rejoins, is SIGKILLed and
/// rejoins again. After each change every partition must advance again; at
/// the end PostgreSQL holds the newest acknowledged write of every key, and
/// no row ever moved backwards.
#[tokio::test]
async fn acknowledged_writes_survive_workers_joining_leaving_and_dying() -> Result<()> {
    let nodes = cluster(1).await?;
    let keyspace = unique("wbcl_rebalance");
    let group = format!("{keyspace}_group");
    let (url, store) = own_database("rc_wbcl_rebalance").await?;
    let pool = store.pool().clone();
    watch_row_changes(&pool).await?;
    let client = client(
        &nodes,
        &keyspace,
        &pool,
        KeyspaceSettings::new(Strategy::WriteBack),
    )
    .await?;
    let config = worker_config(&url, &group, &keyspace, &nodes)?;

    let mut first = WorkerProcess::start(config.clone())?;
    let writers = Writers::start(&client, &keyspace, REBALANCE_WRITERS, REBALANCE_KEYS_EACH);

    // One worker, which owns every partition, stores every key at least
    // once: from then on every partition has a stored offset.
    let keys = REBALANCE_WRITERS * REBALANCE_KEYS_EACH;
    let deadline = Instant::now() + TIMEOUT;
    while rows(&pool, &keyspace).await?.len() < keys {
        first.ensure_running()?;
        ensure!(
            Instant::now() < deadline,
            "the first worker did not store every key within {TIMEOUT:?}; log tail:\n{}",
            first.log_tail(40)
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
    let partitions = stored_offsets(&pool, &group, &keyspace).await?.len();
    // 64 keys miss one of 4 partitions with a probability of 4 × 0.75^64,
    // about 1e-8.
    ensure!(
        partitions == PARTITIONS as usize,
        "the keys fell on {partitions} partitions only"
    );

    // A second worker joins: the group rebalances and splits the partitions.
    let mut second = WorkerProcess::start(config.clone())?;
    second.wait_log_count(ASSIGNED, 1, TIMEOUT).await?;
    wait_every_partition_advances(&pool, &group, &keyspace, &mut [&mut first, &mut second]).await?;
    eprintln!("the second worker joined");

    // The first leaves cleanly: the second takes every partition.
    let assigned = second.log_count(ASSIGNED)?;
    first.sigterm()?;
    let status = first.wait_exit(TIMEOUT).await?;
    ensure!(
        status.success(),
        "the first worker exited with {status} on SIGTERM; log tail:\n{}",
        first.log_tail(40)
    );
    second
        .wait_log_count(ASSIGNED, assigned + 1, TIMEOUT)
        .await?;
    wait_every_partition_advances(&pool, &group, &keyspace, &mut [&mut second])
        .await
        .with_context(|| format!("the first worker's log tail:\n{}", first.log_tail(30)))?;
    eprintln!("the first worker left");

    // The first rejoins.
    first.restart(TIMEOUT).await?;
    first.wait_log_count(ASSIGNED, 1, TIMEOUT).await?;
    wait_every_partition_advances(&pool, &group, &keyspace, &mut [&mut first, &mut second]).await?;
    eprintln!("the first worker rejoined");

    // The first dies while it holds a batch, and comes back as a new member.
    //
    // With Kafka, the second would take the first's partitions over as soon
    // as the first's session timed out. The test broker, tansu 0.6.0, does
    // not: the survivor's heartbeat drops the dead member but leaves the
    // group formed, and the survivor's rejoin gets the stored assignment
    // back (the coordinator ignores the leader's new one). Worse, had the
    // dead member led the group, no member could lead it again. So the test
    // kills the first, which is not the leader (the second has led since it
    // was left alone in the group), waits until the broker has noticed (the
    // second is told to rebalance, and assigned its partitions again), and
    // starts the first again: a member joining makes tansu rebalance.
    let assigned = second.log_count(ASSIGNED)?;
    first.sigkill()?;
    let status = first.wait_exit(TIMEOUT).await?;
    ensure!(
        status.signal() == Some(Signal::SIGKILL as i32),
        "the first worker exited with {status} instead of being killed"
    );
    second
        .wait_log_count(ASSIGNED, assigned + 1, TIMEOUT)
        .await?;
    eprintln!("the first worker was killed");
    first.restart(TIMEOUT).await?;
    first.wait_log_count(ASSIGNED, 1, TIMEOUT).await?;
    wait_every_partition_advances(&pool, &group, &keyspace, &mut [&mut first, &mut second]).await?;
    eprintln!("the first worker rejoined after its crash");

    let history = writers.stop().await?;
    let acked = history
        .values()
        .flatten()
        .filter(|a| a.version.is_some())
        .count();
    ensure!(acked >= keys, "only {acked} puts were acknowledged");
    wait_consistent(&pool, &keyspace, &history, &mut [&mut first, &mut second]).await?;
    let backwards = rows_moved_backwards(&pool, &keyspace).await?;
    ensure!(
        backwards.is_empty(),
        "rows moved backwards:\n{}",
        backwards.join("\n")
    );
    let dead = dead_letters(&kafka_brokers()?, &group).await?;
    ensure!(dead == 0, "{dead} records were dead-lettered");

    for worker in [&mut first, &mut second] {
        worker.sigterm()?;
        let status = worker.wait_exit(TIMEOUT).await?;
        ensure!(
            status.success(),
            "a worker exited with {status} on SIGTERM; log tail:\n{}",
            worker.log_tail(40)
        );
    }
    Ok(())
}

/// How the whole cluster goes down.
#[derive(Clone, Copy, Debug)]
enum Shutdown {
    /// SIGTERM: nodes drain their requests, the worker its batch.
    Graceful,
    /// SIGKILL: no process gets to clean up.
    Crash,
}

/// Writers of the cluster-restart tests, and keys each.
const RESTART_WRITERS: usize = 3;
const RESTART_KEYS_EACH: usize = 16;
/// Records stored before the cluster goes down, and puts acknowledged
/// after it is back.
const RESTART_PROGRESS: usize = 100;

/// Three nodes and the worker run while writers write; all of them go down
/// at once (`how`), come back on the same addresses, and the writers go on.
/// Every acknowledged write must end up in PostgreSQL, and reads through the
/// client must then return what PostgreSQL holds.
async fn whole_cluster_down_and_up(how: Shutdown, name: &str) -> Result<()> {
    let mut nodes = cluster(3).await?;
    let keyspace = unique(name);
    let group = format!("{keyspace}_group");
    let (url, store) = own_database(&format!("rc_{name}")).await?;
    let pool = store.pool().clone();
    watch_row_changes(&pool).await?;
    let client = client(
        &nodes,
        &keyspace,
        &pool,
        KeyspaceSettings::new(Strategy::WriteBack),
    )
    .await?;
    let mut worker = WorkerProcess::start(worker_config(&url, &group, &keyspace, &nodes)?)?;
    let writers = Writers::start(&client, &keyspace, RESTART_WRITERS, RESTART_KEYS_EACH);

    // Running: records are stored.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        worker.ensure_running()?;
        let consumed: i64 = stored_offsets(&pool, &group, &keyspace)
            .await?
            .values()
            .sum();
        if consumed >= RESTART_PROGRESS as i64 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "only {consumed} records stored within {TIMEOUT:?}; worker log tail:\n{}",
            worker.log_tail(40)
        );
        tokio::time::sleep(POLL_EVERY).await;
    }

    // Everything goes down while the writers write.
    let (acked, failed) = (writers.acked(), writers.failed());
    for node in &mut nodes {
        match how {
            Shutdown::Graceful => node.sigterm()?,
            Shutdown::Crash => node.sigkill()?,
        }
    }
    match how {
        Shutdown::Graceful => worker.sigterm()?,
        Shutdown::Crash => worker.sigkill()?,
    }
    let mut statuses = Vec::new();
    for node in &mut nodes {
        statuses.push((
            node.config().node_id.clone(),
            node.wait_exit(TIMEOUT).await?,
        ));
    }
    statuses.push(("worker".to_owned(), worker.wait_exit(TIMEOUT).await?));
    for (name, status) in &statuses {
        let expected = match how {
            Shutdown::Graceful => status.success(),
            Shutdown::Crash => status.signal() == Some(Signal::SIGKILL as i32),
        };
        ensure!(expected, "{name} exited with {status} on {how:?}");
    }
    eprintln!(
        "the cluster went down after {acked} acknowledged and {failed} failed puts; \
         {} and {} now",
        writers.acked(),
        writers.failed()
    );
    // The writers go on, and fail: their puts were in flight.
    writers
        .wait_failed(writers.failed() + RESTART_WRITERS)
        .await?;

    // Everything comes back, on the same addresses.
    let down = std::mem::take(&mut nodes);
    for node in &down {
        nodes.push(NodeProcess::start(node.config().clone()).await?);
    }
    worker.restart(TIMEOUT).await?;
    writers
        .wait_acked(writers.acked() + RESTART_PROGRESS)
        .await?;
    eprintln!("the cluster is back");

    let history = writers.stop().await?;
    wait_consistent(&pool, &keyspace, &history, &mut [&mut worker]).await?;
    let backwards = rows_moved_backwards(&pool, &keyspace).await?;
    ensure!(
        backwards.is_empty(),
        "rows moved backwards:\n{}",
        backwards.join("\n")
    );
    let dead = dead_letters(&kafka_brokers()?, &group).await?;
    ensure!(dead == 0, "{dead} records were dead-lettered");

    // With the writers stopped and the worker caught up, a reader sees what
    // PostgreSQL holds, from the cache or loaded.
    let stored = rows(&pool, &keyspace).await?;
    let reader = client.keyspace(&keyspace);
    for (key, (value, _)) in &stored {
        let read = reader.get(key).await?;
        ensure!(
            read.as_deref() == value.as_deref(),
            "{} reads {read:?}, PostgreSQL holds {:?}",
            String::from_utf8_lossy(key),
            value.as_deref().map(String::from_utf8_lossy)
        );
    }
    drop(down);
    Ok(())
}

/// Three nodes and the worker get SIGTERM at once, with writes in flight.
#[tokio::test]
async fn acknowledged_writes_survive_the_whole_cluster_shutting_down() -> Result<()> {
    whole_cluster_down_and_up(Shutdown::Graceful, "wbcl_term").await
}

/// Three nodes and the worker get SIGKILL at once, with writes in flight.
#[tokio::test]
async fn acknowledged_writes_survive_the_whole_cluster_crashing() -> Result<()> {
    whole_cluster_down_and_up(Shutdown::Crash, "wbcl_kill").await
}

/// The memory test's keyspace capacity per node, and its dirty budget.
const CAPACITY: u64 = 64 * 1024;
/// Largest value the memory test's nodes take (a keyspace must hold one).
const MAX_VALUE_BYTES: usize = 2048;
/// Write-back keys of the memory test, puts of each, and value size.
const DIRTY_KEYS: usize = 40;
const DIRTY_PUTS_EACH: usize = 3;
const DIRTY_VALUE_BYTES: usize = 500;
/// Plain entries of the memory test per round of writes, and value size:
/// about nine times the keyspace's capacity on two nodes.
const PRESSURE_KEYS: usize = 1024;
const PRESSURE_VALUE_BYTES: usize = 1024;
/// TTL of the memory test's write-back keyspace: short, so that the test
/// can see entries outlive it while dirty and expire once clean.
const SHORT_TTL: Duration = Duration::from_secs(2);

/// The keyspace's stats on every node.
async fn keyspace_stats(
    client: &Client,
    keyspace: &str,
) -> Result<Vec<(String, ringcache_proto::v1::KeyspaceStats)>> {
    let mut out = Vec::new();
    for node in client.stats().await {
        let stats = node
            .stats
            .with_context(|| format!("stats of {}", node.node))?;
        let ks = stats
            .keyspaces
            .into_iter()
            .find(|k| k.name == keyspace)
            .with_context(|| format!("{} has no keyspace {keyspace}", node.node))?;
        out.push((node.node, ks));
    }
    Ok(out)
}

/// Plain (not write-back) sets of [`PRESSURE_KEYS`] new entries into
/// `keyspace`, in batches, each read back twice so that the cache's
/// admission policy counts them as used.
async fn pressure(client: &Client, keyspace: &str, round: usize) -> Result<()> {
    let value = Bytes::from(vec![b'p'; PRESSURE_VALUE_BYTES]);
    let keys: Vec<Bytes> = (0..PRESSURE_KEYS)
        .map(|i| Bytes::from(format!("pressure{round}_{i}")))
        .collect();
    for batch in keys.chunks(100) {
        let items = batch
            .iter()
            .map(|key| (key.clone(), value.clone(), SetOptions::new()))
            .collect();
        client.multi_set(keyspace, items).await?;
        for _ in 0..2 {
            client.multi_get(keyspace, batch).await?;
        }
    }
    Ok(())
}

/// Read-your-writes under memory pressure, end to end: with the worker not
/// running, write-back entries stay dirty and are read back (newest value,
/// newest version) while plain entries far beyond the keyspace's capacity
/// make the nodes evict, and after their TTL has passed. Then the worker
/// stores them and tells the nodes, which hold no dirty entry any more, and
/// the entries, now clean, leave the cache like any other (their TTL runs
/// from when they became clean); readers then load them from PostgreSQL.
#[tokio::test]
async fn dirty_entries_are_read_back_under_eviction_until_stored() -> Result<()> {
    let keyspace = unique("wbcl_mem");
    let mut nodes = Vec::new();
    for mut config in NodeConfig::cluster(2)? {
        config.extra_tables = format!(
            "[limits]\nmax_value_bytes = {MAX_VALUE_BYTES}\n\n\
             [keyspaces.{keyspace}]\ncapacity_bytes = {CAPACITY}\nmax_dirty_bytes = {CAPACITY}\n"
        );
        nodes.push(NodeProcess::start(config).await?);
    }
    let (url, store) = own_database("rc_wbcl_mem").await?;
    let pool = store.pool().clone();
    let client = client(
        &nodes,
        &keyspace,
        &pool,
        KeyspaceSettings::new(Strategy::WriteBack).with_ttl(SHORT_TTL),
    )
    .await?;
    let wb = client.keyspace(&keyspace);

    // The worker is not running: every write stays dirty. After each round
    // of writes, plain entries far beyond the capacity: the nodes evict.
    let mut expected = Expected::new();
    let mut versions = BTreeMap::new();
    for put in 0..DIRTY_PUTS_EACH {
        for k in 0..DIRTY_KEYS {
            let key = format!("wb{k}");
            let mut value = format!("{key}@{put}:");
            value.extend(std::iter::repeat_n('x', DIRTY_VALUE_BYTES - value.len()));
            let written = wb.put(&key, value.clone()).await?;
            versions.insert(key.clone(), written.version);
            expected.insert(
                key.into_bytes(),
                (Some(value.into_bytes()), i64::try_from(written.version)?),
            );
        }
        if put + 1 == DIRTY_PUTS_EACH {
            // A clean entry written after them, with the same TTL, in a
            // keyspace under no pressure: once it has expired, so would
            // have every write-back entry, had it been clean.
            client
                .set("default", "canary", "c", SetOptions::new().ttl(SHORT_TTL))
                .await?;
        }
        pressure(&client, &keyspace, put).await?;
    }
    let deadline = Instant::now() + TIMEOUT;
    while client.get("default", "canary").await?.is_some() {
        ensure!(
            Instant::now() < deadline,
            "the canary did not expire within {TIMEOUT:?}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
    let stats = keyspace_stats(&client, &keyspace).await?;
    let evictions: u64 = stats.iter().map(|(_, s)| s.evictions).sum();
    ensure!(evictions > 0, "nothing was evicted: {stats:?}");
    for (node, s) in &stats {
        ensure!(
            s.bytes <= s.capacity_bytes,
            "{node} holds {} bytes, above its capacity of {}",
            s.bytes,
            s.capacity_bytes
        );
        ensure!(s.dirty_refused == 0, "{node} refused dirty writes: {s:?}");
    }
    let dirty: u64 = stats.iter().map(|(_, s)| s.dirty_items).sum();
    ensure!(
        dirty == DIRTY_KEYS as u64,
        "{dirty} dirty entries, not {DIRTY_KEYS}"
    );

    // Read-your-writes: every write-back key reads its newest value, from
    // the cache (PostgreSQL has nothing yet).
    ensure!(
        rows(&pool, &keyspace).await?.is_empty(),
        "nothing is stored"
    );
    for (key, (value, _)) in &expected {
        let read = wb.get(key).await?;
        ensure!(
            read.as_deref() == value.as_deref(),
            "{} reads {read:?} under eviction, not its newest value",
            String::from_utf8_lossy(key)
        );
        let cached = client
            .get(&keyspace, key)
            .await?
            .context("a dirty entry is cached")?;
        let version = versions[String::from_utf8_lossy(key).as_ref()];
        ensure!(
            cached.version == version,
            "{} is cached at version {}, not {version}",
            String::from_utf8_lossy(key),
            cached.version
        );
    }

    // The worker stores them and tells the nodes: they become clean.
    let mut worker = WorkerProcess::start(worker_config(
        &url,
        &format!("{keyspace}_group"),
        &keyspace,
        &nodes,
    )?)?;
    wait_stored(&pool, &mut worker, &keyspace, &expected, TIMEOUT).await?;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        worker.ensure_running()?;
        let stats = keyspace_stats(&client, &keyspace).await?;
        if stats
            .iter()
            .all(|(_, s)| s.dirty_items == 0 && s.dirty_bytes == 0)
        {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "entries still dirty {TIMEOUT:?} after they were stored: {stats:?}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }

    // Clean, they are ordinary cached entries again: they go (their TTL
    // counts from when they became clean), and readers load them from
    // PostgreSQL.
    let deadline = Instant::now() + TIMEOUT;
    for key in expected.keys() {
        loop {
            match client.get(&keyspace, key).await? {
                None => break,
                Some(entry) => {
                    ensure!(
                        decode_cached(&keyspace, &entry.value)?.is_some(),
                        "a cached absence of {}",
                        String::from_utf8_lossy(key)
                    );
                }
            }
            ensure!(
                Instant::now() < deadline,
                "{} still cached {TIMEOUT:?} after it became clean",
                String::from_utf8_lossy(key)
            );
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
    for (key, (value, _)) in &expected {
        let read = wb.get(key).await?;
        ensure!(
            read.as_deref() == value.as_deref(),
            "{} reads {read:?} once stored, not its newest value",
            String::from_utf8_lossy(key)
        );
    }
    Ok(())
}

/// Keys and versions per key of the duplicates test.
const DUP_KEYS: usize = 10;
const DUP_VERSIONS: u64 = 6;

/// A write-back record of `keyspace`, as the client would produce it.
fn record(keyspace: &str, key: &str, version: u64, value: Option<&str>) -> WriteBackRecord {
    WriteBackRecord {
        keyspace: keyspace.to_owned(),
        key: Bytes::copy_from_slice(key.as_bytes()),
        version,
        value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
        written_at_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default(),
        replicas: 0,
    }
}

/// Waits until `group` has stored exactly `records` records as consumed
/// (the topic is new, so its offsets count them).
async fn wait_consumed(pool: &PgPool, group: &str, keyspace: &str, records: usize) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let consumed: i64 = stored_offsets(pool, group, keyspace).await?.values().sum();
        ensure!(
            consumed <= records as i64,
            "{consumed} records consumed, more than the {records} produced"
        );
        if consumed == records as i64 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{consumed} of {records} records consumed within {TIMEOUT:?}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Waits until the keyspace's rows are exactly `expected`.
async fn wait_rows(pool: &PgPool, keyspace: &str, expected: &Expected) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let rows = rows(pool, keyspace).await?;
        if &rows == expected {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "rows are {rows:?} after {TIMEOUT:?}, not {expected:?}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Records produced with rdkafka directly: every version of every key twice
/// in a row and in a shuffled order, then older versions after the newest,
/// and the newest again, across small batches; once stored, the same again.
/// The rows hold the newest version (value or tombstone) of every key, and
/// the replays change nothing: no row moves backwards, none is rewritten at
/// the version it has.
#[tokio::test(flavor = "multi_thread")]
async fn duplicated_and_reordered_records_leave_the_newest_version() -> Result<()> {
    let keyspace = unique("wbcl_dup");
    let group = format!("{keyspace}_group");
    let (url, store) = own_database("rc_wbcl_dup").await?;
    let pool = store.pool().clone();
    watch_row_changes(&pool).await?;
    let brokers = kafka_brokers()?;
    let producer = RecordProducer::create(&brokers, &keyspace, 2, TIMEOUT).await?;

    // Every key's versions in a shuffled order, each record produced twice
    // in a row (the two copies most likely share a batch); the newest
    // version of every third key is a delete.
    let value = |key: &str, version: u64| format!("{key}@{version}");
    let deleted = |k: usize| k.is_multiple_of(3);
    let mut produced = 0;
    let mut newest: BTreeMap<usize, WriteBackRecord> = BTreeMap::new();
    for round in 0..DUP_VERSIONS {
        for k in 0..DUP_KEYS {
            let key = format!("k{k}");
            // A permutation of 1..=DUP_VERSIONS per key.
            let version = (round * 5 + k as u64) % DUP_VERSIONS + 1;
            let text = value(&key, version);
            let delete = deleted(k) && version == DUP_VERSIONS;
            let record = record(&keyspace, &key, version, (!delete).then_some(text.as_str()));
            for _ in 0..2 {
                producer.produce(&record).await?;
                produced += 1;
            }
            if version == DUP_VERSIONS {
                newest.insert(k, record);
            }
        }
    }
    // Then, for every key, an older version after the newest one, the
    // newest one again, and a middle one again (these land in later
    // batches than the first copies).
    for (k, last) in &newest {
        let key = format!("k{k}");
        for record in [
            record(&keyspace, &key, 1, Some("older")),
            last.clone(),
            record(
                &keyspace,
                &key,
                DUP_VERSIONS / 2,
                Some(&value(&key, DUP_VERSIONS / 2)),
            ),
        ] {
            producer.produce(&record).await?;
            produced += 1;
        }
    }
    let expected: Expected = newest
        .values()
        .map(|r| {
            (
                r.key.to_vec(),
                (r.value.as_ref().map(|v| v.to_vec()), DUP_VERSIONS as i64),
            )
        })
        .collect();

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(write_back_worker::run(
        write_back_worker::Config {
            brokers: brokers.clone(),
            database_url: url,
            group: group.clone(),
            keyspaces: vec![keyspace.clone()],
            // Small batches, so that copies of a record span batches too.
            max_batch_records: 7,
            dead_letter_topic: ringcache_tests::dead_letter_topic(&group),
            metrics_listen: None,
            ..write_back_worker::Config::default()
        },
        async move {
            let _ = stopped.await;
        },
    ));
    wait_rows(&pool, &keyspace, &expected).await?;
    wait_consumed(&pool, &group, &keyspace, produced).await?;
    let changes = row_changes(&pool, &keyspace).await?;

    // Once they are stored, the same records again, and older ones: nothing
    // changes, not even a row's version being written again.
    for (k, last) in &newest {
        let key = format!("k{k}");
        for record in [
            last.clone(),
            record(&keyspace, &key, DUP_VERSIONS - 1, Some("late")),
            last.clone(),
        ] {
            producer.produce(&record).await?;
            produced += 1;
        }
    }
    wait_consumed(&pool, &group, &keyspace, produced).await?;
    ensure!(
        rows(&pool, &keyspace).await? == expected,
        "replayed records changed the rows"
    );
    let later = row_changes(&pool, &keyspace).await?;
    ensure!(
        later == changes,
        "replayed records changed rows {} times",
        later - changes
    );
    let backwards = rows_moved_backwards(&pool, &keyspace).await?;
    ensure!(
        backwards.is_empty(),
        "rows moved backwards or were written twice at one version:\n{}",
        backwards.join("\n")
    );
    let dead = dead_letters(&kafka_brokers()?, &group).await?;
    ensure!(dead == 0, "{dead} records were dead-lettered");

    let _ = stop.send(());
    tokio::time::timeout(TIMEOUT, worker)
        .await
        .context("the worker did not stop")?
        .context("the worker panicked")?
        .context("the worker failed")?;
    Ok(())
}

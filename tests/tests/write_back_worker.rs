//! The write-back worker against the real broker and PostgreSQL: records
//! produced with rdkafka in the documented format
//! (`cache_client::writeback`) end up as version-guarded rows, exactly once
//! in effect, across restarts, replays and crashes; malformed records are
//! dead-lettered without blocking the records after them.
//!
//! Every test uses its own keyspace (hence topic) and consumer group, and
//! waits by polling PostgreSQL against a deadline.

use std::{
    collections::BTreeMap,
    future::Future,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use cache_client::writeback::{WriteBackRecord, topic_for};
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use ringcache_tests::{
    dead_letter_topic, kafka_brokers, pg_url,
    write_back::{TopicRecord, read_topic},
};
use sqlx::{PgPool, postgres::PgPoolOptions};
use tokio::{sync::oneshot, task::JoinHandle};
use write_back_worker::Config;

/// Upper bound for one broker operation, and for the worker to catch up
/// (a group join alone takes seconds).
const TIMEOUT: Duration = Duration::from_secs(90);
/// How often a wait looks at PostgreSQL again.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// Partitions per test topic: more than one, so batches span partitions.
const PARTITIONS: i32 = 2;

/// A name no other test (or earlier run against the same services) uses;
/// valid as a keyspace, a topic and a group.
fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}_{}_{nanos}", std::process::id())
}

/// One test's keyspace, topic, group and connections.
struct Fixture {
    keyspace: String,
    group: String,
    brokers: String,
    pg_url: String,
    pool: PgPool,
    producer: FutureProducer,
}

impl Fixture {
    async fn new(name: &str) -> Result<Self> {
        Self::on(name, pg_url()?).await
    }

    /// A fixture whose worker writes to a database of its own, so that the
    /// test may cut that database's connections without hurting others.
    async fn with_own_database(name: &str) -> Result<Self> {
        let base = pg_url()?;
        let database = unique(name);
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .connect(&base)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {database}"))
            .execute(&admin)
            .await
            .with_context(|| format!("failed to create database {database}"))?;
        let url = match base.rsplit_once('/') {
            Some((server, _db)) => format!("{server}/{database}"),
            None => bail!("unexpected PostgreSQL URL {base}"),
        };
        Self::on(name, url).await
    }

    async fn on(name: &str, pg_url: String) -> Result<Self> {
        let brokers = kafka_brokers()?;
        let keyspace = unique(name);
        let topic = topic_for(&keyspace);
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .context("failed to create the admin client")?;
        let results = admin
            .create_topics(
                &[NewTopic::new(
                    &topic,
                    PARTITIONS,
                    TopicReplication::Fixed(1),
                )],
                &AdminOptions::new().operation_timeout(Some(TIMEOUT)),
            )
            .await
            .with_context(|| format!("failed to create topic {topic}"))?;
        for result in results {
            if let Err((name, code)) = result {
                bail!("creating topic {name} failed: {code}");
            }
        }
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "30000")
            .create()
            .context("failed to create the producer")?;
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&pg_url)
            .await
            .context("failed to connect to PostgreSQL")?;
        // The worker migrates too; doing it here lets the test read the
        // tables before any worker ran.
        cache_client::store::PgStore::from_pool(pool.clone())
            .migrate()
            .await?;
        Ok(Fixture {
            group: format!("{keyspace}_group"),
            keyspace,
            brokers,
            pg_url,
            pool,
            producer,
        })
    }

    fn config(&self, group: &str) -> Config {
        Config {
            brokers: self.brokers.clone(),
            database_url: self.pg_url.clone(),
            group: group.to_owned(),
            keyspaces: vec![self.keyspace.clone()],
            // Small batches, so that every test spans several of them.
            max_batch_records: 7,
            dead_letter_topic: dead_letter_topic(group),
            dead_letter_after_attempts: 2,
            metrics_listen: None,
            ..Config::default()
        }
    }

    fn record(&self, key: &str, version: u64, value: Option<&str>) -> WriteBackRecord {
        WriteBackRecord {
            keyspace: self.keyspace.clone(),
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

    /// Produces `record` as the contract says.
    async fn produce(&self, record: &WriteBackRecord) -> Result<()> {
        self.produce_on(record, None).await
    }

    /// Produces `record` as the contract says, to `partition` of the topic.
    async fn produce_to(&self, record: &WriteBackRecord, partition: i32) -> Result<()> {
        self.produce_on(record, Some(partition)).await
    }

    /// Produces `record` as the contract says, to `partition` or where the
    /// producer's partitioner puts its key.
    async fn produce_on(&self, record: &WriteBackRecord, partition: Option<i32>) -> Result<()> {
        let key = record.encode_key();
        let mut headers = OwnedHeaders::new();
        for (name, bytes) in record.headers() {
            headers = headers.insert(Header {
                key: name,
                value: Some(&bytes[..]),
            });
        }
        self.produce_message(&key, record.value.as_deref(), headers, partition)
            .await
    }

    async fn produce_raw(
        &self,
        key: &[u8],
        value: Option<&[u8]>,
        headers: OwnedHeaders,
    ) -> Result<()> {
        self.produce_message(key, value, headers, None).await
    }

    async fn produce_message(
        &self,
        key: &[u8],
        value: Option<&[u8]>,
        headers: OwnedHeaders,
        partition: Option<i32>,
    ) -> Result<()> {
        let topic = topic_for(&self.keyspace);
        let mut message = FutureRecord::to(&topic).key(key).headers(headers);
        if let Some(partition) = partition {
            message = message.partition(partition);
        }
        if let Some(value) = value {
            message = message.payload(value);
        }
        self.producer
            .send(message, TIMEOUT)
            .await
            .map_err(|(err, _)| err)
            .with_context(|| format!("failed to produce to {topic}"))?;
        Ok(())
    }

    /// Every row of the keyspace: key → (value, version, updated_at).
    async fn rows(&self) -> Result<Rows> {
        let rows: Vec<RowTuple> = sqlx::query_as(
            "SELECT key, value, version, extract(epoch FROM updated_at)::float8 \
             FROM ringcache_entries WHERE keyspace = $1",
        )
        .bind(&self.keyspace)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(k, v, version, at)| (k, (v, version, at)))
            .collect())
    }

    /// The rows without `updated_at`, to compare with an [`Expected`].
    async fn contents(&self) -> Result<Expected> {
        Ok(self
            .rows()
            .await?
            .into_iter()
            .map(|(k, (v, version, _))| (k, (v, version)))
            .collect())
    }

    /// The sum of the group's stored next offsets over the topic's
    /// partitions: the number of records consumed, since the topic is new.
    async fn consumed(&self, group: &str) -> Result<i64> {
        let sum: Option<i64> = sqlx::query_scalar(
            "SELECT sum(next_offset)::bigint FROM ringcache_wb_offsets \
             WHERE consumer_group = $1 AND topic = $2",
        )
        .bind(group)
        .bind(topic_for(&self.keyspace))
        .fetch_one(&self.pool)
        .await?;
        Ok(sum.unwrap_or(0))
    }

    /// The group's dead letters: (record key, reason).
    async fn dead_letters(&self, group: &str) -> Result<Vec<(Option<Vec<u8>>, String)>> {
        Ok(self
            .dead_letter_records(group)
            .await?
            .into_iter()
            .map(|r| {
                let reason = r.header("rc-dlq-reason").unwrap_or_default();
                (r.key, reason)
            })
            .collect())
    }

    /// The group's dead-letter topic, whole.
    async fn dead_letter_records(&self, group: &str) -> Result<Vec<TopicRecord>> {
        read_topic(&self.brokers, &dead_letter_topic(group)).await
    }

    /// Starts a worker in-process; it drains when the sender is used or
    /// dropped.
    fn start(&self, group: &str) -> Worker {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(write_back_worker::run(self.config(group), async move {
            let _ = stopped.await;
        }));
        Worker { stop, task }
    }
}

/// key, value, version, updated_at (seconds since the epoch).
type RowTuple = (Vec<u8>, Option<Vec<u8>>, i64, f64);
type Rows = BTreeMap<Vec<u8>, (Option<Vec<u8>>, i64, f64)>;
type Expected = BTreeMap<Vec<u8>, (Option<Vec<u8>>, i64)>;

struct Worker {
    stop: oneshot::Sender<()>,
    task: JoinHandle<write_back_worker::Result<()>>,
}

impl Worker {
    /// Graceful shutdown: the worker must drain and return `Ok`.
    async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(TIMEOUT, self.task)
            .await
            .context("the worker did not stop in time")?
            .context("the worker task panicked")?
            .context("the worker failed")
    }
}

/// The highest version per key of `records`, as the store should end up.
fn expected(records: &[WriteBackRecord]) -> Expected {
    let mut out = Expected::new();
    for r in records {
        let entry = (r.value.as_ref().map(|v| v.to_vec()), r.version as i64);
        match out.get(&r.key.to_vec()) {
            Some((_, version)) if *version >= entry.1 => {}
            _ => {
                out.insert(r.key.to_vec(), entry);
            }
        }
    }
    out
}

/// A deterministic mix: `keys` keys, `per_key` writes each at shuffled
/// versions above `base`, every third one a delete.
fn workload(
    fx: &Fixture,
    prefix: &str,
    keys: usize,
    per_key: u64,
    base: u64,
) -> Vec<WriteBackRecord> {
    let mut out = Vec::new();
    for round in 0..per_key {
        for k in 0..keys {
            // A permutation of 0..per_key per key, so versions arrive out of
            // order.
            let v = (round * 7 + k as u64 * 3) % per_key;
            let version = base + v + 1;
            let key = format!("{prefix}{k}");
            let value = format!("{key}@{version}");
            let delete = (k as u64 + v).is_multiple_of(3);
            out.push(fx.record(&key, version, (!delete).then_some(value.as_str())));
        }
    }
    out
}

/// Polls `check` until it returns `true` or the deadline passes.
async fn wait_until<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {TIMEOUT:?} waiting for {what}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

async fn wait_for_rows(fx: &Fixture, want: &Expected) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let rows = fx.contents().await?;
        if &rows == want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {TIMEOUT:?}: rows are {rows:?}, expected {want:?}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

async fn wait_for_consumed(fx: &Fixture, group: &str, count: usize) -> Result<()> {
    wait_until(&format!("{count} records consumed by {group}"), || async {
        let consumed = fx.consumed(group).await?;
        ensure!(
            consumed <= count as i64,
            "consumed {consumed} of {count} records"
        );
        Ok(consumed == count as i64)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn applies_the_highest_version_per_key_with_tombstones() -> Result<()> {
    let fx = Fixture::new("wb_apply").await?;
    let records = workload(&fx, "k", 12, 5, 100);
    for r in &records {
        fx.produce(r).await?;
    }
    let want = expected(&records);
    ensure!(
        want.values().any(|(v, _)| v.is_none()),
        "the workload has deletes"
    );

    let worker = fx.start(&fx.group);
    wait_for_rows(&fx, &want).await?;
    wait_for_consumed(&fx, &fx.group, records.len()).await?;
    worker.shutdown().await?;
    ensure!(
        fx.dead_letters(&fx.group).await?.is_empty(),
        "nothing dead-lettered"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_and_replays_resume_from_the_stored_offsets_without_reapplying() -> Result<()> {
    let fx = Fixture::new("wb_replay").await?;
    // A malformed record: re-consuming it would dead-letter it again, which
    // shows whether a worker replayed from the start.
    fx.produce_raw(b"no separator", Some(b"x"), OwnedHeaders::new())
        .await?;
    let first = workload(&fx, "k", 8, 4, 100);
    for r in &first {
        fx.produce(r).await?;
    }
    let worker = fx.start(&fx.group);
    wait_for_rows(&fx, &expected(&first)).await?;
    wait_for_consumed(&fx, &fx.group, first.len() + 1).await?;
    worker.shutdown().await?;
    let before = fx.rows().await?;

    // Produced while no worker runs: older versions of known keys (which
    // must not apply) and new keys.
    let second: Vec<_> = (0..8)
        .map(|k| fx.record(&format!("k{k}"), 1, Some("old")))
        .chain((0..5).map(|k| fx.record(&format!("n{k}"), 10, Some("new"))))
        .collect();
    for r in &second {
        fx.produce(r).await?;
    }
    let total = first.len() + 1 + second.len();

    // Restart in the same group.
    let worker = fx.start(&fx.group);
    let mut all = first.clone();
    all.extend(second.iter().cloned());
    wait_for_rows(&fx, &expected(&all)).await?;
    wait_for_consumed(&fx, &fx.group, total).await?;
    worker.shutdown().await?;
    let after = fx.rows().await?;
    for (key, row) in &before {
        ensure!(
            after.get(key) == Some(row),
            "row {key:?} changed from {row:?} to {:?}",
            after.get(key)
        );
    }
    ensure!(
        fx.dead_letters(&fx.group).await?.len() == 1,
        "one dead letter"
    );

    // A reset group: no offsets in Kafka (a new group id), the stored ones
    // copied in PostgreSQL. It must seek to them, not to the earliest
    // offset: nothing is consumed again, so the malformed record is not
    // dead-lettered a second time; a record produced now is applied.
    let reset = format!("{}_reset", fx.group);
    sqlx::query(
        "INSERT INTO ringcache_wb_offsets (consumer_group, topic, kafka_partition, next_offset) \
         SELECT $2, topic, kafka_partition, next_offset FROM ringcache_wb_offsets \
         WHERE consumer_group = $1",
    )
    .bind(&fx.group)
    .bind(&reset)
    .execute(&fx.pool)
    .await?;
    let last = fx.record("late", 5, Some("late"));
    fx.produce(&last).await?;
    let worker = fx.start(&reset);
    all.push(last);
    wait_for_rows(&fx, &expected(&all)).await?;
    wait_for_consumed(&fx, &reset, total + 1).await?;
    worker.shutdown().await?;
    ensure!(
        fx.dead_letters(&reset).await?.is_empty(),
        "the reset group consumed records before its stored offsets again"
    );
    let rows = fx.rows().await?;
    for (key, row) in &before {
        ensure!(
            rows.get(key) == Some(row),
            "row {key:?} changed after the reset"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_records_are_dead_lettered_and_the_rest_applied() -> Result<()> {
    let fx = Fixture::new("wb_dead").await?;
    let good_before = fx.record("a", 1, Some("a1"));
    fx.produce(&good_before).await?;

    // No version header.
    let no_version = fx.record("bad1", 1, Some("x")).encode_key();
    fx.produce_raw(&no_version, Some(b"x"), OwnedHeaders::new())
        .await?;
    // A version PostgreSQL cannot store.
    fx.produce(&fx.record("bad2", u64::MAX, Some("x"))).await?;
    // A key of another keyspace on this keyspace's topic.
    let mut foreign = fx.record("bad3", 1, Some("x"));
    foreign.keyspace = format!("{}_other", fx.keyspace);
    fx.produce(&foreign).await?;
    // A version header of the wrong length.
    let short = OwnedHeaders::new().insert(Header {
        key: "rc-version",
        value: Some(&[1u8, 2][..]),
    });
    fx.produce_raw(&fx.record("bad4", 1, None).encode_key(), None, short)
        .await?;

    let after: Vec<_> = (0..10)
        .map(|k| fx.record(&format!("b{k}"), 2, Some("after")))
        .collect();
    for r in &after {
        fx.produce(r).await?;
    }

    let worker = fx.start(&fx.group);
    let mut all = vec![good_before];
    all.extend(after);
    wait_for_rows(&fx, &expected(&all)).await?;
    wait_for_consumed(&fx, &fx.group, all.len() + 4).await?;
    worker.shutdown().await?;

    let letters = fx.dead_letters(&fx.group).await?;
    ensure!(letters.len() == 4, "dead letters: {letters:?}");
    let mut errors: Vec<&str> = letters.iter().map(|(_, e)| e.as_str()).collect();
    errors.sort_unstable();
    let has = |needle: &str| errors.iter().any(|e| e.contains(needle));
    ensure!(has("rc-version is missing"), "{errors:?}");
    ensure!(has("exceeds the largest storable version"), "{errors:?}");
    ensure!(has("_other\" on topic"), "{errors:?}");
    ensure!(has("rc-version has 2 bytes"), "{errors:?}");
    ensure!(
        letters.iter().all(|(key, _)| key.is_some()),
        "dead letters keep the record key"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_the_table_refuses_goes_to_the_dead_letter_topic_after_the_attempts() -> Result<()> {
    // Its own database: the table gets a constraint no other test expects.
    let fx = Fixture::with_own_database("wb_refused").await?;
    sqlx::query(
        "ALTER TABLE ringcache_entries ADD CONSTRAINT no_poison \
         CHECK (value IS NULL OR value <> 'poison'::bytea)",
    )
    .execute(&fx.pool)
    .await?;
    let before: Vec<_> = (0..5)
        .map(|k| fx.record(&format!("a{k}"), 3, Some("before")))
        .collect();
    let poison = fx.record("p", 7, Some("poison"));
    let after: Vec<_> = (0..20)
        .map(|k| fx.record(&format!("b{k}"), 4, Some("after")))
        .collect();
    for r in before.iter().chain([&poison]).chain(&after) {
        fx.produce(r).await?;
    }

    let worker = fx.start(&fx.group);
    let mut good = before.clone();
    good.extend(after.iter().cloned());
    // Everything but the poison record is stored: it did not hold back the
    // records behind it.
    wait_for_rows(&fx, &expected(&good)).await?;
    wait_for_consumed(&fx, &fx.group, good.len() + 1).await?;
    worker.shutdown().await?;

    let letters = fx.dead_letter_records(&fx.group).await?;
    ensure!(letters.len() == 1, "dead letters: {letters:?}");
    let letter = &letters[0];
    ensure!(
        letter.key.as_deref() == Some(&poison.encode_key()[..]),
        "the dead letter keeps the record key: {letter:?}"
    );
    ensure!(
        letter.value.as_deref() == Some(&b"poison"[..]),
        "the dead letter keeps the value: {letter:?}"
    );
    let reason = letter.header("rc-dlq-reason").unwrap_or_default();
    ensure!(reason.contains("no_poison"), "reason: {reason}");
    ensure!(
        letter.header("rc-dlq-attempts").as_deref() == Some("2"),
        "refused in the configured 2 attempts: {letter:?}"
    );
    ensure!(
        letter.header("rc-dlq-topic") == Some(topic_for(&fx.keyspace)),
        "{letter:?}"
    );
    ensure!(
        letter.header("rc-dlq-group").as_deref() == Some(fx.group.as_str()),
        "{letter:?}"
    );
    let offset: i64 = letter
        .header("rc-dlq-offset")
        .context("rc-dlq-offset header")?
        .parse()?;
    ensure!(offset >= 0, "{letter:?}");
    ensure!(
        letter.header("rc-version").is_some(),
        "the original headers are kept: {letter:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keyspace_file_gives_the_worker_its_keyspaces_and_their_own_table() -> Result<()> {
    let fx = Fixture::new("wb_layout").await?;
    let table = format!("{}_rows", fx.keyspace);
    sqlx::query(&format!(
        "CREATE TABLE {table} (id BYTEA PRIMARY KEY, body BYTEA, rev BIGINT NOT NULL)"
    ))
    .execute(&fx.pool)
    .await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("keyspaces.toml");
    std::fs::write(
        &file,
        format!(
            "[keyspaces.{ks}]\nstrategy = \"write-back\"\n\
             store = {{ table = {{ name = \"{table}\", key_column = \"id\", \
             value_column = \"body\", version_column = \"rev\" }} }}\n\n\
             [keyspaces.{ks}_other]\nstrategy = \"read-through\"\n",
            ks = fx.keyspace
        ),
    )?;
    let records = workload(&fx, "k", 6, 3, 10);
    for r in &records {
        fx.produce(r).await?;
    }
    // No `keyspaces`: the file's write-back keyspaces are drained.
    let config = Config {
        keyspaces: Vec::new(),
        keyspaces_file: Some(file),
        ..fx.config(&fx.group)
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(write_back_worker::run(config, async move {
        let _ = stopped.await;
    }));
    let worker = Worker { stop, task };
    let want = expected(&records);
    wait_until("the rows in the keyspace's own table", || async {
        let rows: Vec<(Vec<u8>, Option<Vec<u8>>, i64)> =
            sqlx::query_as(&format!("SELECT id, body, rev FROM {table}"))
                .fetch_all(&fx.pool)
                .await?;
        let rows: Expected = rows.into_iter().map(|(k, v, r)| (k, (v, r))).collect();
        Ok(rows == want)
    })
    .await?;
    wait_for_consumed(&fx, &fx.group, records.len()).await?;
    worker.shutdown().await?;
    ensure!(
        fx.contents().await?.is_empty(),
        "nothing went to the shared table"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_worker_loses_nothing_after_a_restart() -> Result<()> {
    let fx = Fixture::new("wb_crash").await?;
    let first = workload(&fx, "k", 20, 10, 1_000);
    for r in &first {
        fx.produce(r).await?;
    }

    let worker = fx.start(&fx.group);
    // Crash as soon as something is committed, most likely mid-stream.
    wait_until("a first committed batch", || async {
        Ok(fx.consumed(&fx.group).await? > 0)
    })
    .await?;
    worker.task.abort();
    let _ = worker.task.await;
    drop(worker.stop);

    let second = workload(&fx, "k", 25, 3, 1_005);
    for r in &second {
        fx.produce(r).await?;
    }
    let mut all = first;
    all.extend(second);

    let worker = fx.start(&fx.group);
    wait_for_rows(&fx, &expected(&all)).await?;
    wait_for_consumed(&fx, &fx.group, all.len()).await?;
    worker.shutdown().await?;
    ensure!(
        fx.dead_letters(&fx.group).await?.is_empty(),
        "nothing dead-lettered"
    );
    Ok(())
}

/// A partition whose batch waits in the database (here on a row lock an
/// operator's transaction holds) holds up only itself: the other
/// partitions' records are stored meanwhile, and the waiting write is
/// stored once the lock is released. Before the batches of different
/// partitions were written side by side, the one batch in flight held up
/// every partition.
#[tokio::test(flavor = "multi_thread")]
async fn a_partition_held_up_in_the_database_does_not_hold_up_the_others() -> Result<()> {
    let fx = Fixture::with_own_database("wb_lanes").await?;
    let worker = fx.start(&fx.group);
    let first = fx.record("held", 1, Some("v1"));
    fx.produce_to(&first, 0).await?;
    wait_for_rows(&fx, &expected(std::slice::from_ref(&first))).await?;

    // An operator's transaction locks the row of partition 0's key.
    let mut lock = fx.pool.begin().await?;
    sqlx::query("SELECT 1 FROM ringcache_entries WHERE keyspace = $1 AND key = $2 FOR UPDATE")
        .bind(&fx.keyspace)
        .bind(b"held".as_slice())
        .execute(&mut *lock)
        .await?;
    let second = fx.record("held", 2, Some("v2"));
    fx.produce_to(&second, 0).await?;
    let others: Vec<WriteBackRecord> = (0..20)
        .map(|i| fx.record(&format!("free{i}"), 1, Some("free")))
        .collect();
    for record in &others {
        fx.produce_to(record, 1).await?;
    }
    let mut want = expected(&others);
    want.extend(expected(std::slice::from_ref(&first)));
    wait_for_rows(&fx, &want).await?;

    // Partition 0's batch still waits for the row; then it is stored.
    lock.rollback().await?;
    want.extend(expected(std::slice::from_ref(&second)));
    wait_for_rows(&fx, &want).await?;
    wait_for_consumed(&fx, &fx.group, 2 + others.len()).await?;
    worker.shutdown().await
}

#[tokio::test(flavor = "multi_thread")]
async fn database_outages_are_retried_without_skipping_a_batch() -> Result<()> {
    let fx = Fixture::with_own_database("wb_outage").await?;
    let records = workload(&fx, "k", 10, 20, 100);
    let worker = fx.start(&fx.group);
    // Cut every other connection to the database (the worker's) while the
    // records arrive: its batches fail with connection errors mid-flight
    // and must be retried, never skipped.
    let mut cuts = 0;
    for (i, r) in records.iter().enumerate() {
        fx.produce(r).await?;
        if i % 25 == 0 {
            let cut: Vec<bool> = sqlx::query_scalar(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            .fetch_all(&fx.pool)
            .await?;
            cuts += cut.len();
        }
    }
    wait_for_rows(&fx, &expected(&records)).await?;
    wait_for_consumed(&fx, &fx.group, records.len()).await?;
    worker.shutdown().await?;
    ensure!(cuts > 0, "no worker connection was ever cut");
    ensure!(
        fx.dead_letters(&fx.group).await?.is_empty(),
        "nothing dead-lettered"
    );
    Ok(())
}

/// Issue 13, defect 2: when the newest write of a key is refused by the
/// table and dead-lettered, the older acknowledged writes of that key in
/// the same batch must not vanish with it: the next older one is stored
/// (or, if refused too, dead-lettered as well). Every record is stored,
/// superseded by a newer stored one, or on the dead-letter topic.
#[tokio::test(flavor = "multi_thread")]
async fn an_older_write_is_stored_when_the_newer_one_of_its_key_is_dead_lettered() -> Result<()> {
    let fx = Fixture::with_own_database("wb_fallback").await?;
    sqlx::query(
        "ALTER TABLE ringcache_entries ADD CONSTRAINT no_poison \
         CHECK (value IS NULL OR value <> 'poison'::bytea)",
    )
    .execute(&fx.pool)
    .await?;
    // One key per partition order: k's three writes, then q's two poison
    // ones. All five are produced before the worker starts, and the batch
    // waits for all five (or 5 s), so that they meet in one batch.
    let records = [
        fx.record("k", 3, Some("first")),
        fx.record("k", 4, Some("second")),
        fx.record("k", 5, Some("poison")),
        fx.record("q", 6, Some("poison")),
        fx.record("q", 7, Some("poison")),
    ];
    for r in &records {
        fx.produce(r).await?;
    }
    let config = Config {
        max_batch_records: 100,
        min_batch_records: records.len(),
        max_batch_delay: Duration::from_secs(5),
        ..fx.config(&fx.group)
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(write_back_worker::run(config, async move {
        let _ = stopped.await;
    }));
    let worker = Worker { stop, task };
    wait_for_consumed(&fx, &fx.group, records.len()).await?;
    worker.shutdown().await?;

    let rows = fx.contents().await?;
    let want = Expected::from([(b"k".to_vec(), (Some(b"second".to_vec()), 4))]);
    ensure!(
        rows == want,
        "the newest acknowledged write the table takes is stored: rows are {rows:?}, expected {want:?}"
    );
    let mut letters: Vec<(Vec<u8>, String)> = fx
        .dead_letter_records(&fx.group)
        .await?
        .into_iter()
        .map(|r| {
            let version = r.header("rc-version").unwrap_or_default();
            (r.key.unwrap_or_default(), version)
        })
        .collect();
    letters.sort();
    letters.dedup();
    ensure!(
        letters.len() == 3,
        "the three poison writes are dead letters: {letters:?}"
    );
    Ok(())
}

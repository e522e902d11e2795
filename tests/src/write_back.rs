//! Helpers of the write-back tests: what PostgreSQL holds, waiting for it,
//! durable puts retried until acknowledged, a trigger that records every
//! change of a row (to see whether one ever went backwards), the stored
//! offsets, and records produced with rdkafka directly.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cache_client::Client;
use cache_client::writeback::{WriteBackRecord, topic_for};
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use sqlx::PgPool;
use tokio::time::Instant;

use crate::WorkerProcess;

/// How often the helpers poll.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// key → (value, version).
pub type Expected = BTreeMap<Vec<u8>, (Option<Vec<u8>>, i64)>;

/// The keyspace's rows: key → (value, version).
pub async fn rows(pool: &PgPool, keyspace: &str) -> Result<Expected> {
    let rows: Vec<(Vec<u8>, Option<Vec<u8>>, i64)> =
        sqlx::query_as("SELECT key, value, version FROM ringcache_entries WHERE keyspace = $1")
            .bind(keyspace)
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(key, value, version)| (key, (value, version)))
        .collect())
}

/// Waits until the keyspace's rows are exactly `expected`, failing early if
/// the worker died; the error shows the keys that differ.
pub async fn wait_stored(
    pool: &PgPool,
    worker: &mut WorkerProcess,
    keyspace: &str,
    expected: &Expected,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        worker.ensure_running()?;
        let actual = rows(pool, keyspace).await?;
        if &actual == expected {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let differ: Vec<String> = expected
                .keys()
                .chain(actual.keys())
                .filter(|key| expected.get(*key) != actual.get(*key))
                .take(10)
                .map(|key| {
                    format!(
                        "{}: expected {:?}, stored {:?}",
                        String::from_utf8_lossy(key),
                        expected.get(key),
                        actual.get(key)
                    )
                })
                .collect();
            bail!(
                "PostgreSQL does not hold the acknowledged writes after {timeout:?}:\n{}\nworker log tail:\n{}",
                differ.join("\n"),
                worker.log_tail(40)
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Puts `value` until the broker acknowledges it, and returns the version.
///
/// A failed durable write may still be applied, and its version is not
/// reported; retrying until a write of the key is acknowledged keeps the
/// expectation exact, since the retry's version is newer than the failed
/// attempt's (one client's clock only moves forward).
pub async fn put_acknowledged(
    client: &Client,
    keyspace: &str,
    key: &str,
    value: &str,
    timeout: Duration,
) -> Result<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        match client.keyspace(keyspace).put(key, value.to_owned()).await {
            Ok(written) => return Ok(written.version),
            Err(err) if Instant::now() < deadline => {
                eprintln!("put {key} failed, retrying: {err}");
            }
            Err(err) => return Err(err).with_context(|| format!("put {key} never acknowledged")),
        }
    }
}

/// A record read back from a Kafka topic (for example the worker's
/// dead-letter topic).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicRecord {
    /// The partition it was on.
    pub partition: i32,
    /// The record key.
    pub key: Option<Vec<u8>>,
    /// The record value (`None`: a tombstone).
    pub value: Option<Vec<u8>>,
    /// Every header, in order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl TopicRecord {
    /// The first header called `name`, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// Every record of `topic` up to its high watermarks now, partition by
/// partition; empty when the topic does not exist.
pub async fn read_topic(brokers: &str, topic: &str) -> Result<Vec<TopicRecord>> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || read_topic_blocking(&brokers, &topic))
        .await
        .context("the topic reader panicked")?
}

fn read_topic_blocking(brokers: &str, topic: &str) -> Result<Vec<TopicRecord>> {
    let records = cache_client::dead_letter::read_topic(
        brokers,
        topic,
        &format!("reader-{topic}"),
        Duration::from_secs(30),
    )?;
    Ok(records
        .into_iter()
        .map(|r| TopicRecord {
            partition: r.partition,
            key: r.key.map(|k| k.to_vec()),
            value: r.value.map(|v| v.to_vec()),
            headers: r
                .headers
                .into_iter()
                .map(|(name, value)| (name, value.map(|v| v.to_vec())))
                .collect(),
        })
        .collect())
}

/// The body of `GET /metrics` at `addr` (plain HTTP/1.1, no client crate).
pub async fn scrape(addr: std::net::SocketAddr) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to the metrics endpoint {addr}"))?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("the metrics response has no header end")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "metrics answered {head}");
    Ok(body.to_owned())
}

/// The sum of the samples of metric `name` (exactly that name, any labels)
/// in a Prometheus text exposition; `None` when there is none.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let Some(value) = value {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

/// The history table [`watch_row_changes`] fills.
const HISTORY_TABLE: &str = "ringcache_tests_row_changes";

/// Records every committed change of `ringcache_entries` in the database
/// behind `pool` (a test's own, see [`own_database`](crate::own_database))
/// with a trigger, so that [`rows_moved_backwards`] can tell whether a row
/// ever went backwards, however briefly: sampling the table could miss it.
/// Changes made by transactions that roll back leave no trace.
///
/// # Errors
///
/// Fails when the table or the trigger cannot be created (call it once per
/// database, after the migrations).
pub async fn watch_row_changes(pool: &PgPool) -> Result<()> {
    sqlx::raw_sql(&format!(
        "CREATE TABLE {HISTORY_TABLE} (
             id          BIGSERIAL PRIMARY KEY,
             op          TEXT   NOT NULL,
             keyspace    TEXT   NOT NULL,
             key         BYTEA  NOT NULL,
             old_version BIGINT NULL,
             new_version BIGINT NULL
         );
         CREATE FUNCTION {HISTORY_TABLE}_record() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF TG_OP = 'INSERT' THEN
                 INSERT INTO {HISTORY_TABLE} (op, keyspace, key, new_version)
                 VALUES (TG_OP, NEW.keyspace, NEW.key, NEW.version);
             ELSIF TG_OP = 'UPDATE' THEN
                 INSERT INTO {HISTORY_TABLE} (op, keyspace, key, old_version, new_version)
                 VALUES (TG_OP, NEW.keyspace, NEW.key, OLD.version, NEW.version);
             ELSE
                 INSERT INTO {HISTORY_TABLE} (op, keyspace, key, old_version)
                 VALUES (TG_OP, OLD.keyspace, OLD.key, OLD.version);
             END IF;
             RETURN NULL;
         END
         $$;
         CREATE TRIGGER {HISTORY_TABLE} AFTER INSERT OR UPDATE OR DELETE ON ringcache_entries
             FOR EACH ROW EXECUTE FUNCTION {HISTORY_TABLE}_record();"
    ))
    .execute(pool)
    .await
    .context("failed to install the row-change trigger")?;
    Ok(())
}

/// One row of the history: id, operation, key, old and new version.
type Change = (i64, String, Vec<u8>, Option<i64>, Option<i64>);

/// The changes of the keyspace's rows, since [`watch_row_changes`], that
/// did not move a row to a strictly newer version: an update to an older or
/// equal version (a write applied twice, or a replayed or reordered record
/// winning over a newer one), or a deletion (tombstones are rows; nothing
/// removes them). Empty when every row only ever moved forwards.
///
/// # Errors
///
/// Fails when the history cannot be read.
pub async fn rows_moved_backwards(pool: &PgPool, keyspace: &str) -> Result<Vec<String>> {
    let changes: Vec<Change> = sqlx::query_as(&format!(
        "SELECT id, op, key, old_version, new_version FROM {HISTORY_TABLE} \
             WHERE keyspace = $1 AND (op = 'DELETE' OR new_version <= old_version) ORDER BY id"
    ))
    .bind(keyspace)
    .fetch_all(pool)
    .await
    .context("failed to read the row history")?;
    Ok(changes
        .into_iter()
        .map(|(id, op, key, old, new)| {
            format!(
                "change {id}: {op} of {} from version {old:?} to {new:?}",
                String::from_utf8_lossy(&key)
            )
        })
        .collect())
}

/// How many times the keyspace's rows changed since [`watch_row_changes`]
/// (inserts, updates and deletions).
///
/// # Errors
///
/// Fails when the history cannot be read.
pub async fn row_changes(pool: &PgPool, keyspace: &str) -> Result<i64> {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {HISTORY_TABLE} WHERE keyspace = $1"
    ))
    .bind(keyspace)
    .fetch_one(pool)
    .await
    .context("failed to count the row history")
}

/// The next offsets `group` stored for the keyspace's topic, by partition.
///
/// # Errors
///
/// Fails when the table cannot be read.
pub async fn stored_offsets(
    pool: &PgPool,
    group: &str,
    keyspace: &str,
) -> Result<BTreeMap<i32, i64>> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT kafka_partition, next_offset FROM ringcache_wb_offsets \
         WHERE consumer_group = $1 AND topic = $2",
    )
    .bind(group)
    .bind(topic_for(keyspace))
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// How many records a worker of `group` dead-lettered: the records of its
/// dead-letter topic (the one [`WorkerConfig::dead_letter_topic`] names).
///
/// # Errors
///
/// Fails when the topic cannot be read.
pub async fn dead_letters(brokers: &str, group: &str) -> Result<usize> {
    Ok(read_topic(brokers, &crate::dead_letter_topic(group))
        .await?
        .len())
}

/// Produces write-back records with rdkafka directly, in the format of
/// `cache_client::writeback` (the contract the client's producer follows),
/// so that a test can produce what the client never would: the same record
/// twice, or an older version after a newer one.
pub struct RecordProducer {
    producer: FutureProducer,
    timeout: Duration,
}

impl RecordProducer {
    /// Creates `keyspace`'s topic with `partitions` partitions on `brokers`
    /// (it must not exist yet), and an idempotent producer with
    /// `acks=all`, as the client's.
    ///
    /// # Errors
    ///
    /// Fails when the topic or the producer cannot be created.
    pub async fn create(
        brokers: &str,
        keyspace: &str,
        partitions: i32,
        timeout: Duration,
    ) -> Result<Self> {
        let topic = topic_for(keyspace);
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .context("failed to create the admin client")?;
        let results = admin
            .create_topics(
                &[NewTopic::new(
                    &topic,
                    partitions,
                    TopicReplication::Fixed(1),
                )],
                &AdminOptions::new().operation_timeout(Some(timeout)),
            )
            .await
            .with_context(|| format!("failed to create topic {topic}"))?;
        for result in results {
            if let Err((name, code)) = result {
                bail!("creating topic {name} failed: {code}");
            }
        }
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", timeout.as_millis().to_string())
            .create()
            .context("failed to create the producer")?;
        Ok(Self { producer, timeout })
    }

    /// Produces `record` to its keyspace's topic and waits for the broker's
    /// acknowledgement.
    ///
    /// # Errors
    ///
    /// Fails when the broker does not acknowledge it in time.
    pub async fn produce(&self, record: &WriteBackRecord) -> Result<()> {
        let topic = record.topic();
        let key = record.encode_key();
        let mut headers = OwnedHeaders::new();
        for (name, bytes) in record.headers() {
            headers = headers.insert(Header {
                key: name,
                value: Some(&bytes[..]),
            });
        }
        let mut message = FutureRecord::to(&topic).key(&key).headers(headers);
        if let Some(value) = &record.value {
            message = message.payload(&value[..]);
        }
        self.producer
            .send(message, self.timeout)
            .await
            .map_err(|(err, _)| err)
            .with_context(|| format!("failed to produce to {topic}"))?;
        Ok(())
    }
}

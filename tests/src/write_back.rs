//! Helpers of the write-back tests: what PostgreSQL holds, waiting for it,
//! and durable puts retried until acknowledged.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cache_client::Client;
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
    use rdkafka::{
        ClientConfig, Message, Offset, TopicPartitionList,
        consumer::{BaseConsumer, Consumer},
        message::Headers,
    };
    const TIMEOUT: Duration = Duration::from_secs(30);

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{topic}"))
        .set("enable.auto.commit", "false")
        .create()
        .context("failed to create a topic reader")?;
    let metadata = consumer
        .fetch_metadata(Some(topic), TIMEOUT)
        .with_context(|| format!("failed to read the metadata of {topic}"))?;
    let Some(meta) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(Vec::new());
    };
    if meta.error().is_some() || meta.partitions().is_empty() {
        return Ok(Vec::new());
    }
    let mut ends = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for partition in meta.partitions() {
        let id = partition.id();
        let (low, high) = consumer
            .fetch_watermarks(topic, id, TIMEOUT)
            .with_context(|| format!("failed to read the watermarks of {topic}/{id}"))?;
        if high > low {
            ends.insert(id, high);
            assignment.add_partition_offset(topic, id, Offset::Offset(low))?;
        }
    }
    let mut records = Vec::new();
    if ends.is_empty() {
        return Ok(records);
    }
    consumer.assign(&assignment)?;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !ends.is_empty() {
        if std::time::Instant::now() >= deadline {
            bail!("timed out reading {topic}: partitions {ends:?} not read to their end");
        }
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.with_context(|| format!("failed to read {topic}"))?;
        let partition = message.partition();
        let Some(&end) = ends.get(&partition) else {
            continue;
        };
        if message.offset() < end {
            records.push(TopicRecord {
                partition,
                key: message.key().map(<[u8]>::to_vec),
                value: message.payload().map(<[u8]>::to_vec),
                headers: message
                    .headers()
                    .map(|headers| {
                        headers
                            .iter()
                            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
        if message.offset() + 1 >= end {
            ends.remove(&partition);
        }
    }
    Ok(records)
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

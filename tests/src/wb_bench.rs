//! The write-back benchmark's load generator (`wb-bench`, run by `cargo
//! xtask bench --suite write-back`; `docs/benchmarks.md`).
//!
//! - [`throughput`]: N records in the client's format on a fresh topic,
//!   then the real `write-back-worker` started on them and timed until every
//!   row is stored; then, on the same (truncated) table, `COPY` of the same
//!   rows.
//! - [`lag`]: durable write-back writes through `cache_client` at a fixed
//!   rate (open loop) against a real node and worker; per write, the time
//!   from its acknowledgement to its row becoming visible, taken by a
//!   deferred trigger that stamps every row change at its commit.
//! - [`broker`]: the broker alone at the same rate: produce → consume
//!   latency with the client's producer settings and the worker's consumer
//!   settings.
//!
//! Each returns a serialisable result that the binary prints as JSON.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use cache_client::{
    Client, ClientConfig,
    producer::WriteBackConfig,
    strategy::{KeyspaceSettings, Strategy},
    writeback::{WriteBackRecord, topic_for},
};
use futures::StreamExt;
use hdrhistogram::Histogram;
use rdkafka::{
    ClientConfig as KafkaConfig, Message, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer},
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use serde::Serialize;
use sqlx::{Connection, PgConnection};
use tokio::time::Instant;

use crate::{
    NodeConfig, NodeProcess, WorkerConfig, WorkerExtra, WorkerProcess, own_database, unique,
    write_back::{metric_sum, scrape},
};

/// How long a phase may take before the run is declared failed.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the worker's metrics are read while it drains.
const METRICS_POLL: Duration = Duration::from_millis(10);
/// How often the side table of the lag run is counted.
const SEEN_POLL: Duration = Duration::from_millis(100);
/// Partitions of the benchmark topics unless told (the client's default).
pub const PARTITIONS: i32 = cache_client::producer::DEFAULT_PARTITIONS;

/// The latency summary of one measurement, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyMs {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl LatencyMs {
    pub(crate) fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        LatencyMs {
            count: histogram.len(),
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
        }
    }
}

/// A histogram of microseconds, 1 µs to 10 min, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .expect("the bounds are constants that hdrhistogram accepts")
}

/// Microseconds since the Unix epoch, the clock PostgreSQL's
/// `clock_timestamp()` reads on the same machine.
fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

/// The key of record `i`.
fn key(prefix: &str, i: u64) -> String {
    format!("{prefix}-{i:010}")
}

/// A `size`-byte value for record `i`: its number, padded.
fn value(i: u64, size: usize) -> Bytes {
    let mut value = format!("{i:010}").into_bytes();
    value.resize(size, b'v');
    Bytes::from(value)
}

/// Creates `keyspace`'s topic with `partitions` partitions.
async fn create_topic(brokers: &str, topic: &str, partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = KafkaConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("failed to create the admin client")?;
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .with_context(|| format!("failed to create topic {topic}"))?;
    for result in results {
        if let Err((name, code)) = result {
            bail!("creating topic {name} failed: {code}");
        }
    }
    Ok(())
}

/// A producer with the client's settings (`acks=all`, idempotent), and
/// room for a whole preload in its queue.
fn producer(brokers: &str) -> Result<FutureProducer> {
    KafkaConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("queue.buffering.max.messages", "1000000")
        .set("message.timeout.ms", "60000")
        .create()
        .context("failed to create the producer")
}

/// Produces `record` and waits for its acknowledgement.
async fn produce(producer: &FutureProducer, record: &WriteBackRecord) -> Result<()> {
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
    producer
        .send(message, Duration::from_secs(60))
        .await
        .map_err(|(err, _)| err)
        .with_context(|| format!("failed to produce to {topic}"))?;
    Ok(())
}

/// What [`throughput`] runs with.
#[derive(Debug, Clone)]
pub struct ThroughputOptions {
    pub brokers: String,
    pub records: u64,
    pub value_size: usize,
    /// Partitions of the topic.
    pub partitions: i32,
    /// The worker's settings beyond its defaults.
    pub tuning: Tuning,
}

/// Consumer settings the bench gives the worker (and the broker-alone
/// consumer) beyond their defaults, for a broker that needs them.
#[derive(Debug, Clone, Default)]
pub struct Tuning {
    /// The worker's `fetch_wait_max`. tansu 0.6 holds every fetch for
    /// `fetch.wait.max.ms` even when it has records to return (its fetch
    /// loop sleeps whatever it found; Nisshi 0.8 returns as soon as
    /// `fetch.min.bytes` is met, as Apache Kafka does), so against it the
    /// default (100 ms) caps a consumer at one fetch per 100 ms.
    pub fetch_wait_max: Option<Duration>,
    /// The worker's `max_batches_in_flight` (its default is 4).
    pub max_batches_in_flight: Option<usize>,
}

impl Tuning {
    /// The worker's configuration file for these settings, if any; the
    /// file must outlive the worker (it is read again on SIGHUP).
    fn worker_extra(&self) -> Result<(WorkerExtra, Option<tempfile::NamedTempFile>)> {
        let mut toml = String::new();
        if let Some(wait) = self.fetch_wait_max {
            toml.push_str(&format!("fetch_wait_max = \"{}ms\"\n", wait.as_millis()));
        }
        if let Some(batches) = self.max_batches_in_flight {
            toml.push_str(&format!("max_batches_in_flight = {batches}\n"));
        }
        if toml.is_empty() {
            return Ok((WorkerExtra::default(), None));
        }
        let mut file = tempfile::Builder::new()
            .prefix("wb-bench-worker-")
            .suffix(".toml")
            .tempfile()?;
        std::io::Write::write_all(&mut file, toml.as_bytes())?;
        let extra = WorkerExtra {
            args: vec!["--config".into(), file.path().display().to_string()],
            env: Vec::new(),
        };
        Ok((extra, Some(file)))
    }

    /// The worker's fetch properties with these settings.
    fn fetch_properties(&self) -> [(&'static str, String); 4] {
        let mut config = write_back_worker::Config::default();
        if let Some(wait) = self.fetch_wait_max {
            config.fetch_wait_max = wait;
        }
        config.fetch_properties()
    }
}

/// What [`throughput`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputResult {
    pub records: u64,
    pub value_size: usize,
    pub partitions: i32,
    /// Producing the records (acknowledged), before the worker starts.
    pub produce_seconds: f64,
    /// From starting the worker process to its first committed batch
    /// (connecting, joining the group).
    pub worker_startup_seconds: f64,
    /// From the first committed batch to the last row stored.
    pub worker_seconds: f64,
    /// Rows stored in `worker_seconds`, per second.
    pub worker_rows_per_s: f64,
    /// Batches the worker committed.
    pub worker_batches: f64,
    /// The worker's database time: the sum of its batches' flush latency
    /// (building a batch to its commit), without the time spent waiting
    /// for records from the broker.
    pub worker_db_seconds: f64,
    /// `records / worker_db_seconds`: the worker's write path alone.
    pub worker_db_rows_per_s: f64,
    /// Encoding the rows in COPY's text format and `COPY` of them, in one
    /// transaction, into the truncated table.
    pub copy_seconds: f64,
    pub copy_rows_per_s: f64,
    /// `worker_rows_per_s / copy_rows_per_s`.
    pub ratio: f64,
    /// `worker_db_rows_per_s / copy_rows_per_s`.
    pub db_ratio: f64,
}

/// Records on a topic, drained by the worker, then the same rows by `COPY`.
///
/// # Errors
/// When a service fails, the worker exits, or it does not store every row
/// within [`PHASE_TIMEOUT`].
pub async fn throughput(options: &ThroughputOptions) -> Result<ThroughputResult> {
    let (url, _store) = own_database("wb_bench_tp").await?;
    let keyspace = unique("wbtp");
    let topic = topic_for(&keyspace);
    create_topic(&options.brokers, &topic, options.partitions).await?;

    let producer = producer(&options.brokers)?;
    let written_at_ms = (now_us() / 1000) as u64;
    let records: Vec<WriteBackRecord> = (0..options.records)
        .map(|i| WriteBackRecord {
            keyspace: keyspace.clone(),
            key: Bytes::from(key("k", i)),
            version: i + 1,
            value: Some(value(i, options.value_size)),
            written_at_ms,
            replicas: 0,
        })
        .collect();
    let started = Instant::now();
    let mut sends = futures::stream::iter(records.iter().map(|r| produce(&producer, r)))
        .buffer_unordered(50_000);
    while let Some(sent) = sends.next().await {
        sent?;
    }
    drop(sends);
    let produce_seconds = started.elapsed().as_secs_f64();

    let group = unique("wbtp");
    let started = Instant::now();
    let (extra, _config_file) = options.tuning.worker_extra()?;
    let mut worker = WorkerProcess::start_with(
        WorkerConfig {
            brokers: options.brokers.clone(),
            database_url: url.clone(),
            group,
            keyspaces: vec![keyspace.clone()],
            cache_seeds: Vec::new(),
        },
        extra,
    )?;
    let metrics = worker.metrics_addr(PHASE_TIMEOUT).await?;
    let deadline = started + PHASE_TIMEOUT;
    let mut first: Option<(Instant, f64)> = None;
    let (done_at, batches, db_seconds) = loop {
        worker.ensure_running()?;
        let text = scrape(metrics).await?;
        let applied = metric_sum(&text, "ringcache_wb_records_applied_total").unwrap_or(0.0);
        let now = Instant::now();
        if applied > 0.0 && first.is_none() {
            first = Some((now, applied));
        }
        if applied >= options.records as f64 {
            let batches = metric_sum(&text, "ringcache_wb_batches_total").unwrap_or(0.0);
            let db_seconds =
                metric_sum(&text, "ringcache_wb_batch_seconds_sum").unwrap_or(f64::NAN);
            break (now, batches, db_seconds);
        }
        ensure!(
            now < deadline,
            "the worker stored {applied} of {} rows in {PHASE_TIMEOUT:?}:\n{}",
            options.records,
            worker.log_tail(30)
        );
        tokio::time::sleep(METRICS_POLL).await;
    };
    let (first_at, first_applied) = first.context("the first batch was seen")?;
    worker.sigterm()?;
    worker.wait_exit(Duration::from_secs(30)).await?;

    let mut conn = PgConnection::connect(&url).await?;
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ringcache_entries WHERE keyspace = $1")
            .bind(&keyspace)
            .fetch_one(&mut conn)
            .await?;
    ensure!(
        stored as u64 == options.records,
        "the worker reported every row applied, but the table holds {stored} of {}",
        options.records
    );
    // A one-batch run has no interval between batches: then the whole
    // drain from the start counts.
    let (worker_seconds, worker_rows) = if done_at > first_at {
        (
            (done_at - first_at).as_secs_f64(),
            options.records as f64 - first_applied,
        )
    } else {
        (started.elapsed().as_secs_f64(), options.records as f64)
    };

    sqlx::query("TRUNCATE ringcache_entries")
        .execute(&mut conn)
        .await?;
    let copy_seconds = copy(&mut conn, &records).await?;
    let copied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM ringcache_entries WHERE keyspace = $1")
            .bind(&keyspace)
            .fetch_one(&mut conn)
            .await?;
    ensure!(
        copied as u64 == options.records,
        "COPY stored {copied} rows"
    );

    let worker_rows_per_s = worker_rows / worker_seconds;
    let copy_rows_per_s = options.records as f64 / copy_seconds;
    Ok(ThroughputResult {
        records: options.records,
        value_size: options.value_size,
        partitions: options.partitions,
        produce_seconds,
        worker_startup_seconds: (first_at - started).as_secs_f64(),
        worker_seconds,
        worker_rows_per_s,
        worker_batches: batches,
        worker_db_seconds: db_seconds,
        worker_db_rows_per_s: options.records as f64 / db_seconds,
        copy_seconds,
        copy_rows_per_s,
        ratio: worker_rows_per_s / copy_rows_per_s,
        db_ratio: options.records as f64 / db_seconds / copy_rows_per_s,
    })
}

/// `COPY`s `records` into `ringcache_entries` (text format, keys and values
/// as `\x` hex) and returns the seconds it took, encoding included.
async fn copy(conn: &mut PgConnection, records: &[WriteBackRecord]) -> Result<f64> {
    use std::fmt::Write as _;
    const CHUNK: usize = 1 << 20;
    let started = Instant::now();
    let mut copy = conn
        .copy_in_raw("COPY ringcache_entries (keyspace, key, value, version) FROM STDIN")
        .await?;
    let mut buffer = String::with_capacity(CHUNK + 4096);
    let hex = |out: &mut String, bytes: &[u8]| {
        out.push_str("\\\\x");
        for byte in bytes {
            // Writing into a String cannot fail.
            let _ = write!(out, "{byte:02x}");
        }
    };
    for record in records {
        buffer.push_str(&record.keyspace);
        buffer.push('\t');
        hex(&mut buffer, &record.key);
        buffer.push('\t');
        hex(&mut buffer, record.value.as_deref().unwrap_or_default());
        let _ = writeln!(buffer, "\t{}", record.version);
        if buffer.len() >= CHUNK {
            copy.send(buffer.as_bytes()).await?;
            buffer.clear();
        }
    }
    if !buffer.is_empty() {
        copy.send(buffer.as_bytes()).await?;
    }
    copy.finish().await?;
    Ok(started.elapsed().as_secs_f64())
}

/// What [`lag`] and [`broker`] run with.
#[derive(Debug, Clone)]
pub struct LagOptions {
    pub brokers: String,
    /// Writes per second, due at fixed intervals.
    pub rate: f64,
    pub duration: Duration,
    pub value_size: usize,
    /// Writes in flight at most; a write due while this many are in flight
    /// waits (and the achieved rate drops).
    pub max_in_flight: usize,
    /// Partitions of the topic.
    pub partitions: i32,
    /// Workers draining it, in one group ([`lag`] only).
    pub workers: usize,
    /// The worker's (and the broker-alone consumer's) settings beyond
    /// their defaults.
    pub tuning: Tuning,
}

/// What [`lag`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct LagResult {
    pub rate: f64,
    pub duration_seconds: f64,
    /// Writes acknowledged, per second of the measured phase.
    pub achieved_rate: f64,
    pub acknowledged: u64,
    pub failed: u64,
    pub first_errors: Vec<String>,
    /// From when a write was due to its acknowledgement.
    pub write_latency: LatencyMs,
    /// From a write's acknowledgement to its row being committed.
    pub lag: LatencyMs,
    /// Acknowledged writes whose row became visible before the
    /// acknowledgement reached the writer (counted as 0 in `lag`).
    pub visible_before_ack: u64,
    pub partitions: i32,
    pub workers: usize,
    /// Batches the workers committed, in all (warm-up included).
    pub worker_batches: f64,
    /// Records in those batches.
    pub worker_records: f64,
    /// The workers' database time (their batches' flush time, summed), per
    /// second of the measured phase: how busy their write paths were.
    pub worker_db_busy: f64,
}

/// SQL creating the side table and the deferred trigger that stamps every
/// row change of `ringcache_entries` at its transaction's commit.
const SEEN_SQL: &str = "
CREATE TABLE wb_bench_seen (key BYTEA NOT NULL, version BIGINT NOT NULL, seen_at TIMESTAMPTZ NOT NULL);
CREATE FUNCTION wb_bench_seen_record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO wb_bench_seen VALUES (NEW.key, NEW.version, clock_timestamp());
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER wb_bench_seen AFTER INSERT OR UPDATE ON ringcache_entries
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION wb_bench_seen_record();
";

/// Durable write-back writes at a fixed rate through a node and the worker;
/// the lag from each acknowledgement to its row's commit.
///
/// # Errors
/// When a process or service fails, or an acknowledged write is not stored
/// within [`PHASE_TIMEOUT`].
pub async fn lag(options: &LagOptions) -> Result<LagResult> {
    let (url, store) = own_database("wb_bench_lag").await?;
    let store = Arc::new(store);
    let mut conn = PgConnection::connect(&url).await?;
    sqlx::raw_sql(SEEN_SQL).execute(&mut conn).await?;

    let keyspace = unique("wblag");
    let mut node_config = NodeConfig::single("wb-bench-node")?;
    node_config.extra_tables =
        format!("[keyspaces.{keyspace}]\ncapacity_bytes = 1073741824\ndefault_ttl = \"1h\"\n");
    let node = NodeProcess::start(node_config).await?;
    let client = Client::connect(ClientConfig::new([node.addr().to_string()])).await?;
    let mut write_back = WriteBackConfig::new(options.brokers.clone());
    write_back.partitions = options.partitions;
    client.enable_write_back(write_back)?;
    client.define_keyspace(
        &keyspace,
        KeyspaceSettings::new(Strategy::WriteBack),
        Some(store),
    )?;
    client.ensure_write_back_topics().await?;
    let group = unique("wblag");
    let (extra, _config_file) = options.tuning.worker_extra()?;
    let mut workers = (0..options.workers.max(1))
        .map(|_| {
            WorkerProcess::start_with(
                WorkerConfig {
                    brokers: options.brokers.clone(),
                    database_url: url.clone(),
                    group: group.clone(),
                    keyspaces: vec![keyspace.clone()],
                    cache_seeds: vec![node.addr().to_string()],
                },
                extra.clone(),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let mut metrics = Vec::with_capacity(workers.len());
    for worker in &mut workers {
        metrics.push(worker.metrics_addr(PHASE_TIMEOUT).await?);
    }

    // Warm-up: the worker has joined and drains before the clock starts.
    let warm = 100;
    for i in 0..warm {
        client
            .keyspace(&keyspace)
            .put(key("warm", i), value(i, options.value_size))
            .await
            .context("a warm-up write failed")?;
    }
    wait_seen(&mut conn, &mut workers, warm).await?;

    let total = (options.rate * options.duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / options.rate);
    let limit = Arc::new(tokio::sync::Semaphore::new(options.max_in_flight));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let start = Instant::now();
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        let permit = Arc::clone(&limit)
            .acquire_owned()
            .await
            .context("the in-flight limit is never closed")?;
        let client = client.clone();
        let keyspace = keyspace.clone();
        let done = done_tx.clone();
        let value = value(i, options.value_size);
        tokio::spawn(async move {
            let written = client.keyspace(&keyspace).put(key("lag", i), value).await;
            let acked_us = now_us();
            let latency = Instant::now() - due;
            drop(permit);
            let _ = done.send((i, written.map(|w| w.version), acked_us, latency));
        });
    }
    drop(done_tx);
    let mut acked: HashMap<String, (i64, i64)> = HashMap::new();
    let mut failed = 0u64;
    let mut first_errors = Vec::new();
    let mut write_latency = histogram();
    let mut last_ack = start;
    while let Some((i, written, acked_us, latency)) = done_rx.recv().await {
        match written {
            Ok(version) => {
                let version = i64::try_from(version).context("versions fit in i64")?;
                acked.insert(key("lag", i), (version, acked_us));
                write_latency.saturating_record(latency.as_micros().max(1) as u64);
                last_ack = Instant::now();
            }
            Err(err) => {
                failed += 1;
                if first_errors.len() < 5 {
                    first_errors.push(err.to_string());
                }
            }
        }
    }
    let measured = (last_ack - start).as_secs_f64();

    // Every acknowledged write's row, by commit time.
    let deadline = Instant::now() + PHASE_TIMEOUT;
    let mut lag = histogram();
    let mut early = 0;
    loop {
        for worker in &mut workers {
            worker.ensure_running()?;
        }
        let seen: Vec<(Vec<u8>, i64, i64)> = sqlx::query_as(
            "SELECT key, version, (extract(epoch FROM seen_at) * 1000000)::bigint FROM wb_bench_seen",
        )
        .fetch_all(&mut conn)
        .await?;
        let mut found = HashMap::with_capacity(seen.len());
        for (key, version, seen_us) in seen {
            found.insert((key, version), seen_us);
        }
        let missing = acked
            .iter()
            .filter(|(key, (version, _))| !found.contains_key(&(key.as_bytes().to_vec(), *version)))
            .count();
        if missing == 0 {
            for (key, (version, acked_us)) in &acked {
                let seen_us = found[&(key.as_bytes().to_vec(), *version)];
                if seen_us < *acked_us {
                    early += 1;
                }
                lag.saturating_record((seen_us - acked_us).max(1) as u64);
            }
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{missing} acknowledged writes not stored after {PHASE_TIMEOUT:?}:\n{}",
            workers[0].log_tail(30)
        );
        tokio::time::sleep(SEEN_POLL * 10).await;
    }
    let (mut worker_batches, mut worker_records, mut worker_db_seconds) = (0.0, 0.0, 0.0);
    for addr in metrics {
        let text = scrape(addr).await?;
        worker_batches += metric_sum(&text, "ringcache_wb_batches_total").unwrap_or(0.0);
        worker_records += metric_sum(&text, "ringcache_wb_batch_records_sum").unwrap_or(0.0);
        worker_db_seconds += metric_sum(&text, "ringcache_wb_batch_seconds_sum").unwrap_or(0.0);
    }
    for worker in &mut workers {
        worker.sigterm()?;
    }
    for worker in &mut workers {
        worker.wait_exit(Duration::from_secs(30)).await?;
    }
    drop(node);

    Ok(LagResult {
        rate: options.rate,
        duration_seconds: options.duration.as_secs_f64(),
        achieved_rate: acked.len() as f64 / measured.max(f64::EPSILON),
        acknowledged: acked.len() as u64,
        failed,
        first_errors,
        write_latency: LatencyMs::of(&write_latency),
        lag: LatencyMs::of(&lag),
        visible_before_ack: early,
        partitions: options.partitions,
        workers: workers.len(),
        worker_batches,
        worker_records,
        worker_db_busy: worker_db_seconds / measured.max(f64::EPSILON),
    })
}

/// Waits until the side table holds at least `rows` rows.
async fn wait_seen(
    conn: &mut PgConnection,
    workers: &mut [WorkerProcess],
    rows: u64,
) -> Result<()> {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    loop {
        for worker in workers.iter_mut() {
            worker.ensure_running()?;
        }
        let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM wb_bench_seen")
            .fetch_one(&mut *conn)
            .await?;
        if seen as u64 >= rows {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the warm-up writes were not stored ({seen} of {rows}):\n{}",
            workers[0].log_tail(30)
        );
        tokio::time::sleep(SEEN_POLL).await;
    }
}

/// What [`broker`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct BrokerResult {
    pub rate: f64,
    /// Records acknowledged, per second of the producing phase.
    pub achieved_rate: f64,
    pub acknowledged: u64,
    pub failed: u64,
    /// From when a record was due to its acknowledgement.
    pub produce_latency: LatencyMs,
    /// From a record's acknowledgement to a consumer receiving it.
    pub ack_to_consume: LatencyMs,
}

/// The broker alone: records at `options.rate` with the client's producer
/// settings, consumed with the worker's fetch settings; per record, the
/// time from its acknowledgement to its consumption.
///
/// # Errors
/// When the broker fails or a record is not consumed within
/// [`PHASE_TIMEOUT`].
pub async fn broker(options: &LagOptions) -> Result<BrokerResult> {
    let keyspace = unique("wbbroker");
    let topic = topic_for(&keyspace);
    create_topic(&options.brokers, &topic, options.partitions).await?;
    let mut properties = KafkaConfig::new();
    properties
        .set("bootstrap.servers", &options.brokers)
        .set("group.id", unique("wbbroker"))
        .set("enable.auto.commit", "false");
    // The worker's fetch settings.
    for (name, value) in options.tuning.fetch_properties() {
        properties.set(name, value);
    }
    let consumer: BaseConsumer = properties
        .create()
        .context("failed to create the consumer")?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..options.partitions {
        assignment.add_partition_offset(&topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let total = (options.rate * options.duration.as_secs_f64()).round() as u64;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let thread_stop = Arc::clone(&stop);
    // Polling blocks: its own thread, as the worker does.
    let consumed = tokio::task::spawn_blocking(move || {
        let mut consumed: HashMap<Vec<u8>, i64> = HashMap::new();
        while (consumed.len() as u64) < total
            && !thread_stop.load(std::sync::atomic::Ordering::Relaxed)
        {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    let at = now_us();
                    if let Some(key) = message.key() {
                        consumed.insert(key.to_vec(), at);
                    }
                }
                Some(Err(err)) => eprintln!("wb-bench: poll failed: {err}"),
                None => {}
            }
        }
        consumed
    });

    let producer = Arc::new(producer(&options.brokers)?);
    let interval = Duration::from_secs_f64(1.0 / options.rate);
    let limit = Arc::new(tokio::sync::Semaphore::new(options.max_in_flight));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
    let start = Instant::now();
    for i in 0..total {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        let permit = Arc::clone(&limit)
            .acquire_owned()
            .await
            .context("the in-flight limit is never closed")?;
        let producer = Arc::clone(&producer);
        let done = done_tx.clone();
        let record = WriteBackRecord {
            keyspace: keyspace.clone(),
            key: Bytes::from(key("b", i)),
            version: i + 1,
            value: Some(value(i, options.value_size)),
            written_at_ms: (now_us() / 1000) as u64,
            replicas: 0,
        };
        tokio::spawn(async move {
            let sent = produce(&producer, &record).await;
            let acked_us = now_us();
            let latency = Instant::now() - due;
            drop(permit);
            let _ = done.send((record.encode_key(), sent, acked_us, latency));
        });
    }
    drop(done_tx);
    let mut acked = HashMap::new();
    let mut failed = 0;
    let mut produce_latency = histogram();
    let mut last_ack = start;
    while let Some((key, sent, acked_us, latency)) = done_rx.recv().await {
        match sent {
            Ok(()) => {
                produce_latency.saturating_record(latency.as_micros().max(1) as u64);
                acked.insert(key, acked_us);
                last_ack = Instant::now();
            }
            Err(err) => {
                failed += 1;
                eprintln!("wb-bench: produce failed: {err:#}");
            }
        }
    }
    if failed > 0 {
        // The consumer waits for every record; tell it that some never come.
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let consumed = match tokio::time::timeout(PHASE_TIMEOUT, consumed).await {
        Ok(consumed) => consumed.context("the consumer thread panicked")?,
        Err(_) => {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            bail!("the consumer did not receive every record in {PHASE_TIMEOUT:?}");
        }
    };
    let mut lag = histogram();
    for (key, acked_us) in &acked {
        let consumed_us = consumed
            .get(key)
            .context("an acknowledged record was never consumed")?;
        lag.saturating_record((consumed_us - acked_us).max(1) as u64);
    }
    Ok(BrokerResult {
        rate: options.rate,
        achieved_rate: acked.len() as f64 / (last_ack - start).as_secs_f64().max(f64::EPSILON),
        acknowledged: acked.len() as u64,
        failed,
        produce_latency: LatencyMs::of(&produce_latency),
        ack_to_consume: LatencyMs::of(&lag),
    })
}

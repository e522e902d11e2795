//! The Kafka side: a consumer polled on its own blocking thread, which hands
//! records, assignments and revocations to the batcher over a bounded
//! channel, in order.
//!
//! On assignment (inside the rebalance callback, before any record of the
//! new assignment is fetched) every partition is positioned at the offset
//! stored in PostgreSQL, if any; otherwise at the group's committed offset
//! or the earliest one. On revocation the callback waits until the batcher
//! has written everything it holds, so the next owner starts exactly where
//! the stored offsets say.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc as std_mpsc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use cache_client::{
    store::PgStore,
    writeback::{RecordSource, topic_for},
};
use dashmap::DashMap;
use rdkafka::{
    ClientConfig, ClientContext, Message, Offset, Statistics, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext},
    types::RDKafkaRespErr,
};
use tokio::{runtime::Handle, sync::mpsc, sync::oneshot, task::JoinHandle};
use tracing::{debug, error, info, warn};

use crate::{
    Config,
    batch::{Expected, Polled},
    error::{Error, Result},
    metrics as m,
};

/// How often librdkafka reports statistics, from which the lag gauges are
/// set.
const STATS_INTERVAL: Duration = Duration::from_secs(2);

/// The stored offset of every partition this worker holds (`None`: nothing
/// stored yet), kept by the batcher and the rebalance callback; the
/// statistics callback turns it into the lag gauges.
#[derive(Clone, Default)]
pub(crate) struct Positions(Arc<DashMap<(String, i32), Option<i64>>>);

impl Positions {
    pub(crate) fn insert(&self, partition: (String, i32), stored: Option<i64>) {
        self.0.insert(partition, stored);
    }
}

/// How often the consumer reads the topics' metadata again. A subscribed
/// topic that does not exist yet (the worker was deployed before a client
/// created it) is taken up at the next read: librdkafka's default, five
/// minutes, left such a keyspace unstored that long.
const TOPIC_METADATA_REFRESH: Duration = Duration::from_secs(5);

/// How long one `poll` blocks; bounds how late the thread notices a stop.
const POLL_TIMEOUT: Duration = Duration::from_millis(100);
/// Shortest interval between two warnings about failing polls.
const POLL_WARN_INTERVAL: Duration = Duration::from_secs(30);
/// First and largest wait between two reads of the stored offsets.
const OFFSETS_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// What the polling thread tells the batcher.
pub(crate) enum Event {
    /// Partitions were assigned, with the offset stored for each.
    Assigned(Expected),
    /// The assignment is being revoked: write what you hold, then answer.
    Revoked(oneshot::Sender<()>),
    /// A record.
    Record(Polled),
    /// The thread cannot go on.
    Fatal(Error),
}

/// The running polling thread.
pub(crate) struct Poller {
    pub events: mpsc::Receiver<Event>,
    commits: std_mpsc::Sender<Vec<(String, i32, i64)>>,
    stop: StopOnDrop,
    thread: Option<JoinHandle<()>>,
}

/// Tells the polling thread to stop when dropped, so that dropping the
/// worker's future (a crash, an aborted task) leaves the group too.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Poller {
    /// Creates the consumer, subscribes to the keyspaces' topics and starts
    /// polling.
    pub(crate) fn start(
        config: &Config,
        keyspaces: &[String],
        store: PgStore,
        positions: Positions,
    ) -> Result<Self> {
        let (events_tx, events) = mpsc::channel(config.channel_capacity);
        let stop = Arc::new(AtomicBool::new(false));
        let context = Context {
            events: events_tx.clone(),
            store,
            group: config.group.clone(),
            runtime: Handle::current(),
            stop: Arc::clone(&stop),
            positions,
        };
        let ms = |d: Duration| d.as_millis().to_string();
        let mut properties = ClientConfig::new();
        properties
            .set("bootstrap.servers", &config.brokers)
            .set("group.id", &config.group)
            // Offsets live in PostgreSQL; Kafka's are only a hint.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Eager protocols: the rebalance callback assigns and revokes
            // whole assignments (`assign`/`unassign`).
            .set("partition.assignment.strategy", "range,roundrobin")
            .set("session.timeout.ms", ms(config.session_timeout))
            .set("heartbeat.interval.ms", ms(config.heartbeat_interval))
            .set("max.poll.interval.ms", ms(config.max_poll_interval))
            .set("statistics.interval.ms", ms(STATS_INTERVAL))
            .set(
                "topic.metadata.refresh.interval.ms",
                ms(TOPIC_METADATA_REFRESH),
            );
        // Small fetches, and a bounded prefetch, by default: librdkafka's
        // defaults (1 MiB per partition, 50 MiB per request, 100,000
        // records queued per partition) make a broker with a backlog serve
        // fetches that take seconds, and a broker that serves requests one
        // at a time (tansu) then answers heartbeats too late: the session
        // times out and the group rebalances without end.
        for (name, value) in config.fetch_properties() {
            properties.set(name, value);
        }
        let consumer: BaseConsumer<Context> =
            properties
                .create_with_context(context)
                .map_err(|source| Error::Kafka {
                    what: "creating the consumer",
                    source,
                })?;
        let topics: Vec<String> = keyspaces.iter().map(|k| topic_for(k)).collect();
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topic_refs)
            .map_err(|source| Error::Kafka {
                what: "subscribing",
                source,
            })?;
        info!(group = %config.group, topics = ?topics, "subscribed");

        let (commits, commits_rx) = std_mpsc::channel();
        let thread_stop = Arc::clone(&stop);
        let thread = tokio::task::spawn_blocking(move || {
            poll_loop(&consumer, &events_tx, &commits_rx, &thread_stop);
            // Dropping the consumer leaves the group, running the revoke
            // callback (which waits for the batcher) on this thread.
            drop(consumer);
            debug!("polling thread stopped");
        });
        Ok(Poller {
            events,
            commits,
            stop: StopOnDrop(stop),
            thread: Some(thread),
        })
    }

    /// Asks the polling thread to commit these offsets to Kafka, as a hint
    /// for tools that watch the group's lag; PostgreSQL holds the truth.
    pub(crate) fn commit_hint(&self, offsets: Vec<(String, i32, i64)>) {
        // The thread may be gone already; the hint is optional.
        let _ = self.commits.send(offsets);
    }

    /// Stops polling, answers revocations until the thread is gone, and
    /// waits for it. Records still queued are dropped unwritten: their
    /// offsets are not stored, so they are consumed again.
    pub(crate) async fn stop(mut self) {
        self.stop.0.store(true, Ordering::Relaxed);
        while let Some(event) = self.events.recv().await {
            if let Event::Revoked(ack) = event {
                let _ = ack.send(());
            }
        }
        if let Some(thread) = self.thread.take()
            && let Err(err) = thread.await
        {
            error!(error = %err, "polling thread panicked");
        }
    }
}

fn poll_loop(
    consumer: &BaseConsumer<Context>,
    events: &mpsc::Sender<Event>,
    commits: &std_mpsc::Receiver<Vec<(String, i32, i64)>>,
    stop: &AtomicBool,
) {
    let mut last_warning: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) && !events.is_closed() {
        while let Ok(offsets) = commits.try_recv() {
            let mut tpl = TopicPartitionList::new();
            for (topic, partition, next) in offsets {
                if let Err(err) = tpl.add_partition_offset(&topic, partition, Offset::Offset(next))
                {
                    debug!(%topic, partition, error = %err, "skipping a commit hint");
                }
            }
            if let Err(err) = consumer.commit(&tpl, CommitMode::Async) {
                debug!(error = %err, "kafka commit hint failed");
            }
        }
        match consumer.poll(POLL_TIMEOUT) {
            None => {}
            Some(Ok(message)) => {
                let headers = cache_client::dead_letter::owned_headers(&message);
                let polled = Polled {
                    source: RecordSource {
                        topic: message.topic().to_owned(),
                        partition: message.partition(),
                        offset: message.offset(),
                    },
                    key: message.key().map(Bytes::copy_from_slice),
                    value: message.payload().map(Bytes::copy_from_slice),
                    headers,
                };
                if events.blocking_send(Event::Record(polled)).is_err() {
                    break;
                }
            }
            Some(Err(err)) => {
                if last_warning.is_none_or(|at| at.elapsed() >= POLL_WARN_INTERVAL) {
                    warn!(error = %err, "kafka poll failed");
                    last_warning = Some(Instant::now());
                } else {
                    debug!(error = %err, "kafka poll failed");
                }
            }
        }
    }
}

struct Context {
    events: mpsc::Sender<Event>,
    store: PgStore,
    group: String,
    runtime: Handle,
    stop: Arc<AtomicBool>,
    positions: Positions,
}

impl ClientContext for Context {
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in &statistics.topics {
            for (partition, stats) in &stats.partitions {
                let key = (topic.clone(), *partition);
                // Only partitions this worker holds, once the broker told
                // their high watermark.
                let Some(stored) = self.positions.0.get(&key).map(|entry| *entry) else {
                    continue;
                };
                if stats.hi_offset < 0 {
                    continue;
                }
                let from = stored.unwrap_or(stats.lo_offset.max(0));
                let lag = (stats.hi_offset - from).max(0);
                metrics::gauge!(
                    m::CONSUMER_LAG_RECORDS,
                    "topic" => topic.clone(),
                    "partition" => partition.to_string()
                )
                .set(lag as f64);
            }
        }
    }
}

impl ConsumerContext for Context {
    // Replaces the default, which only assigns, to position each partition
    // at its stored offset in the same step.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                info!(
                    partitions = tpl.count(),
                    "partitions revoked; finishing the current batch"
                );
                let (ack, done) = oneshot::channel();
                // Fence: nothing of the old assignment is written after the
                // next owner starts. A closed channel means the batcher is
                // gone, and with it anything it held.
                if self.events.blocking_send(Event::Revoked(ack)).is_ok() {
                    let _ = done.blocking_recv();
                }
                for element in tpl.elements() {
                    let key = (element.topic().to_owned(), element.partition());
                    if self.positions.0.remove(&key).is_some() {
                        metrics::gauge!(
                            m::CONSUMER_LAG_RECORDS,
                            "topic" => key.0,
                            "partition" => key.1.to_string()
                        )
                        .set(0.0);
                    }
                }
                if let Err(err) = consumer.unassign() {
                    warn!(error = %err, "unassign failed");
                }
            }
            other => {
                error!(error = ?other, "rebalance failed");
                if let Err(err) = consumer.unassign() {
                    warn!(error = %err, "unassign failed");
                }
            }
        }
    }
}

impl Context {
    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let Some(stored) = self.stored_offsets() else {
            // Stopping, or the tables are missing (reported as fatal):
            // consume nothing.
            return;
        };
        let mut expected = Expected::new();
        let assigned: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        for (topic, partition) in assigned {
            let offset = stored.get(&(topic.clone(), partition)).copied().flatten();
            if let Some(next) = offset
                && let Err(err) = tpl.set_partition_offset(&topic, partition, Offset::Offset(next))
            {
                warn!(%topic, partition, error = %err, "cannot position a partition");
            }
            info!(%topic, partition, stored = ?offset, "partition assigned");
            self.positions.insert((topic.clone(), partition), offset);
            expected.insert((topic, partition), offset);
        }
        // Before `assign`, so the batcher knows the offsets before any record.
        if self
            .events
            .blocking_send(Event::Assigned(expected))
            .is_err()
        {
            return;
        }
        if let Err(err) = consumer.assign(tpl) {
            error!(error = %err, "assign failed");
        }
    }

    /// The group's stored offsets, retried while the database fails; `None`
    /// when stopping or on a permanent failure (sent as fatal).
    fn stored_offsets(&self) -> Option<Expected> {
        let mut backoff = OFFSETS_BACKOFF.0;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self
                .runtime
                .block_on(self.store.write_back_offsets(&self.group))
            {
                Ok(rows) => {
                    return Some(
                        rows.into_iter()
                            .map(|o| ((o.topic, o.partition), Some(o.next_offset)))
                            .collect(),
                    );
                }
                Err(err) if err.is_retryable() => {
                    if attempt == 1 || attempt.is_power_of_two() {
                        warn!(attempt, error = %err, "failed to read the stored offsets; retrying");
                    }
                }
                Err(err) => {
                    let _ = self.events.blocking_send(Event::Fatal(Error::Store(err)));
                    return None;
                }
            }
            if self.stop.load(Ordering::Relaxed) || self.events.is_closed() {
                return None;
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(OFFSETS_BACKOFF.1);
        }
    }
}

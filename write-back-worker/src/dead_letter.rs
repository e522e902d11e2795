//! The dead-letter topic: where records that can never be stored go, so
//! that the records behind them keep flowing.
//!
//! The record's format (the original record, plus the `rc-dlq-*`
//! headers) is `cache_client::dead_letter`, shared with `cachectl dlq`.
//!
//! A record is produced here, and acknowledged by the broker, before the
//! batch that skips it commits its offsets; a crash in between produces it
//! again. The dead-letter topic is therefore at least once: consumers of it
//! tell duplicates apart by `rc-dlq-topic`/`-partition`/`-offset`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cache_client::{producer::ResilientProducer, writeback::RecordSource};
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    message::{Header, OwnedHeaders},
    producer::FutureRecord,
    types::RDKafkaErrorCode,
};
use tracing::{info, warn};

use crate::{
    Config,
    error::{Error, Result},
};

pub use cache_client::dead_letter::{
    HEADER_AT, HEADER_ATTEMPTS, HEADER_GROUP, HEADER_OFFSET, HEADER_PARTITION, HEADER_REASON,
    HEADER_TOPIC,
};

/// How long producing one dead letter may take before it is retried.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A record on its way to the dead-letter topic, as it came from Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeadLetter {
    /// Its Kafka record.
    pub source: RecordSource,
    /// The record key, if any.
    pub key: Option<Bytes>,
    /// The record value (`None` for a tombstone).
    pub value: Option<Bytes>,
    /// Every header, in order.
    pub headers: Vec<(String, Option<Bytes>)>,
    /// Why it cannot be stored.
    pub reason: String,
    /// The batch attempts the database refused it in (0: never decoded).
    pub attempts: u32,
}

/// The producer of dead letters: idempotent, `acks=all`.
pub(crate) struct DeadLetters {
    producer: ResilientProducer,
    topic: String,
    group: String,
}

impl DeadLetters {
    pub(crate) fn new(config: &Config) -> Result<Self> {
        let mut kafka = ClientConfig::new();
        kafka.set("bootstrap.servers", &config.brokers).set(
            "message.timeout.ms",
            DELIVERY_TIMEOUT.as_millis().to_string(),
        );
        let producer = ResilientProducer::new(kafka, true).map_err(|source| Error::Kafka {
            what: "creating the dead-letter producer",
            source,
        })?;
        Ok(DeadLetters {
            producer,
            topic: config.dead_letter_topic.clone(),
            group: config.group.clone(),
        })
    }

    /// Creates the dead-letter topic if it is missing. Best effort: on a
    /// cluster where the worker may not create topics, an operator creates
    /// it, and a missing topic shows as failing dead letters.
    pub(crate) async fn ensure_topic(&self, config: &Config) {
        let admin: std::result::Result<AdminClient<DefaultClientContext>, _> = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .create();
        let admin = match admin {
            Ok(admin) => admin,
            Err(err) => {
                warn!(error = %err, "cannot create a Kafka admin client; not creating the dead-letter topic");
                return;
            }
        };
        let topic = NewTopic::new(&self.topic, 1, TopicReplication::Fixed(-1));
        match admin.create_topics([&topic], &AdminOptions::new()).await {
            Ok(results) => {
                for result in results {
                    match result {
                        Ok(name) => info!(topic = %name, "created the dead-letter topic"),
                        Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((name, code)) => {
                            warn!(topic = %name, error = %code, "cannot create the dead-letter topic");
                        }
                    }
                }
            }
            Err(err) => warn!(error = %err, "cannot create the dead-letter topic"),
        }
    }

    /// Produces `letter` and waits for the broker's acknowledgement.
    pub(crate) async fn send(&self, letter: &DeadLetter) -> std::result::Result<(), String> {
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default()
            .to_string();
        let partition = letter.source.partition.to_string();
        let offset = letter.source.offset.to_string();
        let attempts = letter.attempts.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(letter.headers.len() + 7);
        for (key, value) in &letter.headers {
            headers = headers.insert(Header {
                key,
                value: value.as_deref(),
            });
        }
        for (key, value) in [
            (HEADER_REASON, letter.reason.as_str()),
            (HEADER_TOPIC, letter.source.topic.as_str()),
            (HEADER_PARTITION, partition.as_str()),
            (HEADER_OFFSET, offset.as_str()),
            (HEADER_GROUP, self.group.as_str()),
            (HEADER_ATTEMPTS, attempts.as_str()),
            (HEADER_AT, at_ms.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).headers(headers);
        if let Some(key) = &letter.key {
            record = record.key(&key[..]);
        }
        if let Some(value) = &letter.value {
            record = record.payload(&value[..]);
        }
        self.producer
            .send(record, DELIVERY_TIMEOUT)
            .await
            .map_err(|err| err.to_string())
    }
}

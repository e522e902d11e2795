//! Queues write-back writes on Kafka (feature `kafka`), in the record format
//! of [`crate::writeback`].
//!
//! The producer is idempotent with `acks=all`: a record the broker
//! acknowledged is on every in-sync replica, and librdkafka's retries never
//! duplicate or reorder records of a partition. Since all writes of a key
//! share a partition (the record key is keyspace + key), they reach the
//! worker in the order they were produced; versions make the order
//! irrelevant anyway.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig as KafkaConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use crate::error::{Error, Result};
use crate::writeback::WriteBackRecord;

/// Default number of partitions of a write-back topic created by the client.
pub const DEFAULT_PARTITIONS: i32 = 4;
/// Default time a durable write waits for the broker's acknowledgement.
pub const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how write-back records are produced.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WriteBackConfig {
    /// Kafka bootstrap servers, `host:port,...`.
    pub brokers: String,
    /// Partitions of topics the client creates (default 4).
    pub partitions: i32,
    /// Replication factor of topics the client creates (default 1; use 3
    /// on a production cluster).
    pub replication_factor: i32,
    /// How long a durable write waits for the acknowledgement (default
    /// 10 s); librdkafka retries within it.
    pub delivery_timeout: Duration,
    /// Produce with Kafka's idempotent producer (default true), so that
    /// librdkafka's retries never duplicate or reorder a partition's
    /// records. Correctness does not depend on it (versions make duplicates
    /// and reordering harmless to the worker); turn it off only for a broker
    /// whose idempotent-producer support is broken (tansu 0.6 after a
    /// restart, which the chaos runs use).
    pub idempotent: bool,
}

impl WriteBackConfig {
    /// Defaults for `brokers`.
    pub fn new(brokers: impl Into<String>) -> Self {
        WriteBackConfig {
            brokers: brokers.into(),
            partitions: DEFAULT_PARTITIONS,
            replication_factor: 1,
            delivery_timeout: DEFAULT_DELIVERY_TIMEOUT,
            idempotent: true,
        }
    }
}

/// An `acks=all` producer (idempotent unless told otherwise) that replaces
/// itself when the broker stops accepting its records for good.
///
/// A restarted broker may have forgotten the producer's id and sequence
/// numbers (a broker without durable producer state; a cluster that lost
/// the partition's leader); librdkafka then fails every later record of
/// that producer without declaring it fatal. A new producer gets a new id,
/// so after such an error the next send goes through a new one. Records in
/// flight on the old producer finish or fail on their own.
pub struct ResilientProducer {
    config: KafkaConfig,
    /// The generation and the producer; the lock is held only to clone or
    /// replace the producer, never across an `.await`.
    current: parking_lot::RwLock<(u64, FutureProducer)>,
}

impl ResilientProducer {
    /// A producer with `config` (which should set `bootstrap.servers`),
    /// with `acks=all`, and idempotent unless `idempotent` is false.
    ///
    /// # Errors
    /// The client's error when librdkafka refuses the config.
    pub fn new(mut config: KafkaConfig, idempotent: bool) -> std::result::Result<Self, KafkaError> {
        config
            .set(
                "enable.idempotence",
                if idempotent { "true" } else { "false" },
            )
            .set("acks", "all");
        let producer = config.create()?;
        Ok(ResilientProducer {
            config,
            current: parking_lot::RwLock::new((0, producer)),
        })
    }

    /// Produces `record` and waits for the broker's acknowledgement (or
    /// `timeout` while the record is queued).
    ///
    /// # Errors
    /// The client's error; after one that a new producer may not repeat,
    /// the next send uses a new producer.
    pub async fn send<K, P>(
        &self,
        record: FutureRecord<'_, K, P>,
        timeout: Duration,
    ) -> std::result::Result<(), KafkaError>
    where
        K: rdkafka::message::ToBytes + ?Sized,
        P: rdkafka::message::ToBytes + ?Sized,
    {
        let (generation, producer) = {
            let current = self.current.read();
            (current.0, current.1.clone())
        };
        match producer.send(record, timeout).await {
            Ok(_) => Ok(()),
            Err((err, _)) => {
                if needs_new_producer(&err) {
                    self.replace(generation, &err);
                }
                Err(err)
            }
        }
    }

    /// Replaces the producer of `generation`, unless another failure did
    /// already.
    fn replace(&self, generation: u64, cause: &KafkaError) {
        let mut current = self.current.write();
        if current.0 != generation {
            return;
        }
        match self.config.create::<FutureProducer>() {
            Ok(producer) => {
                *current = (generation + 1, producer);
                tracing::warn!(error = %cause, "the broker refused the producer's records; using a new producer");
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot create a new producer; keeping the old one");
            }
        }
    }
}

/// Whether `err` may stick to this producer: anything the broker answered
/// other than a timeout or a full queue, which a new producer would not
/// change.
fn needs_new_producer(err: &KafkaError) -> bool {
    match err {
        KafkaError::MessageProduction(code) => !matches!(
            code,
            RDKafkaErrorCode::MessageTimedOut
                | RDKafkaErrorCode::QueueFull
                | RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition
        ),
        _ => false,
    }
}

/// Whether the broker may have appended a record whose send failed with
/// `err`: the producer timed out waiting for the answer, or lost the
/// connection, after the request may have left (librdkafka reports a record
/// still queued the same way; it cannot be told apart). Every other error
/// is an answer that the record was not appended, or a local refusal.
fn outcome_unknown(err: &KafkaError) -> bool {
    match err {
        KafkaError::MessageProduction(code) => matches!(
            code,
            RDKafkaErrorCode::MessageTimedOut
                | RDKafkaErrorCode::RequestTimedOut
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::NetworkException
                | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
                | RDKafkaErrorCode::PurgeInflight
        ),
        // The delivery report was dropped with the producer.
        KafkaError::Canceled => true,
        _ => false,
    }
}

/// A record the broker did not acknowledge.
#[derive(Debug)]
pub(crate) struct Unacknowledged {
    /// The error to return to the writer.
    pub(crate) error: Error,
    /// Whether the broker may have appended the record all the same (see
    /// [`outcome_unknown`]); when false it did not.
    pub(crate) outcome_unknown: bool,
}

/// The client's Kafka producer for write-back keyspaces.
pub(crate) struct Producer {
    producer: ResilientProducer,
    admin: AdminClient<DefaultClientContext>,
    config: WriteBackConfig,
}

fn kafka_error(keyspace: &str, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Store {
        keyspace: keyspace.to_owned(),
        message: format!("write-back queue: {what}: {e}"),
    }
}

impl Producer {
    pub(crate) fn new(config: WriteBackConfig) -> Result<Self> {
        let mut kafka = KafkaConfig::new();
        kafka.set("bootstrap.servers", &config.brokers).set(
            "message.timeout.ms",
            config.delivery_timeout.as_millis().to_string(),
        );
        let producer = ResilientProducer::new(kafka, config.idempotent)
            .map_err(|e| kafka_error("", "cannot create the producer", e))?;
        let admin: AdminClient<DefaultClientContext> = KafkaConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .create()
            .map_err(|e| kafka_error("", "cannot create the admin client", e))?;
        Ok(Producer {
            producer,
            admin,
            config,
        })
    }

    /// Creates the keyspace's topic if it does not exist.
    pub(crate) async fn ensure_topic(&self, keyspace: &str) -> Result<()> {
        let topic = crate::writeback::topic_for(keyspace);
        let new = NewTopic::new(
            &topic,
            self.config.partitions,
            TopicReplication::Fixed(self.config.replication_factor),
        );
        let results = self
            .admin
            .create_topics([&new], &AdminOptions::new())
            .await
            .map_err(|e| kafka_error(keyspace, "cannot create the topic", e))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(kafka_error(
                        keyspace,
                        &format!("cannot create topic {name}"),
                        code,
                    ));
                }
            }
        }
        Ok(())
    }

    /// Produces one record and waits for the broker's acknowledgement.
    pub(crate) async fn send(
        &self,
        record: &WriteBackRecord,
    ) -> std::result::Result<(), Unacknowledged> {
        let topic = record.topic();
        let key = record.encode_key();
        let mut headers = OwnedHeaders::new();
        for (name, value) in record.headers() {
            headers = headers.insert(Header {
                key: name,
                value: Some(&value[..]),
            });
        }
        // The writer's trace context, so that the worker's span for storing
        // the record links to the request (`docs/tracing.md`); the worker
        // ignores headers it does not know.
        #[cfg(feature = "otel")]
        for (name, value) in crate::telemetry::otel::current_headers() {
            headers = headers.insert(Header {
                key: &name,
                value: Some(value.as_bytes()),
            });
        }
        let mut message = FutureRecord::to(&topic).key(&key).headers(headers);
        if let Some(value) = &record.value {
            message = message.payload(&value[..]);
        }
        self.producer
            .send(message, self.config.delivery_timeout)
            .await
            .map_err(|e| {
                let outcome_unknown = outcome_unknown(&e);
                let what = if outcome_unknown {
                    "the broker did not acknowledge (outcome unknown: the record may be queued; \
                     the client sends it again until the broker takes it)"
                } else {
                    "the broker did not take the record"
                };
                Unacknowledged {
                    error: kafka_error(&record.keyspace, what, e),
                    outcome_unknown,
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_errors_a_new_producer_may_not_repeat_replace_it() {
        let production = |code| KafkaError::MessageProduction(code);
        // What a restarted broker that forgot the producer answers.
        assert!(needs_new_producer(&production(RDKafkaErrorCode::Unknown)));
        assert!(needs_new_producer(&production(
            RDKafkaErrorCode::UnknownProducerId
        )));
        assert!(needs_new_producer(&production(
            RDKafkaErrorCode::OutOfOrderSequenceNumber
        )));
        // A new producer would fail the same way.
        assert!(!needs_new_producer(&production(
            RDKafkaErrorCode::MessageTimedOut
        )));
        assert!(!needs_new_producer(&production(
            RDKafkaErrorCode::QueueFull
        )));
        assert!(!needs_new_producer(&production(
            RDKafkaErrorCode::UnknownTopicOrPartition
        )));
        assert!(!needs_new_producer(&KafkaError::Canceled));
    }

    #[test]
    fn only_timeouts_and_lost_connections_leave_the_outcome_unknown() {
        let production = |code| KafkaError::MessageProduction(code);
        // The request may have reached the broker: its answer did not come.
        assert!(outcome_unknown(&production(
            RDKafkaErrorCode::MessageTimedOut
        )));
        assert!(outcome_unknown(&production(
            RDKafkaErrorCode::RequestTimedOut
        )));
        assert!(outcome_unknown(&production(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
        assert!(outcome_unknown(&production(
            RDKafkaErrorCode::NotEnoughReplicasAfterAppend
        )));
        // The broker answered that it did not append the record.
        assert!(!outcome_unknown(&production(
            RDKafkaErrorCode::MessageSizeTooLarge
        )));
        assert!(!outcome_unknown(&production(
            RDKafkaErrorCode::UnknownTopicOrPartition
        )));
        assert!(!outcome_unknown(&production(RDKafkaErrorCode::QueueFull)));
    }
}

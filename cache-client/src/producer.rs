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
}

impl WriteBackConfig {
    /// Defaults for `brokers`.
    pub fn new(brokers: impl Into<String>) -> Self {
        WriteBackConfig {
            brokers: brokers.into(),
            partitions: DEFAULT_PARTITIONS,
            replication_factor: 1,
            delivery_timeout: DEFAULT_DELIVERY_TIMEOUT,
        }
    }
}

/// The client's Kafka producer for write-back keyspaces.
pub(crate) struct Producer {
    producer: FutureProducer,
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
        kafka
            .set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                config.delivery_timeout.as_millis().to_string(),
            );
        let producer: FutureProducer = kafka
            .create()
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
    pub(crate) async fn send(&self, record: &WriteBackRecord) -> Result<()> {
        let topic = record.topic();
        let key = record.encode_key();
        let mut headers = OwnedHeaders::new();
        for (name, value) in record.headers() {
            headers = headers.insert(Header {
                key: name,
                value: Some(&value[..]),
            });
        }
        let mut message = FutureRecord::to(&topic).key(&key).headers(headers);
        if let Some(value) = &record.value {
            message = message.payload(&value[..]);
        }
        self.producer
            .send(message, self.config.delivery_timeout)
            .await
            .map(|_| ())
            .map_err(|(e, _)| kafka_error(&record.keyspace, "the broker did not acknowledge", e))
    }
}

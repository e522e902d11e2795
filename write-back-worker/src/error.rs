//! The worker's [`Error`].

use std::path::PathBuf;

/// What can stop the write-back worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is invalid.
    #[error("invalid config: {field}: {message}")]
    Config {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The config file cannot be read or parsed.
    #[error("config file {}: {message}", path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// Why it cannot be used.
        message: String,
    },
    /// The Kafka client could not be created or subscribe.
    #[error("kafka: {what} failed: {source}")]
    Kafka {
        /// What was being done.
        what: &'static str,
        /// The client's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The store failed for good (unreachable at start-up, missing tables).
    #[error("store: {0}")]
    Store(#[source] cache_client::Error),
    /// Another consumer advanced a partition this worker was consuming: this
    /// worker lost it without noticing (a zombie). Nothing of the batch was
    /// written; restarting rejoins the group cleanly.
    #[error(
        "partition {topic}/{partition} was consumed by another worker (stored offset {stored:?}, expected {expected:?})"
    )]
    Fenced {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The offset stored now.
        stored: Option<i64>,
        /// The offset this worker expected.
        expected: Option<i64>,
    },
    /// The metrics endpoint cannot be served.
    #[error("metrics: {0}")]
    Metrics(String),
    /// The polling thread ended on its own (it panicked).
    #[error("the Kafka polling thread stopped unexpectedly")]
    PollerStopped,
}

/// The worker's result type.
pub type Result<T> = std::result::Result<T, Error>;

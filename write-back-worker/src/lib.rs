//! The write-back worker: drains write-back keyspaces' Kafka topics into
//! PostgreSQL without losing or double-applying a write.
//!
//! - [`config`]: [`Config`] (TOML, environment, flags) and [`config::Cli`].
//! - [`run`]: the worker as a library call; `main.rs` only parses, sets up
//!   tracing and wires the signals.
//! - `consumer`: the rdkafka consumer, polled on a blocking thread that
//!   hands records, assignments and revocations over a bounded channel;
//!   positions each assigned partition at its offset stored in PostgreSQL.
//! - `batch`: pure: decodes records (`cache_client::writeback`), sets aside
//!   what cannot be decoded, coalesces writes of one key (highest version
//!   wins) and computes each partition's next offset.
//! - [`dead_letter`]: the dead-letter topic's producer (the record format
//!   is `cache_client::dead_letter`).
//! - `repair`: the safety net for dirty cache entries whose `MarkClean` was
//!   lost (periodically compared with the store).
//! - `collect`: when the batch being collected is written (at once when
//!   nothing more is queued; under load, what queued meanwhile makes the
//!   next batch).
//! - `lanes`: pure: which batch is written next (one lane per partition:
//!   a partition's batches one after the other, up to
//!   `max_batches_in_flight` partitions' batches at once).
//! - `worker`: writes the lanes' batches with
//!   `PgStore::apply_write_back_batch`, retries the database, drains on
//!   shutdown.
//! - [`metrics`]: metric names and the Prometheus endpoint.
//! - [`error`]: the crate's [`Error`].
//! - [`fault`]: test-only fault points (`RINGCACHE_WORKER_FAULT`), for the
//!   chaos suite.
//!
//! # Guarantees
//! - **Every batch's rows, dead letters and consumed offsets commit in one
//!   PostgreSQL transaction**, so after any crash the stored offsets say
//!   exactly what was applied. Kafka's committed offsets are only a hint.
//! - A record is applied at least once; writes are version-guarded, so
//!   applying one again changes nothing: exactly once in effect.
//! - A record that can never be applied (it cannot be decoded, or the
//!   database refused it in `dead_letter_after_attempts` batch attempts) is
//!   produced to the dead-letter topic, acknowledged by the broker, before
//!   the batch that skips it commits; the partition then goes on.
//! - Database failures that may pass are retried with backoff; a batch is
//!   never skipped.
//! - Each keyspace's rows go where its store layout says (the keyspace file
//!   shared with the services, `keyspaces_file`), or to the shared table
//!   `ringcache_entries`.

pub mod config;
pub mod error;
pub mod metrics;

pub mod dead_letter;
pub mod fault;

mod batch;
mod collect;
mod consumer;
mod lanes;
mod repair;
mod worker;

pub use config::Config;
pub use error::{Error, Result};
pub use worker::{run, run_reloadable};

//! The ringcache smart client.
//!
//! Services link this crate to use a ringcache pool: it hashes each
//! `(keyspace, key)` onto a consistent-hash ring of cache nodes, keeps one
//! HTTP/2 channel per node (with one command stream on it that carries the
//! concurrent calls to the node in batches), routes around nodes that fail,
//! and replicates keyspaces that ask for it.
//!
//! - [`ring`]: the pure consistent-hash ring (placement in `docs/ring.md`).
//! - [`config`]: [`ClientConfig`] with documented defaults.
//! - [`Client`]: the raw-bytes API (`get`, `set`, `delete`, `multi_get`,
//!   `multi_set`, `stats`, `topology`).
//! - [`codec`]: typed values through a pluggable [`codec::Codec`].
//! - [`strategy`]: caching strategies per keyspace (cache-aside,
//!   read-through, write-around, write-through) over a [`store::Store`],
//!   with leases, negative caching, TTL jitter and runtime switching;
//!   [`keyspaces`]: the keyspace file that configures them; [`hlc`]: the
//!   version clock they share. Their promises are in `docs/strategies.md`.
//! - [`store`]: the `Store` trait and `PgStore` (feature `postgres`).
//! - [`error`]: the crate's [`Error`].
//! - [`plan`]: back-of-the-envelope sizing of a pool (pure arithmetic;
//!   `cachectl plan`, `docs/capacity.md`).
//! - [`telemetry`]: the client's metrics (through the `metrics` facade,
//!   into the service's recorder; names in `docs/metrics.md`).
//! - [`writeback`]: the write-back record format on Kafka (the contract with
//!   the `write-back-worker`); [`dead_letter`]: the worker's dead-letter
//!   topic format and what `cachectl dlq replay` sends back.
//!
//! # Consistency
//! - A read goes to the first healthy node in the key's ring order; with
//!   replication, writes and deletes go to the first `replicas` healthy
//!   nodes and succeed once `write_quorum` of them acknowledged.
//! - While a node is down (after `failure_threshold` consecutive failures),
//!   its keys are served by the next nodes on the ring; writes placed there
//!   live at most `fallback_ttl`.
//! - A node this client routed around is flushed before the client routes to
//!   it again, so it never serves this client a value overwritten during
//!   the outage. Another client that never saw the outage can read such a
//!   value until some client re-admits the node (see `docs/failover.md`).
//! - Only idempotent calls are retried: reads, deletes, and writes that are
//!   unconditional or version-fenced. `IfAbsent` writes are tried once.
//!
//! ```no_run
//! # async fn demo() -> cache_client::Result<()> {
//! use cache_client::{Client, ClientConfig, SetOptions};
//! let client = Client::connect(ClientConfig::new(["127.0.0.1:7700"])).await?;
//! client.set("default", "greeting", "hello", SetOptions::new().version(1)).await?;
//! let entry = client.get("default", "greeting").await?;
//! assert_eq!(entry.map(|e| e.value), Some("hello".into()));
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod client;
mod cluster;
pub mod codec;
pub mod config;
pub mod dead_letter;
pub mod error;
pub mod hlc;
pub mod keyspaces;
pub mod plan;
mod primitives;
#[cfg(feature = "kafka")]
pub mod producer;
pub mod ring;
pub mod store;
pub mod strategy;
pub mod telemetry;
mod transport;
pub mod writeback;

pub use client::{
    Client, Condition, Entry, Member, NodeFlush, NodeStats, SetOptions, SetOutcome, Topology,
};
pub use config::{ClientConfig, ClientTls, Replication, Token};
pub use error::{Error, Result};

//! Shared helpers for ringcache integration tests.
//!
//! - [`pg_url`], [`kafka_brokers`]: where the PostgreSQL server and the Kafka
//!   broker are. `cargo xtask test` starts both and exports their addresses;
//!   a test that needs one fails (it never skips) when it is missing.
//! - [`pg_bindir`], [`tansu_bin`]: the executables behind those services,
//!   for tests that start or restart their own instances.
//! - [`NodeProcess`]: the real `cache-node` binary as a child process, with a
//!   config in a temporary directory, its log in a file, readiness polled
//!   through the gRPC health service, and a guard that kills it on drop.
//! - [`NodeConfig`]: the TOML config such a node runs with.
//! - [`cluster`], [`own_database`], [`unique`]: a cluster of node processes,
//!   a database of the test's own, names no other run uses.
//! - [`free_addr`]: a free loopback address for a node to listen on.
//! - [`WorkerProcess`]: the real `write-back-worker` binary as a child
//!   process, run with a [`WorkerConfig`], its log in a file, restartable,
//!   and killed on drop.
//! - [`PrivateBroker`]: a tansu broker of the test's own, which it can
//!   SIGKILL and restart on the same address and storage.
//! - [`PrivatePostgres`]: a PostgreSQL server of the test's own, which it
//!   can stop and start again.
//! - [`ServiceProcess`]: the example HTTP service
//!   (`cache-client/examples/kv-service.rs`) as a child process, with a
//!   small HTTP client to drive it.
//! - [`bench`]: the `cache-bench` load generator's library (key
//!   distributions, the open-loop schedule, summaries, the driver;
//!   `docs/benchmarks.md`).
//! - [`chaos`]: consistency chaos testing: the operation history and its
//!   recorder, the checker of the strategies' contracts, the report, and a
//!   fault-injecting TCP proxy (`docs/chaos.md`).
//! - [`wb_bench`]: the write-back benchmark's load generator (`wb-bench`:
//!   worker vs `COPY`, and the write-to-row lag; `docs/benchmarks.md`).
//! - [`wt_bench`]: the write-through contention benchmark's load generator
//!   (`wt-bench`: N writers on one key or on keys of their own).
//! - [`write_back`]: what PostgreSQL holds for a write-back keyspace and
//!   waiting for it, durable puts retried until acknowledged, a trigger
//!   that records every row change, the worker's stored offsets and dead
//!   letters, and records produced with rdkafka directly.

pub mod bench;
mod broker;
pub mod chaos;
mod env;
mod fixtures;
mod node;
mod postgres;
mod process;
mod service;
pub mod wb_bench;
mod worker;
pub mod write_back;
pub mod wt_bench;

pub use broker::PrivateBroker;
pub use env::{kafka_brokers, pg_bindir, pg_url, tansu_bin};
pub use fixtures::{cluster, own_database, unique};
pub use node::{
    HEALTH_TIMEOUT, NODE_HEALTH_SERVICE, NodeConfig, NodeProcess, free_addr, node_binary,
};
pub use postgres::PrivatePostgres;
pub use service::{SERVICE_TIMEOUT, ServiceConfig, ServiceProcess, service_binary};
pub use worker::{WorkerConfig, WorkerExtra, WorkerProcess, dead_letter_topic, worker_binary};

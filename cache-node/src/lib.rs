//! A ringcache cache node.
//!
//! - [`config`]: the TOML/env/flag configuration and its validation.
//! - [`auth`]: bearer tokens, per-keyspace permissions, rate limits and the
//!   concurrency limit, shared by both transports.
//! - [`tls`]: rustls setup of the listeners (gRPC, RESP and metrics, all
//!   through `tokio-rustls`), replaceable while serving (SIGHUP reload).
//! - [`store`]: the domain core: keyspaces of versioned entries in
//!   byte-bounded compact tables, with leases, 2PC pending changes and
//!   write-back dirty entries. Knows nothing of gRPC.
//! - [`table`]: the compact table each keyspace keeps its entries in.
//! - [`grpc`]: the thin `ringcache.v1.CacheNode` adapter over the store.
//! - [`resp`]: the optional Redis-protocol (RESP2) listener, a second thin
//!   transport over the same store.
//! - [`sessions`]: client sessions and their flush generations, so that a
//!   write a client sent before re-admitting the node never lands after
//!   the flush (gRPC only).
//! - `prepare_queue`: the per-key queue in which write-through prepares
//!   wait their turn behind another pending change of the key.
//! - [`metrics`]: the node's Prometheus registry.
//! - [`server`]: [`run`], which wires them together, runs the sweeper that
//!   times out pending changes and removes expired entries, and drains on
//!   shutdown; [`run_reloadable`] also applies reloaded tokens and TLS
//!   files.
//!
//! A binary (`main.rs`) only parses the config, sets up tracing, binds and
//! calls [`run`].

pub mod auth;
pub mod config;
pub mod error;
pub mod grpc;
pub mod metrics;
pub(crate) mod prepare_queue;
pub mod resp;
pub mod server;
pub mod sessions;
pub mod store;
pub mod table;
pub mod tls;

pub use config::{Cli, Config};
pub use error::{Error, Result};
pub use server::{Listeners, run, run_reloadable};

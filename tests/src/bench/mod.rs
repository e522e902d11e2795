//! `cache-bench`: a load generator for a ringcache cluster (gRPC through
//! `cache_client::Client`) or any RESP server (a node's `resp_listen`,
//! `redis-server`). See `docs/benchmarks.md`.
//!
//! - [`keys`]: which key an operation touches (uniform or Zipf over
//!   `--keys` ranks). Pure.
//! - [`schedule`]: the open-loop schedule, when slot `n` is due. Pure.
//! - [`summary`]: per-worker recorders (HdrHistogram of latencies, counts,
//!   the first errors), merged into a [`Summary`] printed as text or JSON.
//!   Pure.
//! - [`run`]: the driver: targets (gRPC, RESP, RESP routed by the ring),
//!   preload, warm-up, the closed and open loops, batched reads.
//! - [`baseline`]: the `grpc-baseline` server, the `CacheNode` service
//!   answering fixed replies without a cache, to measure the transport.
//! - [`trace`]: the hit-ratio traces (Zipf, scans, a moving hot set)
//!   replayed by `hit-ratio`. Pure.
//! - [`ring`]: the ring's balance, key movement and lookup cost, printed
//!   by `ring-report`. Pure.

pub mod baseline;
pub mod keys;
pub mod ring;
pub mod run;
pub mod schedule;
pub mod summary;
pub mod trace;

pub use keys::{KeyChooser, KeyDistribution};
pub use run::{Mode, Options, Target, run};
pub use schedule::Schedule;
pub use summary::{Recorder, Summary};

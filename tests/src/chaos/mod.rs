//! Consistency chaos testing: record what a workload did, check it against
//! the strategies' contracts, report it, and inject network faults.
//!
//! - [`history`]: [`Op`] records appended concurrently through a
//!   [`Recorder`], and the [`FinalState`] (store and caches) read at
//!   quiescence.

pub mod history;

pub use history::{
    CacheObservation, CachedEntry, Digest, FinalKey, FinalState, History, InFlight, Op, OpId,
    OpKind, Outcome, Recorder, StoredRow, Subject,
};

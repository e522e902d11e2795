//! Consistency chaos testing: record what a workload did, check it against
//! the strategies' contracts, report it, and inject network faults.
//!
//! - [`history`]: [`Op`] records appended concurrently through a
//!   [`Recorder`], and the [`FinalState`] (store and caches) read at
//!   quiescence.
//! - [`checker`]: [`check`] finds [`Violation`]s of `docs/strategies.md`
//!   (lost, phantom and stale values) and the worst staleness per strategy,
//!   conservatively: unknown outcomes and concurrent operations are given
//!   the benefit of the doubt.
//! - [`report`]: a [`Report`] per strategy and fault, as a table and JSON.
//! - [`proxy`]: [`FaultProxy`], a loopback TCP proxy that adds latency or
//!   partitions (refusing or blackholing) on command.
//! - [`faults`]: [`FaultKind`], the faults a phase injects, by name.
//! - [`client`]: the client processes (`chaos client`), each its own
//!   `cache_client::Client` with its own proxies, and their workload; the
//!   runner drives them over stdin and stdout.
//! - [`run`]: a whole run: the cluster as processes, the clients, the
//!   fault schedule, quiescence, the final state and the check.
//!
//! What each check means and assumes: `docs/chaos.md`.

pub mod checker;
pub mod client;
pub mod faults;
pub mod history;
pub mod proxy;
pub mod report;
pub mod run;

pub use checker::{
    CheckConfig, CheckResult, DEFAULT_CLOCK_SLACK, KeyRef, STRATEGIES, StrategySummary, Violation,
    ViolationKind, check,
};
pub use faults::FaultKind;
pub use history::{
    CacheObservation, CachedEntry, Digest, DirtyObservation, FinalKey, FinalState, History,
    InFlight, Op, OpId, OpKind, Outcome, Recorder, StoredRow, Subject, since_unix_origin,
    unix_now_ns,
};
pub use proxy::{Existing, Fault, FaultProxy, NewConnections, ProxyHandle};
pub use report::{FaultViolation, Report, ReportRow};

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
//! - [`run`]: a whole run: the cluster as processes, the workload, the
//!   fault schedule, quiescence, the final state and the check.
//!
//! What each check means and assumes: `docs/chaos.md`.

pub mod checker;
pub mod history;
pub mod proxy;
pub mod report;
pub mod run;

pub use checker::{
    CheckConfig, CheckResult, DEFAULT_CLOCK_SLACK, KeyRef, STRATEGIES, StrategySummary, Violation,
    ViolationKind, check,
};
pub use history::{
    CacheObservation, CachedEntry, Digest, FinalKey, FinalState, History, InFlight, Op, OpId,
    OpKind, Outcome, Recorder, StoredRow, Subject,
};
pub use proxy::{Existing, Fault, FaultProxy, NewConnections, ProxyHandle};
pub use report::{FaultViolation, Report, ReportRow};

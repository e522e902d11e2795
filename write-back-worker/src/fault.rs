//! Test-only fault points, for the chaos suite (`docs/chaos.md`): the
//! environment variable `RINGCACHE_WORKER_FAULT` names one, and the worker
//! misbehaves there on purpose. Unset (always, outside tests) they do
//! nothing.
//!
//! - `exit-after-commit`: the process exits right after a batch's database
//!   transaction committed and before the nodes are told (`MarkClean`),
//!   as a crash between the two would: the rows and offsets are stored, the
//!   cache entries stay dirty.

/// The variable naming the fault point.
pub const FAULT_VARIABLE: &str = "RINGCACHE_WORKER_FAULT";

/// Exit status of a worker stopped by a fault point.
pub const FAULT_EXIT_STATUS: i32 = 86;

/// Called after a batch committed, before `MarkClean`.
pub(crate) fn after_commit() {
    if std::env::var(FAULT_VARIABLE).is_ok_and(|fault| fault == "exit-after-commit") {
        tracing::warn!(
            fault = "exit-after-commit",
            "fault point: exiting between the commit and MarkClean"
        );
        std::process::exit(FAULT_EXIT_STATUS);
    }
}

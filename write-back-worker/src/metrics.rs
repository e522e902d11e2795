//! The worker's metric names (through the `metrics` facade; the binary or
//! the embedding process installs a recorder).

/// Counter: rows written to the store (newer than what it held).
pub const RECORDS_APPLIED_TOTAL: &str = "ringcache_wb_records_applied_total";
/// Counter: rows the store's version guard refused (replays, or writes
/// overtaken by a newer one).
pub const RECORDS_STALE_TOTAL: &str = "ringcache_wb_records_stale_total";
/// Counter: records folded into a newer write of the same key in the same
/// batch.
pub const RECORDS_COALESCED_TOTAL: &str = "ringcache_wb_records_coalesced_total";
/// Counter: committed batches.
pub const BATCHES_TOTAL: &str = "ringcache_wb_batches_total";
/// Counter: records moved to the dead-letter table.
pub const DEAD_LETTERS_TOTAL: &str = "ringcache_wb_dead_letters_total";
/// Histogram: seconds from building a batch to its commit, retries included.
pub const BATCH_SECONDS: &str = "ringcache_wb_batch_seconds";
/// Histogram: seconds from a record's `rc-written-at` to its batch's commit.
pub const LAG_SECONDS: &str = "ringcache_wb_lag_seconds";

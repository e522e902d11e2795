//! Back-of-the-envelope sizing of a ringcache deployment: pure arithmetic,
//! no I/O. `cachectl plan` prints it; `docs/capacity.md` explains every
//! formula and where each default comes from.
//!
//! From the data set (keys, key and value sizes, replicas), the request
//! rates and what one node can hold and serve, [`plan`] derives the number
//! of nodes, what each one holds and serves (with every node up and with
//! the spare nodes down), the `capacity_bytes` to configure, and, for
//! write-back, the Kafka throughput, storage, partitions and workers.
//!
//! The figures are estimates for planning, not guarantees: the per-node
//! throughput and per-item memory are inputs, to be taken from
//! measurements on the machines that will run the pool
//! (`docs/benchmarks.md`).

use std::time::Duration;

use serde::Serialize;

use crate::error::{Error, Result};

/// Bytes the node charges a small entry against `capacity_bytes` beyond
/// its key and value, index included, as its table accounts them
/// (`cache_node::store::ENTRY_OVERHEAD_BYTES`, a mean measured by a node
/// test; a test in the tests crate keeps the two equal).
pub const NODE_ENTRY_CHARGE_BYTES: u64 = 56;

/// The most loaded node's share of keys over the mean, at the default 1024
/// virtual points per unit of weight with equal weights: the bound the
/// ring's property tests enforce (`docs/ring.md`, measured worst case 1.064
/// for 3 to 10 nodes).
pub const RING_IMBALANCE: f64 = 1.10;

/// [`RING_IMBALANCE`] as a fraction, for exact integer arithmetic on bytes
/// and counts.
const IMBALANCE_NUM: u128 = 11;
const IMBALANCE_DEN: u128 = 10;

/// Bytes a write-back record takes in a Kafka log beyond its key and value,
/// uncompressed: the record's framing (length, attributes, timestamp and
/// offset deltas, key and value lengths: about 16 bytes), its two 8-byte
/// headers with their names (`rc-version`, `rc-written-at`: 44 bytes), and
/// the keyspace name and `0x00` that prefix the record key (up to 20 bytes
/// for names of up to 19 characters). Batch headers (61 bytes per batch)
/// are left out: a batch carries many records.
pub const KAFKA_RECORD_OVERHEAD_BYTES: u64 = 80;

/// Fewest workers to run: one more than needed to take over a dead one's
/// partitions (`docs/write-back.md`).
pub const MIN_WORKERS: u64 = 2;

/// Fewest partitions a write-back topic gets: the client's default for the
/// topics it creates (`producer::DEFAULT_PARTITIONS`).
pub const MIN_PARTITIONS: u64 = 4;

/// Default average key size, in bytes: a round figure for keys such as
/// `user:0123456789abcdef`; give yours.
pub const DEFAULT_KEY_BYTES: u64 = 32;
/// Default memory one node may give the cache: a round figure, not a
/// recommendation; give what your machines have.
pub const DEFAULT_NODE_MEMORY_BYTES: u64 = 4 << 30;
/// Default requests per second one node serves: a round figure below the
/// only gRPC figure measured so far (13,728 ops/s, a dev build sharing a
/// noisy 2-core machine with its load generator, `docs/benchmarks.md`).
/// Replace it with the figure measured on your machines.
pub const DEFAULT_NODE_OPS_PER_SEC: f64 = 10_000.0;
/// Default memory per entry beyond its key and value: the node's measured
/// resident-set growth per item in the memory suite of
/// `docs/benchmarks.md` (183.8 bytes for an 11-byte key and a 100-byte
/// value on the compact table, issue 14), minus that key and value,
/// rounded up. Above the node's own charge ([`NODE_ENTRY_CHARGE_BYTES`]):
/// it includes what malloc keeps beside the entries and the index at its
/// load. Replace it with the figure measured on your machines.
pub const DEFAULT_ITEM_OVERHEAD_BYTES: u64 = 73;
/// Default fraction of each node's memory and throughput kept free for
/// peaks, the process itself (connections, lease records, stale values,
/// allocator slack) and growth.
pub const DEFAULT_HEADROOM: f64 = 0.3;
/// Default nodes that may be down at once while the rest still carry
/// everything within their headroom.
pub const DEFAULT_SPARE_NODES: u64 = 1;
/// Default Kafka retention of the write-back topics: Kafka's own default
/// (`log.retention.hours = 168`).
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default PostgreSQL outage that write-back should ride out: a round
/// figure; give your own recovery objective.
pub const DEFAULT_OUTAGE: Duration = Duration::from_secs(3600);
/// Default replication factor of the write-back topics, as
/// `docs/write-back.md` advises for production.
pub const DEFAULT_KAFKA_REPLICATION: u64 = 3;
/// Default rows per second one write-back worker stores: a placeholder,
/// not a measurement (the worker's figure is measured by the write-back
/// suite of `docs/benchmarks.md`); replace it.
pub const DEFAULT_WORKER_ROWS_PER_SEC: f64 = 2_000.0;

/// What the plan is computed from. [`Input::new`] sets every field but the
/// data set to its documented default.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Input {
    /// Distinct keys cached.
    pub keys: u64,
    /// Average key size, bytes.
    pub key_bytes: u64,
    /// Average value size, bytes.
    pub value_bytes: u64,
    /// Copies of each key (the keyspace's `replicas`).
    pub replicas: u64,
    /// Reads per second, all clients together.
    pub reads_per_sec: f64,
    /// Writes (sets and deletes) per second, all clients together.
    pub writes_per_sec: f64,
    /// Of those writes, how many per second are write-back writes (queued
    /// on Kafka for the worker).
    pub write_back_per_sec: f64,
    /// Memory one node may give the cache, bytes.
    pub node_memory_bytes: u64,
    /// Requests per second one node serves.
    pub node_ops_per_sec: f64,
    /// Memory per entry beyond its key and value, bytes.
    pub item_overhead_bytes: u64,
    /// Fraction in `[0, 1)` of each node's memory and throughput (and of
    /// each worker's throughput) kept free.
    pub headroom: f64,
    /// Nodes that may be down at once.
    pub spare_nodes: u64,
    /// Kafka retention of the write-back topics.
    #[serde(serialize_with = "as_secs")]
    pub retention: Duration,
    /// PostgreSQL outage that write-back should ride out.
    #[serde(serialize_with = "as_secs")]
    pub outage: Duration,
    /// Replication factor of the write-back topics.
    pub kafka_replication: u64,
    /// Rows per second one write-back worker stores.
    pub worker_rows_per_sec: f64,
}

impl Input {
    /// `keys` keys of `value_bytes` bytes; everything else at its default,
    /// with no traffic.
    pub fn new(keys: u64, value_bytes: u64) -> Self {
        Input {
            keys,
            key_bytes: DEFAULT_KEY_BYTES,
            value_bytes,
            replicas: 1,
            reads_per_sec: 0.0,
            writes_per_sec: 0.0,
            write_back_per_sec: 0.0,
            node_memory_bytes: DEFAULT_NODE_MEMORY_BYTES,
            node_ops_per_sec: DEFAULT_NODE_OPS_PER_SEC,
            item_overhead_bytes: DEFAULT_ITEM_OVERHEAD_BYTES,
            headroom: DEFAULT_HEADROOM,
            spare_nodes: DEFAULT_SPARE_NODES,
            retention: DEFAULT_RETENTION,
            outage: DEFAULT_OUTAGE,
            kafka_replication: DEFAULT_KAFKA_REPLICATION,
            worker_rows_per_sec: DEFAULT_WORKER_ROWS_PER_SEC,
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: &str| {
            Err(Error::PlanInput {
                field,
                reason: reason.to_owned(),
            })
        };
        let rate = |v: f64| v.is_finite() && v >= 0.0;
        if self.key_bytes == 0 {
            return bad("key_bytes", "must be at least 1");
        }
        if self.replicas == 0 {
            return bad("replicas", "must be at least 1");
        }
        if !rate(self.reads_per_sec) {
            return bad("reads_per_sec", "must be a finite number >= 0");
        }
        if !rate(self.writes_per_sec) {
            return bad("writes_per_sec", "must be a finite number >= 0");
        }
        if !rate(self.write_back_per_sec) {
            return bad("write_back_per_sec", "must be a finite number >= 0");
        }
        if self.write_back_per_sec > self.writes_per_sec {
            return bad(
                "write_back_per_sec",
                "must not exceed writes_per_sec (write-back writes are writes too)",
            );
        }
        if self.node_memory_bytes == 0 {
            return bad("node_memory_bytes", "must be at least 1");
        }
        if !(self.node_ops_per_sec.is_finite() && self.node_ops_per_sec > 0.0) {
            return bad("node_ops_per_sec", "must be a finite number > 0");
        }
        if !(self.headroom.is_finite() && (0.0..1.0).contains(&self.headroom)) {
            return bad("headroom", "must be in [0, 1)");
        }
        if self.write_back_per_sec > 0.0 {
            if self.kafka_replication == 0 {
                return bad("kafka_replication", "must be at least 1");
            }
            if !(self.worker_rows_per_sec.is_finite() && self.worker_rows_per_sec > 0.0) {
                return bad("worker_rows_per_sec", "must be a finite number > 0");
            }
        }
        Ok(())
    }
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

fn as_opt_secs<S: serde::Serializer>(
    d: &Option<Duration>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&d.as_secs()),
        None => s.serialize_none(),
    }
}

/// Which need set the number of nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitedBy {
    /// The data (and dirty entries) did not fit in fewer nodes' memory.
    Memory,
    /// Fewer nodes could not serve the requests.
    Throughput,
    /// Each key needs `replicas` distinct nodes.
    Replicas,
}

impl std::fmt::Display for LimitedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LimitedBy::Memory => "memory",
            LimitedBy::Throughput => "throughput",
            LimitedBy::Replicas => "replicas",
        })
    }
}

/// What one node holds and serves.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct NodeLoad {
    /// Nodes up.
    pub nodes_up: u64,
    /// Entries on the most loaded node (mean × [`RING_IMBALANCE`]).
    pub items: u64,
    /// Memory the most loaded node uses for entries, bytes (with the dirty
    /// entries an outage leaves, for write-back).
    pub memory_bytes: u64,
    /// Requests per second the most loaded node serves.
    pub ops_per_sec: f64,
}

/// The write-back side of the plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WriteBackPlan {
    /// Bytes per second produced to the write-back topics (one copy).
    pub kafka_bytes_per_sec: f64,
    /// Bytes the topics hold at full retention, all replicas.
    pub kafka_storage_bytes: u64,
    /// Records the topics hold at full retention (one copy).
    pub kafka_records: u64,
    /// Partitions of the write-back topic (for several write-back
    /// keyspaces: in total, shared out by their rates).
    pub partitions: u64,
    /// Write-back workers to run in the group.
    pub workers: u64,
    /// Records queued during the outage (one per write).
    pub outage_backlog_records: u64,
    /// Time for the workers to store that backlog once PostgreSQL is back
    /// while the writes go on; `None` when they cannot catch up.
    #[serde(serialize_with = "as_opt_secs")]
    pub catch_up: Option<Duration>,
    /// Dirty bytes the most loaded node holds at the end of the outage
    /// (node accounting: key + value + [`NODE_ENTRY_CHARGE_BYTES`]).
    pub dirty_bytes_per_node: u64,
    /// The `max_dirty_bytes` to set, summed over the node's write-back
    /// keyspaces: enough for the outage with the spare nodes down (never
    /// above `capacity_bytes`, the node's own limit, since a key has at
    /// most one dirty entry).
    pub max_dirty_bytes: u64,
    /// How long an outage the node's default budget (`capacity_bytes / 4`)
    /// rides out before the fullest node refuses write-back writes, with
    /// the spare nodes down and every write dirtying another key.
    #[serde(serialize_with = "as_secs")]
    pub default_budget_covers: Duration,
}

/// The plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Plan {
    /// The inputs it was computed from.
    pub input: Input,
    /// Nodes to run.
    pub nodes: u64,
    /// Which need set `nodes` (before the spare nodes were added).
    pub limited_by: LimitedBy,
    /// Nodes the memory needs, spares not included.
    pub nodes_for_memory: u64,
    /// Nodes the request rate needs, spares not included.
    pub nodes_for_throughput: u64,
    /// Memory per entry: key + value + `item_overhead_bytes`.
    pub item_bytes: u64,
    /// What the node charges per entry against `capacity_bytes`: key +
    /// value + [`NODE_ENTRY_CHARGE_BYTES`].
    pub item_charge_bytes: u64,
    /// Memory all copies of all entries take, bytes.
    pub total_bytes: u64,
    /// Requests per second to the nodes: reads, plus writes × replicas.
    pub node_requests_per_sec: f64,
    /// The `capacity_bytes` to give each node, summed over its keyspaces:
    /// its share of the data with the spare nodes down.
    pub capacity_bytes: u64,
    /// The most loaded node with every node up.
    pub all_up: NodeLoad,
    /// The most loaded node with the spare nodes down.
    pub degraded: NodeLoad,
    /// Write-back, when `write_back_per_sec > 0`.
    pub write_back: Option<WriteBackPlan>,
    /// Things the reader should know about this plan.
    pub warnings: Vec<String>,
}

/// The fullest node's share of `total` over `nodes` nodes, rounded up:
/// `total × 1.10 / nodes`, exactly, saturating at `u64::MAX`.
fn fullest(total: u128, nodes: u64) -> u64 {
    let den = IMBALANCE_DEN * u128::from(nodes.max(1));
    u64::try_from((total * IMBALANCE_NUM).div_ceil(den)).unwrap_or(u64::MAX)
}

fn ceil_div(a: f64, b: f64) -> u64 {
    // Inputs are validated finite and b > 0; the result is a count that
    // fits u64 for any real deployment, and `as` saturates beyond.
    (a / b).ceil().max(0.0) as u64
}

/// Computes the plan.
///
/// # Errors
/// [`Error::PlanInput`] naming the first input out of range.
pub fn plan(input: &Input) -> Result<Plan> {
    input.validate()?;
    let mut warnings = Vec::new();
    let free = 1.0 - input.headroom;
    let item_bytes = input.key_bytes + input.value_bytes + input.item_overhead_bytes;
    let item_charge_bytes = input.key_bytes + input.value_bytes + NODE_ENTRY_CHARGE_BYTES;
    // u128: a product of three u64 inputs cannot overflow it in practice
    // (keys × replicas × bytes), and overflowing inputs saturate below.
    let copies = u128::from(input.keys) * u128::from(input.replicas);
    let cached_bytes = copies.saturating_mul(u128::from(item_bytes));

    // Write-back: writes made during an outage stay dirty on the nodes,
    // beside the cache's capacity, until the worker stores them; at most
    // one dirty entry per key and copy.
    let wb = input.write_back_per_sec;
    let outage_secs = input.outage.as_secs_f64();
    let outage_backlog_records = (wb * outage_secs).ceil() as u64;
    let dirty_keys = outage_backlog_records.min(input.keys);
    let dirty_copies = u128::from(dirty_keys) * u128::from(input.replicas);
    let dirty_bytes = dirty_copies.saturating_mul(u128::from(item_bytes));
    let data_bytes = cached_bytes.saturating_add(dirty_bytes);

    let node_requests_per_sec = input.reads_per_sec + input.writes_per_sec * input.replicas as f64;
    let usable_memory = input.node_memory_bytes as f64 * free;
    let usable_ops = input.node_ops_per_sec * free;
    let nodes_for_memory = ceil_div(data_bytes as f64 * RING_IMBALANCE, usable_memory);
    let nodes_for_throughput = ceil_div(node_requests_per_sec * RING_IMBALANCE, usable_ops);
    let (base, limited_by) = [
        (input.replicas, LimitedBy::Replicas),
        (nodes_for_throughput, LimitedBy::Throughput),
        (nodes_for_memory, LimitedBy::Memory),
    ]
    .into_iter()
    // The last of equal maxima wins: memory, then throughput, then replicas.
    .max_by_key(|(n, _)| *n)
    .unwrap_or((1, LimitedBy::Replicas));
    let base = base.max(1);
    let nodes = base + input.spare_nodes;

    let load = |up: u64| NodeLoad {
        nodes_up: up,
        items: fullest(copies, up),
        memory_bytes: fullest(data_bytes, up),
        ops_per_sec: node_requests_per_sec * RING_IMBALANCE / up as f64,
    };
    let all_up = load(nodes);
    let degraded = load(base);
    let capacity_bytes = fullest(copies.saturating_mul(u128::from(item_charge_bytes)), base);

    if input.item_overhead_bytes < NODE_ENTRY_CHARGE_BYTES {
        warnings.push(format!(
            "item_overhead_bytes ({}) is below the node's own charge of {NODE_ENTRY_CHARGE_BYTES} \
             bytes per entry: capacity_bytes fills before the memory estimate does",
            input.item_overhead_bytes
        ));
    }
    if input.spare_nodes == 0 {
        warnings.push(
            "no spare node: with a node down, the others carry more than the headroom allows"
                .to_owned(),
        );
    }

    let write_back = (wb > 0.0).then(|| {
        let record_bytes =
            (input.key_bytes + input.value_bytes + KAFKA_RECORD_OVERHEAD_BYTES) as f64;
        let kafka_bytes_per_sec = wb * record_bytes;
        let retention_secs = input.retention.as_secs_f64();
        let kafka_records = (wb * retention_secs).ceil() as u64;
        let kafka_storage_bytes =
            (kafka_bytes_per_sec * retention_secs * input.kafka_replication as f64).ceil() as u64;
        let workers = ceil_div(wb, input.worker_rows_per_sec * free).max(MIN_WORKERS);
        // Twice the workers: room to double the group without adding
        // partitions (which moves keys between partitions).
        let partitions = (2 * workers).max(MIN_PARTITIONS);
        let spare_rate = workers as f64 * input.worker_rows_per_sec - wb;
        let catch_up = (spare_rate > 0.0)
            .then(|| Duration::from_secs_f64(outage_backlog_records as f64 / spare_rate));
        let dirty_charge = dirty_copies.saturating_mul(u128::from(item_charge_bytes));
        let dirty_bytes_per_node = fullest(dirty_charge, nodes);
        // At most one dirty entry per key and copy, so this never exceeds
        // capacity_bytes, the node's upper bound for max_dirty_bytes.
        let max_dirty_bytes = fullest(dirty_charge, base).min(capacity_bytes);
        // The node's default budget, and how long an outage fills it: dirty
        // bytes land on the most loaded node (spares down) at `fill_rate`
        // until every key it holds is dirty.
        let default_budget = capacity_bytes / 4;
        let fill_rate =
            wb * input.replicas as f64 * item_charge_bytes as f64 * RING_IMBALANCE / base as f64;
        // Assumes every write dirties another key: a conservative bound,
        // since rewrites of a dirty key replace its entry.
        let default_budget_covers = Duration::from_secs_f64(default_budget as f64 / fill_rate);
        if max_dirty_bytes > default_budget {
            warnings.push(format!(
                "the outage leaves {max_dirty_bytes} dirty bytes on the fullest node, more than \
                 the default max_dirty_bytes (capacity_bytes / 4 = {default_budget}), which fills \
                 after about {}s of outage: set max_dirty_bytes in the node's config",
                default_budget_covers.as_secs()
            ));
        }
        if input.retention < input.outage {
            warnings.push(
                "retention is shorter than the outage to ride out: records would be deleted \
                 before the worker stores them"
                    .to_owned(),
            );
        }
        if catch_up.is_none() {
            warnings.push(
                "the workers have no spare throughput: after an outage they never catch up"
                    .to_owned(),
            );
        }
        WriteBackPlan {
            kafka_bytes_per_sec,
            kafka_storage_bytes,
            kafka_records,
            partitions,
            workers,
            outage_backlog_records,
            catch_up,
            dirty_bytes_per_node,
            max_dirty_bytes,
            default_budget_covers,
        }
    });

    Ok(Plan {
        input: input.clone(),
        nodes,
        limited_by,
        nodes_for_memory,
        nodes_for_throughput,
        item_bytes,
        item_charge_bytes,
        total_bytes: u64::try_from(data_bytes).unwrap_or(u64::MAX),
        node_requests_per_sec,
        capacity_bytes,
        all_up,
        degraded,
        write_back,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn memory_sets_the_node_count() {
        // 100 M keys of 32 + 1024 bytes, 2 copies: 100e6 × 1129 × 2 =
        // 225.8 GB; × 1.1 / (4 GiB × 0.7) = 82.61 → 83 nodes, +1 spare.
        let mut input = Input::new(100_000_000, 1024);
        input.replicas = 2;
        input.reads_per_sec = 10_000.0;
        let plan = plan(&input).unwrap();
        assert_eq!(plan.item_bytes, 32 + 1024 + 73);
        assert_eq!(plan.total_bytes, 225_800_000_000);
        assert_eq!(plan.nodes_for_memory, 83);
        assert_eq!(plan.limited_by, LimitedBy::Memory);
        assert_eq!(plan.nodes, 84);
        // Degraded: 83 nodes up; each of the fullest holds
        // 200e6 × 1.1 / 83 = 2,650,603 entries.
        assert_eq!(plan.degraded.nodes_up, 83);
        assert_eq!(plan.degraded.items, 2_650_603);
        assert!(plan.degraded.memory_bytes as f64 <= 0.7 * (4 * GIB) as f64);
        assert!(plan.all_up.memory_bytes < plan.degraded.memory_bytes);
        // capacity_bytes: the node's charge, for the degraded share.
        assert_eq!(
            plan.capacity_bytes,
            (200_000_000u64 * 1112 * 11).div_ceil(10 * 83)
        );
        assert!(plan.write_back.is_none());
    }

    #[test]
    fn throughput_sets_the_node_count_and_writes_count_per_replica() {
        // 1 M small keys fit one node; 90k reads + 10k writes × 3 copies =
        // 120k requests/s; × 1.1 / (10k × 0.7) = 18.86 → 19, +1 spare.
        let mut input = Input::new(1_000_000, 100);
        input.replicas = 3;
        input.reads_per_sec = 90_000.0;
        input.writes_per_sec = 10_000.0;
        let plan = plan(&input).unwrap();
        assert_eq!(plan.node_requests_per_sec, 120_000.0);
        assert_eq!(plan.nodes_for_throughput, 19);
        assert_eq!(plan.limited_by, LimitedBy::Throughput);
        assert_eq!(plan.nodes, 20);
        assert!((plan.degraded.ops_per_sec - 120_000.0 * 1.1 / 19.0).abs() < 1e-6);
        assert!(plan.degraded.ops_per_sec <= 10_000.0 * 0.7);
    }

    #[test]
    fn replicas_set_the_floor() {
        let mut input = Input::new(1000, 10);
        input.replicas = 3;
        input.spare_nodes = 0;
        let plan = plan(&input).unwrap();
        assert_eq!(plan.limited_by, LimitedBy::Replicas);
        assert_eq!(plan.nodes, 3);
        assert!(plan.warnings.iter().any(|w| w.contains("no spare node")));
    }

    #[test]
    fn an_empty_data_set_still_gets_one_node() {
        let mut input = Input::new(0, 0);
        input.spare_nodes = 0;
        let plan = plan(&input).unwrap();
        assert_eq!(plan.nodes, 1);
        assert_eq!(plan.capacity_bytes, 0);
    }

    #[test]
    fn write_back_sizes_kafka_workers_and_the_dirty_budget() {
        let mut input = Input::new(10_000_000, 1000);
        input.key_bytes = 20;
        input.writes_per_sec = 5000.0;
        input.write_back_per_sec = 5000.0;
        input.outage = Duration::from_secs(600);
        input.retention = Duration::from_secs(86_400);
        let plan = plan(&input).unwrap();
        let wb = plan.write_back.as_ref().unwrap();
        // 5000 × (20 + 1000 + 80) bytes/s; a day of it, 3 copies.
        assert_eq!(wb.kafka_bytes_per_sec, 5000.0 * 1100.0);
        assert_eq!(wb.kafka_records, 5000 * 86_400);
        assert_eq!(wb.kafka_storage_bytes, 5000 * 1100 * 86_400 * 3);
        // 5000 / (2000 × 0.7) = 3.57 → 4 workers, 8 partitions.
        assert_eq!(wb.workers, 4);
        assert_eq!(wb.partitions, 8);
        // Backlog 3 M records, stored at 4 × 2000 − 5000 = 3000/s: 1000 s.
        assert_eq!(wb.outage_backlog_records, 3_000_000);
        assert_eq!(wb.catch_up, Some(Duration::from_secs(1000)));
        // The outage dirties 3 M of the 10 M keys: 3/10 of capacity_bytes
        // on the fullest node, above the default quarter, which 5000
        // writes/s fill in 2.5 M / 5000 = 500 s.
        assert_eq!(
            wb.max_dirty_bytes,
            (3_000_000u64 * 1076 * 11).div_ceil(10 * plan.degraded.nodes_up)
        );
        assert!(wb.max_dirty_bytes < plan.capacity_bytes);
        let covers = wb.default_budget_covers.as_secs_f64();
        assert!((covers - 500.0).abs() < 1.0, "{covers}");
        assert_eq!(plan.warnings.len(), 1, "{:?}", plan.warnings);
        assert!(plan.warnings[0].contains("set max_dirty_bytes"));
        // Dirty entries count in each node's memory.
        let without = {
            let mut i = input.clone();
            i.write_back_per_sec = 0.0;
            super::plan(&i).unwrap()
        };
        assert!(plan.total_bytes > without.total_bytes);
    }

    #[test]
    fn a_key_is_dirty_once_however_long_the_outage() {
        // A day of writes over 1000 keys dirties each key once: the budget
        // needed is the whole capacity, never more.
        let mut input = Input::new(1000, 100);
        input.writes_per_sec = 1000.0;
        input.write_back_per_sec = 1000.0;
        input.outage = Duration::from_secs(86_400);
        input.retention = Duration::from_secs(3600);
        let plan = plan(&input).unwrap();
        let wb = plan.write_back.unwrap();
        assert_eq!(wb.max_dirty_bytes, plan.capacity_bytes);
        assert_eq!(wb.outage_backlog_records, 86_400_000);
        assert!(plan.warnings.iter().any(|w| w.contains("retention")));
        assert!(plan.warnings.iter().any(|w| w.contains("max_dirty_bytes")));
    }

    #[test]
    fn workers_without_spare_throughput_never_catch_up() {
        let mut input = Input::new(1000, 100);
        input.writes_per_sec = 4000.0;
        input.write_back_per_sec = 4000.0;
        input.headroom = 0.0;
        let plan = plan(&input).unwrap();
        let wb = plan.write_back.unwrap();
        assert_eq!(wb.workers, 2);
        assert_eq!(wb.catch_up, None);
        assert!(plan.warnings.iter().any(|w| w.contains("never catch up")));
    }

    #[test]
    fn bad_inputs_name_the_field() {
        type Breaker = fn(&mut Input);
        let base = Input::new(10, 10);
        let cases: [(Breaker, &str); 6] = [
            (|i| i.headroom = 1.0, "headroom"),
            (|i| i.replicas = 0, "replicas"),
            (|i| i.reads_per_sec = f64::NAN, "reads_per_sec"),
            (|i| i.node_ops_per_sec = 0.0, "node_ops_per_sec"),
            (|i| i.write_back_per_sec = 1.0, "write_back_per_sec"),
            (|i| i.node_memory_bytes = 0, "node_memory_bytes"),
        ];
        for (break_it, field) in cases {
            let mut input = base.clone();
            break_it(&mut input);
            let err = plan(&input).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("invalid plan input: {field}: ")),
                "{err}"
            );
        }
    }
}

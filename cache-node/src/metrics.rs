//! Prometheus metrics of one node.
//!
//! Each node owns its recorder instead of installing a process-global one, so
//! that several nodes in one process (the in-process tests) keep separate
//! figures. The hot path only bumps the store's atomic counters and records
//! one latency sample; counters and sizes are copied into the recorder when
//! `/metrics` is scraped.

use std::sync::Arc;
use std::time::Instant;

use metrics::{Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::resp::command::{COMMANDS, UNKNOWN_COMMAND};
use crate::store::Store;

/// Latency buckets in seconds: 25 µs to 1 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0,
];

/// How often the histograms' samples are drained into their buckets (see
/// [`NodeMetrics::run_upkeep`]): the samples recorded in between are held
/// in memory, 8 bytes each.
pub const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The node's RPCs, for per-RPC latency.
#[derive(Clone, Copy, Debug)]
pub enum Rpc {
    /// `Get`.
    Get,
    /// `Set`.
    Set,
    /// `Delete`.
    Delete,
    /// `MultiGet`.
    MultiGet,
    /// `MultiSet`.
    MultiSet,
    /// `Stats`.
    Stats,
    /// `Topology`.
    Topology,
    /// `Flush`.
    Flush,
    /// `LeaseGet`.
    LeaseGet,
    /// `Fill`.
    Fill,
    /// `Prepare`.
    Prepare,
    /// `Commit`.
    Commit,
    /// `Abort`.
    Abort,
    /// `MarkClean`.
    MarkClean,
    /// `ListDirty`.
    ListDirty,
    /// `ReleaseLease`.
    ReleaseLease,
}

impl Rpc {
    // In declaration order: `time` indexes by `rpc as usize`.
    const ALL: [Rpc; 16] = [
        Rpc::Get,
        Rpc::Set,
        Rpc::Delete,
        Rpc::MultiGet,
        Rpc::MultiSet,
        Rpc::Stats,
        Rpc::Topology,
        Rpc::Flush,
        Rpc::LeaseGet,
        Rpc::Fill,
        Rpc::Prepare,
        Rpc::Commit,
        Rpc::Abort,
        Rpc::MarkClean,
        Rpc::ListDirty,
        Rpc::ReleaseLease,
    ];

    fn name(self) -> &'static str {
        match self {
            Rpc::Get => "Get",
            Rpc::Set => "Set",
            Rpc::Delete => "Delete",
            Rpc::MultiGet => "MultiGet",
            Rpc::MultiSet => "MultiSet",
            Rpc::Stats => "Stats",
            Rpc::Topology => "Topology",
            Rpc::Flush => "Flush",
            Rpc::LeaseGet => "LeaseGet",
            Rpc::Fill => "Fill",
            Rpc::Prepare => "Prepare",
            Rpc::Commit => "Commit",
            Rpc::Abort => "Abort",
            Rpc::MarkClean => "MarkClean",
            Rpc::ListDirty => "ListDirty",
            Rpc::ReleaseLease => "ReleaseLease",
        }
    }
}

const METADATA: Metadata<'static> =
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// The node's metrics registry and pre-registered hot-path handles.
pub struct NodeMetrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    latency: Vec<Histogram>,
    /// Per RESP command, in the order of `resp::command::COMMANDS`, then
    /// `UNKNOWN_COMMAND` last: indexed, not hashed, on the hot path.
    resp_latency: Vec<Histogram>,
    store: Arc<Store>,
}

impl NodeMetrics {
    /// A registry over `store`'s counters.
    pub fn new(store: Arc<Store>) -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .expect("LATENCY_BUCKETS is a non-empty constant")
            .build_recorder();
        let handle = recorder.handle();
        let latency = Rpc::ALL
            .iter()
            .map(|rpc| {
                let key = Key::from_parts(
                    "ringcache_node_request_duration_seconds",
                    vec![Label::new("rpc", rpc.name())],
                );
                recorder.register_histogram(&key, &METADATA)
            })
            .collect();
        let resp_latency = COMMANDS
            .iter()
            .copied()
            .chain([UNKNOWN_COMMAND])
            .map(|command| {
                let key = Key::from_parts(
                    "ringcache_node_resp_command_duration_seconds",
                    vec![Label::new("command", command)],
                );
                recorder.register_histogram(&key, &METADATA)
            })
            .collect();
        NodeMetrics {
            recorder,
            handle,
            latency,
            resp_latency,
            store,
        }
    }

    /// Drains the histograms' recorded samples into their buckets. Until it
    /// runs (or `/metrics` is scraped), every sample is kept, so the node
    /// runs it every [`UPKEEP_INTERVAL`] whether or not anyone scrapes.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Starts timing one request; the sample is recorded when the guard
    /// drops, whether the request succeeded or not.
    pub fn time(&self, rpc: Rpc) -> Timer<'_> {
        Timer {
            histogram: &self.latency[rpc as usize],
            start: Instant::now(),
        }
    }

    /// Starts timing one RESP command at `start`: `command` is its index in
    /// `resp::command::COMMANDS`, `None` for names not in it (counted as
    /// unknown).
    pub fn time_resp_at(&self, command: Option<usize>, start: Instant) -> Timer<'_> {
        let unknown = self.resp_latency.len() - 1;
        let histogram = &self.resp_latency[command.filter(|&i| i < unknown).unwrap_or(unknown)];
        Timer { histogram, start }
    }

    /// Counts a RESP command answered with an error (`protocol` for frames
    /// that could not be parsed).
    pub fn count_resp_error(&self, command: &'static str) {
        let key = Key::from_parts(
            "ringcache_node_resp_errors_total",
            vec![Label::new("command", command)],
        );
        self.recorder.register_counter(&key, &METADATA).increment(1);
    }

    /// Counts a request or connection refused by authentication or
    /// admission: `transport` is `grpc` or `resp`; `reason` is
    /// `unauthenticated`, `permission_denied`, `rate_limited`, `overloaded`
    /// or `tls_handshake`.
    pub fn count_refused(&self, transport: &'static str, reason: &'static str) {
        let key = Key::from_parts(
            "ringcache_node_auth_refused_total",
            vec![
                Label::new("transport", transport),
                Label::new("reason", reason),
            ],
        );
        self.recorder.register_counter(&key, &METADATA).increment(1);
    }

    /// Counts a configuration reload (SIGHUP): `result` is `applied` or
    /// `failed` (nothing changed).
    pub fn count_reload(&self, result: &'static str) {
        let key = Key::from_parts(
            "ringcache_node_config_reloads_total",
            vec![Label::new("result", result)],
        );
        self.recorder.register_counter(&key, &METADATA).increment(1);
    }

    /// Records a `Prepare` that waited its turn in its key's queue for
    /// `waited`: `exhausted` when the wait ran out with another change
    /// still pending (the prepare was refused as busy).
    pub fn count_prepare_wait(&self, keyspace: &str, waited: std::time::Duration, exhausted: bool) {
        let outcome = if exhausted { "exhausted" } else { "turn" };
        let key = Key::from_parts(
            "ringcache_node_prepare_waits_total",
            vec![
                Label::new("keyspace", keyspace.to_owned()),
                Label::new("outcome", outcome),
            ],
        );
        self.recorder.register_counter(&key, &METADATA).increment(1);
        let key = Key::from_parts(
            "ringcache_node_prepare_wait_seconds",
            vec![Label::new("keyspace", keyspace.to_owned())],
        );
        self.recorder
            .register_histogram(&key, &METADATA)
            .record(waited.as_secs_f64());
    }

    /// Counts a failed request by RPC and gRPC code.
    pub fn count_error(&self, rpc: Rpc, code: tonic::Code) {
        let key = Key::from_parts(
            "ringcache_node_request_errors_total",
            vec![
                Label::new("rpc", rpc.name()),
                Label::new("code", format!("{code:?}")),
            ],
        );
        self.recorder.register_counter(&key, &METADATA).increment(1);
    }

    /// The Prometheus text exposition of everything, with per-keyspace
    /// counters and sizes read from the store now.
    pub fn render(&self) -> String {
        let stats = self
            .store
            .stats(None)
            .expect("stats of all keyspaces names no keyspace, so it cannot fail");
        for ks in stats {
            let labels = || vec![Label::new("keyspace", ks.name.clone())];
            let counter = |name: &'static str, value: u64| {
                self.recorder
                    .register_counter(&Key::from_parts(name, labels()), &METADATA)
                    .absolute(value);
            };
            counter("ringcache_node_hits_total", ks.hits);
            counter("ringcache_node_misses_total", ks.misses);
            counter("ringcache_node_sets_total", ks.sets);
            counter("ringcache_node_sets_refused_total", ks.sets_refused);
            counter("ringcache_node_deletes_total", ks.deletes);
            counter("ringcache_node_evictions_total", ks.evictions);
            counter("ringcache_node_expirations_total", ks.expirations);
            counter("ringcache_node_leases_granted_total", ks.leases_granted);
            counter("ringcache_node_lease_waits_total", ks.lease_waits);
            counter("ringcache_node_fills_stored_total", ks.fills_stored);
            counter("ringcache_node_fills_refused_total", ks.fills_refused);
            counter("ringcache_node_prepares_total", ks.prepares);
            counter("ringcache_node_commits_total", ks.commits);
            counter("ringcache_node_aborts_total", ks.aborts);
            counter("ringcache_node_pending_timeouts_total", ks.pending_timeouts);
            counter("ringcache_node_dirty_refused_total", ks.dirty_refused);
            let gauge = |name: &'static str, value: u64| {
                self.recorder
                    .register_gauge(&Key::from_parts(name, labels()), &METADATA)
                    .set(value as f64);
            };
            gauge("ringcache_node_items", ks.items);
            gauge("ringcache_node_bytes", ks.bytes);
            gauge("ringcache_node_capacity_bytes", ks.capacity_bytes);
            gauge("ringcache_node_dirty_items", ks.dirty_items);
            gauge("ringcache_node_dirty_bytes", ks.dirty_bytes);
            gauge("ringcache_node_max_dirty_bytes", ks.max_dirty_bytes);
        }
        self.handle.render()
    }
}

/// Records a latency sample on drop.
pub struct Timer<'a> {
    histogram: &'a Histogram,
    start: Instant,
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.histogram.record(self.start.elapsed().as_secs_f64());
    }
}

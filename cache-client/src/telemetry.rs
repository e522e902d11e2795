//! What the client reports about itself: metrics through the [`metrics`]
//! facade, so that they land in whatever recorder the service installed
//! (Prometheus, StatsD, ...), next to the service's own.
//!
//! The names are constants here and listed, with their labels, in
//! `docs/metrics.md`. Without a recorder every call below is a no-op.
//! Labels are bounded: keyspaces, node ids, operation names, strategies and
//! error kinds, never keys.
//!
//! Every raw call and strategy operation also runs in a `tracing` span
//! (`ringcache.<op>`, with the keyspace). With the `otel` feature, [`otel`]
//! carries the trace context of the current span to the nodes and to the
//! write-back worker (`docs/tracing.md`).

use std::time::Instant;

use crate::error::{Error, Result};

/// Raw API calls (`Client::get`, `multi_get`, `set`, `multi_set`,
/// `delete`), labels `keyspace`, `op`.
pub const REQUESTS: &str = "ringcache_client_requests_total";
/// Latency of raw API calls in seconds, labels `keyspace`, `op`.
pub const REQUEST_DURATION: &str = "ringcache_client_request_duration_seconds";
/// Strategy operations (`Keyspace::get`, `get_or_load`, `put`, `remove`,
/// `lookup`, `fill`, `invalidate`), labels `keyspace`, `strategy`, `op`.
pub const OPERATIONS: &str = "ringcache_client_operations_total";
/// Latency of strategy operations in seconds, labels `keyspace`,
/// `strategy`, `op`.
pub const OPERATION_DURATION: &str = "ringcache_client_operation_duration_seconds";
/// Errors returned to the caller, labels `keyspace`, `op`, `kind`
/// ([`Error::kind`]).
pub const ERRORS: &str = "ringcache_client_errors_total";
/// Keys found in the cache, labels `keyspace`, `strategy` (`raw` for the
/// raw API).
pub const HITS: &str = "ringcache_client_hits_total";
/// Keys not found in the cache, labels `keyspace`, `strategy`.
pub const MISSES: &str = "ringcache_client_misses_total";
/// Batches sent on a node's command stream, label `node`.
pub const COMMAND_BATCHES: &str = "ringcache_client_command_batches_total";
/// Commands per batch of a node's command stream, label `node`.
pub const COMMANDS_PER_BATCH: &str = "ringcache_client_commands_per_batch";
/// Attempts after the first of a routed call, label `keyspace`.
pub const RETRIES: &str = "ringcache_client_retries_total";
/// Failed calls to a node (counted against its health), labels `node`,
/// `kind`.
pub const NODE_FAILURES: &str = "ringcache_client_node_failures_total";
/// Times a node was marked down, labels `node`, `reason` (`failures`: the
/// failure threshold; `write`: a write routed around it).
pub const NODES_MARKED_DOWN: &str = "ringcache_client_nodes_marked_down_total";
/// 1 while this client routes around a node, else 0; label `node`.
pub const NODE_DOWN: &str = "ringcache_client_node_down";
/// Down nodes flushed and routed to again, label `node`.
pub const NODE_READMISSIONS: &str = "ringcache_client_node_readmissions_total";
/// Calls asked once more because the first attempt outlived its timeout
/// only while this process stalled (paused, swapped out, starved of
/// CPU), label `node`: such a timeout does not count against the node.
pub const STALL_RETRIES: &str = "ringcache_client_stall_retries_total";
/// Gauge: the epoch of the member list the client routes by (set when it
/// loads one at connect and when it adopts a newer one; with several
/// clients in one process, the last one's).
pub const TOPOLOGY_EPOCH: &str = "ringcache_client_topology_epoch";
/// Gauge: the members of that list.
pub const TOPOLOGY_MEMBERS: &str = "ringcache_client_topology_members";
/// What a lease read found, labels `keyspace`, `strategy`, `outcome`
/// (`hit`, `granted`, `wait`, `wait_expired`, `fill_stored`,
/// `fill_refused`, `fill_failed`).
pub const LEASE_OUTCOMES: &str = "ringcache_client_lease_outcomes_total";
/// Loads from a store (or loader) after a miss, label `keyspace`.
pub const LOADS: &str = "ringcache_client_loads_total";
/// Waits for another caller's lease, label `keyspace`.
pub const LEASE_WAITS: &str = "ringcache_client_lease_waits_total";
/// Fills the node refused (the key changed since the lease), label
/// `keyspace`.
pub const FILLS_REFUSED: &str = "ringcache_client_fills_refused_total";
/// Cached absences read, label `keyspace`.
pub const NEGATIVE_HITS: &str = "ringcache_client_negative_hits_total";
/// Write-through writes committed, label `keyspace`.
pub const TWOPC_COMMITS: &str = "ringcache_client_twopc_commits_total";
/// Write-through writes aborted, labels `keyspace`, `reason` (`version`:
/// the store holds a newer version; `cache`: too few nodes prepared;
/// `store`: the store's prepare failed; `commit`: the store's commit failed
/// or its outcome is unknown; `timeout`: the writer was held past its
/// pending timeout before committing; `conflict`: another writer's change
/// of the key was still pending on its first owner when `prepare_wait` ran
/// out).
pub const TWOPC_ABORTS: &str = "ringcache_client_twopc_aborts_total";
/// In-doubt prepared transactions rolled back, by recovery or by the next
/// writer of the key once the change timed out on its first owner, label
/// `keyspace`.
pub const TWOPC_RECOVERED: &str = "ringcache_client_twopc_recovered_total";
/// Version-fenced invalidations sent after a write-through commit to nodes
/// that did not commit the change or refused its prepare, label `keyspace`.
pub const TWOPC_INVALIDATIONS: &str = "ringcache_client_twopc_invalidations_total";
/// Write-through prepares a node let wait behind another writer's pending
/// change of the key, label `keyspace`.
pub const PREPARE_WAITS: &str = "ringcache_client_prepare_waits_total";
/// How long those prepares waited, label `keyspace`.
pub const PREPARE_WAIT_DURATION: &str = "ringcache_client_prepare_wait_seconds";
/// Write-through prepares refused because another writer's change was still
/// pending when the wait ran out, label `keyspace`.
pub const PREPARE_WAITS_EXHAUSTED: &str = "ringcache_client_prepare_waits_exhausted_total";
/// Background retries of a failed invalidation, label `keyspace`.
pub const INVALIDATION_RETRIES: &str = "ringcache_client_invalidation_retries_total";
/// Write-back records the broker acknowledged, labels `keyspace`, `ack`.
pub const WRITE_BACK_QUEUED: &str = "ringcache_client_write_back_queued_total";
/// Write-back records the broker did not take, labels `keyspace`, `ack`.
pub const WRITE_BACK_FAILURES: &str = "ringcache_client_write_back_failures_total";
/// Time from producing a write-back record to the broker's answer, in
/// seconds, labels `keyspace`, `outcome` (`acked`, `failed`).
pub const WRITE_BACK_PRODUCE_DURATION: &str =
    "ringcache_client_write_back_produce_duration_seconds";
/// Durable write-back writes whose record was queued but whose cache write
/// failed (the key was invalidated), label `keyspace`.
pub const WRITE_BACK_CACHE_FAILURES: &str = "ringcache_client_write_back_cache_failures_total";

/// Background re-sends of durable write-back records whose first send
/// ended with an unknown outcome, label `keyspace`.
pub const WRITE_BACK_RESENDS: &str = "ringcache_client_write_back_resends_total";

/// The strategy label of raw API calls.
pub(crate) const RAW: &str = "raw";

/// Times one raw API call and counts it and its error.
pub(crate) struct Call<'a> {
    keyspace: &'a str,
    op: &'static str,
    started: Instant,
    span: tracing::Span,
}

impl<'a> Call<'a> {
    pub(crate) fn start(keyspace: &'a str, op: &'static str) -> Self {
        Call {
            keyspace,
            op,
            started: Instant::now(),
            span: tracing::info_span!("ringcache.request", otel.name = %format_args!("ringcache.{op}"), keyspace, op),
        }
    }

    /// Runs `fut` in the call's span.
    pub(crate) fn instrument<F: std::future::Future>(
        &self,
        fut: F,
    ) -> tracing::instrument::Instrumented<F> {
        tracing::Instrument::instrument(fut, self.span.clone())
    }

    /// Records the call and hands its result back.
    pub(crate) fn finish<T>(self, result: Result<T>) -> Result<T> {
        let keyspace = self.keyspace.to_owned();
        metrics::counter!(REQUESTS, "keyspace" => keyspace.clone(), "op" => self.op).increment(1);
        metrics::histogram!(REQUEST_DURATION, "keyspace" => keyspace.clone(), "op" => self.op)
            .record(self.started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            error(keyspace, self.op, e);
        }
        result
    }
}

/// Times one strategy operation and counts it and its error.
pub(crate) struct Operation {
    keyspace: String,
    strategy: &'static str,
    op: &'static str,
    started: Instant,
    span: tracing::Span,
}

impl Operation {
    pub(crate) fn start(keyspace: &str, strategy: &'static str, op: &'static str) -> Self {
        Operation {
            keyspace: keyspace.to_owned(),
            strategy,
            op,
            started: Instant::now(),
            span: tracing::info_span!("ringcache.operation", otel.name = %format_args!("ringcache.{op}"), keyspace, strategy, op),
        }
    }

    /// Runs `fut` in the operation's span.
    pub(crate) fn instrument<F: std::future::Future>(
        &self,
        fut: F,
    ) -> tracing::instrument::Instrumented<F> {
        tracing::Instrument::instrument(fut, self.span.clone())
    }

    /// Records the operation and hands its result back.
    pub(crate) fn finish<T>(self, result: Result<T>) -> Result<T> {
        let Operation {
            keyspace,
            strategy,
            op,
            started,
            span: _,
        } = self;
        metrics::counter!(OPERATIONS, "keyspace" => keyspace.clone(), "strategy" => strategy, "op" => op)
            .increment(1);
        metrics::histogram!(OPERATION_DURATION, "keyspace" => keyspace.clone(), "strategy" => strategy, "op" => op)
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            error(keyspace, op, e);
        }
        result
    }
}

fn error(keyspace: String, op: &'static str, error: &Error) {
    metrics::counter!(ERRORS, "keyspace" => keyspace, "op" => op, "kind" => error.kind())
        .increment(1);
}

/// Counts one key found (`hit`) or not in the cache.
pub(crate) fn lookup(keyspace: &str, strategy: &'static str, hit: bool) {
    let name = if hit { HITS } else { MISSES };
    metrics::counter!(name, "keyspace" => keyspace.to_owned(), "strategy" => strategy).increment(1);
}

/// Counts what a lease read found or what a fill did.
pub(crate) fn lease(keyspace: &str, strategy: &'static str, outcome: &'static str) {
    metrics::counter!(LEASE_OUTCOMES, "keyspace" => keyspace.to_owned(), "strategy" => strategy, "outcome" => outcome)
        .increment(1);
}

/// Counts an attempt after the first of a routed call.
pub(crate) fn retry(keyspace: &str) {
    metrics::counter!(RETRIES, "keyspace" => keyspace.to_owned()).increment(1);
}

/// Counts a failed call to `node`.
pub(crate) fn node_failure(node: &str, error: &Error) {
    metrics::counter!(NODE_FAILURES, "node" => node.to_owned(), "kind" => error.kind())
        .increment(1);
}

/// Records that `node` was marked down, and why.
pub(crate) fn node_marked_down(node: &str, reason: &'static str) {
    metrics::counter!(NODES_MARKED_DOWN, "node" => node.to_owned(), "reason" => reason)
        .increment(1);
    metrics::gauge!(NODE_DOWN, "node" => node.to_owned()).set(1.0);
}

/// Records that `node` was flushed and is routed to again.
pub(crate) fn node_readmitted(node: &str) {
    metrics::counter!(NODE_READMISSIONS, "node" => node.to_owned()).increment(1);
    metrics::gauge!(NODE_DOWN, "node" => node.to_owned()).set(0.0);
}

/// Records a call to `node` asked once more after a stall of this process.
pub(crate) fn stall_retry(node: &str) {
    metrics::counter!(STALL_RETRIES, "node" => node.to_owned()).increment(1);
}

/// Records a prepare that waited its turn on a node.
pub(crate) fn prepare_waited(keyspace: &str, waited: std::time::Duration) {
    metrics::counter!(PREPARE_WAITS, "keyspace" => keyspace.to_owned()).increment(1);
    metrics::histogram!(PREPARE_WAIT_DURATION, "keyspace" => keyspace.to_owned())
        .record(waited.as_secs_f64());
}

/// Counts a prepare refused because its wait ran out.
pub(crate) fn prepare_wait_exhausted(keyspace: &str) {
    metrics::counter!(PREPARE_WAITS_EXHAUSTED, "keyspace" => keyspace.to_owned()).increment(1);
}

/// Records a batch of `commands` sent on `node`'s command stream.
pub(crate) fn command_batch(node: &str, commands: usize) {
    metrics::counter!(COMMAND_BATCHES, "node" => node.to_owned()).increment(1);
    metrics::histogram!(COMMANDS_PER_BATCH, "node" => node.to_owned()).record(commands as f64);
}

/// Records the member list the client routes by from now on.
pub(crate) fn topology(epoch: u64, members: usize) {
    metrics::gauge!(TOPOLOGY_EPOCH).set(epoch as f64);
    metrics::gauge!(TOPOLOGY_MEMBERS).set(members as f64);
}

/// Counts a write-through abort and why.
pub(crate) fn twopc_abort(keyspace: &str, reason: &'static str) {
    metrics::counter!(TWOPC_ABORTS, "keyspace" => keyspace.to_owned(), "reason" => reason)
        .increment(1);
}

/// Records one write-back record's trip to the broker (only the `kafka`
/// feature produces).
#[cfg(feature = "kafka")]
pub(crate) fn write_back_produced(keyspace: &str, ack: &'static str, started: Instant, ok: bool) {
    let (name, outcome) = if ok {
        (WRITE_BACK_QUEUED, "acked")
    } else {
        (WRITE_BACK_FAILURES, "failed")
    };
    metrics::counter!(name, "keyspace" => keyspace.to_owned(), "ack" => ack).increment(1);
    metrics::histogram!(WRITE_BACK_PRODUCE_DURATION, "keyspace" => keyspace.to_owned(), "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
}

/// OpenTelemetry: W3C trace context (`traceparent`, `tracestate`) in gRPC
/// metadata and Kafka record headers, and the OTLP exporter the binaries
/// install. Contexts are injected and extracted through the global
/// propagator, which [`otel::install_propagator`] (or
/// [`otel::otlp_tracer`]) sets; until then nothing is propagated.
#[cfg(feature = "otel")]
pub mod otel {
    use std::collections::HashMap;

    use opentelemetry::propagation::{Extractor, Injector};
    use opentelemetry::trace::TracerProvider as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    use crate::error::{Error, Result};

    pub use opentelemetry::Context;
    pub use opentelemetry_sdk::trace::{SdkTracerProvider, Tracer};

    /// The environment variable that turns OTLP export on (the standard
    /// one of the OpenTelemetry SDKs).
    pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

    /// Sets the W3C trace-context propagator as the global one.
    pub fn install_propagator() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
    }

    struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

    impl Injector for MetadataInjector<'_> {
        fn set(&mut self, key: &str, value: String) {
            let key = tonic::metadata::MetadataKey::from_bytes(key.as_bytes());
            let value = tonic::metadata::MetadataValue::try_from(value.as_str());
            if let (Ok(key), Ok(value)) = (key, value) {
                self.0.insert(key, value);
            }
        }
    }

    /// Adds the current span's trace context to a request's metadata.
    pub(crate) fn inject_grpc(metadata: &mut tonic::metadata::MetadataMap) {
        let cx = tracing::Span::current().context();
        opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.inject_context(&cx, &mut MetadataInjector(metadata));
        });
    }

    /// The current span's trace context as header names and values (for
    /// the Kafka record of a write-back write).
    pub fn current_headers() -> Vec<(String, String)> {
        let cx = tracing::Span::current().context();
        let mut headers: HashMap<String, String> = HashMap::new();
        opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.inject_context(&cx, &mut headers);
        });
        let mut headers: Vec<_> = headers.into_iter().collect();
        headers.sort();
        headers
    }

    struct Pairs(HashMap<String, String>);

    impl Extractor for Pairs {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(&key.to_ascii_lowercase()).map(String::as_str)
        }

        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(String::as_str).collect()
        }
    }

    /// The trace context carried by headers (gRPC metadata, HTTP or Kafka
    /// headers), as name and value; an empty context when there is none.
    pub fn context_from_headers<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Context {
        let pairs = Pairs(
            headers
                .into_iter()
                .filter_map(|(name, value)| {
                    let value = std::str::from_utf8(value).ok()?;
                    Some((name.to_ascii_lowercase(), value.to_owned()))
                })
                .collect(),
        );
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&pairs))
    }

    /// Makes the trace context carried by `headers` the parent of `span`
    /// (a server's span for a request).
    pub fn set_parent_from_headers<'a>(
        span: &tracing::Span,
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) {
        // Fails only when no OpenTelemetry layer records the span: there is
        // nothing to link then.
        let _ = span.set_parent(context_from_headers(headers));
    }

    /// Links `span` to the trace context carried by `headers`, if any (a
    /// consumer's span for a batch of records, each from its own trace).
    pub fn link_from_headers<'a>(
        span: &tracing::Span,
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) {
        use opentelemetry::trace::TraceContextExt as _;
        let cx = context_from_headers(headers);
        let linked = cx.span().span_context().clone();
        if linked.is_valid() {
            span.add_link(linked);
        }
    }

    /// A `tracing` layer that turns spans into OpenTelemetry spans of
    /// `tracer`.
    pub fn layer<S>(tracer: Tracer) -> tracing_opentelemetry::OpenTelemetryLayer<S, Tracer>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        tracing_opentelemetry::layer().with_tracer(tracer)
    }

    /// Flushes and stops the exporter when dropped.
    #[must_use = "dropping the guard stops the exporter"]
    pub struct OtlpGuard(SdkTracerProvider);

    impl Drop for OtlpGuard {
        fn drop(&mut self) {
            if let Err(e) = self.0.shutdown() {
                tracing::warn!(error = %e, "the OTLP exporter did not shut down cleanly");
            }
        }
    }

    /// The OTLP (gRPC) span exporter of a binary, when
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`None` otherwise); the usual
    /// `OTEL_*` variables configure it. Also installs the W3C propagator.
    /// Call it inside the Tokio runtime.
    ///
    /// # Errors
    /// [`Error::Config`] when the exporter cannot be built.
    pub fn otlp_tracer(service_name: &'static str) -> Result<Option<(Tracer, OtlpGuard)>> {
        if std::env::var_os(OTLP_ENDPOINT_ENV).is_none() {
            return Ok(None);
        }
        install_propagator();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|e| Error::Config {
                field: "otel",
                reason: format!("cannot build the OTLP exporter: {e}"),
            })?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service_name)
                    .build(),
            )
            .build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        let tracer = provider.tracer(service_name);
        Ok(Some((tracer, OtlpGuard(provider))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    #[test]
    fn a_failed_call_is_counted_timed_and_classified() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let call = Call::start("users", "get");
            let failed: Result<()> = call.finish(Err(Error::Unavailable {
                node: "n1".into(),
                message: "connection refused".into(),
            }));
            assert!(failed.is_err());
            Operation::start("users", "read-through", "put")
                .finish(Ok(()))
                .expect("an ok result passes through");
        });
        let snapshot = snapshotter.snapshot().into_vec();
        let find = |name: &str, label: (&str, &str)| {
            snapshot
                .iter()
                .find(|(key, _, _, _)| {
                    key.key().name() == name
                        && key
                            .key()
                            .labels()
                            .any(|l| l.key() == label.0 && l.value() == label.1)
                })
                .map(|(_, _, _, value)| value)
        };
        assert_eq!(find(REQUESTS, ("op", "get")), Some(&DebugValue::Counter(1)));
        assert_eq!(
            find(ERRORS, ("kind", "unavailable")),
            Some(&DebugValue::Counter(1))
        );
        assert!(matches!(
            find(REQUEST_DURATION, ("keyspace", "users")),
            Some(DebugValue::Histogram(v)) if v.len() == 1
        ));
        assert_eq!(
            find(OPERATIONS, ("strategy", "read-through")),
            Some(&DebugValue::Counter(1))
        );
        assert_eq!(find(ERRORS, ("op", "put")), None);
    }
}

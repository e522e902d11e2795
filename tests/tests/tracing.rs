//! Trace propagation (the `otel` features): a request's trace follows it
//! from the client through the node (W3C `traceparent` in gRPC metadata) and
//! through the write-back path (the same in the Kafka record's headers, to
//! which the worker's span for storing the batch links).
//!
//! The node and the worker run in this process, on their `run` functions,
//! and every span of the process goes to an in-memory exporter, so no
//! collector is needed. The node's span for a request is created by the
//! gRPC server on its own task, where the client's span is not current:
//! only the propagated context can give it the client's trace.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use cache_client::{
    Client, ClientConfig,
    producer::WriteBackConfig,
    store::{PgStore, Store},
    strategy::{KeyspaceSettings, Strategy},
    telemetry::otel,
};
use opentelemetry::trace::{TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use ringcache_tests::{PrivateBroker, PrivatePostgres, unique, write_back::read_topic};
use tokio::time::Instant;
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Upper bound for a service to start, or the worker to store a write.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The exporter every span of this test binary goes to (the subscriber and
/// the propagator are process-wide).
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    &EXPORTER
        .get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .build();
            otel::install_propagator();
            tracing_subscriber::registry()
                .with(otel::layer(provider.tracer("ringcache-tests")))
                .with(tracing_subscriber::filter::LevelFilter::INFO)
                .init();
            (exporter, provider)
        })
        .0
}

fn spans() -> Result<Vec<SpanData>> {
    exporter()
        .get_finished_spans()
        .map_err(|e| anyhow::anyhow!("the in-memory exporter failed: {e}"))
}

fn describe(spans: &[SpanData]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} trace {} span {} parent {} links {}",
                s.name,
                s.span_context.trace_id(),
                s.span_context.span_id(),
                s.parent_span_id,
                s.links.links.len()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Starts a one-node cluster in this process.
async fn start_node() -> Result<(String, tokio::sync::oneshot::Sender<()>)> {
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = grpc.local_addr()?;
    let mut config = cache_node::Config::from_toml(&format!(
        "node_id = \"n1\"\n\
         listen = \"{addr}\"\n\
         unknown_keyspaces = \"create\"\n\
         [cluster]\n\
         epoch = 1\n\
         members = [{{ id = \"n1\", address = \"{addr}\" }}]\n"
    ))?;
    config.validate()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(cache_node::run(
        config,
        cache_node::Listeners {
            grpc,
            metrics: None,
            resp: None,
        },
        async move {
            let _ = stopped.await;
        },
    ));
    Ok((addr.to_string(), stop))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_back_request_is_traced_through_the_node_and_the_worker() -> Result<()> {
    exporter();
    let pg = tokio::task::block_in_place(PrivatePostgres::start)?;
    let broker = PrivateBroker::start(TIMEOUT).await?;
    let (node, stop_node) = start_node().await?;

    let store = PgStore::connect(&pg.url()).await?;
    store.migrate().await?;
    let keyspace = unique("traced");
    let client = Client::connect(ClientConfig::new([node.clone()])).await?;
    client.enable_write_back(WriteBackConfig::new(broker.brokers()))?;
    client.define_keyspace(
        &keyspace,
        KeyspaceSettings::new(Strategy::WriteBack),
        Some(Arc::new(store) as Arc<dyn Store>),
    )?;
    client.ensure_write_back_topics().await?;

    // The request, as a service's handler would run it.
    let request = tracing::info_span!("test.request");
    client
        .keyspace(&keyspace)
        .put("order-1", "2 books")
        .instrument(request)
        .await?;
    let all = spans()?;
    let trace: TraceId = all
        .iter()
        .find(|s| s.name == "test.request")
        .map(|s| s.span_context.trace_id())
        .with_context(|| format!("the request's span was not exported:\n{}", describe(&all)))?;

    // The node: its span for the cache write is in the request's trace,
    // a child of the client's span for that call.
    let client_set = all
        .iter()
        .find(|s| s.name == "ringcache.set" && s.span_context.trace_id() == trace)
        .with_context(|| format!("no client span for the cache write:\n{}", describe(&all)))?;
    let node_set = all
        .iter()
        .find(|s| s.name == "/ringcache.v1.CacheNode/Set")
        .with_context(|| format!("no node span for Set:\n{}", describe(&all)))?;
    ensure!(
        node_set.span_context.trace_id() == trace
            && node_set.parent_span_id == client_set.span_context.span_id()
            && node_set.parent_span_is_remote,
        "the node's Set span is not a remote child of the client's:\n{}",
        describe(&all)
    );

    // The record on the topic carries the trace context.
    let records = read_topic(
        &broker.brokers(),
        &cache_client::writeback::topic_for(&keyspace),
    )
    .await?;
    let traceparent = records
        .iter()
        .find_map(|r| r.header("traceparent"))
        .context("the write-back record has no traceparent header")?;
    ensure!(
        traceparent.contains(&trace.to_string()),
        "the record's traceparent {traceparent} is not of trace {trace}"
    );

    // The worker: its span for storing the batch links to the request.
    let group = unique("traced_group");
    let (stop_worker, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(write_back_worker::run(
        write_back_worker::Config {
            brokers: broker.brokers(),
            database_url: pg.url(),
            group: group.clone(),
            keyspaces: vec![keyspace.clone()],
            dead_letter_topic: ringcache_tests::dead_letter_topic(&group),
            metrics_listen: None,
            ..write_back_worker::Config::default()
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let all = spans()?;
        let linked = all.iter().any(|s| {
            s.name == "ringcache.write_back.store"
                && s.links
                    .links
                    .iter()
                    .any(|l| l.span_context.trace_id() == trace)
        });
        if linked {
            break;
        }
        if worker.is_finished() {
            bail!("the worker stopped before storing the write");
        }
        if Instant::now() >= deadline {
            bail!(
                "no worker span linked to trace {trace} after {TIMEOUT:?}:\n{}",
                describe(&all)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop_worker.send(());
    worker.await??;
    let _ = stop_node.send(());
    Ok(())
}

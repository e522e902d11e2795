//! A small HTTP service that links `cache-client`: the model to copy.
//!
//! It defines the keyspaces of a keyspace file (one per strategy in the
//! demo: cache-aside, read-through, write-around, write-through, write-back)
//! over PostgreSQL, and serves:
//!
//! - `GET /kv/{keyspace}/{key}`: the value (200) or 404, read through the
//!   keyspace's strategy;
//! - `PUT /kv/{keyspace}/{key}` with the value as the body: written through
//!   the strategy; answers `{"version":..,"applied":..}`;
//! - `DELETE /kv/{keyspace}/{key}`: removed through the strategy;
//! - `GET /metrics`: the service's Prometheus registry, which holds the
//!   client's metrics (`docs/metrics.md`) because the client reports
//!   through the `metrics` facade;
//! - `GET /healthz`: 200 while the client routes to at least one node.
//!
//! ```text
//! cargo run -p cache-client --example kv-service -- \
//!     --seeds 127.0.0.1:7700 --keyspaces keyspaces.toml \
//!     --database-url postgres://localhost/ringcache --brokers 127.0.0.1:9092
//! ```
//!
//! Built with `--features otel`, it exports traces over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`docs/tracing.md`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use cache_client::{Client, ClientConfig};
use clap::Parser;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The service's command line (each flag also reads an environment
/// variable).
#[derive(Debug, Parser)]
#[command(about = "An HTTP key-value service over a ringcache pool")]
struct Args {
    /// Where to serve HTTP.
    #[arg(long, env = "KV_SERVICE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Cache nodes to learn the pool from, comma-separated.
    #[arg(long, env = "RINGCACHE_SEEDS", value_delimiter = ',', required = true)]
    seeds: Vec<String>,
    /// The keyspace file (strategies and stores).
    #[arg(long, env = "RINGCACHE_KEYSPACES")]
    keyspaces: PathBuf,
    /// PostgreSQL URL of the keyspaces' stores.
    #[arg(long, env = "RINGCACHE_DATABASE_URL")]
    database_url: String,
    /// Kafka bootstrap servers, for write-back keyspaces.
    #[arg(long, env = "RINGCACHE_KAFKA_BROKERS")]
    brokers: Option<String>,
}

/// What every handler shares.
#[derive(Clone)]
struct AppState {
    client: Client,
    metrics: PrometheusHandle,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The recorder first, so that the client's metrics from connecting on
    // are in the registry.
    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the Prometheus recorder")?;
    let _tracing = telemetry::init()?;
    // The exporter keeps histograms in buckets that need draining now and
    // then; without it they grow until the next scrape.
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });

    let client = connect(&args).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "serving HTTP");
    run(AppState { client, metrics }, listener, shutdown_signal()).await
}

/// Connects to the pool and defines the keyspaces of the file, each over
/// its table in PostgreSQL.
async fn connect(args: &Args) -> anyhow::Result<Client> {
    let client = Client::connect(ClientConfig::new(args.seeds.clone()))
        .await
        .with_context(|| format!("cannot reach the pool at {}", args.seeds.join(",")))?;
    let file = cache_client::keyspaces::KeyspacesFile::read(&args.keyspaces)?;
    let pg = cache_client::store::PgStore::connect(&args.database_url)
        .await
        .context("cannot connect to PostgreSQL")?;
    pg.migrate().await.context("cannot migrate PostgreSQL")?;
    if let Some(brokers) = &args.brokers {
        client.enable_write_back(cache_client::producer::WriteBackConfig::new(brokers))?;
    }
    client.apply_keyspaces(&file, &|name, layout| {
        Ok(Some(
            Arc::new(pg.clone().with_layout(name, layout)?) as Arc<dyn cache_client::store::Store>
        ))
    })?;
    if args.brokers.is_some() {
        client.ensure_write_back_topics().await?;
    }
    Ok(client)
}

/// Serves until `shutdown` resolves, then drains in-flight requests.
async fn run(
    state: AppState,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/kv/{keyspace}/{key}", get(read).put(write).delete(remove))
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("the HTTP server failed")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler installs at start-up");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The keyspace, if the file defined it: a typo answers 404 (see
/// [`unknown_keyspace`]) instead of reaching the cache as a raw keyspace.
fn keyspace(state: &AppState, name: &str) -> Option<cache_client::strategy::Keyspace> {
    state
        .client
        .keyspace_settings(name)
        .map(|_| state.client.keyspace(name))
}

fn unknown_keyspace(name: &str) -> Response {
    (StatusCode::NOT_FOUND, format!("no keyspace {name:?}\n")).into_response()
}

#[tracing::instrument(skip(state))]
async fn read(State(state): State<AppState>, Path((ks, key)): Path<(String, String)>) -> Response {
    let Some(keyspace) = keyspace(&state, &ks) else {
        return unknown_keyspace(&ks);
    };
    match keyspace.get(&key).await {
        Ok(Some(value)) => (StatusCode::OK, value).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "not found\n").into_response(),
        Err(e) => failure(&e),
    }
}

#[tracing::instrument(skip(state, body))]
async fn write(
    State(state): State<AppState>,
    Path((ks, key)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Some(keyspace) = keyspace(&state, &ks) else {
        return unknown_keyspace(&ks);
    };
    match keyspace.put(&key, body).await {
        Ok(written) => written_json(written),
        Err(e) => failure(&e),
    }
}

#[tracing::instrument(skip(state))]
async fn remove(
    State(state): State<AppState>,
    Path((ks, key)): Path<(String, String)>,
) -> Response {
    let Some(keyspace) = keyspace(&state, &ks) else {
        return unknown_keyspace(&ks);
    };
    match keyspace.remove(&key).await {
        Ok(written) => written_json(written),
        Err(e) => failure(&e),
    }
}

fn written_json(written: cache_client::strategy::Written) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        format!(
            "{{\"version\":{},\"applied\":{}}}\n",
            written.version, written.applied
        ),
    )
        .into_response()
}

/// An error as an HTTP status: the caller's fault (400), a conflicting
/// write in flight (409), or the pool or the store failing (503).
fn failure(error: &cache_client::Error) -> Response {
    let status = match error.kind() {
        "refused" | "codec" => StatusCode::BAD_REQUEST,
        "conflict" => StatusCode::CONFLICT,
        _ if error.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    tracing::warn!(%error, kind = error.kind(), "request failed");
    (status, format!("{error}\n")).into_response()
}

async fn render_metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

async fn healthz(State(state): State<AppState>) -> Response {
    let topology = state.client.topology();
    let up = topology.members.iter().filter(|m| m.up).count();
    let status = if up > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        format!("{up} of {} nodes up\n", topology.members.len()),
    )
        .into_response()
}

/// Log output, and with the `otel` feature OTLP trace export.
mod telemetry {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    /// The OTLP exporter's guard: dropping it flushes the spans.
    #[cfg(feature = "otel")]
    pub type Exporter = cache_client::telemetry::otel::OtlpGuard;
    #[cfg(not(feature = "otel"))]
    pub type Exporter = std::convert::Infallible;

    /// Logs to stdout; with `otel`, exports spans over OTLP when
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Each request's span (the
    /// handlers are instrumented) is then the parent of the client's spans
    /// and, through the propagated context, of the nodes' and the worker's.
    pub fn init() -> anyhow::Result<Option<Exporter>> {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        #[cfg(feature = "otel")]
        let (otel, guard) = match cache_client::telemetry::otel::otlp_tracer("kv-service")? {
            Some((tracer, guard)) => (
                Some(cache_client::telemetry::otel::layer(tracer)),
                Some(guard),
            ),
            None => (None, None),
        };
        #[cfg(not(feature = "otel"))]
        let (otel, guard): (Option<tracing_subscriber::layer::Identity>, _) = (None, None);
        tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer())
            .with(otel)
            .with(filter)
            .try_init()?;
        Ok(guard)
    }
}

//! `cache-node`: parses the config, sets up tracing, binds and runs the node
//! until SIGINT or SIGTERM; on SIGHUP, loads the config again and hands it
//! to the node, which takes its tokens and TLS files.

use anyhow::Context;
use cache_node::config::LogFormat;
use cache_node::{Cli, Config, Listeners};
use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(&cli)?;
    // Built by hand rather than by `#[tokio::main]` so that the config can
    // size it (`worker_threads`).
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = config.worker_threads {
        runtime.worker_threads(threads);
    }
    let runtime = runtime
        .build()
        .context("failed to build the tokio runtime")?;
    runtime.block_on(async {
        // Inside the runtime: the OTLP exporter's channel needs one.
        let _exporter = init_tracing(config.log_format)?;
        // Caught before the ports are bound: a signal sent as soon as a
        // client can reach the node must drain it, not end the process.
        let shutdown = shutdown_signal()?;
        let listeners = Listeners::bind(&config).await?;
        // Installed before the node serves: until then SIGHUP's default
        // action, ending the process, would apply.
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot install a SIGHUP handler")?;
        let (reloads, reloaded) = tokio::sync::mpsc::channel(1);
        tokio::spawn(reload_on_sighup(hangup, cli, reloads));
        cache_node::run_reloadable(config, listeners, shutdown, reloaded)
            .await
            .context("cache node failed")
    })
}

/// Logs to stdout; with the `otel` feature, also exports spans over OTLP
/// when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. The guard flushes the exporter
/// when dropped at the end of `main`.
fn init_tracing(format: LogFormat) -> anyhow::Result<Option<Exporter>> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal, so that log files stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let fmt = tracing_subscriber::fmt::layer().with_ansi(ansi);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    #[cfg(feature = "otel")]
    let (otel, guard) = match cache_client::telemetry::otel::otlp_tracer("cache-node")? {
        Some((tracer, guard)) => (
            Some(cache_client::telemetry::otel::layer(tracer)),
            Some(guard),
        ),
        None => (None, None),
    };
    #[cfg(not(feature = "otel"))]
    let (otel, guard): (Option<tracing_subscriber::layer::Identity>, _) = (None, None);
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .with(filter)
        .init();
    Ok(guard)
}

/// The OTLP exporter's guard; none can exist without the `otel` feature.
#[cfg(feature = "otel")]
type Exporter = cache_client::telemetry::otel::OtlpGuard;
#[cfg(not(feature = "otel"))]
type Exporter = std::convert::Infallible;

/// Catches SIGINT and SIGTERM now (a signal arriving before the returned
/// future is first polled is kept); the future completes on the first.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt =
        signal(SignalKind::interrupt()).context("cannot install a SIGINT handler")?;
    let mut term = signal(SignalKind::terminate()).context("cannot install a SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("received SIGINT"),
            _ = term.recv() => tracing::info!("received SIGTERM"),
        }
    })
}

/// On every SIGHUP, loads the configuration again (file, environment,
/// flags, secret files) and sends it to the node; a configuration that does
/// not load or validate is logged and changes nothing.
async fn reload_on_sighup(
    mut hangup: tokio::signal::unix::Signal,
    cli: Cli,
    reloads: tokio::sync::mpsc::Sender<Config>,
) {
    let cli = std::sync::Arc::new(cli);
    while hangup.recv().await.is_some() {
        tracing::info!("received SIGHUP: reloading the configuration");
        let cli = std::sync::Arc::clone(&cli);
        match tokio::task::spawn_blocking(move || Config::load(&cli)).await {
            Ok(Ok(config)) => {
                if reloads.send(config).await.is_err() {
                    return; // the node has stopped
                }
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "configuration reload failed; nothing changed");
            }
            Err(error) => tracing::warn!(%error, "configuration reload task failed"),
        }
    }
}

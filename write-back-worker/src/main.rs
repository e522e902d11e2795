//! `write-back-worker`: parses the config, sets up tracing and runs the
//! worker until SIGINT or SIGTERM, then drains and exits 0. On SIGHUP it
//! loads its configuration again (the cache token takes effect at once).

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use write_back_worker::config::{Cli, Config, LogFormat};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(&cli)?;
    let _exporter = init_tracing(config.log_format)?;
    // Installed before the worker starts: SIGHUP's default action ends the
    // process.
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing a SIGHUP handler")?;
    let (reload, reloads) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!("received SIGHUP: loading the configuration again");
            match Config::load(&cli) {
                Ok(config) => {
                    if reload.send(config).await.is_err() {
                        return;
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "reload failed; keeping the running configuration");
                    write_back_worker::metrics::config_reload("failed");
                }
            }
        }
    });
    write_back_worker::run_reloadable(config, shutdown_signal(), reloads)
        .await
        .context("write-back worker failed")
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
    let (otel, guard) = match cache_client::telemetry::otel::otlp_tracer("write-back-worker")? {
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

/// Completes on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())
        .expect("installing a SIGTERM handler cannot fail at start-up");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("received SIGINT"),
        _ = term.recv() => tracing::info!("received SIGTERM"),
    }
}

//! The worker's metrics: their names (through the `metrics` facade) and the
//! Prometheus endpoint that serves them.
//!
//! The endpoint installs a Prometheus recorder as the process's global
//! recorder the first time a worker serves metrics; workers of one process
//! share it. An embedding process that installed its own recorder gets the
//! metrics there instead, and the endpoint is not served.

use std::{net::SocketAddr, sync::OnceLock, time::Duration};

use cache_client::store::PgStore;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::error::{Error, Result};

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
/// Histogram: Kafka records per committed batch.
pub const BATCH_RECORDS: &str = "ringcache_wb_batch_records";
/// Counter: records moved to the dead-letter topic.
pub const DEAD_LETTERS_TOTAL: &str = "ringcache_wb_dead_letters_total";
/// Counter: batch attempts that failed and were retried (the database
/// failed or refused a record, or a dead letter could not be produced).
pub const RETRIES_TOTAL: &str = "ringcache_wb_retries_total";
/// Histogram: seconds from building a batch to its commit, retries included
/// (the flush latency).
pub const BATCH_SECONDS: &str = "ringcache_wb_batch_seconds";
/// Histogram: seconds from a record's `rc-written-at` to its batch's commit.
pub const LAG_SECONDS: &str = "ringcache_wb_lag_seconds";
/// Counter: dirty cache entries marked clean by the repair round (their
/// `MarkClean` had been lost).
pub const DIRTY_REPAIRED_TOTAL: &str = "ringcache_wb_dirty_repaired_total";
/// Gauge: seconds since the oldest write this worker holds unstored was
/// queued (0 when it holds none).
pub const OLDEST_UNSTORED_SECONDS: &str = "ringcache_wb_oldest_unstored_seconds";
/// Gauge, labels `topic` and `partition`: records of the partition not
/// stored yet (the broker's high watermark minus the stored offset), for
/// the partitions this worker holds; 0 for those it gave up.
pub const CONSUMER_LAG_RECORDS: &str = "ringcache_wb_consumer_lag_records";

/// Gauge: two-phase-commit transactions of ringcache's writers
/// (`ringcache:` gids) prepared in the worker's database and not resolved,
/// read from `pg_prepared_xacts` at each scrape.
pub const PG_PREPARED_TRANSACTIONS: &str = "ringcache_wb_pg_prepared_transactions";
/// Gauge: seconds since the oldest of those was prepared (0 when there is
/// none), read at each scrape.
pub const PG_OLDEST_PREPARED_TRANSACTION_SECONDS: &str =
    "ringcache_wb_pg_oldest_prepared_transaction_seconds";

/// Configuration reloads (SIGHUP), label `result`: `applied` or `failed`
/// (the running configuration was kept).
pub const CONFIG_RELOADS_TOTAL: &str = "ringcache_wb_config_reloads_total";

/// Counts a configuration reload.
pub fn config_reload(result: &'static str) {
    metrics::counter!(CONFIG_RELOADS_TOTAL, "result" => result).increment(1);
}

/// How long a scrape waits for PostgreSQL's prepared transactions before
/// it answers with the last values read.
const PREPARED_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// The process's Prometheus handle, once a worker installed the recorder.
static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(handle) => Some(handle),
            Err(err) => {
                warn!(error = %err, "another metrics recorder is installed; not serving /metrics");
                None
            }
        })
        .as_ref()
}

/// Reads `store`'s prepared transactions into their gauges; on a failure
/// or a timeout the gauges keep their last values.
async fn read_prepared_transactions(store: &PgStore) {
    match tokio::time::timeout(PREPARED_QUERY_TIMEOUT, store.prepared_transactions()).await {
        Ok(Ok(prepared)) => {
            metrics::gauge!(PG_PREPARED_TRANSACTIONS).set(prepared.count as f64);
            metrics::gauge!(PG_OLDEST_PREPARED_TRANSACTION_SECONDS)
                .set(prepared.oldest_age.as_secs_f64());
        }
        Ok(Err(err)) => debug!(error = %err, "cannot read the prepared transactions"),
        Err(_) => debug!("reading the prepared transactions timed out"),
    }
}

/// Binds `addr` and serves `GET /metrics` until `stop` is cancelled; each
/// scrape first reads `store`'s prepared transactions.
///
/// # Errors
/// [`Error::Metrics`] when the address cannot be bound.
pub(crate) async fn serve(addr: SocketAddr, store: PgStore, stop: CancellationToken) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|err| Error::Metrics(format!("cannot bind metrics_listen {addr}: {err}")))?;
    let Some(handle) = handle() else {
        return Ok(());
    };
    let bound = listener
        .local_addr()
        .map_err(|err| Error::Metrics(format!("metrics listener has no address: {err}")))?;
    info!(addr = %bound, "serving metrics");
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (handle, store) = (handle.clone(), store.clone());
            async move {
                read_prepared_transactions(&store).await;
                handle.render()
            }
        }),
    );
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(err) = served {
            warn!(error = %err, "metrics endpoint failed");
        }
    });
    Ok(())
}

//! The external services the tests and the demo need, started together.

pub mod bench_broker;
pub mod debian;
pub mod postgres;
pub mod tansu;

use std::path::Path;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use self::{postgres::PgCluster, tansu::TansuBroker};

/// PostgreSQL and the Kafka broker, both throw-away; dropping this tears both
/// down.
#[derive(Debug)]
pub struct Services {
    pub postgres: PgCluster,
    pub broker: TansuBroker,
}

impl Services {
    /// Starts both services, writing their logs under `logs_dir`.
    ///
    /// They start concurrently: initdb and a cold tansu each take seconds. If
    /// either fails the other is torn down before this returns.
    pub async fn start(logs_dir: &Path, cancel: &CancellationToken) -> Result<Self> {
        let pg_logs = logs_dir.to_path_buf();
        let pg_cancel = cancel.clone();
        // initdb and `pg_ctl start -w` block; keep them off the runtime.
        let postgres = tokio::task::spawn_blocking(move || PgCluster::start(&pg_logs, &pg_cancel));
        let broker = TansuBroker::start(logs_dir, cancel);
        let (postgres, broker) = tokio::join!(postgres, broker);
        let postgres = postgres
            .context("the PostgreSQL start-up task panicked")?
            .context("failed to start PostgreSQL")?;
        let broker = broker.context("failed to start the Kafka broker")?;
        Ok(Self { postgres, broker })
    }

    /// The environment that tells `ringcache_tests` (and the demo's
    /// processes) where the services are.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("RINGCACHE_TEST_PG_URL", self.postgres.url()),
            ("RINGCACHE_TEST_KAFKA_BROKERS", self.broker.brokers()),
            (
                "RINGCACHE_TEST_PG_BINDIR",
                self.postgres.bindir().display().to_string(),
            ),
            (
                "RINGCACHE_TEST_TANSU_BIN",
                self.broker.binary().display().to_string(),
            ),
        ]
    }

    /// Prints the tails of both services' logs (after a failed run).
    pub fn print_log_tails(&self, lines: usize) {
        crate::paths::print_tail("PostgreSQL", self.postgres.log(), lines);
        crate::paths::print_tail("broker", self.broker.log(), lines);
    }
}

//! The batcher: collects records by count and time, writes each batch with
//! its offsets in one transaction, retries the database without ever
//! skipping a batch, and drains on shutdown.

use std::{
    future::Future,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use cache_client::{store::PgStore, writeback::BatchOutcome};
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    Config,
    batch::{self, Expected, Polled},
    consumer::{Event, Poller},
    error::{Error, Result},
    metrics as m,
};

/// First wait before retrying a batch the database failed.
const RETRY_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between two retries of a batch.
const RETRY_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Shortest interval between two warnings about one failing batch.
const RETRY_WARN_INTERVAL: Duration = Duration::from_secs(30);

/// Runs the worker until `shutdown` completes, then drains: the batch being
/// collected is written with its offsets, the group is left, and `run`
/// returns `Ok(())`. Dropping the future instead (a crash) loses nothing:
/// records whose offsets are not stored are consumed again, and writes are
/// version-guarded.
///
/// # Errors
/// [`Error::Config`] for an invalid config; [`Error::Store`] when the
/// database cannot be reached at start-up or its tables are broken;
/// [`Error::Kafka`] when the consumer cannot be created; [`Error::Fenced`]
/// when another worker consumed a partition this one still held.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<()> {
    config.validate()?;
    let mut shutdown = std::pin::pin!(shutdown);
    // A worker that starts while PostgreSQL is down or failing waits for it,
    // like a running worker does: holding the queue, never failing because
    // of a transient outage. Only a permanent failure (a bad URL or
    // credentials, broken tables) ends it.
    let mut backoff = RETRY_INITIAL_BACKOFF;
    let store = loop {
        let attempt: cache_client::Result<PgStore> = async {
            let store = PgStore::connect(&config.database_url).await?;
            store.migrate().await?;
            Ok(store)
        }
        .await;
        match attempt {
            Ok(store) => break store,
            Err(err) if err.is_retryable() => {
                warn!(error = %err, "PostgreSQL is not available yet; retrying");
                tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(RETRY_MAX_BACKOFF);
            }
            Err(err) => return Err(Error::Store(err)),
        }
    };
    let poller = Poller::start(&config, store.clone())?;
    // The cache is told what is stored on a best-effort basis: a worker
    // whose cache nodes are unreachable at start still drains the queue.
    let cache = if config.cache_seeds.is_empty() {
        None
    } else {
        match cache_client::Client::connect(cache_client::ClientConfig::new(
            config.cache_seeds.clone(),
        ))
        .await
        {
            Ok(client) => Some(client),
            Err(e) => {
                warn!(error = %e, "cannot reach the cache nodes; dirty entries will not be marked clean");
                None
            }
        }
    };

    let cancel = CancellationToken::new();
    let batcher = Batcher {
        config: &config,
        store,
        expected: Expected::new(),
        pending: Vec::new(),
        cancel: &cancel,
        cache,
    };
    let work = async {
        let result = batcher.run(poller).await;
        // Releases the shutdown watcher below when the batcher stops first.
        cancel.cancel();
        result
    };
    let watch = async {
        tokio::select! {
            () = &mut shutdown => {
                info!("shutting down: finishing the current batch");
                cancel.cancel();
            }
            () = cancel.cancelled() => {}
        }
    };
    let ((), result) = tokio::join!(watch, work);
    result
}

struct Batcher<'a> {
    config: &'a Config,
    store: PgStore,
    /// The stored offset of every assigned partition, as of the last batch.
    expected: Expected,
    /// Records of the batch being collected.
    pending: Vec<Polled>,
    cancel: &'a CancellationToken,
    /// The cache, told after each batch which versions are stored.
    cache: Option<cache_client::Client>,
}

impl Batcher<'_> {
    async fn run(mut self, mut poller: Poller) -> Result<()> {
        let mut deadline = tokio::time::Instant::now();
        let result = loop {
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => break Ok(()),
                () = sleep_until(deadline), if !self.pending.is_empty() => {
                    if let Err(err) = self.flush(&poller).await {
                        break Err(err);
                    }
                }
                event = poller.events.recv() => match event {
                    None => break Err(Error::PollerStopped),
                    Some(Event::Record(record)) => {
                        if self.pending.is_empty() {
                            deadline = tokio::time::Instant::now() + self.config.max_batch_delay;
                        }
                        self.pending.push(record);
                        if self.pending.len() >= self.config.max_batch_records
                            && let Err(err) = self.flush(&poller).await
                        {
                            break Err(err);
                        }
                    }
                    Some(Event::Assigned(offsets)) => self.expected.extend(offsets),
                    Some(Event::Revoked(ack)) => {
                        let flushed = self.flush(&poller).await;
                        self.expected.clear();
                        let _ = ack.send(());
                        if let Err(err) = flushed {
                            break Err(err);
                        }
                    }
                    Some(Event::Fatal(err)) => break Err(err),
                },
            }
        };
        if result.is_ok() {
            // Shutdown: finish the batch being collected (one attempt, as
            // the cancel is set), then leave the group.
            self.flush(&poller).await?;
        }
        poller.stop().await;
        result
    }

    /// Writes the pending records with their offsets, retrying retryable
    /// database failures until they succeed or the worker stops (then the
    /// batch is left unwritten, to be consumed again).
    async fn flush(&mut self, poller: &Poller) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let records = std::mem::take(&mut self.pending);
        let count = records.len();
        let built = batch::build(&self.config.group, records, &self.expected);
        let started = Instant::now();
        let mut backoff = RETRY_INITIAL_BACKOFF;
        let mut attempts = 0u32;
        let mut last_warning: Option<Instant> = None;
        let outcome = loop {
            attempts += 1;
            match self.store.apply_write_back_batch(&built.batch).await {
                Ok(outcome) => break outcome,
                Err(err) if err.is_retryable() => {
                    if last_warning.is_none_or(|at| at.elapsed() >= RETRY_WARN_INTERVAL) {
                        warn!(attempts, records = count, error = %err, "write-back batch failed; retrying");
                        last_warning = Some(Instant::now());
                    } else {
                        debug!(attempts, error = %err, "write-back batch failed; retrying");
                    }
                    if self.cancel.is_cancelled() {
                        warn!(
                            records = count,
                            "stopping with a batch unwritten; it will be consumed again"
                        );
                        return Ok(());
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = self.cancel.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(RETRY_MAX_BACKOFF);
                }
                Err(err) => return Err(Error::Store(err)),
            }
        };
        let (applied, stale, dead_lettered) = match outcome {
            BatchOutcome::Committed {
                applied,
                stale,
                dead_lettered,
            } => (applied, stale, dead_lettered),
            BatchOutcome::Fenced {
                topic,
                partition,
                stored,
            } => {
                let expected = self
                    .expected
                    .get(&(topic.clone(), partition))
                    .copied()
                    .flatten();
                return Err(Error::Fenced {
                    topic,
                    partition,
                    stored,
                    expected,
                });
            }
        };
        if attempts > 1 {
            info!(attempts, "write-back batch written after retries");
        }

        let mut hint = Vec::with_capacity(built.batch.offsets.len());
        for offset in &built.batch.offsets {
            self.expected.insert(
                (offset.topic.clone(), offset.partition),
                Some(offset.next_offset),
            );
            hint.push((offset.topic.clone(), offset.partition, offset.next_offset));
        }
        poller.commit_hint(hint);

        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        for written_at in &built.written_at_ms {
            let lag = Duration::from_millis(now_ms.saturating_sub(*written_at));
            metrics::histogram!(m::LAG_SECONDS).record(lag.as_secs_f64());
        }
        metrics::counter!(m::BATCHES_TOTAL).increment(1);
        metrics::counter!(m::RECORDS_APPLIED_TOTAL).increment(applied as u64);
        metrics::counter!(m::RECORDS_STALE_TOTAL).increment(stale as u64);
        metrics::counter!(m::RECORDS_COALESCED_TOTAL).increment(built.coalesced as u64);
        metrics::counter!(m::DEAD_LETTERS_TOTAL).increment(dead_lettered as u64);
        metrics::histogram!(m::BATCH_SECONDS).record(started.elapsed().as_secs_f64());
        if dead_lettered > 0 {
            warn!(dead_lettered, "records moved to the dead-letter table");
        }
        if let Some(cache) = &self.cache {
            // Every row of the batch is now in the store at its version or
            // a newer one (a stale row lost to a newer stored version), so
            // entries of those versions may be clean.
            let mut by_keyspace: std::collections::BTreeMap<&str, Vec<(bytes::Bytes, u64)>> =
                std::collections::BTreeMap::new();
            for row in &built.batch.rows {
                by_keyspace
                    .entry(row.record.keyspace.as_str())
                    .or_default()
                    .push((row.record.key.clone(), row.record.version));
            }
            for (keyspace, stored) in by_keyspace {
                cache.mark_clean(keyspace, &stored).await;
            }
        }
        debug!(
            records = count,
            applied,
            stale,
            coalesced = built.coalesced,
            dead_lettered,
            "write-back batch committed"
        );
        Ok(())
    }
}

//! The batcher: collects records by count and time, writes each batch with
//! its offsets in one transaction, retries the database without ever
//! skipping a batch, and drains on shutdown.

use std::{
    collections::HashMap,
    future::Future,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use cache_client::{
    store::PgStore,
    writeback::{
        BatchOutcome, DiscardedWrite, PartitionOffset, RecordSource, WriteBackBatch, WriteBackRow,
    },
};
use futures::{StreamExt as _, future::BoxFuture, stream::FuturesUnordered};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    Config,
    batch::{self, Built, Expected, Fallbacks, Polled},
    collect::{Collector, Step},
    consumer::{Poller, Positions},
    dead_letter::{DeadLetter, DeadLetters},
    error::{Error, Result},
    lanes::{Lanes, Partition},
    metrics as m,
};

/// First wait before retrying a batch the database failed.
const RETRY_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between two retries of a batch.
const RETRY_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Longest time the last batch may take to write once the shutdown began.
const DRAIN_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
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
    // No reloads: the sender is gone, so the reload task ends at once.
    let (_, reloads) = tokio::sync::mpsc::channel(1);
    run_reloadable(config, shutdown, reloads).await
}

/// [`run`], taking configurations reloaded while it runs (the binary sends
/// one on each SIGHUP): the cache token of a reloaded configuration is
/// used for every request from then on, without a restart, so that a
/// rotation of the nodes' tokens (`docs/security.md`) needs none. Other
/// settings that changed are logged and take effect at the next start.
///
/// # Errors
/// As [`run`].
pub async fn run_reloadable(
    config: Config,
    shutdown: impl Future<Output = ()>,
    reloads: tokio::sync::mpsc::Receiver<Config>,
) -> Result<()> {
    config.validate()?;
    let drained = config.drained()?;
    let keyspaces: Vec<String> = drained.iter().map(|(name, _)| name.clone()).collect();
    config.check_dead_letter_topic(&keyspaces)?;
    let mut shutdown = std::pin::pin!(shutdown);
    // A worker that starts while PostgreSQL is down or failing waits for it,
    // like a running worker does: holding the queue, never failing because
    // of a transient outage. Only a permanent failure (a bad URL or
    // credentials, broken tables) ends it.
    let mut backoff = RETRY_INITIAL_BACKOFF;
    let store = loop {
        let attempt: cache_client::Result<PgStore> = async {
            let mut store = PgStore::connect(&config.database_url).await?;
            for (keyspace, layout) in &drained {
                store = store.with_layout(keyspace.as_str(), layout)?;
            }
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
    let cancel = CancellationToken::new();
    // Whatever way `run` returns, its background tasks (the metrics
    // endpoint, the cache connection, the repair round) stop.
    let _stop_background = cancel.clone().drop_guard();
    if let Some(addr) = config.metrics_listen {
        m::serve(addr, store.clone(), cancel.child_token()).await?;
    }
    let dead_letters = DeadLetters::new(&config)?;
    dead_letters.ensure_topic(&config).await;
    let positions = Positions::default();
    info!(keyspaces = ?keyspaces, "draining");
    let poller = Poller::start(&config, &keyspaces, store.clone(), positions.clone())?;
    // The cache is told what is stored on a best-effort basis: a worker
    // whose cache nodes are unreachable at start still drains the queue,
    // and connects to them in the background (entries stored meanwhile are
    // left to the repair round).
    let cache: CacheSlot = Arc::new(tokio::sync::OnceCell::new());
    let cache_config = config.cache_client_config()?;
    let (token, token_now) = tokio::sync::watch::channel(config.cache_token.clone());
    let connect = (!config.cache_seeds.is_empty()).then(|| {
        tokio::spawn(connect_cache(
            cache_config,
            token_now,
            Arc::clone(&cache),
            cancel.child_token(),
        ))
    });
    let reload = tokio::spawn(apply_reloads(
        config.clone(),
        reloads,
        token,
        Arc::clone(&cache),
        cancel.child_token(),
    ));

    let repair = (!config.cache_seeds.is_empty()).then(|| {
        tokio::spawn(crate::repair::run(
            Arc::clone(&cache),
            store.clone(),
            keyspaces.clone(),
            config.dirty_repair_interval,
            cancel.child_token(),
        ))
    });
    let batcher = Batcher {
        writer: Writer {
            config: &config,
            store,
            cancel: &cancel,
            cache,
            dead_letters,
            oldest: OldestUnstored::default(),
        },
        expected: Expected::new(),
        collector: Collector::new(
            config.max_batch_records,
            config.min_batch_records,
            config.max_batch_delay,
        ),
        lanes: Lanes::new(config.max_batch_records, config.max_batches_in_flight),
        positions,
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
    for task in [repair, connect, Some(reload)].into_iter().flatten() {
        if let Err(err) = task.await {
            warn!(error = %err, "a background task of the worker panicked");
        }
    }
    result
}

/// The client of the cache nodes, set once the worker reached them.
pub(crate) type CacheSlot = Arc<tokio::sync::OnceCell<cache_client::Client>>;

/// Connects to the cache nodes, retrying with backoff until it succeeds or
/// `stop` is cancelled.
async fn connect_cache(
    mut config: cache_client::ClientConfig,
    token: tokio::sync::watch::Receiver<Option<cache_client::Token>>,
    slot: CacheSlot,
    stop: CancellationToken,
) {
    let mut backoff = RETRY_INITIAL_BACKOFF;
    let mut warned = false;
    loop {
        config.token = token.borrow().clone();
        match cache_client::Client::connect(config.clone()).await {
            Ok(client) => {
                if warned {
                    info!("reached the cache nodes; marking stored entries clean from now on");
                }
                // Only this task sets it. A token reloaded while it
                // connected is in `token` now; `apply_reloads` saw no
                // client yet, so it is applied here.
                let latest = token.borrow().clone();
                if latest != config.token
                    && let Err(err) = client.set_token(latest.clone())
                {
                    warn!(error = %err, "cannot use the reloaded cache token");
                }
                let _ = slot.set(client);
                return;
            }
            Err(err) => {
                if !warned {
                    warn!(error = %err, "cannot reach the cache nodes yet; retrying in the background");
                    warned = true;
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(RETRY_MAX_BACKOFF);
    }
}

/// Applies each reloaded configuration: its cache token to the client of
/// the cache nodes (or, before it connected, to the connecting task);
/// other changed settings are logged, as they need a restart.
async fn apply_reloads(
    mut current: Config,
    mut reloads: tokio::sync::mpsc::Receiver<Config>,
    token: tokio::sync::watch::Sender<Option<cache_client::Token>>,
    cache: CacheSlot,
    stop: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => return,
            next = reloads.recv() => match next {
                Some(next) => next,
                None => return,
            },
        };
        let token_changed = next.cache_token != current.cache_token;
        if token_changed {
            if let Some(client) = cache.get()
                && let Err(err) = client.set_token(next.cache_token.clone())
            {
                warn!(error = %err, "reload refused: the new cache token cannot be sent; keeping the running configuration");
                m::config_reload("failed");
                continue;
            }
            token.send_replace(next.cache_token.clone());
        }
        let mut rest = next.clone();
        rest.cache_token.clone_from(&current.cache_token);
        rest.cache_token_file.clone_from(&current.cache_token_file);
        if rest != current {
            warn!(
                "settings other than the cache token changed; they take effect when the worker restarts"
            );
        }
        info!(token_changed, "configuration reloaded");
        m::config_reload("applied");
        current.cache_token = next.cache_token;
        current.cache_token_file = next.cache_token_file;
    }
}

struct Batcher<'a> {
    /// Writes the batches.
    writer: Writer<'a>,
    /// The stored offset of every assigned partition, as of its last batch.
    expected: Expected,
    /// The records being collected.
    collector: Collector,
    /// The collected records by partition, and the batches in flight.
    lanes: Lanes,
    /// Stored offsets, shared with the polling thread for the lag gauges.
    positions: Positions,
}

/// What the batches share: everything but the per-partition state.
struct Writer<'a> {
    config: &'a Config,
    store: PgStore,
    cancel: &'a CancellationToken,
    /// The cache, told after each batch which versions are stored, once
    /// connected.
    cache: CacheSlot,
    /// Where records that can never be stored go.
    dead_letters: DeadLetters,
    /// The oldest write each lane holds unstored, for the age gauge.
    oldest: OldestUnstored,
}

/// What writing one batch came to.
enum Written {
    /// Committed with these next offsets (one per partition of the batch).
    Committed(Vec<PartitionOffset>),
    /// Left unwritten: the worker is stopping. Its records are consumed
    /// again after the restart, as their offsets are not stored.
    Unwritten,
}

/// The batches being written, each with its lane.
type InFlight<'w> = FuturesUnordered<BoxFuture<'w, (Partition, Result<Written>)>>;

impl Batcher<'_> {
    async fn run(self, mut poller: Poller) -> Result<()> {
        let Batcher {
            writer,
            mut expected,
            mut collector,
            mut lanes,
            positions,
        } = self;
        let writer = &writer;
        let mut in_flight: InFlight<'_> = FuturesUnordered::new();
        let result = loop {
            dispatch(writer, &mut lanes, &expected, &mut in_flight);
            // A lane with a full batch waiting: collect no more until a
            // batch is done (the polling thread waits on the channel).
            let collecting = !lanes.is_full();
            tokio::select! {
                biased;
                () = writer.cancel.cancelled() => break Ok(()),
                Some((partition, written)) = in_flight.next(), if !in_flight.is_empty() => {
                    let done = finish(&mut lanes, &mut expected, &positions, &poller, &partition, written);
                    if let Err(err) = done {
                        break Err(err);
                    }
                }
                step = collector.next(&mut poller.events), if collecting => match step {
                    Step::Flush => lanes.push(collector.take()),
                    Step::Closed => break Err(Error::PollerStopped),
                    Step::Assigned(offsets) => expected.extend(offsets),
                    Step::Revoked(ack) => {
                        lanes.push(collector.take());
                        let settled = settle(
                            writer, &mut lanes, &mut expected, &positions, &poller, &mut in_flight,
                        )
                        .await;
                        if settled.is_ok() {
                            lanes.clear();
                        }
                        expected.clear();
                        let _ = ack.send(());
                        if let Err(err) = settled {
                            break Err(err);
                        }
                    }
                    Step::Fatal(err) => break Err(err),
                },
            }
        };
        let result = match result {
            // Shutdown: the batches in flight end (committed, or left
            // unwritten if the database still had them), then what was
            // collected gets one bounded attempt per lane; then the worker
            // leaves the group.
            Ok(()) => {
                lanes.push(collector.take());
                settle(
                    writer,
                    &mut lanes,
                    &mut expected,
                    &positions,
                    &poller,
                    &mut in_flight,
                )
                .await
            }
            Err(err) => Err(err),
        };
        drop(in_flight);
        poller.stop().await;
        result
    }
}

/// Starts a batch in every lane that can take one.
fn dispatch<'w>(
    writer: &'w Writer<'_>,
    lanes: &mut Lanes,
    expected: &Expected,
    in_flight: &mut InFlight<'w>,
) {
    while let Some((partition, records)) = lanes.next_batch() {
        // The lane's stored offset, as of its last committed batch.
        let stored: Expected = expected
            .get(&partition)
            .map(|offset| (partition.clone(), *offset))
            .into_iter()
            .collect();
        in_flight.push(Box::pin(async move {
            let written = writer.write(&partition, records, &stored).await;
            (partition, written)
        }));
    }
}

/// Takes in a batch that is over: a committed batch's offsets become its
/// partition's stored offset (and Kafka's hint).
fn finish(
    lanes: &mut Lanes,
    expected: &mut Expected,
    positions: &Positions,
    poller: &Poller,
    partition: &Partition,
    written: Result<Written>,
) -> Result<()> {
    match written {
        Ok(Written::Committed(offsets)) => {
            lanes.done(partition, true);
            let mut hint = Vec::with_capacity(offsets.len());
            for offset in offsets {
                let partition = (offset.topic.clone(), offset.partition);
                expected.insert(partition.clone(), Some(offset.next_offset));
                positions.insert(partition, Some(offset.next_offset));
                hint.push((offset.topic, offset.partition, offset.next_offset));
            }
            poller.commit_hint(hint);
            Ok(())
        }
        Ok(Written::Unwritten) => {
            lanes.done(partition, false);
            Ok(())
        }
        Err(err) => {
            lanes.done(partition, false);
            Err(err)
        }
    }
}

/// Writes every lane's records and waits for every batch in flight.
async fn settle<'w>(
    writer: &'w Writer<'_>,
    lanes: &mut Lanes,
    expected: &mut Expected,
    positions: &Positions,
    poller: &Poller,
    in_flight: &mut InFlight<'w>,
) -> Result<()> {
    loop {
        dispatch(writer, lanes, expected, in_flight);
        let Some((partition, written)) = in_flight.next().await else {
            debug_assert!(lanes.is_settled());
            return Ok(());
        };
        finish(lanes, expected, positions, poller, &partition, written)?;
    }
}

impl Writer<'_> {
    /// Writes the pending records with their offsets, retrying retryable
    /// database failures until they succeed or the worker stops (then the
    /// batch is left unwritten, to be consumed again). Records the database
    /// refuses in `dead_letter_after_attempts` attempts, and records that
    /// cannot be decoded, are produced to the dead-letter topic first, then
    /// the batch commits without them.
    async fn write(
        &self,
        partition: &Partition,
        records: Vec<Polled>,
        expected: &Expected,
    ) -> Result<Written> {
        let span = batch_span(&records);
        tracing::Instrument::instrument(self.write_batch(partition, records, expected), span).await
    }

    /// [`Writer::write`], in the batch's span.
    async fn write_batch(
        &self,
        partition: &Partition,
        records: Vec<Polled>,
        expected: &Expected,
    ) -> Result<Written> {
        let count = records.len();
        let Built {
            mut batch,
            dead_letters,
            coalesced,
            mut fallbacks,
            written_at_ms,
        } = batch::build(&self.config.group, records, expected);
        // Each with its decoded row, for those the database refused.
        let mut letters: Vec<(DeadLetter, Option<WriteBackRow>)> = dead_letters
            .into_iter()
            .map(|letter| (letter, None))
            .collect();
        let oldest = written_at_ms.iter().copied().min();
        let started = Instant::now();
        let mut backoff = RETRY_INITIAL_BACKOFF;
        let mut attempts = 0u32;
        let mut last_warning: Option<Instant> = None;
        // Per record, the attempts in which the database refused it.
        let mut refusals: HashMap<RecordSource, u32> = HashMap::new();
        let mut dead_lettered = Vec::new();
        let (applied, stale) = loop {
            attempts += 1;
            self.oldest.set(partition, oldest);
            let failure = if letters.is_empty() {
                // Raced with the shutdown: a database that hangs (a pool
                // waiting for connections) must not hold up a SIGTERM.
                // Dropping the attempt rolls its transaction back, or it
                // committed, and its offsets say so either way.
                // The drain's attempt (the shutdown had begun) gets a
                // bounded time instead.
                let apply = self.store.apply_write_back_batch(&batch);
                let attempt = if self.cancel.is_cancelled() {
                    tokio::time::timeout(DRAIN_ATTEMPT_TIMEOUT, apply)
                        .await
                        .ok()
                } else {
                    tokio::select! {
                        attempt = apply => Some(attempt),
                        () = self.cancel.cancelled() => None,
                    }
                };
                let Some(attempt) = attempt else {
                    warn!(
                        records = count,
                        "stopping with a batch unwritten; it will be consumed again"
                    );
                    self.oldest.set(partition, None);
                    return Ok(Written::Unwritten);
                };
                match attempt {
                    Ok(BatchOutcome::Committed { applied, stale }) => break (applied, stale),
                    Ok(BatchOutcome::Fenced {
                        topic,
                        partition,
                        stored,
                    }) => {
                        let expected = expected.get(&(topic.clone(), partition)).copied().flatten();
                        return Err(Error::Fenced {
                            topic,
                            partition,
                            stored,
                            expected,
                        });
                    }
                    Ok(BatchOutcome::Rejected { rows }) => {
                        let limit = self.config.dead_letter_after_attempts;
                        for (source, reason) in rows {
                            let refused = refusals.entry(source.clone()).or_default();
                            *refused += 1;
                            if *refused >= limit
                                && let Some(at) = batch.rows.iter().position(|r| r.source == source)
                            {
                                let row = batch.rows.remove(at);
                                set_aside(&mut batch, &mut fallbacks, &row);
                                letters.push(letter_of_row(&row, reason, *refused));
                            }
                        }
                        if !letters.is_empty() {
                            // Set aside: produce them and retry at once.
                            continue;
                        }
                        format!(
                            "the database refused {} record(s); dead-lettered after {limit} attempts",
                            refusals.len()
                        )
                    }
                    Err(err) if err.is_retryable() => err.to_string(),
                    Err(err) => return Err(Error::Store(err)),
                }
            } else {
                match self
                    .send_dead_letters(&mut letters, &mut dead_lettered)
                    .await
                {
                    // Now commit the batch without them.
                    Ok(()) => continue,
                    Err(err) => format!("cannot produce a dead letter: {err}"),
                }
            };

            metrics::counter!(m::RETRIES_TOTAL).increment(1);
            if last_warning.is_none_or(|at| at.elapsed() >= RETRY_WARN_INTERVAL) {
                warn!(attempts, records = count, error = %failure, "write-back batch failed; retrying");
                last_warning = Some(Instant::now());
            } else {
                debug!(attempts, error = %failure, "write-back batch failed; retrying");
            }
            if self.cancel.is_cancelled() {
                warn!(
                    records = count,
                    "stopping with a batch unwritten; it will be consumed again"
                );
                self.oldest.set(partition, None);
                return Ok(Written::Unwritten);
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = self.cancel.cancelled() => {}
            }
            backoff = (backoff * 2).min(RETRY_MAX_BACKOFF);
        };
        self.oldest.set(partition, None);
        crate::fault::after_commit();
        if attempts > 1 {
            info!(attempts, "write-back batch written after retries");
        }

        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        for written_at in &written_at_ms {
            let lag = Duration::from_millis(now_ms.saturating_sub(*written_at));
            metrics::histogram!(m::LAG_SECONDS).record(lag.as_secs_f64());
        }
        metrics::counter!(m::BATCHES_TOTAL).increment(1);
        metrics::histogram!(m::BATCH_RECORDS).record(count as f64);
        metrics::counter!(m::RECORDS_APPLIED_TOTAL).increment(applied as u64);
        metrics::counter!(m::RECORDS_STALE_TOTAL).increment(stale as u64);
        metrics::counter!(m::RECORDS_COALESCED_TOTAL).increment(coalesced as u64);
        metrics::histogram!(m::BATCH_SECONDS).record(started.elapsed().as_secs_f64());
        if let Some(cache) = self.cache.get() {
            // A dead-lettered write will never be stored: its entry (of
            // exactly that version) is discarded, not marked clean, so that
            // the cache does not serve a value the database never took, and
            // a dirty entry does not pin its bytes forever. If this is lost,
            // the repair round finds the write in `ringcache_wb_discarded`.
            for ((keyspace, replicas), unstored) in by_holders(
                cache,
                dead_lettered.iter().filter_map(|(row, _)| row.as_ref()),
            ) {
                cache.discard_unstored(keyspace, &unstored, replicas).await;
            }
            // Every row of the batch is now in the store at its version or
            // a newer one (a stale row lost to a newer stored version): an
            // entry of that version becomes clean, an older one is dropped.
            // Each key's nodes are the writer's replicas (`rc-replicas`).
            for ((keyspace, replicas), stored) in by_holders(cache, batch.rows.iter()) {
                cache.mark_clean_replicas(keyspace, &stored, replicas).await;
            }
        }
        debug!(
            records = count,
            applied,
            stale,
            coalesced,
            dead_lettered = dead_lettered.len(),
            "write-back batch committed"
        );
        Ok(Written::Committed(batch.offsets))
    }

    /// Produces `letters` to the dead-letter topic, one at a time, moving
    /// each one the broker acknowledged to `sent` (with its decoded row, if
    /// it had one); stops at the first failure.
    async fn send_dead_letters(
        &self,
        letters: &mut Vec<(DeadLetter, Option<WriteBackRow>)>,
        sent: &mut Vec<(Option<WriteBackRow>, DeadLetter)>,
    ) -> std::result::Result<(), String> {
        while let Some((letter, row)) = letters.first() {
            self.dead_letters.send(letter).await?;
            warn!(
                topic = %letter.source.topic,
                partition = letter.source.partition,
                offset = letter.source.offset,
                attempts = letter.attempts,
                reason = %letter.reason,
                "record moved to the dead-letter topic"
            );
            metrics::counter!(m::DEAD_LETTERS_TOTAL).increment(1);
            let row = row.clone();
            let (letter, _) = letters.remove(0);
            sent.push((row, letter));
        }
        Ok(())
    }
}

/// Takes `row`, refused for good, out of the batch's writes: records it as
/// discarded (with the offsets, for the repair round) and puts the key's
/// next older write of the batch in its place, so that an acknowledged
/// older write is stored instead of being lost with it (issue 13, defect 2).
fn set_aside(batch: &mut WriteBackBatch, fallbacks: &mut Fallbacks, row: &WriteBackRow) {
    batch.discarded.push(DiscardedWrite {
        keyspace: row.record.keyspace.clone(),
        key: row.record.key.clone(),
        version: row.record.version,
    });
    let id = (row.record.keyspace.clone(), row.record.key.clone());
    let Some(older) = fallbacks.get_mut(&id).filter(|older| !older.is_empty()) else {
        return;
    };
    let next = older.remove(0);
    // Where it sorts: the rows keep one lock order across batches.
    let at = batch.rows.partition_point(|r| {
        (&r.record.keyspace, &r.record.key) < (&next.record.keyspace, &next.record.key)
    });
    batch.rows.insert(at, next);
}

/// The keys and versions of `rows`, grouped by keyspace and by how many
/// replicas their writer wrote (`rc-replicas`; when a record does not say,
/// the worker's own view of the keyspace).
fn by_holders<'a>(
    cache: &cache_client::Client,
    rows: impl Iterator<Item = &'a WriteBackRow>,
) -> std::collections::BTreeMap<(&'a str, usize), Vec<(bytes::Bytes, u64)>> {
    let mut groups: std::collections::BTreeMap<(&str, usize), Vec<(bytes::Bytes, u64)>> =
        std::collections::BTreeMap::new();
    for row in rows {
        let keyspace = row.record.keyspace.as_str();
        let replicas = match usize::try_from(row.record.replicas) {
            Ok(0) | Err(_) => cache.replication(keyspace).replicas,
            Ok(n) => n,
        };
        groups
            .entry((keyspace, replicas))
            .or_default()
            .push((row.record.key.clone(), row.record.version));
    }
    groups
}

/// The dead letter of a decoded row the database refused `attempts` times.
fn letter_of_row(
    row: &WriteBackRow,
    reason: String,
    attempts: u32,
) -> (DeadLetter, Option<WriteBackRow>) {
    let letter = DeadLetter {
        source: row.source.clone(),
        key: Some(bytes::Bytes::from(row.record.encode_key())),
        value: row.record.value.clone(),
        headers: row
            .record
            .headers()
            .iter()
            .map(|(name, bytes)| {
                (
                    (*name).to_owned(),
                    Some(bytes::Bytes::copy_from_slice(bytes)),
                )
            })
            .collect(),
        reason,
        attempts,
    };
    (letter, Some(row.clone()))
}

/// The span of storing one batch. With the `otel` feature it links to the
/// trace of every record's writer that sent one in the record's headers (the
/// SDK keeps the first 128 links).
fn batch_span(records: &[batch::Polled]) -> tracing::Span {
    let span = tracing::info_span!(
        "ringcache.write_back.store",
        otel.name = "ringcache.write_back.store",
        records = records.len(),
    );
    #[cfg(feature = "otel")]
    for polled in records {
        cache_client::telemetry::otel::link_from_headers(
            &span,
            polled
                .headers
                .iter()
                .filter_map(|(name, value)| Some((name.as_str(), value.as_deref()?))),
        );
    }
    span
}

/// The oldest write each lane holds unstored (`written_at_ms`), behind the
/// age gauge of the oldest of them all.
#[derive(Default)]
struct OldestUnstored(std::sync::Mutex<HashMap<Partition, u64>>);

impl OldestUnstored {
    /// Sets `partition`'s oldest unstored write (`None`: none), and the
    /// gauge to the age of the oldest one of every lane.
    fn set(&self, partition: &Partition, written_at_ms: Option<u64>) {
        let oldest = {
            let mut lanes = self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match written_at_ms {
                Some(at) => lanes.insert(partition.clone(), at),
                None => lanes.remove(partition),
            };
            lanes.values().copied().min()
        };
        let age = oldest.map_or(0.0, |at| {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default();
            Duration::from_millis(now_ms.saturating_sub(at)).as_secs_f64()
        });
        metrics::gauge!(m::OLDEST_UNSTORED_SECONDS).set(age);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use cache_client::writeback::WriteBackRecord;

    use super::*;

    fn row(key: &str, version: u64, offset: i64) -> WriteBackRow {
        WriteBackRow {
            record: WriteBackRecord {
                keyspace: "ks".into(),
                key: Bytes::copy_from_slice(key.as_bytes()),
                version,
                value: Some(Bytes::from_static(b"v")),
                written_at_ms: 0,
                replicas: 0,
            },
            source: RecordSource {
                topic: "ringcache-wb-ks".into(),
                partition: 0,
                offset,
            },
        }
    }

    /// Issue 13, defect 2: a dead-lettered row gives its place to the
    /// key's next older write, in key order, and is recorded as discarded;
    /// once no older write is left, the key has no row.
    #[test]
    fn a_set_aside_row_is_replaced_by_the_next_older_write_of_its_key() {
        let mut batch = WriteBackBatch {
            rows: vec![row("a", 1, 0), row("k", 5, 3), row("z", 1, 4)],
            ..WriteBackBatch::default()
        };
        let mut fallbacks = Fallbacks::from([(
            ("ks".to_owned(), Bytes::from_static(b"k")),
            vec![row("k", 4, 2), row("k", 3, 1)],
        )]);
        let refused = batch.rows.remove(1);
        set_aside(&mut batch, &mut fallbacks, &refused);
        let rows: Vec<_> = batch
            .rows
            .iter()
            .map(|r| (r.record.key.clone(), r.record.version))
            .collect();
        assert_eq!(
            rows,
            vec![
                (Bytes::from("a"), 1),
                (Bytes::from("k"), 4),
                (Bytes::from("z"), 1)
            ]
        );
        assert_eq!(
            batch.discarded,
            vec![DiscardedWrite {
                keyspace: "ks".into(),
                key: Bytes::from("k"),
                version: 5,
            }]
        );
        let refused = batch.rows.remove(1);
        set_aside(&mut batch, &mut fallbacks, &refused);
        assert_eq!(batch.rows[1].record.version, 3);
        let refused = batch.rows.remove(1);
        set_aside(&mut batch, &mut fallbacks, &refused);
        assert_eq!(batch.rows.len(), 2, "no older write of k is left");
        assert_eq!(batch.discarded.len(), 3);
    }
}

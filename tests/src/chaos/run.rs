//! A whole chaos run: a real local cluster as separate processes (cache
//! nodes behind fault-injecting proxies, the write-back worker, a broker
//! and a PostgreSQL server of the run's own), a concurrent workload per
//! strategy, one fault per phase, quiescence, the final state, the check,
//! and the report.
//!
//! Each phase works on keys of its own (`p<phase>-<n>`), so that every
//! phase starts from empty keys, as the checker assumes, and its history is
//! checked on its own: the report has one row per strategy and fault.
//!
//! Timeline of a phase of length `P`: the workload runs for `P`; the fault
//! is injected at `P/4` and healed at `3P/4` (a killed process is started
//! again). Then the phase quiesces: every acknowledged durable write-back
//! write is waited for in PostgreSQL (polled, with a deadline), in-doubt
//! write-through transactions are recovered, and the run waits out the
//! write-through bound (the time the contract gives a missed commit) before
//! it reads the final state.

use std::{
    collections::BTreeMap,
    fmt,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use cache_client::{
    Client, ClientConfig,
    producer::WriteBackConfig,
    store::{Loaded, PgStore, Store},
    strategy::{KeyspaceSettings, Strategy, decode_cached},
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use ringcache_proto::v1;
use tokio_util::sync::CancellationToken;

use super::{
    CacheObservation, CachedEntry, CheckConfig, Digest, FaultProxy, FinalKey, FinalState, Recorder,
    Report, StoredRow, Subject, Violation, check,
    proxy::{Fault, ProxyHandle},
};
use crate::{NodeConfig, NodeProcess, PrivateBroker, PrivatePostgres, WorkerConfig, WorkerProcess};

/// TTL of every chaos keyspace: the bound of the strategies whose stale
/// values the TTL ends (`docs/strategies.md`).
const TTL: Duration = Duration::from_secs(4);
/// Write-through `pending_timeout`: how long a node that missed a commit may
/// serve the old value.
const PENDING_TIMEOUT: Duration = Duration::from_secs(2);
/// The client's per-request timeout: a paused or blackholed node costs this
/// much per call before the client routes around it.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// The client's overall deadline per call.
const DEADLINE: Duration = Duration::from_secs(3);
/// Added latency in the latency phase, each way.
const LATENCY: Duration = Duration::from_millis(150);
/// Longest wait for processes to start and for the worker to catch up.
const TIMEOUT: Duration = Duration::from_secs(120);
/// How often quiescence is polled.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// A fault a phase injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// No fault: the baseline.
    None,
    /// SIGKILL of a cache node, restarted (empty) at the heal.
    NodeKill,
    /// SIGSTOP of a cache node, SIGCONT at the heal.
    NodePause,
    /// The clients are cut off from a node: its proxy blackholes (existing
    /// connections hang, new ones hang), as a real partition looks.
    Partition,
    /// Added latency between the clients and a node.
    Latency,
    /// SIGKILL of the Kafka broker, restarted on the same log at the heal.
    BrokerRestart,
    /// PostgreSQL stopped (fast), started again at the heal.
    PostgresRestart,
    /// SIGKILL of the write-back worker, restarted at the heal.
    WorkerKill,
}

impl FaultKind {
    /// Every fault, in the default schedule's order.
    pub const ALL: [FaultKind; 7] = [
        FaultKind::NodeKill,
        FaultKind::NodePause,
        FaultKind::Partition,
        FaultKind::Latency,
        FaultKind::BrokerRestart,
        FaultKind::PostgresRestart,
        FaultKind::WorkerKill,
    ];

    /// The fault's name, as options and reports spell it.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::None => "none",
            FaultKind::NodeKill => "node-kill",
            FaultKind::NodePause => "node-pause",
            FaultKind::Partition => "partition",
            FaultKind::Latency => "latency",
            FaultKind::BrokerRestart => "broker-restart",
            FaultKind::PostgresRestart => "postgres-restart",
            FaultKind::WorkerKill => "worker-kill",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FaultKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        std::iter::once(FaultKind::None)
            .chain(FaultKind::ALL)
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown fault {s:?}; one of none, {}",
                    FaultKind::ALL.map(FaultKind::name).join(", ")
                )
            })
    }
}

/// What a run does.
#[derive(Clone, Debug)]
pub struct Options {
    /// The strategies to test, one keyspace each.
    pub strategies: Vec<Strategy>,
    /// The fault schedule: one phase per entry, in order.
    pub faults: Vec<FaultKind>,
    /// How long each phase's workload runs.
    pub phase: Duration,
    /// Client tasks per keyspace.
    pub tasks: usize,
    /// Keys per keyspace and phase.
    pub keys: usize,
    /// Bytes per written value.
    pub value_size: usize,
    /// Seed of every random choice (keys, operations, victims).
    pub seed: u64,
    /// Cache nodes (at least three).
    pub nodes: usize,
    /// Print a progress line to stderr.
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            strategies: super::STRATEGIES.to_vec(),
            faults: FaultKind::ALL.to_vec(),
            phase: Duration::from_secs(20),
            tasks: 2,
            keys: 16,
            value_size: 64,
            seed: 1,
            nodes: 3,
            progress: false,
        }
    }
}

/// What a run found.
#[derive(Debug)]
pub struct Outcome {
    /// One row per strategy and fault.
    pub report: Report,
    /// Every violation, with the fault of its phase.
    pub violations: Vec<(FaultKind, Violation)>,
    /// Keys left out of the final-state checks (never observed, or not
    /// quiescent in time), per phase.
    pub unchecked: usize,
    /// How often each error was seen, by fault, strategy and message.
    pub errors: BTreeMap<(FaultKind, String, String), usize>,
}

/// The staleness each strategy's contract allows in these runs
/// (`docs/strategies.md`, `docs/failover.md`, `docs/write-back.md`).
pub fn bounds() -> CheckConfig {
    // One probe interval plus a round trip, for a node coming back.
    let slack = Duration::from_millis(500);
    CheckConfig::new()
        // A delete that reached no replica: until the TTL ends it.
        .with_bound(Strategy::CacheAside, TTL + slack)
        .with_bound(Strategy::ReadThrough, TTL + slack)
        .with_bound(Strategy::WriteAround, TTL + slack)
        // A node that missed a commit: at most `pending_timeout`.
        .with_bound(Strategy::WriteThrough, PENDING_TIMEOUT + slack)
        // A lost owner: reads load from PostgreSQL, behind by the worker's
        // backlog, and may cache that for the TTL.
        .with_bound(Strategy::WriteBack, TTL + Duration::from_secs(10))
}

/// Runs the schedule and checks every phase.
///
/// # Errors
/// When the cluster cannot be started or a fault cannot be injected or
/// healed (the run cannot say anything then); violations are not errors.
pub async fn run(options: &Options) -> Result<Outcome> {
    if options.nodes < 3 {
        bail!("a chaos run needs at least three cache nodes");
    }
    if options.strategies.is_empty() || options.faults.is_empty() {
        bail!("a chaos run needs at least one strategy and one fault");
    }
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut cluster = Cluster::start(options).await?;
    let mut report = Report::new();
    let mut violations = Vec::new();
    let mut unchecked = 0;
    let mut errors = BTreeMap::new();
    let config = bounds();
    for (index, &fault) in options.faults.iter().enumerate() {
        let phase = Phase {
            index,
            total: options.faults.len(),
            fault,
            victim: rng.random_range(0..cluster.nodes.len()),
            seed: rng.random(),
        };
        let (result, history) = cluster.phase(options, &phase, &config).await?;
        for op in &history.ops {
            if let super::Outcome::Err(message) = &op.outcome {
                *errors
                    .entry((fault, op.strategy.to_string(), error_kind(message)))
                    .or_default() += 1;
            }
        }
        unchecked += result.unobserved_keys.len() + result.not_quiescent.len();
        report.add(fault.name(), &result);
        violations.extend(result.violations.into_iter().map(|v| (fault, v)));
    }
    if !violations.is_empty() || std::env::var_os("RINGCACHE_CHAOS_LOG_TAILS").is_some() {
        eprintln!(
            "\nworker log tail:\n{}\n\nbroker log tail:\n{}",
            cluster.worker.log_tail(60),
            cluster.broker.log_tail(400)
        );
    }
    cluster.stop().await;
    Ok(Outcome {
        report,
        violations,
        unchecked,
        errors,
    })
}

/// An error message with its numbers (versions, offsets, addresses)
/// replaced by `N`, so that errors of one kind count together.
fn error_kind(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut in_number = false;
    for c in message.chars() {
        if c.is_ascii_digit() {
            if !in_number {
                out.push('N');
            }
            in_number = true;
        } else {
            in_number = false;
            out.push(c);
        }
    }
    out
}

struct Phase {
    index: usize,
    total: usize,
    fault: FaultKind,
    victim: usize,
    seed: u64,
}

/// The run's processes and the client the workload uses.
struct Cluster {
    pg: PrivatePostgres,
    broker: PrivateBroker,
    configs: Vec<NodeConfig>,
    nodes: Vec<Option<NodeProcess>>,
    _proxies: Vec<FaultProxy>,
    proxies: Vec<ProxyHandle>,
    worker: WorkerProcess,
    /// How many times the worker was started in a new group.
    worker_generation: u32,
    client: Client,
    store: Arc<PgStore>,
    keyspaces: Vec<(String, Strategy)>,
}

impl Cluster {
    async fn start(options: &Options) -> Result<Cluster> {
        let pg = tokio::task::spawn_blocking(PrivatePostgres::start)
            .await
            .context("starting PostgreSQL panicked")??;
        let store = PgStore::connect(&pg.url())
            .await
            .context("cannot connect to the run's PostgreSQL")?;
        store.migrate().await?;
        let broker = PrivateBroker::start(TIMEOUT).await?;

        // Proxies first: the nodes advertise them as their addresses, so
        // every client (and the worker) reaches a node through its proxy.
        let mut configs = NodeConfig::cluster(options.nodes)?;
        let mut proxies = Vec::new();
        for config in &configs {
            proxies.push(FaultProxy::start(config.listen).await?);
        }
        let members: Vec<(String, std::net::SocketAddr)> = configs
            .iter()
            .zip(&proxies)
            .map(|(config, proxy)| (config.node_id.clone(), proxy.addr()))
            .collect();
        for config in &mut configs {
            config.members.clone_from(&members);
            config.extra_top_level = "unknown_keyspaces = \"create\"\n".into();
        }
        let mut nodes = Vec::new();
        for config in &configs {
            nodes.push(Some(NodeProcess::start(config.clone()).await?));
        }
        let seeds: Vec<String> = proxies.iter().map(|p| p.addr().to_string()).collect();

        let client = Client::connect(
            ClientConfig::new(seeds.clone())
                .with_request_timeout(REQUEST_TIMEOUT)
                .with_deadline(DEADLINE),
        )
        .await?;
        let mut wb = WriteBackConfig::new(broker.brokers());
        wb.delivery_timeout = DEADLINE;
        // tansu 0.6 panics (and stops serving) when an idempotent producer
        // of before a restart produces again after it; versions make the
        // duplicates a plain producer may send harmless.
        wb.idempotent = false;
        client.enable_write_back(wb)?;
        let store = Arc::new(store);
        let mut keyspaces = Vec::new();
        for &strategy in &options.strategies {
            let name = format!("chaos_{}", strategy.to_string().replace('-', "_"));
            let mut settings = KeyspaceSettings::new(strategy).with_ttl(TTL);
            settings.pending_timeout = PENDING_TIMEOUT;
            client.define_keyspace(&name, settings, Some(store.clone()))?;
            keyspaces.push((name, strategy));
        }
        client.ensure_write_back_topics().await?;
        let wb_keyspaces: Vec<String> = keyspaces
            .iter()
            .filter(|(_, s)| *s == Strategy::WriteBack)
            .map(|(n, _)| n.clone())
            .collect();
        let worker = WorkerProcess::start(WorkerConfig {
            brokers: broker.brokers(),
            database_url: pg.url(),
            group: "ringcache-chaos".into(),
            // The worker needs a keyspace even when write-back is not
            // tested; an idle topic costs nothing.
            keyspaces: if wb_keyspaces.is_empty() {
                vec!["chaos_idle".into()]
            } else {
                wb_keyspaces
            },
            cache_seeds: seeds,
        })?;
        Ok(Cluster {
            pg,
            broker,
            configs,
            nodes,
            proxies: proxies.iter().map(FaultProxy::handle).collect(),
            _proxies: proxies,
            worker,
            worker_generation: 0,
            client,
            store,
            keyspaces,
        })
    }

    async fn stop(mut self) {
        for node in self.nodes.iter_mut().flatten() {
            let _ = node.sigterm();
        }
        let _ = self.worker.sigterm();
        let _ = self.worker.wait_exit(Duration::from_secs(10)).await;
    }

    async fn phase(
        &mut self,
        options: &Options,
        phase: &Phase,
        config: &CheckConfig,
    ) -> Result<(super::CheckResult, super::History)> {
        let recorder = Recorder::new();
        let stop = CancellationToken::new();
        let ops = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        let mut task_id = 0u32;
        for (keyspace, strategy) in &self.keyspaces {
            for _ in 0..options.tasks {
                let workload = Workload {
                    client: self.client.clone(),
                    recorder: recorder.clone(),
                    keyspace: keyspace.clone(),
                    strategy: *strategy,
                    task: task_id,
                    phase: phase.index,
                    keys: options.keys,
                    value_size: options.value_size,
                    rng: StdRng::seed_from_u64(phase.seed ^ u64::from(task_id)),
                    ops: ops.clone(),
                    errors: errors.clone(),
                };
                tasks.spawn(workload.run(stop.clone()));
                task_id += 1;
            }
        }

        let started = Instant::now();
        let progress = Progress {
            enabled: options.progress,
            phase,
            length: options.phase,
            started,
            ops: &ops,
            errors: &errors,
        };
        let quarter = options.phase / 4;
        progress.wait_until(quarter).await;
        let injected = self.inject(phase).await;
        progress.wait_until(quarter * 3).await;
        let healed = self.heal(phase).await;
        progress.wait_until(options.phase).await;
        stop.cancel();
        while tasks.join_next().await.is_some() {}
        progress.done();
        injected.with_context(|| format!("injecting {}", phase.fault))?;
        healed.with_context(|| format!("healing {}", phase.fault))?;

        let history = recorder.history();
        self.quiesce(&history).await?;
        let observed_at = recorder.elapsed();
        let final_state = self.final_state(&history, observed_at).await?;
        Ok((check(&history, &final_state, config), history))
    }

    async fn inject(&mut self, phase: &Phase) -> Result<()> {
        let victim = phase.victim;
        match phase.fault {
            FaultKind::None => {}
            FaultKind::NodeKill => {
                if let Some(node) = &mut self.nodes[victim] {
                    node.sigkill()?;
                    node.wait_exit(TIMEOUT).await?;
                }
            }
            FaultKind::NodePause => {
                if let Some(node) = &mut self.nodes[victim] {
                    node.sigstop()?;
                }
            }
            FaultKind::Partition => self.proxies[victim].set(Fault::blackhole()).await?,
            FaultKind::Latency => self.proxies[victim].set(Fault::latency(LATENCY)).await?,
            FaultKind::BrokerRestart => {
                self.broker.sigkill()?;
            }
            FaultKind::PostgresRestart => {
                let pg = &mut self.pg;
                tokio::task::block_in_place(|| pg.stop_fast())?;
            }
            FaultKind::WorkerKill => {
                self.worker.sigkill()?;
            }
        }
        Ok(())
    }

    async fn heal(&mut self, phase: &Phase) -> Result<()> {
        let victim = phase.victim;
        match phase.fault {
            FaultKind::None => {}
            FaultKind::NodeKill => {
                self.nodes[victim] = None;
                self.nodes[victim] = Some(NodeProcess::start(self.configs[victim].clone()).await?);
            }
            FaultKind::NodePause => {
                if let Some(node) = &mut self.nodes[victim] {
                    node.sigcont()?;
                }
            }
            FaultKind::Partition | FaultKind::Latency => self.proxies[victim].heal().await?,
            FaultKind::BrokerRestart => self.broker.restart(TIMEOUT).await?,
            FaultKind::PostgresRestart => {
                let pg = &mut self.pg;
                tokio::task::block_in_place(|| pg.start_again())?;
            }
            FaultKind::WorkerKill => self.restart_worker_in_a_new_group().await?,
        }
        Ok(())
    }

    /// Starts the worker again, as a member of a new consumer group whose
    /// offsets in PostgreSQL are the old group's: it resumes exactly where
    /// the old one stopped (the worker seeks to the stored offsets), without
    /// rejoining the old group. tansu 0.6's group coordinator may never
    /// hand a dead member's partitions to anyone when that member led the
    /// group (a single worker always does); Apache Kafka would.
    async fn restart_worker_in_a_new_group(&mut self) -> Result<()> {
        self.worker.wait_exit(TIMEOUT).await?;
        let old = self.worker.config().clone();
        self.worker_generation += 1;
        let group = format!("ringcache-chaos-{}", self.worker_generation);
        sqlx::query(
            "INSERT INTO ringcache_wb_offsets (consumer_group, topic, kafka_partition, next_offset) \
             SELECT $2, topic, kafka_partition, next_offset FROM ringcache_wb_offsets \
             WHERE consumer_group = $1",
        )
        .bind(&old.group)
        .bind(&group)
        .execute(self.store.pool())
        .await
        .context("copying the worker's offsets to its new group")?;
        self.worker = WorkerProcess::start(WorkerConfig { group, ..old })?;
        Ok(())
    }

    /// Waits until every acknowledged durable write-back write is stored
    /// (the worker caught up), recovers in-doubt write-through
    /// transactions, and waits out the write-through bound.
    async fn quiesce(&mut self, history: &super::History) -> Result<()> {
        let mut newest: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for op in &history.ops {
            if op.strategy == Strategy::WriteBack
                && op.is_write()
                && op.durable_ack()
                && let Some(version) = op.version
            {
                let slot = newest.entry((&op.keyspace, &op.key)).or_default();
                *slot = (*slot).max(version);
            }
        }
        let deadline = Instant::now() + TIMEOUT;
        for ((keyspace, key), version) in newest {
            loop {
                let stored = match self.store.load(keyspace, key.as_bytes()).await {
                    Ok(Loaded::Present(row)) => row.version,
                    Ok(Loaded::Absent { version }) => version,
                    Err(_) => 0,
                };
                if stored >= version {
                    break;
                }
                self.worker.ensure_running()?;
                if Instant::now() >= deadline {
                    // The checker reports what is missing.
                    break;
                }
                tokio::time::sleep(POLL_EVERY).await;
            }
        }
        self.client
            .recover_in_doubt()
            .await
            .context("recovering in-doubt write-through transactions")?;
        // The contract's time for a node that missed a commit; not a
        // stand-in for synchronisation.
        tokio::time::sleep(PENDING_TIMEOUT + Duration::from_millis(500)).await;
        Ok(())
    }

    /// Every key of the history: its row in PostgreSQL, and what each node
    /// caches (read directly, not through the proxies).
    async fn final_state(
        &self,
        history: &super::History,
        observed_at: Duration,
    ) -> Result<FinalState> {
        let keys: BTreeMap<(&str, &str), Strategy> = history
            .ops
            .iter()
            .map(|op| ((op.keyspace.as_str(), op.key.as_str()), op.strategy))
            .collect();
        let mut nodes = Vec::new();
        for config in &self.configs {
            let client = v1::cache_node_client::CacheNodeClient::connect(format!(
                "http://{}",
                config.listen
            ))
            .await
            .with_context(|| format!("cannot reach {} directly", config.node_id))?;
            nodes.push((config.node_id.clone(), client));
        }
        let mut out = Vec::new();
        for ((keyspace, key), strategy) in keys {
            let db = match self.store.load(keyspace, key.as_bytes()).await? {
                Loaded::Present(row) => Some(StoredRow {
                    version: row.version,
                    value: Some(Digest::of(&row.value)),
                }),
                Loaded::Absent { version: 0 } => None,
                Loaded::Absent { version } => Some(StoredRow {
                    version,
                    value: None,
                }),
            };
            let mut cache = Vec::new();
            for (id, client) in &mut nodes {
                let reply = client
                    .get(v1::GetRequest {
                        keyspace: keyspace.to_owned(),
                        key: Bytes::copy_from_slice(key.as_bytes()),
                    })
                    .await
                    .with_context(|| format!("reading {keyspace}/{key} on {id}"))?
                    .into_inner();
                let entry = match reply.entry {
                    Some(entry) => {
                        let value = decode_cached(keyspace, &entry.value)?;
                        Some(CachedEntry {
                            version: Some(entry.version),
                            value: value.as_deref().map(Digest::of),
                        })
                    }
                    None => None,
                };
                cache.push(CacheObservation {
                    source: id.clone(),
                    entry,
                });
            }
            out.push(FinalKey {
                keyspace: keyspace.to_owned(),
                key: key.to_owned(),
                strategy,
                db,
                cache,
            });
        }
        Ok(FinalState {
            observed_at,
            keys: out,
        })
    }
}

/// One client task's loop: reads, writes and deletes of random keys.
struct Workload {
    client: Client,
    recorder: Recorder,
    keyspace: String,
    strategy: Strategy,
    task: u32,
    phase: usize,
    keys: usize,
    value_size: usize,
    rng: StdRng,
    ops: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
}

impl Workload {
    async fn run(mut self, stop: CancellationToken) {
        let keyspace = self.client.keyspace(&self.keyspace);
        let mut seq = 0u64;
        while !stop.is_cancelled() {
            let key = format!("p{}-{}", self.phase, self.rng.random_range(0..self.keys));
            let subject = Subject {
                task: self.task,
                keyspace: &self.keyspace,
                strategy: self.strategy,
                key: &key,
            };
            let roll = self.rng.random_range(0..100);
            let ok = if roll < 50 {
                let op = self.recorder.read(subject);
                let result = keyspace.get(&key).await;
                let ok = result.is_ok();
                op.read_result(&result);
                ok
            } else if roll < 90 {
                seq += 1;
                // Distinct per write, so that a read names the write it saw.
                let mut value = format!("t{}-{seq}-", self.task).into_bytes();
                value.resize(self.value_size.max(value.len()), b'x');
                let op = self.recorder.write(subject, &value);
                let result = keyspace.put(&key, value).await;
                let ok = result.is_ok();
                op.write_result(&result);
                ok
            } else {
                let op = self.recorder.delete(subject);
                let result = keyspace.remove(&key).await;
                let ok = result.is_ok();
                op.write_result(&result);
                ok
            };
            self.ops.fetch_add(1, Ordering::Relaxed);
            if !ok {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The progress line of a phase.
struct Progress<'a> {
    enabled: bool,
    phase: &'a Phase,
    length: Duration,
    started: Instant,
    ops: &'a AtomicU64,
    errors: &'a AtomicU64,
}

impl Progress<'_> {
    /// Redraws the line every half second until `at` into the phase.
    async fn wait_until(&self, at: Duration) {
        let until = self.started + at;
        loop {
            self.draw();
            let now = Instant::now();
            if now >= until {
                return;
            }
            tokio::time::sleep((until - now).min(Duration::from_millis(500))).await;
        }
    }

    fn draw(&self) {
        if !self.enabled {
            return;
        }
        const WIDTH: usize = 30;
        let done = self.started.elapsed().min(self.length);
        let filled = (done.as_secs_f64() / self.length.as_secs_f64() * WIDTH as f64) as usize;
        let bar: String = (0..WIDTH)
            .map(|i| if i < filled { '#' } else { '-' })
            .collect();
        eprint!(
            "\rphase {}/{} {:<16} [{bar}] {:>5.1}s  ops {:>7}  errors {:>5}",
            self.phase.index + 1,
            self.phase.total,
            self.phase.fault.name(),
            done.as_secs_f64(),
            self.ops.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        );
    }

    fn done(&self) {
        if self.enabled {
            self.draw();
            eprintln!("  quiescing and checking");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_of_one_kind_differ_only_in_numbers() {
        assert_eq!(
            error_kind("node node-2 refused the prepare (version 117705 is live)"),
            "node node-N refused the prepare (version N is live)"
        );
        assert_eq!(
            error_kind("no reply within 500ms"),
            error_kind("no reply within 3ms")
        );
        assert_eq!(error_kind("plain"), "plain");
    }

    #[test]
    fn fault_names_round_trip() {
        for fault in std::iter::once(FaultKind::None).chain(FaultKind::ALL) {
            assert_eq!(fault.name().parse::<FaultKind>(), Ok(fault));
        }
        assert!("sigkill".parse::<FaultKind>().is_err());
    }
}

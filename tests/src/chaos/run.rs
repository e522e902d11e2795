//! A whole chaos run: a real local cluster as separate processes (cache
//! nodes, each behind a fault-injecting proxy per client, the write-back
//! worker, a broker and a PostgreSQL server of the run's own), client
//! processes (`client.rs`) each running a workload per keyspace, one fault
//! per phase, quiescence, the final state, the check, and the report.
//!
//! Each phase works on keys of its own (`p<phase>-<n>`), so that every
//! phase starts from empty keys, as the checker assumes, and its history is
//! checked on its own: the report has one row per strategy and fault.
//!
//! Timeline of a phase of length `P`: the workload runs for `P`; the fault
//! is injected at `P/4` and healed at `3P/4` (a killed process is started
//! again). Then the phase quiesces: the worker is waited for until it has
//! consumed every write-back record, in-doubt write-through transactions
//! are recovered, the run waits out the write-through bound (the time the
//! contract gives a missed commit) and, for a while, for dirty entries to
//! be marked clean, before it reads the final state.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use cache_client::{
    Client, ClientConfig,
    producer::WriteBackConfig,
    store::{Loaded, PgStore, Store},
    strategy::{KeyspaceSettings, Strategy, decode_cached},
    writeback,
};
use nix::sys::signal::Signal;
use rand::{Rng, SeedableRng, rngs::StdRng};
use ringcache_proto::v1;
use tempfile::TempDir;

pub use super::faults::FaultKind;
use super::{
    CacheObservation, CachedEntry, CheckConfig, Digest, DirtyObservation, FaultProxy, FinalKey,
    FinalState, History, Recorder, Report, StoredRow, Violation, check,
    client::{ClientProcess, ClientSpec, Command, DEADLINE, Event, KeyspaceSpec, REQUEST_TIMEOUT},
    proxy::{Fault, ProxyHandle},
    unix_now_ns,
};
use crate::{
    NodeConfig, NodeProcess, PrivateBroker, PrivatePostgres, WorkerConfig, WorkerExtra,
    WorkerProcess,
};

/// TTL of every chaos keyspace: the bound of the strategies whose stale
/// values the TTL ends (`docs/strategies.md`).
const TTL: Duration = Duration::from_secs(4);
/// Write-through `pending_timeout`: how long a node that missed a commit may
/// serve the old value.
const PENDING_TIMEOUT: Duration = Duration::from_secs(2);
/// The nodes' lease lifetime (the node's default `lease_ttl`).
const LEASE_TTL: Duration = cache_node::config::DEFAULT_LEASE_TTL;
/// The clients' health-probe interval (the client's default).
const PROBE_INTERVAL: Duration = cache_client::config::DEFAULT_PROBE_INTERVAL;
/// Added latency in the latency phase, each way.
const LATENCY: Duration = Duration::from_millis(150);
/// Longest wait for processes to start and for the worker to catch up.
const TIMEOUT: Duration = Duration::from_secs(120);
/// How often quiescence is polled.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// The worker's `dirty_repair_interval` in a run: the safety net for a lost
/// `MarkClean` gets a few rounds within a phase's quiescence.
const DIRTY_REPAIR_INTERVAL: &str = "2s";
/// How long quiescence waits for dirty entries to be marked clean (the
/// worker's `MarkClean`, or its repair rounds) before they count as left.
const DIRTY_WAIT: Duration = Duration::from_secs(8);
/// `max_dirty_bytes` of the write-back keyspaces on every node: room for
/// the dirty entries of every key of a phase a few times over, not for the
/// four times as many keys of `dirty-budget` while the worker is stopped.
const MAX_DIRTY_BYTES: u64 = 6000;
/// The CHECK constraint `poison` writes break.
const POISON_CHECK: &str = "ALTER TABLE ringcache_entries ADD CONSTRAINT chaos_no_poison \
     CHECK (value IS NULL OR substring(value from 1 for 6) <> 'poison'::bytea)";

/// What a run does.
#[derive(Clone, Debug)]
pub struct Options {
    /// The strategies to test, one keyspace each (and, with `replicated`,
    /// two more for write-through and write-back).
    pub strategies: Vec<Strategy>,
    /// The fault schedule: one phase per entry, in order.
    pub faults: Vec<FaultKind>,
    /// How long each phase's workload runs.
    pub phase: Duration,
    /// Client processes (each its own clock, health view and connections).
    pub clients: usize,
    /// Workload tasks per keyspace and client.
    pub tasks: usize,
    /// Keys per keyspace and phase.
    pub keys: usize,
    /// Bytes per written value.
    pub value_size: usize,
    /// Seed of every random choice (keys, operations, victims).
    pub seed: u64,
    /// Cache nodes (at least three).
    pub nodes: usize,
    /// Also the keyspaces `<strategy>_r2q1` and `<strategy>_r2q2` (two
    /// replicas, write quorum one and two) for write-through and write-back.
    pub replicated: bool,
    /// Draw a progress bar to stderr (only drawn on a terminal).
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            strategies: super::STRATEGIES.to_vec(),
            faults: FaultKind::ALL.to_vec(),
            phase: Duration::from_secs(20),
            clients: 3,
            tasks: 1,
            keys: 16,
            value_size: 64,
            seed: 1,
            nodes: 3,
            replicated: true,
            progress: false,
        }
    }
}

impl Options {
    /// The suite as it was with one writer: one client process of two
    /// tasks per keyspace, no replicated keyspaces, the single-writer faults.
    pub fn single_writer() -> Options {
        Options {
            faults: FaultKind::SINGLE_WRITER.to_vec(),
            clients: 1,
            tasks: 2,
            replicated: false,
            ..Options::default()
        }
    }

    /// The keyspaces of the run.
    pub fn keyspaces(&self) -> Vec<KeyspaceSpec> {
        let mut out = Vec::new();
        for &strategy in &self.strategies {
            let base = format!("chaos_{}", strategy.to_string().replace('-', "_"));
            let mut shapes = vec![(base.clone(), 1, 1)];
            if self.replicated && matches!(strategy, Strategy::WriteThrough | Strategy::WriteBack) {
                shapes.push((format!("{base}_r2q1"), 2, 1));
                shapes.push((format!("{base}_r2q2"), 2, 2));
            }
            for (name, replicas, write_quorum) in shapes {
                out.push(KeyspaceSpec {
                    name,
                    strategy: strategy.to_string(),
                    replicas,
                    write_quorum,
                    // Write-through as deployed by default, without a TTL:
                    // its promise does not lean on one, and a divergence
                    // stays for the final state to see.
                    ttl: (strategy != Strategy::WriteThrough).then_some(TTL),
                    pending_timeout: PENDING_TIMEOUT,
                });
            }
        }
        out
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

/// The staleness each strategy's contract allows in these runs under
/// `fault`, in phases of `phase` (`docs/strategies.md`, `docs/failover.md`,
/// `docs/write-back.md`).
pub fn bounds(fault: FaultKind, phase: Duration) -> CheckConfig {
    // One probe interval plus a round trip, for a node coming back.
    let slack = Duration::from_millis(500);
    // A lost owner: reads load from PostgreSQL, behind by the worker's
    // backlog, and may cache that for the TTL.
    let write_back = TTL + Duration::from_secs(10);
    let mut config = CheckConfig::new()
        // A delete that reached no replica: until the TTL ends it.
        .with_bound(Strategy::CacheAside, TTL + slack)
        .with_bound(Strategy::ReadThrough, TTL + slack)
        .with_bound(Strategy::WriteAround, TTL + slack)
        // A node that missed a commit: at most `pending_timeout`.
        .with_bound(Strategy::WriteThrough, PENDING_TIMEOUT + slack)
        .with_bound(Strategy::WriteBack, write_back)
        // A client reads its own write-back writes, unless it was cut off
        // from the key's owner.
        .with_read_your_writes_bound(if fault.cuts_nodes() {
            write_back
        } else {
            Duration::ZERO
        });
    if fault == FaultKind::AsymmetricPartition {
        // docs/failover.md, "Asymmetric partitions: the bound": a writer
        // cut off from an owner that readers still reach leaves them the
        // old value for at most `ttl + lease_ttl`, or until it flushes the
        // node once the partition heals (one probe interval and two
        // request timeouts after), whichever comes first; write-through
        // keyspaces here have no TTL, so only the second. The partition
        // lasts half a phase (`Cluster::phase`).
        let ttl_bound = TTL + LEASE_TTL + slack;
        let heal_bound = phase / 2 + PROBE_INTERVAL + 2 * REQUEST_TIMEOUT + slack;
        for strategy in [
            Strategy::CacheAside,
            Strategy::ReadThrough,
            Strategy::WriteAround,
        ] {
            config = config.with_bound(strategy, ttl_bound.min(heal_bound));
        }
        config = config
            .with_bound(Strategy::WriteThrough, heal_bound)
            .with_bound(
                Strategy::WriteBack,
                write_back.max(ttl_bound.min(heal_bound)),
            );
    }
    config
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
    if options.clients == 0 {
        bail!("a chaos run needs at least one client");
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
    let mut result = Ok(());
    for (index, &fault) in options.faults.iter().enumerate() {
        let phase = Phase {
            index,
            total: options.faults.len(),
            fault,
            victim: rng.random_range(0..cluster.nodes.len()),
            victim_client: rng.random_range(0..cluster.clients.len()),
            seed: rng.random(),
        };
        let (checked, history) = match cluster
            .phase(options, &phase, &bounds(fault, options.phase))
            .await
        {
            Ok(done) => done,
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        for op in &history.ops {
            if let super::Outcome::Err(message) = &op.outcome {
                *errors
                    .entry((fault, op.strategy.to_string(), error_kind(message)))
                    .or_default() += 1;
            }
        }
        unchecked += checked.unobserved_keys.len() + checked.not_quiescent.len();
        report.add(fault.name(), &checked);
        violations.extend(checked.violations.into_iter().map(|v| (fault, v)));
    }
    if result.is_err()
        || !violations.is_empty()
        || std::env::var_os("RINGCACHE_CHAOS_LOG_TAILS").is_some()
    {
        eprintln!(
            "\nworker log tail:\n{}\n\nbroker log tail:\n{}",
            cluster.worker.log_tail(60),
            cluster.broker.log_tail(100)
        );
        for client in &cluster.clients {
            eprintln!(
                "\nclient {} log tail:\n{}",
                client.client,
                client.log_tail(20)
            );
        }
    }
    cluster.stop().await;
    result?;
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
    /// The node a node fault hits.
    victim: usize,
    /// The client a client fault hits.
    victim_client: usize,
    seed: u64,
}

/// The run's processes, and the runner's own client (for recovery and the
/// strategy of each keyspace at quiescence).
struct Cluster {
    pg: PrivatePostgres,
    broker: PrivateBroker,
    configs: Vec<NodeConfig>,
    nodes: Vec<Option<NodeProcess>>,
    /// The proxies the nodes advertise: the runner's client and the
    /// worker's way to the nodes.
    _proxies: Vec<FaultProxy>,
    proxies: Vec<ProxyHandle>,
    /// Per client process, one proxy per node.
    _client_proxies: Vec<FaultProxy>,
    client_proxies: Vec<Vec<ProxyHandle>>,
    clients: Vec<ClientProcess>,
    worker: WorkerProcess,
    /// Every consumer group the worker ran in (a restart starts a new one),
    /// for their dead-letter topics.
    groups: Vec<String>,
    client: Client,
    store: Arc<PgStore>,
    keyspaces: Vec<(String, Strategy)>,
    /// The write-through keyspaces are switched away (`strategy-switch`).
    switched: bool,
    _logs: TempDir,
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
        sqlx::query(POISON_CHECK)
            .execute(store.pool())
            .await
            .context("adding the poison CHECK constraint")?;
        let broker = PrivateBroker::start(TIMEOUT).await?;
        let logs = tempfile::Builder::new()
            .prefix("ringcache-chaos-")
            .tempdir()
            .context("a directory for the clients' logs")?;

        let specs = options.keyspaces();
        // Proxies first: the nodes advertise them as their addresses, so
        // that the runner's client and the worker reach a node through one.
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
        let mut tables = String::new();
        for spec in specs.iter().filter(|s| s.strategy == "write-back") {
            tables.push_str(&format!(
                "[keyspaces.{}]\ncapacity_bytes = 67108864\nmax_dirty_bytes = {MAX_DIRTY_BYTES}\n\n",
                spec.name
            ));
        }
        for config in &mut configs {
            config.members.clone_from(&members);
            config.extra_top_level = "unknown_keyspaces = \"create\"\n".into();
            config.extra_tables.clone_from(&tables);
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
        wb.idempotent = false;
        client.enable_write_back(wb)?;
        let store = Arc::new(store);
        let mut keyspaces = Vec::new();
        for spec in &specs {
            let strategy = spec.strategy()?;
            let mut settings =
                KeyspaceSettings::new(strategy).with_replication(spec.replicas, spec.write_quorum);
            settings.ttl = spec.ttl;
            settings.pending_timeout = PENDING_TIMEOUT;
            client.define_keyspace(&spec.name, settings, Some(store.clone()))?;
            keyspaces.push((spec.name.clone(), strategy));
        }
        client.ensure_write_back_topics().await?;

        // Each client process through proxies of its own, so that a fault
        // can cut one client off from one node.
        let mut client_proxies = Vec::new();
        let mut all_client_proxies = Vec::new();
        let mut clients = Vec::new();
        for c in 0..options.clients {
            let mut own = Vec::new();
            for config in &configs {
                let proxy = FaultProxy::start(config.listen).await?;
                own.push((config.node_id.clone(), proxy.addr().to_string()));
                client_proxies.push(proxy);
            }
            all_client_proxies.push(
                client_proxies[c * configs.len()..]
                    .iter()
                    .map(FaultProxy::handle)
                    .collect::<Vec<_>>(),
            );
            let spec = ClientSpec {
                client: u32::try_from(c + 1)?,
                seeds: own.iter().map(|(_, a)| a.clone()).collect(),
                node_addresses: own,
                brokers: broker.brokers(),
                database_url: pg.url(),
                keyspaces: specs.clone(),
                tasks: options.tasks,
                keys: options.keys,
                value_size: options.value_size,
            };
            let log = logs.path().join(format!("client-{}.log", c + 1));
            clients.push(ClientProcess::spawn(&spec, &log, TIMEOUT).await?);
        }

        let wb_keyspaces: Vec<String> = keyspaces
            .iter()
            .filter(|(_, s)| *s == Strategy::WriteBack)
            .map(|(n, _)| n.clone())
            .collect();
        let group = "ringcache-chaos".to_owned();
        let worker = WorkerProcess::start_with(
            WorkerConfig {
                brokers: broker.brokers(),
                database_url: pg.url(),
                group: group.clone(),
                // The worker needs a keyspace even when write-back is not
                // tested; an idle topic costs nothing.
                keyspaces: if wb_keyspaces.is_empty() {
                    vec!["chaos_idle".into()]
                } else {
                    wb_keyspaces
                },
                cache_seeds: seeds,
            },
            worker_extra(false),
        )?;
        Ok(Cluster {
            pg,
            broker,
            configs,
            nodes,
            proxies: proxies.iter().map(FaultProxy::handle).collect(),
            _proxies: proxies,
            _client_proxies: client_proxies,
            client_proxies: all_client_proxies,
            clients,
            worker,
            groups: vec![group],
            client,
            store,
            keyspaces,
            switched: false,
            _logs: logs,
        })
    }

    async fn stop(mut self) {
        // Closing their stdin ends the clients; `kill_on_drop` is the net.
        self.clients.clear();
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
    ) -> Result<(super::CheckResult, History)> {
        if self.switched {
            self.switch_write_through(Strategy::WriteThrough).await?;
            self.switched = false;
        }
        let recorder = Recorder::new();
        let origin_unix_ns = unix_now_ns();
        for client in &mut self.clients {
            client
                .command(&Command::Phase {
                    index: phase.index,
                    seed: phase.seed,
                    origin_unix_ns,
                    length: options.phase,
                    fault: phase.fault.name().to_owned(),
                })
                .await?;
        }

        let mut progress = Progress::new(options.progress, phase, options.phase);
        let quarter = options.phase / 4;
        self.wait_until(&mut progress, quarter).await;
        let injected = self.inject(phase).await;
        if phase.fault == FaultKind::StrategySwitch && injected.is_ok() {
            self.wait_until(&mut progress, quarter * 2).await;
            // And back to write-through, under load.
            self.switch_write_through(Strategy::WriteThrough).await?;
        }
        self.wait_until(&mut progress, quarter * 3).await;
        let healed = self.heal(phase).await;
        self.wait_until(&mut progress, options.phase).await;
        progress.done();
        let mut ops = Vec::new();
        for client in &mut self.clients {
            client.command(&Command::Stop).await?;
        }
        for client in &mut self.clients {
            loop {
                match tokio::time::timeout(TIMEOUT, client.next_event()).await {
                    Ok(Ok(Event::Op { op })) => ops.push(op),
                    Ok(Ok(Event::Done)) => break,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e),
                    Err(_) => bail!("client {} did not stop within {TIMEOUT:?}", client.client),
                }
            }
        }
        injected.with_context(|| format!("injecting {}", phase.fault))?;
        healed.with_context(|| format!("healing {}", phase.fault))?;

        // One id space, in start order.
        ops.sort_by_key(|op| (op.start, op.client, op.id));
        for (id, op) in ops.iter_mut().enumerate() {
            op.id = id as u64;
        }
        let history = History::from_ops(ops);
        if let Some(dir) = std::env::var_os("RINGCACHE_CHAOS_HISTORY_DIR") {
            let path = std::path::Path::new(&dir).join(format!("phase-{}.json", phase.index + 1));
            std::fs::write(&path, serde_json::to_string(&history)?)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        self.quiesce().await?;
        let observed_at = recorder.elapsed();
        let final_state = self.final_state(&history, observed_at).await?;
        Ok((check(&history, &final_state, config), history))
    }

    /// Waits until `at` into the phase, drawing the progress bar with the
    /// clients' counts.
    async fn wait_until(&mut self, progress: &mut Progress<'_>, at: Duration) {
        loop {
            let (mut ops, mut errors) = (0, 0);
            for client in &mut self.clients {
                let (o, e) = client.progress();
                ops += o;
                errors += e;
            }
            progress.draw(ops, errors);
            let Some(left) = at.checked_sub(progress.started.elapsed()) else {
                return;
            };
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left.min(Duration::from_millis(500))).await;
        }
    }

    /// Switches every write-through keyspace (by its defined strategy) to
    /// `strategy`, in every client and the runner's.
    async fn switch_write_through(&mut self, strategy: Strategy) -> Result<()> {
        let names: Vec<String> = self
            .keyspaces
            .iter()
            .filter(|(_, s)| *s == Strategy::WriteThrough)
            .map(|(n, _)| n.clone())
            .collect();
        for name in &names {
            self.client.set_strategy(name, strategy)?;
            for client in &mut self.clients {
                client
                    .command(&Command::Switch {
                        keyspace: name.clone(),
                        strategy: strategy.to_string(),
                    })
                    .await?;
            }
            for client in &mut self.clients {
                loop {
                    match tokio::time::timeout(TIMEOUT, client.next_event()).await {
                        Ok(Ok(Event::Ack)) => break,
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(e),
                        Err(_) => bail!("client {} did not switch {name}", client.client),
                    }
                }
            }
        }
        Ok(())
    }

    /// The proxies between every client (the runner's and the worker's
    /// included) and node `node`.
    fn proxies_of(&self, node: usize) -> Vec<ProxyHandle> {
        std::iter::once(self.proxies[node].clone())
            .chain(self.client_proxies.iter().map(|own| own[node].clone()))
            .collect()
    }

    async fn inject(&mut self, phase: &Phase) -> Result<()> {
        let victim = phase.victim;
        match phase.fault {
            FaultKind::None | FaultKind::Poison | FaultKind::RacingWriters => {}
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
            FaultKind::Partition => {
                for proxy in self.proxies_of(victim) {
                    proxy.set(Fault::blackhole()).await?;
                }
            }
            FaultKind::Latency => {
                for proxy in self.proxies_of(victim) {
                    proxy.set(Fault::latency(LATENCY)).await?;
                }
            }
            FaultKind::AsymmetricPartition => {
                self.client_proxies[phase.victim_client][victim]
                    .set(Fault::blackhole())
                    .await?;
            }
            FaultKind::BrokerRestart => {
                self.broker.sigkill()?;
            }
            FaultKind::PostgresRestart => {
                let pg = &mut self.pg;
                tokio::task::block_in_place(|| pg.stop_fast())?;
            }
            FaultKind::DbStall => self.pg.signal_all(Signal::SIGSTOP)?,
            FaultKind::WorkerKill => {
                self.worker.sigkill()?;
            }
            FaultKind::ClientPause => self.clients[phase.victim_client].signal(Signal::SIGSTOP)?,
            // Killed rather than stopped: a worker frozen past its session
            // timeout may be stranded by tansu's group coordinator (see
            // `restart_worker_in_a_new_group`).
            FaultKind::DirtyBudget => self.worker.sigkill()?,
            FaultKind::StrategySwitch => {
                self.switched = true;
                self.switch_write_through(Strategy::CacheAside).await?;
            }
            FaultKind::WorkerKillAfterCommit => {
                self.worker.sigkill()?;
                self.restart_worker_in_a_new_group(true).await?;
            }
        }
        Ok(())
    }

    async fn heal(&mut self, phase: &Phase) -> Result<()> {
        let victim = phase.victim;
        match phase.fault {
            FaultKind::None | FaultKind::Poison | FaultKind::RacingWriters => {}
            FaultKind::NodeKill => {
                self.nodes[victim] = None;
                self.nodes[victim] = Some(NodeProcess::start(self.configs[victim].clone()).await?);
            }
            FaultKind::NodePause => {
                if let Some(node) = &mut self.nodes[victim] {
                    node.sigcont()?;
                }
            }
            FaultKind::Partition | FaultKind::Latency => {
                for proxy in self.proxies_of(victim) {
                    proxy.heal().await?;
                }
            }
            FaultKind::AsymmetricPartition => {
                self.client_proxies[phase.victim_client][victim]
                    .heal()
                    .await?;
            }
            FaultKind::BrokerRestart => self.broker.restart(TIMEOUT).await?,
            FaultKind::PostgresRestart => {
                let pg = &mut self.pg;
                tokio::task::block_in_place(|| pg.start_again())?;
            }
            FaultKind::DbStall => self.pg.signal_all(Signal::SIGCONT)?,
            FaultKind::WorkerKill => self.restart_worker_in_a_new_group(false).await?,
            FaultKind::ClientPause => self.clients[phase.victim_client].signal(Signal::SIGCONT)?,
            FaultKind::DirtyBudget => self.restart_worker_in_a_new_group(false).await?,
            // Away from write-through again, until the next phase.
            FaultKind::StrategySwitch => {
                self.switch_write_through(Strategy::WriteAround).await?;
            }
            FaultKind::WorkerKillAfterCommit => {
                // It may have exited at its fault point already.
                if self.worker.try_exit_status()?.is_none() {
                    self.worker.sigkill()?;
                }
                self.restart_worker_in_a_new_group(false).await?;
            }
        }
        Ok(())
    }

    /// Starts the worker again, as a member of a new consumer group whose
    /// offsets in PostgreSQL are the old group's: it resumes exactly where
    /// the old one stopped (the worker seeks to the stored offsets), without
    /// rejoining the old group. tansu 0.6's group coordinator may never
    /// hand a dead member's partitions to anyone when that member led the
    /// group (a single worker always does); Apache Kafka would. With
    /// `fault_point`, it exits between its first commit and `MarkClean`.
    async fn restart_worker_in_a_new_group(&mut self, fault_point: bool) -> Result<()> {
        self.worker.wait_exit(TIMEOUT).await?;
        let old = self.worker.config().clone();
        let group = format!("ringcache-chaos-{}", self.groups.len());
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
        self.groups.push(group.clone());
        self.worker =
            WorkerProcess::start_with(WorkerConfig { group, ..old }, worker_extra(fault_point))?;
        Ok(())
    }

    /// Waits until the worker consumed every write-back record (its stored
    /// offsets reach the topics' ends), waits out the write-through bounds
    /// (twice `pending_timeout`), recovers in-doubt write-through
    /// transactions, and waits a while for dirty entries to be marked
    /// clean.
    async fn quiesce(&mut self) -> Result<()> {
        let brokers = self.broker.brokers();
        let topics: Vec<String> = self
            .keyspaces
            .iter()
            .filter(|(_, s)| *s == Strategy::WriteBack)
            .map(|(n, _)| writeback::topic_for(n))
            .collect();
        let ends = tokio::task::spawn_blocking(move || topic_ends(&brokers, &topics))
            .await
            .context("reading the topics' ends panicked")??;
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let group = self.worker.config().group.clone();
            let stored: Vec<(String, i32, i64)> = sqlx::query_as(
                "SELECT topic, kafka_partition, next_offset FROM ringcache_wb_offsets \
                 WHERE consumer_group = $1",
            )
            .bind(&group)
            .fetch_all(self.store.pool())
            .await
            .unwrap_or_default();
            let stored: HashMap<(String, i32), i64> =
                stored.into_iter().map(|(t, p, o)| ((t, p), o)).collect();
            let behind = ends
                .iter()
                .any(|(tp, end)| *end > 0 && stored.get(tp).copied().unwrap_or(0) < *end);
            if !behind {
                break;
            }
            self.worker.ensure_running()?;
            if Instant::now() >= deadline {
                // The checker reports what is missing.
                break;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        // The contract's time for an abandoned prepare: a node drops a
        // pending change after `pending_timeout`, and recovery rolls back a
        // transaction prepared more than twice that long ago. Not a
        // stand-in for synchronisation.
        tokio::time::sleep(PENDING_TIMEOUT * 2 + Duration::from_millis(500)).await;
        self.client
            .recover_in_doubt()
            .await
            .context("recovering in-doubt write-through transactions")?;
        // Dirty entries: `MarkClean` follows the commit; the repair round
        // catches a lost one within its interval.
        let deadline = Instant::now() + DIRTY_WAIT;
        while Instant::now() < deadline && !self.dirty_entries().await?.is_empty() {
            tokio::time::sleep(POLL_EVERY * 5).await;
        }
        Ok(())
    }

    /// Direct connections to every node (not through the proxies).
    async fn direct(
        &self,
    ) -> Result<
        Vec<(
            String,
            v1::cache_node_client::CacheNodeClient<tonic::transport::Channel>,
        )>,
    > {
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
        Ok(nodes)
    }

    /// Every dirty entry of the write-back keyspaces, per node:
    /// `(keyspace, key, node, version)`.
    async fn dirty_entries(&self) -> Result<Vec<(String, String, String, u64)>> {
        let mut out = Vec::new();
        for (id, mut node) in self.direct().await? {
            for (keyspace, strategy) in &self.keyspaces {
                if *strategy != Strategy::WriteBack {
                    continue;
                }
                let mut after = Bytes::new();
                loop {
                    let reply = node
                        .list_dirty(v1::ListDirtyRequest {
                            keyspace: keyspace.clone(),
                            min_age_ms: 0,
                            after_key: after.clone(),
                            limit: 0,
                        })
                        .await
                        .with_context(|| format!("listing dirty entries of {keyspace} on {id}"))?
                        .into_inner();
                    for key in &reply.keys {
                        out.push((
                            keyspace.clone(),
                            String::from_utf8_lossy(&key.key).into_owned(),
                            id.clone(),
                            key.version,
                        ));
                    }
                    match reply.keys.last() {
                        Some(last) if reply.more => after = last.key.clone(),
                        _ => break,
                    }
                }
            }
        }
        Ok(out)
    }

    /// Every key of the history: its row in PostgreSQL, its dead letters,
    /// prepared transactions, and what each node caches and holds dirty
    /// (read directly, not through the proxies).
    async fn final_state(&self, history: &History, observed_at: Duration) -> Result<FinalState> {
        let keys: BTreeSet<(&str, &str)> = history
            .ops
            .iter()
            .map(|op| (op.keyspace.as_str(), op.key.as_str()))
            .collect();
        let mut dirty: HashMap<(String, String), Vec<DirtyObservation>> = HashMap::new();
        for (keyspace, key, source, version) in self.dirty_entries().await? {
            dirty
                .entry((keyspace, key))
                .or_default()
                .push(DirtyObservation { source, version });
        }
        let mut dead: HashMap<(String, String), Vec<StoredRow>> = HashMap::new();
        for group in &self.groups {
            let topic = crate::dead_letter_topic(group);
            for record in crate::write_back::read_topic(&self.broker.brokers(), &topic).await? {
                let Some(key) = &record.key else { continue };
                let headers = record
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_deref()));
                let Ok(decoded) = writeback::decode(key, record.value.as_deref(), headers) else {
                    continue;
                };
                dead.entry((
                    decoded.keyspace.clone(),
                    String::from_utf8_lossy(&decoded.key).into_owned(),
                ))
                .or_default()
                .push(StoredRow {
                    version: decoded.version,
                    value: decoded.value.as_deref().map(Digest::of),
                });
            }
        }
        let prepared_rows: Vec<(String, Option<String>, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT p.gid, t.keyspace, t.key FROM pg_prepared_xacts p \
             LEFT JOIN ringcache_2pc t ON t.gid = p.gid",
        )
        .fetch_all(self.store.pool())
        .await
        .context("listing prepared transactions")?;
        let mut prepared: HashMap<(String, String), Vec<String>> = HashMap::new();
        let mut prepared_elsewhere = Vec::new();
        for (gid, keyspace, key) in prepared_rows {
            match (keyspace, key) {
                (Some(keyspace), Some(key))
                    if keys.contains(&(keyspace.as_str(), &*String::from_utf8_lossy(&key))) =>
                {
                    prepared
                        .entry((keyspace, String::from_utf8_lossy(&key).into_owned()))
                        .or_default()
                        .push(gid);
                }
                // Another phase's key: that phase reported it.
                (Some(_), Some(_)) => {}
                _ => prepared_elsewhere.push(gid),
            }
        }

        let mut nodes = self.direct().await?;
        let mut out = Vec::new();
        for (keyspace, key) in keys {
            let strategy = self
                .client
                .keyspace_settings(keyspace)
                .map_or(Strategy::CacheAside, |s| s.strategy);
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
            // Only the key's owners: a copy a fallback node took while an
            // owner was down is read by no one once the owners are back,
            // and expires within `fallback_ttl` (`docs/failover.md`).
            let owners = self.client.owners(keyspace, key.as_bytes());
            let mut cache = Vec::new();
            for (id, client) in &mut nodes {
                if !owners.contains(id) {
                    continue;
                }
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
            let at = (keyspace.to_owned(), key.to_owned());
            out.push(FinalKey {
                keyspace: keyspace.to_owned(),
                key: key.to_owned(),
                strategy,
                db,
                cache,
                dead_letters: dead.remove(&at).unwrap_or_default(),
                dirty: dirty.remove(&at).unwrap_or_default(),
                prepared: prepared.remove(&at).unwrap_or_default(),
            });
        }
        Ok(FinalState {
            observed_at,
            keys: out,
            prepared_elsewhere,
        })
    }
}

/// The worker's extra flags: a short repair interval, and with
/// `fault_point`, the fault point that exits after a commit.
fn worker_extra(fault_point: bool) -> WorkerExtra {
    WorkerExtra {
        args: vec![
            "--dirty-repair-interval".into(),
            DIRTY_REPAIR_INTERVAL.into(),
        ],
        env: if fault_point {
            vec![(
                write_back_worker::fault::FAULT_VARIABLE.into(),
                "exit-after-commit".into(),
            )]
        } else {
            Vec::new()
        },
    }
}

/// The high watermark of every partition of `topics`. Blocking.
fn topic_ends(brokers: &str, topics: &[String]) -> Result<BTreeMap<(String, i32), i64>> {
    use rdkafka::{
        ClientConfig,
        consumer::{BaseConsumer, Consumer},
    };
    const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "ringcache-chaos-ends")
        .set("enable.auto.commit", "false")
        .create()
        .context("failed to create a watermark reader")?;
    let mut ends = BTreeMap::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic.as_str()), KAFKA_TIMEOUT)
            .with_context(|| format!("failed to read the metadata of {topic}"))?;
        for meta in metadata.topics().iter().filter(|t| t.name() == topic) {
            for partition in meta.partitions() {
                let (_, high) = consumer
                    .fetch_watermarks(topic, partition.id(), KAFKA_TIMEOUT)
                    .with_context(|| format!("failed to read the watermarks of {topic}"))?;
                ends.insert((topic.clone(), partition.id()), high);
            }
        }
    }
    Ok(ends)
}

/// The progress bar of a phase, drawn on stderr when it is a terminal.
struct Progress<'a> {
    enabled: bool,
    phase: &'a Phase,
    length: Duration,
    started: Instant,
}

impl<'a> Progress<'a> {
    fn new(enabled: bool, phase: &'a Phase, length: Duration) -> Progress<'a> {
        use std::io::IsTerminal;
        Progress {
            enabled: enabled && std::io::stderr().is_terminal(),
            phase,
            length,
            started: Instant::now(),
        }
    }

    fn draw(&self, ops: u64, errors: u64) {
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
            "\rphase {}/{} {:<24} [{bar}] {:>5.1}s  ops {:>7}  errors {:>5}",
            self.phase.index + 1,
            self.phase.total,
            self.phase.fault.name(),
            done.as_secs_f64(),
            ops,
            errors,
        );
    }

    fn done(&self) {
        if self.enabled {
            eprintln!("  quiescing and checking");
        } else {
            // Not a terminal: one line per phase.
            eprintln!(
                "phase {}/{} {} done; quiescing and checking",
                self.phase.index + 1,
                self.phase.total,
                self.phase.fault.name()
            );
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
    fn the_many_writer_run_has_replicated_keyspaces_of_both_quorums() {
        let names: Vec<(String, usize, usize)> = Options::default()
            .keyspaces()
            .into_iter()
            .map(|k| (k.name, k.replicas, k.write_quorum))
            .collect();
        for expected in [
            ("chaos_write_through_r2q1", 2, 1),
            ("chaos_write_through_r2q2", 2, 2),
            ("chaos_write_back_r2q1", 2, 1),
            ("chaos_write_back_r2q2", 2, 2),
            ("chaos_cache_aside", 1, 1),
        ] {
            assert!(
                names.contains(&(expected.0.to_owned(), expected.1, expected.2)),
                "{names:?}"
            );
        }
        assert_eq!(Options::single_writer().keyspaces().len(), 5);
    }

    #[test]
    fn read_your_writes_is_relaxed_only_by_faults_that_cut_nodes() {
        assert_eq!(
            bounds(FaultKind::DirtyBudget, Duration::from_secs(12)).read_your_writes_bound(),
            Duration::ZERO
        );
        assert_eq!(
            bounds(FaultKind::NodeKill, Duration::from_secs(12)).read_your_writes_bound(),
            bounds(FaultKind::NodeKill, Duration::from_secs(12)).bound(Strategy::WriteBack)
        );
    }
}

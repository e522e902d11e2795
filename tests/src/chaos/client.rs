//! The chaos run's client processes: each its own `cache_client::Client`
//! (its own clock, health view and connections, through proxies of its own),
//! driven by the runner over stdin and answering over stdout, one JSON
//! object a line.
//!
//! - The runner ([`ClientProcess::spawn`]) starts `chaos client` and sends
//!   a [`ClientSpec`] line, then [`Command`]s: a phase's start, its stop,
//!   a strategy switch.
//! - The client ([`serve`]) answers with [`Event`]s: ready, progress
//!   counts, every operation of a phase (recorded on the run's clock, see
//!   [`since_unix_origin`]) and done, or an acknowledgement.
//!
//! The workload of a phase (`Workload`): per keyspace and task, reads (50 %),
//! writes of a distinct value (40 %) and deletes (10 %) of random keys of
//! the phase. Under some faults, during the fault's window (`P/4` to
//! `3P/4`), it does more: poison values (`Poison`), four times the keys of
//! write-back keyspaces (`DirtyBudget`), and racing writes of shared keys
//! at one wall-clock instant from every client (`RacingWriters`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cache_client::{
    Client, ClientConfig,
    producer::WriteBackConfig,
    store::PgStore,
    strategy::{KeyspaceSettings, Strategy},
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::faults::FaultKind;
use super::history::{Op, Recorder, Subject, since_unix_origin, unix_now_ns};

/// The client's per-request timeout: a paused or blackholed node costs this
/// much per call before the client routes around it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// The client's overall deadline per call.
pub const DEADLINE: Duration = Duration::from_secs(3);
/// Every poison value starts with this; the chaos table's CHECK constraint
/// refuses it.
pub const POISON_PREFIX: &str = "poison";
/// Racing writes happen at every multiple of this on the wall clock.
const RACE_EVERY: Duration = Duration::from_millis(25);
/// Shared keys racing writes go to, per keyspace and phase.
const RACE_KEYS: u64 = 4;

/// A keyspace as the clients define it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyspaceSpec {
    /// Its name.
    pub name: String,
    /// Its strategy's name (`write-back`).
    pub strategy: String,
    /// Copies of each key.
    pub replicas: usize,
    /// Copies a write must reach.
    pub write_quorum: usize,
    /// TTL of cached values; `None`: none (kept until replaced or evicted).
    #[serde(with = "nanos_opt")]
    pub ttl: Option<Duration>,
    /// Write-through `pending_timeout`.
    #[serde(with = "super::history::nanos")]
    pub pending_timeout: Duration,
}

impl KeyspaceSpec {
    /// The strategy.
    ///
    /// # Errors
    /// An unknown name.
    pub fn strategy(&self) -> Result<Strategy> {
        parse_strategy(&self.strategy)
    }
}

/// An `Option<Duration>` as integer nanoseconds or null.
mod nanos_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_nanos))
    }
}

/// A strategy by its name.
///
/// # Errors
/// An unknown name.
pub fn parse_strategy(name: &str) -> Result<Strategy> {
    super::STRATEGIES
        .into_iter()
        .find(|s| s.to_string() == name)
        .with_context(|| format!("unknown strategy {name:?}"))
}

/// What a client process is told at start.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientSpec {
    /// Its number, from 1.
    pub client: u32,
    /// The node addresses it bootstraps from (its own proxies).
    pub seeds: Vec<String>,
    /// Per node id, the address it dials (its own proxy of that node).
    pub node_addresses: Vec<(String, String)>,
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// The PostgreSQL store.
    pub database_url: String,
    /// The keyspaces.
    pub keyspaces: Vec<KeyspaceSpec>,
    /// Workload tasks per keyspace.
    pub tasks: usize,
    /// Keys per keyspace and phase.
    pub keys: usize,
    /// Bytes per written value.
    pub value_size: usize,
}

/// What the runner tells a client.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "command")]
pub enum Command {
    /// Start a phase's workload.
    Phase {
        /// The phase's number: its keys are `p<index>-…`.
        index: usize,
        /// The phase's seed.
        seed: u64,
        /// The run clock's origin: nanoseconds since the Unix epoch.
        origin_unix_ns: u64,
        /// The phase's length.
        #[serde(with = "super::history::nanos")]
        length: Duration,
        /// The phase's fault's name.
        fault: String,
    },
    /// Stop the phase's workload and send its operations.
    Stop,
    /// Switch a keyspace's strategy.
    Switch {
        /// The keyspace.
        keyspace: String,
        /// The new strategy's name.
        strategy: String,
    },
}

/// What a client tells the runner.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "event")]
pub enum Event {
    /// Connected, keyspaces defined.
    Ready,
    /// Operations and errors so far in the phase.
    Progress {
        /// Operations finished.
        ops: u64,
        /// Of which failed.
        errors: u64,
    },
    /// One operation of the phase.
    Op {
        /// The operation.
        op: Op,
    },
    /// Every operation of the phase was sent.
    Done,
    /// A switch was applied.
    Ack,
    /// The client cannot go on.
    Failed {
        /// Why.
        message: String,
    },
}

/// The `chaos` binary, next to the running executable (the chaos binary
/// itself, or a test of `target/<profile>/deps/`).
///
/// # Errors
/// When it is not there: build it with `cargo build --bins`.
pub fn chaos_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("failed to locate the running executable")?;
    if exe.file_stem().is_some_and(|stem| stem == "chaos") {
        return Ok(exe);
    }
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("chaos"))
        .find(|candidate| candidate.is_file())
        .context("the chaos binary is not next to this executable: build it with `cargo build --bins` (`cargo xtask test` does)")
}

/// A running client process, as the runner sees it.
pub struct ClientProcess {
    /// Its number, from 1.
    pub client: u32,
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    events: mpsc::UnboundedReceiver<Event>,
    /// Events other than progress, taken while reading progress.
    pending: std::collections::VecDeque<Event>,
    /// The latest progress counts.
    counts: (u64, u64),
    log: PathBuf,
}

impl ClientProcess {
    /// Starts `chaos client` with `spec`, its stderr to `log`, and waits
    /// until it is ready.
    ///
    /// # Errors
    /// When it cannot be started or fails before it is ready.
    pub async fn spawn(spec: &ClientSpec, log: &Path, timeout: Duration) -> Result<ClientProcess> {
        let binary = chaos_binary()?;
        let stderr = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut child = tokio::process::Command::new(&binary)
            .arg("client")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} client", binary.display()))?;
        let stdin = child.stdin.take().context("the client's stdin")?;
        let stdout = child.stdout.take().context("the client's stdout")?;
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            loop {
                let event = match lines.next_line().await {
                    Ok(Some(line)) => {
                        serde_json::from_str(&line).unwrap_or_else(|e| Event::Failed {
                            message: format!("unreadable event {line:?}: {e}"),
                        })
                    }
                    Ok(None) => Event::Failed {
                        message: "the client process exited".into(),
                    },
                    Err(e) => Event::Failed {
                        message: format!("cannot read the client's stdout: {e}"),
                    },
                };
                let last = matches!(event, Event::Failed { .. });
                if tx.send(event).is_err() || last {
                    return;
                }
            }
        });
        let mut process = ClientProcess {
            client: spec.client,
            child,
            stdin,
            events,
            pending: std::collections::VecDeque::new(),
            counts: (0, 0),
            log: log.to_owned(),
        };
        process.send(&serde_json::to_value(spec)?).await?;
        let ready = tokio::time::timeout(timeout, process.next_event()).await;
        match ready {
            Ok(Ok(Event::Ready)) => Ok(process),
            Ok(Ok(other)) => bail!("client {} sent {other:?} instead of ready", spec.client),
            Ok(Err(e)) => Err(e),
            Err(_) => bail!("client {} was not ready within {timeout:?}", spec.client),
        }
    }

    async fn send(&mut self, value: &serde_json::Value) -> Result<()> {
        let mut line = serde_json::to_string(value)?;
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .with_context(|| format!("cannot write to client {}", self.client))?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// Sends `command` (it is read when the process runs).
    ///
    /// # Errors
    /// When the process is gone.
    pub async fn command(&mut self, command: &Command) -> Result<()> {
        if matches!(command, Command::Phase { .. }) {
            self.counts = (0, 0);
        }
        self.send(&serde_json::to_value(command)?).await
    }

    /// The next event.
    ///
    /// # Errors
    /// When the client failed or exited, with its log's tail.
    pub async fn next_event(&mut self) -> Result<Event> {
        let next = match self.pending.pop_front() {
            Some(event) => Some(event),
            None => self.events.recv().await,
        };
        let message = match next {
            Some(Event::Failed { message }) => message,
            None => "its events ended".to_owned(),
            Some(event) => return Ok(event),
        };
        bail!(
            "client {} failed: {message}; log tail:\n{}",
            self.client,
            self.log_tail(40)
        )
    }

    /// The latest operation and error counts of the phase, without
    /// waiting.
    pub fn progress(&mut self) -> (u64, u64) {
        while let Ok(event) = self.events.try_recv() {
            match event {
                Event::Progress { ops, errors } => self.counts = (ops, errors),
                other => self.pending.push_back(other),
            }
        }
        self.counts
    }

    /// The process id, for SIGSTOP and SIGCONT.
    pub fn pid(&self) -> Option<nix::unistd::Pid> {
        self.child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(nix::unistd::Pid::from_raw)
    }

    /// Sends `signal` to the process.
    ///
    /// # Errors
    /// When it cannot be signalled.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> Result<()> {
        let pid = self.pid().context("the client process is gone")?;
        nix::sys::signal::kill(pid, signal)
            .with_context(|| format!("cannot send {signal} to client {}", self.client))
    }

    /// The last `lines` lines of its stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// `chaos client`: reads a [`ClientSpec`] and then [`Command`]s from stdin,
/// writes [`Event`]s to stdout, until stdin closes.
///
/// # Errors
/// When the client cannot connect or a command cannot be carried out.
pub async fn serve() -> Result<()> {
    // std's stdin and stdout on threads of their own (the workspace's tokio
    // has no `io-std`): lines in, events out.
    let (out, mut queued) = mpsc::unbounded_channel::<Event>();
    let writer = std::thread::spawn(move || {
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        while let Some(event) = queued.blocking_recv() {
            let line = serde_json::to_string(&event).unwrap_or_default();
            if writeln!(stdout, "{line}")
                .and_then(|()| stdout.flush())
                .is_err()
            {
                return;
            }
        }
    });
    let (line_tx, lines) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { return };
            if line_tx.send(line).is_err() {
                return;
            }
        }
    });
    let result = serve_inner(&out, lines).await;
    if let Err(e) = &result {
        let _ = out.send(Event::Failed {
            message: format!("{e:#}"),
        });
    }
    drop(out);
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    result
}

async fn serve_inner(
    out: &mpsc::UnboundedSender<Event>,
    mut lines: mpsc::UnboundedReceiver<String>,
) -> Result<()> {
    let spec: ClientSpec = match lines.recv().await {
        Some(line) => serde_json::from_str(&line).context("the client spec")?,
        None => return Ok(()),
    };
    let mut config = ClientConfig::new(spec.seeds.clone())
        .with_request_timeout(REQUEST_TIMEOUT)
        .with_deadline(DEADLINE);
    for (node, address) in &spec.node_addresses {
        config = config.with_node_address(node, address);
    }
    // Every client process is a writer of its own: a distinct writer id
    // makes two processes' versions of one key differ even in one
    // millisecond.
    config = config.with_writer_id(u16::try_from(spec.client).context("the client's writer id")?);
    let client = Client::connect(config).await?;
    let mut wb = WriteBackConfig::new(spec.brokers.clone());
    wb.delivery_timeout = DEADLINE;
    // tansu 0.6 panics (and stops serving) when an idempotent producer
    // of before a restart produces again after it; versions make the
    // duplicates a plain producer may send harmless.
    wb.idempotent = false;
    client.enable_write_back(wb)?;
    let store = Arc::new(
        PgStore::connect(&spec.database_url)
            .await
            .context("cannot connect to the run's PostgreSQL")?,
    );
    for keyspace in &spec.keyspaces {
        let mut settings = KeyspaceSettings::new(keyspace.strategy()?)
            .with_replication(keyspace.replicas, keyspace.write_quorum);
        settings.ttl = keyspace.ttl;
        settings.pending_timeout = keyspace.pending_timeout;
        client.define_keyspace(&keyspace.name, settings, Some(store.clone()))?;
    }
    let _ = out.send(Event::Ready);

    let mut running: Option<(CancellationToken, tokio::task::JoinSet<()>, Recorder)> = None;
    while let Some(line) = lines.recv().await {
        let command: Command = serde_json::from_str(&line).context("a command")?;
        match command {
            Command::Phase {
                index,
                seed,
                origin_unix_ns,
                length,
                fault,
            } => {
                let fault: FaultKind = fault.parse().map_err(anyhow::Error::msg)?;
                let recorder = Recorder::for_client(spec.client, since_unix_origin(origin_unix_ns));
                let stop = CancellationToken::new();
                let counts = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
                let mut tasks = tokio::task::JoinSet::new();
                let window = (length / 4, length * 3 / 4);
                for (k, keyspace) in spec.keyspaces.iter().enumerate() {
                    for t in 0..spec.tasks {
                        let task = u32::try_from(k * spec.tasks + t)?;
                        let workload = Workload {
                            client: client.clone(),
                            recorder: recorder.clone(),
                            keyspace: keyspace.name.clone(),
                            client_id: spec.client,
                            task,
                            phase: index,
                            keys: spec.keys,
                            value_size: spec.value_size,
                            rng: StdRng::seed_from_u64(
                                seed ^ (u64::from(spec.client) << 32) ^ u64::from(task),
                            ),
                            counts: counts.clone(),
                            fault,
                            window,
                        };
                        tasks.spawn(workload.run(stop.clone()));
                    }
                    if fault == FaultKind::RacingWriters {
                        let race = Race {
                            client: client.clone(),
                            recorder: recorder.clone(),
                            keyspace: keyspace.name.clone(),
                            client_id: spec.client,
                            task: u32::try_from(10_000 + k)?,
                            phase: index,
                            window,
                        };
                        tasks.spawn(race.run(stop.clone()));
                    }
                }
                let progress = out.clone();
                let ticker_stop = stop.clone();
                tasks.spawn(async move {
                    loop {
                        tokio::select! {
                            () = ticker_stop.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                        let _ = progress.send(Event::Progress {
                            ops: counts.0.load(Ordering::Relaxed),
                            errors: counts.1.load(Ordering::Relaxed),
                        });
                    }
                });
                running = Some((stop, tasks, recorder));
            }
            Command::Stop => {
                if let Some((stop, mut tasks, recorder)) = running.take() {
                    stop.cancel();
                    while tasks.join_next().await.is_some() {}
                    for op in recorder.history().ops {
                        let _ = out.send(Event::Op { op });
                    }
                }
                let _ = out.send(Event::Done);
            }
            Command::Switch { keyspace, strategy } => {
                client.set_strategy(&keyspace, parse_strategy(&strategy)?)?;
                let _ = out.send(Event::Ack);
            }
        }
    }
    Ok(())
}

/// One workload task's loop: reads, writes and deletes of random keys.
struct Workload {
    client: Client,
    recorder: Recorder,
    keyspace: String,
    client_id: u32,
    task: u32,
    phase: usize,
    keys: usize,
    value_size: usize,
    rng: StdRng,
    counts: Arc<(AtomicU64, AtomicU64)>,
    fault: FaultKind,
    /// When the phase's fault is on, on the phase's clock.
    window: (Duration, Duration),
}

impl Workload {
    async fn run(mut self, stop: CancellationToken) {
        let keyspace = self.client.keyspace(&self.keyspace);
        let mut seq = 0u64;
        while !stop.is_cancelled() {
            // The strategy the keyspace runs now (it may be switched live).
            let strategy = self
                .client
                .keyspace_settings(&self.keyspace)
                .map_or(Strategy::CacheAside, |s| s.strategy);
            let now = self.recorder.elapsed();
            let in_window = now >= self.window.0 && now < self.window.1;
            let keys = if in_window
                && self.fault == FaultKind::DirtyBudget
                && strategy == Strategy::WriteBack
            {
                self.keys * 4
            } else {
                self.keys
            };
            let key = format!("p{}-{}", self.phase, self.rng.random_range(0..keys));
            let subject = Subject {
                task: self.task,
                keyspace: &self.keyspace,
                strategy,
                key: &key,
            };
            let roll = self.rng.random_range(0..100);
            let poisoning = in_window
                && matches!(
                    self.fault,
                    FaultKind::Poison | FaultKind::WorkerKillAfterCommit
                );
            let ok = if poisoning && roll >= 90 {
                // A pair on a key of its own that nothing writes after the
                // window: an acknowledged value, then a poison one, so that
                // what the store, the dead-letter topic and the caches hold
                // for them is still there at quiescence.
                seq += 1;
                let key = format!(
                    "p{}-px-c{}-{}",
                    self.phase,
                    self.client_id,
                    self.rng.random_range(0..4)
                );
                let subject = Subject {
                    task: self.task,
                    keyspace: &self.keyspace,
                    strategy,
                    key: &key,
                };
                let mut ok = true;
                for prefix in ["", POISON_PREFIX] {
                    let mut value =
                        format!("{prefix}c{}-t{}-{seq}-", self.client_id, self.task).into_bytes();
                    value.resize(self.value_size.max(value.len()), b'x');
                    let op = self.recorder.write(subject, &value);
                    let result = keyspace.put(&key, value).await;
                    ok &= result.is_ok();
                    op.write_result(&result);
                }
                ok
            } else if roll < 50 {
                let op = self.recorder.read(subject);
                let result = keyspace.get(&key).await;
                let ok = result.is_ok();
                op.read_result(&result);
                ok
            } else if roll < 90 {
                seq += 1;
                let poison = poisoning && roll >= 80;
                // Distinct per write, so that a read names the write it saw.
                let mut value = format!(
                    "{}c{}-t{}-{seq}-",
                    if poison { POISON_PREFIX } else { "" },
                    self.client_id,
                    self.task
                )
                .into_bytes();
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
            self.counts.0.fetch_add(1, Ordering::Relaxed);
            if !ok {
                self.counts.1.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Racing writes: during the fault's window, every client writes the same
/// shared key at each multiple of [`RACE_EVERY`] on the wall clock (which
/// the processes of one machine share), so that writes of several clients
/// fall in one millisecond; each is read back at once.
struct Race {
    client: Client,
    recorder: Recorder,
    keyspace: String,
    client_id: u32,
    task: u32,
    phase: usize,
    window: (Duration, Duration),
}

impl Race {
    async fn run(self, stop: CancellationToken) {
        let keyspace = self.client.keyspace(&self.keyspace);
        let every = u64::try_from(RACE_EVERY.as_nanos()).unwrap_or(u64::MAX);
        while !stop.is_cancelled() {
            let now = unix_now_ns();
            let slot = now / every + 1;
            // Pacing to the shared instant, not synchronisation with
            // anything this process waits for.
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_nanos(slot * every - now)) => {}
            }
            let at = self.recorder.elapsed();
            if at < self.window.0 || at >= self.window.1 {
                continue;
            }
            let strategy = self
                .client
                .keyspace_settings(&self.keyspace)
                .map_or(Strategy::CacheAside, |s| s.strategy);
            let key = format!("p{}-race-{}", self.phase, slot % RACE_KEYS);
            let subject = Subject {
                task: self.task,
                keyspace: &self.keyspace,
                strategy,
                key: &key,
            };
            let value = format!("race-c{}-{slot}", self.client_id).into_bytes();
            let op = self.recorder.write(subject, &value);
            let result = keyspace.put(&key, value).await;
            op.write_result(&result);
            let op = self.recorder.read(subject);
            let result = keyspace.get(&key).await;
            op.read_result(&result);
        }
    }
}

//! The driver: connects to the target, preloads, runs the workers through
//! warm-up and the measured phase, and merges what they recorded.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use cache_client::{Client, ClientConfig, SetOptions};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::time::Instant;

use super::{KeyChooser, KeyDistribution, Recorder, Schedule, Summary};

/// What the benchmark talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A ringcache cluster through `cache_client::Client`, from these seeds.
    Grpc {
        /// Seed addresses (`host:port`).
        seeds: Vec<String>,
        /// The keyspace the keys live in.
        keyspace: String,
    },
    /// Any RESP server, one connection per worker.
    Resp {
        /// `host:port`.
        addr: String,
    },
}

impl Target {
    /// Parses `grpc://host:port[,host:port...]` or `resp://host:port`.
    ///
    /// # Errors
    ///
    /// Fails on another scheme or an empty address.
    pub fn parse(target: &str, keyspace: &str) -> Result<Self> {
        if let Some(rest) = target.strip_prefix("grpc://") {
            let seeds: Vec<String> = rest
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            if seeds.is_empty() {
                bail!("target {target:?} names no seed address");
            }
            Ok(Self::Grpc {
                seeds,
                keyspace: keyspace.to_owned(),
            })
        } else if let Some(addr) = target.strip_prefix("resp://") {
            if addr.is_empty() || addr.contains(',') {
                bail!("target {target:?} must name one host:port");
            }
            Ok(Self::Resp {
                addr: addr.to_owned(),
            })
        } else {
            bail!("target {target:?} must start with grpc:// or resp://")
        }
    }
}

/// How requests are issued.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Each worker sends its next request when the previous one answered.
    Closed,
    /// Requests are due at `rate` per second whatever the server does;
    /// workers take the next due slot; latency counts from when it was due.
    Open {
        /// Offered operations per second.
        rate: f64,
    },
}

/// A benchmark run.
#[derive(Clone, Debug)]
pub struct Options {
    /// What to talk to.
    pub target: Target,
    /// Closed or open loop.
    pub mode: Mode,
    /// Concurrent workers (closed loop: clients; open loop: senders).
    pub clients: usize,
    /// Length of the measured phase.
    pub duration: Duration,
    /// Length of the warm-up before it, whose results are discarded.
    pub warmup: Duration,
    /// Number of distinct keys.
    pub keys: u64,
    /// How keys are drawn.
    pub distribution: KeyDistribution,
    /// Bytes per written value.
    pub value_size: usize,
    /// Fraction of operations that are reads (0.0 to 1.0).
    pub read_ratio: f64,
    /// Write every key once before the run.
    pub preload: bool,
    /// Seed of the workers' random choices.
    pub seed: u64,
}

impl Options {
    /// Options with defaults for everything but the target.
    pub fn new(target: Target) -> Self {
        Self {
            target,
            mode: Mode::Closed,
            clients: 4,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            keys: 10_000,
            distribution: KeyDistribution::Zipf { exponent: 0.99 },
            value_size: 100,
            read_ratio: 0.9,
            preload: true,
            seed: 1,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.clients == 0 {
            bail!("clients must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.read_ratio) {
            bail!("read ratio {} must be between 0.0 and 1.0", self.read_ratio);
        }
        if self.duration.is_zero() {
            bail!("duration must be positive");
        }
        Ok(())
    }
}

/// One worker's connection to the target.
enum Conn {
    Grpc {
        client: Client,
        keyspace: Arc<str>,
    },
    Resp {
        client: redis::Client,
        /// `None` once the server closed it (as it does after a protocol
        /// error): the next operation opens a new one, so that one refused
        /// request does not turn the rest of the run into errors.
        con: Option<redis::aio::MultiplexedConnection>,
    },
}

impl Conn {
    async fn get(&mut self, key: &str) -> Result<bool, String> {
        match self {
            Conn::Grpc { client, keyspace } => client
                .get(keyspace, key)
                .await
                .map(|entry| entry.is_some())
                .map_err(|e| e.to_string()),
            Conn::Resp { .. } => {
                let mut cmd = redis::cmd("GET");
                cmd.arg(key);
                self.resp::<Option<Vec<u8>>>(&cmd)
                    .await
                    .map(|value| value.is_some())
            }
        }
    }

    async fn set(&mut self, key: &str, value: &Bytes) -> Result<(), String> {
        match self {
            Conn::Grpc { client, keyspace } => client
                .set(keyspace, key, value.clone(), SetOptions::new())
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Conn::Resp { .. } => {
                let mut cmd = redis::cmd("SET");
                cmd.arg(key).arg(value.as_ref());
                self.resp::<()>(&cmd).await
            }
        }
    }

    /// Runs `cmd` on the RESP connection, reopening it first if it was lost.
    async fn resp<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Result<T, String> {
        let Conn::Resp { client, con } = self else {
            unreachable!("only called on RESP connections");
        };
        if con.is_none() {
            *con = Some(
                client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| format!("reconnect: {e}"))?,
            );
        }
        let connection = con.as_mut().expect("opened above when it was missing");
        cmd.query_async::<T>(connection).await.map_err(|e| {
            if e.is_connection_dropped() || e.is_unrecoverable_error() || e.is_io_error() {
                *con = None;
            }
            e.to_string()
        })
    }
}

/// Opens one connection per worker: gRPC workers share one client (it keeps
/// one HTTP/2 channel per node, as a service would); RESP workers each get
/// their own connection, as `redis-benchmark -c` does.
async fn connect(target: &Target, clients: usize) -> Result<Vec<Conn>> {
    match target {
        Target::Grpc { seeds, keyspace } => {
            let client = Client::connect(ClientConfig::new(seeds.iter().cloned()))
                .await
                .with_context(|| format!("failed to connect to the cluster at {seeds:?}"))?;
            let keyspace: Arc<str> = Arc::from(keyspace.as_str());
            Ok((0..clients)
                .map(|_| Conn::Grpc {
                    client: client.clone(),
                    keyspace: keyspace.clone(),
                })
                .collect())
        }
        Target::Resp { addr } => {
            let client = redis::Client::open(format!("redis://{addr}/"))
                .with_context(|| format!("invalid RESP address {addr}"))?;
            let mut conns = Vec::with_capacity(clients);
            for _ in 0..clients {
                // The redis error already names the cause; `with_context`
                // would print it twice (its source repeats it).
                let con = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| anyhow::anyhow!("failed to connect to {addr}: {e}"))?;
                conns.push(Conn::Resp {
                    client: client.clone(),
                    con: Some(con),
                });
            }
            Ok(conns)
        }
    }
}

/// The shared plan every worker follows.
struct Plan {
    chooser: KeyChooser,
    value: Bytes,
    read_ratio: f64,
    /// When the run (warm-up included) started.
    start: Instant,
    /// When measuring starts: operations begun (closed) or due (open)
    /// earlier are discarded.
    measure_from: Instant,
    /// When the run ends: no operation starts (closed) or is due (open) later.
    end: Instant,
    /// Open loop: when workers stop taking slots even if some are still due
    /// (they fell this far behind).
    give_up: Instant,
}

/// Runs the benchmark and summarises its measured phase.
///
/// # Errors
///
/// Fails when the options are invalid, the target cannot be reached, or a
/// preload write fails. Errors of the run itself are counted in the summary.
pub async fn run(options: &Options) -> Result<Summary> {
    options.validate()?;
    let chooser = KeyChooser::new(options.keys, options.distribution)?;
    let schedule = match options.mode {
        Mode::Closed => None,
        Mode::Open { rate } => Some(Schedule::new(rate)?),
    };
    let mut conns = connect(&options.target, options.clients).await?;
    let value = Bytes::from(vec![b'x'; options.value_size]);
    if options.preload {
        preload(&mut conns, options.keys, &value).await?;
    }

    let start = Instant::now();
    let measure_from = start + options.warmup;
    let end = measure_from + options.duration;
    let plan = Arc::new(Plan {
        chooser,
        value,
        read_ratio: options.read_ratio,
        start,
        measure_from,
        end,
        // A backlog as long as the measured phase means the workers cannot
        // keep up; going on would only stretch the run.
        give_up: end + options.duration.max(Duration::from_secs(1)),
    });
    let next_slot = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let plan = plan.clone();
        let rng = StdRng::seed_from_u64(options.seed.wrapping_add(i as u64));
        match schedule {
            None => workers.spawn(closed_loop(conn, plan, rng)),
            Some(schedule) => {
                workers.spawn(open_loop(conn, plan, rng, schedule, next_slot.clone()))
            }
        };
    }
    let mut total = Recorder::new();
    while let Some(recorder) = workers.join_next().await {
        total.merge(&recorder.context("a benchmark worker panicked")?);
    }
    let finished = Instant::now();
    let unsent = match schedule {
        None => 0,
        Some(schedule) => {
            let due = schedule.slots_before(end - start);
            due.saturating_sub(next_slot.load(Ordering::Relaxed))
        }
    };
    // Closed loop: the last operations may finish after `end`; count the
    // time they took too.
    let elapsed = finished.max(end) - measure_from;
    Ok(total.summary(elapsed, unsent))
}

/// Writes every key once, the keys split over the connections, which
/// write concurrently.
async fn preload(conns: &mut [Conn], keys: u64, value: &Bytes) -> Result<()> {
    let workers = conns.len() as u64;
    futures::future::try_join_all(
        conns
            .iter_mut()
            .zip(0u64..)
            .map(|(conn, first)| async move {
                let mut index = first;
                while index < keys {
                    let key = KeyChooser::key(index);
                    conn.set(&key, value)
                        .await
                        .map_err(|e| anyhow::anyhow!("preload of {key} failed: {e}"))?;
                    index += workers;
                }
                Ok::<(), anyhow::Error>(())
            }),
    )
    .await
    .map(drop)
}

/// One operation: a read or a write of a drawn key, recorded if `measured`.
async fn operation(
    conn: &mut Conn,
    plan: &Plan,
    rng: &mut StdRng,
    recorder: &mut Recorder,
    from: Instant,
    measured: bool,
) {
    let key = KeyChooser::key(plan.chooser.next_index(rng));
    let read = rng.random_bool(plan.read_ratio);
    let result = if read {
        conn.get(&key).await.map(Some)
    } else {
        conn.set(&key, &plan.value).await.map(|()| None)
    };
    if !measured {
        return;
    }
    let latency = from.elapsed();
    match result {
        Ok(Some(hit)) => recorder.read(latency, hit),
        Ok(None) => recorder.write(latency),
        Err(e) => recorder.error(format!("{} {key}: {e}", if read { "get" } else { "set" })),
    }
}

async fn closed_loop(mut conn: Conn, plan: Arc<Plan>, mut rng: StdRng) -> Recorder {
    let mut recorder = Recorder::new();
    loop {
        let begun = Instant::now();
        if begun >= plan.end {
            return recorder;
        }
        let measured = begun >= plan.measure_from;
        operation(&mut conn, &plan, &mut rng, &mut recorder, begun, measured).await;
    }
}

async fn open_loop(
    mut conn: Conn,
    plan: Arc<Plan>,
    mut rng: StdRng,
    schedule: Schedule,
    next_slot: Arc<AtomicU64>,
) -> Recorder {
    let mut recorder = Recorder::new();
    loop {
        if Instant::now() >= plan.give_up {
            return recorder;
        }
        let slot = next_slot.fetch_add(1, Ordering::Relaxed);
        let due = plan.start + schedule.due(slot);
        if due >= plan.end {
            // Give the slot back so that `unsent` counts only slots due
            // within the run.
            next_slot.fetch_min(slot, Ordering::Relaxed);
            return recorder;
        }
        tokio::time::sleep_until(due).await;
        let measured = due >= plan.measure_from;
        operation(&mut conn, &plan, &mut rng, &mut recorder, due, measured).await;
    }
}

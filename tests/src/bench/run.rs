//! The driver: connects to the target, preloads, runs the workers through
//! warm-up and the measured phase, and merges what they recorded.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use cache_client::{
    Client, ClientConfig, SetOptions,
    ring::{Ring, RingNode},
};
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
        /// Whether the client's command stream carries the calls
        /// (`grpc://`), or every call is unary (`grpc-unary://`).
        stream: bool,
    },
    /// Any RESP server, one connection per worker.
    Resp {
        /// `host:port`.
        addr: String,
    },
    /// Several RESP servers, each key sent to the one that
    /// `cache_client::ring::Ring` names for it (in `keyspace`, at the
    /// default virtual points), one connection per worker per server: a
    /// cluster of servers that know nothing of each other, routed by the
    /// client as ringcache's client routes.
    RespRing {
        /// The servers as `(ring id, host:port)`.
        servers: Vec<(String, String)>,
        /// The keyspace the keys are hashed in.
        keyspace: String,
        /// One connection per server shared by every worker
        /// (`resp-ring-mux://`): the `redis` crate's multiplexed connection
        /// pipelines the concurrent workers' commands on it, the best a
        /// Redis client does. Otherwise one connection per worker per server
        /// (`resp-ring://`).
        shared: bool,
    },
}

impl Target {
    /// Parses `grpc://host:port[,host:port...]` (or `grpc-unary://`),
    /// `resp://host:port` or `resp-ring://[id=]host:port,...` (or
    /// `resp-ring-mux://`; a server's ring id is its address unless given).
    ///
    /// # Errors
    ///
    /// Fails on another scheme or an empty address.
    pub fn parse(target: &str, keyspace: &str) -> Result<Self> {
        let list = |rest: &str| -> Vec<String> {
            rest.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let grpc = [("grpc://", true), ("grpc-unary://", false)]
            .into_iter()
            .find_map(|(scheme, stream)| Some((target.strip_prefix(scheme)?, stream)));
        let resp_ring = [("resp-ring://", false), ("resp-ring-mux://", true)]
            .into_iter()
            .find_map(|(scheme, shared)| Some((target.strip_prefix(scheme)?, shared)));
        if let Some((rest, stream)) = grpc {
            let seeds = list(rest);
            if seeds.is_empty() {
                bail!("target {target:?} names no seed address");
            }
            Ok(Self::Grpc {
                seeds,
                keyspace: keyspace.to_owned(),
                stream,
            })
        } else if let Some((rest, shared)) = resp_ring {
            let servers: Vec<(String, String)> = list(rest)
                .into_iter()
                .map(|entry| match entry.split_once('=') {
                    Some((id, addr)) => (id.to_owned(), addr.to_owned()),
                    None => (entry.clone(), entry),
                })
                .collect();
            if servers.is_empty() || servers.iter().any(|(id, a)| id.is_empty() || a.is_empty()) {
                bail!("target {target:?} must name [id=]host:port entries");
            }
            let mut ids: Vec<&str> = servers.iter().map(|(id, _)| id.as_str()).collect();
            ids.sort_unstable();
            if ids.windows(2).any(|w| w[0] == w[1]) {
                bail!("target {target:?} names a ring id twice");
            }
            Ok(Self::RespRing {
                servers,
                keyspace: keyspace.to_owned(),
                shared,
            })
        } else if let Some(addr) = target.strip_prefix("resp://") {
            if addr.is_empty() || addr.contains(',') {
                bail!("target {target:?} must name one host:port");
            }
            Ok(Self::Resp {
                addr: addr.to_owned(),
            })
        } else {
            bail!(
                "target {target:?} must start with grpc://, grpc-unary://, resp://, resp-ring:// or resp-ring-mux://"
            )
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
    /// Keys per read: 1 reads one key (`Get`, `GET`); more read that many
    /// distinct drawn keys in one operation (`MultiGet` through the client,
    /// `MGET`, one `MGET` per server for `resp-ring`). Writes stay single.
    pub batch: usize,
    /// gRPC: the client's per-request timeout, and a deadline of four
    /// times it; `None` keeps the client's defaults. A benchmark on a busy
    /// machine raises it, so that one stall does not mark the node down
    /// and turn the rest of the run into errors.
    pub request_timeout: Option<Duration>,
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
            batch: 1,
            request_timeout: None,
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
        if self.batch == 0 {
            bail!("batch must be at least 1");
        }
        if self.batch as u64 > self.keys {
            bail!("batch {} exceeds the {} keys", self.batch, self.keys);
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
    Resp(RespConn),
    RespRing {
        route: Arc<RingRoute>,
        /// One connection per server, in `route`'s server order.
        conns: Vec<RespConn>,
    },
}

/// A RESP connection that reopens itself. Clones share the connection (and
/// pipeline on it) until one of them has to reopen it.
#[derive(Clone)]
struct RespConn {
    client: redis::Client,
    /// `None` once the server closed it (as it does after a protocol
    /// error): the next operation opens a new one, so that one refused
    /// request does not turn the rest of the run into errors.
    con: Option<redis::aio::MultiplexedConnection>,
}

impl RespConn {
    async fn open(addr: &str) -> Result<Self> {
        let client = redis::Client::open(format!("redis://{addr}/"))
            .with_context(|| format!("invalid RESP address {addr}"))?;
        // The redis error already names the cause; `with_context` would
        // print it twice (its source repeats it).
        let con = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| anyhow::anyhow!("failed to connect to {addr}: {e}"))?;
        Ok(Self {
            client,
            con: Some(con),
        })
    }

    /// Runs `cmd`, reopening the connection first if it was lost.
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Result<T, String> {
        if self.con.is_none() {
            self.con = Some(
                self.client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| format!("reconnect: {e}"))?,
            );
        }
        let connection = self.con.as_mut().expect("opened above when it was missing");
        cmd.query_async::<T>(connection).await.map_err(|e| {
            if e.is_connection_dropped() || e.is_unrecoverable_error() || e.is_io_error() {
                self.con = None;
            }
            e.to_string()
        })
    }

    async fn get(&mut self, key: &str) -> Result<bool, String> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        self.query::<Option<Vec<u8>>>(&cmd)
            .await
            .map(|value| value.is_some())
    }

    /// `MGET`; the number of keys found.
    async fn mget(&mut self, keys: &[&str]) -> Result<u64, String> {
        let mut cmd = redis::cmd("MGET");
        for key in keys {
            cmd.arg(*key);
        }
        let values = self.query::<Vec<Option<Vec<u8>>>>(&cmd).await?;
        if values.len() != keys.len() {
            return Err(format!(
                "MGET of {} keys answered {}",
                keys.len(),
                values.len()
            ));
        }
        Ok(values.iter().filter(|v| v.is_some()).count() as u64)
    }

    async fn set(&mut self, key: &str, value: &Bytes) -> Result<(), String> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value.as_ref());
        self.query::<()>(&cmd).await
    }
}

/// Which server of a `resp-ring` target holds a key.
struct RingRoute {
    ring: Ring,
    keyspace: String,
    /// Ring id to index in the target's server list.
    index: HashMap<String, usize>,
}

impl RingRoute {
    fn new(servers: &[(String, String)], keyspace: &str) -> Self {
        Self {
            ring: Ring::new(servers.iter().map(|(id, _)| RingNode::new(id.clone(), 1))),
            keyspace: keyspace.to_owned(),
            index: servers
                .iter()
                .enumerate()
                .map(|(i, (id, _))| (id.clone(), i))
                .collect(),
        }
    }

    fn server(&self, key: &str) -> usize {
        let owner = self
            .ring
            .owner(&self.keyspace, key.as_bytes())
            .expect("a ring of at least one server of weight 1 owns every key");
        self.index[owner]
    }
}

impl Conn {
    async fn get(&mut self, key: &str) -> Result<bool, String> {
        match self {
            Conn::Grpc { client, keyspace } => client
                .get(keyspace, key)
                .await
                .map(|entry| entry.is_some())
                .map_err(|e| e.to_string()),
            Conn::Resp(conn) => conn.get(key).await,
            Conn::RespRing { route, conns } => conns[route.server(key)].get(key).await,
        }
    }

    /// Reads several keys in one operation; the number found.
    async fn get_many(&mut self, keys: &[String]) -> Result<u64, String> {
        match self {
            Conn::Grpc { client, keyspace } => {
                let keys: Vec<Bytes> = keys.iter().map(|k| Bytes::from(k.clone())).collect();
                client
                    .multi_get(keyspace, &keys)
                    .await
                    .map(|entries| entries.iter().filter(|e| e.is_some()).count() as u64)
                    .map_err(|e| e.to_string())
            }
            Conn::Resp(conn) => {
                let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                conn.mget(&keys).await
            }
            Conn::RespRing { route, conns } => {
                let mut groups: Vec<Vec<&str>> = vec![Vec::new(); conns.len()];
                for key in keys {
                    groups[route.server(key)].push(key);
                }
                let found = futures::future::try_join_all(
                    conns
                        .iter_mut()
                        .zip(&groups)
                        .filter(|(_, keys)| !keys.is_empty())
                        .map(|(conn, keys)| conn.mget(keys)),
                )
                .await?;
                Ok(found.into_iter().sum())
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
            Conn::Resp(conn) => conn.set(key, value).await,
            Conn::RespRing { route, conns } => conns[route.server(key)].set(key, value).await,
        }
    }
}

/// Opens one connection per worker: gRPC workers share one client (it keeps
/// one HTTP/2 channel per node, as a service would); RESP workers each get
/// their own connection (per server, for `resp-ring`), as
/// `redis-benchmark -c` does.
async fn connect(
    target: &Target,
    clients: usize,
    request_timeout: Option<Duration>,
) -> Result<Vec<Conn>> {
    match target {
        Target::Grpc {
            seeds,
            keyspace,
            stream,
        } => {
            let mut config = ClientConfig::new(seeds.iter().cloned()).with_command_stream(*stream);
            if let Some(timeout) = request_timeout {
                config = config
                    .with_request_timeout(timeout)
                    .with_deadline(timeout * 4);
            }
            let client = Client::connect(config)
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
            let mut conns = Vec::with_capacity(clients);
            for _ in 0..clients {
                conns.push(Conn::Resp(RespConn::open(addr).await?));
            }
            Ok(conns)
        }
        Target::RespRing {
            servers,
            keyspace,
            shared: true,
        } => {
            let route = Arc::new(RingRoute::new(servers, keyspace));
            let mut per_server = Vec::with_capacity(servers.len());
            for (_, addr) in servers {
                per_server.push(RespConn::open(addr).await?);
            }
            Ok((0..clients)
                .map(|_| Conn::RespRing {
                    route: route.clone(),
                    conns: per_server.clone(),
                })
                .collect())
        }
        Target::RespRing {
            servers,
            keyspace,
            shared: false,
        } => {
            let route = Arc::new(RingRoute::new(servers, keyspace));
            let mut conns = Vec::with_capacity(clients);
            for _ in 0..clients {
                let mut per_server = Vec::with_capacity(servers.len());
                for (_, addr) in servers {
                    per_server.push(RespConn::open(addr).await?);
                }
                conns.push(Conn::RespRing {
                    route: route.clone(),
                    conns: per_server,
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
    batch: usize,
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
    let mut conns = connect(&options.target, options.clients, options.request_timeout).await?;
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
        batch: options.batch,
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

/// One operation: a read (of `plan.batch` keys) or a write of a drawn key,
/// recorded if `measured`.
async fn operation(
    conn: &mut Conn,
    plan: &Plan,
    rng: &mut StdRng,
    recorder: &mut Recorder,
    from: Instant,
    measured: bool,
) {
    let read = rng.random_bool(plan.read_ratio);
    let (key, result) = if read && plan.batch > 1 {
        let keys = plan.chooser.distinct_keys(rng, plan.batch);
        let result = conn.get_many(&keys).await.map(Some);
        (keys[0].clone(), result)
    } else {
        let key = KeyChooser::key(plan.chooser.next_index(rng));
        let result = if read {
            conn.get(&key).await.map(|hit| Some(u64::from(hit)))
        } else {
            conn.set(&key, &plan.value).await.map(|()| None)
        };
        (key, result)
    };
    if !measured {
        recorder.warmup_ops += 1;
        return;
    }
    let latency = from.elapsed();
    match result {
        Ok(Some(hits)) => recorder.read_batch(latency, plan.batch as u64, hits),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_ring_targets_name_servers_with_optional_ids() {
        let target = Target::parse("resp-ring://a=127.0.0.1:1, 127.0.0.1:2", "ks").unwrap();
        assert_eq!(
            target,
            Target::RespRing {
                servers: vec![
                    ("a".into(), "127.0.0.1:1".into()),
                    ("127.0.0.1:2".into(), "127.0.0.1:2".into()),
                ],
                keyspace: "ks".into(),
                shared: false,
            }
        );
        assert!(matches!(
            Target::parse("resp-ring-mux://a=127.0.0.1:1", "ks").unwrap(),
            Target::RespRing { shared: true, .. }
        ));
        assert!(Target::parse("resp-ring://", "ks").is_err());
        assert!(Target::parse("resp-ring://x=h:1,x=h:2", "ks").is_err());
        assert!(Target::parse("resp-ring://=h:1", "ks").is_err());
    }

    #[test]
    fn grpc_targets_stream_unless_asked_for_unary_calls() {
        let stream = |target: &str| match Target::parse(target, "ks").unwrap() {
            Target::Grpc { stream, .. } => stream,
            other => panic!("{other:?}"),
        };
        assert!(stream("grpc://h:1,h:2"));
        assert!(!stream("grpc-unary://h:1"));
        assert!(Target::parse("grpc-unary://", "ks").is_err());
    }

    #[test]
    fn resp_ring_routes_like_the_client_ring() {
        let servers = vec![
            ("node-1".to_owned(), "h:1".to_owned()),
            ("node-2".to_owned(), "h:2".to_owned()),
            ("node-3".to_owned(), "h:3".to_owned()),
        ];
        let route = RingRoute::new(&servers, "default");
        let ring = Ring::new((1..=3).map(|i| RingNode::new(format!("node-{i}"), 1)));
        let mut used = [false; 3];
        for i in 0..300 {
            let key = KeyChooser::key(i);
            let server = route.server(&key);
            used[server] = true;
            assert_eq!(
                Some(servers[server].0.as_str()),
                ring.owner("default", key.as_bytes())
            );
        }
        assert_eq!(used, [true; 3]);
    }
}

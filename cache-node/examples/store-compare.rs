//! Compares the node's compact table (`cache_node::table`) with moka, set
//! up as the node's store set it up before the table replaced it, and with
//! quick_cache: heap per item
//! (RSS growth), nanoseconds per operation, and hit ratio on synthetic
//! traces; and, when `redis-server` is on the PATH, redis-server's RSS per
//! item in the same run. Issue 14, phase 1; figures go to the branch notes.
//!
//! ```text
//! cargo run -p cache-node --example store-compare \
//!     --config 'profile.dev.package.cache-node.opt-level=3' -- [all|mem|speed|hits|expiry]
//! ```
//!
//! `hits` takes `--caches table,moka,quick,redis` (which to run) and
//! `--rss moka=N,quick=N` (their RSS per item from `mem`, for the
//! same-memory comparison).
//!
//! Each memory figure comes from a child process of its own (this binary,
//! re-run with `child-mem`), so that one cache's freed memory cannot hide
//! another's growth.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cache_node::table::{Meta, Table, TableConfig};

/// The weigher overhead of the moka store the table replaced (its
/// `ENTRY_OVERHEAD_BYTES` was 128).
const MOKA_OVERHEAD: u64 = 128;
const ITEMS: usize = 1_000_000;

/// The entry moka held in the store the table replaced.
#[derive(Clone)]
struct Stored {
    value: Bytes,
    #[allow(dead_code)]
    version: u64,
    expires_at: Option<Instant>,
}

struct PerEntryExpiry;

impl moka::Expiry<Bytes, Stored> for PerEntryExpiry {
    fn expire_after_create(&self, _key: &Bytes, value: &Stored, now: Instant) -> Option<Duration> {
        value.expires_at.map(|at| at.saturating_duration_since(now))
    }
}

#[derive(Clone)]
struct Weigh;

impl quick_cache::Weighter<Bytes, Stored> for Weigh {
    fn weight(&self, key: &Bytes, value: &Stored) -> u64 {
        key.len() as u64 + value.value.len() as u64 + MOKA_OVERHEAD
    }
}

/// The three caches behind one face: get (a hit copies or shares the
/// value) and insert.
enum Cache {
    Table(Table),
    Moka(moka::sync::Cache<Bytes, Stored>),
    Quick(quick_cache::sync::Cache<Bytes, Stored, Weigh>),
}

impl Cache {
    fn new(kind: &str, capacity: u64, estimated_items: usize) -> Cache {
        match kind {
            "table" => Cache::Table(Table::new(
                TableConfig {
                    capacity_bytes: capacity,
                    max_dirty_bytes: capacity,
                    shards: 0,
                },
                Instant::now(),
            )),
            "moka" => Cache::Moka(
                moka::sync::Cache::builder()
                    .max_capacity(capacity)
                    .weigher(|key: &Bytes, value: &Stored| -> u32 {
                        (key.len() as u64 + value.value.len() as u64 + MOKA_OVERHEAD) as u32
                    })
                    .expire_after(PerEntryExpiry)
                    .eviction_listener(|_, _, _| {})
                    .build(),
            ),
            "quick" => Cache::Quick(quick_cache::sync::Cache::with_weighter(
                estimated_items,
                capacity,
                Weigh,
            )),
            other => panic!("unknown cache {other}"),
        }
    }

    fn insert(&self, key: &[u8], value: &[u8], now: Instant) {
        match self {
            Cache::Table(t) => t
                .insert(key, value, Meta::clean(1, None), now)
                .expect("clean writes are never refused"),
            Cache::Moka(c) => c.insert(Bytes::copy_from_slice(key), stored(value)),
            Cache::Quick(c) => c.insert(Bytes::copy_from_slice(key), stored(value)),
        }
    }

    fn get(&self, key: &[u8], now: Instant) -> Option<Bytes> {
        match self {
            Cache::Table(t) => t.get(key, now).map(|found| found.value),
            Cache::Moka(c) => c
                .get(key)
                .filter(|s| s.expires_at.is_none_or(|at| at > now))
                .map(|s| s.value),
            Cache::Quick(c) => c
                .get(key)
                .filter(|s| s.expires_at.is_none_or(|at| at > now))
                .map(|s| s.value),
        }
    }

    /// Bytes the cache's own accounting says it holds.
    fn accounted(&self) -> u64 {
        match self {
            Cache::Table(t) => t.stats().bytes,
            Cache::Moka(c) => {
                c.run_pending_tasks();
                c.weighted_size()
            }
            Cache::Quick(c) => c.weight(),
        }
    }

    fn items(&self) -> u64 {
        match self {
            Cache::Table(t) => t.stats().items,
            Cache::Moka(c) => {
                c.run_pending_tasks();
                c.entry_count()
            }
            Cache::Quick(c) => c.len() as u64,
        }
    }
}

fn stored(value: &[u8]) -> Stored {
    Stored {
        value: Bytes::copy_from_slice(value),
        version: 1,
        expires_at: None,
    }
}

fn key(i: u64) -> String {
    format!("key:{i}")
}

/// Resident set size of a process, from `/proc/<pid>/status`.
fn rss_of(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("procfs");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .expect("VmRSS line")
        * 1024
}

fn rss() -> u64 {
    rss_of("self")
}

/// A deterministic generator (SplitMix64): the traces are the same for
/// every cache.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf ranks over `n` keys by inverting a precomputed CDF.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for rank in 1..=n {
            sum += 1.0 / (rank as f64).powf(s);
            cdf.push(sum);
        }
        for p in &mut cdf {
            *p /= sum;
        }
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.unit();
        self.cdf.partition_point(|&p| p < u) as u64
    }
}

fn child_mem(kind: &str, value_bytes: usize, items: usize) {
    let value = vec![b'v'; value_bytes];
    let now = Instant::now();
    let before = rss();
    let cache = Cache::new(kind, u64::MAX / 4, items);
    for i in 0..items as u64 {
        cache.insert(key(i).as_bytes(), &value, now);
    }
    let accounted = cache.accounted();
    let after = rss();
    assert_eq!(
        cache.items(),
        items as u64,
        "{kind} evicted during the memory run"
    );
    println!(
        "{kind}\t{value_bytes}\t{:.1}\t{:.1}",
        (after - before) as f64 / items as f64,
        accounted as f64 / items as f64
    );
}

fn mem() {
    println!("## Memory: RSS growth per item over {ITEMS} keys (`key:N`, 5-10 bytes)");
    println!("cache\tvalue\trss/item\taccounted/item");
    let exe = std::env::current_exe().expect("own path");
    for value_bytes in [100, 1024] {
        for kind in ["table", "moka", "quick"] {
            let out = Command::new(&exe)
                .args([
                    "child-mem",
                    kind,
                    &value_bytes.to_string(),
                    &ITEMS.to_string(),
                ])
                .stderr(Stdio::inherit())
                .output()
                .expect("run child");
            print!("{}", String::from_utf8_lossy(&out.stdout));
        }
        match redis_mem(value_bytes) {
            Ok(line) => println!("{line}"),
            Err(e) => println!("redis-server\t{value_bytes}\tnot measured: {e}"),
        }
    }
}

/// A redis-server on a free port, killed on drop.
struct Redis {
    child: std::process::Child,
    port: u16,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Redis {
    fn start(extra: &[&str]) -> Result<Redis, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--enable-debug-command", "yes"])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server: {e}"))?;
        let redis = Redis { child, port };
        for _ in 0..500 {
            if redis.command(&["PING"]).is_ok() {
                return Ok(redis);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err("redis-server did not answer PING".into())
    }

    fn connect(&self) -> Result<TcpStream, String> {
        TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())
    }

    fn command(&self, args: &[&str]) -> Result<String, String> {
        let mut stream = self.connect()?;
        stream.write_all(&encode(args)).map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(stream);
        read_reply(&mut reader)
    }

    fn rss(&self) -> u64 {
        rss_of(&self.child.id().to_string())
    }
}

fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    out
}

fn read_reply(reader: &mut impl BufRead) -> Result<String, String> {
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    match line.as_bytes().first() {
        Some(b'+' | b':') => Ok(line.trim_end().to_owned()),
        Some(b'-') => Err(line.trim_end().to_owned()),
        Some(b'$') => {
            let len: i64 = line[1..].trim().parse().map_err(|_| "bad bulk length")?;
            if len < 0 {
                return Ok(String::new());
            }
            let mut body = vec![0; len as usize + 2];
            reader.read_exact(&mut body).map_err(|e| e.to_string())?;
            Ok(String::from_utf8_lossy(&body[..len as usize]).into_owned())
        }
        _ => Err(format!("unexpected reply {line:?}")),
    }
}

fn redis_mem(value_bytes: usize) -> Result<String, String> {
    let redis = Redis::start(&[])?;
    let before = redis.rss();
    redis.command(&[
        "DEBUG",
        "POPULATE",
        &ITEMS.to_string(),
        "key",
        &value_bytes.to_string(),
    ])?;
    let after = redis.rss();
    let info = redis.command(&["INFO", "memory"])?;
    let used = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    Ok(format!(
        "redis-server\t{value_bytes}\t{:.1}\t{:.1}",
        (after - before) as f64 / ITEMS as f64,
        used / ITEMS as f64
    ))
}

fn speed() {
    println!("## Speed: ns per operation, {ITEMS} keys, 100-byte values, no eviction");
    println!("cache\tinsert\tget(1 thread)\tget(2 threads)\tinsert(2 threads)");
    let value = vec![b'v'; 100];
    let keys: Vec<String> = (0..ITEMS as u64).map(key).collect();
    let mut rng = Rng(7);
    let order: Vec<usize> = (0..ITEMS)
        .map(|_| (rng.next() % ITEMS as u64) as usize)
        .collect();
    for kind in ["table", "moka", "quick"] {
        let now = Instant::now();
        let cache = Arc::new(Cache::new(kind, u64::MAX / 4, ITEMS));
        let start = Instant::now();
        for k in &keys {
            cache.insert(k.as_bytes(), &value, now);
        }
        let insert = start.elapsed().as_nanos() as f64 / ITEMS as f64;
        let start = Instant::now();
        let mut hits = 0;
        for &i in &order {
            hits += usize::from(cache.get(keys[i].as_bytes(), now).is_some());
        }
        let get = start.elapsed().as_nanos() as f64 / ITEMS as f64;
        assert_eq!(hits, ITEMS);
        let parallel = |write: bool| {
            let start = Instant::now();
            std::thread::scope(|scope| {
                for t in 0..2 {
                    let (cache, keys, order, value) = (&cache, &keys, &order, &value);
                    scope.spawn(move || {
                        for &i in order.iter().skip(t).step_by(2) {
                            if write {
                                cache.insert(keys[i].as_bytes(), value, now);
                            } else {
                                std::hint::black_box(cache.get(keys[i].as_bytes(), now));
                            }
                        }
                    });
                }
            });
            // Wall time per operation with both threads running.
            start.elapsed().as_nanos() as f64 / ITEMS as f64
        };
        let get2 = parallel(false);
        let insert2 = parallel(true);
        println!("{kind}\t{insert:.0}\t{get:.0}\t{get2:.0}\t{insert2:.0}");
    }
}

/// One request of a trace.
#[derive(Clone, Copy)]
enum Request {
    /// Part of the workload whose hit ratio counts.
    Hot(u64),
    /// A one-pass scan key (never requested again).
    Scan(u64),
}

fn traces(keys: usize, requests: usize) -> Vec<(&'static str, Vec<Request>)> {
    let zipf = Zipf::new(keys, 0.99);
    let mut rng = Rng(42);
    let plain: Vec<Request> = (0..requests)
        .map(|_| Request::Hot(zipf.sample(&mut rng)))
        .collect();
    // Every tenth of the trace, a one-pass scan over half as many fresh
    // keys as the workload has.
    let mut scanned = Vec::with_capacity(requests * 2);
    let mut next_scan = 0;
    for (i, request) in plain.iter().enumerate() {
        if i % (requests / 10) == requests / 20 {
            for _ in 0..keys / 2 {
                scanned.push(Request::Scan(next_scan));
                next_scan += 1;
            }
        }
        scanned.push(*request);
    }
    // The hot set moves to other keys five times.
    let shifting: Vec<Request> = plain
        .iter()
        .enumerate()
        .map(|(i, request)| match request {
            Request::Hot(rank) => {
                Request::Hot((rank + (i * 5 / requests) as u64 * keys as u64 / 5) % keys as u64)
            }
            scan => *scan,
        })
        .collect();
    vec![
        ("zipf 0.99", plain),
        ("zipf + scans", scanned),
        ("shifting zipf", shifting),
    ]
}

fn hits() {
    let keys = 1_000_000;
    let requests = 5_000_000;
    let value = vec![b'v'; 100];
    // Room for about a tenth of the keys in the table's real bytes.
    let per_item = Table::entry_footprint(key(500_000).as_bytes(), &value) + 28;
    let budget = per_item * keys as u64 / 10;
    println!(
        "## Hit ratio: Zipf 0.99 over {keys} keys, {requests} reads (cache-aside: a miss inserts), 100-byte values"
    );
    println!(
        "Budget {budget} bytes: `same accounting` gives each cache that capacity in its own unit (moka and \
         quick_cache weigh key + value + {MOKA_OVERHEAD}, as the store does); `same RSS` scales their \
         capacity by their measured RSS per item (pass `--rss moka=N,quick=N`) so each holds the same memory."
    );
    let rss_per_item: Vec<(String, f64)> = std::env::args()
        .skip_while(|a| a != "--rss")
        .nth(1)
        .map(|list| {
            list.split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.parse().expect("bytes per item")))
                .collect()
        })
        .unwrap_or_default();
    let caches: Vec<String> = std::env::args()
        .skip_while(|a| a != "--caches")
        .nth(1)
        .map_or_else(
            || vec!["table".into(), "moka".into(), "quick".into()],
            |list| list.split(',').map(str::to_owned).collect(),
        );
    println!("trace\tcache\tcapacity\thit ratio (hot reads)\titems held\tns/request");
    for (name, trace) in traces(keys, requests) {
        for kind in caches.iter().map(String::as_str).filter(|&c| c != "redis") {
            let mut modes = vec![("same accounting", budget)];
            if let Some((_, rss)) = rss_per_item.iter().find(|(k, _)| k == kind) {
                let weight = (key(500_000).len() + value.len()) as f64 + MOKA_OVERHEAD as f64;
                modes.push(("same RSS", (budget as f64 / rss * weight) as u64));
            }
            for (mode, capacity) in modes {
                let now = Instant::now();
                let cache = Cache::new(kind, capacity, keys / 10);
                let (mut hot, mut hot_hits) = (0u64, 0u64);
                let start = Instant::now();
                for request in &trace {
                    let (k, counted) = match *request {
                        Request::Hot(rank) => (key(rank), true),
                        Request::Scan(i) => (format!("scan:{i}"), false),
                    };
                    let hit = cache.get(k.as_bytes(), now).is_some();
                    if !hit {
                        cache.insert(k.as_bytes(), &value, now);
                    }
                    if counted {
                        hot += 1;
                        hot_hits += u64::from(hit);
                    }
                }
                let ns = start.elapsed().as_nanos() as f64 / trace.len() as f64;
                println!(
                    "{name}\t{kind} ({mode})\t{capacity}\t{:.4}\t{}\t{ns:.0}",
                    hot_hits as f64 / hot as f64,
                    cache.items()
                );
            }
        }
        if caches.iter().any(|c| c == "redis") {
            for policy in ["allkeys-lru", "allkeys-lfu"] {
                match redis_hits(&trace, policy, budget, &value) {
                    Ok(line) => println!("{name}\t{line}"),
                    Err(e) => println!("{name}\tredis-server ({policy})\tnot measured: {e}"),
                }
            }
        }
    }
}

/// Replays a trace against redis-server with `maxmemory` = `budget` (plus
/// what the empty server already uses) under `policy`: GETs in pipelined
/// batches of 64, then a SET for each miss of the batch. A key repeated
/// within one batch misses each time (a slight disadvantage for Redis on
/// the hottest keys; see the notes).
fn redis_hits(
    trace: &[Request],
    policy: &str,
    budget: u64,
    value: &[u8],
) -> Result<String, String> {
    let redis = Redis::start(&["--maxmemory-policy", policy])?;
    let info = redis.command(&["INFO", "memory"])?;
    let empty = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .ok_or("no used_memory")?;
    let maxmemory = (budget + empty).to_string();
    redis.command(&["CONFIG", "SET", "maxmemory", &maxmemory])?;
    let stream = redis.connect()?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let value = std::str::from_utf8(value).map_err(|e| e.to_string())?;
    let (mut hot, mut hot_hits) = (0u64, 0u64);
    let start = Instant::now();
    for batch in trace.chunks(64) {
        let keys: Vec<(String, bool)> = batch
            .iter()
            .map(|request| match *request {
                Request::Hot(rank) => (key(rank), true),
                Request::Scan(i) => (format!("scan:{i}"), false),
            })
            .collect();
        let mut out = Vec::new();
        for (k, _) in &keys {
            out.extend_from_slice(&encode(&["GET", k]));
        }
        writer.write_all(&out).map_err(|e| e.to_string())?;
        let mut misses = Vec::new();
        for (k, counted) in &keys {
            let hit = !read_reply(&mut reader)?.is_empty();
            if *counted {
                hot += 1;
                hot_hits += u64::from(hit);
            }
            if !hit {
                misses.push(k);
            }
        }
        let mut out = Vec::new();
        for k in &misses {
            out.extend_from_slice(&encode(&["SET", k, value]));
        }
        writer.write_all(&out).map_err(|e| e.to_string())?;
        for _ in &misses {
            read_reply(&mut reader)?;
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / trace.len() as f64;
    let items = redis.command(&["DBSIZE"])?;
    Ok(format!(
        "redis-server ({policy})\t{maxmemory}\t{:.4}\t{}\t{ns:.0}",
        hot_hits as f64 / hot as f64,
        items.trim_start_matches(':')
    ))
}

/// Expiry without reads: a million entries with a 2 s TTL, nobody reads
/// them, the owner calls `expire_some` every 100 ms as the node's sweeper
/// would.
fn child_expiry() {
    let value = vec![b'v'; 100];
    let base = rss();
    let now = Instant::now();
    let table = Table::new(TableConfig::new(u64::MAX / 4), now);
    for i in 0..ITEMS as u64 {
        table
            .insert(
                key(i).as_bytes(),
                &value,
                Meta::clean(1, Some(now + Duration::from_secs(2))),
                now,
            )
            .expect("clean");
    }
    let loaded = Instant::now();
    println!("t(s)\titems\taccounted MiB\tRSS growth MiB");
    let report = |table: &Table| {
        let stats = table.stats();
        println!(
            "{:.1}\t{}\t{:.1}\t{:.1}",
            loaded.elapsed().as_secs_f64(),
            stats.items,
            stats.bytes as f64 / (1 << 20) as f64,
            rss().saturating_sub(base) as f64 / (1 << 20) as f64
        );
    };
    report(&table);
    let mut last = Instant::now();
    while loaded.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
        table.expire_some(Instant::now(), 8192);
        if last.elapsed() >= Duration::from_secs(1) {
            report(&table);
            last = Instant::now();
        }
    }
    report(&table);
}

fn expiry() {
    println!(
        "## Expiry without reads: {ITEMS} entries, 2 s TTL, `expire_some(now, 8192)` every 100 ms"
    );
    let exe = std::env::current_exe().expect("own path");
    let out = Command::new(exe)
        .arg("child-expiry")
        .output()
        .expect("run child");
    print!("{}", String::from_utf8_lossy(&out.stdout));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str).unwrap_or("all") {
        "child-mem" => child_mem(
            &args[2],
            args[3].parse().expect("value bytes"),
            args[4].parse().expect("items"),
        ),
        "child-expiry" => child_expiry(),
        "mem" => mem(),
        "speed" => speed(),
        "hits" => hits(),
        "expiry" => expiry(),
        "all" => {
            mem();
            speed();
            hits();
            expiry();
        }
        other => panic!("unknown command {other}"),
    }
}

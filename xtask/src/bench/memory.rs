//! The `memory` suite: bytes per item for 1,000,000 values of 100 bytes
//! and of 1 KiB, the node against `redis-server`; and expiry without reads.
//!
//! Per item: each server is started fresh, its memory read, the same keys
//! (`key:0000000` ...) loaded through RESP by a pipelined writer here, the
//! count checked (and, for the node, that nothing was evicted), and its
//! memory read again. The deltas per item are compared like with like: the
//! resident set (`VmRSS` of `/proc/PID/status`) of both, beside redis's own
//! allocator count (`used_memory`) and the node's own accounting (the
//! bytes its keyspace charges, as glibc charges them).
//!
//! Expiry without reads: a fresh server of each kind is loaded with the
//! same 1,000,000 100-byte entries with a TTL ([`EXPIRY_TTL`]), nothing
//! reads them, and the suite samples the keys held, the resident set and
//! the server's own count every [`EXPIRY_SAMPLE`] for [`EXPIRY_WATCH`]
//! after the load ends: what active expiry gives back without a read.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{
    Ctx,
    resp::{Kind, Server, node_config_shown},
};

/// Value sizes measured, in bytes.
const VALUE_SIZES: [usize; 2] = [100, 1024];
/// TTL of the entries of the expiry measurement.
const EXPIRY_TTL: Duration = Duration::from_secs(2);
/// How long after the load the expiry measurement watches.
const EXPIRY_WATCH: Duration = Duration::from_secs(10);
/// How often it samples.
const EXPIRY_SAMPLE: Duration = Duration::from_millis(500);
/// Value size of the expiry measurement.
const EXPIRY_VALUE_BYTES: usize = 100;
/// SETs written before their replies are read.
const BATCH: usize = 1000;
/// How long one command or one batch may take.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Items loaded.
fn items(ctx: &Ctx) -> usize {
    if ctx.quick { 100_000 } else { 1_000_000 }
}

/// The key of item `i`.
fn key(i: usize) -> String {
    format!("key:{i:07}")
}

/// The value of item `i`: its number, zero-padded to `bytes`, so that no
/// two values are equal.
fn value(i: usize, bytes: usize) -> String {
    format!("{i:0>bytes$}")
}

/// A RESP multibulk request.
fn request(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// Reads until `buf` holds `count` whole simple-string or error replies
/// (lines); fails on the first that is not `+OK`.
async fn read_oks(stream: &mut TcpStream, buf: &mut Vec<u8>, mut count: usize) -> Result<()> {
    let mut start = 0;
    while count > 0 {
        if let Some(end) = buf[start..].windows(2).position(|w| w == b"\r\n") {
            let line = &buf[start..start + end];
            if line != b"+OK" {
                bail!("a SET was answered {:?}", String::from_utf8_lossy(line));
            }
            start += end + 2;
            count -= 1;
            continue;
        }
        buf.drain(..start);
        start = 0;
        let mut chunk = [0; 64 * 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the server closed the connection while {count} replies were due");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..start);
    Ok(())
}

/// SETs `items` keys with values of `value_bytes`, `BATCH` at a time; with
/// `ttl`, each with `PX` of it.
async fn load(
    ctx: &Ctx,
    addr: SocketAddr,
    items: usize,
    value_bytes: usize,
    ttl: Option<Duration>,
) -> Result<()> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("failed to connect to {addr}"))?;
    let mut out = Vec::new();
    let mut replies = Vec::new();
    let px = ttl.map(|ttl| ttl.as_millis().to_string());
    for first in (0..items).step_by(BATCH) {
        if ctx.cancel.is_cancelled() {
            bail!("interrupted while loading");
        }
        out.clear();
        let last = (first + BATCH).min(items);
        for i in first..last {
            let (key, value) = (key(i), value(i, value_bytes));
            match &px {
                None => request(&mut out, &[b"SET", key.as_bytes(), value.as_bytes()]),
                Some(px) => request(
                    &mut out,
                    &[
                        b"SET",
                        key.as_bytes(),
                        value.as_bytes(),
                        b"PX",
                        px.as_bytes(),
                    ],
                ),
            }
        }
        let batch = async {
            stream.write_all(&out).await?;
            read_oks(&mut stream, &mut replies, last - first).await
        };
        tokio::time::timeout(IO_TIMEOUT, batch)
            .await
            .context("a batch of SETs timed out")??;
    }
    Ok(())
}

/// `INFO` as `field:value` pairs (every section; the node ignores the
/// section argument anyway).
pub(super) async fn info(addr: SocketAddr) -> Result<Vec<(String, String)>> {
    Ok(redis_cli(addr, &["INFO"])
        .await?
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

/// What `redis-cli -h HOST -p PORT ARGS...` prints, within [`IO_TIMEOUT`].
pub(super) async fn redis_cli(addr: SocketAddr, args: &[&str]) -> Result<String> {
    let shown = args.join(" ");
    let output = tokio::time::timeout(
        IO_TIMEOUT,
        tokio::process::Command::new("redis-cli")
            .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("redis-cli {shown} timed out"))?
    .context("failed to run redis-cli")?;
    if !output.status.success() {
        bail!("redis-cli {shown} failed ({})", output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

pub(super) fn field<'a>(info: &'a [(String, String)], name: &str) -> Result<&'a str> {
    info.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .with_context(|| format!("INFO has no {name} field"))
}

/// A number from a `key=value,...` list such as `keys=1,bytes=2`.
fn sub_field(list: &str, name: &str) -> Result<u64> {
    list.split(',')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
        .with_context(|| format!("no number {name}= in {list:?}"))
}

/// The resident set of process `pid`, in bytes.
pub(super) fn rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(&path).with_context(|| format!("failed to read {path}"))?;
    parse_vm_rss(&status).with_context(|| format!("no VmRSS in {path}"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// What one server's load cost.
struct Measured {
    rss_per_item: f64,
    /// redis: `used_memory` delta; the node: the bytes of its keyspace.
    own_per_item: f64,
    rss_after: u64,
}

/// The server's own count of its memory: redis's `used_memory`, the
/// node's keyspace `bytes`.
pub(super) fn own_bytes(kind: Kind, info: &[(String, String)]) -> Result<u64> {
    match kind {
        Kind::Redis => field(info, "used_memory")?
            .parse()
            .context("used_memory is not a number"),
        Kind::Ringcache => sub_field(field(info, "keyspace_default")?, "bytes"),
    }
}

/// The keys the server holds (expired ones not yet removed included).
pub(super) fn keys_held(kind: Kind, info: &[(String, String)]) -> Result<u64> {
    match kind {
        // redis drops the `db0` line once the database is empty.
        Kind::Redis => match field(info, "db0") {
            Ok(db0) => sub_field(db0, "keys"),
            Err(_) => Ok(0),
        },
        Kind::Ringcache => sub_field(field(info, "keyspace_default")?, "keys"),
    }
}

async fn measure(
    ctx: &Ctx,
    kind: Kind,
    cpu: usize,
    items: usize,
    value_bytes: usize,
) -> Result<Measured> {
    let label = format!("memory-{value_bytes}");
    let mut server = Server::start(ctx, kind, cpu, &label).await?;
    let before_info = info(server.addr).await?;
    let rss_before = rss_bytes(server.pid())?;
    eprintln!(
        "xtask: bench memory: loading {items} items of {value_bytes} bytes into {}",
        kind.name()
    );
    load(ctx, server.addr, items, value_bytes, None).await?;
    server.check_alive()?;
    let after_info = info(server.addr).await?;
    let rss_after = rss_bytes(server.pid())?;
    let per_item = |before: u64, after: u64| after.saturating_sub(before) as f64 / items as f64;
    let keys = keys_held(kind, &after_info)?;
    if keys != items as u64 {
        bail!(
            "{} holds {keys} keys after loading {items}: its capacity is too small",
            kind.name()
        );
    }
    if kind == Kind::Ringcache {
        let evictions = sub_field(field(&after_info, "keyspace_default")?, "evictions")?;
        if evictions != 0 {
            bail!("the node evicted {evictions} keys: its capacity is too small");
        }
    }
    let own_per_item = per_item(
        own_bytes(kind, &before_info)?,
        own_bytes(kind, &after_info)?,
    );
    server.stop().await?;
    Ok(Measured {
        rss_per_item: per_item(rss_before, rss_after),
        own_per_item,
        rss_after,
    })
}

/// One sample of the expiry measurement.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Since the load ended.
    at: Duration,
    keys: u64,
    rss: u64,
    own: u64,
}

/// The expiry measurement of one server.
struct Expiry {
    /// Before the load.
    empty: Sample,
    /// From the end of the load on.
    samples: Vec<Sample>,
}

impl Expiry {
    /// The first sample holding no key, if any.
    fn emptied(&self) -> Option<&Sample> {
        self.samples.iter().find(|s| s.keys == 0)
    }

    fn last(&self) -> &Sample {
        self.samples
            .last()
            .expect("the watch takes at least one sample")
    }

    fn loaded(&self) -> &Sample {
        &self.samples[0]
    }
}

async fn sample(kind: Kind, server: &Server, at: Duration) -> Result<Sample> {
    let info = info(server.addr).await?;
    Ok(Sample {
        at,
        keys: keys_held(kind, &info)?,
        rss: rss_bytes(server.pid())?,
        own: own_bytes(kind, &info)?,
    })
}

async fn measure_expiry(ctx: &Ctx, kind: Kind, cpu: usize, items: usize) -> Result<Expiry> {
    let mut server = Server::start(ctx, kind, cpu, "memory-expiry").await?;
    let empty = sample(kind, &server, Duration::ZERO).await?;
    eprintln!(
        "xtask: bench memory: loading {items} items with a {EXPIRY_TTL:?} TTL into {}",
        kind.name()
    );
    let started = Instant::now();
    load(
        ctx,
        server.addr,
        items,
        EXPIRY_VALUE_BYTES,
        Some(EXPIRY_TTL),
    )
    .await?;
    let loaded = Instant::now();
    if loaded - started >= EXPIRY_TTL {
        eprintln!(
            "xtask: bench memory: loading took {:?}, longer than the TTL: \
             the first entries expired during the load",
            loaded - started
        );
    }
    let mut samples = Vec::new();
    let mut next = loaded;
    while next <= loaded + EXPIRY_WATCH {
        tokio::time::sleep_until(next.into()).await;
        if ctx.cancel.is_cancelled() {
            bail!("interrupted while watching expiry");
        }
        server.check_alive()?;
        samples.push(sample(kind, &server, loaded.elapsed()).await?);
        next += EXPIRY_SAMPLE;
    }
    server.stop().await?;
    Ok(Expiry { empty, samples })
}

pub async fn run(ctx: &Ctx) -> Result<String> {
    let (server_cpu, _) = ctx.cpus();
    let items = items(ctx);
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let mut out = String::new();
    writeln!(
        out,
        "{items} keys (`key:0000000` ...) with values of each size, SET through RESP in \
         pipelined batches of {BATCH} into a freshly started server; per item = growth / {items}."
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "| value | | redis-server | ringcache | ringcache / redis |"
    )?;
    writeln!(out, "|---:|---|---:|---:|---:|")?;
    for value_bytes in VALUE_SIZES {
        let redis = measure(ctx, Kind::Redis, server_cpu, items, value_bytes).await?;
        let node = measure(ctx, Kind::Ringcache, server_cpu, items, value_bytes).await?;
        writeln!(
            out,
            "| {value_bytes} B | RSS growth per item (`VmRSS`), bytes | {:.1} | {:.1} | {:.2}x |",
            redis.rss_per_item,
            node.rss_per_item,
            node.rss_per_item / redis.rss_per_item
        )?;
        writeln!(
            out,
            "| {value_bytes} B | own accounting per item, bytes (redis: `used_memory`; \
             ringcache: keyspace `bytes`) | {:.1} | {:.1} | |",
            redis.own_per_item, node.own_per_item
        )?;
        writeln!(
            out,
            "| {value_bytes} B | ringcache's accounting / its RSS growth | | {:.3} | |",
            node.own_per_item / node.rss_per_item
        )?;
        writeln!(
            out,
            "| {value_bytes} B | RSS after loading, MiB | {:.1} | {:.1} | |",
            mib(redis.rss_after),
            mib(node.rss_after)
        )?;
    }
    writeln!(out)?;

    let redis = measure_expiry(ctx, Kind::Redis, server_cpu, items).await?;
    let node = measure_expiry(ctx, Kind::Ringcache, server_cpu, items).await?;
    writeln!(
        out,
        "Expiry without reads: {items} keys with {EXPIRY_VALUE_BYTES}-byte values, each SET \
         with `PX {}` into a freshly started server, then nothing but `INFO` for {}s; \
         t = time since the load ended. Own count: redis's `used_memory`, ringcache's \
         keyspace `bytes`.",
        EXPIRY_TTL.as_millis(),
        EXPIRY_WATCH.as_secs()
    )?;
    writeln!(out)?;
    writeln!(out, "| | redis-server | ringcache |")?;
    writeln!(out, "|---|---:|---:|")?;
    let both = |f: &dyn Fn(&Expiry) -> String| (f(&redis), f(&node));
    let rows: [(&str, (String, String)); 7] = [
        (
            "RSS empty / loaded, MiB",
            both(&|e| format!("{:.1} / {:.1}", mib(e.empty.rss), mib(e.loaded().rss))),
        ),
        (
            "own count empty / loaded, MiB",
            both(&|e| format!("{:.1} / {:.1}", mib(e.empty.own), mib(e.loaded().own))),
        ),
        (
            "keys at the end of the load",
            both(&|e| e.loaded().keys.to_string()),
        ),
        (
            "first sample with no key, t",
            both(&|e| {
                e.emptied().map_or_else(
                    || "never".to_owned(),
                    |s| format!("{:.1} s", s.at.as_secs_f64()),
                )
            }),
        ),
        (
            "keys at the last sample",
            both(&|e| format!("{} (t = {:.1} s)", e.last().keys, e.last().at.as_secs_f64())),
        ),
        (
            "RSS at the last sample, MiB (growth left, of the load's)",
            both(&|e| {
                let grown = e.loaded().rss.saturating_sub(e.empty.rss).max(1);
                let left = e.last().rss.saturating_sub(e.empty.rss);
                format!(
                    "{:.1} ({:.0}%)",
                    mib(e.last().rss),
                    100.0 * left as f64 / grown as f64
                )
            }),
        ),
        (
            "own count at the last sample, MiB (growth left)",
            both(&|e| {
                let grown = e.loaded().own.saturating_sub(e.empty.own).max(1);
                let left = e.last().own.saturating_sub(e.empty.own);
                format!(
                    "{:.1} ({:.0}%)",
                    mib(e.last().own),
                    100.0 * left as f64 / grown as f64
                )
            }),
        ),
    ];
    for (name, (r, n)) in rows {
        writeln!(out, "| {name} | {r} | {n} |")?;
    }
    writeln!(out)?;
    writeln!(out, "Every sample (t s: keys, RSS MiB, own MiB):")?;
    writeln!(out)?;
    for (kind, e) in [(Kind::Redis, &redis), (Kind::Ringcache, &node)] {
        let samples: Vec<String> = e
            .samples
            .iter()
            .map(|s| {
                format!(
                    "{:.1}: {}, {:.0}, {:.0}",
                    s.at.as_secs_f64(),
                    s.keys,
                    mib(s.rss),
                    mib(s.own)
                )
            })
            .collect();
        writeln!(out, "- {}: {}", kind.name(), samples.join("; "))?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "The ratios compare RSS with RSS. Both servers run as in the `resp` suite \
         (pinned to CPU {server_cpu}; the node with one worker thread and this config):"
    )?;
    writeln!(out)?;
    writeln!(out, "```toml\n{}```", node_config_shown())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_have_fixed_sizes() {
        assert_eq!(key(42), "key:0000042");
        assert_eq!(value(42, 100).len(), 100);
        assert!(value(42, 1024).ends_with("042"));
        let mut out = Vec::new();
        request(&mut out, &[b"SET", b"k", b"v"]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n");
    }

    #[test]
    fn info_fields_and_rss_parse() {
        assert_eq!(
            sub_field("keys=3,bytes=42,evictions=0", "bytes").unwrap(),
            42
        );
        assert!(sub_field("keys=3", "bytes").is_err());
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmRSS:\t  1024 kB\nVmData: 1 kB\n"),
            Some(1024 * 1024)
        );
    }
}

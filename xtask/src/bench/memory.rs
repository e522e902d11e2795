//! The `memory` suite: bytes per item for 1,000,000 100-byte values, the
//! node against `redis-server`.
//!
//! Each server is started fresh, its memory read, the same keys
//! (`key:0000000` ...) loaded through RESP by a pipelined writer here, the
//! count checked (and, for the node, that nothing was evicted), and its
//! memory read again. The deltas per item are compared like with like: the
//! resident set (`VmRSS` of `/proc/PID/status`) of both, beside redis's own
//! allocator count (`used_memory`) and the node's own accounting (the
//! weighted bytes of its keyspace: key + value + a fixed overhead).

use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::{
    Ctx,
    resp::{Kind, Server, node_config_shown},
};

/// Size of every value, in bytes.
const VALUE_BYTES: usize = 100;
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

/// The value of item `i`: its number, zero-padded to [`VALUE_BYTES`], so
/// that no two values are equal.
fn value(i: usize) -> String {
    format!("{i:0>VALUE_BYTES$}")
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

/// SETs `items` keys with their values, `BATCH` at a time.
async fn load(ctx: &Ctx, addr: SocketAddr, items: usize) -> Result<()> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("failed to connect to {addr}"))?;
    let mut out = Vec::new();
    let mut replies = Vec::new();
    for first in (0..items).step_by(BATCH) {
        if ctx.cancel.is_cancelled() {
            bail!("interrupted while loading");
        }
        out.clear();
        let last = (first + BATCH).min(items);
        for i in first..last {
            request(&mut out, &[b"SET", key(i).as_bytes(), value(i).as_bytes()]);
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
async fn info(addr: SocketAddr) -> Result<Vec<(String, String)>> {
    let output = tokio::time::timeout(
        IO_TIMEOUT,
        tokio::process::Command::new("redis-cli")
            .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
            .arg("INFO")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("redis-cli INFO timed out")?
    .context("failed to run redis-cli")?;
    if !output.status.success() {
        bail!("redis-cli INFO failed ({})", output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

fn field<'a>(info: &'a [(String, String)], name: &str) -> Result<&'a str> {
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
fn rss_bytes(pid: u32) -> Result<u64> {
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
    /// redis: `used_memory` delta; the node: weighted bytes of its keyspace.
    own_per_item: f64,
    rss_after: u64,
}

async fn measure(ctx: &Ctx, kind: Kind, cpu: usize, items: usize) -> Result<Measured> {
    let mut server = Server::start(ctx, kind, cpu, "memory").await?;
    let before_info = info(server.addr).await?;
    let rss_before = rss_bytes(server.pid())?;
    eprintln!(
        "xtask: bench memory: loading {items} items into {}",
        kind.name()
    );
    load(ctx, server.addr, items).await?;
    server.check_alive()?;
    let after_info = info(server.addr).await?;
    let rss_after = rss_bytes(server.pid())?;
    let per_item = |before: u64, after: u64| after.saturating_sub(before) as f64 / items as f64;
    let own_per_item = match kind {
        Kind::Redis => {
            let keys = sub_field(field(&after_info, "db0")?, "keys")?;
            if keys != items as u64 {
                bail!("redis-server holds {keys} keys after loading {items}");
            }
            let used = |info: &[(String, String)]| -> Result<u64> {
                field(info, "used_memory")?
                    .parse()
                    .context("used_memory is not a number")
            };
            per_item(used(&before_info)?, used(&after_info)?)
        }
        Kind::Ringcache => {
            let keyspace = field(&after_info, "keyspace_default")?;
            let keys = sub_field(keyspace, "keys")?;
            let evictions = sub_field(keyspace, "evictions")?;
            if keys != items as u64 || evictions != 0 {
                bail!(
                    "the node holds {keys} keys after loading {items} \
                     ({evictions} evicted): its capacity is too small"
                );
            }
            sub_field(keyspace, "bytes")? as f64 / items as f64
        }
    };
    server.stop().await?;
    Ok(Measured {
        rss_per_item: per_item(rss_before, rss_after),
        own_per_item,
        rss_after,
    })
}

pub async fn run(ctx: &Ctx) -> Result<String> {
    let (server_cpu, _) = ctx.cpus();
    let items = items(ctx);
    let redis = measure(ctx, Kind::Redis, server_cpu, items).await?;
    let node = measure(ctx, Kind::Ringcache, server_cpu, items).await?;
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let mut out = String::new();
    writeln!(
        out,
        "{items} keys (`key:0000000` ...) with {VALUE_BYTES}-byte values, SET through RESP in \
         pipelined batches of {BATCH} into a freshly started server; per item = growth / {items}."
    )?;
    writeln!(out)?;
    writeln!(out, "| | redis-server | ringcache | ringcache / redis |")?;
    writeln!(out, "|---|---:|---:|---:|")?;
    writeln!(
        out,
        "| RSS growth per item (`VmRSS`), bytes | {:.1} | {:.1} | {:.2}x |",
        redis.rss_per_item,
        node.rss_per_item,
        node.rss_per_item / redis.rss_per_item
    )?;
    writeln!(
        out,
        "| own accounting per item, bytes | {:.1} (`used_memory` growth) | {:.1} (keyspace `bytes`: entries and index as glibc charges them) | |",
        redis.own_per_item, node.own_per_item
    )?;
    writeln!(
        out,
        "| RSS after loading, MiB | {:.1} | {:.1} | |",
        mib(redis.rss_after),
        mib(node.rss_after)
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "The ratio compares RSS with RSS. Both servers run as in the `resp` suite \
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
        assert_eq!(value(42).len(), VALUE_BYTES);
        assert!(value(42).ends_with("042"));
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

//! In-process tests of the node's Redis-protocol (RESP2) listener: raw
//! frames over TCP, the `redis` client crate, and the `redis-cli` program,
//! all against a node started with `cache_node::run` on port 0.

use std::net::SocketAddr;
use std::time::Duration;

mod common;

use common::{TestNode, http_get};
use ringcache_proto::v1;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A reply as the test reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum R {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<R>),
}

fn bulk(s: &str) -> R {
    R::Bulk(Some(s.as_bytes().to_vec()))
}

fn ok() -> R {
    R::Simple("OK".into())
}

/// A raw RESP connection.
struct Conn {
    stream: BufReader<TcpStream>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        Conn {
            stream: BufReader::new(TcpStream::connect(addr).await.unwrap()),
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.get_mut().write_all(bytes).await.unwrap();
    }

    /// Sends one command as a multibulk frame.
    async fn send(&mut self, args: &[&str]) {
        self.send_raw(&frame(args)).await;
    }

    async fn call(&mut self, args: &[&str]) -> R {
        self.send(args).await;
        self.read().await
    }

    async fn read(&mut self) -> R {
        Box::pin(read_reply(&mut self.stream))
            .await
            .expect("a reply before the connection closed")
    }

    /// True when the server closed the connection (after any replies).
    async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.stream.read_to_end(&mut rest)).await,
            Ok(Ok(0))
        )
    }
}

fn frame(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

async fn read_reply(stream: &mut BufReader<TcpStream>) -> Option<R> {
    let mut line = String::new();
    if stream.read_line(&mut line).await.unwrap() == 0 {
        return None;
    }
    let line = line
        .strip_suffix("\r\n")
        .unwrap_or_else(|| panic!("reply line without CRLF: {line:?}"));
    let (kind, rest) = line.split_at(1);
    Some(match kind {
        "+" => R::Simple(rest.into()),
        "-" => R::Error(rest.into()),
        ":" => R::Int(rest.parse().unwrap()),
        "$" => {
            let len: i64 = rest.parse().unwrap();
            if len < 0 {
                R::Bulk(None)
            } else {
                let mut data = vec![0; len as usize + 2];
                stream.read_exact(&mut data).await.unwrap();
                assert_eq!(&data[len as usize..], b"\r\n");
                data.truncate(len as usize);
                R::Bulk(Some(data))
            }
        }
        "*" => {
            let len: i64 = rest.parse().unwrap();
            let mut items = Vec::new();
            for _ in 0..len.max(0) {
                items.push(Box::pin(read_reply(stream)).await.unwrap());
            }
            R::Array(items)
        }
        other => panic!("unknown reply type {other:?} in {line:?}"),
    })
}

fn is_error(reply: &R, prefix: &str) -> bool {
    matches!(reply, R::Error(text) if text.starts_with(prefix))
}

#[tokio::test]
async fn strings_and_keys() {
    let node = TestNode::start("").await;
    let mut c = Conn::open(node.resp_addr).await;
    assert_eq!(c.call(&["PING"]).await, R::Simple("PONG".into()));
    assert_eq!(c.call(&["ping", "hi"]).await, bulk("hi"));
    assert_eq!(c.call(&["ECHO", "a\r\nb"]).await, bulk("a\r\nb"));
    assert_eq!(c.call(&["GET", "k"]).await, R::Bulk(None));
    assert_eq!(c.call(&["SET", "k", "v1"]).await, ok());
    assert_eq!(c.call(&["GET", "k"]).await, bulk("v1"));
    // NX only when absent, XX only when present; a refused SET is nil.
    assert_eq!(c.call(&["SET", "k", "v2", "NX"]).await, R::Bulk(None));
    assert_eq!(c.call(&["SET", "k", "v2", "XX"]).await, ok());
    assert_eq!(c.call(&["SET", "other", "x", "xx"]).await, R::Bulk(None));
    assert_eq!(c.call(&["SET", "other", "x", "nx"]).await, ok());
    assert_eq!(c.call(&["GET", "k"]).await, bulk("v2"));
    assert!(is_error(
        &c.call(&["SET", "k", "v", "NX", "XX"]).await,
        "ERR syntax error"
    ));
    assert!(is_error(
        &c.call(&["SET", "k", "v", "EX", "0"]).await,
        "ERR invalid expire time"
    ));
    assert!(is_error(
        &c.call(&["SET", "k", "v", "KEEPTTL"]).await,
        "ERR syntax error"
    ));
    assert_eq!(
        c.call(&["EXISTS", "k", "other", "none", "k"]).await,
        R::Int(3)
    );
    assert_eq!(c.call(&["DEL", "k", "none"]).await, R::Int(1));
    assert_eq!(c.call(&["EXISTS", "k"]).await, R::Int(0));
    assert_eq!(c.call(&["MSET", "a", "1", "b", "2"]).await, ok());
    assert_eq!(
        c.call(&["MGET", "a", "missing", "b"]).await,
        R::Array(vec![bulk("1"), R::Bulk(None), bulk("2")])
    );
    assert!(is_error(
        &c.call(&["MSET", "a", "1", "b"]).await,
        "ERR wrong number of arguments"
    ));
    assert_eq!(c.call(&["DBSIZE"]).await, R::Int(3));
    node.shutdown().await;
}

#[tokio::test]
async fn counters() {
    let node = TestNode::start("").await;
    let mut c = Conn::open(node.resp_addr).await;
    assert_eq!(c.call(&["INCR", "n"]).await, R::Int(1));
    assert_eq!(c.call(&["INCRBY", "n", "41"]).await, R::Int(42));
    assert_eq!(c.call(&["DECR", "n"]).await, R::Int(41));
    assert_eq!(c.call(&["DECRBY", "n", "-9"]).await, R::Int(50));
    assert_eq!(c.call(&["GET", "n"]).await, bulk("50"));
    assert_eq!(c.call(&["SET", "s", "abc"]).await, ok());
    assert!(is_error(
        &c.call(&["INCR", "s"]).await,
        "ERR value is not an integer or out of range"
    ));
    assert_eq!(c.call(&["SET", "max", &i64::MAX.to_string()]).await, ok());
    assert!(is_error(&c.call(&["INCR", "max"]).await, "ERR increment"));
    assert!(is_error(
        &c.call(&["INCRBY", "n", "x"]).await,
        "ERR value is not an integer"
    ));
    node.shutdown().await;
}

#[tokio::test]
async fn ttls_behave_like_redis() {
    let node = TestNode::start("").await;
    let mut c = Conn::open(node.resp_addr).await;
    assert_eq!(c.call(&["TTL", "none"]).await, R::Int(-2));
    assert_eq!(c.call(&["PTTL", "none"]).await, R::Int(-2));
    assert_eq!(c.call(&["SET", "k", "v"]).await, ok());
    assert_eq!(c.call(&["TTL", "k"]).await, R::Int(-1));
    assert_eq!(c.call(&["EXPIRE", "k", "100"]).await, R::Int(1));
    assert_eq!(c.call(&["TTL", "k"]).await, R::Int(100));
    assert_eq!(c.call(&["PEXPIRE", "k", "50000"]).await, R::Int(1));
    let R::Int(ms) = c.call(&["PTTL", "k"]).await else {
        panic!("PTTL is an integer");
    };
    assert!((49_000..=50_000).contains(&ms), "{ms}");
    assert_eq!(c.call(&["EXPIRE", "none", "10"]).await, R::Int(0));
    // A TTL in the past deletes, as in Redis.
    assert_eq!(c.call(&["EXPIRE", "k", "0"]).await, R::Int(1));
    assert_eq!(c.call(&["GET", "k"]).await, R::Bulk(None));
    assert_eq!(c.call(&["SET", "e", "v", "EX", "30"]).await, ok());
    assert_eq!(c.call(&["TTL", "e"]).await, R::Int(30));
    // Expiry: the entry is gone once its TTL has passed.
    assert_eq!(c.call(&["SET", "p", "v", "PX", "100"]).await, ok());
    assert_eq!(c.call(&["GET", "p"]).await, bulk("v"));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(c.call(&["GET", "p"]).await, R::Bulk(None));
    assert_eq!(c.call(&["TTL", "p"]).await, R::Int(-2));
    node.shutdown().await;
}

#[tokio::test]
async fn connection_commands_start_a_redis_cli_session() {
    let node = TestNode::start("").await;
    let mut c = Conn::open(node.resp_addr).await;
    assert_eq!(c.call(&["SELECT", "0"]).await, ok());
    assert!(is_error(
        &c.call(&["SELECT", "1"]).await,
        "ERR DB index is out of range"
    ));
    assert_eq!(c.call(&["COMMAND", "DOCS"]).await, R::Array(vec![]));
    assert!(matches!(c.call(&["COMMAND", "COUNT"]).await, R::Int(n) if n > 20));
    assert_eq!(c.call(&["CONFIG", "GET", "save"]).await, R::Array(vec![]));
    assert_eq!(c.call(&["CLIENT", "SETNAME", "me"]).await, ok());
    assert_eq!(c.call(&["CLIENT", "GETNAME"]).await, bulk("me"));
    let R::Bulk(Some(info)) = c.call(&["INFO"]).await else {
        panic!("INFO is a bulk string");
    };
    let info = String::from_utf8(info).unwrap();
    assert!(info.contains("redis_version:"), "{info}");
    assert!(info.contains("db0:keys=0"), "{info}");
    assert!(is_error(
        &c.call(&["AUTH", "pw"]).await,
        "ERR AUTH <password> called without any password configured"
    ));
    assert_eq!(c.call(&["QUIT"]).await, ok());
    assert!(c.closed().await);
    node.shutdown().await;
}

#[tokio::test]
async fn a_pipeline_is_answered_in_order() {
    let node = TestNode::start("").await;
    let mut c = Conn::open(node.resp_addr).await;
    let mut batch = Vec::new();
    for i in 0..500 {
        batch.extend(frame(&["SET", &format!("k{i}"), &format!("v{i}")]));
        batch.extend(frame(&["GET", &format!("k{i}")]));
        batch.extend(frame(&["INCR", "count"]));
    }
    // Inline commands and empty frames mix in.
    batch.extend_from_slice(b"*0\r\nPING\r\n\r\nECHO \"a b\"\r\n");
    c.send_raw(&batch).await;
    for i in 0..500 {
        assert_eq!(c.read().await, ok());
        assert_eq!(c.read().await, bulk(&format!("v{i}")));
        assert_eq!(c.read().await, R::Int(i + 1));
    }
    assert_eq!(c.read().await, R::Simple("PONG".into()));
    assert_eq!(c.read().await, bulk("a b"));
    node.shutdown().await;
}

#[tokio::test]
async fn command_errors_keep_the_connection_usable() {
    let node = TestNode::start("").await;
    let mut c = Conn::open(node.resp_addr).await;
    let reply = c.call(&["FLUSHALL", "x"]).await;
    assert!(
        is_error(&reply, "ERR unknown command 'FLUSHALL'"),
        "{reply:?}"
    );
    assert!(is_error(
        &c.call(&["GET"]).await,
        "ERR wrong number of arguments for 'get' command"
    ));
    assert!(is_error(&c.call(&["GET", ""]).await, "ERR key is empty"));
    let long_key = "x".repeat(2000);
    assert!(is_error(
        &c.call(&["SET", &long_key, "v"]).await,
        "ERR key of 2000 bytes exceeds max_key_bytes (1024)"
    ));
    assert!(is_error(
        &c.call(&["SET", "k", "v", "EX", "99999999"]).await,
        "ERR ttl of"
    ));
    assert_eq!(c.call(&["PING"]).await, R::Simple("PONG".into()));
    node.shutdown().await;
}

#[tokio::test]
async fn a_protocol_error_is_answered_then_the_connection_closes() {
    let node = TestNode::start("").await;
    let mut c = Conn::open(node.resp_addr).await;
    c.send_raw(b"*1\r\n+PING\r\n").await;
    assert!(is_error(
        &c.read().await,
        "ERR Protocol error: expected '$'"
    ));
    assert!(c.closed().await);
    // Other connections are unaffected.
    let mut other = Conn::open(node.resp_addr).await;
    assert_eq!(other.call(&["PING"]).await, R::Simple("PONG".into()));
    node.shutdown().await;
}

#[tokio::test]
async fn oversized_frames_are_refused_before_their_bytes_arrive() {
    let node = TestNode::start("[limits]\nmax_value_bytes = 4096\nmax_batch_keys = 10\n").await;
    // A bulk string of 100 MB is announced but never sent: the refusal and
    // the close come from the header alone.
    let mut c = Conn::open(node.resp_addr).await;
    c.send_raw(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100000000\r\n")
        .await;
    let reply = c.read().await;
    assert!(
        is_error(&reply, "ERR Protocol error: bulk string of 100000000 bytes"),
        "{reply:?}"
    );
    assert!(c.closed().await);
    // An array above 2 * max_batch_keys + 1 elements.
    let mut c = Conn::open(node.resp_addr).await;
    c.send_raw(b"*22\r\n").await;
    let reply = c.read().await;
    assert!(
        is_error(&reply, "ERR Protocol error: multibulk of 22 elements"),
        "{reply:?}"
    );
    assert!(c.closed().await);
    // An inline line above 64 KiB with no end in sight.
    let mut c = Conn::open(node.resp_addr).await;
    c.send_raw(&vec![b'a'; 70 * 1024]).await;
    assert!(is_error(
        &c.read().await,
        "ERR Protocol error: too big inline request"
    ));
    assert!(c.closed().await);
    // Within the frame limits, the store's own limits answer and the
    // connection stays.
    let mut c = Conn::open(node.resp_addr).await;
    let keys: Vec<String> = (0..11).map(|i| format!("k{i}")).collect();
    let mut mget = vec!["MGET"];
    mget.extend(keys.iter().map(String::as_str));
    assert!(is_error(
        &c.call(&mget).await,
        "ERR batch of 11 keys exceeds max_batch_keys (10)"
    ));
    assert_eq!(c.call(&["PING"]).await, R::Simple("PONG".into()));
    node.shutdown().await;
}

#[tokio::test]
async fn keyspace_prefixes_map_to_keyspaces() {
    let node = TestNode::start("[keyspaces.users]\n").await;
    let mut c = Conn::open(node.resp_addr).await;
    assert_eq!(c.call(&["SET", "users:42", "ann"]).await, ok());
    assert_eq!(c.call(&["SET", "orders:7", "x"]).await, ok());
    assert_eq!(c.call(&["SET", "users:", "empty rest"]).await, ok());
    let mut grpc = node.client.clone();
    let get = |keyspace: &str, key: &str| v1::GetRequest {
        keyspace: keyspace.into(),
        key: key.as_bytes().to_vec().into(),
    };
    let entry = |r: tonic::Response<v1::GetResponse>| r.into_inner().entry.map(|e| e.value);
    // `users` exists: the prefix is its name.
    assert_eq!(
        entry(grpc.get(get("users", "42")).await.unwrap()),
        Some("ann".into())
    );
    // `orders` does not: the whole key is a key of `default`.
    assert_eq!(
        entry(grpc.get(get("default", "orders:7")).await.unwrap()),
        Some("x".into())
    );
    assert_eq!(
        entry(grpc.get(get("default", "users:")).await.unwrap()),
        Some("empty rest".into())
    );
    // And gRPC writes are read through RESP.
    grpc.set(v1::SetRequest {
        keyspace: "users".into(),
        item: Some(v1::SetItem {
            key: "7".into(),
            value: "bob".into(),
            version: 3,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    assert_eq!(c.call(&["GET", "users:7"]).await, bulk("bob"));
    assert_eq!(
        c.call(&["MGET", "users:7", "users:42", "default:x"]).await,
        R::Array(vec![bulk("bob"), bulk("ann"), R::Bulk(None)])
    );
    node.shutdown().await;
}

#[tokio::test]
async fn the_default_keyspace_is_configurable() {
    let node = TestNode::start("resp_default_keyspace = \"plain\"\n[keyspaces.plain]\n").await;
    let mut c = Conn::open(node.resp_addr).await;
    assert_eq!(c.call(&["SET", "k", "v"]).await, ok());
    let mut grpc = node.client.clone();
    let reply = grpc
        .get(v1::GetRequest {
            keyspace: "plain".into(),
            key: "k".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.entry.unwrap().value, "v");
    node.shutdown().await;
}

#[tokio::test]
async fn auth_is_required_when_a_password_is_set() {
    let node = TestNode::start("resp_password = \"s3cret\"\n").await;
    let mut c = Conn::open(node.resp_addr).await;
    assert!(is_error(&c.call(&["GET", "k"]).await, "NOAUTH"));
    assert!(is_error(&c.call(&["PING"]).await, "NOAUTH"));
    assert!(is_error(&c.call(&["AUTH", "wrong"]).await, "WRONGPASS"));
    assert!(is_error(
        &c.call(&["AUTH", "someone", "s3cret"]).await,
        "WRONGPASS"
    ));
    assert_eq!(c.call(&["AUTH", "s3cret"]).await, ok());
    assert_eq!(c.call(&["SET", "k", "v"]).await, ok());
    let mut other = Conn::open(node.resp_addr).await;
    assert_eq!(other.call(&["AUTH", "default", "s3cret"]).await, ok());
    assert_eq!(other.call(&["GET", "k"]).await, bulk("v"));
    node.shutdown().await;
}

#[tokio::test]
async fn commands_are_counted_in_the_metrics() {
    let node = TestNode::start("").await;
    let mut c = Conn::open(node.resp_addr).await;
    assert_eq!(c.call(&["SET", "k", "v"]).await, ok());
    assert_eq!(c.call(&["GET", "k"]).await, bulk("v"));
    assert_eq!(c.call(&["GET", "k"]).await, bulk("v"));
    assert!(is_error(&c.call(&["NOPE"]).await, "ERR unknown command"));
    let text = http_get(node.metrics_addr, "/metrics").await;
    for line in [
        "ringcache_node_resp_command_duration_seconds_count{command=\"get\"} 2",
        "ringcache_node_resp_command_duration_seconds_count{command=\"set\"} 1",
        "ringcache_node_resp_errors_total{command=\"unknown\"} 1",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_idle_connections() {
    let node = TestNode::start("").await;
    let mut c = Conn::open(node.resp_addr).await;
    assert_eq!(c.call(&["PING"]).await, R::Simple("PONG".into()));
    let addr = node.resp_addr;
    node.shutdown().await;
    assert!(c.closed().await);
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn the_redis_crate_works_unchanged() {
    let node = TestNode::start("[keyspaces.users]\n").await;
    let url = format!("redis://{}/", node.resp_addr);
    // The crate's synchronous client, on a blocking thread.
    tokio::task::spawn_blocking(move || {
        let client = redis::Client::open(url).unwrap();
        let mut con = client.get_connection().unwrap();
        let () = redis::cmd("SET").arg("k").arg("v").query(&mut con).unwrap();
        let value: String = redis::cmd("GET").arg("k").query(&mut con).unwrap();
        assert_eq!(value, "v");
        let missing: Option<String> = redis::cmd("GET").arg("nope").query(&mut con).unwrap();
        assert_eq!(missing, None);
        let () = redis::cmd("MSET")
            .arg("users:1")
            .arg("ann")
            .arg("users:2")
            .arg("bob")
            .query(&mut con)
            .unwrap();
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&["users:1", "users:2", "users:3"])
            .query(&mut con)
            .unwrap();
        assert_eq!(values, [Some("ann".into()), Some("bob".into()), None]);
        let (count, got, ttl): (i64, String, i64) = redis::pipe()
            .cmd("SET")
            .arg("p")
            .arg("1")
            .arg("EX")
            .arg(60)
            .ignore()
            .cmd("INCR")
            .arg("p")
            .cmd("GET")
            .arg("k")
            .cmd("TTL")
            .arg("p")
            .query(&mut con)
            .unwrap();
        assert_eq!((count, got.as_str(), ttl), (2, "v", 60));
        let err = redis::cmd("INCR")
            .arg("k")
            .query::<i64>(&mut con)
            .unwrap_err();
        assert!(err.to_string().contains("not an integer"), "{err}");
        let pong: String = redis::cmd("PING").query(&mut con).unwrap();
        assert_eq!(pong, "PONG");
    })
    .await
    .unwrap();
    node.shutdown().await;
}

/// A program of Debian's `redis-tools` (`redis-cli`, `redis-benchmark`)
/// from PATH; `cargo xtask test` installs the package when missing.
fn redis_tool(name: &str) -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not on PATH: install Debian's redis-tools \
                 (`apt-get install -y redis-tools`; `cargo xtask test` does it when run as root)"
            )
        })
}

fn redis_cli() -> std::path::PathBuf {
    redis_tool("redis-cli")
}

async fn run_redis_cli(addr: SocketAddr, args: &[&str], stdin: Option<&[u8]>) -> String {
    let mut command = tokio::process::Command::new(redis_cli());
    command
        .arg("-h")
        .arg(addr.ip().to_string())
        .arg("-p")
        .arg(addr.port().to_string())
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("redis-cli starts");
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).await.unwrap();
    }
    drop(input);
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("redis-cli finishes")
        .unwrap();
    assert!(
        output.status.success(),
        "redis-cli {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn redis_cli_works_unchanged() {
    let node = TestNode::start("").await;
    let addr = node.resp_addr;
    assert_eq!(run_redis_cli(addr, &["PING"], None).await, "PONG\n");
    assert_eq!(
        run_redis_cli(addr, &["SET", "k", "hello"], None).await,
        "OK\n"
    );
    assert_eq!(run_redis_cli(addr, &["GET", "k"], None).await, "hello\n");
    assert_eq!(run_redis_cli(addr, &["INCR", "n"], None).await, "1\n");
    assert_eq!(run_redis_cli(addr, &["TTL", "k"], None).await, "-1\n");
    // Mass insertion: `--pipe` sends raw frames and checks every reply.
    let mut frames = Vec::new();
    for i in 0..1000 {
        frames.extend(frame(&["SET", &format!("bulk{i}"), &i.to_string()]));
    }
    let out = run_redis_cli(addr, &["--pipe"], Some(&frames)).await;
    assert!(out.contains("errors: 0, replies: 1000"), "{out}");
    assert_eq!(
        run_redis_cli(addr, &["GET", "bulk999"], None).await,
        "999\n"
    );
    assert_eq!(run_redis_cli(addr, &["DBSIZE"], None).await, "1002\n");
    node.shutdown().await;
}

/// `redis-benchmark`, unchanged, runs its SET, GET, INCR and MSET tests
/// against the listener, pipelined, and every one of them completes with
/// its keys in the store afterwards.
#[tokio::test]
async fn redis_benchmark_works_unchanged() {
    let node = TestNode::start("").await;
    let addr = node.resp_addr;
    let mut command = tokio::process::Command::new(redis_tool("redis-benchmark"));
    command
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args([
            "-t",
            "set,get,incr,mset",
            "-n",
            "2000",
            "-c",
            "5",
            "-P",
            "8",
        ])
        .args(["-d", "100", "-r", "500", "-e", "--csv"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("redis-benchmark finishes")
        .expect("redis-benchmark starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "redis-benchmark failed: {stdout}{stderr}"
    );
    // `-e` prints every error reply the server sent.
    assert!(
        !stdout.contains("Error") && !stderr.contains("Error from server"),
        "{stdout}{stderr}"
    );
    // CSV: a header, then `"TEST","rps",...` per test.
    let mut seen = Vec::new();
    for line in stdout.lines().skip(1) {
        let fields: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
        let rps: f64 = fields[1].parse().unwrap_or_else(|_| panic!("{line}"));
        assert!(rps > 0.0, "{line}");
        seen.push(fields[0].split(' ').next().unwrap().to_owned());
    }
    assert_eq!(seen, ["SET", "GET", "INCR", "MSET"], "{stdout}");
    // Keys are `key:` and 12 digits below 500 (`-r 500`), values 100 bytes;
    // INCR's counter is `counter:` and 12 digits.
    let mut conn = Conn::open(addr).await;
    let keys = match conn.call(&["DBSIZE"]).await {
        R::Int(n) => n,
        other => panic!("DBSIZE answered {other:?}"),
    };
    assert!(keys > 0 && keys <= 1000, "{keys} keys");
    node.shutdown().await;
}

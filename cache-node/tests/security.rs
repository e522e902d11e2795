//! TLS, bearer tokens, keyspace permissions and rate limits, end to end on
//! an in-process node: gRPC with the generated client, RESP and metrics over
//! raw (TLS) streams. Certificates are generated per test with rcgen.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cache_node::{Config, Listeners};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use ringcache_proto::v1::{self, cache_node_client::CacheNodeClient};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How long a test waits for a condition it polls for.
const DEADLINE: Duration = Duration::from_secs(30);

/// A CA and the PEM of certificates it signs.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        Pki {
            ca: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A leaf certificate for `names` and its key, as PEM.
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

struct Node {
    grpc: SocketAddr,
    metrics: SocketAddr,
    resp: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<cache_node::Result<()>>,
}

impl Node {
    async fn start(toml: &str) -> Node {
        let mut config = Config::from_toml(toml).expect("test config parses");
        config.resolve_secrets().unwrap();
        config.validate().expect("test config is valid");
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let resp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addrs = (
            grpc.local_addr().unwrap(),
            metrics.local_addr().unwrap(),
            resp.local_addr().unwrap(),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(cache_node::run(
            config,
            Listeners {
                grpc,
                metrics: Some(metrics),
                resp: Some(resp),
            },
            async {
                let _ = stopped.await;
            },
        ));
        Node {
            grpc: addrs.0,
            metrics: addrs.1,
            resp: addrs.2,
            stop: Some(stop),
            task,
        }
    }

    async fn shutdown(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }

    async fn plain_client(&self) -> CacheNodeClient<Channel> {
        let channel = Endpoint::from_shared(format!("http://{}", self.grpc))
            .unwrap()
            .connect_lazy();
        CacheNodeClient::new(channel)
    }

    /// Scrapes plaintext metrics.
    async fn scrape(&self) -> String {
        let mut stream = TcpStream::connect(self.metrics).await.unwrap();
        http_get(&mut stream).await
    }
}

/// Writes the PKI files of a TLS node into `dir` and returns its `[tls]`
/// section.
fn tls_section(dir: &Path, pki: &Pki, client_ca: Option<&Pki>) -> String {
    let (cert, key) = pki.leaf(&["localhost", "127.0.0.1"]);
    std::fs::write(dir.join("node.pem"), cert).unwrap();
    std::fs::write(dir.join("node.key"), key).unwrap();
    let mut section = format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        dir.join("node.pem").display(),
        dir.join("node.key").display()
    );
    if let Some(ca) = client_ca {
        std::fs::write(dir.join("client-ca.pem"), ca.ca_pem()).unwrap();
        section.push_str(&format!(
            "client_ca_file = \"{}\"\n",
            dir.join("client-ca.pem").display()
        ));
    }
    section
}

async fn tls_client(
    addr: SocketAddr,
    ca: &Pki,
    identity: Option<(String, String)>,
) -> CacheNodeClient<Channel> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.ca_pem()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy();
    CacheNodeClient::new(channel)
}

/// A raw rustls connection trusting `ca`, with an optional client identity.
async fn tls_stream(
    addr: SocketAddr,
    ca: &Pki,
    identity: Option<(String, String)>,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.ca_pem().as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    if !alpn.is_empty() {
        config.alpn_protocols = vec![alpn.to_vec()];
    }
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let mut stream = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    // TLS 1.3 reports a refused client certificate only after the
    // handshake: a first exchange makes it show.
    stream.flush().await?;
    Ok(stream)
}

/// `GET /metrics` over `stream`; the whole response.
async fn http_get(stream: &mut (impl AsyncRead + AsyncWrite + Unpin)) -> String {
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    String::from_utf8_lossy(&response).into_owned()
}

/// Sends one RESP command and reads one reply line (with the bulk payload
/// of a `$` reply); `None` when the connection closed or failed.
async fn resp_call(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    args: &[&str],
) -> Option<String> {
    let mut out = format!("*{}\r\n", args.len());
    for arg in args {
        out.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(out.as_bytes()).await.ok()?;
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        reply.push(byte[0]);
        if reply.ends_with(b"\r\n") {
            break;
        }
    }
    let line = String::from_utf8(reply).unwrap();
    if let Some(len) = line
        .strip_prefix('$')
        .and_then(|n| n.trim_end().parse::<usize>().ok())
    {
        let mut data = vec![0; len + 2];
        stream.read_exact(&mut data).await.ok()?;
        return Some(String::from_utf8_lossy(&data[..len]).into_owned());
    }
    Some(line.trim_end().to_owned())
}

fn with_token<T>(message: T, secret: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    request
}

fn get(keyspace: &str, key: &str) -> v1::GetRequest {
    v1::GetRequest {
        keyspace: keyspace.into(),
        key: key.to_owned().into(),
    }
}

fn set(keyspace: &str, key: &str) -> v1::SetRequest {
    v1::SetRequest {
        keyspace: keyspace.into(),
        item: Some(v1::SetItem {
            key: key.to_owned().into(),
            value: b"v".to_vec().into(),
            version: 1,
            ..Default::default()
        }),
    }
}

fn counter(metrics: &str, transport: &str, reason: &str) -> u64 {
    let prefix = format!(
        "ringcache_node_auth_refused_total{{transport=\"{transport}\",reason=\"{reason}\"}} "
    );
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn a_tls_node_refuses_plaintext_and_serves_clients_that_verify_it() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("ringcache test ca");
    let node = Node::start(&format!(
        "resp_password = \"pw\"\n{}",
        tls_section(dir.path(), &pki, None)
    ))
    .await;

    // gRPC: a plaintext client gets no answer; a client trusting the CA
    // does; a client trusting another CA refuses the node.
    let err = node
        .plain_client()
        .await
        .get(get("default", "k"))
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    let mut client = tls_client(node.grpc, &pki, None).await;
    client.set(set("default", "k")).await.unwrap();
    let hit = client.get(get("default", "k")).await.unwrap().into_inner();
    assert_eq!(hit.entry.unwrap().value, b"v".to_vec());
    let stranger = Pki::new("another ca");
    let err = tls_client(node.grpc, &stranger, None)
        .await
        .get(get("default", "k"))
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Ok, "{err}");

    // RESP: plaintext gets no reply; TLS does.
    let mut plain = TcpStream::connect(node.resp).await.unwrap();
    let reply = resp_call(&mut plain, &["PING"]).await;
    assert!(
        reply.as_deref().is_none_or(|r| !r.contains("PONG")),
        "{reply:?}"
    );
    let mut tls = tls_stream(node.resp, &pki, None, b"").await.unwrap();
    assert_eq!(resp_call(&mut tls, &["AUTH", "pw"]).await.unwrap(), "+OK");
    assert_eq!(resp_call(&mut tls, &["GET", "k"]).await.unwrap(), "v");
    assert!(tls_stream(node.resp, &stranger, None, b"").await.is_err());

    // Metrics: plaintext gets no page; TLS does.
    let page = node.scrape().await;
    assert!(!page.contains("200 OK"), "{page}");
    let mut tls = tls_stream(node.metrics, &pki, None, b"http/1.1")
        .await
        .unwrap();
    let page = http_get(&mut tls).await;
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    // The failed handshake of the plaintext RESP connection is counted.
    eventually("the failed handshake being counted", || async {
        let mut tls = tls_stream(node.metrics, &pki, None, b"http/1.1")
            .await
            .unwrap();
        counter(&http_get(&mut tls).await, "resp", "tls_handshake") >= 1
    })
    .await;
    node.shutdown().await;
}

#[tokio::test]
async fn mutual_tls_requires_a_certificate_the_client_ca_signed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new("server ca");
    let clients = Pki::new("client ca");
    let node = Node::start(&tls_section(dir.path(), &pki, Some(&clients))).await;

    let err = tls_client(node.grpc, &pki, None)
        .await
        .get(get("default", "k"))
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    let forged = Pki::new("not the client ca").leaf(&["app"]);
    let err = tls_client(node.grpc, &pki, Some(forged.clone()))
        .await
        .get(get("default", "k"))
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    let identity = clients.leaf(&["app"]);
    tls_client(node.grpc, &pki, Some(identity.clone()))
        .await
        .get(get("default", "k"))
        .await
        .unwrap();

    // RESP: without a certificate, or with a forged one, the connection
    // fails at the handshake or on first use.
    for id in [None, Some(forged)] {
        match tls_stream(node.resp, &pki, id, b"").await {
            Err(_) => {}
            Ok(mut stream) => assert_eq!(resp_call(&mut stream, &["PING"]).await, None),
        }
    }
    let mut stream = tls_stream(node.resp, &pki, Some(identity), b"")
        .await
        .unwrap();
    assert_eq!(resp_call(&mut stream, &["PING"]).await.unwrap(), "+PONG");
    node.shutdown().await;
}

/// Three tokens; the writer's secret is read from a file in `dir`.
fn tokens(dir: &Path) -> String {
    let file = dir.join("writer.token");
    std::fs::write(&file, "writer-secret\n").unwrap();
    TOKENS.replace("WRITER_SECRET_FILE", &file.display().to_string())
}

const TOKENS: &str = r#"
[keyspaces.users]
[keyspaces.orders]

[[auth.tokens]]
name = "reader"
secret = "reader-secret"
permissions = { users = "read" }

[[auth.tokens]]
name = "writer"
secret_file = "WRITER_SECRET_FILE"
permissions = { "*" = "read", users = "write" }

[[auth.tokens]]
name = "admin"
secret = "admin-secret"
permissions = { "*" = "admin" }
"#;

#[tokio::test]
async fn calls_without_a_known_token_are_unauthenticated() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&tokens(dir.path())).await;
    let mut client = node.plain_client().await;
    let err = client.get(get("users", "k")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let err = client
        .get(with_token(get("users", "k"), "wrong"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    let err = client.topology(v1::TopologyRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    client
        .get(with_token(get("users", "k"), "writer-secret"))
        .await
        .unwrap();

    // Health stays open, for probes and load balancers.
    let channel = Endpoint::from_shared(format!("http://{}", node.grpc))
        .unwrap()
        .connect_lazy();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "ringcache.v1.CacheNode".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, 1, "SERVING");

    // RESP: NOAUTH until AUTH; a wrong secret or name is WRONGPASS.
    let mut conn = TcpStream::connect(node.resp).await.unwrap();
    assert!(
        resp_call(&mut conn, &["GET", "users:k"])
            .await
            .unwrap()
            .starts_with("-NOAUTH")
    );
    let wrong = resp_call(&mut conn, &["AUTH", "reader", "writer-secret"])
        .await
        .unwrap();
    assert!(wrong.starts_with("-WRONGPASS"), "{wrong}");
    assert!(
        resp_call(&mut conn, &["AUTH", "nope"])
            .await
            .unwrap()
            .starts_with("-WRONGPASS")
    );
    assert!(
        resp_call(&mut conn, &["GET", "users:k"])
            .await
            .unwrap()
            .starts_with("-NOAUTH")
    );
    assert_eq!(
        resp_call(&mut conn, &["AUTH", "writer", "writer-secret"])
            .await
            .unwrap(),
        "+OK"
    );
    assert_eq!(
        resp_call(&mut conn, &["GET", "users:k"]).await.unwrap(),
        "$-1"
    );

    let metrics = node.scrape().await;
    assert_eq!(counter(&metrics, "grpc", "unauthenticated"), 3, "{metrics}");
    assert_eq!(counter(&metrics, "resp", "unauthenticated"), 4, "{metrics}");
    node.shutdown().await;
}

#[tokio::test]
async fn keyspace_permissions_are_enforced_on_grpc_and_resp() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(&tokens(dir.path())).await;
    let mut client = node.plain_client().await;
    fn denied<T>(result: Result<T, tonic::Status>) -> bool {
        matches!(result, Err(status) if status.code() == Code::PermissionDenied)
    }

    // reader: reads users, nothing else.
    client
        .get(with_token(get("users", "k"), "reader-secret"))
        .await
        .unwrap();
    assert!(denied(
        client
            .get(with_token(get("orders", "k"), "reader-secret"))
            .await
    ));
    assert!(denied(
        client
            .set(with_token(set("users", "k"), "reader-secret"))
            .await
    ));
    // Stats of every keyspace needs read on every keyspace.
    assert!(denied(
        client
            .stats(with_token(v1::StatsRequest::default(), "reader-secret"))
            .await
    ));
    client
        .stats(with_token(
            v1::StatsRequest {
                keyspace: "users".into(),
            },
            "reader-secret",
        ))
        .await
        .unwrap();

    // writer: writes users, reads everything, administers nothing.
    client
        .set(with_token(set("users", "k"), "writer-secret"))
        .await
        .unwrap();
    client
        .get(with_token(get("orders", "k"), "writer-secret"))
        .await
        .unwrap();
    assert!(denied(
        client
            .set(with_token(set("orders", "k"), "writer-secret"))
            .await
    ));
    let list_dirty = v1::ListDirtyRequest {
        keyspace: "users".into(),
        ..Default::default()
    };
    assert!(denied(
        client
            .list_dirty(with_token(list_dirty.clone(), "writer-secret"))
            .await
    ));
    assert!(denied(
        client
            .flush(with_token(v1::FlushRequest::default(), "writer-secret"))
            .await
    ));
    client
        .flush(with_token(
            v1::FlushRequest {
                keyspace: "users".into(),
            },
            "writer-secret",
        ))
        .await
        .unwrap();

    // admin: everything.
    client
        .list_dirty(with_token(list_dirty, "admin-secret"))
        .await
        .unwrap();
    client
        .set(with_token(set("orders", "k"), "admin-secret"))
        .await
        .unwrap();
    client
        .flush(with_token(v1::FlushRequest::default(), "admin-secret"))
        .await
        .unwrap();

    // RESP with the reader's token: reads users only; a refused multi-key
    // command does nothing, not part of its work.
    let mut conn = TcpStream::connect(node.resp).await.unwrap();
    assert_eq!(
        resp_call(&mut conn, &["AUTH", "reader", "reader-secret"])
            .await
            .unwrap(),
        "+OK"
    );
    assert_eq!(
        resp_call(&mut conn, &["GET", "users:k"]).await.unwrap(),
        "$-1"
    );
    let refused = resp_call(&mut conn, &["SET", "users:k", "v"])
        .await
        .unwrap();
    assert!(refused.starts_with("-NOPERM"), "{refused}");
    assert!(
        resp_call(&mut conn, &["GET", "orders:k"])
            .await
            .unwrap()
            .starts_with("-NOPERM")
    );
    assert!(
        resp_call(&mut conn, &["DBSIZE"])
            .await
            .unwrap()
            .starts_with("-NOPERM")
    );
    assert_eq!(resp_call(&mut conn, &["PING"]).await.unwrap(), "+PONG");
    // The writer may write users but only read orders: MSET of both is
    // refused as a whole.
    let mut writer = TcpStream::connect(node.resp).await.unwrap();
    assert_eq!(
        resp_call(&mut writer, &["AUTH", "writer-secret"])
            .await
            .unwrap(),
        "+OK"
    );
    let refused = resp_call(&mut writer, &["MSET", "users:a", "1", "orders:b", "2"])
        .await
        .unwrap();
    assert!(refused.starts_with("-NOPERM"), "{refused}");
    assert_eq!(
        resp_call(&mut writer, &["GET", "users:a"]).await.unwrap(),
        "$-1"
    );
    assert_eq!(
        resp_call(&mut writer, &["SET", "users:a", "1"])
            .await
            .unwrap(),
        "+OK"
    );

    let metrics = node.scrape().await;
    assert_eq!(
        counter(&metrics, "grpc", "permission_denied"),
        6,
        "{metrics}"
    );
    assert_eq!(
        counter(&metrics, "resp", "permission_denied"),
        4,
        "{metrics}"
    );
    node.shutdown().await;
}

/// Calls `f` until it returns true, failing after [`DEADLINE`].
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen in time"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_rate_limit_engages_and_releases() {
    // The limited token gets 1 request per second with no burst: after its
    // first request, the next ones within that second are refused; a
    // second later one passes again. The unlimited token is never refused.
    let node = Node::start(
        r#"
        [[auth.tokens]]
        name = "limited"
        secret = "limited-secret"
        permissions = { "*" = "write" }
        rate_limit = { requests = 1, per = "1s" }

        [[auth.tokens]]
        name = "other"
        secret = "other-secret"
        permissions = { "*" = "write" }
        "#,
    )
    .await;
    let mut client = node.plain_client().await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let status = loop {
        match client
            .get(with_token(get("default", "k"), "limited-secret"))
            .await
        {
            Ok(_) => assert!(
                tokio::time::Instant::now() < deadline,
                "the rate limit did not engage in time"
            ),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    assert!(
        status.message().contains("rate limit of limited exceeded"),
        "{status}"
    );
    client
        .get(with_token(get("default", "k"), "other-secret"))
        .await
        .unwrap();
    eventually("the rate limit releasing", || {
        let mut client = client.clone();
        async move {
            client
                .get(with_token(get("default", "k"), "limited-secret"))
                .await
                .is_ok()
        }
    })
    .await;

    // RESP shares the token's bucket.
    let mut conn = TcpStream::connect(node.resp).await.unwrap();
    assert_eq!(
        resp_call(&mut conn, &["AUTH", "limited", "limited-secret"])
            .await
            .unwrap(),
        "+OK"
    );
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let reply = loop {
        let reply = resp_call(&mut conn, &["GET", "k"]).await.unwrap();
        if reply.starts_with('-') {
            break reply;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the RESP rate limit did not engage in time"
        );
    };
    assert!(
        reply.starts_with("-RATELIMITED rate limit of limited exceeded"),
        "{reply}"
    );

    let metrics = node.scrape().await;
    assert!(counter(&metrics, "grpc", "rate_limited") >= 1, "{metrics}");
    assert!(counter(&metrics, "resp", "rate_limited") >= 1, "{metrics}");
    node.shutdown().await;
}

#[tokio::test]
async fn the_config_debug_output_hides_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::from_toml(&format!(
        "resp_password = \"hunter2\"\n{}",
        tokens(dir.path())
    ))
    .unwrap();
    config.resolve_secrets().unwrap();
    config.validate().unwrap();
    let shown = format!("{config:?}");
    for secret in ["hunter2", "reader-secret", "writer-secret", "admin-secret"] {
        assert!(!shown.contains(secret), "{secret} shows in {shown}");
    }
}

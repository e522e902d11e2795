//! The client library against a node with TLS and bearer tokens: it
//! verifies the node, sends its token, and treats refusals (permissions,
//! rate limits) as refusals of the request, not failures of the node. The
//! node runs in-process; certificates are generated per test with rcgen.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use cache_client::{Client, ClientConfig, ClientTls, SetOptions, Token};
use cache_node::{Config, Listeners};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use ringcache_proto::ErrorKind;
use ringcache_tests::{NodeConfig, NodeProcess};
use tokio::net::TcpListener;

struct Node {
    addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<cache_node::Result<()>>,
    ca_pem: String,
    _dir: tempfile::TempDir,
}

/// A fresh CA and a node certificate for `localhost` and `127.0.0.1`
/// written into `dir`: the CA's PEM and the node's `[tls]` table.
fn tls_files(dir: &std::path::Path) -> Result<(String, String)> {
    let ca = new_ca()?;
    let table = node_certificate(&ca, dir)?;
    Ok((ca.pem(), table))
}

/// A fresh certificate authority.
fn new_ca() -> Result<CertifiedIssuer<'static, KeyPair>> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    Ok(CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?)
}

/// A node certificate for `localhost` and `127.0.0.1` issued by `ca`,
/// written over `dir`'s `node.pem` and `node.key` (each staged and renamed,
/// as a certificate manager does): the node's `[tls]` table.
fn node_certificate(
    ca: &CertifiedIssuer<'static, KeyPair>,
    dir: &std::path::Path,
) -> Result<String> {
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?
        .signed_by(&key, ca)?;
    for (name, pem) in [("node.pem", cert.pem()), ("node.key", key.serialize_pem())] {
        let staged = dir.join(format!("{name}.new"));
        std::fs::write(&staged, pem)?;
        std::fs::rename(&staged, dir.join(name))?;
    }
    Ok(format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        dir.join("node.pem").display(),
        dir.join("node.key").display(),
    ))
}

impl Node {
    /// A node with TLS (a fresh CA) and `auth` appended to its config.
    async fn start(auth: &str) -> Result<Node> {
        let dir = tempfile::tempdir()?;
        let (ca_pem, tls) = tls_files(dir.path())?;
        let mut config = Config::from_toml(&format!("{tls}{auth}"))?;
        config.resolve_secrets()?;
        config.validate()?;
        let grpc = TcpListener::bind("127.0.0.1:0").await?;
        let addr = grpc.local_addr()?.to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(cache_node::run(
            config,
            Listeners {
                grpc,
                metrics: None,
                resp: None,
            },
            async {
                let _ = stopped.await;
            },
        ));
        Ok(Node {
            addr,
            stop: Some(stop),
            task,
            ca_pem,
            _dir: dir,
        })
    }

    fn config(&self, token: Option<&str>) -> ClientConfig {
        let config = ClientConfig::new([self.addr.clone()])
            .with_tls(ClientTls::new(self.ca_pem.clone()))
            .with_deadline(Duration::from_secs(5));
        match token {
            Some(token) => config.with_token(Token::new(token)),
            None => config,
        }
    }

    async fn shutdown(mut self) -> Result<()> {
        let _ = self.stop.take().context("stopped once")?.send(());
        self.task.await??;
        Ok(())
    }
}

const TOKENS: &str = r#"
[[auth.tokens]]
name = "app"
secret = "app-secret"
permissions = { "*" = "write" }

[[auth.tokens]]
name = "reader"
secret = "reader-secret"
permissions = { "*" = "read" }

[[auth.tokens]]
name = "limited"
secret = "limited-secret"
permissions = { "*" = "read" }
rate_limit = { requests = 1, per = "1h", burst = 3 }
"#;

#[tokio::test]
async fn the_client_verifies_the_node_and_sends_its_token() -> Result<()> {
    let node = Node::start(TOKENS).await?;

    let app = Client::connect(node.config(Some("app-secret"))).await?;
    app.set("default", "k", "v", SetOptions::new().version(1))
        .await?;
    let entry = app
        .get("default", "k")
        .await?
        .context("the value is there")?;
    ensure!(entry.value.as_ref() == b"v");

    // Without a token, or with an unknown one, the seed refuses the
    // topology: the client cannot start.
    for token in [None, Some("wrong")] {
        let err = Client::connect(node.config(token))
            .await
            .err()
            .context("connecting without a valid token must fail")?;
        ensure!(err.to_string().contains("unauthenticated"), "{err}");
    }
    // A client trusting another CA refuses the node.
    let stranger = CertifiedIssuer::self_signed(
        {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
        },
        KeyPair::generate()?,
    )?;
    let err = Client::connect(
        ClientConfig::new([node.addr.clone()])
            .with_tls(ClientTls::new(stranger.pem()))
            .with_token(Token::new("app-secret")),
    )
    .await
    .err()
    .context("a node the CA did not sign must be refused")?;
    ensure!(!err.to_string().is_empty());

    // A refused write is the request's fault: not retryable, and the node
    // stays up.
    let reader = Client::connect(node.config(Some("reader-secret"))).await?;
    reader.get("default", "k").await?;
    let err = reader
        .set("default", "k", "w", SetOptions::new().version(2))
        .await
        .err()
        .context("the reader may not write")?;
    ensure!(
        matches!(
            err,
            cache_client::Error::Refused {
                kind: ErrorKind::PermissionDenied,
                ..
            }
        ) && !err.is_retryable(),
        "{err}"
    );
    ensure!(reader.topology().members.iter().all(|m| m.up));
    node.shutdown().await
}

#[tokio::test]
async fn a_rate_limited_client_gets_a_retryable_refusal_and_keeps_the_node() -> Result<()> {
    let node = Node::start(TOKENS).await?;
    // The bucket holds 3 requests and refills one an hour: connecting and
    // a few reads use it up.
    let limited = Client::connect(node.config(Some("limited-secret"))).await?;
    let mut refusal = None;
    for _ in 0..4 {
        if let Err(err) = limited.get("default", "k").await {
            refusal = Some(err);
            break;
        }
    }
    let err = refusal.context("the rate limit must engage within the burst")?;
    ensure!(
        matches!(
            err,
            cache_client::Error::Refused {
                kind: ErrorKind::ResourceExhausted,
                ..
            }
        ) && err.is_retryable(),
        "{err}"
    );
    ensure!(
        err.to_string().contains("rate limit of limited exceeded"),
        "{err}"
    );
    ensure!(
        limited.topology().members.iter().all(|m| m.up),
        "a rate-limited node is not marked down"
    );
    node.shutdown().await
}

/// The real binaries: a node started from a config file with TLS and a
/// token read from a file, and `cachectl` with `--tls-ca` and
/// `--token-file`.
#[tokio::test]
async fn the_node_binary_and_cachectl_speak_tls_with_tokens() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ca_pem, tls) = tls_files(dir.path())?;
    let token_file = dir.path().join("app.token");
    std::fs::write(&token_file, "app-secret\n")?;
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem)?;
    let mut config = NodeConfig::single("secure-1")?;
    config.extra_tables = format!(
        "{tls}\n[[auth.tokens]]\nname = \"app\"\nsecret_file = \"{}\"\npermissions = {{ \"*\" = \"write\" }}\n",
        token_file.display()
    );
    config.tls_ca_pem = Some(ca_pem);
    config.token = Some("app-secret".to_owned());
    let node = NodeProcess::start(config).await?;

    let binary = ringcache_tests::node_binary()?.with_file_name("cachectl");
    let run = |args: &[&str]| -> Result<(bool, String)> {
        let out = std::process::Command::new(&binary)
            .env_remove("RINGCACHE_TOKEN")
            .arg("--seeds")
            .arg(node.addr().to_string())
            .args(args)
            .output()
            .with_context(|| format!("cannot run {}", binary.display()))?;
        Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8(out.stdout)?,
                String::from_utf8(out.stderr)?
            ),
        ))
    };
    let ca = ca_file.to_str().context("utf-8 path")?;
    let token = token_file.to_str().context("utf-8 path")?;
    let (ok, out) = run(&[
        "--tls-ca",
        ca,
        "--token-file",
        token,
        "set",
        "k",
        "v",
        "--version",
        "1",
    ])?;
    ensure!(ok, "{out}");
    let (ok, out) = run(&["--tls-ca", ca, "--token-file", token, "get", "k"])?;
    ensure!(ok && out.contains('v'), "{out}");
    let (ok, out) = run(&["--tls-ca", ca, "get", "k"])?;
    ensure!(!ok && out.contains("unauthenticated"), "{out}");
    let (ok, out) = run(&["--token-file", token, "get", "k"])?;
    ensure!(!ok, "a plaintext cachectl must be refused: {out}");
    // The health check (the containers' probe) needs no token but speaks
    // TLS to a TLS node, and gets no answer in plaintext.
    let (ok, out) = run(&["--tls-ca", ca, "health"])?;
    ensure!(ok && out.contains("SERVING"), "{out}");
    let (ok, out) = run(&["health"])?;
    ensure!(!ok && out.contains("UNREACHABLE"), "{out}");
    Ok(())
}

/// Issue 18: a node's certificate and its tokens rotate without a restart
/// (SIGHUP), under load, with no failed request. The rotation an operator
/// does: a certificate from a new CA the clients already trust, and the
/// new token accepted beside the old one; then the clients move to the new
/// token; then the old one is removed.
#[tokio::test]
async fn certificates_and_tokens_rotate_under_load_without_a_failed_request() -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let dir = tempfile::tempdir()?;
    let (old_ca, new_ca) = (new_ca()?, new_ca()?);
    let tls = node_certificate(&old_ca, dir.path())?;
    let token = |name: &str, secret: &str| {
        format!(
            "[[auth.tokens]]\nname = \"{name}\"\nsecret = \"{secret}\"\npermissions = {{ \"*\" = \"write\" }}\n"
        )
    };
    let mut config = NodeConfig::single("rotating-1")?;
    config.extra_tables = format!("{tls}\n{}", token("old", "old-secret"));
    // The test harness's own probes trust both CAs.
    let both = format!("{}{}", old_ca.pem(), new_ca.pem());
    config.tls_ca_pem = Some(both.clone());
    config.token = Some("old-secret".to_owned());
    let mut node = NodeProcess::start(config.clone()).await?;
    let addr = node.addr().to_string();
    let client_config = |ca: &str, secret: &str| {
        ClientConfig::new([addr.clone()])
            .with_tls(ClientTls::new(ca.to_owned()))
            .with_token(Token::new(secret))
            .with_deadline(Duration::from_secs(5))
    };
    // Whether a fresh client (a new connection, a new handshake) trusting
    // only `ca` and sending `secret` can read.
    let fresh_read = |ca: String, secret: &'static str| {
        let config = client_config(&ca, secret);
        async move {
            match Client::connect(config).await {
                Ok(client) => client
                    .get("default", "probe")
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    };

    // The load: writers on a client that trusts both CAs, as the clients
    // of a rotation are set up before it starts.
    let client = Client::connect(client_config(&both, "old-secret")).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4u64 {
        let (client, stop, done) = (client.clone(), Arc::clone(&stop), Arc::clone(&done));
        writers.spawn(async move {
            let mut failures = Vec::new();
            let mut version = 0;
            while !stop.load(Ordering::Relaxed) {
                version += 1;
                let key = format!("k{w}");
                let result = match client
                    .set("default", &key, "v", SetOptions::new().version(version))
                    .await
                {
                    Ok(_) => client.get("default", &key).await.map(|_| ()),
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.push(e.to_string()),
                }
            }
            failures
        });
    }
    let progress = |at_least: u64| {
        let done = Arc::clone(&done);
        async move {
            let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
            while done.load(Ordering::Relaxed) < at_least {
                ensure!(tokio::time::Instant::now() < give_up, "the load stalled");
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(())
        }
    };
    progress(100).await?;
    ensure!(
        fresh_read(new_ca.pem(), "old-secret").await.is_err(),
        "the new CA's certificate is not served yet"
    );

    // 1. The new certificate, and both tokens.
    let tls = node_certificate(&new_ca, dir.path())?;
    config.extra_tables = format!(
        "{tls}\n{}{}",
        token("old", "old-secret"),
        token("new", "new-secret")
    );
    node.reload(config.clone())?;
    eventually("the new certificate and token to be served", || {
        fresh_read(new_ca.pem(), "new-secret")
    })
    .await?;
    ensure!(fresh_read(new_ca.pem(), "old-secret").await.is_ok());
    let seen = done.load(Ordering::Relaxed);
    progress(seen + 100).await?;

    // 2. The clients move to the new token.
    client.set_token(Some(Token::new("new-secret")))?;
    let seen = done.load(Ordering::Relaxed);
    progress(seen + 100).await?;

    // 3. The old token is removed.
    config.extra_tables = format!("{tls}\n{}", token("new", "new-secret"));
    node.reload(config.clone())?;
    eventually("the old token to be refused", || {
        let read = fresh_read(new_ca.pem(), "old-secret");
        async move {
            match read.await {
                Err(e) if e.contains("unauthenticated") => Ok(()),
                other => Err(format!("still {other:?}")),
            }
        }
    })
    .await?;
    let seen = done.load(Ordering::Relaxed);
    progress(seen + 100).await?;

    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    while let Some(writer) = writers.join_next().await {
        failures.extend(writer?);
    }
    ensure!(
        failures.is_empty(),
        "{} request(s) failed during the rotation, first: {:?}",
        failures.len(),
        failures.first()
    );
    // A reload that cannot apply (a key that does not fit the certificate)
    // changes nothing: the node keeps serving the new certificate.
    std::fs::write(
        dir.path().join("node.key"),
        KeyPair::generate()?.serialize_pem(),
    )?;
    node.reload(config)?;
    let log = node.log_path().to_owned();
    eventually("the node to refuse the reload", || {
        let log = log.clone();
        async move {
            let text = std::fs::read_to_string(&log).map_err(|e| e.to_string())?;
            if text.contains("configuration reload failed") {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        }
    })
    .await?;
    let served = fresh_read(new_ca.pem(), "new-secret").await;
    ensure!(served.is_ok(), "after a refused reload: {served:?}");
    Ok(())
}

/// The write-back worker's half of a token rotation: on SIGHUP it reads
/// its token file again and sends the new token from then on, without a
/// restart, so that the nodes can then drop the old one; it keeps marking
/// what it stores clean throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_takes_a_rotated_token_on_sighup() -> Result<()> {
    use cache_client::producer::WriteBackConfig;
    use cache_client::strategy::{KeyspaceSettings, Strategy};
    use ringcache_tests::{WorkerConfig, WorkerExtra, WorkerProcess};

    let dir = tempfile::tempdir()?;
    let token = |name: &str, secret: &str, permission: &str| {
        format!(
            "[[auth.tokens]]\nname = \"{name}\"\nsecret = \"{secret}\"\npermissions = {{ \"*\" = \"{permission}\" }}\n"
        )
    };
    let service = token("service", "service-secret", "write");
    let mut config = NodeConfig::single("wb-rotating-1")?;
    config.extra_top_level = "unknown_keyspaces = \"create\"\n".into();
    config.extra_tables = format!("{service}{}", token("worker-old", "old-secret", "admin"));
    config.token = Some("service-secret".to_owned());
    let mut node = NodeProcess::start(config.clone()).await?;
    let (url, pg) = ringcache_tests::own_database("rc_wb_rotate").await?;
    let brokers = ringcache_tests::kafka_brokers()?;
    let keyspace = ringcache_tests::unique("wbrotate");
    let group = format!("{keyspace}_group");

    let client = Client::connect(
        ClientConfig::new([node.addr().to_string()])
            .with_token(Token::new("service-secret"))
            .with_request_timeout(Duration::from_millis(300)),
    )
    .await?;
    let mut wb = WriteBackConfig::new(&brokers);
    wb.delivery_timeout = Duration::from_secs(10);
    client.enable_write_back(wb)?;
    client.define_keyspace(
        &keyspace,
        KeyspaceSettings::new(Strategy::WriteBack),
        Some(std::sync::Arc::new(pg)),
    )?;
    client.ensure_write_back_topics().await?;
    let ks = client.keyspace(&keyspace);

    let token_file = dir.path().join("cache-token");
    std::fs::write(&token_file, "old-secret")?;
    let mut worker = WorkerProcess::start_with(
        WorkerConfig {
            brokers: brokers.clone(),
            database_url: url,
            group: group.clone(),
            keyspaces: vec![keyspace.clone()],
            cache_seeds: vec![node.addr().to_string()],
        },
        WorkerExtra {
            // Only the worker's own MarkClean may clean the entries.
            args: [
                "--cache-token-file",
                &token_file.display().to_string(),
                "--dirty-repair-interval",
                "1h",
            ]
            .map(str::to_owned)
            .to_vec(),
            env: Vec::new(),
        },
    )?;
    // Writes of `round`, until the worker marked every entry clean.
    let round = |round: u32| {
        let (ks, client, keyspace) = (ks.clone(), client.clone(), keyspace.clone());
        async move {
            for i in 0..10 {
                ks.put(format!("k{i}"), format!("v{round}-{i}")).await?;
            }
            eventually("the worker to mark the writes clean", || {
                let (client, keyspace) = (client.clone(), keyspace.clone());
                async move {
                    let mut dirty = 0;
                    for node in client.stats().await {
                        let stats = node.stats.map_err(|e| e.to_string())?;
                        dirty += stats
                            .keyspaces
                            .iter()
                            .filter(|k| k.name == keyspace)
                            .map(|k| k.dirty_items)
                            .sum::<u64>();
                    }
                    if dirty == 0 {
                        Ok(())
                    } else {
                        Err(format!("{dirty} dirty"))
                    }
                }
            })
            .await
        }
    };
    round(1).await?;

    // 1. The nodes take both tokens; 2. the worker moves to the new one.
    config.extra_tables = format!(
        "{service}{}{}",
        token("worker-old", "old-secret", "admin"),
        token("worker-new", "new-secret", "admin")
    );
    node.reload(config.clone())?;
    std::fs::write(&token_file, "new-secret")?;
    worker.sighup()?;
    worker
        .wait_log("configuration reloaded", Duration::from_secs(30))
        .await?;
    // 3. The old token is removed: the worker keeps marking clean.
    config.extra_tables = format!("{service}{}", token("worker-new", "new-secret", "admin"));
    node.reload(config)?;
    eventually("the node to drop the old token", || {
        let log = node.log_path().to_owned();
        async move {
            let text = std::fs::read_to_string(&log).map_err(|e| e.to_string())?;
            if text.matches("configuration reloaded").count() >= 2 {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        }
    })
    .await?;
    round(2).await?;
    worker.ensure_running()?;
    ensure!(
        worker.log_count("mark-clean failed")? == 0,
        "a MarkClean failed during the rotation:\n{}",
        worker.log_tail(20)
    );
    Ok(())
}

/// Retries `check` every 50 ms for up to 30 s until it succeeds.
async fn eventually<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), String>>,
{
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match check().await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= give_up => {
                anyhow::bail!("timed out waiting for {what}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

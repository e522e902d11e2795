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
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?
        .signed_by(&key, &ca)?;
    std::fs::write(dir.join("node.pem"), cert.pem())?;
    std::fs::write(dir.join("node.key"), key.serialize_pem())?;
    let table = format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        dir.join("node.pem").display(),
        dir.join("node.key").display(),
    );
    Ok((ca.pem(), table))
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

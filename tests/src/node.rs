//! The real `cache-node` binary as a child process of a test.

use std::{
    fmt::Write as _,
    fs::{self, File},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use nix::{sys::signal::Signal, unistd::Pid};
use tempfile::TempDir;

use crate::process::Guarded;
use tokio::time::Instant;
use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The health service name a node registers for its cache service (the
/// whole server is `""`).
pub const NODE_HEALTH_SERVICE: &str = "ringcache.v1.CacheNode";

/// How long [`NodeProcess::start`] waits for a node to report SERVING.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(30);

/// How often readiness and exit are polled.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How long one health probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How many log lines error messages include.
const LOG_TAIL_LINES: usize = 40;

/// First port of the range test nodes listen on: below Linux's ephemeral
/// range (32768 and up), so that no outgoing connection and no `bind(…:0)`
/// elsewhere can take a port between [`free_addr`] handing it out and the
/// node binding it.
const PORT_BASE: u32 = 20_000;
/// Size of that range.
const PORT_SPAN: u32 = 12_000;
/// Next port offset of this test process. Starts at a random place so that
/// concurrent test processes walk different parts of the range.
static NEXT_PORT: std::sync::OnceLock<std::sync::atomic::AtomicU32> = std::sync::OnceLock::new();

/// A free loopback address for a test node.
///
/// Every call in this process returns a different port (a counter walks the
/// range), and the port is checked to be bindable when handed out. Handing
/// out ports from the kernel's `bind(…:0)` instead let two concurrent tests
/// get the same port: one node then failed to bind while its test, probing
/// the port, talked to the other test's node.
///
/// # Errors
///
/// Fails when no port of the range can be bound.
pub fn free_addr() -> Result<SocketAddr> {
    let next = NEXT_PORT.get_or_init(|| {
        let seed = std::process::id()
            ^ (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos()));
        std::sync::atomic::AtomicU32::new(seed % PORT_SPAN)
    });
    for _ in 0..PORT_SPAN {
        let offset = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % PORT_SPAN;
        let port = u16::try_from(PORT_BASE + offset).context("port range fits u16")?;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            return listener
                .local_addr()
                .context("failed to read the bound address");
        }
    }
    bail!(
        "no free port in 127.0.0.1:{PORT_BASE}..{}",
        PORT_BASE + PORT_SPAN
    )
}

/// The config a test node runs with; [`NodeConfig::to_toml`] renders the file.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The node's `node_id`.
    pub node_id: String,
    /// The gRPC address.
    pub listen: SocketAddr,
    /// The metrics address.
    pub metrics_listen: SocketAddr,
    /// `cluster.epoch`.
    pub epoch: u64,
    /// `cluster.members`: id and address of every member, this node included.
    pub members: Vec<(String, SocketAddr)>,
    /// Extra top-level settings, inserted before any table (e.g.
    /// `shutdown_grace = "2s"`).
    pub extra_top_level: String,
    /// Extra tables appended at the end (e.g. `[limits]\nmax_key_bytes = 16`
    /// or `[keyspaces.other]\n...`).
    pub extra_tables: String,
    /// For a node serving TLS (its `[tls]` table goes in `extra_tables`):
    /// the CA (PEM) the harness's probes trust. They expect the name
    /// `localhost`.
    pub tls_ca_pem: Option<String>,
    /// For a node requiring tokens: the bearer token the harness's probes
    /// send (`Topology` needs one).
    pub token: Option<String>,
}

impl NodeConfig {
    /// A node that is its cluster's only member, on free ports, with the
    /// `default` keyspace (64 MiB, TTL 1h).
    ///
    /// # Errors
    ///
    /// Fails when no free port can be found.
    pub fn single(node_id: &str) -> Result<Self> {
        let listen = free_addr()?;
        Ok(Self {
            node_id: node_id.to_owned(),
            listen,
            metrics_listen: free_addr()?,
            epoch: 1,
            members: vec![(node_id.to_owned(), listen)],
            extra_top_level: String::new(),
            extra_tables: String::new(),
            tls_ca_pem: None,
            token: None,
        })
    }

    /// Configs for an `n`-node cluster (`node-1` ... `node-n`) on free ports,
    /// each listing all members.
    ///
    /// # Errors
    ///
    /// Fails when no free port can be found.
    pub fn cluster(n: usize) -> Result<Vec<Self>> {
        let mut nodes = (1..=n)
            .map(|i| Self::single(&format!("node-{i}")))
            .collect::<Result<Vec<_>>>()?;
        let members: Vec<_> = nodes
            .iter()
            .map(|c| (c.node_id.clone(), c.listen))
            .collect();
        for node in &mut nodes {
            node.members.clone_from(&members);
        }
        Ok(nodes)
    }

    /// The config file's text.
    pub fn to_toml(&self) -> String {
        // `write!` into a String cannot fail.
        let mut toml = String::new();
        let _ = writeln!(toml, "node_id = \"{}\"", self.node_id);
        let _ = writeln!(toml, "listen = \"{}\"", self.listen);
        let _ = writeln!(toml, "metrics_listen = \"{}\"", self.metrics_listen);
        toml.push_str(&self.extra_top_level);
        toml.push_str(
            "\n[keyspaces.default]\ncapacity_bytes = 67108864\ndefault_ttl = \"1h\"\n\n[cluster]\n",
        );
        let _ = writeln!(toml, "epoch = {}", self.epoch);
        toml.push_str("members = [\n");
        for (id, address) in &self.members {
            let _ = writeln!(toml, "  {{ id = \"{id}\", address = \"{address}\" }},");
        }
        toml.push_str("]\n\n");
        toml.push_str(&self.extra_tables);
        toml
    }
}

/// The path of the built `cache-node` binary.
///
/// Cargo only exposes `CARGO_BIN_EXE_*` to tests of the crate that owns the
/// binary, so this looks next to the running test executable instead:
/// `target/<profile>/deps/<test>` → `target/<profile>/cache-node`. The binary
/// must have been built first: `cargo build --bins` (which `cargo xtask
/// test` runs), otherwise a stale or missing binary is used.
///
/// # Errors
///
/// Fails, saying how to build it, when the binary is not there.
pub fn node_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("failed to locate the running test executable")?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("cache-node"))
        .collect();
    candidates
        .iter()
        .find(|candidate| candidate.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "the cache-node binary is not at {}: build it with `cargo build --bins` \
                 (`cargo xtask test` does)",
                candidates
                    .iter()
                    .map(|c| c.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            )
        })
}

/// A running `cache-node` process.
///
/// Its config and log live in a temporary directory that is removed on drop;
/// dropping the guard SIGKILLs the process if it is still running (stopped
/// ones included). If the test is panicking, the log's tail is printed first
/// so that the failure report shows what the node did.
#[derive(Debug)]
pub struct NodeProcess {
    config: NodeConfig,
    process: Guarded,
    // Dropped after the process is killed (see `Drop`).
    dir: TempDir,
}

impl NodeProcess {
    /// Spawns a node with `config` and waits until it reports SERVING.
    ///
    /// # Errors
    ///
    /// Fails when the binary is missing (see [`node_binary`]), when the node
    /// exits first, or when it is not healthy within [`HEALTH_TIMEOUT`]; the
    /// message includes the tail of the node's log.
    pub async fn start(config: NodeConfig) -> Result<Self> {
        let mut node = Self::spawn(config)?;
        node.wait_healthy(HEALTH_TIMEOUT).await?;
        Ok(node)
    }

    /// Spawns a node with `config` without waiting for it to be healthy.
    ///
    /// # Errors
    ///
    /// Fails when the binary is missing or cannot be started.
    pub fn spawn(config: NodeConfig) -> Result<Self> {
        Self::spawn_with(config, |command, config_path| {
            command.arg("--config").arg(config_path);
        })
    }

    /// Spawns a node whose command line `customize` sets up. The config file
    /// is written (its path is passed to `customize`) but only used if
    /// `customize` passes it on; `config.listen` must be where the node will
    /// serve, since health probes go there. The `RINGCACHE_*` variables of
    /// the test's own environment are cleared first.
    ///
    /// # Errors
    ///
    /// Fails when the binary is missing or cannot be started.
    pub fn spawn_with(
        config: NodeConfig,
        customize: impl FnOnce(&mut Command, &Path),
    ) -> Result<Self> {
        let binary = node_binary()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("ringcache-{}-", config.node_id))
            .tempdir()
            .context("failed to create the node's temporary directory")?;
        let config_path = dir.path().join("node.toml");
        fs::write(&config_path, config.to_toml())
            .with_context(|| format!("failed to write {}", config_path.display()))?;
        let log = dir.path().join("node.log");
        let out =
            File::create(&log).with_context(|| format!("failed to create {}", log.display()))?;
        let err = out
            .try_clone()
            .context("failed to duplicate the log handle")?;
        let mut command = Command::new(&binary);
        // Settings come only from what the test passes: clear what a
        // developer's shell may have exported.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("RINGCACHE_") {
                command.env_remove(name);
            }
        }
        command.stdin(Stdio::null()).stdout(out).stderr(err);
        customize(&mut command, &config_path);
        let child = command
            .spawn()
            .with_context(|| format!("failed to start {}", binary.display()))?;
        Ok(Self {
            process: Guarded::new(config.node_id.clone(), log, LOG_TAIL_LINES, child),
            config,
            dir,
        })
    }

    /// Writes `config` over the node's config file and sends SIGHUP, which
    /// makes the node load it again (its tokens and TLS files take effect;
    /// `docs/security.md`). Returns once the signal is sent: the test waits
    /// for the effect it expects.
    ///
    /// # Errors
    ///
    /// Fails when the file cannot be written or the signal not sent.
    pub fn reload(&mut self, config: NodeConfig) -> Result<()> {
        let config_path = self.dir.path().join("node.toml");
        // Written beside and renamed, so that the node never reads half a
        // file.
        let staged = self.dir.path().join("node.toml.new");
        fs::write(&staged, config.to_toml())
            .with_context(|| format!("failed to write {}", staged.display()))?;
        fs::rename(&staged, &config_path)
            .with_context(|| format!("failed to replace {}", config_path.display()))?;
        self.config = config;
        self.process.signal(nix::sys::signal::Signal::SIGHUP)
    }

    /// The config the node runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// The gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.config.listen
    }

    /// The gRPC endpoint URL (`http://127.0.0.1:PORT`, `https://` with
    /// TLS) for tonic clients.
    pub fn endpoint(&self) -> String {
        let scheme = if self.config.tls_ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.config.listen)
    }

    /// A tonic endpoint for the node, trusting `tls_ca_pem` when set.
    fn tonic_endpoint(&self) -> Result<Endpoint, String> {
        let endpoint =
            Endpoint::from_shared(self.endpoint()).map_err(|e| format!("invalid endpoint: {e}"))?;
        match &self.config.tls_ca_pem {
            None => Ok(endpoint),
            Some(ca) => endpoint
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                        .domain_name("localhost"),
                )
                .map_err(|e| format!("tls config: {e}")),
        }
    }

    /// The process id.
    pub fn pid(&self) -> Pid {
        self.process.pid()
    }

    /// The node's log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    /// The temporary directory holding the config and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The last `lines` lines of the node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// Polls the health service until the node reports SERVING for
    /// [`NODE_HEALTH_SERVICE`].
    ///
    /// # Errors
    ///
    /// Fails when the node exits first or `timeout` passes.
    pub async fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status()? {
                bail!(
                    "{} exited ({status}) before becoming healthy; log tail:\n{}",
                    self.config.node_id,
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            let last = match self.probe_health().await {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                bail!(
                    "{} at {} not healthy after {timeout:?} ({last}); log tail:\n{}",
                    self.config.node_id,
                    self.addr(),
                    self.log_tail(LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    async fn probe_health(&self) -> Result<(), String> {
        let channel = self
            .tonic_endpoint()?
            // A frozen node accepts TCP but never answers; bound each probe
            // so that the overall deadline still applies.
            .connect_timeout(PROBE_TIMEOUT)
            .timeout(PROBE_TIMEOUT)
            .connect()
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut client = HealthClient::new(channel);
        let reply = client
            .check(HealthCheckRequest {
                service: NODE_HEALTH_SERVICE.to_owned(),
            })
            .await
            .map_err(|status| format!("health check: {status}"))?;
        match reply.get_ref().status() {
            ServingStatus::Serving => {}
            other => return Err(format!("status {other:?}")),
        }
        // Make sure the node that answered is ours and not some other
        // process on the port: same id, same member list.
        let mut cache = ringcache_proto::v1::cache_node_client::CacheNodeClient::new(
            self.tonic_endpoint()?.timeout(PROBE_TIMEOUT).connect_lazy(),
        );
        let mut request = tonic::Request::new(ringcache_proto::v1::TopologyRequest {});
        if let Some(token) = &self.config.token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| "the token is not printable ASCII".to_owned())?;
            request.metadata_mut().insert("authorization", value);
        }
        let topology = cache
            .topology(request)
            .await
            .map_err(|status| format!("topology: {status}"))?
            .into_inner();
        let members: Vec<(String, String)> = topology
            .members
            .iter()
            .map(|m| (m.id.clone(), m.address.clone()))
            .collect();
        let expected: Vec<(String, String)> = self
            .config
            .members
            .iter()
            .map(|(id, addr)| (id.clone(), addr.to_string()))
            .collect();
        if topology.self_id != self.config.node_id || (!expected.is_empty() && members != expected)
        {
            return Err(format!(
                "another node answers on {}: {} with members {members:?}",
                self.addr(),
                topology.self_id
            ));
        }
        Ok(())
    }

    /// Asks the node to shut down gracefully.
    ///
    /// # Errors
    ///
    /// Fails when the signal cannot be sent (the process was reaped).
    pub fn sigterm(&mut self) -> Result<()> {
        self.signal(Signal::SIGTERM)
    }

    /// Kills the node without giving it a chance to clean up.
    ///
    /// # Errors
    ///
    /// Fails when the signal cannot be sent (the process was reaped).
    pub fn sigkill(&mut self) -> Result<()> {
        self.signal(Signal::SIGKILL)
    }

    /// Freezes the node: it keeps its sockets but answers nothing, like a
    /// node stuck in a long pause. Returns once every thread has stopped.
    ///
    /// # Errors
    ///
    /// Fails when the signal cannot be sent (the process was reaped) or
    /// the node does not stop within 10 s.
    pub fn sigstop(&mut self) -> Result<()> {
        self.process.stop()
    }

    /// Resumes a node frozen with [`NodeProcess::sigstop`].
    ///
    /// # Errors
    ///
    /// Fails when the signal cannot be sent (the process was reaped).
    pub fn sigcont(&mut self) -> Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// Interrupts the node as Ctrl-C would.
    ///
    /// # Errors
    ///
    /// Fails when the signal cannot be sent (the process was reaped).
    pub fn sigint(&mut self) -> Result<()> {
        self.signal(Signal::SIGINT)
    }

    fn signal(&mut self, signal: Signal) -> Result<()> {
        self.process.signal(signal)
    }

    /// The exit status if the node has exited, without blocking.
    ///
    /// # Errors
    ///
    /// Fails when the status cannot be read.
    pub fn try_exit_status(&mut self) -> Result<Option<ExitStatus>> {
        self.process.try_exit_status()
    }

    /// Waits up to `timeout` for the node to exit and returns its status.
    ///
    /// # Errors
    ///
    /// Fails, with the log's tail, when the node is still running at the
    /// deadline.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.process.wait_exit(timeout).await
    }
}

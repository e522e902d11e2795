//! Node configuration: a TOML file, overridden by environment variables, then
//! by command-line flags. Unknown fields are rejected and every value is
//! validated at start-up, with errors that name the field.
//!
//! With no file and no flags the node runs alone on [`DEFAULT_LISTEN`] with
//! metrics on [`DEFAULT_METRICS_LISTEN`] and one keyspace, `default`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Default gRPC address: loopback only, so that a node started with no
/// arguments is not reachable from other machines.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";
/// Default Prometheus metrics address.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9700";
/// Default node id.
pub const DEFAULT_NODE_ID: &str = "node-1";
/// The keyspace that always exists.
pub const DEFAULT_KEYSPACE: &str = "default";
/// Default capacity of a keyspace: 64 MiB.
pub const DEFAULT_CAPACITY_BYTES: u64 = 64 * 1024 * 1024;
/// Default maximum key length: 1 KiB.
pub const DEFAULT_MAX_KEY_BYTES: usize = 1024;
/// Default maximum value length: 1 MiB.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Default maximum TTL a write may ask for: 30 days.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default maximum number of keys in one `MultiGet` or `MultiSet`.
pub const DEFAULT_MAX_BATCH_KEYS: usize = 1000;
/// Default maximum size of one decoded gRPC request: 64 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;
/// The smallest `limits.max_request_bytes`: a client sends batches of
/// commands of up to 1 MiB (`cache_client`'s `MAX_BATCH_BYTES`) on its
/// command stream, each one message.
pub const MIN_REQUEST_BYTES: usize = 2 * 1024 * 1024;
/// Default maximum number of keyspaces (configured plus created on demand).
pub const DEFAULT_MAX_KEYSPACES: usize = 1024;
/// Default time shutdown waits for in-flight requests.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Default cap on how long a 2PC change may stay pending (a `Prepare`
/// asking for more is refused; 0 asks for the cap).
pub const DEFAULT_MAX_PENDING_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`Limits::max_prepare_wait`].
pub const DEFAULT_MAX_PREPARE_WAIT: Duration = Duration::from_secs(30);
/// Default lifetime of the in-doubt fence a timed-out 2PC change leaves
/// (`docs/leases.md`): twice the default pending cap, so that a writer's
/// commit delayed by a stalled database, and the clients' in-doubt recovery
/// (which rolls back after twice the pending timeout), still find it.
pub const DEFAULT_IN_DOUBT_TTL: Duration = Duration::from_secs(60);
/// Default lifetime of a lease handed out by `LeaseGet`: long enough for a
/// slow database load, short enough that a crashed holder does not block the
/// key's fillers for long.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Default wait a `LeaseGet` miss is told to observe while another caller
/// holds the lease (the memcache paper's short back-off).
pub const DEFAULT_LEASE_RETRY_AFTER: Duration = Duration::from_millis(20);
/// Largest value the node accepts as `max_value_bytes`: the weigher counts
/// entry sizes in a `u32`, so one entry must stay well below 4 GiB.
pub const MAX_VALUE_BYTES_LIMIT: usize = 512 * 1024 * 1024;
/// Longest keyspace name.
pub const MAX_KEYSPACE_NAME_BYTES: usize = 128;
/// Most worker threads the runtime may be given: far beyond any useful
/// number, it only catches a typo before tokio spawns them.
pub const MAX_WORKER_THREADS: usize = 1024;

/// The node's whole configuration.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Stable id of this node. The ring places the node by this id, so it
    /// must stay the same when the node restarts or moves.
    pub node_id: String,
    /// Address the gRPC server listens on.
    pub listen: SocketAddr,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`); absent
    /// turns the endpoint off.
    pub metrics_listen: Option<SocketAddr>,
    /// Address other parties should dial for this node, if it differs from
    /// `listen` (for example behind NAT or in a container).
    pub advertise_address: Option<String>,
    /// Address of the Redis-protocol (RESP2) listener; absent (the default)
    /// turns it off.
    pub resp_listen: Option<SocketAddr>,
    /// The password RESP clients must give with `AUTH` before any other
    /// command; absent serves every client. It is the secret of a token
    /// named `default` with `admin` on every keyspace, required on RESP only
    /// (unless `auth.tokens` is set, which requires a token on gRPC too).
    pub resp_password: Option<Secret>,
    /// The keyspace of RESP keys that name no existing keyspace as a
    /// `keyspace:` prefix.
    pub resp_default_keyspace: String,
    /// What a request naming a keyspace that is not configured gets.
    pub unknown_keyspaces: UnknownKeyspaces,
    /// How long shutdown waits for in-flight requests before giving up.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Log output format; the level comes from `RUST_LOG`.
    pub log_format: LogFormat,
    /// Worker threads of the node's tokio runtime (gRPC, RESP and metrics
    /// share them); absent takes tokio's default, one per CPU.
    pub worker_threads: Option<usize>,
    /// Request limits.
    pub limits: Limits,
    /// Configured keyspaces by name. `default` is always present: if the file
    /// does not configure it, it gets the built-in settings.
    pub keyspaces: BTreeMap<String, KeyspaceConfig>,
    /// The keyspace file shared with the services (strategies, stores; see
    /// `cache_client::keyspaces`). Its keyspaces are added to `keyspaces`,
    /// with the node-side fields it sets (`capacity_bytes`, `ttl` as the
    /// default TTL, `lease_ttl`, `lease_retry_after`, `keep_stale_for`); a
    /// keyspace may not be configured in both places.
    pub keyspaces_file: Option<PathBuf>,
    /// Settings of keyspaces created on demand (`unknown_keyspaces =
    /// "create"`).
    pub created_keyspaces: KeyspaceConfig,
    /// The membership this node reports through `Topology`.
    pub cluster: ClusterConfig,
    /// TLS on every listener (gRPC, RESP, metrics); absent serves
    /// plaintext.
    pub tls: Option<TlsConfig>,
    /// Bearer tokens and their per-keyspace permissions; none (the default)
    /// serves every caller.
    pub auth: AuthConfig,
}

/// A secret (a token, a password): `Debug` never shows it, so that a
/// logged config does not leak it.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(secret.into())
    }

    /// The secret itself, for comparing it or sending it; never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(Secret::new(s))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(\"<redacted>\")")
    }
}

/// TLS settings, shared by every listener. Files are PEM.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The node's certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// The private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA certificates that sign client certificates: set, every client
    /// must present a certificate they sign (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
}

/// Authentication: who may do what.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The tokens the node accepts. Empty serves every caller with every
    /// permission.
    pub tokens: Vec<TokenConfig>,
}

/// One bearer token: a name (logged, labelled in metrics, the RESP
/// username) and a secret (never logged), with its permissions.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The token's name.
    pub name: String,
    /// The secret inline. Prefer `secret_file` or `secret_env`: config
    /// files are often world-readable.
    #[serde(default)]
    pub secret: Option<Secret>,
    /// A file holding the secret (surrounding whitespace is ignored).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// An environment variable holding the secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// Permission per keyspace; `"*"` stands for every keyspace not named.
    /// A keyspace named neither way is refused.
    #[serde(default)]
    pub permissions: BTreeMap<String, Permission>,
    /// This token's rate limit, replacing `limits.rate_limit`.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
}

/// What a token may do in a keyspace; each level includes the ones below.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// Reads: `Get`, `MultiGet`, `LeaseGet`, `Stats`.
    Read,
    /// Reads and writes: `Set`, `Delete`, `MultiSet`, `Fill`, 2PC, `Flush`.
    Write,
    /// Everything, including the write-back worker's `ListDirty` and
    /// `MarkClean`.
    Admin,
}

impl Permission {
    /// The lowercase name, as in the config.
    pub fn name(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::Admin => "admin",
        }
    }
}

/// A token bucket: `burst` requests at once, refilled by `requests` every
/// `per`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests allowed per `per`.
    pub requests: u32,
    /// The period `requests` are counted over.
    #[serde(with = "humantime_serde", default = "default_rate_period")]
    pub per: Duration,
    /// Bucket size: requests allowed at once; absent means `requests`.
    #[serde(default)]
    pub burst: Option<u32>,
}

fn default_rate_period() -> Duration {
    Duration::from_secs(1)
}

impl RateLimit {
    fn validate(&self, field: &str) -> Result<()> {
        if self.requests == 0 {
            return Err(Error::config(
                format!("{field}.requests"),
                "must be at least 1",
            ));
        }
        if self.per.is_zero() || self.per / self.requests < Duration::from_nanos(1) {
            return Err(Error::config(
                format!("{field}.per"),
                "must be at least 1ns per request",
            ));
        }
        if self.burst == Some(0) {
            return Err(Error::config(
                format!("{field}.burst"),
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// What happens to a request for a keyspace the node does not have.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UnknownKeyspaces {
    /// Refuse it with `NOT_FOUND` (the default: a typo does not silently
    /// create a keyspace).
    #[default]
    Reject,
    /// Create the keyspace with the `created_keyspaces` settings, up to
    /// `limits.max_keyspaces`.
    Create,
}

/// Log output format.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Limits on what one request may carry.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest key, in bytes.
    pub max_key_bytes: usize,
    /// Longest value, in bytes.
    pub max_value_bytes: usize,
    /// Longest TTL a write may ask for.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// Most keys in one `MultiGet` or `MultiSet`.
    pub max_batch_keys: usize,
    /// Largest encoded gRPC request.
    pub max_request_bytes: usize,
    /// Most keyspaces the node holds, configured and created on demand.
    pub max_keyspaces: usize,
    /// Longest time a `Prepare`d change may stay pending before the node
    /// drops it (and deletes the key's live entry). A `Prepare` asking for
    /// 0 gets this; one asking for more is refused.
    #[serde(with = "humantime_serde")]
    pub max_pending_timeout: Duration,
    /// Longest a `Prepare` may wait in its key's queue behind other
    /// writers' pending changes: a longer `wait_ms` is shortened to it (the
    /// writer then gets the conflict sooner); 0 turns waiting off.
    #[serde(with = "humantime_serde")]
    pub max_prepare_wait: Duration,
    /// How long a timed-out `Prepare`d change is remembered as in doubt:
    /// meanwhile fills and version-fenced writes older than it are refused
    /// and a late `Commit` of it still applies (`docs/leases.md`).
    #[serde(with = "humantime_serde")]
    pub in_doubt_ttl: Duration,
    /// The rate limit of each client identity (a token, or without a token
    /// the peer's IP address); absent means none.
    pub rate_limit: Option<RateLimit>,
    /// Most requests (gRPC and RESP) the node works on at once; beyond it
    /// requests are refused with `RESOURCE_EXHAUSTED`. Absent means none.
    pub max_concurrent_requests: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            max_ttl: DEFAULT_MAX_TTL,
            max_batch_keys: DEFAULT_MAX_BATCH_KEYS,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_keyspaces: DEFAULT_MAX_KEYSPACES,
            max_pending_timeout: DEFAULT_MAX_PENDING_TIMEOUT,
            max_prepare_wait: DEFAULT_MAX_PREPARE_WAIT,
            in_doubt_ttl: DEFAULT_IN_DOUBT_TTL,
            rate_limit: None,
            max_concurrent_requests: None,
        }
    }
}

/// Settings of one keyspace on the node.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KeyspaceConfig {
    /// Most bytes of heap the keyspace's clean entries and its index take,
    /// counted as the allocator charges them (each entry's header, key and
    /// value in one allocation, about [`crate::store::ENTRY_OVERHEAD_BYTES`]
    /// beyond key and value for small entries). Beyond it, the least
    /// valuable entries are evicted. Dirty entries count against
    /// `max_dirty_bytes` instead.
    pub capacity_bytes: u64,
    /// TTL of writes that do not give one; absent means such entries never
    /// expire (they still get evicted under memory pressure).
    #[serde(with = "humantime_serde")]
    pub default_ttl: Option<Duration>,
    /// How long a lease handed out by `LeaseGet` stays valid. After it, the
    /// holder's `Fill` is refused and the next miss gets a new lease.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// The wait (`retry_after_ms`) a `LeaseGet` miss is told to observe while
    /// another caller holds the key's lease or a change is pending.
    #[serde(with = "humantime_serde")]
    pub lease_retry_after: Duration,
    /// How long a deleted value is kept as "stale", served only through
    /// `LeaseGet`'s `stale` field to callers told to wait; absent keeps none.
    /// Stale values live outside the byte-bounded cache, so they are further
    /// bounded to [`crate::store::STALE_BUDGET_DIVISOR`]th of
    /// `capacity_bytes`.
    #[serde(with = "humantime_serde")]
    pub keep_stale_for: Option<Duration>,
    /// Most bytes (key + value + per-entry overhead) of dirty write-back
    /// entries the keyspace holds; a dirty write beyond it is refused.
    /// Dirty entries live outside the byte-bounded cache and are never
    /// evicted, so this bounds their memory. Absent means
    /// `capacity_bytes / `[`crate::store::DIRTY_BUDGET_DIVISOR`]; at most
    /// `capacity_bytes`; 0 refuses every dirty write.
    pub max_dirty_bytes: Option<u64>,
}

impl Default for KeyspaceConfig {
    fn default() -> Self {
        KeyspaceConfig {
            capacity_bytes: DEFAULT_CAPACITY_BYTES,
            default_ttl: None,
            lease_ttl: DEFAULT_LEASE_TTL,
            lease_retry_after: DEFAULT_LEASE_RETRY_AFTER,
            keep_stale_for: None,
            max_dirty_bytes: None,
        }
    }
}

/// The membership this node reports through `Topology`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Version of this membership list. Clients adopt the list with the
    /// highest epoch they see, so bump it whenever `members` changes.
    pub epoch: u64,
    /// All members of the pool, this node included. Empty means this node
    /// alone (at epoch 1 when `epoch` is 0).
    pub members: Vec<MemberConfig>,
}

/// One member of the pool.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MemberConfig {
    /// The member's node id.
    pub id: String,
    /// Address clients dial, as host:port.
    pub address: String,
    /// Relative share of keys (1 = normal, 0 = owns nothing).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: DEFAULT_NODE_ID.to_owned(),
            listen: DEFAULT_LISTEN
                .parse()
                .expect("DEFAULT_LISTEN is a valid address"),
            metrics_listen: Some(
                DEFAULT_METRICS_LISTEN
                    .parse()
                    .expect("DEFAULT_METRICS_LISTEN is a valid address"),
            ),
            advertise_address: None,
            resp_listen: None,
            resp_password: None,
            resp_default_keyspace: DEFAULT_KEYSPACE.to_owned(),
            unknown_keyspaces: UnknownKeyspaces::default(),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            log_format: LogFormat::default(),
            worker_threads: None,
            limits: Limits::default(),
            keyspaces: BTreeMap::new(),
            keyspaces_file: None,
            created_keyspaces: KeyspaceConfig::default(),
            cluster: ClusterConfig::default(),
            tls: None,
            auth: AuthConfig::default(),
        }
    }
}

/// Command-line flags. Each flag can also be given as the environment
/// variable named beside it; a flag beats its variable, which beats the file.
#[derive(Clone, Debug, Default, clap::Parser)]
#[command(name = "cache-node", version, about = "A ringcache cache node")]
pub struct Cli {
    /// TOML config file; without it the built-in defaults apply.
    #[arg(long, env = "RINGCACHE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Stable id of this node.
    #[arg(long, env = "RINGCACHE_NODE_ID")]
    pub node_id: Option<String>,
    /// gRPC listen address.
    #[arg(long, env = "RINGCACHE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Prometheus metrics listen address.
    #[arg(long, env = "RINGCACHE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Turn the metrics endpoint off.
    #[arg(long, env = "RINGCACHE_NO_METRICS", conflicts_with = "metrics_listen")]
    pub no_metrics: bool,
    /// Address other parties dial for this node.
    #[arg(long, env = "RINGCACHE_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,
    /// Redis-protocol (RESP2) listen address; off unless given.
    #[arg(long, env = "RINGCACHE_RESP_LISTEN")]
    pub resp_listen: Option<SocketAddr>,
    /// Password RESP clients must give with AUTH (prefer the environment
    /// variable: flags show in `ps`).
    #[arg(long, env = "RINGCACHE_RESP_PASSWORD", hide_env_values = true)]
    pub resp_password: Option<Secret>,
    /// TLS certificate chain (PEM) of every listener; needs --tls-key.
    #[arg(long, env = "RINGCACHE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); needs --tls-cert.
    #[arg(long, env = "RINGCACHE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that signs client certificates: requires mutual TLS.
    #[arg(long, env = "RINGCACHE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Keyspace of RESP keys without a known `keyspace:` prefix.
    #[arg(long, env = "RINGCACHE_RESP_DEFAULT_KEYSPACE")]
    pub resp_default_keyspace: Option<String>,
    /// What requests for unconfigured keyspaces get.
    #[arg(long, env = "RINGCACHE_UNKNOWN_KEYSPACES", value_enum)]
    pub unknown_keyspaces: Option<UnknownKeyspaces>,
    /// The keyspace file shared with the services.
    #[arg(long, env = "RINGCACHE_KEYSPACES")]
    pub keyspaces_file: Option<PathBuf>,
    /// Log format (the level comes from RUST_LOG).
    #[arg(long, env = "RINGCACHE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Worker threads of the runtime (default: one per CPU).
    #[arg(long, env = "RINGCACHE_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
}

impl Config {
    /// Builds the config from the file named by `cli` (or the defaults),
    /// applies the overrides of `cli`, and validates the result.
    ///
    /// # Errors
    /// [`Error::ConfigFile`] when the file cannot be read or parsed (the
    /// message names the line and the field), [`Error::Config`] when a value
    /// is out of range.
    pub fn load(cli: &Cli) -> Result<Config> {
        let mut config = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                Config::from_toml(&text).map_err(|e| match e {
                    Error::ConfigFile { reason, .. } => Error::ConfigFile {
                        path: path.display().to_string(),
                        reason,
                    },
                    other => other,
                })?
            }
            None => Config::default(),
        };
        if let Some(id) = &cli.node_id {
            config.node_id = id.clone();
        }
        if let Some(listen) = cli.listen {
            config.listen = listen;
        }
        if let Some(metrics) = cli.metrics_listen {
            config.metrics_listen = Some(metrics);
        }
        if cli.no_metrics {
            config.metrics_listen = None;
        }
        if let Some(address) = &cli.advertise_address {
            config.advertise_address = Some(address.clone());
        }
        if let Some(resp) = cli.resp_listen {
            config.resp_listen = Some(resp);
        }
        if let Some(password) = &cli.resp_password {
            config.resp_password = Some(password.clone());
        }
        if let Some(keyspace) = &cli.resp_default_keyspace {
            config.resp_default_keyspace = keyspace.clone();
        }
        if let Some(policy) = cli.unknown_keyspaces {
            config.unknown_keyspaces = policy;
        }
        if let Some(format) = cli.log_format {
            config.log_format = format;
        }
        if let Some(threads) = cli.worker_threads {
            config.worker_threads = Some(threads);
        }
        if let Some(path) = &cli.keyspaces_file {
            config.keyspaces_file = Some(path.clone());
        }
        if let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) {
            config.tls = Some(TlsConfig {
                cert_file: cert.clone(),
                key_file: key.clone(),
                client_ca_file: cli.tls_client_ca.clone(),
            });
        } else if let (Some(ca), Some(tls)) = (&cli.tls_client_ca, &mut config.tls) {
            tls.client_ca_file = Some(ca.clone());
        }
        config.merge_keyspaces_file()?;
        config.resolve_secrets()?;
        config.validate()?;
        Ok(config)
    }

    /// Adds the keyspaces of `keyspaces_file`, if set, to `keyspaces`.
    ///
    /// # Errors
    /// [`Error::ConfigFile`] when the file cannot be read or parsed (the
    /// message names the keyspace and field), [`Error::Config`] when a
    /// keyspace is also configured in `keyspaces`.
    pub fn merge_keyspaces_file(&mut self) -> Result<()> {
        let Some(path) = &self.keyspaces_file else {
            return Ok(());
        };
        let file =
            cache_client::keyspaces::KeyspacesFile::read(path).map_err(|e| Error::ConfigFile {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        for (name, entry) in file.keyspaces {
            if self.keyspaces.contains_key(&name) {
                return Err(Error::config(
                    format!("keyspaces.{name}"),
                    format!("is configured both here and in {}", path.display()),
                ));
            }
            let defaults = KeyspaceConfig::default();
            let keyspace = KeyspaceConfig {
                capacity_bytes: entry.capacity_bytes.unwrap_or(defaults.capacity_bytes),
                default_ttl: entry.ttl,
                lease_ttl: entry.lease_ttl.unwrap_or(defaults.lease_ttl),
                lease_retry_after: entry
                    .lease_retry_after
                    .unwrap_or(defaults.lease_retry_after),
                keep_stale_for: entry.keep_stale_for,
                // The shared keyspace file has no such field.
                max_dirty_bytes: None,
            };
            self.keyspaces.insert(name, keyspace);
        }
        Ok(())
    }

    /// Reads each token's `secret_file` or `secret_env` into its `secret`.
    ///
    /// # Errors
    /// [`Error::Config`] naming the token whose secret cannot be read, or
    /// that gives more or fewer than one source.
    pub fn resolve_secrets(&mut self) -> Result<()> {
        for (i, token) in self.auth.tokens.iter_mut().enumerate() {
            let field = format!("auth.tokens[{i}]");
            let sources = usize::from(token.secret.is_some())
                + usize::from(token.secret_file.is_some())
                + usize::from(token.secret_env.is_some());
            if sources != 1 {
                return Err(Error::config(
                    field,
                    "give exactly one of secret, secret_file and secret_env",
                ));
            }
            if let Some(path) = &token.secret_file {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    Error::config(
                        format!("{field}.secret_file"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                token.secret = Some(Secret::new(text.trim()));
            }
            if let Some(var) = &token.secret_env {
                let value = std::env::var(var).map_err(|e| {
                    Error::config(format!("{field}.secret_env"), format!("{var}: {e}"))
                })?;
                token.secret = Some(Secret::new(value.trim()));
            }
        }
        Ok(())
    }

    /// Parses a TOML document (without validating it).
    ///
    /// # Errors
    /// [`Error::ConfigFile`] naming the line and field that do not parse.
    pub fn from_toml(text: &str) -> Result<Config> {
        toml::from_str(text).map_err(|e| Error::ConfigFile {
            path: "<inline>".to_owned(),
            reason: e.to_string().trim_end().to_owned(),
        })
    }

    /// Checks every value and fills in derived ones (the `default` keyspace).
    ///
    /// # Errors
    /// [`Error::Config`] naming the first field that is out of range.
    pub fn validate(&mut self) -> Result<()> {
        if self.node_id.is_empty() || self.node_id.chars().any(char::is_whitespace) {
            return Err(Error::config(
                "node_id",
                "must be non-empty and contain no whitespace",
            ));
        }
        if let Some(threads) = self.worker_threads
            && !(1..=MAX_WORKER_THREADS).contains(&threads)
        {
            return Err(Error::config(
                "worker_threads",
                format!("{threads} is not in 1..={MAX_WORKER_THREADS}"),
            ));
        }
        let limits = &self.limits;
        if !(1..=64 * 1024).contains(&limits.max_key_bytes) {
            return Err(Error::config(
                "limits.max_key_bytes",
                format!("{} is not in 1..=65536", limits.max_key_bytes),
            ));
        }
        if !(1..=MAX_VALUE_BYTES_LIMIT).contains(&limits.max_value_bytes) {
            return Err(Error::config(
                "limits.max_value_bytes",
                format!(
                    "{} is not in 1..={MAX_VALUE_BYTES_LIMIT}",
                    limits.max_value_bytes
                ),
            ));
        }
        if limits.max_ttl.is_zero() {
            return Err(Error::config("limits.max_ttl", "must be greater than zero"));
        }
        if limits.max_pending_timeout < Duration::from_millis(1) {
            return Err(Error::config(
                "limits.max_pending_timeout",
                "must be at least 1ms",
            ));
        }
        if limits.in_doubt_ttl < Duration::from_millis(1) {
            return Err(Error::config("limits.in_doubt_ttl", "must be at least 1ms"));
        }
        if limits.max_batch_keys == 0 {
            return Err(Error::config("limits.max_batch_keys", "must be at least 1"));
        }
        // One request must at least fit one maximal item plus framing, and
        // a batch of a client's command stream.
        let min_request =
            (limits.max_key_bytes + limits.max_value_bytes + 1024).max(MIN_REQUEST_BYTES);
        if limits.max_request_bytes < min_request {
            return Err(Error::config(
                "limits.max_request_bytes",
                format!(
                    "{} is smaller than {min_request}: the larger of max_key_bytes + max_value_bytes + 1024 and {MIN_REQUEST_BYTES} (a client's largest batch of commands)",
                    limits.max_request_bytes
                ),
            ));
        }
        self.keyspaces
            .entry(DEFAULT_KEYSPACE.to_owned())
            .or_default();
        if self.keyspaces.len() > limits.max_keyspaces {
            return Err(Error::config(
                "limits.max_keyspaces",
                format!(
                    "{} keyspaces are configured but max_keyspaces is {}",
                    self.keyspaces.len(),
                    limits.max_keyspaces
                ),
            ));
        }
        for (name, keyspace) in &self.keyspaces {
            validate_keyspace_name(name)
                .map_err(|reason| Error::config(format!("keyspaces.{name}"), reason))?;
            keyspace.validate(&format!("keyspaces.{name}"), limits)?;
        }
        self.created_keyspaces
            .validate("created_keyspaces", &self.limits)?;
        validate_keyspace_name(&self.resp_default_keyspace)
            .map_err(|reason| Error::config("resp_default_keyspace", reason))?;
        if self.unknown_keyspaces == UnknownKeyspaces::Reject
            && !self.keyspaces.contains_key(&self.resp_default_keyspace)
        {
            return Err(Error::config(
                "resp_default_keyspace",
                format!(
                    "keyspace {:?} is not configured (and unknown_keyspaces is \"reject\")",
                    self.resp_default_keyspace
                ),
            ));
        }
        if let Some(rate) = &self.limits.rate_limit {
            rate.validate("limits.rate_limit")?;
        }
        if self.limits.max_concurrent_requests == Some(0) {
            return Err(Error::config(
                "limits.max_concurrent_requests",
                "must be at least 1 (omit it for no limit)",
            ));
        }
        self.validate_auth()?;
        if self.resp_password.as_ref().map(Secret::expose) == Some("") {
            return Err(Error::config(
                "resp_password",
                "must not be empty (omit it to serve RESP clients without AUTH)",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, member) in self.cluster.members.iter().enumerate() {
            if member.id.is_empty() || !seen.insert(member.id.as_str()) {
                return Err(Error::config(
                    format!("cluster.members[{i}].id"),
                    format!("{:?} is empty or appears twice", member.id),
                ));
            }
            if member.address.is_empty() {
                return Err(Error::config(
                    format!("cluster.members[{i}].address"),
                    "must not be empty",
                ));
            }
        }
        if !self.cluster.members.is_empty() && !seen.contains(self.node_id.as_str()) {
            return Err(Error::config(
                "cluster.members",
                format!("does not list this node ({:?})", self.node_id),
            ));
        }
        Ok(())
    }
}

impl Config {
    fn validate_auth(&self) -> Result<()> {
        let mut names = std::collections::HashSet::new();
        let mut secrets = std::collections::HashSet::new();
        if let Some(password) = &self.resp_password {
            names.insert(crate::auth::RESP_PASSWORD_TOKEN);
            secrets.insert(password.expose());
        }
        for (i, token) in self.auth.tokens.iter().enumerate() {
            let field = format!("auth.tokens[{i}]");
            if token.name.is_empty()
                || token.name.bytes().any(|b| b <= b' ' || b > b'~')
                || !names.insert(token.name.as_str())
            {
                return Err(Error::config(
                    format!("{field}.name"),
                    format!(
                        "{:?} is empty, has spaces or non-ASCII characters, or is taken",
                        token.name
                    ),
                ));
            }
            // `resolve_secrets` fills `secret` from the file or variable.
            let secret = token.secret.as_ref().map_or("", Secret::expose);
            if secret.is_empty() || !secrets.insert(secret) {
                return Err(Error::config(
                    format!("{field}.secret"),
                    "is missing, empty, or the secret of another token",
                ));
            }
            for keyspace in token.permissions.keys() {
                if keyspace != crate::auth::EVERY_KEYSPACE {
                    validate_keyspace_name(keyspace).map_err(|reason| {
                        Error::config(format!("{field}.permissions.{keyspace}"), reason)
                    })?;
                }
            }
            if let Some(rate) = &token.rate_limit {
                rate.validate(&format!("{field}.rate_limit"))?;
            }
        }
        Ok(())
    }
}

impl KeyspaceConfig {
    /// The effective bound on dirty bytes: `max_dirty_bytes`, or its default.
    pub fn max_dirty_bytes(&self) -> u64 {
        self.max_dirty_bytes
            .unwrap_or(self.capacity_bytes / crate::store::DIRTY_BUDGET_DIVISOR)
    }

    fn validate(&self, field: &str, limits: &Limits) -> Result<()> {
        // A keyspace must hold at least one maximal entry, or every large
        // write would be evicted as soon as it is stored.
        let min = (limits.max_key_bytes + limits.max_value_bytes) as u64
            + crate::store::ENTRY_OVERHEAD_BYTES;
        if self.capacity_bytes < min {
            return Err(Error::config(
                format!("{field}.capacity_bytes"),
                format!(
                    "{} is smaller than one maximal entry (max_key_bytes + max_value_bytes + overhead = {min})",
                    self.capacity_bytes
                ),
            ));
        }
        if let Some(ttl) = self.default_ttl {
            if ttl.is_zero() {
                return Err(Error::config(
                    format!("{field}.default_ttl"),
                    "must be greater than zero (omit it for no expiry)",
                ));
            }
            if ttl > limits.max_ttl {
                return Err(Error::config(
                    format!("{field}.default_ttl"),
                    format!(
                        "{} exceeds limits.max_ttl ({})",
                        humantime::format_duration(ttl),
                        humantime::format_duration(limits.max_ttl)
                    ),
                ));
            }
        }
        // The wire says "no wait" with 0 and counts in milliseconds, so both
        // lease durations must be at least 1 ms.
        let millisecond = Duration::from_millis(1);
        if self.lease_ttl < millisecond || self.lease_ttl > limits.max_ttl {
            return Err(Error::config(
                format!("{field}.lease_ttl"),
                format!(
                    "{} is not between 1ms and limits.max_ttl ({})",
                    humantime::format_duration(self.lease_ttl),
                    humantime::format_duration(limits.max_ttl)
                ),
            ));
        }
        if self.lease_retry_after < millisecond || self.lease_retry_after > self.lease_ttl {
            return Err(Error::config(
                format!("{field}.lease_retry_after"),
                format!(
                    "{} is not between 1ms and lease_ttl ({})",
                    humantime::format_duration(self.lease_retry_after),
                    humantime::format_duration(self.lease_ttl)
                ),
            ));
        }
        if let Some(keep) = self.keep_stale_for
            && (keep < millisecond || keep > limits.max_ttl)
        {
            return Err(Error::config(
                format!("{field}.keep_stale_for"),
                format!(
                    "{} is not between 1ms and limits.max_ttl ({}) (omit it to keep no stale values)",
                    humantime::format_duration(keep),
                    humantime::format_duration(limits.max_ttl)
                ),
            ));
        }
        if let Some(max) = self.max_dirty_bytes
            && max > self.capacity_bytes
        {
            return Err(Error::config(
                format!("{field}.max_dirty_bytes"),
                format!("{max} exceeds capacity_bytes ({})", self.capacity_bytes),
            ));
        }
        Ok(())
    }
}

/// Checks a keyspace name: 1 to [`MAX_KEYSPACE_NAME_BYTES`] bytes of ASCII
/// letters, digits, `_`, `-` and `.`. The restriction keeps names safe in
/// metric labels, Kafka topic names and SQL identifiers, and free of the NUL
/// byte that the ring uses as a separator.
pub fn validate_keyspace_name(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("keyspace name is empty");
    }
    if name.len() > MAX_KEYSPACE_NAME_BYTES {
        return Err("keyspace name is longer than 128 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err("keyspace name may only contain ASCII letters, digits, '_', '-' and '.'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_include_the_default_keyspace() {
        let mut config = Config::default();
        config.validate().unwrap();
        assert!(config.keyspaces.contains_key(DEFAULT_KEYSPACE));
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
    }

    #[test]
    fn full_file_parses() {
        let mut config = Config::from_toml(
            r#"
            node_id = "n2"
            listen = "127.0.0.1:7702"
            metrics_listen = "127.0.0.1:9702"
            unknown_keyspaces = "create"
            shutdown_grace = "5s"
            log_format = "json"
            worker_threads = 1
            resp_listen = "127.0.0.1:6380"
            resp_password = "secret"
            resp_default_keyspace = "users"

            [limits]
            max_key_bytes = 256
            max_ttl = "1day"

            max_pending_timeout = "5s"

            [keyspaces.users]
            capacity_bytes = 10485760
            default_ttl = "10m"
            lease_ttl = "2s"
            lease_retry_after = "5ms"
            keep_stale_for = "1s"

            [cluster]
            epoch = 3
            members = [
              { id = "n1", address = "127.0.0.1:7701" },
              { id = "n2", address = "127.0.0.1:7702", weight = 2 },
            ]
            "#,
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.unknown_keyspaces, UnknownKeyspaces::Create);
        assert_eq!(config.worker_threads, Some(1));
        assert_eq!(config.resp_listen.unwrap().port(), 6380);
        assert_eq!(
            config.resp_password.as_ref().map(Secret::expose),
            Some("secret")
        );
        assert!(
            !format!("{config:?}").contains("secret\""),
            "Debug hides it"
        );
        assert_eq!(config.resp_default_keyspace, "users");
        assert_eq!(
            config.keyspaces["users"].default_ttl,
            Some(Duration::from_secs(600))
        );
        assert_eq!(config.cluster.members[1].weight, 2);
        assert_eq!(config.cluster.members[0].weight, 1);
        assert_eq!(config.limits.max_key_bytes, 256);
        assert_eq!(config.limits.max_value_bytes, DEFAULT_MAX_VALUE_BYTES);
        assert_eq!(config.limits.max_pending_timeout, Duration::from_secs(5));
        let users = &config.keyspaces["users"];
        assert_eq!(users.lease_ttl, Duration::from_secs(2));
        assert_eq!(users.lease_retry_after, Duration::from_millis(5));
        assert_eq!(users.keep_stale_for, Some(Duration::from_secs(1)));
        let default = &config.keyspaces[DEFAULT_KEYSPACE];
        assert_eq!(default.lease_ttl, DEFAULT_LEASE_TTL);
        assert_eq!(default.lease_retry_after, DEFAULT_LEASE_RETRY_AFTER);
        assert_eq!(default.keep_stale_for, None);
    }

    #[test]
    fn max_dirty_bytes_defaults_to_a_quarter_of_the_capacity() {
        let mut config = Config::from_toml(
            "[keyspaces.a]\ncapacity_bytes = 16777216\n\
             [keyspaces.b]\ncapacity_bytes = 16777216\nmax_dirty_bytes = 1000\n",
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.keyspaces["a"].max_dirty_bytes(), 4_194_304);
        assert_eq!(config.keyspaces["b"].max_dirty_bytes(), 1000);
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let err = Config::from_toml("listen = \"127.0.0.1:1\"\nlsiten = 3\n").unwrap_err();
        assert!(err.to_string().contains("lsiten"), "{err}");
        let err = Config::from_toml("[keyspaces.a]\ncapacity = 3\n").unwrap_err();
        assert!(err.to_string().contains("capacity"), "{err}");
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        let cases = [
            ("node_id = \"\"", "node_id"),
            ("worker_threads = 0", "worker_threads"),
            ("[limits]\nmax_key_bytes = 0", "limits.max_key_bytes"),
            ("[limits]\nmax_value_bytes = 0", "limits.max_value_bytes"),
            ("[limits]\nmax_batch_keys = 0", "limits.max_batch_keys"),
            (
                "[limits]\nmax_request_bytes = 10",
                "limits.max_request_bytes",
            ),
            (
                "[keyspaces.a]\ncapacity_bytes = 10",
                "keyspaces.a.capacity_bytes",
            ),
            (
                "[keyspaces.a]\ndefault_ttl = \"0s\"",
                "keyspaces.a.default_ttl",
            ),
            (
                "[keyspaces.a]\ndefault_ttl = \"400days\"",
                "keyspaces.a.default_ttl",
            ),
            (
                "[limits]\nmax_pending_timeout = \"0s\"",
                "limits.max_pending_timeout",
            ),
            ("[keyspaces.a]\nlease_ttl = \"0s\"", "keyspaces.a.lease_ttl"),
            (
                "[keyspaces.a]\nlease_retry_after = \"0s\"",
                "keyspaces.a.lease_retry_after",
            ),
            (
                "[keyspaces.a]\nlease_ttl = \"1s\"\nlease_retry_after = \"2s\"",
                "keyspaces.a.lease_retry_after",
            ),
            (
                "[keyspaces.a]\nkeep_stale_for = \"0s\"",
                "keyspaces.a.keep_stale_for",
            ),
            (
                "[keyspaces.a]\ncapacity_bytes = 16777216\nmax_dirty_bytes = 16777217",
                "keyspaces.a.max_dirty_bytes",
            ),
            (
                "[created_keyspaces]\nlease_ttl = \"400days\"",
                "created_keyspaces.lease_ttl",
            ),
            ("[keyspaces.\"a b\"]", "keyspaces.a b"),
            ("resp_default_keyspace = \"nope\"", "resp_default_keyspace"),
            ("resp_password = \"\"", "resp_password"),
            (
                "[limits]\nrate_limit = { requests = 0 }",
                "limits.rate_limit.requests",
            ),
            (
                "[limits]\nrate_limit = { requests = 1, burst = 0 }",
                "limits.rate_limit.burst",
            ),
            (
                "[limits]\nmax_concurrent_requests = 0",
                "limits.max_concurrent_requests",
            ),
            (
                "[[auth.tokens]]\nname = \"a\"\nsecret = \"\"",
                "auth.tokens[0].secret",
            ),
            (
                "[[auth.tokens]]\nname = \"a\"\nsecret = \"x\"\n[[auth.tokens]]\nname = \"a\"\nsecret = \"y\"",
                "auth.tokens[1].name",
            ),
            (
                "[[auth.tokens]]\nname = \"a\"\nsecret = \"x\"\n[[auth.tokens]]\nname = \"b\"\nsecret = \"x\"",
                "auth.tokens[1].secret",
            ),
            (
                "[[auth.tokens]]\nname = \"a\"\nsecret = \"x\"\npermissions = { \"a b\" = \"read\" }",
                "auth.tokens[0].permissions.a b",
            ),
            (
                "[cluster]\nmembers = [{ id = \"x\", address = \"h:1\" }]",
                "cluster.members",
            ),
            (
                "[limits]\nmax_value_bytes = 1024\nmax_request_bytes = 1048576",
                "limits.max_request_bytes",
            ),
            (
                "node_id = \"x\"\n[cluster]\nmembers = [{ id = \"x\", address = \"h:1\" }, { id = \"x\", address = \"h:2\" }]",
                "cluster.members[1].id",
            ),
        ];
        for (text, field) in cases {
            let mut config = Config::from_toml(text).unwrap();
            let err = config.validate().unwrap_err();
            assert!(
                err.to_string()
                    .contains(&format!("invalid config: {field}:")),
                "{text:?} gave {err}"
            );
        }
    }

    #[test]
    fn token_secrets_come_from_exactly_one_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  from-file\n").unwrap();
        let mut config = Config::from_toml(&format!(
            "[[auth.tokens]]\nname = \"a\"\nsecret_file = \"{}\"\npermissions = {{ \"*\" = \"read\" }}",
            path.display()
        ))
        .unwrap();
        config.resolve_secrets().unwrap();
        config.validate().unwrap();
        let secret = config.auth.tokens[0].secret.as_ref().unwrap();
        assert_eq!(secret.expose(), "from-file");
        assert_eq!(format!("{secret:?}"), "Secret(\"<redacted>\")");

        let mut config =
            Config::from_toml("[[auth.tokens]]\nname = \"a\"\nsecret = \"x\"\nsecret_env = \"V\"")
                .unwrap();
        let err = config.resolve_secrets().unwrap_err().to_string();
        assert!(err.contains("auth.tokens[0]: give exactly one"), "{err}");
        let mut config = Config::from_toml(
            "[[auth.tokens]]\nname = \"a\"\nsecret_file = \"/nonexistent/token\"",
        )
        .unwrap();
        let err = config.resolve_secrets().unwrap_err().to_string();
        assert!(err.contains("auth.tokens[0].secret_file"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let dir = std::env::temp_dir().join(format!("ringcache-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.toml");
        std::fs::write(
            &path,
            "node_id = \"from-file\"\nlisten = \"127.0.0.1:7000\"\n",
        )
        .unwrap();
        let cli = Cli {
            config: Some(path.clone()),
            node_id: Some("from-flag".into()),
            no_metrics: true,
            ..Cli::default()
        };
        let config = Config::load(&cli).unwrap();
        assert_eq!(config.node_id, "from-flag");
        assert_eq!(config.resp_listen, None, "RESP is off by default");
        assert_eq!(config.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(config.metrics_listen, None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_shipped_example_validates() {
        let text = include_str!("../../deploy/config/node.example.toml");
        let mut config = Config::from_toml(text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.cluster.members.len(), 3);
        assert_eq!(config.log_format, LogFormat::Json);
    }

    #[test]
    fn the_shared_keyspace_file_adds_keyspaces() {
        let dir = std::env::temp_dir().join(format!("ringcache-ksfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keyspaces.toml");
        std::fs::write(
            &path,
            "[keyspaces.users]\nstrategy = \"read-through\"\nttl = \"5m\"\ncapacity_bytes = 16777216\nlease_ttl = \"3s\"\n",
        )
        .unwrap();
        let cli = Cli {
            keyspaces_file: Some(path.clone()),
            ..Cli::default()
        };
        let config = Config::load(&cli).unwrap();
        let users = &config.keyspaces["users"];
        assert_eq!(users.capacity_bytes, 16_777_216);
        assert_eq!(users.default_ttl, Some(Duration::from_secs(300)));
        assert_eq!(users.lease_ttl, Duration::from_secs(3));
        assert!(config.keyspaces.contains_key(DEFAULT_KEYSPACE));

        // A bad file names the keyspace and field; a keyspace in both places
        // is refused.
        std::fs::write(&path, "[keyspaces.users]\nstrategy = \"sideways\"\n").unwrap();
        let err = Config::load(&cli).unwrap_err().to_string();
        assert!(
            err.contains("sideways") && err.contains("keyspaces.users"),
            "{err}"
        );
        std::fs::write(&path, "[keyspaces.default]\nstrategy = \"cache-aside\"\n").unwrap();
        let mut config =
            Config::from_toml("[keyspaces.default]\ncapacity_bytes = 16777216").unwrap();
        config.keyspaces_file = Some(path.clone());
        let err = config.merge_keyspaces_file().unwrap_err().to_string();
        assert!(err.contains("keyspaces.default"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_file_names_the_path() {
        let cli = Cli {
            config: Some("/nonexistent/ringcache.toml".into()),
            ..Cli::default()
        };
        let err = Config::load(&cli).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/ringcache.toml"),
            "{err}"
        );
    }
}

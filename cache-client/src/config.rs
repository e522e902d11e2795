//! Client configuration: plain data with documented defaults and `with_*`
//! setters.

use std::collections::HashMap;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::ring::DEFAULT_VNODES;

/// Default per-attempt timeout.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// Default overall deadline of one call, retries included.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(2);
/// Default TCP connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default number of consecutive failures that mark a node down.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
/// Default interval between probes of a down node.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// Default interval between topology refreshes.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// Default number of attempts of an idempotent call.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;
/// Default TTL cap of writes placed on a fallback node.
pub const DEFAULT_FALLBACK_TTL: Duration = Duration::from_secs(10);
/// Default interval of the in-doubt transaction recovery.
pub const DEFAULT_RECOVERY_INTERVAL: Duration = Duration::from_secs(10);
/// Default first backoff delay.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(5);
/// Default longest backoff delay.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(200);

/// How a keyspace is replicated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Replication {
    /// Copies of each key: writes and deletes go to this many distinct
    /// healthy nodes in ring order; reads go to the first healthy one.
    pub replicas: usize,
    /// Replicas that must acknowledge a write or delete for it to succeed.
    pub write_quorum: usize,
}

impl Replication {
    /// `replicas` copies, all of which must acknowledge.
    pub fn new(replicas: usize) -> Self {
        Replication {
            replicas,
            write_quorum: replicas,
        }
    }

    /// Sets the write quorum.
    pub fn with_write_quorum(mut self, write_quorum: usize) -> Self {
        self.write_quorum = write_quorum;
        self
    }
}

impl Default for Replication {
    /// One copy, no replication.
    fn default() -> Self {
        Replication::new(1)
    }
}

/// Everything the client needs to know. Build it with [`ClientConfig::new`]
/// and the `with_*` setters; every field has a documented default.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Nodes to ask for the topology at start-up, as `host:port`.
    pub seeds: Vec<String>,
    /// Timeout of one attempt of one request (default 500 ms).
    pub request_timeout: Duration,
    /// Overall deadline of one call, retries included (default 2 s).
    pub deadline: Duration,
    /// TCP connect timeout (default 1 s).
    pub connect_timeout: Duration,
    /// Consecutive failures that mark a node down (default 3).
    pub failure_threshold: u32,
    /// How often down nodes are probed (default 200 ms).
    pub probe_interval: Duration,
    /// How often the topology is refreshed (default 5 s); it is also
    /// refreshed whenever a node is marked down.
    pub refresh_interval: Duration,
    /// Attempts of an idempotent call, the first included (default 4).
    pub max_attempts: u32,
    /// First retry delay; each retry doubles it, with full jitter (default
    /// 5 ms).
    pub backoff_base: Duration,
    /// Longest retry delay (default 200 ms).
    pub backoff_max: Duration,
    /// Longest TTL of a write placed on a fallback node, one that is not
    /// among the key's owners on the full ring but receives the key because
    /// an owner is down (default 10 s). When the owner returns, readers go
    /// back to it, and the copy left on the fallback node could otherwise
    /// come back stale if the owner fails again later; the cap bounds that.
    pub fallback_ttl: Duration,
    /// How often the client rolls back in-doubt prepared transactions of the
    /// stores its write-through keyspaces use or used, and abandoned ones of
    /// its other stores (default 10 s; see `Client::recover_in_doubt`).
    pub recovery_interval: Duration,
    /// Virtual points per unit of node weight (default
    /// [`DEFAULT_VNODES`]); every client of a pool must use the same value.
    pub vnodes: u32,
    /// Replication of keyspaces not listed in `keyspace_replication`
    /// (default: one copy).
    pub default_replication: Replication,
    /// Replication per keyspace.
    pub keyspace_replication: HashMap<String, Replication>,
    /// The bearer token sent with every request (default none); nodes with
    /// `auth.tokens` refuse calls without a token they know.
    pub token: Option<Token>,
    /// TLS to the nodes (default none: plaintext). The client verifies each
    /// node's certificate against the CA.
    pub tls: Option<ClientTls>,
    /// The writer id every version this client makes carries, at most
    /// [`crate::hlc::MAX_WRITER_ID`] (default none: a random id drawn at
    /// `connect`). Two clients with different ids never make the same
    /// version, so concurrent writes of one key are always ordered the same
    /// way by the nodes and the store. To be sure of it, give every client
    /// process that writes a keyspace its own id (from the pod ordinal, a
    /// lease in your coordination service...); random ids are the same for
    /// two clients with probability 1/4096.
    pub writer_id: Option<u16>,
    /// Addresses to dial per node id, overriding the addresses the nodes
    /// advertise in the topology (default none). For a client that must
    /// reach the nodes another way than the advertised one: through a
    /// proxy of its own, or a network address translation.
    pub node_addresses: HashMap<String, String>,
    /// Whether the hot calls (reads, writes, deletes, leases and fills) go
    /// over one `BatchCommands` stream per node, which carries the
    /// concurrent calls to a node in batches (default true). A node that does
    /// not offer the stream is called unary, as with `false`.
    pub command_stream: bool,
    /// Most commands in one batch of a node's stream (default 256). A batch
    /// is sent as soon as the stream can take it, with what queued since
    /// the previous one: nothing waits for a batch to fill.
    pub max_batch_commands: usize,
}

/// [`ClientConfig::max_batch_commands`]'s default.
pub const DEFAULT_MAX_BATCH_COMMANDS: usize = 256;

/// A bearer token's secret: `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Token(secret.into())
    }

    /// The secret, to send it; never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Token {
    type Err = std::convert::Infallible;

    /// The secret, without surrounding whitespace.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(Token::new(s.trim()))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(\"<redacted>\")")
    }
}

/// TLS to the nodes: the CA that signs their certificates, and for mutual
/// TLS the client's own certificate and key. PEM throughout.
#[derive(Clone)]
#[non_exhaustive]
pub struct ClientTls {
    /// CA certificates the nodes' certificates must chain to.
    pub ca_pem: Vec<u8>,
    /// The client's certificate chain and private key (mutual TLS).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the nodes' certificates must carry; default: the host of
    /// the address dialled.
    pub domain_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The identity holds a private key.
        f.debug_struct("ClientTls")
            .field("mutual", &self.identity.is_some())
            .field("domain_name", &self.domain_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the CA certificates of `ca_pem`.
    pub fn new(ca_pem: impl Into<Vec<u8>>) -> Self {
        ClientTls {
            ca_pem: ca_pem.into(),
            identity: None,
            domain_name: None,
        }
    }

    /// Reads the CA file, and the client certificate and key files when
    /// given (blocking file reads: call it at start-up).
    ///
    /// # Errors
    /// [`Error::Config`] naming the file that cannot be read.
    pub fn from_files(
        ca: &std::path::Path,
        identity: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<Self> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| Error::Config {
                field: "tls",
                reason: format!("cannot read {}: {e}", path.display()),
            })
        };
        let mut tls = ClientTls::new(read(ca)?);
        if let Some((cert, key)) = identity {
            tls.identity = Some((read(cert)?, read(key)?));
        }
        Ok(tls)
    }

    /// Presents `cert_pem` with `key_pem` to the nodes (mutual TLS).
    pub fn with_identity(
        mut self,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.identity = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Sets [`ClientTls::domain_name`].
    pub fn with_domain_name(mut self, name: impl Into<String>) -> Self {
        self.domain_name = Some(name.into());
        self
    }
}

impl ClientConfig {
    /// A config with the given seeds and every other field at its default.
    pub fn new<S: Into<String>>(seeds: impl IntoIterator<Item = S>) -> Self {
        ClientConfig {
            seeds: seeds.into_iter().map(Into::into).collect(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            deadline: DEFAULT_DEADLINE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
            fallback_ttl: DEFAULT_FALLBACK_TTL,
            recovery_interval: DEFAULT_RECOVERY_INTERVAL,
            vnodes: DEFAULT_VNODES,
            default_replication: Replication::default(),
            keyspace_replication: HashMap::new(),
            token: None,
            tls: None,
            writer_id: None,
            node_addresses: HashMap::new(),
            command_stream: true,
            max_batch_commands: DEFAULT_MAX_BATCH_COMMANDS,
        }
    }

    /// Sets [`ClientConfig::command_stream`].
    pub fn with_command_stream(mut self, enabled: bool) -> Self {
        self.command_stream = enabled;
        self
    }

    /// Sets [`ClientConfig::max_batch_commands`] (at least 1).
    pub fn with_max_batch_commands(mut self, max: usize) -> Self {
        self.max_batch_commands = max.max(1);
        self
    }

    /// Sets [`ClientConfig::writer_id`].
    pub fn with_writer_id(mut self, writer_id: u16) -> Self {
        self.writer_id = Some(writer_id);
        self
    }

    /// Dials node `node_id` at `address` (`host:port`) instead of the
    /// address the topology advertises for it; see
    /// [`ClientConfig::node_addresses`].
    pub fn with_node_address(
        mut self,
        node_id: impl Into<String>,
        address: impl Into<String>,
    ) -> Self {
        self.node_addresses.insert(node_id.into(), address.into());
        self
    }

    /// The address to dial for node `node_id` advertised at `advertised`.
    pub(crate) fn node_address<'a>(&'a self, node_id: &str, advertised: &'a str) -> &'a str {
        self.node_addresses
            .get(node_id)
            .map_or(advertised, String::as_str)
    }

    /// Sets [`ClientConfig::token`].
    pub fn with_token(mut self, token: Token) -> Self {
        self.token = Some(token);
        self
    }

    /// The tonic endpoint the client dials for a node at `address`
    /// (`host:port`): `https` with these TLS settings when TLS is on,
    /// `http` otherwise. Connection timeouts are the caller's to add.
    ///
    /// # Errors
    /// [`Error::Config`] for an address that is no URI authority, or TLS
    /// settings tonic refuses.
    pub fn endpoint(&self, address: &str) -> Result<tonic::transport::Endpoint> {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint =
            Endpoint::from_shared(format!("{scheme}://{address}")).map_err(|e| Error::Config {
                field: "seeds",
                reason: format!("bad node address {address:?}: {e}"),
            })?;
        if let Some(tls) = &self.tls {
            let mut settings =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
            if let Some((cert, key)) = &tls.identity {
                settings = settings.identity(Identity::from_pem(cert, key));
            }
            if let Some(name) = &tls.domain_name {
                settings = settings.domain_name(name.clone());
            }
            endpoint = endpoint.tls_config(settings).map_err(|e| Error::Config {
                field: "tls",
                reason: e.to_string(),
            })?;
        }
        Ok(endpoint)
    }

    /// Sets [`ClientConfig::tls`].
    pub fn with_tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets [`ClientConfig::request_timeout`].
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Sets [`ClientConfig::deadline`].
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Sets [`ClientConfig::connect_timeout`].
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets [`ClientConfig::failure_threshold`].
    pub fn with_failure_threshold(mut self, failures: u32) -> Self {
        self.failure_threshold = failures;
        self
    }

    /// Sets [`ClientConfig::probe_interval`].
    pub fn with_probe_interval(mut self, interval: Duration) -> Self {
        self.probe_interval = interval;
        self
    }

    /// Sets [`ClientConfig::refresh_interval`].
    pub fn with_refresh_interval(mut self, interval: Duration) -> Self {
        self.refresh_interval = interval;
        self
    }

    /// Sets [`ClientConfig::max_attempts`].
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Sets [`ClientConfig::backoff_base`] and [`ClientConfig::backoff_max`].
    pub fn with_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_max = max;
        self
    }

    /// Sets [`ClientConfig::fallback_ttl`].
    pub fn with_fallback_ttl(mut self, ttl: Duration) -> Self {
        self.fallback_ttl = ttl;
        self
    }

    /// Sets [`ClientConfig::recovery_interval`].
    pub fn with_recovery_interval(mut self, interval: Duration) -> Self {
        self.recovery_interval = interval;
        self
    }

    /// Sets [`ClientConfig::vnodes`].
    pub fn with_vnodes(mut self, vnodes: u32) -> Self {
        self.vnodes = vnodes;
        self
    }

    /// Sets [`ClientConfig::default_replication`].
    pub fn with_default_replication(mut self, replication: Replication) -> Self {
        self.default_replication = replication;
        self
    }

    /// Sets the replication of one keyspace.
    pub fn with_keyspace_replication(
        mut self,
        keyspace: impl Into<String>,
        replication: Replication,
    ) -> Self {
        self.keyspace_replication
            .insert(keyspace.into(), replication);
        self
    }

    /// The replication of `keyspace`.
    pub fn replication(&self, keyspace: &str) -> Replication {
        self.keyspace_replication
            .get(keyspace)
            .copied()
            .unwrap_or(self.default_replication)
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first invalid field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: &str| {
            Err(Error::Config {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.seeds.is_empty() {
            return bad("seeds", "at least one seed is needed");
        }
        if self.request_timeout.is_zero() || self.deadline.is_zero() {
            return bad("request_timeout", "timeouts must be greater than zero");
        }
        if self.failure_threshold == 0 {
            return bad("failure_threshold", "must be at least 1");
        }
        if self.max_attempts == 0 {
            return bad("max_attempts", "must be at least 1");
        }
        if self.recovery_interval.is_zero() {
            return bad("recovery_interval", "must be greater than zero");
        }
        if self.fallback_ttl.is_zero() {
            return bad("fallback_ttl", "must be greater than zero");
        }
        if self.vnodes == 0 {
            return bad("vnodes", "must be at least 1");
        }
        if self.max_batch_commands == 0 {
            return bad("max_batch_commands", "must be at least 1");
        }
        if self
            .writer_id
            .is_some_and(|id| id > crate::hlc::MAX_WRITER_ID)
        {
            return bad("writer_id", "must be at most 4095 (12 bits)");
        }
        if self.probe_interval.is_zero() || self.refresh_interval.is_zero() {
            return bad("probe_interval", "intervals must be greater than zero");
        }
        let replications =
            std::iter::once(&self.default_replication).chain(self.keyspace_replication.values());
        for r in replications {
            if r.replicas == 0 || r.write_quorum == 0 || r.write_quorum > r.replicas {
                return bad(
                    "keyspace_replication",
                    "replicas and write_quorum must be at least 1, and write_quorum at most replicas",
                );
            }
        }
        Ok(())
    }
}

/// Jittered exponential backoff ("full jitter": a uniform delay between zero
/// and the exponential bound), so that clients that failed together do not
/// retry together.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(config: &ClientConfig) -> Self {
        Backoff {
            base: config.backoff_base,
            max: config.backoff_max,
        }
    }

    /// The delay before retry number `retry` (0 for the first retry).
    pub(crate) fn delay(&self, retry: u32) -> Duration {
        let bound = self
            .base
            .saturating_mul(1u32 << retry.min(20))
            .min(self.max);
        bound.mul_f64(rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_address_overrides_only_its_own_node() {
        let config = ClientConfig::new(["a:1"]).with_node_address("node-1", "127.0.0.1:9");
        assert_eq!(
            config.node_address("node-1", "10.0.0.1:7000"),
            "127.0.0.1:9"
        );
        assert_eq!(
            config.node_address("node-2", "10.0.0.2:7000"),
            "10.0.0.2:7000"
        );
    }

    #[test]
    fn backoff_stays_within_its_exponential_bound() {
        let config = ClientConfig::new(["a:1"])
            .with_backoff(Duration::from_millis(10), Duration::from_millis(100));
        let backoff = Backoff::new(&config);
        for retry in 0..30 {
            let bound =
                Duration::from_millis(10 * (1u64 << retry.min(20))).min(Duration::from_millis(100));
            for _ in 0..50 {
                assert!(backoff.delay(retry) <= bound);
            }
        }
    }

    #[test]
    fn validation_names_the_field() {
        let err = ClientConfig::new(Vec::<String>::new())
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("seeds"), "{err}");
        let err = ClientConfig::new(["a:1"])
            .with_keyspace_replication("k", Replication::new(2).with_write_quorum(3))
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("keyspace_replication"), "{err}");
        let err = ClientConfig::new(["a:1"])
            .with_writer_id(4096)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("writer_id"), "{err}");
        ClientConfig::new(["a:1"])
            .with_writer_id(4095)
            .validate()
            .unwrap();
        ClientConfig::new(["a:1"]).validate().unwrap();
    }
}

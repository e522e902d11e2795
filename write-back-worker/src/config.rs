//! Worker configuration: a TOML file, overridden by environment variables,
//! then by command-line flags (clap reads both). Unknown fields are
//! rejected and every value is validated at start-up, with errors that name
//! the field.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Default consumer group: workers sharing it share the partitions.
pub const DEFAULT_GROUP: &str = "ringcache-write-back";
/// Default largest batch, in Kafka records.
pub const DEFAULT_MAX_BATCH_RECORDS: usize = 1000;
/// Default [`Config::max_batches_in_flight`].
pub const DEFAULT_MAX_BATCHES_IN_FLIGHT: usize = 4;
/// Default [`Config::min_batch_records`]: a batch is written as soon as
/// nothing more is queued.
pub const DEFAULT_MIN_BATCH_RECORDS: usize = 1;
/// Default longest time the first record of a batch waits for the batch to
/// fill before it is written anyway.
pub const DEFAULT_MAX_BATCH_DELAY: Duration = Duration::from_millis(100);
/// Default Kafka `session.timeout.ms`. Short, so that a group join (and the
/// take-over of a dead worker's partitions) takes seconds, not the ~20 s of
/// librdkafka's defaults.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(6);
/// Default Kafka `heartbeat.interval.ms`; below a third of the session
/// timeout.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Default Kafka `max.poll.interval.ms`: how long one batch (with its
/// database retries) may hold up polling before the group evicts the
/// worker.
pub const DEFAULT_MAX_POLL_INTERVAL: Duration = Duration::from_secs(10);
/// Default capacity of the channel between the polling thread and the
/// batcher, in records.
pub const DEFAULT_CHANNEL_CAPACITY: usize = 4096;
/// Default [`Config::fetch_partition_max_bytes`].
pub const DEFAULT_FETCH_PARTITION_MAX_BYTES: usize = 256 * 1024;
/// Default [`Config::fetch_max_bytes`].
pub const DEFAULT_FETCH_MAX_BYTES: usize = 1024 * 1024;
/// Default [`Config::fetch_queued_records`].
pub const DEFAULT_FETCH_QUEUED_RECORDS: usize = 10_000;
/// Default [`Config::fetch_wait_max`].
pub const DEFAULT_FETCH_WAIT_MAX: Duration = Duration::from_millis(100);
/// Default topic that records which can never be stored are moved to.
pub const DEFAULT_DEAD_LETTER_TOPIC: &str = cache_client::dead_letter::DEFAULT_TOPIC;
/// Default number of batch attempts in which the database refused a record
/// before the record is dead-lettered.
pub const DEFAULT_DEAD_LETTER_AFTER_ATTEMPTS: u32 = 3;
/// Default interval of the dirty-entry repair round.
pub const DEFAULT_DIRTY_REPAIR_INTERVAL: Duration = Duration::from_secs(60);
/// Default address of the Prometheus endpoint.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9800);

/// The worker's whole configuration.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Kafka bootstrap servers, comma-separated (`host:port,...`).
    pub brokers: String,
    /// PostgreSQL URL of the store (`postgres://user@host:5432/db`). Its
    /// migrations (`cache-client/migrations/`) are applied at start-up.
    pub database_url: String,
    /// Kafka consumer group; its consumed offsets live in PostgreSQL under
    /// this name.
    pub group: String,
    /// The keyspaces to drain; each is consumed from its topic
    /// `ringcache-wb-<keyspace>`. Empty with a `keyspaces_file`: every
    /// write-back keyspace of the file.
    pub keyspaces: Vec<String>,
    /// The keyspace file shared with the services and the nodes: the store
    /// layout of each keyspace (its table and columns, or its statements)
    /// comes from it. Without it, every keyspace's rows go to the shared
    /// table `ringcache_entries` (the `default` layout).
    pub keyspaces_file: Option<PathBuf>,
    /// Most Kafka records in one database transaction.
    pub max_batch_records: usize,
    /// Fewest records a batch waits for (at most `max_batch_delay`) before
    /// it is written. With the default, 1, a batch is written as soon as
    /// the records queued for it are taken and nothing more is queued.
    pub min_batch_records: usize,
    /// Longest time a record waits for its batch to reach
    /// `min_batch_records`.
    #[serde(with = "humantime_serde")]
    pub max_batch_delay: Duration,
    /// Most batches written at once, each of another partition (a
    /// partition's batches are written one after the other): each one
    /// holds a database connection while it is written.
    pub max_batches_in_flight: usize,
    /// Kafka `session.timeout.ms`.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Kafka `heartbeat.interval.ms`.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Kafka `max.poll.interval.ms`.
    #[serde(with = "humantime_serde")]
    pub max_poll_interval: Duration,
    /// Records buffered between the polling thread and the batcher.
    pub channel_capacity: usize,
    /// Most bytes one fetch returns per partition (Kafka
    /// `max.partition.fetch.bytes`).
    pub fetch_partition_max_bytes: usize,
    /// Most bytes one fetch returns in all (Kafka `fetch.max.bytes`); at
    /// least `fetch_partition_max_bytes`.
    pub fetch_max_bytes: usize,
    /// Records fetched ahead per partition before the consumer waits for
    /// the worker to take them (librdkafka `queued.min.messages`).
    pub fetch_queued_records: usize,
    /// Longest time the broker holds a fetch that found nothing (Kafka
    /// `fetch.wait.max.ms`): how late a record that arrives at an idle
    /// partition may be seen, with a broker that does not answer a held
    /// fetch as soon as a record arrives.
    #[serde(with = "humantime_serde")]
    pub fetch_wait_max: Duration,
    /// The Kafka topic that records which can never be stored go to, with
    /// the reason in their headers (see `docs/write-back.md`). Created at
    /// start-up when missing.
    pub dead_letter_topic: String,
    /// How many batch attempts the database may refuse a record in (for a
    /// reason that is not transient, such as a value the table's
    /// constraints refuse) before the record is dead-lettered and the rest
    /// of its partition goes on. Until then the partition waits, so that a
    /// refusal a DBA can fix (a constraint, a trigger) costs no data.
    /// Records that cannot be decoded at all are dead-lettered at once.
    pub dead_letter_after_attempts: u32,
    /// Where to serve Prometheus metrics (`GET /metrics`); `None` serves
    /// none. Port 0 picks a free port (logged at start-up).
    pub metrics_listen: Option<SocketAddr>,
    /// Cache nodes to tell, after each committed batch, which versions are
    /// stored (`MarkClean`), so that they treat those dirty entries as clean
    /// and may evict them again. Empty: nobody is told, and the nodes'
    /// dirty bytes only ever grow until `max_dirty_bytes` refuses writes.
    pub cache_seeds: Vec<String>,
    /// How often, with `cache_seeds`, the worker looks for dirty cache
    /// entries at least this old whose version the store already holds
    /// (their `MarkClean` was lost to a crash or an unreachable node) and
    /// marks them clean.
    #[serde(with = "humantime_serde")]
    pub dirty_repair_interval: Duration,
    /// A file holding the bearer token sent to the cache nodes, for nodes
    /// that require one; the token needs `admin` on the drained keyspaces
    /// (`ListDirty`, `MarkClean`). The `RINGCACHE_CACHE_TOKEN` variable
    /// overrides it.
    pub cache_token_file: Option<PathBuf>,
    /// The token itself, read from `cache_token_file` or the variable at
    /// start-up (never from the TOML file, never shown by `Debug`).
    #[serde(skip)]
    pub cache_token: Option<cache_client::Token>,
    /// TLS to the cache nodes: the CA file (PEM) their certificates chain
    /// to. Absent: plaintext.
    pub cache_tls_ca_file: Option<PathBuf>,
    /// The worker's certificate (PEM), for nodes that require mutual TLS.
    pub cache_tls_cert_file: Option<PathBuf>,
    /// The key of `cache_tls_cert_file` (PEM).
    pub cache_tls_key_file: Option<PathBuf>,
    /// Log output format; the level comes from `RUST_LOG`.
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            brokers: String::new(),
            database_url: String::new(),
            group: DEFAULT_GROUP.to_owned(),
            keyspaces: Vec::new(),
            keyspaces_file: None,
            cache_seeds: Vec::new(),
            max_batch_records: DEFAULT_MAX_BATCH_RECORDS,
            min_batch_records: DEFAULT_MIN_BATCH_RECORDS,
            max_batch_delay: DEFAULT_MAX_BATCH_DELAY,
            max_batches_in_flight: DEFAULT_MAX_BATCHES_IN_FLIGHT,
            session_timeout: DEFAULT_SESSION_TIMEOUT,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            max_poll_interval: DEFAULT_MAX_POLL_INTERVAL,
            channel_capacity: DEFAULT_CHANNEL_CAPACITY,
            fetch_partition_max_bytes: DEFAULT_FETCH_PARTITION_MAX_BYTES,
            fetch_max_bytes: DEFAULT_FETCH_MAX_BYTES,
            fetch_queued_records: DEFAULT_FETCH_QUEUED_RECORDS,
            fetch_wait_max: DEFAULT_FETCH_WAIT_MAX,
            dead_letter_topic: DEFAULT_DEAD_LETTER_TOPIC.to_owned(),
            dead_letter_after_attempts: DEFAULT_DEAD_LETTER_AFTER_ATTEMPTS,
            metrics_listen: Some(DEFAULT_METRICS_LISTEN),
            dirty_repair_interval: DEFAULT_DIRTY_REPAIR_INTERVAL,
            cache_token_file: None,
            cache_token: None,
            cache_tls_ca_file: None,
            cache_tls_cert_file: None,
            cache_tls_key_file: None,
            log_format: LogFormat::Text,
        }
    }
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

/// Command-line flags; each overrides the config file.
#[derive(Debug, Default, clap::Parser)]
#[command(
    name = "write-back-worker",
    about = "Drains ringcache write-back topics into PostgreSQL"
)]
pub struct Cli {
    /// TOML config file.
    #[arg(long, env = "RINGCACHE_WB_CONFIG")]
    pub config: Option<PathBuf>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "RINGCACHE_KAFKA_BROKERS")]
    pub brokers: Option<String>,
    /// PostgreSQL URL.
    #[arg(long, env = "RINGCACHE_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Kafka consumer group.
    #[arg(long, env = "RINGCACHE_WB_GROUP")]
    pub group: Option<String>,
    /// Keyspaces to drain, comma-separated.
    #[arg(long, env = "RINGCACHE_WB_KEYSPACES", value_delimiter = ',')]
    pub keyspaces: Option<Vec<String>>,
    /// The keyspace file shared with the services (store layouts; the
    /// write-back keyspaces to drain when --keyspaces is not given).
    #[arg(long, env = "RINGCACHE_KEYSPACES")]
    pub keyspaces_file: Option<PathBuf>,
    /// Cache nodes to tell what is stored, comma-separated host:port.
    #[arg(long, env = "RINGCACHE_SEEDS", value_delimiter = ',')]
    pub cache_seeds: Option<Vec<String>>,
    /// Topic of records that can never be stored.
    #[arg(long, env = "RINGCACHE_WB_DEAD_LETTER_TOPIC")]
    pub dead_letter_topic: Option<String>,
    /// Batch attempts the database may refuse a record in before it is
    /// dead-lettered.
    #[arg(long, env = "RINGCACHE_WB_DEAD_LETTER_AFTER_ATTEMPTS")]
    pub dead_letter_after_attempts: Option<u32>,
    /// Prometheus endpoint address (host:port; port 0 picks one).
    #[arg(
        long,
        env = "RINGCACHE_WB_METRICS_LISTEN",
        conflicts_with = "no_metrics"
    )]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve no metrics endpoint.
    #[arg(long)]
    pub no_metrics: bool,
    /// Interval of the dirty-entry repair round (e.g. `1m`).
    #[arg(long, env = "RINGCACHE_WB_DIRTY_REPAIR_INTERVAL", value_parser = humantime::parse_duration)]
    pub dirty_repair_interval: Option<Duration>,
    /// Bearer token for the cache nodes (prefer the variable to the flag:
    /// flags show in `ps`).
    #[arg(long, env = "RINGCACHE_CACHE_TOKEN", hide_env_values = true)]
    pub cache_token: Option<cache_client::Token>,
    /// File holding the bearer token for the cache nodes.
    #[arg(long, env = "RINGCACHE_CACHE_TOKEN_FILE")]
    pub cache_token_file: Option<PathBuf>,
    /// CA (PEM) of the cache nodes' certificates: turns TLS on.
    #[arg(long, env = "RINGCACHE_CACHE_TLS_CA")]
    pub cache_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS with the cache nodes.
    #[arg(long, env = "RINGCACHE_CACHE_TLS_CERT", requires = "cache_tls_key")]
    pub cache_tls_cert: Option<PathBuf>,
    /// Key (PEM) of --cache-tls-cert.
    #[arg(long, env = "RINGCACHE_CACHE_TLS_KEY", requires = "cache_tls_cert")]
    pub cache_tls_key: Option<PathBuf>,
    /// Log format.
    #[arg(long)]
    pub log_format: Option<LogFormat>,
}

impl Config {
    /// The config file named by `cli` (or the defaults), overridden by the
    /// flags and environment variables `cli` holds, validated.
    ///
    /// # Errors
    /// [`Error::ConfigFile`] when the file cannot be read or parsed,
    /// [`Error::Config`] when a value is invalid.
    pub fn load(cli: &Cli) -> Result<Self> {
        let mut config = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|err| Error::ConfigFile {
                    path: path.clone(),
                    message: err.to_string(),
                })?;
                toml::from_str(&text).map_err(|err| Error::ConfigFile {
                    path: path.clone(),
                    message: err.to_string(),
                })?
            }
            None => Config::default(),
        };
        if let Some(brokers) = &cli.brokers {
            config.brokers.clone_from(brokers);
        }
        if let Some(url) = &cli.database_url {
            config.database_url.clone_from(url);
        }
        if let Some(group) = &cli.group {
            config.group.clone_from(group);
        }
        if let Some(keyspaces) = &cli.keyspaces {
            config.keyspaces.clone_from(keyspaces);
        }
        if let Some(path) = &cli.keyspaces_file {
            config.keyspaces_file = Some(path.clone());
        }
        if let Some(seeds) = &cli.cache_seeds {
            config.cache_seeds.clone_from(seeds);
        }
        if let Some(topic) = &cli.dead_letter_topic {
            config.dead_letter_topic.clone_from(topic);
        }
        if let Some(attempts) = cli.dead_letter_after_attempts {
            config.dead_letter_after_attempts = attempts;
        }
        if let Some(addr) = cli.metrics_listen {
            config.metrics_listen = Some(addr);
        }
        if cli.no_metrics {
            config.metrics_listen = None;
        }
        if let Some(interval) = cli.dirty_repair_interval {
            config.dirty_repair_interval = interval;
        }
        if let Some(format) = cli.log_format {
            config.log_format = format;
        }
        if let Some(path) = &cli.cache_token_file {
            config.cache_token_file = Some(path.clone());
        }
        if let Some(path) = &cli.cache_tls_ca {
            config.cache_tls_ca_file = Some(path.clone());
        }
        if let (Some(cert), Some(key)) = (&cli.cache_tls_cert, &cli.cache_tls_key) {
            config.cache_tls_cert_file = Some(cert.clone());
            config.cache_tls_key_file = Some(key.clone());
        }
        config.cache_token = match (&cli.cache_token, &config.cache_token_file) {
            (Some(token), _) => Some(token.clone()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|err| Error::Config {
                    field: "cache_token_file",
                    message: format!("cannot read {}: {err}", path.display()),
                })?;
                Some(cache_client::Token::new(text.trim()))
            }
            (None, None) => None,
        };
        config.validate()?;
        Ok(config)
    }

    /// The keyspaces to drain, each with its store layout: `keyspaces` (or,
    /// when empty, the write-back keyspaces of `keyspaces_file`), with the
    /// layouts the file gives them.
    ///
    /// # Errors
    /// [`Error::Config`] when the file cannot be read or parsed, names a
    /// drained keyspace with another strategy, or leaves nothing to drain.
    pub fn drained(&self) -> Result<Vec<(String, cache_client::store::StoreLayout)>> {
        use cache_client::{keyspaces::KeyspacesFile, store::StoreLayout, strategy::Strategy};
        let file = match &self.keyspaces_file {
            Some(path) => Some(KeyspacesFile::read(path).map_err(|err| Error::Config {
                field: "keyspaces_file",
                message: err.to_string(),
            })?),
            None => None,
        };
        let names: Vec<String> = match (&file, self.keyspaces.is_empty()) {
            (Some(file), true) => file
                .keyspaces
                .iter()
                .filter(|(_, entry)| entry.strategy == Strategy::WriteBack)
                .map(|(name, _)| name.clone())
                .collect(),
            _ => self.keyspaces.clone(),
        };
        if names.is_empty() {
            return Err(Error::Config {
                field: "keyspaces",
                message: "must name at least one keyspace (or keyspaces_file must have a write-back keyspace)".into(),
            });
        }
        names
            .into_iter()
            .map(|name| {
                let layout = match file.as_ref().and_then(|f| f.keyspaces.get(&name)) {
                    Some(entry) if entry.strategy != Strategy::WriteBack => {
                        return Err(Error::Config {
                            field: "keyspaces",
                            message: format!(
                                "keyspace {name:?} is {} in the keyspace file, not write-back",
                                entry.strategy
                            ),
                        });
                    }
                    Some(entry) => entry.store.clone(),
                    None => StoreLayout::default(),
                };
                Ok((name, layout))
            })
            .collect()
    }

    /// The settings of the worker's client of the cache nodes: its seeds,
    /// token and TLS (whose files are read here, at start-up).
    ///
    /// # Errors
    /// [`Error::Config`] naming a TLS file that cannot be read.
    pub fn cache_client_config(&self) -> Result<cache_client::ClientConfig> {
        let mut config = cache_client::ClientConfig::new(self.cache_seeds.clone());
        if let Some(token) = &self.cache_token {
            config = config.with_token(token.clone());
        }
        if let Some(ca) = &self.cache_tls_ca_file {
            let identity = self
                .cache_tls_cert_file
                .as_deref()
                .zip(self.cache_tls_key_file.as_deref());
            let tls =
                cache_client::ClientTls::from_files(ca, identity).map_err(|err| Error::Config {
                    field: "cache_tls_ca_file",
                    message: err.to_string(),
                })?;
            config = config.with_tls(tls);
        }
        Ok(config)
    }

    /// The consumer's fetch settings, as librdkafka properties.
    pub fn fetch_properties(&self) -> [(&'static str, String); 4] {
        [
            (
                "max.partition.fetch.bytes",
                self.fetch_partition_max_bytes.to_string(),
            ),
            ("fetch.max.bytes", self.fetch_max_bytes.to_string()),
            ("queued.min.messages", self.fetch_queued_records.to_string()),
            (
                "fetch.wait.max.ms",
                self.fetch_wait_max.as_millis().to_string(),
            ),
        ]
    }

    /// Checks that the dead-letter topic is none of `keyspaces`' topics.
    ///
    /// # Errors
    /// [`Error::Config`] naming `dead_letter_topic`.
    pub fn check_dead_letter_topic(&self, keyspaces: &[String]) -> Result<()> {
        if keyspaces
            .iter()
            .any(|k| cache_client::writeback::topic_for(k) == self.dead_letter_topic)
        {
            return Err(Error::Config {
                field: "dead_letter_topic",
                message: "must not be the topic of a drained keyspace".into(),
            });
        }
        Ok(())
    }

    /// Checks every value.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first invalid field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, message: &str| {
            Err(Error::Config {
                field,
                message: message.to_owned(),
            })
        };
        if self.cache_tls_cert_file.is_some() != self.cache_tls_key_file.is_some() {
            return bad(
                "cache_tls_cert_file",
                "cache_tls_cert_file and cache_tls_key_file go together",
            );
        }
        if self.cache_tls_cert_file.is_some() && self.cache_tls_ca_file.is_none() {
            return bad("cache_tls_ca_file", "mutual TLS needs the nodes' CA too");
        }
        if self.brokers.trim().is_empty() {
            return bad("brokers", "must name at least one broker");
        }
        if self.database_url.trim().is_empty() {
            return bad("database_url", "must be set");
        }
        if self.group.trim().is_empty() {
            return bad("group", "must not be empty");
        }
        if self.keyspaces.is_empty() && self.keyspaces_file.is_none() {
            return bad("keyspaces", "must name at least one keyspace");
        }
        for keyspace in &self.keyspaces {
            if keyspace.is_empty() || keyspace.contains('\0') {
                return Err(Error::Config {
                    field: "keyspaces",
                    message: format!("{keyspace:?} is not a keyspace name"),
                });
            }
        }
        if self.max_batch_records == 0 {
            return bad("max_batch_records", "must be at least 1");
        }
        if self.min_batch_records == 0 || self.min_batch_records > self.max_batch_records {
            return bad(
                "min_batch_records",
                "must be at least 1 and at most max_batch_records",
            );
        }
        if self.max_batches_in_flight == 0 {
            return bad("max_batches_in_flight", "must be at least 1");
        }
        if self.max_batch_delay.is_zero() {
            return bad("max_batch_delay", "must be positive");
        }
        if self.channel_capacity == 0 {
            return bad("channel_capacity", "must be at least 1");
        }
        if self.fetch_partition_max_bytes == 0 {
            return bad("fetch_partition_max_bytes", "must be at least 1");
        }
        if self.fetch_max_bytes < self.fetch_partition_max_bytes {
            return bad(
                "fetch_max_bytes",
                "must be at least fetch_partition_max_bytes",
            );
        }
        if self.fetch_queued_records == 0 {
            return bad("fetch_queued_records", "must be at least 1");
        }
        if self.fetch_wait_max.is_zero() || self.fetch_wait_max >= self.session_timeout {
            return bad(
                "fetch_wait_max",
                "must be positive and below session_timeout",
            );
        }
        if self.dead_letter_topic.trim().is_empty() {
            return bad("dead_letter_topic", "must not be empty");
        }
        self.check_dead_letter_topic(&self.keyspaces)?;
        if self.dirty_repair_interval.is_zero() {
            return bad("dirty_repair_interval", "must be positive");
        }
        if self.dead_letter_after_attempts == 0 {
            return bad("dead_letter_after_attempts", "must be at least 1");
        }
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval >= self.session_timeout {
            return bad(
                "heartbeat_interval",
                "must be positive and below session_timeout",
            );
        }
        if self.max_poll_interval < self.session_timeout {
            return bad("max_poll_interval", "must be at least session_timeout");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        Config {
            brokers: "127.0.0.1:9092".into(),
            database_url: "postgres://localhost/db".into(),
            keyspaces: vec!["users".into()],
            ..Config::default()
        }
    }

    #[test]
    fn defaults_need_only_the_services_and_keyspaces() {
        assert!(valid().validate().is_ok());
        let err = Config::default().validate().unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid config: brokers: must name at least one broker"
        );
    }

    #[test]
    fn the_cache_token_comes_from_its_file_and_is_not_shown() {
        let dir = std::env::temp_dir().join(format!("ringcache-wb-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "worker-secret\n").unwrap();
        let cli = Cli {
            brokers: Some("b:9092".into()),
            database_url: Some("postgres://x/y".into()),
            keyspaces: Some(vec!["a".into()]),
            cache_seeds: Some(vec!["127.0.0.1:7700".into()]),
            cache_token_file: Some(token.clone()),
            ..Cli::default()
        };
        let config = Config::load(&cli).unwrap();
        let client = config.cache_client_config().unwrap();
        assert_eq!(client.token.as_ref().unwrap().expose(), "worker-secret");
        assert!(client.tls.is_none());
        assert!(!format!("{config:?} {client:?}").contains("worker-secret"));

        // Mutual TLS needs both files and the CA; a missing CA file is named.
        let mut bad = valid();
        bad.cache_tls_cert_file = Some(token.clone());
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("cache_tls_cert_file")
        );
        bad.cache_tls_key_file = Some(token.clone());
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("cache_tls_ca_file")
        );
        let mut missing = valid();
        missing.cache_tls_ca_file = Some(dir.join("absent.pem"));
        let err = missing.cache_client_config().unwrap_err().to_string();
        assert!(err.contains("absent.pem"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn files_reject_unknown_fields_and_parse_durations() {
        let config: Config = toml::from_str(
            "brokers = 'b:9092'\ndatabase_url = 'postgres://x/y'\nkeyspaces = ['a']\nmax_batch_delay = '250ms'",
        )
        .unwrap();
        assert_eq!(config.max_batch_delay, Duration::from_millis(250));
        assert!(toml::from_str::<Config>("batch = 3").is_err());
    }

    #[test]
    fn fetch_settings_become_the_consumer_properties() {
        let defaults = valid().fetch_properties();
        assert_eq!(
            defaults.map(|(name, value)| format!("{name}={value}")),
            [
                "max.partition.fetch.bytes=262144",
                "fetch.max.bytes=1048576",
                "queued.min.messages=10000",
                "fetch.wait.max.ms=100",
            ]
        );
        let config: Config = toml::from_str(
            "fetch_partition_max_bytes = 1048576\nfetch_max_bytes = 4194304\n\
             fetch_queued_records = 50000\nfetch_wait_max = '20ms'",
        )
        .unwrap();
        assert_eq!(
            config
                .fetch_properties()
                .map(|(name, value)| format!("{name}={value}")),
            [
                "max.partition.fetch.bytes=1048576",
                "fetch.max.bytes=4194304",
                "queued.min.messages=50000",
                "fetch.wait.max.ms=20",
            ]
        );
        let field = |config: Config| config.validate().unwrap_err().to_string();
        let mut config = valid();
        config.fetch_max_bytes = config.fetch_partition_max_bytes - 1;
        assert!(field(config).contains("fetch_max_bytes"));
        let mut config = valid();
        config.fetch_partition_max_bytes = 0;
        assert!(field(config).contains("fetch_partition_max_bytes"));
        let mut config = valid();
        config.fetch_queued_records = 0;
        assert!(field(config).contains("fetch_queued_records"));
        let mut config = valid();
        config.max_batches_in_flight = 0;
        assert!(field(config).contains("max_batches_in_flight"));
        for wait in [Duration::ZERO, DEFAULT_SESSION_TIMEOUT] {
            let mut config = valid();
            config.fetch_wait_max = wait;
            assert!(field(config).contains("fetch_wait_max"), "{wait:?}");
        }
    }

    #[test]
    fn the_deploy_example_parses_and_is_valid() {
        let text = include_str!("../../deploy/config/worker.example.toml");
        let config: Config = toml::from_str(text).expect("the example parses");
        config.validate().expect("the example is valid");
        assert_eq!(config.keyspaces, ["sessions", "carts"]);
        assert_eq!(config.dead_letter_after_attempts, 3);
    }

    #[test]
    fn invalid_values_name_their_field() {
        let mut config = valid();
        config.max_batch_records = 0;
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("max_batch_records")
        );
        for min in [0, DEFAULT_MAX_BATCH_RECORDS + 1] {
            let mut config = valid();
            config.min_batch_records = min;
            assert!(
                config
                    .validate()
                    .unwrap_err()
                    .to_string()
                    .contains("min_batch_records"),
                "min_batch_records = {min}"
            );
        }
        let mut config = valid();
        config.heartbeat_interval = config.session_timeout;
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("heartbeat_interval")
        );
        let mut config = valid();
        config.dead_letter_topic = "ringcache-wb-users".into();
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("dead_letter_topic")
        );
        let mut config = valid();
        config.keyspaces.push("a\0b".into());
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("keyspaces")
        );
    }
}

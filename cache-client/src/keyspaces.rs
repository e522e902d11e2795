//! The keyspace file: one TOML file shared by services and cache nodes that
//! says, per keyspace, how it is cached and stored.
//!
//! ```toml
//! [keyspaces.users]
//! strategy = "read-through"   # cache-aside | read-through | write-around | write-through | write-back
//! ttl = "10m"                 # cache TTL of loaded values (absent: the node's default)
//! ttl_jitter = 0.1            # each TTL is shortened by up to 10 %, at random
//! negative_ttl = "30s"        # how long "no such row" is cached
//! replicas = 2                # copies of each key in the cache
//! write_quorum = 1            # copies that must acknowledge a write
//! lease_wait = "2s"           # how long a reader waits for another's load
//! pending_timeout = "5s"      # write-through: how long a prepared change may stay pending
//! prepare_wait = "6s"         # write-through: how long a writer waits behind another writer of the key
//! ack = "durable"             # write-back: return after the broker (durable) or the cache (fast)
//! store = "default"           # or { table = { name = "..." } } or { sql = { load = "...", ... } }
//!
//! # read by the cache nodes only:
//! capacity_bytes = 67108864
//! lease_ttl = "10s"
//! ```
//!
//! Unknown fields are refused; every value is checked before any of the file
//! takes effect, and an error names the keyspace and the field.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::strategy::{KeyspaceSettings, Strategy};

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyspacesFile {
    /// Keyspaces by name.
    #[serde(default)]
    pub keyspaces: BTreeMap<String, KeyspaceEntry>,
}

/// One keyspace of the file.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyspaceEntry {
    /// How cache and store stay in step.
    pub strategy: Strategy,
    /// Cache TTL of values this client writes or loads.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// Fraction in `[0, 1)` by which each TTL is shortened at random, so that
    /// keys loaded together do not expire together.
    #[serde(default)]
    pub ttl_jitter: f64,
    /// How long the absence of a row is cached; absent: only briefly (see
    /// [`KeyspaceSettings::negative_ttl`]).
    #[serde(default, with = "humantime_serde")]
    pub negative_ttl: Option<Duration>,
    /// Copies of each key in the cache.
    #[serde(default = "one")]
    pub replicas: usize,
    /// Copies that must acknowledge a write; default: all.
    #[serde(default)]
    pub write_quorum: Option<usize>,
    /// How long a reader waits for another reader's load before loading
    /// itself.
    #[serde(default, with = "humantime_serde")]
    pub lease_wait: Option<Duration>,
    /// Write-through: how long a prepared change may stay pending on a node.
    #[serde(default, with = "humantime_serde")]
    pub pending_timeout: Option<Duration>,
    /// Write-through: how long a writer waits for another writer's pending
    /// change of the key ("0s": it does not wait).
    #[serde(default, with = "humantime_serde")]
    pub prepare_wait: Option<Duration>,
    /// Write-back: when a write returns (`durable` or `fast`).
    #[serde(default)]
    pub ack: crate::strategy::Ack,
    /// Where the keyspace's rows live.
    #[serde(default)]
    pub store: crate::store::StoreLayout,
    /// Node-side: byte capacity (read by `cache-node`).
    #[serde(default)]
    pub capacity_bytes: Option<u64>,
    /// Node-side: lease lifetime (read by `cache-node`).
    #[serde(default, with = "humantime_serde")]
    pub lease_ttl: Option<Duration>,
    /// Node-side: how long after a miss-while-leased readers are told to
    /// retry (read by `cache-node`).
    #[serde(default, with = "humantime_serde")]
    pub lease_retry_after: Option<Duration>,
    /// Node-side: how long a deleted value is kept to serve as stale (read
    /// by `cache-node`).
    #[serde(default, with = "humantime_serde")]
    pub keep_stale_for: Option<Duration>,
}

fn one() -> usize {
    1
}

impl KeyspacesFile {
    /// Parses a file's text; nothing is validated yet.
    ///
    /// # Errors
    /// [`Error::KeyspaceConfig`] naming the line and the field that do not
    /// parse (an unknown strategy, a misspelt field, a negative TTL).
    pub fn parse(text: &str) -> Result<Self> {
        let deserializer = toml::Deserializer::new(text);
        serde_path_to_error::deserialize(deserializer).map_err(|e| {
            // The path names the keyspace and the field:
            // `keyspaces.users.strategy`.
            let path = e.path().to_string();
            let mut parts = path.splitn(3, '.');
            let (_, keyspace, field) = (parts.next(), parts.next(), parts.next());
            let reason = e.inner().message().trim_end().replace('\n', " ");
            Error::KeyspaceConfig {
                keyspace: keyspace.unwrap_or("*").to_owned(),
                field: field.unwrap_or("*").to_owned(),
                reason,
            }
        })
    }

    /// Reads and parses a file.
    ///
    /// # Errors
    /// As [`KeyspacesFile::parse`], or the file cannot be read.
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::KeyspaceConfig {
            keyspace: "*".into(),
            field: "*".into(),
            reason: format!("cannot read {}: {e}", path.display()),
        })?;
        Self::parse(&text)
    }

    /// The validated settings of every keyspace.
    ///
    /// # Errors
    /// [`Error::KeyspaceConfig`] for the first invalid keyspace.
    pub fn settings(&self) -> Result<Vec<(String, KeyspaceSettings)>> {
        self.keyspaces
            .iter()
            .map(|(name, entry)| {
                let settings = entry.settings();
                settings.validate(name)?;
                Ok((name.clone(), settings))
            })
            .collect()
    }
}

impl KeyspaceEntry {
    /// The client-side settings of this entry (defaults filled in).
    pub fn settings(&self) -> KeyspaceSettings {
        let mut settings = KeyspaceSettings::new(self.strategy);
        settings.ttl = self.ttl;
        settings.ttl_jitter = self.ttl_jitter;
        settings.negative_ttl = self.negative_ttl;
        settings.replicas = self.replicas;
        settings.write_quorum = self.write_quorum.unwrap_or(self.replicas);
        if let Some(wait) = self.lease_wait {
            settings.lease_wait = wait;
        }
        if let Some(timeout) = self.pending_timeout {
            settings.pending_timeout = timeout;
        }
        if let Some(wait) = self.prepare_wait {
            settings.prepare_wait = wait;
        }
        settings.ack = self.ack;
        settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_keyspace_and_the_field() {
        let cases = [
            (
                "[keyspaces.users]\nstrategy = \"sideways\"\n",
                "keyspaces.users.strategy",
            ),
            (
                "[keyspaces.users]\nstrategy = \"read-through\"\nttl = \"-5s\"\n",
                "keyspaces.users.ttl",
            ),
            (
                "[keyspaces.users]\nstrategy = \"read-through\"\nttll = \"5s\"\n",
                "keyspaces.users",
            ),
            ("[keyspaces.users]\nttl = \"5s\"\n", "keyspaces.users"),
        ];
        for (text, named) in cases {
            let err = KeyspacesFile::parse(text).unwrap_err().to_string();
            assert!(err.contains(named), "{text:?} gave {err}");
        }
        let file =
            KeyspacesFile::parse("[keyspaces.a]\nstrategy = \"cache-aside\"\nttl_jitter = 2.0\n")
                .unwrap();
        let err = file.settings().unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid keyspace config: keyspaces.a.ttl_jitter: must be in [0, 1)"
        );
    }

    #[test]
    fn a_full_entry_parses_with_its_store_layout() {
        let file = KeyspacesFile::parse(
            r#"
            [keyspaces.users]
            strategy = "write-through"
            ttl = "10m"
            ttl_jitter = 0.1
            negative_ttl = "30s"
            replicas = 2
            write_quorum = 1
            lease_wait = "1s"
            pending_timeout = "3s"
            prepare_wait = "500ms"
            capacity_bytes = 1048576
            lease_ttl = "5s"
            store = { table = { name = "app.users" } }
            "#,
        )
        .unwrap();
        let settings = file.settings().unwrap();
        let (name, s) = &settings[0];
        assert_eq!(name, "users");
        assert_eq!(s.strategy, Strategy::WriteThrough);
        assert_eq!((s.replicas, s.write_quorum), (2, 1));
        assert_eq!(s.pending_timeout, Duration::from_secs(3));
        assert_eq!(s.prepare_wait, Duration::from_millis(500));
        assert!(matches!(
            file.keyspaces["users"].store,
            crate::store::StoreLayout::Table(_)
        ));
    }
}

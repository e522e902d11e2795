//! Caching strategies per keyspace: how the cache and the store stay in
//! step. The promises each one makes are in `docs/strategies.md`.
//!
//! - **cache-aside**: the application loads and writes its database itself;
//!   it reads with [`Keyspace::lookup`] / [`Keyspace::fill`] (or
//!   [`Keyspace::get_or_load`]) and, after writing its database,
//!   [`Keyspace::invalidate`]s.
//! - **read-through**: [`Keyspace::get`] loads from the keyspace's store on a
//!   miss.
//! - **write-around**: [`Keyspace::put`] writes the store, then deletes the
//!   key from the cache (retrying a failed delete in the background until it
//!   succeeds or the TTL has run out).
//! - **write-through**: [`Keyspace::put`] prepares the change on the owning
//!   nodes and in the store, then commits both (two-phase commit).
//!
//! Reads of every strategy use leases: one load per key across all clients,
//! and a load that raced a write is never filled (the write invalidated the
//! lease). Every write of every strategy takes its version from the client's
//! hybrid logical clock ([`crate::hlc`]), so a switch of strategy never lets
//! an older write win.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::RwLock;
use ringcache_proto::v1;
use serde::Deserialize;
use tokio::time::Instant;

use crate::client::Client;
use crate::cluster::NodeHandle;
use crate::error::{Error, Result};
use crate::primitives::{FillReply, LeaseReply};
use crate::store::{Applied, Change, Loaded, Store, TxnId};
use crate::telemetry;

/// Default [`KeyspaceSettings::lease_wait`].
pub const DEFAULT_LEASE_WAIT: Duration = Duration::from_secs(2);
/// Default [`KeyspaceSettings::pending_timeout`].
pub const DEFAULT_PENDING_TIMEOUT: Duration = Duration::from_secs(5);
/// Default [`KeyspaceSettings::prepare_wait`]: longer than the default
/// [`DEFAULT_PENDING_TIMEOUT`], so that a writer queued behind one that
/// stalled (a paused or dead process, whose change holds the key until
/// it times out) outlasts it, and still gets its turn behind a handful of
/// others of the same key; in practice the client's `deadline` is the
/// bound.
pub const DEFAULT_PREPARE_WAIT: Duration = Duration::from_secs(6);
/// In-doubt recovery rolls back a prepared transaction found in a store
/// that no keyspace of this process uses (or used) for write-through only
/// once it is this old: it was left by a write-through keyspace of another
/// process, or of this one before a restart, whose pending timeout is not
/// known here. Any writer has given such a transaction up long before (a
/// writer never commits past its pending timeout, which nodes cap at
/// `limits.max_pending_timeout`, 30 s by default).
pub const ABANDONED_IN_DOUBT_AFTER: Duration = Duration::from_secs(600);
/// How long absence is cached when a keyspace sets no `negative_ttl`: just
/// long enough for readers waiting on the lease to see it.
pub const MIN_NEGATIVE_TTL: Duration = Duration::from_millis(100);

/// Tag byte of a cached value in a strategy keyspace: the value follows.
const TAG_PRESENT: u8 = 0;
/// Tag byte of a cached absence (negative caching).
const TAG_ABSENT: u8 = 1;

/// How a keyspace keeps cache and store in step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The application loads and writes its database; the cache is filled
    /// under leases and invalidated after writes.
    CacheAside,
    /// The client loads from the keyspace's store on a miss.
    ReadThrough,
    /// Writes go to the store, then the key is deleted from the cache.
    WriteAround,
    /// Writes go to the cache and the store together, by two-phase commit.
    WriteThrough,
    /// Writes go to the cache (dirty) and a Kafka topic; the
    /// `write-back-worker` stores them later (`docs/write-back.md`).
    WriteBack,
}

/// When a write-back write returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ack {
    /// After the broker acknowledged the record (the default): an
    /// acknowledged write survives the loss of the client, the nodes and the
    /// worker. A write whose send fails with an unknown outcome returns the
    /// error but is served and sent again in the background until the broker
    /// takes it (`docs/write-back.md`).
    #[default]
    Durable,
    /// After the cache write; the record is sent in the background. A write
    /// is lost if the client dies before the broker has it, or the send
    /// fails (reported through metrics and the failure callback).
    Fast,
}

impl Strategy {
    /// The strategy's name as the keyspace file spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::CacheAside => "cache-aside",
            Strategy::ReadThrough => "read-through",
            Strategy::WriteAround => "write-around",
            Strategy::WriteThrough => "write-through",
            Strategy::WriteBack => "write-back",
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The client-side settings of one keyspace.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct KeyspaceSettings {
    /// The strategy.
    pub strategy: Strategy,
    /// TTL of cached values; `None` takes the node's default.
    pub ttl: Option<Duration>,
    /// Fraction in `[0, 1)` by which each TTL is shortened at random.
    pub ttl_jitter: f64,
    /// How long absence is cached; `None` caches it only for
    /// [`MIN_NEGATIVE_TTL`], long enough for waiting readers to see it.
    pub negative_ttl: Option<Duration>,
    /// Copies of each key.
    pub replicas: usize,
    /// Copies that must acknowledge a write.
    pub write_quorum: usize,
    /// How long a reader waits for another reader's load before it loads
    /// itself (and does not fill).
    pub lease_wait: Duration,
    /// Write-through: how long a prepared change may stay pending.
    pub pending_timeout: Duration,
    /// Write-through: how long a writer waits, in arrival order, for other
    /// writers' pending changes of the key before it fails with
    /// [`Error::Conflict`]; at most the client's deadline. Zero: it fails at
    /// once. A writer outlasts one that stalled holding the key only if
    /// this and the deadline exceed `pending_timeout`.
    pub prepare_wait: Duration,
    /// Write-back: when a write returns.
    pub ack: Ack,
}

impl KeyspaceSettings {
    /// Settings with `strategy` and every other field at its default.
    pub fn new(strategy: Strategy) -> Self {
        KeyspaceSettings {
            strategy,
            ttl: None,
            ttl_jitter: 0.0,
            negative_ttl: None,
            replicas: 1,
            write_quorum: 1,
            lease_wait: DEFAULT_LEASE_WAIT,
            pending_timeout: DEFAULT_PENDING_TIMEOUT,
            prepare_wait: DEFAULT_PREPARE_WAIT,
            ack: Ack::Durable,
        }
    }

    /// Sets the write-back acknowledgement level.
    pub fn with_ack(mut self, ack: Ack) -> Self {
        self.ack = ack;
        self
    }

    /// Sets the TTL.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Sets the TTL jitter.
    pub fn with_ttl_jitter(mut self, jitter: f64) -> Self {
        self.ttl_jitter = jitter;
        self
    }

    /// Sets the negative TTL.
    pub fn with_negative_ttl(mut self, ttl: Duration) -> Self {
        self.negative_ttl = Some(ttl);
        self
    }

    /// Sets replicas and write quorum.
    pub fn with_replication(mut self, replicas: usize, write_quorum: usize) -> Self {
        self.replicas = replicas;
        self.write_quorum = write_quorum;
        self
    }

    /// Sets the lease wait.
    pub fn with_lease_wait(mut self, wait: Duration) -> Self {
        self.lease_wait = wait;
        self
    }

    /// Sets the pending timeout.
    pub fn with_pending_timeout(mut self, timeout: Duration) -> Self {
        self.pending_timeout = timeout;
        self
    }

    /// Sets the prepare wait.
    pub fn with_prepare_wait(mut self, wait: Duration) -> Self {
        self.prepare_wait = wait;
        self
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::KeyspaceConfig`] naming `keyspace` and the field.
    pub fn validate(&self, keyspace: &str) -> Result<()> {
        let bad = |field: &str, reason: &str| {
            Err(Error::KeyspaceConfig {
                keyspace: keyspace.to_owned(),
                field: field.to_owned(),
                reason: reason.to_owned(),
            })
        };
        if self.ttl.is_some_and(|t| t.is_zero()) {
            return bad(
                "ttl",
                "must be greater than zero (omit it for the node's default)",
            );
        }
        if !(0.0..1.0).contains(&self.ttl_jitter) {
            return bad("ttl_jitter", "must be in [0, 1)");
        }
        if self.negative_ttl.is_some_and(|t| t.is_zero()) {
            return bad(
                "negative_ttl",
                "must be greater than zero (omit it to cache absence only briefly)",
            );
        }
        if self.replicas == 0 {
            return bad("replicas", "must be at least 1");
        }
        if self.write_quorum == 0 || self.write_quorum > self.replicas {
            return bad("write_quorum", "must be between 1 and replicas");
        }
        if self.lease_wait.is_zero() {
            return bad("lease_wait", "must be greater than zero");
        }
        if self.pending_timeout.is_zero() {
            return bad("pending_timeout", "must be greater than zero");
        }
        Ok(())
    }

    /// A TTL for one write: the configured one shortened by a random part of
    /// the jitter.
    fn jittered_ttl(&self) -> Option<Duration> {
        self.ttl
            .map(|ttl| ttl.mul_f64(1.0 - self.ttl_jitter * rand::random::<f64>()))
    }
}

/// Finds the store of a keyspace from its name and layout; `None` for a
/// cache-aside keyspace without a store.
pub type StoreFor<'a> =
    dyn Fn(&str, &crate::store::StoreLayout) -> Result<Option<Arc<dyn Store>>> + Send + Sync + 'a;

/// A keyspace to define: its name, settings and store.
pub type Definition = (String, KeyspaceSettings, Option<Arc<dyn Store>>);

/// One keyspace as the client runs it.
pub(crate) struct KeyspaceState {
    pub(crate) settings: KeyspaceSettings,
    pub(crate) store: Option<Arc<dyn Store>>,
}

/// The keyspaces a client knows, swapped as a whole so that a reload is
/// all-or-nothing. The lock is held only to clone or swap the map.
#[derive(Default)]
pub(crate) struct Registry {
    map: RwLock<Arc<HashMap<String, Arc<KeyspaceState>>>>,
    /// Every store a write-through keyspace of this process used, with the
    /// longest pending timeout it was used with: in-doubt recovery keeps
    /// covering it after a switch away from write-through.
    write_through: parking_lot::Mutex<Vec<(Arc<dyn Store>, Duration)>>,
}

impl Registry {
    pub(crate) fn get(&self, name: &str) -> Option<Arc<KeyspaceState>> {
        self.map.read().get(name).cloned()
    }

    pub(crate) fn all(&self) -> Arc<HashMap<String, Arc<KeyspaceState>>> {
        Arc::clone(&self.map.read())
    }

    /// Remembers a store used by a write-through keyspace.
    fn remember_write_through(&self, store: &Arc<dyn Store>, pending_timeout: Duration) {
        let mut stores = self.write_through.lock();
        match stores.iter_mut().find(|(s, _)| Arc::ptr_eq(s, store)) {
            Some((_, longest)) => *longest = (*longest).max(pending_timeout),
            None => stores.push((Arc::clone(store), pending_timeout)),
        }
    }

    fn update(
        &self,
        f: impl FnOnce(&mut HashMap<String, Arc<KeyspaceState>>) -> Result<()>,
    ) -> Result<()> {
        let mut slot = self.map.write();
        let mut next = (**slot).clone();
        f(&mut next)?;
        *slot = Arc::new(next);
        Ok(())
    }
}

fn requires_store(strategy: Strategy) -> bool {
    strategy != Strategy::CacheAside
}

impl Client {
    /// A handle on one keyspace; cheap, and it sees later reconfiguration.
    pub fn keyspace(&self, name: &str) -> Keyspace {
        Keyspace {
            client: self.clone(),
            name: Arc::from(name),
        }
    }

    /// Defines or redefines a keyspace. Takes effect for calls that start
    /// afterwards; calls in flight finish under the settings they started
    /// with. Versions come from one clock whatever the strategy, so a
    /// redefinition never lets an older write win.
    ///
    /// # Errors
    /// [`Error::KeyspaceConfig`] for invalid settings, or a strategy other
    /// than cache-aside without a store; the previous definition stays.
    pub fn define_keyspace(
        &self,
        name: &str,
        settings: KeyspaceSettings,
        store: Option<Arc<dyn Store>>,
    ) -> Result<()> {
        self.define_keyspaces(vec![(name.to_owned(), settings, store)])
    }

    /// Defines several keyspaces at once: all of them, or (on an error)
    /// none.
    ///
    /// # Errors
    /// As [`Client::define_keyspace`], for the first invalid keyspace.
    pub fn define_keyspaces(&self, keyspaces: Vec<Definition>) -> Result<()> {
        for (name, settings, store) in &keyspaces {
            settings.validate(name)?;
            #[cfg(feature = "kafka")]
            let producer_missing = self.inner.producer.get().is_none();
            #[cfg(not(feature = "kafka"))]
            let producer_missing = true;
            if settings.strategy == Strategy::WriteBack && producer_missing {
                return Err(Error::KeyspaceConfig {
                    keyspace: name.clone(),
                    field: "strategy".into(),
                    reason: "write-back needs Client::enable_write_back (and the `kafka` feature)"
                        .into(),
                });
            }
            if requires_store(settings.strategy) && store.is_none() {
                return Err(Error::KeyspaceConfig {
                    keyspace: name.clone(),
                    field: "store".into(),
                    reason: format!("strategy {} needs a store", settings.strategy),
                });
            }
        }
        for (_, settings, store) in &keyspaces {
            if settings.strategy == Strategy::WriteThrough
                && let Some(store) = store
            {
                self.inner
                    .keyspaces
                    .remember_write_through(store, settings.pending_timeout);
            }
        }
        self.inner.keyspaces.update(|map| {
            for (name, settings, store) in keyspaces {
                tracing::info!(keyspace = %name, strategy = %settings.strategy, "keyspace defined");
                map.insert(name, Arc::new(KeyspaceState { settings, store }));
            }
            Ok(())
        })
    }

    /// Applies a keyspace file (`crate::keyspaces`): every keyspace is
    /// validated and its store obtained from `store_for` (given the name and
    /// the layout; `None` for a cache-aside keyspace without a store) before
    /// any of them takes effect; then all take effect at once.
    ///
    /// # Errors
    /// The first invalid keyspace or failing store; nothing changes then.
    pub fn apply_keyspaces(
        &self,
        file: &crate::keyspaces::KeyspacesFile,
        store_for: &StoreFor<'_>,
    ) -> Result<()> {
        let mut all = Vec::new();
        for (name, settings) in file.settings()? {
            let entry = &file.keyspaces[&name];
            let store = store_for(&name, &entry.store)?;
            all.push((name, settings, store));
        }
        self.define_keyspaces(all)
    }

    /// Re-reads the keyspace file at `path` every `interval` and applies it
    /// when its text changed. A file that does not parse or validate is
    /// logged and skipped: the previous configuration stays in force. The
    /// task ends when the last clone of the client is dropped.
    pub fn watch_keyspaces(
        &self,
        path: std::path::PathBuf,
        interval: Duration,
        store_for: Box<StoreFor<'static>>,
    ) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut last: Option<String> = None;
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let client = Client { inner };
                // Reading a small file blocks briefly: keep it off the
                // runtime's worker threads.
                let read = {
                    let path = path.clone();
                    tokio::task::spawn_blocking(move || std::fs::read_to_string(path)).await
                };
                match read {
                    Ok(Ok(text)) if last.as_deref() != Some(text.as_str()) => {
                        let applied = crate::keyspaces::KeyspacesFile::parse(&text)
                            .and_then(|file| client.apply_keyspaces(&file, &*store_for));
                        match applied {
                            Ok(()) => {
                                tracing::info!(path = %path.display(), "keyspace file applied")
                            }
                            Err(e) => {
                                tracing::warn!(path = %path.display(), error = %e, "keyspace file refused; the previous configuration stays")
                            }
                        }
                        last = Some(text);
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(path = %path.display(), error = %e, "cannot read the keyspace file")
                    }
                    Err(e) => tracing::warn!(error = %e, "keyspace file reader failed"),
                }
                drop(client);
                tokio::time::sleep(interval).await;
            }
        })
    }

    /// Changes the strategy of a defined keyspace, keeping its other
    /// settings and its store.
    ///
    /// # Errors
    /// [`Error::KeyspaceConfig`] when the keyspace is not defined or the new
    /// strategy needs a store it does not have.
    pub fn set_strategy(&self, name: &str, strategy: Strategy) -> Result<()> {
        let current = self
            .inner
            .keyspaces
            .get(name)
            .ok_or_else(|| Error::KeyspaceConfig {
                keyspace: name.to_owned(),
                field: "strategy".into(),
                reason: "keyspace is not defined".into(),
            })?;
        let mut settings = current.settings.clone();
        settings.strategy = strategy;
        self.define_keyspace(name, settings, current.store.clone())
    }

    /// The settings of a defined keyspace.
    pub fn keyspace_settings(&self, name: &str) -> Option<KeyspaceSettings> {
        self.inner.keyspaces.get(name).map(|k| k.settings.clone())
    }

    /// Resolves in-doubt prepared transactions: rolls back those prepared
    /// more than twice the longest pending timeout ago in every store a
    /// write-through keyspace of this client uses or used (whatever the
    /// keyspace's strategy now), and those older than
    /// [`ABANDONED_IN_DOUBT_AFTER`] in the stores of its other keyspaces.
    /// Such a transaction was never committed, so its writer never reported
    /// success (a writer does not commit past its pending timeout). Each one
    /// rolled back is also aborted on the key's nodes, which clears the
    /// in-doubt fence its timed-out change left there. Returns how many
    /// were resolved.
    ///
    /// # Errors
    /// The first store failure.
    pub async fn recover_in_doubt(&self) -> Result<usize> {
        let all = self.inner.keyspaces.all();
        // Per store: how old a transaction must be to be rolled back, and a
        // keyspace name for the metric when the store did not record one.
        let mut stores: Vec<(Arc<dyn Store>, Duration, String)> = Vec::new();
        for (store, pending_timeout) in self.inner.keyspaces.write_through.lock().iter() {
            stores.push((Arc::clone(store), *pending_timeout * 2, String::new()));
        }
        let mut names: Vec<&String> = all.keys().collect();
        names.sort();
        for name in names {
            let state = &all[name];
            let Some(store) = &state.store else { continue };
            match stores.iter_mut().find(|(s, _, _)| Arc::ptr_eq(s, store)) {
                Some(entry) => {
                    if entry.2.is_empty() {
                        entry.2 = name.clone();
                    }
                }
                None => stores.push((
                    Arc::clone(store),
                    ABANDONED_IN_DOUBT_AFTER.max(state.settings.pending_timeout * 2),
                    name.clone(),
                )),
            }
        }
        let mut resolved = 0;
        for (store, older_than, name) in stores {
            for txn in store.in_doubt(older_than).await? {
                let keyspace = txn.keyspace.clone().unwrap_or_else(|| name.clone());
                match store.abort_prepared(&txn.txn).await {
                    Ok(()) => {
                        tracing::warn!(txn = %txn.txn.as_str(), keyspace = %keyspace, "rolled back an in-doubt prepared transaction");
                        // Its change may be in doubt on the nodes, fencing
                        // off the (correct) old value: tell them.
                        if let (Some(ks), Some(key)) = (&txn.keyspace, &txn.key) {
                            let replicas = self.replication(ks).replicas;
                            let nodes: Vec<Arc<NodeHandle>> = self
                                .healthy_in_order(ks, key, replicas + 1)
                                .into_iter()
                                .map(|(node, _)| node)
                                .collect();
                            self.finish(ks, key, txn.txn.as_str(), &nodes, false).await;
                        }
                    }
                    // Resolved by someone else meanwhile, maybe committed by
                    // its writer: the nodes are left alone.
                    Err(Error::TxnNotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
                resolved += 1;
                metrics::counter!(telemetry::TWOPC_RECOVERED, "keyspace" => keyspace).increment(1);
            }
        }
        Ok(resolved)
    }
}

/// What [`Keyspace::lookup`] found.
#[derive(Debug)]
pub enum Lookup {
    /// A cached value and its version.
    Hit(Bytes, u64),
    /// A cached absence: the store had no such row when it was loaded.
    Absent,
    /// A miss, and this caller holds the key's lease: load the value and
    /// [`Keyspace::fill`] it, or [`Keyspace::release`] the lease if the
    /// load failed.
    Miss(Lease),
    /// A miss while another caller loads the key: retry after the delay. A
    /// recently deleted value may come along, if the keyspace keeps them.
    Wait {
        /// When to look again.
        retry_after: Duration,
        /// A possibly out-of-date value.
        stale: Option<Bytes>,
    },
}

/// The right to fill one key once, handed out by a miss.
#[derive(Debug)]
pub struct Lease {
    key: Bytes,
    node: Arc<NodeHandle>,
    fallback: bool,
    token: u64,
}

/// A handle on one keyspace, running its strategy.
#[derive(Clone)]
pub struct Keyspace {
    client: Client,
    name: Arc<str>,
}

fn tagged(value: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(1 + value.len());
    out.put_u8(TAG_PRESENT);
    out.put_slice(value);
    out.freeze()
}

/// Decodes a value as strategy keyspaces cache it: one tag byte, then the
/// value. `Some(value)` for a cached value, `None` for a cached absence
/// (negative caching). Tools that read strategy keyspaces through the raw
/// API use this.
///
/// # Errors
/// [`Error::Codec`] for bytes that were not written by a strategy.
pub fn decode_cached(keyspace: &str, cached: &Bytes) -> Result<Option<Bytes>> {
    untag(keyspace, cached)
}

/// `Some(value)` for a cached value, `None` for a cached absence.
fn untag(keyspace: &str, cached: &Bytes) -> Result<Option<Bytes>> {
    match cached.first() {
        Some(&TAG_PRESENT) => Ok(Some(cached.slice(1..))),
        Some(&TAG_ABSENT) => Ok(None),
        _ => Err(Error::Codec(format!(
            "a value in strategy keyspace {keyspace:?} lacks its tag byte (was it written with the raw API?)"
        ))),
    }
}

fn ttl_ms(ttl: Option<Duration>) -> u64 {
    ttl.map_or(0, |d| {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
    })
}

impl Keyspace {
    /// The keyspace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn state(&self) -> Result<Arc<KeyspaceState>> {
        self.client
            .inner
            .keyspaces
            .get(&self.name)
            .ok_or_else(|| Error::Unsupported {
                keyspace: self.name.to_string(),
                reason: "keyspace is not defined (Client::define_keyspace)".into(),
            })
    }

    fn store(&self, state: &KeyspaceState) -> Result<Arc<dyn Store>> {
        state.store.clone().ok_or_else(|| Error::Unsupported {
            keyspace: self.name.to_string(),
            reason: "keyspace has no store".into(),
        })
    }

    fn count(&self, name: &'static str) {
        metrics::counter!(name, "keyspace" => self.name.to_string()).increment(1);
    }

    /// The `strategy` label of this keyspace's metrics.
    fn strategy_label(&self) -> &'static str {
        self.client
            .inner
            .keyspaces
            .get(&self.name)
            .map_or("undefined", |state| state.settings.strategy.as_str())
    }

    /// Starts timing one operation on this keyspace.
    fn operation(&self, op: &'static str) -> telemetry::Operation {
        telemetry::Operation::start(&self.name, self.strategy_label(), op)
    }

    /// Reads a key. On a miss, loads it from the keyspace's store under a
    /// lease (read-through, write-around, write-through; cache-aside with a
    /// store); a cache-aside keyspace without a store answers from the cache
    /// alone.
    ///
    /// # Errors
    /// A store failure; a cache failure only when the cache refuses the
    /// request itself (an unreachable cache degrades to loading from the
    /// store).
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Bytes>> {
        let operation = self.operation("get");
        let result = operation.instrument(self.get_inner(key.as_ref())).await;
        operation.finish(result)
    }

    async fn get_inner(&self, key: &[u8]) -> Result<Option<Bytes>> {
        let state = self.state()?;
        let key = Bytes::copy_from_slice(key);
        match &state.store {
            Some(store) => {
                let store = Arc::clone(store);
                let name = Arc::clone(&self.name);
                let load_key = key.clone();
                self.read(&state, key, move || {
                    let (store, name, key) =
                        (Arc::clone(&store), Arc::clone(&name), load_key.clone());
                    async move { store.load(&name, &key).await }
                })
                .await
            }
            None => {
                let found = self
                    .client
                    .read_keys(&self.name, std::slice::from_ref(&key))
                    .await?
                    .pop()
                    .flatten();
                telemetry::lookup(
                    &self.name,
                    state.settings.strategy.as_str(),
                    found.is_some(),
                );
                match found {
                    Some(entry) => untag(&self.name, &entry.value),
                    None => Ok(None),
                }
            }
        }
    }

    /// Reads a key; on a miss, calls `loader` under the key's lease and
    /// fills the cache with what it returns: `Some((value, version))`, or
    /// `None` when there is no such row (cached for the negative TTL).
    /// Concurrent misses on the key, in this process or any other, wait for
    /// one loader instead of each calling theirs.
    ///
    /// # Errors
    /// The loader's error (as [`Error::Store`]); cache errors as for
    /// [`Keyspace::get`].
    pub async fn get_or_load<F, Fut, E>(
        &self,
        key: impl AsRef<[u8]>,
        loader: F,
    ) -> Result<Option<Bytes>>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = std::result::Result<Option<(Bytes, u64)>, E>>,
        E: std::fmt::Display,
    {
        let operation = self.operation("get_or_load");
        let state = match self.state() {
            Ok(state) => state,
            Err(e) => return operation.finish(Err(e)),
        };
        let key = Bytes::copy_from_slice(key.as_ref());
        let name = Arc::clone(&self.name);
        let read = self.read(&state, key, || {
            let fut = loader();
            let name = Arc::clone(&name);
            async move {
                match fut.await {
                    Ok(Some((value, version))) => {
                        Ok(Loaded::Present(crate::store::Row { value, version }))
                    }
                    Ok(None) => Ok(Loaded::Absent { version: 0 }),
                    Err(e) => Err(Error::Store {
                        keyspace: name.to_string(),
                        message: format!("loader failed: {e}"),
                    }),
                }
            }
        });
        let result = operation.instrument(read).await;
        operation.finish(result)
    }

    /// The lease-protected read shared by every strategy.
    async fn read<L, Fut>(
        &self,
        state: &KeyspaceState,
        key: Bytes,
        load: L,
    ) -> Result<Option<Bytes>>
    where
        L: Fn() -> Fut,
        Fut: Future<Output = Result<Loaded>>,
    {
        let started = Instant::now();
        let mut failures = 0u32;
        let strategy = state.settings.strategy.as_str();
        loop {
            match self.client.lease_get(&self.name, &key).await {
                Ok(LeaseReply::Hit(entry)) => {
                    telemetry::lookup(&self.name, strategy, true);
                    telemetry::lease(&self.name, strategy, "hit");
                    let value = untag(&self.name, &entry.value)?;
                    if value.is_none() {
                        self.count("ringcache_client_negative_hits_total");
                    }
                    return Ok(value);
                }
                Ok(LeaseReply::Lease {
                    node,
                    token,
                    fallback,
                }) => {
                    telemetry::lookup(&self.name, strategy, false);
                    telemetry::lease(&self.name, strategy, "granted");
                    self.count("ringcache_client_loads_total");
                    let loaded = match load().await {
                        Ok(loaded) => loaded,
                        Err(e) => {
                            // Hand the lease back, so that the next reader
                            // loads at once instead of waiting `lease_wait`
                            // for a fill that will not come.
                            self.client
                                .release_lease(&self.name, &node, &key, token)
                                .await;
                            return Err(e);
                        }
                    };
                    let (value, mut item) = self.fill_item(state, &key, loaded);
                    if fallback {
                        self.client.cap_for_fallback(&mut item);
                    }
                    self.fill_lease(&node, token, item).await;
                    return Ok(value);
                }
                Ok(LeaseReply::Wait { retry_after, .. }) => {
                    if started.elapsed() + retry_after > state.settings.lease_wait {
                        // The lease holder is slow or gone: load without
                        // filling, rather than keep the caller waiting.
                        telemetry::lookup(&self.name, strategy, false);
                        telemetry::lease(&self.name, strategy, "wait_expired");
                        self.count("ringcache_client_loads_total");
                        return Ok(self.fill_item(state, &key, load().await?).0);
                    }
                    telemetry::lease(&self.name, strategy, "wait");
                    self.count("ringcache_client_lease_waits_total");
                    tokio::time::sleep(retry_after).await;
                }
                Err(e) if e.is_node_failure() || matches!(e, Error::NoNodeAvailable { .. }) => {
                    failures += 1;
                    if failures >= self.client.config().max_attempts {
                        // The cache is unreachable: serve from the store.
                        tracing::debug!(keyspace = %self.name, error = %e, "cache unreachable; loading without it");
                        telemetry::lookup(&self.name, strategy, false);
                        self.count("ringcache_client_loads_total");
                        return Ok(self.fill_item(state, &key, load().await?).0);
                    }
                    telemetry::retry(&self.name);
                    tokio::time::sleep(self.client.inner.backoff.delay(failures)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The value to return and the cache item to fill for a load.
    fn fill_item(
        &self,
        state: &KeyspaceState,
        key: &Bytes,
        loaded: Loaded,
    ) -> (Option<Bytes>, v1::SetItem) {
        let settings = &state.settings;
        let (value, cached, version, ttl) = match loaded {
            Loaded::Present(row) => {
                let cached = tagged(&row.value);
                (
                    Some(row.value),
                    cached,
                    row.version,
                    settings.jittered_ttl(),
                )
            }
            Loaded::Absent { version } => (
                None,
                Bytes::from_static(&[TAG_ABSENT]),
                version,
                Some(settings.negative_ttl.unwrap_or(MIN_NEGATIVE_TTL)),
            ),
        };
        self.client.inner.clock.observe(version);
        let item = v1::SetItem {
            key: key.clone(),
            value: cached,
            version,
            ttl_ms: ttl_ms(ttl),
            condition: v1::WriteCondition::IfNewerVersion as i32,
            dirty: false,
        };
        (value, item)
    }

    /// Fills under a lease; a refused fill is counted, never an error: the
    /// caller's value was current when its read began.
    async fn fill_lease(&self, node: &NodeHandle, token: u64, item: v1::SetItem) -> bool {
        let strategy = self.strategy_label();
        match self.client.fill(&self.name, node, token, item).await {
            Ok(FillReply::Stored) => {
                telemetry::lease(&self.name, strategy, "fill_stored");
                true
            }
            Ok(FillReply::LeaseInvalid | FillReply::StaleVersion) => {
                telemetry::lease(&self.name, strategy, "fill_refused");
                self.count("ringcache_client_fills_refused_total");
                false
            }
            Err(e) => {
                telemetry::lease(&self.name, strategy, "fill_failed");
                tracing::debug!(keyspace = %self.name, error = %e, "fill failed");
                false
            }
        }
    }

    /// Cache-aside: looks a key up, taking its lease on a miss.
    ///
    /// # Errors
    /// A cache failure.
    pub async fn lookup(&self, key: impl AsRef<[u8]>) -> Result<Lookup> {
        let operation = self.operation("lookup");
        let result = operation.instrument(self.lookup_inner(key.as_ref())).await;
        operation.finish(result)
    }

    async fn lookup_inner(&self, key: &[u8]) -> Result<Lookup> {
        let key = Bytes::copy_from_slice(key);
        let strategy = self.strategy_label();
        let reply = self.client.lease_get(&self.name, &key).await?;
        let (hit, outcome) = match &reply {
            LeaseReply::Hit(_) => (Some(true), "hit"),
            LeaseReply::Lease { .. } => (Some(false), "granted"),
            LeaseReply::Wait { .. } => (None, "wait"),
        };
        if let Some(hit) = hit {
            telemetry::lookup(&self.name, strategy, hit);
        }
        telemetry::lease(&self.name, strategy, outcome);
        Ok(match reply {
            LeaseReply::Hit(entry) => match untag(&self.name, &entry.value)? {
                Some(value) => Lookup::Hit(value, entry.version),
                None => Lookup::Absent,
            },
            LeaseReply::Lease {
                node,
                fallback,
                token,
            } => Lookup::Miss(Lease {
                key,
                node,
                fallback,
                token,
            }),
            LeaseReply::Wait { retry_after, stale } => Lookup::Wait {
                retry_after,
                stale: stale.and_then(|e| untag(&self.name, &e.value).ok().flatten()),
            },
        })
    }

    /// Cache-aside: fills a key with what the application loaded, under the
    /// lease its miss handed out. `value` `None` caches the absence of the
    /// row. Returns whether the cache took it: a fill is refused when the key
    /// was written or invalidated after the lease was granted, because the
    /// loaded value may then be stale.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when the keyspace is not defined.
    pub async fn fill(&self, lease: Lease, value: Option<Bytes>, version: u64) -> Result<bool> {
        let operation = self.operation("fill");
        let result = operation
            .instrument(self.fill_inner(lease, value, version))
            .await;
        operation.finish(result)
    }

    async fn fill_inner(&self, lease: Lease, value: Option<Bytes>, version: u64) -> Result<bool> {
        let state = self.state()?;
        let loaded = match value {
            Some(value) => Loaded::Present(crate::store::Row { value, version }),
            None => Loaded::Absent { version },
        };
        let (_, mut item) = self.fill_item(&state, &lease.key, loaded);
        if lease.fallback {
            self.client.cap_for_fallback(&mut item);
        }
        Ok(self.fill_lease(&lease.node, lease.token, item).await)
    }

    /// Cache-aside: hands a lease back unused, when loading the value
    /// failed, so that the next reader of the key is granted the lease at
    /// once rather than waiting for it (readers wait up to `lease_wait`;
    /// the node lets an abandoned lease expire after its `lease_ttl`).
    /// Best effort: a lease that cannot be handed back expires.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when the keyspace is not defined.
    pub async fn release(&self, lease: Lease) -> Result<()> {
        self.state()?;
        self.client
            .release_lease(&self.name, &lease.node, &lease.key, lease.token)
            .await;
        Ok(())
    }

    /// Deletes a key from the cache on every replica, which also invalidates
    /// any outstanding lease. If no replica can be reached, the delete is
    /// retried in the background until it succeeds or the keyspace's TTL
    /// has run out; the unreachable nodes are flushed before this client
    /// routes to them again in any case (`docs/failover.md`).
    ///
    /// # Errors
    /// A refusal of the request itself (bad key).
    pub async fn invalidate(&self, key: impl AsRef<[u8]>) -> Result<()> {
        let operation = self.operation("invalidate");
        let result = operation
            .instrument(self.invalidate_inner(key.as_ref()))
            .await;
        operation.finish(result)
    }

    async fn invalidate_inner(&self, key: &[u8]) -> Result<()> {
        let key = Bytes::copy_from_slice(key);
        match self.client.delete(&self.name, &key).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_retryable() => {
                let ttl = self.state().ok().and_then(|s| s.settings.ttl);
                self.retry_invalidation(key, ttl, e);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn retry_invalidation(&self, key: Bytes, ttl: Option<Duration>, first: Error) {
        let this = self.clone();
        // With no TTL of our own, the node default applies; give up after
        // the longest TTL a node accepts by default.
        let give_up = Instant::now() + ttl.unwrap_or(Duration::from_secs(30 * 24 * 3600));
        tracing::warn!(keyspace = %self.name, error = %first, "invalidation failed; retrying in the background");
        tokio::spawn(async move {
            let mut attempt = 0;
            while Instant::now() < give_up {
                attempt += 1;
                this.count("ringcache_client_invalidation_retries_total");
                tokio::time::sleep(
                    this.client
                        .inner
                        .backoff
                        .delay(attempt.min(10))
                        .max(Duration::from_millis(50)),
                )
                .await;
                match this.client.delete(&this.name, &key).await {
                    Ok(_) => return,
                    Err(e) if e.is_retryable() => continue,
                    Err(e) => {
                        tracing::warn!(keyspace = %this.name, error = %e, "invalidation refused; giving up");
                        return;
                    }
                }
            }
        });
    }

    /// Writes a value through the keyspace's strategy and returns the
    /// version it got:
    ///
    /// - cache-aside (with a store), read-through, write-around: the store,
    ///   then [`Keyspace::invalidate`];
    /// - write-through: prepared on the owning nodes and in the store, then
    ///   committed in both (the store first); an owner that refused the
    ///   prepare or did not commit is invalidated (version-fenced) or marked
    ///   down before it returns.
    ///
    /// # Errors
    /// A store failure (nothing was written), [`Error::Conflict`] when a
    /// write-through write of the same key is in flight,
    /// [`Error::PendingTimedOut`] when a write-through writer was held past
    /// its pending timeout before committing (rolled back), a node's
    /// refusal of a `pending_timeout` above its `max_pending_timeout`, or
    /// [`Error::Unsupported`] for a cache-aside keyspace without a store.
    ///
    /// # Consistency
    /// When `put` returns, readers through any client that routes to the key's
    /// owners see this value or a newer one (write-through: from the cache;
    /// otherwise by loading it), except as `docs/strategies.md` bounds it
    /// while nodes fail.
    pub async fn put(&self, key: impl AsRef<[u8]>, value: impl Into<Bytes>) -> Result<Written> {
        let operation = self.operation("put");
        let value = value.into();
        let result = operation
            .instrument(self.write(Bytes::copy_from_slice(key.as_ref()), Some(value)))
            .await;
        operation.finish(result)
    }

    /// Deletes a key through the keyspace's strategy (a tombstone in the
    /// store, so that an older write cannot bring it back).
    ///
    /// # Errors
    /// As [`Keyspace::put`].
    pub async fn remove(&self, key: impl AsRef<[u8]>) -> Result<Written> {
        let operation = self.operation("remove");
        let result = operation
            .instrument(self.write(Bytes::copy_from_slice(key.as_ref()), None))
            .await;
        operation.finish(result)
    }

    async fn write(&self, key: Bytes, value: Option<Bytes>) -> Result<Written> {
        let state = self.state()?;
        let store = self.store(&state)?;
        let version = self.client.inner.clock.now();
        match state.settings.strategy {
            Strategy::WriteThrough => {
                self.write_through(&state, &store, key, value, version)
                    .await
            }
            Strategy::WriteBack => self.write_back(&state, key, value, version).await,
            Strategy::CacheAside | Strategy::ReadThrough | Strategy::WriteAround => {
                let applied = match &value {
                    Some(v) => store.store(&self.name, &key, v, version).await?,
                    None => store.delete(&self.name, &key, version).await?,
                };
                self.client.inner.clock.observe(applied.version);
                // Invalidate even when a newer write won: the cache may hold
                // anything older than the winner.
                self.invalidate_inner(&key).await?;
                Ok(Written::from(applied, version))
            }
        }
    }

    /// Rolls back the prepared transaction `txn` (the id of a change in
    /// doubt on a node) in `store`, if it is still prepared there; best
    /// effort: recovery rolls back what this misses.
    async fn roll_back_in_doubt(&self, store: &Arc<dyn Store>, txn: &str) {
        let Ok(id) = txn.parse::<TxnId>() else {
            tracing::debug!(keyspace = %self.name, txn, "a node named an in-doubt change by a foreign id; left to recovery");
            return;
        };
        match store.abort_prepared(&id).await {
            Ok(()) => {
                tracing::info!(keyspace = %self.name, txn, "rolled back the prepared transaction of a change that timed out on the key's first owner");
                metrics::counter!(telemetry::TWOPC_RECOVERED, "keyspace" => self.name.to_string())
                    .increment(1);
            }
            // Committed or rolled back already.
            Err(Error::TxnNotFound { .. }) => {}
            Err(e) => {
                tracing::warn!(keyspace = %self.name, txn, error = %e, "cannot roll back an in-doubt transaction; recovery will");
            }
        }
    }

    async fn write_through(
        &self,
        state: &KeyspaceState,
        store: &Arc<dyn Store>,
        key: Bytes,
        value: Option<Bytes>,
        mut version: u64,
    ) -> Result<Written> {
        let settings = &state.settings;
        let txn = TxnId::new();
        let change = match &value {
            Some(v) => Change::Put(v),
            None => Change::Delete,
        };
        let item = |version: u64| v1::SetItem {
            key: key.clone(),
            value: value.as_deref().map(tagged).unwrap_or_default(),
            version,
            ttl_ms: ttl_ms(settings.jittered_ttl()),
            condition: v1::WriteCondition::IfNewerVersion as i32,
            dirty: false,
        };
        let nodes = self
            .client
            .healthy_in_order(&self.name, &key, settings.replicas);
        let Some(first) = nodes.first().cloned() else {
            return Err(Error::NoNodeAvailable {
                keyspace: self.name.to_string(),
                reason: "every node that could hold the key is down".into(),
            });
        };
        // Phase one on the key's first owner alone: writers of one key queue
        // there, in arrival order, each waiting for the one before it to
        // commit or abort (`docs/strategies.md`). Every writer takes the
        // first owner before the other replicas and before its database
        // row, so no two writers can each hold what the other waits for.
        let wait_until = Instant::now() + settings.prepare_wait.min(self.client.config().deadline);
        let (mut prepared, started) = loop {
            let wait = wait_until.saturating_duration_since(Instant::now());
            // Taken before the prepare is sent and moved on by the time the
            // node says it waited, so it ends no later than the node's own
            // deadline for the change, which starts when it records it.
            let sent = Instant::now();
            let prepared = self
                .client
                .prepare_on(
                    &self.name,
                    vec![first.clone()],
                    item(version),
                    value.is_none(),
                    txn.as_str(),
                    settings.pending_timeout,
                    wait,
                )
                .await;
            let started = sent + prepared.waited;
            let live = prepared.refused.first().map(|(_, live)| *live);
            match live {
                // It waited its turn and found a newer version committed
                // meanwhile (a writer whose clock is ahead): its version was
                // taken before the wait, so take a fresh one, newer than
                // anything seen, and queue again while the wait lasts. Like
                // a row lock, the later writer of the key wins.
                Some(live)
                    if !prepared.busy
                        && !prepared.waited.is_zero()
                        && live >= version
                        && Instant::now() < wait_until =>
                {
                    self.client.inner.clock.observe(live);
                    version = self.client.inner.clock.now();
                }
                _ => break (prepared, started),
            }
        };
        if prepared.busy {
            // The wait ran out behind another writer: nothing is prepared.
            telemetry::twopc_abort(&self.name, "conflict");
            return Err(prepared.failure.unwrap_or_else(|| Error::Conflict {
                keyspace: self.name.to_string(),
                reason: "another write is pending".into(),
            }));
        }
        // A change of the key timed out on its first owner and is in doubt:
        // its writer stalled or died, and will never commit it (a writer
        // does not commit past its pending timeout), but its transaction
        // may still be prepared in the database, holding the row this
        // write is about to lock. Roll it back now rather than wait for
        // recovery. Should its writer have committed it just before, the
        // roll-back finds nothing, and the database's version guard orders
        // the two writes as ever.
        for in_doubt in std::mem::take(&mut prepared.in_doubt) {
            self.roll_back_in_doubt(store, &in_doubt).await;
        }
        // Phase one on the other replicas, in ring order, and then on the
        // store: every writer takes the key's resources in one order (first
        // owner, replicas, database row), so two writers never each hold
        // what the other waits for, even when they disagree on the first
        // owner (one of them routes around a node it believes down) and
        // meet on a replica.
        let mut rest = crate::primitives::Prepared::default();
        for replica in &nodes[1..] {
            let one = self
                .client
                .prepare_on(
                    &self.name,
                    vec![replica.clone()],
                    item(version),
                    value.is_none(),
                    txn.as_str(),
                    settings.pending_timeout,
                    // What is left of the wait, but at most half the
                    // pending timeout, which leaves the change the rest of
                    // it to commit on the first owner.
                    wait_until
                        .saturating_duration_since(Instant::now())
                        .min(settings.pending_timeout / 2),
                )
                .await;
            rest.merge(one);
        }
        let db = store.prepare(&txn, &self.name, &key, change, version).await;
        prepared.merge(rest);
        let cache_ok = prepared.nodes.len() >= settings.write_quorum;
        match db {
            Ok(applied) if applied.applied && cache_ok => {
                let elapsed = started.elapsed();
                if elapsed >= settings.pending_timeout {
                    // Held up past the pending timeout (a pool or lock wait,
                    // a paused process): the nodes may have given the change
                    // up and let a reader fill the old row back. Committing
                    // now could leave that value beside the new row, so roll
                    // back; the aborts clear the nodes' in-doubt fences.
                    let rolled_back = store.abort_prepared(&txn).await;
                    self.client
                        .finish(&self.name, &key, txn.as_str(), &prepared.nodes, false)
                        .await;
                    telemetry::twopc_abort(&self.name, "timeout");
                    return match rolled_back {
                        // Not found: recovery rolled it back first.
                        Ok(()) | Err(Error::TxnNotFound { .. }) => Err(Error::PendingTimedOut {
                            keyspace: self.name.to_string(),
                            elapsed,
                            pending_timeout: settings.pending_timeout,
                        }),
                        // Still prepared, maybe: recovery rolls it back.
                        Err(e) => Err(e),
                    };
                }
                // Phase two: the store decides. Once it committed, the write
                // happened; the cache commit is best effort, because a pending
                // change that is not committed in time removes the key.
                if let Err(e) = store.commit_prepared(&txn).await {
                    if matches!(e, Error::TxnNotFound { .. }) {
                        // Rolled back by recovery: nothing changed anywhere.
                        self.client
                            .finish(&self.name, &key, txn.as_str(), &prepared.nodes, false)
                            .await;
                    }
                    // Otherwise the outcome is unknown (the connection broke
                    // while committing): the database may hold the new
                    // value, so aborting the cache side, which keeps the old
                    // one, could leave the two apart. The pending change is
                    // left to time out instead, which removes it together
                    // with the cached value and leaves it in doubt on the
                    // node (no older fill lands) until recovery resolves it:
                    // absent is always correct.
                    telemetry::twopc_abort(&self.name, "commit");
                    return Err(e);
                }
                let unacknowledged = self
                    .client
                    .finish(&self.name, &key, txn.as_str(), &prepared.nodes, true)
                    .await;
                // The database holds `version`. A node that did not commit
                // it (the change timed out and was forgotten: flushed,
                // restarted, superseded) or refused the prepare (another
                // transaction was pending there) may hold the value it
                // replaced, or be about to fill it: invalidate what is older.
                let stale: Vec<Arc<NodeHandle>> = unacknowledged
                    .into_iter()
                    .chain(
                        prepared
                            .refused
                            .into_iter()
                            .filter(|(_, live)| *live < version)
                            .map(|(node, _)| node),
                    )
                    .collect();
                if !stale.is_empty() {
                    metrics::counter!(telemetry::TWOPC_INVALIDATIONS, "keyspace" => self.name.to_string())
                        .increment(stale.len() as u64);
                    self.client
                        .invalidate_below(&self.name, &key, version, &stale)
                        .await;
                }
                self.count("ringcache_client_twopc_commits_total");
                Ok(Written {
                    version,
                    applied: true,
                })
            }
            Ok(applied) => {
                // The store refused by version (nothing stays prepared
                // there) or the cache side failed.
                if applied.applied {
                    store.abort_prepared(&txn).await?;
                }
                self.client
                    .finish(&self.name, &key, txn.as_str(), &prepared.nodes, false)
                    .await;
                telemetry::twopc_abort(
                    &self.name,
                    if applied.applied { "cache" } else { "version" },
                );
                if !applied.applied {
                    self.client.inner.clock.observe(applied.version);
                    return Ok(Written {
                        version: applied.version,
                        applied: false,
                    });
                }
                Err(prepared.failure.unwrap_or_else(|| Error::QuorumNotReached {
                    acked: prepared.nodes.len(),
                    needed: settings.write_quorum,
                    last: "too few nodes prepared".into(),
                }))
            }
            Err(e) => {
                self.client
                    .finish(&self.name, &key, txn.as_str(), &prepared.nodes, false)
                    .await;
                telemetry::twopc_abort(&self.name, "store");
                Err(e)
            }
        }
    }
}

impl Keyspace {
    /// Write-back. A `durable` write goes to the keyspace's topic first and,
    /// once the broker acknowledged it, to the cache as a dirty entry (which
    /// the node keeps until the worker has stored it, so readers see the
    /// write at once). If the broker refuses it, the write fails and the
    /// cache is untouched: the dirty entries of earlier acknowledged writes
    /// stay, so readers keep seeing them. If the send fails with an unknown
    /// outcome (a timeout, a lost connection: the broker may have appended
    /// the record), the write fails, but it is treated as queued: its dirty
    /// entry is written (if newer than the cached one) and the same record
    /// is sent again in the background until the broker acknowledges it, so
    /// that the worker stores it and its `MarkClean` settles the entry,
    /// whichever copy the worker reads. If the cache write fails
    /// after the broker took the record (a node down, `max_dirty_bytes`
    /// full), the write fails, although it will be stored; the cache keeps
    /// what it had (earlier acknowledged writes stay readable) until the
    /// worker stores this record, whose `MarkClean` drops the older entries.
    ///
    /// A `fast` write goes to the cache first and returns; the record is
    /// produced in the background, and if the broker does not take it the
    /// cache entry of exactly this write is discarded (a later write's entry
    /// stays).
    #[cfg(feature = "kafka")]
    async fn write_back(
        &self,
        state: &KeyspaceState,
        key: Bytes,
        value: Option<Bytes>,
        version: u64,
    ) -> Result<Written> {
        let producer =
            self.client
                .inner
                .producer
                .get()
                .cloned()
                .ok_or_else(|| Error::Unsupported {
                    keyspace: self.name.to_string(),
                    reason: "write-back needs Client::enable_write_back".into(),
                })?;
        // A delete is cached as a dirty absence, so readers see it too.
        let cached = value
            .as_deref()
            .map_or_else(|| Bytes::from_static(&[TAG_ABSENT]), tagged);
        let mut options = crate::client::SetOptions::new()
            .version(version)
            .if_newer_version();
        options.dirty = true;
        if let Some(ttl) = state.settings.jittered_ttl() {
            options = options.ttl(ttl);
        }
        let record = crate::writeback::WriteBackRecord {
            keyspace: self.name.to_string(),
            key: key.clone(),
            version,
            value,
            written_at_ms: crate::hlc::physical_ms(version),
            // So that the worker tells every replica this write reaches.
            replicas: state.settings.replicas as u64,
        };
        match state.settings.ack {
            Ack::Durable => {
                let started = std::time::Instant::now();
                let sent = producer.send(&record).await;
                telemetry::write_back_produced(&self.name, "durable", started, sent.is_ok());
                if let Err(failed) = sent {
                    if failed.outcome_unknown {
                        self.write_back_unacknowledged(key, cached, options, record)
                            .await;
                    }
                    return Err(failed.error);
                }
                if let Err(e) = self.client.set(&self.name, &key, cached, options).await {
                    // The record is queued and will be stored. The cache is
                    // left as it is: it may hold the dirty entry of an
                    // earlier acknowledged write, which a delete would erase
                    // (readers would then load a store lagging behind it and
                    // cache that as clean: issue 13, defect 4). When the
                    // worker stores this record, its `MarkClean` drops every
                    // older entry of the key on the nodes.
                    self.count(telemetry::WRITE_BACK_CACHE_FAILURES);
                    return Err(e);
                }
            }
            Ack::Fast => {
                self.client.set(&self.name, &key, cached, options).await?;
                let this = self.clone();
                // In the caller's span, so that the record carries the
                // caller's trace context.
                let span = tracing::Span::current();
                let send = async move {
                    let started = std::time::Instant::now();
                    let sent = producer.send(&record).await;
                    telemetry::write_back_produced(&this.name, "fast", started, sent.is_ok());
                    if let Err(crate::producer::Unacknowledged { error: e, .. }) = sent {
                        tracing::error!(keyspace = %this.name, error = %e, "fast write-back write lost: the broker did not take it");
                        // Only this write's entry goes: a later write of the
                        // key (durable or fast) may have replaced it, and its
                        // dirty entry must stay.
                        if let Err(e) = this
                            .client
                            .discard(&this.name, &record.key, record.version)
                            .await
                        {
                            tracing::warn!(keyspace = %this.name, error = %e, "cannot discard the lost fast write's cache entry");
                        }
                        if let Some(callback) = this.client.inner.write_back_failed.get() {
                            callback(&record, &e);
                        }
                    }
                };
                tokio::spawn(tracing::Instrument::instrument(send, span));
            }
        }
        Ok(Written {
            version,
            applied: true,
        })
    }

    /// A durable write whose send ended with an unknown outcome: the
    /// broker may have appended the record, and the worker would then
    /// store it while the cache kept an older value (issue 13, defect 3).
    /// So the write is made certain rather than left in doubt: its dirty
    /// entry is written (only over an older entry), then the record is sent
    /// again until the broker acknowledges it. A duplicate is harmless: the
    /// worker stores a version once, and `MarkClean`s it for either copy.
    ///
    /// If the dirty entry cannot be written, the cache is left as it is, as
    /// for a cache failure after an acknowledged send: the `MarkClean` of
    /// this record drops older entries once the worker stored it.
    #[cfg(feature = "kafka")]
    async fn write_back_unacknowledged(
        &self,
        key: Bytes,
        cached: Bytes,
        options: crate::client::SetOptions,
        record: crate::writeback::WriteBackRecord,
    ) {
        // The dirty entry first: were it written after the re-send, the
        // worker could store and `MarkClean` the record before the entry
        // lands, leaving it dirty until the repair round.
        if let Err(e) = self.client.set(&self.name, &key, cached, options).await {
            tracing::warn!(keyspace = %self.name, error = %e, "cannot cache a durable write-back write whose send may have failed");
            self.count(telemetry::WRITE_BACK_CACHE_FAILURES);
        }
        // Only a weak reference: a dropped client stops re-sending (the
        // record may then be lost, and its dirty entry never stored; see
        // docs/write-back.md).
        let client = Arc::downgrade(&self.client.inner);
        let keyspace = self.name.clone();
        let resend = async move {
            let mut attempt: u32 = 0;
            loop {
                attempt = attempt.saturating_add(1);
                let Some(inner) = client.upgrade() else {
                    tracing::warn!(keyspace = %keyspace, version = record.version, "client dropped; a write-back record whose send failed is no longer sent again");
                    return;
                };
                let delay = inner
                    .backoff
                    .delay(attempt.min(10))
                    .max(Duration::from_millis(50));
                let Some(producer) = inner.producer.get().cloned() else {
                    return;
                };
                // The client is not kept alive while waiting.
                drop(inner);
                tokio::time::sleep(delay).await;
                metrics::counter!(telemetry::WRITE_BACK_RESENDS, "keyspace" => keyspace.to_string())
                    .increment(1);
                match producer.send(&record).await {
                    Ok(()) => {
                        tracing::info!(keyspace = %keyspace, version = record.version, attempt, "write-back record whose first send failed is queued");
                        return;
                    }
                    Err(failed) if failed.outcome_unknown => continue,
                    Err(failed) => {
                        // Refused for good. If the first send was appended,
                        // the worker stores it and `MarkClean` settles the
                        // entry; if not, nothing will: discard exactly this
                        // version's entry (a later write's stays).
                        tracing::error!(keyspace = %keyspace, version = record.version, error = %failed.error, "write-back record refused on re-send");
                        if let Some(inner) = client.upgrade() {
                            let client = Client { inner };
                            if let Err(e) =
                                client.discard(&keyspace, &record.key, record.version).await
                            {
                                tracing::warn!(keyspace = %keyspace, error = %e, "cannot discard the refused write's cache entry");
                            }
                        }
                        return;
                    }
                }
            }
        };
        tokio::spawn(tracing::Instrument::instrument(
            resend,
            tracing::Span::current(),
        ));
    }

    #[cfg(not(feature = "kafka"))]
    async fn write_back(
        &self,
        _state: &KeyspaceState,
        _key: Bytes,
        _value: Option<Bytes>,
        _version: u64,
    ) -> Result<Written> {
        Err(Error::Unsupported {
            keyspace: self.name.to_string(),
            reason: "write-back needs the `kafka` feature".into(),
        })
    }
}

/// Called when a `fast` write-back write could not be queued: the record
/// and the error.
pub type WriteBackFailed = dyn Fn(&crate::writeback::WriteBackRecord, &Error) + Send + Sync;

#[cfg(feature = "kafka")]
impl Client {
    /// Enables the write-back strategy: creates the Kafka producer. Call it
    /// before defining write-back keyspaces; their topics are created when
    /// they are defined through [`Client::ensure_write_back_topics`].
    ///
    /// # Errors
    /// [`Error::Store`] when the producer cannot be created;
    /// [`Error::Config`] when write-back was enabled already.
    pub fn enable_write_back(&self, config: crate::producer::WriteBackConfig) -> Result<()> {
        let producer = Arc::new(crate::producer::Producer::new(config)?);
        self.inner
            .producer
            .set(producer)
            .map_err(|_| Error::Config {
                field: "write_back",
                reason: "write-back is enabled already".into(),
            })
    }

    /// Sets the callback for `fast` write-back writes that could not be
    /// queued (they are also counted in
    /// `ringcache_client_write_back_failures_total`). Only the first call
    /// takes effect.
    pub fn on_write_back_failure(&self, callback: Box<WriteBackFailed>) {
        let _ = self.inner.write_back_failed.set(callback);
    }

    /// Creates the topics of every write-back keyspace that do not exist.
    ///
    /// # Errors
    /// The first topic that cannot be created.
    pub async fn ensure_write_back_topics(&self) -> Result<()> {
        let producer = self
            .inner
            .producer
            .get()
            .cloned()
            .ok_or_else(|| Error::Config {
                field: "write_back",
                reason: "write-back is not enabled".into(),
            })?;
        let all = self.inner.keyspaces.all();
        for (name, state) in all.iter() {
            if state.settings.strategy == Strategy::WriteBack {
                producer.ensure_topic(name).await?;
            }
        }
        Ok(())
    }
}

/// The result of a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// The write's version when applied; the newer stored version that won
    /// when not. A write-back write reports its own version and `applied`:
    /// the version guard runs later, in the worker.
    pub version: u64,
    /// False when a newer version was already stored (the write lost, as it
    /// must: versions order writes, not arrival).
    pub applied: bool,
}

impl Written {
    fn from(applied: Applied, version: u64) -> Self {
        Written {
            version: if applied.applied {
                version
            } else {
                applied.version
            },
            applied: applied.applied,
        }
    }
}

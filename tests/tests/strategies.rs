//! The caching strategies against real cache nodes and the real PostgreSQL
//! that `cargo xtask test` starts: leases against the stale-set race and
//! stampedes, negative caching and TTL jitter, write-around invalidation,
//! write-through two-phase commit under faults, strategy switches, and bad
//! configuration.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use async_trait::async_trait;
use bytes::Bytes;
use cache_client::keyspaces::KeyspacesFile;
use cache_client::store::{Applied, Change, InDoubt, Loaded, PgStore, Store, TxnId};
use cache_client::strategy::{KeyspaceSettings, Lookup, Strategy};
use cache_client::{Client, ClientConfig, SetOptions};
use ringcache_proto::v1;
use ringcache_tests::{NodeProcess, cluster};

/// A raw gRPC client of one node.
type Raw = v1::cache_node_client::CacheNodeClient<tonic::transport::Channel>;

fn client_config(nodes: &[NodeProcess]) -> ClientConfig {
    ClientConfig::new(nodes.iter().map(|n| n.addr().to_string()))
        .with_request_timeout(Duration::from_millis(300))
        .with_deadline(Duration::from_secs(3))
        .with_failure_threshold(2)
        .with_probe_interval(Duration::from_millis(100))
}

/// The client's metrics, recorded in memory for the whole test binary (the
/// `metrics` facade has one global recorder). Tests read their own
/// keyspace's counters.
fn metrics() -> &'static metrics_util::debugging::Snapshotter {
    static SNAPSHOTTER: std::sync::OnceLock<metrics_util::debugging::Snapshotter> =
        std::sync::OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder of this test binary");
        snapshotter
    })
}

/// The value of counter `name` for `keyspace`. Snapshots drain the
/// recorder's counters, so every snapshot is added into running totals,
/// which all tests read.
fn counter(name: &str, keyspace: &str) -> u64 {
    static TOTALS: std::sync::Mutex<Vec<((String, String), u64)>> =
        std::sync::Mutex::new(Vec::new());
    let mut totals = TOTALS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (key, _, _, value) in metrics().snapshot().into_vec() {
        let metrics_util::debugging::DebugValue::Counter(n) = value else {
            continue;
        };
        let label = key
            .key()
            .labels()
            .find(|l| l.key() == "keyspace")
            .map(|l| l.value().to_owned())
            .unwrap_or_default();
        let id = (key.key().name().to_owned(), label);
        match totals.iter_mut().find(|(k, _)| *k == id) {
            Some((_, total)) => *total += n,
            None => totals.push((id, n)),
        }
    }
    totals
        .iter()
        .find(|((n, k), _)| n == name && k == keyspace)
        .map_or(0, |(_, total)| *total)
}

/// A database of this test's own, as a shared store.
async fn own_database(prefix: &str) -> Result<Arc<PgStore>> {
    Ok(Arc::new(ringcache_tests::own_database(prefix).await?.1))
}

/// Counts loads, and can be told to fail or stall each two-phase step.
struct Faulty {
    inner: Arc<PgStore>,
    loads: AtomicUsize,
    load_delay: Duration,
    fail_prepare: AtomicBool,
    stall_after_prepare: AtomicBool,
    stall_after_commit: AtomicBool,
    fail_after_commit: AtomicBool,
    prepared: tokio::sync::Notify,
    /// Holds the writer after the database prepared, until `release`.
    hold_after_prepare: AtomicBool,
    /// Holds the writer in `commit_prepared` before it reaches the database
    /// (past the writer's own deadline check), until `release`.
    hold_before_commit: AtomicBool,
    /// Told when a writer is held.
    held: tokio::sync::Notify,
    /// Lets one held writer go on.
    release: tokio::sync::Notify,
}

impl Faulty {
    fn new(inner: Arc<PgStore>) -> Arc<Self> {
        Arc::new(Faulty {
            inner,
            loads: AtomicUsize::new(0),
            load_delay: Duration::ZERO,
            fail_prepare: AtomicBool::new(false),
            stall_after_prepare: AtomicBool::new(false),
            stall_after_commit: AtomicBool::new(false),
            fail_after_commit: AtomicBool::new(false),
            prepared: tokio::sync::Notify::new(),
            hold_after_prepare: AtomicBool::new(false),
            hold_before_commit: AtomicBool::new(false),
            held: tokio::sync::Notify::new(),
            release: tokio::sync::Notify::new(),
        })
    }

    /// If `flag` is set, clears it, says so on `held` and waits for `release`.
    async fn hold_if(&self, flag: &AtomicBool) {
        if flag.swap(false, Ordering::SeqCst) {
            self.held.notify_one();
            self.release.notified().await;
        }
    }
}

#[async_trait]
impl Store for Faulty {
    async fn load(&self, keyspace: &str, key: &[u8]) -> cache_client::Result<Loaded> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        if !self.load_delay.is_zero() {
            tokio::time::sleep(self.load_delay).await; // a slow database, on purpose
        }
        self.inner.load(keyspace, key).await
    }
    async fn store(
        &self,
        keyspace: &str,
        key: &[u8],
        value: &[u8],
        version: u64,
    ) -> cache_client::Result<Applied> {
        self.inner.store(keyspace, key, value, version).await
    }
    async fn delete(
        &self,
        keyspace: &str,
        key: &[u8],
        version: u64,
    ) -> cache_client::Result<Applied> {
        self.inner.delete(keyspace, key, version).await
    }
    async fn prepare(
        &self,
        txn: &TxnId,
        keyspace: &str,
        key: &[u8],
        change: Change<'_>,
        version: u64,
    ) -> cache_client::Result<Applied> {
        if self.fail_prepare.load(Ordering::SeqCst) {
            return Err(cache_client::Error::Store {
                keyspace: keyspace.into(),
                message: "injected: the database refuses the prepare".into(),
            });
        }
        let applied = self
            .inner
            .prepare(txn, keyspace, key, change, version)
            .await?;
        if self.stall_after_prepare.load(Ordering::SeqCst) {
            self.prepared.notify_one();
            std::future::pending::<()>().await; // the writer hangs here until dropped
        }
        self.hold_if(&self.hold_after_prepare).await;
        Ok(applied)
    }
    async fn commit_prepared(&self, txn: &TxnId) -> cache_client::Result<()> {
        self.hold_if(&self.hold_before_commit).await;
        self.inner.commit_prepared(txn).await?;
        if self.fail_after_commit.load(Ordering::SeqCst) {
            // The commit applied, but its reply was lost.
            return Err(cache_client::Error::Store {
                keyspace: String::new(),
                message: "injected: the connection broke after COMMIT PREPARED".into(),
            });
        }
        if self.stall_after_commit.load(Ordering::SeqCst) {
            self.prepared.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(())
    }
    async fn abort_prepared(&self, txn: &TxnId) -> cache_client::Result<()> {
        self.inner.abort_prepared(txn).await
    }
    async fn in_doubt(&self, older_than: Duration) -> cache_client::Result<Vec<InDoubt>> {
        self.inner.in_doubt(older_than).await
    }
}

/// The cached value of `key` with its tag byte removed (`None`: absent or
/// a cached absence), read straight from the cache.
async fn cached(client: &Client, keyspace: &str, key: &str) -> Result<Option<(Bytes, u64)>> {
    Ok(client
        .get(keyspace, key)
        .await?
        .and_then(|e| (e.value.first() == Some(&0)).then(|| (e.value.slice(1..), e.version))))
}

async fn stored(store: &PgStore, keyspace: &str, key: &str) -> Result<Option<(Bytes, u64)>> {
    Ok(match store.load(keyspace, key.as_bytes()).await? {
        Loaded::Present(row) => Some((row.value, row.version)),
        Loaded::Absent { .. } => None,
    })
}

/// The write-through invariant: the cached value equals the stored one, or
/// the key is absent from the cache.
async fn consistent(client: &Client, store: &PgStore, keyspace: &str, key: &str) -> Result<bool> {
    let cache = cached(client, keyspace, key).await?;
    Ok(cache.is_none() || cache == stored(store, keyspace, key).await?)
}

/// Polls until `check` holds, at most `timeout`.
async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    while !check().await? {
        ensure!(
            start.elapsed() < timeout,
            "{what} did not happen within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

#[tokio::test]
async fn the_stale_set_race_corrupts_without_leases_and_not_with_them() -> Result<()> {
    metrics(); // record this test's client metrics from the start
    let nodes = cluster(1).await?;
    let store = own_database("rc_stale_set").await?;
    let client = Client::connect(client_config(&nodes)).await?;
    client.define_keyspace(
        "users",
        KeyspaceSettings::new(Strategy::CacheAside),
        Some(store.clone()),
    )?;
    let users = client.keyspace("users");
    let clock = cache_client::hlc::Hlc::new();

    // Without leases: the reader misses and reads the old row; the writer
    // updates the row and invalidates; the reader's fill lands afterwards.
    let v1 = clock.now();
    store.store("users", b"plain", b"old", v1).await?;
    assert!(client.get("users", "plain").await?.is_none());
    let old = stored(&store, "users", "plain")
        .await?
        .context("row exists")?;
    let v2 = clock.now();
    store.store("users", b"plain", b"new", v2).await?;
    client.delete("users", "plain").await?;
    let mut tagged = vec![0u8];
    tagged.extend_from_slice(&old.0);
    client
        .set(
            "users",
            "plain",
            tagged,
            SetOptions::new().version(old.1).if_newer_version(),
        )
        .await?;
    assert_eq!(
        cached(&client, "users", "plain").await?.map(|c| c.0),
        Some(Bytes::from_static(b"old")),
        "without leases the stale fill survives: the cache says old, the database new"
    );

    // With leases: the same interleaving, and the stale fill is refused.
    store.store("users", b"leased", b"old", clock.now()).await?;
    let Lookup::Miss(lease) = users.lookup("leased").await? else {
        anyhow::bail!("a cold key hands out a lease");
    };
    let old = stored(&store, "users", "leased")
        .await?
        .context("row exists")?;
    users.put("leased", "new").await?; // database first, then invalidate
    assert!(
        !users.fill(lease, Some(old.0), old.1).await?,
        "the stale fill is refused"
    );
    assert!(counter("ringcache_client_fills_refused_total", "users") >= 1);
    assert_eq!(
        users
            .get_or_load("leased", || load(&store, "leased"))
            .await?,
        Some(Bytes::from_static(b"new"))
    );

    // Thousands of racing readers and writers: no stale value survives.
    let keys = 40;
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let (users, store) = (users.clone(), Arc::clone(&store));
        tasks.push(tokio::spawn(async move {
            for i in 0..300 {
                let key = format!("race:{}", (i * 7 + worker) % keys);
                if (i + worker) % 3 == 0 {
                    users.put(&key, format!("w{worker}-{i}")).await?;
                } else {
                    users.get_or_load(&key, || load(&store, &key)).await?;
                }
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    for k in 0..keys {
        let key = format!("race:{k}");
        let cache = cached(&client, "users", &key).await?;
        let db = stored(&store, "users", &key).await?;
        ensure!(
            cache.is_none() || cache == db,
            "{key}: cache {cache:?} but database {db:?}"
        );
    }
    Ok(())
}

async fn load(store: &PgStore, key: &str) -> cache_client::Result<Option<(Bytes, u64)>> {
    Ok(match store.load("users", key.as_bytes()).await? {
        Loaded::Present(row) => Some((row.value, row.version)),
        Loaded::Absent { .. } => None,
    })
}

#[tokio::test]
async fn a_stampede_on_a_cold_key_loads_it_once() -> Result<()> {
    metrics(); // record this test's client metrics from the start
    let nodes = cluster(3).await?;
    let pg = own_database("rc_stampede").await?;
    pg.store("hot", b"key", b"value", 1).await?;
    let mut faulty = Faulty::new(Arc::clone(&pg));
    Arc::get_mut(&mut faulty).context("fresh")?.load_delay = Duration::from_millis(200);
    let mut clients = Vec::new();
    for _ in 0..4 {
        // 1,000 calls at once on a shared 2-core machine: a 300 ms request
        // timeout can expire, and a node marked down is flushed on
        // re-admission, which rightly drops the lease and costs a second
        // load. This test is about the lease, not failover.
        let config = client_config(&nodes)
            .with_request_timeout(Duration::from_secs(5))
            .with_deadline(Duration::from_secs(20));
        let client = Client::connect(config).await?;
        client.define_keyspace(
            "hot",
            KeyspaceSettings::new(Strategy::ReadThrough).with_lease_wait(Duration::from_secs(20)),
            Some(faulty.clone()),
        )?;
        clients.push(client);
    }
    let mut gets = Vec::new();
    for i in 0..1000 {
        let keyspace = clients[i % clients.len()].keyspace("hot");
        gets.push(tokio::spawn(async move { keyspace.get("key").await }));
    }
    for get in gets {
        assert_eq!(get.await??, Some(Bytes::from_static(b"value")));
    }
    assert_eq!(
        faulty.loads.load(Ordering::SeqCst),
        1,
        "one load for 1,000 gets from 4 clients"
    );
    assert_eq!(counter("ringcache_client_loads_total", "hot"), 1);
    assert!(counter("ringcache_client_lease_waits_total", "hot") > 0);
    Ok(())
}

#[tokio::test]
async fn absence_is_cached_and_ttls_are_jittered() -> Result<()> {
    metrics(); // record this test's client metrics from the start
    let nodes = cluster(1).await?;
    let pg = own_database("rc_negative").await?;
    let faulty = Faulty::new(Arc::clone(&pg));
    let client = Client::connect(client_config(&nodes)).await?;
    client.define_keyspace(
        "items",
        KeyspaceSettings::new(Strategy::ReadThrough)
            .with_negative_ttl(Duration::from_secs(3600))
            .with_ttl(Duration::from_secs(100))
            .with_ttl_jitter(0.5),
        Some(faulty.clone()),
    )?;
    let items = client.keyspace("items");
    assert_eq!(items.get("nothing").await?, None);
    assert_eq!(items.get("nothing").await?, None);
    assert_eq!(
        faulty.loads.load(Ordering::SeqCst),
        1,
        "the second miss is a negative hit"
    );
    assert_eq!(counter("ringcache_client_negative_hits_total", "items"), 1);
    items.put("nothing", "now something").await?;
    assert_eq!(
        items.get("nothing").await?,
        Some(Bytes::from_static(b"now something"))
    );

    let mut ttls = Vec::new();
    for i in 0..100 {
        let key = format!("j{i}");
        pg.store("items", key.as_bytes(), b"v", 1).await?;
        items.get(&key).await?;
        let entry = client.get("items", &key).await?.context("filled")?;
        ttls.push(entry.ttl_remaining.context("has a TTL")?);
    }
    let (min, max) = (
        ttls.iter().min().copied().unwrap_or_default(),
        ttls.iter().max().copied().unwrap_or_default(),
    );
    ensure!(
        min >= Duration::from_secs(49) && max <= Duration::from_secs(100),
        "ttls in [50 s, 100 s]: {min:?}..{max:?}"
    );
    ensure!(
        max - min >= Duration::from_secs(20),
        "ttls are spread: {min:?}..{max:?}"
    );
    Ok(())
}

#[tokio::test]
async fn write_around_never_serves_the_old_value_after_a_write() -> Result<()> {
    let mut nodes = cluster(3).await?;
    let pg = own_database("rc_write_around").await?;
    let client = Client::connect(client_config(&nodes)).await?;
    client.define_keyspace(
        "docs",
        KeyspaceSettings::new(Strategy::WriteAround),
        Some(pg.clone()),
    )?;
    let docs = client.keyspace("docs");
    for i in 0..200 {
        let key = format!("d{}", i % 10);
        docs.get(&key).await?; // fill the cache with the current value
        let value = format!("v{i}");
        docs.put(&key, value.clone()).await?;
        assert_eq!(
            docs.get(&key).await?,
            Some(Bytes::from(value)),
            "{key} after write {i}"
        );
    }

    // The owning node is unreachable (paused) while the write deletes the key.
    let victim = nodes[0].config().node_id.clone();
    let key = (0..500)
        .map(|i| format!("paused:{i}"))
        .find(|k| client.owners("docs", k.as_bytes())[0] == victim)
        .context("a key of the victim")?;
    docs.put(&key, "old").await?;
    assert_eq!(docs.get(&key).await?, Some(Bytes::from_static(b"old")));
    nodes[0].sigstop()?;
    docs.put(&key, "new").await?;
    nodes[0].sigcont()?;
    let up = || {
        client
            .topology()
            .members
            .iter()
            .any(|m| m.id == victim && m.up)
    };
    let start = Instant::now();
    while !up() {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "the resumed node was re-admitted"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(client.owners("docs", key.as_bytes())[0], victim);
    assert_eq!(
        docs.get(&key).await?,
        Some(Bytes::from_static(b"new")),
        "not served stale after it came back"
    );
    Ok(())
}

#[tokio::test]
async fn write_through_keeps_cache_and_database_equal_under_faults() -> Result<()> {
    metrics(); // record this test's client metrics from the start
    let mut nodes = cluster(3).await?;
    let pg = own_database("rc_write_through").await?;
    let faulty = Faulty::new(Arc::clone(&pg));
    let client = Client::connect(client_config(&nodes)).await?;
    let settings = KeyspaceSettings::new(Strategy::WriteThrough)
        .with_pending_timeout(Duration::from_millis(500));
    client.define_keyspace("accounts", settings, Some(faulty.clone()))?;
    let accounts = client.keyspace("accounts");

    // The happy path: the cache holds the committed value.
    let written = accounts.put("a", "100").await?;
    assert!(written.applied);
    assert_eq!(
        cached(&client, "accounts", "a").await?,
        Some((Bytes::from_static(b"100"), written.version))
    );
    assert!(consistent(&client, &pg, "accounts", "a").await?);

    // 1. The database refuses the prepare: nothing changes anywhere.
    faulty.fail_prepare.store(true, Ordering::SeqCst);
    assert!(accounts.put("a", "200").await.is_err());
    faulty.fail_prepare.store(false, Ordering::SeqCst);
    assert_eq!(
        stored(&pg, "accounts", "a").await?.map(|s| s.0),
        Some(Bytes::from_static(b"100"))
    );
    assert!(consistent(&client, &pg, "accounts", "a").await?);

    // 2. The writer is dropped between the database commit and the cache
    //    commit: the pending change times out on the node and takes the
    //    old cached value with it.
    faulty.stall_after_commit.store(true, Ordering::SeqCst);
    let writer = tokio::spawn({
        let accounts = accounts.clone();
        async move { accounts.put("a", "300").await }
    });
    faulty.prepared.notified().await;
    writer.abort();
    faulty.stall_after_commit.store(false, Ordering::SeqCst);
    assert_eq!(
        stored(&pg, "accounts", "a").await?.map(|s| s.0),
        Some(Bytes::from_static(b"300"))
    );
    eventually(
        Duration::from_secs(10),
        "the stale cached value to go",
        || consistent(&client, &pg, "accounts", "a"),
    )
    .await?;

    // 2b. The database commits but the reply is lost: the writer gets an
    //     error without knowing the outcome. The cache must not keep the
    //     old value: the pending change times out and takes it along.
    accounts.put("c", "old").await?;
    faulty.fail_after_commit.store(true, Ordering::SeqCst);
    assert!(accounts.put("c", "new").await.is_err());
    faulty.fail_after_commit.store(false, Ordering::SeqCst);
    assert_eq!(
        stored(&pg, "accounts", "c").await?.map(|s| s.0),
        Some(Bytes::from_static(b"new"))
    );
    eventually(
        Duration::from_secs(10),
        "the old cached value to go after a commit of unknown outcome",
        || consistent(&client, &pg, "accounts", "c"),
    )
    .await?;
    assert_eq!(accounts.get("c").await?, Some(Bytes::from_static(b"new")));

    // 3. A node is killed between the phases.
    let key = "b";
    let owner = client.owners("accounts", key.as_bytes())[0].clone();
    accounts.put(key, "1").await?;
    faulty.stall_after_prepare.store(true, Ordering::SeqCst);
    let writer = tokio::spawn({
        let accounts = accounts.clone();
        async move { accounts.put(key, "2").await }
    });
    faulty.prepared.notified().await;
    let victim = nodes
        .iter_mut()
        .find(|n| n.config().node_id == owner)
        .context("owner")?;
    victim.sigkill()?;
    writer.abort();
    faulty.stall_after_prepare.store(false, Ordering::SeqCst);
    // The database transaction is in doubt; recovery rolls it back once it
    // is older than twice the pending timeout.
    assert_eq!(
        pg.in_doubt(Duration::ZERO).await?.len(),
        1,
        "the writer left one transaction in doubt"
    );
    eventually(Duration::from_secs(20), "in-doubt recovery", || {
        let (client, pg) = (client.clone(), Arc::clone(&pg));
        async move {
            client.recover_in_doubt().await?;
            Ok(pg.in_doubt(Duration::ZERO).await?.is_empty())
        }
    })
    .await?;
    assert!(
        pg.in_doubt(Duration::ZERO).await?.is_empty(),
        "nothing left in doubt"
    );
    assert_eq!(
        stored(&pg, "accounts", key).await?.map(|s| s.0),
        Some(Bytes::from_static(b"1"))
    );
    let config = victim.config().clone();
    *victim = NodeProcess::start(config).await?;
    eventually(
        Duration::from_secs(10),
        "cache equal to the database",
        || consistent(&client, &pg, "accounts", key),
    )
    .await?;

    // After all of it, writes work and the invariant holds for every key.
    for k in ["a", "b", "c"] {
        accounts.put(k, format!("final-{k}")).await?;
        assert!(consistent(&client, &pg, "accounts", k).await?, "{k}");
    }
    assert!(counter("ringcache_client_twopc_commits_total", "accounts") >= 5);
    assert!(counter("ringcache_client_twopc_aborts_total", "accounts") >= 1);
    assert!(counter("ringcache_client_twopc_recovered_total", "accounts") >= 1);
    Ok(())
}

#[tokio::test]
async fn switching_strategies_under_writes_loses_nothing_and_never_goes_back() -> Result<()> {
    let nodes = cluster(3).await?;
    let pg = own_database("rc_switch").await?;
    let client = Client::connect(client_config(&nodes)).await?;
    client.define_keyspace(
        "switch",
        KeyspaceSettings::new(Strategy::WriteAround),
        Some(pg.clone()),
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let switcher = tokio::spawn({
        let (client, stop) = (client.clone(), Arc::clone(&stop));
        async move {
            let order = [
                Strategy::WriteThrough,
                Strategy::ReadThrough,
                Strategy::WriteAround,
            ];
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                client.set_strategy("switch", order[i % order.len()])?;
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await; // switch while writes run
            }
            anyhow::Ok(i)
        }
    });
    let mut writers = Vec::new();
    for w in 0..4 {
        let ks = client.keyspace("switch");
        writers.push(tokio::spawn(async move {
            let mut last = Vec::new();
            for i in 0..150 {
                let key = format!("k{}", i % 5);
                let value = format!("{w}-{i}");
                match ks.put(&key, value.clone()).await {
                    Ok(written) if written.applied => {
                        // Read your own write, or a newer one.
                        let read = ks.get(&key).await?.context("a written key reads back")?;
                        let seen = String::from_utf8_lossy(&read).into_owned();
                        last.push((key, value, written.version, seen));
                    }
                    Ok(_) => {}
                    Err(e) if e.is_retryable() => {} // a write-through conflict: not acknowledged
                    Err(e) => return Err(e.into()),
                }
            }
            anyhow::Ok(last)
        }));
    }
    let mut acknowledged: std::collections::HashMap<String, (u64, String)> = Default::default();
    for writer in writers {
        for (key, value, version, _seen) in writer.await?? {
            let best = acknowledged.entry(key).or_insert((0, String::new()));
            if version > best.0 {
                *best = (version, value);
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    let switches = switcher.await??;
    ensure!(
        switches > 3,
        "the strategy switched while writes ran ({switches} times)"
    );
    let ks = client.keyspace("switch");
    for (key, (version, value)) in &acknowledged {
        let row = stored(&pg, "switch", key).await?.context("row")?;
        assert_eq!(
            row.1, *version,
            "{key}: the newest acknowledged write is in the database"
        );
        assert_eq!(row.0, value.as_str());
        assert_eq!(
            ks.get(key).await?,
            Some(Bytes::from(value.clone())),
            "{key}: no older version served"
        );
    }
    Ok(())
}

#[tokio::test]
async fn bad_keyspace_config_is_refused_and_the_previous_one_stays() -> Result<()> {
    let nodes = cluster(1).await?;
    let pg = own_database("rc_bad_config").await?;
    let client = Client::connect(client_config(&nodes)).await?;
    client.define_keyspace(
        "ks",
        KeyspaceSettings::new(Strategy::ReadThrough),
        Some(pg.clone()),
    )?;

    let err = client
        .define_keyspace(
            "ks",
            KeyspaceSettings::new(Strategy::ReadThrough).with_ttl_jitter(1.5),
            Some(pg.clone()),
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid keyspace config: keyspaces.ks.ttl_jitter: must be in [0, 1)"
    );
    let err = client
        .define_keyspace("ks", KeyspaceSettings::new(Strategy::WriteThrough), None)
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("invalid keyspace config: keyspaces.ks.store"),
        "{err}"
    );
    assert_eq!(
        client.keyspace_settings("ks").map(|s| s.strategy),
        Some(Strategy::ReadThrough)
    );

    let err = KeyspacesFile::parse("[keyspaces.ks]\nstrategy = \"write-sideways\"\n").unwrap_err();
    assert!(err.to_string().contains("write-sideways"), "{err}");
    let err = KeyspacesFile::parse("[keyspaces.ks]\nstrategy = \"read-through\"\nttl = \"-5s\"\n")
        .unwrap_err();
    assert!(err.to_string().contains("ttl"), "{err}");
    let file = KeyspacesFile::parse("[keyspaces.ks]\nstrategy = \"read-through\"\nreplicas = 0\n")?;
    let err = file.settings().unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid keyspace config: keyspaces.ks.replicas: must be at least 1"
    );

    // The keyspace still works as before.
    pg.store("ks", b"k", b"v", 1).await?;
    assert_eq!(
        client.keyspace("ks").get("k").await?,
        Some(Bytes::from_static(b"v"))
    );

    // A watched file: a change of strategy takes effect while running.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("keyspaces.toml");
    std::fs::write(
        &path,
        "[keyspaces.watched]\nstrategy = \"read-through\"\nttl = \"1m\"\n",
    )?;
    let pool = (*pg).clone();
    let _watch = client.watch_keyspaces(
        path.clone(),
        Duration::from_millis(50),
        Box::new(move |name, layout| {
            Ok(Some(
                Arc::new(pool.clone().with_layout(name, layout)?) as Arc<dyn Store>
            ))
        }),
    );
    let strategy = |c: &Client| c.keyspace_settings("watched").map(|s| s.strategy);
    eventually(Duration::from_secs(10), "the file to apply", || {
        let c = client.clone();
        async move { Ok(strategy(&c) == Some(Strategy::ReadThrough)) }
    })
    .await?;
    std::fs::write(
        &path,
        "[keyspaces.watched]\nstrategy = \"write-through\"\nttl = \"1m\"\n",
    )?;
    eventually(
        Duration::from_secs(10),
        "the switch to write-through",
        || {
            let c = client.clone();
            async move { Ok(strategy(&c) == Some(Strategy::WriteThrough)) }
        },
    )
    .await?;

    // A broken file is refused as a whole: the last good config stays.
    let pool = (*pg).clone();
    let broken = KeyspacesFile::parse(
        "[keyspaces.watched]\nstrategy = \"read-through\"\n[keyspaces.other]\nstrategy = \"write-around\"\nttl_jitter = 7.0\n",
    )?;
    let err = client
        .apply_keyspaces(&broken, &|name, layout| {
            Ok(Some(
                Arc::new(pool.clone().with_layout(name, layout)?) as Arc<dyn Store>
            ))
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid keyspace config: keyspaces.other.ttl_jitter: must be in [0, 1)"
    );
    assert_eq!(
        strategy(&client),
        Some(Strategy::WriteThrough),
        "nothing of the broken file applied"
    );
    assert!(client.keyspace_settings("other").is_none());
    client.keyspace("watched").put("x", "y").await?;
    assert_eq!(
        client.keyspace("watched").get("x").await?,
        Some(Bytes::from_static(b"y"))
    );
    Ok(())
}

/// The `pending_timeouts` counter of `keyspace` summed over the nodes.
async fn pending_timeouts(client: &Client, keyspace: &str) -> u64 {
    client
        .stats()
        .await
        .into_iter()
        .filter_map(|n| n.stats.ok())
        .flat_map(|s| s.keyspaces)
        .filter(|k| k.name == keyspace)
        .map(|k| k.pending_timeouts)
        .sum()
}

/// A raw gRPC client of one node, to act on it alone.
async fn direct(node: &NodeProcess) -> Result<Raw> {
    Ok(Raw::connect(node.endpoint()).await?)
}

/// Issue 13, defect 1: a write-through writer that stalls between its
/// prepare and `COMMIT PREPARED` for longer than the pending timeout. The
/// node gives the pending change up; a reader then loads the old row (the
/// prepared transaction is invisible) and fills it. Whatever the writer does
/// afterwards, the cache must not keep the old value beside the new row.
#[tokio::test]
async fn a_write_through_writer_stalled_past_its_pending_timeout_never_leaves_the_old_value_cached()
-> Result<()> {
    let nodes = cluster(1).await?;
    let pg = own_database("rc_wt_stalled").await?;
    let faulty = Faulty::new(Arc::clone(&pg));
    // Recovery would roll back a held writer's transaction on its own
    // schedule; here the writers are released by the test.
    let config = client_config(&nodes).with_recovery_interval(Duration::from_secs(3600));
    let client = Client::connect(config).await?;
    let settings = KeyspaceSettings::new(Strategy::WriteThrough)
        .with_pending_timeout(Duration::from_millis(300));
    client.define_keyspace("stalled", settings, Some(faulty.clone()))?;
    let ks = client.keyspace("stalled");
    let node_gave_up = |after: u64| {
        let client = client.clone();
        move || {
            let client = client.clone();
            async move { Ok(pending_timeouts(&client, "stalled").await > after) }
        }
    };
    let check = |key: &'static str, answered: String| {
        let (client, pg) = (client.clone(), Arc::clone(&pg));
        async move {
            let cache = cached(&client, "stalled", key).await?;
            let db = stored(&pg, "stalled", key).await?;
            ensure!(
                cache.is_none() || cache == db,
                "{key}: the cache keeps {cache:?} but the database holds {db:?} (the writer answered {answered})"
            );
            anyhow::Ok(db)
        }
    };

    // 1. Stalled after the prepare (pool wait, lock wait, a paused process):
    //    by the time it could commit, its pending change is gone.
    ks.put("a", "old").await?;
    faulty.hold_after_prepare.store(true, Ordering::SeqCst);
    let writer = tokio::spawn({
        let ks = ks.clone();
        async move { ks.put("a", "new").await }
    });
    faulty.held.notified().await;
    let timeouts = pending_timeouts(&client, "stalled").await;
    eventually(
        Duration::from_secs(10),
        "the node to give up the pending change",
        node_gave_up(timeouts),
    )
    .await?;
    assert_eq!(ks.get("a").await?, Some(Bytes::from_static(b"old")));
    faulty.release.notify_one();
    let answered = writer.await?;
    let db = check("a", format!("{answered:?}")).await?;
    ensure!(
        answered.is_err() && db.map(|d| d.0) == Some(Bytes::from_static(b"old")),
        "a writer past its pending deadline rolls back: it answered {answered:?}"
    );
    ensure!(pg.in_doubt(Duration::ZERO).await?.is_empty());

    // 2. Stalled inside COMMIT PREPARED, past its own deadline check (a
    //    database stall): the node keeps an in-doubt fence, so the reader's
    //    old value is not filled, and the late commit installs the new one.
    ks.put("b", "old").await?;
    faulty.hold_before_commit.store(true, Ordering::SeqCst);
    let writer = tokio::spawn({
        let ks = ks.clone();
        async move { ks.put("b", "new").await }
    });
    faulty.held.notified().await;
    let timeouts = pending_timeouts(&client, "stalled").await;
    eventually(
        Duration::from_secs(10),
        "the node to give up the pending change",
        node_gave_up(timeouts),
    )
    .await?;
    assert_eq!(ks.get("b").await?, Some(Bytes::from_static(b"old")));
    faulty.release.notify_one();
    let answered = writer.await?;
    let db = check("b", format!("{answered:?}")).await?;
    ensure!(
        answered.is_ok() && db.map(|d| d.0) == Some(Bytes::from_static(b"new")),
        "the commit went through: {answered:?}"
    );
    assert_eq!(ks.get("b").await?, Some(Bytes::from_static(b"new")));

    // 3. As 2, but the node lost its fence meanwhile (restarted, flushed or
    //    the fence outlived): the reader fills the old value, and the writer,
    //    told `committed = false`, must invalidate it.
    ks.put("c", "old").await?;
    faulty.hold_before_commit.store(true, Ordering::SeqCst);
    let writer = tokio::spawn({
        let ks = ks.clone();
        async move { ks.put("c", "new").await }
    });
    faulty.held.notified().await;
    let timeouts = pending_timeouts(&client, "stalled").await;
    eventually(
        Duration::from_secs(10),
        "the node to give up the pending change",
        node_gave_up(timeouts),
    )
    .await?;
    direct(&nodes[0])
        .await?
        .flush(v1::FlushRequest {
            keyspace: "stalled".into(),
        })
        .await?;
    assert_eq!(ks.get("c").await?, Some(Bytes::from_static(b"old")));
    faulty.release.notify_one();
    let answered = writer.await?;
    check("c", format!("{answered:?}")).await?;
    assert_eq!(ks.get("c").await?, Some(Bytes::from_static(b"new")));
    Ok(())
}

/// Issue 13, defect 1 (second part): a client asking for a longer pending
/// timeout than a node allows must hear so, not be capped silently (its
/// writer would believe its change pending for longer than it is).
#[tokio::test]
async fn a_pending_timeout_above_the_nodes_cap_is_refused_loudly() -> Result<()> {
    let nodes = cluster(1).await?;
    let pg = own_database("rc_wt_cap").await?;
    let client = Client::connect(client_config(&nodes)).await?;
    let settings = KeyspaceSettings::new(Strategy::WriteThrough)
        .with_pending_timeout(Duration::from_secs(3600));
    client.define_keyspace("capped", settings, Some(pg.clone()))?;
    let answered = client.keyspace("capped").put("k", "v").await;
    let err = match answered {
        Ok(written) => anyhow::bail!(
            "a pending timeout of 1 h above the node's max_pending_timeout (30 s) was accepted: {written:?}"
        ),
        Err(e) => e,
    };
    ensure!(
        err.to_string().contains("max_pending_timeout"),
        "the error names the node's limit: {err}"
    );
    ensure!(
        stored(&pg, "capped", "k").await?.is_none(),
        "nothing written"
    );
    ensure!(pg.in_doubt(Duration::ZERO).await?.is_empty());
    Ok(())
}

/// Issue 13, defect 5: with `replicas = 2` and `write_quorum = 1`, a replica
/// that refused the prepare (another transaction was pending there) must
/// not keep the old value once the write committed.
#[tokio::test]
async fn a_write_through_replica_that_refused_the_prepare_does_not_keep_the_old_value() -> Result<()>
{
    let nodes = cluster(2).await?;
    let pg = own_database("rc_wt_replicas").await?;
    let client = Client::connect(client_config(&nodes)).await?;
    let settings = KeyspaceSettings::new(Strategy::WriteThrough).with_replication(2, 1);
    client.define_keyspace("replicated", settings, Some(pg.clone()))?;
    let ks = client.keyspace("replicated");
    let old = ks.put("k", "old").await?;
    let owners = client.owners("replicated", b"k");
    let second = nodes
        .iter()
        .find(|n| n.config().node_id == owners[1])
        .context("the second owner")?;
    let mut raw = direct(second).await?;
    let read_second = |mut raw: Raw| async move {
        let entry = raw
            .get(v1::GetRequest {
                keyspace: "replicated".into(),
                key: Bytes::from_static(b"k"),
            })
            .await?
            .into_inner()
            .entry;
        anyhow::Ok(entry.map(|e| (e.value.slice(1..), e.version)))
    };
    assert_eq!(
        read_second(raw.clone()).await?,
        Some((Bytes::from_static(b"old"), old.version))
    );
    // Another writer's change is pending on the second owner only.
    let prepared = raw
        .prepare(v1::PrepareRequest {
            keyspace: "replicated".into(),
            item: Some(v1::SetItem {
                key: Bytes::from_static(b"k"),
                value: Bytes::from_static(b"\0other"),
                version: old.version + 1,
                ..Default::default()
            }),
            txn_id: "other-writer".into(),
            timeout_ms: 20_000,
            delete: false,
            wait_ms: 0,
        })
        .await?
        .into_inner();
    ensure!(prepared.prepared);
    let new = ks.put("k", "new").await?;
    ensure!(new.applied, "one replica is the quorum: {new:?}");
    // The other writer gives up.
    raw.abort(v1::AbortRequest {
        keyspace: "replicated".into(),
        key: Bytes::from_static(b"k"),
        txn_id: "other-writer".into(),
    })
    .await?;
    let on_second = read_second(raw.clone()).await?;
    ensure!(
        on_second.is_none() || on_second == Some((Bytes::from_static(b"new"), new.version)),
        "the replica that refused the prepare keeps {on_second:?} while the database holds {:?}",
        stored(&pg, "replicated", "k").await?
    );
    Ok(())
}

/// Issue 13, defect 7: a keyspace switched away from write-through while
/// one of its transactions is in doubt. Recovery must still roll it back
/// (it holds its row lock, and writes of the key wait on it), and tell the
/// nodes, whose in-doubt fence would refuse the old value's fills.
#[tokio::test]
async fn switching_away_from_write_through_still_recovers_its_in_doubt_transactions() -> Result<()>
{
    let nodes = cluster(1).await?;
    let pg = own_database("rc_wt_switch_recover").await?;
    let faulty = Faulty::new(Arc::clone(&pg));
    let client = Client::connect(client_config(&nodes)).await?;
    let settings = KeyspaceSettings::new(Strategy::WriteThrough)
        .with_pending_timeout(Duration::from_millis(200));
    client.define_keyspace("switched", settings, Some(faulty.clone()))?;
    let ks = client.keyspace("switched");
    ks.put("k", "1").await?;
    faulty.stall_after_prepare.store(true, Ordering::SeqCst);
    let writer = tokio::spawn({
        let ks = ks.clone();
        async move { ks.put("k", "2").await }
    });
    faulty.prepared.notified().await;
    writer.abort(); // the writer dies with its transaction prepared
    faulty.stall_after_prepare.store(false, Ordering::SeqCst);
    ensure!(pg.in_doubt(Duration::ZERO).await?.len() == 1);
    client.set_strategy("switched", Strategy::WriteAround)?;
    eventually(
        Duration::from_secs(20),
        "in-doubt recovery after the switch",
        || {
            let (client, pg) = (client.clone(), Arc::clone(&pg));
            async move {
                client.recover_in_doubt().await?;
                Ok(pg.in_doubt(Duration::ZERO).await?.is_empty())
            }
        },
    )
    .await?;
    // The node was told: the old value, the one the database holds, fills.
    assert_eq!(ks.get("k").await?, Some(Bytes::from_static(b"1")));
    assert_eq!(
        cached(&client, "switched", "k").await?.map(|c| c.0),
        Some(Bytes::from_static(b"1")),
        "the rolled-back transaction's fence is gone from the node"
    );
    // The row lock is free: a write-around write goes through.
    ks.put("k", "3").await?;
    assert_eq!(ks.get("k").await?, Some(Bytes::from_static(b"3")));
    Ok(())
}

/// Issue 20: two writers of one write-through key at once. The second
/// waits on the key's first owner for the first to commit, instead of
/// failing with a write conflict; the cache ends holding what the database
/// committed last.
#[tokio::test]
async fn two_write_through_writers_of_one_key_both_succeed() -> Result<()> {
    let nodes = cluster(1).await?;
    let pg = own_database("rc_wt_two_writers").await?;
    let client = Client::connect(client_config(&nodes)).await?;
    client.define_keyspace(
        "pair",
        KeyspaceSettings::new(Strategy::WriteThrough),
        Some(pg.clone()),
    )?;
    let ks = client.keyspace("pair");
    for round in 0..20 {
        let key = format!("k{round}");
        let (a, b) = tokio::join!(ks.put(&key, "a"), ks.put(&key, "b"));
        let (a, b) = (
            a.with_context(|| format!("round {round}: writer a"))?,
            b.with_context(|| format!("round {round}: writer b"))?,
        );
        ensure!(
            a.applied && b.applied,
            "round {round}: both writes apply, in turn: {a:?} {b:?}"
        );
        let db = stored(&pg, "pair", &key).await?.context("the row")?;
        ensure!(
            db.1 == a.version.max(b.version),
            "round {round}: the database holds the later write: {db:?}, {a:?}, {b:?}"
        );
        ensure!(
            cached(&client, "pair", &key).await? == Some(db.clone()),
            "round {round}: the cache holds {:?}, the database {db:?}",
            cached(&client, "pair", &key).await?
        );
    }
    Ok(())
}

/// Issue 20: many writers of one write-through key with two replicas: none
/// fails, and both replicas end with what the database holds.
#[tokio::test]
async fn many_write_through_writers_of_one_key_all_succeed() -> Result<()> {
    let nodes = cluster(3).await?;
    let pg = own_database("rc_wt_many_writers").await?;
    let client = Client::connect(client_config(&nodes)).await?;
    client.define_keyspace(
        "hot",
        KeyspaceSettings::new(Strategy::WriteThrough).with_replication(2, 2),
        Some(pg.clone()),
    )?;
    let ks = client.keyspace("hot");
    let mut tasks = Vec::new();
    for task in 0..8 {
        let ks = ks.clone();
        tasks.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            for i in 0..10 {
                match ks.put("k", format!("t{task}-{i}")).await {
                    Ok(w) if w.applied => {}
                    Ok(w) => errors.push(format!("not applied: {w:?}")),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            errors
        }));
    }
    let mut errors = Vec::new();
    for task in tasks {
        errors.extend(task.await?);
    }
    ensure!(
        errors.is_empty(),
        "{} of 80 writes failed, e.g. {:?}",
        errors.len(),
        errors.first()
    );
    let db = stored(&pg, "hot", "k").await?.context("the row")?;
    for owner in client.owners("hot", b"k") {
        let node = nodes
            .iter()
            .find(|n| n.config().node_id == owner)
            .context("an owner")?;
        let entry = direct(node)
            .await?
            .get(v1::GetRequest {
                keyspace: "hot".into(),
                key: Bytes::from_static(b"k"),
            })
            .await?
            .into_inner()
            .entry
            .map(|e| (e.value.slice(1..), e.version));
        ensure!(
            entry.as_ref() == Some(&db),
            "owner {owner} holds {entry:?}, the database {db:?}"
        );
    }
    Ok(())
}

/// Issue 20: a writer whose wait runs out (the writer ahead of it stalls
/// between its prepare and its commit for longer than `prepare_wait`) fails
/// with the write conflict, having prepared nothing; the stalled writer
/// still commits.
/// A writer that stalls after its database prepared (a paused process)
/// keeps the key's row locked. Once its change timed out on the key's
/// first owner it will never commit, so the next writer, whom the node
/// tells which change is in doubt there, rolls that prepared transaction
/// back itself and goes on, instead of waiting on the row for recovery
/// (which here would come only after an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_behind_a_stalled_writer_goes_on_once_the_stalled_change_timed_out() -> Result<()>
{
    let nodes = cluster(1).await?;
    let pg = own_database("rc_wt_stalled").await?;
    // Without the roll-back, the second writer's database prepare would
    // wait on the stalled writer's row until this lock timeout.
    let locked = Arc::new(
        (*pg)
            .clone()
            .with_prepare_lock_timeout(Duration::from_secs(2)),
    );
    let faulty = Faulty::new(Arc::clone(&locked));
    let client =
        Client::connect(client_config(&nodes).with_recovery_interval(Duration::from_secs(3600)))
            .await?;
    let settings = KeyspaceSettings::new(Strategy::WriteThrough)
        .with_pending_timeout(Duration::from_millis(500))
        .with_prepare_wait(Duration::from_secs(2));
    client.define_keyspace("stalled", settings, Some(faulty.clone()))?;
    let ks = client.keyspace("stalled");
    faulty.hold_after_prepare.store(true, Ordering::SeqCst);
    let first = tokio::spawn({
        let ks = ks.clone();
        async move { ks.put("k", "first").await }
    });
    faulty.held.notified().await;
    let second = ks.put("k", "second").await;
    faulty.release.notify_one();
    let first = first.await?;
    let second = second.context("the writer behind the stalled one")?;
    ensure!(second.applied, "{second:?}");
    ensure!(
        matches!(first, Err(cache_client::Error::PendingTimedOut { .. })),
        "the stalled writer did not commit: {first:?}"
    );
    ensure!(stored(&pg, "stalled", "k").await?.map(|s| s.0) == Some(Bytes::from_static(b"second")));
    ensure!(
        cached(&client, "stalled", "k").await? == stored(&pg, "stalled", "k").await?,
        "the cache holds what the database holds"
    );
    ensure!(
        pg.in_doubt(Duration::ZERO).await?.is_empty(),
        "nothing is left prepared"
    );
    Ok(())
}

#[tokio::test]
async fn a_write_through_writer_whose_wait_runs_out_gets_the_conflict() -> Result<()> {
    metrics(); // record this test's client metrics from the start
    let nodes = cluster(1).await?;
    let pg = own_database("rc_wt_wait_out").await?;
    let faulty = Faulty::new(Arc::clone(&pg));
    let client = Client::connect(client_config(&nodes)).await?;
    let settings =
        KeyspaceSettings::new(Strategy::WriteThrough).with_prepare_wait(Duration::from_millis(200));
    client.define_keyspace("waitout", settings, Some(faulty.clone()))?;
    let ks = client.keyspace("waitout");
    faulty.hold_after_prepare.store(true, Ordering::SeqCst);
    let first = tokio::spawn({
        let ks = ks.clone();
        async move { ks.put("k", "first").await }
    });
    faulty.held.notified().await;
    let second = ks.put("k", "second").await;
    let err = match second {
        Ok(w) => anyhow::bail!("the second writer went past a pending change: {w:?}"),
        Err(e) => e,
    };
    ensure!(
        matches!(err, cache_client::Error::Conflict { .. })
            && err.to_string().contains("another write is pending"),
        "the wait ran out: {err}"
    );
    ensure!(counter("ringcache_client_prepare_waits_exhausted_total", "waitout") >= 1);
    faulty.release.notify_one();
    let first = first.await??;
    ensure!(first.applied);
    ensure!(stored(&pg, "waitout", "k").await?.map(|s| s.0) == Some(Bytes::from_static(b"first")));
    ensure!(
        cached(&client, "waitout", "k").await? == stored(&pg, "waitout", "k").await?,
        "the cache holds what the database holds"
    );
    ensure!(
        pg.in_doubt(Duration::ZERO).await?.is_empty(),
        "the second writer prepared nothing"
    );
    Ok(())
}

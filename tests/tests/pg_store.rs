//! `PgStore` against the real PostgreSQL that `cargo xtask test` provides:
//! loads, version guards and tombstones, and two-phase commit, for each
//! store layout (the shared table, a table of the user's, user statements).
//!
//! Tests run in parallel on one database, so each uses its own keyspaces and
//! tables, and checks only its own prepared transactions.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use cache_client::{
    Error,
    store::{
        Applied, Change, Loaded, PgStore, Row, SqlLayout, Store, StoreLayout, TableLayout, TxnId,
    },
};
use ringcache_tests::pg_url;
use sqlx::{PgPool, postgres::PgPoolOptions};

/// Connections per test: tests run in parallel against one server.
const POOL_SIZE: u32 = 4;

/// How long a prepare waits for a row another prepared transaction holds,
/// in the test that provokes it.
const SHORT_LOCK_TIMEOUT: Duration = Duration::from_millis(200);

/// A name no other test (or earlier run against the same server) uses; a
/// valid SQL identifier.
fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}_{}_{nanos}_{n}", std::process::id())
}

/// A keyspace of one layout within a test's store.
struct Keyspace {
    layout: &'static str,
    name: String,
}

/// A store with one keyspace per layout, migrated, with tables of their own.
async fn store_with_all_layouts() -> Result<(PgStore, Vec<Keyspace>)> {
    let pool = pool().await?;

    let table = unique("pg_store_table");
    sqlx::raw_sql(&format!(
        "CREATE TABLE {table} (key BYTEA PRIMARY KEY, value BYTEA, version BIGINT NOT NULL)"
    ))
    .execute(&pool)
    .await
    .with_context(|| format!("failed to create {table}"))?;

    // A user table with text ids and its own column names, reached through
    // statements; `delete` does not mention `$2`.
    let docs = unique("pg_store_docs");
    sqlx::raw_sql(&format!(
        "CREATE TABLE {docs} (id TEXT PRIMARY KEY, body BYTEA, rev BIGINT NOT NULL)"
    ))
    .execute(&pool)
    .await
    .with_context(|| format!("failed to create {docs}"))?;
    let sql = SqlLayout {
        load: format!("SELECT body, rev FROM {docs} WHERE id = convert_from($1, 'UTF8')"),
        store: format!(
            "INSERT INTO {docs} AS d (id, body, rev) VALUES (convert_from($1, 'UTF8'), $2, $3) \
             ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body, rev = EXCLUDED.rev \
             WHERE d.rev < EXCLUDED.rev"
        ),
        delete: format!(
            "INSERT INTO {docs} AS d (id, body, rev) VALUES (convert_from($1, 'UTF8'), NULL, $3) \
             ON CONFLICT (id) DO UPDATE SET body = NULL, rev = EXCLUDED.rev \
             WHERE d.rev < EXCLUDED.rev"
        ),
    };

    let keyspaces = vec![
        Keyspace {
            layout: "default",
            name: unique("ks_default"),
        },
        Keyspace {
            layout: "table",
            name: unique("ks_table"),
        },
        Keyspace {
            layout: "sql",
            name: unique("ks_sql"),
        },
    ];
    let store = PgStore::from_pool(pool)
        .with_layout(
            &keyspaces[1].name,
            &StoreLayout::Table(TableLayout::new(table)),
        )?
        .with_layout(&keyspaces[2].name, &StoreLayout::Sql(sql))?;
    store.migrate().await.context("migrate failed")?;
    Ok((store, keyspaces))
}

async fn pool() -> Result<PgPool> {
    let url = pg_url()?;
    PgPoolOptions::new()
        .max_connections(POOL_SIZE)
        .connect(&url)
        .await
        .with_context(|| format!("failed to connect to PostgreSQL at {url}"))
}

fn present(value: &str, version: u64) -> Loaded {
    Loaded::Present(Row {
        value: Bytes::copy_from_slice(value.as_bytes()),
        version,
    })
}

fn applied(version: u64) -> Applied {
    Applied {
        applied: true,
        version,
    }
}

fn refused(version: u64) -> Applied {
    Applied {
        applied: false,
        version,
    }
}

/// Whether `txn` is prepared in the database (seen from a fresh session).
async fn is_prepared(store: &PgStore, txn: &TxnId) -> Result<bool> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_prepared_xacts WHERE gid = $1")
        .bind(txn.as_str())
        .fetch_one(store.pool())
        .await?;
    Ok(n > 0)
}

/// How many bookkeeping rows `txn` has (0 once it is resolved).
async fn bookkeeping_rows(store: &PgStore, txn: &TxnId) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM ringcache_2pc WHERE gid = $1")
            .bind(txn.as_str())
            .fetch_one(store.pool())
            .await?,
    )
}

async fn listed_in_doubt(store: &PgStore, txn: &TxnId, older_than: Duration) -> Result<bool> {
    Ok(store
        .in_doubt(older_than)
        .await?
        .iter()
        .any(|d| &d.txn == txn))
}

#[tokio::test]
async fn load_tells_absent_present_and_tombstone_apart() -> Result<()> {
    let (store, keyspaces) = store_with_all_layouts().await?;
    for ks in &keyspaces {
        let (name, layout) = (ks.name.as_str(), ks.layout);
        ensure!(
            store.load(name, b"k").await? == Loaded::Absent { version: 0 },
            "{layout}: a key without a row must be absent at version 0"
        );
        ensure!(
            store.store(name, b"k", b"v5", 5).await? == applied(5),
            "{layout}"
        );
        ensure!(
            store.load(name, b"k").await? == present("v5", 5),
            "{layout}"
        );
        ensure!(store.delete(name, b"k", 6).await? == applied(6), "{layout}");
        ensure!(
            store.load(name, b"k").await? == Loaded::Absent { version: 6 },
            "{layout}: a tombstone must be absent at its version"
        );
        // Keys are bytes; another key is another row.
        ensure!(
            store.load(name, b"k2").await? == Loaded::Absent { version: 0 },
            "{layout}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn version_guard_refuses_older_and_equal_writes() -> Result<()> {
    let (store, keyspaces) = store_with_all_layouts().await?;
    for ks in &keyspaces {
        let (name, layout) = (ks.name.as_str(), ks.layout);
        ensure!(
            store.store(name, b"k", b"a", 10).await? == applied(10),
            "{layout}"
        );
        ensure!(
            store.store(name, b"k", b"older", 9).await? == refused(10),
            "{layout}: an older store must be refused, reporting the stored version"
        );
        ensure!(
            store.store(name, b"k", b"same", 10).await? == refused(10),
            "{layout}: a store at the stored version must be refused"
        );
        ensure!(
            store.delete(name, b"k", 9).await? == refused(10),
            "{layout}: an older delete must be refused"
        );
        ensure!(
            store.load(name, b"k").await? == present("a", 10),
            "{layout}"
        );

        // Delete, then an older store arrives late: no resurrection.
        ensure!(
            store.delete(name, b"k", 11).await? == applied(11),
            "{layout}"
        );
        ensure!(
            store.store(name, b"k", b"late", 10).await? == refused(11),
            "{layout}: a store older than the tombstone must be refused"
        );
        ensure!(
            store.load(name, b"k").await? == Loaded::Absent { version: 11 },
            "{layout}"
        );
        ensure!(
            store.store(name, b"k", b"b", 12).await? == applied(12),
            "{layout}"
        );
        ensure!(
            store.load(name, b"k").await? == present("b", 12),
            "{layout}"
        );

        // Deleting a key that never existed still fences older writes.
        ensure!(
            store.delete(name, b"never", 3).await? == applied(3),
            "{layout}"
        );
        ensure!(
            store.store(name, b"never", b"late", 2).await? == refused(3),
            "{layout}"
        );
        ensure!(
            store.load(name, b"never").await? == Loaded::Absent { version: 3 },
            "{layout}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn versions_above_i64_max_are_refused() -> Result<()> {
    let (store, keyspaces) = store_with_all_layouts().await?;
    let too_big = i64::MAX as u64 + 1;
    for ks in &keyspaces {
        let (name, layout) = (ks.name.as_str(), ks.layout);
        for result in [
            store.store(name, b"k", b"v", too_big).await,
            store.delete(name, b"k", too_big).await,
        ] {
            let err = result
                .err()
                .context("a version above i64::MAX was accepted")?;
            ensure!(
                matches!(err, Error::StoreRejected { .. }) && !err.is_retryable(),
                "{layout}: unexpected error {err:?}"
            );
        }
        let txn = TxnId::new();
        ensure!(
            store
                .prepare(&txn, name, b"k", Change::Put(b"v"), too_big)
                .await
                .is_err(),
            "{layout}"
        );
        ensure!(!is_prepared(&store, &txn).await?, "{layout}");
        ensure!(bookkeeping_rows(&store, &txn).await? == 0, "{layout}");
        // The largest storable version works.
        ensure!(
            store.store(name, b"k", b"max", too_big - 1).await? == applied(too_big - 1),
            "{layout}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn prepared_change_is_invisible_until_committed() -> Result<()> {
    let (store, keyspaces) = store_with_all_layouts().await?;
    for ks in &keyspaces {
        let (name, layout) = (ks.name.as_str(), ks.layout);
        store.store(name, b"k", b"v1", 1).await?;

        let txn = TxnId::new();
        ensure!(
            store
                .prepare(&txn, name, b"k", Change::Put(b"v2"), 2)
                .await?
                == applied(2),
            "{layout}"
        );
        // The store reads on other pooled sessions; the prepared change is
        // detached from the session that made it.
        ensure!(
            store.load(name, b"k").await? == present("v1", 1),
            "{layout}: a prepared change must be invisible"
        );
        ensure!(is_prepared(&store, &txn).await?, "{layout}");
        let listed = store.in_doubt(Duration::ZERO).await?;
        let entry = listed
            .iter()
            .find(|d| d.txn == txn)
            .with_context(|| format!("{layout}: in_doubt does not list {txn}"))?;
        ensure!(
            entry.keyspace.as_deref() == Some(name) && entry.key.as_deref() == Some(&b"k"[..]),
            "{layout}: in_doubt names {:?} / {:?}",
            entry.keyspace,
            entry.key
        );

        store.commit_prepared(&txn).await?;
        ensure!(
            store.load(name, b"k").await? == present("v2", 2),
            "{layout}"
        );
        ensure!(
            !listed_in_doubt(&store, &txn, Duration::ZERO).await?,
            "{layout}: a committed transaction is still in doubt"
        );
        ensure!(bookkeeping_rows(&store, &txn).await? == 0, "{layout}");
        let again = store.commit_prepared(&txn).await;
        ensure!(
            matches!(again, Err(Error::TxnNotFound { .. })),
            "{layout}: a second commit gave {again:?}"
        );

        // A prepared delete commits to a tombstone.
        let txn = TxnId::new();
        ensure!(
            store.prepare(&txn, name, b"k", Change::Delete, 3).await? == applied(3),
            "{layout}"
        );
        ensure!(
            store.load(name, b"k").await? == present("v2", 2),
            "{layout}"
        );
        store.commit_prepared(&txn).await?;
        ensure!(
            store.load(name, b"k").await? == Loaded::Absent { version: 3 },
            "{layout}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn aborted_prepare_leaves_the_row_unchanged() -> Result<()> {
    let (store, keyspaces) = store_with_all_layouts().await?;
    for ks in &keyspaces {
        let (name, layout) = (ks.name.as_str(), ks.layout);
        store.store(name, b"k", b"v1", 1).await?;

        for change in [Change::Put(b"v2"), Change::Delete] {
            let txn = TxnId::new();
            ensure!(
                store.prepare(&txn, name, b"k", change, 2).await? == applied(2),
                "{layout}"
            );
            store.abort_prepared(&txn).await?;
            ensure!(
                store.load(name, b"k").await? == present("v1", 1),
                "{layout}: {change:?} survived its rollback"
            );
            ensure!(!is_prepared(&store, &txn).await?, "{layout}");
            ensure!(bookkeeping_rows(&store, &txn).await? == 0, "{layout}");
            ensure!(
                !listed_in_doubt(&store, &txn, Duration::ZERO).await?,
                "{layout}"
            );
            let again = store.abort_prepared(&txn).await;
            ensure!(
                matches!(again, Err(Error::TxnNotFound { .. })),
                "{layout}: a second abort gave {again:?}"
            );
        }

        // On a key without a row, an aborted prepare leaves no row (not even
        // a tombstone).
        let txn = TxnId::new();
        store
            .prepare(&txn, name, b"fresh", Change::Put(b"x"), 5)
            .await?;
        store.abort_prepared(&txn).await?;
        ensure!(
            store.load(name, b"fresh").await? == Loaded::Absent { version: 0 },
            "{layout}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn prepare_refused_by_the_guard_leaves_nothing_prepared() -> Result<()> {
    let (store, keyspaces) = store_with_all_layouts().await?;
    for ks in &keyspaces {
        let (name, layout) = (ks.name.as_str(), ks.layout);
        store.store(name, b"k", b"v5", 5).await?;
        for (change, version) in [
            (Change::Put(b"older"), 4),
            (Change::Put(b"same"), 5),
            (Change::Delete, 4),
        ] {
            let txn = TxnId::new();
            ensure!(
                store.prepare(&txn, name, b"k", change, version).await? == refused(5),
                "{layout}: {change:?} at {version} was not refused"
            );
            ensure!(
                !is_prepared(&store, &txn).await?,
                "{layout}: a refused prepare left {txn} prepared"
            );
            ensure!(bookkeeping_rows(&store, &txn).await? == 0, "{layout}");
            ensure!(
                matches!(
                    store.commit_prepared(&txn).await,
                    Err(Error::TxnNotFound { .. })
                ),
                "{layout}"
            );
        }
        ensure!(
            store.load(name, b"k").await? == present("v5", 5),
            "{layout}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn conflicting_prepare_fails_without_corrupting() -> Result<()> {
    let (store, keyspaces) = store_with_all_layouts().await?;
    let store = store.with_prepare_lock_timeout(SHORT_LOCK_TIMEOUT);
    for ks in &keyspaces {
        let (name, layout) = (ks.name.as_str(), ks.layout);
        store.store(name, b"k", b"v1", 1).await?;

        let first = TxnId::new();
        store
            .prepare(&first, name, b"k", Change::Put(b"first"), 2)
            .await?;
        // The first transaction holds the row: the second waits for the lock
        // timeout, then fails with a retryable error, leaving nothing behind.
        let second = TxnId::new();
        let err = store
            .prepare(&second, name, b"k", Change::Put(b"second"), 3)
            .await
            .err()
            .with_context(|| format!("{layout}: a conflicting prepare succeeded"))?;
        ensure!(
            matches!(err, Error::Store { .. }) && err.is_retryable(),
            "{layout}: unexpected error {err:?}"
        );
        ensure!(!is_prepared(&store, &second).await?, "{layout}");
        ensure!(bookkeeping_rows(&store, &second).await? == 0, "{layout}");
        ensure!(is_prepared(&store, &first).await?, "{layout}");

        store.commit_prepared(&first).await?;
        ensure!(
            store.load(name, b"k").await? == present("first", 2),
            "{layout}"
        );

        // Retried after the first resolved, the second goes through.
        store
            .prepare(&second, name, b"k", Change::Put(b"second"), 3)
            .await?;
        store.commit_prepared(&second).await?;
        ensure!(
            store.load(name, b"k").await? == present("second", 3),
            "{layout}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_transaction_id_in_use_is_refused() -> Result<()> {
    let (store, keyspaces) = store_with_all_layouts().await?;
    let name = keyspaces[0].name.as_str();
    let txn = TxnId::new();
    store
        .prepare(&txn, name, b"a", Change::Put(b"a"), 1)
        .await?;
    let err = store
        .prepare(&txn, name, b"b", Change::Put(b"b"), 1)
        .await
        .err()
        .context("a second prepare under the same id succeeded")?;
    ensure!(
        !err.is_retryable() && err.to_string().contains("already in use"),
        "unexpected error {err:?}"
    );
    // The first transaction and its bookkeeping are untouched.
    ensure!(bookkeeping_rows(&store, &txn).await? == 1);
    store.commit_prepared(&txn).await?;
    ensure!(store.load(name, b"a").await? == present("a", 1));
    ensure!(store.load(name, b"b").await? == Loaded::Absent { version: 0 });
    Ok(())
}

#[tokio::test]
async fn in_doubt_lists_transactions_older_than_asked() -> Result<()> {
    let (store, keyspaces) = store_with_all_layouts().await?;
    let name = keyspaces[0].name.as_str();
    let txn = TxnId::new();
    let before = SystemTime::now() - Duration::from_secs(60);
    store
        .prepare(&txn, name, b"k", Change::Put(b"v"), 1)
        .await?;

    ensure!(
        !listed_in_doubt(&store, &txn, Duration::from_secs(3600)).await?,
        "a transaction prepared just now is listed as older than an hour"
    );
    let listed = store.in_doubt(Duration::ZERO).await?;
    let entry = listed
        .iter()
        .find(|d| d.txn == txn)
        .context("in_doubt(0) does not list the prepared transaction")?;
    ensure!(
        entry.prepared_at >= before
            && entry.prepared_at <= SystemTime::now() + Duration::from_secs(60),
        "prepared_at {:?} is not about now",
        entry.prepared_at
    );
    // Oldest first.
    ensure!(
        listed
            .windows(2)
            .all(|w| w[0].prepared_at <= w[1].prepared_at)
    );

    store.commit_prepared(&txn).await?;
    ensure!(!listed_in_doubt(&store, &txn, Duration::ZERO).await?);
    Ok(())
}

#[tokio::test]
async fn concurrent_stores_keep_the_highest_version() -> Result<()> {
    const VERSIONS: u64 = 100;
    let (store, keyspaces) = store_with_all_layouts().await?;
    for ks in &keyspaces {
        let layout = ks.layout;
        // Every version once, in a scrambled order (37 is coprime with 100),
        // all in flight at once.
        let tasks: Vec<_> = (0..VERSIONS)
            .map(|i| (i * 37 + 11) % VERSIONS + 1)
            .map(|version| {
                let (store, name) = (store.clone(), ks.name.clone());
                tokio::spawn(async move {
                    let value = format!("v{version}");
                    let outcome = store.store(&name, b"k", value.as_bytes(), version).await;
                    (version, outcome)
                })
            })
            .collect();
        let mut highest_applied = false;
        for task in tasks {
            let (version, outcome) = task.await?;
            let outcome = outcome?;
            ensure!(
                outcome.version >= version,
                "{layout}: version {version} reported {outcome:?}"
            );
            if version == VERSIONS {
                highest_applied = outcome.applied;
            }
        }
        ensure!(highest_applied, "{layout}: the highest version was refused");
        ensure!(
            store.load(&ks.name, b"k").await? == present("v100", VERSIONS),
            "{layout}: the highest version did not win"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_layout_that_does_not_fit_the_database_is_refused_by_name() -> Result<()> {
    let missing = unique("pg_store_missing");
    let keyspace = unique("ks_missing");
    let store = PgStore::from_pool(pool().await?).with_layout(
        &keyspace,
        &StoreLayout::Table(TableLayout::new(missing.clone())),
    )?;
    let err = store
        .load(&keyspace, b"k")
        .await
        .err()
        .context("a load from a missing table succeeded")?;
    ensure!(!err.is_retryable(), "unexpected error {err:?}");
    let message = err.to_string();
    ensure!(
        message.contains(&keyspace) && message.contains(&missing),
        "the message does not name the keyspace and table: {message}"
    );
    Ok(())
}

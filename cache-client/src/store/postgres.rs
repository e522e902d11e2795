//! [`PgStore`]: the [`Store`] over PostgreSQL (sqlx).

use std::{
    collections::HashMap,
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::{
    Executor, PgConnection, PgPool, Postgres,
    postgres::{PgArguments, PgPoolOptions},
    query::{Query, QueryAs},
};
use tracing::warn;

use super::{
    Applied, Change, InDoubt, Loaded, Row, Store, StoreLayout, TxnId, db_version,
    sql::{Statements, TXN_TABLE, default_statements},
};
use crate::{Error, Result};

/// How long [`Store::prepare`] waits for a row locked by another
/// transaction (typically one prepared for the same key and not yet
/// resolved) before failing with a retryable error.
pub const DEFAULT_PREPARE_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// Bookkeeping rows without a prepared transaction (their process died
/// between recording the row and preparing) are forgotten by `in_doubt`
/// once at least this old, so that a prepare still under way keeps its row.
const ORPHAN_GRACE: Duration = Duration::from_secs(600);

/// What [`PgStore::prepared_transactions`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreparedTransactions {
    /// Prepared and not yet committed or rolled back.
    pub count: u64,
    /// Since the oldest of them was prepared (zero when there is none).
    pub oldest_age: Duration,
}

/// The [`Store`] over one PostgreSQL database.
///
/// One `PgStore` serves every keyspace of the database: each keyspace uses
/// the shared table ([`StoreLayout::Default`]) unless given another layout
/// with [`with_layout`](PgStore::with_layout). It is cheap to clone (a pool
/// handle and shared statements) and is usually shared as `Arc<dyn Store>`.
///
/// Run [`migrate`](PgStore::migrate) once (or apply
/// `cache-client/migrations/` your own way) before use: every layout needs
/// the two-phase-commit bookkeeping table, and the default layout its
/// table.
///
/// Two-phase commit needs a server with `max_prepared_transactions > 0`.
/// A transaction prepared and never resolved keeps its row locked: writes
/// to that key wait (`prepare` for at most the
/// [prepare lock timeout](PgStore::with_prepare_lock_timeout); `store` and
/// `delete` for the pool's `lock_timeout`, unlimited by default) until
/// recovery resolves it through [`Store::in_doubt`].
///
/// ```no_run
/// # async fn demo() -> cache_client::Result<()> {
/// use cache_client::store::{PgStore, Store, StoreLayout, TableLayout};
/// let store = PgStore::connect("postgres://app@db:5432/app")
///     .await?
///     .with_layout("users", &StoreLayout::Table(TableLayout::new("users")))?;
/// store.migrate().await?;
/// store.store("sessions", b"abc", b"{}", 1).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    default: Arc<Statements>,
    layouts: Arc<HashMap<String, Arc<Statements>>>,
    prepare_lock_timeout: Duration,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("layouts", &self.layouts.keys().collect::<Vec<_>>())
            .field("prepare_lock_timeout", &self.prepare_lock_timeout)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects a pool with sqlx's default options to `url` (e.g.
    /// `postgres://user@host:5432/db`).
    ///
    /// # Errors
    /// [`Error::Store`] when the server cannot be reached;
    /// [`Error::StoreRejected`] when the URL is invalid or the server refuses
    /// the login.
    pub async fn connect(url: &str) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .connect(url)
            .await
            .map_err(|err| classify("", format!("failed to connect to PostgreSQL: {err}"), &err))?;
        Ok(Self::from_pool(pool))
    }

    /// A store whose connections are opened when first needed, so that it
    /// can be created while PostgreSQL is down (calls fail until it is up).
    ///
    /// # Errors
    /// [`Error::StoreRejected`] when `url` is not a valid PostgreSQL URL.
    pub fn connect_lazy(url: &str) -> Result<Self> {
        let pool = PgPoolOptions::new()
            // A down server fails a call in seconds, not the 30 s default.
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect_lazy(url)
            .map_err(|err| Error::StoreRejected {
                keyspace: String::new(),
                message: format!("invalid PostgreSQL URL: {err}"),
            })?;
        Ok(Self::from_pool(pool))
    }

    /// A store over an existing pool (its options, e.g. `lock_timeout` or
    /// `statement_timeout` set per connection, apply to every statement).
    pub fn from_pool(pool: PgPool) -> Self {
        PgStore {
            pool,
            default: Arc::new(default_statements()),
            layouts: Arc::default(),
            prepare_lock_timeout: DEFAULT_PREPARE_LOCK_TIMEOUT,
        }
    }

    /// Stores `keyspace` with `layout` instead of the shared table. Two
    /// keyspaces given the same table share their keys.
    ///
    /// # Errors
    /// [`Error::StoreRejected`] when the layout is invalid (an identifier
    /// that is not one, equal column names, an empty statement); the message
    /// names the keyspace and the field. Whether the table and statements fit
    /// the database shows at first use.
    pub fn with_layout(
        mut self,
        keyspace: impl Into<String>,
        layout: &StoreLayout,
    ) -> Result<Self> {
        let keyspace = keyspace.into();
        let statements = Arc::new(layout.statements(&keyspace)?);
        Arc::make_mut(&mut self.layouts).insert(keyspace, statements);
        Ok(self)
    }

    /// How long `prepare` waits for a row locked by another transaction;
    /// default [`DEFAULT_PREPARE_LOCK_TIMEOUT`]. Rounded to milliseconds;
    /// zero waits forever.
    pub fn with_prepare_lock_timeout(mut self, timeout: Duration) -> Self {
        self.prepare_lock_timeout = timeout;
        self
    }

    /// Applies the crate's migrations (`cache-client/migrations/`): the
    /// shared table `ringcache_entries` and the bookkeeping table
    /// `ringcache_2pc`. Safe to run from many processes at once (sqlx takes
    /// an advisory lock) and again later.
    ///
    /// Migrations of other crates recorded in the same database
    /// (`_sqlx_migrations`) are tolerated; they must likewise tolerate these
    /// (sqlx's `set_ignore_missing(true)`).
    ///
    /// # Errors
    /// When the database fails, or a migration recorded as applied differs
    /// from this crate's.
    pub async fn migrate(&self) -> Result<()> {
        let mut migrator = sqlx::migrate!("./migrations");
        migrator.set_ignore_missing(true);
        migrator.run(&self.pool).await.map_err(|err| {
            let message = format!("failed to migrate the store tables: {err}");
            match &err {
                sqlx::migrate::MigrateError::Execute(inner)
                | sqlx::migrate::MigrateError::ExecuteMigration(inner, _) => {
                    classify("", message, inner)
                }
                _ => Error::StoreRejected {
                    keyspace: String::new(),
                    message,
                },
            }
        })
    }

    /// The pool this store runs on.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The two-phase-commit transactions of this crate's writers
    /// ([`TxnId::PREFIX`]) prepared in this store's database and not yet
    /// resolved: how many, and how long ago the oldest was prepared
    /// (PostgreSQL's clock; zero when there is none). Each holds its row
    /// locks and one of `max_prepared_transactions`, and holds back VACUUM.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn prepared_transactions(&self) -> Result<PreparedTransactions> {
        let (count, oldest): (i64, f64) = sqlx::query_as(
            "SELECT count(*), \
                    coalesce(extract(epoch FROM now() - min(prepared)), 0)::float8 \
             FROM pg_prepared_xacts \
             WHERE database = current_database() AND starts_with(gid, $1)",
        )
        .bind(TxnId::PREFIX)
        .fetch_one(&self.pool)
        .await
        .map_err(|err| {
            classify(
                "",
                format!("failed to count prepared transactions: {err}"),
                &err,
            )
        })?;
        Ok(PreparedTransactions {
            count: u64::try_from(count).unwrap_or_default(),
            oldest_age: Duration::from_secs_f64(oldest.max(0.0)),
        })
    }

    fn statements(&self, keyspace: &str) -> &Arc<Statements> {
        self.layouts.get(keyspace).unwrap_or(&self.default)
    }

    async fn write(
        &self,
        keyspace: &str,
        key: &[u8],
        value: Option<&[u8]>,
        version: u64,
    ) -> Result<Applied> {
        let db_version = db_version(keyspace, version)?;
        let st = self.statements(keyspace);
        let (sql, what) = match value {
            Some(_) => (&st.store, "store"),
            None => (&st.delete, "delete"),
        };
        let done = write_query(st, sql, keyspace, key, value, db_version)
            .execute(&self.pool)
            .await
            .map_err(|err| key_error(keyspace, st, what, &err))?;
        if done.rows_affected() > 0 {
            return Ok(Applied {
                applied: true,
                version,
            });
        }
        // Refused by the guard: report what won. Read after the write, so
        // at least the version that refused it (versions only grow).
        let row = load_query(st, keyspace, key)
            .fetch_optional(&self.pool)
            .await
            .map_err(|err| key_error(keyspace, st, "load", &err))?;
        Ok(Applied {
            applied: false,
            version: stored_version(loaded(keyspace, st, row)?),
        })
    }
}

#[async_trait]
impl Store for PgStore {
    async fn load(&self, keyspace: &str, key: &[u8]) -> Result<Loaded> {
        let st = self.statements(keyspace);
        let row = load_query(st, keyspace, key)
            .fetch_optional(&self.pool)
            .await
            .map_err(|err| key_error(keyspace, st, "load", &err))?;
        loaded(keyspace, st, row)
    }

    async fn store(
        &self,
        keyspace: &str,
        key: &[u8],
        value: &[u8],
        version: u64,
    ) -> Result<Applied> {
        self.write(keyspace, key, Some(value), version).await
    }

    async fn delete(&self, keyspace: &str, key: &[u8], version: u64) -> Result<Applied> {
        self.write(keyspace, key, None, version).await
    }

    async fn prepare(
        &self,
        txn: &TxnId,
        keyspace: &str,
        key: &[u8],
        change: Change<'_>,
        version: u64,
    ) -> Result<Applied> {
        db_version(keyspace, version)?;
        let job = PrepareJob {
            pool: self.pool.clone(),
            st: Arc::clone(self.statements(keyspace)),
            txn: txn.clone(),
            keyspace: keyspace.to_owned(),
            key: key.to_vec(),
            value: match change {
                Change::Put(value) => Some(value.to_vec()),
                Change::Delete => None,
            },
            version,
            lock_timeout: self.prepare_lock_timeout,
        };
        // Run to completion even if the caller stops waiting: dropped
        // between BEGIN and PREPARE, the session would go back to the pool
        // inside an open transaction. A caller that gives up may leave the
        // transaction prepared; `in_doubt` finds it.
        tokio::spawn(job.run()).await.map_err(|err| Error::Store {
            keyspace: keyspace.to_owned(),
            message: format!("keyspace {keyspace:?}: prepare of {txn} did not finish: {err}"),
        })?
    }

    async fn commit_prepared(&self, txn: &TxnId) -> Result<()> {
        self.resolve(txn, "COMMIT PREPARED", "commit").await?;
        forget(&self.pool, txn).await;
        Ok(())
    }

    async fn abort_prepared(&self, txn: &TxnId) -> Result<()> {
        self.resolve(txn, "ROLLBACK PREPARED", "rollback").await?;
        forget(&self.pool, txn).await;
        Ok(())
    }

    async fn in_doubt(&self, older_than: Duration) -> Result<Vec<InDoubt>> {
        let rows: Vec<(String, f64, Option<String>, Option<Vec<u8>>)> = sqlx::query_as(&format!(
            "SELECT p.gid, extract(epoch FROM p.prepared)::float8, s.keyspace, s.key \
             FROM pg_prepared_xacts p LEFT JOIN {TXN_TABLE} s ON s.gid = p.gid \
             WHERE p.database = current_database() AND starts_with(p.gid, $1) \
               AND p.prepared <= now() - make_interval(secs => $2) \
             ORDER BY p.prepared"
        ))
        .bind(TxnId::PREFIX)
        .bind(older_than.as_secs_f64())
        .fetch_all(&self.pool)
        .await
        .map_err(|err| {
            classify(
                "",
                format!("failed to list prepared transactions: {err}"),
                &err,
            )
        })?;

        let grace = older_than
            .max(ORPHAN_GRACE)
            .max(self.prepare_lock_timeout * 2);
        let purged = sqlx::query(&format!(
            "DELETE FROM {TXN_TABLE} s \
             WHERE s.created_at < now() - make_interval(secs => $1) \
               AND NOT EXISTS (SELECT 1 FROM pg_prepared_xacts p \
                               WHERE p.gid = s.gid AND p.database = current_database())"
        ))
        .bind(grace.as_secs_f64())
        .execute(&self.pool)
        .await;
        if let Err(err) = purged {
            warn!(table = TXN_TABLE, error = %err, "failed to forget orphaned bookkeeping rows");
        }

        Ok(rows
            .into_iter()
            .filter_map(|(gid, prepared, keyspace, key)| {
                let txn = match gid.parse::<TxnId>() {
                    Ok(txn) => txn,
                    Err(err) => {
                        warn!(%gid, error = %err, "skipping a prepared transaction with our prefix but an invalid id");
                        return None;
                    }
                };
                let prepared_at = SystemTime::UNIX_EPOCH
                    .checked_add(Duration::try_from_secs_f64(prepared).unwrap_or_default())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                Some(InDoubt {
                    txn,
                    prepared_at,
                    keyspace,
                    key: key.map(Bytes::from),
                })
            })
            .collect())
    }
}

impl PgStore {
    /// Runs `COMMIT PREPARED` or `ROLLBACK PREPARED` (outside any
    /// transaction, on any session of the database).
    async fn resolve(&self, txn: &TxnId, command: &str, what: &str) -> Result<()> {
        // A gid cannot be a bind parameter; `TxnId` only holds
        // `[A-Za-z0-9:_-]`, so the literal needs no escaping.
        let sql = format!("{command} '{}'", txn.as_str());
        match self.pool.execute(sqlx::raw_sql(&sql)).await {
            Ok(_) => Ok(()),
            Err(err) if is_undefined_object(&err) => {
                // Never prepared, or resolved by someone else: its
                // bookkeeping row (if any) is stale either way.
                forget(&self.pool, txn).await;
                Err(Error::TxnNotFound {
                    txn: txn.as_str().to_owned(),
                })
            }
            Err(err) => Err(classify(
                "",
                format!("prepared transaction {txn}: {what} failed: {err}"),
                &err,
            )),
        }
    }
}

/// Everything a prepare needs, owned, so that it runs as its own task.
struct PrepareJob {
    pool: PgPool,
    st: Arc<Statements>,
    txn: TxnId,
    keyspace: String,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
    version: u64,
    lock_timeout: Duration,
}

impl PrepareJob {
    async fn run(self) -> Result<Applied> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|err| key_error(&self.keyspace, &self.st, "prepare", &err))?;
        // Recorded and committed before the transaction begins, so that
        // recovery can name the key while the transaction is prepared (a row
        // written inside it would stay invisible until the commit). The
        // transaction never touches this row, so an id already in use fails
        // here at once, before anything else, instead of waiting on a lock.
        sqlx::query(&format!(
            "INSERT INTO {TXN_TABLE} (gid, keyspace, key) VALUES ($1, $2, $3)"
        ))
        .bind(self.txn.as_str())
        .bind(&self.keyspace)
        .bind(&self.key)
        .execute(&mut *conn)
        .await
        .map_err(|err| {
            let message = if is_unique_violation(&err) {
                format!("transaction id {} is already in use", self.txn)
            } else {
                format!("failed to record transaction {}: {err}", self.txn)
            };
            classify(
                &self.keyspace,
                format!("keyspace {:?}: {message}", self.keyspace),
                &err,
            )
        })?;

        let result = self.prepare_in_transaction(&mut conn).await;
        if !matches!(result, Ok(Applied { applied: true, .. })) {
            // Refused or failed: end the transaction (after a failed
            // PREPARE TRANSACTION it is already gone, and ROLLBACK only
            // warns).
            if let Err(err) = conn.execute(sqlx::raw_sql("ROLLBACK")).await {
                // The session may still be inside the transaction: never
                // hand it back to the pool.
                conn.close_on_drop();
                warn!(txn = %self.txn, error = %err, "rollback after a failed prepare failed");
            }
            forget(&self.pool, &self.txn).await;
        }
        result
    }

    async fn prepare_in_transaction(&self, conn: &mut PgConnection) -> Result<Applied> {
        let (keyspace, st) = (self.keyspace.as_str(), &*self.st);
        let err = |what: &str, err: sqlx::Error| key_error(keyspace, st, what, &err);
        let begin = format!(
            "BEGIN; SET LOCAL lock_timeout = {}",
            self.lock_timeout.as_millis()
        );
        conn.execute(sqlx::raw_sql(&begin))
            .await
            .map_err(|e| err("prepare", e))?;

        let sql = if self.value.is_some() {
            &st.store
        } else {
            &st.delete
        };
        // Checked by the caller before spawning.
        let db_version = db_version(keyspace, self.version)?;
        let done = write_query(
            st,
            sql,
            keyspace,
            &self.key,
            self.value.as_deref(),
            db_version,
        )
        .execute(&mut *conn)
        .await
        .map_err(|e| err("prepare", e))?;
        if done.rows_affected() == 0 {
            // Refused by the guard; the caller rolls back.
            let row = load_query(st, keyspace, &self.key)
                .fetch_optional(&mut *conn)
                .await
                .map_err(|e| err("load", e))?;
            return Ok(Applied {
                applied: false,
                version: stored_version(loaded(keyspace, st, row)?),
            });
        }

        let prepare = format!("PREPARE TRANSACTION '{}'", self.txn.as_str());
        conn.execute(sqlx::raw_sql(&prepare))
            .await
            .map_err(|e| err("prepare transaction", e))?;
        Ok(Applied {
            applied: true,
            version: self.version,
        })
    }
}

/// Deletes the bookkeeping row of `txn` once it is resolved (or was never
/// prepared), best effort: a leftover row is harmless (`in_doubt` ignores
/// rows without a prepared transaction and purges them later).
async fn forget(pool: &PgPool, txn: &TxnId) {
    let result = sqlx::query(&format!("DELETE FROM {TXN_TABLE} WHERE gid = $1"))
        .bind(txn.as_str())
        .execute(pool)
        .await;
    if let Err(err) = result {
        warn!(%txn, error = %err, "failed to delete the bookkeeping row of a transaction");
    }
}

type LoadRow = (Option<Vec<u8>>, i64);

fn load_query<'q>(
    st: &'q Statements,
    keyspace: &'q str,
    key: &'q [u8],
) -> QueryAs<'q, Postgres, LoadRow, PgArguments> {
    let query = sqlx::query_as(&st.load).bind(key);
    if st.with_keyspace {
        query.bind(keyspace)
    } else {
        query
    }
}

/// Binds key, value, version (and the keyspace last, for the shared table).
fn write_query<'q>(
    st: &Statements,
    sql: &'q str,
    keyspace: &'q str,
    key: &'q [u8],
    value: Option<&'q [u8]>,
    version: i64,
) -> Query<'q, Postgres, PgArguments> {
    let query = sqlx::query(sql).bind(key).bind(value).bind(version);
    if st.with_keyspace {
        query.bind(keyspace)
    } else {
        query
    }
}

fn loaded(keyspace: &str, st: &Statements, row: Option<LoadRow>) -> Result<Loaded> {
    let Some((value, version)) = row else {
        return Ok(Loaded::Absent { version: 0 });
    };
    let version = u64::try_from(version).map_err(|_| Error::StoreRejected {
        keyspace: keyspace.to_owned(),
        message: format!(
            "keyspace {keyspace:?} ({}): stored version {version} is negative",
            st.target
        ),
    })?;
    Ok(match value {
        Some(value) => Loaded::Present(Row {
            value: Bytes::from(value),
            version,
        }),
        None => Loaded::Absent { version },
    })
}

fn stored_version(loaded: Loaded) -> u64 {
    match loaded {
        Loaded::Present(row) => row.version,
        Loaded::Absent { version } => version,
    }
}

/// Whether `err` is `unique_violation`.
fn is_unique_violation(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => db.code().as_deref() == Some("23505"),
        _ => false,
    }
}

/// Whether `err` is `undefined_object`: COMMIT/ROLLBACK PREPARED of a gid
/// that is not prepared.
fn is_undefined_object(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => db.code().as_deref() == Some("42704"),
        _ => false,
    }
}

/// Whether the same statement may succeed later: connection and resource
/// trouble, serialization failures and deadlocks, lock and statement
/// timeouts, a server shutting down.
fn is_transient(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            ["08", "40", "53", "57", "58"]
                .iter()
                .any(|class| code.starts_with(class))
                // lock_not_available (lock_timeout), object_in_use
                || code == "55P03"
                || code == "55006"
        }),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

fn classify(keyspace: &str, message: String, err: &sqlx::Error) -> Error {
    let keyspace = keyspace.to_owned();
    if is_transient(err) {
        Error::Store { keyspace, message }
    } else {
        Error::StoreRejected { keyspace, message }
    }
}

fn key_error(keyspace: &str, st: &Statements, what: &str, err: &sqlx::Error) -> Error {
    classify(
        keyspace,
        format!(
            "keyspace {keyspace:?} ({}): {what} failed: {err}",
            st.target
        ),
        err,
    )
}

/// The write-back worker's batch: rows and consumed offsets in one
/// transaction.
mod write_back {
    use sqlx::{Connection, PgConnection};

    use super::{PgStore, classify, is_transient, key_error, write_query};
    use crate::{
        Error, Result,
        store::db_version,
        writeback::{BatchOutcome, PartitionOffset, WriteBackBatch, WriteBackRow},
    };

    /// The table of consumed offsets (`cache-client/migrations/`).
    const OFFSETS_TABLE: &str = "ringcache_wb_offsets";
    /// The table of dead-lettered writes (`cache-client/migrations/`).
    const DISCARDED_TABLE: &str = "ringcache_wb_discarded";

    /// How the rows of a batch are written.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Mode {
        /// One statement per keyspace (per row for custom statements); a
        /// row the store rejects aborts the transaction, and the batch is
        /// redone [`Careful`](Mode::Careful)ly.
        Fast,
        /// Each row inside a savepoint, so that every rejected row is
        /// found, not only the first.
        Careful,
    }

    /// Why a transaction did not commit without being an error.
    enum NotCommitted {
        /// A row was rejected in [`Mode::Fast`].
        RowRejected,
        /// A partition's offset moved under us, or rows were rejected in
        /// [`Mode::Careful`].
        Outcome(BatchOutcome),
    }

    impl PgStore {
        /// Applies one write-back batch in one transaction: every row as a
        /// version-guarded upsert or tombstone (each keyspace's layout, as
        /// [`Store::store`](super::Store::store) and
        /// [`Store::delete`](super::Store::delete) would, all rows of a
        /// keyspace in one statement unless its layout is custom
        /// statements), and every
        /// partition's next offset into `ringcache_wb_offsets`, for
        /// `batch.consumer_group`.
        ///
        /// # Consistency
        /// The batch is all or nothing: after a commit, the stored offsets
        /// say exactly which records are applied. If a partition's stored
        /// offset is not its `expected` one (another consumer took the
        /// partition and moved on), nothing is written and
        /// [`BatchOutcome::Fenced`] names the partition. If the store
        /// rejects rows for good (a version above `i64::MAX`, a value the
        /// table refuses), nothing is written and
        /// [`BatchOutcome::Rejected`] names every rejected row, so that the
        /// caller can retry, or set them aside and apply the rest.
        ///
        /// # Errors
        /// [`Error::Store`] when the database fails in a way that may pass
        /// (retry the whole batch); [`Error::StoreRejected`] when the
        /// bookkeeping tables are missing or broken (run
        /// [`migrate`](PgStore::migrate)).
        pub async fn apply_write_back_batch(&self, batch: &WriteBackBatch) -> Result<BatchOutcome> {
            match self.write_back_tx(batch, Mode::Fast).await? {
                Ok(outcome) | Err(NotCommitted::Outcome(outcome)) => Ok(outcome),
                Err(NotCommitted::RowRejected) => {
                    match self.write_back_tx(batch, Mode::Careful).await? {
                        Ok(outcome) | Err(NotCommitted::Outcome(outcome)) => Ok(outcome),
                        Err(NotCommitted::RowRejected) => {
                            unreachable!("careful mode collects rejected rows instead")
                        }
                    }
                }
            }
        }

        /// The offsets stored for `consumer_group`: where each partition's
        /// consumption resumes.
        ///
        /// # Errors
        /// When the database fails or the table is missing.
        pub async fn write_back_offsets(
            &self,
            consumer_group: &str,
        ) -> Result<Vec<PartitionOffset>> {
            let rows: Vec<(String, i32, i64)> = sqlx::query_as(&format!(
                "SELECT topic, kafka_partition, next_offset FROM {OFFSETS_TABLE} \
                 WHERE consumer_group = $1 ORDER BY topic, kafka_partition"
            ))
            .bind(consumer_group)
            .fetch_all(self.pool())
            .await
            .map_err(|err| classify("", format!("failed to read {OFFSETS_TABLE}: {err}"), &err))?;
            Ok(rows
                .into_iter()
                .map(|(topic, partition, next_offset)| PartitionOffset {
                    topic,
                    partition,
                    expected: Some(next_offset),
                    next_offset,
                })
                .collect())
        }

        /// Whether `version` of the key is a write the worker dead-lettered
        /// (recorded by [`apply_write_back_batch`](PgStore::apply_write_back_batch)
        /// from `WriteBackBatch::discarded`): one the store will never hold.
        ///
        /// # Errors
        /// When the database fails or the table is missing.
        pub async fn is_discarded_write(
            &self,
            keyspace: &str,
            key: &[u8],
            version: u64,
        ) -> Result<bool> {
            let Ok(version) = i64::try_from(version) else {
                return Ok(false);
            };
            let found: Option<i32> = sqlx::query_scalar(&format!(
                "SELECT 1 FROM {DISCARDED_TABLE} \
                 WHERE keyspace = $1 AND record_key = $2 AND version = $3"
            ))
            .bind(keyspace)
            .bind(key)
            .bind(version)
            .fetch_optional(self.pool())
            .await
            .map_err(|err| {
                classify(
                    keyspace,
                    format!("failed to read {DISCARDED_TABLE}: {err}"),
                    &err,
                )
            })?;
            Ok(found.is_some())
        }

        async fn write_back_tx(
            &self,
            batch: &WriteBackBatch,
            mode: Mode,
        ) -> Result<std::result::Result<BatchOutcome, NotCommitted>> {
            let bookkeeping = |what: &str, err: sqlx::Error| {
                classify("", format!("write-back batch: {what} failed: {err}"), &err)
            };
            let mut tx = self
                .pool()
                .begin()
                .await
                .map_err(|e| bookkeeping("begin", e))?;
            let group = batch.consumer_group.as_str();

            // Offsets first: the row lock serialises two consumers of one
            // partition, and the loser sees the winner's offset and stops
            // before writing anything.
            let update_sql = format!(
                "UPDATE {OFFSETS_TABLE} SET next_offset = $4, updated_at = now() \
                 WHERE consumer_group = $1 AND topic = $2 AND kafka_partition = $3 \
                   AND next_offset = $5"
            );
            let insert_sql = format!(
                "INSERT INTO {OFFSETS_TABLE} (consumer_group, topic, kafka_partition, next_offset) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING"
            );
            for offset in &batch.offsets {
                let done = match offset.expected {
                    Some(expected) => sqlx::query(&update_sql)
                        .bind(group)
                        .bind(&offset.topic)
                        .bind(offset.partition)
                        .bind(offset.next_offset)
                        .bind(expected),
                    None => sqlx::query(&insert_sql)
                        .bind(group)
                        .bind(&offset.topic)
                        .bind(offset.partition)
                        .bind(offset.next_offset),
                }
                .execute(&mut *tx)
                .await
                .map_err(|e| bookkeeping("offset update", e))?;
                if done.rows_affected() == 0 {
                    let stored: Option<i64> = sqlx::query_scalar(&format!(
                        "SELECT next_offset FROM {OFFSETS_TABLE} \
                         WHERE consumer_group = $1 AND topic = $2 AND kafka_partition = $3"
                    ))
                    .bind(group)
                    .bind(&offset.topic)
                    .bind(offset.partition)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| bookkeeping("offset read", e))?;
                    // Dropping `tx` rolls back.
                    return Ok(Err(NotCommitted::Outcome(BatchOutcome::Fenced {
                        topic: offset.topic.clone(),
                        partition: offset.partition,
                        stored,
                    })));
                }
            }

            if !batch.discarded.is_empty() {
                // With the offsets that skip them: a write is stored, on its
                // way, or listed here for the repair round to discard.
                let mut keyspaces = Vec::with_capacity(batch.discarded.len());
                let mut keys = Vec::with_capacity(batch.discarded.len());
                let mut versions = Vec::with_capacity(batch.discarded.len());
                for write in &batch.discarded {
                    keyspaces.push(write.keyspace.as_str());
                    keys.push(write.key.as_ref());
                    versions.push(db_version(&write.keyspace, write.version)?);
                }
                sqlx::query(&format!(
                    "INSERT INTO {DISCARDED_TABLE} (keyspace, record_key, version) \
                     SELECT * FROM UNNEST($1::text[], $2::bytea[], $3::bigint[]) \
                     ON CONFLICT DO NOTHING"
                ))
                .bind(keyspaces)
                .bind(keys)
                .bind(versions)
                .execute(&mut *tx)
                .await
                .map_err(|e| bookkeeping("discarded writes insert", e))?;
            }

            let (mut applied, mut stale) = (0, 0);
            let mut rejected = Vec::new();
            let mut one_by_one: Vec<&WriteBackRow> = Vec::new();
            if mode == Mode::Fast {
                // One statement per keyspace whose layout has one: a round
                // trip per batch instead of per row.
                let mut start = 0;
                while start < batch.rows.len() {
                    let keyspace = batch.rows[start].record.keyspace.as_str();
                    let end = start
                        + batch.rows[start..]
                            .iter()
                            .take_while(|row| row.record.keyspace == keyspace)
                            .count();
                    let rows = &batch.rows[start..end];
                    start = end;
                    match write_rows(self, &mut tx, keyspace, rows).await {
                        Ok(Some(written)) => {
                            applied += written;
                            stale += rows.len() - written;
                        }
                        Ok(None) => one_by_one.extend(rows),
                        Err(err) if err.is_retryable() => return Err(err),
                        Err(_) => return Ok(Err(NotCommitted::RowRejected)),
                    }
                }
            } else {
                one_by_one.extend(&batch.rows);
            }
            for row in one_by_one {
                match write_row(self, &mut tx, row, mode).await {
                    Ok(true) => applied += 1,
                    Ok(false) => stale += 1,
                    Err(err) if err.is_retryable() => return Err(err),
                    Err(_) if mode == Mode::Fast => {
                        return Ok(Err(NotCommitted::RowRejected));
                    }
                    Err(err) => rejected.push((row.source.clone(), err.to_string())),
                }
            }
            if !rejected.is_empty() {
                // Dropping `tx` rolls back: the caller decides what to do
                // with the rejected rows.
                return Ok(Err(NotCommitted::Outcome(BatchOutcome::Rejected {
                    rows: rejected,
                })));
            }
            tx.commit().await.map_err(|e| bookkeeping("commit", e))?;
            Ok(Ok(BatchOutcome::Committed { applied, stale }))
        }
    }

    /// Writes `rows`, all of `keyspace` and of distinct keys, in one
    /// statement; how many the version guard let through, or `None` when
    /// the keyspace's layout has no such statement (custom statements).
    async fn write_rows(
        store: &PgStore,
        conn: &mut PgConnection,
        keyspace: &str,
        rows: &[WriteBackRow],
    ) -> Result<Option<usize>> {
        let st = store.statements(keyspace);
        let Some(sql) = &st.upsert_many else {
            return Ok(None);
        };
        let mut keys = Vec::with_capacity(rows.len());
        let mut values = Vec::with_capacity(rows.len());
        let mut versions = Vec::with_capacity(rows.len());
        for row in rows {
            // Refused before any SQL runs, so the transaction stays usable.
            versions.push(db_version(keyspace, row.record.version)?);
            keys.push(row.record.key.as_ref());
            values.push(row.record.value.as_deref());
        }
        let mut query = sqlx::query(sql).bind(keys).bind(values).bind(versions);
        if st.with_keyspace {
            query = query.bind(keyspace);
        }
        let done = query.execute(&mut *conn).await.map_err(|err| {
            let message = format!(
                "keyspace {keyspace:?} ({}): store of {} rows failed: {err}",
                st.target,
                rows.len()
            );
            classify(keyspace, message, &err)
        })?;
        // At most one row per key: the keys are distinct.
        Ok(Some(done.rows_affected() as usize))
    }

    /// Writes one row; `Ok(false)` when the version guard refused it.
    async fn write_row(
        store: &PgStore,
        conn: &mut PgConnection,
        row: &WriteBackRow,
        mode: Mode,
    ) -> Result<bool> {
        let record = &row.record;
        let keyspace = record.keyspace.as_str();
        // Refused before any SQL runs, so the transaction stays usable.
        let version = db_version(keyspace, record.version)?;
        let st = store.statements(keyspace);
        let (sql, what) = match record.value {
            Some(_) => (&st.store, "store"),
            None => (&st.delete, "delete"),
        };
        let query = write_query(
            st,
            sql,
            keyspace,
            &record.key,
            record.value.as_deref(),
            version,
        );
        let done = match mode {
            Mode::Fast => query.execute(&mut *conn).await,
            Mode::Careful => {
                let mut savepoint = conn
                    .begin()
                    .await
                    .map_err(|err| key_error(keyspace, st, "savepoint", &err))?;
                let done = query.execute(&mut *savepoint).await;
                if done.is_ok() {
                    savepoint
                        .commit()
                        .await
                        .map_err(|err| key_error(keyspace, st, "release savepoint", &err))?;
                } else if let Err(err) = savepoint.rollback().await {
                    return Err(key_error(keyspace, st, "rollback to savepoint", &err));
                }
                done
            }
        };
        let done = done.map_err(|err| {
            if is_transient(&err) {
                key_error(keyspace, st, what, &err)
            } else {
                Error::StoreRejected {
                    keyspace: keyspace.to_owned(),
                    message: format!(
                        "keyspace {keyspace:?} ({}): {what} failed: {err}",
                        st.target
                    ),
                }
            }
        })?;
        Ok(done.rows_affected() > 0)
    }
}

//! The data layer behind a keyspace: what the caching strategies load from
//! and write to.
//!
//! - [`Store`]: the trait a keyspace's data layer implements; versioned
//!   loads, version-guarded writes and tombstones, and two-phase commit
//!   (`prepare` / `commit_prepared` / `abort_prepared`, plus `in_doubt` for
//!   recovery). Implement it for your own data layer, or use [`PgStore`].
//! - [`StoreLayout`]: where a keyspace's rows live in PostgreSQL (the shared
//!   table, a table of yours, or statements of yours), as written in the
//!   keyspace's TOML file.
//! - [`PgStore`] (feature `postgres`, on by default): the PostgreSQL store,
//!   one per database, with a layout per keyspace and its migrations in
//!   `cache-client/migrations/`.
//!
//! # Versions
//! Versions are `u64`s chosen by the writer (the client's hybrid logical
//! clock), never invented by the store. A write applies only when the key
//! has no row or a row with a lower version; a delete leaves a tombstone
//! with its version, so an older write that arrives late can never bring
//! the key back. Versions above `i64::MAX` are refused, since SQL stores
//! them as `BIGINT`.

use std::{fmt, str::FromStr, time::Duration, time::SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use crate::Result;

#[cfg(feature = "postgres")]
mod postgres;
pub mod sql;

#[cfg(feature = "postgres")]
pub use postgres::{DEFAULT_PREPARE_LOCK_TIMEOUT, PgStore, PreparedTransactions};
pub use sql::{
    DEFAULT_KEY_COLUMN, DEFAULT_TABLE, DEFAULT_VALUE_COLUMN, DEFAULT_VERSION_COLUMN, SqlLayout,
    StoreLayout, TableLayout,
};

/// What a keyspace's data layer offers the caching strategies.
///
/// Dyn-compatible (`Arc<dyn Store>`). Every method names the keyspace so
/// that one store can serve many keyspaces.
///
/// # Errors
/// Implementations return [`Error::Store`](crate::Error::Store) for
/// failures that may pass (connection, timeout, lock), and
/// [`Error::StoreRejected`](crate::Error::StoreRejected) for requests that
/// fail the same way every time (a version above `i64::MAX`, a broken
/// layout).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The stored value of `key` with its version, or that it does not exist
    /// (a tombstone, or no row at all) with the version it was deleted at.
    ///
    /// # Errors
    /// When the data layer fails or the stored row cannot be read.
    async fn load(&self, keyspace: &str, key: &[u8]) -> Result<Loaded>;

    /// Version-guarded upsert: applied only if no row exists or the stored
    /// version (of a value or a tombstone) is lower than `version`. Returns
    /// whether it applied and the version now stored.
    ///
    /// # Errors
    /// When `version` exceeds `i64::MAX` or the data layer fails.
    async fn store(
        &self,
        keyspace: &str,
        key: &[u8],
        value: &[u8],
        version: u64,
    ) -> Result<Applied>;

    /// Version-guarded delete, kept as a tombstone (no value, `version`) so
    /// that an older write can never resurrect the key. Deleting a key that
    /// has no row still leaves a tombstone.
    ///
    /// # Errors
    /// When `version` exceeds `i64::MAX` or the data layer fails.
    async fn delete(&self, keyspace: &str, key: &[u8], version: u64) -> Result<Applied>;

    /// Two-phase commit, phase one: does the version-guarded upsert or
    /// tombstone of `change` in a transaction and prepares it under `txn`.
    ///
    /// Returns `applied: true` when the change is prepared: it is invisible
    /// to readers, and holds the key's row, until
    /// [`commit_prepared`](Store::commit_prepared) or
    /// [`abort_prepared`](Store::abort_prepared). Returns `applied: false`
    /// with the stored version when the guard refused (a row at that version
    /// or newer exists); then nothing stays prepared.
    ///
    /// # Errors
    /// When the data layer refuses or fails (including a lock held by
    /// another prepared transaction on the same key); then nothing stays
    /// prepared.
    async fn prepare(
        &self,
        txn: &TxnId,
        keyspace: &str,
        key: &[u8],
        change: Change<'_>,
        version: u64,
    ) -> Result<Applied>;

    /// Two-phase commit, phase two: makes the prepared change of `txn`
    /// durable and visible.
    ///
    /// # Errors
    /// [`Error::TxnNotFound`](crate::Error::TxnNotFound) when no transaction
    /// is prepared under `txn` (already committed or aborted, or never
    /// prepared); a store error when the data layer fails, after which the
    /// transaction may or may not be committed: look it up with
    /// [`in_doubt`](Store::in_doubt) or retry.
    async fn commit_prepared(&self, txn: &TxnId) -> Result<()>;

    /// Two-phase commit, rollback: discards the prepared change of `txn`.
    ///
    /// # Errors
    /// [`Error::TxnNotFound`](crate::Error::TxnNotFound) when no transaction
    /// is prepared under `txn`; a store error when the data layer fails.
    async fn abort_prepared(&self, txn: &TxnId) -> Result<()>;

    /// The transactions this store prepared more than `older_than` ago and
    /// that are neither committed nor rolled back, oldest first, for a
    /// recovery task to resolve.
    ///
    /// # Errors
    /// When the data layer fails.
    async fn in_doubt(&self, older_than: Duration) -> Result<Vec<InDoubt>>;
}

/// A stored value with its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The value bytes.
    pub value: Bytes,
    /// The version the value was written with.
    pub version: u64,
}

/// What [`Store::load`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loaded {
    /// The key has a value.
    Present(Row),
    /// A tombstone or no row: the key does not exist (worth caching as a
    /// negative entry).
    Absent {
        /// The version of the tombstone; 0 when there is no row at all.
        version: u64,
    },
}

/// The outcome of a version-guarded write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Whether the write applied (or, for [`Store::prepare`], is prepared).
    pub applied: bool,
    /// The version now stored: the write's version when it applied, else
    /// the newer (or equal) version that made the guard refuse it; 0 when
    /// the row vanished meanwhile (only with user statements that delete
    /// rows).
    pub version: u64,
}

/// The change a [`Store::prepare`] prepares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change<'a> {
    /// Upsert this value.
    Put(&'a [u8]),
    /// Leave a tombstone.
    Delete,
}

/// The global id of a two-phase-commit transaction (PostgreSQL's gid):
/// `ringcache:` followed by up to 189 of `[A-Za-z0-9:_-]`.
///
/// The prefix is how [`Store::in_doubt`] tells this crate's transactions
/// from others prepared in the same database; the character set lets the
/// id be written as an SQL literal (a gid cannot be a bind parameter).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TxnId(String);

impl TxnId {
    /// The prefix every id starts with.
    pub const PREFIX: &'static str = "ringcache:";
    /// The longest id PostgreSQL accepts (its gids are under 200 bytes).
    pub const MAX_LEN: usize = 199;

    /// A fresh random id: the prefix and 128 random bits in hex.
    // Not `Default`: a random value is not a default.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        TxnId(format!("{}{:032x}", Self::PREFIX, rand::random::<u128>()))
    }

    /// The id as text, e.g. to log it or record it in a write-ahead log.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TxnId {
    type Err = InvalidTxnId;

    /// Parses an id written by [`TxnId::as_str`] (or made by you under the
    /// same rules).
    fn from_str(s: &str) -> std::result::Result<Self, InvalidTxnId> {
        let invalid = |reason: &str| InvalidTxnId {
            id: s.to_owned(),
            reason: reason.to_owned(),
        };
        if !s.starts_with(Self::PREFIX) || s.len() == Self::PREFIX.len() {
            return Err(invalid("it must be \"ringcache:\" and a non-empty suffix"));
        }
        if s.len() > Self::MAX_LEN {
            return Err(invalid("it is longer than 199 bytes"));
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'))
        {
            return Err(invalid(
                "only ASCII letters, digits, ':', '_' and '-' are allowed",
            ));
        }
        Ok(TxnId(s.to_owned()))
    }
}

/// A string that is not a valid [`TxnId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid transaction id {id:?}: {reason}")]
pub struct InvalidTxnId {
    id: String,
    reason: String,
}

/// A prepared transaction nobody committed or rolled back yet, as listed by
/// [`Store::in_doubt`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InDoubt {
    /// Its id: resolve it with [`Store::commit_prepared`] or
    /// [`Store::abort_prepared`].
    pub txn: TxnId,
    /// When it was prepared (by the store's clock).
    pub prepared_at: SystemTime,
    /// The keyspace it writes, when the store recorded it.
    pub keyspace: Option<String>,
    /// The key it writes, when the store recorded it (e.g. to invalidate the
    /// cached entry after resolving).
    pub key: Option<Bytes>,
}

/// Converts a version for a `BIGINT` column.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
fn db_version(keyspace: &str, version: u64) -> Result<i64> {
    i64::try_from(version).map_err(|_| crate::Error::StoreRejected {
        keyspace: keyspace.to_owned(),
        message: format!(
            "keyspace {keyspace:?}: version {version} exceeds the largest storable version ({})",
            i64::MAX
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_txn_ids_are_unique_and_parse_back() {
        let a = TxnId::new();
        let b = TxnId::new();
        assert_ne!(a, b);
        assert!(a.as_str().starts_with(TxnId::PREFIX));
        assert_eq!(a.as_str().parse::<TxnId>(), Ok(a));
    }

    #[test]
    fn txn_ids_that_cannot_be_sql_literals_are_refused() {
        for bad in [
            "",
            "ringcache:",
            "other:abc",
            "ringcache:it's",
            "ringcache:a b",
            "ringcache:é",
        ] {
            assert!(bad.parse::<TxnId>().is_err(), "{bad:?} was accepted");
        }
        let longest = format!("ringcache:{}", "a".repeat(TxnId::MAX_LEN - 10));
        assert!(longest.parse::<TxnId>().is_ok());
        assert!(format!("{longest}a").parse::<TxnId>().is_err());
    }

    #[test]
    fn versions_above_i64_max_are_refused() {
        assert_eq!(db_version("ks", i64::MAX as u64).ok(), Some(i64::MAX));
        let err = db_version("ks", i64::MAX as u64 + 1).unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("keyspace \"ks\""), "{err}");
    }
}

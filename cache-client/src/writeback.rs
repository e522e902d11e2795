//! The write-back record format: the contract between whoever queues a
//! write-back write on Kafka and the `write-back-worker` that applies it to
//! PostgreSQL. Pure: no I/O.
//!
//! # The contract
//! - **Topic**: one per keyspace, `ringcache-wb-<keyspace>`
//!   ([`topic_for`]).
//! - **Record key**: the keyspace's UTF-8 bytes, one `0x00` byte, then the
//!   key's bytes ([`WriteBackRecord::encode_key`]). The keyspace is in the
//!   key so that the default partitioner sends every write of one
//!   `(keyspace, key)` to one partition, where Kafka keeps them in order. A
//!   keyspace may therefore not contain `0x00`; the key may contain any
//!   byte.
//! - **Record value**: the raw value bytes. A Kafka tombstone (a null value)
//!   is a delete. An empty value is a value, not a delete.
//! - **Headers** ([`WriteBackRecord::headers`]):
//!   - `rc-version` (required): the write's version, 8 bytes, big-endian
//!     `u64` (the client's hybrid logical clock, see `crate::hlc`). The
//!     store applies a write only if its version is newer than the stored
//!     one, so replays and reordering across batches are harmless.
//!     Versions above `i64::MAX` cannot be stored and are dead-lettered.
//!   - `rc-written-at` (optional, 0 when absent): when the write was queued,
//!     8 bytes, big-endian `u64` milliseconds since the Unix epoch; the
//!     worker measures its lag with it.
//!   - `rc-replicas` (optional, 0 when absent): how many replicas the
//!     writer wrote the dirty entry to, 8 bytes, big-endian `u64`. The
//!     worker tells that many of the key's nodes (and one more, for a
//!     fallback) what it stored, whatever its own client's replication.
//!   - Other headers are ignored. A known header that appears twice, or has
//!     the wrong length, makes the record malformed.
//!
//! A record that does not follow this contract fails [`decode`] with a
//! [`DecodeError`]; the worker moves it to its dead-letter topic and goes
//! on.
//!
//! Beside the format, this module holds the plain data the worker hands to
//! `PgStore::apply_write_back_batch` (with the `postgres` feature):
//! [`WriteBackBatch`] and what it returns, [`BatchOutcome`].

use bytes::Bytes;

/// The prefix of every write-back topic.
pub const TOPIC_PREFIX: &str = "ringcache-wb-";
/// The header holding the version (required).
pub const HEADER_VERSION: &str = "rc-version";
/// The header holding the time the write was queued (optional).
pub const HEADER_WRITTEN_AT: &str = "rc-written-at";
/// The header holding the writer's replica count (optional).
pub const HEADER_REPLICAS: &str = "rc-replicas";
/// The byte between the keyspace and the key in a record key.
pub const KEY_SEPARATOR: u8 = 0x00;

/// The topic that carries `keyspace`'s write-back writes.
pub fn topic_for(keyspace: &str) -> String {
    format!("{TOPIC_PREFIX}{keyspace}")
}

/// The keyspace a write-back topic carries, or `None` when `topic` is not
/// one.
pub fn keyspace_of(topic: &str) -> Option<&str> {
    topic
        .strip_prefix(TOPIC_PREFIX)
        .filter(|keyspace| !keyspace.is_empty())
}

/// One queued write-back write (or delete).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteBackRecord {
    /// The keyspace; never contains `0x00`.
    pub keyspace: String,
    /// The key.
    pub key: Bytes,
    /// The write's version.
    pub version: u64,
    /// The value, or `None` for a delete (a Kafka tombstone).
    pub value: Option<Bytes>,
    /// When the write was queued, in milliseconds since the Unix epoch (0
    /// when unknown).
    pub written_at_ms: u64,
    /// How many replicas the writer wrote the dirty entry to (0 when
    /// unknown: the worker then uses its own view of the keyspace).
    pub replicas: u64,
}

impl WriteBackRecord {
    /// The Kafka record key: keyspace, `0x00`, key.
    pub fn encode_key(&self) -> Vec<u8> {
        debug_assert!(
            !self.keyspace.as_bytes().contains(&KEY_SEPARATOR),
            "a keyspace never contains the key separator"
        );
        let mut out = Vec::with_capacity(self.keyspace.len() + 1 + self.key.len());
        out.extend_from_slice(self.keyspace.as_bytes());
        out.push(KEY_SEPARATOR);
        out.extend_from_slice(&self.key);
        out
    }

    /// The Kafka headers: `rc-version`, `rc-written-at` and `rc-replicas`.
    pub fn headers(&self) -> [(&'static str, [u8; 8]); 3] {
        [
            (HEADER_VERSION, self.version.to_be_bytes()),
            (HEADER_WRITTEN_AT, self.written_at_ms.to_be_bytes()),
            (HEADER_REPLICAS, self.replicas.to_be_bytes()),
        ]
    }

    /// The Kafka topic of this record ([`topic_for`] of its keyspace).
    pub fn topic(&self) -> String {
        topic_for(&self.keyspace)
    }
}

/// Why a Kafka record is not a valid [`WriteBackRecord`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The record key has no `0x00` between keyspace and key.
    #[error("record key has no 0x00 separator between keyspace and key")]
    MissingSeparator,
    /// The keyspace part of the record key is empty.
    #[error("record key has an empty keyspace")]
    EmptyKeyspace,
    /// The keyspace part of the record key is not UTF-8.
    #[error("record key's keyspace is not UTF-8")]
    KeyspaceNotUtf8,
    /// The required `rc-version` header is absent.
    #[error("header rc-version is missing")]
    MissingVersion,
    /// A known header has no value or not exactly 8 bytes.
    #[error("header {header} has {len} bytes, expected 8")]
    BadHeaderLength {
        /// The header.
        header: &'static str,
        /// Its length (0 for a null header value).
        len: usize,
    },
    /// A known header appears more than once.
    #[error("header {header} appears more than once")]
    DuplicateHeader {
        /// The header.
        header: &'static str,
    },
}

/// Decodes a Kafka record (its key, value and headers) into a
/// [`WriteBackRecord`].
///
/// # Errors
/// A [`DecodeError`] naming what breaks the contract (see the module docs).
pub fn decode<'a>(
    key: &[u8],
    value: Option<&[u8]>,
    headers: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>,
) -> Result<WriteBackRecord, DecodeError> {
    let split = key
        .iter()
        .position(|&b| b == KEY_SEPARATOR)
        .ok_or(DecodeError::MissingSeparator)?;
    let (keyspace, rest) = key.split_at(split);
    if keyspace.is_empty() {
        return Err(DecodeError::EmptyKeyspace);
    }
    let keyspace = std::str::from_utf8(keyspace).map_err(|_| DecodeError::KeyspaceNotUtf8)?;

    let mut version = None;
    let mut written_at = None;
    let mut replicas = None;
    for (name, bytes) in headers {
        let (slot, header) = match name {
            HEADER_VERSION => (&mut version, HEADER_VERSION),
            HEADER_WRITTEN_AT => (&mut written_at, HEADER_WRITTEN_AT),
            HEADER_REPLICAS => (&mut replicas, HEADER_REPLICAS),
            _ => continue,
        };
        if slot.is_some() {
            return Err(DecodeError::DuplicateHeader { header });
        }
        *slot = Some(be_u64(header, bytes)?);
    }

    Ok(WriteBackRecord {
        keyspace: keyspace.to_owned(),
        // `rest` starts with the separator.
        key: Bytes::copy_from_slice(&rest[1..]),
        version: version.ok_or(DecodeError::MissingVersion)?,
        value: value.map(Bytes::copy_from_slice),
        written_at_ms: written_at.unwrap_or(0),
        replicas: replicas.unwrap_or(0),
    })
}

fn be_u64(header: &'static str, bytes: Option<&[u8]>) -> Result<u64, DecodeError> {
    let bytes = bytes.unwrap_or_default();
    let array: [u8; 8] = bytes.try_into().map_err(|_| DecodeError::BadHeaderLength {
        header,
        len: bytes.len(),
    })?;
    Ok(u64::from_be_bytes(array))
}

/// Where a Kafka record came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordSource {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The record's offset.
    pub offset: i64,
}

/// A decoded record to apply, with where it came from (to dead-letter it if
/// the store rejects it for good).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteBackRow {
    /// The write.
    pub record: WriteBackRecord,
    /// Its Kafka record.
    pub source: RecordSource,
}

/// How far one partition was consumed: stored with the rows of the batch,
/// in the same transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOffset {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The next offset the consumer believes is stored (`None`: no row);
    /// the batch commits only if it still is, which fences a consumer that
    /// lost the partition to another one.
    pub expected: Option<i64>,
    /// The offset of the first record not in this batch.
    pub next_offset: i64,
}

/// What `PgStore::apply_write_back_batch` writes in one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBackBatch {
    /// The Kafka consumer group whose offsets these are.
    pub consumer_group: String,
    /// Version-guarded upserts and tombstones, at most one per
    /// `(keyspace, key)`.
    pub rows: Vec<WriteBackRow>,
    /// The new offset of every partition the batch read from.
    pub offsets: Vec<PartitionOffset>,
    /// Writes of the batch that were dead-lettered and will never be
    /// stored, recorded in `ringcache_wb_discarded` in the same transaction
    /// as the offsets, so that the worker's repair round can discard their
    /// dirty cache entries.
    pub discarded: Vec<DiscardedWrite>,
}

/// A write-back write the worker will never store (its record is on the
/// dead-letter topic).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscardedWrite {
    /// The keyspace.
    pub keyspace: String,
    /// The key.
    pub key: Bytes,
    /// The write's version.
    pub version: u64,
}

/// What applying a [`WriteBackBatch`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// The transaction committed.
    Committed {
        /// Rows written (newer than what was stored).
        applied: usize,
        /// Rows the version guard refused (the store had that version or a
        /// newer one): replays, or writes overtaken by another path.
        stale: usize,
    },
    /// Nothing was written: the store rejected these rows for a reason
    /// that retrying the same statement does not change (a version above
    /// `i64::MAX`, a value the table refuses), each with the reason.
    Rejected {
        /// The rejected rows' Kafka records and why each was rejected.
        rows: Vec<(RecordSource, String)>,
    },
    /// Nothing was written: a partition's stored offset is not the batch's
    /// `expected`, so another consumer has consumed it since.
    Fenced {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The offset stored now.
        stored: Option<i64>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(value: Option<&'static [u8]>) -> WriteBackRecord {
        WriteBackRecord {
            keyspace: "users".to_owned(),
            key: Bytes::from_static(b"a\0b"),
            version: 0x0102_0304_0506_0708,
            value: value.map(Bytes::from_static),
            written_at_ms: 1_700_000_000_000,
            replicas: 2,
        }
    }

    fn round_trip(record: &WriteBackRecord) -> Result<WriteBackRecord, DecodeError> {
        let key = record.encode_key();
        let headers = record.headers();
        decode(
            &key,
            record.value.as_deref(),
            headers.iter().map(|(n, v)| (*n, Some(&v[..]))),
        )
    }

    #[test]
    fn topics_name_their_keyspace() {
        assert_eq!(topic_for("users"), "ringcache-wb-users");
        assert_eq!(keyspace_of("ringcache-wb-users"), Some("users"));
        assert_eq!(keyspace_of("ringcache-wb-"), None);
        assert_eq!(keyspace_of("other"), None);
    }

    #[test]
    fn encodes_the_documented_bytes() {
        let r = record(Some(b"v"));
        assert_eq!(r.encode_key(), b"users\0a\0b");
        let [(version, v), (written, w), (replicas, n)] = r.headers();
        assert_eq!((version, v), ("rc-version", [1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(written, "rc-written-at");
        assert_eq!(u64::from_be_bytes(w), 1_700_000_000_000);
        assert_eq!((replicas, u64::from_be_bytes(n)), ("rc-replicas", 2));
    }

    #[test]
    fn values_tombstones_and_empty_values_round_trip() {
        for value in [Some(&b"hello"[..]), None, Some(&b""[..])] {
            let r = record(value);
            assert_eq!(round_trip(&r), Ok(r));
        }
    }

    #[test]
    fn the_key_splits_at_the_first_separator() {
        let decoded = decode(
            b"ks\0\0",
            None,
            [("rc-version", Some(&[0u8, 0, 0, 0, 0, 0, 0, 9][..]))].into_iter(),
        )
        .unwrap();
        assert_eq!(decoded.keyspace, "ks");
        assert_eq!(&decoded.key[..], b"\0");
        assert_eq!(decoded.version, 9);
        assert_eq!(decoded.written_at_ms, 0, "rc-written-at is optional");
        assert_eq!(decoded.replicas, 0, "rc-replicas is optional");
    }

    #[test]
    fn malformed_records_are_refused() {
        let v = [0u8; 8];
        let version = || [("rc-version", Some(&v[..]))].into_iter();
        assert_eq!(
            decode(b"nokey", None, version()),
            Err(DecodeError::MissingSeparator)
        );
        assert_eq!(
            decode(b"\0key", None, version()),
            Err(DecodeError::EmptyKeyspace)
        );
        assert_eq!(
            decode(b"\xff\0key", None, version()),
            Err(DecodeError::KeyspaceNotUtf8)
        );
        assert_eq!(
            decode(b"ks\0key", None, std::iter::empty()),
            Err(DecodeError::MissingVersion)
        );
        assert_eq!(
            decode(
                b"ks\0key",
                None,
                [("rc-version", Some(&v[..4]))].into_iter()
            ),
            Err(DecodeError::BadHeaderLength {
                header: "rc-version",
                len: 4
            })
        );
        assert_eq!(
            decode(
                b"ks\0key",
                None,
                [("rc-written-at", None), ("rc-version", Some(&v[..]))].into_iter()
            ),
            Err(DecodeError::BadHeaderLength {
                header: "rc-written-at",
                len: 0
            })
        );
        assert_eq!(
            decode(b"ks\0key", None, version().chain(version())),
            Err(DecodeError::DuplicateHeader {
                header: "rc-version"
            })
        );
        // Unknown headers are ignored.
        assert!(decode(b"ks\0key", None, version().chain([("x", None)])).is_ok());
    }
}

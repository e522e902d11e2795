//! The dead-letter topic's format: the names the write-back worker writes
//! and `cachectl dlq` reads, and what a replay sends back. Pure: no I/O.
//!
//! # The dead-letter record
//! - **Key, value**: the original write-back record's key and value,
//!   unchanged (a tombstone stays a tombstone).
//! - **Headers**: the original headers, in order, then:
//!   - `rc-dlq-reason`: why it cannot be stored (UTF-8 text);
//!   - `rc-dlq-topic`, `rc-dlq-partition`, `rc-dlq-offset`: where it came
//!     from (partition and offset in decimal);
//!   - `rc-dlq-group`: the consumer group of the worker that moved it;
//!   - `rc-dlq-attempts`: the batch attempts the database refused it in
//!     (decimal; 0 for a record that could not even be decoded);
//!   - `rc-dlq-at`: when it was moved, milliseconds since the Unix epoch
//!     (decimal).
//!
//! The topic is at least once: a record may appear twice, with the same
//! `rc-dlq-topic`/`-partition`/`-offset`.
//!
//! # Replay
//! [`DeadLetterRecord::replay`] gives the record to produce again to the
//! write-back topic it came from: the original key and value, the original
//! headers without the `rc-dlq-*` ones and without `rc-written-at` (a
//! replay is not a new write: left out, the worker's lag measures do not
//! count it), and `rc-replayed-from` naming the dead letter. The worker
//! applies it like any record, through the store's version guard: a replay
//! never overwrites a newer row, and replaying twice stores once.

use bytes::Bytes;

use crate::writeback::{self, DecodeError, HEADER_WRITTEN_AT, KEY_SEPARATOR, WriteBackRecord};

/// The dead-letter topic of a worker that does not name one.
pub const DEFAULT_TOPIC: &str = "ringcache-dead-letters";
/// The prefix of the headers the worker adds.
pub const HEADER_PREFIX: &str = "rc-dlq-";
/// Header: why the record cannot be stored.
pub const HEADER_REASON: &str = "rc-dlq-reason";
/// Header: the record's original topic.
pub const HEADER_TOPIC: &str = "rc-dlq-topic";
/// Header: the record's original partition, in decimal.
pub const HEADER_PARTITION: &str = "rc-dlq-partition";
/// Header: the record's original offset, in decimal.
pub const HEADER_OFFSET: &str = "rc-dlq-offset";
/// Header: the consumer group of the worker that moved it.
pub const HEADER_GROUP: &str = "rc-dlq-group";
/// Header: the batch attempts the database refused the record in.
pub const HEADER_ATTEMPTS: &str = "rc-dlq-attempts";
/// Header: when it was moved, milliseconds since the Unix epoch.
pub const HEADER_AT: &str = "rc-dlq-at";
/// Header of a replayed record: the dead letter it came from, as
/// `<dead-letter topic>/<partition>/<offset>` (ignored by the worker).
pub const HEADER_REPLAYED_FROM: &str = "rc-replayed-from";

/// One record read from the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRecord {
    /// The dead-letter topic's partition it is on.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// The record key (keyspace, `0x00`, key, for a write-back record).
    pub key: Option<Bytes>,
    /// The record value (`None` for a tombstone).
    pub value: Option<Bytes>,
    /// Every header, in order.
    pub headers: Vec<(String, Option<Bytes>)>,
}

/// Which dead letters a list or a replay takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this keyspace.
    pub keyspace: Option<String>,
    /// Only keys starting with these bytes.
    pub key_prefix: Option<Bytes>,
}

/// A record to produce again: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// The write-back topic it came from.
    pub topic: String,
    /// The original record key.
    pub key: Bytes,
    /// The original value (`None`: a delete).
    pub value: Option<Bytes>,
    /// The headers to send (see the module docs).
    pub headers: Vec<(String, Option<Bytes>)>,
    /// The write it carries.
    pub record: WriteBackRecord,
}

impl DeadLetterRecord {
    /// The first header called `name`, as text (lossy UTF-8).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// Why the worker could not store it.
    pub fn reason(&self) -> Option<String> {
        self.header(HEADER_REASON)
    }

    /// The keyspace and key of its record key, when it has the shape of a
    /// write-back key (even if the record is otherwise malformed).
    pub fn keyspace_and_key(&self) -> Option<(&str, &[u8])> {
        let key = self.key.as_deref()?;
        let split = key.iter().position(|&b| b == KEY_SEPARATOR)?;
        let keyspace = std::str::from_utf8(&key[..split]).ok()?;
        Some((keyspace, &key[split + 1..])).filter(|(ks, _)| !ks.is_empty())
    }

    /// The original headers: every header but the `rc-dlq-*` ones.
    fn original_headers(&self) -> impl Iterator<Item = &(String, Option<Bytes>)> {
        self.headers
            .iter()
            .filter(|(name, _)| !name.starts_with(HEADER_PREFIX))
    }

    /// The write-back write it carries.
    ///
    /// # Errors
    /// The [`DecodeError`] of a record that breaks the write-back contract
    /// (such a dead letter cannot be replayed).
    pub fn record(&self) -> Result<WriteBackRecord, DecodeError> {
        writeback::decode(
            self.key.as_deref().unwrap_or_default(),
            self.value.as_deref(),
            self.original_headers()
                .map(|(name, value)| (name.as_str(), value.as_deref())),
        )
    }

    /// Whether `filter` takes it. A filter on keyspace or key never takes
    /// a dead letter whose key is not a write-back key.
    pub fn matches(&self, filter: &Filter) -> bool {
        if filter.keyspace.is_none() && filter.key_prefix.is_none() {
            return true;
        }
        let Some((keyspace, key)) = self.keyspace_and_key() else {
            return false;
        };
        filter.keyspace.as_deref().is_none_or(|k| k == keyspace)
            && filter
                .key_prefix
                .as_deref()
                .is_none_or(|prefix| key.starts_with(prefix))
    }

    /// The record to produce again to replay it; `dead_letter_topic` is the
    /// topic it was read from (for `rc-replayed-from`).
    ///
    /// # Errors
    /// As [`record`](DeadLetterRecord::record).
    pub fn replay(&self, dead_letter_topic: &str) -> Result<Replay, DecodeError> {
        let record = self.record()?;
        // The keyspace's topic, as the contract says: where the record
        // came from (`rc-dlq-topic`), and where its key's partition keeps
        // its writes in order.
        let topic = record.topic();
        let mut headers: Vec<(String, Option<Bytes>)> = self
            .original_headers()
            .filter(|(name, _)| name != HEADER_WRITTEN_AT && name != HEADER_REPLAYED_FROM)
            .cloned()
            .collect();
        headers.push((
            HEADER_REPLAYED_FROM.to_owned(),
            Some(Bytes::from(format!(
                "{dead_letter_topic}/{}/{}",
                self.partition, self.offset
            ))),
        ));
        Ok(Replay {
            topic,
            key: self.key.clone().unwrap_or_default(),
            value: self.value.clone(),
            headers,
            record,
        })
    }
}

/// Every header of a Kafka record, in order, owned: how the worker and the
/// dead-letter tools hold them.
#[cfg(feature = "kafka")]
pub fn owned_headers(message: &impl rdkafka::Message) -> Vec<(String, Option<Bytes>)> {
    use rdkafka::message::Headers as _;
    message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| (h.key.to_owned(), h.value.map(Bytes::copy_from_slice)))
                .collect()
        })
        .unwrap_or_default()
}

/// Every record of `topic` up to its high watermarks as of the call, in
/// (partition, offset) order; empty when the topic does not exist. It
/// assigns the partitions itself: `group` only names the reader to the
/// broker, and nothing is committed. Blocking (librdkafka polls): call it
/// from `spawn_blocking` in async code. Shared by `cachectl dlq` and the
/// tests.
///
/// # Errors
/// [`Error::Store`] when the broker cannot be read, or a partition is not
/// read to its end within `timeout`.
#[cfg(feature = "kafka")]
pub fn read_topic(
    brokers: &str,
    topic: &str,
    group: &str,
    timeout: std::time::Duration,
) -> crate::Result<Vec<DeadLetterRecord>> {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use rdkafka::{
        ClientConfig, Message, Offset, TopicPartitionList,
        consumer::{BaseConsumer, Consumer},
    };

    let failed = |what: String| crate::Error::Store {
        keyspace: String::new(),
        message: format!("topic {topic}: {what}"),
    };
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        // Required by librdkafka; nothing is committed (assign, no
        // subscribe, no commit).
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()
        .map_err(|e| failed(format!("cannot create a Kafka consumer: {e}")))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| failed(format!("cannot read its metadata from {brokers}: {e}")))?;
    let Some(meta) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(Vec::new());
    };
    if meta.error().is_some() || meta.partitions().is_empty() {
        return Ok(Vec::new());
    }
    let mut ends = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for partition in meta.partitions() {
        let id = partition.id();
        let (low, high) = consumer
            .fetch_watermarks(topic, id, timeout)
            .map_err(|e| failed(format!("cannot read the watermarks of partition {id}: {e}")))?;
        if high > low {
            ends.insert(id, high);
            assignment
                .add_partition_offset(topic, id, Offset::Offset(low))
                .map_err(|e| failed(e.to_string()))?;
        }
    }
    let mut letters = Vec::new();
    if ends.is_empty() {
        return Ok(letters);
    }
    consumer
        .assign(&assignment)
        .map_err(|e| failed(e.to_string()))?;
    let deadline = std::time::Instant::now() + timeout;
    while !ends.is_empty() {
        if std::time::Instant::now() >= deadline {
            return Err(failed(format!(
                "timed out: partitions {ends:?} not read to their end"
            )));
        }
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.map_err(|e| failed(format!("cannot read it: {e}")))?;
        let partition = message.partition();
        let Some(&end) = ends.get(&partition) else {
            continue;
        };
        if message.offset() < end {
            letters.push(DeadLetterRecord {
                partition,
                offset: message.offset(),
                key: message.key().map(Bytes::copy_from_slice),
                value: message.payload().map(Bytes::copy_from_slice),
                headers: owned_headers(&message),
            });
        }
        if message.offset() + 1 >= end {
            ends.remove(&partition);
        }
    }
    letters.sort_by_key(|l| (l.partition, l.offset));
    Ok(letters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writeback::{HEADER_REPLICAS, HEADER_VERSION};

    fn letter(key: &[u8], extra: &[(&str, &[u8])]) -> DeadLetterRecord {
        let mut headers = vec![
            (
                HEADER_VERSION.to_owned(),
                Some(Bytes::copy_from_slice(&7u64.to_be_bytes())),
            ),
            (
                HEADER_WRITTEN_AT.to_owned(),
                Some(Bytes::copy_from_slice(&99u64.to_be_bytes())),
            ),
            (
                HEADER_REPLICAS.to_owned(),
                Some(Bytes::copy_from_slice(&2u64.to_be_bytes())),
            ),
            ("traceparent".to_owned(), Some(Bytes::from_static(b"00-ab"))),
        ];
        headers.extend(
            extra
                .iter()
                .map(|(n, v)| ((*n).to_owned(), Some(Bytes::copy_from_slice(v)))),
        );
        DeadLetterRecord {
            partition: 0,
            offset: 12,
            key: Some(Bytes::copy_from_slice(key)),
            value: Some(Bytes::from_static(b"value")),
            headers,
        }
    }

    fn moved(key: &[u8]) -> DeadLetterRecord {
        letter(
            key,
            &[
                (HEADER_REASON, b"check constraint"),
                (HEADER_TOPIC, b"ringcache-wb-users"),
                (HEADER_PARTITION, b"1"),
                (HEADER_OFFSET, b"40"),
                (HEADER_ATTEMPTS, b"3"),
            ],
        )
    }

    #[test]
    fn a_replay_keeps_the_write_and_drops_the_dead_letter_headers() {
        let replay = moved(b"users\0alice").replay("dlq").unwrap();
        assert_eq!(replay.topic, "ringcache-wb-users");
        assert_eq!(&replay.key[..], b"users\0alice");
        assert_eq!(replay.value.as_deref(), Some(&b"value"[..]));
        let names: Vec<&str> = replay.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                HEADER_VERSION,
                HEADER_REPLICAS,
                "traceparent",
                HEADER_REPLAYED_FROM
            ]
        );
        assert_eq!(replay.headers[3].1.as_deref(), Some(&b"dlq/0/12"[..]));
        assert_eq!(replay.record.version, 7);
        assert_eq!(replay.record.replicas, 2);
        // The replayed record decodes as the same write, without the
        // queueing time.
        let again = writeback::decode(
            &replay.key,
            replay.value.as_deref(),
            replay
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_deref())),
        )
        .unwrap();
        assert_eq!(again.written_at_ms, 0);
        assert_eq!(
            (again.keyspace, again.key, again.version),
            ("users".to_owned(), Bytes::from_static(b"alice"), 7)
        );
    }

    #[test]
    fn a_replay_goes_to_the_keyspaces_topic_whatever_the_source_header_says() {
        let mut letter = moved(b"orders\0o-1");
        // `moved` says it came from ringcache-wb-users.
        assert_eq!(letter.replay("dlq").unwrap().topic, "ringcache-wb-orders");
        letter.headers.retain(|(n, _)| n != HEADER_TOPIC);
        assert_eq!(letter.replay("dlq").unwrap().topic, "ringcache-wb-orders");
    }

    #[test]
    fn a_malformed_dead_letter_is_listed_but_not_replayable() {
        let no_separator = moved(b"garbage");
        assert_eq!(
            no_separator.replay("dlq"),
            Err(DecodeError::MissingSeparator)
        );
        assert_eq!(no_separator.keyspace_and_key(), None);
        let mut no_version = moved(b"users\0bob");
        no_version.headers.retain(|(n, _)| n != HEADER_VERSION);
        assert_eq!(no_version.record(), Err(DecodeError::MissingVersion));
        assert_eq!(no_version.keyspace_and_key(), Some(("users", &b"bob"[..])));
        assert_eq!(no_version.reason().as_deref(), Some("check constraint"));
    }

    #[test]
    fn filters_take_keyspace_and_key_prefix() {
        let letter = moved(b"users\0alice");
        let filter = |keyspace: Option<&str>, prefix: Option<&'static str>| Filter {
            keyspace: keyspace.map(str::to_owned),
            key_prefix: prefix.map(|p| Bytes::from_static(p.as_bytes())),
        };
        assert!(letter.matches(&Filter::default()));
        assert!(letter.matches(&filter(Some("users"), None)));
        assert!(!letter.matches(&filter(Some("orders"), None)));
        assert!(letter.matches(&filter(Some("users"), Some("al"))));
        assert!(letter.matches(&filter(None, Some(""))));
        assert!(!letter.matches(&filter(None, Some("bo"))));
        assert!(!moved(b"garbage").matches(&filter(None, Some(""))));
        assert!(moved(b"garbage").matches(&Filter::default()));
    }
}

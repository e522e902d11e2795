//! Turning polled Kafka records into one [`WriteBackBatch`]: decoding,
//! dead-lettering what can never be applied, coalescing writes of one key
//! (keeping the older ones as fallbacks), and the next offset of every
//! partition. Pure.

use std::collections::HashMap;

use bytes::Bytes;
use cache_client::writeback::{
    PartitionOffset, RecordSource, WriteBackBatch, WriteBackRecord, WriteBackRow, decode,
    keyspace_of,
};

use crate::dead_letter::DeadLetter;

/// A Kafka record as the polling thread hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Polled {
    pub source: RecordSource,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(String, Option<Bytes>)>,
}

/// The stored offset each assigned partition started from or was last
/// committed at, by `(topic, partition)`; `None` when nothing is stored.
pub(crate) type Expected = HashMap<(String, i32), Option<i64>>;

/// Older writes of a key in a batch, newest first, by `(keyspace, key)`.
pub(crate) type Fallbacks = HashMap<(String, Bytes), Vec<WriteBackRow>>;

/// A batch and what building it counted.
#[derive(Debug)]
pub(crate) struct Built {
    pub batch: WriteBackBatch,
    /// Records that cannot be decoded: dead-lettered before the batch
    /// commits.
    pub dead_letters: Vec<DeadLetter>,
    /// Decoded records folded into a newer write of the same key.
    pub coalesced: usize,
    /// Per `(keyspace, key)` of the batch, the older writes folded into its
    /// row, newest first. If the database refuses the row for good and it
    /// is dead-lettered, the next one here takes its place, so that an
    /// acknowledged older write is not lost with it (issue 13, defect 2).
    pub fallbacks: Fallbacks,
    /// `written_at_ms` of every decoded record (0s left out), for the lag.
    pub written_at_ms: Vec<u64>,
}

/// Builds the batch of `records` for `group`.
pub(crate) fn build(group: &str, records: Vec<Polled>, expected: &Expected) -> Built {
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    let mut rows: HashMap<(String, Bytes), WriteBackRow> = HashMap::new();
    let mut fallbacks = Fallbacks::new();
    let mut dead_letters = Vec::new();
    let (mut decoded, mut written_at_ms) = (0, Vec::new());

    for polled in records {
        let source = &polled.source;
        let slot = next
            .entry((source.topic.clone(), source.partition))
            .or_insert(source.offset + 1);
        *slot = (*slot).max(source.offset + 1);

        match check(&polled) {
            Ok(record) => {
                decoded += 1;
                if record.written_at_ms > 0 {
                    written_at_ms.push(record.written_at_ms);
                }
                let row = WriteBackRow {
                    record,
                    source: polled.source,
                };
                let id = (row.record.keyspace.clone(), row.record.key.clone());
                // Strictly newer wins; on a tie the first stays, as the
                // store's guard (`stored < new`) would decide. The loser is
                // kept as a fallback.
                let older = match rows.get(&id) {
                    Some(kept) if kept.record.version >= row.record.version => row,
                    _ => match rows.insert(id.clone(), row) {
                        Some(replaced) => replaced,
                        None => continue,
                    },
                };
                fallbacks.entry(id).or_default().push(older);
            }
            Err(reason) => dead_letters.push(DeadLetter {
                source: polled.source,
                key: polled.key,
                value: polled.value,
                headers: polled.headers,
                reason,
                attempts: 0,
            }),
        }
    }

    let coalesced = decoded - rows.len();
    for older in fallbacks.values_mut() {
        // Newest first; on a tie the earlier record first, as above.
        older.sort_by(|a, b| {
            b.record
                .version
                .cmp(&a.record.version)
                .then(a.source.offset.cmp(&b.source.offset))
        });
    }
    let mut rows: Vec<WriteBackRow> = rows.into_values().collect();
    // A stable order of row locks across batches.
    rows.sort_by(|a, b| {
        (&a.record.keyspace, &a.record.key).cmp(&(&b.record.keyspace, &b.record.key))
    });
    let mut offsets: Vec<PartitionOffset> = next
        .into_iter()
        .map(|((topic, partition), next_offset)| PartitionOffset {
            expected: expected.get(&(topic.clone(), partition)).copied().flatten(),
            topic,
            partition,
            next_offset,
        })
        .collect();
    offsets.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));

    Built {
        batch: WriteBackBatch {
            consumer_group: group.to_owned(),
            rows,
            offsets,
            discarded: Vec::new(),
        },
        dead_letters,
        coalesced,
        fallbacks,
        written_at_ms,
    }
}

/// The record, or why it can never be applied.
fn check(polled: &Polled) -> Result<WriteBackRecord, String> {
    let record = decode(
        polled.key.as_deref().unwrap_or_default(),
        polled.value.as_deref(),
        polled
            .headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_deref())),
    )
    .map_err(|err| err.to_string())?;
    if keyspace_of(&polled.source.topic) != Some(record.keyspace.as_str()) {
        return Err(format!(
            "record of keyspace {:?} on topic {}",
            record.keyspace, polled.source.topic
        ));
    }
    if i64::try_from(record.version).is_err() {
        return Err(format!(
            "version {} exceeds the largest storable version ({})",
            record.version,
            i64::MAX
        ));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn polled(offset: i64, key: &str, version: u64, value: Option<&str>) -> Polled {
        let record = WriteBackRecord {
            keyspace: "ks".into(),
            key: Bytes::copy_from_slice(key.as_bytes()),
            version,
            value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
            written_at_ms: 7,
            replicas: 0,
        };
        Polled {
            source: RecordSource {
                topic: "ringcache-wb-ks".into(),
                partition: 0,
                offset,
            },
            key: Some(record.encode_key().into()),
            value: record.value.clone(),
            headers: record
                .headers()
                .iter()
                .map(|(n, v)| ((*n).to_owned(), Some(Bytes::copy_from_slice(v))))
                .collect(),
        }
    }

    #[test]
    fn coalesces_to_the_highest_version_and_tracks_offsets() {
        let records = vec![
            polled(10, "a", 3, Some("a3")),
            polled(11, "a", 5, None),
            polled(12, "a", 4, Some("a4")),
            polled(13, "b", 1, Some("b1")),
        ];
        let expected = Expected::from([(("ringcache-wb-ks".into(), 0), Some(10))]);
        let built = build("g", records, &expected);
        assert_eq!(built.coalesced, 2);
        assert_eq!(built.written_at_ms.len(), 4);
        let rows: Vec<_> = built
            .batch
            .rows
            .iter()
            .map(|r| (r.record.key.clone(), r.record.version, r.source.offset))
            .collect();
        assert_eq!(
            rows,
            vec![(Bytes::from("a"), 5, 11), (Bytes::from("b"), 1, 13)]
        );
        let fallbacks: Vec<_> = built.fallbacks[&("ks".to_owned(), Bytes::from("a"))]
            .iter()
            .map(|r| (r.record.version, r.source.offset))
            .collect();
        assert_eq!(
            fallbacks,
            vec![(4, 12), (3, 10)],
            "older writes, newest first"
        );
        assert_eq!(
            built.batch.offsets,
            vec![PartitionOffset {
                topic: "ringcache-wb-ks".into(),
                partition: 0,
                expected: Some(10),
                next_offset: 14,
            }]
        );
    }

    #[test]
    fn dead_letters_what_can_never_apply_and_still_advances() {
        let mut bad = polled(20, "x", 1, Some("v"));
        bad.headers.clear();
        let mut wrong_topic = polled(21, "y", 1, Some("v"));
        wrong_topic.source.topic = "ringcache-wb-other".into();
        let too_new = polled(22, "z", u64::MAX, Some("v"));
        let good = polled(23, "ok", 1, Some("v"));
        let built = build("g", vec![bad, wrong_topic, too_new, good], &Expected::new());
        let errors: Vec<_> = built
            .dead_letters
            .iter()
            .map(|d| (d.source.offset, d.reason.as_str()))
            .collect();
        assert_eq!(errors[0], (20, "header rc-version is missing"));
        assert!(
            errors[1].1.contains("on topic ringcache-wb-other"),
            "{errors:?}"
        );
        assert!(errors[2].1.contains("exceeds the largest"), "{errors:?}");
        assert_eq!(built.batch.rows.len(), 1);
        let next: Vec<_> = built
            .batch
            .offsets
            .iter()
            .map(|o| (o.topic.as_str(), o.expected, o.next_offset))
            .collect();
        assert_eq!(
            next,
            vec![
                ("ringcache-wb-ks", None, 24),
                ("ringcache-wb-other", None, 22)
            ]
        );
    }
}

//! Which batch is written next: one lane per partition, so that the
//! partitions' batches are written side by side while each partition's
//! batches stay in order. Pure: the batcher feeds it what it collected and
//! starts what it hands out.
//!
//! A partition's batches must commit one after the other: each one stores
//! its partition's next offset as a compare-and-set on the offset the
//! previous one stored, and its records follow that batch's records without
//! a gap. So a lane has at most one batch in flight, and its next batch is
//! built only once the previous one committed. Different partitions share
//! nothing but the database (their rows have different keys, as records
//! are partitioned by key; were a key in two partitions, the version guard
//! keeps the newer write), so up to `max_in_flight` lanes write at once.
//! Records that arrive while a lane's batch is in flight wait in the lane
//! and make its next batch, up to `max_records`: under load, batches grow
//! with the time a batch takes, as before, and now the time spent fetching
//! and building overlaps the time spent in the database.

use std::collections::{BTreeMap, VecDeque};

use crate::batch::Polled;

/// A partition: `(topic, partition)`.
pub(crate) type Partition = (String, i32);

#[derive(Debug, Default)]
struct Lane {
    pending: VecDeque<Polled>,
    in_flight: bool,
    /// Its last batch was left unwritten (the worker is stopping): the
    /// records after it must not be written either, as that would store an
    /// offset past records that are not stored.
    stopped: bool,
    /// When it was last given a batch, in dispatch order: the lane waiting
    /// longest goes first.
    last_dispatch: u64,
}

/// The partitions' lanes.
#[derive(Debug)]
pub(crate) struct Lanes {
    max_records: usize,
    max_in_flight: usize,
    lanes: BTreeMap<Partition, Lane>,
    in_flight: usize,
    dispatches: u64,
}

impl Lanes {
    pub(crate) fn new(max_records: usize, max_in_flight: usize) -> Self {
        Lanes {
            max_records: max_records.max(1),
            max_in_flight: max_in_flight.max(1),
            lanes: BTreeMap::new(),
            in_flight: 0,
            dispatches: 0,
        }
    }

    /// Adds collected records to their partitions' lanes, in the order they
    /// were polled. Records of a stopped lane are dropped (they are
    /// consumed again after the restart).
    pub(crate) fn push(&mut self, records: Vec<Polled>) {
        for record in records {
            let partition = (record.source.topic.clone(), record.source.partition);
            let lane = self.lanes.entry(partition).or_default();
            if !lane.stopped {
                lane.pending.push_back(record);
            }
        }
    }

    /// The next batch to write, if a lane has records and no batch in
    /// flight and fewer than `max_in_flight` batches are in flight: the
    /// lane that waited longest, with at most `max_records` of its oldest
    /// records. The lane is in flight until [`Lanes::done`].
    pub(crate) fn next_batch(&mut self) -> Option<(Partition, Vec<Polled>)> {
        if self.in_flight >= self.max_in_flight {
            return None;
        }
        let (partition, lane) = self
            .lanes
            .iter_mut()
            .filter(|(_, lane)| !lane.in_flight && !lane.pending.is_empty())
            .min_by_key(|(_, lane)| lane.last_dispatch)?;
        let take = lane.pending.len().min(self.max_records);
        let records: Vec<Polled> = lane.pending.drain(..take).collect();
        lane.in_flight = true;
        self.dispatches += 1;
        lane.last_dispatch = self.dispatches;
        self.in_flight += 1;
        Some((partition.clone(), records))
    }

    /// The lane's batch is over: committed (`written`), or left unwritten
    /// because the worker is stopping, which stops the lane.
    pub(crate) fn done(&mut self, partition: &Partition, written: bool) {
        if let Some(lane) = self.lanes.get_mut(partition)
            && lane.in_flight
        {
            lane.in_flight = false;
            self.in_flight -= 1;
            if !written {
                lane.stopped = true;
                lane.pending.clear();
            }
        }
    }

    /// Whether a lane holds a full batch behind its batch in flight: then
    /// the batcher stops collecting until a batch is done, and the polling
    /// thread waits on the full channel.
    pub(crate) fn is_full(&self) -> bool {
        self.lanes
            .values()
            .any(|lane| lane.pending.len() >= self.max_records)
    }

    /// Nothing in flight and nothing left to write.
    pub(crate) fn is_settled(&self) -> bool {
        self.in_flight == 0 && self.lanes.values().all(|lane| lane.pending.is_empty())
    }

    /// Forgets every lane, once settled (after a revocation: the partitions
    /// may come back with other offsets, or go to another worker).
    pub(crate) fn clear(&mut self) {
        debug_assert!(self.is_settled());
        self.lanes.clear();
    }
}

#[cfg(test)]
mod tests {
    use cache_client::writeback::RecordSource;

    use super::*;

    fn record(partition: i32, offset: i64) -> Polled {
        Polled {
            source: RecordSource {
                topic: "t".into(),
                partition,
                offset,
            },
            key: None,
            value: None,
            headers: Vec::new(),
        }
    }

    fn offsets(records: &[Polled]) -> Vec<i64> {
        records.iter().map(|r| r.source.offset).collect()
    }

    #[test]
    fn each_partition_is_its_own_batch_and_they_are_written_side_by_side() {
        let mut lanes = Lanes::new(100, 4);
        lanes.push(vec![record(0, 0), record(1, 0), record(0, 1), record(2, 0)]);
        let mut batches = Vec::new();
        while let Some(batch) = lanes.next_batch() {
            batches.push(batch);
        }
        let got: Vec<(i32, Vec<i64>)> = batches
            .iter()
            .map(|((_, p), records)| (*p, offsets(records)))
            .collect();
        assert_eq!(got, vec![(0, vec![0, 1]), (1, vec![0]), (2, vec![0])]);
    }

    #[test]
    fn a_partition_has_one_batch_in_flight_and_the_next_one_fills_meanwhile() {
        let mut lanes = Lanes::new(100, 4);
        lanes.push(vec![record(0, 0)]);
        let (p, first) = lanes.next_batch().unwrap();
        assert_eq!(offsets(&first), vec![0]);
        lanes.push(vec![record(0, 1), record(0, 2)]);
        assert!(lanes.next_batch().is_none(), "its first batch is in flight");
        lanes.done(&p, true);
        let (_, second) = lanes.next_batch().unwrap();
        assert_eq!(offsets(&second), vec![1, 2]);
    }

    #[test]
    fn batches_are_at_most_max_records_and_a_full_lane_holds_up_collecting() {
        let mut lanes = Lanes::new(2, 4);
        lanes.push((0..5).map(|o| record(0, o)).collect());
        assert!(lanes.is_full());
        let (p, first) = lanes.next_batch().unwrap();
        assert_eq!(offsets(&first), vec![0, 1]);
        assert!(lanes.is_full(), "two more wait behind the batch in flight");
        lanes.done(&p, true);
        let (p, second) = lanes.next_batch().unwrap();
        assert_eq!(offsets(&second), vec![2, 3]);
        assert!(!lanes.is_full());
        lanes.done(&p, true);
        let (p, third) = lanes.next_batch().unwrap();
        assert_eq!(offsets(&third), vec![4]);
        lanes.done(&p, true);
        assert!(lanes.is_settled());
    }

    #[test]
    fn no_more_than_max_in_flight_and_the_longest_waiting_lane_goes_first() {
        let mut lanes = Lanes::new(100, 2);
        lanes.push(vec![record(0, 0), record(1, 0), record(2, 0)]);
        let (a, _) = lanes.next_batch().unwrap();
        let (b, _) = lanes.next_batch().unwrap();
        assert_eq!((a.1, b.1), (0, 1));
        assert!(lanes.next_batch().is_none(), "two in flight");
        lanes.done(&a, true);
        lanes.push(vec![record(0, 1)]);
        let (c, _) = lanes.next_batch().unwrap();
        assert_eq!(c.1, 2, "partition 2 waited longer than partition 0");
    }

    #[test]
    fn a_lane_whose_batch_was_left_unwritten_writes_nothing_after_it() {
        let mut lanes = Lanes::new(100, 4);
        lanes.push(vec![record(0, 0)]);
        let (p, _) = lanes.next_batch().unwrap();
        lanes.push(vec![record(0, 1)]);
        lanes.done(&p, false);
        assert!(
            lanes.next_batch().is_none(),
            "offset 1 must not be stored past 0"
        );
        lanes.push(vec![record(0, 2)]);
        assert!(lanes.next_batch().is_none());
        assert!(lanes.is_settled());
    }
}

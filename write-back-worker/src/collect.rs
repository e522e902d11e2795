//! When the batch being collected is written: the collecting half of the
//! batcher, apart from the writing, so that its timing is tested with a
//! paused clock.
//!
//! What is collected is handed over as soon as the records already queued
//! are taken and nothing more is queued: a lone record at a low rate is
//! written at once instead of waiting for a batch that will not fill. The
//! batcher splits what it is handed into its partitions' lanes (`lanes`):
//! under load, the records that arrive while a partition's batch is being
//! written wait in its lane and form its next batch, so batches grow with
//! the rate and with the time a batch takes to write, up to `max_records`.
//! With `min_records` above 1 the collector waits for that many records,
//! at most `max_delay` after its first.

use std::time::Duration;

use tokio::{
    sync::{
        mpsc::{self, error::TryRecvError},
        oneshot,
    },
    time::{Instant, sleep_until},
};

use crate::{
    batch::{Expected, Polled},
    consumer::Event,
    error::Error,
};

/// What the batcher does next.
pub(crate) enum Step {
    /// Write the collected records ([`Collector::take`]).
    Flush,
    /// Partitions were assigned (in channel order, like the two below:
    /// the records collected before it stay collected).
    Assigned(Expected),
    /// The assignment is being revoked: write what you hold, then answer.
    Revoked(oneshot::Sender<()>),
    /// The polling thread cannot go on.
    Fatal(Error),
    /// The polling thread is gone.
    Closed,
}

/// Collects records from the polling thread's channel into batches of at
/// most `max_records`.
pub(crate) struct Collector {
    max_records: usize,
    min_records: usize,
    max_delay: Duration,
    pending: Vec<Polled>,
    /// When the batch being collected is written at the latest, if it
    /// has fewer than `min_records`.
    deadline: Instant,
}

impl Collector {
    pub(crate) fn new(max_records: usize, min_records: usize, max_delay: Duration) -> Self {
        Collector {
            max_records: max_records.max(1),
            min_records: min_records.clamp(1, max_records.max(1)),
            max_delay,
            pending: Vec::new(),
            deadline: Instant::now(),
        }
    }

    /// Waits for the next thing to do. Cancel-safe: a record received is
    /// kept in the collector even if the future is dropped.
    pub(crate) async fn next(&mut self, events: &mut mpsc::Receiver<Event>) -> Step {
        loop {
            if self.pending.len() >= self.max_records {
                return Step::Flush;
            }
            if !self.pending.is_empty() {
                // Take what is queued already, without waiting.
                match events.try_recv() {
                    Ok(event) => {
                        if let Some(step) = self.receive(event) {
                            return step;
                        }
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => return Step::Closed,
                    Err(TryRecvError::Empty) if self.pending.len() >= self.min_records => {
                        return Step::Flush;
                    }
                    Err(TryRecvError::Empty) => {}
                }
            }
            tokio::select! {
                biased;
                () = sleep_until(self.deadline), if !self.pending.is_empty() => return Step::Flush,
                event = events.recv() => match event {
                    None => return Step::Closed,
                    Some(event) => {
                        if let Some(step) = self.receive(event) {
                            return step;
                        }
                    }
                },
            }
        }
    }

    /// Keeps a record; any other event is a step of its own.
    fn receive(&mut self, event: Event) -> Option<Step> {
        match event {
            Event::Record(record) => {
                self.push(record);
                None
            }
            Event::Assigned(offsets) => Some(Step::Assigned(offsets)),
            Event::Revoked(ack) => Some(Step::Revoked(ack)),
            Event::Fatal(err) => Some(Step::Fatal(err)),
        }
    }

    fn push(&mut self, record: Polled) {
        if self.pending.is_empty() {
            self.deadline = Instant::now() + self.max_delay;
        }
        self.pending.push(record);
    }

    /// The collected records, leaving none.
    pub(crate) fn take(&mut self) -> Vec<Polled> {
        std::mem::take(&mut self.pending)
    }

    /// The records collected so far.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> &[Polled] {
        &self.pending
    }
}

#[cfg(test)]
mod tests {
    use cache_client::writeback::RecordSource;

    use super::*;

    const MAX_RECORDS: usize = 100;
    const MAX_DELAY: Duration = Duration::from_millis(100);

    fn record(offset: i64) -> Event {
        Event::Record(Polled {
            source: RecordSource {
                topic: "ringcache-wb-ks".into(),
                partition: 0,
                offset,
            },
            key: None,
            value: None,
            headers: Vec::new(),
        })
    }

    /// The next batch, and how long (virtual time) it took to be due.
    async fn next_batch(
        collector: &mut Collector,
        events: &mut mpsc::Receiver<Event>,
    ) -> (usize, Duration) {
        let started = Instant::now();
        match collector.next(events).await {
            Step::Flush => (collector.take().len(), started.elapsed()),
            Step::Assigned(_) | Step::Revoked(_) | Step::Fatal(_) => {
                panic!("only records are sent")
            }
            Step::Closed => panic!("the sender is kept"),
        }
    }

    /// Issue 18: at a low rate the worker's share of the lag was
    /// `max_batch_delay`, each lone record waiting for a batch that would
    /// never fill.
    #[tokio::test(start_paused = true)]
    async fn a_lone_record_is_written_at_once() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut collector = Collector::new(MAX_RECORDS, 1, MAX_DELAY);
        tx.send(record(0)).await.unwrap();
        let (records, waited) = next_batch(&mut collector, &mut rx).await;
        assert_eq!(records, 1);
        assert_eq!(waited, Duration::ZERO, "a lone record waited");
    }

    /// Records already queued are one batch, written at once, however
    /// many arrive later.
    #[tokio::test(start_paused = true)]
    async fn what_is_queued_is_one_batch_written_at_once() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut collector = Collector::new(MAX_RECORDS, 1, MAX_DELAY);
        for offset in 0..5 {
            tx.send(record(offset)).await.unwrap();
        }
        let (records, waited) = next_batch(&mut collector, &mut rx).await;
        assert_eq!((records, waited), (5, Duration::ZERO));
    }

    /// A backlog is written in full batches.
    #[tokio::test(start_paused = true)]
    async fn a_backlog_is_written_in_full_batches() {
        let (tx, mut rx) = mpsc::channel(1000);
        let mut collector = Collector::new(MAX_RECORDS, 1, MAX_DELAY);
        for offset in 0..250 {
            tx.send(record(offset)).await.unwrap();
        }
        let mut sizes = Vec::new();
        for _ in 0..3 {
            sizes.push(next_batch(&mut collector, &mut rx).await.0);
        }
        assert_eq!(sizes, vec![100, 100, 50]);
    }

    /// Under load the records that arrive while a batch is being written
    /// make the next batch: batches grow with the rate instead of being
    /// written one record at a time.
    #[tokio::test(start_paused = true)]
    async fn under_load_batches_fill_while_the_previous_one_is_written() {
        const WRITE_TIME: Duration = Duration::from_millis(20);
        let (tx, mut rx) = mpsc::channel(1000);
        // One record a millisecond, 1,000 in all.
        let sender = tokio::spawn(async move {
            for offset in 0..1000 {
                tx.send(record(offset)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let mut collector = Collector::new(MAX_RECORDS, 1, MAX_DELAY);
        let mut sizes = Vec::new();
        let mut total = 0;
        while total < 1000 {
            let (records, _) = next_batch(&mut collector, &mut rx).await;
            total += records;
            sizes.push(records);
            // The database's time for the batch.
            tokio::time::sleep(WRITE_TIME).await;
        }
        sender.await.unwrap();
        // After the first, each batch holds what arrived during the
        // previous write: about 20 records.
        assert!(
            sizes[1..sizes.len() - 1].iter().all(|&n| n >= 15),
            "batch sizes under load: {sizes:?}"
        );
    }

    /// With `min_records`, a short batch waits up to `max_delay` for more
    /// records, and is written as soon as it has enough.
    #[tokio::test(start_paused = true)]
    async fn below_min_records_a_batch_waits_up_to_max_delay() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut collector = Collector::new(MAX_RECORDS, 3, MAX_DELAY);
        tx.send(record(0)).await.unwrap();
        let late = tokio::spawn(async move {
            tokio::time::sleep(MAX_DELAY / 2).await;
            tx.send(record(1)).await.unwrap();
            tx
        });
        assert_eq!(next_batch(&mut collector, &mut rx).await, (2, MAX_DELAY));
        let tx = late.await.unwrap();
        let early = tokio::spawn(async move {
            for offset in 2..5 {
                tokio::time::sleep(MAX_DELAY / 10).await;
                tx.send(record(offset)).await.unwrap();
            }
            tx
        });
        assert_eq!(
            next_batch(&mut collector, &mut rx).await,
            (3, MAX_DELAY * 3 / 10)
        );
        drop(early.await.unwrap());
    }

    /// Events other than records come out in channel order, keeping what
    /// was collected before them.
    #[tokio::test(start_paused = true)]
    async fn other_events_keep_the_records_collected_before_them() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut collector = Collector::new(MAX_RECORDS, 1, MAX_DELAY);
        tx.send(record(0)).await.unwrap();
        tx.send(Event::Assigned(Default::default())).await.unwrap();
        assert!(matches!(collector.next(&mut rx).await, Step::Assigned(_)));
        assert_eq!(collector.pending().len(), 1);
        assert!(matches!(collector.next(&mut rx).await, Step::Flush));
        assert_eq!(collector.take().len(), 1);
        drop(tx);
        assert!(matches!(collector.next(&mut rx).await, Step::Closed));
    }
}

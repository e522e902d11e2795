//! What a chaos run records: one [`Op`] per operation a workload task
//! started, appended through a [`Recorder`], and the [`FinalState`] read at
//! quiescence (what PostgreSQL and the caches hold for each key).
//!
//! Times are monotonic offsets from the run's start (the recorder's
//! creation). An operation's interval is taken outside the call it records
//! (`start` before the call is made, `end` after it returned), so the real
//! operation lies inside it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cache_client::strategy::{Ack, Strategy, Written};
use parking_lot::Mutex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Identifies an operation within one run; assigned in start order.
pub type OpId = u64;

/// A value's fingerprint (xxh3 of its bytes). Workloads write a distinct
/// value per write, so that a read's digest names the write it saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Digest(pub u64);

impl Digest {
    /// The digest of `value`.
    pub fn of(value: &[u8]) -> Digest {
        Digest(xxhash_rust::xxh3::xxh3_64(value))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// What an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    /// `Keyspace::get` (or a lookup): reads a value or its absence.
    Read,
    /// `Keyspace::put`: writes a value.
    Write,
    /// `Keyspace::remove`: deletes the key (a tombstone in the store).
    Delete,
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Delete => "delete",
        })
    }
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "outcome", content = "error")]
pub enum Outcome {
    /// It returned success.
    Ok,
    /// It returned an error. A write that failed may still have applied
    /// (the store or the broker may have taken it before the error), so the
    /// checker treats it as possibly applied, at an unknown time.
    Err(String),
    /// No answer was seen (the task was cancelled or the run ended first).
    /// Like an error, a write may or may not have applied.
    Unknown,
}

impl Outcome {
    /// Whether the operation returned success.
    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok)
    }
}

/// One operation of a workload task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// Unique in the run, in start order.
    pub id: OpId,
    /// The client process that ran it (its own clock, health view and
    /// connections); 0 when the run has one in-process client.
    #[serde(default)]
    pub client: u32,
    /// The workload task that ran it.
    pub task: u32,
    /// The keyspace.
    pub keyspace: String,
    /// The strategy the keyspace ran when the operation started.
    #[serde(with = "StrategyDef")]
    pub strategy: Strategy,
    /// For write-back writes: the acknowledgement level (`None` means the
    /// default, durable). A `fast` acknowledgement does not promise
    /// durability, so such writes are not required to survive.
    #[serde(default, with = "ack_opt", skip_serializing_if = "Option::is_none")]
    pub ack: Option<Ack>,
    /// The key.
    pub key: String,
    /// Read, write or delete.
    pub kind: OpKind,
    /// Write: the digest of the value written. Read: the digest of the value
    /// read. `None`: a delete, or a read that found no value.
    pub value: Option<Digest>,
    /// Write or delete that returned success and applied: its version. Read:
    /// the version read, when the API reported one (a cache lookup does;
    /// `Keyspace::get` does not).
    pub version: Option<u64>,
    /// A write that returned success without applying, because a newer
    /// version was stored already: that version. Such a write had no effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<u64>,
    /// A write of a poison value ([`POISON_PREFIX`]), which the store
    /// refuses by design: its failure is counted as refused, not against
    /// availability.
    ///
    /// [`POISON_PREFIX`]: crate::chaos::client::POISON_PREFIX
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub poison: bool,
    /// When the call was made, from the run's start.
    #[serde(with = "nanos", rename = "start_ns")]
    pub start: Duration,
    /// When the call returned (or, for [`Outcome::Unknown`], when the task
    /// gave up on it), from the run's start.
    #[serde(with = "nanos", rename = "end_ns")]
    pub end: Duration,
    /// How it ended.
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Op {
    /// Whether this is a write or a delete.
    pub fn is_write(&self) -> bool {
        matches!(self.kind, OpKind::Write | OpKind::Delete)
    }

    /// Whether the write's acknowledgement promises durability: anything but
    /// a `fast` write-back acknowledgement.
    pub fn durable_ack(&self) -> bool {
        !(self.strategy == Strategy::WriteBack && self.ack == Some(Ack::Fast))
    }
}

/// `0.123456s`: seconds with microseconds, the form times take in messages.
pub(crate) struct Secs(pub Duration);

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.6}s", self.0.as_secs_f64())
    }
}

/// `value 0123456789abcdef` or `absent`.
pub(crate) struct ValueOf(pub Option<Digest>);

impl fmt::Display for ValueOf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(digest) => write!(f, "value {digest}"),
            None => f.write_str("absent"),
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} ", self.id)?;
        if self.client != 0 {
            write!(f, "client {} ", self.client)?;
        }
        write!(
            f,
            "task {} {} {}/{} [{}, {}] ",
            self.task,
            self.kind,
            self.keyspace,
            self.key,
            Secs(self.start),
            Secs(self.end),
        )?;
        match self.kind {
            OpKind::Write => write!(f, "{}", ValueOf(self.value))?,
            OpKind::Delete => f.write_str("tombstone")?,
            OpKind::Read => write!(f, "-> {}", ValueOf(self.value))?,
        }
        match self.version {
            Some(version) => write!(f, " version {version}")?,
            None => f.write_str(" version ?")?,
        }
        if let Some(newer) = self.superseded_by {
            write!(f, " (not applied: version {newer} was stored)")?;
        }
        if self.ack == Some(Ack::Fast) {
            f.write_str(" ack fast")?;
        }
        match &self.outcome {
            Outcome::Ok => f.write_str(" ok"),
            Outcome::Err(error) => write!(f, " err: {error}"),
            Outcome::Unknown => f.write_str(" unknown"),
        }
    }
}

/// Every operation of a run, in start order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// The operations, sorted by id.
    pub ops: Vec<Op>,
}

impl History {
    /// A history of `ops` (sorted by id here).
    pub fn from_ops(mut ops: Vec<Op>) -> History {
        ops.sort_by_key(|op| op.id);
        History { ops }
    }
}

/// Who runs an operation and on what: the part of an [`Op`] known before it
/// starts.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    /// The workload task.
    pub task: u32,
    /// The keyspace.
    pub keyspace: &'a str,
    /// The keyspace's strategy.
    pub strategy: Strategy,
    /// The key.
    pub key: &'a str,
}

struct RecorderInner {
    origin: Instant,
    /// Time from the run's start to `origin` (a client process starts its
    /// recorder after the run did).
    offset: Duration,
    /// The client process recorded operations belong to.
    client: u32,
    next_id: AtomicU64,
    /// Appended to once per finished operation; the lock is held only for
    /// the push (never across an `.await`).
    ops: Mutex<Vec<Op>>,
}

/// Collects the operations of a run. Cheap to clone; every workload task
/// holds a clone and appends to it concurrently.
///
/// ```
/// # use ringcache_tests::chaos::{Recorder, Subject};
/// # use cache_client::strategy::{Strategy, Written};
/// let recorder = Recorder::new();
/// let subject = Subject { task: 0, keyspace: "ks", strategy: Strategy::WriteAround, key: "k" };
/// let op = recorder.write(subject, b"v1");
/// // ... let result = keyspace.put("k", "v1").await;
/// op.ok_write(Written { version: 7, applied: true });
/// assert_eq!(recorder.history().ops.len(), 1);
/// ```
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<RecorderInner>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl fmt::Debug for Recorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recorder")
            .field("started", &self.inner.next_id.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// A recorder whose clock starts now: the run's start.
    pub fn new() -> Recorder {
        Recorder::for_client(0, Duration::ZERO)
    }

    /// A recorder of client process `client` whose clock reads `offset`
    /// now: how long ago the run started, by a clock every process of the
    /// machine shares (see [`since_unix_origin`]).
    pub fn for_client(client: u32, offset: Duration) -> Recorder {
        Recorder {
            inner: Arc::new(RecorderInner {
                offset,
                client,
                origin: Instant::now(),
                next_id: AtomicU64::new(0),
                ops: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Time since the run's start; the clock of every [`Op`] and of
    /// [`FinalState::observed_at`].
    pub fn elapsed(&self) -> Duration {
        self.inner.offset + self.inner.origin.elapsed()
    }

    /// Starts recording a read. Call it right before the read is made.
    pub fn read(&self, subject: Subject<'_>) -> InFlight {
        self.begin(subject, OpKind::Read, None)
    }

    /// Starts recording a write of `value`. Call it right before the write is
    /// made.
    pub fn write(&self, subject: Subject<'_>, value: &[u8]) -> InFlight {
        let mut op = self.begin(subject, OpKind::Write, Some(Digest::of(value)));
        if let Some(op) = op.op.as_mut() {
            op.poison = value.starts_with(crate::chaos::client::POISON_PREFIX.as_bytes());
        }
        op
    }

    /// Starts recording a delete. Call it right before the delete is made.
    pub fn delete(&self, subject: Subject<'_>) -> InFlight {
        self.begin(subject, OpKind::Delete, None)
    }

    fn begin(&self, subject: Subject<'_>, kind: OpKind, value: Option<Digest>) -> InFlight {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let start = self.elapsed();
        InFlight {
            recorder: self.clone(),
            op: Some(Op {
                id,
                client: self.inner.client,
                task: subject.task,
                keyspace: subject.keyspace.to_owned(),
                strategy: subject.strategy,
                ack: None,
                key: subject.key.to_owned(),
                kind,
                value,
                version: None,
                superseded_by: None,
                poison: false,
                start,
                end: start,
                outcome: Outcome::Unknown,
            }),
        }
    }

    /// Appends a finished operation as it is (for replaying or hand-made
    /// histories; workloads use [`Recorder::read`] and friends).
    pub fn record(&self, op: Op) {
        self.inner.ops.lock().push(op);
    }

    /// The operations recorded so far, in start order. Operations still in
    /// flight are not in it.
    pub fn history(&self) -> History {
        let ops = self.inner.ops.lock().clone();
        History::from_ops(ops)
    }
}

/// Time since `origin` (nanoseconds since the Unix epoch), by the wall
/// clock: how processes of one machine agree on the run's clock. Zero if
/// the clock reads before `origin` (it was stepped back).
pub fn since_unix_origin(origin_unix_ns: u64) -> Duration {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.saturating_sub(Duration::from_nanos(origin_unix_ns))
}

/// Now, in nanoseconds since the Unix epoch: a run's origin for
/// [`since_unix_origin`].
pub fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// An operation that started and has not been recorded yet. Finish it with
/// one of its methods; dropped unfinished (its task was cancelled), it is
/// recorded with the outcome [`Outcome::Unknown`].
#[derive(Debug)]
pub struct InFlight {
    recorder: Recorder,
    /// Taken when the operation is recorded.
    op: Option<Op>,
}

impl InFlight {
    /// Sets a write-back write's acknowledgement level.
    pub fn with_ack(mut self, ack: Ack) -> InFlight {
        if let Some(op) = &mut self.op {
            op.ack = Some(ack);
        }
        self
    }

    /// The operation's id.
    pub fn id(&self) -> Option<OpId> {
        self.op.as_ref().map(|op| op.id)
    }

    /// A read returned `value` (`None`: no value), with its version when the
    /// API reported it.
    pub fn ok_read(self, value: Option<&[u8]>, version: Option<u64>) {
        self.finish(|op| {
            op.value = value.map(Digest::of);
            op.version = version;
            op.outcome = Outcome::Ok;
        });
    }

    /// A write or delete returned success.
    pub fn ok_write(self, written: Written) {
        self.finish(|op| {
            if written.applied {
                op.version = Some(written.version);
            } else {
                op.superseded_by = Some(written.version);
            }
            op.outcome = Outcome::Ok;
        });
    }

    /// The operation returned an error.
    pub fn failed(self, error: impl fmt::Display) {
        let error = error.to_string();
        self.finish(|op| op.outcome = Outcome::Err(error));
    }

    /// No answer will be seen (recorded as [`Outcome::Unknown`] now).
    pub fn unknown(self) {
        self.finish(|op| op.outcome = Outcome::Unknown);
    }

    /// Records what `Keyspace::get` returned.
    pub fn read_result<E: fmt::Display>(self, result: &Result<Option<Bytes>, E>) {
        match result {
            Ok(value) => self.ok_read(value.as_deref(), None),
            Err(error) => self.failed(error),
        }
    }

    /// Records what `Keyspace::put` or `Keyspace::remove` returned.
    pub fn write_result<E: fmt::Display>(self, result: &Result<Written, E>) {
        match result {
            Ok(written) => self.ok_write(*written),
            Err(error) => self.failed(error),
        }
    }

    fn finish(mut self, complete: impl FnOnce(&mut Op)) {
        if let Some(mut op) = self.op.take() {
            complete(&mut op);
            op.end = self.recorder.elapsed();
            self.recorder.record(op);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(mut op) = self.op.take() {
            // The task gave up on the call: whatever it was doing may still
            // take effect, which `Unknown` tells the checker.
            op.outcome = Outcome::Unknown;
            op.end = self.recorder.elapsed();
            self.recorder.record(op);
        }
    }
}

/// A row of the store at quiescence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRow {
    /// The row's version.
    pub version: u64,
    /// The value's digest; `None` for a tombstone (a deleted key).
    pub value: Option<Digest>,
}

/// A cache entry at quiescence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedEntry {
    /// The entry's version, when the read reported it (the raw API does).
    pub version: Option<u64>,
    /// The cached value's digest; `None` for a cached absence (negative
    /// caching).
    pub value: Option<Digest>,
}

/// What one cache (a replica, or the client as a whole) held for a key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheObservation {
    /// Where it was read: a node's address, or `client`.
    pub source: String,
    /// The entry; `None` when the key was not cached there.
    pub entry: Option<CachedEntry>,
}

/// One key at quiescence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalKey {
    /// The keyspace.
    pub keyspace: String,
    /// The key.
    pub key: String,
    /// The keyspace's strategy at quiescence.
    #[serde(with = "StrategyDef")]
    pub strategy: Strategy,
    /// The store's row; `None` when it has no row for the key at all.
    pub db: Option<StoredRow>,
    /// What the caches held.
    pub cache: Vec<CacheObservation>,
    /// The write-back records of the key on the dead-letter topic: refused
    /// by the database, never to be stored.
    #[serde(default)]
    pub dead_letters: Vec<StoredRow>,
    /// Dirty (not yet stored) write-back entries the nodes still held.
    #[serde(default)]
    pub dirty: Vec<DirtyObservation>,
    /// Prepared (two-phase) transactions of the key left in PostgreSQL
    /// (`pg_prepared_xacts`), by global id.
    #[serde(default)]
    pub prepared: Vec<String>,
}

/// A dirty write-back entry a node held at quiescence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyObservation {
    /// The node.
    pub source: String,
    /// The dirty entry's version.
    pub version: u64,
}

impl fmt::Display for FinalKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.db {
            Some(row) => write!(
                f,
                "store: {} version {}",
                match row.value {
                    Some(digest) => format!("value {digest}"),
                    None => "tombstone".to_owned(),
                },
                row.version
            )?,
            None => f.write_str("store: no row")?,
        }
        for row in &self.dead_letters {
            write!(
                f,
                "; dead letter: {} version {}",
                ValueOf(row.value),
                row.version
            )?;
        }
        for dirty in &self.dirty {
            write!(f, "; dirty on {}: version {}", dirty.source, dirty.version)?;
        }
        for gid in &self.prepared {
            write!(f, "; prepared transaction {gid}")?;
        }
        for observation in &self.cache {
            write!(f, "; cache {}: ", observation.source)?;
            match observation.entry {
                Some(entry) => {
                    write!(f, "{}", ValueOf(entry.value))?;
                    match entry.version {
                        Some(version) => write!(f, " version {version}")?,
                        None => f.write_str(" version ?")?,
                    }
                }
                None => f.write_str("not cached")?,
            }
        }
        Ok(())
    }
}

/// What the store and the caches held at quiescence.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinalState {
    /// When it was read, on the recorder's clock ([`Recorder::elapsed`]),
    /// taken before the first of its reads.
    #[serde(with = "nanos", rename = "observed_at_ns")]
    pub observed_at: Duration,
    /// Every key the workload touched. A key the history has and this lacks
    /// is not checked at quiescence (and is listed as unobserved).
    pub keys: Vec<FinalKey>,
    /// Prepared transactions left in PostgreSQL that name no key of the
    /// run (their bookkeeping row is gone).
    #[serde(default)]
    pub prepared_elsewhere: Vec<String>,
}

/// `Strategy` as its kebab-case name (`write-back`), the form of the
/// keyspace file. A remote definition, so that a new strategy fails to
/// compile here rather than serialise wrongly.
#[derive(Serialize, Deserialize)]
#[serde(remote = "Strategy", rename_all = "kebab-case")]
enum StrategyDef {
    CacheAside,
    ReadThrough,
    WriteAround,
    WriteThrough,
    WriteBack,
}

/// `Strategy` as its name, for the report's rows and violations.
pub(crate) mod strategy_name {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(strategy: &Strategy, s: S) -> Result<S::Ok, S::Error> {
        super::StrategyDef::serialize(strategy, s)
    }
}

/// `Option<Ack>` as `"durable"` / `"fast"`.
mod ack_opt {
    use super::*;

    pub(super) fn serialize<S: Serializer>(ack: &Option<Ack>, s: S) -> Result<S::Ok, S::Error> {
        match ack {
            Some(Ack::Durable) => s.serialize_some("durable"),
            Some(Ack::Fast) => s.serialize_some("fast"),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ack>, D::Error> {
        Option::<Ack>::deserialize(d)
    }
}

/// A `Duration` as integer nanoseconds.
pub(crate) mod nanos {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_nanos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(task: u32) -> Subject<'static> {
        Subject {
            task,
            keyspace: "ks",
            strategy: Strategy::WriteBack,
            key: "k",
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_tasks_append_every_operation_once() {
        let recorder = Recorder::new();
        let tasks: Vec<_> = (0..8)
            .map(|task| {
                let recorder = recorder.clone();
                tokio::spawn(async move {
                    for i in 0..250u32 {
                        let value = format!("t{task}-{i}");
                        let op = recorder.write(subject(task), value.as_bytes());
                        tokio::task::yield_now().await;
                        op.ok_write(Written {
                            version: u64::from(i) + 1,
                            applied: true,
                        });
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("a recording task panicked");
        }
        let history = recorder.history();
        assert_eq!(history.ops.len(), 2000);
        let ids: Vec<OpId> = history.ops.iter().map(|op| op.id).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids are unique and sorted"
        );
        assert!(history.ops.iter().all(|op| op.start <= op.end));
    }

    #[test]
    fn a_client_recorder_reads_the_runs_clock_and_names_its_client() {
        // The run started 5 s before this client's recorder.
        let origin = unix_now_ns() - 5_000_000_000;
        let recorder = Recorder::for_client(3, since_unix_origin(origin));
        recorder.read(subject(1)).ok_read(None, None);
        let op = &recorder.history().ops[0];
        assert_eq!(op.client, 3);
        assert!(op.start >= Duration::from_secs(5), "{:?}", op.start);
        assert!(
            op.to_string().starts_with("#0 client 3 task 1 read"),
            "{op}"
        );
        // A clock stepped back reads zero, not a panic.
        assert_eq!(since_unix_origin(u64::MAX), Duration::ZERO);
    }

    #[test]
    fn an_abandoned_operation_is_recorded_as_unknown() {
        let recorder = Recorder::new();
        let op = recorder.write(subject(1), b"v").with_ack(Ack::Fast);
        drop(op);
        let history = recorder.history();
        assert_eq!(history.ops.len(), 1);
        assert_eq!(history.ops[0].outcome, Outcome::Unknown);
        assert_eq!(history.ops[0].ack, Some(Ack::Fast));
        assert_eq!(history.ops[0].value, Some(Digest::of(b"v")));
    }

    #[test]
    fn results_map_to_outcomes() {
        let recorder = Recorder::new();
        recorder
            .read(subject(0))
            .read_result::<String>(&Ok(Some(Bytes::from_static(b"x"))));
        recorder
            .delete(subject(0))
            .write_result::<String>(&Ok(Written {
                version: 9,
                applied: false,
            }));
        recorder
            .write(subject(0), b"y")
            .write_result::<String>(&Err("broker down".into()));
        let ops = recorder.history().ops;
        assert_eq!(ops[0].value, Some(Digest::of(b"x")));
        assert_eq!(ops[0].version, None);
        assert_eq!(ops[1].superseded_by, Some(9));
        assert_eq!(ops[1].version, None);
        assert_eq!(ops[2].outcome, Outcome::Err("broker down".into()));
    }

    #[test]
    fn a_history_survives_json() {
        let recorder = Recorder::new();
        recorder
            .write(subject(3), b"v")
            .with_ack(Ack::Durable)
            .ok_write(Written {
                version: 42,
                applied: true,
            });
        recorder.read(subject(3)).failed("deadline exceeded");
        recorder.read(subject(3)).unknown();
        let history = recorder.history();
        let json = serde_json::to_string(&history).expect("a history serialises");
        assert!(json.contains("\"strategy\":\"write-back\""), "{json}");
        assert!(json.contains("\"outcome\":\"err\""), "{json}");
        let back: History = serde_json::from_str(&json).expect("and deserialises");
        assert_eq!(back, history);

        let state = FinalState {
            observed_at: Duration::from_millis(5),
            keys: vec![FinalKey {
                keyspace: "ks".into(),
                key: "k".into(),
                strategy: Strategy::WriteThrough,
                db: Some(StoredRow {
                    version: 42,
                    value: None,
                }),
                cache: vec![CacheObservation {
                    source: "127.0.0.1:1".into(),
                    entry: Some(CachedEntry {
                        version: None,
                        value: Some(Digest::of(b"v")),
                    }),
                }],
                dead_letters: vec![StoredRow {
                    version: 43,
                    value: Some(Digest::of(b"poison")),
                }],
                dirty: vec![DirtyObservation {
                    source: "node-1".into(),
                    version: 42,
                }],
                prepared: vec!["rc-1".into()],
            }],
            prepared_elsewhere: vec!["rc-2".into()],
        };
        let json = serde_json::to_string(&state).expect("a final state serialises");
        let back: FinalState = serde_json::from_str(&json).expect("and deserialises");
        assert_eq!(back, state);
    }
}

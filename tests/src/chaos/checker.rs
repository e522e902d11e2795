//! Checks a recorded [`History`] and the [`FinalState`] against the
//! strategies' contracts (`docs/strategies.md`; what each check means and
//! assumes is in `docs/chaos.md`).
//!
//! The checker is conservative: it reports a violation only when no
//! ordering the history allows explains what was seen. Concretely:
//!
//! - a write that returned an error, or whose answer was never seen, may or
//!   may not have applied, and its version is unknown (unless a read, the
//!   store or a cache shows its value together with a version);
//! - a write that returned success without applying (a newer version was
//!   stored) had no effect;
//! - operations whose intervals overlap may have taken effect in either
//!   order: only a write that *returned* before a read *began* must be
//!   visible to it;
//! - writes are ordered by version. A write whose version is unknown is
//!   older than a write that began more than [`CheckConfig::clock_slack`]
//!   after it ended (versions come from a hybrid logical clock that never
//!   goes backwards).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use cache_client::strategy::Strategy;
use serde::Serialize;

use super::history::{
    Digest, FinalKey, FinalState, History, Op, Outcome, Secs, ValueOf, nanos, strategy_name,
};

/// Default [`CheckConfig::clock_slack`]: versions are wall-clock
/// milliseconds, so two clocks of one machine agree to within one; the rest
/// is margin.
pub const DEFAULT_CLOCK_SLACK: Duration = Duration::from_millis(5);

/// Every strategy, in the order reports list them.
pub const STRATEGIES: [Strategy; 5] = [
    Strategy::CacheAside,
    Strategy::ReadThrough,
    Strategy::WriteAround,
    Strategy::WriteThrough,
    Strategy::WriteBack,
];

/// What the checker allows.
#[derive(Clone, Debug)]
pub struct CheckConfig {
    bounds: HashMap<Strategy, Duration>,
    clock_slack: Duration,
    read_your_writes: Duration,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig::new()
    }
}

impl CheckConfig {
    /// No staleness allowed for any strategy, and [`DEFAULT_CLOCK_SLACK`].
    pub fn new() -> CheckConfig {
        CheckConfig {
            bounds: HashMap::new(),
            clock_slack: DEFAULT_CLOCK_SLACK,
            read_your_writes: Duration::ZERO,
        }
    }

    /// Sets how long after a client's own acknowledged write-back write
    /// returned that client may still read an older value (zero unless
    /// set: a write-back client reads its own writes, `docs/write-back.md`;
    /// faults that cut the client off from the key's owner relax it).
    pub fn with_read_your_writes_bound(mut self, bound: Duration) -> CheckConfig {
        self.read_your_writes = bound;
        self
    }

    /// The read-your-writes bound of write-back.
    pub fn read_your_writes_bound(&self) -> Duration {
        self.read_your_writes
    }

    /// Sets the staleness `strategy` declares for the faults of the run
    /// (`docs/strategies.md`, `docs/failover.md`): how long after a write
    /// returned a reader may still see an older value.
    pub fn with_bound(mut self, strategy: Strategy, bound: Duration) -> CheckConfig {
        self.bounds.insert(strategy, bound);
        self
    }

    /// Sets how far apart in time two writes must be for the checker to
    /// order them by time when one's version is unknown.
    pub fn with_clock_slack(mut self, slack: Duration) -> CheckConfig {
        self.clock_slack = slack;
        self
    }

    /// The staleness bound of `strategy` (zero unless set).
    pub fn bound(&self, strategy: Strategy) -> Duration {
        self.bounds.get(&strategy).copied().unwrap_or_default()
    }

    /// The clock slack.
    pub fn clock_slack(&self) -> Duration {
        self.clock_slack
    }
}

/// What kind of promise was broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ViolationKind {
    /// At quiescence the store lacks an acknowledged durable write: it holds
    /// an older version of the key, or no row.
    LostWrite,
    /// At quiescence the store holds a value (or tombstone) at a version no
    /// write could have produced.
    PhantomStored,
    /// A read returned a value no write could have produced: never written,
    /// written only by writes that returned without applying, or written
    /// only by writes that began after the read ended.
    PhantomRead,
    /// At quiescence a cache holds a value no write could have produced.
    PhantomCached,
    /// A read returned a version older than a write that returned more than
    /// the strategy's bound before the read began.
    StaleRead,
    /// At quiescence a cache holds a version older than a write that
    /// returned more than the strategy's bound before: a stale fill (or a
    /// missed invalidation) survived.
    StaleCache,
    /// Write-through at quiescence: a cache holds a value other than the
    /// store's.
    CacheDiverges,
    /// At quiescence two places (the store and a cache, or two caches)
    /// hold the same version of a key with different values.
    SameVersionDiffers,
    /// At quiescence a cache holds a version newer than the store's row: a
    /// value the database never took.
    CacheAheadOfStore,
    /// Two acknowledged writes of one key got the same version with
    /// different values: the newest write is ambiguous.
    DuplicateVersion,
    /// At quiescence a node still holds a dirty write-back entry.
    DirtyLeft,
    /// At quiescence a prepared (two-phase) transaction is left in
    /// PostgreSQL.
    PreparedLeft,
    /// A write-back read returned something older than an acknowledged
    /// write of the same client that returned before the read began.
    ReadYourWrites,
}

impl fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ViolationKind::LostWrite => "lost write",
            ViolationKind::PhantomStored => "phantom stored value",
            ViolationKind::PhantomRead => "phantom read",
            ViolationKind::PhantomCached => "phantom cached value",
            ViolationKind::StaleRead => "stale read",
            ViolationKind::StaleCache => "stale cache at quiescence",
            ViolationKind::CacheDiverges => "cache diverges from store",
            ViolationKind::SameVersionDiffers => "same version, different values",
            ViolationKind::CacheAheadOfStore => "cache ahead of store",
            ViolationKind::DuplicateVersion => "duplicate version",
            ViolationKind::DirtyLeft => "dirty entry left",
            ViolationKind::PreparedLeft => "prepared transaction left",
            ViolationKind::ReadYourWrites => "read-your-writes broken",
        })
    }
}

/// A broken promise and the operations that show it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Violation {
    /// What was broken.
    pub kind: ViolationKind,
    /// The strategy whose promise it was.
    #[serde(with = "strategy_name")]
    pub strategy: Strategy,
    /// The keyspace.
    pub keyspace: String,
    /// The key.
    pub key: String,
    /// Why this is a violation, in one sentence.
    pub message: String,
    /// The operations that show it, in start order.
    pub ops: Vec<Op>,
    /// The key at quiescence, for violations found there.
    pub final_key: Option<FinalKey>,
    /// How stale the read or cache was, for staleness violations.
    #[serde(
        with = "nanos_opt",
        rename = "staleness_ns",
        skip_serializing_if = "Option::is_none"
    )]
    pub staleness: Option<Duration>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} [{}] {}/{}: {}",
            self.kind, self.strategy, self.keyspace, self.key, self.message
        )?;
        for op in &self.ops {
            write!(f, "\n    {op}")?;
        }
        if let Some(final_key) = &self.final_key {
            write!(f, "\n    at quiescence: {final_key}")?;
        }
        Ok(())
    }
}

/// A key of a keyspace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct KeyRef {
    /// The keyspace.
    pub keyspace: String,
    /// The key.
    pub key: String,
}

/// The figures of one strategy in one run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StrategySummary {
    /// The strategy.
    #[serde(with = "strategy_name")]
    pub strategy: Strategy,
    /// Operations started.
    pub operations: usize,
    /// Operations that returned success.
    pub ok: usize,
    /// Operations that returned an error (not counting `refused`).
    pub errors: usize,
    /// Writes of poison values that failed, as the store's constraint
    /// refuses them by design: neither ok nor an error of the system.
    pub refused: usize,
    /// Operations whose answer was never seen.
    pub unknown: usize,
    /// Violations found.
    pub violations: usize,
    /// The stalest successful read: how long before it began the newest
    /// write it missed had returned. Zero when every read was current.
    #[serde(with = "nanos", rename = "worst_staleness_ns")]
    pub worst_staleness: Duration,
    /// The read that was that stale.
    pub worst_staleness_read: Option<u64>,
}

impl StrategySummary {
    fn new(strategy: Strategy) -> StrategySummary {
        StrategySummary {
            strategy,
            operations: 0,
            ok: 0,
            errors: 0,
            refused: 0,
            unknown: 0,
            violations: 0,
            worst_staleness: Duration::ZERO,
            worst_staleness_read: None,
        }
    }

    /// `ok / (operations - refused)`; `None` without such operations.
    pub fn availability(&self) -> Option<f64> {
        let counted = self.operations - self.refused;
        (counted > 0).then(|| self.ok as f64 / counted as f64)
    }
}

/// What [`check`] found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CheckResult {
    /// Every violation, key by key.
    pub violations: Vec<Violation>,
    /// Per strategy that had operations or violations, in [`STRATEGIES`]
    /// order.
    pub summaries: Vec<StrategySummary>,
    /// Keys the history has and the final state lacks: nothing was checked
    /// at quiescence for them.
    pub unobserved_keys: Vec<KeyRef>,
    /// Write-through keys whose cache was not compared with the store,
    /// because the final state was taken sooner than the strategy's bound
    /// after the key's last write.
    pub not_quiescent: Vec<KeyRef>,
}

impl CheckResult {
    /// No violation found.
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }

    /// The summary of `strategy`, if it had operations or violations.
    pub fn summary(&self, strategy: Strategy) -> Option<&StrategySummary> {
        self.summaries.iter().find(|s| s.strategy == strategy)
    }

    /// The violations of `kind`.
    pub fn of_kind(&self, kind: ViolationKind) -> impl Iterator<Item = &Violation> {
        self.violations.iter().filter(move |v| v.kind == kind)
    }
}

/// Checks `history` and `state` against the strategies' promises, allowing
/// each strategy the staleness `config` declares for it.
pub fn check(history: &History, state: &FinalState, config: &CheckConfig) -> CheckResult {
    let mut keys: BTreeMap<(&str, &str), KeyHistory<'_>> = BTreeMap::new();
    for op in &history.ops {
        let entry = keys
            .entry((op.keyspace.as_str(), op.key.as_str()))
            .or_default();
        if op.is_write() {
            entry.writes.push(Write::of(op));
        } else {
            entry.reads.push(op);
        }
    }
    let finals: HashMap<(&str, &str), &FinalKey> = state
        .keys
        .iter()
        .map(|k| ((k.keyspace.as_str(), k.key.as_str()), k))
        .collect();

    let mut summaries: BTreeMap<usize, StrategySummary> = BTreeMap::new();
    for op in &history.ops {
        let summary = summary_of(&mut summaries, op.strategy);
        summary.operations += 1;
        match op.outcome {
            Outcome::Ok => summary.ok += 1,
            Outcome::Err(_) if op.poison => summary.refused += 1,
            Outcome::Err(_) => summary.errors += 1,
            Outcome::Unknown => summary.unknown += 1,
        }
    }

    let mut result = CheckResult::default();
    let mut checker = Checker {
        config,
        violations: Vec::new(),
    };
    for ((keyspace, key), key_history) in &mut keys {
        let final_key = finals.get(&(*keyspace, *key)).copied();
        key_history.prepare(final_key);
        checker.reads(key_history, &mut summaries);
        checker.history_audit(key_history);
        match final_key {
            Some(final_key) => checker.at_quiescence(
                key_history,
                final_key,
                state.observed_at,
                &mut result.not_quiescent,
            ),
            None => result.unobserved_keys.push(KeyRef {
                keyspace: (*keyspace).to_owned(),
                key: (*key).to_owned(),
            }),
        }
    }
    // Keys only the final state has: anything stored or cached there is
    // unexplained by the history.
    for final_key in &state.keys {
        if !keys.contains_key(&(final_key.keyspace.as_str(), final_key.key.as_str())) {
            let mut empty = KeyHistory::default();
            empty.prepare(Some(final_key));
            checker.at_quiescence(
                &empty,
                final_key,
                state.observed_at,
                &mut result.not_quiescent,
            );
        }
    }

    for gid in &state.prepared_elsewhere {
        checker.violation(
            ViolationKind::PreparedLeft,
            Strategy::WriteThrough,
            ("-", gid.as_str()),
            format!("prepared transaction {gid} is left in PostgreSQL at quiescence, naming no key of the run"),
            Vec::new(),
        );
    }
    for violation in &checker.violations {
        summary_of(&mut summaries, violation.strategy).violations += 1;
    }
    result.violations = checker.violations;
    result.summaries = summaries.into_values().collect();
    result
}

fn summary_of(
    summaries: &mut BTreeMap<usize, StrategySummary>,
    strategy: Strategy,
) -> &mut StrategySummary {
    let rank = STRATEGIES
        .iter()
        .position(|s| *s == strategy)
        .unwrap_or(STRATEGIES.len());
    summaries
        .entry(rank)
        .or_insert_with(|| StrategySummary::new(strategy))
}

/// What a write may have done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Effect {
    /// It returned success and applied at this version.
    Applied(u64),
    /// It may or may not have applied; its version, when something showed
    /// it.
    Maybe(Option<u64>),
    /// It had no effect (returned success without applying).
    Nothing,
}

#[derive(Debug)]
struct Write<'a> {
    op: &'a Op,
    effect: Effect,
}

impl<'a> Write<'a> {
    fn of(op: &'a Op) -> Write<'a> {
        let effect = match (&op.outcome, op.superseded_by, op.version) {
            (Outcome::Ok, Some(_), _) => Effect::Nothing,
            (Outcome::Ok, None, Some(version)) => Effect::Applied(version),
            // A success without a version cannot be placed among the others;
            // treat it like an unknown outcome rather than guess.
            (_, _, version) => Effect::Maybe(version),
        };
        Write { op, effect }
    }

    fn version(&self) -> Option<u64> {
        match self.effect {
            Effect::Applied(version) => Some(version),
            Effect::Maybe(version) => version,
            Effect::Nothing => None,
        }
    }

    fn possible(&self) -> bool {
        self.effect != Effect::Nothing
    }
}

/// The operations of one key.
#[derive(Debug, Default)]
struct KeyHistory<'a> {
    writes: Vec<Write<'a>>,
    reads: Vec<&'a Op>,
    /// Writes by the value they wrote (`None`: deletes).
    by_value: HashMap<Option<Digest>, Vec<usize>>,
    /// Applied writes, by the time they returned.
    applied_by_end: Vec<usize>,
}

impl<'a> KeyHistory<'a> {
    /// Indexes the writes and learns the versions of writes of unknown
    /// outcome whose value was seen with its version.
    fn prepare(&mut self, final_key: Option<&FinalKey>) {
        for (i, write) in self.writes.iter().enumerate() {
            self.by_value.entry(write.op.value).or_default().push(i);
        }
        // (digest, version) pairs something showed; a digest seen with two
        // versions teaches nothing.
        let mut seen: HashMap<Digest, Option<u64>> = HashMap::new();
        let mut saw = |digest: Option<Digest>, version: Option<u64>| {
            if let (Some(digest), Some(version)) = (digest, version) {
                seen.entry(digest)
                    .and_modify(|v| {
                        if *v != Some(version) {
                            *v = None;
                        }
                    })
                    .or_insert(Some(version));
            }
        };
        for read in &self.reads {
            if read.outcome.is_ok() {
                saw(read.value, read.version);
            }
        }
        if let Some(final_key) = final_key {
            if let Some(row) = final_key.db {
                saw(row.value, Some(row.version));
            }
            for observation in &final_key.cache {
                if let Some(entry) = observation.entry {
                    saw(entry.value, entry.version);
                }
            }
        }
        for (digest, version) in seen {
            let Some(version) = version else { continue };
            // Only a value exactly one write wrote names that write.
            if let Some([only]) = self.by_value.get(&Some(digest)).map(Vec::as_slice)
                && self.writes[*only].effect == Effect::Maybe(None)
            {
                self.writes[*only].effect = Effect::Maybe(Some(version));
            }
        }
        // A dead-lettered write was refused by the database: it is not
        // required to be stored, nor to be seen after it returned.
        if let Some(final_key) = final_key {
            for letter in &final_key.dead_letters {
                for write in &mut self.writes {
                    if write.op.value == letter.value
                        && write.version() == Some(letter.version)
                        && write.possible()
                    {
                        write.effect = Effect::Maybe(Some(letter.version));
                    }
                }
            }
        }
        self.applied_by_end = (0..self.writes.len())
            .filter(|i| matches!(self.writes[*i].effect, Effect::Applied(_)))
            .collect();
        self.applied_by_end
            .sort_by_key(|i| (self.writes[*i].op.end, self.writes[*i].op.id));
    }

    /// The writes (and the initial absence) that could have produced what
    /// `reading` saw.
    fn sources(&self, reading: &Reading) -> Vec<Source<'_, 'a>> {
        let mut sources = Vec::new();
        if reading.value.is_none() && reading.version.is_none_or(|v| v == 0) {
            sources.push(Source::Initial);
        }
        for i in self.by_value.get(&reading.value).into_iter().flatten() {
            let write = &self.writes[*i];
            let version_fits = match (reading.version, write.version()) {
                (Some(seen), Some(written)) => seen == written,
                _ => true,
            };
            // A write that began after the read ended cannot be what it saw.
            if write.possible() && version_fits && write.op.start <= reading.end {
                sources.push(Source::Write(write));
            }
        }
        sources
    }

    /// How stale `reading` was: the applied write that returned earliest
    /// before the reading began among those certainly newer than anything it
    /// could have seen, and how long before.
    fn staleness(
        &self,
        reading: &Reading,
        sources: &[Source<'_, 'a>],
        slack: Duration,
    ) -> Option<(Duration, &Write<'a>)> {
        for i in &self.applied_by_end {
            let newer = &self.writes[*i];
            if newer.op.end >= reading.start {
                break;
            }
            let Effect::Applied(version) = newer.effect else {
                continue;
            };
            let older = match reading.version {
                Some(seen) => seen < version,
                None => sources
                    .iter()
                    .all(|s| s.certainly_older(newer, version, slack)),
            };
            if older {
                return Some((reading.start - newer.op.end, newer));
            }
        }
        None
    }

    fn last_write_end(&self) -> Option<Duration> {
        self.writes.iter().map(|w| w.op.end).max()
    }
}

/// What a read or a cache at quiescence saw.
#[derive(Clone, Copy, Debug)]
struct Reading {
    value: Option<Digest>,
    version: Option<u64>,
    start: Duration,
    end: Duration,
}

impl Reading {
    fn of(op: &Op) -> Reading {
        Reading {
            value: op.value,
            version: op.version,
            start: op.start,
            end: op.end,
        }
    }

    fn describe(&self) -> String {
        match self.version {
            Some(version) => format!("{} version {version}", ValueOf(self.value)),
            None => ValueOf(self.value).to_string(),
        }
    }
}

/// Where a value seen may have come from.
#[derive(Clone, Copy, Debug)]
enum Source<'w, 'a> {
    /// The key's state before the run: absent.
    Initial,
    /// A write.
    Write(&'w Write<'a>),
}

impl Source<'_, '_> {
    /// Whether this source's version is certainly older than `newer`'s
    /// (`version`).
    fn certainly_older(&self, newer: &Write<'_>, version: u64, slack: Duration) -> bool {
        match self {
            Source::Initial => true,
            Source::Write(write) => match write.version() {
                Some(own) => own < version,
                // The version was taken before the write ended and the newer
                // one after it began, from clocks that never go back.
                None => write.op.end + slack <= newer.op.start,
            },
        }
    }
}

struct Checker<'c> {
    config: &'c CheckConfig,
    violations: Vec<Violation>,
}

impl Checker<'_> {
    fn violation(
        &mut self,
        kind: ViolationKind,
        strategy: Strategy,
        at: (&str, &str),
        message: String,
        mut ops: Vec<Op>,
    ) -> &mut Violation {
        ops.sort_by_key(|op| (op.start, op.id));
        ops.dedup_by_key(|op| op.id);
        self.violations.push(Violation {
            kind,
            strategy,
            keyspace: at.0.to_owned(),
            key: at.1.to_owned(),
            message,
            ops,
            final_key: None,
            staleness: None,
        });
        let last = self.violations.len() - 1;
        &mut self.violations[last]
    }

    /// Phantom and stale reads; the worst staleness per strategy.
    fn reads(
        &mut self,
        history: &KeyHistory<'_>,
        summaries: &mut BTreeMap<usize, StrategySummary>,
    ) {
        for read in &history.reads {
            if !read.outcome.is_ok() {
                continue;
            }
            let at = (read.keyspace.as_str(), read.key.as_str());
            let reading = Reading::of(read);
            let sources = history.sources(&reading);
            if sources.is_empty() {
                let mut ops = vec![(*read).clone()];
                ops.extend(same_value(history, reading.value));
                self.violation(
                    ViolationKind::PhantomRead,
                    read.strategy,
                    at,
                    format!(
                        "read #{} returned {}, which no write that began before the read ended could have produced",
                        read.id,
                        reading.describe()
                    ),
                    ops,
                );
                continue;
            }
            let Some((staleness, newer)) =
                history.staleness(&reading, &sources, self.config.clock_slack)
            else {
                continue;
            };
            let summary = summary_of(summaries, read.strategy);
            if staleness > summary.worst_staleness {
                summary.worst_staleness = staleness;
                summary.worst_staleness_read = Some(read.id);
            }
            let bound = self.config.bound(read.strategy);
            if staleness > bound {
                let mut ops = vec![(*read).clone(), newer.op.clone()];
                ops.extend(source_ops(&sources));
                let message = format!(
                    "read #{} returned {}, older than write #{} (version {}) that returned {} ({:?}) before the read began; the bound is {:?}",
                    read.id,
                    reading.describe(),
                    newer.op.id,
                    newer.version().unwrap_or_default(),
                    Secs(newer.op.end),
                    staleness,
                    bound,
                );
                self.violation(ViolationKind::StaleRead, read.strategy, at, message, ops)
                    .staleness = Some(staleness);
            }
        }
    }

    /// The store and the caches at quiescence.
    fn at_quiescence(
        &mut self,
        history: &KeyHistory<'_>,
        final_key: &FinalKey,
        observed_at: Duration,
        not_quiescent: &mut Vec<KeyRef>,
    ) {
        let at = (final_key.keyspace.as_str(), final_key.key.as_str());
        let strategy = final_key.strategy;
        let first = self.violations.len();

        // The store: explained by some write, and holding every acknowledged
        // durable write (or something newer).
        if let Some(row) = final_key.db {
            let reading = Reading {
                value: row.value,
                version: Some(row.version),
                start: observed_at,
                end: observed_at,
            };
            if history.sources(&reading).is_empty() {
                self.violation(
                    ViolationKind::PhantomStored,
                    strategy,
                    at,
                    format!(
                        "the store holds {} at version {}, which no write could have produced",
                        ValueOf(row.value),
                        row.version
                    ),
                    same_value(history, row.value),
                );
            }
        }
        let stored = final_key.db.map(|row| row.version);
        let mut lost: Vec<&Write<'_>> = history
            .writes
            .iter()
            .filter(|w| w.op.durable_ack())
            .filter(|w| match (w.effect, stored) {
                (Effect::Applied(version), Some(stored)) => version > stored,
                (Effect::Applied(_), None) => true,
                _ => false,
            })
            .collect();
        lost.sort_by_key(|w| std::cmp::Reverse(w.version()));
        if let Some(newest) = lost.first() {
            let holds = match stored {
                Some(version) => format!("holds version {version}"),
                None => "has no row".to_owned(),
            };
            let message = format!(
                "acknowledged write #{} (version {}) is not in the store, which {holds}{}",
                newest.op.id,
                newest.version().unwrap_or_default(),
                match lost.len() {
                    1 => String::new(),
                    n => format!("; {} acknowledged writes are missing", n),
                }
            );
            let ops = lost.iter().take(3).map(|w| w.op.clone()).collect();
            self.violation(
                ViolationKind::LostWrite,
                newest.op.strategy,
                at,
                message,
                ops,
            );
        }

        // The caches.
        let quiet_since = history.last_write_end().unwrap_or_default();
        let bound = self.config.bound(strategy);
        for observation in &final_key.cache {
            let Some(entry) = observation.entry else {
                continue;
            };
            let reading = Reading {
                value: entry.value,
                version: entry.version,
                start: observed_at,
                end: observed_at,
            };
            let sources = history.sources(&reading);
            if sources.is_empty() {
                self.violation(
                    ViolationKind::PhantomCached,
                    strategy,
                    at,
                    format!(
                        "cache {} holds {}, which no write could have produced",
                        observation.source,
                        reading.describe()
                    ),
                    same_value(history, entry.value),
                );
                continue;
            }
            if strategy == Strategy::WriteThrough {
                // Cached absence equals a tombstone or no row; versions are
                // not compared, the promise is about values.
                let stored_value = final_key.db.and_then(|row| row.value);
                if entry.value == stored_value {
                    continue;
                }
                if observed_at < quiet_since + bound {
                    if !not_quiescent
                        .iter()
                        .any(|k| k.key == at.1 && k.keyspace == at.0)
                    {
                        not_quiescent.push(KeyRef {
                            keyspace: at.0.to_owned(),
                            key: at.1.to_owned(),
                        });
                    }
                    continue;
                }
                let message = format!(
                    "cache {} holds {} but the store holds {}",
                    observation.source,
                    reading.describe(),
                    match final_key.db {
                        Some(row) => format!("{} version {}", ValueOf(row.value), row.version),
                        None => "no row".to_owned(),
                    }
                );
                let ops = source_ops(&sources).collect();
                self.violation(ViolationKind::CacheDiverges, strategy, at, message, ops);
                continue;
            }
            if let Some((staleness, newer)) =
                history.staleness(&reading, &sources, self.config.clock_slack)
                && staleness > bound
            {
                let mut ops = vec![newer.op.clone()];
                ops.extend(source_ops(&sources));
                let message = format!(
                    "cache {} holds {}, older than write #{} (version {}) that returned {staleness:?} before quiescence; the bound is {bound:?}",
                    observation.source,
                    reading.describe(),
                    newer.op.id,
                    newer.version().unwrap_or_default(),
                );
                self.violation(ViolationKind::StaleCache, strategy, at, message, ops)
                    .staleness = Some(staleness);
            }
        }
        self.final_audit(history, final_key);
        for violation in &mut self.violations[first..] {
            violation.final_key = Some(final_key.clone());
        }
    }
}

/// The writes of `value` (at most three), to show beside a phantom.
fn same_value(history: &KeyHistory<'_>, value: Option<Digest>) -> Vec<Op> {
    history
        .by_value
        .get(&value)
        .into_iter()
        .flatten()
        .take(3)
        .map(|i| history.writes[*i].op.clone())
        .collect()
}

/// The writes among `sources` (at most three).
fn source_ops<'s>(sources: &'s [Source<'_, '_>]) -> impl Iterator<Item = Op> + 's {
    sources
        .iter()
        .filter_map(|s| match s {
            Source::Initial => None,
            Source::Write(write) => Some(write.op.clone()),
        })
        .take(3)
}

/// An `Option<Duration>` as integer nanoseconds.
mod nanos_opt {
    use std::time::Duration;

    use serde::Serializer;

    pub(super) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }
}

mod audit;
#[cfg(test)]
mod tests;

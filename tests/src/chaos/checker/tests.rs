//! The checker against hand-made histories: each kind of violation is
//! caught, and what the contracts allow (concurrency, unknown outcomes,
//! staleness within the bound) is not flagged.

use std::time::Duration;

use cache_client::strategy::{Ack, Strategy};

use super::*;
use crate::chaos::{CacheObservation, CachedEntry, Digest, OpKind, Outcome, StoredRow};

const KS: &str = "ks";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn digest(value: &str) -> Option<Digest> {
    Some(Digest::of(value.as_bytes()))
}

/// Builds a history one operation at a time; every operation is on keyspace
/// `ks` under the builder's strategy, times in milliseconds.
struct Ops {
    strategy: Strategy,
    ops: Vec<Op>,
}

impl Ops {
    fn new(strategy: Strategy) -> Ops {
        Ops {
            strategy,
            ops: Vec::new(),
        }
    }

    fn push(
        &mut self,
        kind: OpKind,
        key: &str,
        value: Option<Digest>,
        at: (u64, u64),
        outcome: Outcome,
    ) -> &mut Op {
        let id = self.ops.len() as u64 + 1;
        self.ops.push(Op {
            id,
            client: 0,
            task: (id % 4) as u32,
            keyspace: KS.into(),
            strategy: self.strategy,
            ack: None,
            key: key.into(),
            kind,
            value,
            version: None,
            superseded_by: None,
            poison: false,
            start: ms(at.0),
            end: ms(at.1),
            outcome,
        });
        let last = self.ops.len() - 1;
        &mut self.ops[last]
    }

    /// A put that returned success and applied at `version`.
    fn put(&mut self, key: &str, value: &str, version: u64, at: (u64, u64)) -> u64 {
        let op = self.push(OpKind::Write, key, digest(value), at, Outcome::Ok);
        op.version = Some(version);
        op.id
    }

    /// A put that returned an error.
    fn put_failed(&mut self, key: &str, value: &str, at: (u64, u64)) -> u64 {
        let op = self.push(
            OpKind::Write,
            key,
            digest(value),
            at,
            Outcome::Err("deadline exceeded".into()),
        );
        op.id
    }

    /// A put whose answer was never seen.
    fn put_unknown(&mut self, key: &str, value: &str, at: (u64, u64)) -> u64 {
        self.push(OpKind::Write, key, digest(value), at, Outcome::Unknown)
            .id
    }

    /// A put that returned success without applying: `newer` was stored.
    fn put_superseded(&mut self, key: &str, value: &str, newer: u64, at: (u64, u64)) -> u64 {
        let op = self.push(OpKind::Write, key, digest(value), at, Outcome::Ok);
        op.superseded_by = Some(newer);
        op.id
    }

    /// A delete that returned success and applied at `version`.
    fn delete(&mut self, key: &str, version: u64, at: (u64, u64)) -> u64 {
        let op = self.push(OpKind::Delete, key, None, at, Outcome::Ok);
        op.version = Some(version);
        op.id
    }

    /// A read that returned `value` (`None`: absent), version not reported.
    fn get(&mut self, key: &str, value: Option<&str>, at: (u64, u64)) -> u64 {
        self.push(OpKind::Read, key, value.and_then(digest), at, Outcome::Ok)
            .id
    }

    /// A read that returned `value` with its version (a cache lookup).
    fn lookup(&mut self, key: &str, value: Option<&str>, version: u64, at: (u64, u64)) -> u64 {
        let op = self.push(OpKind::Read, key, value.and_then(digest), at, Outcome::Ok);
        op.version = Some(version);
        op.id
    }

    fn history(&self) -> History {
        History::from_ops(self.ops.clone())
    }
}

/// A cache's entry in a test: `(version, value)`, `None` when not cached.
type Cached<'a> = Option<(Option<u64>, Option<&'a str>)>;

/// The final state of one key.
fn final_key(
    key: &str,
    strategy: Strategy,
    db: Option<(u64, Option<&str>)>,
    cache: &[(&str, Cached<'_>)],
) -> FinalKey {
    FinalKey {
        keyspace: KS.into(),
        key: key.into(),
        strategy,
        db: db.map(|(version, value)| StoredRow {
            version,
            value: value.and_then(digest),
        }),
        cache: cache
            .iter()
            .map(|(source, entry)| CacheObservation {
                source: (*source).into(),
                entry: entry.map(|(version, value)| CachedEntry {
                    version,
                    value: value.and_then(digest),
                }),
            })
            .collect(),
        dead_letters: Vec::new(),
        dirty: Vec::new(),
        prepared: Vec::new(),
    }
}

fn at(observed_at: u64, keys: Vec<FinalKey>) -> FinalState {
    FinalState {
        observed_at: ms(observed_at),
        keys,
        prepared_elsewhere: Vec::new(),
    }
}

fn kinds(result: &CheckResult) -> Vec<ViolationKind> {
    result.violations.iter().map(|v| v.kind).collect()
}

fn op_ids(violation: &Violation) -> Vec<u64> {
    violation.ops.iter().map(|op| op.id).collect()
}

// Violations that must be caught.

#[test]
fn a_stale_read_after_a_returned_write_is_caught() {
    let mut ops = Ops::new(Strategy::CacheAside);
    let old = ops.put("k", "a", 1, (0, 10));
    let new = ops.put("k", "b", 2, (20, 30));
    let read = ops.get("k", Some("a"), (40, 50));
    let result = check(&ops.history(), &FinalState::default(), &CheckConfig::new());

    assert_eq!(kinds(&result), [ViolationKind::StaleRead]);
    let violation = &result.violations[0];
    assert_eq!(violation.staleness, Some(ms(10)));
    assert_eq!(op_ids(violation), [old, new, read]);
    let shown = violation.to_string();
    assert!(
        shown.starts_with("stale read [cache-aside] ks/k: read #3"),
        "{shown}"
    );
    assert!(shown.contains("write #2 (version 2)"), "{shown}");
    assert!(
        shown.contains("#1 task 1 write ks/k [0.000000s, 0.010000s]"),
        "{shown}"
    );
    let summary = result
        .summary(Strategy::CacheAside)
        .expect("a cache-aside summary");
    assert_eq!(summary.worst_staleness, ms(10));
    assert_eq!(summary.worst_staleness_read, Some(read));
    assert_eq!(summary.violations, 1);
}

#[test]
fn staleness_beyond_the_bound_is_caught_and_within_it_is_only_measured() {
    let mut ops = Ops::new(Strategy::WriteAround);
    ops.put("k", "a", 1, (0, 10));
    ops.put("k", "b", 2, (20, 30));
    ops.get("k", Some("a"), (60, 65));
    let late = ops.get("k", Some("a"), (100, 105));
    let config = CheckConfig::new().with_bound(Strategy::WriteAround, ms(50));
    let result = check(&ops.history(), &FinalState::default(), &config);

    assert_eq!(kinds(&result), [ViolationKind::StaleRead]);
    assert_eq!(result.violations[0].staleness, Some(ms(70)));
    assert!(op_ids(&result.violations[0]).contains(&late));
    let summary = result
        .summary(Strategy::WriteAround)
        .expect("a write-around summary");
    assert_eq!(summary.worst_staleness, ms(70));
}

#[test]
fn a_read_older_than_several_writes_counts_from_the_first_it_missed() {
    let mut ops = Ops::new(Strategy::ReadThrough);
    ops.put("k", "a", 1, (0, 10));
    ops.put("k", "b", 2, (20, 30));
    ops.put("k", "c", 3, (40, 50));
    ops.get("k", Some("a"), (100, 110));
    let result = check(&ops.history(), &FinalState::default(), &CheckConfig::new());
    assert_eq!(kinds(&result), [ViolationKind::StaleRead]);
    assert_eq!(result.violations[0].staleness, Some(ms(70)));
}

#[test]
fn a_value_read_back_after_its_delete_returned_is_stale() {
    let mut ops = Ops::new(Strategy::ReadThrough);
    ops.put("k", "a", 1, (0, 10));
    ops.delete("k", 2, (20, 30));
    ops.get("k", Some("a"), (40, 50));
    // And absence read back after a newer put returned.
    ops.put("k", "c", 3, (60, 70));
    ops.get("k", None, (80, 90));
    let result = check(&ops.history(), &FinalState::default(), &CheckConfig::new());
    assert_eq!(
        kinds(&result),
        [ViolationKind::StaleRead, ViolationKind::StaleRead]
    );
}

#[test]
fn a_value_of_a_failed_write_that_ended_before_a_newer_one_began_is_stale() {
    let mut ops = Ops::new(Strategy::ReadThrough);
    // Its version is unknown, but was taken before 5 ms, and the newer
    // write's after 20 ms.
    ops.put_failed("k", "x", (0, 5));
    ops.put("k", "b", 2, (20, 30));
    ops.get("k", Some("x"), (100, 110));
    let result = check(&ops.history(), &FinalState::default(), &CheckConfig::new());
    assert_eq!(kinds(&result), [ViolationKind::StaleRead]);
}

#[test]
fn a_value_never_written_is_a_phantom_read() {
    let mut ops = Ops::new(Strategy::WriteThrough);
    ops.put("k", "a", 1, (0, 10));
    ops.get("k", Some("never"), (20, 30));
    let result = check(&ops.history(), &FinalState::default(), &CheckConfig::new());
    assert_eq!(kinds(&result), [ViolationKind::PhantomRead]);
    assert_eq!(result.violations[0].strategy, Strategy::WriteThrough);
}

#[test]
fn a_value_of_a_write_that_did_not_apply_is_a_phantom_read() {
    // A write-through write refused by version was aborted on both sides:
    // no reader may see it.
    let mut ops = Ops::new(Strategy::WriteThrough);
    ops.put("k", "b", 5, (0, 10));
    let aborted = ops.put_superseded("k", "c", 5, (20, 30));
    let read = ops.get("k", Some("c"), (25, 40));
    let result = check(&ops.history(), &FinalState::default(), &CheckConfig::new());
    assert_eq!(kinds(&result), [ViolationKind::PhantomRead]);
    assert_eq!(op_ids(&result.violations[0]), [aborted, read]);
}

#[test]
fn a_value_written_only_after_the_read_ended_is_a_phantom_read() {
    let mut ops = Ops::new(Strategy::WriteThrough);
    ops.get("k", Some("b"), (0, 5));
    ops.put("k", "b", 1, (10, 20));
    let result = check(&ops.history(), &FinalState::default(), &CheckConfig::new());
    assert_eq!(kinds(&result), [ViolationKind::PhantomRead]);
}

#[test]
fn a_value_read_with_a_version_no_write_of_it_had_is_a_phantom_read() {
    let mut ops = Ops::new(Strategy::CacheAside);
    ops.put("k", "a", 1, (0, 10));
    ops.put("k", "b", 7, (20, 30));
    ops.lookup("k", Some("a"), 7, (40, 50));
    let result = check(&ops.history(), &FinalState::default(), &CheckConfig::new());
    assert_eq!(kinds(&result), [ViolationKind::PhantomRead]);
}

#[test]
fn an_acknowledged_write_back_write_missing_from_the_store_is_lost() {
    let mut ops = Ops::new(Strategy::WriteBack);
    ops.put("k", "a", 10, (0, 10));
    let newest = ops.put("k", "b", 20, (20, 30));
    let missing = ops.put("gone", "c", 30, (40, 50));
    let state = at(
        1000,
        vec![
            final_key("k", Strategy::WriteBack, Some((10, Some("a"))), &[]),
            final_key("gone", Strategy::WriteBack, None, &[]),
        ],
    );
    let result = check(&ops.history(), &state, &CheckConfig::new());

    assert_eq!(
        kinds(&result),
        [ViolationKind::LostWrite, ViolationKind::LostWrite]
    );
    // Keys in order: "gone", then "k".
    assert_eq!(op_ids(&result.violations[0]), [missing]);
    assert!(
        result.violations[0].message.contains("has no row"),
        "{}",
        result.violations[0]
    );
    assert_eq!(op_ids(&result.violations[1]), [newest]);
    let shown = result.violations[1].to_string();
    assert!(shown.contains("holds version 10"), "{shown}");
    assert!(shown.contains("at quiescence: store: value"), "{shown}");
}

#[test]
fn an_acknowledged_delete_missing_from_the_store_is_lost() {
    let mut ops = Ops::new(Strategy::WriteBack);
    ops.put("k", "a", 10, (0, 10));
    ops.delete("k", 20, (20, 30));
    let state = at(
        1000,
        vec![final_key(
            "k",
            Strategy::WriteBack,
            Some((10, Some("a"))),
            &[],
        )],
    );
    let result = check(&ops.history(), &state, &CheckConfig::new());
    assert_eq!(kinds(&result), [ViolationKind::LostWrite]);
}

#[test]
fn a_stored_value_no_write_produced_is_a_phantom() {
    let mut ops = Ops::new(Strategy::WriteAround);
    ops.put("k", "a", 10, (0, 10));
    let state = at(
        1000,
        vec![final_key(
            "k",
            Strategy::WriteAround,
            Some((99, Some("zzz"))),
            &[],
        )],
    );
    let result = check(&ops.history(), &state, &CheckConfig::new());
    assert_eq!(kinds(&result), [ViolationKind::PhantomStored]);
}

#[test]
fn a_write_through_cache_that_differs_from_the_store_at_quiescence_is_caught() {
    let mut ops = Ops::new(Strategy::WriteThrough);
    ops.put("k", "a", 1, (0, 10));
    ops.put("k", "b", 2, (20, 30));
    let state = at(
        1000,
        vec![final_key(
            "k",
            Strategy::WriteThrough,
            Some((2, Some("b"))),
            &[
                ("node-1", Some((Some(1), Some("a")))),
                ("node-2", Some((Some(2), Some("b")))),
                ("node-3", None),
                // A cached absence while the store has a value.
                ("client", Some((None, None))),
            ],
        )],
    );
    let config = CheckConfig::new().with_bound(Strategy::WriteThrough, ms(100));
    let result = check(&ops.history(), &state, &config);
    assert_eq!(
        kinds(&result),
        [ViolationKind::CacheDiverges, ViolationKind::CacheDiverges]
    );
    let shown = result.violations[0].to_string();
    assert!(shown.contains("cache node-1 holds value"), "{shown}");
    assert!(shown.contains("but the store holds value"), "{shown}");
}

#[test]
fn a_stale_fill_that_survived_until_quiescence_is_caught() {
    let mut ops = Ops::new(Strategy::CacheAside);
    ops.put("k", "a", 1, (0, 10));
    ops.put("k", "b", 2, (20, 30));
    let state = at(
        1000,
        vec![final_key(
            "k",
            Strategy::CacheAside,
            Some((2, Some("b"))),
            &[("node-1", Some((None, Some("a"))))],
        )],
    );
    let config = CheckConfig::new().with_bound(Strategy::CacheAside, ms(200));
    let result = check(&ops.history(), &state, &config);
    assert_eq!(kinds(&result), [ViolationKind::StaleCache]);
    assert_eq!(result.violations[0].staleness, Some(ms(970)));
}

#[test]
fn a_cached_value_no_write_produced_is_a_phantom() {
    let mut ops = Ops::new(Strategy::ReadThrough);
    ops.put("k", "a", 1, (0, 10));
    let state = at(
        1000,
        vec![final_key(
            "k",
            Strategy::ReadThrough,
            Some((1, Some("a"))),
            &[("node-1", Some((Some(1), Some("bogus"))))],
        )],
    );
    let result = check(&ops.history(), &state, &CheckConfig::new());
    // And the store holds another value at that version.
    assert_eq!(
        kinds(&result),
        [
            ViolationKind::PhantomCached,
            ViolationKind::SameVersionDiffers
        ]
    );
}

#[test]
fn a_key_only_the_final_state_has_is_checked_too() {
    let ops = Ops::new(Strategy::WriteAround);
    let state = at(
        1000,
        vec![final_key(
            "stray",
            Strategy::WriteAround,
            Some((3, Some("x"))),
            &[],
        )],
    );
    let result = check(&ops.history(), &state, &CheckConfig::new());
    assert_eq!(kinds(&result), [ViolationKind::PhantomStored]);
}

// What the contracts allow must not be flagged.

#[test]
fn reads_concurrent_with_a_write_may_see_either_value() {
    let mut ops = Ops::new(Strategy::CacheAside);
    ops.put("k", "a", 1, (0, 10));
    ops.put("k", "b", 2, (20, 60));
    ops.get("k", Some("a"), (30, 40));
    ops.get("k", Some("b"), (30, 40));
    ops.get("k", Some("a"), (55, 70));
    let result = check(&ops.history(), &FinalState::default(), &CheckConfig::new());
    assert!(result.is_clean(), "{:#?}", result.violations);
    assert_eq!(
        result
            .summary(Strategy::CacheAside)
            .map(|s| s.worst_staleness),
        Some(Duration::ZERO)
    );
}

#[test]
fn concurrent_writes_are_ordered_by_version_not_by_time() {
    let mut ops = Ops::new(Strategy::WriteAround);
    // Overlapping writes: the later-starting one got the lower version and
    // lost, as versions decide.
    ops.put("k", "c", 4, (0, 20));
    ops.put_superseded("k", "d", 4, (5, 25));
    ops.get("k", Some("c"), (30, 40));
    let state = at(
        1000,
        vec![final_key(
            "k",
            Strategy::WriteAround,
            Some((4, Some("c"))),
            &[],
        )],
    );
    let result = check(&ops.history(), &state, &CheckConfig::new());
    assert!(result.is_clean(), "{:#?}", result.violations);
}

#[test]
fn writes_of_unknown_outcome_may_or_may_not_have_applied() {
    let mut ops = Ops::new(Strategy::WriteBack);
    ops.put("k", "b", 2, (20, 30));
    ops.put_failed("k", "c", (40, 50));
    ops.put_unknown("k", "e", (45, 55));
    // Seen: applied.
    ops.get("k", Some("c"), (60, 70));
    // Not seen: not applied (or overwritten by a write that did not apply
    // either); b is the newest acknowledged value.
    ops.get("k", Some("b"), (80, 90));
    ops.get("k", Some("e"), (80, 90));
    // The store holds b: neither failed write is required there.
    let state = at(
        1000,
        vec![final_key(
            "k",
            Strategy::WriteBack,
            Some((2, Some("b"))),
            &[],
        )],
    );
    let result = check(&ops.history(), &state, &CheckConfig::new());
    assert!(result.is_clean(), "{:#?}", result.violations);
    let summary = result.summary(Strategy::WriteBack).expect("a summary");
    assert_eq!(
        (
            summary.operations,
            summary.ok,
            summary.errors,
            summary.unknown
        ),
        (6, 4, 1, 1)
    );
    assert_eq!(summary.availability(), Some(4.0 / 6.0));
}

#[test]
fn a_failed_write_that_reached_the_store_explains_it() {
    let mut ops = Ops::new(Strategy::WriteBack);
    ops.put("k", "b", 2, (20, 30));
    ops.put_failed("k", "c", (40, 50));
    let state = at(
        1000,
        vec![final_key(
            "k",
            Strategy::WriteBack,
            Some((77, Some("c"))),
            &[("node-1", Some((Some(77), Some("c"))))],
        )],
    );
    let result = check(&ops.history(), &state, &CheckConfig::new());
    assert!(result.is_clean(), "{:#?}", result.violations);
}

#[test]
fn a_version_seen_with_a_value_orders_the_failed_write_that_wrote_it() {
    // The failed write overlaps the acknowledged one, so time alone cannot
    // order them; a lookup during b's write shows x's version, older than
    // b's.
    let history = |with_lookup: bool| {
        let mut ops = Ops::new(Strategy::ReadThrough);
        ops.put_failed("k", "x", (0, 25));
        ops.put("k", "b", 20, (20, 30));
        if with_lookup {
            ops.lookup("k", Some("x"), 10, (22, 28));
        }
        let read = ops.get("k", Some("x"), (100, 110));
        (ops.history(), read)
    };
    let (unlearned, _) = history(false);
    let result = check(&unlearned, &FinalState::default(), &CheckConfig::new());
    assert!(result.is_clean(), "{:#?}", result.violations);

    let (learned, read) = history(true);
    let result = check(&learned, &FinalState::default(), &CheckConfig::new());
    assert_eq!(kinds(&result), [ViolationKind::StaleRead]);
    assert!(op_ids(&result.violations[0]).contains(&read));
}

#[test]
fn writes_too_close_in_time_are_not_ordered_by_time() {
    let mut ops = Ops::new(Strategy::ReadThrough);
    // Ended 2 ms before the newer write began: within the clock slack.
    ops.put_failed("k", "x", (0, 18));
    ops.put("k", "b", 2, (20, 30));
    ops.get("k", Some("x"), (100, 110));
    let result = check(&ops.history(), &FinalState::default(), &CheckConfig::new());
    assert!(result.is_clean(), "{:#?}", result.violations);
}

#[test]
fn fast_write_back_acknowledgements_may_be_lost() {
    let mut ops = Ops::new(Strategy::WriteBack);
    ops.put("k", "a", 10, (0, 10));
    ops.ops[0].ack = Some(Ack::Fast);
    let state = at(1000, vec![final_key("k", Strategy::WriteBack, None, &[])]);
    let result = check(&ops.history(), &state, &CheckConfig::new());
    assert!(result.is_clean(), "{:#?}", result.violations);
}

#[test]
fn a_newer_row_from_an_unacknowledged_write_is_not_a_lost_write() {
    let mut ops = Ops::new(Strategy::WriteAround);
    ops.put("k", "a", 10, (0, 10));
    ops.put_superseded("k", "late", 10, (5, 15));
    ops.put_unknown("k", "z", (20, 30));
    let state = at(
        1000,
        vec![final_key(
            "k",
            Strategy::WriteAround,
            Some((40, Some("z"))),
            &[],
        )],
    );
    let result = check(&ops.history(), &state, &CheckConfig::new());
    assert!(result.is_clean(), "{:#?}", result.violations);
}

#[test]
fn absence_before_the_first_write_and_after_a_delete_is_current() {
    let mut ops = Ops::new(Strategy::ReadThrough);
    ops.get("k", None, (0, 5));
    ops.lookup("k", None, 0, (0, 5));
    ops.put("k", "a", 1, (10, 20));
    ops.delete("k", 2, (30, 40));
    ops.get("k", None, (50, 60));
    ops.lookup("k", None, 2, (50, 60));
    let state = at(
        1000,
        vec![final_key(
            "k",
            Strategy::ReadThrough,
            Some((2, None)),
            &[("node-1", Some((Some(2), None)))],
        )],
    );
    let result = check(&ops.history(), &state, &CheckConfig::new());
    assert!(result.is_clean(), "{:#?}", result.violations);
}

#[test]
fn a_write_through_cache_equal_to_the_store_or_absent_is_fine() {
    let mut ops = Ops::new(Strategy::WriteThrough);
    ops.put("k", "a", 1, (0, 10));
    ops.delete("k", 2, (20, 30));
    ops.put("v", "b", 3, (0, 10));
    let state = at(
        1000,
        vec![
            final_key(
                "k",
                Strategy::WriteThrough,
                Some((2, None)),
                &[("node-1", Some((Some(2), None))), ("node-2", None)],
            ),
            final_key(
                "v",
                Strategy::WriteThrough,
                Some((3, Some("b"))),
                &[("node-1", Some((Some(3), Some("b"))))],
            ),
        ],
    );
    let result = check(&ops.history(), &state, &CheckConfig::new());
    assert!(result.is_clean(), "{:#?}", result.violations);
}

#[test]
fn a_write_through_cache_read_before_the_bound_ran_out_is_not_judged() {
    let mut ops = Ops::new(Strategy::WriteThrough);
    ops.put("k", "a", 1, (0, 10));
    ops.put("k", "b", 2, (20, 30));
    // A node that missed the commit keeps the old value for up to the
    // pending timeout; the state was read 70 ms after the last write.
    let state = at(
        100,
        vec![final_key(
            "k",
            Strategy::WriteThrough,
            Some((2, Some("b"))),
            &[("node-1", Some((Some(1), Some("a"))))],
        )],
    );
    let config = CheckConfig::new().with_bound(Strategy::WriteThrough, ms(5000));
    let result = check(&ops.history(), &state, &config);
    assert!(result.is_clean(), "{:#?}", result.violations);
    assert_eq!(
        result.not_quiescent,
        [KeyRef {
            keyspace: KS.into(),
            key: "k".into()
        }]
    );
}

#[test]
fn keys_missing_from_the_final_state_are_listed() {
    let mut ops = Ops::new(Strategy::WriteBack);
    ops.put("k", "a", 20, (0, 10));
    let result = check(&ops.history(), &at(1000, Vec::new()), &CheckConfig::new());
    assert!(result.is_clean());
    assert_eq!(
        result.unobserved_keys,
        [KeyRef {
            keyspace: KS.into(),
            key: "k".into()
        }]
    );
}

#[test]
fn summaries_follow_the_strategy_order() {
    let mut aside = Ops::new(Strategy::WriteBack);
    aside.put("k", "a", 1, (0, 10));
    let mut ops = Ops::new(Strategy::CacheAside);
    ops.get("j", None, (0, 5));
    let mut all = aside.ops;
    for mut op in ops.ops {
        op.id += 100;
        all.push(op);
    }
    let result = check(
        &History::from_ops(all),
        &FinalState::default(),
        &CheckConfig::new(),
    );
    let order: Vec<Strategy> = result.summaries.iter().map(|s| s.strategy).collect();
    assert_eq!(order, [Strategy::CacheAside, Strategy::WriteBack]);
}

// The final-state audit and the checks of many writers, each with the
// history its fault leaves behind.

/// Sets the client of every operation pushed so far from `from` (by index).
fn by_client(ops: &mut Ops, from: usize, client: u32) {
    for op in &mut ops.ops[from..] {
        op.client = client;
    }
}

#[test]
fn racing_writers_with_one_version_are_caught() {
    // Two processes wrote one key in the same millisecond and got the same
    // version; the node kept one value, PostgreSQL the other.
    let mut ops = Ops::new(Strategy::WriteBack);
    let a = ops.put("k", "a", 20, (0, 10));
    let b = ops.put("k", "b", 20, (0, 10));
    by_client(&mut ops, 1, 2);
    let state = at(
        1000,
        vec![final_key(
            "k",
            Strategy::WriteBack,
            Some((20, Some("b"))),
            &[("node-1", Some((Some(20), Some("a"))))],
        )],
    );
    let result = check(&ops.history(), &state, &CheckConfig::new());
    assert_eq!(
        kinds(&result),
        [
            ViolationKind::DuplicateVersion,
            ViolationKind::SameVersionDiffers
        ],
        "{:#?}",
        result.violations
    );
    assert_eq!(op_ids(&result.violations[0]), [a, b]);
    let shown = result.violations[1].to_string();
    assert!(
        shown.contains("the store holds value") && shown.contains("at the same version 20"),
        "{shown}"
    );
    assert!(shown.contains("client 2 task"), "{shown}");
}

#[test]
fn equal_versions_of_one_value_are_not_a_duplicate() {
    let mut ops = Ops::new(Strategy::WriteThrough);
    ops.put("k", "a", 20, (0, 10));
    ops.put("k", "a", 20, (20, 30));
    let state = at(
        1000,
        vec![final_key(
            "k",
            Strategy::WriteThrough,
            Some((20, Some("a"))),
            &[("node-1", Some((Some(20), Some("a"))))],
        )],
    );
    let result = check(&ops.history(), &state, &CheckConfig::new());
    assert!(result.is_clean(), "{:#?}", result.violations);
}

#[test]
fn poison_an_acknowledged_write_lost_behind_a_dead_letter_is_caught() {
    // Write-back: `a` acknowledged, then `poison` acknowledged and refused
    // by the table; the worker stored neither and dead-lettered only the
    // poison; the cache keeps the poison, clean.
    let mut ops = Ops::new(Strategy::WriteBack);
    let a = ops.put("k", "a", 10, (0, 10));
    ops.put("k", "poison", 20, (20, 30));
    let mut key = final_key(
        "k",
        Strategy::WriteBack,
        None,
        &[("node-1", Some((Some(20), Some("poison"))))],
    );
    key.dead_letters.push(StoredRow {
        version: 20,
        value: digest("poison"),
    });
    let result = check(&ops.history(), &at(5000, vec![key]), &CheckConfig::new());
    assert_eq!(
        kinds(&result),
        [ViolationKind::LostWrite, ViolationKind::CacheAheadOfStore],
        "{:#?}",
        result.violations
    );
    assert_eq!(op_ids(&result.violations[0]), [a]);
    assert!(
        result.violations[0]
            .to_string()
            .contains("acknowledged write #1 (version 10) is not in the store, which has no row"),
        "{}",
        result.violations[0]
    );
}

#[test]
fn poison_a_dead_lettered_write_is_neither_lost_nor_required_to_be_seen() {
    let mut ops = Ops::new(Strategy::WriteBack);
    ops.put("k", "a", 10, (0, 10));
    ops.put("k", "poison", 20, (20, 30));
    ops.get("k", Some("a"), (100, 110));
    let mut key = final_key(
        "k",
        Strategy::WriteBack,
        Some((10, Some("a"))),
        &[("node-1", Some((Some(10), Some("a"))))],
    );
    key.dead_letters.push(StoredRow {
        version: 20,
        value: digest("poison"),
    });
    let result = check(&ops.history(), &at(5000, vec![key]), &CheckConfig::new());
    assert!(result.is_clean(), "{:#?}", result.violations);
}

#[test]
fn worker_kill_after_commit_a_dirty_entry_left_is_caught() {
    let mut ops = Ops::new(Strategy::WriteBack);
    let write = ops.put("k", "a", 10, (0, 10));
    let mut key = final_key(
        "k",
        Strategy::WriteBack,
        Some((10, Some("a"))),
        &[("node-2", Some((Some(10), Some("a"))))],
    );
    key.dirty.push(crate::chaos::DirtyObservation {
        source: "node-2".into(),
        version: 10,
    });
    let result = check(&ops.history(), &at(5000, vec![key]), &CheckConfig::new());
    assert_eq!(kinds(&result), [ViolationKind::DirtyLeft]);
    assert_eq!(op_ids(&result.violations[0]), [write]);
    assert!(
        result.violations[0]
            .to_string()
            .contains("dirty on node-2: version 10"),
        "{}",
        result.violations[0]
    );
}

#[test]
fn strategy_switch_a_prepared_transaction_left_is_caught() {
    let mut ops = Ops::new(Strategy::WriteThrough);
    ops.put_failed("k", "a", (0, 10));
    let mut key = final_key("k", Strategy::WriteBack, None, &[]);
    key.prepared.push("rc-7".into());
    let mut state = at(5000, vec![key]);
    state.prepared_elsewhere.push("rc-8".into());
    let result = check(&ops.history(), &state, &CheckConfig::new());
    assert_eq!(
        kinds(&result),
        [ViolationKind::PreparedLeft, ViolationKind::PreparedLeft]
    );
    assert!(result.violations[0].message.contains("rc-7"));
    assert!(result.violations[1].message.contains("rc-8"));
}

#[test]
fn dirty_budget_a_client_that_misses_its_own_write_is_caught() {
    // Client 1's write is acknowledged; a later refused write deleted the
    // key, and client 1 then loads the lagging row.
    let mut ops = Ops::new(Strategy::WriteBack);
    ops.put("k", "a", 10, (0, 10));
    let own = ops.put("k", "b", 20, (20, 30));
    ops.put_failed("k", "c", (40, 50));
    let read = ops.get("k", Some("a"), (60, 70));
    by_client(&mut ops, 0, 1);
    // Another client's read of the same value is only a stale read, within
    // the strategy's bound.
    ops.get("k", Some("a"), (60, 70));
    by_client(&mut ops, 4, 2);
    let config = CheckConfig::new().with_bound(Strategy::WriteBack, ms(1000));
    let result = check(&ops.history(), &FinalState::default(), &config);
    assert_eq!(kinds(&result), [ViolationKind::ReadYourWrites]);
    let violation = &result.violations[0];
    assert_eq!(violation.staleness, Some(ms(30)));
    assert_eq!(op_ids(violation), [1, own, read]);
    assert!(
        violation.message.starts_with("client 1 read value"),
        "{}",
        violation.message
    );

    // Faults that cut the client off from the owner relax it.
    let relaxed = config.with_read_your_writes_bound(ms(1000));
    assert!(check(&ops.history(), &FinalState::default(), &relaxed).is_clean());
}

#[test]
fn db_stall_a_commit_after_the_pending_timeout_leaves_the_cache_diverging() {
    // Write-through: the writer stalled past the pending timeout; the node
    // dropped the change, a reader filled the old row, then the writer
    // committed the new one.
    let mut ops = Ops::new(Strategy::WriteThrough);
    ops.put("k", "a", 10, (0, 10));
    ops.put("k", "b", 20, (20, 5000));
    let read = ops.get("k", Some("a"), (6000, 6010));
    let state = at(
        20_000,
        vec![final_key(
            "k",
            Strategy::WriteThrough,
            Some((20, Some("b"))),
            &[("node-1", Some((Some(10), Some("a"))))],
        )],
    );
    let config = CheckConfig::new().with_bound(Strategy::WriteThrough, ms(2500));
    let result = check(&ops.history(), &state, &config);
    // The read 1 s after the commit returned is within the bound; the cache
    // left behind is not.
    assert_eq!(
        kinds(&result),
        [ViolationKind::CacheDiverges],
        "{:#?}",
        result.violations
    );
    assert!(!op_ids(&result.violations[0]).contains(&read));
}

#[test]
fn asymmetric_partition_a_reader_that_keeps_an_unflushed_node_is_caught() {
    // Client 1 cannot reach node A: it wrote `b` on the fallback. Client 2
    // still reads `a` from node A long after.
    let mut ops = Ops::new(Strategy::CacheAside);
    ops.put("k", "a", 10, (0, 10));
    ops.put("k", "b", 20, (20, 30));
    by_client(&mut ops, 0, 1);
    let read = ops.get("k", Some("a"), (10_000, 10_010));
    by_client(&mut ops, 2, 2);
    let state = at(
        20_000,
        vec![final_key(
            "k",
            Strategy::CacheAside,
            Some((20, Some("b"))),
            &[("node-a", Some((Some(10), Some("a"))))],
        )],
    );
    let config = CheckConfig::new().with_bound(Strategy::CacheAside, ms(4500));
    let result = check(&ops.history(), &state, &config);
    assert_eq!(
        kinds(&result),
        [ViolationKind::StaleRead, ViolationKind::StaleCache],
        "{:#?}",
        result.violations
    );
    assert!(result.violations[0].ops.iter().any(|op| op.id == read));
}

#[test]
fn client_pause_a_write_that_lands_late_is_not_flagged() {
    // A paused client's write returns seconds later; it may take effect
    // any time in its interval, so a read in between may miss it.
    let mut ops = Ops::new(Strategy::WriteThrough);
    ops.put("k", "a", 10, (0, 10));
    ops.put("k", "b", 20, (20, 8000));
    by_client(&mut ops, 1, 3);
    ops.get("k", Some("a"), (4000, 4010));
    let state = at(
        20_000,
        vec![final_key(
            "k",
            Strategy::WriteThrough,
            Some((20, Some("b"))),
            &[("node-1", Some((Some(20), Some("b"))))],
        )],
    );
    let result = check(&ops.history(), &state, &CheckConfig::new());
    assert!(result.is_clean(), "{:#?}", result.violations);
}

#[test]
fn a_cache_ahead_of_the_store_is_caught_for_every_strategy() {
    for strategy in STRATEGIES {
        let mut ops = Ops::new(strategy);
        ops.put("k", "a", 10, (0, 10));
        ops.put_failed("k", "b", (20, 30));
        let state = at(
            20_000,
            vec![final_key(
                "k",
                strategy,
                Some((10, Some("a"))),
                &[("node-1", Some((Some(20), Some("b"))))],
            )],
        );
        let result = check(&ops.history(), &state, &CheckConfig::new());
        assert!(
            kinds(&result).contains(&ViolationKind::CacheAheadOfStore),
            "{strategy}: {:#?}",
            result.violations
        );
    }
}

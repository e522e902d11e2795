//! Tests of the table through its facade.

use std::sync::Arc;

use super::*;

fn table(capacity_bytes: u64) -> (Table, Instant) {
    let now = Instant::now();
    let config = TableConfig {
        capacity_bytes,
        max_dirty_bytes: capacity_bytes,
        shards: 4,
    };
    (Table::new(config, now), now)
}

fn dirty(version: u64, since: Instant, ttl: Option<Duration>) -> Meta {
    Meta {
        version,
        expires_at: None,
        dirty: Some(DirtyMeta { since, ttl }),
    }
}

/// The tallies recomputed from what the shards hold.
fn recount(table: &Table) -> TableStats {
    let mut stats = TableStats::default();
    for shard in table.shards.iter() {
        let mut shard = shard.lock().unwrap();
        assert_eq!(shard.index_delta(), 0, "index growth not accounted");
        let (mut dirty, mut on_probation) = (0, 0);
        for bucket in 0..shard.num_buckets() {
            if let Some(entry) = shard.bucket_mut(bucket) {
                let footprint = malloc_footprint(entry.alloc_len());
                stats.items += 1;
                on_probation += usize::from(entry.is_probation());
                if entry.is_dirty() {
                    assert!(!entry.is_probation(), "a dirty entry on probation");
                    dirty += 1;
                    stats.dirty_items += 1;
                    stats.dirty_bytes += footprint;
                } else {
                    stats.bytes += footprint;
                }
            }
        }
        assert_eq!(shard.dirty, dirty, "per-shard dirty count");
        assert_eq!(
            shard.on_probation, on_probation,
            "per-shard probation count"
        );
    }
    stats
}

/// Checks the tallies against the shards (the index's share is checked by
/// `index_delta` returning 0: it was charged when it changed).
fn assert_tallies_exact(table: &Table) {
    let counted = recount(table);
    let stats = table.stats();
    assert_eq!(
        (stats.items, stats.dirty_items, stats.dirty_bytes),
        (counted.items, counted.dirty_items, counted.dirty_bytes)
    );
    let index_bytes: u64 = table
        .shards
        .iter()
        .map(|shard| shard.lock().unwrap().index_footprint())
        .sum();
    assert_eq!(
        stats.bytes,
        counted.bytes + index_bytes,
        "clean bytes tally"
    );
}

#[test]
fn a_stored_entry_reads_back_with_its_header() {
    let (t, now) = table(1 << 20);
    let expires = now + Duration::from_secs(60);
    t.insert(b"key", b"value", Meta::clean(7, Some(expires)), now)
        .unwrap();
    let found = t.get(b"key", now).unwrap();
    assert_eq!(found.value, Bytes::from_static(b"value"));
    assert_eq!(found.meta, Meta::clean(7, Some(expires)));
    assert_eq!(t.get(b"other", now), None);
    assert!(t.remove(b"key", now));
    assert!(!t.remove(b"key", now));
    assert_eq!(t.get(b"key", now), None);
    assert_eq!(t.stats().items, 0);
    assert_tallies_exact(&t);
}

#[test]
fn an_expired_entry_is_never_returned_and_leaves_when_met() {
    let (t, now) = table(1 << 20);
    let ttl = Duration::from_millis(10);
    t.insert(b"key", b"value", Meta::clean(1, Some(now + ttl)), now)
        .unwrap();
    assert!(t.get(b"key", now + ttl - Duration::from_nanos(1)).is_some());
    assert_eq!(t.get(b"key", now + ttl), None);
    let seen = t
        .compute(b"key", now + ttl, |current| (Op::Keep, current.is_some()))
        .unwrap();
    assert!(!seen);
    let stats = t.stats();
    assert_eq!((stats.items, stats.expirations), (0, 1));
    assert_tallies_exact(&t);
}

#[test]
fn clean_bytes_stay_within_the_capacity_and_evictions_are_counted() {
    let capacity = 256 * 1024;
    let (t, now) = table(capacity);
    let value = [7u8; 100];
    for i in 0..20_000 {
        t.insert(
            format!("key:{i}").as_bytes(),
            &value,
            Meta::clean(1, None),
            now,
        )
        .unwrap();
        assert!(
            t.stats().bytes <= capacity,
            "over capacity after {i} writes"
        );
    }
    let stats = t.stats();
    assert!(stats.items > 1000, "{stats:?}");
    assert_eq!(stats.items + stats.evictions, 20_000);
    assert_tallies_exact(&t);
}

#[test]
fn dirty_entries_survive_any_eviction_pressure_and_do_not_expire() {
    let (t, now) = table(64 * 1024);
    for i in 0..100 {
        t.insert(
            format!("dirty:{i}").as_bytes(),
            b"d",
            dirty(1, now, Some(Duration::from_millis(1))),
            now,
        )
        .unwrap();
    }
    for i in 0..10_000 {
        t.insert(
            format!("clean:{i}").as_bytes(),
            &[0u8; 200],
            Meta::clean(1, None),
            now,
        )
        .unwrap();
    }
    let later = now + Duration::from_secs(3600);
    t.expire_some(later, usize::MAX);
    for i in 0..100 {
        let found = t
            .get(format!("dirty:{i}").as_bytes(), later)
            .expect("dirty entry kept");
        assert_eq!(found.meta, dirty(1, now, Some(Duration::from_millis(1))));
    }
    assert_eq!(t.stats().dirty_items, 100);
    assert_tallies_exact(&t);
}

#[test]
fn a_dirty_write_beyond_the_budget_is_refused_and_changes_nothing() {
    let now = Instant::now();
    let t = Table::new(
        TableConfig {
            capacity_bytes: 1 << 20,
            max_dirty_bytes: 1000,
            shards: 2,
        },
        now,
    );
    let mut stored = 0;
    let refused = loop {
        match t.insert(
            format!("k{stored}").as_bytes(),
            &[1u8; 100],
            dirty(1, now, None),
            now,
        ) {
            Ok(()) => stored += 1,
            Err(refused) => break refused,
        }
    };
    assert_eq!(refused.max, 1000);
    assert!(refused.bytes > 1000);
    assert!(t.stats().dirty_bytes <= 1000);
    // The refused key has no entry; a clean one over it would have stayed.
    assert_eq!(t.get(format!("k{stored}").as_bytes(), now), None);
    // A refused dirty write over a clean entry leaves the clean entry.
    t.insert(b"clean", b"value", Meta::clean(2, None), now)
        .unwrap();
    assert!(
        t.insert(b"clean", &[1u8; 2000], dirty(3, now, None), now)
            .is_err()
    );
    assert_eq!(t.get(b"clean", now).unwrap().meta, Meta::clean(2, None));
    assert_tallies_exact(&t);
}

#[test]
fn set_meta_makes_a_dirty_entry_clean_and_moves_its_bytes() {
    let (t, now) = table(1 << 20);
    t.insert(
        b"key",
        b"value",
        dirty(5, now, Some(Duration::from_secs(9))),
        now,
    )
    .unwrap();
    assert_eq!(t.stats().dirty_items, 1);
    let expires = now + Duration::from_secs(9);
    t.compute(b"key", now, |current| {
        let meta = current.unwrap().meta;
        let ttl = meta.dirty.unwrap().ttl.unwrap();
        (Op::SetMeta(Meta::clean(meta.version, Some(now + ttl))), ())
    })
    .unwrap();
    let stats = t.stats();
    assert_eq!(
        (stats.items, stats.dirty_items, stats.dirty_bytes),
        (1, 0, 0)
    );
    let found = t.get(b"key", now).unwrap();
    assert_eq!(found.meta, Meta::clean(5, Some(expires)));
    assert_eq!(found.value, Bytes::from_static(b"value"));
    assert_tallies_exact(&t);
}

#[test]
fn concurrent_read_modify_writes_lose_no_update() {
    let (t, now) = table(1 << 20);
    let t = Arc::new(t);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let t = Arc::clone(&t);
            std::thread::spawn(move || {
                for i in 0..2000 {
                    let key = format!("counter{}", i % 8);
                    t.compute(key.as_bytes(), now, |current| {
                        let n =
                            current.map_or(0, |e| u64::from_le_bytes(e.value.try_into().unwrap()));
                        let value = Cow::Owned((n + 1).to_le_bytes().to_vec());
                        (
                            Op::Put {
                                value,
                                meta: Meta::clean(n + 1, None),
                            },
                            (),
                        )
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let total: u64 = (0..8)
        .map(|i| {
            t.get(format!("counter{i}").as_bytes(), now)
                .unwrap()
                .meta
                .version
        })
        .sum();
    assert_eq!(total, 8000);
    assert_tallies_exact(&t);
}

#[test]
fn active_expiry_empties_a_table_nobody_reads() {
    let (t, now) = table(1 << 30);
    let ttl = Duration::from_secs(2);
    for i in 0..50_000 {
        t.insert(
            format!("key:{i}").as_bytes(),
            &[0u8; 100],
            Meta::clean(1, Some(now + ttl)),
            now,
        )
        .unwrap();
    }
    assert_eq!(t.expire_some(now + Duration::from_secs(1), 4096), 0);
    let later = now + ttl;
    let mut rounds = 0;
    while t.stats().items > 0 {
        t.expire_some(later, 4096);
        rounds += 1;
        assert!(rounds < 100, "expiry made no progress");
    }
    let stats = t.stats();
    assert_eq!(
        (stats.expirations, stats.bytes),
        (50_000, 0),
        "index memory given back"
    );
    assert_tallies_exact(&t);
}

#[test]
fn active_expiry_is_not_stalled_by_a_stretch_it_already_cleared() {
    let (t, now) = table(1 << 30);
    let at = now + Duration::from_secs(2);
    for i in 0..200_000 {
        t.insert(
            format!("key:{i}").as_bytes(),
            b"v",
            Meta::clean(1, Some(at)),
            now,
        )
        .unwrap();
    }
    // Before the expiry the hand walks a little on each call.
    for _ in 0..10 {
        assert_eq!(t.expire_some(now, 8192), 0);
    }
    // Enough calls to walk every bucket twice at full speed. When the
    // index shrinks midway, what is left sits in the upper part of the new
    // buckets: the hand, back at 0, first meets a stretch of empty ones.
    let buckets: usize = t
        .shards
        .iter()
        .map(|s| s.lock().unwrap().num_buckets())
        .max()
        .unwrap();
    let bound = 2 * buckets.div_ceil(8192) + 4;
    let mut calls = 0;
    while t.stats().items > 0 {
        t.expire_some(at, 8192);
        calls += 1;
        assert!(
            calls <= bound,
            "expiry stalled: {} left after {calls} calls",
            t.stats().items
        );
    }
}

#[test]
fn a_hot_set_survives_a_one_pass_scan() {
    let value = [0u8; 100];
    let per_entry = Table::entry_footprint(b"hot:000", &value) + 20;
    let (t, now) = table(2000 * per_entry);
    for round in 0..4 {
        for i in 0..500 {
            let key = format!("hot:{i:03}");
            if t.get(key.as_bytes(), now).is_none() {
                assert_eq!(round, 0, "{key} lost before the scan");
                t.insert(key.as_bytes(), &value, Meta::clean(1, None), now)
                    .unwrap();
            }
        }
    }
    for i in 0..20_000 {
        t.insert(
            format!("scan:{i}").as_bytes(),
            &value,
            Meta::clean(1, None),
            now,
        )
        .unwrap();
    }
    let kept = (0..500)
        .filter(|i| t.get(format!("hot:{i:03}").as_bytes(), now).is_some())
        .count();
    assert!(kept >= 450, "only {kept} of 500 hot keys survived the scan");
}

#[test]
fn clear_drops_everything_and_gives_memory_back() {
    let (t, now) = table(1 << 20);
    for i in 0..5000 {
        t.insert(format!("k{i}").as_bytes(), b"v", Meta::clean(1, None), now)
            .unwrap();
    }
    t.insert(b"dirty", b"v", dirty(1, now, None), now).unwrap();
    t.clear();
    assert_eq!(
        t.stats(),
        TableStats {
            evictions: t.stats().evictions,
            ..TableStats::default()
        }
    );
    assert_eq!(t.get(b"k1", now), None);
    let mut seen = 0;
    t.for_each_dirty(|_| seen += 1);
    assert_eq!(seen, 0);
    assert_tallies_exact(&t);
}

#[test]
fn for_each_dirty_sees_exactly_the_dirty_entries() {
    let (t, now) = table(1 << 20);
    for i in 0..100 {
        let meta = if i % 10 == 0 {
            dirty(i, now, None)
        } else {
            Meta::clean(i, None)
        };
        t.insert(format!("k{i}").as_bytes(), b"v", meta, now)
            .unwrap();
    }
    let mut seen = Vec::new();
    t.for_each_dirty(|entry| seen.push(entry.meta.version));
    seen.sort_unstable();
    assert_eq!(seen, (0..10).map(|i| i * 10).collect::<Vec<_>>());
}

#[test]
fn a_key_evicted_from_probation_skips_it_when_written_again() {
    let now = Instant::now();
    let value = [0u8; 100];
    let per_entry = Table::entry_footprint(b"key:0000", &value) + 40;
    let t = Table::new(
        TableConfig {
            capacity_bytes: 1000 * per_entry,
            max_dirty_bytes: 0,
            shards: 1,
        },
        now,
    );
    for i in 0..5000 {
        t.insert(
            format!("key:{i:04}").as_bytes(),
            &value,
            Meta::clean(1, None),
            now,
        )
        .unwrap();
    }
    // The latest evicted.
    let evicted: Vec<String> = (0..5000)
        .rev()
        .map(|i| format!("key:{i:04}"))
        .filter(|key| t.get(key.as_bytes(), now).is_none())
        .take(100)
        .collect();
    assert_eq!(evicted.len(), 100);
    let mut skipped = 0;
    for key in &evicted {
        t.insert(key.as_bytes(), &value, Meta::clean(2, None), now)
            .unwrap();
        let shard = t.shards[0].lock().unwrap();
        let index = shard.find(t.hash(key.as_bytes()), key.as_bytes()).unwrap();
        skipped += usize::from(!shard.at(index).is_probation());
    }
    // Ghosts are remembered for a while, not forever: most of the lately
    // evicted come straight back into the main part.
    assert!(skipped >= 50, "only {skipped} of 100 skipped probation");
    assert_tallies_exact(&t);
}

mod model {
    //! Random operation sequences against a plain map of what should be
    //! live (no eviction: the capacity is never reached).

    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Step {
        Put {
            key: u8,
            len: usize,
            version: u64,
            ttl_ms: Option<u64>,
            dirty: bool,
        },
        Remove {
            key: u8,
        },
        Clean {
            key: u8,
        },
        Advance {
            ms: u64,
        },
        Expire,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u8..16, 0usize..300, 1u64..100, proptest::option::of(1u64..2000), any::<bool>())
                .prop_map(|(key, len, version, ttl_ms, dirty)| Step::Put { key, len, version, ttl_ms, dirty }),
            1 => (0u8..16).prop_map(|key| Step::Remove { key }),
            1 => (0u8..16).prop_map(|key| Step::Clean { key }),
            2 => (0u64..1000).prop_map(|ms| Step::Advance { ms }),
            1 => Just(Step::Expire),
        ]
    }

    /// What the model holds for a key: value and header.
    type Model = HashMap<u8, (Vec<u8>, Meta)>;

    fn live(model: &Model, key: u8, now: Instant) -> Option<&(Vec<u8>, Meta)> {
        model
            .get(&key)
            .filter(|(_, meta)| meta.dirty.is_some() || meta.expires_at.is_none_or(|at| at > now))
    }

    proptest! {
        #[test]
        fn the_table_agrees_with_a_plain_map(steps in proptest::collection::vec(step(), 1..200)) {
            let (t, start) = table(1 << 30);
            let mut now = start;
            let mut model = Model::new();
            for step in steps {
                match step {
                    Step::Put { key, len, version, ttl_ms, dirty } => {
                        let value = vec![key; len];
                        let meta = if dirty {
                            Meta { version, expires_at: None, dirty: Some(DirtyMeta { since: now, ttl: ttl_ms.map(Duration::from_millis) }) }
                        } else {
                            Meta::clean(version, ttl_ms.map(|ms| now + Duration::from_millis(ms)))
                        };
                        t.insert(&[key], &value, meta, now).unwrap();
                        model.insert(key, (value, meta));
                    }
                    Step::Remove { key } => {
                        let removed = t.remove(&[key], now);
                        prop_assert_eq!(removed, live(&model, key, now).is_some());
                        model.remove(&key);
                    }
                    Step::Clean { key } => {
                        t.compute(&[key], now, |current| match current.and_then(|e| e.meta.dirty.map(|d| (e.meta.version, d))) {
                            Some((version, dirty)) => (Op::SetMeta(Meta::clean(version, dirty.ttl.map(|ttl| now + ttl))), ()),
                            None => (Op::Keep, ()),
                        }).unwrap();
                        if let Some((_, meta)) = model.get_mut(&key)
                            && let Some(dirty) = meta.dirty
                        {
                            *meta = Meta::clean(meta.version, dirty.ttl.map(|ttl| now + ttl));
                        }
                    }
                    Step::Advance { ms } => now += Duration::from_millis(ms),
                    Step::Expire => {
                        t.expire_some(now, usize::MAX);
                    }
                }
                for key in 0..16u8 {
                    let found = t.get(&[key], now);
                    let expected = live(&model, key, now);
                    prop_assert_eq!(found.as_ref().map(|f| (f.value.to_vec(), f.meta)), expected.cloned(), "key {}", key);
                }
            }
            t.expire_some(now, usize::MAX);
            let expected_items = (0..16u8).filter(|&k| live(&model, k, now).is_some()).count() as u64;
            prop_assert_eq!(t.stats().items, expected_items);
            assert_tallies_exact(&t);
        }
    }
}

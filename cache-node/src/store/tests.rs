use super::*;
use crate::table::Table;

fn store(extra: &str) -> Store {
    let mut config = Config::from_toml(extra).unwrap();
    config.validate().unwrap();
    Store::new(&config)
}

fn item(key: &str, value: &str, version: u64, condition: WriteCondition) -> SetItem {
    SetItem {
        key: Bytes::copy_from_slice(key.as_bytes()),
        value: Bytes::copy_from_slice(value.as_bytes()),
        version,
        ttl: None,
        condition,
        dirty: false,
    }
}

#[test]
fn fenced_write_refuses_equal_and_older_versions() {
    let s = store("");
    let set = |v, c| s.set("default", item("k", &format!("v{v}"), v, c)).unwrap();
    assert_eq!(
        set(5, WriteCondition::IfNewerVersion).outcome,
        SetOutcome::Stored
    );
    for old in [5, 4, 0] {
        let r = set(old, WriteCondition::IfNewerVersion);
        assert_eq!(r.outcome, SetOutcome::StaleVersion);
        assert_eq!(r.current_version, 5);
    }
    assert_eq!(s.get("default", b"k").unwrap().unwrap().value, "v5");
    assert_eq!(
        set(6, WriteCondition::IfNewerVersion).outcome,
        SetOutcome::Stored
    );
    assert_eq!(s.get("default", b"k").unwrap().unwrap().version, 6);
}

#[test]
fn racing_fenced_writes_keep_the_highest_version() {
    let s = Arc::new(store(""));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                for v in (t..2000).step_by(4) {
                    s.set(
                        "default",
                        item("k", &v.to_string(), v, WriteCondition::IfNewerVersion),
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let hit = s.get("default", b"k").unwrap().unwrap();
    assert_eq!(hit.version, 1999);
    assert_eq!(hit.value, "1999");
}

#[test]
fn if_absent_stores_once() {
    let s = store("");
    let first = s
        .set("default", item("k", "a", 1, WriteCondition::IfAbsent))
        .unwrap();
    assert_eq!(first.outcome, SetOutcome::Stored);
    let second = s
        .set("default", item("k", "b", 2, WriteCondition::IfAbsent))
        .unwrap();
    assert_eq!(second.outcome, SetOutcome::Exists);
    assert_eq!(second.current_version, 1);
    assert_eq!(s.get("default", b"k").unwrap().unwrap().value, "a");
}

#[test]
fn if_present_stores_only_over_a_live_entry() {
    let s = store("");
    let missing = s
        .set("default", item("k", "a", 0, WriteCondition::IfPresent))
        .unwrap();
    assert_eq!(missing.outcome, SetOutcome::Missing);
    assert_eq!(s.get("default", b"k").unwrap(), None);
    s.set("default", item("k", "a", 0, WriteCondition::Unconditional))
        .unwrap();
    let stored = s
        .set("default", item("k", "b", 0, WriteCondition::IfPresent))
        .unwrap();
    assert_eq!(stored.outcome, SetOutcome::Stored);
    assert_eq!(s.get("default", b"k").unwrap().unwrap().value, "b");
}

#[test]
fn incr_is_atomic_and_keeps_version_and_expiry() {
    let s = Arc::new(store(""));
    assert_eq!(s.incr("default", b"n", 5).unwrap(), 5);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                for _ in 0..1000 {
                    s.incr("default", b"n", 1).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(s.incr("default", b"n", -5).unwrap(), 4000);
    let mut with_ttl = item("t", "41", 9, WriteCondition::Unconditional);
    with_ttl.ttl = Some(Duration::from_secs(60));
    s.set("default", with_ttl).unwrap();
    assert_eq!(s.incr("default", b"t", 1).unwrap(), 42);
    let hit = s.get("default", b"t").unwrap().unwrap();
    assert_eq!((hit.value.as_ref(), hit.version), (&b"42"[..], 9));
    assert!(hit.ttl_remaining.is_some());
    s.set(
        "default",
        item("x", "abc", 0, WriteCondition::Unconditional),
    )
    .unwrap();
    assert!(matches!(
        s.incr("default", b"x", 1),
        Err(Error::NotAnInteger)
    ));
    s.set(
        "default",
        item("m", &i64::MAX.to_string(), 0, WriteCondition::Unconditional),
    )
    .unwrap();
    assert!(matches!(
        s.incr("default", b"m", 1),
        Err(Error::IncrementOverflow)
    ));
    let mut dirty = item("d", "1", 3, WriteCondition::Unconditional);
    dirty.dirty = true;
    s.set("default", dirty).unwrap();
    assert!(matches!(s.incr("default", b"d", 1), Err(Error::DirtyEntry)));
}

#[test]
fn expire_changes_only_the_ttl_of_a_live_entry() {
    let s = store("");
    assert!(!s.expire("default", b"k", Duration::from_secs(5)).unwrap());
    s.set("default", item("k", "v", 7, WriteCondition::Unconditional))
        .unwrap();
    assert_eq!(s.get("default", b"k").unwrap().unwrap().ttl_remaining, None);
    assert!(s.expire("default", b"k", Duration::from_secs(5)).unwrap());
    let hit = s.get("default", b"k").unwrap().unwrap();
    assert_eq!((hit.value.as_ref(), hit.version), (&b"v"[..], 7));
    assert!(hit.ttl_remaining.unwrap() <= Duration::from_secs(5));
    assert!(s.expire("default", b"k", Duration::from_millis(1)).unwrap());
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(s.get("default", b"k").unwrap(), None);
    assert!(matches!(
        s.expire("default", b"k", Duration::from_secs(400 * 24 * 3600)),
        Err(Error::TtlOutOfRange { .. })
    ));
}

#[test]
fn expired_entries_are_not_read_even_before_the_table_removes_them() {
    let s = store("");
    let ks = s.keyspace("default").unwrap();
    let t0 = Instant::now();
    let mut it = item("k", "v", 1, WriteCondition::Unconditional);
    it.ttl = Some(Duration::from_secs(10));
    ks.set(it, t0).unwrap();
    assert!(ks.get(b"k", t0 + Duration::from_secs(9)).is_some());
    assert_eq!(
        ks.get(b"k", t0 + Duration::from_secs(9))
            .unwrap()
            .ttl_remaining,
        Some(Duration::from_secs(1))
    );
    assert!(ks.get(b"k", t0 + Duration::from_secs(10)).is_none());
    // An expired entry counts as absent for if-absent and fenced writes.
    let r = ks.set(
        item("k", "w", 0, WriteCondition::IfAbsent),
        t0 + Duration::from_secs(11),
    );
    assert_eq!(r.unwrap().outcome, SetOutcome::Stored);
}

#[test]
fn default_ttl_applies_when_the_write_gives_none() {
    let s = store("[keyspaces.short]\ndefault_ttl = \"2s\"");
    s.set("short", item("k", "v", 1, WriteCondition::Unconditional))
        .unwrap();
    let ttl = s
        .get("short", b"k")
        .unwrap()
        .unwrap()
        .ttl_remaining
        .unwrap();
    assert!(
        ttl <= Duration::from_secs(2) && ttl > Duration::ZERO,
        "{ttl:?}"
    );
    s.set("default", item("k", "v", 1, WriteCondition::Unconditional))
        .unwrap();
    assert_eq!(s.get("default", b"k").unwrap().unwrap().ttl_remaining, None);
}

#[test]
fn capacity_is_bounded_in_bytes() {
    let s = store("[limits]\nmax_value_bytes = 1000\n[keyspaces.small]\ncapacity_bytes = 100000");
    let value = "x".repeat(1000);
    for i in 0..1000 {
        s.set(
            "small",
            item(
                &format!("key-{i}"),
                &value,
                1,
                WriteCondition::Unconditional,
            ),
        )
        .unwrap();
    }
    let stats = s.stats(Some("small")).unwrap().remove(0);
    assert!(stats.bytes <= 100_000, "{stats:?}");
    assert!(stats.evictions > 0, "{stats:?}");
    let per_entry = Table::entry_footprint(b"key-999", value.as_bytes());
    assert!(stats.items <= 100_000 / per_entry, "{stats:?}");
}

#[test]
fn bad_input_names_the_limit_and_writes_nothing() {
    let s = store(
        "[limits]\nmax_key_bytes = 4\nmax_value_bytes = 8\nmax_ttl = \"1m\"\nmax_batch_keys = 2",
    );
    let err = |r: Result<SetResult>| r.unwrap_err().to_string();
    assert_eq!(
        err(s.set("default", item("", "v", 1, WriteCondition::Unconditional))),
        "key is empty"
    );
    assert_eq!(
        err(s.set(
            "default",
            item("12345", "v", 1, WriteCondition::Unconditional)
        )),
        "key of 5 bytes exceeds max_key_bytes (4)"
    );
    assert_eq!(
        err(s.set(
            "default",
            item("k", "123456789", 1, WriteCondition::Unconditional)
        )),
        "value of 9 bytes exceeds max_value_bytes (8)"
    );
    let mut long = item("k", "v", 1, WriteCondition::Unconditional);
    long.ttl = Some(Duration::from_secs(61));
    assert_eq!(
        err(s.set("default", long)),
        "ttl of 61000 ms exceeds max_ttl (60000 ms)"
    );
    assert_eq!(
        err(s.set("nope", item("k", "v", 1, WriteCondition::Unconditional))),
        "unknown keyspace \"nope\" (unknown_keyspaces = \"reject\")"
    );
    let batch = vec![
        item("a", "v", 1, WriteCondition::Unconditional),
        item("b", "v", 1, WriteCondition::Unconditional),
        item("c", "v", 1, WriteCondition::Unconditional),
    ];
    assert_eq!(
        s.multi_set("default", batch).unwrap_err().to_string(),
        "batch of 3 keys exceeds max_batch_keys (2)"
    );
    // One bad item rejects the whole batch before anything is written.
    let batch = vec![
        item("a", "v", 1, WriteCondition::Unconditional),
        item("toolong", "v", 1, WriteCondition::Unconditional),
    ];
    assert!(s.multi_set("default", batch).is_err());
    assert_eq!(s.get("default", b"a").unwrap(), None);
    assert!(s.stats(None).unwrap().iter().all(|k| k.sets == 0));
}

#[test]
fn unknown_keyspaces_can_be_created_on_demand_up_to_the_limit() {
    let s = store("unknown_keyspaces = \"create\"\n[limits]\nmax_keyspaces = 2");
    s.set("fresh", item("k", "v", 1, WriteCondition::Unconditional))
        .unwrap();
    assert_eq!(s.get("fresh", b"k").unwrap().unwrap().value, "v");
    let err = s.get("third", b"k").unwrap_err();
    assert!(matches!(err, Error::TooManyKeyspaces { .. }), "{err}");
    let err = s.get("bad name", b"k").unwrap_err();
    assert!(matches!(err, Error::InvalidKeyspaceName { .. }), "{err}");
}

#[test]
fn flush_drops_every_entry_of_the_named_keyspaces() {
    let s = store("[keyspaces.other]");
    for ks in ["default", "other"] {
        s.set(ks, item("k", "v", 1, WriteCondition::Unconditional))
            .unwrap();
    }
    s.flush(Some("other")).unwrap();
    assert!(s.get("other", b"k").unwrap().is_none());
    assert!(s.get("default", b"k").unwrap().is_some());
    s.flush(None).unwrap();
    assert!(s.get("default", b"k").unwrap().is_none());
    assert!(s.flush(Some("nope")).is_err());
}

#[test]
fn delete_reports_whether_a_live_entry_went() {
    let s = store("");
    assert!(!s.delete("default", b"k").unwrap());
    s.set("default", item("k", "v", 1, WriteCondition::Unconditional))
        .unwrap();
    assert!(s.delete("default", b"k").unwrap());
    assert_eq!(s.get("default", b"k").unwrap(), None);
    let stats = s.stats(Some("default")).unwrap().remove(0);
    assert_eq!(
        (stats.sets, stats.deletes, stats.hits, stats.misses),
        (1, 1, 0, 1)
    );
}

// ---- leases ----

fn keyspace(toml_keyspace: &str) -> Keyspace {
    let mut config = Config::from_toml(&format!("[keyspaces.t]\n{toml_keyspace}")).unwrap();
    config.validate().unwrap();
    Keyspace::new(
        "t",
        config.keyspaces["t"].clone(),
        config.limits.in_doubt_ttl,
    )
}

fn token(read: LeaseRead) -> u64 {
    match read {
        LeaseRead::Granted { token } => token,
        other => panic!("expected a lease, got {other:?}"),
    }
}

fn fill_item(key: &str, value: &str, version: u64) -> SetItem {
    // The condition is ignored by fills; Unconditional proves it.
    item(key, value, version, WriteCondition::Unconditional)
}

#[test]
fn a_cold_key_gets_one_lease_and_the_others_wait() {
    let ks = keyspace("");
    let tokens = Tokens::new();
    let now = Instant::now();
    let t = token(ks.lease_get(b"k", now, &tokens));
    assert_ne!(t, 0);
    for _ in 0..3 {
        assert_eq!(
            ks.lease_get(b"k", now, &tokens),
            LeaseRead::Wait {
                retry_after: crate::config::DEFAULT_LEASE_RETRY_AFTER,
                stale: None
            }
        );
    }
    let r = ks.fill(fill_item("k", "v", 3), t, now);
    assert_eq!(
        r,
        FillResult {
            outcome: FillOutcome::Stored,
            current_version: 3
        }
    );
    let LeaseRead::Hit(hit) = ks.lease_get(b"k", now, &tokens) else {
        panic!("filled key must hit");
    };
    assert_eq!((hit.value.as_ref(), hit.version), (&b"v"[..], 3));
    // The lease was released by the fill: the record is gone.
    assert_eq!(ks.records.count.load(Ordering::SeqCst), 0);
    let stats = ks.stats();
    assert_eq!(
        (
            stats.leases_granted,
            stats.lease_waits,
            stats.fills_stored,
            stats.fills_refused
        ),
        (1, 3, 1, 0)
    );
    assert_eq!((stats.hits, stats.misses), (1, 4));
}

#[test]
fn fills_without_the_current_lease_are_refused() {
    let ks = keyspace("");
    let tokens = Tokens::new();
    let now = Instant::now();
    // Never granted.
    assert_eq!(
        ks.fill(fill_item("k", "v", 1), 0, now).outcome,
        FillOutcome::LeaseInvalid
    );
    assert_eq!(
        ks.fill(fill_item("k", "v", 1), 12345, now).outcome,
        FillOutcome::LeaseInvalid
    );
    let t = token(ks.lease_get(b"k", now, &tokens));
    // Wrong token for this key, and a token of another key.
    let other = token(ks.lease_get(b"other", now, &tokens));
    assert_eq!(
        ks.fill(fill_item("k", "v", 1), other, now).outcome,
        FillOutcome::LeaseInvalid
    );
    assert_eq!(
        ks.fill(fill_item("k", "v", 1), t.wrapping_add(1), now)
            .outcome,
        FillOutcome::LeaseInvalid
    );
    assert_eq!(
        ks.fill(fill_item("k", "v", 1), t, now).outcome,
        FillOutcome::Stored
    );
    // Used once: the lease is released.
    ks.delete(b"k", now);
    assert_eq!(
        ks.fill(fill_item("k", "v", 2), t, now).outcome,
        FillOutcome::LeaseInvalid
    );
    assert!(ks.get(b"k", now).is_none());
    assert_eq!(ks.stats().fills_refused, 5);
}

#[test]
fn expired_leases_free_the_key() {
    let ks = keyspace("lease_ttl = \"2s\"");
    let tokens = Tokens::new();
    let t0 = Instant::now();
    let first = token(ks.lease_get(b"k", t0, &tokens));
    assert!(matches!(
        ks.lease_get(b"k", t0 + Duration::from_millis(1999), &tokens),
        LeaseRead::Wait { .. }
    ));
    let later = t0 + Duration::from_secs(2);
    let second = token(ks.lease_get(b"k", later, &tokens));
    assert_ne!(first, second);
    assert_eq!(
        ks.fill(fill_item("k", "v", 1), first, later).outcome,
        FillOutcome::LeaseInvalid
    );
    // The new holder's lease expires too, and then its fill is refused.
    assert_eq!(
        ks.fill(
            fill_item("k", "v", 1),
            second,
            later + Duration::from_secs(2)
        )
        .outcome,
        FillOutcome::LeaseInvalid
    );
}

#[test]
fn every_write_touching_the_key_invalidates_its_lease() {
    let s = store("[keyspaces.other]");
    let lease = |key: &str| token(s.lease_get("default", key.as_bytes()).unwrap());
    let fill = |key: &str, t| {
        s.fill("default", fill_item(key, "loaded-before", 1), t)
            .unwrap()
            .outcome
    };

    let t = lease("deleted");
    s.delete("default", b"deleted").unwrap();
    assert_eq!(fill("deleted", t), FillOutcome::LeaseInvalid);
    assert_eq!(s.get("default", b"deleted").unwrap(), None);

    let t = lease("set");
    s.set(
        "default",
        item("set", "written", 0, WriteCondition::Unconditional),
    )
    .unwrap();
    assert_eq!(fill("set", t), FillOutcome::LeaseInvalid);
    assert_eq!(s.get("default", b"set").unwrap().unwrap().value, "written");

    let t = lease("multi");
    s.multi_set(
        "default",
        vec![
            item("unrelated", "x", 1, WriteCondition::Unconditional),
            item("multi", "written", 9, WriteCondition::IfNewerVersion),
        ],
    )
    .unwrap();
    assert_eq!(fill("multi", t), FillOutcome::LeaseInvalid);

    // A refused write still touched the key.
    s.set(
        "default",
        item("refused", "v", 5, WriteCondition::Unconditional),
    )
    .unwrap();
    s.delete("default", b"refused").unwrap();
    let t = lease("refused");
    s.set("default", item("refused", "w", 0, WriteCondition::IfAbsent))
        .unwrap();
    assert_eq!(fill("refused", t), FillOutcome::LeaseInvalid);

    let t = lease("flushed");
    s.flush(Some("default")).unwrap();
    assert_eq!(fill("flushed", t), FillOutcome::LeaseInvalid);

    // A flush of another keyspace leaves this keyspace's leases alone.
    let t = lease("kept");
    s.flush(Some("other")).unwrap();
    assert_eq!(fill("kept", t), FillOutcome::Stored);
}

#[test]
fn a_fill_is_fenced_against_a_live_entry() {
    let ks = keyspace("");
    let tokens = Tokens::new();
    let now = Instant::now();
    let t = token(ks.lease_get(b"k", now, &tokens));
    // A write that raced past the lease (the lock-free path of a keyspace
    // with no records) is modelled by storing without touching records.
    ks.put_clean(b"k", b"new", 7, None, WriteCondition::Unconditional, now);
    assert_eq!(
        ks.fill(fill_item("k", "old", 7), t, now),
        FillResult {
            outcome: FillOutcome::StaleVersion,
            current_version: 7
        }
    );
    assert_eq!(ks.get(b"k", now).unwrap().value, "new");
    // The lease was released all the same.
    assert_eq!(ks.records.count.load(Ordering::SeqCst), 0);
    assert_eq!(ks.stats().fills_refused, 1);
}

#[test]
fn deleted_values_are_kept_as_stale_only_when_configured() {
    let ks = keyspace("keep_stale_for = \"5s\"");
    let tokens = Tokens::new();
    let t0 = Instant::now();
    ks.set(item("k", "old", 4, WriteCondition::Unconditional), t0)
        .unwrap();
    assert!(ks.delete(b"k", t0));
    // Never a hit.
    assert_eq!(ks.get(b"k", t0), None);
    // The lease holder gets no stale value; the waiters do.
    let t = token(ks.lease_get(b"k", t0, &tokens));
    let LeaseRead::Wait {
        stale: Some(stale), ..
    } = ks.lease_get(b"k", t0 + Duration::from_secs(1), &tokens)
    else {
        panic!("a waiter must get the stale value");
    };
    assert_eq!((stale.value.as_ref(), stale.version), (&b"old"[..], 4));
    assert_eq!(stale.ttl_remaining, Some(Duration::from_secs(4)));
    // After the window, no stale value.
    assert_eq!(
        ks.lease_get(b"k", t0 + Duration::from_secs(5), &tokens),
        LeaseRead::Wait {
            retry_after: crate::config::DEFAULT_LEASE_RETRY_AFTER,
            stale: None
        }
    );
    // A fill drops the stale value with the lease.
    ks.fill(fill_item("k", "new", 5), t, t0 + Duration::from_secs(1));
    assert_eq!(ks.records.count.load(Ordering::SeqCst), 0);
    assert_eq!(ks.records.stale_bytes.load(Ordering::Relaxed), 0);

    // Without keep_stale_for, nothing is kept and no record is made.
    let plain = keyspace("");
    plain
        .set(item("k", "old", 4, WriteCondition::Unconditional), t0)
        .unwrap();
    plain.delete(b"k", t0);
    assert_eq!(plain.records.count.load(Ordering::SeqCst), 0);
    token(plain.lease_get(b"k", t0, &tokens));
    assert_eq!(
        plain.lease_get(b"k", t0, &tokens),
        LeaseRead::Wait {
            retry_after: crate::config::DEFAULT_LEASE_RETRY_AFTER,
            stale: None
        }
    );
}

#[test]
fn stale_values_stay_within_their_budget() {
    // Budget: capacity / 8 = 16 KiB, so at most a few 4 KiB values.
    let ks = keyspace("capacity_bytes = 1200000\nkeep_stale_for = \"1m\"");
    let now = Instant::now();
    let value = "x".repeat(100_000);
    for i in 0..20 {
        let key = format!("k{i}");
        ks.set(item(&key, &value, 1, WriteCondition::Unconditional), now)
            .unwrap();
        ks.delete(key.as_bytes(), now);
    }
    let held = ks.records.stale_bytes.load(Ordering::Relaxed);
    assert!(held <= 1_200_000 / STALE_BUDGET_DIVISOR, "{held}");
    assert!(held > 0);
}

#[test]
fn tokens_are_unique_and_never_zero() {
    let tokens = Tokens::new();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..100_000 {
        let t = tokens.next();
        assert_ne!(t, 0);
        assert!(seen.insert(t), "token {t} repeated");
    }
    // Another process (here: another source) starts elsewhere.
    assert_ne!(Tokens::new().base, tokens.base);
}

#[test]
fn the_record_table_is_swept_of_expired_leases() {
    let ks = keyspace("lease_ttl = \"1s\"\nkeep_stale_for = \"2s\"");
    let tokens = Tokens::new();
    let t0 = Instant::now();
    for i in 0..1000 {
        token(ks.lease_get(format!("k{i}").as_bytes(), t0, &tokens));
    }
    ks.set(item("s", "v", 1, WriteCondition::Unconditional), t0)
        .unwrap();
    ks.delete(b"s", t0);
    assert_eq!(ks.records.count.load(Ordering::SeqCst), 1001);
    assert_eq!(ks.sweep(t0 + Duration::from_millis(999)), 0);
    assert_eq!(ks.records.table.len(), 1001);
    ks.sweep(t0 + Duration::from_secs(1));
    assert_eq!(ks.records.table.len(), 1, "only the stale value is left");
    ks.sweep(t0 + Duration::from_secs(2));
    assert_eq!(ks.records.table.len(), 0);
    assert_eq!(ks.records.count.load(Ordering::SeqCst), 0);
    assert_eq!(ks.records.stale_bytes.load(Ordering::Relaxed), 0);
}

/// The stale-set race, hammered. Each round, a writer bumps the
/// "database" version and then deletes the key, while readers miss, take
/// the lease, read the database and fill. A fill of a version read before
/// the bump held a lease granted before the delete, which the delete
/// invalidated; so once a delete has returned, no read sees an older
/// version, and at the end of each round the live entry (if any) holds
/// the latest version.
#[test]
fn no_fill_survives_a_later_delete() {
    const ROUNDS: usize = 3000;
    const READERS: usize = 2;
    for keep_stale in ["", "keep_stale_for = \"1s\""] {
        let ks = Arc::new(keyspace(keep_stale));
        let tokens = Arc::new(Tokens::new());
        let database = Arc::new(AtomicU64::new(1));
        // The database version whose delete has returned.
        let deleted_upto = Arc::new(AtomicU64::new(0));
        let barrier = Arc::new(std::sync::Barrier::new(READERS + 1));
        // Readers record what they saw instead of panicking, which would
        // leave the others waiting at the barrier forever.
        let stale_reads = Arc::new(AtomicU64::new(0));
        let readers: Vec<_> = (0..READERS)
            .map(|_| {
                let (ks, tokens, database, deleted_upto, barrier, stale_reads) = (
                    Arc::clone(&ks),
                    Arc::clone(&tokens),
                    Arc::clone(&database),
                    Arc::clone(&deleted_upto),
                    Arc::clone(&barrier),
                    Arc::clone(&stale_reads),
                );
                std::thread::spawn(move || {
                    for _ in 0..ROUNDS {
                        barrier.wait();
                        for _ in 0..4 {
                            let floor = deleted_upto.load(Ordering::SeqCst);
                            match ks.lease_get(b"k", Instant::now(), &tokens) {
                                LeaseRead::Hit(hit) => {
                                    if hit.version < floor {
                                        stale_reads.fetch_add(1, Ordering::SeqCst);
                                    }
                                }
                                LeaseRead::Granted { token } => {
                                    let version = database.load(Ordering::SeqCst);
                                    let loaded = SetItem {
                                        key: Bytes::from_static(b"k"),
                                        value: Bytes::from(version.to_string()),
                                        version,
                                        ttl: None,
                                        condition: WriteCondition::Unconditional,
                                        dirty: false,
                                    };
                                    ks.fill(loaded, token, Instant::now());
                                }
                                LeaseRead::Wait { .. } => std::thread::yield_now(),
                            }
                        }
                        barrier.wait();
                    }
                })
            })
            .collect();
        let mut survivors = 0;
        for _ in 0..ROUNDS {
            barrier.wait();
            let version = database.fetch_add(1, Ordering::SeqCst) + 1;
            ks.delete(b"k", Instant::now());
            deleted_upto.store(version, Ordering::SeqCst);
            barrier.wait();
            // The readers are parked at the next round's start.
            if ks
                .get(b"k", Instant::now())
                .is_some_and(|hit| hit.version != version)
            {
                survivors += 1;
            }
        }
        for reader in readers {
            reader.join().unwrap();
        }
        let stats = ks.stats();
        assert_eq!(
            survivors, 0,
            "fills from before a delete survived it; {stats:?}"
        );
        assert_eq!(
            stale_reads.load(Ordering::SeqCst),
            0,
            "reads saw versions older than a returned delete; {stats:?}"
        );
        assert!(stats.fills_stored > 0, "{stats:?}");
    }
}

// ---- 2PC pending changes ----

fn prepare(key: &str, value: &str, version: u64, txn: &str) -> Prepare {
    Prepare {
        item: item(key, value, version, WriteCondition::Unconditional),
        delete: false,
        txn_id: txn.to_owned(),
        timeout: None,
    }
}

const TIMEOUT: Duration = Duration::from_secs(10);

#[test]
fn a_pending_change_is_invisible_until_committed() {
    let ks = keyspace("");
    let tokens = Tokens::new();
    let now = Instant::now();
    ks.set(
        item("k", "committed", 1, WriteCondition::Unconditional),
        now,
    )
    .unwrap();
    let r = ks.prepare(&prepare("k", "pending", 2, "tx"), TIMEOUT, now);
    assert_eq!(
        r,
        PrepareResult {
            prepared: true,
            current_version: 1,
            busy: false,
            in_doubt: None,
        }
    );
    assert_eq!(ks.get(b"k", now).unwrap().value, "committed");
    let LeaseRead::Hit(hit) = ks.lease_get(b"k", now, &tokens) else {
        panic!("the committed entry is a hit");
    };
    assert_eq!(hit.value, "committed");
    // A pending change on an absent key: misses wait, get no lease.
    ks.prepare(&prepare("new", "pending", 1, "tx2"), TIMEOUT, now);
    assert_eq!(ks.get(b"new", now), None);
    assert!(matches!(
        ks.lease_get(b"new", now, &tokens),
        LeaseRead::Wait { .. }
    ));

    let r = ks.commit(b"k", "tx", now);
    assert_eq!(
        r,
        CommitResult {
            committed: true,
            current_version: 2
        }
    );
    assert_eq!(ks.get(b"k", now).unwrap().value, "pending");
    // Committed once: the second commit finds nothing.
    assert!(!ks.commit(b"k", "tx", now).committed);
}

#[test]
fn prepare_invalidates_the_lease_and_refuses_fills_while_pending() {
    let ks = keyspace("");
    let tokens = Tokens::new();
    let now = Instant::now();
    let t = token(ks.lease_get(b"k", now, &tokens));
    ks.prepare(&prepare("k", "pending", 5, "tx"), TIMEOUT, now);
    assert_eq!(
        ks.fill(fill_item("k", "loaded", 4), t, now).outcome,
        FillOutcome::LeaseInvalid
    );
    assert!(ks.abort(b"k", "tx", now));
    // After the abort the key is free again.
    let t = token(ks.lease_get(b"k", now, &tokens));
    assert_eq!(
        ks.fill(fill_item("k", "loaded", 4), t, now).outcome,
        FillOutcome::Stored
    );
}

#[test]
fn one_transaction_per_key_and_prepare_is_idempotent() {
    let ks = keyspace("");
    let now = Instant::now();
    assert!(
        ks.prepare(&prepare("k", "a", 2, "tx1"), TIMEOUT, now)
            .prepared
    );
    assert!(
        ks.prepare(&prepare("k", "a", 2, "tx1"), TIMEOUT, now)
            .prepared
    );
    assert!(
        !ks.prepare(&prepare("k", "b", 3, "tx2"), TIMEOUT, now)
            .prepared
    );
    // Commit and abort of another transaction do nothing.
    assert!(!ks.commit(b"k", "tx2", now).committed);
    assert!(!ks.abort(b"k", "tx2", now));
    assert!(ks.commit(b"k", "tx1", now).committed);
    assert_eq!(ks.get(b"k", now).unwrap().value, "a");
    // A change not newer than the live entry is refused.
    let r = ks.prepare(&prepare("k", "old", 2, "tx3"), TIMEOUT, now);
    assert_eq!(
        r,
        PrepareResult {
            prepared: false,
            current_version: 2,
            busy: false,
            in_doubt: None,
        }
    );
    assert!(
        ks.prepare(&prepare("k", "c", 3, "tx3"), TIMEOUT, now)
            .prepared
    );
    let stats = ks.stats();
    assert_eq!((stats.prepares, stats.commits, stats.aborts), (2, 1, 0));
}

#[test]
fn commit_is_fenced_and_applies_ttl_from_the_commit() {
    let ks = keyspace("");
    let t0 = Instant::now();
    let mut p = prepare("k", "pending", 5, "tx");
    p.item.ttl = Some(Duration::from_secs(60));
    ks.prepare(&p, TIMEOUT, t0);
    let t1 = t0 + Duration::from_secs(5);
    ks.commit(b"k", "tx", t1);
    assert_eq!(
        ks.get(b"k", t1).unwrap().ttl_remaining,
        Some(Duration::from_secs(60))
    );

    // A newer write landed while the change was pending: it wins.
    ks.prepare(&prepare("k", "pending", 6, "tx2"), TIMEOUT, t1);
    ks.set(item("k", "newer", 9, WriteCondition::Unconditional), t1)
        .unwrap();
    assert_eq!(
        ks.commit(b"k", "tx2", t1),
        CommitResult {
            committed: true,
            current_version: 9
        }
    );
    assert_eq!(ks.get(b"k", t1).unwrap().value, "newer");
}

#[test]
fn a_pending_deletion_removes_the_live_entry_on_commit() {
    let ks = keyspace("");
    let now = Instant::now();
    ks.set(item("k", "v", 1, WriteCondition::Unconditional), now)
        .unwrap();
    let mut p = prepare("k", "ignored", 2, "tx");
    p.delete = true;
    assert!(ks.prepare(&p, TIMEOUT, now).prepared);
    assert_eq!(ks.get(b"k", now).unwrap().value, "v");
    assert_eq!(
        ks.commit(b"k", "tx", now),
        CommitResult {
            committed: true,
            current_version: 0
        }
    );
    assert_eq!(ks.get(b"k", now), None);

    // Fenced: a deletion of version 2 does not remove version 3.
    ks.set(item("k", "v3", 1, WriteCondition::Unconditional), now)
        .unwrap();
    p.txn_id = "tx2".into();
    assert!(ks.prepare(&p, TIMEOUT, now).prepared);
    ks.set(item("k", "v3", 3, WriteCondition::Unconditional), now)
        .unwrap();
    assert_eq!(ks.commit(b"k", "tx2", now).current_version, 3);
    assert_eq!(ks.get(b"k", now).unwrap().value, "v3");
}

/// A `Delete` that comes while a change is pending invalidates what the
/// database held before some later write, which the change may predate: a
/// write-around writer's row waited for the change's database commit (the
/// prepared row is locked), won by version, and its invalidation overtook
/// the change's `Commit` on the way to the node. The commit must not cache
/// its value then: it commits as a deletion of its version (absent is
/// always correct; a newer value filled since stays). The same holds for a
/// change in doubt, and for a version-fenced `DeleteBelow` newer than the
/// change; an older one leaves the change as it is.
#[test]
fn an_invalidation_while_a_change_is_pending_keeps_its_value_out() {
    let tokens = Tokens::new();
    let t0 = Instant::now();
    let late = t0 + TIMEOUT;

    let ks = keyspace("");
    ks.set(item("k", "v0", 1, WriteCondition::Unconditional), t0)
        .unwrap();
    assert!(
        ks.prepare(&prepare("k", "v2", 2, "tx"), TIMEOUT, t0)
            .prepared
    );
    // Version 3 is stored in the database, and invalidates.
    ks.delete(b"k", t0);
    assert!(ks.commit(b"k", "tx", t0).committed);
    assert_eq!(ks.get(b"k", t0), None, "v2 may be older than the database");
    // A reader loads and fills version 3.
    let lease = token(ks.lease_get(b"k", t0, &tokens));
    assert_eq!(
        ks.fill(fill_item("k", "v3", 3), lease, t0).outcome,
        FillOutcome::Stored
    );
    assert_eq!(ks.get(b"k", t0).unwrap().value, "v3");

    // The same for a change in doubt: its late commit caches nothing.
    let ks = keyspace("");
    assert!(
        ks.prepare(&prepare("k", "v2", 2, "tx"), TIMEOUT, t0)
            .prepared
    );
    assert_eq!(ks.sweep(late), 1);
    ks.delete(b"k", late);
    assert!(ks.commit(b"k", "tx", late).committed);
    assert_eq!(ks.get(b"k", late), None);

    // A version-fenced invalidation newer than the change, likewise.
    let ks = keyspace("");
    assert!(
        ks.prepare(&prepare("k", "v2", 2, "tx"), TIMEOUT, t0)
            .prepared
    );
    ks.delete_below(b"k", 3, t0);
    assert!(ks.commit(b"k", "tx", t0).committed);
    assert_eq!(ks.get(b"k", t0), None);

    // One older than the change says nothing about it: its value lands.
    let ks = keyspace("");
    assert!(
        ks.prepare(&prepare("k", "v2", 2, "tx"), TIMEOUT, t0)
            .prepared
    );
    ks.delete_below(b"k", 2, t0);
    assert!(ks.commit(b"k", "tx", t0).committed);
    assert_eq!(ks.get(b"k", t0).unwrap().value, "v2");
}

#[test]
fn abort_leaves_the_live_entry_alone() {
    let ks = keyspace("");
    let now = Instant::now();
    ks.set(item("k", "v", 1, WriteCondition::Unconditional), now)
        .unwrap();
    ks.prepare(&prepare("k", "pending", 2, "tx"), TIMEOUT, now);
    assert!(ks.abort(b"k", "tx", now));
    assert!(!ks.abort(b"k", "tx", now));
    assert!(!ks.commit(b"k", "tx", now).committed);
    assert_eq!(ks.get(b"k", now).unwrap().version, 1);
    assert_eq!(ks.records.count.load(Ordering::SeqCst), 0);
    assert_eq!(ks.records.pending.load(Ordering::Relaxed), 0);
}

/// One step of a prepare of `k` that waits its turn; its receiver when
/// it queued.
fn step(ks: &Keyspace, version: u64, txn: &str, ticket: u64, now: Instant) -> PrepareStep {
    ks.prepare_step(
        &prepare("k", txn, version, txn),
        TIMEOUT,
        Some((ticket, true)),
        now,
    )
}

fn queued(step: PrepareStep) -> tokio::sync::oneshot::Receiver<()> {
    match step {
        PrepareStep::Wait {
            woken: Some(rx), ..
        } => rx,
        other => panic!("expected to queue, got {other:?}"),
    }
}

fn done(step: PrepareStep) -> PrepareResult {
    match step {
        PrepareStep::Done(result) => result,
        other => panic!("expected an answer, got {other:?}"),
    }
}

/// Two writers of one key race, many times, on threads, as the node runs
/// them: each takes its first step before either commits (a barrier), then
/// steps its prepare until done, sleeping on its receiver while it must
/// wait (never on a timer: the pending change's 10 s timeout is never
/// reached), and one that waited and is refused by a newer live version
/// takes a newer version and queues again, as the client does. So a lost
/// wake-up would hang the test, and both writes must apply, in turn,
/// leaving the newer version cached.
#[test]
fn two_racing_writers_of_one_key_both_apply_in_turn() {
    let ks = Arc::new(keyspace(""));
    let tickets = Arc::new(AtomicU64::new(1));
    let versions = Arc::new(AtomicU64::new(1));
    for round in 0..500 {
        let key = format!("k{round}");
        let first_steps = Arc::new(std::sync::Barrier::new(2));
        let writer = |name: &'static str| {
            let (ks, tickets, versions, key, first_steps) = (
                Arc::clone(&ks),
                Arc::clone(&tickets),
                Arc::clone(&versions),
                key.clone(),
                Arc::clone(&first_steps),
            );
            std::thread::spawn(move || {
                let mut first_step = true;
                let mut version = versions.fetch_add(1, Ordering::SeqCst);
                let txn = format!("{name}{round}");
                loop {
                    let ticket = tickets.fetch_add(1, Ordering::SeqCst);
                    let p = Prepare {
                        item: item(&key, name, version, WriteCondition::IfNewerVersion),
                        delete: false,
                        txn_id: txn.clone(),
                        timeout: None,
                    };
                    let mut waited = false;
                    let mut woken = None;
                    let result = loop {
                        let step =
                            ks.prepare_step(&p, TIMEOUT, Some((ticket, true)), Instant::now());
                        if std::mem::take(&mut first_step) {
                            first_steps.wait();
                        }
                        match step {
                            PrepareStep::Done(result) => break result,
                            PrepareStep::Wait { woken: rx, .. } => {
                                waited = true;
                                if rx.is_some() {
                                    woken = rx;
                                }
                                woken
                                    .take()
                                    .expect("a waiting prepare holds a receiver")
                                    .blocking_recv()
                                    .expect("woken, not dropped");
                            }
                        }
                    };
                    if result.prepared {
                        let commit = ks.commit(key.as_bytes(), &txn, Instant::now());
                        assert!(commit.committed, "{key}: {name} commits");
                        return version;
                    }
                    assert!(!result.busy, "{key}: {name} never gives up waiting");
                    assert!(
                        waited && result.current_version > version,
                        "{key}: {name} (version {version}) refused without waiting \
                         or by an older version: {result:?}"
                    );
                    version = versions.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        let (a, b) = (writer("a"), writer("b"));
        let newest = a.join().unwrap().max(b.join().unwrap());
        let now = Instant::now();
        assert_eq!(
            ks.get(key.as_bytes(), now).map(|hit| hit.version),
            Some(newest),
            "{key}: the newer write is cached"
        );
    }
    assert_eq!(ks.records.count.load(Ordering::SeqCst), 0);
}

#[test]
fn waiting_prepares_are_served_in_arrival_order() {
    let ks = keyspace("");
    let now = Instant::now();
    assert!(done(step(&ks, 1, "a", 1, now)).prepared);
    let mut b = queued(step(&ks, 2, "b", 2, now));
    let mut c = queued(step(&ks, 3, "c", 3, now));
    // A prepare that does not wait is refused as busy, as before.
    let refused = ks.prepare(&prepare("k", "x", 9, "x"), TIMEOUT, now);
    assert!(!refused.prepared && refused.busy);
    assert!(b.try_recv().is_err() && c.try_recv().is_err());
    assert!(ks.commit(b"k", "a", now).committed);
    // The first waiter gets the turn; a later one cannot take it.
    assert!(b.try_recv().is_ok());
    assert!(c.try_recv().is_err());
    assert!(matches!(
        step(&ks, 3, "c", 3, now),
        PrepareStep::Wait { woken: None, .. }
    ));
    let mut d = queued(step(&ks, 4, "d", 4, now));
    assert!(done(step(&ks, 2, "b", 2, now)).prepared);
    assert!(ks.commit(b"k", "b", now).committed);
    assert!(c.try_recv().is_ok());
    assert!(d.try_recv().is_err());
    assert!(done(step(&ks, 3, "c", 3, now)).prepared);
    assert!(ks.commit(b"k", "c", now).committed);
    assert!(d.try_recv().is_ok());
    assert!(done(step(&ks, 4, "d", 4, now)).prepared);
    assert!(ks.commit(b"k", "d", now).committed);
    assert_eq!(ks.get(b"k", now).unwrap().version, 4);
    assert_eq!(ks.records.count.load(Ordering::SeqCst), 0);
}

#[test]
fn a_waiting_prepare_is_woken_by_an_abort_and_by_a_timeout() {
    let ks = keyspace("");
    let t0 = Instant::now();
    assert!(done(step(&ks, 1, "a", 1, t0)).prepared);
    let mut b = queued(step(&ks, 2, "b", 2, t0));
    assert!(ks.abort(b"k", "a", t0));
    assert!(b.try_recv().is_ok());
    assert!(done(step(&ks, 2, "b", 2, t0)).prepared);
    // b's change times out: the sweeper wakes the next waiter.
    let mut c = match step(&ks, 3, "c", 3, t0) {
        PrepareStep::Wait {
            woken: Some(rx),
            pending_until,
        } => {
            assert_eq!(pending_until, Some(t0 + TIMEOUT));
            rx
        }
        other => panic!("expected to queue, got {other:?}"),
    };
    assert_eq!(ks.sweep(t0 + TIMEOUT), 1);
    assert!(c.try_recv().is_ok());
    assert!(done(step(&ks, 3, "c", 3, t0 + TIMEOUT)).prepared);
    // Timed out on the waiter's own retry at the change's deadline.
    let t1 = t0 + TIMEOUT * 2;
    let _d = queued(step(&ks, 4, "d", 4, t0 + TIMEOUT));
    assert!(done(step(&ks, 4, "d", 4, t1)).prepared);
}

#[test]
fn a_waiter_refused_by_version_or_gone_passes_the_turn_on() {
    let ks = keyspace("");
    let now = Instant::now();
    assert!(done(step(&ks, 5, "a", 1, now)).prepared);
    let mut old = queued(step(&ks, 2, "old", 2, now));
    let mut gone = queued(step(&ks, 6, "gone", 3, now));
    let mut next = queued(step(&ks, 7, "next", 4, now));
    let mut last = queued(step(&ks, 8, "last", 5, now));
    assert!(ks.commit(b"k", "a", now).committed);
    assert!(old.try_recv().is_ok());
    // Version 2 is older than the live 5: refused, and the next is woken.
    let refused = done(step(&ks, 2, "old", 2, now));
    assert!(!refused.prepared && !refused.busy);
    assert_eq!(refused.current_version, 5);
    assert!(gone.try_recv().is_ok());
    // That one gave up with the turn in hand.
    ks.leave_queue(b"k", 3);
    assert!(next.try_recv().is_ok());
    // A waiter that may wait no longer is refused as busy and leaves.
    let busy = ks.prepare_step(
        &prepare("k", "last", 8, "last"),
        TIMEOUT,
        Some((5, false)),
        now,
    );
    assert!(matches!(busy, PrepareStep::Done(r) if r.busy && !r.prepared));
    assert!(done(step(&ks, 7, "next", 4, now)).prepared);
    assert!(ks.commit(b"k", "next", now).committed);
    assert!(last.try_recv().is_err(), "it left the queue");
    assert_eq!(ks.records.count.load(Ordering::SeqCst), 0);
}

#[test]
fn a_flush_keeps_the_waiters_and_wakes_the_first() {
    let ks = keyspace("");
    let now = Instant::now();
    assert!(done(step(&ks, 1, "a", 1, now)).prepared);
    let mut b = queued(step(&ks, 2, "b", 2, now));
    let mut c = queued(step(&ks, 3, "c", 3, now));
    ks.flush();
    assert!(b.try_recv().is_ok());
    assert!(c.try_recv().is_err());
}

#[test]
fn a_timed_out_change_is_dropped_and_deletes_the_live_entry() {
    let ks = keyspace("");
    let t0 = Instant::now();
    ks.set(item("k", "old", 1, WriteCondition::Unconditional), t0)
        .unwrap();
    ks.prepare(&prepare("k", "pending", 2, "tx"), TIMEOUT, t0);
    assert_eq!(ks.sweep(t0 + TIMEOUT - Duration::from_millis(1)), 0);
    assert!(ks.get(b"k", t0).is_some());
    assert_eq!(ks.sweep(t0 + TIMEOUT), 1);
    assert_eq!(ks.get(b"k", t0 + TIMEOUT), None);
    assert_eq!(ks.stats().pending_timeouts, 1);
    assert_eq!(ks.records.pending.load(Ordering::Relaxed), 0);
    // The change stays in doubt until `in_doubt_ttl`, then goes too.
    assert_eq!(ks.records.count.load(Ordering::SeqCst), 1);
    ks.sweep(t0 + TIMEOUT + ks.in_doubt_ttl);
    assert_eq!(ks.records.count.load(Ordering::SeqCst), 0);
    assert!(
        !ks.commit(b"k", "tx", t0 + TIMEOUT + ks.in_doubt_ttl)
            .committed
    );
}

#[test]
fn a_timed_out_change_is_noticed_by_the_next_access() {
    let at = |ks: &Keyspace, t: Instant| {
        ks.set(item("k", "old", 1, WriteCondition::Unconditional), t)
            .unwrap();
        ks.prepare(&prepare("k", "pending", 2, "tx"), TIMEOUT, t);
    };
    let t0 = Instant::now();
    let late = t0 + TIMEOUT;
    // A plain read.
    let ks = keyspace("");
    at(&ks, t0);
    assert_eq!(ks.get(b"k", late), None);
    assert_eq!(ks.stats().pending_timeouts, 1);
    // A commit that comes late, while the change is in doubt, applies.
    let ks = keyspace("");
    at(&ks, t0);
    assert!(ks.commit(b"k", "tx", late).committed);
    assert_eq!(ks.get(b"k", late).unwrap().value, "pending");
    // An abort that comes late still deletes: the writer's database
    // state was unknown to the node until then.
    let ks = keyspace("");
    at(&ks, t0);
    assert!(ks.abort(b"k", "tx", late));
    assert_eq!(ks.get(b"k", late), None);
    // A new prepare takes over the key.
    let ks = keyspace("");
    at(&ks, t0);
    assert!(
        ks.prepare(&prepare("k", "next", 3, "tx2"), TIMEOUT, late)
            .prepared
    );
    assert_eq!(ks.get(b"k", late), None);
}

#[test]
fn prepare_timeouts_above_the_cap_are_refused_and_none_means_the_cap() {
    let s = store("[limits]\nmax_pending_timeout = \"1s\"");
    let mut p = prepare("k", "v", 1, "tx");
    p.timeout = Some(Duration::from_secs(3600));
    let err = s.prepare("default", p.clone()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "pending timeout of 3600000 ms exceeds max_pending_timeout (1000 ms)"
    );
    p.timeout = Some(Duration::from_secs(1));
    let before = Instant::now();
    s.prepare("default", p).unwrap();
    assert_eq!(s.expire_pending(before), 0);
    assert_eq!(s.expire_pending(Instant::now() + Duration::from_secs(1)), 1);
    // None means the cap.
    s.prepare("default", prepare("k2", "v", 1, "tx2")).unwrap();
    assert_eq!(s.expire_pending(Instant::now() + Duration::from_secs(1)), 1);
}

#[test]
fn a_timed_out_change_stays_in_doubt_and_fences_older_values() {
    let ks = keyspace("");
    let tokens = Tokens::new();
    let t0 = Instant::now();
    let late = t0 + TIMEOUT;
    ks.set(item("k", "old", 1, WriteCondition::Unconditional), t0)
        .unwrap();
    ks.prepare(&prepare("k", "new", 5, "tx"), TIMEOUT, t0);
    // The writer stalls; the node gives up: the old value goes, and a
    // reader who loads the old row (the writer's database change is not
    // visible yet) cannot fill it.
    assert_eq!(ks.get(b"k", late), None);
    let lease = token(ks.lease_get(b"k", late, &tokens));
    let filled = ks.fill(fill_item("k", "old", 1), lease, late);
    assert_eq!(
        (filled.outcome, filled.current_version),
        (FillOutcome::StaleVersion, 5)
    );
    // Nor can a versioned clean write or a prepare older than the fence.
    let set = ks
        .set(item("k", "old", 4, WriteCondition::IfNewerVersion), late)
        .unwrap();
    assert_eq!(set.outcome, SetOutcome::StaleVersion);
    let refused = ks.prepare(&prepare("k", "older", 4, "tx2"), TIMEOUT, late);
    assert!(!refused.prepared);
    // Each prepare of the key names the change in doubt, so that its
    // writer may roll the stalled transaction back in the database.
    assert_eq!(refused.in_doubt.as_deref(), Some("tx"));
    assert_eq!(ks.get(b"k", late), None);
    // The writer's late commit applies its change.
    assert!(ks.commit(b"k", "tx", late).committed);
    assert_eq!(ks.get(b"k", late).unwrap().value, "new");
    assert_eq!(ks.records.count.load(Ordering::SeqCst), 0);
    // Settled: no change of the key is in doubt any more.
    let next = ks.prepare(&prepare("k", "newer", 6, "tx3"), TIMEOUT, late);
    assert!(next.prepared);
    assert_eq!(next.in_doubt, None);
    assert!(ks.abort(b"k", "tx3", late));

    // Rolled back instead: the abort clears the fence, and the old row
    // (which the database kept) may be filled again.
    let ks = keyspace("");
    ks.prepare(&prepare("k", "new", 5, "tx"), TIMEOUT, t0);
    assert_eq!(ks.get(b"k", late), None);
    assert!(ks.abort(b"k", "tx", late));
    let lease = token(ks.lease_get(b"k", late, &tokens));
    assert_eq!(
        ks.fill(fill_item("k", "old", 1), lease, late).outcome,
        FillOutcome::Stored
    );

    // A newer entry supersedes the change in doubt, whatever its fate.
    let ks = keyspace("");
    ks.prepare(&prepare("k", "new", 5, "tx"), TIMEOUT, t0);
    assert_eq!(ks.get(b"k", late), None);
    let lease = token(ks.lease_get(b"k", late, &tokens));
    assert_eq!(
        ks.fill(fill_item("k", "newer", 6), lease, late).outcome,
        FillOutcome::Stored
    );
    assert!(!ks.commit(b"k", "tx", late).committed);
    assert_eq!(ks.get(b"k", late).unwrap().value, "newer");

    // A flush, or the end of `in_doubt_ttl`, forgets it.
    for flush in [true, false] {
        let ks = keyspace("");
        ks.prepare(&prepare("k", "new", 5, "tx"), TIMEOUT, t0);
        assert_eq!(ks.get(b"k", late), None);
        if flush {
            ks.flush();
        } else {
            ks.sweep(late + ks.in_doubt_ttl);
        }
        let later = late + ks.in_doubt_ttl;
        assert!(!ks.commit(b"k", "tx", later).committed);
        let lease = token(ks.lease_get(b"k", later, &tokens));
        assert_eq!(
            ks.fill(fill_item("k", "old", 1), lease, later).outcome,
            FillOutcome::Stored
        );
    }
}

#[test]
fn a_version_fenced_delete_removes_only_older_entries_and_drops_the_lease() {
    let ks = keyspace("");
    let tokens = Tokens::new();
    let now = Instant::now();
    ks.set(item("k", "v5", 5, WriteCondition::Unconditional), now)
        .unwrap();
    assert!(!ks.delete_below(b"k", 5, now));
    assert_eq!(ks.get(b"k", now).unwrap().value, "v5");
    assert!(ks.delete_below(b"k", 6, now));
    assert_eq!(ks.get(b"k", now), None);
    // A reader's lease from before the invalidation cannot fill.
    let lease = token(ks.lease_get(b"k", now, &tokens));
    assert!(!ks.delete_below(b"k", 7, now));
    assert_eq!(
        ks.fill(fill_item("k", "v5", 5), lease, now).outcome,
        FillOutcome::LeaseInvalid
    );
    // Dirty entries are fenced the same way.
    let mut d = item("d", "dirty", 3, WriteCondition::IfNewerVersion);
    d.dirty = true;
    ks.set(d, now).unwrap();
    assert!(!ks.delete_below(b"d", 3, now));
    assert!(ks.delete_below(b"d", 4, now));
    assert_eq!(ks.get(b"d", now), None);
    assert_eq!(ks.stats().dirty_items, 0);
}

#[test]
fn flush_drops_pending_changes_and_leases() {
    let s = store("");
    s.prepare("default", prepare("k", "v", 1, "tx")).unwrap();
    token(s.lease_get("default", b"other").unwrap());
    s.flush(None).unwrap();
    assert!(!s.commit("default", b"k", "tx").unwrap().committed);
    token(s.lease_get("default", b"other").unwrap());
}

#[test]
fn transaction_ids_are_validated() {
    let s = store("");
    let err = s.prepare("default", prepare("k", "v", 1, "")).unwrap_err();
    assert_eq!(err.to_string(), "txn_id is empty");
    let long = "x".repeat(MAX_TXN_ID_BYTES + 1);
    let err = s.commit("default", b"k", &long).unwrap_err();
    assert_eq!(err.to_string(), "txn_id of 257 bytes exceeds 256 bytes");
    // A deletion's value is ignored, so it is not checked either.
    let s = store("[limits]\nmax_value_bytes = 4");
    let mut p = prepare("k", "too long", 1, "tx");
    assert!(s.prepare("default", p.clone()).is_err());
    p.delete = true;
    assert!(s.prepare("default", p).unwrap().prepared);
}

// ---- write-back: dirty entries -------------------------------------

const SMALL: &str = "[limits]\nmax_key_bytes = 16\nmax_value_bytes = 64\n\
    [keyspaces.small]\ncapacity_bytes = 4096\nmax_dirty_bytes = 2048\n";

fn dirty(key: &str, value: &str, version: u64, condition: WriteCondition) -> SetItem {
    SetItem {
        dirty: true,
        ..item(key, value, version, condition)
    }
}

fn read(s: &Store, keyspace: &str, key: &str) -> Option<(String, u64)> {
    s.get(keyspace, key.as_bytes())
        .unwrap()
        .map(|hit| (String::from_utf8(hit.value.to_vec()).unwrap(), hit.version))
}

fn one_stats(s: &Store, keyspace: &str) -> KeyspaceStats {
    s.stats(Some(keyspace)).unwrap().remove(0)
}

#[test]
fn dirty_entries_survive_heavy_eviction_pressure() {
    let s = store(SMALL);
    for i in 0..8 {
        let r = s
            .set(
                "small",
                dirty(
                    &format!("d{i}"),
                    &format!("dirty{i}"),
                    10 + i,
                    WriteCondition::Unconditional,
                ),
            )
            .unwrap();
        assert_eq!(r.outcome, SetOutcome::Stored);
    }
    // About 100 bytes each: 100 times the keyspace's capacity.
    let filler = "x".repeat(64);
    for round in 0..4 {
        for i in 0..500 {
            s.set(
                "small",
                item(
                    &format!("c{i}"),
                    &filler,
                    round + 1,
                    WriteCondition::Unconditional,
                ),
            )
            .unwrap();
            // Reads make the clean entries look popular to the eviction policy.
            s.get("small", format!("c{i}").as_bytes()).unwrap();
        }
    }
    let stats = one_stats(&s, "small");
    assert!(stats.evictions > 1000, "{stats:?}");
    assert!(stats.bytes <= stats.capacity_bytes, "{stats:?}");
    for i in 0..8 {
        assert_eq!(
            read(&s, "small", &format!("d{i}")),
            Some((format!("dirty{i}"), 10 + i)),
            "dirty entry d{i} lost"
        );
    }
    assert_eq!(stats.dirty_items, 8);
    // Key "dN" and value "dirtyN", charged as the table charges them.
    assert_eq!(
        stats.dirty_bytes,
        8 * Table::dirty_entry_footprint(b"d0", b"dirty0")
    );
    assert_eq!(stats.max_dirty_bytes, 2048);
}

#[test]
fn dirty_bytes_are_bounded_and_a_refused_write_stores_nothing() {
    let s = store(SMALL);
    let value = "v".repeat(64);
    // Each is charged what malloc takes for its header, key and value.
    let each = Table::dirty_entry_footprint(b"k00", value.as_bytes());
    let fit = 2048 / each;
    for i in 0..fit {
        s.set(
            "small",
            dirty(
                &format!("k{i:02}"),
                &value,
                1,
                WriteCondition::Unconditional,
            ),
        )
        .unwrap();
    }
    let err = s
        .set(
            "small",
            dirty("kxx", &value, 1, WriteCondition::Unconditional),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::DirtyBytesExhausted {
                bytes,
                max: 2048,
                ..
            } if bytes == (fit + 1) * each
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "dirty bytes of keyspace \"small\" would exceed max_dirty_bytes (2048)"
    );
    assert_eq!(read(&s, "small", "kxx"), None);
    // Replacing a dirty entry counts only the difference.
    s.set(
        "small",
        dirty("k00", &value, 2, WriteCondition::Unconditional),
    )
    .unwrap();
    // A batch that cannot fit is refused before anything is written.
    let batch = vec![
        item("clean", "c", 1, WriteCondition::Unconditional),
        dirty("kyy", &value, 1, WriteCondition::Unconditional),
    ];
    assert!(matches!(
        s.multi_set("small", batch),
        Err(Error::DirtyBytesExhausted { .. })
    ));
    assert_eq!(read(&s, "small", "clean"), None);
    // Clean writes are not bounded by it.
    s.set(
        "small",
        item("kxx", &value, 1, WriteCondition::Unconditional),
    )
    .unwrap();
    let stats = one_stats(&s, "small");
    assert_eq!(stats.dirty_items, fit);
    assert_eq!(stats.dirty_bytes, fit * each);
    assert_eq!(stats.dirty_refused, 2);
}

#[test]
fn mark_clean_cleans_the_stored_version_and_leaves_newer_ones_dirty() {
    let s = store("");
    s.set(
        "default",
        dirty("k", "v5", 5, WriteCondition::Unconditional),
    )
    .unwrap();
    let key = || vec![(Bytes::from_static(b"k"), 4)];
    // The worker stored an older version: the entry stays dirty.
    assert_eq!(s.mark_clean("default", &key()).unwrap(), 0);
    assert_eq!(one_stats(&s, "default").dirty_items, 1);
    // Unknown keys are ignored.
    assert_eq!(
        s.mark_clean("default", &[(Bytes::from_static(b"nope"), 9)])
            .unwrap(),
        0
    );
    assert_eq!(
        s.mark_clean("default", &[(Bytes::from_static(b"k"), 5)])
            .unwrap(),
        1
    );
    let stats = one_stats(&s, "default");
    assert_eq!((stats.dirty_items, stats.dirty_bytes), (0, 0));
    // Now a clean cached entry, still readable.
    assert_eq!(read(&s, "default", "k"), Some(("v5".into(), 5)));
    assert_eq!(stats.items, 1);
    // Idempotent.
    assert_eq!(
        s.mark_clean("default", &[(Bytes::from_static(b"k"), 5)])
            .unwrap(),
        0
    );
    // A newer stored version drops the entry: the store has moved on.
    s.set(
        "default",
        dirty("k", "v6", 6, WriteCondition::Unconditional),
    )
    .unwrap();
    assert_eq!(
        s.mark_clean("default", &[(Bytes::from_static(b"k"), 9)])
            .unwrap(),
        1
    );
    assert_eq!(read(&s, "default", "k"), None);
}

/// Issue 13, defect 4: `MarkClean(V)` means the store holds `V` of the
/// key. A dirty or clean entry older than `V` is a value the store has
/// superseded: it is dropped (readers load `V`), never kept, and never
/// made clean with its old value. A newer entry is left alone.
#[test]
fn mark_clean_of_a_newer_version_drops_older_entries_dirty_or_clean() {
    let s = store("");
    s.set(
        "default",
        dirty("d", "d3", 3, WriteCondition::Unconditional),
    )
    .unwrap();
    s.set("default", item("c", "c3", 3, WriteCondition::Unconditional))
        .unwrap();
    s.set(
        "default",
        dirty("n", "n9", 9, WriteCondition::Unconditional),
    )
    .unwrap();
    let stored = [
        (Bytes::from_static(b"d"), 5),
        (Bytes::from_static(b"c"), 5),
        (Bytes::from_static(b"n"), 5),
    ];
    assert_eq!(s.mark_clean("default", &stored).unwrap(), 2);
    assert_eq!(read(&s, "default", "d"), None, "older dirty entry dropped");
    assert_eq!(read(&s, "default", "c"), None, "older clean entry dropped");
    assert_eq!(
        read(&s, "default", "n"),
        Some(("n9".into(), 9)),
        "newer dirty entry untouched"
    );
    assert_eq!(one_stats(&s, "default").dirty_items, 1);
}

/// A reader that took a lease before the worker stored a newer version
/// may have loaded the older row: its fill must not land after the
/// `MarkClean` that says the store moved on.
#[test]
fn mark_clean_invalidates_a_lease_granted_before_it() {
    let ks = keyspace("");
    let tokens = Tokens::new();
    let now = Instant::now();
    let t = token(ks.lease_get(b"k", now, &tokens));
    ks.mark_clean(b"k", 5, now);
    let r = ks.fill(fill_item("k", "old", 3), t, now);
    assert_eq!(r.outcome, FillOutcome::LeaseInvalid);
    assert!(ks.get(b"k", now).is_none());
}

/// A write the store will never hold is discarded by its exact version
/// (`Delete` with `only_version`): other versions of the key stay.
#[test]
fn discard_removes_only_the_named_version() {
    let s = store("");
    s.set(
        "default",
        dirty("k", "v7", 7, WriteCondition::Unconditional),
    )
    .unwrap();
    assert!(!s.discard("default", b"k", 6).unwrap());
    assert_eq!(read(&s, "default", "k"), Some(("v7".into(), 7)));
    assert!(s.discard("default", b"k", 7).unwrap());
    assert_eq!(read(&s, "default", "k"), None);
    assert_eq!(one_stats(&s, "default").dirty_items, 0);
    s.set("default", item("c", "c2", 2, WriteCondition::Unconditional))
        .unwrap();
    assert!(!s.discard("default", b"c", 3).unwrap());
    assert!(s.discard("default", b"c", 2).unwrap());
    assert_eq!(read(&s, "default", "c"), None);
}

#[test]
fn a_dirty_entry_does_not_expire_and_gets_its_ttl_when_clean() {
    let ks = keyspace("default_ttl = \"1s\"");
    let t0 = Instant::now();
    ks.set(dirty("k", "v", 1, WriteCondition::Unconditional), t0)
        .unwrap();
    let later = t0 + Duration::from_secs(60);
    let hit = ks.get(b"k", later).unwrap();
    // The whole TTL is still ahead: it counts from when it is clean.
    assert_eq!(hit.ttl_remaining, Some(Duration::from_secs(1)));
    assert!(ks.mark_clean(b"k", 1, later));
    assert!(ks.get(b"k", later + Duration::from_millis(500)).is_some());
    assert!(ks.get(b"k", later + Duration::from_millis(1500)).is_none());
}

#[test]
fn delete_and_flush_remove_dirty_entries() {
    let s = store("");
    s.set("default", dirty("k", "v", 1, WriteCondition::Unconditional))
        .unwrap();
    assert!(s.delete("default", b"k").unwrap());
    assert_eq!(read(&s, "default", "k"), None);
    let stats = one_stats(&s, "default");
    assert_eq!((stats.dirty_items, stats.dirty_bytes), (0, 0));
    // Nothing left to clean.
    assert_eq!(
        s.mark_clean("default", &[(Bytes::from_static(b"k"), 1)])
            .unwrap(),
        0
    );
    s.set("default", dirty("f", "v", 1, WriteCondition::Unconditional))
        .unwrap();
    s.flush(None).unwrap();
    assert_eq!(read(&s, "default", "f"), None);
    let stats = one_stats(&s, "default");
    assert_eq!((stats.dirty_items, stats.dirty_bytes), (0, 0));
}

#[test]
fn reads_see_the_newest_of_dirty_and_clean() {
    let s = store("");
    let set = |it| s.set("default", it).unwrap();
    set(item("k", "c3", 3, WriteCondition::Unconditional));
    assert_eq!(
        set(dirty("k", "d5", 5, WriteCondition::IfNewerVersion)).outcome,
        SetOutcome::Stored
    );
    assert_eq!(read(&s, "default", "k"), Some(("d5".into(), 5)));
    assert_eq!(
        s.lease_get("default", b"k").unwrap(),
        LeaseRead::Hit(s.get("default", b"k").unwrap().unwrap())
    );
    // The dirty entry fences clean writes of equal or older versions,
    // unconditional ones too.
    for (condition, outcome) in [
        (WriteCondition::IfNewerVersion, SetOutcome::StaleVersion),
        (WriteCondition::Unconditional, SetOutcome::StaleVersion),
        (WriteCondition::IfAbsent, SetOutcome::Exists),
    ] {
        let r = set(item("k", "c5", 5, condition));
        assert_eq!((r.outcome, r.current_version), (outcome, 5));
    }
    // Dirty writes are judged against it too.
    let r = set(dirty("k", "d4", 4, WriteCondition::IfNewerVersion));
    assert_eq!(
        (r.outcome, r.current_version),
        (SetOutcome::StaleVersion, 5)
    );
    assert_eq!(read(&s, "default", "k"), Some(("d5".into(), 5)));
    // A newer clean write replaces it: the store has something newer.
    assert_eq!(
        set(item("k", "c6", 6, WriteCondition::IfNewerVersion)).outcome,
        SetOutcome::Stored
    );
    assert_eq!(read(&s, "default", "k"), Some(("c6".into(), 6)));
    assert_eq!(one_stats(&s, "default").dirty_items, 0);
    // A clean entry newer than a dirty one (a racing write) replaces it:
    // a key has one entry.
    let ks = s.keyspace("default").unwrap();
    let now = Instant::now();
    set(dirty("j", "d7", 7, WriteCondition::Unconditional));
    ks.put_clean(b"j", b"c9", 9, None, WriteCondition::Unconditional, now);
    assert_eq!(read(&s, "default", "j"), Some(("c9".into(), 9)));
    assert_eq!(one_stats(&s, "default").dirty_items, 0);
    // Cleaning the older version keeps the newer clean entry.
    assert!(!ks.mark_clean(b"j", 7, now));
    assert_eq!(read(&s, "default", "j"), Some(("c9".into(), 9)));
}

#[test]
fn fills_and_commits_are_fenced_by_dirty_entries() {
    let ks = keyspace("");
    let tokens = Tokens::new();
    let now = Instant::now();
    let t = token(ks.lease_get(b"k", now, &tokens));
    ks.set(dirty("k", "d5", 5, WriteCondition::Unconditional), now)
        .unwrap();
    // The write dropped the lease.
    assert_eq!(
        ks.fill(fill_item("k", "old", 4), t, now).outcome,
        FillOutcome::LeaseInvalid
    );
    let prepare = |version, delete| Prepare {
        item: item("k", "p", version, WriteCondition::Unconditional),
        delete,
        txn_id: format!("t{version}"),
        timeout: None,
    };
    let timeout = Duration::from_secs(5);
    assert!(!ks.prepare(&prepare(5, false), timeout, now).prepared);
    assert!(ks.prepare(&prepare(6, true), timeout, now).prepared);
    assert_eq!(ks.commit(b"k", "t6", now).current_version, 0);
    assert!(ks.get(b"k", now).is_none());
    assert_eq!(ks.stats().dirty_items, 0);
}

#[test]
fn racing_dirty_and_clean_writes_keep_the_tallies_exact() {
    let ks = keyspace("capacity_bytes = 2000000");
    let version = AtomicU64::new(1);
    std::thread::scope(|scope| {
        for thread in 0..4u64 {
            let (ks, version) = (&ks, &version);
            scope.spawn(move || {
                for i in 0..2000u64 {
                    let key = format!("k{}", (i * 7 + thread) % 5);
                    let v = version.fetch_add(1, Ordering::SeqCst);
                    let now = Instant::now();
                    match (i + thread) % 5 {
                        0 | 1 => {
                            let it = dirty(
                                &key,
                                &"d".repeat((i % 50) as usize),
                                v,
                                WriteCondition::IfNewerVersion,
                            );
                            ks.set(it, now).unwrap();
                        }
                        2 => {
                            let it = item(&key, "c", v, WriteCondition::Unconditional);
                            ks.set(it, now).unwrap();
                        }
                        3 => {
                            ks.mark_clean(key.as_bytes(), v, now);
                        }
                        _ => {
                            ks.delete(key.as_bytes(), now);
                        }
                    }
                }
            });
        }
    });
    // The table's dirty tallies match the dirty entries it holds.
    let (mut held, mut count) = (0, 0);
    ks.table.for_each_dirty(|entry| {
        held += Table::dirty_entry_footprint(entry.key, entry.value);
        count += 1;
    });
    let stats = ks.stats();
    assert_eq!((stats.dirty_items, stats.dirty_bytes), (count, held));
}

// ---- the compact table ----------------------------------------------

/// Expired entries nobody reads leave the table, and their bytes with
/// them, through `Store::expire_entries` (the sweeper's step), not only
/// when a read meets them.
#[test]
fn expired_entries_nobody_reads_are_removed_by_active_expiry() {
    let s = store("[keyspaces.short]\ndefault_ttl = \"1s\"");
    let value = "v".repeat(100);
    for i in 0..10_000 {
        s.set(
            "short",
            item(&format!("k{i}"), &value, 1, WriteCondition::Unconditional),
        )
        .unwrap();
    }
    let full = one_stats(&s, "short");
    assert_eq!(full.items, 10_000);
    let later = Instant::now() + Duration::from_secs(2);
    let mut removed = 0;
    // Each call walks a bounded part of each shard: a few calls, as the
    // sweeper makes one every 100 ms.
    for _ in 0..100 {
        removed += s.expire_entries(later);
        if one_stats(&s, "short").items == 0 {
            break;
        }
    }
    let stats = one_stats(&s, "short");
    assert_eq!(
        (removed, stats.items, stats.expirations),
        (10_000, 0, 10_000)
    );
    assert!(stats.bytes < full.bytes / 20, "{stats:?} after {full:?}");
    // Entries without a TTL stay.
    s.set("default", item("k", "v", 1, WriteCondition::Unconditional))
        .unwrap();
    assert_eq!(s.expire_entries(later), 0);
    assert_eq!(read(&s, "default", "k"), Some(("v".into(), 1)));
}

/// `ENTRY_OVERHEAD_BYTES`, the figure planning uses, is what the table
/// charges a small entry beyond its key and value, index included.
#[test]
fn entry_overhead_is_what_the_table_charges() {
    let s = store("[keyspaces.big]\ncapacity_bytes = 1073741824");
    let n = 100_000u64;
    let value = "v".repeat(100);
    for i in 0..n {
        let key = format!("key:{i:07}");
        assert_eq!(key.len(), 11);
        s.set("big", item(&key, &value, 1, WriteCondition::Unconditional))
            .unwrap();
    }
    let stats = one_stats(&s, "big");
    assert_eq!(stats.items, n);
    let overhead = stats.bytes / n - 111;
    assert!(
        overhead.abs_diff(ENTRY_OVERHEAD_BYTES) <= ENTRY_OVERHEAD_BYTES / 5,
        "measured {overhead} bytes per entry beyond key and value"
    );
}

/// A key has one entry: a dirty write replaces the clean entry and a newer
/// clean write replaces the dirty one, each tally moving with it.
#[test]
fn a_key_has_one_entry_clean_or_dirty() {
    let s = store("");
    s.set("default", item("k", "c1", 1, WriteCondition::Unconditional))
        .unwrap();
    s.set(
        "default",
        dirty("k", "d2", 2, WriteCondition::Unconditional),
    )
    .unwrap();
    let stats = one_stats(&s, "default");
    assert_eq!((stats.items, stats.dirty_items), (0, 1));
    s.set("default", item("k", "c3", 3, WriteCondition::Unconditional))
        .unwrap();
    let stats = one_stats(&s, "default");
    assert_eq!(
        (stats.items, stats.dirty_items, stats.dirty_bytes),
        (1, 0, 0)
    );
    assert_eq!(read(&s, "default", "k"), Some(("c3".into(), 3)));
}

mod model {
    //! Random operation sequences on a few keys, checked step by step
    //! against a plain model of the version rules: write conditions, the
    //! dirty entry's fence, `MarkClean`, `Discard`, `DeleteBelow`, and
    //! leases with their fills. Nothing expires (no TTLs, leases of an
    //! hour) and nothing is evicted (the capacity is never reached), so
    //! the model needs no clock.

    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    const KEYS: u8 = 3;

    #[derive(Clone, Debug)]
    enum Step {
        Get(u8),
        Set {
            key: u8,
            version: u64,
            condition: WriteCondition,
            dirty: bool,
        },
        Delete(u8),
        DeleteBelow(u8, u64),
        Discard(u8, u64),
        MarkClean(u8, u64),
        LeaseGet(u8),
        /// Fills with the key's last granted token (`stale` takes a token
        /// the store has since replaced or dropped, if any).
        Fill {
            key: u8,
            version: u64,
            stale: bool,
        },
    }

    fn condition() -> impl Strategy<Value = WriteCondition> {
        prop_oneof![
            Just(WriteCondition::Unconditional),
            Just(WriteCondition::IfAbsent),
            Just(WriteCondition::IfNewerVersion),
            Just(WriteCondition::IfPresent),
        ]
    }

    fn step() -> impl Strategy<Value = Step> {
        step_on(KEYS)
    }

    /// A step on one of `keys` keys.
    fn step_on(keys: u8) -> impl Strategy<Value = Step> {
        let key = 0..keys;
        let version = 0u64..6;
        prop_oneof![
            2 => key.clone().prop_map(Step::Get),
            6 => (key.clone(), version.clone(), condition(), any::<bool>()).prop_map(
                |(key, version, condition, dirty)| Step::Set { key, version, condition, dirty }
            ),
            1 => key.clone().prop_map(Step::Delete),
            1 => (key.clone(), version.clone()).prop_map(|(k, v)| Step::DeleteBelow(k, v)),
            1 => (key.clone(), version.clone()).prop_map(|(k, v)| Step::Discard(k, v)),
            2 => (key.clone(), version.clone()).prop_map(|(k, v)| Step::MarkClean(k, v)),
            2 => key.clone().prop_map(Step::LeaseGet),
            2 => (key, version, any::<bool>()).prop_map(|(key, version, stale)| Step::Fill { key, version, stale }),
        ]
    }

    /// A key's live entry in the model.
    #[derive(Clone, Debug, PartialEq, Eq, Hash)]
    struct Live {
        value: Bytes,
        version: u64,
        dirty: bool,
    }

    /// What the model holds for one key.
    #[derive(Clone, Debug, Default)]
    struct Key {
        live: Option<Live>,
        /// The store's current lease token, if any.
        lease: Option<u64>,
        /// Tokens once granted and no longer current.
        old_tokens: Vec<u64>,
    }

    impl Key {
        fn drop_lease(&mut self) {
            if let Some(token) = self.lease.take() {
                self.old_tokens.push(token);
            }
        }

        fn version(&self) -> u64 {
            self.live.as_ref().map_or(0, |l| l.version)
        }
    }

    /// The rule of `Store::set`: the outcome of a write against the live
    /// entry.
    fn expected_set(
        live: Option<&Live>,
        version: u64,
        condition: WriteCondition,
        dirty: bool,
    ) -> SetResult {
        let refused = |outcome, current_version| SetResult {
            outcome,
            current_version,
        };
        match live {
            Some(live) if condition == WriteCondition::IfAbsent => {
                refused(SetOutcome::Exists, live.version)
            }
            Some(live)
                if (condition == WriteCondition::IfNewerVersion || (!dirty && live.dirty))
                    && live.version >= version =>
            {
                refused(SetOutcome::StaleVersion, live.version)
            }
            None if condition == WriteCondition::IfPresent => refused(SetOutcome::Missing, 0),
            _ => refused(SetOutcome::Stored, version),
        }
    }

    fn name(key: u8) -> Bytes {
        Bytes::from(vec![b'k', b'0' + key])
    }

    impl Step {
        /// The key the step touches.
        fn key(&self) -> u8 {
            match *self {
                Step::Get(key)
                | Step::Set { key, .. }
                | Step::Delete(key)
                | Step::DeleteBelow(key, _)
                | Step::Discard(key, _)
                | Step::MarkClean(key, _)
                | Step::LeaseGet(key)
                | Step::Fill { key, .. } => key,
            }
        }
    }

    /// What a step other than a lease's returned.
    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Seen {
        Get(Option<(Bytes, u64)>),
        Set(SetResult),
        Removed(bool),
        Settled(usize),
    }

    /// Runs a step other than a lease's on the store, writing `value`.
    fn perform(s: &Store, step: &Step, value: Bytes) -> Seen {
        match *step {
            Step::Get(key) => Seen::Get(
                s.get("default", &name(key))
                    .unwrap()
                    .map(|h| (h.value, h.version)),
            ),
            Step::Set {
                key,
                version,
                condition,
                dirty,
            } => Seen::Set(
                s.set(
                    "default",
                    SetItem {
                        key: name(key),
                        value,
                        version,
                        ttl: None,
                        condition,
                        dirty,
                    },
                )
                .unwrap(),
            ),
            Step::Delete(key) => Seen::Removed(s.delete("default", &name(key)).unwrap()),
            Step::DeleteBelow(key, version) => {
                Seen::Removed(s.delete_below("default", &name(key), version).unwrap())
            }
            Step::Discard(key, version) => {
                Seen::Removed(s.discard("default", &name(key), version).unwrap())
            }
            Step::MarkClean(key, version) => {
                Seen::Settled(s.mark_clean("default", &[(name(key), version)]).unwrap())
            }
            Step::LeaseGet(_) | Step::Fill { .. } => unreachable!("leases are checked apart"),
        }
    }

    /// The model's result for a step other than a lease's, applied to its
    /// key's live entry.
    fn predict(live: &mut Option<Live>, step: &Step, value: Bytes) -> Seen {
        match *step {
            Step::Get(_) => Seen::Get(live.as_ref().map(|l| (l.value.clone(), l.version))),
            Step::Set {
                version,
                condition,
                dirty,
                ..
            } => {
                let want = expected_set(live.as_ref(), version, condition, dirty);
                if want.outcome == SetOutcome::Stored {
                    *live = Some(Live {
                        value,
                        version,
                        dirty,
                    });
                }
                Seen::Set(want)
            }
            Step::Delete(_) => Seen::Removed(live.take().is_some()),
            Step::DeleteBelow(_, version) => {
                let gone = live.as_ref().is_some_and(|l| l.version < version);
                if gone {
                    *live = None;
                }
                Seen::Removed(gone)
            }
            Step::Discard(_, version) => {
                let gone = live.as_ref().is_some_and(|l| l.version == version);
                if gone {
                    *live = None;
                }
                Seen::Removed(gone)
            }
            Step::MarkClean(_, version) => {
                let settled = match live {
                    Some(l) if l.version < version => {
                        *live = None;
                        true
                    }
                    Some(l) if l.dirty && l.version == version => {
                        l.dirty = false;
                        true
                    }
                    _ => false,
                };
                Seen::Settled(usize::from(settled))
            }
            Step::LeaseGet(_) | Step::Fill { .. } => unreachable!("leases are checked apart"),
        }
    }

    proptest! {
        #[test]
        fn the_store_follows_the_version_rules(steps in proptest::collection::vec(step(), 1..120)) {
            let s = store("[keyspaces.default]\ncapacity_bytes = 1073741824\nlease_ttl = \"1h\"");
            let mut model: HashMap<u8, Key> = (0..KEYS).map(|k| (k, Key::default())).collect();
            for (n, step) in steps.into_iter().enumerate() {
                match step {
                    Step::Get(_)
                    | Step::Set { .. }
                    | Step::Delete(_)
                    | Step::DeleteBelow(..)
                    | Step::Discard(..)
                    | Step::MarkClean(..) => {
                        let value = Bytes::from(format!("v{n}"));
                        let seen = perform(&s, &step, value.clone());
                        let m = model.get_mut(&step.key()).unwrap();
                        let want = predict(&mut m.live, &step, value);
                        prop_assert_eq!(seen, want, "{:?}", step);
                        // Every change of the key drops its lease.
                        if !matches!(step, Step::Get(_)) {
                            m.drop_lease();
                        }
                    }
                    Step::LeaseGet(key) => {
                        let read = s.lease_get("default", &name(key)).unwrap();
                        let m = model.get_mut(&key).unwrap();
                        match (read, &m.live, m.lease) {
                            (LeaseRead::Hit(hit), Some(live), _) => {
                                prop_assert_eq!((hit.value, hit.version), (live.value.clone(), live.version));
                            }
                            (LeaseRead::Granted { token }, None, None) => {
                                prop_assert_ne!(token, 0);
                                prop_assert!(!m.old_tokens.contains(&token), "token {} granted twice", token);
                                m.lease = Some(token);
                            }
                            (LeaseRead::Wait { .. }, None, Some(_)) => {}
                            (read, live, lease) => {
                                prop_assert!(false, "lease_get of key {} gave {:?} with {:?} live and lease {:?}", key, read, live, lease);
                            }
                        }
                    }
                    Step::Fill { key, version, stale } => {
                        let m = model.get_mut(&key).unwrap();
                        let token = if stale {
                            m.old_tokens.last().copied().unwrap_or(0)
                        } else {
                            m.lease.unwrap_or(0)
                        };
                        let value = Bytes::from(format!("f{n}"));
                        let result = s.fill("default", SetItem {
                            key: name(key),
                            value: value.clone(),
                            version,
                            ttl: None,
                            condition: WriteCondition::Unconditional,
                            dirty: false,
                        }, token).unwrap();
                        let holds = token != 0 && m.lease == Some(token);
                        let want = if !holds {
                            FillResult { outcome: FillOutcome::LeaseInvalid, current_version: m.version() }
                        } else {
                            m.drop_lease();
                            // A fill is always fenced by the live version.
                            match &m.live {
                                Some(l) if l.version >= version => FillResult {
                                    outcome: FillOutcome::StaleVersion,
                                    current_version: l.version,
                                },
                                _ => {
                                    m.live = Some(Live { value, version, dirty: false });
                                    FillResult { outcome: FillOutcome::Stored, current_version: version }
                                }
                            }
                        };
                        prop_assert_eq!(result, want, "fill of key {} v{} with token {}", key, version, token);
                    }
                }
            }
            let stats = one_stats(&s, "default");
            let live: Vec<&Live> = model.values().filter_map(|k| k.live.as_ref()).collect();
            prop_assert_eq!(stats.items + stats.dirty_items, live.len() as u64);
            prop_assert_eq!(stats.dirty_items, live.iter().filter(|l| l.dirty).count() as u64);
        }
    }

    /// Random operations run at once from several threads, checked against
    /// the same model: the test searches for one order of all the
    /// operations, each thread's in its program order, under which the
    /// model gives every result the threads saw and ends in the state the
    /// store ends in. Leases are left out (their tokens are the store's
    /// choice); every write rule above is in.
    mod concurrent {
        use std::collections::HashSet;
        use std::sync::{Arc, Barrier};

        use proptest::prelude::*;

        use super::super::*;
        use super::{Live, Seen, Step, name, perform, predict, step_on};

        const KEYS: u8 = 2;
        const THREADS: usize = 3;

        /// Every step but the leases'.
        fn op() -> impl Strategy<Value = Step> {
            step_on(KEYS).prop_filter("leases are checked apart", |step| {
                !matches!(step, Step::LeaseGet(_) | Step::Fill { .. })
            })
        }

        /// The value thread `t` writes with its `i`th operation: every
        /// write's value is its own, so a read names the write it saw.
        fn value(t: usize, i: usize) -> Bytes {
            Bytes::from(format!("t{t}i{i}"))
        }

        /// The store's state at the end: each key's value and version, and
        /// its number of dirty entries (reads do not show the flag).
        #[derive(Debug)]
        struct End {
            entries: Vec<Option<(Bytes, u64)>>,
            dirty_items: u64,
        }

        impl End {
            fn matches(&self, live: &[Option<Live>]) -> bool {
                let entries: Vec<Option<(Bytes, u64)>> = live
                    .iter()
                    .map(|l| l.as_ref().map(|l| (l.value.clone(), l.version)))
                    .collect();
                let dirty = live.iter().flatten().filter(|l| l.dirty).count() as u64;
                entries == self.entries && dirty == self.dirty_items
            }
        }

        /// Whether some order of the threads' operations explains what
        /// they saw and ends in `end`; `dead` holds the (positions, model)
        /// pairs already found to lead nowhere.
        fn explained(
            ops: &[Vec<Step>],
            seen: &[Vec<Seen>],
            positions: &mut Vec<usize>,
            live: &[Option<Live>],
            end: &End,
            dead: &mut HashSet<(Vec<usize>, Vec<Option<Live>>)>,
        ) -> bool {
            if positions.iter().zip(ops).all(|(p, ops)| *p == ops.len()) {
                return end.matches(live);
            }
            if dead.contains(&(positions.clone(), live.to_vec())) {
                return false;
            }
            for t in 0..ops.len() {
                let i = positions[t];
                if i == ops[t].len() {
                    continue;
                }
                let mut next = live.to_vec();
                let op = &ops[t][i];
                if predict(&mut next[usize::from(op.key())], op, value(t, i)) != seen[t][i] {
                    continue;
                }
                positions[t] += 1;
                let found = explained(ops, seen, positions, &next, end, dead);
                positions[t] -= 1;
                if found {
                    return true;
                }
            }
            dead.insert((positions.clone(), live.to_vec()));
            false
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(200))]
            #[test]
            fn concurrent_operations_have_an_order_the_model_explains(
                ops in proptest::collection::vec(proptest::collection::vec(op(), 1..7), THREADS)
            ) {
                let s = Arc::new(store("[keyspaces.default]\ncapacity_bytes = 1073741824"));
                let start = Arc::new(Barrier::new(THREADS));
                let threads: Vec<_> = ops
                    .iter()
                    .cloned()
                    .enumerate()
                    .map(|(t, ops)| {
                        let s = Arc::clone(&s);
                        let start = Arc::clone(&start);
                        std::thread::spawn(move || {
                            start.wait();
                            ops.iter()
                                .enumerate()
                                .map(|(i, op)| perform(&s, op, value(t, i)))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                let seen: Vec<Vec<Seen>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
                let end = End {
                    entries: (0..KEYS)
                        .map(|key| {
                            s.get("default", &name(key)).unwrap().map(|h| (h.value, h.version))
                        })
                        .collect(),
                    dirty_items: one_stats(&s, "default").dirty_items,
                };
                let mut positions = vec![0; THREADS];
                let empty = vec![None; usize::from(KEYS)];
                prop_assert!(
                    explained(&ops, &seen, &mut positions, &empty, &end, &mut HashSet::new()),
                    "no order of the operations explains what the threads saw: {:?} saw {:?}, ending in {:?}",
                    ops, seen, end
                );
            }
        }
    }
}

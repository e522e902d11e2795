//! The checks that many writers, a stalling database and refused records
//! need (`docs/chaos.md`, "The final-state audit"): equal versions with
//! different values, a cache ahead of the store, dirty entries and prepared
//! transactions left at quiescence, and read-your-writes per client.

use std::collections::BTreeMap;

use cache_client::strategy::Strategy;

use super::{Checker, Effect, KeyHistory, Reading, ViolationKind, source_ops};
use crate::chaos::history::{FinalKey, Op, ValueOf};

impl Checker<'_> {
    /// Checks of the history alone: duplicate versions, and read-your-writes
    /// for write-back.
    pub(super) fn history_audit(&mut self, history: &KeyHistory<'_>) {
        // Two acknowledged writes with one version and different values:
        // the store and the caches may each keep a different one.
        let mut by_version: BTreeMap<u64, Vec<&Op>> = BTreeMap::new();
        for write in &history.writes {
            if let Effect::Applied(version) = write.effect {
                by_version.entry(version).or_default().push(write.op);
            }
        }
        for (version, ops) in by_version {
            let Some(first) = ops.first() else { continue };
            if ops.iter().any(|op| op.value != first.value) {
                self.violation(
                    ViolationKind::DuplicateVersion,
                    first.strategy,
                    (first.keyspace.as_str(), first.key.as_str()),
                    format!(
                        "{} acknowledged writes of different values got version {version}",
                        ops.len()
                    ),
                    ops.iter().take(3).map(|op| (*op).clone()).collect(),
                );
            }
        }

        let bound = self.config.read_your_writes_bound();
        for read in &history.reads {
            if !read.outcome.is_ok() || read.strategy != Strategy::WriteBack {
                continue;
            }
            let reading = Reading::of(read);
            let sources = history.sources(&reading);
            if sources.is_empty() {
                // A phantom read, reported by `reads`.
                continue;
            }
            // The client's own acknowledged writes, by the time they returned.
            for i in &history.applied_by_end {
                let own = &history.writes[*i];
                if own.op.end >= read.start {
                    break;
                }
                if own.op.client != read.client {
                    continue;
                }
                let Effect::Applied(version) = own.effect else {
                    continue;
                };
                let older = match reading.version {
                    Some(seen) => seen < version,
                    None => sources
                        .iter()
                        .all(|s| s.certainly_older(own, version, self.config.clock_slack)),
                };
                if !older {
                    continue;
                }
                let late = read.start - own.op.end;
                if late > bound {
                    let mut ops = vec![(*read).clone(), own.op.clone()];
                    ops.extend(source_ops(&sources));
                    self.violation(
                        ViolationKind::ReadYourWrites,
                        read.strategy,
                        (read.keyspace.as_str(), read.key.as_str()),
                        format!(
                            "client {} read {} in #{}, older than its own write #{} (version {version}) that returned {late:?} before; the bound is {bound:?}",
                            read.client,
                            reading.describe(),
                            read.id,
                            own.op.id,
                        ),
                        ops,
                    )
                    .staleness = Some(late);
                }
                // One violation per read: the earliest write it missed.
                break;
            }
        }
    }

    /// Checks of the final state, for every strategy: equal versions hold
    /// equal values, no cache is ahead of the store, no dirty entry and no
    /// prepared transaction is left.
    pub(super) fn final_audit(&mut self, history: &KeyHistory<'_>, final_key: &FinalKey) {
        let at = (final_key.keyspace.as_str(), final_key.key.as_str());
        let strategy = final_key.strategy;

        // (place, version, value) of everything that reports a version.
        let mut held = Vec::new();
        if let Some(row) = final_key.db {
            held.push(("the store".to_owned(), row.version, row.value));
        }
        for observation in &final_key.cache {
            if let Some(entry) = observation.entry
                && let Some(version) = entry.version
                && version > 0
            {
                held.push((
                    format!("cache {}", observation.source),
                    version,
                    entry.value,
                ));
            }
        }
        for (i, (place, version, value)) in held.iter().enumerate() {
            if let Some((other, _, other_value)) = held[..i]
                .iter()
                .find(|(_, v, other_value)| v == version && other_value != value)
            {
                self.violation(
                    ViolationKind::SameVersionDiffers,
                    strategy,
                    at,
                    format!(
                        "{other} holds {} and {place} holds {} at the same version {version}",
                        ValueOf(*other_value),
                        ValueOf(*value),
                    ),
                    super::same_value(history, *value)
                        .into_iter()
                        .chain(super::same_value(history, *other_value))
                        .collect(),
                );
            }
        }

        let stored = final_key.db.map_or(0, |row| row.version);
        for observation in &final_key.cache {
            let Some(entry) = observation.entry else {
                continue;
            };
            let (Some(version), Some(_)) = (entry.version, entry.value) else {
                continue;
            };
            // A dirty entry is reported as such.
            let dirty = final_key
                .dirty
                .iter()
                .any(|d| d.source == observation.source && d.version == version);
            if version > stored && !dirty {
                self.violation(
                    ViolationKind::CacheAheadOfStore,
                    strategy,
                    at,
                    format!(
                        "cache {} holds {} version {version}, newer than the store's {}",
                        observation.source,
                        ValueOf(entry.value),
                        match final_key.db {
                            Some(row) => format!("version {}", row.version),
                            None => "missing row".to_owned(),
                        }
                    ),
                    super::same_value(history, entry.value),
                );
            }
        }

        for dirty in &final_key.dirty {
            self.violation(
                ViolationKind::DirtyLeft,
                strategy,
                at,
                format!(
                    "node {} still holds a dirty entry of version {} at quiescence",
                    dirty.source, dirty.version
                ),
                history
                    .writes
                    .iter()
                    .filter(|w| w.version() == Some(dirty.version))
                    .take(3)
                    .map(|w| w.op.clone())
                    .collect(),
            );
        }
        for gid in &final_key.prepared {
            self.violation(
                ViolationKind::PreparedLeft,
                strategy,
                at,
                format!("prepared transaction {gid} is left in PostgreSQL at quiescence"),
                Vec::new(),
            );
        }
    }
}

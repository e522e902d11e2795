//! The node primitives the strategies are built from: leases (`LeaseGet`,
//! `Fill`) and two-phase commit of cache entries (`Prepare`, `Commit`,
//! `Abort`). They address the nodes directly, without the retrying engine of
//! `client.rs`: a lease lives on the node that granted it, and a prepared
//! change must be committed or aborted on exactly the nodes that prepared it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ringcache_proto::v1;
use tokio::time::Instant;

use crate::client::{Client, Entry, call, call_once, entry_from_proto, outlived_by_stall, request};
use crate::cluster::NodeHandle;
use crate::error::{Error, Result};
use crate::telemetry;

/// What `LeaseGet` answered.
#[derive(Debug)]
pub(crate) enum LeaseReply {
    /// A live entry.
    Hit(Entry),
    /// A miss, and this caller holds the lease on `node`.
    Lease {
        /// The node that granted the lease; the fill must go there.
        node: Arc<NodeHandle>,
        /// Whether that node is a fallback for the key.
        fallback: bool,
        /// The token to fill with.
        token: u64,
    },
    /// A miss while another caller holds the lease, or a write is pending.
    Wait {
        /// When to ask again.
        retry_after: Duration,
        /// A recently deleted value, if the keyspace keeps them.
        stale: Option<Entry>,
    },
}

/// What phase one did on the cache.
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    /// The nodes that prepared the change: phase two goes to them.
    pub(crate) nodes: Vec<Arc<NodeHandle>>,
    /// The nodes that answered but refused (another transaction pending,
    /// a version as new or newer live, a change in doubt), with the version
    /// they reported. They keep what they hold: if the write commits
    /// anyway, one holding an older value must be invalidated.
    pub(crate) refused: Vec<(Arc<NodeHandle>, u64)>,
    /// The last failure, if any.
    pub(crate) failure: Option<Error>,
    /// A node refused because another writer's change was still pending
    /// when the wait ran out.
    pub(crate) busy: bool,
    /// The longest a node let the prepare wait for other writers.
    pub(crate) waited: Duration,
    /// Transactions whose changes of the key timed out on a node and are
    /// still in doubt there (`PrepareResponse.in_doubt_txn_id`).
    pub(crate) in_doubt: Vec<String>,
}

impl Prepared {
    /// Adds what a later round of phase one did.
    pub(crate) fn merge(&mut self, other: Prepared) {
        self.nodes.extend(other.nodes);
        self.refused.extend(other.refused);
        if other.failure.is_some() {
            self.failure = other.failure;
        }
        self.busy |= other.busy;
        self.waited = self.waited.max(other.waited);
        self.in_doubt.extend(other.in_doubt);
    }
}

/// What a fill did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FillReply {
    /// Stored.
    Stored,
    /// Refused: the lease was invalidated (by a write, delete, prepare or
    /// flush since it was granted) or expired.
    LeaseInvalid,
    /// Refused: an equal or newer version is live.
    StaleVersion,
}

impl Client {
    /// The first `n` healthy nodes of the key's ring order, each with
    /// whether it is a fallback: not among the key's owners on the full ring
    /// (ranked at or past the keyspace's replica count), holding the key only
    /// because an owner is down. What a fallback holds is capped at the
    /// client's `fallback_ttl` (`docs/failover.md`).
    pub(crate) fn healthy_in_order(
        &self,
        keyspace: &str,
        key: &[u8],
        n: usize,
    ) -> Vec<(Arc<NodeHandle>, bool)> {
        let owners = self.replication(keyspace).replicas;
        let view = self.inner.cluster.view();
        view.ring
            .successors(keyspace, key)
            .enumerate()
            .filter_map(|(rank, id)| view.node(id).map(|node| (rank, node)))
            .filter(|(_, node)| !node.is_down())
            .take(n)
            .map(|(rank, node)| (Arc::clone(node), rank >= owners))
            .collect()
    }

    /// The first healthy node of the key's ring order, or an error naming
    /// the keyspace.
    pub(crate) fn primary(&self, keyspace: &str, key: &[u8]) -> Result<(Arc<NodeHandle>, bool)> {
        self.healthy_in_order(keyspace, key, 1)
            .pop()
            .ok_or_else(|| Error::NoNodeAvailable {
                keyspace: keyspace.to_owned(),
                reason: "every node that could hold the key is down".into(),
            })
    }

    /// Caps an item's TTL at the fallback TTL.
    pub(crate) fn cap_for_fallback(&self, item: &mut v1::SetItem) {
        let cap = u64::try_from(self.config().fallback_ttl.as_millis()).unwrap_or(u64::MAX);
        item.ttl_ms = if item.ttl_ms == 0 {
            cap
        } else {
            item.ttl_ms.min(cap)
        };
    }

    /// Awaits one call on `node` ([`call`] or [`call_once`]), recording
    /// its health. A failed write (a 2PC step) marks the node down at
    /// once: it may have missed a change, so it must be flushed before this
    /// client reads from it again.
    async fn on_node<T>(
        &self,
        node: &NodeHandle,
        writes: bool,
        call: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let result = call.await;
        match &result {
            Ok(_) => self.inner.cluster.record_success(node),
            Err(e) if e.is_node_failure() && writes => self.inner.cluster.mark_down(node, e),
            Err(e) if e.is_node_failure() => self.inner.cluster.record_failure(node, e),
            Err(_) => {}
        }
        result
    }

    /// `LeaseGet` on the key's primary. On a node failure, the next call
    /// goes to the next healthy node once this one is marked down.
    pub(crate) async fn lease_get(&self, keyspace: &str, key: &Bytes) -> Result<LeaseReply> {
        let (node, fallback) = self.primary(keyspace, key)?;
        let mut client = node.client.clone();
        let timeout = self.config().request_timeout;
        // Once only: a second attempt would find the first one's lease.
        let rpc = client.lease_get(request(
            v1::LeaseGetRequest {
                keyspace: keyspace.to_owned(),
                key: key.clone(),
            },
            timeout,
        ));
        let reply = self
            .on_node(&node, false, call_once(&node, timeout, rpc))
            .await?;
        if let Some(entry) = reply.entry {
            self.inner.clock.observe(entry.version);
            return Ok(LeaseReply::Hit(entry_from_proto(entry)));
        }
        if reply.lease_token != 0 {
            return Ok(LeaseReply::Lease {
                node,
                fallback,
                token: reply.lease_token,
            });
        }
        Ok(LeaseReply::Wait {
            retry_after: Duration::from_millis(reply.retry_after_ms.max(1)),
            stale: reply.stale.map(entry_from_proto),
        })
    }

    /// `Fill` on the node that granted the lease.
    pub(crate) async fn fill(
        &self,
        keyspace: &str,
        node: &NodeHandle,
        token: u64,
        item: v1::SetItem,
    ) -> Result<FillReply> {
        let mut client = node.client.clone();
        let timeout = self.config().request_timeout;
        // Once only: the lease is used up by a fill that stored.
        let rpc = client.fill(request(
            v1::FillRequest {
                keyspace: keyspace.to_owned(),
                item: Some(item),
                lease_token: token,
            },
            timeout,
        ));
        let reply = self
            .on_node(node, false, call_once(node, timeout, rpc))
            .await?;
        self.inner.clock.observe(reply.current_version);
        Ok(match reply.outcome() {
            v1::FillOutcome::Stored => FillReply::Stored,
            v1::FillOutcome::StaleVersion => FillReply::StaleVersion,
            v1::FillOutcome::LeaseInvalid | v1::FillOutcome::Unspecified => FillReply::LeaseInvalid,
        })
    }

    /// `ReleaseLease` on the node that granted the lease: hands it back
    /// unused, so that the next reader of the key is granted it at once.
    /// Best effort: a lease that cannot be handed back expires on the node
    /// after its `lease_ttl`.
    pub(crate) async fn release_lease(
        &self,
        keyspace: &str,
        node: &NodeHandle,
        key: &Bytes,
        token: u64,
    ) -> bool {
        let timeout = self.config().request_timeout;
        let message = v1::ReleaseLeaseRequest {
            keyspace: keyspace.to_owned(),
            key: key.clone(),
            lease_token: token,
        };
        let released = call(node, timeout, |mut client| {
            let message = message.clone();
            async move { client.release_lease(request(message, timeout)).await }
        });
        match self.on_node(node, false, released).await {
            Ok(reply) => reply.released,
            Err(e) => {
                tracing::debug!(node = %node.id, keyspace, error = %e, "lease not handed back; it expires on the node");
                false
            }
        }
    }

    /// Phase one on the cache: prepares the change on `nodes` (healthy
    /// nodes of the key's ring order, each with whether it is a fallback)
    /// in parallel. Each node lets the prepare wait up to `wait`, in arrival
    /// order, for another writer's pending change of the key to settle.
    /// Returns what each did; the caller decides with its quorum and must
    /// abort what prepared if it gives up. A node that failed (unreachable)
    /// is marked down, so it is flushed before this client reads from it
    /// again.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn prepare_on(
        &self,
        keyspace: &str,
        nodes: Vec<(Arc<NodeHandle>, bool)>,
        item: v1::SetItem,
        delete: bool,
        txn: &str,
        pending_timeout: Duration,
        wait: Duration,
    ) -> Prepared {
        // The node answers within `wait` plus its own work.
        let timeout = self.config().request_timeout + wait;
        let asks = nodes.into_iter().map(|(node, fallback)| {
            let mut item = item.clone();
            if fallback {
                self.cap_for_fallback(&mut item);
            }
            let message = v1::PrepareRequest {
                keyspace: keyspace.to_owned(),
                item: Some(item),
                txn_id: txn.to_owned(),
                timeout_ms: u64::try_from(pending_timeout.as_millis()).unwrap_or(u64::MAX),
                delete,
                wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            };
            async move {
                let mut client = node.client.clone();
                let key = message.item.as_ref().map(|i| i.key.clone()).unwrap_or_default();
                // Once only: a second prepare of `txn` would queue behind
                // the first one's pending change.
                let rpc = client.prepare(request(message, timeout));
                let started = Instant::now();
                let reply = call_once(&node, timeout, rpc).await;
                // This process stalled while the prepare was out (its
                // timers fired late): whether the node holds the change
                // is unknown, but the node is likely fine. An abort, which
                // is idempotent, settles it: once answered, the node holds
                // no change of `txn` and keeps what it held, like a node
                // that refused, and is invalidated as one if the write
                // commits. Only a node that does not answer it is down.
                let settled = match &reply {
                    Err(e) if e.is_node_failure() && outlived_by_stall(started.elapsed(), timeout) => {
                        tracing::info!(node = %node.id, keyspace, txn, error = %e, "a prepare outlived its timeout while this process stalled; aborting it there");
                        self.abort_on(keyspace, &key, txn, &node).await.is_ok()
                    }
                    _ => false,
                };
                match &reply {
                    Ok(_) => self.inner.cluster.record_success(&node),
                    Err(e) if e.is_node_failure() && !settled => self.inner.cluster.mark_down(&node, e),
                    Err(_) => {}
                }
                (node, reply, settled)
            }
        });
        let mut prepared = Prepared::default();
        for (node, reply, settled) in futures::future::join_all(asks).await {
            match reply {
                Ok(r) => {
                    if !r.in_doubt_txn_id.is_empty() && r.in_doubt_txn_id != txn {
                        prepared.in_doubt.push(r.in_doubt_txn_id.clone());
                    }
                    let waited = Duration::from_millis(r.waited_ms);
                    prepared.waited = prepared.waited.max(waited);
                    if !waited.is_zero() {
                        telemetry::prepare_waited(keyspace, waited);
                    }
                    if r.prepared {
                        prepared.nodes.push(node);
                        continue;
                    }
                    self.inner.clock.observe(r.current_version);
                    let reason = if r.busy {
                        prepared.busy = true;
                        telemetry::prepare_wait_exhausted(keyspace);
                        format!(
                            "node {} refused the prepare (another write is pending; waited {} ms of {} ms)",
                            node.id,
                            r.waited_ms,
                            wait.as_millis()
                        )
                    } else {
                        format!(
                            "node {} refused the prepare (version {} is live or in doubt)",
                            node.id, r.current_version
                        )
                    };
                    prepared.failure = Some(Error::Conflict {
                        keyspace: keyspace.to_owned(),
                        reason,
                    });
                    prepared.refused.push((node, r.current_version));
                }
                Err(e) => {
                    // A refusal of the request itself (a bad pending
                    // timeout, a missing permission), or a prepare undone
                    // after a stall: the node is alive and keeps what it
                    // holds, like a node that answered no.
                    if !e.is_node_failure() || settled {
                        prepared.refused.push((node, 0));
                    }
                    prepared.failure = Some(e);
                }
            }
        }
        prepared
    }

    /// Phase two on the cache: commits (or aborts) `txn` on every node that
    /// prepared it, in parallel. Returns the nodes that answered without
    /// acknowledging: after a commit, each of them may hold (or be about to
    /// fill) the value the change replaced, and the caller must invalidate
    /// it there ([`invalidate_below`](Client::invalidate_below)). A node
    /// that could not be reached is marked down instead (flushed before
    /// this client reads from it again); if it only missed the call, the
    /// change times out there, which removes the key.
    pub(crate) async fn finish(
        &self,
        keyspace: &str,
        key: &Bytes,
        txn: &str,
        nodes: &[Arc<NodeHandle>],
        commit: bool,
    ) -> Vec<Arc<NodeHandle>> {
        let timeout = self.config().request_timeout;
        let asks = nodes.iter().map(|node| async move {
            // Both are idempotent: a second commit or abort of `txn`
            // finds nothing pending and answers false.
            if commit {
                let message = v1::CommitRequest {
                    keyspace: keyspace.to_owned(),
                    key: key.clone(),
                    txn_id: txn.to_owned(),
                };
                let committed = call(node, timeout, |mut client| {
                    let message = message.clone();
                    async move { client.commit(request(message, timeout)).await }
                });
                self.on_node(node, true, committed)
                    .await
                    .map(|r| r.committed)
            } else {
                self.abort_on(keyspace, key, txn, node).await
            }
        });
        let results = futures::future::join_all(asks).await;
        let mut unacknowledged = Vec::new();
        for (node, result) in nodes.iter().zip(results) {
            match result {
                Ok(true) => {}
                Err(e) if e.is_node_failure() => {
                    tracing::warn!(node = %node.id, keyspace, txn, commit, error = %e, "cache phase two failed; the node is marked down");
                }
                other => {
                    tracing::warn!(node = %node.id, keyspace, txn, commit, result = ?other, "cache phase two not acknowledged");
                    unacknowledged.push(Arc::clone(node));
                }
            }
        }
        unacknowledged
    }

    /// `Abort` of `txn`'s pending change of `key` on `node`; true if one
    /// was pending. Idempotent, so asked once more after a stall of this
    /// process; a node that does not answer is marked down.
    async fn abort_on(
        &self,
        keyspace: &str,
        key: &Bytes,
        txn: &str,
        node: &NodeHandle,
    ) -> Result<bool> {
        let timeout = self.config().request_timeout;
        let message = v1::AbortRequest {
            keyspace: keyspace.to_owned(),
            key: key.clone(),
            txn_id: txn.to_owned(),
        };
        let aborted = call(node, timeout, |mut client| {
            let message = message.clone();
            async move { client.abort(request(message, timeout)).await }
        });
        self.on_node(node, true, aborted).await.map(|r| r.aborted)
    }

    /// Version-fenced invalidation of `key` on each of `nodes`, in
    /// parallel: removes an entry older than `version` and drops the key's
    /// lease (`DeleteRequest.below_version`). A node that does not do it is
    /// marked down, so that this client flushes it before reading from it
    /// again.
    pub(crate) async fn invalidate_below(
        &self,
        keyspace: &str,
        key: &Bytes,
        version: u64,
        nodes: &[Arc<NodeHandle>],
    ) {
        let timeout = self.config().request_timeout;
        let asks = nodes.iter().map(|node| async move {
            let message = v1::DeleteRequest {
                keyspace: keyspace.to_owned(),
                key: key.clone(),
                below_version: version,
                only_version: 0,
            };
            let deleted = call(node, timeout, |mut client| {
                let message = message.clone();
                async move { client.delete(request(message, timeout)).await }
            });
            let result = self.on_node(node, true, deleted).await;
            if let Err(e) = result {
                // `on_node` marked a node failure down already; a refusal
                // of the request must not leave the old value either.
                tracing::warn!(node = %node.id, keyspace, version, error = %e, "version-fenced invalidation failed; the node is marked down");
                if !e.is_node_failure() {
                    self.inner.cluster.mark_down(node, &e);
                }
            }
        });
        futures::future::join_all(asks).await;
    }

    /// Write-back: tells the nodes that may hold the keys' dirty entries
    /// (the first `replicas` healthy nodes of each key, and the next one in
    /// case a write went to a fallback) that these versions are stored: an
    /// entry of exactly that version becomes clean, an older one is dropped
    /// (see `MarkCleanRequest`). `replicas` is the keyspace's replication in
    /// this client's view; a caller that knows how many replicas the writer
    /// used calls [`mark_clean_replicas`](Client::mark_clean_replicas).
    /// Best effort: returns how many entries became clean or were dropped; a
    /// node that misses it keeps the entry dirty until the worker's repair
    /// round finds it.
    pub async fn mark_clean(&self, keyspace: &str, stored: &[(Bytes, u64)]) -> usize {
        let replicas = self.replication(keyspace).replicas;
        self.mark_clean_replicas(keyspace, stored, replicas).await
    }

    /// [`mark_clean`](Client::mark_clean) of keys written to `replicas`
    /// replicas (the write-back record's `rc-replicas`), whatever this
    /// client's own replication of the keyspace: every replica the writer
    /// may have written is told (issue 13, defect 8).
    pub async fn mark_clean_replicas(
        &self,
        keyspace: &str,
        stored: &[(Bytes, u64)],
        replicas: usize,
    ) -> usize {
        let asks = self
            .by_holder(keyspace, stored, replicas)
            .into_values()
            .map(|(node, keys)| async move { self.mark_clean_node(&node, keyspace, keys).await });
        futures::future::join_all(asks).await.into_iter().sum()
    }

    /// Write-back: these versions of the keys will never be stored (their
    /// records were dead-lettered); the nodes that may hold them (as for
    /// [`mark_clean_replicas`](Client::mark_clean_replicas)) remove an entry
    /// of exactly that version and leave any other. Best effort: returns how
    /// many entries went; the worker's repair round discards the ones a
    /// node missed.
    pub async fn discard_unstored(
        &self,
        keyspace: &str,
        unstored: &[(Bytes, u64)],
        replicas: usize,
    ) -> usize {
        let asks = self
            .by_holder(keyspace, unstored, replicas)
            .into_values()
            .map(|(node, keys)| async move { self.discard_node(&node, keyspace, keys).await });
        futures::future::join_all(asks).await.into_iter().sum()
    }

    /// Tells the member `node` (by id) that these versions will never be
    /// stored, as [`discard_unstored`](Client::discard_unstored) tells a
    /// key's holders: for dirty entries the repair round found there. Best
    /// effort: returns how many entries went.
    pub async fn discard_on(&self, node: &str, keyspace: &str, unstored: &[(Bytes, u64)]) -> usize {
        let Some(node) = self.member_nodes().into_iter().find(|n| n.id == node) else {
            return 0;
        };
        let keys = unstored
            .iter()
            .map(|(key, version)| v1::CleanKey {
                key: key.clone(),
                version: *version,
            })
            .collect();
        self.discard_node(&node, keyspace, keys).await
    }

    /// The keys grouped by the nodes that may hold them: the first
    /// `replicas + 1` healthy nodes of each key's ring order (the owners,
    /// and one more in case a write fell back), by node id.
    fn by_holder(
        &self,
        keyspace: &str,
        keys: &[(Bytes, u64)],
        replicas: usize,
    ) -> std::collections::HashMap<String, (Arc<NodeHandle>, Vec<v1::CleanKey>)> {
        let mut groups: std::collections::HashMap<String, (Arc<NodeHandle>, Vec<v1::CleanKey>)> =
            std::collections::HashMap::new();
        for (key, version) in keys {
            for (node, _) in self.healthy_in_order(keyspace, key, replicas.max(1) + 1) {
                groups
                    .entry(node.id.clone())
                    .or_insert_with(|| (Arc::clone(&node), Vec::new()))
                    .1
                    .push(v1::CleanKey {
                        key: key.clone(),
                        version: *version,
                    });
            }
        }
        groups
    }

    /// `Delete` with `only_version` of each of `keys` on one node; how many
    /// entries went. Failures are logged: the repair round comes back.
    async fn discard_node(
        &self,
        node: &Arc<NodeHandle>,
        keyspace: &str,
        keys: Vec<v1::CleanKey>,
    ) -> usize {
        let timeout = self.config().request_timeout;
        let mut discarded = 0;
        for key in keys {
            if key.version == 0 {
                // Version 0 would delete every version; no write has it.
                continue;
            }
            match crate::client::delete_from(
                Arc::clone(node),
                keyspace.to_owned(),
                key.key,
                key.version,
                timeout,
            )
            .await
            {
                Ok(gone) => discarded += usize::from(gone.first().copied().unwrap_or(false)),
                Err(e) => {
                    tracing::warn!(node = %node.id, keyspace, error = %e, "discard failed; the entry stays until the repair round");
                }
            }
        }
        discarded
    }

    /// `MarkClean` of `keys` on one node, in requests of at most 1000 keys;
    /// how many entries became clean. Failures are logged: the entries stay
    /// dirty until a later write of the key is cleaned, or the worker's
    /// repair round finds them.
    async fn mark_clean_node(
        &self,
        node: &NodeHandle,
        keyspace: &str,
        keys: Vec<v1::CleanKey>,
    ) -> usize {
        const MAX_KEYS: usize = 1000;
        let timeout = self.config().request_timeout;
        let mut cleaned = 0;
        for chunk in keys.chunks(MAX_KEYS) {
            let message = v1::MarkCleanRequest {
                keyspace: keyspace.to_owned(),
                keys: chunk.to_vec(),
            };
            let cleaned_here = call(node, timeout, |mut client| {
                let message = message.clone();
                async move { client.mark_clean(request(message, timeout)).await }
            });
            match self.on_node(node, false, cleaned_here).await {
                Ok(reply) => cleaned += reply.cleaned as usize,
                Err(e) => {
                    tracing::warn!(node = %node.id, keyspace, error = %e, "mark-clean failed; entries stay dirty");
                }
            }
        }
        cleaned
    }

    /// Every node's dirty entries of `keyspace` made dirty at least
    /// `min_age` ago: per node id, `(key, version)` in key order. The
    /// write-back worker compares them with the store and marks
    /// the stored ones clean (see [`mark_clean`](Client::mark_clean)), which
    /// repairs entries whose `MarkClean` was lost. A node that does not
    /// answer is skipped (and logged): its entries are looked at next time.
    pub async fn dirty_entries(
        &self,
        keyspace: &str,
        min_age: Duration,
    ) -> Vec<(String, Vec<(Bytes, u64)>)> {
        /// Keys asked for per call.
        const PAGE: u32 = 1000;
        let view = self.member_nodes();
        let timeout = self.config().request_timeout;
        let min_age_ms = u64::try_from(min_age.as_millis()).unwrap_or(u64::MAX);
        let asks = view.into_iter().map(|node| async move {
            let mut found = Vec::new();
            let mut after = Bytes::new();
            loop {
                let message = v1::ListDirtyRequest {
                    keyspace: keyspace.to_owned(),
                    min_age_ms,
                    after_key: after.clone(),
                    limit: PAGE,
                };
                let listed = call(&node, timeout, |mut client| {
                    let message = message.clone();
                    async move { client.list_dirty(message).await }
                });
                match listed.await {
                    Ok(reply) => {
                        if let Some(last) = reply.keys.last() {
                            after = last.key.clone();
                        }
                        found.extend(reply.keys.into_iter().map(|k| (k.key, k.version)));
                        if !reply.more {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(node = %node.id, keyspace, error = %e, "cannot list dirty entries");
                        break;
                    }
                }
            }
            (node.id.clone(), found)
        });
        futures::future::join_all(asks).await
    }

    /// Tells the member `node` (by id) that these versions are stored, as
    /// [`mark_clean`](Client::mark_clean) tells a key's owners: for dirty
    /// entries found on a node that is not (or no longer) among them. Best
    /// effort: returns how many entries became clean.
    pub async fn mark_clean_on(
        &self,
        node: &str,
        keyspace: &str,
        stored: &[(Bytes, u64)],
    ) -> usize {
        let Some(node) = self.member_nodes().into_iter().find(|n| n.id == node) else {
            return 0;
        };
        let keys = stored
            .iter()
            .map(|(key, version)| v1::CleanKey {
                key: key.clone(),
                version: *version,
            })
            .collect();
        self.mark_clean_node(&node, keyspace, keys).await
    }
}

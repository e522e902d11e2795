//! The client handle and its raw-bytes API.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ringcache_proto::v1;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::cluster::{Cluster, NodeHandle, View};
use crate::config::{Backoff, ClientConfig, Replication, Token};
use crate::error::{Error, Result};
use crate::telemetry;

/// A cached value as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The value (shared, not copied).
    pub value: Bytes,
    /// The writer's version.
    pub version: u64,
    /// Time left before expiry; `None` if the entry never expires.
    pub ttl_remaining: Option<Duration>,
}

/// When a write stores its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Condition {
    /// Always (the default). Idempotent: retried on failure.
    #[default]
    Always,
    /// Only if no live entry exists. Not idempotent: never retried.
    IfAbsent,
    /// Only if the key is absent or holds an older version. Idempotent:
    /// retried on failure.
    IfNewerVersion,
}

/// How to write one key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct SetOptions {
    /// The version stored with the value (default 0).
    pub version: u64,
    /// Time to live; `None` takes the keyspace's default on the node.
    pub ttl: Option<Duration>,
    /// When to store.
    pub condition: Condition,
    /// Write-back: the value is not in the store yet; the node keeps it
    /// until the worker reports it stored.
    pub(crate) dirty: bool,
}

impl SetOptions {
    /// Unconditional, version 0, the keyspace's default TTL.
    pub fn new() -> Self {
        SetOptions::default()
    }

    /// Sets the version.
    pub fn version(mut self, version: u64) -> Self {
        self.version = version;
        self
    }

    /// Sets the TTL.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Stores only if the key is absent.
    pub fn if_absent(mut self) -> Self {
        self.condition = Condition::IfAbsent;
        self
    }

    /// Stores only if the version is newer than the stored one.
    pub fn if_newer_version(mut self) -> Self {
        self.condition = Condition::IfNewerVersion;
        self
    }
}

/// What a write did (as reported by the first replica in ring order that
/// acknowledged it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetOutcome {
    /// Stored.
    Stored,
    /// Not stored: a live entry exists (`IfAbsent`); it has this version.
    Exists {
        /// The stored version.
        current_version: u64,
    },
    /// Not stored: the stored version is equal or newer (`IfNewerVersion`).
    StaleVersion {
        /// The stored version that won.
        current_version: u64,
    },
}

impl SetOutcome {
    /// Whether the value was stored.
    pub fn is_stored(self) -> bool {
        self == SetOutcome::Stored
    }
}

/// A member of the pool as this client sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Node id.
    pub id: String,
    /// Address the client dials.
    pub address: String,
    /// Ring weight.
    pub weight: u32,
    /// Whether the client currently routes to it.
    pub up: bool,
}

/// The membership this client routes by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Epoch of the member list.
    pub epoch: u64,
    /// Members sorted by id.
    pub members: Vec<Member>,
}

/// What flushing one node did.
#[derive(Debug)]
pub struct NodeFlush {
    /// Node id.
    pub node: String,
    /// Its address.
    pub address: String,
    /// `Ok` once the node emptied the keyspace (or all of them), or why it
    /// did not.
    pub result: Result<()>,
}

/// Stats of one node, as its `Stats` RPC reports them.
#[derive(Debug)]
pub struct NodeStats {
    /// Node id.
    pub node: String,
    /// The node's reply, or why there is none.
    pub stats: Result<v1::StatsResponse>,
}

/// A handle to a ringcache pool: cheap to clone, safe to share across tasks.
/// Background probing and topology refresh stop when the last clone drops.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) backoff: Backoff,
    /// Versions for every strategy of every keyspace (`crate::hlc`).
    pub(crate) clock: crate::hlc::Hlc,
    /// Strategy keyspaces and their stores.
    pub(crate) keyspaces: crate::strategy::Registry,
    /// The write-back producer, once `enable_write_back` was called.
    #[cfg(feature = "kafka")]
    pub(crate) producer: std::sync::OnceLock<Arc<crate::producer::Producer>>,
    /// Called when a `fast` write-back write could not be queued.
    #[cfg(feature = "kafka")]
    pub(crate) write_back_failed: std::sync::OnceLock<Box<crate::strategy::WriteBackFailed>>,
    _stop: DropGuard,
}

/// What a keyed call needs: `want` answers per key from distinct nodes, at
/// least `need` of them; whether it may be retried; whether it writes (a node
/// routed around during a write is marked down, so that it is flushed before
/// it is read again).
#[derive(Clone, Copy)]
struct Shape {
    want: usize,
    need: usize,
    idempotent: bool,
    writes: bool,
}

/// One key of a batch call and what became of it.
struct Slot<T> {
    /// Successful replies, one per node that answered for this key. The
    /// nodes that already answered are read from here (no set of ids beside
    /// it): one allocation per key on the hot path instead of three.
    acks: Vec<Ack<T>>,
}

/// One node's successful reply for one key.
struct Ack<T> {
    /// The node's place in the key's ring order (0 = owner).
    rank: usize,
    node: Arc<NodeHandle>,
    reply: T,
}

impl Client {
    /// Connects to the pool: asks the seeds for the topology, then keeps it
    /// fresh in the background.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid config, [`Error::NoSeedReachable`]
    /// when no seed answers.
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        config.validate()?;
        let backoff = Backoff::new(&config);
        let mut clock = crate::hlc::Hlc::new();
        if let Some(writer) = config.writer_id {
            clock = clock.with_writer_id(writer);
        }
        let cluster = Cluster::bootstrap(config).await?;
        let stop = CancellationToken::new();
        cluster.spawn_background(stop.clone());
        let client = Client {
            inner: Arc::new(Inner {
                cluster,
                backoff,
                clock,
                keyspaces: crate::strategy::Registry::default(),
                #[cfg(feature = "kafka")]
                producer: std::sync::OnceLock::new(),
                #[cfg(feature = "kafka")]
                write_back_failed: std::sync::OnceLock::new(),
                _stop: stop.clone().drop_guard(),
            }),
        };
        client.spawn_recovery(stop);
        Ok(client)
    }

    /// Rolls back in-doubt transactions (`Client::recover_in_doubt`) every
    /// `recovery_interval`, until the last clone of the client drops.
    fn spawn_recovery(&self, stop: CancellationToken) {
        let weak = Arc::downgrade(&self.inner);
        let every = self.config().recovery_interval;
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                let Some(inner) = weak.upgrade() else { return };
                let client = Client { inner };
                match client.recover_in_doubt().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(resolved = n, "in-doubt transactions rolled back"),
                    Err(e) => tracing::warn!(error = %e, "in-doubt recovery failed"),
                }
            }
        });
    }

    /// The configuration in use.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.cluster.config
    }

    /// Replaces the bearer token every request carries from now on (the
    /// client's half of a token rotation, `docs/security.md`): requests
    /// already sent keep the token they were sent with. `None` sends no
    /// token. [`Client::config`] keeps showing the token the client was
    /// connected with.
    ///
    /// # Errors
    /// [`Error::Config`] when the token is not printable ASCII; the token
    /// in use then stays.
    pub fn set_token(&self, token: Option<Token>) -> Result<()> {
        self.inner.cluster.set_token(token.as_ref())
    }

    /// The replication of `keyspace`: its defined settings if it is a
    /// strategy keyspace, else the config's.
    pub fn replication(&self, keyspace: &str) -> Replication {
        match self.inner.keyspaces.get(keyspace) {
            Some(state) => Replication::new(state.settings.replicas)
                .with_write_quorum(state.settings.write_quorum),
            None => self.config().replication(keyspace),
        }
    }

    /// The membership the client routes by.
    pub fn topology(&self) -> Topology {
        let view = self.inner.cluster.view();
        let mut members: Vec<Member> = view
            .nodes
            .values()
            .map(|n| Member {
                id: n.id.clone(),
                address: n.address.clone(),
                weight: n.weight,
                up: !n.is_down(),
            })
            .collect();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        Topology {
            epoch: view.epoch,
            members,
        }
    }

    /// The nodes that own `key` in ring order (as many as the keyspace's
    /// replication), whatever their health.
    pub fn owners(&self, keyspace: &str, key: &[u8]) -> Vec<String> {
        let replicas = self.replication(keyspace).replicas;
        let view = self.inner.cluster.view();
        view.ring
            .replicas(keyspace, key, replicas)
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    /// Re-reads the topology now instead of waiting for the next refresh.
    ///
    /// # Errors
    /// The last node failure when no node answers.
    pub async fn refresh_topology(&self) -> Result<()> {
        self.inner.cluster.refresh().await.map(|_| ())
    }

    /// Reads one key from the first healthy node that holds it.
    ///
    /// # Errors
    /// [`Error::Refused`] for a bad key or unknown keyspace; otherwise an
    /// availability error after the retries the deadline allows.
    pub async fn get(&self, keyspace: &str, key: impl AsRef<[u8]>) -> Result<Option<Entry>> {
        let call = telemetry::Call::start(keyspace, "get");
        let keys = [Bytes::copy_from_slice(key.as_ref())];
        let result = call
            .instrument(self.read_keys(keyspace, &keys))
            .await
            .map(|mut results| results.pop().flatten());
        if let Ok(found) = &result {
            telemetry::lookup(keyspace, telemetry::RAW, found.is_some());
        }
        call.finish(result)
    }

    /// Reads many keys, fanning out to the owning nodes in parallel.
    /// Results come back in request order.
    ///
    /// # Errors
    /// As [`Client::get`]; the first error of any node fails the call.
    pub async fn multi_get(&self, keyspace: &str, keys: &[Bytes]) -> Result<Vec<Option<Entry>>> {
        let call = telemetry::Call::start(keyspace, "multi_get");
        let result = call.instrument(self.read_keys(keyspace, keys)).await;
        if let Ok(found) = &result {
            for entry in found {
                telemetry::lookup(keyspace, telemetry::RAW, entry.is_some());
            }
        }
        call.finish(result)
    }

    /// The reads of `get` and `multi_get`, uncounted: strategies count what
    /// they read under their own label.
    pub(crate) async fn read_keys(
        &self,
        keyspace: &str,
        keys: &[Bytes],
    ) -> Result<Vec<Option<Entry>>> {
        let slots = self
            .execute(
                keyspace,
                keys,
                Shape {
                    want: 1,
                    need: 1,
                    idempotent: true,
                    writes: false,
                },
                |node, idxs, timeout, _fallback| {
                    let keys: Vec<Bytes> = idxs.iter().map(|&i| keys[i].clone()).collect();
                    read_from(node, keyspace.to_owned(), keys, timeout)
                },
            )
            .await?;
        Ok(slots
            .into_iter()
            .map(|slot| slot.acks.into_iter().next().and_then(|ack| ack.reply))
            .collect())
    }

    /// Writes one key to its replicas.
    ///
    /// # Errors
    /// [`Error::Refused`] for bad input; [`Error::QuorumNotReached`] when too
    /// few replicas acknowledged.
    pub async fn set(
        &self,
        keyspace: &str,
        key: impl AsRef<[u8]>,
        value: impl Into<Bytes>,
        options: SetOptions,
    ) -> Result<SetOutcome> {
        let call = telemetry::Call::start(keyspace, "set");
        let item = (Bytes::copy_from_slice(key.as_ref()), value.into(), options);
        let result = call
            .instrument(self.write_items(keyspace, vec![item]))
            .await
            .map(|mut results| {
                results
                    .pop()
                    .expect("write_items returns one outcome per item, and there is one item")
            });
        call.finish(result)
    }

    /// Writes many keys, each to its replicas, fanning out in parallel.
    /// Outcomes come back in request order. Items are independent: the batch
    /// is not atomic.
    ///
    /// # Errors
    /// As [`Client::set`], for the first item that fails.
    pub async fn multi_set(
        &self,
        keyspace: &str,
        items: Vec<(Bytes, Bytes, SetOptions)>,
    ) -> Result<Vec<SetOutcome>> {
        let call = telemetry::Call::start(keyspace, "multi_set");
        let result = call.instrument(self.write_items(keyspace, items)).await;
        call.finish(result)
    }

    /// The writes of `set` and `multi_set`.
    async fn write_items(
        &self,
        keyspace: &str,
        items: Vec<(Bytes, Bytes, SetOptions)>,
    ) -> Result<Vec<SetOutcome>> {
        let replication = self.replication(keyspace);
        let idempotent = items
            .iter()
            .all(|(_, _, o)| o.condition != Condition::IfAbsent);
        let keys: Vec<Bytes> = items.iter().map(|(k, _, _)| k.clone()).collect();
        let fallback_ttl = self.config().fallback_ttl;
        let slots = self
            .execute(
                keyspace,
                &keys,
                Shape {
                    want: replication.replicas,
                    need: replication.write_quorum,
                    idempotent,
                    writes: true,
                },
                |node, idxs, timeout, fallback| {
                    let batch = idxs
                        .iter()
                        .zip(fallback)
                        .map(|(&i, fallback)| {
                            let (key, value, options) = &items[i];
                            to_proto_item(key, value, options, fallback.then_some(fallback_ttl))
                        })
                        .collect();
                    write_to(node, keyspace.to_owned(), batch, timeout)
                },
            )
            .await?;
        Ok(slots
            .into_iter()
            .map(|slot| {
                slot.acks
                    .into_iter()
                    .min_by_key(|ack| ack.rank)
                    .map(|ack| ack.reply)
                    .expect("execute returns only slots that reached their quorum")
            })
            .collect())
    }

    /// Deletes one key from its replicas; true if any replica held it.
    ///
    /// # Errors
    /// As [`Client::set`].
    pub async fn delete(&self, keyspace: &str, key: impl AsRef<[u8]>) -> Result<bool> {
        let call = telemetry::Call::start(keyspace, "delete");
        let result = call
            .instrument(self.delete_key(keyspace, key.as_ref()))
            .await;
        call.finish(result)
    }

    async fn delete_key(&self, keyspace: &str, key: &[u8]) -> Result<bool> {
        self.delete_version(keyspace, key, 0).await
    }

    /// Write-back: removes the key's entry of exactly `version` from its
    /// replicas, leaving any other version (a newer write, or an older
    /// acknowledged one): for a write the store will never hold. True if
    /// any replica held it.
    ///
    /// # Errors
    /// As [`Client::set`].
    #[cfg(feature = "kafka")]
    pub(crate) async fn discard(&self, keyspace: &str, key: &[u8], version: u64) -> Result<bool> {
        debug_assert!(version != 0, "version 0 would delete every version");
        self.delete_version(keyspace, key, version).await
    }

    /// `Delete` on the key's replicas; see [`delete_from`].
    async fn delete_version(&self, keyspace: &str, key: &[u8], only_version: u64) -> Result<bool> {
        let replication = self.replication(keyspace);
        let keys = [Bytes::copy_from_slice(key)];
        let slots = self
            .execute(
                keyspace,
                &keys,
                Shape {
                    want: replication.replicas,
                    need: replication.write_quorum,
                    idempotent: true,
                    writes: true,
                },
                |node, _idxs, timeout, _fallback| {
                    delete_from(
                        node,
                        keyspace.to_owned(),
                        keys[0].clone(),
                        only_version,
                        timeout,
                    )
                },
            )
            .await?;
        Ok(slots
            .into_iter()
            .flat_map(|slot| slot.acks)
            .any(|ack| ack.reply))
    }

    /// Stats of every member, asked in parallel; a member that does not
    /// answer is reported with its error.
    pub async fn stats(&self) -> Vec<NodeStats> {
        let timeout = self.config().request_timeout;
        let nodes = self.member_nodes();
        let asks = nodes.into_iter().map(|node| async move {
            let stats = call(&node, timeout, |mut client| async move {
                client.stats(v1::StatsRequest::default()).await
            })
            .await;
            NodeStats {
                node: node.id.clone(),
                stats,
            }
        });
        futures::future::join_all(asks).await
    }

    /// Empties `keyspace` (every keyspace when `None`) on the members whose
    /// id or address is `only` (every member when `None`), with the node's
    /// `Flush`: values, leases, pending changes and write-back dirty entries
    /// alike. One attempt per node, within `request_timeout`; the result
    /// says per node whether it flushed. Empty when `only` names no member.
    pub async fn flush_members(
        &self,
        only: Option<&str>,
        keyspace: Option<&str>,
    ) -> Vec<NodeFlush> {
        let timeout = self.config().request_timeout;
        let nodes = self
            .member_nodes()
            .into_iter()
            .filter(|n| only.is_none_or(|wanted| n.id == wanted || n.address == wanted));
        let flushes = nodes.map(|node| async move {
            let message = v1::FlushRequest {
                keyspace: keyspace.unwrap_or_default().to_owned(),
            };
            let result = call(&node, timeout, |mut client| {
                let message = message.clone();
                async move { client.flush(request(message, timeout)).await }
            })
            .await
            .map(|_| ());
            NodeFlush {
                node: node.id.clone(),
                address: node.address.clone(),
                result,
            }
        });
        futures::future::join_all(flushes).await
    }

    /// Every member of the current view, in id order.
    pub(crate) fn member_nodes(&self) -> Vec<Arc<NodeHandle>> {
        let view = self.inner.cluster.view();
        let mut nodes: Vec<Arc<NodeHandle>> = view.nodes.values().cloned().collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        nodes
    }

    /// The engine of every keyed call.
    ///
    /// Each key must be answered by `want` distinct nodes, walking the ring
    /// from the key and skipping nodes that are down or failed during this
    /// call; it succeeds with at least `need` answers. A node that fails is
    /// recorded (and may be marked down) and the call moves on to the next
    /// node, with jittered backoff, while attempts and the deadline last.
    /// Non-idempotent calls get one attempt.
    async fn execute<T, F, Fut>(
        &self,
        keyspace: &str,
        keys: &[Bytes],
        shape: Shape,
        send: F,
    ) -> Result<Vec<Slot<T>>>
    where
        F: Fn(Arc<NodeHandle>, Vec<usize>, Duration, Vec<bool>) -> Fut,
        Fut: Future<Output = Result<Vec<T>>>,
    {
        let Shape {
            want,
            need,
            idempotent,
            writes,
        } = shape;
        let config = self.config();
        let deadline = Instant::now() + config.deadline;
        let attempts = if idempotent { config.max_attempts } else { 1 };
        let mut slots: Vec<Slot<T>> = keys.iter().map(|_| Slot { acks: Vec::new() }).collect();
        let mut failed: HashSet<String> = HashSet::new();
        let mut last: Option<Error> = None;
        for attempt in 0..attempts {
            let view = self.inner.cluster.view();
            let plan = plan(&view, keyspace, keys, &slots, &failed, want);
            if plan.groups.is_empty() {
                break;
            }
            if attempt > 0 {
                telemetry::retry(keyspace);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(Error::DeadlineExceeded {
                    deadline: config.deadline,
                    last: describe(&last),
                });
            }
            let timeout = config.request_timeout.min(remaining);
            let sends = plan.groups.into_iter().map(|(node, members)| {
                let idxs: Vec<usize> = members.iter().map(|t| t.index).collect();
                let fallback: Vec<bool> = members.iter().map(|t| t.fallback).collect();
                let fut = send(Arc::clone(&node), idxs, timeout, fallback);
                async move { (node, members, fut.await) }
            });
            // Most calls go to one node: awaited in place, without the
            // join's vector of (large) futures.
            let answers = if sends.len() == 1 {
                let mut sends = sends;
                let only = sends.next().expect("one group");
                vec![only.await]
            } else {
                futures::future::join_all(sends).await
            };
            for (node, members, result) in answers {
                match result {
                    Ok(replies) => {
                        self.inner.cluster.record_success(&node);
                        debug_assert_eq!(replies.len(), members.len());
                        for (target, reply) in members.into_iter().zip(replies) {
                            slots[target.index].acks.push(Ack {
                                rank: target.rank,
                                node: Arc::clone(&node),
                                reply,
                            });
                        }
                    }
                    Err(error) if error.is_node_failure() => {
                        tracing::debug!(node = %node.id, %error, attempt, "node failed; routing around it");
                        if writes {
                            // The node may hold an older value of these
                            // keys that this write never reached: it must
                            // be flushed before it serves this client again.
                            self.inner.cluster.mark_down(&node, &error);
                        } else {
                            self.inner.cluster.record_failure(&node, &error);
                        }
                        failed.insert(node.id.clone());
                        last = Some(error);
                    }
                    Err(error) => return Err(error),
                }
            }
            if slots.iter().all(|s| s.acks.len() >= want) {
                break;
            }
            if attempt + 1 < attempts {
                let pause = self
                    .inner
                    .backoff
                    .delay(attempt)
                    .min(deadline.saturating_duration_since(Instant::now()));
                tokio::time::sleep(pause).await;
            }
        }
        if let Some(short) = slots.iter().find(|s| s.acks.len() < need) {
            let acked = short.acks.len();
            return Err(if acked == 0 && want == 1 {
                match last {
                    Some(e) if Instant::now() >= deadline => Error::DeadlineExceeded {
                        deadline: config.deadline,
                        last: e.to_string(),
                    },
                    Some(e) => e,
                    None => Error::NoNodeAvailable {
                        keyspace: keyspace.to_owned(),
                        reason: "every node that could hold the key is down".into(),
                    },
                }
            } else {
                Error::QuorumNotReached {
                    acked,
                    needed: need,
                    last: describe(&last),
                }
            });
        }
        Ok(slots)
    }
}

fn describe(error: &Option<Error>) -> String {
    error
        .as_ref()
        .map_or_else(|| "none".to_owned(), ToString::to_string)
}

/// One key sent to one node in one attempt.
#[derive(Clone, Copy)]
struct Target {
    /// Index of the key in the call.
    index: usize,
    /// The node's place in the key's ring order (0 = owner).
    rank: usize,
    /// Whether the node holds the key only because an owner is down.
    fallback: bool,
}

/// Which keys go to which node in one attempt.
struct Plan {
    groups: Vec<(Arc<NodeHandle>, Vec<Target>)>,
}

/// Picks, for every key still short of `want` answers, the next nodes in its
/// ring order that are up, did not fail in this call, and did not answer yet.
/// A node whose rank is `want` or more is a fallback: it holds the key only
/// because an owner is down.
fn plan<T>(
    view: &View,
    keyspace: &str,
    keys: &[Bytes],
    slots: &[Slot<T>],
    failed: &HashSet<String>,
    want: usize,
) -> Plan {
    let mut groups: HashMap<&str, Vec<Target>> = HashMap::new();
    for (i, key) in keys.iter().enumerate() {
        let slot = &slots[i];
        let mut missing = want.saturating_sub(slot.acks.len());
        if missing == 0 {
            continue;
        }
        for (rank, id) in view.ring.successors(keyspace, key).enumerate() {
            if missing == 0 {
                break;
            }
            let Some(node) = view.node(id) else { continue };
            if node.is_down()
                || failed.contains(id)
                || slot.acks.iter().any(|ack| ack.node.id == id)
            {
                continue;
            }
            groups.entry(id).or_default().push(Target {
                index: i,
                rank,
                fallback: rank >= want,
            });
            missing -= 1;
        }
    }
    let mut groups: Vec<_> = groups
        .into_iter()
        .map(|(id, members)| {
            let node = Arc::clone(view.node(id).expect("planned ids come from the view"));
            (node, members)
        })
        .collect();
    groups.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    Plan { groups }
}

/// The node's client, as each call gets a clone of it.
pub(crate) use crate::transport::NodeClient;

/// How much later than its timeout a failed call must end to count as
/// outlived by a stall of this process, at the least.
const STALL_SLACK: Duration = Duration::from_millis(100);

/// Whether a call that failed `elapsed` after it started, with `timeout`
/// to run, failed because this process stalled rather than because the
/// node did not answer: its timers fired well after the timeout ran out
/// (by half the timeout, at least [`STALL_SLACK`]), so the process was
/// not running (paused, swapped out, starved of CPU) while the node's
/// reply may have been waiting in the socket. A node that is merely slow
/// is given up on when its timeout runs out, not later.
pub(crate) fn outlived_by_stall(elapsed: Duration, timeout: Duration) -> bool {
    elapsed >= timeout + (timeout / 2).max(STALL_SLACK)
}

/// Runs one idempotent RPC (a read, a versioned write, a commit, an
/// abort, an invalidation...) with a timeout, turning failures into
/// client errors. `rpc` builds the call on a clone of the node's client.
///
/// An attempt that failed only after this process stalled
/// ([`outlived_by_stall`]) says nothing about the node: it is made once
/// more, with a fresh timeout, so that a paused client does not mark
/// healthy nodes down (and flush them) for its own pause.
pub(crate) async fn call<T, F, Fut>(node: &NodeHandle, timeout: Duration, rpc: F) -> Result<T>
where
    F: Fn(NodeClient) -> Fut,
    Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
{
    retry_after_stall(&node.id, timeout, || rpc(node.client.clone())).await
}

/// [`call`]'s retry, over any attempt.
async fn retry_after_stall<T, F, Fut>(node: &str, timeout: Duration, attempt: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
{
    let started = Instant::now();
    match timed(node, timeout, attempt()).await {
        Err(error) if error.is_node_failure() && outlived_by_stall(started.elapsed(), timeout) => {
            let elapsed = started.elapsed();
            tracing::info!(node, ?elapsed, ?timeout, %error, "a call outlived its timeout while this process stalled; asking the node once more");
            telemetry::stall_retry(node);
            timed(node, timeout, attempt()).await
        }
        other => other,
    }
}

/// Runs one RPC with a timeout, turning failures into client errors; for
/// a call that must not be sent twice (a prepare, a lease).
pub(crate) async fn call_once<T>(
    node: &NodeHandle,
    timeout: Duration,
    rpc: impl Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    timed(&node.id, timeout, rpc).await
}

async fn timed<T>(
    node: &str,
    timeout: Duration,
    rpc: impl Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, rpc).await {
        Ok(Ok(reply)) => Ok(reply.into_inner()),
        Ok(Err(status)) => Err(Error::from_status(node, &status)),
        Err(_) => Err(Error::Unavailable {
            node: node.to_owned(),
            message: format!("no reply within {timeout:?}"),
        }),
    }
}

pub(crate) fn request<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    // Tell the node too, so it can drop work the client gave up on.
    request.set_timeout(timeout);
    #[cfg(feature = "otel")]
    telemetry::otel::inject_grpc(request.metadata_mut());
    request
}

fn from_proto_entry(response: v1::GetResponse) -> Option<Entry> {
    response.entry.map(entry_from_proto)
}

pub(crate) fn entry_from_proto(e: v1::Entry) -> Entry {
    Entry {
        value: e.value,
        version: e.version,
        ttl_remaining: (e.ttl_remaining_ms > 0).then(|| Duration::from_millis(e.ttl_remaining_ms)),
    }
}

async fn read_from(
    node: Arc<NodeHandle>,
    keyspace: String,
    mut keys: Vec<Bytes>,
    timeout: Duration,
) -> Result<Vec<Option<Entry>>> {
    if keys.len() == 1 {
        let key = keys.pop().expect("length checked above");
        let message = v1::GetRequest { keyspace, key };
        let reply = call(&node, timeout, |mut client| {
            let message = message.clone();
            async move { client.get(request(message, timeout)).await }
        })
        .await?;
        return Ok(vec![from_proto_entry(reply)]);
    }
    let expected = keys.len();
    let message = v1::MultiGetRequest { keyspace, keys };
    let reply = call(&node, timeout, |mut client| {
        let message = message.clone();
        async move { client.multi_get(request(message, timeout)).await }
    })
    .await?;
    let results = answered_all(&node, "MultiGet", reply.results, expected)?;
    Ok(results.into_iter().map(from_proto_entry).collect())
}

/// A batch reply must answer every item, in order; a node that answers fewer
/// is broken, and the call moves on to another node.
fn answered_all<T>(
    node: &NodeHandle,
    rpc: &str,
    results: Vec<T>,
    expected: usize,
) -> Result<Vec<T>> {
    if results.len() == expected {
        return Ok(results);
    }
    Err(Error::Unavailable {
        node: node.id.clone(),
        message: format!("{rpc} answered {} of {expected} items", results.len()),
    })
}

pub(crate) fn to_proto_item(
    key: &Bytes,
    value: &Bytes,
    options: &SetOptions,
    cap: Option<Duration>,
) -> v1::SetItem {
    let ttl = match (options.ttl, cap) {
        (Some(ttl), Some(cap)) => Some(ttl.min(cap)),
        (ttl, None) => ttl,
        (None, cap) => cap,
    };
    let condition = match options.condition {
        Condition::Always => v1::WriteCondition::Unconditional,
        Condition::IfAbsent => v1::WriteCondition::IfAbsent,
        Condition::IfNewerVersion => v1::WriteCondition::IfNewerVersion,
    };
    v1::SetItem {
        key: key.clone(),
        value: value.clone(),
        version: options.version,
        // A TTL under 1 ms would read as "keyspace default" (0): round up.
        ttl_ms: ttl.map_or(0, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
        }),
        condition: condition as i32,
        dirty: options.dirty,
    }
}

fn from_proto_outcome(reply: v1::SetResponse) -> SetOutcome {
    match reply.outcome() {
        v1::SetOutcome::Exists => SetOutcome::Exists {
            current_version: reply.current_version,
        },
        v1::SetOutcome::StaleVersion => SetOutcome::StaleVersion {
            current_version: reply.current_version,
        },
        v1::SetOutcome::Stored | v1::SetOutcome::Unspecified => SetOutcome::Stored,
    }
}

async fn write_to(
    node: Arc<NodeHandle>,
    keyspace: String,
    mut items: Vec<v1::SetItem>,
    timeout: Duration,
) -> Result<Vec<SetOutcome>> {
    // A set only if absent must not be sent twice: a second attempt after
    // a first that stored would be refused by the first one's entry.
    let idempotent = items
        .iter()
        .all(|item| item.condition() != v1::WriteCondition::IfAbsent);
    if items.len() == 1 {
        let item = items.pop().expect("length checked above");
        let message = v1::SetRequest {
            keyspace,
            item: Some(item),
        };
        let rpc = |mut client: NodeClient| {
            let message = message.clone();
            async move { client.set(request(message, timeout)).await }
        };
        let reply = if idempotent {
            call(&node, timeout, rpc).await?
        } else {
            call_once(&node, timeout, rpc(node.client.clone())).await?
        };
        return Ok(vec![from_proto_outcome(reply)]);
    }
    let expected = items.len();
    let message = v1::MultiSetRequest { keyspace, items };
    let rpc = |mut client: NodeClient| {
        let message = message.clone();
        async move { client.multi_set(request(message, timeout)).await }
    };
    let reply = if idempotent {
        call(&node, timeout, rpc).await?
    } else {
        call_once(&node, timeout, rpc(node.client.clone())).await?
    };
    let results = answered_all(&node, "MultiSet", reply.results, expected)?;
    Ok(results.into_iter().map(from_proto_outcome).collect())
}

/// `Delete` of one key on `node`; with a non-zero `only_version`, only an
/// entry of exactly that version goes (`DeleteRequest.only_version`).
pub(crate) async fn delete_from(
    node: Arc<NodeHandle>,
    keyspace: String,
    key: Bytes,
    only_version: u64,
    timeout: Duration,
) -> Result<Vec<bool>> {
    let message = v1::DeleteRequest {
        keyspace,
        key,
        below_version: 0,
        only_version,
    };
    let reply = call(&node, timeout, |mut client| {
        let message = message.clone();
        async move { client.delete(request(message, timeout)).await }
    })
    .await?;
    Ok(vec![reply.deleted])
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(500);

    /// An attempt that never answers; the first one also lets `stall` of
    /// (paused) time pass while it is out, as a SIGSTOP of the process
    /// would, before the timeout is looked at.
    type Attempt = std::pin::Pin<
        Box<dyn Future<Output = std::result::Result<tonic::Response<u8>, tonic::Status>>>,
    >;

    fn attempts(stall: Duration, answer_second: bool) -> (Arc<AtomicUsize>, impl Fn() -> Attempt) {
        let made = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&made);
        let attempt = move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n == 0 {
                    tokio::time::advance(stall).await;
                } else if answer_second {
                    return Ok(tonic::Response::new(7u8));
                }
                std::future::pending().await
            }) as Attempt
        };
        (made, attempt)
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_outlived_by_a_stall_of_this_process_is_asked_once_more() {
        let (made, attempt) = attempts(Duration::from_secs(10), true);
        let reply = retry_after_stall("node-1", TIMEOUT, attempt).await;
        assert_eq!(reply.ok(), Some(7));
        assert_eq!(made.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_that_does_not_answer_in_time_is_not_asked_twice() {
        // No stall: the timeout fires on time, and the node failed.
        let (made, attempt) = attempts(Duration::ZERO, true);
        let reply = retry_after_stall("node-1", TIMEOUT, attempt).await;
        assert!(matches!(reply, Err(Error::Unavailable { .. })), "{reply:?}");
        assert_eq!(made.load(Ordering::SeqCst), 1);
        // A short delay of the timer (a busy runtime) is no stall either.
        let (made, attempt) = attempts(TIMEOUT + Duration::from_millis(50), true);
        assert!(retry_after_stall("node-1", TIMEOUT, attempt).await.is_err());
        assert_eq!(made.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_attempt_that_fails_too_is_the_answer() {
        let (made, attempt) = attempts(Duration::from_secs(10), false);
        let reply = retry_after_stall("node-1", TIMEOUT, attempt).await;
        assert!(matches!(reply, Err(Error::Unavailable { .. })), "{reply:?}");
        assert_eq!(made.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_stall_is_half_a_timeout_late_and_at_least_the_slack() {
        assert!(!outlived_by_stall(TIMEOUT, TIMEOUT));
        assert!(!outlived_by_stall(Duration::from_millis(749), TIMEOUT));
        assert!(outlived_by_stall(Duration::from_millis(750), TIMEOUT));
        let short = Duration::from_millis(20);
        assert!(!outlived_by_stall(Duration::from_millis(100), short));
        assert!(outlived_by_stall(Duration::from_millis(120), short));
    }
}

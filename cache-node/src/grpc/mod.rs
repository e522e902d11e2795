//! The gRPC transport: converts `ringcache.v1` messages to the store's types,
//! calls the store, and converts back. No cache logic lives here.
//!
//! - this file: the unary calls, each a thin wrapper over an `exec_*`
//!   function that checks the caller's permission and runs the command;
//! - [`batch`]: the `BatchCommands` stream, which runs the same `exec_*`
//!   functions command by command, with the admission the interceptor gives
//!   a unary call done per command.

mod batch;

use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringcache_proto::ServiceError;
use ringcache_proto::v1::{self, cache_node_server::CacheNode};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::auth::{Auth, Principal};
use crate::config::{Config, Permission};
use crate::error::Error;
use crate::metrics::{NodeMetrics, Rpc};
use crate::sessions::{SESSION_HEADER, Sessions, Stamp};
use crate::store::{
    FillOutcome, Hit, LeaseRead, Prepare, PrepareResult, PrepareStep, SetItem, SetOutcome,
    SetResult, Store, WriteCondition,
};

/// Who made a call, put in the request's extensions by [`interceptor`].
#[derive(Clone)]
pub struct Caller {
    principal: Arc<Principal>,
    /// The call's slot of `limits.max_concurrent_requests`, freed when the
    /// handler drops the caller.
    _slot: Option<Arc<OwnedSemaphorePermit>>,
}

impl Caller {
    fn check(&self, keyspace: &str, need: Permission) -> Result<(), Error> {
        self.principal.check(keyspace, need)
    }

    /// For requests where an empty keyspace means every keyspace.
    fn check_scope(&self, keyspace: &str, need: Permission) -> Result<(), Error> {
        if keyspace.is_empty() {
            self.principal.check_all(need)
        } else {
            self.principal.check(keyspace, need)
        }
    }
}

/// The `CacheNode` service's interceptor: resolves the bearer token of the
/// `authorization` metadata to a principal, takes a request from its rate
/// limit and a slot of the concurrency limit, and hands them to the handler
/// as a [`Caller`]. Refusals are `UNAUTHENTICATED` or `RESOURCE_EXHAUSTED`,
/// counted in `ringcache_node_auth_refused_total`; health and reflection
/// are not behind it.
pub fn interceptor(
    auth: Arc<Auth>,
    metrics: Arc<NodeMetrics>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |mut request: Request<()>| {
        let refuse = |reason: &'static str, error: Error| {
            metrics.count_refused("grpc", reason);
            tracing::debug!(reason, %error, "request refused");
            error.to_status()
        };
        let header = request
            .metadata()
            .get("authorization")
            .map(|value| value.as_bytes());
        let principal = auth
            .bearer(header)
            .map_err(|e| refuse("unauthenticated", e))?;
        let peer = request.remote_addr().map(|addr| addr.ip());
        auth.admit(&principal, peer)
            .map_err(|e| refuse("rate_limited", e))?;
        let slot = auth.slot().map_err(|e| refuse("overloaded", e))?;
        request.extensions_mut().insert(Caller {
            principal,
            _slot: slot.map(Arc::new),
        });
        Ok(request)
    }
}

/// The caller and message of a request that went through [`interceptor`].
#[allow(clippy::result_large_err)] // `Status` is what tonic handlers return
fn admitted<T>(request: Request<T>) -> Result<(Caller, T), Status> {
    let (_, mut extensions, message) = request.into_parts();
    // Fail closed: a service mounted without the interceptor serves nobody.
    let caller = extensions
        .remove::<Caller>()
        .ok_or_else(|| Status::internal("request did not pass the authentication interceptor"))?;
    Ok((caller, message))
}

/// The session stamp of a request (`crate::sessions`), if it carries one.
fn stamp_of<T>(request: &Request<T>) -> Option<Stamp> {
    request
        .metadata()
        .get(SESSION_HEADER)
        .and_then(|value| Stamp::parse(value.as_bytes()))
}

/// The `CacheNode` service of one node.
pub struct CacheNodeService {
    /// What the handlers share; behind an `Arc` so that a command stream's
    /// task can hold it.
    shared: Arc<Shared>,
}

impl Deref for CacheNodeService {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

/// The state of the [`CacheNodeService`].
pub struct Shared {
    store: Arc<Store>,
    /// The flush generations of client sessions, and the fence between
    /// their writes and flushes.
    sessions: Sessions,
    metrics: Arc<NodeMetrics>,
    topology: v1::TopologyResponse,
    started: Instant,
    node_id: String,
    /// Admission of the commands of a stream (the interceptor admits each
    /// unary call).
    auth: Arc<Auth>,
    /// Cancelled when the node starts draining: command streams end once
    /// they answered what they received.
    stop: CancellationToken,
    #[cfg(test)]
    pub(crate) gate: Option<Arc<crate::server::tests::Gate>>,
}

impl CacheNodeService {
    /// A service over `store` answering `Topology` from `config.cluster`;
    /// without a member list it reports itself alone at `self_address`.
    /// `auth` admits the commands of streams; `stop` ends the streams when
    /// the node drains.
    pub fn new(
        config: &Config,
        self_address: String,
        store: Arc<Store>,
        metrics: Arc<NodeMetrics>,
        auth: Arc<Auth>,
        stop: CancellationToken,
    ) -> Self {
        let members = if config.cluster.members.is_empty() {
            vec![v1::Member {
                id: config.node_id.clone(),
                address: self_address,
                weight: 1,
            }]
        } else {
            config
                .cluster
                .members
                .iter()
                .map(|m| v1::Member {
                    id: m.id.clone(),
                    address: m.address.clone(),
                    weight: m.weight,
                })
                .collect()
        };
        let shared = Shared {
            store,
            sessions: Sessions::default(),
            metrics,
            topology: v1::TopologyResponse {
                epoch: config.cluster.epoch.max(1),
                members,
                self_id: config.node_id.clone(),
            },
            started: Instant::now(),
            node_id: config.node_id.clone(),
            auth,
            stop,
            #[cfg(test)]
            gate: None,
        };
        CacheNodeService {
            shared: Arc::new(shared),
        }
    }

    /// Holds `Get` calls at `gate` (tests of the drain).
    #[cfg(test)]
    pub(crate) fn with_gate(mut self, gate: Option<Arc<crate::server::tests::Gate>>) -> Self {
        Arc::get_mut(&mut self.shared)
            .expect("the service is not shared before it serves")
            .gate = gate;
        self
    }
}

impl Shared {
    /// For a write stamped `stamp`: the read side of the session fence, to
    /// hold while the write is applied, or the refusal of a write sent
    /// before its session's last flush of this node. Unstamped writes are
    /// not fenced.
    fn admit_write(
        &self,
        stamp: Option<Stamp>,
    ) -> Result<Option<parking_lot::RwLockReadGuard<'_, ()>>, Error> {
        let Some(stamp) = stamp else {
            return Ok(None);
        };
        let guard = self.sessions.write_guard();
        match self.sessions.is_stale(stamp) {
            Some(flushed) => Err(Error::StaleSession {
                session: stamp.session,
                generation: stamp.generation,
                flushed,
            }),
            None => Ok(Some(guard)),
        }
    }

    /// Runs `f` timed under `rpc`, counting and converting its error.
    fn call<T>(
        &self,
        rpc: Rpc,
        f: impl FnOnce() -> Result<T, Error>,
    ) -> Result<Response<T>, Status> {
        self.reply(rpc, f).map(Response::new)
    }

    /// [`Shared::call`] without the response wrapper (a stream's command).
    #[allow(clippy::result_large_err)] // `Status` is what tonic handlers return
    fn reply<T>(&self, rpc: Rpc, f: impl FnOnce() -> Result<T, Error>) -> Result<T, Status> {
        let _timer = self.metrics.time(rpc);
        f().map_err(|error| self.refuse(rpc, error))
    }

    /// Counts and converts the error of a call of `rpc`.
    fn refuse(&self, rpc: Rpc, error: Error) -> Status {
        if matches!(error, Error::PermissionDenied { .. }) {
            self.metrics.count_refused("grpc", "permission_denied");
        }
        let status = error.to_status();
        self.metrics.count_error(rpc, status.code());
        tracing::debug!(rpc = ?rpc, %error, "request refused");
        status
    }

    fn exec_get(
        &self,
        principal: &Principal,
        req: v1::GetRequest,
    ) -> Result<v1::GetResponse, Error> {
        principal.check(&req.keyspace, Permission::Read)?;
        self.store.get(&req.keyspace, &req.key).map(hit_to_proto)
    }

    fn exec_set(
        &self,
        principal: &Principal,
        stamp: Option<Stamp>,
        req: v1::SetRequest,
    ) -> Result<v1::SetResponse, Error> {
        principal.check(&req.keyspace, Permission::Write)?;
        let item = required_item(req.item, "set")?;
        let _fence = self.admit_write(stamp)?;
        self.store.set(&req.keyspace, item).map(set_result_to_proto)
    }

    fn exec_delete(
        &self,
        principal: &Principal,
        req: v1::DeleteRequest,
    ) -> Result<v1::DeleteResponse, Error> {
        principal.check(&req.keyspace, Permission::Write)?;
        let deleted = match (req.only_version, req.below_version) {
            (0, 0) => self.store.delete(&req.keyspace, &req.key)?,
            (0, below) => self.store.delete_below(&req.keyspace, &req.key, below)?,
            (version, _) => self.store.discard(&req.keyspace, &req.key, version)?,
        };
        Ok(v1::DeleteResponse { deleted })
    }

    fn exec_multi_get(
        &self,
        principal: &Principal,
        req: v1::MultiGetRequest,
    ) -> Result<v1::MultiGetResponse, Error> {
        principal.check(&req.keyspace, Permission::Read)?;
        let hits = self.store.multi_get(&req.keyspace, &req.keys)?;
        Ok(v1::MultiGetResponse {
            results: hits.into_iter().map(hit_to_proto).collect(),
        })
    }

    fn exec_multi_set(
        &self,
        principal: &Principal,
        stamp: Option<Stamp>,
        req: v1::MultiSetRequest,
    ) -> Result<v1::MultiSetResponse, Error> {
        principal.check(&req.keyspace, Permission::Write)?;
        let items = req
            .items
            .into_iter()
            .map(item_from_proto)
            .collect::<Result<Vec<_>, _>>()?;
        let _fence = self.admit_write(stamp)?;
        let results = self.store.multi_set(&req.keyspace, items)?;
        Ok(v1::MultiSetResponse {
            results: results.into_iter().map(set_result_to_proto).collect(),
        })
    }

    fn exec_lease_get(
        &self,
        principal: &Principal,
        req: v1::LeaseGetRequest,
    ) -> Result<v1::LeaseGetResponse, Error> {
        principal.check(&req.keyspace, Permission::Read)?;
        self.store
            .lease_get(&req.keyspace, &req.key)
            .map(lease_read_to_proto)
    }

    fn exec_fill(
        &self,
        principal: &Principal,
        stamp: Option<Stamp>,
        req: v1::FillRequest,
    ) -> Result<v1::FillResponse, Error> {
        principal.check(&req.keyspace, Permission::Write)?;
        let item = required_item(req.item, "fill")?;
        let _fence = self.admit_write(stamp)?;
        let result = self.store.fill(&req.keyspace, item, req.lease_token)?;
        let outcome = match result.outcome {
            FillOutcome::Stored => v1::FillOutcome::Stored,
            FillOutcome::LeaseInvalid => v1::FillOutcome::LeaseInvalid,
            FillOutcome::StaleVersion => v1::FillOutcome::StaleVersion,
        };
        Ok(v1::FillResponse {
            outcome: outcome as i32,
            current_version: result.current_version,
        })
    }

    fn exec_release_lease(
        &self,
        principal: &Principal,
        req: v1::ReleaseLeaseRequest,
    ) -> Result<v1::ReleaseLeaseResponse, Error> {
        // The holder got the lease by reading: reading is all it takes to
        // hand it back.
        principal.check(&req.keyspace, Permission::Read)?;
        let released = self
            .store
            .release_lease(&req.keyspace, &req.key, req.lease_token)?;
        Ok(v1::ReleaseLeaseResponse { released })
    }
}

/// A prepare's place in its key's queue: given up when the prepare ends,
/// however it ends (answered, refused, or dropped by a cancelled call), so
/// that the next waiter is not left waiting for it.
struct Place<'a> {
    store: &'a Store,
    keyspace: &'a str,
    key: &'a [u8],
    ticket: u64,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.store.leave_queue(self.keyspace, self.key, self.ticket);
    }
}

fn prepare_to_proto(result: PrepareResult, waited: Duration) -> v1::PrepareResponse {
    v1::PrepareResponse {
        prepared: result.prepared,
        current_version: result.current_version,
        busy: result.busy,
        waited_ms: millis(waited),
        in_doubt_txn_id: result.in_doubt.unwrap_or_default(),
    }
}

fn entry_to_proto(hit: Hit) -> v1::Entry {
    v1::Entry {
        value: hit.value,
        version: hit.version,
        ttl_remaining_ms: hit
            .ttl_remaining
            // An entry with less than 1 ms left still exists: report 1,
            // because 0 means "never expires".
            .map(|d| millis(d).max(1))
            .unwrap_or(0),
    }
}

fn hit_to_proto(hit: Option<Hit>) -> v1::GetResponse {
    v1::GetResponse {
        entry: hit.map(entry_to_proto),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn lease_read_to_proto(read: LeaseRead) -> v1::LeaseGetResponse {
    match read {
        LeaseRead::Hit(hit) => v1::LeaseGetResponse {
            entry: Some(entry_to_proto(hit)),
            ..Default::default()
        },
        LeaseRead::Granted { token } => v1::LeaseGetResponse {
            lease_token: token,
            ..Default::default()
        },
        LeaseRead::Wait { retry_after, stale } => v1::LeaseGetResponse {
            // 0 would read as "no wait"; config validation keeps it >= 1 ms.
            retry_after_ms: millis(retry_after).max(1),
            stale: stale.map(entry_to_proto),
            ..Default::default()
        },
    }
}

fn required_item(item: Option<v1::SetItem>, rpc: &str) -> Result<SetItem, Error> {
    item_from_proto(item.ok_or_else(|| Error::Malformed(format!("{rpc} request has no item")))?)
}

fn item_from_proto(item: v1::SetItem) -> Result<SetItem, Error> {
    let condition = match v1::WriteCondition::try_from(item.condition) {
        Ok(v1::WriteCondition::Unconditional) => WriteCondition::Unconditional,
        Ok(v1::WriteCondition::IfAbsent) => WriteCondition::IfAbsent,
        Ok(v1::WriteCondition::IfNewerVersion) => WriteCondition::IfNewerVersion,
        Err(_) => {
            return Err(Error::Malformed(format!(
                "unknown write condition {}",
                item.condition
            )));
        }
    };
    Ok(SetItem {
        key: item.key,
        value: item.value,
        version: item.version,
        ttl: (item.ttl_ms > 0).then(|| Duration::from_millis(item.ttl_ms)),
        condition,
        dirty: item.dirty,
    })
}

fn set_result_to_proto(result: SetResult) -> v1::SetResponse {
    let outcome = match result.outcome {
        SetOutcome::Stored => v1::SetOutcome::Stored,
        SetOutcome::Exists => v1::SetOutcome::Exists,
        SetOutcome::StaleVersion => v1::SetOutcome::StaleVersion,
        // Only `IfPresent` gets `Missing`, and gRPC cannot ask for it
        // (`item_from_proto` maps no wire condition to it).
        SetOutcome::Missing => v1::SetOutcome::Unspecified,
    };
    v1::SetResponse {
        outcome: outcome as i32,
        current_version: result.current_version,
    }
}

#[tonic::async_trait]
impl CacheNode for CacheNodeService {
    async fn get(
        &self,
        request: Request<v1::GetRequest>,
    ) -> Result<Response<v1::GetResponse>, Status> {
        #[cfg(test)]
        if let Some(gate) = &self.gate {
            gate.pass().await;
        }
        let (caller, req) = admitted(request)?;
        self.call(Rpc::Get, || self.exec_get(&caller.principal, req))
    }

    async fn set(
        &self,
        request: Request<v1::SetRequest>,
    ) -> Result<Response<v1::SetResponse>, Status> {
        let stamp = stamp_of(&request);
        let (caller, req) = admitted(request)?;
        self.call(Rpc::Set, || self.exec_set(&caller.principal, stamp, req))
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        let (caller, req) = admitted(request)?;
        self.call(Rpc::Delete, || self.exec_delete(&caller.principal, req))
    }

    async fn multi_get(
        &self,
        request: Request<v1::MultiGetRequest>,
    ) -> Result<Response<v1::MultiGetResponse>, Status> {
        let (caller, req) = admitted(request)?;
        self.call(Rpc::MultiGet, || {
            self.exec_multi_get(&caller.principal, req)
        })
    }

    async fn multi_set(
        &self,
        request: Request<v1::MultiSetRequest>,
    ) -> Result<Response<v1::MultiSetResponse>, Status> {
        let stamp = stamp_of(&request);
        let (caller, req) = admitted(request)?;
        self.call(Rpc::MultiSet, || {
            self.exec_multi_set(&caller.principal, stamp, req)
        })
    }

    async fn stats(
        &self,
        request: Request<v1::StatsRequest>,
    ) -> Result<Response<v1::StatsResponse>, Status> {
        let (caller, req) = admitted(request)?;
        self.call(Rpc::Stats, || {
            caller.check_scope(&req.keyspace, Permission::Read)?;
            let filter = (!req.keyspace.is_empty()).then_some(req.keyspace.as_str());
            let keyspaces = self
                .store
                .stats(filter)?
                .into_iter()
                .map(|s| v1::KeyspaceStats {
                    name: s.name,
                    hits: s.hits,
                    misses: s.misses,
                    sets: s.sets,
                    sets_refused: s.sets_refused,
                    deletes: s.deletes,
                    evictions: s.evictions,
                    expirations: s.expirations,
                    items: s.items,
                    bytes: s.bytes,
                    capacity_bytes: s.capacity_bytes,
                    default_ttl_ms: s.default_ttl.map_or(0, millis),
                    leases_granted: s.leases_granted,
                    lease_waits: s.lease_waits,
                    fills_stored: s.fills_stored,
                    fills_refused: s.fills_refused,
                    prepares: s.prepares,
                    commits: s.commits,
                    aborts: s.aborts,
                    pending_timeouts: s.pending_timeouts,
                    dirty_items: s.dirty_items,
                    dirty_bytes: s.dirty_bytes,
                    max_dirty_bytes: s.max_dirty_bytes,
                    dirty_refused: s.dirty_refused,
                })
                .collect();
            Ok(v1::StatsResponse {
                node_id: self.node_id.clone(),
                uptime_ms: millis(self.started.elapsed()),
                keyspaces,
            })
        })
    }

    async fn flush(
        &self,
        request: Request<v1::FlushRequest>,
    ) -> Result<Response<v1::FlushResponse>, Status> {
        let stamp = stamp_of(&request);
        let (caller, req) = admitted(request)?;
        self.call(Rpc::Flush, || {
            caller.check_scope(&req.keyspace, Permission::Write)?;
            let filter = (!req.keyspace.is_empty()).then_some(req.keyspace.as_str());
            // Recorded before flushing, under the fence: a write of an older
            // generation is either flushed below or refused afterwards.
            let _fence = self.sessions.flush_guard();
            if let Some(stamp) = stamp {
                self.sessions.record_flush(stamp, Instant::now());
            }
            self.store.flush(filter)?;
            tracing::info!(keyspace = ?filter, "flushed");
            Ok(v1::FlushResponse {})
        })
    }

    async fn lease_get(
        &self,
        request: Request<v1::LeaseGetRequest>,
    ) -> Result<Response<v1::LeaseGetResponse>, Status> {
        let (caller, req) = admitted(request)?;
        self.call(Rpc::LeaseGet, || {
            self.exec_lease_get(&caller.principal, req)
        })
    }

    async fn fill(
        &self,
        request: Request<v1::FillRequest>,
    ) -> Result<Response<v1::FillResponse>, Status> {
        let stamp = stamp_of(&request);
        let (caller, req) = admitted(request)?;
        self.call(Rpc::Fill, || self.exec_fill(&caller.principal, stamp, req))
    }

    async fn release_lease(
        &self,
        request: Request<v1::ReleaseLeaseRequest>,
    ) -> Result<Response<v1::ReleaseLeaseResponse>, Status> {
        let (caller, req) = admitted(request)?;
        self.call(Rpc::ReleaseLease, || {
            self.exec_release_lease(&caller.principal, req)
        })
    }

    async fn prepare(
        &self,
        request: Request<v1::PrepareRequest>,
    ) -> Result<Response<v1::PrepareResponse>, Status> {
        let stamp = stamp_of(&request);
        let (caller, req) = admitted(request)?;
        let _timer = self.metrics.time(Rpc::Prepare);
        let keyspace = req.keyspace;
        let prepare = (|| -> Result<Prepare, Error> {
            caller.check(&keyspace, Permission::Write)?;
            Ok(Prepare {
                item: required_item(req.item, "prepare")?,
                delete: req.delete,
                txn_id: req.txn_id,
                timeout: (req.timeout_ms > 0).then(|| Duration::from_millis(req.timeout_ms)),
            })
        })()
        .map_err(|e| self.refuse(Rpc::Prepare, e))?;
        let wait = Duration::from_millis(req.wait_ms).min(self.store.max_prepare_wait());
        if wait.is_zero() {
            let result = (|| -> Result<PrepareResult, Error> {
                let _fence = self.admit_write(stamp)?;
                self.store.prepare(&keyspace, prepare)
            })()
            .map_err(|e| self.refuse(Rpc::Prepare, e))?;
            return Ok(Response::new(prepare_to_proto(result, Duration::ZERO)));
        }
        // A waiting prepare holds no slot of the concurrency limit (the
        // commit or abort it waits for must get one), no session fence and
        // no lock: only its place in the key's queue.
        drop(caller);
        let started = tokio::time::Instant::now();
        let give_up = started + wait;
        let place = Place {
            store: &self.store,
            keyspace: &keyspace,
            key: &prepare.item.key,
            ticket: self.store.ticket(),
        };
        let mut woken: Option<tokio::sync::oneshot::Receiver<()>> = None;
        let mut waited = false;
        loop {
            let may_wait = tokio::time::Instant::now() < give_up;
            let step = (|| -> Result<PrepareStep, Error> {
                let _fence = self.admit_write(stamp)?;
                self.store
                    .prepare_in_turn(&keyspace, &prepare, place.ticket, may_wait)
            })()
            .map_err(|e| self.refuse(Rpc::Prepare, e))?;
            let (receiver, pending_until) = match step {
                PrepareStep::Done(result) => {
                    // A prepare that waited says so, however briefly.
                    let waited = if waited {
                        let waited = started.elapsed().max(Duration::from_millis(1));
                        self.metrics
                            .count_prepare_wait(&keyspace, waited, result.busy);
                        waited
                    } else {
                        Duration::ZERO
                    };
                    return Ok(Response::new(prepare_to_proto(result, waited)));
                }
                PrepareStep::Wait {
                    woken,
                    pending_until,
                } => (woken, pending_until),
            };
            waited = true;
            if receiver.is_some() {
                woken = receiver;
            }
            // Step again when woken, when the pending change's deadline
            // passes (it is timed out by that step), or when the wait is up.
            let until = pending_until.map_or(give_up, |at| {
                give_up.min(tokio::time::Instant::from_std(at))
            });
            match woken.as_mut() {
                Some(rx) => {
                    if tokio::time::timeout_at(until, rx).await.is_ok() {
                        // Told (or its queue was dropped): the receiver is spent.
                        woken = None;
                    }
                }
                None => tokio::time::sleep_until(until).await,
            }
        }
    }

    async fn commit(
        &self,
        request: Request<v1::CommitRequest>,
    ) -> Result<Response<v1::CommitResponse>, Status> {
        let (caller, req) = admitted(request)?;
        self.call(Rpc::Commit, || {
            caller.check(&req.keyspace, Permission::Write)?;
            let result = self.store.commit(&req.keyspace, &req.key, &req.txn_id)?;
            Ok(v1::CommitResponse {
                committed: result.committed,
                current_version: result.current_version,
            })
        })
    }

    async fn abort(
        &self,
        request: Request<v1::AbortRequest>,
    ) -> Result<Response<v1::AbortResponse>, Status> {
        let (caller, req) = admitted(request)?;
        self.call(Rpc::Abort, || {
            caller.check(&req.keyspace, Permission::Write)?;
            let aborted = self.store.abort(&req.keyspace, &req.key, &req.txn_id)?;
            Ok(v1::AbortResponse { aborted })
        })
    }

    async fn mark_clean(
        &self,
        request: Request<v1::MarkCleanRequest>,
    ) -> Result<Response<v1::MarkCleanResponse>, Status> {
        let (caller, req) = admitted(request)?;
        self.call(Rpc::MarkClean, || {
            caller.check(&req.keyspace, Permission::Admin)?;
            let keys: Vec<_> = req.keys.into_iter().map(|k| (k.key, k.version)).collect();
            let cleaned = self.store.mark_clean(&req.keyspace, &keys)?;
            Ok(v1::MarkCleanResponse {
                // At most `max_batch_keys` keys, which config caps far below
                // u32::MAX.
                cleaned: u32::try_from(cleaned).unwrap_or(u32::MAX),
            })
        })
    }

    async fn list_dirty(
        &self,
        request: Request<v1::ListDirtyRequest>,
    ) -> Result<Response<v1::ListDirtyResponse>, Status> {
        let (caller, req) = admitted(request)?;
        self.call(Rpc::ListDirty, || {
            caller.check(&req.keyspace, Permission::Admin)?;
            let limit = match req.limit {
                0 => usize::MAX,
                n => n as usize,
            };
            let (keys, more) = self.store.list_dirty(
                &req.keyspace,
                Duration::from_millis(req.min_age_ms),
                &req.after_key,
                limit,
            )?;
            Ok(v1::ListDirtyResponse {
                keys: keys
                    .into_iter()
                    .map(|(key, version)| v1::CleanKey { key, version })
                    .collect(),
                more,
            })
        })
    }

    type BatchCommandsStream = batch::ReplyStream;

    async fn batch_commands(
        &self,
        request: Request<tonic::Streaming<v1::BatchCommandsRequest>>,
    ) -> Result<Response<Self::BatchCommandsStream>, Status> {
        let peer = request.remote_addr().map(|addr| addr.ip());
        // Opening the stream passed the interceptor like any call; its slot
        // of the concurrency limit is given back at once: each command takes
        // its own.
        let (caller, incoming) = admitted(request)?;
        drop(caller);
        Ok(Response::new(batch::serve(
            Arc::clone(&self.shared),
            incoming,
            peer,
        )))
    }

    async fn topology(
        &self,
        request: Request<v1::TopologyRequest>,
    ) -> Result<Response<v1::TopologyResponse>, Status> {
        // Any caller the interceptor let through may learn the membership:
        // clients need it to route.
        let (_caller, _) = admitted(request)?;
        self.call(Rpc::Topology, || Ok(self.topology.clone()))
    }
}

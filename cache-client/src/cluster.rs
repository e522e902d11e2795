//! Membership and node health as one client sees them. How calls reach a
//! node (its channel, command stream and session stamp) is `transport`'s.
//!
//! The client holds an immutable [`View`] (epoch, ring, node handles) behind
//! a lock that is only held to clone or swap the `Arc`; a refresh builds a
//! new view and swaps it in. Node handles carry their health and survive
//! refreshes, so a node's channel and failure count are not lost when the
//! member list is re-read.
//!
//! # Failover contract (see `docs/failover.md`)
//! - A node is marked down after `failure_threshold` consecutive failures;
//!   while down, its keys go to the next healthy distinct nodes on the ring.
//! - A down node is probed every `probe_interval`. When it answers, the
//!   client **flushes it before routing to it again**, so it cannot serve a
//!   value that was overwritten elsewhere while the client routed around it.
//! - Every request carries the client's [`Session`] stamp, and each
//!   re-admission flush starts a new generation of it: the node refuses a
//!   write of an older generation that reaches it after the flush (one the
//!   network delayed on the connection the client gave up).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::RwLock;
use ringcache_proto::v1;
use tokio::sync::Notify;

use crate::config::{ClientConfig, Token};
use crate::error::{Error, Result};
use crate::ring::{Ring, RingNode};
use crate::transport::{NodeClient, Session};

/// One cache node: its identity, its channel and its health.
pub(crate) struct NodeHandle {
    pub(crate) id: String,
    pub(crate) address: String,
    pub(crate) weight: u32,
    /// One HTTP/2 channel per node, shared by every request to it (tonic
    /// reconnects it when the connection breaks), and the node's command
    /// stream over it.
    pub(crate) client: NodeClient,
    failures: AtomicU32,
    down: AtomicBool,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("id", &self.id)
            .field("address", &self.address)
            .field("down", &self.is_down())
            .finish_non_exhaustive()
    }
}

impl NodeHandle {
    fn new(
        id: &str,
        address: &str,
        weight: u32,
        config: &ClientConfig,
        session: &Arc<Session>,
    ) -> Result<Self> {
        let endpoint = config.endpoint(address)?;
        let endpoint = endpoint
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        Ok(NodeHandle {
            id: id.to_owned(),
            address: address.to_owned(),
            weight,
            // Lazy: building a view never blocks on a dead node.
            client: NodeClient::new(endpoint.connect_lazy(), id, session, config),
            failures: AtomicU32::new(0),
            down: AtomicBool::new(false),
        })
    }

    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }
}

/// An immutable snapshot of the membership.
pub(crate) struct View {
    pub(crate) epoch: u64,
    pub(crate) ring: Ring,
    pub(crate) nodes: HashMap<String, Arc<NodeHandle>>,
}

impl View {
    pub(crate) fn node(&self, id: &str) -> Option<&Arc<NodeHandle>> {
        self.nodes.get(id)
    }
}

/// Shared membership state and the background tasks that keep it fresh.
pub(crate) struct Cluster {
    pub(crate) config: ClientConfig,
    view: RwLock<Arc<View>>,
    refresh_now: Notify,
    session: Arc<Session>,
}

impl Cluster {
    /// Asks the seeds for the topology and builds the first view.
    pub(crate) async fn bootstrap(config: ClientConfig) -> Result<Arc<Cluster>> {
        let session = Arc::new(Session::new(config.token.as_ref())?);
        let mut best: Option<v1::TopologyResponse> = None;
        let mut last = String::from("no seed tried");
        for seed in &config.seeds {
            let handle = NodeHandle::new(seed, seed, 1, &config, &session)?;
            match fetch_topology(&handle, config.request_timeout.max(config.connect_timeout)).await
            {
                Ok(topology) => {
                    if best.as_ref().is_none_or(|b| topology.epoch > b.epoch) {
                        best = Some(topology);
                    }
                }
                Err(e) => last = e.to_string(),
            }
        }
        let topology = best.ok_or_else(|| Error::NoSeedReachable {
            seeds: config.seeds.join(","),
            last,
        })?;
        let view = build_view(&topology, None, &config, &session)?;
        tracing::info!(
            epoch = view.epoch,
            members = view.nodes.len(),
            "topology loaded"
        );
        crate::telemetry::topology(view.epoch, view.nodes.len());
        Ok(Arc::new(Cluster {
            config,
            view: RwLock::new(Arc::new(view)),
            refresh_now: Notify::new(),
            session,
        }))
    }

    /// Replaces the bearer token of every request sent from now on.
    pub(crate) fn set_token(&self, token: Option<&Token>) -> Result<()> {
        self.session.set_token(token)
    }

    /// The current view. The lock is held only to clone the `Arc`.
    pub(crate) fn view(&self) -> Arc<View> {
        Arc::clone(&self.view.read())
    }

    pub(crate) fn record_success(&self, node: &NodeHandle) {
        node.failures.store(0, Ordering::Relaxed);
    }

    /// Counts a failure; marks the node down at the threshold and asks for
    /// a topology refresh (the node may have been removed on purpose).
    pub(crate) fn record_failure(&self, node: &NodeHandle, error: &Error) {
        let failures = node.failures.fetch_add(1, Ordering::Relaxed) + 1;
        crate::telemetry::node_failure(&node.id, error);
        if failures >= self.config.failure_threshold && !node.down.swap(true, Ordering::AcqRel) {
            crate::telemetry::node_marked_down(&node.id, "failures");
            tracing::warn!(node = %node.id, address = %node.address, failures, %error, "node marked down");
            self.refresh_now.notify_one();
        }
    }

    /// Marks a node down at once, whatever its failure count: used when a
    /// write or delete had to route around it, so that the node is flushed
    /// before this client reads from it again (it missed that write).
    pub(crate) fn mark_down(&self, node: &NodeHandle, error: &Error) {
        node.failures.fetch_add(1, Ordering::Relaxed);
        crate::telemetry::node_failure(&node.id, error);
        if !node.down.swap(true, Ordering::AcqRel) {
            crate::telemetry::node_marked_down(&node.id, "write");
            tracing::warn!(node = %node.id, address = %node.address, %error, "node marked down: a write routed around it");
            self.refresh_now.notify_one();
        }
    }

    /// Asks every member for its topology, in parallel, and adopts the
    /// newest if its epoch is greater than ours. Members learn of a new
    /// member list one by one as they are reconfigured, so asking only one
    /// could miss a newer list that another already has.
    pub(crate) async fn refresh(&self) -> Result<bool> {
        let view = self.view();
        let timeout = self.config.request_timeout;
        let asks = view
            .nodes
            .values()
            .map(|node| fetch_topology(node, timeout));
        let mut newest: Option<v1::TopologyResponse> = None;
        let mut last = None;
        for reply in futures::future::join_all(asks).await {
            match reply {
                Ok(t) if newest.as_ref().is_none_or(|n| t.epoch > n.epoch) => newest = Some(t),
                Ok(_) => {}
                Err(e) => last = Some(e),
            }
        }
        match (newest, last) {
            (Some(topology), _) => self.adopt(&topology),
            (None, Some(e)) => Err(e),
            (None, None) => Ok(false),
        }
    }

    /// Swaps in a view built from `topology` if it is newer than ours.
    fn adopt(&self, topology: &v1::TopologyResponse) -> Result<bool> {
        let current = self.view();
        if topology.epoch <= current.epoch {
            return Ok(false);
        }
        let view = build_view(topology, Some(&current), &self.config, &self.session)?;
        let mut slot = self.view.write();
        // Another refresh may have won the race meanwhile: never go back.
        if view.epoch <= slot.epoch {
            return Ok(false);
        }
        tracing::info!(
            from = slot.epoch,
            to = view.epoch,
            members = view.nodes.len(),
            "topology changed"
        );
        crate::telemetry::topology(view.epoch, view.nodes.len());
        *slot = Arc::new(view);
        Ok(true)
    }

    /// Probes every down node once; a node that answers is flushed and then
    /// re-admitted.
    pub(crate) async fn probe_down_nodes(&self) {
        let view = self.view();
        let down: Vec<_> = view
            .nodes
            .values()
            .filter(|n| n.is_down())
            .cloned()
            .collect();
        let probes = down.into_iter().map(|node| async move {
            let timeout = self.config.request_timeout;
            let topology = match fetch_topology(&node, timeout).await {
                Ok(topology) => topology,
                Err(_) => return,
            };
            // Flush before re-admitting: while this client routed around the
            // node, writes for its keys went elsewhere, so anything it holds
            // may be stale. Until the flush succeeds the node stays down.
            // The flush starts a new session generation: a write this client
            // sent before, still on its way on a connection it gave up, is
            // refused by the node if it arrives after the flush.
            self.session.bump();
            let mut client = node.client.clone();
            let mut request = tonic::Request::new(v1::FlushRequest::default());
            request.set_timeout(timeout);
            match tokio::time::timeout(timeout, client.flush(request)).await {
                Ok(Ok(_)) => {
                    node.failures.store(0, Ordering::Relaxed);
                    node.down.store(false, Ordering::Release);
                    crate::telemetry::node_readmitted(&node.id);
                    tracing::info!(node = %node.id, "node flushed and re-admitted");
                    if let Err(e) = self.adopt(&topology) {
                        tracing::warn!(error = %e, "cannot adopt topology");
                    }
                }
                Ok(Err(status)) => {
                    tracing::warn!(node = %node.id, %status, "flush before re-admission failed")
                }
                Err(_) => tracing::warn!(node = %node.id, "flush before re-admission timed out"),
            }
        });
        futures::future::join_all(probes).await;
    }

    /// Starts the prober and the refresher. They hold only a weak reference
    /// and stop when the last client handle is dropped or `stop` fires.
    pub(crate) fn spawn_background(self: &Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let weak = Arc::downgrade(self);
        let probe_every = self.config.probe_interval;
        tokio::spawn(background_loop(
            weak.clone(),
            stop.clone(),
            probe_every,
            |c| Box::pin(async move { c.probe_down_nodes().await }),
        ));
        let refresh_every = self.config.refresh_interval;
        tokio::spawn(async move {
            loop {
                let Some(cluster) = weak.upgrade() else {
                    return;
                };
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(refresh_every) => {}
                    () = cluster.refresh_now.notified() => {}
                }
                if let Err(e) = cluster.refresh().await {
                    tracing::debug!(error = %e, "topology refresh failed");
                }
            }
        });
    }
}

type Job = fn(Arc<Cluster>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

async fn background_loop(
    weak: Weak<Cluster>,
    stop: tokio_util::sync::CancellationToken,
    every: Duration,
    job: Job,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let Some(cluster) = weak.upgrade() else {
            return;
        };
        job(cluster).await;
    }
}

async fn fetch_topology(node: &NodeHandle, timeout: Duration) -> Result<v1::TopologyResponse> {
    let mut client = node.client.clone();
    let mut request = tonic::Request::new(v1::TopologyRequest {});
    request.set_timeout(timeout);
    match tokio::time::timeout(timeout, client.topology(request)).await {
        Ok(Ok(reply)) => Ok(reply.into_inner()),
        Ok(Err(status)) => Err(Error::from_status(&node.address, &status)),
        Err(_) => Err(Error::Unavailable {
            node: node.address.clone(),
            message: format!("no topology reply within {timeout:?}"),
        }),
    }
}

/// Builds a view from a topology reply, reusing the handles (channel and
/// health) of members whose id and address did not change.
fn build_view(
    topology: &v1::TopologyResponse,
    previous: Option<&View>,
    config: &ClientConfig,
    session: &Arc<Session>,
) -> Result<View> {
    let mut nodes = HashMap::new();
    for member in &topology.members {
        let address = config.node_address(&member.id, &member.address);
        let reused = previous
            .and_then(|p| p.nodes.get(&member.id))
            .filter(|n| n.address == address && n.weight == member.weight)
            .cloned();
        let handle = match reused {
            Some(handle) => handle,
            None => Arc::new(NodeHandle::new(
                &member.id,
                address,
                member.weight,
                config,
                session,
            )?),
        };
        nodes.insert(member.id.clone(), handle);
    }
    let ring = Ring::with_vnodes(
        topology
            .members
            .iter()
            .map(|m| RingNode::new(m.id.clone(), m.weight)),
        config.vnodes,
    );
    Ok(View {
        epoch: topology.epoch,
        ring,
        nodes,
    })
}

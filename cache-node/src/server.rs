//! Wiring: builds the store, the gRPC services and the metrics endpoint, and
//! runs them until shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringcache_proto::v1::{self, cache_node_server::CacheNodeServer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::auth::Auth;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::grpc::CacheNodeService;
use crate::metrics::{NodeMetrics, UPKEEP_INTERVAL};
use crate::resp::{self, parse::ParseLimits};
use crate::store::Store;
use crate::tls::{Protocol, ServerTls, TlsListener, TlsMaterial};

/// How often the sweeper times out pending 2PC changes (and drops expired
/// leases and stale values) that no request touches. A pending change can
/// outlive its deadline by at most this much when nobody accesses its key.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(100);

/// The sockets a node serves on, bound before [`run`] so that callers (tests,
/// `main`) can bind port 0 and learn the address.
pub struct Listeners {
    /// gRPC: `ringcache.v1.CacheNode`, `grpc.health.v1.Health` and server
    /// reflection.
    pub grpc: TcpListener,
    /// Prometheus `GET /metrics`, if enabled.
    pub metrics: Option<TcpListener>,
    /// The Redis-protocol (RESP2) listener, if enabled.
    pub resp: Option<TcpListener>,
}

impl Listeners {
    /// Binds `config.listen`, `config.metrics_listen` and
    /// `config.resp_listen`.
    ///
    /// # Errors
    /// [`Error::Server`] naming the address that could not be bound.
    pub async fn bind(config: &Config) -> Result<Listeners> {
        let grpc = TcpListener::bind(config.listen)
            .await
            .map_err(|e| Error::Server(format!("cannot bind listen {}: {e}", config.listen)))?;
        let metrics =
            match config.metrics_listen {
                Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                    Error::Server(format!("cannot bind metrics_listen {addr}: {e}"))
                })?),
                None => None,
            };
        let resp = match config.resp_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| Error::Server(format!("cannot bind resp_listen {addr}: {e}")))?,
            ),
            None => None,
        };
        Ok(Listeners {
            grpc,
            metrics,
            resp,
        })
    }
}

/// Serves a node until `shutdown` completes, then drains.
///
/// Shutdown order: the health service turns `NOT_SERVING` (so that probes
/// and load balancers stop sending), the listeners stop accepting, in-flight
/// requests finish (up to `config.shutdown_grace`; a RESP connection
/// finishes the pipelined batch it is running, idle ones close), then the
/// metrics endpoint and the background sweeper stop.
///
/// # Errors
/// [`Error::Server`] when a server fails; the config is assumed validated
/// ([`Config::load`] does it).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    serve(config, listeners, shutdown, None, Hooks::default()).await
}

/// [`run`], applying each configuration `reloads` delivers while it serves
/// (`main` sends one on SIGHUP): its tokens (`auth.tokens`,
/// `resp_password`, secret files re-read) replace the accepted ones at once,
/// and its TLS files are read again and used for every connection accepted
/// from then on. A reload that fails (a TLS file that does not parse, a key
/// that does not fit) changes nothing and is logged; other settings that
/// differ take effect at the next restart, and are logged as such. See
/// `docs/security.md`, "Rotating certificates and tokens".
///
/// # Errors
/// As [`run`].
pub async fn run_reloadable(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
    reloads: tokio::sync::mpsc::Receiver<Config>,
) -> Result<()> {
    serve(config, listeners, shutdown, Some(reloads), Hooks::default()).await
}

/// Test-only instrumentation of [`serve`].
#[derive(Default)]
struct Hooks {
    #[cfg(test)]
    gate: Option<Arc<tests::Gate>>,
}

async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
    reloads: Option<tokio::sync::mpsc::Receiver<Config>>,
    hooks: Hooks,
) -> Result<()> {
    let grpc_addr = listeners
        .grpc
        .local_addr()
        .map_err(|e| Error::Server(format!("listener has no address: {e}")))?;
    // Without an explicit advertise address, others dial the address we
    // actually bound (which differs from `config.listen` for port 0).
    let self_address = config
        .advertise_address
        .clone()
        .unwrap_or_else(|| grpc_addr.to_string());
    let tls = match &config.tls {
        Some(tls) => Some(Arc::new(ServerTls::new(&TlsMaterial::load(tls).await?)?)),
        None => None,
    };
    let store = Arc::new(Store::new(&config));
    let metrics = Arc::new(NodeMetrics::new(Arc::clone(&store)));
    let auth = Arc::new(Auth::new(&config));
    let resp_context = Arc::new(resp::command::Context {
        store: Arc::clone(&store),
        metrics: Arc::clone(&metrics),
        auth: Arc::clone(&auth),
        default_keyspace: config.resp_default_keyspace.clone(),
        default: std::sync::OnceLock::new(),
        node_id: config.node_id.clone(),
        started: Instant::now(),
    });
    // Background workers get their own token: they stop after the drain, so
    // that a change pending while requests drain still times out.
    let stop_workers = CancellationToken::new();
    let sweeper = tokio::spawn(sweep(
        Arc::clone(&store),
        Arc::clone(&auth),
        stop_workers.clone(),
    ));
    let upkeep = tokio::spawn(metrics_upkeep(Arc::clone(&metrics), stop_workers.clone()));
    let reloader = reloads.map(|reloads| {
        tokio::spawn(apply_reloads(
            reloads,
            config.clone(),
            Arc::clone(&auth),
            tls.clone(),
            Arc::clone(&metrics),
            stop_workers.clone(),
        ))
    });
    // Whatever way `serve` returns (an early `?` included), the workers stop.
    let _stop_workers_on_return = stop_workers.clone().drop_guard();
    let stop = CancellationToken::new();
    let service = CacheNodeService::new(
        &config,
        self_address,
        store,
        Arc::clone(&metrics),
        Arc::clone(&auth),
        stop.clone(),
    );
    #[cfg(test)]
    let service = service.with_gate(hooks.gate.clone());
    #[cfg(not(test))]
    let _ = hooks;

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<CacheNodeServer<CacheNodeService>>()
        .await;
    // Reflection in both protocol versions: `v1`, and `v1alpha` for the
    // tools that still ask only for it (older grpcurl, grpcui, Postman,
    // evans), which would otherwise see UNIMPLEMENTED.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| Error::Server(format!("cannot build the reflection service: {e}")))?;
    let reflection = reflection()
        .build_v1()
        .map_err(|e| Error::Server(format!("cannot build the reflection service: {e}")))?;

    let mut builder = tonic::transport::Server::builder();
    let cache_service = tonic::service::interceptor::InterceptedService::new(
        CacheNodeServer::new(service).max_decoding_message_size(config.limits.max_request_bytes),
        crate::grpc::interceptor(Arc::clone(&auth), Arc::clone(&metrics)),
    );
    #[cfg(feature = "otel")]
    {
        builder = builder.trace_fn(request_span);
    }
    let router = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(cache_service);
    let mut grpc = match &tls {
        None => tokio::spawn(router.serve_with_incoming_shutdown(
            TcpIncoming::from(listeners.grpc).with_nodelay(Some(true)),
            stop.clone().cancelled_owned(),
        )),
        // Our own TLS listener rather than tonic's `tls_config`, so that a
        // reload reaches the handshakes of new connections.
        Some(tls) => tokio::spawn(router.serve_with_incoming_shutdown(
            crate::tls::incoming(TlsListener::new(
                listeners.grpc,
                Arc::clone(tls),
                Protocol::Grpc,
            )),
            stop.clone().cancelled_owned(),
        )),
    };

    let metrics_server = match listeners.metrics {
        Some(listener) => {
            let addr = listener
                .local_addr()
                .map_err(|e| Error::Server(format!("metrics listener has no address: {e}")))?;
            tracing::info!(%addr, tls = tls.is_some(), "serving metrics");
            let router = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let metrics = Arc::clone(&metrics);
                    async move { metrics.render() }
                }),
            );
            let shutdown = stop.clone().cancelled_owned();
            Some(match &tls {
                None => tokio::spawn(
                    axum::serve(listener, router)
                        .with_graceful_shutdown(shutdown)
                        .into_future(),
                ),
                Some(tls) => {
                    let listener = TlsListener::new(listener, Arc::clone(tls), Protocol::Metrics);
                    tokio::spawn(
                        axum::serve(listener, router)
                            .with_graceful_shutdown(shutdown)
                            .into_future(),
                    )
                }
            })
        }
        None => None,
    };
    let mut resp_server = match listeners.resp {
        Some(listener) => {
            let addr = listener
                .local_addr()
                .map_err(|e| Error::Server(format!("resp listener has no address: {e}")))?;
            tracing::info!(%addr, tls = tls.is_some(), "serving RESP");
            Some(tokio::spawn(resp::serve(
                listener,
                resp_context,
                resp_limits(&config),
                tls.clone(),
                stop.clone(),
            )))
        }
        None => None,
    };
    tracing::info!(
        node_id = %config.node_id,
        addr = %grpc_addr,
        tls = tls.is_some(),
        mutual_tls = config.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some()),
        tokens = config.auth.tokens.len(),
        "serving gRPC"
    );

    let resp_ended = async {
        match &mut resp_server {
            Some(task) => task.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = shutdown => {}
        result = resp_ended => {
            stop.cancel();
            return match result {
                Ok(Ok(())) => Err(Error::Server("resp listener stopped unexpectedly".into())),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(Error::Server(format!("resp listener task failed: {e}"))),
            };
        }
        result = &mut grpc => {
            // The server ended without being asked to: report why.
            stop.cancel();
            return match result {
                Ok(Ok(())) => Err(Error::Server("grpc server stopped unexpectedly".into())),
                Ok(Err(e)) => Err(Error::Server(format!("grpc server failed: {e}"))),
                Err(e) => Err(Error::Server(format!("grpc server task failed: {e}"))),
            };
        }
    }

    tracing::info!(grace = ?config.shutdown_grace, "shutting down: draining in-flight requests");
    health
        .set_not_serving::<CacheNodeServer<CacheNodeService>>()
        .await;
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    stop.cancel();
    #[cfg(test)]
    if let Some(gate) = &hooks.gate {
        gate.shutdown_started.notify_one();
    }

    let deadline = tokio::time::Instant::now() + config.shutdown_grace;
    let drained = tokio::time::timeout_at(deadline, &mut grpc).await;
    let result = match drained {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(Error::Server(format!("grpc server failed: {e}"))),
        Ok(Err(e)) => Err(Error::Server(format!("grpc server task failed: {e}"))),
        Err(_) => {
            tracing::warn!(grace = ?config.shutdown_grace, "in-flight requests did not finish in time; dropping them");
            grpc.abort();
            Ok(())
        }
    };
    if let Some(mut resp_server) = resp_server {
        match tokio::time::timeout_at(deadline, &mut resp_server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "resp listener failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "resp listener task failed"),
            Err(_) => {
                tracing::warn!(grace = ?config.shutdown_grace, "resp connections did not finish in time; dropping them");
                resp_server.abort();
            }
        }
    }
    stop_workers.cancel();
    if let Err(e) = sweeper.await {
        tracing::warn!(error = %e, "sweeper task failed");
    }
    if let Err(e) = upkeep.await {
        tracing::warn!(error = %e, "metrics upkeep task failed");
    }
    if let Some(reloader) = reloader
        && let Err(e) = reloader.await
    {
        tracing::warn!(error = %e, "config reload task failed");
    }
    if let Some(metrics_server) = metrics_server {
        match metrics_server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "metrics server failed"),
            Err(e) => tracing::warn!(error = %e, "metrics server task failed"),
        }
    }
    tracing::info!("shut down");
    result
}

/// The RESP parser's bounds from the node's limits: a bulk string holds a
/// key or a value; a frame holds `MSET` of `max_batch_keys` pairs (so
/// `2 * max_batch_keys + 1` elements), within `max_request_bytes`.
fn resp_limits(config: &Config) -> ParseLimits {
    let limits = &config.limits;
    ParseLimits {
        max_bulk_bytes: limits.max_value_bytes.max(limits.max_key_bytes),
        max_args: limits.max_batch_keys.saturating_mul(2).saturating_add(1),
        max_frame_bytes: limits.max_request_bytes,
        max_inline_bytes: resp::conn::MAX_INLINE_BYTES,
    }
}

/// Applies each configuration of `reloads` until `stop` is cancelled or
/// the sender is dropped (see [`run_reloadable`]).
async fn apply_reloads(
    mut reloads: tokio::sync::mpsc::Receiver<Config>,
    mut running: Config,
    auth: Arc<Auth>,
    tls: Option<Arc<ServerTls>>,
    metrics: Arc<NodeMetrics>,
    stop: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            () = stop.cancelled() => return,
            next = reloads.recv() => next,
        };
        let Some(next) = next else { return };
        match reload(&next, &auth, tls.as_deref()).await {
            Ok(tokens) => {
                metrics.count_reload("applied");
                let restart_needed = needs_restart(&running, &next);
                tracing::info!(
                    tokens,
                    tls = tls.is_some(),
                    ?restart_needed,
                    "configuration reloaded: tokens and tls files replaced"
                );
                running = next;
            }
            Err(error) => {
                metrics.count_reload("failed");
                tracing::warn!(%error, "configuration reload failed; nothing changed");
            }
        }
    }
}

/// Reads `next`'s TLS files and, when they are valid, swaps them and then
/// the tokens in; returns the number of tokens now accepted.
async fn reload(next: &Config, auth: &Auth, tls: Option<&ServerTls>) -> Result<usize> {
    match (tls, &next.tls) {
        (Some(tls), Some(files)) => tls.reload(&TlsMaterial::load(files).await?)?,
        (None, None) => {}
        (running, _) => {
            return Err(Error::Tls(format!(
                "turning tls {} takes a restart",
                if running.is_some() { "off" } else { "on" }
            )));
        }
    }
    Ok(auth.reload(next))
}

/// The top-level settings of `next` that differ from `running` and that a
/// reload does not apply (they take a restart).
fn needs_restart(running: &Config, next: &Config) -> Vec<&'static str> {
    let mut differ = Vec::new();
    let mut check = |name: &'static str, same: bool| {
        if !same {
            differ.push(name);
        }
    };
    check("node_id", running.node_id == next.node_id);
    check("listen", running.listen == next.listen);
    check(
        "metrics_listen",
        running.metrics_listen == next.metrics_listen,
    );
    check(
        "advertise_address",
        running.advertise_address == next.advertise_address,
    );
    check("resp_listen", running.resp_listen == next.resp_listen);
    check(
        "resp_default_keyspace",
        running.resp_default_keyspace == next.resp_default_keyspace,
    );
    check(
        "unknown_keyspaces",
        running.unknown_keyspaces == next.unknown_keyspaces,
    );
    check(
        "shutdown_grace",
        running.shutdown_grace == next.shutdown_grace,
    );
    check("log_format", running.log_format == next.log_format);
    check(
        "worker_threads",
        running.worker_threads == next.worker_threads,
    );
    check("limits", running.limits == next.limits);
    check("keyspaces", running.keyspaces == next.keyspaces);
    check(
        "created_keyspaces",
        running.created_keyspaces == next.created_keyspaces,
    );
    check("cluster", running.cluster == next.cluster);
    differ
}

/// Drains the latency histograms every [`UPKEEP_INTERVAL`] until `stop` is
/// cancelled: the recorder keeps every sample until it is drained, which
/// without this would happen only when `/metrics` is scraped (never, with
/// the endpoint off), so memory would grow with every request.
async fn metrics_upkeep(metrics: Arc<NodeMetrics>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => metrics.run_upkeep(),
        }
    }
}

/// Times out pending changes nobody touches and removes expired entries
/// nobody reads, every [`SWEEP_INTERVAL`], until `stop` is cancelled.
/// `Store::expire_pending` is synchronous and only walks the (small) record
/// tables of keyspaces that have records; `Store::expire_entries` walks a
/// bounded part of each keyspace's table per call.
async fn sweep(store: Arc<Store>, auth: Arc<Auth>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {
                auth.forget_idle();
                let now = Instant::now();
                let timed_out = store.expire_pending(now);
                if timed_out > 0 {
                    tracing::info!(timed_out, "pending changes timed out; live entries deleted");
                }
                // A bounded but CPU-bound walk: off the async workers.
                let entries = Arc::clone(&store);
                if let Err(error) =
                    tokio::task::spawn_blocking(move || entries.expire_entries(now)).await
                {
                    tracing::warn!(%error, "active expiry failed");
                }
            }
        }
    }
}

/// The span of one gRPC request, child of the caller's trace context when
/// the request carries one (`traceparent` metadata).
#[cfg(feature = "otel")]
fn request_span(request: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let path = request.uri().path();
    let span = tracing::info_span!(
        "ringcache.node.rpc",
        otel.name = %path,
        otel.kind = "server",
        rpc.method = %path,
    );
    cache_client::telemetry::otel::set_parent_from_headers(
        &span,
        request
            .headers()
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_bytes())),
    );
    span
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ringcache_proto::v1::cache_node_client::CacheNodeClient;
    use tokio::sync::{Notify, oneshot};

    /// Holds `Get` requests until released, and says when shutdown began.
    #[derive(Default)]
    pub(crate) struct Gate {
        entered: Notify,
        release: Notify,
        pub(crate) shutdown_started: Notify,
    }

    impl Gate {
        pub(crate) async fn pass(&self) {
            self.entered.notify_one();
            self.release.notified().await;
        }
    }

    /// A gated server on a free port: its address, the gate, the sender
    /// that shuts it down, and its task.
    async fn start_gated(
        mut config: Config,
    ) -> (
        std::net::SocketAddr,
        Arc<Gate>,
        oneshot::Sender<()>,
        tokio::task::JoinHandle<Result<()>>,
    ) {
        config.validate().unwrap();
        let gate = Arc::new(Gate::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            config,
            Listeners {
                grpc: listener,
                metrics: None,
                resp: None,
            },
            async {
                let _ = stop_rx.await;
            },
            None,
            Hooks {
                gate: Some(Arc::clone(&gate)),
            },
        ));
        (addr, gate, stop_tx, server)
    }

    #[tokio::test]
    async fn the_concurrency_limit_refuses_while_its_slot_is_held() {
        let mut config = Config::default();
        config.limits.max_concurrent_requests = Some(1);
        let (addr, gate, stop_tx, server) = start_gated(config).await;
        let mut client = CacheNodeClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let get = |mut client: CacheNodeClient<tonic::transport::Channel>| async move {
            client
                .get(v1::GetRequest {
                    keyspace: "default".into(),
                    key: "k".into(),
                })
                .await
        };
        // The first Get holds the only slot while the gate holds it.
        let held = tokio::spawn(get(client.clone()));
        gate.entered.notified().await;
        let status = client.topology(v1::TopologyRequest {}).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status}");
        assert!(status.message().contains("max_concurrent_requests (1)"));
        gate.release.notify_one();
        held.await.unwrap().unwrap();
        // The slot is free again once the held request is done.
        client.topology(v1::TopologyRequest {}).await.unwrap();
        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn shutdown_finishes_an_in_flight_request() {
        let (addr, gate, stop_tx, server) = start_gated(Config::default()).await;
        let mut client = CacheNodeClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let request = tokio::spawn(async move {
            client
                .get(v1::GetRequest {
                    keyspace: "default".into(),
                    key: "k".into(),
                })
                .await
        });
        gate.entered.notified().await;
        stop_tx.send(()).unwrap();
        gate.shutdown_started.notified().await;
        assert!(
            !server.is_finished(),
            "server finished with a request in flight"
        );
        gate.release.notify_one();
        let reply = request
            .await
            .unwrap()
            .expect("in-flight request must complete");
        assert!(reply.into_inner().entry.is_none());
        server.await.unwrap().expect("drained shutdown is clean");
        // Once drained, the port no longer accepts.
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    /// Opens a `BatchCommands` stream on `addr` with `token`: the sender of
    /// batches and the stream of replies.
    async fn open_stream(
        addr: std::net::SocketAddr,
        token: Option<&str>,
    ) -> (
        tokio::sync::mpsc::Sender<v1::BatchCommandsRequest>,
        tonic::Streaming<v1::BatchCommandsResponse>,
    ) {
        let mut client = CacheNodeClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (batches, outbound) = tokio::sync::mpsc::channel(4);
        let mut request =
            tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(outbound));
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let replies = client.batch_commands(request).await.unwrap().into_inner();
        (batches, replies)
    }

    fn command(id: u64, request: v1::command::Request) -> v1::Command {
        v1::Command {
            id,
            request: Some(request),
            ..v1::Command::default()
        }
    }

    fn set(key: &str) -> v1::command::Request {
        v1::command::Request::Set(v1::SetRequest {
            keyspace: "default".into(),
            item: Some(v1::SetItem {
                key: key.as_bytes().to_vec().into(),
                value: "v".into(),
                version: 1,
                ..v1::SetItem::default()
            }),
        })
    }

    fn get(key: &str) -> v1::command::Request {
        v1::command::Request::Get(v1::GetRequest {
            keyspace: "default".into(),
            key: key.as_bytes().to_vec().into(),
        })
    }

    /// The replies to one batch, by id: the code of an error, or `Ok`.
    async fn replies(
        stream: &mut tonic::Streaming<v1::BatchCommandsResponse>,
    ) -> std::collections::BTreeMap<u64, Result<v1::command_reply::Reply, tonic::Code>> {
        let batch = stream.message().await.unwrap().expect("a batch of replies");
        batch
            .replies
            .into_iter()
            .map(|reply| {
                let answer = match reply.reply.expect("every reply has content") {
                    v1::command_reply::Reply::Error(e) => Err(tonic::Code::from(e.code)),
                    other => Ok(other),
                };
                (reply.id, answer)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_stream_admits_and_answers_each_command_as_its_unary_call() {
        let config = Config::from_toml(
            "[[auth.tokens]]\nname = \"writer\"\nsecret = \"w\"\npermissions = { \"*\" = \"write\" }\n\
             [[auth.tokens]]\nname = \"reader\"\nsecret = \"r\"\npermissions = { \"*\" = \"read\" }",
        )
        .unwrap();
        let (addr, _gate, stop_tx, server) = start_gated(config).await;
        // Opening needs a token, as a unary call does.
        let mut client = CacheNodeClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (_unused, outbound) = tokio::sync::mpsc::channel::<v1::BatchCommandsRequest>(1);
        let refused = client
            .batch_commands(tokio_stream::wrappers::ReceiverStream::new(outbound))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);

        let (batches, mut stream) = open_stream(addr, Some("w")).await;
        // A writer's batch: a write, a malformed write, a read of the
        // written key; the malformed one fails alone.
        let malformed = v1::command::Request::Set(v1::SetRequest {
            keyspace: "default".into(),
            item: None,
        });
        batches
            .send(v1::BatchCommandsRequest {
                commands: vec![
                    command(1, set("k")),
                    command(2, malformed),
                    command(3, get("k")),
                ],
                authorization: "Bearer w".into(),
                session: String::new(),
            })
            .await
            .unwrap();
        let answered = replies(&mut stream).await;
        assert!(matches!(answered[&1], Ok(v1::command_reply::Reply::Set(_))));
        assert_eq!(answered[&2], Err(tonic::Code::InvalidArgument));
        match &answered[&3] {
            Ok(v1::command_reply::Reply::Get(reply)) => {
                assert_eq!(reply.entry.as_ref().unwrap().value, "v");
            }
            other => panic!("{other:?}"),
        }

        // The token is checked per batch: on the same stream, a reader's
        // batch may read but not write, and an unknown token nothing.
        batches
            .send(v1::BatchCommandsRequest {
                commands: vec![command(4, set("k2")), command(5, get("k"))],
                authorization: "Bearer r".into(),
                session: String::new(),
            })
            .await
            .unwrap();
        let answered = replies(&mut stream).await;
        assert_eq!(answered[&4], Err(tonic::Code::PermissionDenied));
        assert!(matches!(answered[&5], Ok(v1::command_reply::Reply::Get(_))));
        batches
            .send(v1::BatchCommandsRequest {
                commands: vec![command(6, get("k"))],
                authorization: "Bearer nobody".into(),
                session: String::new(),
            })
            .await
            .unwrap();
        assert_eq!(
            replies(&mut stream).await[&6],
            Err(tonic::Code::Unauthenticated)
        );
        drop(batches);
        assert!(
            stream.message().await.unwrap().is_none(),
            "the stream ends with its requests"
        );
        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_streamed_write_issued_before_a_flush_is_refused_after_it() {
        let (addr, _gate, stop_tx, server) = start_gated(Config::default()).await;
        let session = "00000000000000aa";
        let mut client = CacheNodeClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut flush = tonic::Request::new(v1::FlushRequest::default());
        flush.metadata_mut().insert(
            crate::sessions::SESSION_HEADER,
            format!("{session}-2").parse().unwrap(),
        );
        client.flush(flush).await.unwrap();

        let (batches, mut stream) = open_stream(addr, None).await;
        let mut before = command(1, set("late"));
        before.generation = 1;
        let mut after = command(2, set("fresh"));
        after.generation = 2;
        batches
            .send(v1::BatchCommandsRequest {
                commands: vec![before, after],
                authorization: String::new(),
                session: session.into(),
            })
            .await
            .unwrap();
        let answered = replies(&mut stream).await;
        assert_eq!(
            answered[&1],
            Err(tonic::Code::DeadlineExceeded),
            "{answered:?}"
        );
        assert!(matches!(answered[&2], Ok(v1::command_reply::Reply::Set(_))));
        drop(batches);
        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_draining_node_ends_its_command_streams() {
        let (addr, _gate, stop_tx, server) = start_gated(Config::default()).await;
        let (batches, mut stream) = open_stream(addr, None).await;
        batches
            .send(v1::BatchCommandsRequest {
                commands: vec![command(1, set("k"))],
                ..v1::BatchCommandsRequest::default()
            })
            .await
            .unwrap();
        assert!(replies(&mut stream).await[&1].is_ok());
        // The client keeps its side open; the drain must not wait for it.
        stop_tx.send(()).unwrap();
        assert!(
            stream.message().await.unwrap().is_none(),
            "the node ends the stream when it drains"
        );
        server.await.unwrap().expect("drained shutdown is clean");
        drop(batches);
    }
}

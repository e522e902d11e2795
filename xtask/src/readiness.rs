//! Free ports and readiness polling with deadlines.
//!
//! Nothing here sleeps in place of synchronisation: every wait polls a real
//! readiness signal (a TCP accept, a gRPC health reply) and gives up at a
//! deadline, failing early if the process being waited for has exited.

use std::{
    future::Future,
    net::{SocketAddr, TcpListener},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::{net::TcpStream, time::Instant};
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{paths, process::ChildGuard};

/// How often readiness is probed.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A free TCP port on 127.0.0.1.
///
/// The port is free when this returns; another process could still take it
/// before ours binds it, so callers that can retry with a fresh port do.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .context("failed to bind 127.0.0.1:0 to find a free port")?;
    Ok(listener
        .local_addr()
        .context("failed to read the bound address")?
        .port())
}

/// The outcome of one readiness probe.
pub enum Probe {
    /// The thing is ready.
    Ready,
    /// Not ready yet; the text says why, for the timeout message.
    NotYet(String),
}

/// Polls `probe` until it reports ready, `timeout` passes, `cancel` fires or
/// `child` (if any) exits.
///
/// # Errors
///
/// Fails on timeout, on cancellation, when the probe itself fails, and when
/// the child exits first; the last two messages include the child's log tail.
pub async fn wait_until<F, Fut>(
    what: &str,
    timeout: Duration,
    cancel: &CancellationToken,
    mut child: Option<&mut ChildGuard>,
    mut probe: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Probe>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(child) = child.as_deref_mut()
            && let Some(status) = child.try_status()?
        {
            let log = child
                .log()
                .map(|log| format!("; last log lines:\n{}", paths::tail(log, 30)))
                .unwrap_or_default();
            bail!("{} exited ({status}) before {what}{log}", child.name());
        }
        let last = match probe().await? {
            Probe::Ready => return Ok(()),
            Probe::NotYet(why) => why,
        };
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        tokio::select! {
            _ = cancel.cancelled() => bail!("interrupted while waiting for {what}"),
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
        }
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_for_tcp(
    addr: SocketAddr,
    timeout: Duration,
    cancel: &CancellationToken,
    child: Option<&mut ChildGuard>,
) -> Result<()> {
    wait_until(
        &format!("{addr} to accept connections"),
        timeout,
        cancel,
        child,
        || async move {
            Ok(match TcpStream::connect(addr).await {
                Ok(_) => Probe::Ready,
                Err(err) => Probe::NotYet(err.to_string()),
            })
        },
    )
    .await
}

/// Waits until the gRPC server at `addr` reports `service` as SERVING through
/// the standard `grpc.health.v1.Health/Check` ("" means the whole server).
pub async fn wait_for_grpc_health(
    addr: SocketAddr,
    service: &str,
    timeout: Duration,
    cancel: &CancellationToken,
    child: Option<&mut ChildGuard>,
) -> Result<()> {
    let what = format!("gRPC health of {service:?} at {addr} to be SERVING");
    wait_until(&what, timeout, cancel, child, || {
        probe_grpc_health(addr, service)
    })
    .await
}

async fn probe_grpc_health(addr: SocketAddr, service: &str) -> Result<Probe> {
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .context("invalid health endpoint")?
        // A frozen process accepts TCP but never answers; bound each probe so
        // the overall deadline still applies.
        .connect_timeout(PROBE_TIMEOUT)
        .timeout(PROBE_TIMEOUT);
    let mut client = match endpoint.connect().await {
        Ok(channel) => HealthClient::new(channel),
        Err(err) => return Ok(Probe::NotYet(format!("connect: {err}"))),
    };
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    Ok(match client.check(request).await {
        Ok(reply) if reply.get_ref().status == ServingStatus::Serving as i32 => Probe::Ready,
        Ok(reply) => Probe::NotYet(format!("status {:?}", reply.get_ref().status())),
        Err(status) => Probe::NotYet(format!("health check: {status}")),
    })
}

//! The gRPC baseline: a server of the `ringcache.v1.CacheNode` service that
//! answers without a cache, to measure what the transport alone costs.
//!
//! `Get` returns a fixed entry of the same shape as a node's reply (a value
//! of `value_size` bytes and a version), `MultiGet` one such entry per key,
//! `Set` and `MultiSet` `STORED` without keeping anything (so that a
//! benchmark's preload runs unchanged), and `Topology` names this server
//! alone, so that `cache_client::Client` connects to it as to a one-node
//! cluster. Every other call is `UNIMPLEMENTED`. The server is built like
//! the node's (`TCP_NODELAY`, the health service), so that the two differ
//! only in what their handlers do.

use std::future::Future;

use anyhow::{Context, Result};
use bytes::Bytes;
use ringcache_proto::v1::{
    self,
    cache_node_server::{CacheNode, CacheNodeServer},
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, transport::server::TcpIncoming};

/// The node id the baseline reports in its topology.
pub const BASELINE_ID: &str = "grpc-baseline";

/// What the baseline answers with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Bytes of the value every read returns.
    pub value_size: usize,
}

/// The handlers: fixed replies, no storage.
struct Baseline {
    entry: v1::Entry,
    topology: v1::TopologyResponse,
}

impl Baseline {
    fn hit(&self) -> v1::GetResponse {
        // `Bytes` clones share the buffer: no per-request copy of the value.
        v1::GetResponse {
            entry: Some(self.entry.clone()),
        }
    }
}

fn stored() -> v1::SetResponse {
    v1::SetResponse {
        outcome: v1::SetOutcome::Stored as i32,
        current_version: 0,
    }
}

#[tonic::async_trait]
impl CacheNode for Baseline {
    async fn get(&self, _: Request<v1::GetRequest>) -> Result<Response<v1::GetResponse>, Status> {
        Ok(Response::new(self.hit()))
    }

    async fn multi_get(
        &self,
        request: Request<v1::MultiGetRequest>,
    ) -> Result<Response<v1::MultiGetResponse>, Status> {
        let results = request.get_ref().keys.iter().map(|_| self.hit()).collect();
        Ok(Response::new(v1::MultiGetResponse { results }))
    }

    async fn set(&self, _: Request<v1::SetRequest>) -> Result<Response<v1::SetResponse>, Status> {
        Ok(Response::new(stored()))
    }

    async fn multi_set(
        &self,
        request: Request<v1::MultiSetRequest>,
    ) -> Result<Response<v1::MultiSetResponse>, Status> {
        let results = request.get_ref().items.iter().map(|_| stored()).collect();
        Ok(Response::new(v1::MultiSetResponse { results }))
    }

    async fn topology(
        &self,
        _: Request<v1::TopologyRequest>,
    ) -> Result<Response<v1::TopologyResponse>, Status> {
        Ok(Response::new(self.topology.clone()))
    }

    async fn delete(
        &self,
        _: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        Err(unimplemented("Delete"))
    }

    type BatchCommandsStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<v1::BatchCommandsResponse, Status>> + Send + 'static>,
    >;

    /// Unary calls only: the `grpc` suite compares unary calls, and a client
    /// with its stream on falls back to them here.
    async fn batch_commands(
        &self,
        _: Request<tonic::Streaming<v1::BatchCommandsRequest>>,
    ) -> Result<Response<Self::BatchCommandsStream>, Status> {
        Err(unimplemented("BatchCommands"))
    }

    async fn stats(
        &self,
        _: Request<v1::StatsRequest>,
    ) -> Result<Response<v1::StatsResponse>, Status> {
        Err(unimplemented("Stats"))
    }

    async fn flush(
        &self,
        _: Request<v1::FlushRequest>,
    ) -> Result<Response<v1::FlushResponse>, Status> {
        Err(unimplemented("Flush"))
    }

    async fn lease_get(
        &self,
        _: Request<v1::LeaseGetRequest>,
    ) -> Result<Response<v1::LeaseGetResponse>, Status> {
        Err(unimplemented("LeaseGet"))
    }

    async fn fill(
        &self,
        _: Request<v1::FillRequest>,
    ) -> Result<Response<v1::FillResponse>, Status> {
        Err(unimplemented("Fill"))
    }

    async fn release_lease(
        &self,
        _: Request<v1::ReleaseLeaseRequest>,
    ) -> Result<Response<v1::ReleaseLeaseResponse>, Status> {
        Err(unimplemented("ReleaseLease"))
    }

    async fn prepare(
        &self,
        _: Request<v1::PrepareRequest>,
    ) -> Result<Response<v1::PrepareResponse>, Status> {
        Err(unimplemented("Prepare"))
    }

    async fn commit(
        &self,
        _: Request<v1::CommitRequest>,
    ) -> Result<Response<v1::CommitResponse>, Status> {
        Err(unimplemented("Commit"))
    }

    async fn abort(
        &self,
        _: Request<v1::AbortRequest>,
    ) -> Result<Response<v1::AbortResponse>, Status> {
        Err(unimplemented("Abort"))
    }

    async fn mark_clean(
        &self,
        _: Request<v1::MarkCleanRequest>,
    ) -> Result<Response<v1::MarkCleanResponse>, Status> {
        Err(unimplemented("MarkClean"))
    }

    async fn list_dirty(
        &self,
        _: Request<v1::ListDirtyRequest>,
    ) -> Result<Response<v1::ListDirtyResponse>, Status> {
        Err(unimplemented("ListDirty"))
    }
}

fn unimplemented(rpc: &str) -> Status {
    Status::unimplemented(format!("the gRPC baseline does not implement {rpc}"))
}

/// Serves the baseline on `listener` until `shutdown` completes, then
/// drains in-flight requests.
///
/// # Errors
///
/// Fails when the listener has no address or the server fails.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let addr = listener
        .local_addr()
        .context("the baseline's listener has no address")?;
    let service = Baseline {
        entry: v1::Entry {
            value: Bytes::from(vec![b'x'; config.value_size]),
            version: 1,
            ttl_remaining_ms: 0,
        },
        topology: v1::TopologyResponse {
            epoch: 1,
            members: vec![v1::Member {
                id: BASELINE_ID.to_owned(),
                address: addr.to_string(),
                weight: 1,
            }],
            self_id: BASELINE_ID.to_owned(),
        },
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CacheNodeServer<Baseline>>().await;
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(CacheNodeServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("the gRPC baseline failed")
}

#[cfg(test)]
mod tests {
    use super::*;
    use cache_client::{Client, ClientConfig, SetOptions};
    use tokio_util::sync::CancellationToken;

    #[tokio::test]
    async fn a_client_connects_and_reads_the_fixed_entry() -> Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let server = tokio::spawn(run(
            Config { value_size: 100 },
            listener,
            stop.clone().cancelled_owned(),
        ));
        let client = Client::connect(ClientConfig::new([addr.to_string()])).await?;
        assert_eq!(client.topology().members[0].id, BASELINE_ID);
        let entry = client.get("default", "any").await?.expect("always a hit");
        assert_eq!(entry.value.len(), 100);
        assert_eq!(entry.version, 1);
        let keys: Vec<Bytes> = (0..16).map(|i| Bytes::from(format!("k{i}"))).collect();
        let entries = client.multi_get("default", &keys).await?;
        assert_eq!(entries.len(), 16);
        assert!(
            entries
                .iter()
                .all(|e| e.as_ref().is_some_and(|e| e.value.len() == 100))
        );
        assert!(
            client
                .set("default", "k", "v", SetOptions::new())
                .await?
                .is_stored()
        );
        assert!(client.delete("default", "k").await.is_err());
        drop(client);
        stop.cancel();
        server.await??;
        Ok(())
    }
}

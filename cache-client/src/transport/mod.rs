//! How calls reach one node: the `BatchCommands` stream for the hot calls,
//! unary calls for the rest.
//!
//! [`NodeClient`] has the methods of the generated gRPC client that the
//! client uses, with the same signatures, so the routing code does not know
//! which way a call goes:
//!
//! - `get`, `set`, `delete`, `multi_get`, `multi_set`, `lease_get`, `fill`
//!   and `release_lease` become commands on the node's stream
//!   ([`stream`]), which carries the concurrent calls to a node in batches;
//! - the others (topology, stats, flush, the two-phase commit, the worker's
//!   calls), a command too large to share a batch, every call when
//!   [`ClientConfig::command_stream`] is off, and every call to a node that
//!   does not offer the stream go unary.
//!
//! Either way a call gets the same answer, with the same status on failure:
//! the node serves a command as it serves its unary call.

mod session;
mod stream;

use std::sync::Arc;

use prost::Message as _;
use ringcache_proto::v1::{self, cache_node_client::CacheNodeClient, command::Request as Command};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Response, Status};

use crate::config::ClientConfig;

pub(crate) use session::{Authorize, Session};
pub(crate) use stream::CommandStream;

/// The generated client over one node's channel, with the client's token
/// and session stamp on every call.
pub(crate) type RawClient = CacheNodeClient<InterceptedService<Channel, Authorize>>;

/// A command larger than this goes unary: a batch is one message for the
/// node's `limits.max_request_bytes`, and a single large command must not
/// fail the commands it would share a batch with.
const MAX_STREAMED_COMMAND_BYTES: usize = 256 * 1024;

/// The calls of one node. Cheap to clone: clones share the channel and the
/// stream.
#[derive(Clone)]
pub(crate) struct NodeClient {
    raw: RawClient,
    stream: Option<Arc<CommandStream>>,
}

impl NodeClient {
    /// Calls `node` over `channel`, every call with `session`'s token and
    /// stamp, streaming the hot calls unless `config` turns the stream off.
    pub(crate) fn new(
        channel: Channel,
        node: &str,
        session: &Arc<Session>,
        config: &ClientConfig,
    ) -> Self {
        let raw = CacheNodeClient::with_interceptor(
            channel,
            Authorize {
                session: Arc::clone(session),
            },
        )
        .max_decoding_message_size(usize::MAX);
        let stream = config.command_stream.then(|| {
            Arc::new(CommandStream::new(
                raw.clone(),
                node,
                Arc::clone(session),
                config.max_batch_commands,
                config.request_timeout,
            ))
        });
        NodeClient { raw, stream }
    }
}

/// The hot calls: a command on the stream, or the unary call.
macro_rules! streamed {
    ($($name:ident($request:ty) -> $response:ty = $variant:ident;)*) => {$(
        pub(crate) async fn $name(
            &mut self,
            request: tonic::Request<$request>,
        ) -> Result<Response<$response>, Status> {
            let bytes = request.get_ref().encoded_len();
            match &self.stream {
                Some(stream) if bytes <= MAX_STREAMED_COMMAND_BYTES => {
                    let (metadata, _, message) = request.into_parts();
                    match stream.call(&metadata, Command::$variant(message), bytes).await? {
                        v1::command_reply::Reply::$variant(reply) => Ok(Response::new(reply)),
                        _ => Err(Status::internal(concat!(
                            "the node answered a ",
                            stringify!($variant),
                            " command with another reply"
                        ))),
                    }
                }
                _ => self.raw.$name(request).await,
            }
        }
    )*};
}

/// The other calls, unary.
macro_rules! unary {
    ($($name:ident($request:ty) -> $response:ty;)*) => {$(
        pub(crate) async fn $name(
            &mut self,
            request: impl tonic::IntoRequest<$request>,
        ) -> Result<Response<$response>, Status> {
            self.raw.$name(request).await
        }
    )*};
}

impl NodeClient {
    streamed! {
        get(v1::GetRequest) -> v1::GetResponse = Get;
        set(v1::SetRequest) -> v1::SetResponse = Set;
        delete(v1::DeleteRequest) -> v1::DeleteResponse = Delete;
        multi_get(v1::MultiGetRequest) -> v1::MultiGetResponse = MultiGet;
        multi_set(v1::MultiSetRequest) -> v1::MultiSetResponse = MultiSet;
        lease_get(v1::LeaseGetRequest) -> v1::LeaseGetResponse = LeaseGet;
        fill(v1::FillRequest) -> v1::FillResponse = Fill;
        release_lease(v1::ReleaseLeaseRequest) -> v1::ReleaseLeaseResponse = ReleaseLease;
    }

    unary! {
        stats(v1::StatsRequest) -> v1::StatsResponse;
        topology(v1::TopologyRequest) -> v1::TopologyResponse;
        flush(v1::FlushRequest) -> v1::FlushResponse;
        prepare(v1::PrepareRequest) -> v1::PrepareResponse;
        commit(v1::CommitRequest) -> v1::CommitResponse;
        abort(v1::AbortRequest) -> v1::AbortResponse;
        mark_clean(v1::MarkCleanRequest) -> v1::MarkCleanResponse;
        list_dirty(v1::ListDirtyRequest) -> v1::ListDirtyResponse;
    }
}

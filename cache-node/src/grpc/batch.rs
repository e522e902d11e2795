//! The `BatchCommands` stream: many commands over one HTTP/2 stream, each
//! served as its unary call would be.
//!
//! One task per stream reads a batch, runs its commands one after the other
//! and sends their replies as one batch. Every command is admitted on its
//! own, as the interceptor admits a unary call: the batch's bearer token is
//! resolved to a principal (so a token revoked while the stream is open stops
//! the next batch), then each command takes one request from the caller's
//! rate limit and a slot of the concurrency limit, is checked for its
//! keyspace permission, fenced by its session stamp, timed and counted under
//! its RPC's metrics. A refused command fails alone; the stream goes on.
//!
//! When the node drains, the task stops reading, answers what it has read,
//! and ends the stream: the client fails over whatever it sends after that,
//! as it would a unary call that reached a draining node.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use ringcache_proto::ServiceError as _;
use ringcache_proto::v1::{self, command::Request as Command, command_reply::Reply};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::Shared;
use crate::auth::Principal;
use crate::error::Error;
use crate::metrics::Rpc;
use crate::sessions::Stamp;

/// The replies of a stream, as tonic sends them.
pub type ReplyStream =
    Pin<Box<dyn Stream<Item = Result<v1::BatchCommandsResponse, Status>> + Send + 'static>>;

/// Batches of replies buffered towards the client: enough for the next one
/// to be ready while one is written.
const REPLY_BUFFER: usize = 4;

/// Serves the commands of `incoming` until the client closes it, the stream
/// breaks, or the node drains.
pub(super) fn serve(
    shared: Arc<Shared>,
    mut incoming: tonic::Streaming<v1::BatchCommandsRequest>,
    peer: Option<IpAddr>,
) -> ReplyStream {
    let (replies, outgoing) = mpsc::channel(REPLY_BUFFER);
    tokio::spawn(async move {
        loop {
            let batch = tokio::select! {
                biased;
                () = shared.stop.cancelled() => break,
                message = incoming.message() => match message {
                    Ok(Some(batch)) => batch,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(%status, "command stream broke");
                        break;
                    }
                },
            };
            let answered = shared.run_batch(batch, peer, Instant::now());
            if replies.send(Ok(answered)).await.is_err() {
                break;
            }
        }
    });
    Box::pin(ReceiverStream::new(outgoing))
}

impl Shared {
    /// Runs a batch's commands in order; one reply per command.
    fn run_batch(
        &self,
        batch: v1::BatchCommandsRequest,
        peer: Option<IpAddr>,
        received: Instant,
    ) -> v1::BatchCommandsResponse {
        let principal = self
            .auth
            .bearer((!batch.authorization.is_empty()).then_some(batch.authorization.as_bytes()))
            .map_err(|error| {
                tracing::debug!(reason = "unauthenticated", %error, "batch refused");
                error.to_status()
            });
        let session = session_of(&batch.session);
        let replies = batch
            .commands
            .into_iter()
            .map(|command| {
                let id = command.id;
                let reply = match &principal {
                    Ok(principal) => self.run_command(principal, peer, session, received, command),
                    Err(status) => {
                        self.metrics.count_refused("grpc", "unauthenticated");
                        Err(status.clone())
                    }
                };
                v1::CommandReply {
                    id,
                    reply: Some(reply.unwrap_or_else(|status| Reply::Error(error_of(&status)))),
                }
            })
            .collect();
        v1::BatchCommandsResponse { replies }
    }

    /// One command, admitted as the interceptor admits a unary call.
    #[allow(clippy::result_large_err)] // `Status` is what tonic handlers return
    fn run_command(
        &self,
        principal: &Principal,
        peer: Option<IpAddr>,
        session: Option<u64>,
        received: Instant,
        command: v1::Command,
    ) -> Result<Reply, Status> {
        self.auth
            .admit(principal, peer)
            .map_err(|e| self.refuse_admission("rate_limited", e))?;
        let _slot = self
            .auth
            .slot()
            .map_err(|e| self.refuse_admission("overloaded", e))?;
        if command.timeout_ms > 0 && received.elapsed() > Duration::from_millis(command.timeout_ms)
        {
            return Err(Status::deadline_exceeded(
                "the command waited past its timeout",
            ));
        }
        let stamp = session.map(|session| Stamp {
            session,
            generation: command.generation,
        });
        #[cfg(feature = "otel")]
        let span = command_span(&command);
        #[cfg(feature = "otel")]
        let _entered = span.enter();
        let Some(request) = command.request else {
            return Err(Status::invalid_argument("a command without a request"));
        };
        match request {
            Command::Get(req) => self
                .reply(Rpc::Get, || self.exec_get(principal, req))
                .map(Reply::Get),
            Command::Set(req) => self
                .reply(Rpc::Set, || self.exec_set(principal, stamp, req))
                .map(Reply::Set),
            Command::Delete(req) => self
                .reply(Rpc::Delete, || self.exec_delete(principal, req))
                .map(Reply::Delete),
            Command::MultiGet(req) => self
                .reply(Rpc::MultiGet, || self.exec_multi_get(principal, req))
                .map(Reply::MultiGet),
            Command::MultiSet(req) => self
                .reply(Rpc::MultiSet, || self.exec_multi_set(principal, stamp, req))
                .map(Reply::MultiSet),
            Command::LeaseGet(req) => self
                .reply(Rpc::LeaseGet, || self.exec_lease_get(principal, req))
                .map(Reply::LeaseGet),
            Command::Fill(req) => self
                .reply(Rpc::Fill, || self.exec_fill(principal, stamp, req))
                .map(Reply::Fill),
            Command::ReleaseLease(req) => self
                .reply(Rpc::ReleaseLease, || {
                    self.exec_release_lease(principal, req)
                })
                .map(Reply::ReleaseLease),
        }
    }

    /// Counts and converts a refusal of admission, as the interceptor does.
    fn refuse_admission(&self, reason: &'static str, error: Error) -> Status {
        self.metrics.count_refused("grpc", reason);
        tracing::debug!(reason, %error, "command refused");
        error.to_status()
    }
}

/// The session id of a batch (`<16 hex digits>`); `None` leaves its writes
/// unfenced, as a unary call without the header.
fn session_of(session: &str) -> Option<u64> {
    (!session.is_empty())
        .then(|| u64::from_str_radix(session, 16).ok())
        .flatten()
}

/// A status as a command's error.
fn error_of(status: &Status) -> v1::CommandError {
    v1::CommandError {
        code: status.code() as i32,
        message: status.message().to_owned(),
        details: bytes::Bytes::copy_from_slice(status.details()),
    }
}

/// A span per command, child of the caller's trace as a unary call's is.
#[cfg(feature = "otel")]
fn command_span(command: &v1::Command) -> tracing::Span {
    let name = match &command.request {
        Some(Command::Get(_)) => "/ringcache.v1.CacheNode/Get",
        Some(Command::Set(_)) => "/ringcache.v1.CacheNode/Set",
        Some(Command::Delete(_)) => "/ringcache.v1.CacheNode/Delete",
        Some(Command::MultiGet(_)) => "/ringcache.v1.CacheNode/MultiGet",
        Some(Command::MultiSet(_)) => "/ringcache.v1.CacheNode/MultiSet",
        Some(Command::LeaseGet(_)) => "/ringcache.v1.CacheNode/LeaseGet",
        Some(Command::Fill(_)) => "/ringcache.v1.CacheNode/Fill",
        Some(Command::ReleaseLease(_)) => "/ringcache.v1.CacheNode/ReleaseLease",
        None => "unknown",
    };
    // Named as the unary call's span is (`server::request_span`), so that a
    // trace looks the same whichever way the call went.
    let span = tracing::info_span!(
        "ringcache.node.rpc",
        otel.name = name,
        otel.kind = "server",
        rpc.method = name,
    );
    cache_client::telemetry::otel::set_parent_from_headers(
        &span,
        command
            .trace_context
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_bytes())),
    );
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_id_is_sixteen_hex_digits_or_nothing() {
        assert_eq!(session_of("00000000000000ff"), Some(255));
        assert_eq!(session_of(""), None);
        assert_eq!(session_of("not hex"), None);
    }

    #[test]
    fn an_error_keeps_its_code_message_and_details() {
        let status = Status::with_details(
            tonic::Code::PermissionDenied,
            "no",
            bytes::Bytes::from_static(b"\x01\x02"),
        );
        let error = error_of(&status);
        assert_eq!(error.code, tonic::Code::PermissionDenied as i32);
        assert_eq!(error.message, "no");
        assert_eq!(error.details.as_ref(), b"\x01\x02");
    }
}

//! One `BatchCommands` stream per node: concurrent calls to the node
//! coalesced into batches of commands (TiKV's batch commands are the model).
//!
//! A call becomes a command, queued with a one-shot channel for its reply. A
//! task per node (the driver) takes the first queued command as soon as
//! there is one and, once fewer than [`BATCHES_IN_FLIGHT`] batches await
//! their replies, sends it with whatever else is queued by then, up to
//! `max_batch_commands` and [`MAX_BATCH_BYTES`]. Nothing waits for a batch
//! to fill: an idle client's call is sent at once, alone. Under load the
//! batches fill by themselves: the calls that arrive while the batches in
//! flight are out make the next one, so a busy client sends fewer, larger
//! batches (fewer HTTP/2 frames and system calls per call on both sides)
//! instead of one small batch per call. A second task (the reader) hands
//! each reply to its command's caller by id, and each batch of replies
//! lets the next batch go.
//!
//! Failures:
//! - A caller that gave up (its timeout) drops its reply channel; a command
//!   still queued then is not sent.
//! - When the stream breaks or the node ends it (it drains), the commands in
//!   flight on it fail with `UNAVAILABLE`, as a unary call on a broken
//!   connection does, and the client's usual rules (retry of idempotent
//!   calls, mark-down after `failure_threshold`) apply to each. The next
//!   command opens a new stream.
//! - A node that answers the stream with `UNIMPLEMENTED` (an older version,
//!   during a rolling upgrade) is called unary; the stream is tried again
//!   after [`UNSUPPORTED_RECHECK`].
//!
//! Each command carries what its unary call's metadata would: its timeout,
//! its trace context, and the session generation it was issued under (the
//! node's write fence compares that generation, so a command issued before a
//! re-admission flush is refused after it, whenever the batch is sent). The
//! batch carries the token, read when the batch is sent.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;
use ringcache_proto::v1::{self, command::Request as Command, command_reply::Reply};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use tonic::metadata::{KeyAndValueRef, MetadataMap};

use super::{RawClient, Session};
use crate::telemetry;

/// Most bytes of commands in one batch, well under the node's smallest
/// allowed `limits.max_request_bytes`.
pub(crate) const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Commands queued for a node before callers wait to queue theirs.
const QUEUE: usize = 8192;
/// Batches sent on a stream and not answered yet, at most: the next batch
/// fills while they are out. Two keep the node busy while one batch's
/// replies travel back.
pub(crate) const BATCHES_IN_FLIGHT: usize = 2;
/// How long a node that does not offer the stream is called unary before
/// the stream is tried again.
pub(crate) const UNSUPPORTED_RECHECK: Duration = Duration::from_secs(30);

/// The reply channel of one command.
type Pending = oneshot::Sender<Result<Reply, Status>>;

/// A command waiting for the driver.
struct Queued {
    command: v1::Command,
    bytes: usize,
    reply: Pending,
}

/// The stream of one node: the queue its driver serves, started by the
/// first call.
pub(crate) struct CommandStream {
    queue: OnceLock<mpsc::Sender<Queued>>,
    link: Link,
}

/// What the driver needs to reach the node.
#[derive(Clone)]
struct Link {
    raw: RawClient,
    node: Arc<str>,
    session: Arc<Session>,
    max_batch: usize,
    /// How long opening the stream may take.
    open_timeout: Duration,
}

impl CommandStream {
    pub(crate) fn new(
        raw: RawClient,
        node: &str,
        session: Arc<Session>,
        max_batch: usize,
        open_timeout: Duration,
    ) -> Self {
        CommandStream {
            queue: OnceLock::new(),
            link: Link {
                raw,
                node: node.into(),
                session,
                max_batch: max_batch.max(1),
                open_timeout,
            },
        }
    }

    /// Sends `request` (of `bytes` encoded, as the caller measured it) as a
    /// command with what `metadata` says of the call (its timeout, its trace
    /// context) and waits for its reply.
    pub(crate) async fn call(
        &self,
        metadata: &MetadataMap,
        request: Command,
        bytes: usize,
    ) -> Result<Reply, Status> {
        let command = v1::Command {
            id: 0,
            timeout_ms: timeout_ms(metadata),
            generation: self.link.session.generation(),
            trace_context: trace_context(metadata),
            request: Some(request),
        };
        let (reply, replied) = oneshot::channel();
        let queued = Queued {
            // The command's own fields add a few bytes to its request's:
            // within the batches' margin under the node's limit.
            bytes,
            command,
            reply,
        };
        self.queue()
            .send(queued)
            .await
            .map_err(|_| Status::unavailable("the node's command stream is closed"))?;
        replied.await.unwrap_or_else(|_| {
            Err(Status::unavailable(
                "the command stream dropped the command",
            ))
        })
    }

    /// The driver's queue; the first call starts the driver, which ends when
    /// this stream is dropped.
    fn queue(&self) -> &mpsc::Sender<Queued> {
        self.queue.get_or_init(|| {
            let (queue, queued) = mpsc::channel(QUEUE);
            tokio::spawn(drive(queued, self.link.clone()));
            queue
        })
    }
}

/// The driver: batches queued commands onto the stream, opening it when
/// needed, until the queue closes.
async fn drive(mut queue: mpsc::Receiver<Queued>, link: Link) {
    let mut open: Option<Open> = None;
    let mut unsupported_since: Option<Instant> = None;
    let mut carried: Option<Queued> = None;
    loop {
        let first = match carried.take() {
            Some(queued) => queued,
            None => match queue.recv().await {
                Some(queued) => queued,
                None => return,
            },
        };
        // Wait for room in flight before taking the rest: what queues
        // meanwhile joins this batch.
        let holds_room = match open.as_ref() {
            Some(stream) => {
                stream.room().await;
                true
            }
            None => false,
        };
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < link.max_batch {
            let Ok(queued) = queue.try_recv() else { break };
            if bytes + queued.bytes > MAX_BATCH_BYTES {
                carried = Some(queued);
                break;
            }
            bytes += queued.bytes;
            batch.push(queued);
        }
        // Callers that gave up are not served.
        batch.retain(|queued| !queued.reply.is_closed());
        if batch.is_empty() {
            if let (true, Some(stream)) = (holds_room, open.as_ref()) {
                stream.room.add_permits(1);
            }
            continue;
        }
        if unsupported_since.is_some_and(|since| since.elapsed() < UNSUPPORTED_RECHECK) {
            unary_all(&link, batch);
            continue;
        }
        if open.as_ref().is_none_or(Open::is_closed) {
            open = None;
            match link.open().await {
                Ok(opened) => {
                    unsupported_since = None;
                    // This batch takes its room on the new stream.
                    if let Ok(permit) = opened.room.try_acquire() {
                        permit.forget();
                    }
                    open = Some(opened);
                }
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    tracing::info!(node = %link.node, "the node offers no command stream; calling it unary");
                    unsupported_since = Some(Instant::now());
                    unary_all(&link, batch);
                    continue;
                }
                Err(status) => {
                    fail_all(batch, &status);
                    continue;
                }
            }
        }
        let stream = open.as_mut().expect("opened above");
        telemetry::command_batch(&link.node, batch.len());
        if let Err(batch) = stream.send(batch, &link.session).await {
            fail_all(batch, &Status::unavailable("the command stream closed"));
            open = None;
        }
    }
}

/// An open stream: where batches go, and the commands awaiting replies.
struct Open {
    outbound: mpsc::Sender<v1::BatchCommandsRequest>,
    /// `None` once the reader ended: the stream is closed.
    in_flight: Arc<Mutex<Option<HashMap<u64, Pending>>>>,
    /// Room for batches in flight: a batch sent takes a permit, a batch of
    /// replies received gives one back (the node answers each batch with
    /// one batch of replies). Closed when the reader ends.
    room: Arc<tokio::sync::Semaphore>,
    next_id: u64,
}

impl Open {
    fn is_closed(&self) -> bool {
        self.outbound.is_closed() || self.in_flight.lock().is_none()
    }

    /// Waits until fewer than [`BATCHES_IN_FLIGHT`] batches are out, and
    /// takes the room for one; returns at once when the stream closed (the
    /// send then fails and the stream is opened again).
    async fn room(&self) {
        if let Ok(permit) = self.room.acquire().await {
            permit.forget();
        }
    }

    /// Registers the batch's commands and sends it; gives back the commands
    /// that could not be sent.
    async fn send(&mut self, batch: Vec<Queued>, session: &Session) -> Result<(), Vec<Queued>> {
        let mut commands = Vec::with_capacity(batch.len());
        let mut ids = Vec::with_capacity(batch.len());
        {
            let mut in_flight = self.in_flight.lock();
            let Some(in_flight) = in_flight.as_mut() else {
                return Err(batch);
            };
            for Queued {
                mut command, reply, ..
            } in batch
            {
                self.next_id += 1;
                command.id = self.next_id;
                in_flight.insert(command.id, reply);
                ids.push(command.id);
                commands.push(command);
            }
        }
        let request = v1::BatchCommandsRequest {
            commands,
            authorization: session.authorization_text(),
            session: session.id_text(),
        };
        if self.outbound.send(request).await.is_ok() {
            return Ok(());
        }
        // The stream closed before taking the batch: its commands, if the
        // reader has not failed them yet, fail here.
        let mut in_flight = self.in_flight.lock();
        let status = Status::unavailable("the command stream closed");
        for id in ids {
            if let Some(reply) = in_flight.as_mut().and_then(|m| m.remove(&id)) {
                let _ = reply.send(Err(status.clone()));
            }
        }
        Ok(())
    }
}

impl Link {
    /// Opens the stream and starts its reader.
    async fn open(&self) -> Result<Open, Status> {
        // A buffer of one: while the stream writes a batch, the next one
        // fills in the driver's queue.
        let (outbound, requests) = mpsc::channel(1);
        let mut raw = self.raw.clone();
        let opened = tokio::time::timeout(
            self.open_timeout,
            raw.batch_commands(ReceiverStream::new(requests)),
        )
        .await
        .map_err(|_| {
            Status::unavailable(format!(
                "the command stream did not open within {:?}",
                self.open_timeout
            ))
        })??;
        let in_flight = Arc::new(Mutex::new(Some(HashMap::new())));
        let room = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
        tokio::spawn(read(
            opened.into_inner(),
            Arc::clone(&in_flight),
            Arc::clone(&room),
            Arc::clone(&self.node),
        ));
        Ok(Open {
            outbound,
            in_flight,
            room,
            next_id: 0,
        })
    }
}

/// The reader: hands replies to their callers; when the stream ends, fails
/// the commands still in flight.
async fn read(
    mut replies: tonic::Streaming<v1::BatchCommandsResponse>,
    in_flight: Arc<Mutex<Option<HashMap<u64, Pending>>>>,
    room: Arc<tokio::sync::Semaphore>,
    node: Arc<str>,
) {
    let ended = loop {
        match replies.message().await {
            Ok(Some(batch)) => {
                {
                    let mut in_flight = in_flight.lock();
                    let Some(in_flight) = in_flight.as_mut() else {
                        return;
                    };
                    for reply in batch.replies {
                        if let Some(pending) = in_flight.remove(&reply.id) {
                            let _ = pending.send(reply_of(reply.reply));
                        }
                    }
                }
                room.add_permits(1);
            }
            Ok(None) => break "the node ended the command stream".to_owned(),
            Err(status) => break format!("the command stream broke: {status}"),
        }
    };
    // Whoever waits for room sees the stream closed.
    room.close();
    let orphans = in_flight.lock().take().unwrap_or_default();
    if !orphans.is_empty() {
        tracing::debug!(%node, commands = orphans.len(), reason = %ended, "failing the commands in flight");
    }
    let status = Status::unavailable(ended);
    for (_, pending) in orphans {
        let _ = pending.send(Err(status.clone()));
    }
}

/// A command's reply as its unary call would have ended.
fn reply_of(reply: Option<Reply>) -> Result<Reply, Status> {
    match reply {
        Some(Reply::Error(error)) => Err(Status::with_details(
            tonic::Code::from(error.code),
            error.message,
            error.details,
        )),
        Some(reply) => Ok(reply),
        None => Err(Status::internal("the node sent an empty reply")),
    }
}

fn fail_all(batch: Vec<Queued>, status: &Status) {
    for queued in batch {
        let _ = queued.reply.send(Err(status.clone()));
    }
}

/// Sends each command as its unary call (a node without the stream).
fn unary_all(link: &Link, batch: Vec<Queued>) {
    for queued in batch {
        let mut raw = link.raw.clone();
        tokio::spawn(async move {
            let command = queued.command;
            let reply = unary(&mut raw, command).await;
            let _ = queued.reply.send(reply);
        });
    }
}

async fn unary(raw: &mut RawClient, command: v1::Command) -> Result<Reply, Status> {
    let timeout = (command.timeout_ms > 0).then(|| Duration::from_millis(command.timeout_ms));
    let metadata = command.trace_context;
    macro_rules! call {
        ($method:ident, $variant:ident, $message:expr) => {{
            let mut request = tonic::Request::new($message);
            if let Some(timeout) = timeout {
                request.set_timeout(timeout);
            }
            for (name, value) in &metadata {
                if let (Ok(name), Ok(value)) = (
                    name.parse::<tonic::metadata::AsciiMetadataKey>(),
                    value.parse::<tonic::metadata::AsciiMetadataValue>(),
                ) {
                    request.metadata_mut().insert(name, value);
                }
            }
            raw.$method(request)
                .await
                .map(|reply| Reply::$variant(reply.into_inner()))
        }};
    }
    match command.request {
        Some(Command::Get(m)) => call!(get, Get, m),
        Some(Command::Set(m)) => call!(set, Set, m),
        Some(Command::Delete(m)) => call!(delete, Delete, m),
        Some(Command::MultiGet(m)) => call!(multi_get, MultiGet, m),
        Some(Command::MultiSet(m)) => call!(multi_set, MultiSet, m),
        Some(Command::LeaseGet(m)) => call!(lease_get, LeaseGet, m),
        Some(Command::Fill(m)) => call!(fill, Fill, m),
        Some(Command::ReleaseLease(m)) => call!(release_lease, ReleaseLease, m),
        None => Err(Status::internal("a command without a request")),
    }
}

/// A unary call's timeout, from its `grpc-timeout` metadata, in
/// milliseconds (rounded up); 0 for none.
fn timeout_ms(metadata: &MetadataMap) -> u64 {
    let Some(value) = metadata.get("grpc-timeout").and_then(|v| v.to_str().ok()) else {
        return 0;
    };
    let Some(unit) = value.chars().last() else {
        return 0;
    };
    let Ok(amount) = value[..value.len() - unit.len_utf8()].parse::<u64>() else {
        return 0;
    };
    match unit {
        'H' => amount.saturating_mul(3_600_000),
        'M' => amount.saturating_mul(60_000),
        'S' => amount.saturating_mul(1_000),
        'm' => amount,
        'u' => amount.div_ceil(1_000),
        'n' => amount.div_ceil(1_000_000),
        _ => 0,
    }
}

/// The metadata a unary call would carry besides its timeout: the trace
/// context, when tracing propagates one.
fn trace_context(metadata: &MetadataMap) -> HashMap<String, String> {
    metadata
        .iter()
        .filter_map(|entry| match entry {
            KeyAndValueRef::Ascii(name, value) if name.as_str() != "grpc-timeout" => {
                Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
            }
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_timeout(timeout: Duration) -> MetadataMap {
        let mut request = tonic::Request::new(());
        request.set_timeout(timeout);
        request.into_parts().0
    }

    #[test]
    fn a_calls_timeout_travels_in_milliseconds_rounded_up() {
        assert_eq!(timeout_ms(&with_timeout(Duration::from_millis(500))), 500);
        assert_eq!(timeout_ms(&with_timeout(Duration::from_secs(90))), 90_000);
        assert_eq!(timeout_ms(&with_timeout(Duration::from_micros(1_500))), 2);
        assert_eq!(timeout_ms(&with_timeout(Duration::from_nanos(10))), 1);
        assert_eq!(timeout_ms(&MetadataMap::new()), 0);
    }

    #[test]
    fn the_trace_context_leaves_the_timeout_out() {
        let mut metadata = with_timeout(Duration::from_secs(1));
        metadata.insert("traceparent", "00-abc-def-01".parse().unwrap());
        let context = trace_context(&metadata);
        assert_eq!(context.len(), 1);
        assert_eq!(context["traceparent"], "00-abc-def-01");
    }

    #[test]
    fn an_error_reply_is_the_status_of_the_unary_call() {
        let status = reply_of(Some(Reply::Error(v1::CommandError {
            code: tonic::Code::PermissionDenied as i32,
            message: "no".into(),
            details: Default::default(),
        })))
        .unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(status.message(), "no");
        assert_eq!(
            reply_of(None).unwrap_err().code(),
            tonic::Code::Internal,
            "a reply without content is the node's fault"
        );
    }
}

//! The client's command stream against an in-process node that records what
//! reaches it: concurrent calls share batches, an idle call is sent alone at
//! once, a broken stream fails only the commands in flight on it (and the
//! client's retry rules apply to them), a node without the stream is called
//! unary, and a refused command fails alone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use cache_client::{Client, ClientConfig, Error, SetOptions};
use futures::Stream;
use parking_lot::Mutex;
use ringcache_proto::v1::{
    self,
    cache_node_server::{CacheNode, CacheNodeServer},
    command::Request as Command,
    command_reply::Reply,
};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// What the fake node does and saw.
#[derive(Default)]
struct State {
    id: String,
    address: String,
    /// The pool's members, as every fake reports them.
    members: Mutex<Vec<v1::Member>>,
    /// Whether it offers `BatchCommands` (an older node does not).
    offers_stream: bool,
    entries: Mutex<HashMap<bytes::Bytes, v1::Entry>>,
    streams_opened: AtomicUsize,
    /// The number of commands of each batch received.
    batches: Mutex<Vec<usize>>,
    unary_calls: AtomicUsize,
    /// When set, the next batch is not answered: the stream ends with this
    /// status once `release` is notified.
    break_next: Mutex<Option<Status>>,
    received_doomed: Notify,
    release: Notify,
    /// Keys whose commands the node refuses.
    refused_keys: Mutex<Vec<Vec<u8>>>,
    /// How many of the next batches are answered only once `released`
    /// gives them a permit each.
    hold: AtomicUsize,
    released: Permits,
    /// A permit per batch received.
    received: Permits,
}

/// A semaphore that starts empty.
struct Permits(tokio::sync::Semaphore);

impl Default for Permits {
    fn default() -> Self {
        Permits(tokio::sync::Semaphore::new(0))
    }
}

impl std::ops::Deref for Permits {
    type Target = tokio::sync::Semaphore;

    fn deref(&self) -> &tokio::sync::Semaphore {
        &self.0
    }
}

#[derive(Clone)]
struct Fake(Arc<State>);

impl Fake {
    fn get(&self, req: v1::GetRequest) -> Result<v1::GetResponse, Status> {
        self.check(&req.key)?;
        Ok(v1::GetResponse {
            entry: self.0.entries.lock().get(&req.key).cloned(),
        })
    }

    fn set(&self, req: v1::SetRequest) -> Result<v1::SetResponse, Status> {
        let item = req
            .item
            .ok_or_else(|| Status::invalid_argument("no item"))?;
        self.check(&item.key)?;
        let mut entries = self.0.entries.lock();
        let outcome = if item.condition == v1::WriteCondition::IfAbsent as i32
            && entries.contains_key(&item.key)
        {
            v1::SetOutcome::Exists
        } else {
            entries.insert(
                item.key,
                v1::Entry {
                    value: item.value,
                    version: item.version,
                    ttl_remaining_ms: 0,
                },
            );
            v1::SetOutcome::Stored
        };
        Ok(v1::SetResponse {
            outcome: outcome as i32,
            current_version: 0,
        })
    }

    fn check(&self, key: &[u8]) -> Result<(), Status> {
        if self.0.refused_keys.lock().iter().any(|k| k == key) {
            return Err(Status::permission_denied("this key is refused"));
        }
        Ok(())
    }

    fn run(&self, command: v1::Command) -> v1::CommandReply {
        let reply = match command.request {
            Some(Command::Get(req)) => self.get(req).map(Reply::Get),
            Some(Command::Set(req)) => self.set(req).map(Reply::Set),
            _ => Err(Status::unimplemented("not in the fake")),
        };
        v1::CommandReply {
            id: command.id,
            reply: Some(reply.unwrap_or_else(|status| {
                Reply::Error(v1::CommandError {
                    code: status.code() as i32,
                    message: status.message().to_owned(),
                    details: Default::default(),
                })
            })),
        }
    }
}

type Replies = Pin<Box<dyn Stream<Item = Result<v1::BatchCommandsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl CacheNode for Fake {
    async fn get(&self, r: Request<v1::GetRequest>) -> Result<Response<v1::GetResponse>, Status> {
        self.0.unary_calls.fetch_add(1, Ordering::SeqCst);
        self.get(r.into_inner()).map(Response::new)
    }

    async fn set(&self, r: Request<v1::SetRequest>) -> Result<Response<v1::SetResponse>, Status> {
        self.0.unary_calls.fetch_add(1, Ordering::SeqCst);
        self.set(r.into_inner()).map(Response::new)
    }

    async fn topology(
        &self,
        _: Request<v1::TopologyRequest>,
    ) -> Result<Response<v1::TopologyResponse>, Status> {
        Ok(Response::new(v1::TopologyResponse {
            epoch: 1,
            members: self.0.members.lock().clone(),
            self_id: self.0.id.clone(),
        }))
    }

    async fn flush(
        &self,
        _: Request<v1::FlushRequest>,
    ) -> Result<Response<v1::FlushResponse>, Status> {
        Ok(Response::new(v1::FlushResponse {}))
    }

    type BatchCommandsStream = Replies;

    async fn batch_commands(
        &self,
        request: Request<tonic::Streaming<v1::BatchCommandsRequest>>,
    ) -> Result<Response<Replies>, Status> {
        if !self.0.offers_stream {
            return Err(Status::unimplemented("an older node"));
        }
        self.0.streams_opened.fetch_add(1, Ordering::SeqCst);
        let mut incoming = request.into_inner();
        let (replies, outgoing) = mpsc::channel(4);
        let fake = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(batch)) = incoming.message().await {
                fake.0.batches.lock().push(batch.commands.len());
                fake.0.received.add_permits(1);
                let held = fake
                    .0
                    .hold
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if held {
                    let fake = fake.clone();
                    let replies = replies.clone();
                    tokio::spawn(async move {
                        fake.0.released.acquire().await.unwrap().forget();
                        let answered = v1::BatchCommandsResponse {
                            replies: batch.commands.into_iter().map(|c| fake.run(c)).collect(),
                        };
                        let _ = replies.send(Ok(answered)).await;
                    });
                    continue;
                }
                let doomed = fake.0.break_next.lock().take();
                if let Some(status) = doomed {
                    fake.0.received_doomed.notify_one();
                    fake.0.release.notified().await;
                    let _ = replies.send(Err(status)).await;
                    return;
                }
                let answered = v1::BatchCommandsResponse {
                    replies: batch.commands.into_iter().map(|c| fake.run(c)).collect(),
                };
                if replies.send(Ok(answered)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(outgoing))))
    }

    async fn delete(
        &self,
        _: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
    async fn multi_get(
        &self,
        _: Request<v1::MultiGetRequest>,
    ) -> Result<Response<v1::MultiGetResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
    async fn multi_set(
        &self,
        _: Request<v1::MultiSetRequest>,
    ) -> Result<Response<v1::MultiSetResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
    async fn stats(
        &self,
        _: Request<v1::StatsRequest>,
    ) -> Result<Response<v1::StatsResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
    async fn lease_get(
        &self,
        _: Request<v1::LeaseGetRequest>,
    ) -> Result<Response<v1::LeaseGetResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
    async fn fill(
        &self,
        _: Request<v1::FillRequest>,
    ) -> Result<Response<v1::FillResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
    async fn release_lease(
        &self,
        _: Request<v1::ReleaseLeaseRequest>,
    ) -> Result<Response<v1::ReleaseLeaseResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
    async fn prepare(
        &self,
        _: Request<v1::PrepareRequest>,
    ) -> Result<Response<v1::PrepareResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
    async fn commit(
        &self,
        _: Request<v1::CommitRequest>,
    ) -> Result<Response<v1::CommitResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
    async fn abort(
        &self,
        _: Request<v1::AbortRequest>,
    ) -> Result<Response<v1::AbortResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
    async fn mark_clean(
        &self,
        _: Request<v1::MarkCleanRequest>,
    ) -> Result<Response<v1::MarkCleanResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
    async fn list_dirty(
        &self,
        _: Request<v1::ListDirtyRequest>,
    ) -> Result<Response<v1::ListDirtyResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
}

/// Serves a pool of fake nodes named `a`, `b`, ... on loopback ports; they
/// stop with the test's runtime.
async fn start_pool(nodes: usize, offers_stream: bool) -> Vec<Arc<State>> {
    let mut pool = Vec::new();
    for i in 0..nodes {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address: SocketAddr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            id: char::from(b'a' + u8::try_from(i).unwrap()).to_string(),
            address: address.to_string(),
            offers_stream,
            ..State::default()
        });
        let service = CacheNodeServer::new(Fake(Arc::clone(&state)));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        pool.push(state);
    }
    let members: Vec<v1::Member> = pool
        .iter()
        .map(|node| v1::Member {
            id: node.id.clone(),
            address: node.address.clone(),
            weight: 1,
        })
        .collect();
    for node in &pool {
        *node.members.lock() = members.clone();
    }
    pool
}

/// One fake node.
async fn start(offers_stream: bool) -> Arc<State> {
    start_pool(1, offers_stream).await.remove(0)
}

async fn client(node: &State) -> Client {
    Client::connect(ClientConfig::new([node.address.clone()]))
        .await
        .unwrap()
}

#[tokio::test]
async fn concurrent_calls_to_a_node_share_batches() {
    let node = start(true).await;
    let client = client(&node).await;
    // One call first, so that the stream is open and the calls below are
    // queued while nothing else runs (this runtime has one thread: they are
    // all queued before the driver takes any).
    client.get("ks", "warm").await.unwrap();
    let calls = 500;
    let results = futures::future::join_all(
        (0..calls).map(|i| client.set("ks", format!("k{i}"), "v", SetOptions::new())),
    )
    .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let batches = node.batches.lock().clone();
    assert_eq!(batches[0], 1, "the first, idle call went alone");
    assert_eq!(batches.iter().sum::<usize>(), calls + 1, "{batches:?}");
    // At most 256 per batch; how many fewer depends on when the runtime
    // lets the driver run (tokio's cooperative budget makes a task yield
    // after 128 channel operations), so the bound is loose: ten commands a
    // batch on average, where unary calls would be one each.
    assert!(
        batches.len() - 1 <= calls / 10,
        "500 concurrent calls took {} batches: {batches:?}",
        batches.len() - 1
    );
    assert!(
        batches
            .iter()
            .all(|&n| n <= cache_client::config::DEFAULT_MAX_BATCH_COMMANDS),
        "{batches:?}"
    );
    assert_eq!(node.unary_calls.load(Ordering::SeqCst), 0);
    assert_eq!(node.streams_opened.load(Ordering::SeqCst), 1);
    let read = client.get("ks", "k499").await.unwrap().unwrap();
    assert_eq!(read.value, "v");
}

#[tokio::test]
async fn the_next_batch_fills_while_the_batches_in_flight_are_out() {
    let node = start(true).await;
    let client = client(&node).await;
    client.get("ks", "warm").await.unwrap();
    node.received.acquire().await.unwrap().forget();

    // Two batches go out and are not answered...
    node.hold.store(2, Ordering::SeqCst);
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.get("ks", "x").await }
    });
    node.received.acquire().await.unwrap().forget();
    let second = tokio::spawn({
        let client = client.clone();
        async move { client.get("ks", "y").await }
    });
    node.received.acquire().await.unwrap().forget();
    // ... so ten more calls, issued one by one with the driver free to run
    // between them (without the bound, each would go alone), wait together,
    let mut calls = Vec::new();
    for i in 0..10 {
        let client = client.clone();
        calls.push(tokio::spawn(async move {
            client
                .set("ks", format!("z{i}"), "v", SetOptions::new())
                .await
        }));
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
    }
    assert_eq!(node.batches.lock().len(), 3, "nothing more went out");
    // and go as one batch once a batch in flight is answered.
    node.released.add_permits(2);
    for call in calls {
        call.await.unwrap().unwrap();
    }
    assert!(first.await.unwrap().unwrap().is_none());
    assert!(second.await.unwrap().unwrap().is_none());
    assert_eq!(*node.batches.lock(), [1, 1, 1, 10]);
}

#[tokio::test]
async fn a_broken_stream_fails_its_commands_in_flight_which_follow_the_retry_rules() {
    let pool = start_pool(2, true).await;
    let client = Client::connect(ClientConfig::new([pool[0].address.clone()]))
        .await
        .unwrap();
    assert_eq!(client.topology().members.len(), 2);
    let owner_id = client.owners("ks", b"k").remove(0);
    let owner = pool.iter().find(|n| n.id == owner_id).unwrap();
    let other = pool.iter().find(|n| n.id != owner_id).unwrap();
    client
        .set("ks", "k", "before", SetOptions::new())
        .await
        .unwrap();
    assert_eq!(owner.streams_opened.load(Ordering::SeqCst), 1);

    // A read is idempotent: when the owner's stream breaks under it, it is
    // asked of the next node, as after any failure of the owner.
    *owner.break_next.lock() = Some(Status::internal("the connection broke"));
    let read = {
        let client = client.clone();
        tokio::spawn(async move { client.get("ks", "k").await })
    };
    owner.received_doomed.notified().await;
    owner.release.notify_one();
    let read = read.await.unwrap().unwrap();
    assert!(
        read.is_none(),
        "the other node, which never held the key, answered"
    );
    assert_eq!(other.batches.lock().len(), 1);

    // One failure does not mark the owner down: the next call goes to it,
    // on a new stream.
    let read = client.get("ks", "k").await.unwrap().unwrap();
    assert_eq!(read.value, "before");
    assert_eq!(owner.streams_opened.load(Ordering::SeqCst), 2);

    // A write under `IfAbsent` is sent once: it fails with the stream.
    *owner.break_next.lock() = Some(Status::internal("the connection broke"));
    let write = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .set("ks", "k", "v", SetOptions::new().if_absent())
                .await
        })
    };
    owner.received_doomed.notified().await;
    owner.release.notify_one();
    let error = write.await.unwrap().unwrap_err();
    assert!(
        matches!(error, Error::Unavailable { .. }),
        "a command lost with its stream fails as a call on a broken connection: {error:?}"
    );
    assert_eq!(
        other.entries.lock().len(),
        0,
        "the lost write was not sent anywhere else"
    );
}

#[tokio::test]
async fn a_node_without_the_stream_is_called_unary() {
    let node = start(false).await;
    let client = client(&node).await;
    for i in 0..20 {
        client
            .set("ks", format!("k{i}"), "v", SetOptions::new())
            .await
            .unwrap();
    }
    assert_eq!(
        client.get("ks", "k7").await.unwrap().unwrap().value,
        "v",
        "the reads and writes were served"
    );
    assert_eq!(node.unary_calls.load(Ordering::SeqCst), 21);
    assert!(node.batches.lock().is_empty());
}

#[tokio::test]
async fn a_refused_command_fails_alone() {
    let node = start(true).await;
    let client = client(&node).await;
    client.get("ks", "warm").await.unwrap();
    node.refused_keys.lock().push(b"secret".to_vec());
    let (refused, allowed) = tokio::join!(
        client.set("ks", "secret", "v", SetOptions::new()),
        client.set("ks", "public", "v", SetOptions::new()),
    );
    assert!(matches!(refused, Err(Error::Refused { .. })), "{refused:?}");
    assert!(allowed.unwrap().is_stored());
    assert_eq!(
        node.batches.lock()[1..],
        [2],
        "both commands went in one batch"
    );
}

#[tokio::test]
async fn a_command_too_large_to_share_a_batch_goes_unary() {
    let node = start(true).await;
    let client = client(&node).await;
    client.get("ks", "warm").await.unwrap();
    let large = vec![b'x'; 300 * 1024];
    client
        .set("ks", "large", large.clone(), SetOptions::new())
        .await
        .unwrap();
    assert_eq!(node.unary_calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        *node.batches.lock(),
        [1],
        "only the first read was streamed"
    );
    assert_eq!(
        client.get("ks", "large").await.unwrap().unwrap().value,
        large
    );
}

#[tokio::test]
async fn the_stream_can_be_turned_off() {
    let node = start(true).await;
    let client =
        Client::connect(ClientConfig::new([node.address.clone()]).with_command_stream(false))
            .await
            .unwrap();
    client.set("ks", "k", "v", SetOptions::new()).await.unwrap();
    assert!(client.get("ks", "k").await.unwrap().is_some());
    assert_eq!(node.unary_calls.load(Ordering::SeqCst), 2);
    assert_eq!(node.streams_opened.load(Ordering::SeqCst), 0);
}

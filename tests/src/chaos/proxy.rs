//! A fault-injecting TCP proxy for loopback chaos tests, without root.
//!
//! [`FaultProxy::start`] listens on a local port and forwards every
//! connection to a target (a cache node). A [`ProxyHandle`] (cheap to clone)
//! switches it at run time between the [`Fault`]s:
//!
//! - [`Fault::None`]: bytes pass through;
//! - [`Fault::Latency`]: each chunk is delivered a fixed delay after it
//!   arrived, per direction; chunks stay in order and are pipelined, so the
//!   delay does not cut throughput;
//! - [`Fault::Partition`]: existing connections are cut (reset, so both ends
//!   see an error at once) or hang (nothing crosses; held bytes flow again
//!   when the partition heals, as TCP retransmission would deliver them);
//!   new connections are refused (the listening socket is closed: connecting
//!   fails with `ECONNREFUSED`, like a dead process) or hang (the kernel
//!   completes the handshake, then nothing crosses until the partition heals:
//!   to gRPC, what a real partition looks like).
//! - [`Fault::Strand`]: the clients of existing connections are told the
//!   connection ended (their side is shut down at once), while the bytes
//!   they had sent that have not reached the target stay held, and reach it
//!   when the fault ends; new connections pass. After a hanging partition,
//!   this is a client that gave up a connection and opened a new one, while
//!   its last requests on the old one are still on their way (the kernel
//!   retransmitting an orphaned connection's segments after a partition, or
//!   a paused process's socket buffer).
//!
//! - [`Fault::HoldReplies`]: bytes to the target pass; bytes back to the
//!   client are held until the fault ends (a request the target carries
//!   out whose answer is lost: a Kafka broker appends a record, the
//!   producer never hears of it and times out).
//!
//! While refusing, the port stays reserved by a bound, non-listening socket
//! (`SO_REUSEPORT`), so that no other process takes it before the proxy
//! listens again.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// The largest chunk moved at once.
const CHUNK: usize = 16 * 1024;
/// Chunks read and not yet written, per direction: bounds the bytes a
/// delayed or hanging connection holds.
const IN_FLIGHT: usize = 64;
/// Pending connections the listening socket queues.
const BACKLOG: u32 = 1024;
/// Pause after a failed `accept` (out of descriptors), before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// Gap between the held chunks of a stranded connection when they are
/// delivered: segments retransmitted after a partition arrive one by one,
/// not as one read.
const STRAND_GAP: Duration = Duration::from_millis(200);

/// What happens to connections that exist when a partition starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Reset both ends at once.
    Cut,
    /// Nothing crosses until the partition heals; then held bytes flow.
    Hang,
}

/// What happens to connections made during a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewConnections {
    /// Connecting fails with "connection refused".
    Refuse,
    /// Connecting succeeds, then nothing crosses until the partition heals.
    Hang,
}

/// The fault a proxy injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Fault {
    /// Pass-through.
    #[default]
    None,
    /// Each chunk is delivered this long after it arrived.
    Latency {
        /// Client to target.
        to_target: Duration,
        /// Target to client.
        to_client: Duration,
    },
    /// Nothing crosses.
    Partition {
        /// What happens to existing connections.
        existing: Existing,
        /// What happens to new ones.
        new: NewConnections,
    },
    /// Existing connections are ended on the client's side; the bytes held
    /// towards the target reach it when the fault ends. New connections
    /// pass.
    Strand,
    /// Bytes to the target pass; bytes to the client are held until the
    /// fault ends, then flow.
    HoldReplies,
}

impl Fault {
    /// The same latency in both directions.
    pub fn latency(each_way: Duration) -> Fault {
        Fault::Latency {
            to_target: each_way,
            to_client: each_way,
        }
    }

    /// A partition that resets existing connections and refuses new ones:
    /// what a killed process looks like.
    pub fn refuse() -> Fault {
        Fault::Partition {
            existing: Existing::Cut,
            new: NewConnections::Refuse,
        }
    }

    /// A partition in which existing and new connections hang: what a
    /// network partition looks like.
    pub fn blackhole() -> Fault {
        Fault::Partition {
            existing: Existing::Hang,
            new: NewConnections::Hang,
        }
    }

    fn delay(&self, direction: Direction) -> Duration {
        match (self, direction) {
            (Fault::Latency { to_target, .. }, Direction::ToTarget) => *to_target,
            (Fault::Latency { to_client, .. }, Direction::ToClient) => *to_client,
            _ => Duration::ZERO,
        }
    }

    fn cuts(&self) -> bool {
        matches!(
            self,
            Fault::Partition {
                existing: Existing::Cut,
                ..
            }
        )
    }

    fn strands(&self) -> bool {
        matches!(self, Fault::Strand)
    }

    fn hangs_existing(&self) -> bool {
        matches!(
            self,
            Fault::Partition {
                existing: Existing::Hang,
                ..
            }
        )
    }

    fn refuses(&self) -> bool {
        matches!(
            self,
            Fault::Partition {
                new: NewConnections::Refuse,
                ..
            }
        )
    }

    fn holds_new(&self) -> bool {
        matches!(
            self,
            Fault::Partition {
                new: NewConnections::Hang,
                ..
            }
        )
    }
}

#[derive(Clone, Copy, Debug)]
enum Direction {
    ToTarget,
    ToClient,
}

/// What every task of a proxy watches.
#[derive(Clone, Copy, Debug, Default)]
struct State {
    fault: Fault,
    /// Bumped by every [`ProxyHandle::set`].
    generation: u64,
    /// Bumped by every `set` of a partition that cuts: a connection accepted
    /// under an older epoch is cut. A counter rather than the fault itself,
    /// so that a cut followed at once by a heal still cuts every connection
    /// that existed, even one whose task saw only the heal.
    cut_epoch: u64,
    /// Bumped by every `set` of [`Fault::Strand`]: a connection accepted
    /// under an older epoch is stranded.
    strand_epoch: u64,
}

/// Which [`State::generation`] the acceptor has put into effect.
#[derive(Clone, Debug, Default)]
struct Applied {
    generation: u64,
    /// Why listening again failed, if it did.
    error: Option<String>,
}

#[derive(Debug)]
struct Shared {
    state: watch::Sender<State>,
    applied: watch::Receiver<Applied>,
    addr: SocketAddr,
    target: SocketAddr,
    accepted: Arc<AtomicU64>,
    stranded_done: watch::Receiver<u64>,
}

/// Controls a [`FaultProxy`]; cheap to clone.
#[derive(Clone, Debug)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
}

impl ProxyHandle {
    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The address the proxy forwards to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// The fault in force.
    pub fn fault(&self) -> Fault {
        self.shared.state.borrow().fault
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Waits until `n` stranded connections have delivered their held bytes
    /// and the target has closed them (it has read everything).
    ///
    /// # Errors
    /// The proxy was dropped first.
    pub async fn stranded_delivered(&self, n: u64) -> Result<()> {
        let mut done = self.shared.stranded_done.clone();
        done.wait_for(|&d| d >= n)
            .await
            .map(|_| ())
            .map_err(|_| anyhow!("proxy {} has stopped", self.shared.addr))
    }

    /// Injects `fault`. Returns once the listening side is in its new state
    /// (after a refusal starts, connecting fails; after it ends, connecting
    /// succeeds); existing connections follow on their own tasks at once
    /// (cut, held or delayed from their next chunk on).
    ///
    /// # Errors
    /// The proxy was dropped, or it cannot listen on its port again.
    pub async fn set(&self, fault: Fault) -> Result<()> {
        let mut generation = 0;
        self.shared.state.send_modify(|state| {
            state.generation += 1;
            if fault.cuts() {
                state.cut_epoch += 1;
            }
            if fault.strands() {
                state.strand_epoch += 1;
            }
            state.fault = fault;
            generation = state.generation;
        });
        let mut applied = self.shared.applied.clone();
        let error = {
            // The guard `wait_for` returns is dropped at the end of this
            // block, before anything else is awaited.
            let done = applied
                .wait_for(|a| a.generation >= generation)
                .await
                .map_err(|_| anyhow!("proxy {} has stopped", self.shared.addr))?;
            done.error.clone()
        };
        if let Some(error) = error {
            bail!("proxy {} cannot listen again: {error}", self.shared.addr);
        }
        Ok(())
    }

    /// Ends any fault: pass-through again.
    ///
    /// # Errors
    /// As [`ProxyHandle::set`].
    pub async fn heal(&self) -> Result<()> {
        self.set(Fault::None).await
    }
}

/// A running proxy; dropping it stops it and resets its connections.
#[derive(Debug)]
pub struct FaultProxy {
    handle: ProxyHandle,
    task: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The acceptor owns the listener, the reserved port and every
        // connection task (a `JoinSet`, aborted when dropped).
        self.task.abort();
    }
}

impl FaultProxy {
    /// A pass-through proxy to `target` on a free loopback port.
    ///
    /// # Errors
    /// No port could be bound.
    pub async fn start(target: SocketAddr) -> Result<FaultProxy> {
        FaultProxy::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), target).await
    }

    /// A pass-through proxy to `target` listening on `listen` (port 0: any
    /// free port).
    ///
    /// # Errors
    /// `listen` cannot be bound.
    pub async fn start_on(listen: SocketAddr, target: SocketAddr) -> Result<FaultProxy> {
        let reserved = reusable_socket(listen)
            .and_then(|socket| socket.bind(listen).map(|()| socket))
            .with_context(|| format!("failed to bind the proxy's address {listen}"))?;
        let addr = reserved
            .local_addr()
            .context("failed to read the proxy's address")?;
        let listener =
            listen_on(addr).with_context(|| format!("failed to listen on the proxy's {addr}"))?;
        let (state_tx, state_rx) = watch::channel(State::default());
        let (applied_tx, applied_rx) = watch::channel(Applied::default());
        let accepted = Arc::new(AtomicU64::new(0));
        let (stranded_tx, stranded_rx) = watch::channel(0u64);
        let acceptor = Acceptor {
            stranded_done: Arc::new(stranded_tx),
            _reserved: reserved,
            listener: Some(listener),
            addr,
            target,
            state: state_rx,
            applied: applied_tx,
            accepted: Arc::clone(&accepted),
        };
        let task = tokio::spawn(acceptor.run());
        Ok(FaultProxy {
            handle: ProxyHandle {
                shared: Arc::new(Shared {
                    state: state_tx,
                    applied: applied_rx,
                    addr,
                    target,
                    accepted,
                    stranded_done: stranded_rx,
                }),
            },
            task,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.handle.addr()
    }

    /// A handle that controls this proxy.
    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }

    /// Injects `fault` (see [`ProxyHandle::set`]).
    ///
    /// # Errors
    /// As [`ProxyHandle::set`].
    pub async fn set(&self, fault: Fault) -> Result<()> {
        self.handle.set(fault).await
    }

    /// Ends any fault.
    ///
    /// # Errors
    /// As [`ProxyHandle::set`].
    pub async fn heal(&self) -> Result<()> {
        self.handle.heal().await
    }
}

/// A socket that can share its port with the proxy's other sockets: the
/// reserving one and each listening one.
fn reusable_socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    Ok(socket)
}

fn listen_on(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = reusable_socket(addr)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Accepts connections and opens or closes the listening socket as the
/// fault says.
struct Acceptor {
    /// Bound, never listening: holds the port while no listener does, and
    /// answers connections with a reset (refused) meanwhile.
    _reserved: TcpSocket,
    listener: Option<TcpListener>,
    addr: SocketAddr,
    target: SocketAddr,
    state: watch::Receiver<State>,
    applied: watch::Sender<Applied>,
    accepted: Arc<AtomicU64>,
    /// Stranded connections that delivered their held bytes and closed.
    stranded_done: Arc<watch::Sender<u64>>,
}

impl Acceptor {
    async fn run(mut self) {
        let mut connections = JoinSet::new();
        loop {
            let current = *self.state.borrow_and_update();
            let mut error = None;
            if current.fault.refuses() {
                // Closing the socket resets what is queued in its backlog and
                // refuses what comes next.
                self.listener = None;
            } else if self.listener.is_none() {
                match listen_on(self.addr) {
                    Ok(listener) => self.listener = Some(listener),
                    Err(e) => error = Some(e.to_string()),
                }
            }
            self.applied.send_replace(Applied {
                generation: current.generation,
                error,
            });
            tokio::select! {
                changed = self.state.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                accepted = accept(self.listener.as_ref()) => match accepted {
                    Ok(stream) => {
                        self.accepted.fetch_add(1, Ordering::Relaxed);
                        // The epoch under which it was accepted: a cut
                        // that raced the accept still cuts it.
                        connections.spawn(serve(
                            stream,
                            self.target,
                            self.state.clone(),
                            Epochs {
                                cut: current.cut_epoch,
                                strand: current.strand_epoch,
                            },
                            Arc::clone(&self.stranded_done),
                        ));
                    }
                    Err(_) => tokio::time::sleep(ACCEPT_BACKOFF).await,
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    }
}

async fn accept(listener: Option<&TcpListener>) -> io::Result<TcpStream> {
    match listener {
        Some(listener) => listener.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

/// Closes `stream` with a reset rather than a FIN, so that its peer sees an
/// error at once.
fn reset(stream: TcpStream) {
    // A zero linger never blocks the close (only a non-zero one does).
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// The epochs a connection was accepted under.
#[derive(Clone, Copy, Debug)]
struct Epochs {
    cut: u64,
    strand: u64,
}

impl Epochs {
    fn stranded(self, state: &State) -> bool {
        state.strand_epoch > self.strand
    }
}

/// One client connection, from accept to close.
async fn serve(
    client: TcpStream,
    target: SocketAddr,
    mut state: watch::Receiver<State>,
    epochs: Epochs,
    stranded_done: Arc<watch::Sender<u64>>,
) {
    // A connection made during a hang waits, without reaching the target,
    // until the partition heals.
    loop {
        let current = *state.borrow_and_update();
        if current.cut_epoch > epochs.cut || current.fault.refuses() {
            return reset(client);
        }
        if !current.fault.holds_new() {
            break;
        }
        if state.changed().await.is_err() {
            return reset(client);
        }
    }
    match TcpStream::connect(target).await {
        Ok(upstream) => {
            forward(client, upstream, state.clone(), epochs).await;
            if epochs.stranded(&state.borrow()) {
                stranded_done.send_modify(|done| *done += 1);
            }
        }
        // The target is down: so is the connection.
        Err(_) => reset(client),
    }
}

async fn forward(
    client: TcpStream,
    mut upstream: TcpStream,
    state: watch::Receiver<State>,
    epochs: Epochs,
) {
    // A second descriptor of the client's socket, to shut it down while
    // the pipes borrow it (a strand).
    let Ok((mut client, control)) = client
        .into_std()
        .and_then(|std| Ok((std.try_clone()?, std)))
        .and_then(|(std, control)| Ok((TcpStream::from_std(std)?, control)))
    else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let clean = {
        let (client_read, client_write) = client.split();
        let (target_read, target_write) = upstream.split();
        tokio::select! {
            piped = async {
                let pipes = async {
                    tokio::try_join!(
                        pipe(client_read, target_write, state.clone(), Direction::ToTarget, epochs),
                        pipe(target_read, client_write, state.clone(), Direction::ToClient, epochs),
                    )
                };
                tokio::pin!(pipes);
                tokio::select! {
                    piped = &mut pipes => piped,
                    // Stranded: the pipes go on, delivering the held bytes
                    // when the strand ends.
                    () = strand(state.clone(), epochs, &control) => pipes.await,
                }
            } => piped.is_ok(),
            () = cut(state.clone(), epochs.cut) => false,
        }
    };
    if !clean {
        // An error on one side, or a cut: the other side must not wait for
        // bytes that will never come.
        reset(client);
        reset(upstream);
    }
}

/// Resolves when connections accepted under `epoch` are to be cut.
async fn cut(mut state: watch::Receiver<State>, epoch: u64) {
    loop {
        let cut = state.borrow_and_update().cut_epoch > epoch;
        if cut {
            return;
        }
        if state.changed().await.is_err() {
            // The proxy is gone; its task set aborts this task.
            return std::future::pending().await;
        }
    }
}

/// When the connection is stranded, shuts the client's side down (it reads
/// the end of the stream, and what it sends is dropped); bytes already read
/// from it stay held by the pipe towards the target.
async fn strand(mut state: watch::Receiver<State>, epochs: Epochs, client: &std::net::TcpStream) {
    loop {
        if epochs.stranded(&state.borrow_and_update()) {
            // Already shut down, or reset by the client: either way ended.
            let _ = client.shutdown(std::net::Shutdown::Both);
            return;
        }
        if state.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Resolves when bytes may cross in `direction`: at once unless existing
/// connections hang, this one is stranded and the strand lasts, or replies
/// are held and these bytes go to the client.
async fn flowing(state: &mut watch::Receiver<State>, epochs: Epochs, direction: Direction) {
    loop {
        let hang = {
            let current = state.borrow_and_update();
            current.fault.hangs_existing()
                || (current.fault.strands() && epochs.stranded(&current))
                || (current.fault == Fault::HoldReplies && matches!(direction, Direction::ToClient))
        };
        if !hang {
            return;
        }
        if state.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Moves bytes one way until `from` ends (then half-closes `to`) or either
/// side fails. Reading and writing are decoupled by a bounded queue of
/// timestamped chunks, so that a delay is added to each chunk rather than
/// between chunks.
async fn pipe<R, W>(
    mut from: R,
    mut to: W,
    state: watch::Receiver<State>,
    direction: Direction,
    epochs: Epochs,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (queue, mut queued) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let mut write_state = state.clone();
    let reading = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                // Dropping the queue lets the writer finish and half-close.
                return Ok(());
            }
            let due = Instant::now() + state.borrow().fault.delay(direction);
            if queue.send((due, buf[..n].to_vec())).await.is_err() {
                // The writer stopped; it reports why.
                return Ok(());
            }
        }
    };
    let writing = async move {
        // The client of a stranded connection is gone: what the target
        // answers is dropped.
        let client_gone = |state: &watch::Receiver<State>| {
            matches!(direction, Direction::ToClient) && epochs.stranded(&state.borrow())
        };
        while let Some((due, chunk)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            flowing(&mut write_state, epochs, direction).await;
            if !client_gone(&write_state) {
                to.write_all(&chunk).await?;
                if epochs.stranded(&write_state.borrow()) {
                    // Held through a strand: the next chunk comes as a
                    // separate arrival.
                    tokio::time::sleep(STRAND_GAP).await;
                }
            }
        }
        flowing(&mut write_state, epochs, direction).await;
        if client_gone(&write_state) {
            return Ok(());
        }
        to.shutdown().await
    };
    tokio::try_join!(reading, writing).map(|((), ())| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards every wait that must end, so that a broken proxy fails the
    /// test instead of hanging it. Not a timing assertion: on a working
    /// proxy these waits take milliseconds.
    const HANG_GUARD: Duration = Duration::from_secs(60);
    /// How long a test watches for bytes that must not arrive. Passing does
    /// not depend on it: through a partition they never arrive.
    const WATCH_FOR: Duration = Duration::from_millis(300);

    async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
        match tokio::time::timeout(HANG_GUARD, future).await {
            Ok(value) => value,
            Err(_) => panic!("{what} did not finish within {HANG_GUARD:?}"),
        }
    }

    /// A server that echoes every connection and half-closes after its
    /// client did.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the echo server");
        let addr = listener.local_addr().expect("the echo server's address");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.into_split();
                    if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                        let _ = write.shutdown().await;
                    }
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> Vec<u8> {
        stream.write_all(message).await.expect("write to the proxy");
        let mut back = vec![0; message.len()];
        within("the echo", stream.read_exact(&mut back))
            .await
            .expect("read the echo");
        back
    }

    /// Whether `stream` ended (error or end of stream) rather than returning
    /// bytes.
    async fn ended(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 16];
        matches!(
            within("the end of the connection", stream.read(&mut buf)).await,
            Ok(0) | Err(_)
        )
    }

    async fn nothing_arrives(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 16];
        tokio::time::timeout(WATCH_FOR, stream.read(&mut buf))
            .await
            .is_err()
    }

    #[tokio::test]
    async fn bytes_pass_through_both_ways_and_a_half_close_follows() {
        let proxy = FaultProxy::start(echo_server().await)
            .await
            .expect("start the proxy");
        let mut stream = TcpStream::connect(proxy.addr())
            .await
            .expect("connect to the proxy");
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (mut read, mut write) = stream.split();
        let send = async {
            write.write_all(&payload).await?;
            write.shutdown().await
        };
        let receive = async {
            let mut got = Vec::new();
            read.read_to_end(&mut got).await.map(|_| got)
        };
        let (sent, got) = within("the transfer", async { tokio::join!(send, receive) }).await;
        sent.expect("send through the proxy");
        assert!(got.expect("receive through the proxy") == payload);
        assert_eq!(proxy.handle().accepted(), 1);
        assert_eq!(proxy.handle().fault(), Fault::None);
    }

    #[tokio::test]
    async fn latency_is_added_each_way() {
        let proxy = FaultProxy::start(echo_server().await)
            .await
            .expect("start the proxy");
        let mut stream = TcpStream::connect(proxy.addr())
            .await
            .expect("connect to the proxy");
        assert_eq!(round_trip(&mut stream, b"warm").await, b"warm");

        let delay = Duration::from_millis(100);
        proxy.set(Fault::latency(delay)).await.expect("add latency");
        let started = Instant::now();
        assert_eq!(round_trip(&mut stream, b"ping").await, b"ping");
        let took = started.elapsed();
        assert!(took >= 2 * delay, "a round trip took {took:?}");

        // One direction only.
        proxy
            .set(Fault::Latency {
                to_target: Duration::ZERO,
                to_client: delay,
            })
            .await
            .expect("add latency towards the client");
        let started = Instant::now();
        assert_eq!(round_trip(&mut stream, b"pong").await, b"pong");
        let took = started.elapsed();
        assert!(took >= delay, "a round trip took {took:?}");

        // A new connection is delayed too.
        let mut fresh = TcpStream::connect(proxy.addr())
            .await
            .expect("connect to the proxy");
        let started = Instant::now();
        assert_eq!(round_trip(&mut fresh, b"new").await, b"new");
        assert!(started.elapsed() >= delay);
    }

    #[tokio::test]
    async fn a_refusing_partition_cuts_and_refuses_until_healed() {
        let proxy = FaultProxy::start(echo_server().await)
            .await
            .expect("start the proxy");
        let mut before = TcpStream::connect(proxy.addr())
            .await
            .expect("connect to the proxy");
        assert_eq!(round_trip(&mut before, b"a").await, b"a");

        proxy.set(Fault::refuse()).await.expect("partition");
        assert!(ended(&mut before).await, "an existing connection is cut");
        let refused = TcpStream::connect(proxy.addr())
            .await
            .expect_err("a new connection is refused");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);

        proxy.heal().await.expect("heal");
        let mut after = TcpStream::connect(proxy.addr())
            .await
            .expect("connect after healing");
        assert_eq!(round_trip(&mut after, b"b").await, b"b");
    }

    #[tokio::test]
    async fn a_blackhole_holds_bytes_until_healed() {
        let proxy = FaultProxy::start(echo_server().await)
            .await
            .expect("start the proxy");
        let mut before = TcpStream::connect(proxy.addr())
            .await
            .expect("connect to the proxy");
        assert_eq!(round_trip(&mut before, b"a").await, b"a");

        proxy.set(Fault::blackhole()).await.expect("partition");
        before
            .write_all(b"held")
            .await
            .expect("write into the hole");
        // The kernel completes the handshake; nothing crosses afterwards.
        let mut during = TcpStream::connect(proxy.addr())
            .await
            .expect("connecting to a blackhole succeeds");
        during.write_all(b"new").await.expect("write into the hole");
        assert!(
            nothing_arrives(&mut before).await,
            "an existing connection hangs"
        );
        assert!(nothing_arrives(&mut during).await, "a new connection hangs");

        proxy.heal().await.expect("heal");
        let mut back = [0u8; 4];
        within("the held bytes", before.read_exact(&mut back))
            .await
            .expect("held bytes arrive after healing");
        assert_eq!(&back, b"held");
        let mut back = [0u8; 3];
        within("the new connection's bytes", during.read_exact(&mut back))
            .await
            .expect("a held connection reaches the target after healing");
        assert_eq!(&back, b"new");
    }

    #[tokio::test]
    async fn partition_modes_combine() {
        let proxy = FaultProxy::start(echo_server().await)
            .await
            .expect("start the proxy");
        let mut before = TcpStream::connect(proxy.addr())
            .await
            .expect("connect to the proxy");
        assert_eq!(round_trip(&mut before, b"a").await, b"a");

        // Existing connections hang, new ones are refused.
        proxy
            .set(Fault::Partition {
                existing: Existing::Hang,
                new: NewConnections::Refuse,
            })
            .await
            .expect("partition");
        before.write_all(b"x").await.expect("write into the hole");
        assert!(nothing_arrives(&mut before).await);
        let refused = TcpStream::connect(proxy.addr())
            .await
            .expect_err("a new connection is refused");
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);

        // Existing connections are cut, new ones hang.
        proxy
            .set(Fault::Partition {
                existing: Existing::Cut,
                new: NewConnections::Hang,
            })
            .await
            .expect("partition");
        assert!(ended(&mut before).await, "an existing connection is cut");
        let mut during = TcpStream::connect(proxy.addr())
            .await
            .expect("connecting succeeds");
        during.write_all(b"y").await.expect("write into the hole");
        assert!(nothing_arrives(&mut during).await);

        proxy.heal().await.expect("heal");
        let mut back = [0u8; 1];
        within("the held bytes", during.read_exact(&mut back))
            .await
            .expect("a held connection goes through after healing");
        assert_eq!(&back, b"y");
    }

    /// A server that reads each connection to its end and reports what it
    /// received.
    async fn recording_server() -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the recording server");
        let addr = listener.local_addr().expect("the server's address");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let _ = stream.read_to_end(&mut got).await;
                    let _ = tx.send(got);
                });
            }
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn a_strand_ends_the_client_side_and_delivers_held_bytes_later() {
        let (target, mut received) = recording_server().await;
        let proxy = FaultProxy::start(target).await.expect("start the proxy");
        let mut before = TcpStream::connect(proxy.addr())
            .await
            .expect("connect to the proxy");
        before.write_all(b"early-").await.expect("write");

        proxy.set(Fault::blackhole()).await.expect("partition");
        before
            .write_all(b"held")
            .await
            .expect("write into the hole");
        proxy.set(Fault::Strand).await.expect("strand");
        assert!(ended(&mut before).await, "the client's side has ended");
        // A new connection passes, while the old one's bytes are held.
        let mut fresh = TcpStream::connect(proxy.addr())
            .await
            .expect("a new connection is accepted");
        fresh.write_all(b"fresh").await.expect("write");
        fresh.shutdown().await.expect("half-close");
        let got = within("the new connection's bytes", received.recv())
            .await
            .expect("the target reports");
        assert_eq!(got, b"fresh");
        drop(before);

        proxy.heal().await.expect("heal");
        let got = within("the held bytes", received.recv())
            .await
            .expect("the target reports");
        assert_eq!(got, b"early-held", "held bytes arrive after the strand");
    }

    #[tokio::test]
    async fn a_dead_target_resets_the_client() {
        // Bound and never listening: connecting to it is refused, and no
        // one else can take the port meanwhile.
        let dead = reusable_socket(SocketAddr::from(([127, 0, 0, 1], 0))).expect("a socket");
        dead.bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind the dead target");
        let target = dead.local_addr().expect("its address");
        let proxy = FaultProxy::start(target).await.expect("start the proxy");
        let mut stream = TcpStream::connect(proxy.addr())
            .await
            .expect("the proxy accepts");
        let _ = stream.write_all(b"hello").await;
        assert!(ended(&mut stream).await);
    }

    #[tokio::test]
    async fn a_handle_outliving_its_proxy_reports_it() {
        let proxy = FaultProxy::start(echo_server().await)
            .await
            .expect("start the proxy");
        let handle = proxy.handle();
        drop(proxy);
        let error = handle
            .set(Fault::blackhole())
            .await
            .expect_err("the proxy is gone");
        assert!(error.to_string().contains("has stopped"), "{error}");
    }
}

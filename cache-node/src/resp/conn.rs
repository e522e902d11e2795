//! The RESP listener: accepts connections and runs one task per connection.
//!
//! A connection reads into a `BytesMut`, takes every whole request the
//! buffer holds, runs each against the store (synchronously: store calls
//! take no lock across an await), appends the replies to one output buffer,
//! and writes that buffer once the batch is done. Pipelined requests are
//! therefore answered in order, with one write per read rather than per
//! request.

use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::resp::command::{After, Context, Session, execute};
use crate::resp::parse::{ParseLimits, parse};
use crate::resp::reply::Reply;
use crate::tls::{Protocol, ServerTls};

/// Longest inline command line, as Redis's `PROTO_INLINE_MAX_SIZE`.
pub const MAX_INLINE_BYTES: usize = 64 * 1024;

/// Replies buffered beyond this are written before the batch ends, so that
/// a long pipeline of large values does not pile up in memory.
const FLUSH_AT_BYTES: usize = 1024 * 1024;

/// Spare room kept in the read buffer before each read: large values then
/// arrive in few reads.
const READ_RESERVE: usize = 16 * 1024;

/// How long, and how many bytes, a connection closed for a protocol error
/// keeps reading (and discarding) what the client still sends.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
const LINGER_BYTES: usize = 1024 * 1024;

/// Accepts connections until `stop` is cancelled, then lets every
/// connection finish the batch it is running (idle ones close at once) and
/// returns when all have closed. With `tls`, each connection first
/// completes a TLS handshake (in its own task).
///
/// # Errors
/// [`Error::Server`] when accepting fails for a reason other than a
/// connection aborted before it was accepted.
pub async fn serve(
    listener: TcpListener,
    context: Arc<Context>,
    limits: ParseLimits,
    tls: Option<Arc<ServerTls>>,
    stop: CancellationToken,
) -> Result<(), Error> {
    let mut connections = JoinSet::new();
    let result = loop {
        // Reap finished connections so that the set does not grow.
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            () = stop.cancelled() => break Ok(()),
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let context = Arc::clone(&context);
                let stop = stop.clone();
                // The configuration current at accept (a reload reaches
                // the next connection).
                let tls = tls.as_ref().map(|tls| tls.acceptor(Protocol::Resp));
                connections.spawn(async move {
                    let session = Session::new(&context, Some(peer.ip()));
                    let result = match (stream.set_nodelay(true), tls) {
                        (Err(error), _) => Err(error),
                        (Ok(()), None) => {
                            connection(stream, &context, session, &limits, &stop).await
                        }
                        (Ok(()), Some(tls)) => match crate::tls::handshake(&tls, stream).await {
                            Ok(stream) => {
                                connection(stream, &context, session, &limits, &stop).await
                            }
                            Err(error) => {
                                context.metrics.count_refused("resp", "tls_handshake");
                                Err(error)
                            }
                        },
                    };
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "resp connection ended with an error");
                    }
                });
            }
            // Per-connection failures (the peer reset before accept, or the
            // process ran out of descriptors for a moment) do not end the
            // listener.
            Err(error) if is_transient(&error) => {
                tracing::warn!(%error, "resp accept failed; continuing");
            }
            Err(error) => break Err(Error::Server(format!("resp accept failed: {error}"))),
        }
    };
    // Stop accepting before draining: the listener closes here.
    drop(listener);
    while connections.join_next().await.is_some() {}
    result
}

fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    ) || error
        .raw_os_error()
        .is_some_and(|code| code == 23 || code == 24) // ENFILE, EMFILE
}

async fn connection(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    context: &Context,
    mut session: Session,
    limits: &ParseLimits,
    stop: &CancellationToken,
) -> io::Result<()> {
    let mut input = BytesMut::with_capacity(READ_RESERVE);
    let mut output = BytesMut::new();
    loop {
        // Answer every whole request already buffered.
        loop {
            match parse(&mut input, limits) {
                Ok(Some(request)) => {
                    let Some((reply, after)) = execute(context, &mut session, request) else {
                        continue;
                    };
                    reply.encode(&mut output);
                    if after == After::Close {
                        stream.write_all(&output).await?;
                        return Ok(());
                    }
                    if output.len() >= FLUSH_AT_BYTES {
                        stream.write_all(&output).await?;
                        output.clear();
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    // As Redis: the error, then close, because the rest of
                    // the stream cannot be told apart from the bad frame.
                    context.metrics.count_resp_error("protocol");
                    Reply::err(&error).encode(&mut output);
                    stream.write_all(&output).await?;
                    return linger_close(stream).await;
                }
            }
        }
        if !output.is_empty() {
            stream.write_all(&output).await?;
            output.clear();
        }
        if stop.is_cancelled() {
            return Ok(());
        }
        if input.capacity() - input.len() < READ_RESERVE / 4 {
            input.reserve(READ_RESERVE);
        }
        let read = tokio::select! {
            // Shutdown closes idle connections; a partial request in the
            // buffer is dropped, as a closed connection would drop it.
            () = stop.cancelled() => return Ok(()),
            read = stream.read_buf(&mut input) => read?,
        };
        if read == 0 {
            return Ok(());
        }
    }
}

/// Closes after a protocol error without losing the error reply: closing a
/// socket with unread input makes the kernel send a reset, which may
/// discard the reply before the client reads it. So: send FIN after the
/// reply, then discard input until the client closes too, for at most
/// [`LINGER`] and [`LINGER_BYTES`].
async fn linger_close(mut stream: impl AsyncRead + AsyncWrite + Unpin) -> io::Result<()> {
    stream.shutdown().await?;
    let drain = async {
        let mut sink = vec![0; 16 * 1024];
        let mut discarded = 0;
        while discarded < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
    Ok(())
}

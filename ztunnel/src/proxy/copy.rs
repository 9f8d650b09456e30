//! Moving bytes between an app socket and its tunnel, with correct half-close.
//!
//! Both directions run inside the connection's own task (joined futures, no extra task and no
//! channel), reading the app in chunks of up to 256 KiB that become HTTP/2 DATA frames; a chunk of
//! 16 KiB or more goes without another copy, a smaller one is copied once out of the worker
//! thread's read buffer (see [`read_chunk`]). The client side starts sending as soon as its CONNECT
//! is out, without waiting for the peer's 200 (HTTP/2 allows DATA right after a stream's HEADERS):
//! a client that speaks first saves a round trip per connection, and a refusal simply discards
//! those bytes. End of stream is carried both ways: app FIN → `END_STREAM`, `END_STREAM` → FIN to
//! the app. An error on either side aborts both: a reset tunnel resets the app connection and a
//! failed app socket resets the stream.

use std::future::poll_fn;
use std::io;
use std::pin::{Pin, pin};
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::ReadHalf;

use super::socket;

/// Bytes read from the app per DATA frame, at most. Large reads mean few syscalls and few
/// frames; h2 splits them further only if the peer's max frame size is smaller.
pub const READ_CHUNK: usize = 256 * 1024;

/// Byte counts of one finished connection, from the local app's point of view.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// App → peer.
    pub sent: u64,
    /// Peer → app.
    pub received: u64,
}

/// Why a copy stopped early.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("reading from the app")]
    AppRead(#[source] io::Error),
    #[error("writing to the app")]
    AppWrite(#[source] io::Error),
    #[error("tunnel stream")]
    Stream(#[source] h2::Error),
    #[error("tunnel stream closed by the peer")]
    StreamGone,
    #[error("HBONE peer answered {0}")]
    Refused(http::StatusCode),
    #[error("upstream")]
    Upstream(#[source] io::Error),
    /// The caller's stop signal fired: a policy change revoked the connection, or it was
    /// still open at the drain deadline.
    #[error("stopped (revoked, or cut at the drain deadline)")]
    Stopped,
}

/// The receiving half of an HBONE stream: already open (server side) or still waiting for
/// the peer's answer to our CONNECT (client side).
#[derive(Debug)]
pub enum Incoming {
    Open(RecvStream),
    Pending(h2::client::ResponseFuture),
}

impl Incoming {
    /// The stream, once the peer answered 200.
    pub async fn open(self) -> Result<RecvStream, CopyError> {
        match self {
            Incoming::Open(recv) => Ok(recv),
            Incoming::Pending(response) => {
                let response = response.await.map_err(CopyError::Stream)?;
                if response.status() != http::StatusCode::OK {
                    return Err(CopyError::Refused(response.status()));
                }
                Ok(response.into_body())
            }
        }
    }
}

/// Copies between `app` and an HBONE stream until both directions end, or until `stop`
/// resolves (then both sides are reset and the result is [`CopyError::Stopped`]).
pub async fn hbone(
    app: TcpStream,
    mut send: SendStream<Bytes>,
    incoming: Incoming,
    stop: impl Future<Output = ()>,
) -> (Transferred, Result<(), CopyError>) {
    let mut app = app;
    let mut sent = 0u64;
    let mut received = 0u64;
    let result = {
        let (mut rd, mut wr) = app.split();
        // Pinned where they are built: moved into a callee, each future would take its room
        // in the connection's task twice, for as long as the connection lives.
        let up = pin!(app_to_stream(&mut rd, &mut send, &mut sent));
        let down = pin!(async {
            let mut recv = incoming.open().await?;
            stream_to_app(&mut recv, &mut wr, &mut received).await
        });
        let both = pin!(join_explained(up, down));
        let stop = pin!(stop);
        tokio::select! {
            r = both => r,
            () = stop => Err(CopyError::Stopped),
        }
    };
    let transferred = Transferred { sent, received };
    match &result {
        Ok(()) => {}
        Err(CopyError::AppRead(_) | CopyError::AppWrite(_)) => {
            send.send_reset(h2::Reason::CANCEL);
        }
        Err(_) => {
            send.send_reset(h2::Reason::CANCEL);
            socket::reset(app);
        }
    }
    (transferred, result)
}

/// How long the receiving half may take to explain a stream the peer closed under the
/// sending half.
const EXPLAIN_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs both directions; the first error ends both, except that when the peer closes the
/// stream under the sending half, the receiving half gets a moment to say why: a refusal
/// sent with the stream's end (the server's 401 to early data) is the real cause, not the
/// closed stream.
async fn join_explained(
    mut up: Pin<&mut impl Future<Output = Result<(), CopyError>>>,
    mut down: Pin<&mut impl Future<Output = Result<(), CopyError>>>,
) -> Result<(), CopyError> {
    let mut up_done: Option<Result<(), CopyError>> = None;
    let mut down_done = false;
    // Only set while explaining (rare): a timer in every connection's task would cost memory.
    let mut deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        tokio::select! {
            r = up.as_mut(), if up_done.is_none() => match r {
                Err(e @ (CopyError::Stream(_) | CopyError::StreamGone)) if !down_done => {
                    up_done = Some(Err(e));
                    deadline = Some(Box::pin(tokio::time::sleep(EXPLAIN_WINDOW)));
                }
                Err(e) => return Err(e),
                Ok(()) => up_done = Some(Ok(())),
            },
            r = down.as_mut(), if !down_done => {
                r?;
                down_done = true;
            }
            () = poll_fn(|cx| match deadline.as_mut() {
                Some(d) => d.as_mut().poll(cx),
                None => Poll::Pending,
            }), if deadline.is_some() => {
                return up_done.unwrap_or(Ok(()));
            }
        }
        if down_done && let Some(up) = up_done.take() {
            return up;
        }
    }
}

async fn app_to_stream(
    app: &mut ReadHalf<'_>,
    send: &mut SendStream<Bytes>,
    count: &mut u64,
) -> Result<(), CopyError> {
    let mut first = true;
    loop {
        // Hold no buffer while waiting: an idle connection costs none (256 KiB each way would
        // be most of what an idle tunnel costs).
        app.as_ref().readable().await.map_err(CopyError::AppRead)?;
        // One read, never a wait with the buffer held. Through `poll_read`, a read shorter
        // than the buffer (the socket drained) also clears tokio's readiness, so the next
        // `readable` waits for epoll instead of costing a read that finds nothing.
        let read = poll_fn(|cx| Poll::Ready(read_chunk(Pin::new(&mut *app), cx))).await;
        let mut data = match read {
            Some(Ok(data)) => data,
            None => continue,
            Some(Err(e)) => return Err(CopyError::AppRead(e)),
        };
        super::spin::activity();
        if data.is_empty() {
            send.send_data(Bytes::new(), true)
                .map_err(CopyError::Stream)?;
            return Ok(());
        }
        *count += data.len() as u64;
        if std::mem::take(&mut first) {
            // The first chunk is queued at once (h2 holds it until the window allows, at most
            // one chunk): waiting for capacity would let the CONNECT go out alone, and the
            // peer would wake for it and again for the first bytes behind it.
            send.send_data(data, false).map_err(CopyError::Stream)?;
            continue;
        }
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(CopyError::Stream(e)),
                None => return Err(CopyError::StreamGone),
            };
            if granted == 0 {
                continue;
            }
            let chunk = data.split_to(granted.min(data.len()));
            send.send_data(chunk, false).map_err(CopyError::Stream)?;
        }
    }
}

thread_local! {
    /// The worker thread's buffer for app reads, lent to one read at a time.
    static READ_BUF: std::cell::Cell<Option<BytesMut>> = const { std::cell::Cell::new(None) };
}

/// Reads shorter than this are copied out into a `Bytes` of their own size, and the thread's
/// buffer serves the next read: small messages cost no 256 KiB allocation each (nor a large
/// buffer kept alive by a few bytes queued in HTTP/2). Longer reads take the buffer with them
/// as their `Bytes`, without a copy, and the next read gets a fresh one.
const COPY_BELOW: usize = 16 * 1024;

/// One read of at most [`READ_CHUNK`] bytes from `app` (empty at end of stream), or `None`
/// when nothing is ready.
fn read_chunk(
    app: Pin<&mut ReadHalf<'_>>,
    cx: &mut std::task::Context<'_>,
) -> Option<io::Result<Bytes>> {
    let mut buf = READ_BUF
        .take()
        .unwrap_or_else(|| BytesMut::with_capacity(READ_CHUNK));
    let read = match tokio_util::io::poll_read_buf(app, cx, &mut buf) {
        Poll::Ready(Ok(n)) if n >= COPY_BELOW => return Some(Ok(buf.freeze())),
        Poll::Ready(Ok(_)) => Some(Ok(Bytes::copy_from_slice(&buf))),
        Poll::Ready(Err(e)) => Some(Err(e)),
        Poll::Pending => None,
    };
    buf.clear();
    READ_BUF.set(Some(buf));
    read
}

async fn stream_to_app<W: AsyncWrite + Unpin>(
    recv: &mut RecvStream,
    app: &mut W,
    count: &mut u64,
) -> Result<(), CopyError> {
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(CopyError::Stream)?;
        super::spin::activity();
        let n = chunk.len();
        app.write_all(&chunk).await.map_err(CopyError::AppWrite)?;
        *count += n as u64;
        // Give the window back only once the app has taken the bytes: backpressure reaches
        // the sender instead of piling up here.
        let _ = recv.flow_control().release_capacity(n);
    }
    app.shutdown().await.map_err(CopyError::AppWrite)?;
    Ok(())
}

/// Copies between two TCP sockets until both directions end, resetting both on error or
/// when `stop` resolves ([`CopyError::Stopped`]).
pub async fn tcp(
    app: TcpStream,
    mut upstream: TcpStream,
    stop: impl Future<Output = ()>,
) -> (Transferred, Result<(), CopyError>) {
    const BUF: usize = 64 * 1024;
    let mut app = Counted {
        inner: app,
        read: 0,
        written: 0,
    };
    let result = tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut app, &mut upstream, BUF, BUF) => {
            r.map(|_| ()).map_err(CopyError::Upstream)
        }
        () = stop => Err(CopyError::Stopped),
    };
    let transferred = Transferred {
        sent: app.read,
        received: app.written,
    };
    if result.is_err() {
        socket::reset(app.inner);
        socket::reset(upstream);
    }
    (transferred, result)
}

/// A socket that counts what passes through it, so byte counts survive an aborted copy.
struct Counted {
    inner: TcpStream,
    read: u64,
    written: u64,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        poll
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.written += n as u64;
        }
        poll
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A connected loopback pair: (the app's end, ztunnel's end).
    async fn app_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap());
        let (app, accepted) = tokio::join!(app, listener.accept());
        (app.unwrap(), accepted.unwrap().0)
    }

    /// One `read_chunk` once the socket is readable, and what the thread's buffer then is.
    async fn read_once(rd: &mut ReadHalf<'_>) -> (Bytes, Option<usize>) {
        rd.as_ref().readable().await.unwrap();
        let data = poll_fn(|cx| Poll::Ready(read_chunk(Pin::new(&mut *rd), cx)))
            .await
            .expect("readable")
            .unwrap();
        let lent = READ_BUF.take();
        let kept = lent.as_ref().map(BytesMut::capacity);
        READ_BUF.set(lent);
        (data, kept)
    }

    #[tokio::test]
    async fn small_reads_are_copied_out_and_large_ones_take_the_buffer() {
        let (mut app, mut ours) = app_pair().await;
        let (mut rd, _wr) = ours.split();
        READ_BUF.set(None);

        app.write_all(b"hello").await.unwrap();
        let (data, kept) = read_once(&mut rd).await;
        assert_eq!(&data[..], b"hello");
        assert_eq!(
            kept,
            Some(READ_CHUNK),
            "a small read leaves the buffer for the next"
        );

        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        app.write_all(&big).await.unwrap();
        let mut got = Vec::new();
        let mut took = false;
        while got.len() < big.len() {
            let (data, kept) = read_once(&mut rd).await;
            took |= data.len() >= COPY_BELOW && kept.is_none();
            assert!(data.len() >= COPY_BELOW || kept == Some(READ_CHUNK));
            got.extend_from_slice(&data);
        }
        assert_eq!(got, big);
        assert!(
            took,
            "no read of {COPY_BELOW} bytes or more took the buffer"
        );

        app.shutdown().await.unwrap();
        let (data, kept) = read_once(&mut rd).await;
        assert!(data.is_empty(), "end of stream");
        assert_eq!(kept, Some(READ_CHUNK));
    }

    #[tokio::test]
    async fn the_first_bytes_are_queued_without_a_window_and_flow_once_it_opens() {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let (sender, client_conn) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(client_conn);
        // The peer grants no stream window at first: nothing may be sent until it does.
        let server = tokio::spawn(async move {
            let mut conn = h2::server::Builder::new()
                .initial_window_size(0)
                .handshake::<_, Bytes>(server_io)
                .await
                .unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let mut send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            send.send_data(Bytes::from_static(b"pong"), true).unwrap();
            let mut body = req.into_body();
            // The connection is driven (polled) throughout: DATA sent into the closed window
            // would show up here (and be a flow-control error).
            let early = tokio::time::timeout(std::time::Duration::from_millis(100), body.data());
            tokio::select! {
                r = early => assert!(r.is_err(), "DATA sent into a closed window"),
                _ = poll_fn(|cx| conn.poll_closed(cx)) => panic!("connection closed"),
            }
            conn.set_initial_window_size(1 << 20).unwrap();
            tokio::spawn(async move { poll_fn(|cx| conn.poll_closed(cx)).await });
            let mut got = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                got.extend_from_slice(&chunk);
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            got
        });
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("198.18.0.1:80")
            .body(())
            .unwrap();
        let (response, send) = sender
            .ready()
            .await
            .unwrap()
            .send_request(req, false)
            .unwrap();
        let (mut app, ours) = app_pair().await;
        // The app speaks first, before the copy starts; then more, then closes its side.
        let first = vec![1u8; 1000];
        app.write_all(&first).await.unwrap();
        let copy = tokio::spawn(hbone(
            ours,
            send,
            Incoming::Pending(response),
            std::future::pending(),
        ));
        let rest: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        app.write_all(&rest).await.unwrap();
        app.shutdown().await.unwrap();
        let mut answer = Vec::new();
        app.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"pong");

        let (transferred, result) = copy.await.unwrap();
        result.unwrap();
        let got = server.await.unwrap();
        assert_eq!(got.len(), first.len() + rest.len());
        assert_eq!(&got[..first.len()], &first[..]);
        assert_eq!(&got[first.len()..], &rest[..]);
        assert_eq!(
            transferred,
            Transferred {
                sent: got.len() as u64,
                received: 4
            }
        );
    }
}

//! A large read-ahead buffer under TLS.
//!
//! rustls pulls ciphertext from its transport 4 KiB at a time, which through tokio-rustls means
//! one `recvfrom` per 4 KiB: at gigabytes per second, a syscall every couple of microseconds.
//! [`ReadAhead`] sits between the TCP socket and rustls and fills a large buffer with one read,
//! which rustls then drains from memory. Writes pass straight through.
//!
//! The buffer starts small ([`HANDSHAKE_BUF`], room for any handshake flight) and grows to
//! [`READ_AHEAD`] only once the peer has completed the handshake ([`ReadAhead::grow`]), so a
//! flood of connections that never finish one costs a few KiB each, not a quarter MiB.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much is read from the socket at once, after the handshake.
pub const READ_AHEAD: usize = 256 * 1024;
/// How much is read at once during the handshake.
pub const HANDSHAKE_BUF: usize = 16 * 1024;

/// A transport with a read-ahead buffer.
#[derive(Debug)]
pub struct ReadAhead<T> {
    inner: T,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl<T> ReadAhead<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: vec![0u8; HANDSHAKE_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Enlarges the buffer to [`READ_AHEAD`], keeping what it holds; for after the handshake.
    pub fn grow(&mut self) {
        if self.buf.len() < READ_AHEAD {
            let mut buf = vec![0u8; READ_AHEAD].into_boxed_slice();
            let held = self.end - self.start;
            buf[..held].copy_from_slice(&self.buf[self.start..self.end]);
            self.buf = buf;
            self.start = 0;
            self.end = held;
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.start == this.end {
            // A caller asking for at least as much as we hold gets it directly, without the
            // intermediate copy.
            if out.remaining() >= this.buf.len() {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            let mut fill = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut fill))?;
            this.start = 0;
            this.end = fill.filled().len();
            if this.end == 0 {
                return Poll::Ready(Ok(())); // EOF
            }
        }
        let n = out.remaining().min(this.end - this.start);
        out.put_slice(&this.buf[this.start..this.start + n]);
        this.start += n;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_everything_in_order_through_small_and_large_reads() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.unwrap();
            a.shutdown().await.unwrap();
        });
        let mut r = ReadAhead::new(b);
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        let mut big = vec![0u8; READ_AHEAD + 1];
        loop {
            // Growing mid-stream (as after a handshake) keeps what the small buffer held.
            if got.len() > 100_000 && r.buf.len() == HANDSHAKE_BUF {
                r.grow();
            }
            let n = if got.len() % 3 == 0 {
                r.read(&mut small).await.unwrap()
            } else {
                r.read(&mut big).await.unwrap()
            };
            if n == 0 {
                break;
            }
            got.extend_from_slice(if got.len() % 3 == 0 {
                &small[..n]
            } else {
                &big[..n]
            });
        }
        writer.await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data);
    }
}

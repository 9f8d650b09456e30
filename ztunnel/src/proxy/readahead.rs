//! A large read-ahead buffer under TLS.
//!
//! rustls pulls ciphertext from its transport 4 KiB at a time, which through tokio-rustls means
//! one `recvfrom` per 4 KiB: at gigabytes per second, a syscall every couple of microseconds.
//! [`ReadAhead`] sits between the TCP socket and rustls and fills a large buffer with one read,
//! which rustls then drains from memory. Writes pass straight through.
//!
//! The buffer starts small ([`HANDSHAKE_BUF`], room for any handshake flight) and grows to
//! [`READ_AHEAD`] only once the handshake is done ([`ReadAhead::allow_growth`]) and a read then
//! fills the small one, i.e. the peer sends faster than small reads drain. So a flood of
//! connections that never finish a handshake costs a few KiB each, not a quarter MiB, and
//! neither does a connection that only ever carries small exchanges: a quarter MiB freed per
//! connection came back to the kernel with an `madvise` each, and its TLB shootdown across the
//! workers, in every cold mTLS connection on the benchmark VM (README, Performance).

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
    /// Set once the handshake is done.
    may_grow: bool,
}

impl<T> ReadAhead<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: vec![0u8; HANDSHAKE_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            may_grow: false,
        }
    }

    /// Lets the buffer grow to [`READ_AHEAD`] when a read fills it; for after the handshake.
    pub fn allow_growth(&mut self) {
        self.may_grow = true;
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
            // Empty here, so growing copies nothing. `end` is still where the last read from
            // the socket stopped: at the buffer's end if that read filled it.
            if this.end == this.buf.len() && this.may_grow && this.buf.len() < READ_AHEAD {
                this.buf = vec![0u8; READ_AHEAD].into_boxed_slice();
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

    /// Reads everything `r` yields, alternating small and large reads.
    async fn drain<T: AsyncRead + Unpin>(r: &mut ReadAhead<T>) -> Vec<u8> {
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        let mut big = vec![0u8; READ_AHEAD + 1];
        loop {
            let buf: &mut [u8] = if got.len() % 3 == 0 {
                &mut small
            } else {
                &mut big
            };
            let n = r.read(buf).await.unwrap();
            if n == 0 {
                return got;
            }
            got.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn a_fast_sender_grows_the_buffer_without_losing_or_reordering_bytes() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.unwrap();
            a.shutdown().await.unwrap();
        });
        let mut r = ReadAhead::new(b);
        r.allow_growth();
        let got = drain(&mut r).await;
        writer.await.unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data);
        assert_eq!(r.buf.len(), READ_AHEAD);
    }

    #[tokio::test]
    async fn small_exchanges_and_unfinished_handshakes_keep_the_small_buffer() {
        // Before the handshake is done, even a flood that fills the buffer does not grow it.
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let flood = vec![7u8; 3 * HANDSHAKE_BUF];
        a.write_all(&flood).await.unwrap();
        drop(a);
        let mut r = ReadAhead::new(b);
        assert_eq!(drain(&mut r).await, flood);
        assert_eq!(r.buf.len(), HANDSHAKE_BUF);

        // After it, messages smaller than the buffer do not grow it either.
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut r = ReadAhead::new(b);
        r.allow_growth();
        let mut got = [0u8; 1024];
        for i in 0..100u8 {
            a.write_all(&[i; 1024]).await.unwrap();
            r.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [i; 1024]);
        }
        assert_eq!(r.buf.len(), HANDSHAKE_BUF);
    }
}

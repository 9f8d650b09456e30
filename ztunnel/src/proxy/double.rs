//! Double HBONE, for an endpoint on another network: an HBONE stream to that network's
//! gateway (over a pooled connection, CONNECT `hostname:port`), and inside that stream a
//! second mTLS session and HTTP/2 connection to the endpoint, with the same CONNECT. The
//! gateway sees only the outer request and forwards the inner TLS bytes untouched; the inner
//! session is end to end between this pod's identity and the endpoint's, and is never pooled
//! (the gateway chooses the endpoint per stream).
//!
//! h2 offers no byte-stream view of a stream, so [`StreamIo`] is the small adapter that lets
//! rustls run over one.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::copy::Incoming;
use super::hbone::{self, Source};
use super::pool::{self, Lease, Pool, PoolKey};
use super::{HANDSHAKE_TIMEOUT, Pod, ProxyError, ProxyInputs};
use crate::identity::Identity;
use crate::state::HboneHop;

/// The two hops of one double-HBONE connection.
#[derive(Debug, Clone)]
pub struct Hops {
    pub gateway: HboneHop,
    /// `hostname:port`, for both CONNECTs.
    pub authority: String,
    /// Who may terminate the inner session.
    pub identities: Vec<Identity>,
}

/// Keeps the outer stream's pooled connection and the inner connection's driver alive for
/// as long as the tunnel is used; dropping it ends the inner connection.
#[derive(Debug)]
pub struct Tunnel {
    _outer: Lease,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Opens the outer stream, the inner session over it and the inner CONNECT. The inner
/// stream's answer is left pending in the returned [`Incoming`], as for a direct tunnel.
pub async fn open(
    hops: &Hops,
    src: SocketAddr,
    pod: &Pod,
    inputs: &ProxyInputs,
    pool: &Pool,
) -> Result<(SendStream<Bytes>, Incoming, Tunnel), ProxyError> {
    let gateway = hops.gateway.addr;
    let source = Source {
        addr: src,
        identity: &pod.identity,
        pod_name: &pod.info.name,
    };
    let key = PoolKey::new(
        pod.identity.clone(),
        hops.gateway.identities.clone(),
        gateway,
        src.ip(),
    );
    let (send, incoming, lease) = pool
        .open(&key, pod, || {
            hbone::connect_request(&hops.authority, source)
        })
        .await?;
    let handshake = async {
        // TLS needs the stream both ways: wait for the gateway's answer first.
        let recv = incoming.open().await?;
        let io = StreamIo::new(send, recv);
        let config = inputs
            .tls
            .client_config(pod.cert.clone(), hops.identities.clone())?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::IpAddress(gateway.ip().into()), io)
            .await
            .map_err(|source| ProxyError::Tls {
                addr: gateway,
                source,
            })?;
        let (sender, conn) = pool::h2_client().handshake::<_, Bytes>(tls).await?;
        Ok::<_, ProxyError>((sender, conn))
    };
    let (sender, conn) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| ProxyError::Timeout("double-HBONE handshake"))??;
    let driver = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "inner HBONE connection ended");
        }
    });
    let tunnel = Tunnel {
        _outer: lease,
        driver,
    };
    let mut sender = sender.ready().await?;
    let (response, send) =
        sender.send_request(hbone::connect_request(&hops.authority, source), false)?;
    Ok((send, Incoming::Pending(response), tunnel))
}

/// An HTTP/2 stream as a byte stream: reads are DATA frames (flow-control capacity released
/// as they are consumed), writes become DATA frames, shutdown sends `END_STREAM`.
#[derive(Debug)]
pub struct StreamIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// The unread rest of the last DATA frame.
    pending: Bytes,
}

impl StreamIo {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
        }
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    match e.into_io() {
        Some(e) => e,
        None => io::Error::new(io::ErrorKind::ConnectionReset, "HTTP/2 stream reset"),
    }
}

impl AsyncRead for StreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.pending.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = self.pending.len().min(buf.remaining());
        buf.put_slice(&self.pending[..n]);
        self.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(buf.len());
        let n = loop {
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(0)) => continue,
                Some(Ok(n)) => break n.min(buf.len()),
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "HTTP/2 stream closed",
                    )));
                }
            }
        };
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

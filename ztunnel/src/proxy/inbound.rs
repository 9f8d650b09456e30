//! Port 15008: HBONE from mesh peers.
//!
//! Each accepted connection must complete mTLS (client certificate from our roots, our trust
//! domain) and then carries HTTP/2 CONNECT streams. A stream is answered 200 only after the
//! app connection is up; 400 for a malformed or mismatched CONNECT, 401 when policy denies,
//! 503 when the app cannot be reached.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Request, Response, StatusCode};
use tokio::net::TcpStream;

use super::copy::{self, Incoming};
use super::hbone::{self, Rejection};
use super::pool::{CONNECTION_WINDOW, MAX_FRAME, SEND_BUFFER, STREAM_WINDOW, TLS_BUFFER};
use super::readahead::ReadAhead;
use super::{HANDSHAKE_TIMEOUT, Pod, ProxyError, ProxyInputs, socket};
use crate::accesslog::{ConnLog, Direction};
use crate::errors::Chain;
use crate::identity::Identity;
use crate::tls;

/// Serves one HBONE connection from `peer` until it closes or the pod drains.
pub async fn serve(tcp: TcpStream, peer: SocketAddr, pod: Arc<Pod>, inputs: Arc<ProxyInputs>) {
    let local = match tcp.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(pod.server_tls.clone());
    let handshake = async {
        let mut tls = acceptor
            .accept(ReadAhead::new(tcp))
            .await
            .map_err(|source| ProxyError::Tls { addr: peer, source })?;
        tls.get_mut().1.set_buffer_limit(Some(TLS_BUFFER));
        let peer_identity = tls::peer_identity(tls.get_ref().1.peer_certificates());
        let conn = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buffer_size(SEND_BUFFER)
            .handshake::<_, Bytes>(tls)
            .await?;
        Ok::<_, ProxyError>((conn, peer_identity))
    };
    let (mut conn, peer_identity) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => {
            tracing::warn!(pod = %pod.name(), %peer, error = %Chain(&e), "HBONE handshake failed");
            return;
        }
        Err(_) => {
            tracing::warn!(pod = %pod.name(), %peer, "HBONE handshake timed out");
            return;
        }
    };
    let mut draining = false;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    let pod = pod.clone();
                    let inputs = inputs.clone();
                    let peer_identity = peer_identity.clone();
                    let guard = pod.drain.track();
                    tokio::spawn(async move {
                        tokio::select! {
                            () = stream(req, respond, peer, local, peer_identity, &pod, &inputs) => {}
                            () = pod.drain.terminated() => {}
                        }
                        drop(guard);
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(pod = %pod.name(), %peer, error = %Chain(&e), "HBONE connection error");
                    break;
                }
                None => break,
            },
            () = pod.drain.accepting_stopped(), if !draining => {
                // GOAWAY: the peer opens no new streams here; open ones finish.
                conn.graceful_shutdown();
                draining = true;
            }
        }
    }
}

async fn stream(
    req: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    local: SocketAddr,
    peer_identity: Option<Identity>,
    pod: &Pod,
    _inputs: &ProxyInputs,
) {
    let authority = req.uri().to_string();
    let target = match hbone::validate_connect(&req, local.ip()) {
        Ok(t) => t,
        Err(rejection) => {
            answer(&mut respond, rejection.status);
            let mut log = ConnLog::new(Direction::InboundHbone, pod.name(), peer, local);
            log.src_identity = peer_identity;
            log.finish(0, 0, Some(&RejectionWithAuthority(rejection, authority)));
            return;
        }
    };
    let mut log = ConnLog::new(Direction::InboundHbone, pod.name(), peer, target);
    log.src_identity = peer_identity;
    log.dst_identity = Some(pod.identity.clone());
    log.dst_workload = Some(pod.name());
    log.security = "mtls";
    // Authorization hook: the L4 policy engine decides here and answers 401 on deny.
    let app = match socket::connect(pod, target, Some(peer.ip())).await {
        Ok(app) => app,
        Err(e) => {
            answer(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            log.finish(0, 0, Some(&e));
            return;
        }
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => {
            log.finish(0, 0, Some(&ProxyError::H2(e)));
            return;
        }
    };
    let (t, r) = copy::hbone(app, send, Incoming::Open(req.into_body())).await;
    let err = r.err().map(ProxyError::from);
    log.finish(
        t.sent,
        t.received,
        err.as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static)),
    );
}

fn answer(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    let _ = respond.send_response(resp, true);
}

#[derive(Debug, thiserror::Error)]
#[error("CONNECT {1} refused with {0}")]
struct RejectionWithAuthority(Rejection, String);

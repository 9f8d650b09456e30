//! Port 15006: plain TCP into the pod from peers outside the mesh.
//!
//! The peer has no identity; the connection is forwarded to the app with the peer's address
//! as its source. The L4 policy hook for identity-less peers sits before the app connect.

use std::net::SocketAddr;

use mesh_contract::ports;
use tokio::net::TcpStream;

use super::copy;
use super::{Pod, ProxyError, socket};
use crate::accesslog::{ConnLog, Direction};

/// Serves one plaintext inbound connection to completion.
pub async fn serve(tcp: TcpStream, peer: SocketAddr, pod: &Pod) {
    let dst = match socket::original_dst(&tcp) {
        Ok(dst) => dst,
        Err(e) => {
            let local = tcp.local_addr().unwrap_or(peer);
            ConnLog::new(Direction::InboundPlaintext, pod.name(), peer, local).finish(
                0,
                0,
                Some(&e),
            );
            socket::reset(tcp);
            return;
        }
    };
    let mut log = ConnLog::new(Direction::InboundPlaintext, pod.name(), peer, dst);
    log.dst_identity = Some(pod.identity.clone());
    log.dst_workload = Some(pod.name());
    if ports::LOOP_GUARD.contains(&dst.port()) {
        socket::reset(tcp);
        log.finish(0, 0, Some(&ProxyError::Loop(dst)));
        return;
    }
    // Authorization hook: a deny resets the connection here.
    let app = match socket::connect(pod, dst, Some(peer.ip())).await {
        Ok(app) => app,
        Err(e) => {
            socket::reset(tcp);
            log.finish(0, 0, Some(&e));
            return;
        }
    };
    let (t, r) = copy::tcp(tcp, app).await;
    let err = r.err().map(ProxyError::from);
    log.finish(
        t.sent,
        t.received,
        err.as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static)),
    );
}

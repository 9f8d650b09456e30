//! Port 15006: plain TCP into the pod from peers outside the mesh.
//!
//! The peer has no identity; the connection is forwarded to the app with the peer's address
//! as its source. Its original destination must be this pod's own address (the one the
//! redirect delivered it to), as on the HBONE path: ztunnel never connects onward to another
//! address on a plaintext peer's behalf. L4 policy applies before the app connect, with no
//! identity: a deny resets the connection.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_contract::ports;
use tokio::net::TcpStream;

use super::copy;
use super::{Pod, ProxyError, ProxyInputs, hbone, inbound, socket};
use crate::proxy::accesslog::{ConnLog, Direction};

/// Serves one plaintext inbound connection to completion.
pub async fn serve(tcp: TcpStream, peer: SocketAddr, pod: &Arc<Pod>, inputs: &ProxyInputs) {
    let dst = match socket::original_dst(&tcp, peer) {
        Ok(dst) => dst,
        Err(e) => {
            let local = tcp.local_addr().unwrap_or(peer);
            let log = ConnLog::new(
                Direction::InboundPlaintext,
                pod,
                peer,
                local,
                &inputs.metrics,
            );
            socket::reset(tcp);
            log.finish(0, 0, Some(&e));
            return;
        }
    };
    let mut log = ConnLog::new(Direction::InboundPlaintext, pod, peer, dst, &inputs.metrics);
    log.dst_identity = Some(pod.identity.clone());
    if ports::LOOP_GUARD.contains(&dst.port()) {
        socket::reset(tcp);
        log.finish(0, 0, Some(&ProxyError::Loop(dst)));
        return;
    }
    // REDIRECT delivers to the receiving interface's address; a packet that was addressed
    // elsewhere (routed through the pod) must not make ztunnel connect there.
    match tcp.local_addr() {
        Ok(local) if hbone::same_ip(dst.ip(), local.ip()) => {}
        local => {
            socket::reset(tcp);
            let pod_ip = local.map_or_else(|_| "unknown".to_string(), |a| a.ip().to_string());
            log.finish(0, 0, Some(&ProxyError::NotThisPod { dst, pod_ip }));
            return;
        }
    }
    if let Err(denied) = inbound::authorize(&mut log, pod, inputs) {
        socket::reset(tcp);
        log.finish(0, 0, Some(&denied));
        return;
    }
    log.open();
    let tracked = inputs.conns.track(&log, true, pod.drain.cut_signal());
    let app = match socket::connect(pod, dst, socket::Toward::LocalApp { client: peer.ip() }).await
    {
        Ok(app) => app,
        Err(e) => {
            socket::reset(tcp);
            log.finish(0, 0, Some(&e));
            return;
        }
    };
    let (t, r) = copy::tcp(tcp, app, tracked.stopped()).await;
    let r = r.map_err(|e| tracked.explain(e));
    log.finish(t.sent, t.received, r.err().as_ref());
}

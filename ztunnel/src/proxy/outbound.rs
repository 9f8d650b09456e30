//! Port 15001: connections the pod's apps open, captured by the pod's rules.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_contract::ports;
use tokio::net::TcpStream;

use super::copy::{self, Transferred};
use super::hbone::{self, Source};
use super::pool::{Pool, PoolKey};
use super::tracker::Tracked;
use super::{Pod, ProxyError, ProxyInputs, double, socket};
use crate::proxy::accesslog::{ConnLog, Direction, WorkloadRef};
use crate::state::Upstream;
use crate::state::lb::Origin;

/// Serves one outbound connection from `app` (whose address is `src`) to completion.
pub async fn serve(
    app: TcpStream,
    src: SocketAddr,
    pod: &Arc<Pod>,
    inputs: &ProxyInputs,
    pool: &Arc<Pool>,
) {
    let dst = match socket::original_dst(&app, src) {
        Ok(dst) => dst,
        Err(e) => {
            let local = app.local_addr().unwrap_or(src);
            ConnLog::new(Direction::Outbound, pod, src, local, &inputs.metrics).finish(
                0,
                0,
                Some(&e),
            );
            socket::reset(app);
            return;
        }
    };
    let mut log = ConnLog::new(Direction::Outbound, pod, src, dst, &inputs.metrics);
    log.src_identity = Some(pod.identity.clone());
    // One lookup of this pod's entry serves the log and the routing decision.
    let state = inputs.state.load();
    let entry = pod.entry(&state, src.ip()).cloned();
    log.src_workload = Some(pod.workload_ref(entry.as_ref()));
    // Boxed: routing (resolution, the pool's checkout, a connect) ends before the copy
    // starts; inline, its state would size the task for the connection's whole life, idle or
    // not. The allocation is freed as soon as the route is known.
    let routed = Box::pin(route(
        app, src, dst, pod, inputs, pool, &mut log, state, entry,
    ))
    .await;
    let (transferred, result) = routed.run().await;
    log.finish(
        transferred.sent,
        transferred.received,
        result.err().as_ref(),
    );
}

#[allow(clippy::too_many_arguments)]
async fn route(
    app: TcpStream,
    src: SocketAddr,
    dst: SocketAddr,
    pod: &Arc<Pod>,
    inputs: &ProxyInputs,
    pool: &Arc<Pool>,
    log: &mut ConnLog,
    state: Arc<crate::state::State>,
    entry: Option<Arc<crate::state::Workload>>,
) -> Routed {
    let refuse = |app: TcpStream, e: ProxyError| {
        socket::reset(app);
        Routed::Refused(e)
    };
    if ports::LOOP_GUARD.contains(&dst.port()) {
        return refuse(app, ProxyError::Loop(dst));
    }
    let origin = Origin {
        workload: entry.as_deref(),
        network: &inputs.config.network,
    };
    let upstream = state.resolve(dst, &origin, |n| rand::random_range(0..n));
    drop(state);
    match upstream {
        Upstream::Hbone {
            hop,
            authority,
            workload,
            service,
            waypoint,
        } => {
            let via = waypoint.then(|| format!("waypoint {}", workload.uid));
            let id = hop.identities.first().cloned();
            let tracked = open_tunnel(log, pod, inputs, hop.addr, workload, service, id, via);
            let key = PoolKey::new(pod.identity.clone(), hop.identities, hop.addr, src.ip());
            let name = pod.info.name.clone();
            let req = || {
                hbone::connect_request(
                    authority,
                    Source {
                        addr: src,
                        identity: &pod.identity,
                        pod_name: &name,
                    },
                )
            };
            match pool.open(&key, pod, req).await {
                Ok((send, incoming, lease)) => Routed::Tunnel {
                    app,
                    send,
                    incoming,
                    tracked,
                    _hold: Hold::Lease(lease),
                },
                Err(e) => refuse(app, e),
            }
        }
        Upstream::Tcp {
            workload,
            service,
            target,
        } => {
            log.dst_workload = Some(WorkloadRef::Entry(workload));
            log.dst_service = service;
            plain(app, target, pod, inputs, log).await
        }
        Upstream::Passthrough if inputs.config.registry_only => {
            refuse(app, ProxyError::RegistryOnly(dst))
        }
        Upstream::Passthrough => plain(app, dst, pod, inputs, log).await,
        Upstream::Gateway {
            gateway,
            authority,
            identities,
            workload,
            service,
        } => {
            let via = Some(format!("gateway {}", gateway.addr));
            let id = identities.first().cloned();
            let tracked = open_tunnel(
                log,
                pod,
                inputs,
                gateway.addr,
                workload,
                Some(service),
                id,
                via,
            );
            let hops = double::Hops {
                gateway,
                authority,
                identities,
            };
            // Boxed: rare, and large enough to size every route otherwise.
            match Box::pin(double::open(&hops, src, pod, inputs, pool)).await {
                Ok((send, incoming, tunnel)) => Routed::Tunnel {
                    app,
                    send,
                    incoming,
                    tracked,
                    _hold: Hold::Double(tunnel),
                },
                Err(e) => refuse(app, e),
            }
        }
        Upstream::Unroutable { target, reason } => {
            refuse(app, ProxyError::Unroutable { target, reason })
        }
    }
}

/// Where [`route`] sent a connection: what its copy needs, or why it was refused (the app's
/// socket already reset).
enum Routed {
    Tunnel {
        app: TcpStream,
        send: h2::SendStream<bytes::Bytes>,
        incoming: copy::Incoming,
        tracked: Tracked,
        /// Keeps the HBONE connection (or the outer tunnel of a double one) open for the copy.
        _hold: Hold,
    },
    Plain {
        app: TcpStream,
        upstream: TcpStream,
        tracked: Tracked,
    },
    Refused(ProxyError),
}

/// Held only to be dropped when the copy ends.
#[allow(dead_code)]
enum Hold {
    Lease(super::pool::Lease),
    Double(double::Tunnel),
}

impl Routed {
    /// Copies until both directions end; the byte counts are the app's.
    async fn run(self) -> (Transferred, Result<(), ProxyError>) {
        match self {
            Routed::Tunnel {
                app,
                send,
                incoming,
                tracked,
                _hold,
            } => {
                let (t, r) = copy::hbone(app, send, incoming, tracked.stopped()).await;
                (t, r.map_err(|e| tracked.explain(e)))
            }
            Routed::Plain {
                app,
                upstream,
                tracked,
            } => {
                let (t, r) = copy::tcp(app, upstream, tracked.stopped()).await;
                (t, r.map_err(|e| tracked.explain(e)))
            }
            Routed::Refused(e) => (Transferred::default(), Err(e)),
        }
    }
}

/// Fills in the log of a tunnelled connection, counts it open and tracks it.
#[allow(clippy::too_many_arguments)]
fn open_tunnel(
    log: &mut ConnLog,
    pod: &Pod,
    inputs: &ProxyInputs,
    hbone: SocketAddr,
    workload: Arc<crate::state::Workload>,
    service: Option<Arc<crate::state::Service>>,
    identity: Option<crate::identity::Identity>,
    via: Option<String>,
) -> Tracked {
    log.hbone = Some(hbone);
    log.dst_workload = Some(WorkloadRef::Entry(workload));
    log.dst_service = service;
    log.dst_identity = identity;
    log.via = via;
    log.security = "mtls";
    log.open();
    inputs.conns.track(log, false, pod.drain.cut_signal())
}

/// Plain TCP from the pod's own address (its netns, marked so it is not captured again).
async fn plain(
    app: TcpStream,
    target: SocketAddr,
    pod: &Pod,
    inputs: &ProxyInputs,
    log: &mut ConnLog,
) -> Routed {
    log.open();
    let tracked = inputs.conns.track(log, false, pod.drain.cut_signal());
    match socket::connect(pod, target, socket::Toward::Network).await {
        Ok(upstream) => Routed::Plain {
            app,
            upstream,
            tracked,
        },
        Err(e) => {
            socket::reset(app);
            Routed::Refused(e)
        }
    }
}

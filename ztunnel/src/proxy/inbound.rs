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

use tokio::io::AsyncWriteExt;

use super::app_tunnel;
use super::copy::{self, Incoming};
use super::hbone;
use super::pool::{CONNECTION_WINDOW, MAX_FRAME, SEND_BUFFER, STREAM_WINDOW, TLS_BUFFER};
use super::readahead::ReadAhead;
use super::tracker::Tracked;
use super::{HANDSHAKE_TIMEOUT, Pod, ProxyError, ProxyInputs, socket};
use crate::identity::Identity;
use crate::proxy::accesslog::{ConnLog, Direction, WorkloadRef};
use crate::state::authz::{Connection, Decision};
use crate::state::{AppTunnelProtocol, ApplicationTunnel};
use crate::tls;
use mesh_contract::Chain;

/// Most concurrent CONNECT streams one peer connection may have open here. A client's pool
/// opens another connection well before this (`--pool-max-streams`, default 100); past it the
/// peer's new streams wait instead of each costing us a task and an app socket.
pub const MAX_STREAMS: u32 = 1000;
/// Largest header list a CONNECT may carry (decoded). Ours are about 300 bytes; h2's default
/// would accept 16 MiB per request.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Streams a peer may reset before they are accepted, past which the connection is closed
/// (the HTTP/2 "rapid reset" flood).
const MAX_PENDING_RESETS: usize = 100;

/// The HTTP/2 server side of an HBONE connection: SPEC §5 windows and frames, and the limits
/// above.
fn h2_server() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS);
    b
}

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
        tls.get_mut().0.allow_growth();
        let peer_identity = tls::peer_identity(tls.get_ref().1.peer_certificates());
        let conn = h2_server().handshake::<_, Bytes>(tls).await?;
        Ok::<_, ProxyError>((conn, peer_identity))
    };
    let (mut conn, peer_identity) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => {
            tracing::warn!(pod = %pod.name(), %peer, error = %Chain(&e), "HBONE handshake failed");
            refused_handshake(peer, local, &pod, &inputs, &e);
            return;
        }
        Err(_) => {
            tracing::warn!(pod = %pod.name(), %peer, "HBONE handshake timed out");
            refused_handshake(
                peer,
                local,
                &pod,
                &inputs,
                &ProxyError::Timeout("the TLS handshake"),
            );
            return;
        }
    };
    let mut draining = false;
    // Streams open on this connection, and since when it has had none (to within a tick).
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut idle_since = tokio::time::Instant::now();
    let idle_timeout = inputs.config.hbone_idle_timeout;
    let mut idle_check =
        tokio::time::interval((idle_timeout / 4).max(std::time::Duration::from_millis(50)));
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Keepalive: a PING each interval; one still unanswered at the next tick ends the
    // connection (the accept below is what polls the connection for the PONG).
    let mut ping = conn.ping_pong();
    let mut keepalive = tokio::time::interval(inputs.config.hbone_keepalive);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    keepalive.reset();
    let mut awaiting_pong = false;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((req, respond))) => {
                    // Boxed: the checks and the connect to the app end before the copy
                    // starts; inline, they (and the request) would size the stream's task
                    // for its whole life, idle or not.
                    let setup = Box::pin(stream(
                        req,
                        respond,
                        peer,
                        local,
                        peer_identity.clone(),
                        pod.clone(),
                        inputs.clone(),
                    ));
                    let pod = pod.clone();
                    let guard = pod.drain.track();
                    let open = open.clone();
                    open.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                    idle_since = tokio::time::Instant::now();
                    tokio::spawn(async move {
                        let work = std::pin::pin!(async {
                            let Some(accepted) = setup.await else { return };
                            accepted.run().await;
                        });
                        pod.drain.run_until_cut(work).await;
                        open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
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
            _ = keepalive.tick(), if ping.is_some() => {
                let Some(pp) = ping.as_mut() else { continue };
                if awaiting_pong {
                    tracing::debug!(pod = %pod.name(), %peer, "HBONE peer did not answer the keepalive PING; closing");
                    break;
                }
                if pp.send_ping(h2::Ping::opaque()).is_err() {
                    break;
                }
                awaiting_pong = true;
            }
            pong = std::future::poll_fn(|cx| match ping.as_mut() {
                Some(pp) => pp.poll_pong(cx),
                None => std::task::Poll::Pending,
            }), if awaiting_pong => {
                if pong.is_err() {
                    break;
                }
                awaiting_pong = false;
            }
            _ = idle_check.tick(), if !draining => {
                let now = tokio::time::Instant::now();
                if open.load(std::sync::atomic::Ordering::Acquire) > 0 {
                    idle_since = now;
                } else if now.duration_since(idle_since) >= idle_timeout {
                    tracing::debug!(pod = %pod.name(), %peer, "idle HBONE connection closed");
                    conn.graceful_shutdown();
                    draining = true;
                }
            }
        }
    }
}

/// The access-log record of one inbound HBONE connection or stream from `peer` to `dst`.
fn hbone_log(peer: SocketAddr, dst: SocketAddr, pod: &Arc<Pod>, inputs: &ProxyInputs) -> ConnLog {
    ConnLog::new(Direction::InboundHbone, pod, peer, dst, &inputs.metrics)
}

/// One access-log event for a peer refused before any CONNECT: a certificate that did not
/// verify (expired, foreign CA, several identities, ...), a failed or slow handshake.
fn refused_handshake(
    peer: SocketAddr,
    local: SocketAddr,
    pod: &Arc<Pod>,
    inputs: &ProxyInputs,
    error: &ProxyError,
) {
    let mut log = hbone_log(peer, local, pod, inputs);
    log.dst_identity = Some(pod.identity.clone());
    log.finish(0, 0, Some(error));
}

/// An accepted, authorized CONNECT whose app connection is open: what its copy needs.
struct Accepted {
    log: ConnLog,
    app: TcpStream,
    send: h2::SendStream<Bytes>,
    body: Incoming,
    tracked: Tracked,
}

impl Accepted {
    /// Copies until both directions end, then logs. Taken apart before the `async` block, so
    /// the future holds each part once (an `async fn` would hold `self` and its parts).
    fn run(self) -> impl Future<Output = ()> {
        let Accepted {
            log,
            app,
            send,
            body,
            tracked,
        } = self;
        async move {
            let (t, r) = copy::hbone(app, send, body, tracked.stopped()).await;
            let r = r.map_err(|e| tracked.explain(e));
            log.finish(t.sent, t.received, r.err().as_ref());
        }
    }
}

/// Validates and authorizes one CONNECT and opens its app connection; `None` once it has
/// been refused (answered and logged).
async fn stream(
    req: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    local: SocketAddr,
    peer_identity: Option<Identity>,
    pod: Arc<Pod>,
    inputs: Arc<ProxyInputs>,
) -> Option<Accepted> {
    let (pod, inputs) = (&pod, &*inputs);
    let by_hostname = |host: &str, port: u16| {
        let state = inputs.state.load();
        let uid = pod.entry(&state, local.ip())?.uid.clone();
        state.service_port_on(host, port, &uid)
    };
    let target = match hbone::validate_connect(&req, local.ip(), by_hostname) {
        Ok(t) => t,
        Err(rejection) => {
            answer(&mut respond, rejection.status);
            let mut log = hbone_log(peer, local, pod, inputs);
            log.src_identity = peer_identity;
            let authority = req.uri().to_string();
            log.finish(
                0,
                0,
                Some(&ProxyError::BadRequest {
                    authority,
                    rejection,
                }),
            );
            return None;
        }
    };
    let mut log = hbone_log(peer, target, pod, inputs);
    log.src_identity = peer_identity;
    log.dst_identity = Some(pod.identity.clone());
    log.security = "mtls";
    let entry = match authorize(&mut log, pod, inputs) {
        Ok(entry) => entry,
        Err(denied) => {
            answer(&mut respond, StatusCode::UNAUTHORIZED);
            log.finish(0, 0, Some(&denied));
            return None;
        }
    };
    log.open();
    let tracked = inputs.conns.track(&log, true, pod.drain.cut_signal());
    let tunnel = entry.and_then(|w| w.application_tunnel.clone());
    let app_addr = match &tunnel {
        Some(ApplicationTunnel { port: Some(p), .. }) => SocketAddr::new(target.ip(), *p),
        _ => target,
    };
    let mut app = match socket::connect(
        pod,
        app_addr,
        socket::Toward::LocalApp { client: peer.ip() },
    )
    .await
    {
        Ok(app) => app,
        Err(e) => {
            answer(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            log.finish(0, 0, Some(&e));
            return None;
        }
    };
    if let Some(ApplicationTunnel {
        protocol: AppTunnelProtocol::Proxy,
        ..
    }) = &tunnel
    {
        let header = app_tunnel::proxy_v2_header(peer, target, log.src_identity.as_ref());
        let written = match header {
            Ok(h) => app.write_all(&h).await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            answer(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            log.finish(0, 0, Some(&ProxyError::Socket(e)));
            socket::reset(app);
            return None;
        }
    }
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => {
            log.finish(0, 0, Some(&ProxyError::H2(e)));
            return None;
        }
    };
    Some(Accepted {
        log,
        app,
        send,
        body: Incoming::Open(req.into_body()),
        tracked,
    })
}

/// Fills in the workloads on both ends and applies L4 policy; `Err` is the denial, `Ok` the
/// pod's workload entry (when the state has one).
pub(super) fn authorize(
    log: &mut ConnLog,
    pod: &Arc<Pod>,
    inputs: &ProxyInputs,
) -> Result<Option<Arc<crate::state::Workload>>, ProxyError> {
    let state = inputs.state.load();
    log.src_workload = state
        .workload_by_ip(log.src.ip())
        .map(|w| WorkloadRef::Entry(w.clone()));
    let entry = pod.entry(&state, log.dst.ip()).cloned();
    log.dst_workload = Some(pod.workload_ref(entry.as_ref()));
    let conn = Connection::new(log.src_identity.as_ref(), log.src.ip(), log.dst);
    let verdict = state.authorize(&pod.uid, &pod.info.namespace, &conn);
    log.dry_run = verdict.dry_run.map(|d| match d {
        Decision::Allow => "allow".to_string(),
        Decision::Deny(reason) => format!("deny ({reason})"),
    });
    match verdict.decision {
        Decision::Allow => Ok(entry),
        Decision::Deny(reason) => Err(ProxyError::Denied(reason)),
    }
}

fn answer(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    let _ = respond.send_response(resp, true);
}

/// Fuzz entry point (`fuzz/`, replayed by `tests/tests/fuzz_corpora.rs`): bytes as what a peer
/// sends after the HTTP/2 preface on a verified HBONE connection, served by the same HTTP/2
/// settings as [`serve`]. Every request that arrives is validated as a CONNECT to
/// 198.18.0.1; one that is accepted must name that address and a port that is not ours.
pub fn fuzz_connect(data: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let local: std::net::IpAddr = [198, 18, 0, 1].into();
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return;
    };
    rt.block_on(async {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let feed = async {
            let _ = to_server
                .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                .await;
            let _ = to_server.write_all(data).await;
            let _ = to_server.shutdown().await;
        };
        let discard = async {
            let mut sink = vec![0; 16 * 1024];
            while matches!(from_server.read(&mut sink).await, Ok(n) if n > 0) {}
        };
        let serve = async {
            let Ok(mut conn) = h2_server().handshake::<_, Bytes>(server).await else {
                return;
            };
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                match hbone::validate_connect(&req, local, |_, _| None) {
                    Ok(target) => {
                        assert_eq!(target.ip(), local);
                        assert!(target.port() != 0);
                        assert!(!mesh_contract::ports::LOOP_GUARD.contains(&target.port()));
                        answer(&mut respond, StatusCode::OK);
                    }
                    Err(rejection) => {
                        assert!(rejection.status.is_client_error());
                        answer(&mut respond, rejection.status);
                    }
                }
            }
        };
        let all = async { tokio::join!(feed, discard, serve) };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), all).await;
    });
}

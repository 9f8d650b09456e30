//! The DNS proxy on port 15053, UDP and TCP, inside each enrolled pod's netns (loopback:
//! the node agent's DNS capture redirects the pod's port-53 traffic there). Names the mesh
//! knows are answered from the state ([`answer`]); everything else is forwarded unchanged to
//! the upstream resolvers (the pod's own when the node agent sent them over ZDS, else
//! `--dns-upstream`), from a socket in the pod's netns carrying ztunnel's mark (so it is
//! not captured again), and the upstream's reply is relayed unchanged. A query that cannot
//! be parsed gets FORMERR, one whose upstream fails gets SERVFAIL: nothing is dropped
//! silently.
//!
//! Messages are parsed and built with `hickory-proto`. The server loop is ours rather than
//! `hickory-server`'s: forwarding relays the query's own bytes, which its handler API does
//! not expose, and the sockets must be created inside the pod's netns.

pub mod answer;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use mesh_contract::{marks, ports};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;

use super::{Pod, ProxyInputs};

/// How long an upstream may take to answer one query.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a TCP client may stay idle between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Largest UDP message taken or relayed (EDNS allows up to 64 KiB).
const MAX_UDP: usize = 65_535;

/// The proxy's sockets in one pod: loopback IPv4 and, where the pod has it, IPv6.
#[derive(Debug)]
pub struct DnsSockets {
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
}

/// Binds the proxy's sockets. Must run inside the pod's netns.
pub fn sockets(ipv6: bool) -> io::Result<DnsSockets> {
    let mut addrs = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    if ipv6 {
        addrs.push(IpAddr::V6(Ipv6Addr::LOCALHOST));
    }
    let mut out = DnsSockets {
        udp: Vec::new(),
        tcp: Vec::new(),
    };
    for ip in addrs {
        let addr = SocketAddr::new(ip, ports::DNS);
        for ty in [Type::DGRAM, Type::STREAM] {
            let s = Socket::new(Domain::for_address(addr), ty.nonblocking().cloexec(), None)?;
            s.set_mark(marks::ZTUNNEL)?;
            s.set_reuse_address(true)?;
            // An old and a new ztunnel share the port during a rolling update.
            s.set_reuse_port(true)?;
            if ip.is_ipv6() {
                s.set_only_v6(true)?;
            }
            s.bind(&addr.into())?;
            if ty == Type::DGRAM {
                out.udp.push(s.into());
            } else {
                s.listen(128)?;
                out.tcp.push(s.into());
            }
        }
    }
    Ok(out)
}

/// Serves `pod`'s DNS until the pod stops accepting; `_open` keeps its listeners counted
/// as open until then.
pub async fn serve(
    sockets: DnsSockets,
    pod: Arc<Pod>,
    inputs: Arc<ProxyInputs>,
    open: mpsc::Sender<()>,
) {
    for udp in sockets.udp {
        tokio::spawn(serve_udp(udp, pod.clone(), inputs.clone(), open.clone()));
    }
    for tcp in sockets.tcp {
        tokio::spawn(serve_tcp(tcp, pod.clone(), inputs.clone(), open.clone()));
    }
}

async fn serve_udp(
    udp: std::net::UdpSocket,
    pod: Arc<Pod>,
    inputs: Arc<ProxyInputs>,
    _open: mpsc::Sender<()>,
) {
    let udp = match UdpSocket::from_std(udp) {
        Ok(u) => Arc::new(u),
        Err(e) => {
            tracing::error!(pod = %pod.name(), error = %e, "cannot register the DNS socket");
            return;
        }
    };
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let (n, client) = tokio::select! {
            () = pod.drain.accepting_stopped() => return,
            r = udp.recv_from(&mut buf) => match r {
                Ok(got) => got,
                Err(e) => {
                    tracing::debug!(pod = %pod.name(), error = %e, "DNS receive failed");
                    continue;
                }
            },
        };
        let query = buf[..n].to_vec();
        let (udp, pod, inputs) = (udp.clone(), pod.clone(), inputs.clone());
        tokio::spawn(async move {
            if let Some(reply) = handle(&query, Transport::Udp, &pod, &inputs).await {
                let _ = udp.send_to(&reply, client).await;
            }
        });
    }
}

async fn serve_tcp(
    listener: std::net::TcpListener,
    pod: Arc<Pod>,
    inputs: Arc<ProxyInputs>,
    _open: mpsc::Sender<()>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(pod = %pod.name(), error = %e, "cannot register the DNS listener");
            return;
        }
    };
    loop {
        let conn = tokio::select! {
            () = pod.drain.accepting_stopped() => return,
            r = listener.accept() => match r {
                Ok((conn, _)) => conn,
                Err(e) => {
                    tracing::debug!(pod = %pod.name(), error = %e, "DNS accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (pod, inputs) = (pod.clone(), inputs.clone());
        tokio::spawn(async move {
            let _ = tcp_client(conn, &pod, &inputs).await;
        });
    }
}

/// Length-prefixed queries on one TCP connection, answered in order.
async fn tcp_client(mut conn: TcpStream, pod: &Pod, inputs: &ProxyInputs) -> io::Result<()> {
    loop {
        let Ok(query) = tokio::time::timeout(TCP_IDLE, read_framed(&mut conn)).await else {
            return Ok(());
        };
        let query = query?;
        if let Some(reply) = handle(&query, Transport::Tcp, pod, inputs).await {
            write_framed(&mut conn, &reply).await?;
        }
    }
}

async fn read_framed(conn: &mut TcpStream) -> io::Result<Vec<u8>> {
    let len = conn.read_u16().await?;
    let mut msg = vec![0u8; usize::from(len)];
    conn.read_exact(&mut msg).await?;
    Ok(msg)
}

async fn write_framed(conn: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| io::Error::other("DNS message too long"))?;
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(msg);
    conn.write_all(&framed).await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

/// The reply to one query: local, forwarded, or an error code. `None` only for bytes too
/// short to carry a message id (there is no one to answer).
async fn handle(
    query: &[u8],
    transport: Transport,
    pod: &Pod,
    inputs: &ProxyInputs,
) -> Option<Vec<u8>> {
    let request = match Message::from_vec(query) {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(pod = %pod.name(), error = %e, "malformed DNS query");
            return format_error(query);
        }
    };
    let state = inputs.state.load();
    let client = answer::Client {
        namespace: &pod.info.namespace,
        network: &inputs.config.network,
        cluster_domain: &inputs.config.cluster_domain,
    };
    if let Some(local) = answer::answer(&state, &request, &client) {
        drop(state);
        return local.to_vec().ok();
    }
    drop(state);
    // The pod's own nameservers when the agent sent them, else ztunnel's.
    let own: Vec<SocketAddr> = pod
        .info
        .dns_nameservers
        .iter()
        .map(|ip| SocketAddr::new(*ip, 53))
        .collect();
    let upstreams = if own.is_empty() {
        &inputs.config.dns_upstreams
    } else {
        &own
    };
    for upstream in upstreams {
        match forward(query, *upstream, transport, pod).await {
            Ok(reply) => return Some(reply),
            Err(e) => {
                tracing::debug!(pod = %pod.name(), %upstream, error = %e, "DNS upstream failed")
            }
        }
    }
    answer::reply_to(&request, ResponseCode::ServFail)
        .to_vec()
        .ok()
}

/// FORMERR for a query we could not parse, keeping its id when it has one.
fn format_error(query: &[u8]) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(hickory_proto::op::MessageType::Response)
        .set_response_code(ResponseCode::FormErr);
    m.to_vec().ok()
}

/// A socket in `pod`'s netns, marked so the pod's rules do not capture it.
fn pod_socket(pod: &Pod, upstream: SocketAddr, ty: Type) -> io::Result<Socket> {
    let sock = pod
        .netns
        .run(|| {
            Socket::new(
                Domain::for_address(upstream),
                ty.nonblocking().cloexec(),
                Some(match ty {
                    Type::DGRAM => Protocol::UDP,
                    _ => Protocol::TCP,
                }),
            )
        })
        .map_err(io::Error::other)??;
    sock.set_mark(marks::ZTUNNEL)?;
    Ok(sock)
}

/// Relays `query` to `upstream` and returns its reply, whose id must match.
async fn forward(
    query: &[u8],
    upstream: SocketAddr,
    transport: Transport,
    pod: &Pod,
) -> io::Result<Vec<u8>> {
    let exchange = async {
        match transport {
            Transport::Udp => {
                let udp = UdpSocket::from_std(pod_socket(pod, upstream, Type::DGRAM)?.into())?;
                udp.connect(upstream).await?;
                udp.send(query).await?;
                let mut buf = vec![0u8; MAX_UDP];
                loop {
                    let n = udp.recv(&mut buf).await?;
                    // Not the answer to this query (a late or forged datagram): keep waiting.
                    if n >= 2 && buf[..2] == query[..2] {
                        buf.truncate(n);
                        return Ok(buf);
                    }
                }
            }
            Transport::Tcp => {
                let sock = tokio::net::TcpSocket::from_std_stream(
                    pod_socket(pod, upstream, Type::STREAM)?.into(),
                );
                let mut conn = sock.connect(upstream).await?;
                write_framed(&mut conn, query).await?;
                read_framed(&mut conn).await
            }
        }
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))?
}

/// Fuzz entry point (`fuzz/`): bytes as a query, answered from a small state. Whatever
/// parses must get a reply that parses and carries the query's id.
pub fn fuzz_query(data: &[u8]) {
    let Ok(request) = Message::from_vec(data) else {
        let _ = format_error(data);
        return;
    };
    let state = crate::state::local::parse(
        "services: [{name: echo, namespace: ns, hostname: echo.ns.svc.cluster.local, vips: [198.19.0.1]}]",
        "cluster.local",
    )
    .unwrap_or_default();
    let client = answer::Client {
        namespace: "ns",
        network: "",
        cluster_domain: "cluster.local",
    };
    if let Some(reply) = answer::answer(&state, &request, &client)
        && let Ok(bytes) = reply.to_vec()
    {
        let parsed = Message::from_vec(&bytes).expect("our reply parses");
        assert_eq!(parsed.id(), request.id());
    }
}

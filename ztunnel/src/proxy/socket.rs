//! Sockets inside a pod's network namespace.
//!
//! Each socket is created with the calling thread briefly inside the pod's netns (see
//! [`mesh_netns::NetNs::run`]) and carries `SO_MARK` 0x539 so the pod's redirection rules let
//! it through. Connections to a local app can bind the real client address with
//! `IP_TRANSPARENT`, so the app sees its true peer.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use mesh_contract::{marks, ports};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use super::{Pod, ProxyError};

/// Which proxy port a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    Outbound,
    InboundPlaintext,
    Hbone,
}

impl ListenerKind {
    pub const ALL: [ListenerKind; 3] = [
        ListenerKind::Outbound,
        ListenerKind::InboundPlaintext,
        ListenerKind::Hbone,
    ];

    pub fn port(self) -> u16 {
        match self {
            ListenerKind::Outbound => ports::OUTBOUND,
            ListenerKind::InboundPlaintext => ports::INBOUND_PLAINTEXT,
            ListenerKind::Hbone => ports::HBONE,
        }
    }
}

const BACKLOG: i32 = 1024;

/// Congestion control for loopback connections with the pod's own apps, the first the
/// kernel has. Not the pod's default: where that is BBR, its pacing (a timer per packet,
/// with no fq qdisc) buys nothing on loopback; on the benchmark VM its timers were about 6 %
/// of the sending ztunnel's samples (README, Performance).
const LOCAL_CONGESTION: [&str; 2] = ["cubic", "reno"];

/// Sets the first of [`LOCAL_CONGESTION`] the kernel has, found once per process so a
/// missing one costs no failed call per connection; none found, the pod's default stays.
fn set_local_congestion(s: &Socket) {
    static CHOSEN: std::sync::OnceLock<Option<&str>> = std::sync::OnceLock::new();
    let chosen = CHOSEN.get_or_init(|| {
        LOCAL_CONGESTION
            .into_iter()
            .find(|name| check_congestion_control(name).is_ok())
    });
    if let Some(name) = chosen {
        let _ = s.set_tcp_congestion(name.as_bytes());
    }
}

/// Sets `name` (`--hbone-congestion-control`), if given, on an HBONE socket.
fn set_hbone_congestion(s: &Socket, name: Option<&str>) -> io::Result<()> {
    match name {
        Some(name) => s.set_tcp_congestion(name.as_bytes()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("setting congestion control {name:?} on an HBONE socket: {e}"),
            )
        }),
        None => Ok(()),
    }
}

/// Fails unless this kernel offers congestion control `name`; run at start, so a mistyped
/// `--hbone-congestion-control` stops ztunnel instead of failing each HBONE connection.
pub fn check_congestion_control(name: &str) -> io::Result<()> {
    let s = Socket::new(Domain::IPV4, Type::STREAM.cloexec(), Some(Protocol::TCP))?;
    s.set_tcp_congestion(name.as_bytes()).map_err(|e| {
        let available =
            std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
                .unwrap_or_default();
        io::Error::new(
            e.kind(),
            format!(
                "congestion control {name:?} is not available ({e}); this kernel offers: {}",
                available.trim()
            ),
        )
    })
}

fn listener(
    kind: ListenerKind,
    addr: SocketAddr,
    hbone_congestion: Option<&str>,
) -> io::Result<std::net::TcpListener> {
    let domain = Domain::for_address(addr);
    let s = Socket::new(
        domain,
        Type::STREAM.nonblocking().cloexec(),
        Some(Protocol::TCP),
    )?;
    s.set_mark(marks::ZTUNNEL)?;
    s.set_reuse_address(true)?;
    // Several workers, and an old and a new ztunnel during a rolling update, share the port.
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_tcp_nodelay(true)?;
    // Accepted connections inherit it.
    match kind {
        ListenerKind::Outbound => set_local_congestion(&s),
        ListenerKind::Hbone => set_hbone_congestion(&s, hbone_congestion)?,
        ListenerKind::InboundPlaintext => {}
    }
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// Listeners for every port, `copies` times each (one set per worker), on the IPv4 wildcard
/// and, where the namespace has IPv6, the IPv6 wildcard; 15008's with `hbone_congestion`.
/// Must run inside the pod's netns.
pub fn pod_listeners(
    copies: usize,
    hbone_congestion: Option<&str>,
) -> io::Result<Vec<Vec<(ListenerKind, std::net::TcpListener)>>> {
    let v6 = ipv6_available();
    let mut all = Vec::with_capacity(copies);
    for _ in 0..copies {
        let mut set = Vec::new();
        for kind in ListenerKind::ALL {
            let v4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), kind.port());
            set.push((kind, listener(kind, v4, hbone_congestion)?));
            if v6 {
                let v6 = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), kind.port());
                set.push((kind, listener(kind, v6, hbone_congestion)?));
            }
        }
        all.push(set);
    }
    Ok(all)
}

/// Whether IPv6 is enabled in the current netns.
pub fn ipv6_available() -> bool {
    Socket::new(Domain::IPV6, Type::STREAM.cloexec(), None)
        .and_then(|s| s.bind(&SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 0).into()))
        .is_ok()
}

/// The destination the app asked for before the pod's rules redirected it here. `peer` is
/// the address `s` was accepted from: it has the socket's family, which picks the option to
/// read, without asking the kernel for the local address as well.
pub fn original_dst(s: &TcpStream, peer: SocketAddr) -> Result<SocketAddr, ProxyError> {
    let sock = SockRef::from(s);
    let addr = if peer.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    }
    .map_err(ProxyError::OriginalDst)?;
    addr.as_socket().ok_or_else(|| {
        ProxyError::OriginalDst(io::Error::other(
            "original destination is not an IP address",
        ))
    })
}

/// Where a connection opened from a pod's netns goes, which decides how its socket is set up.
#[derive(Clone, Copy, Debug)]
pub enum Toward<'a> {
    /// A mesh peer's HBONE port, across the network, with `--hbone-congestion-control` (if
    /// set).
    Hbone(Option<&'a str>),
    /// A destination outside the mesh, across the network (passthrough, plain TCP).
    Network,
    /// An app in this pod, over loopback, from the address of the remote client it is
    /// reached for (`IP_TRANSPARENT`), so the app sees its true peer.
    LocalApp { client: IpAddr },
}

/// Connects to `dst` from inside `pod`'s netns.
pub async fn connect(
    pod: &Pod,
    dst: SocketAddr,
    toward: Toward<'_>,
) -> Result<TcpStream, ProxyError> {
    let sock = pod
        .netns
        .run(|| {
            Socket::new(
                Domain::for_address(dst),
                Type::STREAM.nonblocking().cloexec(),
                Some(Protocol::TCP),
            )
        })
        .map_err(|e| ProxyError::Socket(io::Error::other(e)))?
        .map_err(ProxyError::Socket)?;
    let setup = || -> io::Result<()> {
        sock.set_mark(marks::ZTUNNEL)?;
        sock.set_tcp_nodelay(true)?;
        match toward {
            Toward::Hbone(congestion) => set_hbone_congestion(&sock, congestion)?,
            Toward::Network => {}
            Toward::LocalApp { client: src } => {
                set_local_congestion(&sock);
                // Transparent alone lets it bind the client's (non-local) address: the kernel
                // allows that for a transparent socket as for a free-binding one.
                match src {
                    IpAddr::V4(_) => sock.set_ip_transparent_v4(true)?,
                    IpAddr::V6(_) => sock.set_ip_transparent_v6(true)?,
                }
                // The port is picked at connect, where only the whole 4-tuple must be unique;
                // picked at bind, it would have to be free for this address alone, which many
                // connections from one client address can exhaust (not measured on its own).
                nix::sys::socket::setsockopt(
                    &sock,
                    nix::sys::socket::sockopt::IpBindAddressNoPort,
                    &true,
                )
                .map_err(io::Error::from)?;
                sock.bind(&SocketAddr::new(src, 0).into())?;
            }
        }
        Ok(())
    };
    setup().map_err(ProxyError::Socket)?;
    let sock = TcpSocket::from_std_stream(sock.into());
    // Without a deadline an unanswered SYN holds the app's connection for the kernel's two
    // minutes of retries.
    tokio::time::timeout(super::HANDSHAKE_TIMEOUT, sock.connect(dst))
        .await
        .map_err(|_| ProxyError::Timeout("the TCP connect"))?
        .map_err(|source| ProxyError::Connect { addr: dst, source })
}

/// Closes with a TCP reset rather than a FIN, so the peer sees a refusal, not an empty reply.
pub fn reset(s: TcpStream) {
    let _ = SockRef::from(&s).set_linger(Some(std::time::Duration::ZERO));
    drop(s);
}

//! What the agent reads from (and sets in) a pod's netns beside its rules: whether the pod
//! has IPv6 at all (decided per pod, never node-wide, so a pod with IPv6 always has it
//! captured), whether something serves DNS on 15053 before the pod's DNS is sent there, and
//! `tcp_migrate_req`, so a draining ztunnel's closed listeners hand their queued connections
//! to the new ztunnel's instead of resetting them.
//!
//! All of it reads or writes the namespace's own `/proc/sys/net` and `/proc/thread-self/net`
//! from a blocking thread that has entered it.

use std::sync::Arc;

use mesh_contract::ports;
use mesh_netns::NetNs;

/// Why the agent could not read or set what it needs in a pod's netns.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("entering the pod's netns")]
    Enter(#[from] mesh_netns::Error),
    #[error("the inspecting thread failed")]
    Thread(#[from] tokio::task::JoinError),
    #[error("{what} in the pod's netns")]
    Proc {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// DNS capture is on but the pod's DNS would go nowhere.
    #[error(
        "DNS capture is on but nothing serves {missing} on port {port} in the pod (does its ztunnel run a DNS proxy?); its DNS would be lost",
        port = ports::DNS
    )]
    DnsNotServed { missing: &'static str },
}

/// Runs `f` on a blocking thread inside `netns`.
async fn in_netns<T: Send + 'static>(
    netns: &Arc<NetNs>,
    f: impl FnOnce() -> Result<T, InspectError> + Send + 'static,
) -> Result<T, InspectError> {
    let ns = netns.clone();
    tokio::task::spawn_blocking(move || ns.run(f)?).await?
}

/// Whether `netns` has an IPv6 stack that is switched on.
pub async fn has_ipv6(netns: &Arc<NetNs>) -> Result<bool, InspectError> {
    in_netns(netns, || {
        match std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6") {
            Ok(v) => Ok(v.trim() == "0"),
            // The kernel has no IPv6 (ipv6.disable=1): nothing to capture.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(InspectError::Proc {
                what: "reading net.ipv6.conf.all.disable_ipv6",
                source,
            }),
        }
    })
    .await
}

/// Sets `net.ipv4.tcp_migrate_req` (it covers IPv6 too) in `netns`: during a rolling update
/// the old and new ztunnel listen on the same ports (`SO_REUSEPORT`); when the old one closes
/// its listeners, connections in their accept queues move to the new one's rather than being
/// reset. False on kernels without it (before 5.14).
pub async fn migrate_queued_connections(netns: &Arc<NetNs>) -> Result<bool, InspectError> {
    in_netns(netns, || {
        match std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1") {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(InspectError::Proc {
                what: "setting net.ipv4.tcp_migrate_req",
                source,
            }),
        }
    })
    .await
}

/// Ok when a UDP and a TCP socket are bound to port 15053 in `netns` (ztunnel's DNS proxy),
/// else why not: with DNS capture on, the pod's DNS would go nowhere.
pub async fn dns_served(netns: &Arc<NetNs>) -> Result<(), InspectError> {
    let [udp, udp6, tcp, tcp6] = in_netns(netns, || {
        Ok(["udp", "udp6", "tcp", "tcp6"].map(|t| {
            std::fs::read_to_string(format!("/proc/thread-self/net/{t}")).unwrap_or_default()
        }))
    })
    .await?;
    let udp = bound(&udp, ports::DNS, None) || bound(&udp6, ports::DNS, None);
    let tcp = bound(&tcp, ports::DNS, Some(LISTEN)) || bound(&tcp6, ports::DNS, Some(LISTEN));
    let missing = match (udp, tcp) {
        (true, true) => return Ok(()),
        (false, false) => "UDP or TCP",
        (false, true) => "UDP",
        (true, false) => "TCP",
    };
    Err(InspectError::DnsNotServed { missing })
}

/// The `st` column of a listening TCP socket.
const LISTEN: &str = "0A";

/// Whether a `/proc/net/{tcp,udp}[6]` table holds a socket bound to local `port` (in state
/// `state`, if given).
fn bound(table: &str, port: u16, state: Option<&str>) -> bool {
    let want = format!("{port:04X}");
    table.lines().skip(1).any(|line| {
        let mut cols = line.split_whitespace();
        let (Some(_slot), Some(local), Some(_remote), Some(st)) =
            (cols.next(), cols.next(), cols.next(), cols.next())
        else {
            return false;
        };
        local.rsplit_once(':').is_some_and(|(_, p)| p == want) && state.is_none_or(|s| s == st)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_sockets_are_read_from_proc_tables() {
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                   \x20 12: 0100007F:3ACD 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 0\n";
        assert!(bound(udp, 15053, None));
        assert!(!bound(udp, 53, None));
        let tcp = "  sl  local_address rem_address   st\n\
                   \x20  0: 00000000:3ACD 00000000:0000 0A 00000000:00000000\n\
                   \x20  1: 0100007F:0035 0100007F:3ACD 01 00000000:00000000\n";
        assert!(bound(tcp, 15053, Some(LISTEN)));
        // The far end of a connection is not a listener.
        assert!(!bound(tcp, 53, Some(LISTEN)));
        assert!(!bound("garbage\nno columns here\n", 15053, None));
    }

    #[tokio::test]
    async fn a_fresh_namespace_has_ipv6_unless_switched_off_and_serves_no_dns() {
        // Needs root (unshare): fails loudly without it.
        let ns = Arc::new(NetNs::new_isolated().unwrap());
        assert!(has_ipv6(&ns).await.unwrap());
        let err = dns_served(&ns).await.unwrap_err().to_string();
        assert!(
            err.contains("nothing serves UDP or TCP on port 15053"),
            "{err}"
        );
        ns.run(|| std::fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1"))
            .unwrap()
            .unwrap();
        assert!(!has_ipv6(&ns).await.unwrap());
        assert!(migrate_queued_connections(&ns).await.unwrap());
        let set = ns
            .run(|| std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req"))
            .unwrap()
            .unwrap();
        assert_eq!(set.trim(), "1");
        // Something listening on both makes it served.
        let (_udp, _tcp) = ns
            .run(|| {
                (
                    std::net::UdpSocket::bind("0.0.0.0:15053").unwrap(),
                    std::net::TcpListener::bind("0.0.0.0:15053").unwrap(),
                )
            })
            .unwrap();
        dns_served(&ns).await.unwrap();
    }
}

//! The node contract: the numbers and names that ztunnel, the node agent, the CNI plugin and
//! Istio's own implementations of them must agree on (SPEC §1–§4).
//!
//! This crate holds constants and wire schemas only ([`cni_event`]: the plugin's requests to
//! the agent), and the one way errors are printed ([`Chain`]). It must not grow behaviour:
//! anything that decides or does something belongs to the program that owns it.

#![forbid(unsafe_code)]

use std::net::{Ipv4Addr, Ipv6Addr};

pub mod cni_event;
mod errors;

pub use errors::Chain;

/// Ports ztunnel opens inside every enrolled pod's network namespace.
pub mod ports {
    /// Outbound capture: the pod's own TCP to anywhere is redirected here.
    pub const OUTBOUND: u16 = 15001;
    /// Inbound plaintext capture: TCP from peers that do not speak HBONE.
    pub const INBOUND_PLAINTEXT: u16 = 15006;
    /// Inbound HBONE (mTLS + HTTP/2 CONNECT); never redirected.
    pub const HBONE: u16 = 15008;
    /// DNS proxy on localhost (UDP and TCP) when DNS capture is on.
    pub const DNS: u16 = 15053;

    /// ztunnel's admin endpoint (localhost only), in ztunnel's own netns.
    pub const ADMIN: u16 = 15000;
    /// Prometheus metrics, in ztunnel's own netns.
    pub const METRICS: u16 = 15020;
    /// Readiness, in ztunnel's own netns.
    pub const READINESS: u16 = 15021;

    /// A connection whose final destination is one of these ports is refused: it would loop
    /// back into the proxy.
    pub const LOOP_GUARD: [u16; 3] = [OUTBOUND, INBOUND_PLAINTEXT, HBONE];
}

/// Packet and connection marks used by the in-pod redirection.
pub mod marks {
    /// `SO_MARK` on every socket ztunnel opens inside a pod netns; rules never redirect it.
    pub const ZTUNNEL: u32 = 0x539;
    /// The mask applied before comparing [`ZTUNNEL`] and [`CONNTRACK_REPLY`].
    pub const MASK: u32 = 0xfff;
    /// Conntrack mark for connections ztunnel made to a local app with a spoofed source, so
    /// that the app's replies are routed back to ztunnel.
    pub const CONNTRACK_REPLY: u32 = 0x111;
    /// Routing table that delivers [`CONNTRACK_REPLY`]-marked packets locally.
    pub const ROUTE_TABLE: u32 = 100;
    /// Priority of the policy rule `fwmark 0x111/0xfff lookup 100`.
    pub const RULE_PRIORITY: u32 = 32764;
    /// Conntrack zone for ztunnel's own upstream DNS flows.
    pub const DNS_CONNTRACK_ZONE: u16 = 1;
}

/// The source address kubelet's probes are SNATed to on the host, so pods can let them
/// bypass the proxy.
pub const PROBE_SNAT_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// IPv6 form of [`PROBE_SNAT_V4`].
pub const PROBE_SNAT_V6: Ipv6Addr = Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);

/// Default filesystem locations (all configurable).
pub mod paths {
    /// The ZDS socket the node agent listens on and ztunnel connects to.
    pub const ZDS_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";
    /// The node agent's run dir, holding the CNI event socket.
    pub const AGENT_RUN_DIR: &str = "/var/run/istio-cni";
    /// CNI plugin binaries on the host.
    pub const CNI_BIN_DIR: &str = "/opt/cni/bin";
    /// CNI network configurations on the host.
    pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
}

/// The SPIFFE trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

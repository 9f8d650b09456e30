//! The data path: per-pod listeners and what happens to each accepted connection.
//!
//! Every pod is served by every worker: each worker thread runs its own single-threaded
//! runtime and owns one `SO_REUSEPORT` listener per port per pod, so the kernel spreads
//! connections across workers and a connection never changes thread. Outbound tunnels use the
//! worker's own HBONE connection [`pool`], so the app socket, the HTTP/2 stream and the TLS
//! connection under it are all driven by one thread with no cross-thread wake-ups per message,
//! and several workers means several HBONE connections (no single-connection ceiling).
//!
//! - [`outbound`]: 15001, the pod's own TCP out, tunnelled or passed through.
//! - [`inbound`]: 15008, HBONE in: mTLS, CONNECT validation, transparent connect to the app.
//! - [`plaintext`]: 15006, plain TCP in from peers outside the mesh.
//! - [`hbone`]: CONNECT request building and validation (sans IO).
//! - [`app_tunnel`]: the PROXY v2 header for application-tunnel workloads;
//! - [`copy`]: byte shuttling with half-close, TCP↔HTTP/2 and TCP↔TCP.
//! - [`dns`]: 15053, the pod's DNS, answered from the state or forwarded upstream;
//! - [`double`]: double HBONE through another network's gateway (TLS inside a tunnel);
//! - [`socket`]: sockets in a pod's netns (mark 0x539, transparent bind, original dst);
//! - [`readahead`]: large socket reads under TLS;
//! - [`limits`]: connection caps, in all and per source address;
//! - [`accesslog`]: one event per finished connection and its Istio TCP metrics;
//! - [`tracker`]: live connections, for the debug view and for closing the ones a policy
//!   change denies.

pub mod accesslog;
pub mod app_tunnel;
pub mod copy;
pub mod dns;
pub mod double;
pub mod hbone;
pub mod inbound;
pub mod limits;
pub mod outbound;
pub mod plaintext;
pub mod pool;
pub mod readahead;
pub mod socket;
pub mod spin;
pub mod tracker;
pub mod worker;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_netns::NetNs;
use mesh_zds::client::WorkloadInfo;

use crate::config::Config;
use crate::drain::Drain;
use crate::identity::Identity;
use crate::identity::manager::{CertHandle, CertManager};
use crate::metrics::Metrics;
use crate::proxy::accesslog::WorkloadRef;
use crate::state::authz::DenyReason;
use crate::state::{State, StateHandle};
use crate::tls::TlsContext;

/// How long TCP connect plus TLS and HTTP/2 handshakes may take; also the bound on a plain
/// upstream connect and on waiting for a free stream on a pooled connection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Shared, read-mostly inputs of the data path.
#[derive(Debug)]
pub struct ProxyInputs {
    pub config: Arc<Config>,
    pub state: StateHandle,
    pub certs: Arc<CertManager>,
    pub tls: TlsContext,
    pub metrics: Arc<Metrics>,
    pub conns: Arc<tracker::ConnTracker>,
    pub limits: Arc<limits::ConnLimits>,
}

/// An enrolled pod on this node, as every worker sees it.
#[derive(Debug)]
pub struct Pod {
    pub uid: String,
    pub info: WorkloadInfo,
    pub identity: Identity,
    pub netns: NetNs,
    pub cert: CertHandle,
    pub server_tls: Arc<rustls::ServerConfig>,
    pub drain: Drain,
}

impl Pod {
    /// `namespace/name`, for logs (formatted where it is printed, never stored).
    pub fn name(&self) -> impl std::fmt::Display + '_ {
        PodName(self)
    }

    /// This pod's workload entry: by uid, else by `ip` when that workload is in the pod's
    /// namespace.
    pub fn entry<'s>(
        &self,
        state: &'s State,
        ip: std::net::IpAddr,
    ) -> Option<&'s Arc<crate::state::Workload>> {
        state.workloads.get(&self.uid).or_else(|| {
            state
                .workload_by_ip(ip)
                .filter(|w| w.namespace == self.info.namespace)
        })
    }

    /// This pod as logs and metrics name it, given its workload entry (from [`Pod::entry`]):
    /// the entry when the state has one, else its ZDS name.
    pub fn workload_ref(
        self: &Arc<Self>,
        entry: Option<&Arc<crate::state::Workload>>,
    ) -> WorkloadRef {
        entry.map_or_else(
            || WorkloadRef::Pod(self.clone()),
            |w| WorkloadRef::Entry(w.clone()),
        )
    }
}

struct PodName<'a>(&'a Pod);

impl std::fmt::Display for PodName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.0.info.namespace, self.0.info.name)
    }
}

/// Why a proxied connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot read the original destination")]
    OriginalDst(#[source] io::Error),
    #[error("destination {0} is a proxy port; refusing the loop")]
    Loop(SocketAddr),
    #[error("destination {dst} is not this pod's address {pod_ip}")]
    NotThisPod { dst: SocketAddr, pod_ip: String },
    #[error("destination {0} is not a known workload (registry-only mode)")]
    RegistryOnly(SocketAddr),
    #[error("{target} cannot take this connection: {reason}")]
    Unroutable {
        target: String,
        reason: &'static str,
    },
    #[error("socket setup in the pod netns")]
    Socket(#[source] io::Error),
    #[error("connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("TLS with {addr}")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("TLS setup")]
    TlsSetup(#[from] crate::tls::TlsSetupError),
    #[error("HTTP/2")]
    H2(#[from] h2::Error),
    #[error("timed out during {0}")]
    Timeout(&'static str),
    #[error(transparent)]
    Copy(#[from] copy::CopyError),
    #[error("terminated by drain")]
    Drained,
    #[error("CONNECT {authority} refused with {}: {}", rejection.status, rejection.reason)]
    BadRequest {
        authority: String,
        rejection: hbone::Rejection,
    },
    #[error("{0}")]
    Denied(DenyReason),
    #[error("closed after a policy change: {0}")]
    Revoked(DenyReason),
}

impl ProxyError {
    /// Istio's `response_flags` label: `DENY` when policy refused the connection (here or at
    /// the peer), `CONNECT` when it could not be established, `-` otherwise.
    pub fn response_flags(&self) -> &'static str {
        match self {
            ProxyError::Denied(_)
            | ProxyError::Revoked(_)
            | ProxyError::Copy(copy::CopyError::Refused(http::StatusCode::UNAUTHORIZED)) => "DENY",
            ProxyError::Connect { .. }
            | ProxyError::Tls { .. }
            | ProxyError::TlsSetup(_)
            | ProxyError::H2(_)
            | ProxyError::Timeout(_)
            | ProxyError::Unroutable { .. }
            | ProxyError::RegistryOnly(_)
            | ProxyError::Loop(_)
            | ProxyError::NotThisPod { .. }
            | ProxyError::BadRequest { .. }
            | ProxyError::Socket(_)
            | ProxyError::OriginalDst(_)
            | ProxyError::Copy(copy::CopyError::Refused(_)) => "CONNECT",
            ProxyError::Copy(_) | ProxyError::Drained => "-",
        }
    }

    /// A short stable name for the failure, the `reason` label of
    /// `ztunnel_connection_failures_total`.
    pub fn reason(&self) -> &'static str {
        use copy::CopyError as C;
        match self {
            ProxyError::OriginalDst(_) => "original_dst",
            ProxyError::Loop(_) => "loop",
            ProxyError::NotThisPod { .. } => "not_this_pod",
            ProxyError::RegistryOnly(_) => "registry_only",
            ProxyError::Unroutable { .. } => "unroutable",
            ProxyError::Socket(_) => "socket",
            ProxyError::Connect { .. } => "connect",
            ProxyError::Tls { .. } => "tls",
            ProxyError::TlsSetup(_) => "tls_setup",
            ProxyError::H2(_) => "http2",
            ProxyError::Timeout(_) => "timeout",
            ProxyError::Drained => "drained",
            ProxyError::BadRequest { .. } => "bad_request",
            ProxyError::Denied(_) => "policy_denied",
            ProxyError::Revoked(_) => "policy_revoked",
            ProxyError::Copy(C::Refused(http::StatusCode::UNAUTHORIZED)) => "peer_denied",
            ProxyError::Copy(C::Refused(_)) => "peer_refused",
            ProxyError::Copy(C::AppRead(_) | C::AppWrite(_)) => "app_reset",
            ProxyError::Copy(C::Stream(_) | C::StreamGone | C::Upstream(_)) => "peer_reset",
            ProxyError::Copy(C::Stopped) => "stopped",
        }
    }
}

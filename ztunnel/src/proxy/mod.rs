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
//! - [`copy`]: byte shuttling with half-close, TCP↔HTTP/2 and TCP↔TCP.
//! - [`socket`]: sockets in a pod's netns (mark 0x539, transparent bind, original dst);
//! - [`readahead`]: large socket reads under TLS.

pub mod copy;
pub mod hbone;
pub mod inbound;
pub mod outbound;
pub mod plaintext;
pub mod pool;
pub mod readahead;
pub mod socket;
pub mod spin;
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
use crate::state::StateHandle;
use crate::tls::TlsContext;

/// How long TCP connect plus TLS and HTTP/2 handshakes may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Shared, read-mostly inputs of the data path.
#[derive(Debug)]
pub struct ProxyInputs {
    pub config: Arc<Config>,
    pub state: StateHandle,
    pub certs: Arc<CertManager>,
    pub tls: TlsContext,
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
    /// `namespace/name`, for logs.
    pub fn name(&self) -> String {
        format!("{}/{}", self.info.namespace, self.info.name)
    }
}

/// Whose fault a failed connection was, for logs, metrics and response flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The local app or pod (bad destination, loop).
    Downstream,
    /// The remote side or the upstream app.
    Upstream,
    /// Our configuration or state (unknown destination in registry-only mode).
    Config,
    /// This proxy (socket setup, missing certificate).
    Local,
}

/// Why a proxied connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot read the original destination")]
    OriginalDst(#[source] io::Error),
    #[error("destination {0} is a proxy port; refusing the loop")]
    Loop(SocketAddr),
    #[error("destination {0} is not a known workload (registry-only mode)")]
    RegistryOnly(SocketAddr),
    #[error("service {service} cannot take this connection: {reason}")]
    Unroutable {
        service: String,
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
}

impl ProxyError {
    pub fn fault(&self) -> Fault {
        match self {
            ProxyError::Loop(_)
            | ProxyError::Copy(copy::CopyError::AppRead(_) | copy::CopyError::AppWrite(_)) => {
                Fault::Downstream
            }
            ProxyError::Copy(_) => Fault::Upstream,
            ProxyError::RegistryOnly(_) | ProxyError::Unroutable { .. } => Fault::Config,
            ProxyError::Connect { .. }
            | ProxyError::Tls { .. }
            | ProxyError::H2(_)
            | ProxyError::Timeout(_) => Fault::Upstream,
            ProxyError::OriginalDst(_)
            | ProxyError::Socket(_)
            | ProxyError::TlsSetup(_)
            | ProxyError::Drained => Fault::Local,
        }
    }
}

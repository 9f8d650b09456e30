//! ZDS ("ztunnel discovery service"), the protocol by which the node agent hands enrolled pods'
//! network namespaces to ztunnel (SPEC §4).
//!
//! Three layers, each usable on its own:
//! - [`proto`]: the protobuf messages, generated from `proto/zds.proto`;
//! - [`client`] and [`server`]: sans-IO session state machines for the ztunnel and node-agent
//!   halves. They validate the exchange (hello first, snapshot then live updates, exactly one
//!   fd on an add and none elsewhere, one request in flight) and never touch a socket;
//! - [`transport`]: an async `SOCK_SEQPACKET` socket that sends and receives one datagram with
//!   its file descriptors, treating truncation as an error.
//!
//! `transport` is the one module in the workspace with `unsafe`: adopting descriptors that
//! arrived with `SCM_RIGHTS` or from `accept4`, and registering them with the reactor.

pub mod client;
pub mod fuzz;
pub mod server;
#[allow(unsafe_code)] // adopting received descriptors; each block says why it is sound
pub mod transport;

/// Messages of package `istio.workload.zds`.
#[allow(missing_debug_implementations, unused_qualifications, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
}

/// Size of the receive buffer both halves use; a larger datagram is an error (SPEC §4).
pub const MAX_DATAGRAM: usize = 1024;

/// How long the agent waits for ztunnel's answer to one request.
pub const ACK_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// A protocol violation by the peer. Each names what was wrong with the datagram.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("undecodable message: {0}")]
    Decode(String),
    #[error("message has no payload")]
    EmptyPayload,
    #[error("{kind} must carry exactly one file descriptor, got {got}")]
    FdCount { kind: &'static str, got: usize },
    #[error("{0} without a uid")]
    MissingUid(&'static str),
    #[error("add for {0} has no workload_info")]
    MissingWorkloadInfo(String),
    #[error("add for {0}: DNS nameserver {1:?} is not an IP address")]
    BadNameserver(String, String),
    #[error("keep for {0} after the snapshot ended")]
    KeepAfterSnapshot(String),
    #[error("second snapshot_sent on one connection")]
    DuplicateSnapshot,
    #[error("unsupported protocol version {0}")]
    Version(i32),
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
}

//! Access logging: exactly one event (target `access`) per finished connection.

use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

use crate::identity::Identity;

/// Which listener a connection came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From a local pod, through 15001.
    Outbound,
    /// From a mesh peer, through 15008.
    InboundHbone,
    /// From a non-mesh peer, through 15006.
    InboundPlaintext,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Outbound => "outbound",
            Direction::InboundHbone => "inbound",
            Direction::InboundPlaintext => "inbound-plaintext",
        })
    }
}

/// Facts gathered over one connection's life, logged once at the end.
#[derive(Debug)]
pub struct ConnLog {
    pub direction: Direction,
    /// The enrolled pod on this node (`namespace/name`).
    pub pod: String,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The HBONE peer address, when tunnelled.
    pub hbone: Option<SocketAddr>,
    pub src_identity: Option<Identity>,
    pub dst_identity: Option<Identity>,
    pub dst_workload: Option<String>,
    pub dst_service: Option<String>,
    /// `mtls` when the bytes crossed the network inside HBONE, else `none`.
    pub security: &'static str,
    pub start: Instant,
}

struct Opt<'a, T>(&'a Option<T>);

impl<T: fmt::Display> fmt::Display for Opt<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

impl ConnLog {
    pub fn new(direction: Direction, pod: String, src: SocketAddr, dst: SocketAddr) -> Self {
        Self {
            direction,
            pod,
            src,
            dst,
            hbone: None,
            src_identity: None,
            dst_identity: None,
            dst_workload: None,
            dst_service: None,
            security: "none",
            start: Instant::now(),
        }
    }

    /// Emits the access-log event. `error` is `None` for a clean close.
    pub fn finish(
        self,
        sent: u64,
        received: u64,
        error: Option<&(dyn std::error::Error + 'static)>,
    ) {
        let duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let reason = match error {
            Some(e) => crate::errors::Chain(e).to_string(),
            None => "closed".to_string(),
        };
        tracing::info!(
            target: "access",
            direction = %self.direction,
            pod = %self.pod,
            src.addr = %self.src,
            src.identity = %Opt(&self.src_identity),
            dst.addr = %self.dst,
            dst.hbone = %Opt(&self.hbone),
            dst.identity = %Opt(&self.dst_identity),
            dst.workload = %Opt(&self.dst_workload),
            dst.service = %Opt(&self.dst_service),
            security = self.security,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = format_args!("{duration_ms:.3}"),
            reason = %reason,
            "connection complete"
        );
    }
}

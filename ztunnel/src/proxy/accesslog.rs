//! Access logging and connection metrics: exactly one event (target `access`) per finished
//! connection, and the matching Istio TCP metrics.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::identity::Identity;
use crate::metrics::{ConnLabels, FailureLabels, Metrics};
use crate::proxy::{Pod, ProxyError};
use crate::state::{Service, Workload};
use mesh_contract::Chain;

/// Which listener a connection came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Direction {
    /// From a local pod, through 15001.
    #[serde(rename = "outbound")]
    Outbound,
    /// From a mesh peer, through 15008.
    #[serde(rename = "inbound")]
    InboundHbone,
    /// From a non-mesh peer, through 15006.
    #[serde(rename = "inbound-plaintext")]
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

/// A workload as the log and metrics name it: its state entry, or an enrolled pod the state
/// does not know, by its ZDS name. Shared, not copied: a connection holds two of these for
/// its whole life.
#[derive(Clone, Debug)]
pub enum WorkloadRef {
    Entry(Arc<Workload>),
    Pod(Arc<Pod>),
}

impl WorkloadRef {
    pub fn namespace(&self) -> &str {
        match self {
            WorkloadRef::Entry(w) => &w.namespace,
            WorkloadRef::Pod(p) => &p.info.namespace,
        }
    }

    /// Istio's `workload` label: the owning workload's name when known, else the pod's.
    pub fn workload(&self) -> &str {
        match self {
            WorkloadRef::Entry(w) if !w.workload_name.is_empty() => &w.workload_name,
            WorkloadRef::Entry(w) => &w.name,
            WorkloadRef::Pod(p) => &p.info.name,
        }
    }
}

/// `namespace/name` of the pod.
impl fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            WorkloadRef::Entry(w) => &w.name,
            WorkloadRef::Pod(p) => &p.info.name,
        };
        write!(f, "{}/{name}", self.namespace())
    }
}

/// Facts gathered over one connection's life, logged (and counted) once at the end.
#[derive(Debug)]
pub struct ConnLog {
    pub direction: Direction,
    /// The enrolled pod on this node.
    pub pod: Arc<Pod>,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The HBONE peer address, when tunnelled.
    pub hbone: Option<SocketAddr>,
    pub src_identity: Option<Identity>,
    pub dst_identity: Option<Identity>,
    pub src_workload: Option<WorkloadRef>,
    pub dst_workload: Option<WorkloadRef>,
    pub dst_service: Option<Arc<Service>>,
    /// The waypoint or network gateway the connection went through.
    pub via: Option<String>,
    /// `mtls` when the bytes crossed the network inside HBONE, else `none`.
    pub security: &'static str,
    /// A dry-run policy's would-be verdict, when it differs from the enforced one.
    pub dry_run: Option<String>,
    pub start: Instant,
    metrics: Arc<Metrics>,
    opened: bool,
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

const UNKNOWN: &str = "unknown";

impl ConnLog {
    pub fn new(
        direction: Direction,
        pod: &Arc<Pod>,
        src: SocketAddr,
        dst: SocketAddr,
        metrics: &Arc<Metrics>,
    ) -> Self {
        Self {
            direction,
            pod: pod.clone(),
            src,
            dst,
            hbone: None,
            src_identity: None,
            dst_identity: None,
            src_workload: None,
            dst_workload: None,
            dst_service: None,
            via: None,
            security: "none",
            dry_run: None,
            start: Instant::now(),
            metrics: metrics.clone(),
            opened: false,
        }
    }

    fn labels(&self, response_flags: &'static str) -> ConnLabels {
        let principal = |i: &Option<Identity>| {
            i.as_ref()
                .map_or_else(|| UNKNOWN.to_string(), ToString::to_string)
        };
        let workload = |w: &Option<WorkloadRef>| {
            w.as_ref().map_or_else(
                || (UNKNOWN.to_string(), UNKNOWN.to_string()),
                |w| (w.workload().to_string(), w.namespace().to_string()),
            )
        };
        let (source_workload, source_workload_namespace) = workload(&self.src_workload);
        let (destination_workload, destination_workload_namespace) = workload(&self.dst_workload);
        ConnLabels {
            reporter: match self.direction {
                Direction::Outbound => "source",
                _ => "destination",
            },
            source_workload,
            source_workload_namespace,
            source_principal: principal(&self.src_identity),
            destination_workload,
            destination_workload_namespace,
            destination_principal: principal(&self.dst_identity),
            destination_service: self
                .dst_service
                .as_ref()
                .map_or_else(|| UNKNOWN.to_string(), |s| s.hostname.clone()),
            request_protocol: "tcp",
            response_flags,
            connection_security_policy: if self.security == "mtls" {
                "mutual_tls"
            } else {
                "unknown"
            },
        }
    }

    /// Counts the connection as opened; call once what it is for is known.
    pub fn open(&mut self) {
        if !self.opened {
            self.opened = true;
            self.metrics.opened.get_or_create(&self.labels("-")).inc();
        }
    }

    /// Emits the access-log event and the close metrics. `error` is `None` for a clean close.
    pub fn finish(mut self, sent: u64, received: u64, error: Option<&ProxyError>) {
        let flags = error.map_or("-", ProxyError::response_flags);
        let labels = self.labels(flags);
        let m = &self.metrics;
        if !std::mem::replace(&mut self.opened, true) {
            m.opened.get_or_create(&labels).inc();
        }
        m.closed.get_or_create(&labels).inc();
        // Istio counts response bytes as sent, request bytes as received; the local app is
        // the source outbound and the destination inbound.
        let (request, response) = match self.direction {
            Direction::Outbound => (sent, received),
            _ => (received, sent),
        };
        m.sent_bytes.get_or_create(&labels).inc_by(response);
        m.received_bytes.get_or_create(&labels).inc_by(request);
        if let Some(e) = error {
            m.failures
                .get_or_create(&FailureLabels {
                    direction: match self.direction {
                        Direction::Outbound => "outbound",
                        Direction::InboundHbone => "inbound",
                        Direction::InboundPlaintext => "inbound_plaintext",
                    },
                    reason: e.reason(),
                })
                .inc();
        }
        let duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        let reason = match error {
            Some(e) => Chain(e).to_string(),
            None => "closed".to_string(),
        };
        let dst_service = self.dst_service.as_ref().map(|s| &s.hostname);
        tracing::info!(
            target: "access",
            direction = %self.direction,
            pod = %self.pod.name(),
            src.addr = %self.src,
            src.identity = %Opt(&self.src_identity),
            src.workload = %Opt(&self.src_workload),
            dst.addr = %self.dst,
            dst.hbone = %Opt(&self.hbone),
            dst.identity = %Opt(&self.dst_identity),
            dst.workload = %Opt(&self.dst_workload),
            dst.service = %Opt(&dst_service),
            via = %Opt(&self.via),
            security = self.security,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = format_args!("{duration_ms:.3}"),
            response_flags = %flags,
            dry_run = %Opt(&self.dry_run),
            reason = %reason,
            "connection complete"
        );
    }
}

//! Access logging and connection metrics: exactly one event (target `access`) per finished
//! connection, and the matching Istio TCP metrics.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::identity::Identity;
use crate::metrics::{ConnLabels, FailureLabels, Metrics};
use crate::proxy::ProxyError;
use crate::state::Workload;
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

/// A workload as the log and metrics name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadRef {
    pub namespace: String,
    /// Istio's `workload` label: the owning workload's name when known, else the pod's.
    pub workload: String,
    /// `namespace/name` of the pod.
    pub pod: String,
}

impl WorkloadRef {
    pub fn of(w: &Workload) -> Self {
        WorkloadRef {
            namespace: w.namespace.clone(),
            workload: if w.workload_name.is_empty() {
                w.name.clone()
            } else {
                w.workload_name.clone()
            },
            pod: format!("{}/{}", w.namespace, w.name),
        }
    }

    /// An enrolled pod on this node, known by its ZDS name when the state lacks it.
    pub fn pod(namespace: &str, name: &str) -> Self {
        WorkloadRef {
            namespace: namespace.to_string(),
            workload: name.to_string(),
            pod: format!("{namespace}/{name}"),
        }
    }
}

/// Facts gathered over one connection's life, logged (and counted) once at the end.
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
    pub src_workload: Option<WorkloadRef>,
    pub dst_workload: Option<WorkloadRef>,
    pub dst_service: Option<String>,
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
        pod: String,
        src: SocketAddr,
        dst: SocketAddr,
        metrics: &Arc<Metrics>,
    ) -> Self {
        Self {
            direction,
            pod,
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
                |w| (w.workload.clone(), w.namespace.clone()),
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
                .clone()
                .unwrap_or_else(|| UNKNOWN.to_string()),
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
        let src_workload = self.src_workload.as_ref().map(|w| &w.pod);
        let dst_workload = self.dst_workload.as_ref().map(|w| &w.pod);
        tracing::info!(
            target: "access",
            direction = %self.direction,
            pod = %self.pod,
            src.addr = %self.src,
            src.identity = %Opt(&self.src_identity),
            src.workload = %Opt(&src_workload),
            dst.addr = %self.dst,
            dst.hbone = %Opt(&self.hbone),
            dst.identity = %Opt(&self.dst_identity),
            dst.workload = %Opt(&dst_workload),
            dst.service = %Opt(&self.dst_service),
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

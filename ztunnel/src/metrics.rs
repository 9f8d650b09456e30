//! The counters the data path updates, with Istio's names and labels so existing dashboards
//! work: `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`. Bytes are counted when a
//! connection closes. Readings (pod proxies, certificates, ZDS state, process figures) are not
//! here: [`crate::scrape`] takes them when Prometheus scrapes, so the data path never
//! updates them.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Istio's TCP metric labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

/// Counters the data path updates.
#[derive(Debug, Default)]
pub struct Metrics {
    pub opened: Family<ConnLabels, Counter>,
    pub closed: Family<ConnLabels, Counter>,
    pub sent_bytes: Family<ConnLabels, Counter>,
    pub received_bytes: Family<ConnLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub policy_revocations: Counter,
}

impl Metrics {
    /// Registers the counters into `registry`.
    pub fn register(self: &Arc<Self>, registry: &mut Registry) {
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            self.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            self.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent by the source towards the destination, counted at close",
            self.sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes the source received from the destination, counted at close",
            self.received_bytes.clone(),
        );
        registry.register(
            "ztunnel_connection_failures",
            "Connections that failed or were refused, by direction and reason",
            self.failures.clone(),
        );
        registry.register(
            "ztunnel_policy_revocations",
            "Live connections closed because a policy change denies them",
            self.policy_revocations.clone(),
        );
    }
}

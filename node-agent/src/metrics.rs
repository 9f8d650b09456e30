//! The agent's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabel {
    pub step: String,
}

/// Every metric the agent exports.
#[derive(Debug, Default)]
pub struct Metrics {
    pub pods_enrolled: Gauge,
    pub pods_pending: Gauge,
    pub rule_repairs: Counter,
    pub state_file_errors: Counter,
    pub zds_connections: Gauge,
    pub cni_requests: Family<ResultLabel, Counter>,
    pub enroll_failures: Family<StepLabel, Counter>,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("ambient_agent");
        r.register(
            "pods_enrolled",
            "Pods whose traffic ztunnel captures",
            self.pods_enrolled.clone(),
        );
        r.register(
            "pods_pending",
            "Pods meant for the mesh but not yet enrolled",
            self.pods_pending.clone(),
        );
        r.register(
            "rule_repairs",
            "Redirection rules found missing or changed and reinstalled",
            self.rule_repairs.clone(),
        );
        r.register(
            "state_file_errors",
            "State files found unreadable (torn or edited) at start; each is moved aside",
            self.state_file_errors.clone(),
        );
        r.register(
            "zds_connections",
            "ztunnels connected over ZDS",
            self.zds_connections.clone(),
        );
        r.register(
            "cni_requests",
            "CNI plugin requests by result",
            self.cni_requests.clone(),
        );
        r.register(
            "enroll_failures",
            "Enrollment failures by step",
            self.enroll_failures.clone(),
        );
    }

    pub fn failure(&self, step: &str) {
        self.enroll_failures
            .get_or_create(&StepLabel { step: step.into() })
            .inc();
    }
}

//! One state model, several sources. Each source (the local file, the control plane)
//! delivers [`Parts`]: workloads with the services they back, services, policies. [`Sources`]
//! keeps the latest parts of each and publishes their union as one [`State`] whenever one of
//! them changes, so the data path never knows where a workload came from.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use super::policy::Authorization;
use super::{Endpoint, Service, State, StateHandle, Workload};

/// The services a workload backs: `namespace/hostname` → service port → target port.
pub type BackedServices = BTreeMap<String, BTreeMap<u16, u16>>;

/// What one source knows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parts {
    /// Each workload with the services it backs.
    pub workloads: Vec<(Workload, BackedServices)>,
    /// Services, with any endpoints they list themselves.
    pub services: Vec<Service>,
    pub policies: Vec<Authorization>,
}

impl Parts {
    /// Builds a snapshot: services get an endpoint for every workload that names them.
    pub fn build(self) -> State {
        let mut by_service: HashMap<String, Vec<Endpoint>> = HashMap::new();
        let mut workloads = Vec::with_capacity(self.workloads.len());
        for (w, services) in self.workloads {
            for (key, ports) in services {
                by_service.entry(key).or_default().push(Endpoint {
                    workload_uid: w.uid.clone(),
                    port: ports,
                    status: super::HealthStatus::Healthy,
                });
            }
            workloads.push(w);
        }
        let mut services = self.services;
        for s in &mut services {
            if let Some(eps) = by_service.remove(&s.key()) {
                s.endpoints.extend(eps);
            }
        }
        if let Some(orphan) = by_service.keys().min() {
            tracing::warn!(service = %orphan, "workloads name a service that is not defined");
        }
        State::new(workloads, services, self.policies)
    }

    /// The union of `self` and `other`; on a clash (same workload uid, service key or policy
    /// key) `other` wins.
    pub fn merged(mut self, other: &Parts) -> Parts {
        let uids: std::collections::HashSet<&str> = other
            .workloads
            .iter()
            .map(|(w, _)| w.uid.as_str())
            .collect();
        self.workloads
            .retain(|(w, _)| !uids.contains(w.uid.as_str()));
        self.workloads.extend(other.workloads.iter().cloned());
        let keys: std::collections::HashSet<String> =
            other.services.iter().map(Service::key).collect();
        self.services.retain(|s| !keys.contains(&s.key()));
        self.services.extend(other.services.iter().cloned());
        let pkeys: std::collections::HashSet<String> =
            other.policies.iter().map(super::authz::key).collect();
        self.policies
            .retain(|p| !pkeys.contains(&super::authz::key(p)));
        self.policies.extend(other.policies.iter().cloned());
        self
    }
}

/// Which source a [`Parts`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    LocalFile,
    ControlPlane,
}

/// The latest parts of every source, published as one state.
#[derive(Debug, Clone)]
pub struct Sources {
    latest: Arc<Mutex<(Parts, Parts)>>,
    state: StateHandle,
}

impl Sources {
    pub fn new(state: StateHandle) -> Self {
        Self {
            latest: Arc::default(),
            state,
        }
    }

    /// Replaces what `source` knows and publishes the union (the control plane wins clashes).
    pub fn set(&self, source: Source, parts: Parts) {
        let mut latest = self.latest.lock().expect("not poisoned");
        match source {
            Source::LocalFile => latest.0 = parts,
            Source::ControlPlane => latest.1 = parts,
        }
        let union = latest.0.clone().merged(&latest.1);
        self.state.store(union.build());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::local::parse_parts;

    #[test]
    fn sources_merge_and_the_control_plane_wins_clashes() {
        let file = parse_parts(
            r#"
workloads:
- {uid: w1, name: a, namespace: ns, workloadIps: [198.18.0.1], serviceAccount: from-file}
- {uid: w2, name: b, namespace: ns, workloadIps: [198.18.0.2], services: {"ns/svc.ns": {80: 8080}}}
services:
- {name: svc, namespace: ns, hostname: svc.ns, vips: [198.19.0.1], ports: {80: 8080}}
"#,
            "td",
        )
        .unwrap();
        let xds = parse_parts(
            r#"
workloads:
- {uid: w1, name: a, namespace: ns, workloadIps: [198.18.0.1], serviceAccount: from-xds}
- {uid: w3, name: c, namespace: ns, workloadIps: [198.18.0.3], services: {"ns/svc.ns": {80: 9090}}}
"#,
            "td",
        )
        .unwrap();
        let handle = StateHandle::default();
        let sources = Sources::new(handle.clone());
        sources.set(Source::LocalFile, file);
        sources.set(Source::ControlPlane, xds);
        let state = handle.load();
        assert_eq!(state.workloads.len(), 3);
        assert_eq!(state.workloads["w1"].service_account, "from-xds");
        // The file's service gets endpoints from both sources' workloads.
        let svc = &state.services["ns/svc.ns"];
        let mut eps: Vec<&str> = svc
            .endpoints
            .iter()
            .map(|e| e.workload_uid.as_str())
            .collect();
        eps.sort();
        assert_eq!(eps, ["w2", "w3"]);
        // Dropping the control plane's parts leaves the file's.
        sources.set(Source::ControlPlane, Parts::default());
        assert_eq!(handle.load().workloads["w1"].service_account, "from-file");
    }
}

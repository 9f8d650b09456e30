//! What ztunnel knows about the mesh: workloads, services and policies, and how a destination
//! address resolves to an upstream.
//!
//! [`State`] is an immutable snapshot; [`StateHandle`] swaps whole snapshots atomically, so the
//! data path reads without locks and never sees half an update. Sources (the local file in
//! [`local`], the control plane in [`crate::xds`]) deliver [`parts::Parts`]; [`parts::Sources`]
//! publishes their union. Resolution is a pure function of a
//! snapshot and an address.

pub mod authz;
pub mod local;
pub mod parts;
pub mod policy;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::identity::Identity;

/// How a workload receives inbound traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum Protocol {
    /// In the mesh: reached over HBONE on port 15008.
    #[serde(rename = "HBONE")]
    Hbone,
    /// Not captured: reached with plain TCP.
    #[serde(rename = "TCP")]
    Tcp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

/// One workload (a pod, usually).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    pub workload_ips: Vec<IpAddr>,
    pub protocol: Protocol,
    pub status: HealthStatus,
    pub node: String,
    pub network: String,
    pub workload_name: String,
    pub workload_type: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub cluster_id: String,
    pub authorization_policies: Vec<String>,
    /// Identity, derived once at load time.
    #[serde(skip)]
    pub identity: Identity,
}

/// A service VIP on a network.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct NetworkAddress {
    pub network: String,
    pub address: IpAddr,
}

/// A workload backing a service, with its port mapping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub workload_uid: String,
    /// Service port → target port on this workload (overrides the service's own mapping).
    pub port: BTreeMap<u16, u16>,
}

/// A service: VIPs, ports, and its endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<NetworkAddress>,
    /// Service port → target port (0 means "same as the service port").
    pub ports: BTreeMap<u16, u16>,
    pub subject_alt_names: Vec<String>,
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    /// `namespace/hostname`, the key Istio uses.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// An immutable snapshot of everything known.
#[derive(Debug, Default, Serialize)]
pub struct State {
    pub workloads: BTreeMap<String, Arc<Workload>>,
    pub services: BTreeMap<String, Arc<Service>>,
    pub policies: Vec<policy::Authorization>,
    #[serde(skip)]
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    #[serde(skip)]
    by_vip: HashMap<IpAddr, Arc<Service>>,
    #[serde(skip)]
    authz: authz::PolicyIndex,
}

/// Where a connection to some address should go.
#[derive(Clone, Debug)]
pub enum Upstream {
    /// A mesh workload: tunnel over HBONE to `workload`'s 15008; the CONNECT authority is
    /// `target`; the server must prove one of `identities`.
    Hbone {
        workload: Arc<Workload>,
        service: Option<Arc<Service>>,
        target: SocketAddr,
        identities: Vec<Identity>,
    },
    /// A known workload outside the mesh: plain TCP to `target`.
    Tcp {
        workload: Arc<Workload>,
        service: Option<Arc<Service>>,
        target: SocketAddr,
    },
    /// Not a known workload or service: plain TCP to the original destination.
    Passthrough,
    /// A service that cannot serve this connection.
    Unroutable {
        service: Arc<Service>,
        reason: &'static str,
    },
}

impl State {
    /// Builds the indexes. When two workloads share an IP, the one that speaks HBONE wins
    /// (then the lower uid, so the choice is stable).
    pub fn new(
        workloads: Vec<Workload>,
        services: Vec<Service>,
        policies: Vec<policy::Authorization>,
    ) -> Self {
        let mut state = State {
            authz: authz::PolicyIndex::new(&policies),
            policies,
            ..Default::default()
        };
        for w in workloads {
            let w = Arc::new(w);
            for ip in &w.workload_ips {
                let replace = match state.by_ip.get(ip) {
                    None => true,
                    Some(old) => {
                        (w.protocol == Protocol::Hbone, std::cmp::Reverse(&w.uid))
                            > (old.protocol == Protocol::Hbone, std::cmp::Reverse(&old.uid))
                    }
                };
                if replace {
                    state.by_ip.insert(*ip, w.clone());
                }
            }
            state.workloads.insert(w.uid.clone(), w);
        }
        for s in services {
            let s = Arc::new(s);
            for vip in &s.vips {
                state.by_vip.insert(vip.address, s.clone());
            }
            state.services.insert(s.key(), s);
        }
        state
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&ip)
    }

    /// Authorizes a connection into the enrolled pod `pod_uid` (namespace `pod_namespace`).
    /// The pod's workload entry is found by uid, else by the destination address when that
    /// workload is in the same namespace. Without one the connection is denied: the
    /// selector policies that protect the pod cannot be known, so allowing would fail open.
    pub fn authorize(
        &self,
        pod_uid: &str,
        pod_namespace: &str,
        conn: &authz::Connection<'_>,
    ) -> authz::Verdict {
        let workload = self.workloads.get(pod_uid).or_else(|| {
            self.by_ip
                .get(&conn.dst.ip())
                .filter(|w| w.namespace == pod_namespace)
        });
        match workload {
            Some(w) => self.authz.authorize(authz::Destination::of(w), conn),
            None => authz::Verdict {
                decision: authz::Decision::Deny(authz::DenyReason::UnknownDestination),
                dry_run: None,
            },
        }
    }

    /// Resolves an original destination. `pick(n)` chooses one of `n` candidate endpoints
    /// (random in production, fixed in tests).
    pub fn resolve(&self, dst: SocketAddr, pick: impl FnOnce(usize) -> usize) -> Upstream {
        if let Some(service) = self.by_vip.get(&dst.ip()) {
            return self.resolve_service(service, dst, pick);
        }
        match self.by_ip.get(&dst.ip()) {
            Some(w) => workload_upstream(w.clone(), None, dst, Vec::new()),
            None => Upstream::Passthrough,
        }
    }

    fn resolve_service(
        &self,
        service: &Arc<Service>,
        dst: SocketAddr,
        pick: impl FnOnce(usize) -> usize,
    ) -> Upstream {
        let unroutable = |reason| Upstream::Unroutable {
            service: service.clone(),
            reason,
        };
        let Some(&service_target) = service.ports.get(&dst.port()) else {
            return unroutable("service has no such port");
        };
        let candidates: Vec<(&Endpoint, &Arc<Workload>)> = service
            .endpoints
            .iter()
            .filter_map(|e| self.workloads.get(&e.workload_uid).map(|w| (e, w)))
            .filter(|(_, w)| w.status == HealthStatus::Healthy && !w.workload_ips.is_empty())
            .collect();
        if candidates.is_empty() {
            return unroutable("no healthy endpoints");
        }
        let (endpoint, workload) = candidates[pick(candidates.len()) % candidates.len()];
        let port = endpoint
            .port
            .get(&dst.port())
            .copied()
            .filter(|p| *p != 0)
            .unwrap_or(if service_target == 0 {
                dst.port()
            } else {
                service_target
            });
        // Prefer an address of the same family as the VIP.
        let ip = workload
            .workload_ips
            .iter()
            .find(|ip| ip.is_ipv4() == dst.is_ipv4())
            .unwrap_or(&workload.workload_ips[0]);
        let sans = service
            .subject_alt_names
            .iter()
            .filter_map(|s| s.parse::<Identity>().ok())
            .collect();
        workload_upstream(
            workload.clone(),
            Some(service.clone()),
            SocketAddr::new(*ip, port),
            sans,
        )
    }
}

fn workload_upstream(
    workload: Arc<Workload>,
    service: Option<Arc<Service>>,
    target: SocketAddr,
    mut identities: Vec<Identity>,
) -> Upstream {
    match workload.protocol {
        Protocol::Hbone => {
            identities.retain(|i| *i != workload.identity);
            identities.insert(0, workload.identity.clone());
            Upstream::Hbone {
                workload,
                service,
                target,
                identities,
            }
        }
        Protocol::Tcp => Upstream::Tcp {
            workload,
            service,
            target,
        },
    }
}

/// The current snapshot, swappable as a whole; subscribers hear of each new one.
#[derive(Debug, Clone)]
pub struct StateHandle {
    current: Arc<ArcSwap<State>>,
    /// Bumped on every store.
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for StateHandle {
    fn default() -> Self {
        Self::new(State::default())
    }
}

impl StateHandle {
    pub fn new(state: State) -> Self {
        Self {
            current: Arc::new(ArcSwap::from_pointee(state)),
            generation: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }

    pub fn load(&self) -> Arc<State> {
        self.current.load_full()
    }

    pub fn store(&self, state: State) {
        self.current.store(Arc::new(state));
        self.generation.send_modify(|g| *g += 1);
    }

    /// Changes after this call mark the receiver changed.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

#[cfg(test)]
mod tests;

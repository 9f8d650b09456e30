//! What ztunnel knows about the mesh: workloads, services and policies, and how a destination
//! address resolves to an upstream.
//!
//! [`State`] is an immutable snapshot; [`StateHandle`] swaps whole snapshots atomically, so the
//! data path reads without locks and never sees half an update. Sources (the local file in
//! [`local`], the control plane in [`crate::xds`]) deliver [`parts::Parts`]; [`parts::Sources`]
//! publishes their union. Resolution is a pure function of a
//! snapshot and an address.

pub mod authz;
pub mod lb;
pub mod local;
pub mod parts;
pub mod policy;
mod resolve;

pub use resolve::{HboneHop, Upstream};

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
    /// The name the DNS proxy answers with this workload's addresses (a headless service's
    /// pod, a ServiceEntry endpoint); empty for most.
    pub hostname: String,
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
    /// Every connection to this workload's own addresses goes through this waypoint.
    pub waypoint: Option<GatewayAddress>,
    /// Peers on another network reach this workload through this east-west gateway.
    pub network_gateway: Option<GatewayAddress>,
    /// How inbound HBONE is handed to the application.
    pub application_tunnel: Option<ApplicationTunnel>,
    pub locality: Locality,
    /// Relative share of a service's traffic (Istio's `capacity`, default 1; 0 is never picked).
    pub capacity: u32,
    /// Identity, derived once at load time.
    #[serde(skip)]
    pub identity: Identity,
}

impl Workload {
    /// A workload known by uid and identity only: no addresses, reached as plain TCP,
    /// healthy, capacity 1, nothing else set. Callers fill in what they know.
    pub fn new(uid: &str, identity: Identity) -> Self {
        Self {
            uid: uid.to_string(),
            name: uid.to_string(),
            namespace: identity.namespace().to_string(),
            service_account: identity.service_account().to_string(),
            trust_domain: identity.trust_domain().to_string(),
            workload_ips: Vec::new(),
            hostname: String::new(),
            protocol: Protocol::Tcp,
            status: HealthStatus::Healthy,
            node: String::new(),
            network: String::new(),
            workload_name: String::new(),
            workload_type: String::new(),
            canonical_name: String::new(),
            canonical_revision: String::new(),
            cluster_id: String::new(),
            authorization_policies: Vec::new(),
            waypoint: None,
            network_gateway: None,
            application_tunnel: None,
            locality: Locality::default(),
            capacity: 1,
            identity,
        }
    }
}

/// A service VIP on a network.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct NetworkAddress {
    pub network: String,
    pub address: IpAddr,
}

/// A service named by namespace and hostname (the key istiod uses).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct NamespacedHostname {
    pub namespace: String,
    pub hostname: String,
}

impl NamespacedHostname {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// Where a waypoint or an east-west gateway is: an address (a service VIP or a workload's
/// own) or a service by name; and the port it takes mTLS HBONE on.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    pub hbone_mtls_port: u16,
}

/// Serialized as Istio's config dump writes it: `<network>/<ip>` or `<namespace>/<hostname>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GatewayDestination {
    Address(NetworkAddress),
    Hostname(NamespacedHostname),
}

impl Serialize for GatewayDestination {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            GatewayDestination::Address(a) => {
                s.collect_str(&format_args!("{}/{}", a.network, a.address))
            }
            GatewayDestination::Hostname(h) => s.collect_str(&h.key()),
        }
    }
}

impl std::fmt::Display for GatewayAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.destination {
            GatewayDestination::Address(a) if a.network.is_empty() => {
                write!(f, "{}", SocketAddr::new(a.address, self.hbone_mtls_port))
            }
            GatewayDestination::Address(a) => write!(
                f,
                "{}/{}",
                a.network,
                SocketAddr::new(a.address, self.hbone_mtls_port)
            ),
            GatewayDestination::Hostname(h) => {
                write!(f, "{}:{}", h.key(), self.hbone_mtls_port)
            }
        }
    }
}

/// Where a workload runs, for locality-aware load balancing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Locality {
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub subzone: String,
}

/// How inbound HBONE is handed to an application that reads tunnel metadata itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ApplicationTunnel {
    pub protocol: AppTunnelProtocol,
    /// Deliver to this port instead of the CONNECT's.
    pub port: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum AppTunnelProtocol {
    /// Bytes as they come.
    #[serde(rename = "NONE")]
    None,
    /// A PROXY protocol v2 header first, carrying the peer's address and SPIFFE id.
    #[serde(rename = "PROXY")]
    Proxy,
}

/// A workload backing a service, with its port mapping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub workload_uid: String,
    /// Service port → target port on this workload (overrides the service's own mapping).
    pub port: BTreeMap<u16, u16>,
    /// The endpoint's own health (the local config's); the workload's status counts too.
    pub status: HealthStatus,
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
    /// Every connection to the service's VIPs goes through this waypoint.
    pub waypoint: Option<GatewayAddress>,
    /// How endpoints are picked; `None` is Istio's default (healthy endpoints, by capacity).
    pub load_balancer: Option<lb::LoadBalancer>,
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
    /// Services and workloads by DNS name (lowercase), for the DNS proxy.
    #[serde(skip)]
    services_by_host: HashMap<String, Vec<Arc<Service>>>,
    #[serde(skip)]
    workloads_by_host: HashMap<String, Arc<Workload>>,
    #[serde(skip)]
    authz: authz::PolicyIndex,
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
            if !w.hostname.is_empty() {
                state
                    .workloads_by_host
                    .insert(w.hostname.to_ascii_lowercase(), w.clone());
            }
            state.workloads.insert(w.uid.clone(), w);
        }
        for s in services {
            let s = Arc::new(s);
            for vip in &s.vips {
                state.by_vip.insert(vip.address, s.clone());
            }
            state
                .services_by_host
                .entry(s.hostname.to_ascii_lowercase())
                .or_default()
                .push(s.clone());
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

    /// The services named `hostname` (lowercase), one per namespace that defines it.
    pub fn services_by_hostname(&self, hostname: &str) -> &[Arc<Service>] {
        self.services_by_host
            .get(hostname)
            .map_or(&[], Vec::as_slice)
    }

    pub fn workload_by_hostname(&self, hostname: &str) -> Option<&Arc<Workload>> {
        self.workloads_by_host.get(hostname)
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

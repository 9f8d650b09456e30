//! istiod's resources → ztunnel's state types. Each resource converts on its own: a
//! malformed one is refused with a reason (which becomes the NACK's message) and never keeps
//! the others from applying. Nothing here panics on any input.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::identity::Identity;
use crate::proto::{security as sec, workload as wl};
use crate::state::lb::{self, LoadBalancer};
use crate::state::parts::BackedServices;
use crate::state::policy::{
    Action, Authorization, Cidr, RbacMatch, Scope, ServiceAccountMatch, StringMatch,
};
use crate::state::{
    AppTunnelProtocol, ApplicationTunnel, GatewayAddress, GatewayDestination, HealthStatus,
    Locality, NamespacedHostname, NetworkAddress, Protocol, Service, Workload,
};

/// A workload and the services it backs, from which service endpoints are assembled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdsWorkload {
    pub workload: Workload,
    pub services: BackedServices,
}

/// One `istio.workload.Address` resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressResource {
    Workload(Box<XdsWorkload>),
    /// A service without endpoints; workloads name the services they back.
    Service(Box<Service>),
}

/// Why a resource was refused.
pub type Refusal = String;

fn ip(bytes: &[u8], what: &str) -> Result<IpAddr, Refusal> {
    match bytes.len() {
        4 => {
            let b: [u8; 4] = bytes
                .try_into()
                .map_err(|_| format!("{what}: bad length"))?;
            Ok(IpAddr::V4(Ipv4Addr::from(b)))
        }
        16 => {
            let b: [u8; 16] = bytes
                .try_into()
                .map_err(|_| format!("{what}: bad length"))?;
            Ok(IpAddr::V6(Ipv6Addr::from(b)))
        }
        n => Err(format!("{what} has {n} bytes; an IP address has 4 or 16")),
    }
}

fn port(p: u32, what: &str) -> Result<u16, Refusal> {
    u16::try_from(p).map_err(|_| format!("{what} {p} is not a TCP port"))
}

/// Converts one Address resource. `default_trust_domain` fills in workloads that leave it
/// out, as istiod does for the mesh's own trust domain.
pub fn address(
    resource: &wl::Address,
    default_trust_domain: &str,
) -> Result<AddressResource, Refusal> {
    match &resource.r#type {
        Some(wl::address::Type::Workload(w)) => {
            workload(w, default_trust_domain).map(|w| AddressResource::Workload(Box::new(w)))
        }
        Some(wl::address::Type::Service(s)) => {
            service(s).map(|s| AddressResource::Service(Box::new(s)))
        }
        None => Err("Address has neither a workload nor a service".into()),
    }
}

fn workload(w: &wl::Workload, default_trust_domain: &str) -> Result<XdsWorkload, Refusal> {
    if w.uid.is_empty() {
        return Err("workload has no uid".into());
    }
    if w.namespace.is_empty() {
        return Err(format!("workload {} has no namespace", w.uid));
    }
    let td = if w.trust_domain.is_empty() {
        default_trust_domain
    } else {
        &w.trust_domain
    };
    let sa = if w.service_account.is_empty() {
        "default"
    } else {
        &w.service_account
    };
    let identity =
        Identity::new(td, &w.namespace, sa).map_err(|e| format!("workload {}: {e}", w.uid))?;
    let mut ips = Vec::with_capacity(w.addresses.len());
    for (i, a) in w.addresses.iter().enumerate() {
        ips.push(ip(a, &format!("workload {} address {i}", w.uid))?);
    }
    // Host-network workloads share the node's address: never resolve by it.
    if w.network_mode == wl::NetworkMode::HostNetwork as i32 {
        ips.clear();
    }
    let protocol = match wl::TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(wl::TunnelProtocol::Hbone) => Protocol::Hbone,
        Ok(wl::TunnelProtocol::None) => Protocol::Tcp,
        Err(_) => {
            return Err(format!(
                "workload {}: unknown tunnel protocol {}",
                w.uid, w.tunnel_protocol
            ));
        }
    };
    let status = match wl::WorkloadStatus::try_from(w.status) {
        Ok(wl::WorkloadStatus::Healthy) => HealthStatus::Healthy,
        // An unknown status is not a reason to send traffic there.
        _ => HealthStatus::Unhealthy,
    };
    let workload_type = wl::WorkloadType::try_from(w.workload_type)
        .map(|t| t.as_str_name().to_ascii_lowercase())
        .unwrap_or_default();
    let mut services = BTreeMap::new();
    for (key, list) in &w.services {
        if !key.contains('/') {
            return Err(format!(
                "workload {}: service key {key:?} is not \"<namespace>/<hostname>\"",
                w.uid
            ));
        }
        let mut ports = BTreeMap::new();
        for p in &list.ports {
            ports.insert(
                port(p.service_port, "service port")?,
                port(p.target_port, "target port")?,
            );
        }
        services.insert(key.clone(), ports);
    }
    let at = |what: &str| format!("workload {} {what}", w.uid);
    let waypoint = w
        .waypoint
        .as_ref()
        .map(|g| gateway(g, &at("waypoint")))
        .transpose()?;
    let network_gateway = w
        .network_gateway
        .as_ref()
        .map(|g| gateway(g, &at("network gateway")))
        .transpose()?;
    let application_tunnel = match &w.application_tunnel {
        None => None,
        Some(t) => {
            let protocol = match wl::application_tunnel::Protocol::try_from(t.protocol) {
                Ok(wl::application_tunnel::Protocol::None) => AppTunnelProtocol::None,
                Ok(wl::application_tunnel::Protocol::Proxy) => AppTunnelProtocol::Proxy,
                // Delivering without the header an app expects would hand it bytes it cannot
                // attribute: refuse the workload instead.
                Err(_) => {
                    return Err(at(&format!(
                        "application tunnel: unknown protocol {}",
                        t.protocol
                    )));
                }
            };
            let port = match t.port {
                0 => None,
                p => Some(port(p, &at("application tunnel port"))?),
            };
            Some(ApplicationTunnel { protocol, port })
        }
    };
    let locality = w
        .locality
        .as_ref()
        .map(|l| Locality {
            region: l.region.clone(),
            zone: l.zone.clone(),
            subzone: l.subzone.clone(),
        })
        .unwrap_or_default();
    Ok(XdsWorkload {
        workload: Workload {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: sa.to_string(),
            trust_domain: td.to_string(),
            workload_ips: ips,
            hostname: w.hostname.clone(),
            protocol,
            status,
            node: w.node.clone(),
            network: w.network.clone(),
            workload_name: w.workload_name.clone(),
            workload_type,
            canonical_name: w.canonical_name.clone(),
            canonical_revision: w.canonical_revision.clone(),
            cluster_id: w.cluster_id.clone(),
            authorization_policies: w.authorization_policies.clone(),
            waypoint,
            network_gateway,
            application_tunnel,
            locality,
            capacity: w.capacity.unwrap_or(1),
            identity,
        },
        services,
    })
}

fn service(s: &wl::Service) -> Result<Service, Refusal> {
    if s.namespace.is_empty() || s.hostname.is_empty() {
        return Err(format!(
            "service {:?} needs a namespace and a hostname",
            s.name
        ));
    }
    let mut vips = Vec::with_capacity(s.addresses.len());
    for (i, a) in s.addresses.iter().enumerate() {
        vips.push(NetworkAddress {
            network: a.network.clone(),
            address: ip(&a.address, &format!("service {} address {i}", s.hostname))?,
        });
    }
    let mut ports = BTreeMap::new();
    for p in &s.ports {
        ports.insert(
            port(p.service_port, "service port")?,
            port(p.target_port, "target port")?,
        );
    }
    for san in &s.subject_alt_names {
        san.parse::<Identity>()
            .map_err(|e| format!("service {}: subject alt name: {e}", s.hostname))?;
    }
    let at = |what: &str| format!("service {} {what}", s.hostname);
    let waypoint = s
        .waypoint
        .as_ref()
        .map(|g| gateway(g, &at("waypoint")))
        .transpose()?;
    let load_balancer = s
        .load_balancing
        .as_ref()
        .map(|l| load_balancing(l).map_err(|e| at(&format!("load balancing: {e}"))))
        .transpose()?;
    Ok(Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        vips,
        ports,
        subject_alt_names: s.subject_alt_names.clone(),
        endpoints: Vec::new(),
        waypoint,
        load_balancer,
    })
}

/// A waypoint or network gateway. One without a destination or a port cannot be reached, and
/// dropping it would send traffic around the waypoint: the resource is refused.
fn gateway(g: &wl::GatewayAddress, what: &str) -> Result<GatewayAddress, Refusal> {
    let destination = match &g.destination {
        Some(wl::gateway_address::Destination::Address(a)) => {
            GatewayDestination::Address(NetworkAddress {
                network: a.network.clone(),
                address: ip(&a.address, what)?,
            })
        }
        Some(wl::gateway_address::Destination::Hostname(h)) => {
            if h.namespace.is_empty() || h.hostname.is_empty() {
                return Err(format!("{what}: a hostname needs a namespace and a name"));
            }
            GatewayDestination::Hostname(NamespacedHostname {
                namespace: h.namespace.clone(),
                hostname: h.hostname.clone(),
            })
        }
        None => return Err(format!("{what} has no destination")),
    };
    let hbone_mtls_port = port(g.hbone_mtls_port, what)?;
    if hbone_mtls_port == 0 {
        return Err(format!("{what} has no HBONE port"));
    }
    Ok(GatewayAddress {
        destination,
        hbone_mtls_port,
    })
}

/// istiod's `LoadBalancing`. Unknown enum values are refused: reading a future scope as
/// "none" would turn a STRICT policy into one that sends traffic anywhere.
fn load_balancing(l: &wl::LoadBalancing) -> Result<LoadBalancer, Refusal> {
    use wl::load_balancing::{HealthPolicy as H, Mode as M, Scope as S};
    let mut routing_preferences = Vec::with_capacity(l.routing_preference.len());
    for p in &l.routing_preference {
        routing_preferences.push(match S::try_from(*p) {
            Ok(S::Region) => lb::Scope::Region,
            Ok(S::Zone) => lb::Scope::Zone,
            Ok(S::Subzone) => lb::Scope::Subzone,
            Ok(S::Node) => lb::Scope::Node,
            Ok(S::Cluster) => lb::Scope::Cluster,
            Ok(S::Network) => lb::Scope::Network,
            Ok(S::UnspecifiedScope) | Err(_) => return Err(format!("unknown scope {p}")),
        });
    }
    let mode = match M::try_from(l.mode) {
        Ok(M::UnspecifiedMode) => lb::Mode::Standard,
        Ok(M::Strict) => lb::Mode::Strict,
        Ok(M::Failover) => lb::Mode::Failover,
        Ok(M::Passthrough) => lb::Mode::Passthrough,
        Err(_) => return Err(format!("unknown mode {}", l.mode)),
    };
    let health_policy = match H::try_from(l.health_policy) {
        Ok(H::OnlyHealthy) => lb::HealthPolicy::OnlyHealthy,
        Ok(H::AllowAll) => lb::HealthPolicy::AllowAll,
        Err(_) => return Err(format!("unknown health policy {}", l.health_policy)),
    };
    Ok(LoadBalancer {
        routing_preferences,
        mode,
        health_policy,
    })
}

/// Converts one Authorization resource.
pub fn authorization(a: &sec::Authorization) -> Result<Authorization, Refusal> {
    if a.name.is_empty() || a.namespace.is_empty() {
        return Err("authorization needs a name and a namespace".into());
    }
    let at = |what: String| format!("authorization {}/{}: {what}", a.namespace, a.name);
    let scope = match sec::Scope::try_from(a.scope) {
        Ok(sec::Scope::Global) => Scope::Global,
        Ok(sec::Scope::Namespace) => Scope::Namespace,
        Ok(sec::Scope::WorkloadSelector) => Scope::WorkloadSelector,
        Err(_) => return Err(at(format!("unknown scope {}", a.scope))),
    };
    // An unknown action must not be guessed: reading a future "DENY-like" action as ALLOW
    // would open what the policy closes.
    let action = match sec::Action::try_from(a.action) {
        Ok(sec::Action::Allow) => Action::Allow,
        Ok(sec::Action::Deny) => Action::Deny,
        Err(_) => return Err(at(format!("unknown action {}", a.action))),
    };
    let mut rules = Vec::with_capacity(a.rules.len());
    for rule in &a.rules {
        let mut clauses = Vec::with_capacity(rule.clauses.len());
        for clause in &rule.clauses {
            let mut matches = Vec::with_capacity(clause.matches.len());
            for m in &clause.matches {
                matches.push(rbac_match(m).map_err(&at)?);
            }
            clauses.push(matches);
        }
        rules.push(clauses);
    }
    Ok(Authorization {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        scope,
        action,
        rules,
        dry_run: a.dry_run,
    })
}

/// What a policy istiod sent but we could not read is enforced as until a readable version
/// replaces it: never nothing, which would drop a DENY or turn an ALLOW's scope allow-all.
/// A refused ALLOW becomes an ALLOW that matches nothing (its scope then admits only what
/// another ALLOW admits); anything else becomes a DENY of everything. The scope is the
/// policy's own where it could be read, else the namespace named by the resource
/// (`namespace/name`), else global. A readable dry-run flag is kept.
pub fn refused_authorization(
    resource: &str,
    decoded: Option<&sec::Authorization>,
) -> Authorization {
    let (ns_from_name, name_from_name) = resource.split_once('/').unwrap_or(("", resource));
    let pick = |decoded: Option<&str>, fallback: &str| {
        decoded
            .filter(|s| !s.is_empty())
            .unwrap_or(fallback)
            .to_string()
    };
    let namespace = pick(decoded.map(|a| a.namespace.as_str()), ns_from_name);
    let name = pick(decoded.map(|a| a.name.as_str()), name_from_name);
    let scope = match decoded.map(|a| sec::Scope::try_from(a.scope)) {
        Some(Ok(sec::Scope::Global)) => Scope::Global,
        Some(Ok(sec::Scope::WorkloadSelector)) => Scope::WorkloadSelector,
        Some(Ok(sec::Scope::Namespace)) => Scope::Namespace,
        _ if namespace.is_empty() => Scope::Global,
        _ => Scope::Namespace,
    };
    let allow = decoded.is_some_and(|a| a.action == sec::Action::Allow as i32);
    Authorization {
        name,
        namespace,
        scope,
        action: if allow { Action::Allow } else { Action::Deny },
        // No rule matches nothing; one rule without clauses matches everything.
        rules: if allow { Vec::new() } else { vec![Vec::new()] },
        dry_run: decoded.is_some_and(|a| a.dry_run),
    }
}

fn rbac_match(m: &sec::Match) -> Result<RbacMatch, Refusal> {
    let strings = |list: &[sec::StringMatch]| -> Result<Vec<StringMatch>, Refusal> {
        list.iter()
            .map(|s| match &s.match_type {
                Some(sec::string_match::MatchType::Exact(v)) => Ok(StringMatch::Exact(v.clone())),
                Some(sec::string_match::MatchType::Prefix(v)) => Ok(StringMatch::Prefix(v.clone())),
                Some(sec::string_match::MatchType::Suffix(v)) => Ok(StringMatch::Suffix(v.clone())),
                Some(sec::string_match::MatchType::Presence(_)) => {
                    Ok(StringMatch::Presence(Vec::new()))
                }
                // An empty match would match nothing in a positive list and everything in a
                // negative one: refuse rather than guess.
                None => Err("a string match with no match type".to_string()),
            })
            .collect()
    };
    let cidrs = |list: &[sec::Address]| -> Result<Vec<Cidr>, Refusal> {
        list.iter()
            .map(|a| {
                let addr = ip(&a.address, "policy address")?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let prefix = u8::try_from(a.length)
                    .ok()
                    .filter(|l| *l <= max)
                    .ok_or_else(|| format!("prefix length {} for {addr}", a.length))?;
                Ok(Cidr { addr, prefix })
            })
            .collect()
    };
    let ports = |list: &[u32]| -> Result<Vec<u16>, Refusal> {
        list.iter().map(|p| port(*p, "destination port")).collect()
    };
    let accounts = |list: &[sec::ServiceAccountMatch]| {
        list.iter()
            .map(|s| ServiceAccountMatch {
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
            })
            .collect()
    };
    Ok(RbacMatch {
        namespaces: strings(&m.namespaces)?,
        not_namespaces: strings(&m.not_namespaces)?,
        service_accounts: accounts(&m.service_accounts),
        not_service_accounts: accounts(&m.not_service_accounts),
        principals: strings(&m.principals)?,
        not_principals: strings(&m.not_principals)?,
        source_ips: cidrs(&m.source_ips)?,
        not_source_ips: cidrs(&m.not_source_ips)?,
        destination_ips: cidrs(&m.destination_ips)?,
        not_destination_ips: cidrs(&m.not_destination_ips)?,
        destination_ports: ports(&m.destination_ports)?,
        not_destination_ports: ports(&m.not_destination_ports)?,
    })
}

/// Fuzz entry point (`fuzz/`): bytes as an Address resource, decoded and converted.
/// Converted workloads must keep the invariants the data path relies on.
pub fn fuzz_address(data: &[u8]) {
    use prost::Message;
    if let Ok(a) = wl::Address::decode(data)
        && let Ok(AddressResource::Workload(w)) = address(&a, "cluster.local")
    {
        assert!(!w.workload.uid.is_empty());
        assert_eq!(w.workload.identity.namespace(), w.workload.namespace);
    }
}

/// Fuzz entry point (`fuzz/`): bytes as an Authorization resource.
pub fn fuzz_authorization(data: &[u8]) {
    use prost::Message;
    if let Ok(a) = sec::Authorization::decode(data)
        && let Ok(p) = authorization(&a)
    {
        assert!(
            p.rules
                .iter()
                .flatten()
                .flatten()
                .all(|m| { m.source_ips.iter().all(|c| c.prefix <= 128) })
        );
    }
}

#[cfg(test)]
mod tests;

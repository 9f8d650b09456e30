//! The local config file: workloads, services and policies in the YAML shape Istio's ztunnel
//! reads from `LOCAL_XDS_PATH`, so existing files work unchanged.
//!
//! Parsing is strict where a mistake would be silent (unknown keys anywhere are errors, named
//! with their path and line) and lenient where Istio is needlessly so (a missing `trustDomain`
//! takes the configured one, a missing `serviceAccount` is `default`, a missing `uid` is
//! `<namespace>/<name>`, a VIP may omit its `network/` prefix). [`watch`] re-reads the file when
//! it changes; a bad file is reported and the previous state stays in force.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::parts::{Parts, Source, Sources};
use super::policy::Authorization;
use super::{
    AppTunnelProtocol, ApplicationTunnel, Endpoint, GatewayAddress, GatewayDestination,
    HealthStatus, Locality, NamespacedHostname, NetworkAddress, Protocol, Service, State, Workload,
    lb,
};
use crate::identity::Identity;

/// Why a config file was rejected. `path` is the YAML path of the offending field.
#[derive(Debug, thiserror::Error)]
pub enum LocalConfigError {
    #[error("cannot read {file}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

fn invalid(path: impl Into<String>, message: impl Into<String>) -> LocalConfigError {
    LocalConfigError::Invalid {
        path: path.into(),
        message: message.into(),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalConfig {
    #[serde(default)]
    workloads: Vec<LocalWorkload>,
    #[serde(default)]
    services: Vec<LocalService>,
    #[serde(default)]
    policies: Vec<Authorization>,
}

/// Istio's spelling: `destination` is `<network>/<ip>` (or a bare IP) or `<namespace>/<hostname>`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalGateway {
    destination: String,
    hbone_mtls_port: u16,
}

impl LocalGateway {
    fn convert(&self, at: &str) -> Result<GatewayAddress, LocalConfigError> {
        let (prefix, last) = self
            .destination
            .rsplit_once('/')
            .unwrap_or(("", &self.destination));
        let destination = match last.parse::<IpAddr>() {
            Ok(address) => GatewayDestination::Address(NetworkAddress {
                network: prefix.to_string(),
                address,
            }),
            Err(_) if !prefix.is_empty() && !last.is_empty() => {
                GatewayDestination::Hostname(NamespacedHostname {
                    namespace: prefix.to_string(),
                    hostname: last.to_string(),
                })
            }
            Err(_) => {
                return Err(invalid(
                    format!("{at}.destination"),
                    format!(
                        "{:?} is neither \"<network>/<ip>\" nor \"<namespace>/<hostname>\"",
                        self.destination
                    ),
                ));
            }
        };
        if self.hbone_mtls_port == 0 {
            return Err(invalid(format!("{at}.hboneMtlsPort"), "port 0"));
        }
        Ok(GatewayAddress {
            destination,
            hbone_mtls_port: self.hbone_mtls_port,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalAppTunnel {
    protocol: AppTunnelName,
    #[serde(default)]
    port: Option<u16>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
enum AppTunnelName {
    #[serde(rename = "NONE")]
    None,
    #[serde(rename = "PROXY")]
    Proxy,
}

#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
enum NetworkMode {
    #[default]
    Standard,
    HostNetwork,
}

/// Istio's `LocalWorkload`: a workload plus the services it backs. Fields accepted for
/// compatibility but not used by an L4 node proxy are parsed (so typos are still caught) and
/// otherwise ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalWorkload {
    workload_ips: Vec<IpAddr>,
    namespace: String,
    #[serde(default)]
    services: BTreeMap<String, BTreeMap<u16, u16>>,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    name: String,
    #[serde(default = "default_protocol")]
    protocol: Protocol,
    #[serde(default)]
    network_mode: NetworkMode,
    #[serde(default)]
    trust_domain: String,
    #[serde(default)]
    service_account: String,
    #[serde(default)]
    network: String,
    #[serde(default)]
    workload_name: String,
    #[serde(default)]
    workload_type: String,
    #[serde(default)]
    canonical_name: String,
    #[serde(default)]
    canonical_revision: String,
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    node: String,
    #[serde(default)]
    #[allow(dead_code)]
    native_tunnel: bool,
    #[serde(default)]
    application_tunnel: Option<LocalAppTunnel>,
    #[serde(default)]
    waypoint: Option<LocalGateway>,
    #[serde(default)]
    network_gateway: Option<LocalGateway>,
    #[serde(default)]
    authorization_policies: Vec<String>,
    #[serde(default)]
    status: HealthStatus,
    #[serde(default)]
    cluster_id: String,
    #[serde(default)]
    locality: Locality,
    #[serde(default)]
    capacity: Option<u32>,
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalEndpoint {
    workload_uid: String,
    #[serde(default)]
    port: BTreeMap<u16, u16>,
    #[serde(default)]
    status: HealthStatus,
}

/// Names as Istio writes them (`Failover`, `FAILOVER`), parsed by [`lb`]'s `FromStr`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalLoadBalancer {
    #[serde(default)]
    routing_preferences: Vec<String>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    health_policy: Option<String>,
}

impl LocalLoadBalancer {
    fn convert(&self, at: &str) -> Result<lb::LoadBalancer, LocalConfigError> {
        let bad =
            |field: String, e: lb::UnknownName| invalid(format!("{at}.{field}"), e.to_string());
        let mut routing_preferences = Vec::new();
        for (i, p) in self.routing_preferences.iter().enumerate() {
            routing_preferences.push(
                p.parse()
                    .map_err(|e| bad(format!("routingPreferences[{i}]"), e))?,
            );
        }
        let mode = match &self.mode {
            Some(m) => m.parse().map_err(|e| bad("mode".into(), e))?,
            None => lb::Mode::default(),
        };
        let health_policy = match &self.health_policy {
            Some(h) => h.parse().map_err(|e| bad("healthPolicy".into(), e))?,
            None => lb::HealthPolicy::default(),
        };
        Ok(lb::LoadBalancer {
            routing_preferences,
            mode,
            health_policy,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LocalService {
    name: String,
    namespace: String,
    hostname: String,
    #[serde(default)]
    vips: Vec<String>,
    #[serde(default)]
    #[allow(dead_code)]
    cidr_vips: Vec<String>,
    #[serde(default)]
    ports: BTreeMap<u16, u16>,
    #[serde(default)]
    endpoints: BTreeMap<String, LocalEndpoint>,
    #[serde(default)]
    subject_alt_names: Vec<String>,
    #[serde(default)]
    waypoint: Option<LocalGateway>,
    #[serde(default)]
    load_balancer: Option<LocalLoadBalancer>,
    #[serde(default)]
    #[allow(dead_code)]
    ip_families: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    canonical: bool,
}

/// Parses a config file's text into a state snapshot. `trust_domain` fills in workloads that
/// do not name one.
pub fn parse(text: &str, trust_domain: &str) -> Result<State, LocalConfigError> {
    parse_parts(text, trust_domain).map(Parts::build)
}

/// Parses a config file's text into this source's [`Parts`].
pub fn parse_parts(text: &str, trust_domain: &str) -> Result<Parts, LocalConfigError> {
    let config: LocalConfig = if text.trim().is_empty() {
        LocalConfig::default()
    } else {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let path = if path == "." {
                "(top level)".to_string()
            } else {
                path
            };
            invalid(path, inner.to_string())
        })?
    };
    build(config, trust_domain)
}

fn build(config: LocalConfig, trust_domain: &str) -> Result<Parts, LocalConfigError> {
    let mut workloads = Vec::new();
    let mut uids = HashSet::new();
    for (i, w) in config.workloads.into_iter().enumerate() {
        let at = |field: &str| format!("workloads[{i}].{field}");
        if w.network_mode == NetworkMode::HostNetwork {
            tracing::warn!(workload = %w.name, "hostNetwork workloads are not indexed by IP");
        }
        let uid = match (w.uid.is_empty(), w.name.is_empty()) {
            (false, _) => w.uid.clone(),
            (true, false) => format!("{}/{}", w.namespace, w.name),
            (true, true) => return Err(invalid(at("uid"), "a workload needs a uid or a name")),
        };
        if !uids.insert(uid.clone()) {
            return Err(invalid(
                at("uid"),
                format!("duplicate workload uid {uid:?}"),
            ));
        }
        let td = if w.trust_domain.is_empty() {
            trust_domain.to_string()
        } else {
            w.trust_domain.clone()
        };
        let sa = if w.service_account.is_empty() {
            "default".to_string()
        } else {
            w.service_account.clone()
        };
        let identity = Identity::new(&td, &w.namespace, &sa)
            .map_err(|e| invalid(at("identity"), e.to_string()))?;
        if let Some(key) = w.services.keys().find(|k| !k.contains('/')) {
            return Err(invalid(
                at(&format!("services.{key}")),
                "service keys are \"<namespace>/<hostname>\"",
            ));
        }
        let waypoint = w
            .waypoint
            .as_ref()
            .map(|g| g.convert(&at("waypoint")))
            .transpose()?;
        let network_gateway = w
            .network_gateway
            .as_ref()
            .map(|g| g.convert(&at("networkGateway")))
            .transpose()?;
        let application_tunnel = w.application_tunnel.as_ref().map(|t| ApplicationTunnel {
            protocol: match t.protocol {
                AppTunnelName::None => AppTunnelProtocol::None,
                AppTunnelName::Proxy => AppTunnelProtocol::Proxy,
            },
            port: t.port.filter(|p| *p != 0),
        });
        let ips = if w.network_mode == NetworkMode::HostNetwork {
            Vec::new()
        } else {
            w.workload_ips
        };
        workloads.push((
            Workload {
                uid,
                name: w.name,
                namespace: w.namespace,
                service_account: sa,
                trust_domain: td,
                workload_ips: ips,
                hostname: w.hostname,
                protocol: w.protocol,
                status: w.status,
                node: w.node,
                network: w.network,
                workload_name: w.workload_name,
                workload_type: w.workload_type,
                canonical_name: w.canonical_name,
                canonical_revision: w.canonical_revision,
                cluster_id: w.cluster_id,
                authorization_policies: w.authorization_policies,
                waypoint,
                network_gateway,
                application_tunnel,
                locality: w.locality,
                capacity: w.capacity.unwrap_or(1),
                identity,
            },
            w.services,
        ));
    }
    let mut services = Vec::new();
    let mut keys = HashSet::new();
    for (i, s) in config.services.into_iter().enumerate() {
        let at = |field: &str| format!("services[{i}].{field}");
        let waypoint = s
            .waypoint
            .as_ref()
            .map(|g| g.convert(&at("waypoint")))
            .transpose()?;
        let load_balancer = s
            .load_balancer
            .as_ref()
            .map(|l| l.convert(&at("loadBalancer")))
            .transpose()?;
        let key = format!("{}/{}", s.namespace, s.hostname);
        if !keys.insert(key.clone()) {
            return Err(invalid(
                at("hostname"),
                format!("duplicate service {key:?}"),
            ));
        }
        let mut vips = Vec::new();
        for (j, vip) in s.vips.iter().enumerate() {
            let (network, ip) = vip.rsplit_once('/').unwrap_or(("", vip));
            let address = ip.parse().map_err(|_| {
                invalid(
                    at(&format!("vips[{j}]")),
                    format!("{vip:?} is not \"<network>/<ip>\""),
                )
            })?;
            vips.push(NetworkAddress {
                network: network.to_string(),
                address,
            });
        }
        for san in &s.subject_alt_names {
            if let Err(e) = san.parse::<Identity>() {
                return Err(invalid(at("subjectAltNames"), e.to_string()));
            }
        }
        let mut eps = Vec::new();
        for (uid, e) in s.endpoints {
            if uid != e.workload_uid {
                return Err(invalid(
                    at(&format!("endpoints.{uid}")),
                    "endpoint key and workloadUid differ",
                ));
            }
            eps.push(Endpoint {
                workload_uid: e.workload_uid,
                port: e.port,
                status: e.status,
            });
        }
        services.push(Service {
            name: s.name,
            namespace: s.namespace,
            hostname: s.hostname,
            vips,
            ports: s.ports,
            subject_alt_names: s.subject_alt_names,
            endpoints: eps,
            waypoint,
            load_balancer,
        });
    }
    let mut policy_keys = HashSet::new();
    for (i, p) in config.policies.iter().enumerate() {
        let key = crate::state::authz::key(p);
        if !policy_keys.insert(key.clone()) {
            return Err(invalid(
                format!("policies[{i}]"),
                format!("duplicate policy {key:?}"),
            ));
        }
    }
    if let Some((w, p)) = workloads.iter().find_map(|(w, _)| {
        w.authorization_policies
            .iter()
            .find(|p| !policy_keys.contains(*p))
            .map(|p| (w.uid.clone(), p.clone()))
    }) {
        tracing::warn!(workload = %w, policy = %p, "a workload names a policy that is not defined");
    }
    Ok(Parts {
        workloads,
        services,
        policies: config.policies,
    })
}

/// Reads and parses `file`.
pub fn load(file: &Path, trust_domain: &str) -> Result<Parts, LocalConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| LocalConfigError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    parse_parts(&text, trust_domain)
}

/// Fuzz entry point (`fuzz/`, replayed by `tests/tests/fuzz_corpora.rs`): bytes as a config
/// file. Whatever parses must build a state whose workloads are all found by their addresses.
pub fn fuzz_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(parts) = parse_parts(text, "cluster.local") {
        let state = parts.build();
        for w in state.workloads.values() {
            assert!(!w.uid.is_empty());
            for ip in &w.workload_ips {
                assert!(
                    state.workload_by_ip(*ip).is_some(),
                    "{ip} of {} not indexed",
                    w.uid
                );
            }
        }
    }
}

/// What identifies a version of the file on disk (a rename over it changes the inode).
fn stamp(file: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(file).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Polls `file` and hands its parts to `sources` whenever it changes and parses. The file's
/// current version is noted when this is called (not when the future first runs), so a change
/// made right after loading is not missed. The future never completes.
pub fn watch(
    file: PathBuf,
    trust_domain: String,
    sources: Sources,
    every: Duration,
) -> impl Future<Output = ()> + Send {
    let mut last = stamp(&file);
    async move {
        loop {
            tokio::time::sleep(every).await;
            let now = stamp(&file);
            if now == last {
                continue;
            }
            last = now;
            match load(&file, &trust_domain) {
                Ok(next) => {
                    tracing::info!(
                        file = %file.display(),
                        workloads = next.workloads.len(),
                        services = next.services.len(),
                        policies = next.policies.len(),
                        "local config reloaded"
                    );
                    sources.set(Source::LocalFile, next);
                }
                Err(e) => tracing::error!(
                    file = %file.display(),
                    error = %mesh_contract::Chain(&e),
                    "local config rejected; the previous config stays in force"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests;

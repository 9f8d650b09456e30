//! Pods as the agent sees them, and which of them belong in the mesh.
//!
//! A pod source ([`file`] for standalone machines, [`kube`] for clusters) publishes the full
//! set of this node's pods and their namespaces whenever anything changes; [`decide`] is the
//! pure enrollment rule Istio uses, applied to one pod.

pub mod file;
pub mod kube;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;

use crate::redirect::Options;

/// Pod or namespace label that selects the data-plane mode.
pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
pub const MODE_AMBIENT: &str = "ambient";
pub const MODE_NONE: &str = "none";
/// Annotation Istio's sidecar injector leaves on pods that have a sidecar.
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
/// Annotation the agent writes on enrolled pods (`enabled`, or `pending` until ztunnel acked).
pub const REDIRECTION: &str = "ambient.istio.io/redirection";
/// Per-pod opt-out of DNS capture (`"false"`) or opt-in (`"true"`).
pub const DNS_CAPTURE: &str = "ambient.istio.io/dns-capture";
/// Per-pod switch that leaves inbound plaintext uncaptured (`"true"`).
pub const BYPASS_INBOUND: &str = "ambient.istio.io/bypass-inbound-capture";

/// Where a pod's network namespace can be found.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum NetnsHint {
    /// A path to the netns (`/run/netns/...`, `/proc/<pid>/ns/net`).
    Path(PathBuf),
    /// The sandbox's container id, as the CNI plugin reported it.
    ContainerId(String),
    /// Only the pod's IPs are known; the netns holding them is searched for.
    #[default]
    Unknown,
}

/// One pod on this node.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PodInfo {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    pub netns: NetnsHint,
    /// The pod's own DNS servers (`dnsPolicy: None` with `dnsConfig.nameservers`), passed to
    /// ztunnel's DNS proxy; empty means the cluster DNS ztunnel itself uses.
    pub dns_nameservers: Vec<IpAddr>,
}

/// One namespace, for its labels.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// Everything a pod source knows right now.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PodSet {
    pub pods: Vec<PodInfo>,
    pub namespaces: Vec<NamespaceInfo>,
}

/// Node-wide enrollment settings.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Namespaces never enrolled, whatever their labels say.
    pub excluded_namespaces: BTreeSet<String>,
    /// DNS capture for pods that do not say.
    pub dns_capture: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            excluded_namespaces: ["kube-system".to_string()].into(),
            dns_capture: false,
        }
    }
}

/// Whether a pod belongs in the mesh, and with which redirection options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Enroll(Options),
    Skip(&'static str),
    /// Not decidable yet: the pod leaves it to its namespace, which the source has not
    /// shown (a watch that lags the runtime). Never read as "not in the mesh".
    Unknown(&'static str),
}

fn flag(map: &BTreeMap<String, String>, key: &str) -> Option<bool> {
    match map
        .get(key)
        .map(|v| v.trim().to_ascii_lowercase())
        .as_deref()
    {
        Some("true") => Some(true),
        Some("false") => Some(false),
        _ => None,
    }
}

/// Istio's enrollment rule: the pod's `istio.io/dataplane-mode` label wins (`ambient` enrolls,
/// `none` opts out), else its namespace's; never host-network pods, pods with a sidecar, or
/// excluded namespaces. A pod that defers to a namespace nobody has shown yet is
/// [`Decision::Unknown`].
pub fn decide(pod: &PodInfo, namespace: Option<&NamespaceInfo>, policy: &Policy) -> Decision {
    if policy.excluded_namespaces.contains(&pod.namespace) {
        return Decision::Skip("namespace is excluded");
    }
    if pod.host_network {
        return Decision::Skip("pod uses the host network");
    }
    if pod.annotations.contains_key(SIDECAR_STATUS) {
        return Decision::Skip("pod has a sidecar");
    }
    let pod_mode = pod.labels.get(DATAPLANE_MODE).map(String::as_str);
    let ns_mode = namespace
        .and_then(|n| n.labels.get(DATAPLANE_MODE))
        .map(String::as_str);
    match (pod_mode, ns_mode) {
        (Some(MODE_NONE), _) => return Decision::Skip("pod opted out (dataplane-mode=none)"),
        (Some(MODE_AMBIENT), _) | (_, Some(MODE_AMBIENT)) => {}
        _ if namespace.is_none() => {
            return Decision::Unknown(
                "the pod's namespace is not known to the node agent yet (its namespace watch lags)",
            );
        }
        _ => return Decision::Skip("neither pod nor namespace is in ambient mode"),
    }
    Decision::Enroll(Options {
        // Both families; the redirector drops IPv6 for a pod whose netns has none.
        ipv4: true,
        ipv6: true,
        dns_capture: flag(&pod.annotations, DNS_CAPTURE).unwrap_or(policy.dns_capture),
        capture_inbound: !flag(&pod.annotations, BYPASS_INBOUND).unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn enrollment_table() {
        let policy = Policy::default();
        let ambient_ns = NamespaceInfo {
            name: "shop".into(),
            labels: map(&[(DATAPLANE_MODE, MODE_AMBIENT)]),
        };
        let plain_ns = NamespaceInfo {
            name: "shop".into(),
            labels: map(&[]),
        };
        let pod =
            |ns: &str, labels: &[(&str, &str)], annotations: &[(&str, &str)], host: bool| PodInfo {
                namespace: ns.into(),
                labels: map(labels),
                annotations: map(annotations),
                host_network: host,
                ..Default::default()
            };
        let amb = [(DATAPLANE_MODE, MODE_AMBIENT)];
        let none = [(DATAPLANE_MODE, MODE_NONE)];
        let cases: Vec<(&str, PodInfo, Option<&NamespaceInfo>, &str)> = vec![
            (
                "pod label",
                pod("shop", &amb, &[], false),
                Some(&plain_ns),
                "enroll",
            ),
            (
                "namespace label",
                pod("shop", &[], &[], false),
                Some(&ambient_ns),
                "enroll",
            ),
            (
                "namespace unknown, pod label",
                pod("shop", &amb, &[], false),
                None,
                "enroll",
            ),
            (
                "pod opts out of an ambient namespace",
                pod("shop", &none, &[], false),
                Some(&ambient_ns),
                "skip",
            ),
            (
                "no labels anywhere",
                pod("shop", &[], &[], false),
                Some(&plain_ns),
                "skip",
            ),
            (
                "host network",
                pod("shop", &amb, &[], true),
                Some(&ambient_ns),
                "skip",
            ),
            (
                "sidecar",
                pod("shop", &amb, &[(SIDECAR_STATUS, "{}")], false),
                Some(&ambient_ns),
                "skip",
            ),
            (
                "namespace unknown, no pod label",
                pod("shop", &[], &[], false),
                None,
                "unknown",
            ),
            (
                "namespace unknown, pod opts out",
                pod("shop", &none, &[], false),
                None,
                "skip",
            ),
            (
                "kube-system",
                pod("kube-system", &amb, &[], false),
                None,
                "skip",
            ),
            (
                "other label value",
                pod("shop", &[(DATAPLANE_MODE, "sidecar")], &[], false),
                Some(&plain_ns),
                "skip",
            ),
        ];
        for (name, p, ns, want) in cases {
            let got = match decide(&p, ns, &policy) {
                Decision::Enroll(_) => "enroll",
                Decision::Skip(_) => "skip",
                Decision::Unknown(_) => "unknown",
            };
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn annotations_choose_options() {
        let policy = Policy::default();
        let base = PodInfo {
            namespace: "shop".into(),
            labels: map(&[(DATAPLANE_MODE, MODE_AMBIENT)]),
            ..Default::default()
        };
        let opts = |annotations: &[(&str, &str)]| match decide(
            &PodInfo {
                annotations: map(annotations),
                ..base.clone()
            },
            None,
            &policy,
        ) {
            Decision::Enroll(o) => o,
            Decision::Skip(why) | Decision::Unknown(why) => panic!("{why}"),
        };
        assert!(!opts(&[]).dns_capture && opts(&[]).capture_inbound);
        assert!(opts(&[(DNS_CAPTURE, "true")]).dns_capture);
        assert!(!opts(&[(DNS_CAPTURE, "FALSE")]).dns_capture);
        assert!(!opts(&[(BYPASS_INBOUND, "true")]).capture_inbound);
        assert!(opts(&[(BYPASS_INBOUND, "nonsense")]).capture_inbound);
    }
}

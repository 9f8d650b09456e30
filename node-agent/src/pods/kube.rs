//! The Kubernetes pod source: watches the pods scheduled to this node (field selector on the
//! node name) and all namespaces (for their labels), and records enrollment on each pod.
//!
//! Objects are converted defensively: a pod without a uid, name or namespace is skipped with a
//! warning, an unparsable IP is dropped with a warning, finished pods (Succeeded/Failed) are
//! left out. The set is published only once both watches have listed everything, so the agent
//! never acts on half a view of the node.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;

use super::{NamespaceInfo, NetnsHint, PodInfo, PodSet, REDIRECTION};
use crate::enroll::StatusSink;

/// Why the Kubernetes client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {0}")]
    Kubeconfig(String, #[source] kube::config::KubeconfigError),
    #[error("in-cluster configuration (is the agent running in a pod with a service account?)")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// A client from `kubeconfig`, or the in-cluster service account when there is none.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| KubeError::Kubeconfig(path.display().to_string(), e))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| KubeError::Kubeconfig(path.display().to_string(), e))?
        }
        None => kube::Config::incluster().map_err(KubeError::InCluster)?,
    };
    kube::Client::try_from(config).map_err(KubeError::Client)
}

fn ips(pod: &Pod, name: &str) -> Vec<IpAddr> {
    let status = pod.status.as_ref();
    let mut raw: Vec<&str> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|v| v.iter().map(|p| p.ip.as_str()).collect())
        .unwrap_or_default();
    if raw.is_empty()
        && let Some(ip) = status.and_then(|s| s.pod_ip.as_deref())
    {
        raw.push(ip);
    }
    raw.into_iter()
        .filter_map(|s| match s.parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                tracing::warn!(pod = name, ip = s, "ignoring an unparsable pod IP");
                None
            }
        })
        .collect()
}

/// The nameservers of a pod that brings its own (`dnsPolicy: None`); with any other policy
/// its resolv.conf names the cluster DNS (or the node's), which ztunnel already forwards to.
fn own_nameservers(spec: Option<&k8s_openapi::api::core::v1::PodSpec>, name: &str) -> Vec<IpAddr> {
    let Some(spec) = spec.filter(|s| s.dns_policy.as_deref() == Some("None")) else {
        return Vec::new();
    };
    let raw = spec
        .dns_config
        .as_ref()
        .and_then(|c| c.nameservers.clone())
        .unwrap_or_default();
    raw.into_iter()
        .filter_map(|s| match s.parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                tracing::warn!(
                    pod = name,
                    nameserver = s,
                    "ignoring an unparsable nameserver"
                );
                None
            }
        })
        .collect()
}

/// Converts a pod object, or says why it cannot be used.
pub fn convert_pod(pod: &Pod) -> Result<Option<PodInfo>, &'static str> {
    let meta = &pod.metadata;
    let uid = meta
        .uid
        .clone()
        .filter(|u| !u.is_empty())
        .ok_or("pod has no uid")?;
    let name = meta
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or("pod has no name")?;
    let namespace = meta
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or("pod has no namespace")?;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return Ok(None);
    }
    let spec = pod.spec.as_ref();
    Ok(Some(PodInfo {
        ips: ips(pod, &name),
        dns_nameservers: own_nameservers(spec, &name),
        uid,
        name,
        namespace,
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        labels: meta.labels.clone().unwrap_or_default(),
        annotations: meta.annotations.clone().unwrap_or_default(),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        netns: NetnsHint::Unknown,
    }))
}

fn convert_namespace(ns: &Namespace) -> Option<NamespaceInfo> {
    Some(NamespaceInfo {
        name: ns.metadata.name.clone().filter(|n| !n.is_empty())?,
        labels: ns.metadata.labels.clone().unwrap_or_default(),
    })
}

#[derive(Default)]
struct Cache {
    pods: BTreeMap<String, PodInfo>,
    namespaces: BTreeMap<String, NamespaceInfo>,
    pods_synced: bool,
    namespaces_synced: bool,
}

impl Cache {
    fn publish(&self, tx: &watch::Sender<Option<PodSet>>) {
        if self.pods_synced && self.namespaces_synced {
            tx.send_replace(Some(PodSet {
                pods: self.pods.values().cloned().collect(),
                namespaces: self.namespaces.values().cloned().collect(),
            }));
        }
    }

    fn pod(&mut self, pod: &Pod, add: bool) {
        match convert_pod(pod) {
            Ok(Some(info)) if add => {
                self.pods.insert(info.uid.clone(), info);
            }
            Ok(Some(info)) => {
                self.pods.remove(&info.uid);
            }
            Ok(None) => {
                if let Some(uid) = &pod.metadata.uid {
                    self.pods.remove(uid);
                }
            }
            Err(why) => {
                tracing::warn!(pod = ?pod.metadata.name, namespace = ?pod.metadata.namespace, why, "ignoring a pod object")
            }
        }
    }
}

/// Watches Kubernetes and publishes this node's pod set. The future runs until dropped;
/// watch errors are retried with backoff by the watcher.
pub fn watch_node(
    client: kube::Client,
    node: &str,
) -> (
    watch::Receiver<Option<PodSet>>,
    impl Future<Output = ()> + use<>,
) {
    let (tx, rx) = watch::channel(None);
    let pods: Api<Pod> = Api::all(client.clone());
    let namespaces: Api<Namespace> = Api::all(client);
    let pod_cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let task = async move {
        use kube::runtime::WatchStreamExt;
        let mut pod_events = watcher::watcher(pods, pod_cfg).default_backoff().boxed();
        let mut ns_events = watcher::watcher(namespaces, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut cache = Cache::default();
        let mut pod_restart: Option<BTreeMap<String, PodInfo>> = None;
        let mut ns_restart: Option<BTreeMap<String, NamespaceInfo>> = None;
        loop {
            tokio::select! {
                ev = pod_events.next() => match ev {
                    Some(Ok(Event::Init)) => pod_restart = Some(BTreeMap::new()),
                    Some(Ok(Event::InitApply(p))) => {
                        if let (Some(buf), Ok(Some(info))) = (pod_restart.as_mut(), convert_pod(&p)) {
                            buf.insert(info.uid.clone(), info);
                        } else if let Err(why) = convert_pod(&p) {
                            tracing::warn!(pod = ?p.metadata.name, why, "ignoring a pod object");
                        }
                    }
                    Some(Ok(Event::InitDone)) => {
                        cache.pods = pod_restart.take().unwrap_or_default();
                        cache.pods_synced = true;
                        cache.publish(&tx);
                    }
                    Some(Ok(Event::Apply(p))) => {
                        cache.pod(&p, true);
                        cache.publish(&tx);
                    }
                    Some(Ok(Event::Delete(p))) => {
                        cache.pod(&p, false);
                        cache.publish(&tx);
                    }
                    Some(Err(e)) => tracing::warn!(error = &e as &dyn std::error::Error, "pod watch failed; retrying"),
                    None => return,
                },
                ev = ns_events.next() => match ev {
                    Some(Ok(Event::Init)) => ns_restart = Some(BTreeMap::new()),
                    Some(Ok(Event::InitApply(n))) => {
                        if let (Some(buf), Some(info)) = (ns_restart.as_mut(), convert_namespace(&n)) {
                            buf.insert(info.name.clone(), info);
                        }
                    }
                    Some(Ok(Event::InitDone)) => {
                        cache.namespaces = ns_restart.take().unwrap_or_default();
                        cache.namespaces_synced = true;
                        cache.publish(&tx);
                    }
                    Some(Ok(Event::Apply(n))) => {
                        if let Some(info) = convert_namespace(&n) {
                            cache.namespaces.insert(info.name.clone(), info);
                            cache.publish(&tx);
                        }
                    }
                    Some(Ok(Event::Delete(n))) => {
                        if let Some(name) = &n.metadata.name {
                            cache.namespaces.remove(name);
                            cache.publish(&tx);
                        }
                    }
                    Some(Err(e)) => tracing::warn!(error = &e as &dyn std::error::Error, "namespace watch failed; retrying"),
                    None => return,
                },
            }
        }
    };
    (rx, task)
}

/// Records `ambient.istio.io/redirection` on the pod with a JSON merge patch to its status
/// subresource (the only pod write the agent's RBAC allows).
#[derive(Clone)]
pub struct PodAnnotator {
    client: kube::Client,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for PodAnnotator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodAnnotator").finish_non_exhaustive()
    }
}

impl PodAnnotator {
    pub fn new(client: kube::Client) -> Arc<Self> {
        Arc::new(Self {
            client,
            runtime: tokio::runtime::Handle::current(),
        })
    }
}

impl StatusSink for PodAnnotator {
    fn record(&self, pod: &PodInfo, value: Option<&'static str>) {
        if pod.annotations.get(REDIRECTION).map(String::as_str) == value {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let name = pod.name.clone();
        let patch = serde_json::json!({ "metadata": { "annotations": { REDIRECTION: value } } });
        self.runtime.spawn(async move {
            if let Err(e) = api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                tracing::warn!(pod = %name, error = &e as &dyn std::error::Error, "cannot record enrollment on the pod");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn odd_pod_objects_are_converted_or_rejected_with_a_reason() {
        let good = pod(serde_json::json!({
            "metadata": {"uid": "u1", "name": "a", "namespace": "shop", "labels": {"x": "y"}},
            "spec": {"containers": [], "serviceAccountName": "front"},
            "status": {"podIPs": [{"ip": "198.18.1.2"}, {"ip": "not-an-ip"}, {"ip": "fd00::2"}]}
        }));
        let info = convert_pod(&good).unwrap().unwrap();
        assert_eq!(info.service_account, "front");
        assert_eq!(info.ips.len(), 2);
        let cases = [
            (
                serde_json::json!({"metadata": {"name": "a", "namespace": "n"}}),
                "pod has no uid",
            ),
            (
                serde_json::json!({"metadata": {"uid": "u", "namespace": "n"}}),
                "pod has no name",
            ),
            (
                serde_json::json!({"metadata": {"uid": "u", "name": "a"}}),
                "pod has no namespace",
            ),
            (
                serde_json::json!({"metadata": {"uid": "", "name": "a", "namespace": "n"}}),
                "pod has no uid",
            ),
        ];
        for (json, want) in cases {
            assert_eq!(convert_pod(&pod(json)).unwrap_err(), want);
        }
        // Defaults for what is absent; the legacy single podIP; finished pods left out.
        let minimal = pod(serde_json::json!({
            "metadata": {"uid": "u", "name": "a", "namespace": "n"},
            "status": {"podIP": "198.18.1.3"}
        }));
        let info = convert_pod(&minimal).unwrap().unwrap();
        assert_eq!(
            (
                info.service_account.as_str(),
                info.ips.len(),
                info.host_network
            ),
            ("default", 1, false)
        );
        let done = pod(serde_json::json!({
            "metadata": {"uid": "u", "name": "a", "namespace": "n"},
            "status": {"phase": "Succeeded"}
        }));
        assert!(convert_pod(&done).unwrap().is_none());
    }

    /// Only a pod with `dnsPolicy: None` brings its own nameservers; bad ones are dropped.
    #[test]
    fn own_nameservers_come_from_dns_policy_none_only() {
        let with = |policy: &str| {
            let p = pod(serde_json::json!({
                "metadata": {"uid": "u", "name": "a", "namespace": "n"},
                "spec": {"containers": [], "dnsPolicy": policy,
                         "dnsConfig": {"nameservers": ["198.18.0.53", "fd00::53", "dns.example"]}}
            }));
            convert_pod(&p).unwrap().unwrap().dns_nameservers
        };
        assert_eq!(
            with("None"),
            vec![
                "198.18.0.53".parse::<IpAddr>().unwrap(),
                "fd00::53".parse().unwrap()
            ]
        );
        assert!(with("ClusterFirst").is_empty());
        assert!(with("Default").is_empty());
    }
}

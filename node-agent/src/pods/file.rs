//! The standalone pod source: a YAML file listing this node's pods and namespaces, re-read
//! when it changes. The local mesh and the tests use it; it is also how a machine without
//! Kubernetes runs the agent.
//!
//! ```yaml
//! namespaces:
//! - name: shop
//!   labels: {istio.io/dataplane-mode: ambient}
//! pods:
//! - name: frontend
//!   namespace: shop
//!   serviceAccount: frontend          # default: default
//!   uid: 1f6c...                      # default: <namespace>/<name>
//!   labels: {app: frontend}
//!   annotations: {}
//!   ips: ["198.18.1.11"]
//!   netns: /run/netns/frontend        # or containerId: <sandbox id>, or neither
//!   hostNetwork: false
//!   dnsNameservers: ["198.18.1.53"]   # the pod's own resolv.conf servers; default: none
//! ```
//! Unknown keys are errors that name their path; a bad file leaves the previous set in force.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::sync::watch;

use super::{NamespaceInfo, NetnsHint, PodInfo, PodSet};

/// Why a pod file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {file}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PodFile {
    #[serde(default)]
    namespaces: Vec<FileNamespace>,
    #[serde(default)]
    pods: Vec<FilePod>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileNamespace {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FilePod {
    name: String,
    namespace: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    service_account: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    ips: Vec<IpAddr>,
    #[serde(default)]
    netns: Option<PathBuf>,
    #[serde(default)]
    container_id: Option<String>,
    #[serde(default)]
    host_network: bool,
    #[serde(default)]
    dns_nameservers: Vec<IpAddr>,
}

/// Parses a pod file.
pub fn parse(text: &str) -> Result<PodSet, FileError> {
    let file: PodFile = if text.trim().is_empty() {
        PodFile::default()
    } else {
        serde_path_to_error::deserialize(serde_yaml_ng::Deserializer::from_str(text)).map_err(
            |e| {
                let path = e.path().to_string();
                FileError::Invalid {
                    path: if path == "." {
                        "(top level)".into()
                    } else {
                        path
                    },
                    message: e.into_inner().to_string(),
                }
            },
        )?
    };
    let mut uids = HashSet::new();
    let mut pods = Vec::new();
    for (i, p) in file.pods.into_iter().enumerate() {
        let at = |f: &str| format!("pods[{i}].{f}");
        if p.name.is_empty() || p.namespace.is_empty() {
            return Err(FileError::Invalid {
                path: at("name"),
                message: "a pod needs a name and a namespace".into(),
            });
        }
        let uid = if p.uid.is_empty() {
            format!("{}/{}", p.namespace, p.name)
        } else {
            p.uid
        };
        if !uids.insert(uid.clone()) {
            return Err(FileError::Invalid {
                path: at("uid"),
                message: format!("duplicate pod uid {uid:?}"),
            });
        }
        let netns = match (p.netns, p.container_id) {
            (Some(_), Some(_)) => {
                return Err(FileError::Invalid {
                    path: at("netns"),
                    message: "give netns or containerId, not both".into(),
                });
            }
            (Some(path), None) => NetnsHint::Path(path),
            (None, Some(id)) => NetnsHint::ContainerId(id),
            (None, None) => NetnsHint::Unknown,
        };
        pods.push(PodInfo {
            uid,
            name: p.name,
            namespace: p.namespace,
            service_account: if p.service_account.is_empty() {
                "default".into()
            } else {
                p.service_account
            },
            labels: p.labels,
            annotations: p.annotations,
            ips: p.ips,
            host_network: p.host_network,
            netns,
            dns_nameservers: p.dns_nameservers,
        });
    }
    let namespaces = file
        .namespaces
        .into_iter()
        .map(|n| NamespaceInfo {
            name: n.name,
            labels: n.labels,
        })
        .collect();
    Ok(PodSet { pods, namespaces })
}

/// Reads and parses `file`.
pub fn load(file: &Path) -> Result<PodSet, FileError> {
    let text = std::fs::read_to_string(file).map_err(|source| FileError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    parse(&text)
}

fn stamp(file: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(file).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Publishes the file's pod set now and again whenever it changes and parses. The initial
/// load must succeed; later bad versions are logged and skipped.
pub fn watch(
    file: PathBuf,
    every: Duration,
) -> Result<(watch::Receiver<Option<PodSet>>, impl Future<Output = ()>), FileError> {
    let initial = load(&file)?;
    let (tx, rx) = watch::channel(Some(initial));
    let mut last = stamp(&file);
    let task = async move {
        loop {
            tokio::time::sleep(every).await;
            // stat and read on a blocking thread: the file may sit on a slow disk.
            let path = file.clone();
            let Ok((now, loaded)) = tokio::task::spawn_blocking(move || {
                let now = stamp(&path);
                (now, (now != last).then(|| load(&path)))
            })
            .await
            else {
                continue;
            };
            last = now;
            let Some(loaded) = loaded else {
                continue;
            };
            match loaded {
                Ok(set) => {
                    tracing::info!(file = %file.display(), pods = set.pods.len(), "pod file reloaded");
                    tx.send_replace(Some(set));
                }
                Err(e) => tracing::error!(
                    file = %file.display(),
                    error = &e as &dyn std::error::Error,
                    "pod file rejected; the previous pod set stays in force"
                ),
            }
        }
    };
    Ok((rx, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pods_and_namespaces_with_defaults() {
        let set = parse(
            "namespaces: [{name: shop, labels: {istio.io/dataplane-mode: ambient}}]\n\
             pods:\n- {name: a, namespace: shop, ips: [198.18.1.2], netns: /run/netns/a}\n\
             - {name: b, namespace: shop, serviceAccount: sa, containerId: abc}\n\
             - {name: c, namespace: shop, uid: u-c, dnsNameservers: [198.18.0.53]}\n",
        )
        .unwrap();
        assert_eq!(
            set.pods[2].dns_nameservers,
            ["198.18.0.53".parse::<IpAddr>().unwrap()]
        );
        assert!(set.pods[0].dns_nameservers.is_empty());
        assert_eq!(set.namespaces.len(), 1);
        assert_eq!(set.pods[0].uid, "shop/a");
        assert_eq!(set.pods[0].service_account, "default");
        assert_eq!(set.pods[0].netns, NetnsHint::Path("/run/netns/a".into()));
        assert_eq!(set.pods[1].netns, NetnsHint::ContainerId("abc".into()));
        assert_eq!(set.pods[2].netns, NetnsHint::Unknown);
        assert_eq!(set.pods[2].uid, "u-c");
    }

    #[test]
    fn bad_files_name_the_field() {
        let cases = [
            (
                "unknown key",
                "pods: [{name: a, namespace: n, colour: red}]",
                "pods[0]",
            ),
            (
                "bad ip",
                "pods: [{name: a, namespace: n, ips: [nope]}]",
                "pods[0].ips[0]",
            ),
            (
                "both netns and container",
                "pods: [{name: a, namespace: n, netns: /x, containerId: y}]",
                "pods[0].netns",
            ),
            (
                "duplicate",
                "pods: [{name: a, namespace: n}, {name: a, namespace: n}]",
                "pods[1].uid",
            ),
            (
                "empty name",
                "pods: [{name: '', namespace: n}]",
                "pods[0].name",
            ),
            ("wrong type", "pods: {name: a}", "pods"),
            (
                "hostNetwork not bool",
                "pods: [{name: a, namespace: n, hostNetwork: maybe}]",
                "pods[0].hostNetwork",
            ),
        ];
        for (name, text, want) in cases {
            match parse(text) {
                Err(FileError::Invalid { path, .. }) => {
                    assert!(path.starts_with(want), "{name}: {path}")
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }
}

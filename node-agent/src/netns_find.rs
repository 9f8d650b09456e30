//! Finding a pod's network namespace.
//!
//! In order: the path the pod source gave; the path the CNI plugin reported for the pod's
//! sandbox container; otherwise a search of every namespace on the node (processes under
//! `/proc` and bind mounts under `/run/netns`) for the one whose interfaces hold the pod's IP.
//! The search is what makes an agent restart or a node reboot recoverable without the CNI
//! plugin's help. Two namespaces claiming the IP is an error, not a guess.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::TryStreamExt;
use mesh_netns::{NetNs, NetNsId};
use netlink_packet_route::address::AddressAttribute;

use crate::pods::{NetnsHint, PodInfo};

/// Why a pod's netns was not found.
#[derive(Debug, thiserror::Error)]
pub enum FindError {
    #[error("cannot use netns {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: mesh_netns::Error,
    },
    #[error("the pod has no IP to search for")]
    NoIps,
    #[error("no network namespace on this node holds {0}")]
    NotFound(String),
    #[error("several network namespaces hold {ip}: {paths}")]
    Ambiguous { ip: IpAddr, paths: String },
}

/// Locates network namespaces for pods.
#[derive(Debug)]
pub struct Finder {
    proc_dir: PathBuf,
    netns_dirs: Vec<PathBuf>,
    /// Sandbox container id → netns path, as reported by the CNI plugin.
    containers: Mutex<HashMap<String, PathBuf>>,
}

impl Finder {
    /// `proc_dir` is the host's `/proc` (mounted elsewhere in a container); `netns_dirs` are
    /// directories of netns bind mounts (`/run/netns`, the runtime's own).
    pub fn new(proc_dir: PathBuf, netns_dirs: Vec<PathBuf>) -> Self {
        Self {
            proc_dir,
            netns_dirs,
            containers: Mutex::new(HashMap::new()),
        }
    }

    /// Remembers where the CNI plugin said a sandbox's netns is.
    pub fn remember_container(&self, container_id: &str, netns: &Path) {
        self.containers
            .lock()
            .expect("not poisoned")
            .insert(container_id.to_string(), netns.to_path_buf());
    }

    /// Forgets every sandbox not in `valid` (CNI GC).
    pub fn retain_containers(&self, valid: &std::collections::HashSet<String>) {
        self.containers
            .lock()
            .expect("not poisoned")
            .retain(|id, _| valid.contains(id));
    }

    pub fn forget_container(&self, container_id: &str) {
        self.containers
            .lock()
            .expect("not poisoned")
            .remove(container_id);
    }

    /// Finds `pod`'s netns.
    pub async fn find(&self, pod: &PodInfo) -> Result<NetNs, FindError> {
        let open = |path: &Path| {
            NetNs::open(path).map_err(|source| FindError::Open {
                path: path.to_path_buf(),
                source,
            })
        };
        match &pod.netns {
            NetnsHint::Path(p) => return open(p),
            NetnsHint::ContainerId(id) => {
                let known = self
                    .containers
                    .lock()
                    .expect("not poisoned")
                    .get(id)
                    .cloned();
                if let Some(p) = known {
                    return open(&p);
                }
            }
            NetnsHint::Unknown => {}
        }
        self.search(&pod.ips).await
    }

    /// Every distinct namespace on the node except our own, with a path to it. Walks
    /// `/proc` on a blocking thread: a node can have thousands of processes.
    async fn candidates(&self) -> BTreeMap<NetNsId, (PathBuf, NetNs)> {
        let netns_dirs = self.netns_dirs.clone();
        let proc_dir = self.proc_dir.clone();
        tokio::task::spawn_blocking(move || candidates_in(&netns_dirs, &proc_dir))
            .await
            .unwrap_or_default()
    }

    async fn search(&self, ips: &[IpAddr]) -> Result<NetNs, FindError> {
        if ips.is_empty() {
            return Err(FindError::NoIps);
        }
        let mut hits: Vec<(PathBuf, NetNs)> = Vec::new();
        for (_, (path, ns)) in self.candidates().await {
            match addresses(&ns).await {
                Ok(addrs) if addrs.iter().any(|a| ips.contains(a)) => hits.push((path, ns)),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(netns = %path.display(), error = %mesh_contract::Chain(&e), "cannot list addresses")
                }
            }
        }
        match hits.len() {
            0 => Err(FindError::NotFound(
                ips.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
            1 => Ok(hits.pop().expect("one").1),
            _ => Err(FindError::Ambiguous {
                ip: ips[0],
                paths: hits
                    .iter()
                    .map(|(p, _)| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
}

fn candidates_in(netns_dirs: &[PathBuf], proc_dir: &Path) -> BTreeMap<NetNsId, (PathBuf, NetNs)> {
    let home = NetNs::current().map(|n| n.id()).ok();
    let mut found = BTreeMap::new();
    let mut consider = |path: PathBuf| {
        if let Ok(ns) = NetNs::open(&path)
            && Some(ns.id()) != home
        {
            found.entry(ns.id()).or_insert((path, ns));
        }
    };
    for dir in netns_dirs {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                consider(e.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(proc_dir) {
        for e in entries.flatten() {
            if e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                consider(e.path().join("ns/net"));
            }
        }
    }
    found
}

/// Why a namespace's addresses could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum AddressesError {
    #[error("entering the netns")]
    Enter(#[from] mesh_netns::Error),
    #[error("rtnetlink socket")]
    Socket(#[from] std::io::Error),
    #[error("listing addresses")]
    List(#[from] rtnetlink::Error),
}

/// The IP addresses configured in `ns`.
pub async fn addresses(ns: &NetNs) -> Result<Vec<IpAddr>, AddressesError> {
    let (conn, handle, _) = ns.run(rtnetlink::new_connection)??;
    let task = tokio::spawn(conn);
    let result: Result<Vec<_>, _> = handle.address().get().execute().try_collect().await;
    task.abort();
    let msgs = result?;
    Ok(msgs
        .iter()
        .flat_map(|m| m.attributes.iter())
        .filter_map(|a| match a {
            AddressAttribute::Address(ip) | AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        })
        .collect())
}

/// A shared finder.
pub type SharedFinder = Arc<Finder>;

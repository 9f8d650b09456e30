//! The set of pod proxies.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_netns::NetNs;
use mesh_zds::client::{Command, WorkloadInfo};
use tokio::task::AbortHandle;

use crate::drain::Drain;
use crate::identity::Identity;
use crate::proxy::worker::{ListenersClosed, Workers};
use crate::proxy::{Pod, ProxyInputs, dns, socket};

/// How long an add waits for the pod's first certificate before acking anyway (connections
/// fail until it arrives, and the renewal task keeps trying).
const CERT_WAIT: Duration = Duration::from_secs(2);
/// How long a delete waits for the pod's listeners to close before acking.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
const RETRY_START: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug)]
enum Entry {
    Running {
        pod: Arc<Pod>,
        closed: ListenersClosed,
    },
    /// Start failed; a task retries it.
    Pending { retry: AbortHandle },
}

/// A pod proxy's state, for the admin view and tests.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PodStatus {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub identity: Option<String>,
    pub state: &'static str,
}

/// Owns every pod proxy on this node.
#[derive(Debug)]
pub struct PodManager {
    inputs: Arc<ProxyInputs>,
    workers: Arc<Workers>,
    drain: Drain,
    pods: Mutex<HashMap<String, (WorkloadInfo, Entry)>>,
}

impl PodManager {
    pub fn new(inputs: Arc<ProxyInputs>, workers: Arc<Workers>, drain: Drain) -> Arc<Self> {
        Arc::new(Self {
            inputs,
            workers,
            drain,
            pods: Mutex::new(HashMap::new()),
        })
    }

    /// Carries out one ZDS command; `Err` is the NACK reason.
    pub async fn handle(self: &Arc<Self>, cmd: Command) -> Result<(), String> {
        match cmd {
            Command::Add { uid, info, netns } => self.add(uid, info, netns).await,
            Command::Keep { uid } => {
                let known = self.pods.lock().expect("not poisoned").contains_key(&uid);
                tracing::info!(%uid, known, "pod kept by snapshot");
                Ok(())
            }
            Command::Reconcile { keep } => {
                self.reconcile(&keep).await;
                Ok(())
            }
            Command::Del { uid } => {
                self.remove(&uid).await;
                Ok(())
            }
        }
    }

    async fn add(
        self: &Arc<Self>,
        uid: String,
        info: WorkloadInfo,
        netns: OwnedFd,
    ) -> Result<(), String> {
        let netns = NetNs::from_fd(netns).map_err(|e| format!("pod {uid}: {e}"))?;
        let same = match self.pods.lock().expect("not poisoned").get(&uid) {
            Some((_, Entry::Running { pod, .. })) => pod.netns.id() == netns.id(),
            _ => false,
        };
        if same {
            tracing::debug!(%uid, "add for a pod already served in the same netns");
            return Ok(());
        }
        // A different netns means the sandbox was re-created: the old proxy goes.
        self.remove(&uid).await;
        let identity = Identity::new(
            self.inputs.tls.trust_domain(),
            &info.namespace,
            &info.service_account,
        )
        .map_err(|e| format!("pod {uid}: {e}"))?;
        match self.start(&uid, &info, &netns, &identity).await {
            Ok((pod, closed)) => {
                tracing::info!(%uid, pod = %pod.name(), %identity, netns = %pod.netns.id(), "pod proxy started");
                self.pods
                    .lock()
                    .expect("not poisoned")
                    .insert(uid, (info, Entry::Running { pod, closed }));
                Ok(())
            }
            Err(e) => {
                tracing::warn!(%uid, error = %e, "pod proxy start failed; will retry");
                let retry =
                    tokio::spawn(
                        self.clone()
                            .retry(uid.clone(), info.clone(), netns, identity),
                    );
                self.pods.lock().expect("not poisoned").insert(
                    uid,
                    (
                        info,
                        Entry::Pending {
                            retry: retry.abort_handle(),
                        },
                    ),
                );
                Err(e)
            }
        }
    }

    async fn start(
        &self,
        uid: &str,
        info: &WorkloadInfo,
        netns: &NetNs,
        identity: &Identity,
    ) -> Result<(Arc<Pod>, ListenersClosed), String> {
        let cert = self.inputs.certs.track(identity);
        if !cert.ready(CERT_WAIT).await {
            tracing::warn!(%uid, %identity, "no certificate yet; HBONE fails until one is issued");
        }
        let server_tls = self
            .inputs
            .tls
            .server_config(cert.clone())
            .map_err(|e| e.to_string())?;
        let listeners = netns
            .run(|| {
                socket::pod_listeners(
                    self.workers.len(),
                    self.inputs.config.hbone_congestion_control.as_deref(),
                )
            })
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot listen in the pod netns: {e}"))?;
        // Without its DNS sockets the pod is still proxied; the node agent sees nothing on
        // 15053 and does not send the pod's DNS here.
        let dns = if self.inputs.config.dns_proxy {
            match netns.run(|| dns::sockets(socket::ipv6_available())) {
                Ok(Ok(s)) => Some(s),
                Ok(Err(e)) => {
                    tracing::warn!(%uid, error = %e, "cannot serve DNS in the pod (port {} taken?)", mesh_contract::ports::DNS);
                    None
                }
                Err(e) => return Err(e.to_string()),
            }
        } else {
            None
        };
        let pod = Arc::new(Pod {
            uid: uid.to_string(),
            info: info.clone(),
            identity: identity.clone(),
            netns: netns.try_clone().map_err(|e| e.to_string())?,
            cert,
            server_tls,
            drain: self.drain.child(),
        });
        let closed = self.workers.serve_pod(&pod, listeners, dns);
        Ok((pod, closed))
    }

    async fn retry(
        self: Arc<Self>,
        uid: String,
        info: WorkloadInfo,
        netns: NetNs,
        identity: Identity,
    ) {
        let mut wait = RETRY_START;
        loop {
            tokio::time::sleep(wait).await;
            match self.start(&uid, &info, &netns, &identity).await {
                Ok((pod, closed)) => {
                    tracing::info!(%uid, pod = %pod.name(), "pod proxy started on retry");
                    let mut pods = self.pods.lock().expect("not poisoned");
                    // Only if this retry is still wanted (no del or newer add meanwhile).
                    if matches!(pods.get(&uid), Some((_, Entry::Pending { .. }))) {
                        pods.insert(uid, (info, Entry::Running { pod, closed }));
                    } else {
                        pod.drain.shutdown_now();
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(%uid, error = %e, retry_in = ?wait, "pod proxy start failed again");
                    wait = (wait * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// Stops the proxy for `uid`: listeners close now (before this returns), in-flight
    /// connections get the drain timeout. Unknown uids are fine (deletes are idempotent).
    pub async fn remove(&self, uid: &str) {
        let entry = self.pods.lock().expect("not poisoned").remove(uid);
        match entry {
            Some((_, Entry::Running { pod, closed })) => {
                let drain = pod.drain.clone();
                let deadline = self.inputs.config.drain_timeout;
                let name = pod.name().to_string();
                tokio::spawn(async move {
                    let cut = drain.drain(deadline).await;
                    if cut > 0 {
                        tracing::info!(pod = %name, cut, "pod drained; remaining connections closed");
                    }
                });
                let _ = tokio::time::timeout(CLOSE_WAIT, closed.wait()).await;
                tracing::info!(%uid, pod = %pod.name(), "pod proxy stopped");
            }
            Some((_, Entry::Pending { retry })) => retry.abort(),
            None => {}
        }
    }

    async fn reconcile(&self, keep: &HashSet<String>) {
        let stale: Vec<String> = self
            .pods
            .lock()
            .expect("not poisoned")
            .keys()
            .filter(|uid| !keep.contains(*uid))
            .cloned()
            .collect();
        for uid in stale {
            tracing::info!(%uid, "pod not in the agent's snapshot");
            self.remove(&uid).await;
        }
    }

    /// Every pod proxy and its state.
    pub fn status(&self) -> Vec<PodStatus> {
        let pods = self.pods.lock().expect("not poisoned");
        let mut out: Vec<PodStatus> = pods
            .iter()
            .map(|(uid, (info, entry))| PodStatus {
                uid: uid.clone(),
                name: info.name.clone(),
                namespace: info.namespace.clone(),
                identity: match entry {
                    Entry::Running { pod, .. } => Some(pod.identity.to_string()),
                    Entry::Pending { .. } => None,
                },
                state: match entry {
                    Entry::Running { .. } => "running",
                    Entry::Pending { .. } => "pending",
                },
            })
            .collect();
        out.sort_by(|a, b| a.uid.cmp(&b.uid));
        out
    }

    /// Drains every pod (process shutdown). Returns connections cut at the deadline.
    pub async fn drain_all(&self, deadline: Duration) -> usize {
        let cut = self.drain.drain(deadline).await;
        self.pods.lock().expect("not poisoned").clear();
        cut
    }
}

//! What other parts of the agent (the CNI event server) ask the enrollment manager, and
//! what they get back.

use std::collections::HashSet;
use std::path::PathBuf;

use tokio::sync::oneshot;

/// What a CNI ADD or CHECK learns from the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CniOutcome {
    /// Rules installed and ztunnel acknowledged the pod.
    Enrolled,
    /// The pod is not meant for the mesh.
    NotInMesh(&'static str),
}

/// Why a CNI ADD or CHECK could not say yes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CniFailure {
    /// The pod source has not shown this pod yet (the caller may retry briefly).
    UnknownPod(String),
    /// No ztunnel is connected, so the pod cannot be protected.
    NoZtunnel,
    /// Enrollment failed at a step; the reason names it.
    Failed(String),
    /// CHECK: the pod should be captured but its redirection is not intact.
    Missing(String),
}

/// A pod as the CNI plugin describes it. An empty namespace (runtimes outside Kubernetes
/// send only a name) matches a pod by name alone, if the name is unique on the node.
#[derive(Debug, Clone, Default)]
pub struct CniPod {
    pub name: String,
    pub namespace: String,
    pub uid: Option<String>,
    pub container_id: String,
    pub netns: PathBuf,
    pub ips: Vec<std::net::IpAddr>,
}

/// Requests from other parts of the agent.
#[derive(Debug)]
pub enum Request {
    /// Enroll the pod now if it belongs in the mesh and answer when done.
    CniAdd {
        pod: CniPod,
        reply: oneshot::Sender<Result<CniOutcome, CniFailure>>,
    },
    /// Is the pod's redirection in place?
    CniCheck {
        pod: CniPod,
        reply: oneshot::Sender<Result<CniOutcome, CniFailure>>,
    },
    /// The sandbox is gone; `done` is answered once its pod is out of ztunnel and its rules
    /// are removed.
    CniDel {
        container_id: String,
        done: oneshot::Sender<()>,
    },
    /// CNI GC: every sandbox not in `valid` is gone; `done` gets how many were removed.
    CniGc {
        valid: HashSet<String>,
        done: oneshot::Sender<usize>,
    },
}

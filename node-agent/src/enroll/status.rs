//! Where each pod stands, as the rest of the agent sees it: the state the manager keeps per
//! pod, the sink that records it on the pod (the Kubernetes annotation), and what the HTTP
//! `/pods` view reads.

use crate::pods::PodInfo;

/// Where a pod stands. In the `/pods` view: `{"state": "enrolled"}` or
/// `{"state": "pending", "step": "rules", "reason": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum PodState {
    /// Rules installed and ztunnel acknowledged the pod.
    Enrolled,
    /// Meant for the mesh, not there yet: the step that is waiting, and why.
    Pending { step: Step, reason: String },
}

impl PodState {
    pub(super) fn pending(step: Step, reason: impl Into<String>) -> Self {
        PodState::Pending {
            step,
            reason: reason.into(),
        }
    }
}

/// The enrollment step a pending pod waits on (also the `step` label of the failure metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    /// Tracked, not tried yet.
    Starting,
    /// Finding the pod's network namespace.
    Netns,
    /// Installing or verifying the redirection.
    Rules,
    /// Handing the pod to ztunnel and waiting for its ack.
    Ztunnel,
    /// With DNS capture: something must serve 15053 in the pod.
    Dns,
    /// The runtime deleted the sandbox; a new one's ADD is awaited.
    Sandbox,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Starting => "starting",
            Step::Netns => "netns",
            Step::Rules => "rules",
            Step::Ztunnel => "ztunnel",
            Step::Dns => "dns",
            Step::Sandbox => "sandbox",
        }
    }
}

/// Records enrollment on the pod where the pod source keeps it (the Kubernetes annotation).
pub trait StatusSink: Send + Sync + std::fmt::Debug {
    /// `Some("enabled" | "pending")` sets the annotation; `None` removes it.
    fn record(&self, pod: &PodInfo, value: Option<&'static str>);
}

/// A sink for sources that keep no status.
#[derive(Debug, Default)]
pub struct NoStatus;

impl StatusSink for NoStatus {
    fn record(&self, _pod: &PodInfo, _value: Option<&'static str>) {}
}

/// One pod's status for the agent's `/pods` view.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PodStatus {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    #[serde(flatten)]
    pub state: PodState,
}

/// What the HTTP endpoints read.
#[derive(Debug, Default)]
pub struct Shared {
    pub synced: bool,
    pub pods: Vec<PodStatus>,
}

#[cfg(test)]
mod tests {
    use super::{PodState, Step};

    #[test]
    fn pod_states_serialize_with_their_step() {
        let pending = PodState::pending(Step::Rules, "installing redirection: boom");
        assert_eq!(
            serde_json::to_value(&pending).unwrap(),
            serde_json::json!({"state": "pending", "step": "rules", "reason": "installing redirection: boom"})
        );
        assert_eq!(
            serde_json::to_value(PodState::Enrolled).unwrap(),
            serde_json::json!({"state": "enrolled"})
        );
    }
}

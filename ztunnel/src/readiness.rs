//! The readiness endpoint: `GET /healthz/ready` on `--readiness-addr` (Istio's port 15021, in
//! ztunnel's own netns), for the kubelet's probe. 200 once ztunnel is connected to the node
//! agent, has taken its snapshot of the node's pods and holds a certificate for each of
//! them; until then 503 with what it still
//! waits for. Every other path is 404.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hyper::{Method, StatusCode};

use crate::http::{Handler, text};
use crate::identity::manager::CertManager;
use crate::inpod::client::ZdsStatus;
use crate::xds::client::XdsStatus;

/// What readiness still waits for, or `None` when ready. `uncertified` lists identities of
/// enrolled pods that have no certificate yet; `xds` is the control plane's status in Istio
/// mode.
pub fn waiting_for(
    zds: &ZdsStatus,
    uncertified: &[String],
    xds: Option<&XdsStatus>,
) -> Option<String> {
    if let Some(xds) = xds
        && !xds.synced.load(Ordering::Acquire)
    {
        Some(if xds.connected.load(Ordering::Acquire) {
            "the control plane's first push of workloads and policies".into()
        } else {
            "a connection to the control plane (XDS_ADDRESS)".into()
        })
    } else if !zds.connected.load(Ordering::Acquire) {
        Some("a connection to the node agent's ZDS socket".into())
    } else if !zds.snapshot_received.load(Ordering::Acquire) {
        Some("the node agent's snapshot of this node's pods".into())
    } else if let Some(first) = uncertified.first() {
        let more = match uncertified.len() - 1 {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        Some(format!("a workload certificate for {first}{more}"))
    } else {
        None
    }
}

/// Identities held for enrolled pods that have no certificate yet.
fn uncertified(certs: &CertManager) -> Vec<String> {
    certs
        .snapshot()
        .into_iter()
        .filter(|(_, issued)| issued.is_none())
        .map(|(id, _)| id.to_string())
        .collect()
}

/// The readiness handler: `/healthz/ready` and 404 for everything else.
pub fn handler(
    zds: Arc<ZdsStatus>,
    certs: Arc<CertManager>,
    xds: Option<Arc<XdsStatus>>,
) -> Handler {
    Arc::new(move |req, _peer| match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz/ready") => {
            match waiting_for(&zds, &uncertified(&certs), xds.as_deref()) {
                None => text(StatusCode::OK, "ready"),
                Some(what) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: waiting for {what}"),
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_what_it_waits_for() {
        let zds = ZdsStatus::default();
        assert!(waiting_for(&zds, &[], None).unwrap().contains("connection"));
        zds.connected.store(true, Ordering::Release);
        assert!(waiting_for(&zds, &[], None).unwrap().contains("snapshot"));
        zds.snapshot_received.store(true, Ordering::Release);
        let ids = [
            "spiffe://td/ns/a/sa/b".to_string(),
            "spiffe://td/ns/a/sa/c".into(),
        ];
        assert_eq!(
            waiting_for(&zds, &ids, None).unwrap(),
            "a workload certificate for spiffe://td/ns/a/sa/b and 1 more"
        );
        assert_eq!(waiting_for(&zds, &[], None), None);
        let xds = XdsStatus::default();
        assert!(
            waiting_for(&zds, &[], Some(&xds))
                .unwrap()
                .contains("XDS_ADDRESS")
        );
        xds.connected.store(true, Ordering::Release);
        assert!(
            waiting_for(&zds, &[], Some(&xds))
                .unwrap()
                .contains("first push")
        );
        xds.synced.store(true, Ordering::Release);
        assert_eq!(waiting_for(&zds, &[], Some(&xds)), None);
    }
}

//! Live connections: what the debug view lists, and what a policy change re-checks.
//!
//! Every proxied connection registers here for its lifetime ([`Tracked`] removes it on drop).
//! Inbound connections carry what authorization saw; when the state changes, [`ConnTracker::
//! recheck`] evaluates them again and cancels those now denied, each with the reason, so the
//! connection's own task closes it and logs why. One mutex guards the table: it is taken
//! once at open and once at close, never per byte.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::copy::CopyError;
use super::{Pod, ProxyError};
use crate::identity::Identity;
use crate::proxy::accesslog::{ConnLog, Direction};
use crate::state::State;
use crate::state::authz::{Connection, Decision, DenyReason};

/// What is known about a live connection.
#[derive(Debug, Clone, Serialize)]
pub struct ConnInfo {
    pub direction: Direction,
    /// The enrolled pod on this node (`namespace/name`) and its uid.
    pub pod: String,
    pub pod_uid: String,
    #[serde(skip)]
    pub pod_namespace: String,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_identity: Option<Identity>,
    pub dst_identity: Option<Identity>,
    #[serde(serialize_with = "unix_seconds")]
    pub started: SystemTime,
}

impl ConnInfo {
    pub fn new(log: &ConnLog, pod: &Pod) -> Self {
        ConnInfo {
            direction: log.direction,
            pod: pod.name(),
            pod_uid: pod.uid.clone(),
            pod_namespace: pod.info.namespace.clone(),
            src: log.src,
            dst: log.dst,
            src_identity: log.src_identity.clone(),
            dst_identity: log.dst_identity.clone(),
            started: SystemTime::now(),
        }
    }
}

fn unix_seconds<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    s.serialize_u64(secs)
}

#[derive(Debug)]
struct LiveConn {
    info: ConnInfo,
    /// Inbound connections are authorized, so a policy change may revoke them.
    authorized: bool,
    cancel: CancellationToken,
    revoked: OnceLock<DenyReason>,
}

/// The table of live connections.
#[derive(Debug, Default)]
pub struct ConnTracker {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Arc<LiveConn>>>,
}

/// A registered connection; dropping it unregisters.
#[derive(Debug)]
pub struct Tracked {
    id: u64,
    conn: Arc<LiveConn>,
    tracker: Arc<ConnTracker>,
}

impl Tracked {
    /// Resolves if a policy change revokes this connection.
    pub async fn stopped(&self) {
        self.conn.cancel.cancelled().await;
    }

    /// The error to report for a copy that ended with `e`: a stop becomes the revocation
    /// with its reason.
    pub fn explain(&self, e: CopyError) -> ProxyError {
        match (e, self.conn.revoked.get()) {
            (CopyError::Stopped, Some(reason)) => ProxyError::Revoked(reason.clone()),
            (e, _) => ProxyError::Copy(e),
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.tracker
            .live
            .lock()
            .expect("not poisoned")
            .remove(&self.id);
    }
}

impl ConnTracker {
    /// Registers a connection. `authorized` marks one that policy admitted (inbound); `cut`
    /// (the pod's [`Drain::cut_signal`](crate::drain::Drain::cut_signal)) stops it at the
    /// drain deadline as a revocation does.
    pub fn track(
        self: &Arc<Self>,
        info: ConnInfo,
        authorized: bool,
        cut: CancellationToken,
    ) -> Tracked {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(LiveConn {
            info,
            authorized,
            cancel: cut,
            revoked: OnceLock::new(),
        });
        self.live
            .lock()
            .expect("not poisoned")
            .insert(id, conn.clone());
        Tracked {
            id,
            conn,
            tracker: self.clone(),
        }
    }

    /// Every live connection, oldest first.
    pub fn snapshot(&self) -> Vec<ConnInfo> {
        let live = self.live.lock().expect("not poisoned");
        let mut out: Vec<(u64, ConnInfo)> =
            live.iter().map(|(id, c)| (*id, c.info.clone())).collect();
        drop(live);
        out.sort_by_key(|(id, _)| *id);
        out.into_iter().map(|(_, c)| c).collect()
    }

    /// Authorizes every live inbound connection against `state` and cancels the ones now
    /// denied. Returns how many were cancelled.
    pub fn recheck(&self, state: &State) -> usize {
        let live: Vec<Arc<LiveConn>> = self
            .live
            .lock()
            .expect("not poisoned")
            .values()
            .filter(|c| c.authorized && !c.cancel.is_cancelled())
            .cloned()
            .collect();
        let mut cut = 0;
        for c in live {
            let info = &c.info;
            let conn = Connection::new(info.src_identity.as_ref(), info.src.ip(), info.dst);
            let verdict = state.authorize(&info.pod_uid, &info.pod_namespace, &conn);
            if let Decision::Deny(reason) = verdict.decision {
                let _ = c.revoked.set(reason);
                c.cancel.cancel();
                cut += 1;
            }
        }
        cut
    }
}

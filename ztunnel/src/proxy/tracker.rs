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

/// What is known about a live connection, as the debug view shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConnInfo {
    pub direction: Direction,
    /// The enrolled pod on this node (`namespace/name`) and its uid.
    pub pod: String,
    pub pod_uid: String,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_identity: Option<Identity>,
    pub dst_identity: Option<Identity>,
    #[serde(serialize_with = "unix_seconds")]
    pub started: SystemTime,
}

fn unix_seconds<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    s.serialize_u64(secs)
}

/// A live connection's entry: shared parts only (the pod, identities), so a connection
/// costs its table slot and no strings of its own. The debug view's [`ConnInfo`] is built
/// from it when asked for.
#[derive(Debug)]
struct LiveConn {
    direction: Direction,
    pod: Arc<Pod>,
    src: SocketAddr,
    dst: SocketAddr,
    src_identity: Option<Identity>,
    dst_identity: Option<Identity>,
    started: SystemTime,
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

impl LiveConn {
    fn info(&self) -> ConnInfo {
        ConnInfo {
            direction: self.direction,
            pod: self.pod.name().to_string(),
            pod_uid: self.pod.uid.clone(),
            src: self.src,
            dst: self.dst,
            src_identity: self.src_identity.clone(),
            dst_identity: self.dst_identity.clone(),
            started: self.started,
        }
    }
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
        log: &ConnLog,
        authorized: bool,
        cut: CancellationToken,
    ) -> Tracked {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(LiveConn {
            direction: log.direction,
            pod: log.pod.clone(),
            src: log.src,
            dst: log.dst,
            src_identity: log.src_identity.clone(),
            dst_identity: log.dst_identity.clone(),
            started: SystemTime::now(),
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
        // Copy out references under the lock; the strings are built after it is released,
        // so a debug dump never holds up connections opening or closing.
        let live = self.live.lock().expect("not poisoned");
        let mut out: Vec<(u64, Arc<LiveConn>)> =
            live.iter().map(|(id, c)| (*id, c.clone())).collect();
        drop(live);
        out.sort_by_key(|(id, _)| *id);
        out.into_iter().map(|(_, c)| c.info()).collect()
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
            let conn = Connection::new(c.src_identity.as_ref(), c.src.ip(), c.dst);
            let verdict = state.authorize(&c.pod.uid, &c.pod.info.namespace, &conn);
            if let Decision::Deny(reason) = verdict.decision {
                let _ = c.revoked.set(reason);
                c.cancel.cancel();
                cut += 1;
            }
        }
        cut
    }
}

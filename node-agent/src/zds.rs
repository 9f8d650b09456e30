//! The ZDS server: hands enrolled pods' network namespaces to every connected ztunnel.
//!
//! The server owns the set of pods ztunnel must know (uid → workload info and netns). A
//! connecting ztunnel gets that whole set as its snapshot (`add` with the netns descriptor, or
//! `keep` for a pod whose netns the agent cannot open right now), then `snapshot_sent`, then
//! live changes. During a rolling update several ztunnels are connected: adds go to the newest
//! (the one that connected last and finished its snapshot), deletes go to all. Each connection
//! has one request in flight with a 5 s answer deadline; a connection that breaks the protocol
//! or goes away is dropped and the others keep being served.

use std::collections::{BTreeMap, HashSet};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use mesh_netns::NetNs;
use mesh_zds::client::WorkloadInfo;
use mesh_zds::server::{Connection, Request, RequestError};
use mesh_zds::transport::{SeqPacket, SeqPacketListener};
use tokio::sync::{mpsc, oneshot, watch};

/// Why a pod could not be handed to ztunnel.
#[derive(Debug, thiserror::Error)]
pub enum ZdsError {
    #[error("no ztunnel is connected to the ZDS socket")]
    NoZtunnel,
    #[error("ztunnel did not take the request")]
    Request(#[from] RequestError),
    #[error("the ztunnel connection went away")]
    Gone,
}

#[derive(Debug, Clone)]
struct KnownPod {
    info: WorkloadInfo,
    netns: Option<Arc<NetNs>>,
}

#[derive(Debug)]
struct Job {
    req: Request,
    netns: Option<Arc<NetNs>>,
    done: oneshot::Sender<Result<(), RequestError>>,
}

#[derive(Debug)]
struct Live {
    id: u64,
    jobs: mpsc::UnboundedSender<Job>,
}

#[derive(Debug, Default)]
struct State {
    pods: BTreeMap<String, KnownPod>,
    /// Connections that have finished their snapshot, oldest first.
    live: Vec<Live>,
    next_id: u64,
    /// Uids acknowledged by at least one live ztunnel.
    acked: HashSet<String>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    /// Live connection count, for readiness and metrics.
    connected: watch::Sender<usize>,
    snapshot_nacks: AtomicUsize,
}

/// Handle to the ZDS server.
#[derive(Debug, Clone)]
pub struct ZdsServer {
    inner: Arc<Inner>,
}

impl Default for ZdsServer {
    fn default() -> Self {
        Self::new()
    }
}

impl ZdsServer {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                connected: watch::Sender::new(0),
                snapshot_nacks: AtomicUsize::new(0),
            }),
        }
    }

    /// Binds the socket at `path` (replacing a stale socket file) and serves connections until
    /// the returned future is dropped. Must be called within a Tokio runtime.
    pub fn serve(&self, path: &Path) -> std::io::Result<impl Future<Output = ()> + use<>> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = SeqPacketListener::bind(path)?;
        let inner = self.inner.clone();
        let path = path.to_path_buf();
        Ok(async move {
            loop {
                match listener.accept().await {
                    Ok(sock) => match trusted_peer(&sock) {
                        Ok(()) => {
                            tokio::spawn(serve_connection(inner.clone(), sock, path.clone()));
                        }
                        Err(why) => {
                            tracing::error!(socket = %path.display(), %why, "refused a ZDS connection: no network namespace is handed to it");
                        }
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "ZDS accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        })
    }

    /// Live ztunnel connections.
    pub fn connected(&self) -> usize {
        *self.inner.connected.borrow()
    }

    /// Watches the live connection count.
    pub fn watch_connected(&self) -> watch::Receiver<usize> {
        self.inner.connected.subscribe()
    }

    /// Whether some live ztunnel has acknowledged `uid`.
    pub fn acked(&self, uid: &str) -> bool {
        self.inner
            .state
            .lock()
            .expect("not poisoned")
            .acked
            .contains(uid)
    }

    /// Snapshot entries that ztunnels refused.
    pub fn snapshot_nacks(&self) -> usize {
        self.inner.snapshot_nacks.load(Ordering::Relaxed)
    }

    /// Records a pod whose netns cannot be opened right now: snapshots will say `keep` for it
    /// so a restarted ztunnel does not drop its proxy.
    pub fn keep(&self, uid: &str, info: WorkloadInfo) {
        let mut st = self.inner.state.lock().expect("not poisoned");
        st.pods
            .insert(uid.to_string(), KnownPod { info, netns: None });
    }

    /// Hands `uid` to the newest ztunnel and waits for its answer. The pod is remembered
    /// either way, so a ztunnel that connects later gets it in its snapshot.
    pub async fn add(
        &self,
        uid: &str,
        info: WorkloadInfo,
        netns: Arc<NetNs>,
    ) -> Result<(), ZdsError> {
        let (done, answer) = oneshot::channel();
        {
            let mut st = self.inner.state.lock().expect("not poisoned");
            st.pods.insert(
                uid.to_string(),
                KnownPod {
                    info: info.clone(),
                    netns: Some(netns.clone()),
                },
            );
            let newest = st.live.last().ok_or(ZdsError::NoZtunnel)?;
            let job = Job {
                req: Request::Add {
                    uid: uid.to_string(),
                    info,
                },
                netns: Some(netns),
                done,
            };
            newest.jobs.send(job).map_err(|_| ZdsError::Gone)?;
        }
        answer.await.map_err(|_| ZdsError::Gone)??;
        self.inner
            .state
            .lock()
            .expect("not poisoned")
            .acked
            .insert(uid.to_string());
        Ok(())
    }

    /// Tells every ztunnel to stop serving `uid` and forgets it. Connections that are gone
    /// are ignored; a NACK from a live one is returned.
    pub async fn del(&self, uid: &str) -> Result<(), ZdsError> {
        let answers: Vec<_> = {
            let mut st = self.inner.state.lock().expect("not poisoned");
            st.pods.remove(uid);
            st.acked.remove(uid);
            st.live
                .iter()
                .filter_map(|c| {
                    let (done, answer) = oneshot::channel();
                    let job = Job {
                        req: Request::Del {
                            uid: uid.to_string(),
                        },
                        netns: None,
                        done,
                    };
                    c.jobs.send(job).ok().map(|()| answer)
                })
                .collect()
        };
        let mut result = Ok(());
        for answer in answers {
            match answer.await {
                Ok(Err(e)) if e.connection_usable() => result = Err(ZdsError::Request(e)),
                _ => {}
            }
        }
        result
    }
}

/// Only a process of this agent's own user (or root) may be ztunnel: the socket is `0600`,
/// and the peer's credentials are checked as well, so a socket made reachable by mistake
/// (a loosened mode, a shared mount) still hands no pod's netns to another user.
fn trusted_peer(sock: &SeqPacket) -> Result<(), String> {
    let cred = sock
        .peer_credentials()
        .map_err(|e| format!("reading the peer's credentials (SO_PEERCRED): {e}"))?;
    let ours = nix::unistd::geteuid().as_raw();
    if cred.uid() == 0 || cred.uid() == ours {
        Ok(())
    } else {
        Err(format!(
            "peer pid {} runs as uid {}, neither root nor this agent's uid {ours}",
            cred.pid(),
            cred.uid()
        ))
    }
}

async fn serve_connection(inner: Arc<Inner>, sock: SeqPacket, path: PathBuf) {
    let mut conn = match Connection::accept(sock).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(socket = %path.display(), error = &e as &dyn std::error::Error, "ZDS client rejected during hello");
            return;
        }
    };
    let (jobs, mut queue) = mpsc::unbounded_channel();
    // Registering and copying the snapshot under one lock means every pod is either in this
    // snapshot or sent to this connection afterwards, never neither.
    let (id, snapshot) = {
        let mut st = inner.state.lock().expect("not poisoned");
        st.next_id += 1;
        let id = st.next_id;
        st.live.push(Live { id, jobs });
        let snapshot: Vec<(String, KnownPod)> = st
            .pods
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        (id, snapshot)
    };
    tracing::info!(
        conn = id,
        pods = snapshot.len(),
        "ztunnel connected; sending snapshot"
    );
    // Counted as connected only once its snapshot is through.
    let counted = AtomicUsize::new(0);
    let result = async {
        for (uid, pod) in &snapshot {
            let (req, fd) = match &pod.netns {
                Some(ns) => (
                    Request::Add {
                        uid: uid.clone(),
                        info: pod.info.clone(),
                    },
                    Some(ns.as_fd()),
                ),
                None => (Request::Keep { uid: uid.clone() }, None),
            };
            match conn.request(&req, fd).await {
                Ok(()) => {
                    if pod.netns.is_some() {
                        inner.state.lock().expect("not poisoned").acked.insert(uid.clone());
                    }
                }
                Err(e) if e.connection_usable() => {
                    inner.snapshot_nacks.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(conn = id, %uid, error = &e as &dyn std::error::Error, "ztunnel refused a snapshot entry");
                }
                Err(e) => return Err(e),
            }
        }
        conn.request(&Request::SnapshotSent, None).await?;
        counted.store(1, Ordering::Relaxed);
        inner.connected.send_modify(|n| *n += 1);
        tracing::info!(conn = id, "snapshot acknowledged");
        loop {
            tokio::select! {
                job = queue.recv() => {
                    let Some(job) = job else { return Ok(()) };
                    let fd = job.netns.as_ref().map(|n| n.as_fd());
                    let r = conn.request(&job.req, fd).await;
                    let fatal = r.as_ref().is_err_and(|e| !e.connection_usable());
                    if let Err(e) = &r {
                        tracing::warn!(conn = id, req = job.req.kind(), error = e as &dyn std::error::Error, "ZDS request failed");
                    }
                    let _ = job.done.send(r);
                    if fatal {
                        return Err(RequestError::Timeout("request"));
                    }
                }
                e = conn.closed() => return Err(e),
            }
        }
    }
    .await;
    {
        let mut st = inner.state.lock().expect("not poisoned");
        st.live.retain(|c| c.id != id);
        if st.live.is_empty() {
            st.acked.clear();
        }
    }
    if counted.load(Ordering::Relaxed) == 1 {
        inner.connected.send_modify(|n| *n = n.saturating_sub(1));
    }
    match result {
        Ok(()) => tracing::info!(conn = id, "ztunnel connection closed"),
        Err(e) => tracing::warn!(
            conn = id,
            error = &e as &dyn std::error::Error,
            "ztunnel connection dropped"
        ),
    }
}

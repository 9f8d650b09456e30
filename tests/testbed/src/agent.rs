//! A stand-in node agent for tests of ztunnel alone: it installs the pod's redirection with
//! the node agent's own planner and speaks ZDS with the protocol crate's server half.
//!
//! Calls block (each runs on the agent's private runtime) so tests read top to bottom.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_netns::NetNs;
use mesh_zds::client::WorkloadInfo;
use mesh_zds::server::{Connection, Request, RequestError};
use mesh_zds::transport::SeqPacketListener;
use node_agent::redirect;

use crate::lab::Pod;

#[derive(Debug)]
pub struct FakeAgent {
    rt: tokio::runtime::Runtime,
    listener: SeqPacketListener,
    conn: Option<Connection>,
    pub path: PathBuf,
}

impl FakeAgent {
    /// Listens on `path` (a ZDS socket).
    pub fn bind(path: &Path) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let listener = rt
            .block_on(async { SeqPacketListener::bind(path) })
            .unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
        Self {
            rt,
            listener,
            conn: None,
            path: path.to_path_buf(),
        }
    }

    /// Waits for ztunnel to connect and say hello.
    pub fn accept(&mut self, timeout: Duration) {
        let conn = self.rt.block_on(async {
            let sock = tokio::time::timeout(timeout, self.listener.accept())
                .await
                .expect("ztunnel did not connect to the ZDS socket in time")
                .expect("accept");
            Connection::accept(sock).await.expect("hello")
        });
        self.conn = Some(conn);
    }

    /// Drops the current connection (as an agent restart would).
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    pub fn request(
        &mut self,
        req: &Request,
        netns: Option<BorrowedFd<'_>>,
    ) -> Result<(), RequestError> {
        let rt = &self.rt;
        let conn = self
            .conn
            .as_mut()
            .expect("no ztunnel connected; call accept first");
        rt.block_on(conn.request(req, netns))
    }

    /// Hands `pod` to ztunnel (no rules installed).
    pub fn add(
        &mut self,
        pod: &Pod,
        uid: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<(), RequestError> {
        let netns = NetNs::open(pod.ns.path()).expect("pod netns");
        let info = WorkloadInfo {
            name: pod.name.clone(),
            namespace: namespace.into(),
            service_account: service_account.into(),
            dns_nameservers: Vec::new(),
        };
        self.request(
            &Request::Add {
                uid: uid.into(),
                info,
            },
            Some(netns.as_fd()),
        )
    }

    /// Installs the pod's redirection, then hands it to ztunnel.
    pub fn enroll(&mut self, pod: &Pod, uid: &str, namespace: &str, service_account: &str) {
        install_redirection(pod);
        self.add(pod, uid, namespace, service_account)
            .unwrap_or_else(|e| panic!("enrolling {}: {e}", pod.name));
    }

    pub fn del(&mut self, uid: &str) -> Result<(), RequestError> {
        self.request(&Request::Del { uid: uid.into() }, None)
    }

    pub fn keep(&mut self, uid: &str) -> Result<(), RequestError> {
        self.request(&Request::Keep { uid: uid.into() }, None)
    }

    pub fn snapshot_sent(&mut self) -> Result<(), RequestError> {
        self.request(&Request::SnapshotSent, None)
    }

    /// Sends arbitrary bytes with `fds` and returns ztunnel's answer (ack or NACK reason).
    pub fn send_raw(
        &mut self,
        data: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Result<(), String>, RequestError> {
        let rt = &self.rt;
        let conn = self.conn.as_mut().expect("connected");
        rt.block_on(conn.send_raw(data, fds))
    }

    /// Whether ztunnel still holds the connection open (waits briefly for a close).
    pub fn connection_alive(&mut self) -> bool {
        let rt = &self.rt;
        let conn = self.conn.as_mut().expect("connected");
        let closed = rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(200), conn.closed()).await
        });
        closed.is_err()
    }
}

/// Installs SPEC §3 redirection in the pod's netns, with the node agent's own code.
pub fn install_redirection(pod: &Pod) {
    install_redirection_with(pod, redirect::Options::default());
}

/// The same with the node agent's per-pod options (DNS capture, inbound capture off, ...).
pub fn install_redirection_with(pod: &Pod, options: redirect::Options) {
    let (netns, rt) = redirect_context(pod);
    rt.block_on(redirect::Redirector::new().apply(&netns, options))
        .unwrap_or_else(|e| panic!("redirection for {}: {e:?}", pod.name));
}

/// Removes what [`install_redirection`] installed, with the node agent's own code.
pub fn remove_redirection(pod: &Pod) {
    let (netns, rt) = redirect_context(pod);
    rt.block_on(redirect::Redirector::new().remove(&netns))
        .unwrap_or_else(|e| panic!("removing redirection for {}: {e:?}", pod.name));
}

fn redirect_context(pod: &Pod) -> (std::sync::Arc<NetNs>, tokio::runtime::Runtime) {
    let netns = std::sync::Arc::new(NetNs::open(pod.ns.path()).expect("pod netns"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    (netns, rt)
}

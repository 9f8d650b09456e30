//! A stand-in waypoint or east-west gateway: an HBONE server in a pod's netns, with its own
//! certificate from the mesh's CA, that records every CONNECT it is sent (authority and the
//! peer's proven identity) and forwards it: a waypoint re-tunnels each stream over HBONE to
//! the destination's ztunnel as itself, a gateway passes the stream's bytes (the client's
//! inner TLS) unread to the destination's ztunnel.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use ztunnel::identity::Identity;
use ztunnel::identity::ca::LocalCa;
use ztunnel::identity::manager::CertManager;
use ztunnel::proxy::double::StreamIo;
use ztunnel::tls::TlsContext;

use crate::lab::Pod;
use crate::mesh::Mesh;

/// Where a CONNECT with a given authority goes on.
pub type Route<T> = Arc<dyn Fn(&str) -> Option<T> + Send + Sync>;

/// A waypoint's next hop: the destination ztunnel's 15008, who it must be, the authority.
#[derive(Debug, Clone)]
pub struct HboneTarget {
    pub addr: SocketAddr,
    pub identity: Identity,
    pub authority: String,
}

/// What the relay does with each stream.
#[derive(Clone)]
#[allow(missing_debug_implementations)]
pub enum Forward {
    /// A waypoint: a new HBONE stream, as the relay's own identity.
    Hbone(Route<HboneTarget>),
    /// A gateway: the bytes as they are, over TCP.
    Raw(Route<SocketAddr>),
}

/// One CONNECT the relay was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub authority: String,
    pub peer: Option<String>,
}

/// A running relay; stops on drop.
pub struct Relay {
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").field("seen", &self.seen()).finish()
    }
}

impl Relay {
    /// Serves HBONE on `pod`:15008 as `namespace/service_account` of the mesh's trust domain.
    pub fn start(
        m: &Mesh,
        pod: &Pod,
        namespace: &str,
        service_account: &str,
        forward: Forward,
    ) -> Self {
        let (ca_dir, namespace, service_account) = (
            m.ca_dir.clone(),
            namespace.to_string(),
            service_account.to_string(),
        );
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let addr = pod.addr(15008);
        let record = seen.clone();
        let thread = pod.ns.spawn_async(move || async move {
            let (tls, cert, _certs) = client_identity(&ca_dir, &namespace, &service_account).await;
            let tls = Arc::new(tls);
            let server = tls.server_config(cert.clone()).expect("server config");
            let listener = TcpListener::bind(addr).await.expect("bind 15008");
            ready_tx.send(()).expect("ready");
            let serve = async {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let ctx = Conn {
                        server: server.clone(),
                        tls: tls.clone(),
                        cert: cert.clone(),
                        forward: forward.clone(),
                        seen: record.clone(),
                    };
                    tokio::spawn(ctx.serve(tcp));
                }
            };
            tokio::select! {
                () = serve => {}
                _ = stopped => {}
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("relay did not start");
        Self {
            seen,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Every CONNECT so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("not poisoned").clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Conn {
    server: Arc<rustls::ServerConfig>,
    tls: Arc<TlsContext>,
    cert: ztunnel::identity::manager::CertHandle,
    forward: Forward,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Conn {
    async fn serve(self, tcp: TcpStream) {
        let _ = tcp.set_nodelay(true);
        let Ok(tls) = tokio_rustls::TlsAcceptor::from(self.server.clone())
            .accept(tcp)
            .await
        else {
            return;
        };
        let peer =
            ztunnel::tls::peer_identity(tls.get_ref().1.peer_certificates()).map(|i| i.to_string());
        let Ok(mut conn) = h2::server::handshake(tls).await else {
            return;
        };
        let this = Arc::new(self);
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            let authority = req.uri().to_string();
            this.seen.lock().expect("not poisoned").push(Seen {
                authority: authority.clone(),
                peer: peer.clone(),
            });
            let this = this.clone();
            tokio::spawn(async move {
                let upstream = this.upstream(&authority).await;
                let mut answer = http::Response::new(());
                let Some(mut upstream) = upstream else {
                    *answer.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                    let _ = respond.send_response(answer, true);
                    return;
                };
                let Ok(send) = respond.send_response(answer, false) else {
                    return;
                };
                let mut downstream = StreamIo::new(send, req.into_body());
                let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
            });
        }
    }

    async fn upstream(&self, authority: &str) -> Option<Box<dyn Upstream>> {
        match &self.forward {
            Forward::Raw(route) => {
                let tcp = TcpStream::connect(route(authority)?).await.ok()?;
                let _ = tcp.set_nodelay(true);
                Some(Box::new(tcp))
            }
            Forward::Hbone(route) => {
                let target = route(authority)?;
                let stream = hbone_stream(&self.tls, self.cert.clone(), &target)
                    .await
                    .ok()?;
                Some(Box::new(stream))
            }
        }
    }
}

/// A fresh HBONE connection (TCP, mTLS presenting `cert`, HTTP/2) to `target` and one
/// CONNECT on it, answered 200; the connection lives as long as the stream is used.
pub async fn hbone_stream(
    tls: &TlsContext,
    cert: ztunnel::identity::manager::CertHandle,
    target: &HboneTarget,
) -> std::io::Result<StreamIo> {
    let fail =
        |what: &str, e: &dyn std::fmt::Display| std::io::Error::other(format!("{what}: {e}"));
    let config = tls
        .client_config(cert, vec![target.identity.clone()])
        .map_err(|e| fail("TLS setup", &e))?;
    let tcp = TcpStream::connect(target.addr).await?;
    tcp.set_nodelay(true)?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::IpAddress(target.addr.ip().into()), tcp)
        .await?;
    let (sender, conn) = h2::client::handshake(tls)
        .await
        .map_err(|e| fail("HTTP/2", &e))?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target.authority.as_str())
        .body(())
        .map_err(|e| fail("CONNECT", &e))?;
    let mut sender = sender.ready().await.map_err(|e| fail("HTTP/2", &e))?;
    let (response, send) = sender
        .send_request(req, false)
        .map_err(|e| fail("CONNECT", &e))?;
    let response = response.await.map_err(|e| fail("CONNECT", &e))?;
    if response.status() != http::StatusCode::OK {
        return Err(fail("CONNECT", &response.status()));
    }
    Ok(StreamIo::new(send, response.into_body()))
}

/// TLS settings and a certificate from the mesh's CA (`ca_dir`) for `namespace/service_account`, for
/// HBONE clients in a test or benchmark process. Must be called inside a Tokio runtime; keep
/// the returned manager as long as the certificate is used.
pub async fn client_identity(
    ca_dir: &std::path::Path,
    namespace: &str,
    service_account: &str,
) -> (
    TlsContext,
    ztunnel::identity::manager::CertHandle,
    CertManager,
) {
    let ca = LocalCa::load_dir(ca_dir).expect("CA");
    let certs = CertManager::new(
        Arc::new(ca),
        Duration::from_secs(3600),
        ztunnel::tls::provider(),
        tokio::runtime::Handle::current(),
    );
    let tls = TlsContext::new(certs.roots(), "cluster.local").expect("TLS");
    let identity = Identity::new("cluster.local", namespace, service_account).expect("identity");
    let cert = certs.track(&identity);
    assert!(
        cert.ready(Duration::from_secs(10)).await,
        "client certificate"
    );
    (tls, cert, certs)
}

trait Upstream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Upstream for T {}

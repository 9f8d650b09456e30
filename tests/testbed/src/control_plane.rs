//! A stand-in for istiod: a delta ADS server and Istio's certificate service over TLS, built
//! from ztunnel's own protos, listening inside a simulated node's namespace so every node's
//! ztunnel can reach it. Each new stream gets the full set of workloads and policies; every
//! change is pushed to every open stream as a delta (added/changed resources, removed names).
//! The CA signs each CSR for the identity it asks for with a root that also signs the
//! server's own certificate, like istiod's self-signed mode.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use ztunnel::proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use ztunnel::proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use ztunnel::proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use ztunnel::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use ztunnel::proto::{security as sec, workload as wl};
use ztunnel::xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE};

use crate::lab::Ns;
use crate::mesh::Workload;

type Reply = Result<DeltaDiscoveryResponse, tonic::Status>;

#[derive(Default)]
struct Inner {
    /// type URL → name → encoded resource.
    resources: BTreeMap<&'static str, BTreeMap<String, Vec<u8>>>,
    sessions: Vec<mpsc::UnboundedSender<Reply>>,
    version: u64,
    /// Every request received (ACKs and NACKs included), for assertions.
    requests: Vec<DeltaDiscoveryRequest>,
    /// While set, new streams get nothing (an istiod that has not pushed yet); see
    /// [`ControlPlane::hold`].
    held: bool,
    /// Streams opened while held, waiting for their first full push.
    waiting: Vec<mpsc::UnboundedSender<Reply>>,
}

impl Inner {
    fn response(
        &mut self,
        type_url: &'static str,
        names: Option<&[String]>,
        removed: Vec<String>,
    ) -> DeltaDiscoveryResponse {
        self.version += 1;
        let version = self.version.to_string();
        let all = self.resources.entry(type_url).or_default();
        let resources = all
            .iter()
            .filter(|(n, _)| names.is_none_or(|names| names.contains(n)))
            .map(|(name, value)| Resource {
                name: name.clone(),
                version: version.clone(),
                resource: Some(prost_types::Any {
                    type_url: type_url.into(),
                    value: value.clone(),
                }),
                ..Default::default()
            })
            .collect();
        DeltaDiscoveryResponse {
            type_url: type_url.into(),
            nonce: format!("nonce-{version}"),
            system_version_info: version,
            resources,
            removed_resources: removed,
        }
    }

    /// Sends a new stream everything, then keeps it for later deltas.
    fn open(&mut self, tx: mpsc::UnboundedSender<Reply>) {
        for type_url in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
            let full = self.response(type_url, None, Vec::new());
            let _ = tx.send(Ok(full));
        }
        self.sessions.push(tx);
    }

    /// Replaces every resource of `type_url`, pushing the difference to every stream.
    fn replace(&mut self, type_url: &'static str, next: BTreeMap<String, Vec<u8>>) {
        let old = self.resources.remove(type_url).unwrap_or_default();
        let changed: Vec<String> = next
            .iter()
            .filter(|(n, v)| old.get(*n) != Some(*v))
            .map(|(n, _)| n.clone())
            .collect();
        let removed: Vec<String> = old
            .keys()
            .filter(|n| !next.contains_key(*n))
            .cloned()
            .collect();
        self.resources.insert(type_url, next);
        if changed.is_empty() && removed.is_empty() {
            return;
        }
        let resp = self.response(type_url, Some(&changed), removed);
        self.sessions.retain(|s| s.send(Ok(resp.clone())).is_ok());
    }
}

#[derive(Clone)]
struct Service(Arc<Mutex<Inner>>);

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type DeltaAggregatedResourcesStream = UnboundedReceiverStream<Reply>;

    async fn delta_aggregated_resources(
        &self,
        req: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut inner = self.0.lock().expect("not poisoned");
            if inner.held {
                inner.waiting.push(tx);
            } else {
                inner.open(tx);
            }
        }
        let inner = self.0.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                inner.lock().expect("not poisoned").requests.push(m);
            }
        });
        Ok(tonic::Response::new(UnboundedReceiverStream::new(rx)))
    }
}

struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    root_pem: String,
    issued: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl IstioCertificateService for Ca {
    async fn create_certificate(
        &self,
        req: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        let req = req.into_inner();
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(&req.csr)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let now = std::time::SystemTime::now();
        csr.params.not_before = (now - std::time::Duration::from_secs(60)).into();
        let life =
            std::time::Duration::from_secs(u64::try_from(req.validity_duration).unwrap_or(3600));
        csr.params.not_after = (now + life).into();
        csr.params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let who = req
            .metadata
            .and_then(
                |m| match m.fields.get("ImpersonatedIdentity")?.kind.clone()? {
                    prost_types::value::Kind::StringValue(s) => Some(s),
                    _ => None,
                },
            )
            .unwrap_or_default();
        self.issued.lock().expect("not poisoned").push(who);
        Ok(tonic::Response::new(IstioCertificateResponse {
            cert_chain: vec![cert.pem(), self.root_pem.clone()],
        }))
    }
}

/// A running stand-in control plane.
pub struct ControlPlane {
    inner: Arc<Mutex<Inner>>,
    addr: SocketAddr,
    root: PathBuf,
    issued: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Serves on `ip:15012` inside `ns`, with a fresh self-signed certificate for `ip` whose
    /// PEM is written into `dir`.
    pub fn start(ns: &Ns, ip: IpAddr, dir: &Path) -> Self {
        let addr = SocketAddr::new(ip, 15012);
        let root_key = rcgen::KeyPair::generate().expect("key");
        let mut root_params = rcgen::CertificateParams::default();
        root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root_cert = root_params.self_signed(&root_key).expect("root");
        let root_pem = root_cert.pem();
        let issuer = rcgen::Issuer::from_ca_cert_der(root_cert.der(), root_key).expect("issuer");
        let serving_key = rcgen::KeyPair::generate().expect("key");
        let serving = rcgen::CertificateParams::new(vec![ip.to_string()])
            .expect("params")
            .signed_by(&serving_key, &issuer)
            .expect("serving certificate");
        let root = dir.join("istiod-root.pem");
        std::fs::write(&root, &root_pem).expect("root file");
        let identity =
            tonic::transport::Identity::from_pem(serving.pem(), serving_key.serialize_pem());
        let issued = Arc::new(Mutex::new(Vec::new()));
        let ca = Ca {
            issuer,
            root_pem,
            issued: issued.clone(),
        };
        let listener = ns
            .open()
            .run(|| std::net::TcpListener::bind(addr))
            .expect("enter netns")
            .expect("bind the control plane");
        listener.set_nonblocking(true).expect("nonblocking");
        let inner = Arc::new(Mutex::new(Inner::default()));
        let service = Service(inner.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let server = tonic::transport::Server::builder()
                    .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                    .expect("TLS")
                    .add_service(AggregatedDiscoveryServiceServer::new(service))
                    .add_service(IstioCertificateServiceServer::new(ca))
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                        let _ = stopped.await;
                    });
                let _ = server.await;
            });
        });
        Self {
            inner,
            addr,
            root,
            issued,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `--xds-address` for ztunnel.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// `--xds-root-cert` for ztunnel.
    pub fn root_cert(&self) -> &Path {
        &self.root
    }

    /// Publishes exactly these workloads (by uid).
    pub fn set_workloads(&self, workloads: &[&Workload]) {
        let next = workloads
            .iter()
            .map(|w| {
                let addr = wl::Address {
                    r#type: Some(wl::address::Type::Workload(to_proto(w))),
                };
                (w.uid(), addr.encode_to_vec())
            })
            .collect();
        self.inner
            .lock()
            .expect("not poisoned")
            .replace(ADDRESS_TYPE, next);
    }

    /// Publishes exactly these policies.
    pub fn set_policies(&self, policies: &[sec::Authorization]) {
        let next = policies
            .iter()
            .map(|p| (format!("{}/{}", p.namespace, p.name), p.encode_to_vec()))
            .collect();
        self.inner
            .lock()
            .expect("not poisoned")
            .replace(AUTHORIZATION_TYPE, next);
    }

    /// From now on, streams that open are accepted but sent nothing until [`Self::release`].
    pub fn hold(&self) {
        self.inner.lock().expect("not poisoned").held = true;
    }

    /// Sends every held stream its first push and serves new ones normally again.
    pub fn release(&self) {
        let mut inner = self.inner.lock().expect("not poisoned");
        inner.held = false;
        for tx in std::mem::take(&mut inner.waiting) {
            inner.open(tx);
        }
    }

    /// The identities certificates were issued for, in order.
    pub fn issued(&self) -> Vec<String> {
        self.issued.lock().expect("not poisoned").clone()
    }

    /// Requests received so far (initial requests, ACKs, NACKs).
    pub fn requests(&self) -> Vec<DeltaDiscoveryRequest> {
        self.inner.lock().expect("not poisoned").requests.clone()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Open streams end with the runtime; do not wait for clients to hang up.
        self.inner.lock().expect("not poisoned").sessions.clear();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn to_proto(w: &Workload) -> wl::Workload {
    let addresses = w
        .pod
        .ips
        .iter()
        .map(|ip| match ip {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        })
        .collect();
    wl::Workload {
        uid: w.uid(),
        name: w.pod.name.clone(),
        namespace: w.namespace.clone(),
        addresses,
        tunnel_protocol: if w.hbone {
            wl::TunnelProtocol::Hbone as i32
        } else {
            wl::TunnelProtocol::None as i32
        },
        service_account: w.service_account.clone(),
        node: w.pod.node.clone(),
        authorization_policies: w.policies.clone(),
        ..Default::default()
    }
}

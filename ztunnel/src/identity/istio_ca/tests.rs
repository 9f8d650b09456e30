//! The client against an in-process Istio CA (tonic, TLS, the same protos): a good answer,
//! an answer for another identity, a chain from another CA, an outage, and the manager
//! keeping the old certificate through an outage.

use std::sync::Mutex;

use rcgen::{BasicConstraints, CertificateSigningRequestParams, IsCa, Issuer, SanType};
use tokio_stream::wrappers::TcpListenerStream;

use super::*;
use crate::proto::ca::IstioCertificateResponse;
use crate::proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Good,
    OtherIdentity,
    ForeignCa,
    Outage,
}

/// What the CA saw of the last request.
#[derive(Debug, Default, Clone)]
struct Seen {
    token: Option<String>,
    impersonated: Option<String>,
    validity: i64,
    count: usize,
}

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    foreign: Issuer<'static, KeyPair>,
    root_pem: String,
    mode: Arc<Mutex<Mode>>,
    seen: Arc<Mutex<Seen>>,
}

fn new_ca() -> (Issuer<'static, KeyPair>, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    let pem = cert.pem();
    (Issuer::from_ca_cert_der(cert.der(), key).unwrap(), pem)
}

#[tonic::async_trait]
impl IstioCertificateService for Ca {
    async fn create_certificate(
        &self,
        req: tonic::Request<IstioCertificateRequest>,
    ) -> Result<tonic::Response<IstioCertificateResponse>, tonic::Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let req = req.into_inner();
        {
            let mut seen = self.seen.lock().unwrap();
            seen.token = token;
            seen.impersonated = req.metadata.as_ref().and_then(|m| {
                match m.fields.get("ImpersonatedIdentity")?.kind.as_ref()? {
                    prost_types::value::Kind::StringValue(s) => Some(s.clone()),
                    _ => None,
                }
            });
            seen.validity = req.validity_duration;
            seen.count += 1;
        }
        let mode = *self.mode.lock().unwrap();
        if mode == Mode::Outage {
            return Err(tonic::Status::unavailable("CA down"));
        }
        let mut csr = CertificateSigningRequestParams::from_pem(&req.csr)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        if mode == Mode::OtherIdentity {
            csr.params.subject_alt_names = vec![SanType::URI(
                "spiffe://cluster.local/ns/other/sa/thief"
                    .try_into()
                    .unwrap(),
            )];
        }
        let now = time::OffsetDateTime::now_utc();
        csr.params.not_before = now - time::Duration::minutes(1);
        csr.params.not_after = now + time::Duration::seconds(req.validity_duration);
        csr.params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = if mode == Mode::ForeignCa {
            &self.foreign
        } else {
            &self.issuer
        };
        let cert = csr
            .signed_by(issuer)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(IstioCertificateResponse {
            cert_chain: vec![cert.pem(), self.root_pem.clone()],
        }))
    }
}

struct Setup {
    ca: IstioCa,
    mode: Arc<Mutex<Mode>>,
    seen: Arc<Mutex<Seen>>,
    token: PathBuf,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (issuer, root_pem) = new_ca();
    let (foreign, _) = new_ca();
    // The CA's serving certificate comes from the same root.
    let serving_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let serving = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&serving_key, &issuer)
        .unwrap();
    let roots = dir.path().join("roots.pem");
    std::fs::write(&roots, &root_pem).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "tok\n").unwrap();
    let mode = Arc::new(Mutex::new(Mode::Good));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let service = Ca {
        issuer,
        foreign,
        root_pem,
        mode: mode.clone(),
        seen: seen.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let identity = tonic::transport::Identity::from_pem(serving.pem(), serving_key.serialize_pem());
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .unwrap()
            .add_service(IstioCertificateServiceServer::new(service))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let ca = IstioCa::new(
        &format!("https://{addr}"),
        &roots,
        Some(token.clone()),
        "cluster1",
    )
    .unwrap();
    Setup {
        ca,
        mode,
        seen,
        token,
        _dir: dir,
    }
}

fn pod() -> Identity {
    Identity::new("cluster.local", "ns-a", "client").unwrap()
}

#[tokio::test]
async fn a_good_answer_becomes_a_workload_certificate() {
    let s = setup().await;
    let cert = s.ca.fetch(&pod(), Duration::from_secs(3600)).await.unwrap();
    assert_eq!(cert.identity, pod());
    assert_eq!(
        cert.chain.len(),
        1,
        "the root is not part of the served chain"
    );
    assert!(!cert.serial.is_empty());
    let life = cert.not_after.duration_since(cert.not_before).unwrap();
    assert!(
        life > Duration::from_secs(3600) && life < Duration::from_secs(3700),
        "{life:?}"
    );
    let seen = s.seen.lock().unwrap().clone();
    assert_eq!(seen.token.as_deref(), Some("Bearer tok"));
    assert_eq!(
        seen.impersonated.as_deref(),
        Some("spiffe://cluster.local/ns/ns-a/sa/client")
    );
    assert_eq!(seen.validity, 3600);
    assert_eq!(s.ca.roots().len(), 1);
    // A rotated token is read for the next request.
    std::fs::write(&s.token, "tok2").unwrap();
    s.ca.fetch(&pod(), Duration::from_secs(3600)).await.unwrap();
    assert_eq!(s.seen.lock().unwrap().token.as_deref(), Some("Bearer tok2"));
}

#[tokio::test]
async fn wrong_answers_are_refused() {
    let s = setup().await;
    for (mode, want) in [
        (
            Mode::OtherIdentity,
            "not spiffe://cluster.local/ns/ns-a/sa/client",
        ),
        (Mode::ForeignCa, "does not lead to our roots"),
        (Mode::Outage, "Unavailable"),
    ] {
        *s.mode.lock().unwrap() = mode;
        match s.ca.fetch(&pod(), Duration::from_secs(3600)).await {
            Err(e) => assert!(e.to_string().contains(want), "{mode:?}: {e}"),
            Ok(c) => panic!("{mode:?}: accepted {c:?}"),
        }
    }
}

#[tokio::test]
async fn an_outage_keeps_the_old_certificate_until_the_ca_is_back() {
    let s = setup().await;
    let mode = s.mode.clone();
    let seen = s.seen.clone();
    let manager = super::super::manager::CertManager::new(
        Arc::new(s.ca),
        Duration::from_secs(4),
        crate::tls::provider(),
        tokio::runtime::Handle::current(),
    );
    let handle = manager.track(&pod());
    assert!(handle.ready(Duration::from_secs(5)).await);
    let first = handle.current().unwrap().cert.serial.clone();
    *mode.lock().unwrap() = Mode::Outage;
    // Renewal starts at half-life (2 s) and fails; the old certificate stays in service.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(seen.lock().unwrap().count >= 2, "no renewal attempt");
    assert_eq!(handle.current().unwrap().cert.serial, first);
    *mode.lock().unwrap() = Mode::Good;
    let mut renewed = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if handle.current().unwrap().cert.serial != first {
            renewed = true;
            break;
        }
    }
    assert!(renewed, "not renewed after the CA came back");
}

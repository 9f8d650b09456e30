//! Workload certificates from Istio's CA (`istio.v1.auth.IstioCertificateService/
//! CreateCertificate`, istiod's 15012): a fresh ECDSA P-256 key and CSR per certificate, the
//! requested lifetime, the pod's identity as `ImpersonatedIdentity` (ztunnel asks on behalf of
//! the pods on its node), and the bearer token, re-read for every request.
//!
//! An answer is trusted only if its chain leads to the configured roots and its leaf names
//! exactly the identity asked for; anything else is an error, and [`super::manager`] keeps the
//! previous certificate while it is valid and retries with backoff.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::Identity;
use super::ca::{CaError, CertificateSource, FetchFuture, WorkloadCert};
use crate::proto::ca::IstioCertificateRequest;
use crate::proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;

/// Istio's CA as a [`CertificateSource`].
#[derive(Debug)]
pub struct IstioCa {
    channel: Channel,
    roots: Vec<CertificateDer<'static>>,
    store: Arc<RootCertStore>,
    token_file: Option<PathBuf>,
    cluster_id: String,
}

impl IstioCa {
    /// `address` is `https://host:port`; `roots` (PEM) sign both the CA's serving
    /// certificate and the workload certificates it issues. Connects lazily.
    pub fn new(
        address: &str,
        roots: &Path,
        token_file: Option<PathBuf>,
        cluster_id: &str,
    ) -> Result<Self, CaError> {
        let invalid = |why: String| CaError::Invalid {
            path: roots.to_path_buf(),
            why,
        };
        let pem = std::fs::read(roots).map_err(|source| CaError::Read {
            path: roots.to_path_buf(),
            source,
        })?;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid(format!("not PEM certificates: {e}")))?;
        if certs.is_empty() {
            return Err(invalid("no certificates".into()));
        }
        let mut store = RootCertStore::empty();
        for c in &certs {
            store
                .add(c.clone())
                .map_err(|e| invalid(format!("not a usable root: {e}")))?;
        }
        let channel = Endpoint::from_shared(address.to_string())
            .map_err(|e| invalid(format!("CA address {address:?}: {e}")))?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .map_err(|e| invalid(format!("TLS to the CA: {e}")))?
            .connect_lazy();
        Ok(Self {
            channel,
            roots: certs,
            store: Arc::new(store),
            token_file,
            cluster_id: cluster_id.to_string(),
        })
    }

    async fn request(
        &self,
        identity: &Identity,
        lifetime: Duration,
    ) -> Result<WorkloadCert, String> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![super::ca::spiffe_san(identity).map_err(|e| e.to_string())?];
        let csr = params
            .serialize_request(&key)
            .and_then(|r| r.pem())
            .map_err(|e| format!("building the CSR: {e}"))?;
        let metadata = prost_types::Struct {
            fields: [(
                "ImpersonatedIdentity".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
                },
            )]
            .into(),
        };
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(metadata),
        });
        if let Some(file) = &self.token_file {
            crate::grpc::attach_token(&mut req, file)
                .map_err(|e| mesh_contract::Chain(&e).to_string())?;
        }
        if let Ok(v) = self.cluster_id.parse() {
            req.metadata_mut().insert("clusterid", v);
        }
        let resp = IstioCertificateServiceClient::new(self.channel.clone())
            .create_certificate(req)
            .await
            .map_err(|s| format!("CA answered {:?}: {}", s.code(), s.message()))?
            .into_inner();
        let mut chain = Vec::new();
        for pem in &resp.cert_chain {
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                chain.push(c.map_err(|e| format!("CA sent a bad certificate: {e}"))?);
            }
        }
        crate::tls::verify_issued(&chain, &self.store, identity)?;
        // The roots are ours already: keep leaf and intermediates only.
        chain.retain(|c| !self.roots.contains(c));
        let first = chain
            .first()
            .ok_or("the CA returned only root certificates")?;
        let (_, leaf) = x509_parser::parse_x509_certificate(first).map_err(|e| e.to_string())?;
        let validity = leaf.validity();
        let at = |t: x509_parser::time::ASN1Time| {
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
        };
        Ok(WorkloadCert {
            identity: identity.clone(),
            serial: leaf.raw_serial_as_string().replace(':', ""),
            not_before: at(validity.not_before),
            not_after: at(validity.not_after),
            chain,
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        })
    }
}

impl CertificateSource for IstioCa {
    fn fetch<'a>(&'a self, identity: &'a Identity, lifetime: Duration) -> FetchFuture<'a> {
        Box::pin(async move {
            self.request(identity, lifetime)
                .await
                .map_err(|why| CaError::Issue {
                    identity: identity.clone(),
                    why,
                })
        })
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.roots.clone()
    }
}

#[cfg(test)]
mod tests;

//! TLS for HBONE: rustls configurations and SPIFFE peer verification.
//!
//! One crypto provider (ring) and one protocol (TLS 1.3 with AES-GCM suites) for every
//! connection. Servers require a client certificate that chains to our roots and carries a
//! SPIFFE identity in our trust domain; clients require the server's URI SAN to be one of the
//! identities expected for the destination. DNS and IP SANs are ignored. Certificates come
//! from [`crate::identity::manager`] at handshake time, so renewal needs no new config.

mod verify;

pub use verify::verify_issued;

use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::CertificateDer;

use crate::identity::Identity;
use crate::identity::manager::CertHandle;

pub use verify::identity_in;

/// ALPN protocol id for HBONE.
pub const ALPN_H2: &[u8] = b"h2";

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("invalid trust anchor: {0}")]
    Root(String),
    #[error("no trust anchors configured")]
    NoRoots,
    #[error("building TLS configuration")]
    Config(#[from] rustls::Error),
}

/// The workspace's crypto provider: ring, TLS 1.3 AES-GCM suites only.
pub fn provider() -> Arc<CryptoProvider> {
    let base = rustls::crypto::ring::default_provider();
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ],
        ..base
    })
}

/// Everything needed to build client and server configurations.
#[derive(Debug, Clone)]
pub struct TlsContext {
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    trust_domain: String,
    client_verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl TlsContext {
    pub fn new(
        roots: Vec<CertificateDer<'static>>,
        trust_domain: &str,
    ) -> Result<Self, TlsSetupError> {
        if roots.is_empty() {
            return Err(TlsSetupError::NoRoots);
        }
        let provider = provider();
        let mut store = RootCertStore::empty();
        for root in roots {
            store
                .add(root)
                .map_err(|e| TlsSetupError::Root(e.to_string()))?;
        }
        let roots = Arc::new(store);
        let client_verifier = verify::SpiffeClientVerifier::new(
            roots.clone(),
            provider.clone(),
            trust_domain.to_string(),
        )?;
        Ok(Self {
            provider,
            roots,
            trust_domain: trust_domain.to_string(),
            client_verifier: Arc::new(client_verifier),
        })
    }

    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The HBONE server configuration for a pod presenting `cert`.
    pub fn server_config(&self, cert: CertHandle) -> Result<Arc<ServerConfig>, TlsSetupError> {
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(self.client_verifier.clone())
            .with_cert_resolver(Arc::new(CurrentCert(cert)));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        // No resumption: every connection authenticates with the current certificates.
        cfg.send_tls13_tickets = 0;
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Arc::new(cfg))
    }

    /// The HBONE client configuration for a pod presenting `cert` to a server that must prove
    /// one of `expected`.
    pub fn client_config(
        &self,
        cert: CertHandle,
        expected: Vec<Identity>,
    ) -> Result<Arc<ClientConfig>, TlsSetupError> {
        let verifier =
            verify::SpiffeServerVerifier::new(self.roots.clone(), self.provider.clone(), expected);
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(CurrentCert(cert)));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        cfg.resumption = rustls::client::Resumption::disabled();
        cfg.enable_sni = false;
        Ok(Arc::new(cfg))
    }
}

/// Presents whatever certificate the manager holds now.
#[derive(Debug)]
struct CurrentCert(CertHandle);

impl CurrentCert {
    fn get(&self) -> Option<Arc<CertifiedKey>> {
        let cert = self.0.current().map(|c| c.certified.clone());
        if cert.is_none() {
            tracing::warn!(identity = %self.0.identity(), "no certificate available for handshake");
        }
        cert
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The SPIFFE identity a verified peer presented: the same one, read the same way, that the
/// verifier checked ([`identity_in`]).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<Identity> {
    certs
        .and_then(|c| c.first())
        .and_then(|leaf| identity_in(leaf).ok())
}

#[cfg(test)]
mod tests;

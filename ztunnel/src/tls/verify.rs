//! Certificate verification by SPIFFE identity rather than host name.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore};
use rustls::{OtherError, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::extensions::GeneralName;

use crate::identity::Identity;

use super::TlsSetupError;

/// Why a verified chain was still refused. `Debug` prints the same sentence as `Display`,
/// because rustls shows this error through `Debug` in its own messages.
#[derive(thiserror::Error)]
pub enum IdentityMismatch {
    #[error("certificate is unparsable: {0}")]
    Unparsable(String),
    #[error("certificate carries no SPIFFE identity")]
    NoIdentity,
    #[error("certificate carries {0} URI SANs; exactly one SPIFFE identity is accepted")]
    SeveralIdentities(usize),
    #[error("certificate URI SAN {0:?} is not a SPIFFE identity")]
    NotSpiffe(String),
    #[error("peer is {got}, expected one of [{}]", expected.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", "))]
    Unexpected {
        got: String,
        expected: Vec<Identity>,
    },
    #[error("peer {got} is outside trust domain {want}")]
    TrustDomain { got: Identity, want: String },
}

impl fmt::Debug for IdentityMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn reject(e: IdentityMismatch) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The certificate's one SPIFFE identity. A certificate must carry exactly one URI SAN and it
/// must be a SPIFFE id: several identities would leave open which one was checked and which
/// one policy sees, so such a certificate is refused. DNS and IP SANs are ignored.
pub fn identity_in(cert: &CertificateDer<'_>) -> Result<Identity, IdentityMismatch> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| IdentityMismatch::Unparsable(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| IdentityMismatch::Unparsable(e.to_string()))?;
    let Some(san) = san else {
        return Err(IdentityMismatch::NoIdentity);
    };
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    match (uris.next(), uris.count()) {
        (None, _) => Err(IdentityMismatch::NoIdentity),
        (Some(uri), 0) => uri
            .parse()
            .map_err(|_| IdentityMismatch::NotSpiffe(uri.to_string())),
        (Some(_), more) => Err(IdentityMismatch::SeveralIdentities(more + 1)),
    }
}

/// Checks a certificate chain a CA returned for `want`: it must lead to `roots` and the leaf
/// must name exactly that identity. Returns why not.
pub fn verify_issued(
    chain: &[CertificateDer<'_>],
    roots: &RootCertStore,
    want: &Identity,
) -> Result<(), String> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err("the CA returned no certificate".into());
    };
    let parsed = ParsedCertificate::try_from(leaf).map_err(|e| e.to_string())?;
    let provider = super::provider();
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        intermediates,
        UnixTime::now(),
        provider.signature_verification_algorithms.all,
    )
    .map_err(|e| format!("the chain does not lead to our roots: {e}"))?;
    let got = identity_in(leaf).map_err(|e| e.to_string())?;
    if &got != want {
        return Err(format!("the certificate is for {got}, not {want}"));
    }
    Ok(())
}

/// Client side: the chain must lead to our roots and the leaf must name an expected identity.
pub(super) struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    expected: Vec<Identity>,
}

impl SpiffeServerVerifier {
    pub(super) fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
        expected: Vec<Identity>,
    ) -> Self {
        Self {
            roots,
            provider,
            expected,
        }
    }
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("expected", &self.expected)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let got = identity_in(end_entity).map_err(reject)?;
        if self.expected.contains(&got) {
            return Ok(ServerCertVerified::assertion());
        }
        Err(reject(IdentityMismatch::Unexpected {
            got: got.to_string(),
            expected: self.expected.clone(),
        }))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server side: webpki chain verification, then the SPIFFE identity must be in our trust
/// domain.
pub(super) struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl SpiffeClientVerifier {
    pub(super) fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
        trust_domain: String,
    ) -> Result<Self, TlsSetupError> {
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| TlsSetupError::Root(e.to_string()))?;
        Ok(Self {
            inner,
            trust_domain,
        })
    }
}

impl fmt::Debug for SpiffeClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeClientVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let got = identity_in(end_entity).map_err(reject)?;
        if got.trust_domain() == self.trust_domain {
            return Ok(ClientCertVerified::assertion());
        }
        Err(reject(IdentityMismatch::TrustDomain {
            got,
            want: self.trust_domain.clone(),
        }))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

//! Certificates no honest CA would issue, for tests of what ztunnel refuses: a leaf signed by
//! a given CA directory (the mesh's, or another one) with any URI SANs and any validity.

use std::path::Path;
use std::time::SystemTime;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use ztunnel::identity::ca::{CERT_FILE, KEY_FILE};

/// A client/server leaf with exactly these URI SANs, valid from `not_before` to `not_after`,
/// signed by the CA in `ca_dir` (as written by `ztunnel generate-ca`); with its key.
pub fn leaf(
    ca_dir: &Path,
    uris: &[&str],
    not_before: SystemTime,
    not_after: SystemTime,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join(KEY_FILE)).expect("CA key"))
            .expect("CA key PEM");
    let ca_cert = CertificateDer::from_pem_file(ca_dir.join(CERT_FILE)).expect("CA certificate");
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca_cert, ca_key).expect("issuer");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| rcgen::SanType::URI((*u).try_into().expect("URI SAN")))
        .collect();
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (cert.der().clone(), key)
}

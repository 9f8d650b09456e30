//! The local certificate authority: the embedded default source of workload certificates.
//!
//! A CA certificate and key on disk sign one leaf per workload identity: ECDSA P-256, the
//! SPIFFE id as the only URI SAN, EKU serverAuth + clientAuth, valid from a minute ago (clock
//! skew) to the requested lifetime, never past the CA's own expiry. [`generate`] writes a fresh
//! CA for a new machine. The same [`CertificateSource`] trait will front the Istio CA client.

use std::fmt;
use std::fs;
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::Identity;

/// Why a certificate could not be loaded or issued. Each variant says whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("{0} already exists; remove it or choose another directory")]
    Exists(PathBuf),
    #[error("issuing a certificate for {identity}: {why}")]
    Issue { identity: Identity, why: String },
}

/// A leaf certificate for one identity, with its key. `Debug` never prints the key.
pub struct WorkloadCert {
    pub identity: Identity,
    /// Leaf first, then any intermediates (not the root).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Hex serial number, for logs and the admin view.
    pub serial: String,
}

impl WorkloadCert {
    /// How long from `now` until renewal should start: half of the remaining validity, which
    /// right after issuance is half of the lifetime (`not_before` is backdated for clock skew,
    /// so it is not the issuance time).
    pub fn renew_in(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default() / 2
    }

    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity)
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Boxed future returned by [`CertificateSource::fetch`].
pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<WorkloadCert, CaError>> + Send + 'a>>;

/// Where workload certificates come from.
pub trait CertificateSource: Send + Sync + fmt::Debug + 'static {
    /// Issues a fresh certificate for `identity` valid for about `lifetime`.
    fn fetch<'a>(&'a self, identity: &'a Identity, lifetime: Duration) -> FetchFuture<'a>;
    /// The trust anchors peers' certificates must chain to.
    fn roots(&self) -> Vec<CertificateDer<'static>>;
}

/// The URI SAN that carries `identity` in a workload certificate (or a request for one).
pub fn spiffe_san(identity: &Identity) -> Result<SanType, rcgen::Error> {
    Ok(SanType::URI(identity.to_string().try_into()?))
}

/// File names inside a CA directory.
pub const CERT_FILE: &str = "ca-cert.pem";
pub const KEY_FILE: &str = "ca-key.pem";

/// A CA loaded from disk.
pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    not_after: SystemTime,
}

impl fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCa")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn invalid(path: &Path, why: impl fmt::Display) -> CaError {
    CaError::Invalid {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

impl LocalCa {
    /// Loads and checks a CA: the certificate must be a CA, unexpired, and match the key.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        if let Ok(meta) = fs::metadata(key_path)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(path = %key_path.display(), "CA key is readable by group or others");
        }
        let root = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| invalid(cert_path, format!("no PEM certificate: {e}")))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| invalid(key_path, format!("no usable PEM private key: {e}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&root)
            .map_err(|e| invalid(cert_path, format!("unparsable certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(invalid(
                cert_path,
                "certificate is not a CA (basicConstraints)",
            ));
        }
        let not_after = to_system_time(parsed.validity().not_after.timestamp());
        if not_after <= SystemTime::now() {
            return Err(invalid(cert_path, "CA certificate has expired"));
        }
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(invalid(
                key_path,
                "private key does not match the CA certificate",
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&root, key)
            .map_err(|e| invalid(cert_path, format!("cannot use as issuer: {e}")))?;
        Ok(Self {
            issuer,
            root,
            not_after,
        })
    }

    /// Loads `ca-cert.pem` and `ca-key.pem` from `dir`.
    pub fn load_dir(dir: &Path) -> Result<Self, CaError> {
        Self::load(&dir.join(CERT_FILE), &dir.join(KEY_FILE))
    }

    /// Issues a leaf for `identity`.
    pub fn mint(&self, identity: &Identity, lifetime: Duration) -> Result<WorkloadCert, CaError> {
        let fail = |why: String| CaError::Issue {
            identity: identity.clone(),
            why,
        };
        let now = SystemTime::now();
        let not_before = now - Duration::from_secs(60);
        let not_after = (now + lifetime).min(self.not_after);
        if not_after <= now {
            return Err(fail("the CA has expired".into()));
        }
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| fail(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![spiffe_san(identity).map_err(|e| fail(e.to_string()))?];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.not_before = to_offset(not_before);
        params.not_after = to_offset(not_after);
        let mut serial: [u8; 16] = rand::random();
        serial[0] &= 0x7f; // positive
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| fail(e.to_string()))?;
        Ok(WorkloadCert {
            identity: identity.clone(),
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            not_before: truncate_to_secs(not_before),
            not_after: truncate_to_secs(not_after),
            serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }
}

impl CertificateSource for LocalCa {
    fn fetch<'a>(&'a self, identity: &'a Identity, lifetime: Duration) -> FetchFuture<'a> {
        Box::pin(async move { self.mint(identity, lifetime) })
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        vec![self.root.clone()]
    }
}

/// Writes a new CA (`ca-cert.pem`, `ca-key.pem` with mode 0600) for `trust_domain` into `dir`,
/// refusing to overwrite an existing one.
pub fn generate(dir: &Path, trust_domain: &str, validity: Duration) -> Result<(), CaError> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(CaError::Exists(p.clone()));
        }
    }
    fs::create_dir_all(dir).map_err(|source| CaError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let fail = |why: String| invalid(&cert_path, why);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| fail(e.to_string()))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, "ztunnel local root CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = to_offset(now - Duration::from_secs(3600));
    params.not_after = to_offset(now + validity);
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let cert = params.self_signed(&key).map_err(|e| fail(e.to_string()))?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let werr = |source| CaError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(werr)?;
    f.write_all(data).map_err(werr)?;
    f.sync_all().map_err(werr)
}

fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

fn to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

// X.509 times have one-second resolution; keep ours comparable with what peers parse.
fn truncate_to_secs(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity::new("cluster.local", "default", "web").unwrap()
    }

    #[test]
    fn generated_ca_mints_spiffe_leaves() {
        let dir = tempfile::tempdir().unwrap();
        generate(
            dir.path(),
            "cluster.local",
            Duration::from_secs(86400 * 365),
        )
        .unwrap();
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let ca = LocalCa::load_dir(dir.path()).unwrap();
        let cert = ca.mint(&id(), Duration::from_secs(3600)).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&cert.chain[0]).unwrap();
        let sans = leaf.subject_alternative_name().unwrap().unwrap();
        let uris: Vec<String> = sans
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(
            uris,
            vec!["spiffe://cluster.local/ns/default/sa/web".to_string()]
        );
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!leaf.is_ca());
        let life = cert.not_after.duration_since(cert.not_before).unwrap();
        assert!(life >= Duration::from_secs(3600) && life <= Duration::from_secs(3661));
        let renew = cert.renew_in(SystemTime::now());
        assert!(renew > Duration::from_secs(1790) && renew <= Duration::from_secs(1800));
        // Debug output must not carry key material.
        let dbg = format!("{cert:?}");
        assert!(!dbg.contains("key"), "{dbg}");
    }

    #[test]
    fn refuses_to_overwrite_and_rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), "cluster.local", Duration::from_secs(86400)).unwrap();
        assert!(matches!(
            generate(dir.path(), "cluster.local", Duration::from_secs(86400)),
            Err(CaError::Exists(_))
        ));
        let other = tempfile::tempdir().unwrap();
        generate(other.path(), "cluster.local", Duration::from_secs(86400)).unwrap();
        let garbage = dir.path().join("garbage.pem");
        fs::write(&garbage, "not pem").unwrap();
        let cert = dir.path().join(CERT_FILE);
        let key = dir.path().join(KEY_FILE);
        let cases = [
            (garbage.clone(), key.clone(), "no PEM certificate"),
            (cert.clone(), garbage, "no usable PEM private key"),
            (cert, other.path().join(KEY_FILE), "does not match"),
            (dir.path().join("missing.pem"), key, "cannot read"),
        ];
        for (c, k, want) in cases {
            let err = LocalCa::load(&c, &k).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn leaf_lifetime_never_exceeds_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), "cluster.local", Duration::from_secs(7200)).unwrap();
        let ca = LocalCa::load_dir(dir.path()).unwrap();
        let cert = ca.mint(&id(), Duration::from_secs(86400 * 30)).unwrap();
        assert!(cert.not_after <= SystemTime::now() + Duration::from_secs(7201));
    }
}

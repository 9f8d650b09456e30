//! Keeps one current certificate per identity in use, renewing at half-life.
//!
//! [`CertManager::track`] returns a [`CertHandle`]; while any handle for an identity lives, a
//! renewal task on the control runtime keeps a valid certificate in it (fetch, sleep until
//! half-life, fetch again; on failure back off and keep serving the old certificate until it
//! expires). Dropping the last handle stops the task. TLS code reads the current certificate
//! without locks through [`CertEntry::current`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use super::Identity;
use super::ca::{CaError, CertificateSource, WorkloadCert};

/// A certificate and the rustls form of it.
#[derive(Debug)]
pub struct Issued {
    pub cert: WorkloadCert,
    pub certified: Arc<CertifiedKey>,
}

/// The live certificate slot for one identity. Held through [`CertHandle`].
#[derive(Debug)]
pub struct CertEntry {
    identity: Identity,
    current: ArcSwapOption<Issued>,
    /// Bumped on every successful fetch; lets callers wait for the first one.
    generation: watch::Sender<u64>,
    renewal: Mutex<Option<AbortHandle>>,
}

/// Keeps an identity's certificate fresh while held.
pub type CertHandle = Arc<CertEntry>;

impl CertEntry {
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The current certificate, if one has been issued and has not expired unreplaced.
    pub fn current(&self) -> Option<Arc<Issued>> {
        self.current.load_full()
    }

    /// Waits until a certificate is available, or `timeout` passes.
    pub async fn ready(&self, timeout: Duration) -> bool {
        let mut rx = self.generation.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|g| *g > 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl Drop for CertEntry {
    fn drop(&mut self) {
        if let Some(task) = self.renewal.lock().expect("not poisoned").take() {
            task.abort();
        }
    }
}

/// Issues and renews workload certificates from one [`CertificateSource`].
#[derive(Debug)]
pub struct CertManager {
    source: Arc<dyn CertificateSource>,
    lifetime: Duration,
    provider: Arc<CryptoProvider>,
    runtime: tokio::runtime::Handle,
    entries: Mutex<HashMap<Identity, Weak<CertEntry>>>,
}

const BACKOFF_START: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl CertManager {
    /// `runtime` runs the renewal tasks (the control runtime).
    pub fn new(
        source: Arc<dyn CertificateSource>,
        lifetime: Duration,
        provider: Arc<CryptoProvider>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            source,
            lifetime,
            provider,
            runtime,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The trust anchors of the certificate source.
    pub fn roots(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        self.source.roots()
    }

    /// Starts (or joins) keeping a certificate for `identity`.
    pub fn track(&self, identity: &Identity) -> CertHandle {
        let mut entries = self.entries.lock().expect("not poisoned");
        if let Some(entry) = entries.get(identity).and_then(Weak::upgrade) {
            return entry;
        }
        entries.retain(|_, e| e.strong_count() > 0);
        let entry = Arc::new(CertEntry {
            identity: identity.clone(),
            current: ArcSwapOption::empty(),
            generation: watch::Sender::new(0),
            renewal: Mutex::new(None),
        });
        let task = self.runtime.spawn(renew(
            Arc::downgrade(&entry),
            self.source.clone(),
            self.lifetime,
            self.provider.clone(),
        ));
        *entry.renewal.lock().expect("not poisoned") = Some(task.abort_handle());
        entries.insert(identity.clone(), Arc::downgrade(&entry));
        entry
    }

    /// Every certificate currently held, for the admin view.
    pub fn snapshot(&self) -> Vec<(Identity, Option<Arc<Issued>>)> {
        let entries = self.entries.lock().expect("not poisoned");
        let mut out: Vec<_> = entries
            .values()
            .filter_map(Weak::upgrade)
            .map(|e| (e.identity.clone(), e.current()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

fn certify(provider: &CryptoProvider, cert: &WorkloadCert) -> Result<Arc<CertifiedKey>, CaError> {
    let key = provider
        .key_provider
        .load_private_key(cert.key.clone_key())
        .map_err(|e| CaError::Issue {
            identity: cert.identity.clone(),
            why: format!("unusable key: {e}"),
        })?;
    Ok(Arc::new(CertifiedKey::new(cert.chain.clone(), key)))
}

async fn renew(
    entry: Weak<CertEntry>,
    source: Arc<dyn CertificateSource>,
    lifetime: Duration,
    provider: Arc<CryptoProvider>,
) {
    let mut backoff = BACKOFF_START;
    loop {
        let Some(identity) = entry.upgrade().map(|e| e.identity.clone()) else {
            return;
        };
        let result = source
            .fetch(&identity, lifetime)
            .await
            .and_then(|cert| certify(&provider, &cert).map(|certified| Issued { cert, certified }));
        let Some(e) = entry.upgrade() else { return };
        let wait = match result {
            Ok(issued) => {
                backoff = BACKOFF_START;
                let wait = issued
                    .cert
                    .renew_in(SystemTime::now())
                    .max(Duration::from_millis(500));
                tracing::info!(
                    identity = %identity,
                    serial = %issued.cert.serial,
                    renew_in = ?wait,
                    "workload certificate issued"
                );
                e.current.store(Some(Arc::new(issued)));
                e.generation.send_modify(|g| *g += 1);
                wait
            }
            Err(err) => {
                let still_valid = e
                    .current()
                    .is_some_and(|c| !c.cert.expired(SystemTime::now()));
                if !still_valid {
                    e.current.store(None);
                }
                tracing::warn!(
                    identity = %identity,
                    error = %mesh_contract::Chain(&err),
                    retry_in = ?backoff,
                    keeping_old = still_valid,
                    "certificate fetch failed"
                );
                let wait = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                wait
            }
        };
        drop(e);
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::{FetchFuture, LocalCa, generate};
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug)]
    struct Counting {
        ca: LocalCa,
        calls: AtomicUsize,
        fail: bool,
    }

    impl CertificateSource for Counting {
        fn fetch<'a>(&'a self, identity: &'a Identity, lifetime: Duration) -> FetchFuture<'a> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if self.fail {
                    return Err(CaError::Issue {
                        identity: identity.clone(),
                        why: "down".into(),
                    });
                }
                self.ca.mint(identity, lifetime)
            })
        }
        fn roots(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
            self.ca.roots()
        }
    }

    fn manager(fail: bool, lifetime: Duration) -> (CertManager, Arc<Counting>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), "cluster.local", Duration::from_secs(86400)).unwrap();
        let src = Arc::new(Counting {
            ca: LocalCa::load_dir(dir.path()).unwrap(),
            calls: AtomicUsize::new(0),
            fail,
        });
        let m = CertManager::new(
            src.clone(),
            lifetime,
            Arc::new(rustls::crypto::ring::default_provider()),
            tokio::runtime::Handle::current(),
        );
        (m, src, dir)
    }

    #[tokio::test]
    async fn one_entry_per_identity_while_tracked() {
        let (m, src, _dir) = manager(false, Duration::from_secs(3600));
        let id = Identity::new("cluster.local", "ns", "sa").unwrap();
        let a = m.track(&id);
        let b = m.track(&id);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(a.ready(Duration::from_secs(5)).await);
        assert_eq!(src.calls.load(Ordering::SeqCst), 1);
        assert_eq!(a.current().unwrap().cert.identity, id);
        assert_eq!(m.snapshot().len(), 1);
        drop((a, b));
        assert!(m.snapshot().is_empty());
    }

    #[tokio::test]
    async fn failing_source_retries_and_reports_not_ready() {
        let (m, src, _dir) = manager(true, Duration::from_secs(3600));
        let id = Identity::new("cluster.local", "ns", "sa").unwrap();
        let h = m.track(&id);
        assert!(!h.ready(Duration::from_millis(700)).await);
        assert!(h.current().is_none());
        assert!(
            src.calls.load(Ordering::SeqCst) >= 2,
            "retried with backoff"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_starts_at_half_life() {
        let day = Duration::from_secs(24 * 3600);
        let (m, src, _dir) = manager(false, day);
        let id = Identity::new("cluster.local", "ns", "sa").unwrap();
        let h = m.track(&id);
        assert!(h.ready(Duration::from_secs(5)).await);
        let calls = || src.calls.load(Ordering::SeqCst);
        assert_eq!(calls(), 1);
        tokio::time::advance(day / 2 - Duration::from_secs(600)).await;
        tokio::task::yield_now().await;
        assert_eq!(calls(), 1, "renewed before half-life");
        tokio::time::advance(Duration::from_secs(1200)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(calls(), 2, "not renewed at half-life");
    }

    #[tokio::test]
    async fn short_lived_certificates_are_renewed() {
        // Two-second certificates are renewed after about one second.
        let (m, src, _dir) = manager(false, Duration::from_secs(2));
        let id = Identity::new("cluster.local", "ns", "sa").unwrap();
        let h = m.track(&id);
        assert!(h.ready(Duration::from_secs(5)).await);
        let first = h.current().unwrap().cert.serial.clone();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(src.calls.load(Ordering::SeqCst) >= 2);
        assert_ne!(h.current().unwrap().cert.serial, first);
    }
}

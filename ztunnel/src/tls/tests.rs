use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::identity::ca::{CertificateSource, LocalCa, generate};
use crate::identity::manager::CertManager;

struct Ca {
    manager: CertManager,
    _dir: tempfile::TempDir,
}

fn ca(trust_domain: &str) -> Ca {
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path(), trust_domain, Duration::from_secs(86400)).unwrap();
    let ca = Arc::new(LocalCa::load_dir(dir.path()).unwrap());
    Ca {
        manager: CertManager::new(
            ca,
            Duration::from_secs(3600),
            provider(),
            tokio::runtime::Handle::current(),
        ),
        _dir: dir,
    }
}

fn id(td: &str, ns: &str, sa: &str) -> Identity {
    Identity::new(td, ns, sa).unwrap()
}

async fn cert(ca: &Ca, identity: &Identity) -> CertHandle {
    let h = ca.manager.track(identity);
    assert!(h.ready(Duration::from_secs(5)).await);
    h
}

/// Runs one handshake over an in-memory pipe; returns the identity each side saw.
async fn handshake(
    server_ctx: &TlsContext,
    server_cert: CertHandle,
    client_ctx: &TlsContext,
    client_cert: CertHandle,
    expected: Vec<Identity>,
) -> (
    Result<Option<Identity>, String>,
    Result<Option<Identity>, String>,
) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(server_ctx.server_config(server_cert).unwrap());
    let connector =
        tokio_rustls::TlsConnector::from(client_ctx.client_config(client_cert, expected).unwrap());
    let server = async move {
        let mut s = acceptor.accept(b).await.map_err(|e| e.to_string())?;
        let peer = peer_identity(s.get_ref().1.peer_certificates());
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        s.write_all(&buf).await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        Ok(peer)
    };
    let client = async move {
        let name = ServerName::IpAddress(std::net::Ipv4Addr::new(198, 18, 0, 1).into());
        let mut c = connector
            .connect(name, a)
            .await
            .map_err(|e| e.to_string())?;
        let peer = peer_identity(c.get_ref().1.peer_certificates());
        c.write_all(b"ping").await.map_err(|e| e.to_string())?;
        c.flush().await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        Ok(peer)
    };
    tokio::join!(server, client)
}

#[tokio::test]
async fn mutual_tls_checks_spiffe_identities_both_ways() {
    let td = "cluster.local";
    let main = ca(td);
    let ctx = TlsContext::new(main.manager.roots(), td).unwrap();
    let server_id = id(td, "b", "server");
    let client_id = id(td, "a", "client");
    let server_cert = cert(&main, &server_id).await;
    let client_cert = cert(&main, &client_id).await;

    // The right identity: both sides learn who the other is.
    let (s, c) = handshake(
        &ctx,
        server_cert.clone(),
        &ctx,
        client_cert.clone(),
        vec![id(td, "x", "other"), server_id.clone()],
    )
    .await;
    assert_eq!(s.unwrap(), Some(client_id.clone()));
    assert_eq!(c.unwrap(), Some(server_id.clone()));

    // A server with the wrong identity is refused by the client.
    let (_, c) = handshake(
        &ctx,
        server_cert.clone(),
        &ctx,
        client_cert.clone(),
        vec![id(td, "b", "someone-else")],
    )
    .await;
    let err = c.unwrap_err();
    assert!(err.contains("expected one of"), "{err}");
}

#[tokio::test]
async fn foreign_roots_and_trust_domains_are_refused() {
    let td = "cluster.local";
    let main = ca(td);
    let rogue = ca(td);
    let other_td = ca("other.domain");
    let ctx = TlsContext::new(main.manager.roots(), td).unwrap();
    let server_id = id(td, "b", "server");
    let server_cert = cert(&main, &server_id).await;

    // A client whose certificate comes from another CA.
    let rogue_ctx = TlsContext::new(main.manager.roots(), td).unwrap();
    let rogue_cert = cert(&rogue, &id(td, "a", "client")).await;
    let (s, _) = handshake(
        &ctx,
        server_cert.clone(),
        &rogue_ctx,
        rogue_cert,
        vec![server_id.clone()],
    )
    .await;
    assert!(s.is_err(), "server accepted a client from a foreign CA");

    // A client from our roots but another trust domain: build a context that trusts both
    // roots so only the trust-domain check can refuse it.
    let mut roots = main.manager.roots();
    roots.extend(other_td.manager.roots());
    let server_ctx = TlsContext::new(roots.clone(), td).unwrap();
    let other_client = cert(&other_td, &id("other.domain", "a", "client")).await;
    let client_ctx = TlsContext::new(roots, "other.domain").unwrap();
    let (s, _) = handshake(
        &server_ctx,
        server_cert.clone(),
        &client_ctx,
        other_client,
        vec![server_id],
    )
    .await;
    let err = s.unwrap_err();
    assert!(err.contains("outside trust domain"), "{err}");
}

/// A leaf signed by the CA in `dir` with exactly these URI SANs and this validity.
fn crafted_leaf(
    dir: &std::path::Path,
    uris: &[&str],
    not_before: (i32, u8, u8),
    not_after: (i32, u8, u8),
) -> CertificateDer<'static> {
    use crate::identity::ca::{CERT_FILE, KEY_FILE};
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(dir.join(KEY_FILE)).unwrap()).unwrap();
    let ca_cert = CertificateDer::from_pem_slice(
        std::fs::read_to_string(dir.join(CERT_FILE))
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca_cert, ca_key).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| rcgen::SanType::URI((*u).try_into().unwrap()))
        .collect();
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
    params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
    let key = rcgen::KeyPair::generate().unwrap();
    params.signed_by(&key, &issuer).unwrap().der().clone()
}

#[test]
fn exactly_one_spiffe_identity_is_read_from_uri_sans() {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = |uris: &[&str]| {
        let mut params = rcgen::CertificateParams::new(vec!["example.com".to_string()]).unwrap();
        for u in uris {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI((*u).try_into().unwrap()));
        }
        params.self_signed(&key).unwrap().der().clone()
    };
    let spiffe = "spiffe://cluster.local/ns/a/sa/b";
    let cases: [(&str, &[&str], Result<Identity, &str>); 5] = [
        (
            "one SPIFFE id",
            &[spiffe],
            Ok(id("cluster.local", "a", "b")),
        ),
        ("DNS SAN only", &[], Err("no SPIFFE identity")),
        (
            "a URI that is not SPIFFE",
            &["https://not-spiffe.example"],
            Err("is not a SPIFFE identity"),
        ),
        (
            "SPIFFE id beside another URI",
            &["https://not-spiffe.example", spiffe],
            Err("2 URI SANs"),
        ),
        (
            "two SPIFFE ids",
            &[spiffe, "spiffe://cluster.local/ns/kube-system/sa/admin"],
            Err("2 URI SANs"),
        ),
    ];
    for (name, uris, want) in cases {
        let got = identity_in(&cert(uris)).map_err(|e| e.to_string());
        match want {
            Ok(id) => assert_eq!(got.as_ref(), Ok(&id), "{name}"),
            Err(why) => assert!(
                got.as_ref().is_err_and(|e| e.contains(why)),
                "{name}: {got:?}"
            ),
        }
    }
    assert!(identity_in(&CertificateDer::from(vec![0x30, 0x03, 0x01])).is_err());
}

/// The server's client-certificate check, case by case, with the reason it gives.
#[test]
fn client_certificates_are_refused_with_the_reason() {
    let td = "cluster.local";
    let main = tempfile::tempdir().unwrap();
    let foreign = tempfile::tempdir().unwrap();
    generate(main.path(), td, Duration::from_secs(86400)).unwrap();
    generate(foreign.path(), td, Duration::from_secs(86400)).unwrap();
    let roots = Arc::new(
        LocalCa::load_dir(main.path())
            .unwrap()
            .roots()
            .into_iter()
            .fold(RootCertStore::empty(), |mut store, c| {
                store.add(c).unwrap();
                store
            }),
    );
    let verifier = verify::SpiffeClientVerifier::new(roots, provider(), td.to_string()).unwrap();
    let me = "spiffe://cluster.local/ns/a/sa/client";
    let now = (2020, 1, 1);
    let later = (2090, 1, 1);
    type Ymd = (i32, u8, u8);
    type Case<'a> = (
        &'a str,
        &'a std::path::Path,
        &'a [&'a str],
        Ymd,
        Ymd,
        Option<&'a str>,
    );
    let cases: [Case<'_>; 7] = [
        ("valid", main.path(), &[me], now, later, None),
        (
            "expired",
            main.path(),
            &[me],
            (2019, 1, 1),
            now,
            Some("expired"),
        ),
        (
            "not yet valid",
            main.path(),
            &[me],
            (2089, 1, 1),
            later,
            Some("not valid yet"),
        ),
        // Both CAs carry the same subject name, so the chain is tried against our root and
        // its signature fails.
        (
            "foreign CA",
            foreign.path(),
            &[me],
            now,
            later,
            Some("BadSignature"),
        ),
        (
            "wrong trust domain",
            main.path(),
            &["spiffe://other.domain/ns/a/sa/client"],
            now,
            later,
            Some("outside trust domain"),
        ),
        (
            "several SANs",
            main.path(),
            &[me, "spiffe://cluster.local/ns/kube-system/sa/admin"],
            now,
            later,
            Some("exactly one SPIFFE identity"),
        ),
        (
            "no URI SAN",
            main.path(),
            &[],
            now,
            later,
            Some("no SPIFFE identity"),
        ),
    ];
    let at = UnixTime::since_unix_epoch(Duration::from_secs(1_800_000_000)); // 2027
    for (name, ca_dir, uris, from, to, want) in cases {
        let leaf = crafted_leaf(ca_dir, uris, from, to);
        let got = rustls::server::danger::ClientCertVerifier::verify_client_cert(
            &verifier,
            &leaf,
            &[],
            at,
        )
        .map(|_| ())
        .map_err(|e| e.to_string());
        match want {
            None => assert!(got.is_ok(), "{name}: {got:?}"),
            Some(why) => assert!(
                got.as_ref().is_err_and(|e| e.contains(why)),
                "{name}: {got:?}"
            ),
        }
    }
}

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::identity::ca::{LocalCa, generate};
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

#[test]
fn identities_are_read_from_uri_sans_only() {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["example.com".to_string()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        "https://not-spiffe.example".try_into().unwrap(),
    ));
    let no_spiffe = params.self_signed(&key).unwrap();
    assert!(identities_in(no_spiffe.der()).is_err());
    params.subject_alt_names.push(rcgen::SanType::URI(
        "spiffe://cluster.local/ns/a/sa/b".try_into().unwrap(),
    ));
    let with = params.self_signed(&key).unwrap();
    assert_eq!(
        identities_in(with.der()).unwrap(),
        vec![id("cluster.local", "a", "b")]
    );
    assert!(identities_in(&CertificateDer::from(vec![0x30, 0x03, 0x01])).is_err());
}

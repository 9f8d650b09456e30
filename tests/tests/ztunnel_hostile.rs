//! ztunnel against hostile or broken inputs: ZDS datagrams, HBONE requests, TLS peers,
//! config files. Each must get a clear error while ztunnel keeps serving everyone else.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use mesh_testbed::apps::{EchoServer, connect, echo_roundtrip};
use mesh_testbed::lab::Pod;
use mesh_testbed::mesh::{Mesh, Workload, eventually};
use mesh_zds::proto::{self, workload_request::Payload};
use prost::Message;
use rustls_pki_types::ServerName;
use ztunnel::identity::Identity;
use ztunnel::identity::ca::LocalCa;
use ztunnel::identity::manager::CertManager;
use ztunnel::tls::TlsContext;

const T: Duration = Duration::from_secs(5);

fn add_request(uid: &str) -> Vec<u8> {
    proto::WorkloadRequest {
        payload: Some(Payload::Add(proto::AddWorkload {
            uid: uid.into(),
            workload_info: Some(proto::WorkloadInfo {
                name: "p".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
                dns_nameservers: Vec::new(),
            }),
        })),
    }
    .encode_to_vec()
}

#[test]
fn malformed_zds_requests_are_nacked_and_the_session_survives() {
    let mut m = Mesh::new(&["a"]);
    let a1 = m.lab.add_pod("a", "a1");
    let wa = Workload::mesh(&a1, "ns-a", "client");
    m.write_config(&[&wa], &[]);
    m.start_ztunnel("a", &[]);
    let null = std::fs::File::open("/dev/null").unwrap();
    let netns = a1.ns.open();
    let keep_late = proto::WorkloadRequest {
        payload: Some(Payload::Keep(proto::KeepWorkload { uid: "x".into() })),
    }
    .encode_to_vec();
    let snapshot = proto::WorkloadRequest {
        payload: Some(Payload::SnapshotSent(proto::SnapshotSent {})),
    }
    .encode_to_vec();
    let cases: Vec<(&str, Vec<u8>, Vec<std::os::fd::BorrowedFd<'_>>, &str)> = vec![
        ("garbage", vec![0xff; 16], vec![], "malformed"),
        ("oversized", vec![0x0a; 4000], vec![], "larger than 1024"),
        ("empty", vec![], vec![], "no payload"),
        (
            "add without fd",
            add_request("u1"),
            vec![],
            "exactly one file descriptor",
        ),
        (
            "add with two fds",
            add_request("u1"),
            vec![netns.as_fd(), netns.as_fd()],
            "exactly one file descriptor",
        ),
        (
            "add with a non-netns fd",
            add_request("u1"),
            vec![null.as_fd()],
            "not a network namespace",
        ),
        (
            "snapshot with an fd",
            snapshot.clone(),
            vec![null.as_fd()],
            "exactly one file descriptor",
        ),
    ];
    let agent = m.agent("a");
    for (name, data, fds, want) in &cases {
        match agent.send_raw(data, fds) {
            Ok(Err(reason)) => assert!(
                reason.contains(want),
                "{name}: NACK {reason:?} lacks {want:?}"
            ),
            other => panic!("{name}: expected a NACK, got {other:?}"),
        }
    }
    assert_eq!(agent.send_raw(&snapshot, &[]).unwrap(), Ok(()));
    let reason = agent.send_raw(&keep_late, &[]).unwrap().unwrap_err();
    assert!(reason.contains("after the snapshot"), "{reason}");
    assert!(agent.connection_alive(), "ztunnel dropped the session");

    // Still serving: a real enrollment works and carries traffic.
    m.enroll(&wa);
    let _server = EchoServer::start(&a1, 8080);
    let x = m.lab.add_pod("a", "x1");
    let got = echo_roundtrip(connect(&x, a1.addr(8080), T).unwrap(), b"still alive").unwrap();
    assert_eq!(got, b"still alive");
}

/// Node b runs ztunnel (with `flags`) serving pod b1 (`ns-b/server`); pod x1 on node a is
/// outside the mesh, where the test's own clients run.
fn prober_and_server(flags: &[&str]) -> (Mesh, Pod, Pod) {
    let mut m = Mesh::new(&["a", "b"]);
    let x1 = m.lab.add_pod("a", "x1");
    let b1 = m.lab.add_pod("b", "b1");
    let wb = Workload::mesh(&b1, "ns-b", "server");
    m.write_config(&[&wb], &[]);
    m.start_ztunnel("b", flags);
    m.enroll(&wb);
    (m, x1, b1)
}

/// An HBONE client in the test process, presenting `identity` from the mesh's CA.
struct Client {
    rt: tokio::runtime::Runtime,
    tls: TlsContext,
    certs: CertManager,
}

impl Client {
    fn new(m: &Mesh) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ca = LocalCa::load_dir(&m.ca_dir).unwrap();
        let certs = rt.block_on(async {
            CertManager::new(
                Arc::new(ca),
                Duration::from_secs(3600),
                ztunnel::tls::provider(),
                tokio::runtime::Handle::current(),
            )
        });
        let tls = TlsContext::new(certs.roots(), "cluster.local").unwrap();
        Self { rt, tls, certs }
    }

    /// Opens a verified HBONE connection from `from`'s netns to `to`:15008, as `ns-x/prober`.
    async fn hbone(
        &self,
        from: &Pod,
        to: &Pod,
    ) -> Result<
        (
            h2::client::SendRequest<bytes::Bytes>,
            h2::client::Connection<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
        ),
        String,
    > {
        let me = Identity::new("cluster.local", "ns-x", "prober").unwrap();
        let server = Identity::new("cluster.local", "ns-b", "server").unwrap();
        let cert = self.certs.track(&me);
        assert!(cert.ready(T).await);
        let config = self
            .tls
            .client_config(cert, vec![server])
            .map_err(|e| e.to_string())?;
        let tcp = tcp_from(from, to.addr(15008)).await?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::IpAddress(to.ip.into()), tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        h2::client::handshake(tls).await.map_err(|e| e.to_string())
    }

    /// Sends a CONNECT for `authority` with `headers` and returns the answer's status.
    async fn status(
        sender: &h2::client::SendRequest<bytes::Bytes>,
        authority: &str,
        headers: &[(&str, String)],
    ) -> Result<u16, String> {
        let mut req = http::Request::builder().method("CONNECT").uri(authority);
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        let req = req.body(()).unwrap();
        let mut s = sender.clone().ready().await.map_err(|e| e.to_string())?;
        let (resp, _send) = s.send_request(req, false).map_err(|e| e.to_string())?;
        let resp = resp.await.map_err(|e| e.to_string())?;
        Ok(resp.status().as_u16())
    }

    /// Opens an HBONE connection from `from`'s netns to `to`:15008 and sends a CONNECT for
    /// each authority; returns each answer's status (or the error).
    fn connect_statuses(
        &self,
        from: &Pod,
        to: &Pod,
        authorities: &[&str],
    ) -> Result<Vec<u16>, String> {
        self.rt.block_on(async {
            let (sender, conn) = self.hbone(from, to).await?;
            tokio::spawn(conn);
            let mut out = Vec::new();
            for authority in authorities {
                out.push(Self::status(&sender, authority, &[]).await?);
            }
            Ok(out)
        })
    }
}

async fn tcp_from(pod: &Pod, dst: std::net::SocketAddr) -> Result<tokio::net::TcpStream, String> {
    let sock = pod
        .ns
        .open()
        .run(|| {
            socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::STREAM.nonblocking(),
                None,
            )
        })
        .unwrap()
        .map_err(|e| e.to_string())?;
    tokio::net::TcpSocket::from_std_stream(sock.into())
        .connect(dst)
        .await
        .map_err(|e| format!("tcp: {e}"))
}

#[test]
fn hostile_connect_requests_get_the_right_status() {
    let (mut m, x1, b1) = prober_and_server(&[]);
    let server = EchoServer::start(&b1, 8080);
    let client = Client::new(&m);
    let ok = format!("{}:8080", b1.ip);
    let wrong_ip = "198.18.2.99:8080".to_string();
    let loop_port = format!("{}:15008", b1.ip);
    let port_zero = format!("{}:0", b1.ip);
    let closed_port = format!("{}:8081", b1.ip);
    let statuses = client
        .connect_statuses(
            &x1,
            &b1,
            &[
                "example.com:80",
                &wrong_ip,
                &loop_port,
                &port_zero,
                &closed_port,
                &ok,
            ],
        )
        .unwrap();
    assert_eq!(statuses, vec![400, 400, 400, 400, 503, 200]);
    assert!(eventually(T, || server.peers().len() == 1));
    assert!(eventually(T, || m
        .ztunnel_log("b")
        .contains("does not match this pod's address")));
}

/// One source may hold only `--max-connections-per-source` connections to the pod listeners;
/// past it new ones are reset (counted and logged) while other sources are still served, and
/// a closed one frees its place.
#[test]
fn connections_over_the_per_source_cap_are_reset_and_others_still_served() {
    let mut m = Mesh::new(&["a", "b"]);
    let x1 = m.lab.add_pod("a", "x1"); // outside the mesh: arrives on b1's 15006
    let x2 = m.lab.add_pod("a", "x2");
    let b1 = m.lab.add_pod("b", "b1");
    let wb = Workload::mesh(&b1, "ns-b", "server");
    m.write_config(&[&wb], &[]);
    m.start_ztunnel("b", &["--max-connections-per-source", "3"]);
    m.enroll(&wb);
    let _server = EchoServer::start(&b1, 8080);
    let roundtrip = |s: &mut std::net::TcpStream| {
        use std::io::{Read, Write};
        s.set_read_timeout(Some(T))?;
        s.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).map(|()| buf)
    };
    let mut held: Vec<_> = (0..3)
        .map(|_| connect(&x1, b1.addr(8080), T).unwrap())
        .collect();
    for s in &mut held {
        assert_eq!(&roundtrip(s).unwrap(), b"ping");
    }
    // The reset may come before connect() returns (it reports it) or after (the read does).
    let over = connect(&x1, b1.addr(8080), T).and_then(|mut s| roundtrip(&mut s));
    assert!(over.is_err(), "a fourth connection from x1 was served");
    let other = connect(&x2, b1.addr(8080), T).and_then(|s| echo_roundtrip(s, b"x2"));
    assert_eq!(other.unwrap(), b"x2", "another source must still be served");
    assert!(eventually(T, || m
        .ztunnel_log("b")
        .contains("connection refused: over the connection limit")));
    let metrics = m
        .lab
        .node("b")
        .ns
        .http_get("127.0.0.1:15020".parse().unwrap(), "/metrics")
        .unwrap()
        .1;
    assert!(
        metrics.contains("reason=\"connection_limit\""),
        "no connection_limit failure counted"
    );
    drop(held.pop());
    assert!(eventually(T, || connect(&x1, b1.addr(8080), T)
        .and_then(|s| echo_roundtrip(s, b"again"))
        .is_ok()));
}

/// The small HTTP servers (here readiness, 15021) cut a client that does not finish its
/// request head, and a flood of such clients delays a real probe by at most that timeout
/// instead of holding it (or the process's descriptors) forever.
#[test]
fn idle_and_slow_clients_of_the_http_servers_are_cut() {
    use std::io::{Read, Write};
    let mut m = Mesh::new(&["a"]);
    let a1 = m.lab.add_pod("a", "a1");
    let wa = Workload::mesh(&a1, "ns-a", "client");
    m.write_config(&[&wa], &[]);
    m.start_ztunnel("a", &[]);
    m.enroll(&wa);
    let node = m.lab.node("a").ns.clone();
    let ready: std::net::SocketAddr = "127.0.0.1:15021".parse().unwrap();
    let started = std::time::Instant::now();
    let mut idle: Vec<_> = (0..100)
        .map(|_| {
            let mut s = node.connect(ready, T).unwrap();
            s.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s
        })
        .collect();
    assert!(
        // Any answer will do (the stand-in agent sent no snapshot, so it is a 503).
        eventually(Duration::from_secs(15), || node
            .http_get(ready, "/healthz/ready")
            .is_ok()),
        "the probe was not answered while idle clients held the server"
    );
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut rest = Vec::new();
        // Cut: an EOF, or hyper's 408 then EOF, or a reset; not a read that times out.
        match s.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) => assert_ne!(
                e.kind(),
                std::io::ErrorKind::WouldBlock,
                "an idle client was never cut"
            ),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[derive(Debug)]
struct AcceptAnything;

impl rustls::client::danger::ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        ztunnel::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Clients whose certificate must not pass: each is refused at the handshake, reaches no app,
/// and leaves an inbound access-log event with the reason.
#[test]
fn tls_clients_without_one_valid_identity_are_refused_with_the_reason() {
    use std::time::SystemTime;
    let (mut m, x1, b1) = prober_and_server(&[]);
    let server = EchoServer::start(&b1, 8080);
    let foreign = m.lab.dir().join("foreign-ca");
    ztunnel::identity::ca::generate(&foreign, "cluster.local", Duration::from_secs(86400)).unwrap();
    let me = "spiffe://cluster.local/ns/ns-x/sa/prober";
    let hour = Duration::from_secs(3600);
    let now = SystemTime::now();
    let (past, future) = (now - 24 * hour, now + 24 * hour);
    let ca = m.ca_dir.clone();
    // (case, the certificate presented: signing CA, URI SANs, validity; the reason logged)
    type Leaf<'a> = Option<(&'a std::path::Path, Vec<&'a str>, SystemTime, SystemTime)>;
    let cases: Vec<(&str, Leaf<'_>, &str)> = vec![
        ("no certificate", None, "peersentnocertificates"),
        (
            "expired",
            Some((&ca, vec![me], past, now - hour)),
            "expired",
        ),
        (
            "not yet valid",
            Some((&ca, vec![me], now + hour, future)),
            "notvalidyet",
        ),
        // Same subject name as the mesh's CA: the signature check against our root fails.
        (
            "foreign CA",
            Some((&foreign, vec![me], past, future)),
            "badsignature",
        ),
        (
            "wrong trust domain",
            Some((
                &ca,
                vec!["spiffe://other.domain/ns/ns-x/sa/prober"],
                past,
                future,
            )),
            "outsidetrustdomain",
        ),
        (
            "several identities",
            Some((
                &ca,
                vec![me, "spiffe://cluster.local/ns/kube-system/sa/admin"],
                past,
                future,
            )),
            "exactlyonespiffeidentity",
        ),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (name, cert, reason) in cases {
        let builder = rustls::ClientConfig::builder_with_provider(ztunnel::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnything));
        let mut config = match cert {
            None => builder.with_no_client_auth(),
            Some((dir, uris, from, to)) => {
                let (cert, key) = mesh_testbed::certs::leaf(dir, &uris, from, to);
                builder.with_client_auth_cert(vec![cert], key).unwrap()
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let result: Result<u16, String> = rt.block_on(async {
            let tcp = tcp_from(&x1, b1.addr(15008)).await?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::IpAddress(b1.ip.into()), tcp)
                .await
                .map_err(|e| format!("tls: {e}"))?;
            // TLS 1.3 clients finish before the server judges their certificate; the refusal
            // arrives as an alert on the first read.
            let (sender, conn) = h2::client::handshake(tls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let req = http::Request::builder()
                .method("CONNECT")
                .uri(format!("{}:8080", b1.ip))
                .body(())
                .unwrap();
            let mut s = sender.ready().await.map_err(|e| e.to_string())?;
            let (resp, _send) = s.send_request(req, false).map_err(|e| e.to_string())?;
            let resp = resp.await.map_err(|e| e.to_string())?;
            Ok(resp.status().as_u16())
        });
        assert!(result.is_err(), "{name}: the client got {result:?}");
        assert!(server.peers().is_empty(), "{name}: reached the app");
        let logged = eventually(T, || {
            m.ztunnel_log("b").lines().any(|l| {
                let flat = l.to_lowercase().replace(' ', "");
                l.contains("direction=inbound ") && flat.contains(reason)
            })
        });
        assert!(
            logged,
            "{name}: no access-log event naming {reason:?}:\n{}",
            m.ztunnel_log("b")
        );
    }
}

#[test]
fn bad_startup_inputs_fail_with_a_clear_message() {
    let mut m = Mesh::new(&["a"]);
    let ns = m.lab.node("a").ns.clone();
    let bin = mesh_testbed::binary("ztunnel");
    let bad_config = m.lab.dir().join("bad.yaml");
    std::fs::write(
        &bad_config,
        "workloads:\n- name: w\n  namespace: ns\n  workloadIps: []\n  colour: blue\n",
    )
    .unwrap();
    let sock = m.zds_socket("a").to_string_lossy().into_owned();
    let ca = m.ca_dir.to_string_lossy().into_owned();
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "unknown config field",
            vec![
                "--local-config".into(),
                bad_config.to_string_lossy().into(),
                "--ca-dir".into(),
                ca.clone(),
            ],
            "workloads[0].colour",
        ),
        (
            "missing CA",
            vec!["--ca-dir".into(), "/nonexistent/ca".into()],
            "ztunnel generate-ca",
        ),
        (
            "xDS without its roots",
            vec![
                "--ca-dir".into(),
                ca.clone(),
                "--xds-address".into(),
                "https://istiod:15012".into(),
            ],
            "--xds-root-cert",
        ),
        (
            "Istio CA without its roots",
            vec!["--ca-address".into(), "https://istiod:15012".into()],
            "--ca-root-cert",
        ),
        ("no CA in standalone mode", vec![], "--ca-dir"),
        (
            "bad trust domain",
            vec![
                "--ca-dir".into(),
                ca.clone(),
                "--trust-domain".into(),
                "Not Valid".into(),
            ],
            "invalid --trust-domain",
        ),
        (
            "socket dir missing",
            vec![
                "--ca-dir".into(),
                ca,
                "--zds-socket".into(),
                "/nonexistent/dir/z.sock".into(),
            ],
            "does not exist",
        ),
    ];
    for (i, (name, extra, want)) in cases.into_iter().enumerate() {
        let mut args = vec!["run".to_string()];
        if !extra.iter().any(|a| a == "--zds-socket") {
            args.extend(["--zds-socket".to_string(), sock.clone()]);
        }
        args.extend(extra);
        let p = m.lab.spawn(&format!("bad-{i}"), &ns, &bin, &args, &[]);
        let status = p
            .wait_timeout(T)
            .unwrap_or_else(|| panic!("{name}: ztunnel did not exit"));
        assert!(!status.success(), "{name}: exited successfully");
        let log = p.log_text();
        assert!(log.contains(want), "{name}: message lacks {want:?}: {log}");
    }
}

/// The HBONE server's HTTP/2 limits hold against a verified peer: it advertises at most
/// 1000 concurrent streams, a CONNECT whose header list is over 16 KiB is answered 431
/// without touching the upstream, and the connection goes on serving.
#[test]
fn hbone_header_list_and_stream_limits_hold() {
    let (m, x1, b1) = prober_and_server(&[]);
    let server = EchoServer::start(&b1, 8080);
    let client = Client::new(&m);
    let ok = format!("{}:8080", b1.ip);
    let (statuses, max_streams) = client.rt.block_on(async {
        let (sender, mut conn) = client.hbone(&x1, &b1).await.unwrap();
        let (ask, mut asked) = tokio::sync::mpsc::channel::<tokio::sync::oneshot::Sender<usize>>(1);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut conn => return,
                    Some(reply) = asked.recv() => {
                        let _ = reply.send(conn.max_concurrent_send_streams());
                    }
                }
            }
        });
        let big = "x".repeat(20 * 1024);
        let mut statuses = Vec::new();
        for headers in [vec![], vec![("x-padding", big)], vec![]] {
            statuses.push(Client::status(&sender, &ok, &headers).await.unwrap());
        }
        let (reply, max) = tokio::sync::oneshot::channel();
        ask.send(reply).await.unwrap();
        (statuses, max.await.unwrap())
    });
    assert_eq!(statuses, vec![200, 431, 200]);
    assert_eq!(
        max_streams, 1000,
        "MAX_CONCURRENT_STREAMS as the server advertised it"
    );
    // The oversized request reached nothing upstream.
    assert!(eventually(T, || server.peers().len() == 2));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(server.peers().len(), 2);
}

/// An inbound HBONE connection that carries no stream for `--hbone-idle-timeout` is closed
/// (GOAWAY, then the connection ends), so an idle verified peer does not hold its place under
/// the connection caps; one that keeps a stream open is left alone.
#[test]
fn idle_hbone_connections_are_closed_busy_ones_kept() {
    let (m, x1, b1) = prober_and_server(&["--hbone-idle-timeout", "1s"]);
    let _server = EchoServer::start(&b1, 8080);
    let client = Client::new(&m);
    let ok = format!("{}:8080", b1.ip);
    client.rt.block_on(async {
        let (idle_sender, idle_conn) = client.hbone(&x1, &b1).await.unwrap();
        let idle = tokio::spawn(idle_conn);
        assert_eq!(Client::status(&idle_sender, &ok, &[]).await.unwrap(), 200);

        let (busy_sender, busy_conn) = client.hbone(&x1, &b1).await.unwrap();
        let busy = tokio::spawn(busy_conn);
        let req = http::Request::builder()
            .method("CONNECT")
            .uri(&ok)
            .body(())
            .unwrap();
        let mut s = busy_sender.clone().ready().await.unwrap();
        let (resp, mut send) = s.send_request(req, false).unwrap();
        let mut body = resp.await.unwrap().into_body();

        // The idle one ends within the timeout and a tick; the busy one is still usable.
        let ended = tokio::time::timeout(Duration::from_secs(5), idle).await;
        assert!(ended.is_ok(), "the idle HBONE connection was not closed");
        send.send_data(bytes::Bytes::from_static(b"still here"), false)
            .unwrap();
        let got = tokio::time::timeout(T, body.data())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(&got[..], b"still here");
        assert!(!busy.is_finished(), "the busy HBONE connection was closed");
    });
}

/// An upstream that never answers the SYN (here a pod app port whose packets are dropped)
/// does not hold the client's connection for the kernel's two minutes of retries: ztunnel
/// gives up after its connect deadline, the client's connection ends, and the access log
/// says why.
#[test]
fn an_upstream_that_never_answers_is_given_up_on_with_the_reason() {
    let mut m = Mesh::new(&["a", "b"]);
    let a1 = m.lab.add_pod("a", "a1");
    let b1 = m.lab.add_pod("b", "b1");
    let wa = Workload::mesh(&a1, "ns-a", "client");
    let wb = Workload::mesh(&b1, "ns-b", "server");
    m.write_config(&[&wa, &wb], &[]);
    m.start_ztunnel("a", &[]);
    m.start_ztunnel("b", &[]);
    m.enroll(&wa);
    m.enroll(&wb);
    let _listener = mesh_testbed::apps::listen(&b1, 9999);
    let script = "table inet blackhole {\n  chain input {\n    type filter hook input priority 0; policy accept;\n    tcp dport 9999 drop\n  }\n}\n";
    let rules = b1
        .ns
        .open()
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn();
    {
        use std::io::Write;
        let mut child = rules.unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
    }
    let conn = connect(&a1, b1.addr(9999), T).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let ended = echo_roundtrip(conn, b"anyone?");
    assert!(
        !matches!(&ended, Ok(got) if got == b"anyone?"),
        "data went through a blackholed port: {ended:?}"
    );
    assert!(
        ended
            .as_ref()
            .err()
            .is_none_or(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "the client's connection was held past 30 s"
    );
    assert!(
        eventually(T, || m
            .ztunnel_log("b")
            .contains("timed out during the TCP connect")),
        "{}",
        m.ztunnel_log("b")
    );
}

/// An inbound HBONE connection is PINGed every `--hbone-keepalive`: a live peer answers and
/// keeps it, one that has stopped answering (no FIN or RST ever comes) is closed at the next
/// PING instead of being held until TCP gives up.
#[test]
fn hbone_peers_that_stop_answering_pings_are_closed() {
    let (mut m, x1, b1) = prober_and_server(&["--hbone-keepalive", "500ms"]);
    let _server = EchoServer::start(&b1, 8080);
    let client = Client::new(&m);
    let ok = format!("{}:8080", b1.ip);
    client.rt.block_on(async {
        let (sender, conn) = client.hbone(&x1, &b1).await.unwrap();
        tokio::spawn(conn);
        // Several PINGs come and are answered while the client is alive.
        assert_eq!(Client::status(&sender, &ok, &[]).await.unwrap(), 200);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(Client::status(&sender, &ok, &[]).await.unwrap(), 200);
    });
    assert!(
        !m.ztunnel_log("b")
            .contains("did not answer the keepalive PING"),
        "a live peer was cut"
    );
    // Now the client's connection is no longer polled (the runtime is idle outside
    // block_on): it stops reading and answering, yet sends no FIN or RST, like a peer that
    // vanished.
    assert!(
        eventually(T, || m
            .ztunnel_log("b")
            .contains("did not answer the keepalive PING")),
        "{}",
        m.ztunnel_log("b")
    );
}

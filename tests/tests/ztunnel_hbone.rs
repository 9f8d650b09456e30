//! ztunnel end to end: two simulated nodes, real ztunnel processes, real kernel redirection.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_testbed::apps::{EchoServer, connect, echo_roundtrip, listening_ports, payload};
use mesh_testbed::capture::{Capture, contains};
use mesh_testbed::mesh::{Mesh, Scene, Service, Workload, eventually};

const T: Duration = Duration::from_secs(5);

#[test]
fn pod_traffic_crosses_nodes_only_inside_hbone() {
    let mut m = Mesh::new(&["a", "b"]);
    let a1 = m.lab.add_pod("a", "a1");
    let b1 = m.lab.add_pod("b", "b1");
    let x1 = m.lab.add_pod("b", "x1"); // not in the mesh
    let wa = Workload::mesh(&a1, "ns-a", "client");
    let wb = Workload::mesh(&b1, "ns-b", "server");
    let svc = Service::echo("198.19.100.1");
    m.write_config(&[&wa, &wb], &[svc]);
    m.start_ztunnel("a", &[]);
    m.start_ztunnel("b", &[]);
    m.enroll(&wa);
    m.enroll(&wb);
    let server = EchoServer::start(&b1, 8080);
    let outside = EchoServer::start(&x1, 9090);

    let node_a = m.lab.node("a").clone();
    let capture = Capture::start(&node_a.ns, &m.lab.link("a", "b"), m.lab.dir());

    // Direct to the pod IP: a megabyte each way, half-closes both ways.
    let data = payload("SECRET-PAYLOAD-DIRECT", 1 << 20);
    let got = echo_roundtrip(connect(&a1, b1.addr(8080), T).unwrap(), &data).unwrap();
    assert!(got == data, "echo over HBONE corrupted the data");
    // Through a service VIP, mapped to the target port.
    let data = payload("SECRET-PAYLOAD-VIP", 64 * 1024);
    let vip: SocketAddr = "198.19.100.1:80".parse().unwrap();
    let got = echo_roundtrip(connect(&a1, vip, T).unwrap(), &data).unwrap();
    assert!(
        got == data,
        "echo through the service VIP corrupted the data"
    );
    // To a pod outside the mesh: plain TCP from a1's own address.
    let plain = payload("PASSTHROUGH-PAYLOAD", 4096);
    let got = echo_roundtrip(connect(&a1, x1.addr(9090), T).unwrap(), &plain).unwrap();
    assert!(got == plain);

    let segments = capture.stop();
    // The server app saw a1 itself, not a proxy address.
    assert_eq!(server.peers().len(), 2);
    assert!(
        server.peers().iter().all(|p| p.ip() == a1.ip),
        "{:?}",
        server.peers()
    );
    assert_eq!(outside.peers()[0].ip(), a1.ip);
    // On the wire between the nodes: a1 <-> b1 only as TLS on 15008, and no plaintext.
    let between: Vec<_> = segments
        .iter()
        .filter(|s| {
            (s.src.ip() == a1.ip && s.dst.ip() == b1.ip)
                || (s.src.ip() == b1.ip && s.dst.ip() == a1.ip)
        })
        .collect();
    assert!(!between.is_empty(), "capture saw no a1<->b1 traffic");
    let mut flows = std::collections::HashSet::new();
    for s in &between {
        assert!(
            s.src.port() == 15008 || s.dst.port() == 15008,
            "non-HBONE segment {s:?}"
        );
        // Each direction of each connection opens with a TLS handshake record (22, 3, x).
        if !s.payload.is_empty() && flows.insert((s.src, s.dst)) {
            assert_eq!(
                &s.payload[..2],
                &[22, 3],
                "flow {} -> {} does not start with TLS",
                s.src,
                s.dst
            );
        }
    }
    assert!(
        !contains(&segments, b"SECRET-PAYLOAD-DIRECT"),
        "plaintext on the wire"
    );
    assert!(
        !contains(&segments, b"SECRET-PAYLOAD-VIP"),
        "plaintext on the wire"
    );
    // The capture itself works: passthrough traffic is visible in the clear.
    let flows: std::collections::BTreeSet<String> = segments
        .iter()
        .map(|s| format!("{} -> {} ({}B)", s.src, s.dst, s.payload.len()))
        .collect();
    assert!(
        contains(&segments, b"PASSTHROUGH-PAYLOAD"),
        "passthrough not seen; flows: {flows:#?}"
    );

    // One access-log line per connection, with identities on the tunnelled ones.
    let log = m.ztunnel_log("a");
    assert!(
        log.contains("dst.identity=spiffe://cluster.local/ns/ns-b/sa/server"),
        "{log}"
    );
    assert!(eventually(T, || m.ztunnel_log("b").contains(
        "src.identity=spiffe://cluster.local/ns/ns-a/sa/client"
    )));
}

#[test]
fn server_with_the_wrong_identity_is_refused() {
    let Scene {
        mut m,
        a1,
        b1,
        wa,
        wb,
    } = Scene::new();
    m.write_config(&[&wa, &wb], &[]);
    m.start_ztunnel("a", &[]);
    m.start_ztunnel("b", &[]);
    m.enroll(&wa);
    // b1 is enrolled under another service account than the registry says, so its
    // certificate names an identity a1's ztunnel does not expect.
    let impostor = Workload::mesh(&b1, "ns-b", "impostor");
    m.enroll(&impostor);
    let server = EchoServer::start(&b1, 8080);
    let result = connect(&a1, b1.addr(8080), T).and_then(|s| echo_roundtrip(s, b"hello"));
    assert!(
        !matches!(&result, Ok(d) if d == b"hello"),
        "connection went through: {result:?}"
    );
    assert!(server.peers().is_empty(), "the impostor's app was reached");
    assert!(
        eventually(T, || m.ztunnel_log("a").contains("expected one of")),
        "{}",
        m.ztunnel_log("a")
    );
}

#[test]
fn plaintext_peers_reach_mesh_pods_through_the_inbound_port() {
    let mut m = Mesh::new(&["a", "b"]);
    let x1 = m.lab.add_pod("a", "x1"); // outside the mesh
    let b1 = m.lab.add_pod("b", "b1");
    let wb = Workload::mesh(&b1, "ns-b", "server");
    m.write_config(&[&wb], &[]);
    m.start_ztunnel("b", &[]);
    m.enroll(&wb);
    let server = EchoServer::start(&b1, 8080);
    let data = payload("INBOUND-PLAIN", 100_000);
    let got = echo_roundtrip(connect(&x1, b1.addr(8080), T).unwrap(), &data).unwrap();
    assert!(got == data);
    assert_eq!(
        server.peers()[0].ip(),
        x1.ip,
        "app must see the real client address"
    );
    assert!(eventually(T, || m
        .ztunnel_log("b")
        .contains("direction=inbound-plaintext")));
}

#[test]
fn registry_only_refuses_unknown_destinations() {
    let mut s = Scene::new();
    let x1 = s.m.lab.add_pod("b", "x1");
    s.run(&["--registry-only"]);
    let Scene { mut m, a1, b1, .. } = s;
    let _server = EchoServer::start(&b1, 8080);
    let outside = EchoServer::start(&x1, 9090);
    assert_eq!(
        echo_roundtrip(connect(&a1, b1.addr(8080), T).unwrap(), b"ok").unwrap(),
        b"ok"
    );
    // Refused with a reset, which may already arrive during the local connect.
    let refused = connect(&a1, x1.addr(9090), T).and_then(|s| echo_roundtrip(s, b"no"));
    assert!(!matches!(&refused, Ok(d) if d == b"no"));
    assert!(outside.peers().is_empty());
    assert!(eventually(T, || m
        .ztunnel_log("a")
        .contains("registry-only")));
}

#[test]
fn deleting_a_pod_closes_its_listeners() {
    let mut m = Mesh::new(&["a"]);
    let a1 = m.lab.add_pod("a", "a1");
    let wa = Workload::mesh(&a1, "ns-a", "client");
    m.write_config(&[&wa], &[]);
    m.start_ztunnel("a", &[]);
    m.enroll(&wa);
    let ports = listening_ports(&a1);
    for p in [15001, 15006, 15008] {
        assert!(ports.contains(&p), "{p} not listening: {ports:?}");
    }
    m.agent("a").del(&wa.uid()).unwrap();
    let ports = listening_ports(&a1);
    assert!(
        !ports.iter().any(|p| [15001, 15006, 15008].contains(p)),
        "still listening: {ports:?}"
    );
    // Deleting again is fine.
    m.agent("a").del(&wa.uid()).unwrap();
}

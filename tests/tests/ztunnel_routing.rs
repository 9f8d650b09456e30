//! What istiod's routing fields do on real nodes: waypoints (a stand-in waypoint in the
//! test bed receives service and workload traffic, and when it is down or unknown the
//! connection is refused, never sent around it) and application tunnels (a PROXY v2 header
//! with the client's identity reaches the app).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_testbed::apps::{EchoServer, connect, echo_roundtrip, listen};
use mesh_testbed::capture::{Capture, contains};
use mesh_testbed::lab::Pod;
use mesh_testbed::mesh::{Mesh, Workload, eventually};
use mesh_testbed::relay::{Forward, HboneTarget, Relay, Seen};
use ztunnel::identity::Identity;

const T: Duration = Duration::from_secs(5);

fn workload_yaml(w: &Workload, extra: &str) -> String {
    format!(
        "- uid: {uid}\n  name: {name}\n  namespace: {ns}\n  serviceAccount: {sa}\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: {node}\n{extra}",
        uid = w.uid(),
        name = w.pod.name,
        ns = w.namespace,
        sa = w.service_account,
        ip = w.pod.ip,
        node = w.pod.node,
    )
}

/// a1 (client) on node a; b1 (server) and wp (the waypoint, not enrolled) on node b. Service
/// `echo` (198.19.100.1:80 → 8080 on b1) has the waypoint at wp's own address; b1 has it as
/// its workload waypoint by the service `waypoint.ns-b.svc` (198.19.100.9:15008 → wp).
struct Scene {
    m: Mesh,
    a1: Pod,
    b1: Pod,
    wp: Pod,
}

const VIP: &str = "198.19.100.1:80";

fn config(s: &Scene, service_waypoint: &str) -> String {
    let wa = Workload::mesh(&s.a1, "ns-a", "client");
    let wb = Workload::mesh(&s.b1, "ns-b", "server");
    let ww = Workload::mesh(&s.wp, "ns-b", "waypoint");
    let mut y = String::from("workloads:\n");
    y += &workload_yaml(&wa, "");
    y += &workload_yaml(
        &wb,
        "  services: {\"ns-b/echo.ns-b.svc\": {80: 8080}}\n  waypoint: {destination: \"ns-b/waypoint.ns-b.svc\", hboneMtlsPort: 15008}\n",
    );
    y += &workload_yaml(
        &ww,
        "  services: {\"ns-b/waypoint.ns-b.svc\": {15008: 15008}}\n",
    );
    y += &format!(
        "services:\n\
         - {{name: echo, namespace: ns-b, hostname: echo.ns-b.svc, vips: [\"/198.19.100.1\"], ports: {{80: 8080}}, waypoint: {{destination: \"{service_waypoint}\", hboneMtlsPort: 15008}}}}\n\
         - {{name: waypoint, namespace: ns-b, hostname: waypoint.ns-b.svc, vips: [\"/198.19.100.9\"], ports: {{15008: 15008}}}}\n"
    );
    y
}

fn scene() -> Scene {
    let mut m = Mesh::new(&["a", "b"]);
    let a1 = m.lab.add_pod("a", "a1");
    let b1 = m.lab.add_pod("b", "b1");
    let wp = m.lab.add_pod("b", "wp");
    let s = Scene { m, a1, b1, wp };
    s.m.write_config_text(&config(&s, &format!("/{}", s.wp.ip)));
    s
}

/// [`scene`] with both ztunnels running, a1 and b1 enrolled, and b1's app on 8080.
fn running_scene() -> (Scene, EchoServer) {
    let mut s = scene();
    s.m.start_ztunnel("a", &[]);
    s.m.start_ztunnel("b", &[]);
    for w in [
        Workload::mesh(&s.a1, "ns-a", "client"),
        Workload::mesh(&s.b1, "ns-b", "server"),
    ] {
        s.m.enroll(&w);
    }
    let server = EchoServer::start(&s.b1, 8080);
    (s, server)
}

/// The waypoint forwards both the VIP and b1's own address to b1's ztunnel, as itself.
fn waypoint(s: &Scene) -> Relay {
    let b1 = s.b1.clone();
    let server = Identity::new("cluster.local", "ns-b", "server").unwrap();
    let route = Arc::new(move |authority: &str| {
        (authority == VIP || authority == b1.addr(8080).to_string()).then(|| HboneTarget {
            addr: b1.addr(15008),
            identity: server.clone(),
            authority: b1.addr(8080).to_string(),
        })
    });
    Relay::start(&s.m, &s.wp, "ns-b", "waypoint", Forward::Hbone(route))
}

fn roundtrip(from: &Pod, to: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    echo_roundtrip(connect(from, to, T)?, data)
}

#[test]
fn service_and_workload_traffic_goes_through_the_waypoint() {
    let (s, server) = running_scene();
    let wp = waypoint(&s);
    let client = Some("spiffe://cluster.local/ns/ns-a/sa/client".to_string());

    assert_eq!(
        roundtrip(&s.a1, VIP.parse().unwrap(), b"via the VIP").unwrap(),
        b"via the VIP"
    );
    assert_eq!(
        roundtrip(&s.a1, s.b1.addr(8080), b"to the pod").unwrap(),
        b"to the pod"
    );
    assert_eq!(
        wp.seen(),
        vec![
            Seen {
                authority: VIP.into(),
                peer: client.clone()
            },
            Seen {
                authority: s.b1.addr(8080).to_string(),
                peer: client
            },
        ],
        "the waypoint saw each connection with its original destination and the client's identity"
    );
    // The app saw both arrive from the waypoint, not from a1 directly.
    let peers = server.peers();
    assert_eq!(peers.len(), 2, "{peers:?}");
    assert!(peers.iter().all(|p| p.ip() == s.wp.ip), "{peers:?}");
}

#[test]
fn a_waypoint_that_is_down_or_unknown_refuses_never_bypasses() {
    let (mut s, server) = running_scene();
    // Down: nothing listens on the waypoint's 15008.
    assert!(refused(roundtrip(&s.a1, VIP.parse().unwrap(), b"x")));
    assert!(refused(roundtrip(&s.a1, s.b1.addr(8080), b"x")));
    // Unknown: the service names a waypoint address nothing in the config has. Once ztunnel
    // says so, a live waypoint at the old address must not be used either.
    s.m.write_config_text(&config(&s, "/198.19.100.77"));
    let unknown = eventually(T, || {
        assert!(refused(roundtrip(&s.a1, VIP.parse().unwrap(), b"x")));
        s.m.lab
            .process("ztunnel-a")
            .log_text()
            .contains("waypoint unknown")
    });
    assert!(unknown, "no access log names the unknown waypoint");
    let wp = waypoint(&s);
    assert!(refused(roundtrip(&s.a1, VIP.parse().unwrap(), b"x")));
    assert_eq!(
        server.peers(),
        vec![],
        "the app was reached around the waypoint"
    );
    assert_eq!(wp.seen(), vec![], "an unknown waypoint address was dialled");
}

/// Refused: an error, or an immediate close with nothing echoed.
fn refused(r: std::io::Result<Vec<u8>>) -> bool {
    r.map_or(true, |got| got.is_empty())
}

#[test]
fn application_tunnel_gets_a_proxy_v2_header_with_the_client_identity() {
    let mut m = Mesh::new(&["a", "b"]);
    let a1 = m.lab.add_pod("a", "a1");
    let b1 = m.lab.add_pod("b", "b1");
    let wa = Workload::mesh(&a1, "ns-a", "client");
    let wb = Workload::mesh(&b1, "ns-b", "server");
    let mut y = String::from("workloads:\n");
    y += &workload_yaml(&wa, "");
    y += &workload_yaml(&wb, "  applicationTunnel: {protocol: PROXY, port: 9000}\n");
    m.write_config_text(&y);
    m.start_ztunnel("a", &[]);
    m.start_ztunnel("b", &[]);
    m.enroll(&wa);
    m.enroll(&wb);
    let listener = listen(&b1, 9000);
    let app = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        conn.set_read_timeout(Some(T)).unwrap();
        let mut fixed = [0u8; 16];
        conn.read_exact(&mut fixed).unwrap();
        let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
        let mut rest = vec![0u8; len];
        conn.read_exact(&mut rest).unwrap();
        let mut payload = [0u8; 5];
        conn.read_exact(&mut payload).unwrap();
        conn.write_all(b"ok").unwrap();
        ([&fixed[..], &rest].concat(), peer, payload)
    });
    let mut c = connect(&a1, b1.addr(8080), T).unwrap();
    c.write_all(b"hello").unwrap();
    let mut reply = [0u8; 2];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"ok");
    let (header, peer, payload) = app.join().unwrap();
    assert_eq!(&payload, b"hello", "the app's bytes follow the header");
    assert_eq!(
        peer.ip(),
        a1.ip,
        "the app connection still comes from the client's address"
    );
    let header = ppp::v2::Header::try_from(header.as_slice()).expect("a PROXY v2 header");
    match header.addresses {
        ppp::v2::Addresses::IPv4(a) => {
            // As Istio: the HBONE peer (a1's address, the tunnel's own port).
            assert_eq!(a.source_address, a1.ip);
            assert_ne!(a.source_port, 0);
            assert_eq!(a.destination_address, b1.ip);
            assert_eq!(a.destination_port, 8080, "the port the client dialled");
        }
        other => panic!("{other:?}"),
    }
    let tlvs: Vec<_> = header.tlvs().collect::<Result<_, _>>().unwrap();
    let id = tlvs.iter().find(|t| t.kind == 0xD0).expect("TLV 0xD0");
    assert_eq!(&*id.value, b"spiffe://cluster.local/ns/ns-a/sa/client");
}

/// Nodes a (network net1) and b (net2) share no link: node g between them carries only the
/// gateway pod's traffic. a1 reaches service `echo` (backed by b1 on net2) with double HBONE:
/// an outer tunnel to the gateway, inside it end-to-end mTLS to b1's ztunnel. The gateway only sees
/// `echo.ns-b.svc:80` and TLS; both of g's links carry nothing else.
#[test]
fn a_second_network_is_reached_through_its_gateway_with_double_hbone() {
    let mut m = Mesh::new(&["a", "g", "b"]);
    // Cut a <-> b: only g joins them, and g forwards nothing but what its gateway pod sends.
    m.lab
        .node("a")
        .ns
        .ip(&["link", "del", &m.lab.link("a", "b")]);
    let a1 = m.lab.add_pod("a", "a1");
    let gw = m.lab.add_pod("g", "gw");
    let b1 = m.lab.add_pod("b", "b1");
    assert!(
        connect(&a1, b1.addr(9), Duration::from_millis(500)).is_err(),
        "a1 reaches b1 without the gateway"
    );
    let wa = Workload::mesh(&a1, "ns-a", "client");
    let wb = Workload::mesh(&b1, "ns-b", "server");
    let wg = Workload::mesh(&gw, "istio-system", "eastwest");
    let mut y = String::from("workloads:\n");
    y += &workload_yaml(&wa, "  network: net1\n");
    y += &workload_yaml(
        &wb,
        &format!(
            "  network: net2\n  services: {{\"ns-b/echo.ns-b.svc\": {{80: 8080}}}}\n  networkGateway: {{destination: \"net1/{}\", hboneMtlsPort: 15008}}\n",
            gw.ip
        ),
    );
    y += &workload_yaml(&wg, "  network: net1\n");
    y += "services:\n- {name: echo, namespace: ns-b, hostname: echo.ns-b.svc, vips: [\"net1/198.19.100.1\"], ports: {80: 8080}}\n";
    m.write_config_text(&y);
    m.start_ztunnel("a", &["--network", "net1"]);
    m.start_ztunnel("b", &["--network", "net2"]);
    m.enroll(&wa);
    m.enroll(&wb);
    let server = EchoServer::start(&b1, 8080);
    let b1_hbone = b1.addr(15008);
    let route =
        Arc::new(move |authority: &str| (authority == "echo.ns-b.svc:80").then_some(b1_hbone));
    let relay = Relay::start(&m, &gw, "istio-system", "eastwest", Forward::Raw(route));

    let g = m.lab.node("g").clone();
    let outer = Capture::start(&g.ns, &m.lab.link("g", "a"), m.lab.dir());
    let inner = Capture::start(&g.ns, &m.lab.link("g", "b"), m.lab.dir());
    let data = mesh_testbed::apps::payload("SECRET-TWO-NETWORKS", 256 * 1024);
    let got = roundtrip(&a1, VIP.parse().unwrap(), &data).unwrap();
    assert!(got == data, "echo across networks corrupted the data");
    let (outer, inner) = (outer.stop(), inner.stop());

    assert_eq!(
        relay.seen(),
        vec![Seen {
            authority: "echo.ns-b.svc:80".into(),
            peer: Some("spiffe://cluster.local/ns/ns-a/sa/client".into()),
        }],
        "the gateway saw the service hostname, never a pod address"
    );
    assert_eq!(server.peers().len(), 1);
    for (link, segments) in [("outer", &outer), ("inner", &inner)] {
        assert!(!segments.is_empty(), "{link}: capture saw nothing");
        assert!(
            !contains(segments, b"SECRET-TWO-NETWORKS"),
            "{link}: plaintext on the wire"
        );
        let mut flows = std::collections::HashSet::new();
        for s in segments.iter().filter(|s| !s.payload.is_empty()) {
            assert!(
                s.src.port() == 15008 || s.dst.port() == 15008,
                "{link}: non-HBONE segment {} -> {}",
                s.src,
                s.dst
            );
            if flows.insert((s.src, s.dst)) {
                assert_eq!(
                    &s.payload[..2],
                    &[22, 3],
                    "{link}: {} -> {} is not TLS",
                    s.src,
                    s.dst
                );
            }
        }
    }
    // The inner session is end to end: b1's ztunnel saw a1's identity, not the gateway's.
    assert!(eventually(T, || m.ztunnel_log("b").contains(
        "src.identity=spiffe://cluster.local/ns/ns-a/sa/client"
    )));
    assert!(m.ztunnel_log("a").contains("via=gateway"));
}

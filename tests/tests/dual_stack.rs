//! IPv6 and dual stack end to end: labs built IPv6-only and dual-stack (fd00::/8, see
//! `mesh_testbed::lab`), real ztunnels, the agent's own rules. Each check runs over every
//! address family the pods have, so a dual-stack pod is shown to be captured, tunnelled and
//! authorized on both, not only on the family a client happens to pick.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use mesh_testbed::apps::{EchoServer, Kubelet, connect, echo_roundtrip, payload, proxied};
use mesh_testbed::capture::{Capture, Segment, contains};
use mesh_testbed::lab::{IpFamily, Pod};
use mesh_testbed::mesh::{Mesh, Scene, Service, Workload, config_yaml, eventually};

const T: Duration = Duration::from_secs(5);

/// Whether a full echo round trip of `data` from `from` to `to` works.
fn echoes(from: &Pod, to: SocketAddr, data: &[u8]) -> bool {
    connect(from, to, T)
        .and_then(|s| echo_roundtrip(s, data))
        .is_ok_and(|got| got == data)
}

/// `from`'s address in the family of `to`.
fn source_for(from: &Pod, to: SocketAddr) -> IpAddr {
    from.ip_like(to.ip())
        .unwrap_or_else(|| panic!("{} has no address like {to}", from.name))
}

/// Segments between any address of `a` and any of `b`.
fn between<'s>(segments: &'s [Segment], a: &Pod, b: &Pod) -> Vec<&'s Segment> {
    let (a, b): (HashSet<IpAddr>, HashSet<IpAddr>) = (
        a.ips.iter().copied().collect(),
        b.ips.iter().copied().collect(),
    );
    segments
        .iter()
        .filter(|s| {
            (a.contains(&s.src.ip()) && b.contains(&s.dst.ip()))
                || (b.contains(&s.src.ip()) && a.contains(&s.dst.ip()))
        })
        .collect()
}

/// Outbound capture, HBONE across nodes to each of the server's addresses and to an IPv6
/// service VIP, passthrough to a pod outside the mesh, the client's own address at every
/// server, and on the wire between the nodes nothing but TLS on 15008 for mesh traffic.
fn hbone_across_nodes(family: IpFamily) {
    let mut m = Mesh::with_family(&["a", "b"], family);
    let a1 = m.lab.add_pod("a", "a1");
    let b1 = m.lab.add_pod("b", "b1");
    let x1 = m.lab.add_pod("b", "x1"); // not in the mesh
    let wa = Workload::mesh(&a1, "ns-a", "client");
    let wb = Workload::mesh(&b1, "ns-b", "server");
    let vip: SocketAddr = "[fd00:19:100::1]:80".parse().unwrap();
    let svc = Service::echo(&vip.ip().to_string());
    m.write_config(&[&wa, &wb], &[svc]);
    m.start_ztunnel("a", &[]);
    m.start_ztunnel("b", &[]);
    m.enroll(&wa);
    m.enroll(&wb);
    let server = EchoServer::start(&b1, 8080);
    let outside = EchoServer::start(&x1, 9090);
    let node_a = m.lab.node("a").clone();
    let capture = Capture::start(&node_a.ns, &m.lab.link("a", "b"), m.lab.dir());

    let mut expected_peers = Vec::new();
    for dst in b1.addrs(8080) {
        let data = payload("SECRET-V6-DIRECT", 256 * 1024);
        assert!(echoes(&a1, dst, &data), "{family}: a1 -> {dst} over HBONE");
        expected_peers.push(source_for(&a1, dst));
    }
    let data = payload("SECRET-V6-VIP", 64 * 1024);
    assert!(echoes(&a1, vip, &data), "{family}: a1 -> {vip}");
    expected_peers.push(source_for(&a1, b1.addrs(8080)[b1.ips.len() - 1]));
    let mut passthrough = Vec::new();
    for dst in x1.addrs(9090) {
        let marker = format!("PASSTHROUGH-{}", dst.ip());
        assert!(
            echoes(&a1, dst, &payload(&marker, 4096)),
            "{family}: a1 -> {dst} (outside the mesh)"
        );
        passthrough.push((marker, source_for(&a1, dst)));
    }
    let segments = capture.stop();

    // Every server saw a1's own address of the family it was reached on.
    let peers: Vec<IpAddr> = server.peers().iter().map(|p| p.ip()).collect();
    assert_eq!(peers, expected_peers, "{family}");
    let peers: Vec<IpAddr> = outside.peers().iter().map(|p| p.ip()).collect();
    let sources: Vec<IpAddr> = passthrough.iter().map(|(_, ip)| *ip).collect();
    assert_eq!(peers, sources, "{family}");

    // Between the nodes, a1 <-> b1 is TLS on 15008 only, in each family, and never plaintext.
    let tunnel = between(&segments, &a1, &b1);
    for ip in &b1.ips {
        assert!(
            tunnel.iter().any(|s| s.dst.ip() == *ip),
            "{family}: no tunnel traffic to {ip} captured"
        );
    }
    let mut flows = HashSet::new();
    for s in &tunnel {
        assert!(
            s.src.port() == 15008 || s.dst.port() == 15008,
            "{family}: non-HBONE segment {s:?}"
        );
        if !s.payload.is_empty() && flows.insert((s.src, s.dst)) {
            assert_eq!(&s.payload[..2], &[22, 3], "{family}: {s:?} is not TLS");
        }
    }
    for secret in [&b"SECRET-V6-DIRECT"[..], b"SECRET-V6-VIP"] {
        assert!(
            !contains(&segments, secret),
            "{family}: plaintext on the wire"
        );
    }
    // The capture sees passthrough in the clear, so the checks above can fail.
    for (marker, _) in &passthrough {
        assert!(
            contains(&segments, marker.as_bytes()),
            "{family}: {marker} not captured"
        );
    }

    // The HBONE authority carries the bracketed IPv6 address, as the server's ztunnel logs it.
    let b1_v6 = b1.ips.iter().find(|ip| ip.is_ipv6()).expect("IPv6 address");
    let authority = format!("dst.addr=[{b1_v6}]:8080");
    assert!(
        eventually(T, || {
            let log = m.ztunnel_log("b");
            log.lines().any(|l| {
                l.contains("direction=inbound pod")
                    && l.contains(&authority)
                    && l.contains("src.identity=spiffe://cluster.local/ns/ns-a/sa/client")
            })
        }),
        "{family}: no inbound HBONE access-log line with {authority}: {}",
        m.ztunnel_log("b")
    );
}

#[test]
fn ipv6_pods_talk_across_nodes_only_inside_hbone() {
    hbone_across_nodes(IpFamily::Ipv6);
}

#[test]
fn dual_stack_pods_talk_across_nodes_only_inside_hbone() {
    hbone_across_nodes(IpFamily::Dual);
}

/// A Deny policy naming IPv6 sources: it holds on the HBONE and the plaintext inbound paths
/// of that family, and a dual-stack client's IPv4 address, which it does not name, passes.
fn v6_cidr_policy(family: IpFamily) {
    let mut m = Mesh::with_family(&["a", "b"], family);
    let a1 = m.lab.add_pod("a", "a1");
    let a2 = m.lab.add_pod("a", "a2");
    let x1 = m.lab.add_pod("a", "x1"); // outside the mesh: plaintext, allowed
    let x2 = m.lab.add_pod("a", "x2"); // outside the mesh: plaintext, denied
    let b1 = m.lab.add_pod("b", "b1");
    let wa1 = Workload::mesh(&a1, "ns-a", "client");
    let wa2 = Workload::mesh(&a2, "ns-a", "client");
    let mut wb = Workload::mesh(&b1, "ns-b", "server");
    wb.policies = vec!["ns-b/deny-v6-sources".into()];
    let v6_of = |p: &Pod| *p.ips.iter().find(|ip| ip.is_ipv6()).expect("IPv6 address");
    let policy = format!(
        "policies:\n- {{name: deny-v6-sources, namespace: ns-b, scope: WorkloadSelector, \
         action: Deny, rules: [[[{{sourceIps: [\"{}/128\", \"{}\"]}}]]]}}\n",
        v6_of(&a2),
        v6_of(&x2)
    );
    let base = config_yaml(&[&wa1, &wa2, &wb], &[]);
    m.write_config_text(&format!("{base}{policy}"));
    m.start_ztunnel("a", &[]);
    m.start_ztunnel("b", &[]);
    for w in [&wa1, &wa2, &wb] {
        m.enroll(w);
    }
    let server = EchoServer::start(&b1, 8080);
    let data = payload("POLICY", 4096);
    for dst in b1.addrs(8080) {
        let v6 = dst.is_ipv6();
        assert!(echoes(&a1, dst, &data), "{family}: a1 -> {dst}");
        assert!(echoes(&x1, dst, &data), "{family}: x1 -> {dst} (plaintext)");
        assert_eq!(echoes(&a2, dst, &data), !v6, "{family}: a2 -> {dst}");
        assert_eq!(echoes(&x2, dst, &data), !v6, "{family}: x2 -> {dst}");
    }
    // The plaintext peer reached the app with its own address.
    let x1_seen: Vec<IpAddr> = server
        .peers()
        .iter()
        .map(|p| p.ip())
        .filter(|ip| x1.ips.contains(ip))
        .collect();
    assert_eq!(x1_seen, x1.ips, "{family}");
    assert!(
        !server
            .peers()
            .iter()
            .any(|p| p.ip() == v6_of(&a2) || p.ip() == v6_of(&x2)),
        "{family}: a denied source reached the app: {:?}",
        server.peers()
    );
    for (direction, who) in [("inbound", &a2), ("inbound-plaintext", &x2)] {
        let src = format!("src.addr=[{}]:", v6_of(who));
        let denied = |l: &str| {
            l.contains(&format!("direction={direction} "))
                && l.contains(&src)
                && l.contains("reason=denied by policy ns-b/deny-v6-sources")
        };
        assert!(
            eventually(T, || m.ztunnel_log("b").lines().any(denied)),
            "{family}: no {direction} denial for {src}: {}",
            m.ztunnel_log("b")
        );
    }
}

#[test]
fn ipv6_cidr_policy_holds_on_hbone_and_plaintext() {
    v6_cidr_policy(IpFamily::Ipv6);
}

#[test]
fn dual_stack_cidr_policy_names_one_family() {
    v6_cidr_policy(IpFamily::Dual);
}

/// The real agent enrolls the pods on every address; the kubelet's probes to each address
/// are SNATed to the probe address of that family and skip the proxy.
fn probes_and_agent(family: IpFamily) {
    let mut s = Scene::with_family(family);
    let kubelet = Kubelet::new(s.m.lab.id());
    let probe_args = ["--probe-cgroup", kubelet.path.as_str()];
    s.m.write_config(&[&s.wa, &s.wb], &[]);
    for (node, w) in [("a", s.wa.clone()), ("b", s.wb.clone())] {
        s.m.write_pods(node, &[&w], "");
        s.m.start_agent(node, &probe_args);
        s.m.start_ztunnel(node, &[]);
    }
    assert!(
        eventually(Duration::from_secs(10), || proxied(&s.a1) && proxied(&s.b1)),
        "{family}: the agents did not enroll both pods"
    );
    let server = EchoServer::start(&s.b1, 8080);
    let node = s.m.lab.node("b").ns.clone();
    let mut expected = Vec::new();
    for dst in s.b1.addrs(8080) {
        let got = kubelet.probe(&node, dst, "probe");
        assert_eq!(got.unwrap(), "probe", "{family}: probe to {dst}");
        expected.push(if dst.is_ipv6() {
            IpAddr::V6(mesh_contract::PROBE_SNAT_V6)
        } else {
            IpAddr::V4(mesh_contract::PROBE_SNAT_V4)
        });
    }
    // Pod to pod still goes over HBONE on every address.
    for dst in s.b1.addrs(8080) {
        assert!(echoes(&s.a1, dst, b"over hbone"), "{family}: a1 -> {dst}");
        expected.push(source_for(&s.a1, dst));
    }
    let peers: Vec<IpAddr> = server.peers().iter().map(|p| p.ip()).collect();
    assert_eq!(peers, expected, "{family}");
    let families = s.b1.ips.len();
    assert!(
        eventually(T, || s
            .m
            .ztunnel_log("b")
            .matches("direction=inbound pod")
            .count()
            >= families),
        "{family}: pod traffic did not arrive over HBONE"
    );
}

#[test]
fn ipv6_probes_are_snated_and_the_agent_enrolls_v6_pods() {
    probes_and_agent(IpFamily::Ipv6);
}

#[test]
fn dual_stack_probes_are_snated_per_family() {
    probes_and_agent(IpFamily::Dual);
}

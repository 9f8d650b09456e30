//! Istio control-plane mode end to end: two simulated nodes whose ztunnels learn workloads
//! and policies from a delta ADS server (the stand-in in `mesh_testbed::control_plane`,
//! TLS, in node a's namespace) instead of the local file.

use std::time::Duration;

use mesh_testbed::apps::{EchoServer, connect, echo_roundtrip, payload};
use mesh_testbed::control_plane::ControlPlane;
use mesh_testbed::lab::Pod;
use mesh_testbed::mesh::{Mesh, Workload, eventually};
use ztunnel::proto::security as sec;

const T: Duration = Duration::from_secs(5);

fn reaches(from: &Pod, to: std::net::SocketAddr) -> bool {
    let data = payload("XDS-PROBE", 4096);
    let Ok(s) = connect(from, to, T) else {
        return false;
    };
    s.set_read_timeout(Some(T)).unwrap();
    echo_roundtrip(s, &data).is_ok_and(|got| got == data)
}

fn deny_port(port: u32) -> sec::Authorization {
    sec::Authorization {
        name: format!("deny-{port}"),
        namespace: "ns-b".into(),
        scope: sec::Scope::Namespace as i32,
        action: sec::Action::Deny as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    destination_ports: vec![port],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    }
}

/// Nodes a and b, client a1 (ns-a) and server b1 (ns-b), and a stand-in istiod in node a's
/// namespace that lists both. Returns ztunnel's flags for it; `--ca-address` too when asked.
struct Scene {
    cp: ControlPlane,
    a1: Pod,
    b1: Pod,
    wa: Workload,
    wb: Workload,
    node_a: mesh_testbed::lab::Node,
    flags: Vec<String>,
    m: Mesh,
}

fn scene(istio_ca: bool) -> Scene {
    let mut m = Mesh::new(&["a", "b"]);
    m.local_ca = !istio_ca;
    let a1 = m.lab.add_pod("a", "a1");
    let b1 = m.lab.add_pod("b", "b1");
    let wa = Workload::mesh(&a1, "ns-a", "client");
    let wb = Workload::mesh(&b1, "ns-b", "server");
    let node_a = m.lab.node("a").clone();
    let cp = ControlPlane::start(&node_a.ns, node_a.ip, m.lab.dir());
    cp.set_workloads(&[&wa, &wb]);
    let mut flags = vec![
        "--xds-address".to_string(),
        cp.url(),
        "--xds-root-cert".into(),
        cp.root_cert().display().to_string(),
    ];
    if istio_ca {
        flags.extend(["--ca-address".to_string(), cp.url()]);
    }
    Scene {
        cp,
        a1,
        b1,
        wa,
        wb,
        node_a,
        flags,
        m,
    }
}

#[test]
fn two_nodes_fed_by_xds_tunnel_and_enforce_its_policies() {
    let Scene {
        cp,
        a1,
        b1,
        wa,
        wb,
        node_a,
        flags,
        mut m,
    } = scene(false);
    cp.set_policies(&[deny_port(9000)]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    // The local file stays empty: everything comes from the control plane.
    m.start_ztunnel("a", &flags);
    m.start_ztunnel("b", &flags);
    for node in ["a", "b"] {
        assert!(
            eventually(T, || m.ztunnel_log(node).contains("first xDS push applied")),
            "{node}: {}",
            m.ztunnel_log(node)
        );
    }
    m.enroll(&wa);
    m.enroll(&wb);
    let _s1 = EchoServer::start(&b1, 8080);
    let _s2 = EchoServer::start(&b1, 9000);

    // Workloads from xDS: a1 reaches b1 over HBONE with b1's identity.
    assert!(reaches(&a1, b1.addr(8080)));
    assert!(eventually(T, || m.ztunnel_log("a").contains(
        "dst.identity=spiffe://cluster.local/ns/ns-b/sa/server"
    )));
    // Policies from xDS: port 9000 is denied, until the policy is withdrawn.
    assert!(!reaches(&a1, b1.addr(9000)));
    assert!(eventually(T, || m
        .ztunnel_log("b")
        .contains("reason=denied by policy ns-b/deny-9000")));
    cp.set_policies(&[]);
    assert!(
        eventually(T, || reaches(&a1, b1.addr(9000))),
        "policy removal not applied"
    );

    // Every push was ACKed by both ztunnels, none NACKed.
    let requests = cp.requests();
    let acks = requests
        .iter()
        .filter(|r| !r.response_nonce.is_empty())
        .count();
    assert!(acks >= 5, "{requests:#?}");
    assert!(
        requests.iter().all(|r| r.error_detail.is_none()),
        "{requests:#?}"
    );
    // Both ztunnels introduced themselves with a node id.
    assert!(requests.iter().any(|r| {
        r.node
            .as_ref()
            .is_some_and(|n| n.id.starts_with("ztunnel~"))
    }));

    // A workload withdrawn from the control plane is no longer tunnelled to.
    let dump = || {
        node_a
            .ns
            .http_get("127.0.0.1:15000".parse().unwrap(), "/config_dump")
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    assert!(dump().contains("\"uid\": \"ns-b/b1\""), "{}", dump());
    cp.set_workloads(&[&wa]);
    assert!(
        eventually(T, || !dump().contains("\"uid\": \"ns-b/b1\"")),
        "{}",
        dump()
    );
    drop(cp);
}

#[test]
fn certificates_from_the_istio_ca_carry_pod_identities_across_nodes() {
    let Scene {
        cp,
        a1,
        b1,
        wa,
        wb,
        node_a,
        flags,
        mut m,
    } = scene(true);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    for node in ["a", "b"] {
        let mut with_node = flags.to_vec();
        with_node.extend(["--node-name", node]);
        m.start_ztunnel(node, &with_node);
    }
    // Certificates for the pods the control plane places on each node are fetched before
    // the pods are enrolled (prefetch).
    let issued_for = |id: &str| cp.issued().iter().any(|i| i == id);
    assert!(
        eventually(T, || issued_for("spiffe://cluster.local/ns/ns-a/sa/client")
            && issued_for("spiffe://cluster.local/ns/ns-b/sa/server")),
        "no prefetch: {:?}",
        cp.issued()
    );
    m.enroll(&wa);
    m.enroll(&wb);
    let _server = EchoServer::start(&b1, 8080);
    assert!(
        eventually(T, || reaches(&a1, b1.addr(8080))),
        "{}\n{}",
        m.ztunnel_log("a"),
        m.ztunnel_log("b")
    );
    // The server side verified a1 by the identity the Istio CA issued for it.
    assert!(eventually(T, || m.ztunnel_log("b").contains(
        "src.identity=spiffe://cluster.local/ns/ns-a/sa/client"
    )));
    let issued = cp.issued();
    for id in [
        "spiffe://cluster.local/ns/ns-a/sa/client",
        "spiffe://cluster.local/ns/ns-b/sa/server",
    ] {
        assert!(
            issued.iter().any(|i| i == id),
            "{id} not requested: {issued:?}"
        );
    }
    // The admin view shows the CA-issued certificate.
    let (_, certs) = node_a
        .ns
        .http_get("127.0.0.1:15000".parse().unwrap(), "/config_dump")
        .unwrap();
    assert!(certs.contains("\"state\": \"valid\""), "{certs}");
    drop(cp);
}
